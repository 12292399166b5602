//! DQE's ID Mobile numVerify over real HTTP: both steps (POST and GET forms),
//! the fake operator page's redirect, the mocks by number, the error ids with
//! their mixed HTTP statuses, the admin endpoints and injected faults.

use handset_sim::faults::Faults;
use handset_sim::{Sim, SimConfig};
use reqwest::Url;
use serde_json::{Value, json};

const REDIRECT: &str = "https://app.example/back?state=abc";

async fn sim() -> Sim {
    handset_sim::install_crypto_provider();
    Sim::start("127.0.0.1:0", SimConfig::default()).await.unwrap()
}

/// Redirects stay visible to the test.
fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Form-encodes by hand: reqwest's `form` and `query` features are off.
fn encode(params: &[(&str, &str)]) -> String {
    let mut url = Url::parse("http://form.invalid/").unwrap();
    {
        let mut pairs = url.query_pairs_mut();
        for (name, value) in params {
            pairs.append_pair(name, value);
        }
    }
    url.query().unwrap_or_default().to_owned()
}

fn start_params(number: &str) -> Vec<(&str, &str)> {
    vec![
        ("licence", "sim-licence"),
        ("number", number),
        ("token", "sim-token"),
        ("name", "handset"),
        ("scope", "numVerify"),
        ("redirect_uri", REDIRECT),
    ]
}

fn result_params(token: &str) -> Vec<(&str, &str)> {
    vec![("Licence", "sim-licence"), ("token", token), ("scope", "numVerify")]
}

fn with<'a>(mut params: Vec<(&'a str, &'a str)>, name: &'a str, value: &'a str) -> Vec<(&'a str, &'a str)> {
    params.retain(|(n, _)| *n != name);
    params.push((name, value));
    params
}

fn without<'a>(mut params: Vec<(&'a str, &'a str)>, name: &str) -> Vec<(&'a str, &'a str)> {
    params.retain(|(n, _)| *n != name);
    params
}

