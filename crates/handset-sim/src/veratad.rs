//! Veratad's PhoneMatch5.0.SMS: `POST /process/comprehensive/gateway` sends a
//! random 6-digit PIN (rendered into `options.outofband.message`, where
//! `{pin}`, `{fn}`, `{ln}` and `{phone}` are replaced) and answers PENDING
//! with a continuation token; `POST /process/continue` checks the user's entry
//! (PASS or FAIL). The sim's mocks, by the national number (10 digits, after an
//! optional leading `+1`, or `1` on 11 digits):
//! - not 10 digits, or ending 0000: FAIL / DATA CHECK FAILED;
//! - ending 1111 is a landline, 2222 a voip line, any other a mobile, unless
//!   `PUT /_admin/veratad/line-types/{phone}` set it; a line type listed in
//!   `do_not_send_to_types`: FAIL / SUPPRESSED SENDING CODE;
//! - ending 0001: FAIL / FAILED TO SEND TO NUMBER.
//!
//! The document is silent on the rest, so these are the sim's own choices:
//! - every number is in the US; a `country.blacklist` with US, or a non-empty
//!   `whitelist` without it, answers FAIL / SUPPRESSED SENDING CODE;
//! - PENDING's detail is the table's TRANSACTION REQUIRES FURTHER ATTENTION
//!   (the document's sample shows MORE INFORMATION IS REQUIRED);
//! - a wrong key answers FAIL / FAILED OUT-OF-BAND CHECK with a new token in
//!   `continuations` (the old one then answers 404) until `max_attempts` wrong
//!   keys; then every continue with the last token answers that FAIL without
//!   `continuations`. A passed transaction answers its PASS again, to its
//!   last continuation token and to its final token;
//! - wrong `user`/`pass` answer 401; a body it cannot read, another
//!   `service`, a missing `target.fn`/`ln`/`phone`, an unknown line type, a
//!   country that is not two letters or a continue without token answer 400;
//!   an unknown token 404; all as `{"error": "..."}`;
//! - without a message the SMS is [`DEFAULT_MESSAGE`]; `/process/status` (the
//!   `final` URL) is not served;
//! - `meta.timestamp` is UTC; `meta.user` and `meta.company` are the config's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::Utc;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::delivery::Delivery;

pub const SERVICE: &str = "PhoneMatch5.0.SMS";
pub const LINE_TYPES: [&str; 3] = ["mobile", "landline", "voip"];
/// The only country the sim knows numbers in.
pub const COUNTRY: &str = "US";
/// Sent when the request has no `options.outofband.message`.
pub const DEFAULT_MESSAGE: &str = "Your one-time password is {pin}";

const PASS: &str = "PASS";
const PENDING: &str = "PENDING";
const FAIL: &str = "FAIL";
const ALL_CHECKS_PASSED: &str = "ALL CHECKS PASSED";
const FURTHER_ATTENTION: &str = "TRANSACTION REQUIRES FURTHER ATTENTION";
const SUPPRESSED: &str = "SUPPRESSED SENDING CODE";
const FAILED_TO_SEND: &str = "FAILED TO SEND TO NUMBER";
const DATA_CHECK_FAILED: &str = "DATA CHECK FAILED";
const FAILED_CHECK: &str = "FAILED OUT-OF-BAND CHECK";
const INSTRUCTIONS: &str =
    "A code has been delivered to the provided number.  Please resubmit the code to complete the transaction.";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VeratadConfig {
    /// The API username callers must send as `user`.
    pub user: String,
    /// The API password callers must send as `pass`.
    pub pass: String,
    /// Answered in `meta.company`.
    pub company: String,
    /// Wrong keys a transaction takes before it stops offering a continuation.
    pub max_attempts: u32,
}

impl Default for VeratadConfig {
    fn default() -> Self {
        VeratadConfig {
            user: "sim-user".into(),
            pass: "sim-pass".into(),
            company: "handset-sim".into(),
            max_attempts: 5,
        }
    }
}

/// One initial request and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct SimVeratadTransaction {
    pub reference: Option<String>,
    /// The national number when valid, else the phone as sent.
    pub phone: String,
    /// None when the number is invalid.
    pub line_type: Option<String>,
    /// The PIN sent; None when nothing was sent.
    pub pin: Option<String>,
    /// The SMS as delivered (the template rendered).
    pub message: Option<String>,
    /// The current continuation token.
    pub token: Option<String>,
    /// The token in `final` once passed.
    pub final_token: Option<String>,
    /// Wrong keys so far.
    pub attempts: u32,
    /// The last answer's result.
    pub action: String,
    pub detail: String,
    /// Whether a continue can still change the outcome.
    pub open: bool,
    pub created: String,
    /// The PASS answer, repeated as is.
    #[serde(skip)]
    passed: Option<Value>,
}

