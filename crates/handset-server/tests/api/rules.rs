//! The request rules: phones, verifications, birth dates,
//! callback URLs, products, metadata.

use handset_core::Product;
use handset_testkit::Kind;
use serde_json::json;

use crate::helpers::TestApp;
use crate::on_both_stores;

on_both_stores!(
    phones_in_e164_or_national_form,
    verifications_join_and_belong,
    birth_dates,
    callback_urls_never_point_inside,
    products_must_be_enabled,
    metadata_and_names,
    routing_and_forced_providers,
);

async fn phones_in_e164_or_national_form(app: TestApp) {
    for (input, e164) in [
        ("+14155550123", "+14155550123"),
        ("8885551234", "+18885551234"),
        ("(415) 555-0123", "+14155550123"),
        ("+33612345678", "+33612345678"),
        ("9995551005", "+19995551005"),
        (" 4155550123 ", "+14155550123"),
    ] {
        let answer = app.start_sms(input).await;
        assert_eq!(answer.status, 201, "{input}: {}", answer.text);
        assert_eq!(answer.body["phone"], e164);
    }
    let before = app.count("transactions").await;
    for bad in [
        json!("12345"),
        json!("415555012"),
        json!("phone"),
        json!("+1415555012345"),
        json!(4155550123u64),
        json!(""),
        json!(null),
        // Only spaces may surround it (the API document's pattern).
        json!("\t4155550123"),
        json!("4155550123\n"),
    ] {
        app.post("/v1/possession", json!({ "phone": bad })).await.assert_error(422, 3101);
    }
    app.post("/v1/possession", json!({})).await.assert_error(422, 3101);
    app.post("/v1/identity", json!({ "birth_date": "1968-05-27" })).await.assert_error(422, 3101);
    assert_eq!(app.count("transactions").await, before);
}

async fn verifications_join_and_belong(app: TestApp) {
    let first = app.start_sms("4155550123").await;
    let verification_id = first.body["verification_id"].as_str().unwrap().to_owned();
    let second = app.post("/v1/possession", json!({ "phone": "4155550123", "verification_id": verification_id })).await;
    assert_eq!(second.status, 201, "{}", second.text);
    assert_eq!(second.body["verification_id"], verification_id.as_str());
    let fresh = app.start_sms("4155550123").await;
    assert_ne!(fresh.body["verification_id"], verification_id.as_str());

    let verifications = app.count("verifications").await;
    let unknown = uuid::Uuid::new_v4().to_string();
    app.post("/v1/possession", json!({ "phone": "4155550123", "verification_id": unknown }))
        .await
        .assert_error(404, 4100);
    app.post("/v1/possession", json!({ "phone": "4155550123", "verification_id": "nope" }))
        .await
        .assert_error(404, 4100);
    app.post("/v1/identity", json!({ "phone": "4155550123", "birth_date": "1968-05-27", "verification_id": unknown }))
        .await
        .assert_error(404, 4100);
    app.get(&format!("/v1/verifications/{unknown}")).await.assert_error(404, 4100);

    let (_, other) = app.partner(Product::ALL).await;
    app.post_as(&other, "/v1/possession", json!({ "phone": "4155550123", "verification_id": verification_id }))
        .await
        .assert_error(403, 3300);
    app.post_as(
        &other,
        "/v1/identity",
        json!({ "phone": "4155550123", "birth_date": "1968-05-27", "verification_id": verification_id }),
    )
    .await
    .assert_error(403, 3300);
    app.get_as(&other, &format!("/v1/verifications/{verification_id}")).await.assert_error(403, 3300);
    assert_eq!(app.count("verifications").await, verifications);
    let read = app.get(&format!("/v1/verifications/{verification_id}")).await;
    assert_eq!(read.body["transactions"].as_array().unwrap().len(), 2);
    assert_eq!(read.body["possession_verified"], false);
}

