//! The API's OpenAPI 3.1 document (`GET /openapi.json`, `handset openapi`)
//! and the page that shows it (`GET /docs`).
//!
//! The document is built from the router's own route list
//! (`app::api_routes`, utoipa-axum's `routes!`), so no route exists
//! undocumented. `complete` then adds, in one place, what every operation of
//! a kind shares: the answers of authentication, of JSON bodies, of rate
//! limits and of `Idempotency-Key`, the key's own constraints, and the links
//! from a start to the operations that take its ids.

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::app::AppState;
use crate::error::{ErrorOut, ErrorsOut};
use crate::input::{ConfirmIn, IdentityIn, PossessionIn};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "handset",
        description = "Provider-agnostic phone verification gateway: possession (SMS code or operator network check) and carrier identity match. Errors are `{\"errors\":[{\"code\",\"message\"}]}`; every answer carries `x-request-id`."
    ),
    components(schemas(PossessionIn, ConfirmIn, IdentityIn, ErrorsOut, ErrorOut)),
    modifiers(&BearerAuth),
    tags(
        (name = "possession", description = "Prove a user holds a phone number"),
        (name = "identity", description = "Match a phone number and birth date against carrier records"),
        (name = "transactions", description = "Read outcomes"),
        (name = "callbacks", description = "Signed webhooks sent to the partner's callback_url"),
        (name = "stats", description = "The verification funnel: how checks ended, by provider, country and product"),
        (name = "providers", description = "Called by providers and by the user's browser, not by partners"),
        (name = "sandbox", description = "Development only"),
        (name = "operations", description = "Probes, metrics and this document"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("Partner API key")).build(),
            ),
        );
    }
}

/// Visible ASCII, as `idempotency::guard` checks the key.
const IDEMPOTENCY_KEY_PATTERN: &str = "^[\\x21-\\x7E]+$";

/// The whole document for a server with (`sandbox`) or without the sandbox routes.
pub fn document(sandbox: bool) -> Value {
    let mut doc = serde_json::to_value(crate::app::api_routes(sandbox, None).into_openapi())
        .expect("an OpenAPI document is plain data");
    complete(&mut doc);
    doc
}

/// A response as the document writes it: a description and, for errors, the envelope.
fn error_answer(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorsOut"}}}
    })
}

/// Adds `status` to `responses` or, when the handler documented it already,
/// keeps the handler's (more precise) answer.
fn answer(responses: &mut serde_json::Map<String, Value>, status: &str, description: &str) {
    responses.entry(status.to_owned()).or_insert_with(|| error_answer(description));
}

fn complete(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else { continue };
        for (method, operation) in item.iter_mut() {
            complete_operation(path, method, operation);
        }
    }
    link_starts(doc);
}

fn complete_operation(path: &str, method: &str, operation: &mut Value) {
    let secured = operation.get("security").is_some();
    // The partner API's bodies go through `JsonObject`; providers' webhooks
    // are read as they come and document their own answers.
    let json_body = path.starts_with("/v1/") && operation.pointer("/requestBody/content/application~1json").is_some();
    let idempotent = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
        .map(|parameters| {
            let mut found = false;
            for parameter in parameters.iter_mut().filter(|p| p["name"] == "Idempotency-Key") {
                parameter["schema"] =
                    json!({"type": "string", "minLength": 1, "maxLength": 255, "pattern": IDEMPOTENCY_KEY_PATTERN});
                found = true;
            }
            found
        })
        .unwrap_or(false);
    let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) else { return };
    if secured {
        answer(responses, "401", "1100: the API key is unknown; 1200: the partner is deactivated");
        answer(
            responses,
            "429",
            "5200: the partner's requests per minute (or 5100: its starts and confirms of this product per minute) are used up; see Retry-After",
        );
    }
    if method == "post" && json_body {
        answer(responses, "400", "3900: the body is not a JSON object");
        answer(responses, "408", "3909: the body did not arrive within server.body_read_timeout");
        answer(responses, "413", "3902: the body is larger than 64 KiB");
        answer(responses, "415", "3901: Content-Type is not application/json");
    }
    if idempotent {
        // The key's guard reads the body (to tell a replay from another request).
        answer(responses, "408", "3909: the body did not arrive within server.body_read_timeout");
        answer(responses, "413", "3902: the body is larger than 64 KiB");
        answer(responses, "409", "3907: a request with this Idempotency-Key is still being answered");
        answer(responses, "422", "3906: this Idempotency-Key was used with a different request");
    }
    if secured || json_body {
        answer(responses, "500", "5000: an error on handset's side; the request may be retried");
    }
    for (status, response) in responses.iter_mut() {
        if response.get("description").and_then(Value::as_str).unwrap_or("").is_empty() {
            response["description"] = json!(default_description(status));
        }
    }
}

