//! ID.me's Services API v2 telecom endpoints, with the documented mocks:
//! - area code 999: the last four digits are the error to trigger (any code
//!   of the catalogue with an HTTP status answers that status and envelope;
//!   1001-1014 answer 200 with status 300 and that result error);
//! - confirm code `123123` succeeds, other codes fail, 5 attempts;
//! - identity answers 210, then after `identity_delay` the final result
//!   (888 success with an address, 999 failure 1014), readable by
//!   `GET /api/v2/telecom/:id` and pushed to the webhook URL (the configured
//!   one, else the request's `callback_url`) unless pushing is off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{SecondsFormat, Utc};
use handset_core::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::delivery::Delivery;

pub const SUCCESS_CODE: &str = "123123";
pub const MAX_ATTEMPTS: u32 = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdmeConfig {
    /// The API secret callers must present (base64 in `Bearer ID.me ...`).
    pub secret: String,
    /// How long an identity check stays 210 before its result is final.
    #[serde(with = "humantime_serde")]
    pub identity_delay: Duration,
    /// Push final identity results to a webhook.
    pub push_webhooks: bool,
    /// The organisation's webhook; when unset, the request's `callback_url`.
    pub webhook_url: Option<String>,
    /// How long a sent code can be confirmed (then 3103).
    #[serde(with = "humantime_serde")]
    pub code_ttl: Duration,
}

