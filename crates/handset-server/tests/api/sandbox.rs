//! The sandbox's mock rules, for every code of the catalogue.

use serde_json::json;

use crate::catalogue::SPEC;
use crate::helpers::TestApp;
use crate::on_both_stores;

on_both_stores!(
    area_999_rejections_are_that_http_error,
    area_999_result_errors_are_final_300,
    identity_mocks,
    network_channel_follows_the_same_rules,
);

/// Codes a phone number can cause as a rejected request, with their HTTP
/// status, as the documents give them (not as the catalogue does).
fn rejected_codes() -> Vec<(u16, u16)> {
    SPEC.iter()
        .filter(|(code, ..)| (3100..3200).contains(code) || matches!(code, 5000 | 5100 | 5200))
        .map(|(code, status, _)| (*code, status.expect("a refused request's status")))
        .collect()
}

async fn area_999_rejections_are_that_http_error(app: TestApp) {
    let before = app.count("transactions").await;
    let pairs = rejected_codes();
    assert_eq!(pairs.len(), 14, "3100-3105, 3107-3111, 5000, 5100, 5200: {pairs:?}");
    for (code, status) in pairs {
        let answer = app.start_sms(&format!("999555{code}")).await;
        answer.assert_error(status, code.into());
        if status == 429 {
            let retry = answer.headers.get("retry-after").expect("Retry-After on 429");
            assert!(retry.to_str().unwrap().parse::<u64>().unwrap() > 0);
        }
    }
    // Digits that pick no code a phone can cause: 3101.
    for digits in ["0042", "1100", "1300", "2100", "2300", "3106", "4100", "2001", "9999"] {
        app.start_sms(&format!("999555{digits}")).await.assert_error(422, 3101);
    }
    assert_eq!(app.count("transactions").await, before, "rejections record nothing");
}

async fn area_999_result_errors_are_final_300(app: TestApp) {
    for code in 1001..=1014u16 {
        let (_, status, message) = SPEC.iter().find(|(c, ..)| *c == code).unwrap();
        assert_eq!(*status, None, "{code} is a result error");
        let answer = app.start_sms(&format!("999555{code}")).await;
        assert_eq!(answer.status, 201, "{}", answer.text);
        assert_eq!(answer.body["status"]["code"], 300);
        assert_eq!(answer.body["next_action"], json!(null));
        let error = &answer.body["result"]["errors"][0];
        assert_eq!(error["code"], code);
        assert_eq!(error["message"], *message);
        assert_eq!(error["provider_code"], code.to_string());
        // A failed send cannot be confirmed.
        app.confirm(&answer.id(), "123123").await.assert_error(422, 3105);
    }
}

async fn identity_mocks(app: TestApp) {
    let ok = app.post("/v1/identity", json!({ "phone": "8885550000", "birth_date": "1990-01-31" })).await;
    assert_eq!(ok.body["status"]["code"], 200, "{}", ok.text);
    assert!(ok.body["result"]["address"]["line1"].is_string());
    // Any number outside 999 succeeds.
    let other = app.post("/v1/identity", json!({ "phone": "+14155550123", "birth_date": "1990-01-31" })).await;
    assert_eq!(other.body["status"]["code"], 200);

    for phone in ["9995550000", "9995551014", "9995550042"] {
        let failed = app.post("/v1/identity", json!({ "phone": phone, "birth_date": "1990-01-31" })).await;
        assert_eq!(failed.status, 201, "{}", failed.text);
        assert_eq!(failed.body["status"]["code"], 300);
        let error = &failed.body["result"]["errors"][0];
        assert_eq!(error["code"], 1014);
        assert_eq!(error["message"], "Could not find the user");
        assert_eq!(error["additional_info"], "birth_date does not match data on file.");
        assert_eq!(error["provider_code"], "1014");
    }
    let picked = app.post("/v1/identity", json!({ "phone": "9995551007", "birth_date": "1990-01-31" })).await;
    assert_eq!(picked.body["result"]["errors"][0]["code"], 1007);
    app.post("/v1/identity", json!({ "phone": "9995553108", "birth_date": "1990-01-31" }))
        .await
        .assert_error(422, 3108);
    app.post("/v1/identity", json!({ "phone": "9995555200", "birth_date": "1990-01-31" }))
        .await
        .assert_error(429, 5200);
}

async fn network_channel_follows_the_same_rules(app: TestApp) {
    let start = |phone: &str| json!({ "phone": phone, "channel": "network" });
    app.post("/v1/possession", start("9995553101")).await.assert_error(422, 3101);
    app.post("/v1/possession", start("9995555000")).await.assert_error(500, 5000);
    let failed = app.post("/v1/possession", start("9995551004")).await;
    assert_eq!(failed.body["status"]["code"], 300);
    assert_eq!(failed.body["result"]["errors"][0]["code"], 1004);
    // Confirm's precedence holds for network checks too: otherwise failed is 3105.
    app.post(&format!("/v1/possession/{}/confirm", failed.id()), json!({})).await.assert_error(422, 3105);
}
