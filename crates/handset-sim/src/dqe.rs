//! DQE's ID Mobile numVerify: step 1 (`/IDMOBILE/`, GET with a query or POST
//! with a form body) checks the request and answers the operator's URL; the
//! user's browser visits it (`/operator/{session}`, a fake operator page) and
//! is redirected to `redirect_uri` with the session token and a status; step 2
//! (`/GET/`) answers pending until that visit, then the result.
//!
//! Errors are `{"status":"error","error_id":"NN","error_type":"..."}` with the
//! document's texts, under mixed HTTP statuses on purpose (callers must read
//! `status`): 200 for 09, 10, 12-18, 20 and 21, 400 for 01, 04-07 and 11, 401
//! for 02 and 30, 500 for 99.
//!
//! The sim's mocks, by the number's last four digits (as national digits):
//! - step 1: `00NN` for NN in 09, 10, 12-17 answers that error (13-17 name
//!   the configured operator);
//! - step 2: `0018`, `0020`, `0021`, `0099` answer that error once visited,
//!   `0003` answers `numVerify: false`, any other `numVerify: true`.
//!
//! The document is silent on the rest, so these are the sim's own choices:
//! - step 1 checks, in order: a POST that is not form-encoded 01, `scope` 04,
//!   `licence` 02, `token` 30, `name` empty or not the configured one 01,
//!   `redirect_uri` not an absolute URL of visible ASCII 01, `user_infos`
//!   (optional, unused by numVerify) empty 05, not JSON 06, without `phone`
//!   07, `number` missing or empty 11, not `+33`/`33`/`0` and 9 digits 10;
//!   a number is never trimmed, so an unencoded `+` (a space) answers 10;
//! - step 2 checks: a POST that is not form-encoded 01, `scope` 04,
//!   `Licence` (capital L only) 02, then `token`: a session token answers
//!   that session, the API token answers pending, anything else 30;
//! - the redirect appends `token` and `status` (error when the result is an
//!   error) to the query, before any fragment; without `redirect_uri` the
//!   operator page answers 200 "Operator check done";
//! - sessions never expire; their results never change once visited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::RawFormRejection;
use axum::extract::{Path, RawForm, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The only scope served.
pub const SCOPE: &str = "numVerify";

/// The step-1 error ids a number's last four digits (`00NN`) can pick.
const STEP1_MOCKS: [&str; 8] = ["09", "10", "12", "13", "14", "15", "16", "17"];

const DONE_PAGE: &str = "<!doctype html><html><head><title>Operator</title></head>\
    <body><p>Operator check done</p></body></html>";
const UNKNOWN_PAGE: &str = "<!doctype html><html><head><title>Operator</title></head>\
    <body><p>Unknown session</p></body></html>";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DqeConfig {
    /// The licence code callers must send (`licence`, then `Licence`).
    pub licence: String,
    /// The API token callers must send to step 1.
    pub token: String,
    /// The partner name callers must send as `name`.
    pub name: String,
    /// Answered in `operator` and named in errors 13-17.
    pub operator: String,
}

impl Default for DqeConfig {
    fn default() -> Self {
        DqeConfig {
            licence: "sim-licence".into(),
            token: "sim-token".into(),
            name: "handset".into(),
            operator: "SFR".into(),
        }
    }
}

/// One successful step 1 and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct SimDqeSession {
    /// The last segment of the operator URL.
    pub session_id: String,
    /// The session token: in the redirect, then step 2's `token`.
    pub token: String,
    /// National digits (10, leading 0).
    pub number: String,
    pub redirect_uri: Option<String>,
    /// The operator URL answered by step 1.
    pub url: String,
    /// Whether the operator page was visited (or the admin visit made).
    pub visited: bool,
    /// Step 2's body once visited; None before.
    pub result: Option<Value>,
}

#[derive(Default)]
struct Inner {
    config: DqeConfig,
    sessions: Vec<SimDqeSession>,
    /// Session ids and session tokens to their session's index.
    by_id: HashMap<String, usize>,
    by_token: HashMap<String, usize>,
}