#[derive(Default)]
struct Inner {
    config: VeratadConfig,
    transactions: Vec<SimVeratadTransaction>,
    /// Live tokens to their transaction's index.
    tokens: HashMap<String, usize>,
    /// Line types set by the admin endpoint, by national number.
    line_types: HashMap<String, String>,
}

impl Inner {
    fn line_type(&self, national: &str) -> String {
        if let Some(line_type) = self.line_types.get(national) {
            return line_type.clone();
        }
        let line_type = match &national[national.len() - 4..] {
            "1111" => "landline",
            "2222" => "voip",
            _ => "mobile",
        };
        line_type.into()
    }
}

/// The Veratad part of the simulator (cheap to clone; shared state).
#[derive(Clone)]
pub struct VeratadSim {
    inner: Arc<Mutex<Inner>>,
    delivery: Delivery,
}

fn timestamp() -> String {
    Utc::now().format("%Y-%m-%d %H:%M:%S").to_string()
}

fn new_token() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

fn new_pin() -> String {
    format!("{:06}", rand::rng().random_range(0..1_000_000u32))
}

fn new_confirmation() -> u64 {
    rand::rng().random_range(10_000_000..100_000_000u64)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// The 10-digit national number, after an optional `+1` (or `1` on 11 digits).
fn national(phone: &str) -> Option<String> {
    let rest = phone.strip_prefix("+1").or_else(|| phone.strip_prefix('1').filter(|_| phone.len() == 11));
    let digits = rest.unwrap_or(phone);
    if digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()) { Some(digits.to_owned()) } else { None }
}