async fn birth_dates(app: TestApp) {
    let identity = |birth_date: serde_json::Value| json!({ "phone": "8885551234", "birth_date": birth_date });
    for bad in
        [json!("1968-5-27"), json!("27/05/1968"), json!("1968-02-30"), json!(19680527), json!(""), json!("1899-12-31")]
    {
        app.post("/v1/identity", identity(bad)).await.assert_error(422, 3108);
    }
    app.post("/v1/identity", json!({ "phone": "8885551234" })).await.assert_error(422, 3108);
    // Age on the UTC date: 18 today is an adult, 18 tomorrow is a minor.
    let today = chrono::Utc::now().date_naive();
    let years_ago = |years: i32| today.with_year_checked(years);
    let adult = years_ago(18).unwrap();
    let minor = adult.succ_opt().unwrap();
    app.post("/v1/identity", identity(json!(minor.format("%Y-%m-%d").to_string()))).await.assert_error(422, 3107);
    app.post("/v1/identity", identity(json!("2999-01-01"))).await.assert_error(422, 3107);
    let ok = app.post("/v1/identity", identity(json!(adult.format("%Y-%m-%d").to_string()))).await;
    assert_eq!(ok.status, 201, "{}", ok.text);
}

trait YearsAgo {
    fn with_year_checked(self, years: i32) -> Option<chrono::NaiveDate>;
}

impl YearsAgo for chrono::NaiveDate {
    fn with_year_checked(self, years: i32) -> Option<chrono::NaiveDate> {
        use chrono::Datelike;
        // 29 February has no anniversary in common years: use 28 February.
        self.with_year(self.year() - years).or_else(|| self.pred_opt()?.with_year(self.year() - years))
    }
}

async fn callback_urls_never_point_inside(app: TestApp) {
    let start = |url: &str| json!({ "phone": "4155550123", "callback_url": url });
    let before = app.count("transactions").await;
    for bad in [
        "ftp://partner.example/hook",
        "partner.example/hook",
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://api.localhost/hook",
        "http://10.0.0.5/hook",
        "http://172.16.3.4/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0/",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]/",
        "http://2130706433/",
        "https://user:pass@partner.example/hook",
        "https://token@partner.example/hook",
    ] {
        app.post("/v1/possession", start(bad)).await.assert_error(422, 3100);
    }
    app.post("/v1/possession", json!({ "phone": "4155550123", "callback_url": 42 })).await.assert_error(422, 3100);
    app.post(
        "/v1/identity",
        json!({ "phone": "8885551234", "birth_date": "1968-05-27", "callback_url": "http://127.0.0.1/" }),
    )
    .await
    .assert_error(422, 3100);
    assert_eq!(app.count("transactions").await, before);

    for good in ["https://partner.example/hook", "http://203.0.114.9:8443/cb?x=1"] {
        let answer = app.post("/v1/possession", start(good)).await;
        assert_eq!(answer.status, 201, "{good}: {}", answer.text);
    }
}

async fn products_must_be_enabled(app: TestApp) {
    let (_, sms_only) = app.partner(&[Product::PossessionSms]).await;
    let ok = app.post_as(&sms_only, "/v1/possession", json!({ "phone": "4155550123" })).await;
    assert_eq!(ok.status, 201);
    app.post_as(&sms_only, "/v1/possession", json!({ "phone": "4155550123", "channel": "network" }))
        .await
        .assert_error(403, 2300);
    app.post_as(&sms_only, "/v1/identity", json!({ "phone": "8885551234", "birth_date": "1968-05-27" }))
        .await
        .assert_error(403, 2300);
    app.post("/v1/possession", json!({ "phone": "4155550123", "channel": "fax" })).await.assert_error(422, 3105);
}