/// The DQE part of the simulator (cheap to clone; shared state).
#[derive(Clone)]
pub struct DqeSim {
    inner: Arc<Mutex<Inner>>,
    /// The sim's own address, for operator URLs.
    base_url: Arc<str>,
}

fn new_token() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

/// A random string no session uses as id or token yet.
fn fresh(inner: &Inner) -> String {
    loop {
        let candidate = new_token();
        if !inner.by_id.contains_key(&candidate) && !inner.by_token.contains_key(&candidate) {
            return candidate;
        }
    }
}

fn error_type(id: &str, operator: &str) -> String {
    match id {
        "01" => "invalid request".into(),
        "02" => "invalid licence key".into(),
        "04" => "invalid scope".into(),
        "05" => "missing or empty parameter (user_infos) for this scope".into(),
        "06" => "bad parameter format (user_infos) is not a valid JSON".into(),
        "07" => "missing mandatory key in user informations (phone)".into(),
        "09" => "ineligible phone number".into(),
        "10" => "invalid phone number".into(),
        "11" => "phone number is empty".into(),
        "12" => "phone check failed".into(),
        "13" => format!("operator {operator} not found"),
        "14" => format!("operator {operator} not authorized for this licence"),
        "15" => format!("operator {operator} not supported yet"),
        "16" => format!("operator {operator} unreachable"),
        "17" => format!("scope not supported by this operator {operator} yet"),
        "18" => "failed to retrieve data from operator".into(),
        // The table's text; the document's example shows "OTP process failed".
        "20" => "Not the same phone number between the phone in the request".into(),
        "21" => "access denied".into(),
        "30" => "invalid or expired token".into(),
        _ => "internal server error".into(),
    }
}

/// Deliberately mixed, so callers that trust the HTTP status fail tests.
fn http_status(id: &str) -> StatusCode {
    match id {
        "01" | "04" | "05" | "06" | "07" | "11" => StatusCode::BAD_REQUEST,
        "02" | "30" => StatusCode::UNAUTHORIZED,
        "99" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::OK,
    }
}

fn error_body(id: &str, operator: &str) -> Value {
    json!({"status": "error", "error_id": id, "error_type": error_type(id, operator)})
}

fn error(id: &str, operator: &str) -> Response {
    (http_status(id), Json(error_body(id, operator))).into_response()
}

fn pending() -> Response {
    Json(json!({"status": "pending", "scope": SCOPE})).into_response()
}

/// Step 2's body for a visited session, by the number's last four digits.
fn outcome(number: &str, operator: &str) -> Value {
    match &number[number.len() - 4..] {
        suffix @ ("0018" | "0020" | "0021" | "0099") => error_body(&suffix[2..], operator),
        "0003" => json!({"status": "success", "scope": SCOPE, "numVerify": false}),
        _ => json!({"status": "success", "scope": SCOPE, "numVerify": true}),
    }
}

/// French national digits (`0` and 9 digits) from `+33`, `33` or `0` and 9 digits.
fn national(number: &str) -> Option<String> {
    let rest = number.strip_prefix("+33").or_else(|| number.strip_prefix("33")).or_else(|| number.strip_prefix('0'))?;
    (rest.len() == 9 && rest.bytes().all(|b| b.is_ascii_digit())).then(|| format!("0{rest}"))
}

/// Absolute (any scheme, so app links work) and safe in a Location header.
fn valid_redirect(uri: &str) -> bool {
    uri.bytes().all(|b| b.is_ascii_graphic()) && reqwest::Url::parse(uri).is_ok()
}