async fn read(answer: reqwest::Response) -> (u16, Value) {
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

async fn post_raw(sim: &Sim, path: &str, content_type: &str, body: String) -> (u16, Value) {
    let url = format!("{}{path}", sim.base_url());
    read(client().post(url).header("content-type", content_type).body(body).send().await.unwrap()).await
}

async fn post_form(sim: &Sim, path: &str, params: &[(&str, &str)]) -> (u16, Value) {
    post_raw(sim, path, "application/x-www-form-urlencoded", encode(params)).await
}

async fn get_query(sim: &Sim, path: &str, params: &[(&str, &str)]) -> (u16, Value) {
    read(client().get(format!("{}{path}?{}", sim.base_url(), encode(params))).send().await.unwrap()).await
}

async fn start(sim: &Sim, params: &[(&str, &str)]) -> (u16, Value) {
    post_form(sim, "/IDMOBILE/", params).await
}

async fn fetch(sim: &Sim, params: &[(&str, &str)]) -> (u16, Value) {
    post_form(sim, "/GET/", params).await
}

/// Step 1 for `number`, answering the session's id and token.
async fn started(sim: &Sim, number: &str) -> (String, String) {
    let (status, answer) = start(sim, &start_params(number)).await;
    assert_eq!((status, &answer["status"]), (200, &json!("success")), "{answer}");
    let url = answer["url"].as_str().unwrap();
    let session_id = url.rsplit('/').next().unwrap().to_owned();
    let session = sim.dqe.sessions().into_iter().find(|s| s.session_id == session_id).unwrap();
    (session_id, session.token)
}

/// Visits the operator page, answering the HTTP status and the Location.
async fn visit(sim: &Sim, session_id: &str) -> (u16, Option<String>) {
    let answer = client().get(format!("{}/operator/{session_id}", sim.base_url())).send().await.unwrap();
    let location = answer.headers().get("location").map(|l| l.to_str().unwrap().to_owned());
    (answer.status().as_u16(), location)
}

fn query(location: &str) -> Vec<(String, String)> {
    Url::parse(location).unwrap().query_pairs().map(|(n, v)| (n.into_owned(), v.into_owned())).collect()
}

fn error(id: &str, error_type: &str) -> Value {
    json!({"status": "error", "error_id": id, "error_type": error_type})
}

fn pending() -> Value {
    json!({"status": "pending", "scope": "numVerify"})
}

fn verified(yes: bool) -> Value {
    json!({"status": "success", "scope": "numVerify", "numVerify": yes})
}

#[tokio::test]
async fn pending_until_visited_then_verified() {
    let sim = sim().await;
    let (status, answer) = start(&sim, &start_params("+33612345678")).await;
    assert_eq!(status, 200);
    assert_eq!(answer["status"], "success");
    assert_eq!(answer["operator"], "SFR");
    let url = answer["url"].as_str().unwrap();
    let prefix = format!("{}/operator/", sim.base_url());
    assert!(url.starts_with(&prefix), "{url}");
    let session_id = &url[prefix.len()..];

    let sessions = sim.dqe.sessions();
    assert_eq!(sessions.len(), 1);
    let session = &sessions[0];
    assert_eq!(session.session_id, session_id);
    assert_eq!(session.number, "0612345678");
    assert_eq!(session.redirect_uri.as_deref(), Some(REDIRECT));
    assert_eq!(session.url, url);
    assert!(!session.visited);
    assert_eq!(session.result, None);
    let token = session.token.clone();
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{token}");
    assert_ne!(token, session_id);

    assert_eq!(fetch(&sim, &result_params(&token)).await, (200, pending()));
    assert_eq!(fetch(&sim, &result_params(&token)).await, (200, pending()));

    let (status, location) = visit(&sim, session_id).await;
    assert_eq!(status, 302);
    let location = location.unwrap();
    assert!(location.starts_with("https://app.example/back?state=abc&token="), "{location}");
    let pairs = query(&location);
    let expected = [("state", "abc"), ("token", token.as_str()), ("status", "success")];
    assert_eq!(pairs, expected.map(|(n, v)| (n.to_owned(), v.to_owned())));

    assert_eq!(fetch(&sim, &result_params(&token)).await, (200, verified(true)));
    // Visiting again redirects the same way; the result stays.
    assert_eq!(visit(&sim, session_id).await, (302, Some(location.clone())));
    assert_eq!(fetch(&sim, &result_params(&token)).await, (200, verified(true)));

    let listed: Value =
        reqwest::get(format!("{}/_admin/dqe/sessions", sim.base_url())).await.unwrap().json().await.unwrap();
    assert_eq!(listed[0]["session_id"], session_id);
    assert_eq!(listed[0]["token"], token.as_str());
    assert_eq!(listed[0]["number"], "0612345678");
    assert_eq!(listed[0]["redirect_uri"], REDIRECT);
    assert_eq!(listed[0]["visited"], true);
    assert_eq!(listed[0]["result"], verified(true));
}

#[tokio::test]
async fn numbers_are_normalised() {
    let sim = sim().await;
    for number in ["+33612345678", "33612345678", "0612345678"] {
        let (status, answer) = start(&sim, &start_params(number)).await;
        assert_eq!((status, &answer["status"]), (200, &json!("success")), "{number}");
    }
    let numbers: Vec<String> = sim.dqe.sessions().into_iter().map(|s| s.number).collect();
    assert_eq!(numbers, ["0612345678", "0612345678", "0612345678"]);
    let tokens: std::collections::HashSet<String> = sim.dqe.sessions().into_iter().map(|s| s.token).collect();
    assert_eq!(tokens.len(), 3);
}

#[tokio::test]
async fn not_verified_with_get_forms_and_no_redirect() {
    let sim = sim().await;
    let params = without(start_params("0612340003"), "redirect_uri");
    let (status, answer) = get_query(&sim, "/IDMOBILE/", &params).await;
    assert_eq!(status, 200);
    assert_eq!(answer["status"], "success");
    let session_id = answer["url"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let token = sim.dqe.sessions()[0].token.clone();

    assert_eq!(get_query(&sim, "/GET/", &result_params(&token)).await, (200, pending()));
    // Without redirect_uri the operator page ends there.
    let page = client().get(format!("{}/operator/{session_id}", sim.base_url())).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Operator check done"));
    assert_eq!(get_query(&sim, "/GET/", &result_params(&token)).await, (200, verified(false)));
    assert_eq!(fetch(&sim, &result_params(&token)).await, (200, verified(false)));
}

#[tokio::test]
async fn admin_visit_completes_a_session() {
    let sim = sim().await;
    let (session_id, token) = started(&sim, "0612345678").await;
    let visit_url = format!("{}/_admin/dqe/sessions/{session_id}/visit", sim.base_url());
    let (status, answer) = read(client().post(&visit_url).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let location = answer["location"].as_str().unwrap().to_owned();
    assert!(location.contains(&format!("&token={token}&status=success")), "{location}");
    assert_eq!(sim.dqe.visit(&session_id), Some(Some(location)));
    assert_eq!(fetch(&sim, &result_params(&token)).await, (200, verified(true)));

    // Without redirect_uri the target is null.
    let params = without(start_params("0612345678"), "redirect_uri");
    let (_, answer) = start(&sim, &params).await;
    let bare = answer["url"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let url = format!("{}/_admin/dqe/sessions/{bare}/visit", sim.base_url());
    assert_eq!(read(client().post(url).send().await.unwrap()).await, (200, json!({"location": null})));
    assert_eq!(sim.dqe.visit(&bare), Some(None));

    // Unknown sessions.
    assert_eq!(sim.dqe.visit("nope"), None);
    let url = format!("{}/_admin/dqe/sessions/nope/visit", sim.base_url());
    assert_eq!(read(client().post(url).send().await.unwrap()).await.0, 404);
    assert_eq!(visit(&sim, "nope").await, (404, None));
}

#[tokio::test]
async fn redirect_uris_keep_their_shape() {
    let sim = sim().await;
    let cases = [
        ("https://app.example/back", "https://app.example/back?token={t}&status=success"),
        ("myapp://done#frag", "myapp://done?token={t}&status=success#frag"),
    ];
    for (redirect_uri, expected) in cases {
        let params = with(start_params("0612345678"), "redirect_uri", redirect_uri);
        let (_, answer) = start(&sim, &params).await;
        let session_id = answer["url"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
        let token = sim.dqe.sessions().into_iter().find(|s| s.session_id == session_id).unwrap().token;
        let (status, location) = visit(&sim, &session_id).await;
        assert_eq!(status, 302);
        assert_eq!(location.unwrap(), expected.replace("{t}", &token));
    }
}

#[tokio::test]
async fn step1_errors_by_number() {
    let sim = sim().await;
    let cases = [
        ("0612340009", "09", "ineligible phone number"),
        ("0612340010", "10", "invalid phone number"),
        ("0612340012", "12", "phone check failed"),
        ("0612340013", "13", "operator SFR not found"),
        ("0612340014", "14", "operator SFR not authorized for this licence"),
        ("+33612340015", "15", "operator SFR not supported yet"),
        ("33612340016", "16", "operator SFR unreachable"),
        ("0612340017", "17", "scope not supported by this operator SFR yet"),
    ];
    for (number, id, error_type) in cases {
        assert_eq!(start(&sim, &start_params(number)).await, (200, error(id, error_type)), "{number}");
    }
    // Other 00NN endings succeed.
    for number in ["0612340011", "0612340018", "0612340001"] {
        assert_eq!(start(&sim, &start_params(number)).await.1["status"], "success", "{number}");
    }
    assert_eq!(sim.dqe.sessions().len(), 3);

    // The configured operator is answered and named.
    let config = json!({"licence": "sim-licence", "token": "sim-token", "name": "handset", "operator": "Orange"});
    let set = client().put(format!("{}/_admin/dqe", sim.base_url())).json(&config).send().await.unwrap();
    assert_eq!(set.status(), 200);
    assert_eq!(start(&sim, &start_params("0612340013")).await, (200, error("13", "operator Orange not found")));
    assert_eq!(start(&sim, &start_params("0612345678")).await.1["operator"], "Orange");
}

#[tokio::test]
async fn step1_request_errors() {
    let sim = sim().await;
    let base = || start_params("0612345678");
    let cases = [
        (with(base(), "scope", "numverify"), 400, "04", "invalid scope"),
        (without(base(), "scope"), 400, "04", "invalid scope"),
        (with(base(), "licence", "other"), 401, "02", "invalid licence key"),
        (without(base(), "licence"), 401, "02", "invalid licence key"),
        (with(base(), "token", "other"), 401, "30", "invalid or expired token"),
        (without(base(), "name"), 400, "01", "invalid request"),
        (with(base(), "name", "someone-else"), 400, "01", "invalid request"),
        (with(base(), "redirect_uri", "not a url"), 400, "01", "invalid request"),
        (with(base(), "redirect_uri", "/relative"), 400, "01", "invalid request"),
        (with(base(), "user_infos", ""), 400, "05", "missing or empty parameter (user_infos) for this scope"),
        (with(base(), "user_infos", "{"), 400, "06", "bad parameter format (user_infos) is not a valid JSON"),
        (with(base(), "user_infos", "{}"), 400, "07", "missing mandatory key in user informations (phone)"),
        (with(base(), "number", ""), 400, "11", "phone number is empty"),
        (without(base(), "number"), 400, "11", "phone number is empty"),
        (with(base(), "number", "612345678"), 200, "10", "invalid phone number"),
        (with(base(), "number", "+3361234567"), 200, "10", "invalid phone number"),
        (with(base(), "number", "+44612345678"), 200, "10", "invalid phone number"),
        (with(base(), "number", "06 12 34 56 78"), 200, "10", "invalid phone number"),
        (with(base(), "number", "0033612345678"), 200, "10", "invalid phone number"),
    ];
    let mut statuses = std::collections::BTreeSet::new();
    for (params, http, id, error_type) in cases {
        let answer = start(&sim, &params).await;
        assert_eq!(answer, (http, error(id, error_type)), "{params:?}");
        // The same over GET.
        assert_eq!(get_query(&sim, "/IDMOBILE/", &params).await, answer, "{params:?}");
        statuses.insert(answer.0);
    }
    // `status` is always "error" while the HTTP status varies.
    assert_eq!(statuses.into_iter().collect::<Vec<_>>(), [200, 400, 401]);

    // An unencoded `+` is a space in a form body: the number is then invalid.
    let raw = "licence=sim-licence&number=+33612345678&token=sim-token&name=handset&scope=numVerify".to_owned();
    let answer = post_raw(&sim, "/IDMOBILE/", "application/x-www-form-urlencoded", raw).await;
    assert_eq!(answer, (200, error("10", "invalid phone number")));
    // A body that is not form-encoded cannot be read.
    let body = json!({"licence": "sim-licence", "number": "0612345678", "scope": "numVerify"}).to_string();
    assert_eq!(post_raw(&sim, "/IDMOBILE/", "application/json", body).await, (400, error("01", "invalid request")));
    assert!(sim.dqe.sessions().is_empty());

    // Valid user_infos is accepted (numVerify does not use it).
    let params = with(base(), "user_infos", r#"{"phone":"0612345678"}"#);
    assert_eq!(start(&sim, &params).await.1["status"], "success");
}

#[tokio::test]
async fn step2_errors_by_number() {
    let sim = sim().await;
    let cases = [
        ("0612340018", 200, "18", "failed to retrieve data from operator"),
        ("0612340020", 200, "20", "Not the same phone number between the phone in the request"),
        ("0612340021", 200, "21", "access denied"),
        ("0612340099", 500, "99", "internal server error"),
    ];
    for (number, http, id, error_type) in cases {
        let (session_id, token) = started(&sim, number).await;
        assert_eq!(fetch(&sim, &result_params(&token)).await, (200, pending()), "{number}");
        let (status, location) = visit(&sim, &session_id).await;
        assert_eq!(status, 302);
        let pairs = query(&location.unwrap());
        assert!(pairs.contains(&("token".to_owned(), token.clone())), "{pairs:?}");
        assert!(pairs.contains(&("status".to_owned(), "error".to_owned())), "{pairs:?}");
        assert_eq!(fetch(&sim, &result_params(&token)).await, (http, error(id, error_type)), "{number}");
        assert_eq!(get_query(&sim, "/GET/", &result_params(&token)).await, (http, error(id, error_type)));
    }
}

#[tokio::test]
async fn step2_request_errors() {
    let sim = sim().await;
    let (_, token) = started(&sim, "0612345678").await;
    let base = || result_params(&token);
    let cases = [
        (with(base(), "scope", "other"), 400, "04", "invalid scope"),
        (with(base(), "Licence", "other"), 401, "02", "invalid licence key"),
        // Only the documented capital L counts.
        (with(without(base(), "Licence"), "licence", "sim-licence"), 401, "02", "invalid licence key"),
        (with(base(), "token", "unknown-token"), 401, "30", "invalid or expired token"),
        (without(base(), "token"), 401, "30", "invalid or expired token"),
    ];
    for (params, http, id, error_type) in cases {
        assert_eq!(fetch(&sim, &params).await, (http, error(id, error_type)), "{params:?}");
        assert_eq!(get_query(&sim, "/GET/", &params).await, (http, error(id, error_type)), "{params:?}");
    }
    // The API token names no session: pending.
    assert_eq!(fetch(&sim, &result_params("sim-token")).await, (200, pending()));
    let body = json!({"Licence": "sim-licence", "token": token, "scope": "numVerify"}).to_string();
    assert_eq!(post_raw(&sim, "/GET/", "application/json", body).await, (400, error("01", "invalid request")));
}

#[tokio::test]
async fn admin_config() {
    let sim = sim().await;
    let url = format!("{}/_admin/dqe", sim.base_url());
    let read_back: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(
        read_back,
        json!({"licence": "sim-licence", "token": "sim-token", "name": "handset", "operator": "SFR"})
    );

    let config = json!({"licence": "L-2", "token": "T-2", "name": "acme", "operator": "Bouygues"});
    assert_eq!(client().put(&url).json(&config).send().await.unwrap().status(), 200);
    let read_back: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(read_back, config);
    assert_eq!(sim.dqe.config().operator, "Bouygues");
    assert!(client().put(&url).json(&json!({"bogus": 1})).send().await.unwrap().status().is_client_error());

    assert_eq!(start(&sim, &start_params("0612345678")).await.0, 401);
    let params =
        [("licence", "L-2"), ("number", "0612345678"), ("token", "T-2"), ("name", "acme"), ("scope", "numVerify")];
    let (status, answer) = start(&sim, &params).await;
    assert_eq!((status, &answer["operator"]), (200, &json!("Bouygues")));
    let token = sim.dqe.sessions()[0].token.clone();
    let fetched = fetch(&sim, &[("Licence", "L-2"), ("token", token.as_str()), ("scope", "numVerify")]).await;
    assert_eq!(fetched, (200, pending()));

    let mut config = sim.dqe.config();
    config.operator = "Free".into();
    sim.dqe.set_config(config);
    assert_eq!(start(&sim, &params).await.1["operator"], "Free");
}

#[tokio::test]
async fn faults_apply_to_steps_not_to_the_operator_page() {
    let sim = sim().await;
    let (session_id, token) = started(&sim, "0612345678").await;
    sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    assert_eq!(start(&sim, &start_params("0612345678")).await.0, 503);
    assert_eq!(fetch(&sim, &result_params(&token)).await.0, 503);
    let before = sim.requests();
    let (status, location) = visit(&sim, &session_id).await;
    assert_eq!(status, 302);
    assert!(location.unwrap().contains(&format!("token={token}")));
    assert_eq!(sim.requests(), before, "the operator page is no provider request");
    // Admin endpoints are not subject to faults either.
    let listed = reqwest::get(format!("{}/_admin/dqe/sessions", sim.base_url())).await.unwrap();
    assert_eq!(listed.status(), 200);
    sim.set_faults(Faults::default());
    assert_eq!(fetch(&sim, &result_params(&token)).await, (200, verified(true)));
}