/// Replaces `{name}` with its value in one pass; unknown names stay as written.
fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let found = after.find('}').and_then(|end| {
            let name = &after[..end];
            values.iter().find(|&&(n, _)| n == name).map(|&(_, value)| (end, value))
        });
        match found {
            Some((end, value)) => {
                out.push_str(value);
                rest = &after[end + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn iso2(code: &str) -> bool {
    code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic())
}

fn present(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

fn meta(config: &VeratadConfig, reference: Option<&str>) -> Value {
    json!({
        "confirmation": new_confirmation(),
        "reference": reference,
        "service": SERVICE,
        "timestamp": timestamp(),
        "company": config.company,
        "user": config.user,
    })
}

fn result(action: &str, detail: &str) -> Value {
    json!({"action": action, "detail": detail, "issues": []})
}

fn continuations(token: &str) -> Value {
    json!({"outofband": {
        "url": "/process/continue",
        "template": {"token": token, "codematch": {"key": null}},
        "instructions": INSTRUCTIONS,
    }})
}

#[derive(Deserialize)]
struct GatewayIn {
    user: Option<String>,
    pass: Option<String>,
    service: Option<String>,
    reference: Option<String>,
    target: Option<TargetIn>,
    options: Option<OptionsIn>,
}

#[derive(Default, Deserialize)]
struct TargetIn {
    #[serde(rename = "fn")]
    first_name: Option<String>,
    #[serde(rename = "ln")]
    last_name: Option<String>,
    phone: Option<String>,
}

#[derive(Deserialize)]
struct OptionsIn {
    outofband: Option<OutOfBandIn>,
}

#[derive(Default, Deserialize)]
struct OutOfBandIn {
    message: Option<String>,
    do_not_send_to_types: Option<Vec<String>>,
    country: Option<CountryIn>,
}

#[derive(Default, Deserialize)]
struct CountryIn {
    blacklist: Option<Vec<String>>,
    whitelist: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct ContinueIn {
    token: Option<String>,
    codematch: Option<CodeMatchIn>,
}

#[derive(Deserialize)]
struct CodeMatchIn {
    key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineTypeIn {
    line_type: String,
}

impl VeratadSim {
    pub fn new(config: VeratadConfig, delivery: Delivery) -> VeratadSim {
        VeratadSim { inner: Arc::new(Mutex::new(Inner { config, ..Inner::default() })), delivery }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_config(&self, config: VeratadConfig) {
        self.lock().config = config;
    }

    pub fn config(&self) -> VeratadConfig {
        self.lock().config.clone()
    }

    /// Every initial request so far, oldest first.
    pub fn transactions(&self) -> Vec<SimVeratadTransaction> {
        self.lock().transactions.clone()
    }

    /// The PIN last sent for `reference`.
    pub fn pin(&self, reference: &str) -> Option<String> {
        let inner = self.lock();
        let mut sent = inner.transactions.iter().rev().filter(|tx| tx.reference.as_deref() == Some(reference));
        sent.find_map(|tx| tx.pin.clone())
    }

    /// Makes `phone_digits` (10 digits, `+1` or `1` first allowed) answer as
    /// `line_type` (mobile, landline or voip) from now on.
    pub fn set_line_type(&self, phone_digits: &str, line_type: &str) {
        let phone = national(phone_digits).unwrap_or_else(|| phone_digits.to_owned());
        self.lock().line_types.insert(phone, line_type.to_owned());
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/process/comprehensive/gateway", post(gateway))
            .route("/process/continue", post(continue_transaction))
            .with_state(self.clone())
    }

    pub fn admin_router(&self) -> Router {
        Router::new()
            .route("/_admin/veratad", get(admin_config).put(admin_set_config))
            .route("/_admin/veratad/transactions", get(admin_transactions))
            .route("/_admin/veratad/pin/{reference}", get(admin_pin))
            .route("/_admin/veratad/line-types/{phone}", put(admin_set_line_type))
            .with_state(self.clone())
    }
}

async fn gateway(State(sim): State<VeratadSim>, body: Result<Json<GatewayIn>, JsonRejection>) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, &rejection.body_text()),
    };
    let mut guard = sim.lock();
    let inner = &mut *guard;
    let config = &inner.config;
    let authorized =
        body.user.as_deref() == Some(config.user.as_str()) && body.pass.as_deref() == Some(config.pass.as_str());
    if !authorized {
        return error(StatusCode::UNAUTHORIZED, "invalid credentials");
    }
    if body.service.as_deref() != Some(SERVICE) {
        return error(StatusCode::BAD_REQUEST, "service must be PhoneMatch5.0.SMS");
    }
    let target = body.target.unwrap_or_default();
    let (Some(first_name), Some(last_name), Some(phone)) =
        (present(target.first_name), present(target.last_name), present(target.phone))
    else {
        return error(StatusCode::BAD_REQUEST, "target.fn, target.ln and target.phone are required");
    };
    let outofband = body.options.and_then(|o| o.outofband).unwrap_or_default();
    let blocked = outofband.do_not_send_to_types.unwrap_or_default();
    if let Some(unknown) = blocked.iter().find(|t| !LINE_TYPES.contains(&t.as_str())) {
        let message = format!("do_not_send_to_types: {unknown:?} is not mobile, landline or voip");
        return error(StatusCode::BAD_REQUEST, &message);
    }
    let country = outofband.country.unwrap_or_default();
    let (blacklist, whitelist) = (country.blacklist.unwrap_or_default(), country.whitelist.unwrap_or_default());
    if let Some(bad) = blacklist.iter().chain(&whitelist).find(|c| !iso2(c)) {
        return error(StatusCode::BAD_REQUEST, &format!("country: {bad:?} is not an ISO2 country code"));
    }
    let refused = blacklist.iter().any(|c| c.eq_ignore_ascii_case(COUNTRY))
        || (!whitelist.is_empty() && !whitelist.iter().any(|c| c.eq_ignore_ascii_case(COUNTRY)));

    let digits = national(&phone).filter(|d| !d.ends_with("0000"));
    let line_type = digits.as_deref().map(|d| inner.line_type(d));
    // Suppression comes before sending, so a suppressed ...0001 is SUPPRESSED.
    let failure = match (&digits, &line_type) {
        (Some(_), Some(line_type)) if refused || blocked.iter().any(|t| t == line_type) => Some(SUPPRESSED),
        (Some(digits), Some(_)) if digits.ends_with("0001") => Some(FAILED_TO_SEND),
        (Some(_), Some(_)) => None,
        _ => Some(DATA_CHECK_FAILED),
    };
    let mut tx = SimVeratadTransaction {
        reference: body.reference,
        phone: digits.unwrap_or_else(|| phone.clone()),
        line_type,
        pin: None,
        message: None,
        token: None,
        final_token: None,
        attempts: 0,
        action: FAIL.into(),
        detail: String::new(),
        open: false,
        created: timestamp(),
        passed: None,
    };
    let mut answer = json!({"output": {"outofband": {}}, "meta": meta(&inner.config, tx.reference.as_deref())});
    match failure {
        Some(detail) => {
            tx.detail = detail.into();
            answer["result"] = result(FAIL, detail);
        }
        None => {
            let pin = new_pin();
            let template = outofband.message.as_deref().unwrap_or(DEFAULT_MESSAGE);
            let values = [
                ("pin", pin.as_str()),
                ("fn", first_name.as_str()),
                ("ln", last_name.as_str()),
                ("phone", phone.as_str()),
            ];
            let token = new_token();
            tx.message = Some(render(template, &values));
            // Whether the user ever sees the code is drawn (`crate::delivery`).
            sim.delivery.send("veratad", tx.reference.as_deref().unwrap_or_default(), &tx.phone, &pin);
            tx.pin = Some(pin);
            tx.token = Some(token.clone());
            tx.action = PENDING.into();
            tx.detail = FURTHER_ATTENTION.into();
            tx.open = true;
            inner.tokens.insert(token.clone(), inner.transactions.len());
            answer["result"] = result(PENDING, FURTHER_ATTENTION);
            answer["continuations"] = continuations(&token);
        }
    }
    inner.transactions.push(tx);
    Json(answer).into_response()
}

async fn continue_transaction(
    State(sim): State<VeratadSim>,
    body: Result<Json<ContinueIn>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, &rejection.body_text()),
    };
    let Some(token) = present(body.token) else {
        return error(StatusCode::BAD_REQUEST, "token is required");
    };
    let key = body.codematch.and_then(|c| c.key);
    // Check and count under one lock, so concurrent continues cannot pass the limit.
    let mut guard = sim.lock();
    let Inner { config, transactions, tokens, .. } = &mut *guard;
    let Some(&index) = tokens.get(&token) else {
        return error(StatusCode::NOT_FOUND, "unknown token");
    };
    let tx = &mut transactions[index];
    if let Some(passed) = &tx.passed {
        return Json(passed.clone()).into_response();
    }
    let answer_meta = meta(config, tx.reference.as_deref());
    if tx.open && key.is_some() && key == tx.pin {
        let final_token = new_token();
        tokens.insert(final_token.clone(), index);
        tx.final_token = Some(final_token.clone());
        tx.action = PASS.into();
        tx.detail = ALL_CHECKS_PASSED.into();
        tx.open = false;
        let answer = json!({
            "output": {"codematch": {"key_matched": true}},
            "meta": answer_meta,
            "result": result(PASS, ALL_CHECKS_PASSED),
            "final": {"template": {"token": final_token}, "url": "/process/status"},
        });
        tx.passed = Some(answer.clone());
        return Json(answer).into_response();
    }
    let mut answer = json!({
        "output": {"codematch": {"key_matched": false}},
        "meta": answer_meta,
        "result": result(FAIL, FAILED_CHECK),
    });
    if !tx.open {
        return Json(answer).into_response();
    }
    tx.attempts += 1;
    tx.action = FAIL.into();
    tx.detail = FAILED_CHECK.into();
    if tx.attempts < config.max_attempts {
        let next = new_token();
        tokens.remove(&token);
        tokens.insert(next.clone(), index);
        answer["continuations"] = continuations(&next);
        tx.token = Some(next);
    } else {
        // The last token stays, answering this FAIL from now on.
        tx.open = false;
    }
    Json(answer).into_response()
}

async fn admin_config(State(sim): State<VeratadSim>) -> Json<VeratadConfig> {
    Json(sim.config())
}

async fn admin_set_config(State(sim): State<VeratadSim>, Json(config): Json<VeratadConfig>) -> Json<VeratadConfig> {
    sim.set_config(config.clone());
    Json(config)
}

async fn admin_transactions(State(sim): State<VeratadSim>) -> Json<Vec<SimVeratadTransaction>> {
    Json(sim.transactions())
}

async fn admin_pin(State(sim): State<VeratadSim>, Path(reference): Path<String>) -> Response {
    match sim.pin(&reference) {
        Some(pin) => Json(json!({"pin": pin})).into_response(),
        None => error(StatusCode::NOT_FOUND, "no code sent for this reference"),
    }
}

async fn admin_set_line_type(
    State(sim): State<VeratadSim>,
    Path(phone): Path<String>,
    Json(body): Json<LineTypeIn>,
) -> Response {
    if !LINE_TYPES.contains(&body.line_type.as_str()) {
        return error(StatusCode::BAD_REQUEST, "line_type must be mobile, landline or voip");
    }
    let Some(phone) = national(&phone) else {
        return error(StatusCode::BAD_REQUEST, "phone must be 10 digits, optionally after +1 or 1");
    };
    sim.set_line_type(&phone, &body.line_type);
    Json(json!({"phone": phone, "line_type": body.line_type})).into_response()
}