/// `uri` with `token` and `status` added to its query, before any fragment.
fn redirect_target(uri: &str, token: &str, status: &str) -> String {
    let (base, fragment) = match uri.split_once('#') {
        Some((base, fragment)) => (base, Some(fragment)),
        None => (uri, None),
    };
    let separator = match base.find('?') {
        None => "?",
        Some(_) if base.ends_with('?') || base.ends_with('&') => "",
        Some(_) => "&",
    };
    let mut target = format!("{base}{separator}token={token}&status={status}");
    if let Some(fragment) = fragment {
        target.push('#');
        target.push_str(fragment);
    }
    target
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space); axum's
/// `form` feature is off and no form crate is a dependency.
fn decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                (Some(high), Some(low)) => {
                    out.push((high << 4) | low);
                    i += 3;
                    continue;
                }
                // A stray `%` stays as sent.
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A query or form body's pairs; the first of repeated names wins.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(raw: &[u8]) -> Params {
        let raw = String::from_utf8_lossy(raw);
        let pairs = raw.split('&').filter(|pair| !pair.is_empty()).map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        });
        Params(pairs.collect())
    }

    fn find(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_str())
    }

    /// Missing and empty are alike.
    fn get(&self, name: &str) -> &str {
        self.find(name).unwrap_or("")
    }
}

impl DqeSim {
    /// `base_url` is the sim's own address, used in the operator URLs.
    pub fn new(config: DqeConfig, base_url: String) -> DqeSim {
        let inner = Arc::new(Mutex::new(Inner { config, ..Inner::default() }));
        DqeSim { inner, base_url: Arc::from(base_url.trim_end_matches('/')) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_config(&self, config: DqeConfig) {
        self.lock().config = config;
    }

    pub fn config(&self) -> DqeConfig {
        self.lock().config.clone()
    }

    /// Every session so far, oldest first.
    pub fn sessions(&self) -> Vec<SimDqeSession> {
        self.lock().sessions.clone()
    }

    /// Visits the operator page of `session_id` as a browser would: None for
    /// an unknown session, else the redirect target (None without
    /// `redirect_uri`). Visiting again answers the same.
    pub fn visit(&self, session_id: &str) -> Option<Option<String>> {
        let mut guard = self.lock();
        let Inner { config, sessions, by_id, .. } = &mut *guard;
        let session = &mut sessions[*by_id.get(session_id)?];
        if !session.visited {
            session.visited = true;
            session.result = Some(outcome(&session.number, &config.operator));
        }
        let failed = session.result.as_ref().is_some_and(|result| result["status"] == "error");
        let status = if failed { "error" } else { "success" };
        Some(session.redirect_uri.as_deref().map(|uri| redirect_target(uri, &session.token, status)))
    }

    fn create(&self, number: String, redirect_uri: Option<String>) -> SimDqeSession {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let session_id = fresh(inner);
        let token = loop {
            let token = fresh(inner);
            if token != session_id {
                break token;
            }
        };
        let session = SimDqeSession {
            url: format!("{}/operator/{session_id}", self.base_url),
            session_id: session_id.clone(),
            token: token.clone(),
            number,
            redirect_uri,
            visited: false,
            result: None,
        };
        let index = inner.sessions.len();
        inner.by_id.insert(session_id, index);
        inner.by_token.insert(token, index);
        inner.sessions.push(session.clone());
        session
    }

    fn session_by_token(&self, token: &str) -> Option<SimDqeSession> {
        let inner = self.lock();
        inner.by_token.get(token).map(|&index| inner.sessions[index].clone())
    }

    /// Steps 1 and 2, for the fault layer to wrap.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/IDMOBILE/", get(initiate).post(initiate))
            .route("/GET/", get(retrieve).post(retrieve))
            .with_state(self.clone())
    }

    /// The fake operator page: the user's browser visits it, so no faults.
    pub fn operator_router(&self) -> Router {
        Router::new().route("/operator/{session}", get(operator_page)).with_state(self.clone())
    }

    pub fn admin_router(&self) -> Router {
        Router::new()
            .route("/_admin/dqe", get(admin_config).put(admin_set_config))
            .route("/_admin/dqe/sessions", get(admin_sessions))
            .route("/_admin/dqe/sessions/{session}/visit", post(admin_visit))
            .with_state(self.clone())
    }
}

/// A step's parameters once its body, scope and licence (named `licence_key`:
/// step 1 writes `licence`, step 2 `Licence`) are right; else the error id.
/// `RawForm` reads the query on GET and a form body otherwise.
fn authorised(
    config: &DqeConfig,
    form: Result<RawForm, RawFormRejection>,
    licence_key: &str,
) -> Result<Params, &'static str> {
    let Ok(RawForm(raw)) = form else {
        return Err("01");
    };
    let params = Params::parse(&raw);
    if params.get("scope") != SCOPE {
        return Err("04");
    }
    if params.get(licence_key) != config.licence.as_str() {
        return Err("02");
    }
    Ok(params)
}