impl Default for IdmeConfig {
    fn default() -> Self {
        IdmeConfig {
            secret: "sim-secret".into(),
            identity_delay: Duration::from_millis(500),
            push_webhooks: true,
            webhook_url: None,
            code_ttl: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SimTransaction {
    pub transaction_id: String,
    pub verification_id: String,
    pub product: String,
    pub phone: String,
    pub status: u16,
    pub attempts: u32,
    pub created: String,
    pub updated: String,
    pub result: Option<Value>,
    pub callback_url: Option<String>,
    /// Webhook pushes made for this transaction.
    pub pushes: u32,
    /// `GET /api/v2/telecom/:id` reads of it (a gateway polling).
    pub reads: u32,
    #[serde(skip)]
    created_at: std::time::Instant,
}

impl SimTransaction {
    fn to_json(&self) -> Value {
        let message = match self.status {
            200 => "Transaction successfully completed",
            300 => "Transaction unsuccessful",
            _ => "Transaction pending review",
        };
        let mut body = json!({
            "transaction_id": self.transaction_id,
            "verification_id": self.verification_id,
            "product": self.product,
            "status": {"code": self.status, "message": message, "created": self.created, "updated": self.updated},
        });
        if let Some(result) = &self.result {
            body["result"] = result.clone();
        }
        body
    }
}

#[derive(Default)]
struct Inner {
    config: IdmeConfig,
    transactions: HashMap<String, SimTransaction>,
}

/// The ID.me part of the simulator (cheap to clone; shared state).
#[derive(Clone)]
pub struct IdmeSim {
    inner: Arc<Mutex<Inner>>,
    client: reqwest::Client,
    delivery: Delivery,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn error(code: ErrorCode) -> Response {
    let status = StatusCode::from_u16(code.http_status().unwrap_or(500)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = Json(json!({"errors": [{"code": code.code(), "message": code.message()}]}));
    if status == StatusCode::TOO_MANY_REQUESTS {
        return (status, [("retry-after", "30")], body).into_response();
    }
    (status, body).into_response()
}

/// What area code 999 triggers.
enum Mock {
    Http(ErrorCode),
    Result(ErrorCode),
    /// Digits that pick no code: sends fail with 3101, identity with 1014.
    NoCode,
}

fn mock(phone: &str) -> Option<Mock> {
    if !phone.starts_with("999") {
        return None;
    }
    // Only ID.me's own catalogue: handset's 39xx, 5001 and 5300 are not ID.me's.
    let code = phone[phone.len() - 4..]
        .parse()
        .ok()
        .filter(|c| !(3900..4000).contains(c) && !matches!(*c, 5001 | 5300))
        .and_then(ErrorCode::from_code);
    Some(match code {
        Some(code) if code.http_status().is_some() => Mock::Http(code),
        Some(code) if code.is_telecom_result() => Mock::Result(code),
        _ => Mock::NoCode,
    })
}

fn ten_digits(phone: Option<&str>) -> Option<String> {
    phone.filter(|p| p.len() == 10 && p.bytes().all(|b| b.is_ascii_digit())).map(str::to_owned)
}

#[derive(Deserialize)]
struct SendIn {
    phone: Option<String>,
    callback_url: Option<String>,
    verification_id: Option<String>,
    #[allow(dead_code)]
    metadata: Option<Value>,
}

#[derive(Deserialize)]
struct ConfirmIn {
    transaction_id: Option<String>,
    code: Option<String>,
    #[allow(dead_code)]
    callback_url: Option<String>,
}

#[derive(Deserialize)]
struct IdentityIn {
    phone: Option<String>,
    birth_date: Option<String>,
    callback_url: Option<String>,
    verification_id: Option<String>,
    #[allow(dead_code)]
    metadata: Option<Value>,
}

impl IdmeSim {
    pub fn new(config: IdmeConfig, delivery: Delivery) -> IdmeSim {
        let inner = Arc::new(Mutex::new(Inner { config, transactions: HashMap::new() }));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
        IdmeSim { inner, client, delivery }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_config(&self, config: IdmeConfig) {
        self.lock().config = config;
    }

    pub fn config(&self) -> IdmeConfig {
        self.lock().config.clone()
    }

    pub fn transaction(&self, id: &str) -> Option<SimTransaction> {
        self.lock().transactions.get(id).cloned()
    }

    pub fn transactions(&self) -> Vec<SimTransaction> {
        self.lock().transactions.values().cloned().collect()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/v2/telecom/possession/sms/send", post(send))
            .route("/api/v2/telecom/possession/sms/confirm", post(confirm))
            .route("/api/v2/telecom/identity", post(identity))
            .route("/api/v2/telecom/{transaction_id}", get(status))
            .route("/health", get(|| async { StatusCode::OK }))
            .with_state(self.clone())
    }

    pub fn admin_router(&self) -> Router {
        Router::new()
            .route("/_admin/idme", get(admin_config).put(admin_set_config))
            .route("/_admin/idme/transactions", get(admin_transactions))
            .route("/_admin/idme/transactions/{transaction_id}/push", put(admin_push))
            .with_state(self.clone())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let expected = format!("Bearer ID.me {}", STANDARD.encode(self.lock().config.secret.as_bytes()));
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
    }

    fn insert(
        &self,
        product: &str,
        phone: String,
        verification_id: Option<String>,
        callback_url: Option<String>,
    ) -> SimTransaction {
        let at = now();
        let tx = SimTransaction {
            transaction_id: Uuid::new_v4().to_string(),
            verification_id: verification_id.unwrap_or_else(|| Uuid::new_v4().to_string()),
            product: product.into(),
            phone,
            status: 210,
            attempts: 0,
            created: at.clone(),
            updated: at,
            result: None,
            callback_url,
            pushes: 0,
            reads: 0,
            created_at: std::time::Instant::now(),
        };
        self.lock().transactions.insert(tx.transaction_id.clone(), tx.clone());
        tx
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut SimTransaction)) -> Option<SimTransaction> {
        let mut inner = self.lock();
        let tx = inner.transactions.get_mut(id)?;
        change(tx);
        tx.updated = now();
        Some(tx.clone())
    }

    /// Makes a pending identity check final, then pushes it if configured.
    async fn resolve_identity(&self, id: String) {
        let resolved = self.update(&id, |tx| {
            if tx.status != 210 {
                return;
            }
            match mock(&tx.phone) {
                Some(Mock::Result(code)) => {
                    tx.status = 300;
                    tx.result =
                        Some(json!({"verified": false, "errors": [{"code": code.code(), "message": code.message()}]}));
                }
                Some(_) => {
                    tx.status = 300;
                    tx.result = Some(json!({"verified": false, "errors": [{
                        "code": 1014, "message": "Could not find the user",
                        "additional_info": "birth_date does not match data on file."}]}));
                }
                None => {
                    tx.status = 200;
                    tx.result = Some(json!({"verified": true, "address": {
                        "line1": "1 Simulated Way", "city": "Arlington", "region": "VA",
                        "postal_code": "22201", "country": "US"}}));
                }
            }
        });
        let Some(tx) = resolved else { return };
        self.push(&tx).await;
    }

    /// POSTs the transaction to the webhook (configured URL, else the
    /// request's callback_url), as ID.me's result webhook does.
    pub async fn push(&self, tx: &SimTransaction) -> Option<u16> {
        let config = self.config();
        if !config.push_webhooks {
            return None;
        }
        let url = config.webhook_url.or_else(|| tx.callback_url.clone())?;
        let answer = self.client.post(url).json(&tx.to_json()).send().await.ok()?;
        self.update(&tx.transaction_id, |t| t.pushes += 1);
        Some(answer.status().as_u16())
    }
}

async fn send(State(sim): State<IdmeSim>, headers: HeaderMap, Json(body): Json<SendIn>) -> Response {
    if !sim.authorized(&headers) {
        return error(ErrorCode::CredentialsUnknown);
    }
    let Some(phone) = ten_digits(body.phone.as_deref()) else {
        return error(ErrorCode::InvalidPhone);
    };
    match mock(&phone) {
        Some(Mock::Http(code)) => error(code),
        Some(Mock::NoCode) => error(ErrorCode::InvalidPhone),
        Some(Mock::Result(code)) => {
            let mut tx = sim.insert("telecom.possession_send", phone, body.verification_id, body.callback_url);
            tx = sim
                .update(&tx.transaction_id, |t| {
                    t.status = 300;
                    t.result = Some(json!({"errors": [{"code": code.code(), "message": code.message()}]}));
                })
                .unwrap_or(tx);
            Json(tx.to_json()).into_response()
        }
        None => {
            let tx = sim.insert("telecom.possession_send", phone, body.verification_id, body.callback_url);
            // Every send's code is `SUCCESS_CODE`; whether the user ever sees it is drawn.
            sim.delivery.send("idme", &tx.transaction_id, &tx.phone, SUCCESS_CODE);
            Json(tx.to_json()).into_response()
        }
    }
}

async fn confirm(State(sim): State<IdmeSim>, headers: HeaderMap, Json(body): Json<ConfirmIn>) -> Response {
    if !sim.authorized(&headers) {
        return error(ErrorCode::CredentialsUnknown);
    }
    let code_ttl = sim.config().code_ttl;
    let id = body.transaction_id.unwrap_or_default();
    let code = body.code.unwrap_or_default();
    // Check and count under one lock, so concurrent confirms cannot pass the limit.
    let mut inner = sim.lock();
    let Some(tx) = inner.transactions.get_mut(&id) else {
        return error(ErrorCode::NotFound);
    };
    if tx.product != "telecom.possession_send" {
        return error(ErrorCode::NotPossessionCheck);
    }
    match tx.status {
        200 => return Json(tx.to_json()).into_response(),
        300 if tx.attempts >= MAX_ATTEMPTS => return error(ErrorCode::RetryLimitExceeded),
        300 if tx.result.is_none() => return error(ErrorCode::CodeExpired),
        300 => return error(ErrorCode::NotPossessionCheck),
        _ => {}
    }
    if tx.created_at.elapsed() > code_ttl {
        tx.status = 300;
        tx.updated = now();
        return error(ErrorCode::CodeExpired);
    }
    if code.is_empty() {
        return error(ErrorCode::InvalidCode);
    }
    tx.updated = now();
    if code == SUCCESS_CODE {
        tx.status = 200;
        tx.result = Some(json!({"phone": tx.phone}));
        return Json(tx.to_json()).into_response();
    }
    tx.attempts += 1;
    if tx.attempts >= MAX_ATTEMPTS {
        tx.status = 300;
        return error(ErrorCode::RetryLimitExceeded);
    }
    error(ErrorCode::InvalidCode)
}

async fn identity(State(sim): State<IdmeSim>, headers: HeaderMap, Json(body): Json<IdentityIn>) -> Response {
    if !sim.authorized(&headers) {
        return error(ErrorCode::CredentialsUnknown);
    }
    let Some(phone) = ten_digits(body.phone.as_deref()) else {
        return error(ErrorCode::InvalidPhone);
    };
    let birth_date = body.birth_date.unwrap_or_default();
    let Ok(born) = chrono::NaiveDate::parse_from_str(&birth_date, "%Y-%m-%d") else {
        return error(ErrorCode::InvalidBirthDate);
    };
    if Utc::now().date_naive().years_since(born).unwrap_or(0) < 18 {
        return error(ErrorCode::Minor);
    }
    if let Some(Mock::Http(code)) = mock(&phone) {
        return error(code);
    }
    let tx = sim.insert("telecom.identity", phone, body.verification_id, body.callback_url);
    let delay = sim.config().identity_delay;
    let (later, id) = (sim.clone(), tx.transaction_id.clone());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        later.resolve_identity(id).await;
    });
    Json(tx.to_json()).into_response()
}

async fn status(State(sim): State<IdmeSim>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !sim.authorized(&headers) {
        return error(ErrorCode::CredentialsUnknown);
    }
    let read = sim.lock().transactions.get_mut(&id).map(|tx| {
        tx.reads += 1;
        tx.to_json()
    });
    match read {
        Some(answer) => Json(answer).into_response(),
        None => error(ErrorCode::NotFound),
    }
}

async fn admin_config(State(sim): State<IdmeSim>) -> Json<IdmeConfig> {
    Json(sim.config())
}

async fn admin_set_config(State(sim): State<IdmeSim>, Json(config): Json<IdmeConfig>) -> Json<IdmeConfig> {
    sim.set_config(config.clone());
    Json(config)
}

async fn admin_transactions(State(sim): State<IdmeSim>) -> Json<Vec<SimTransaction>> {
    Json(sim.transactions())
}

/// Pushes a transaction's current state to the webhook again (duplicate delivery).
async fn admin_push(State(sim): State<IdmeSim>, Path(id): Path<String>) -> Response {
    match sim.transaction(&id) {
        Some(tx) => Json(json!({"webhook_status": sim.push(&tx).await})).into_response(),
        None => error(ErrorCode::NotFound),
    }
}