async fn metadata_and_names(app: TestApp) {
    let fits = "x".repeat(500 - 2); // a JSON string of exactly 500 characters
    let ok = app.post("/v1/possession", json!({ "phone": "4155550123", "metadata": fits })).await;
    assert_eq!(ok.status, 201, "{}", ok.text);
    assert_eq!(ok.body["metadata"], json!(fits));
    let nested = json!({ "phone": "4155550123", "metadata": { "order": [1, 2, {"deep": true}], "note": "é" } });
    let echoed = app.post("/v1/possession", nested.clone()).await;
    assert_eq!(echoed.body["metadata"], nested["metadata"]);

    let before = app.count("transactions").await;
    let too_long = "x".repeat(500 - 1);
    app.post("/v1/possession", json!({ "phone": "4155550123", "metadata": too_long })).await.assert_error(422, 3904);
    app.post(
        "/v1/identity",
        json!({ "phone": "8885551234", "birth_date": "1968-05-27", "metadata": {"k": "v".repeat(600)} }),
    )
    .await
    .assert_error(422, 3904);
    for bad_name in [json!("John Smith"), json!({"first": "John"}), json!({"first": "", "last": "Smith"})] {
        app.post("/v1/possession", json!({ "phone": "4155550123", "name": bad_name })).await.assert_error(422, 3905);
    }
    // A field unknown inside `name` is an unknown field, named with its path.
    // Checked first, before the (invalid) phone.
    let nested = json!({ "phone": "12", "name": {"first": "J", "last": "S", "middle": "X"} });
    let unknown = app.post("/v1/possession", nested).await;
    unknown.assert_error(422, 3903);
    assert!(unknown.text.contains("name.middle"), "{}", unknown.text);
    assert_eq!(app.count("transactions").await, before);
    let named =
        app.post("/v1/possession", json!({ "phone": "4155550123", "name": {"first": "John", "last": "Smith"} })).await;
    assert_eq!(named.status, 201);
}

async fn routing_and_forced_providers(app: TestApp) {
    let forced = app.post("/v1/possession", json!({ "phone": "4155550123", "provider": "sandbox" })).await;
    assert_eq!(forced.body["provider"], "sandbox");
    // Providers without credentials are not configured: nothing serves the request.
    for provider in ["idme", "veratad", "dqe"] {
        app.post("/v1/possession", json!({ "phone": "4155550123", "provider": provider }))
            .await
            .assert_error(422, 3908);
    }
    app.post("/v1/possession", json!({ "phone": "4155550123", "provider": "acme" })).await.assert_error(422, 3908);
}

/// Routing rules and the default region come from config.
mod configured {
    use super::*;

    async fn national_numbers_in_the_default_region(kind: Kind) {
        let app = TestApp::spawn_with(kind, &[("HANDSET__PHONE__DEFAULT_REGION", "FR")]).await;
        let answer = app.start_sms("0612345678").await;
        assert_eq!(answer.status, 201, "{}", answer.text);
        assert_eq!(answer.body["phone"], "+33612345678");
    }

    async fn no_matching_rule_is_3908(kind: Kind) {
        let dir = std::env::temp_dir().join(format!("handset-cfg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("routing.toml");
        // Settings layers replace arrays whole: this file's rules are the only ones.
        std::fs::write(
            &file,
            r#"
[[routing.rules]]
product = "possession.sms"
countries = ["US"]
providers = ["sandbox"]
"#,
        )
        .unwrap();
        let db = handset_testkit::TestDatabase::new(kind).await;
        let mut vars = vec![
            ("HANDSET__SERVER__BIND".to_string(), "127.0.0.1:0".to_string()),
            ("HANDSET__DATABASE__URL".to_string(), db.url.clone()),
        ];
        vars.push(("HANDSET__PHONE__DEFAULT_REGION".into(), "US".into()));
        let settings = handset_server::Settings::load_with(Some(&file), Some(vars)).unwrap();
        assert_eq!(settings.routing.rules.len(), 1);
        let app = handset_server::Application::build(settings).await.unwrap();
        let base = format!("http://{}", app.local_addr());
        tokio::spawn(app.run_until(std::future::pending()));
        let client = crate::helpers::http_client();
        let post = |path: &str, body: serde_json::Value| {
            client.post(format!("{base}{path}")).bearer_auth(crate::helpers::DEV_KEY).json(&body).send()
        };
        assert_eq!(post("/v1/possession", json!({"phone": "4155550123"})).await.unwrap().status(), 201);
        let fr = post("/v1/possession", json!({"phone": "+33612345678"})).await.unwrap();
        assert_eq!(fr.status(), 422);
        assert_eq!(fr.json::<serde_json::Value>().await.unwrap()["errors"][0]["code"], 3908);
        let identity = post("/v1/identity", json!({"phone": "4155550123", "birth_date": "1968-05-27"})).await.unwrap();
        assert_eq!(identity.json::<serde_json::Value>().await.unwrap()["errors"][0]["code"], 3908);
        let _ = std::fs::remove_dir_all(dir);
    }

    crate::on_both_kinds!(national_numbers_in_the_default_region, no_matching_rule_is_3908);
}