/// The description of an answer whose handler gave none.
fn default_description(status: &str) -> &'static str {
    match status {
        "200" => "OK",
        "201" => "Created",
        "202" => "Accepted",
        "303" => "See the Location header",
        "400" => "The request is malformed",
        "401" => "1100: the API key is unknown; 1200: the partner is deactivated",
        "403" => "The resource belongs to another partner, or the product is not enabled for this partner",
        "404" => "4100: no such resource",
        "422" => "The request breaks a rule; the code says which",
        "429" => "A rate limit; see Retry-After",
        "503" => "5001: every eligible provider is unavailable",
        _ => "See the error code",
    }
}

/// What a start's answer lets a client do next, by operation id and the
/// parameter each takes from the answer's body.
fn link_starts(doc: &mut Value) {
    let sandbox = doc.pointer("/paths/~1sandbox~1operator~1{transaction_id}").is_some();
    let transaction = ("transaction_id", "$response.body#/transaction_id");
    let verification = ("verification_id", "$response.body#/verification_id");
    let follow_ups: &[(&str, (&str, &str))] = &[
        ("getTransaction", transaction),
        ("getVerification", verification),
        ("listCallbacks", transaction),
        ("retryCallback", transaction),
    ];
    let starts: &[(&str, &str, &str)] = &[
        ("/v1/possession", "post", "201"),
        ("/v1/identity", "post", "201"),
        ("/v1/possession/{transaction_id}/confirm", "post", "200"),
    ];
    for (path, method, status) in starts {
        let pointer = format!("/paths/{}/{method}/responses/{status}", path.replace('~', "~0").replace('/', "~1"));
        let Some(response) = doc.pointer_mut(&pointer) else { continue };
        let mut links = serde_json::Map::new();
        if *path == "/v1/possession" {
            links.insert("confirmPossession".into(), link("confirmPossession", transaction));
            if sandbox {
                links.insert("sandboxOperator".into(), link("sandboxOperator", transaction));
            }
        }
        for (operation_id, parameter) in follow_ups {
            links.insert((*operation_id).into(), link(operation_id, *parameter));
        }
        response["links"] = Value::Object(links);
    }
}

fn link(operation_id: &str, (name, expression): (&str, &str)) -> Value {
    json!({"operationId": operation_id, "parameters": {name: expression}})
}

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations", operation_id = "openapi",
    responses((status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json"))
)]
pub async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], state.openapi.clone())
}

/// The Redoc bundle `/docs` loads, vendored in the binary (`assets/redoc`).
const REDOC_JS: &str = include_str!("../../assets/redoc/redoc.standalone.js");

/// A page to browse this API, served whole by handset (nothing is fetched
/// from elsewhere).
#[utoipa::path(
    get, path = "/docs", tag = "operations", operation_id = "docs",
    responses((status = 200, description = "The API reference page (Redoc)", content_type = "text/html"))
)]
pub async fn page() -> Html<&'static str> {
    Html(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>handset API</title>\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <style>body { margin: 0; padding: 0; }</style>\n</head>\n<body>\n\
         <redoc spec-url=\"/openapi.json\"></redoc>\n\
         <script src=\"/docs/redoc.standalone.js\"></script>\n</body>\n</html>\n",
    )
}

/// The script the page runs.
#[utoipa::path(
    get, path = "/docs/redoc.standalone.js", tag = "operations", operation_id = "docsScript",
    responses((status = 200, description = "Redoc 2.5.4, vendored", content_type = "text/javascript"))
)]
pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=86400")],
        REDOC_JS,
    )
}