/// Step 1.
async fn initiate(State(sim): State<DqeSim>, form: Result<RawForm, RawFormRejection>) -> Response {
    let config = sim.config();
    let operator = config.operator.as_str();
    let params = match authorised(&config, form, "licence") {
        Ok(params) => params,
        Err(id) => return error(id, operator),
    };
    if params.get("token") != config.token.as_str() {
        return error("30", operator);
    }
    let name = params.get("name");
    if name.is_empty() || name != config.name.as_str() {
        return error("01", operator);
    }
    let redirect_uri = params.find("redirect_uri").filter(|uri| !uri.is_empty());
    if redirect_uri.is_some_and(|uri| !valid_redirect(uri)) {
        return error("01", operator);
    }
    if let Some(user_infos) = params.find("user_infos") {
        if user_infos.trim().is_empty() {
            return error("05", operator);
        }
        match serde_json::from_str::<Value>(user_infos) {
            Err(_) => return error("06", operator),
            Ok(infos) if infos.get("phone").is_none() => return error("07", operator),
            Ok(_) => {}
        }
    }
    let number = params.get("number");
    if number.is_empty() {
        return error("11", operator);
    }
    let Some(number) = national(number) else {
        return error("10", operator);
    };
    if let Some(id) = number[6..].strip_prefix("00").filter(|id| STEP1_MOCKS.contains(id)) {
        return error(id, operator);
    }
    let session = sim.create(number, redirect_uri.map(str::to_owned));
    Json(json!({"status": "success", "operator": operator, "url": session.url})).into_response()
}

/// Step 2.
async fn retrieve(State(sim): State<DqeSim>, form: Result<RawForm, RawFormRejection>) -> Response {
    let config = sim.config();
    let operator = config.operator.as_str();
    let params = match authorised(&config, form, "Licence") {
        Ok(params) => params,
        Err(id) => return error(id, operator),
    };
    let token = params.get("token");
    let Some(session) = sim.session_by_token(token) else {
        // The API token is valid but names no session: nothing to report yet.
        if !token.is_empty() && token == config.token.as_str() {
            return pending();
        }
        return error("30", operator);
    };
    match session.result {
        Some(answer) => {
            let status = answer["error_id"].as_str().map_or(StatusCode::OK, http_status);
            (status, Json(answer)).into_response()
        }
        None => pending(),
    }
}

async fn operator_page(State(sim): State<DqeSim>, Path(session_id): Path<String>) -> Response {
    match sim.visit(&session_id) {
        None => (StatusCode::NOT_FOUND, Html(UNKNOWN_PAGE)).into_response(),
        Some(Some(location)) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
        Some(None) => Html(DONE_PAGE).into_response(),
    }
}

async fn admin_config(State(sim): State<DqeSim>) -> Json<DqeConfig> {
    Json(sim.config())
}

async fn admin_set_config(State(sim): State<DqeSim>, Json(config): Json<DqeConfig>) -> Json<DqeConfig> {
    sim.set_config(config.clone());
    Json(config)
}

async fn admin_sessions(State(sim): State<DqeSim>) -> Json<Vec<SimDqeSession>> {
    Json(sim.sessions())
}

async fn admin_visit(State(sim): State<DqeSim>, Path(session_id): Path<String>) -> Response {
    match sim.visit(&session_id) {
        Some(location) => Json(json!({"location": location})).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "unknown session"}))).into_response(),
    }
}
