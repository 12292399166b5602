//! DQE's answers mapped to handset's catalogue. The body's `status`
//! (`success`, `pending`, `error`) decides, never the HTTP status; error ids
//! are kept verbatim (`"09"`) as `provider_code`. The table is in
//! `docs/providers/dqe.md`.

use handset_core::model::{ResultError, TransactionResult};
use handset_core::provider::{Outcome, ProviderError, Started};
use handset_core::{ApiError, ErrorCode};
use serde::Deserialize;

/// Any DQE answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Answer {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default, rename = "numVerify")]
    pub num_verify: Option<bool>,
    #[serde(default)]
    pub error_id: Option<String>,
    #[serde(default)]
    pub error_type: Option<String>,
}

impl Answer {
    fn error_id(&self) -> &str {
        self.error_id.as_deref().unwrap_or_default()
    }

    fn described(&self) -> String {
        format!("DQE error {} ({})", self.error_id(), self.error_type.as_deref().unwrap_or("no type"))
    }
}

/// Reads an answer by its body whatever the HTTP status; no readable body is
/// unavailability (nothing has reached the user at either step).
pub(crate) async fn read(sent: Result<reqwest::Response, reqwest::Error>) -> Result<Answer, ProviderError> {
    let response = sent.map_err(|error| ProviderError::unavailable("no answer from DQE").because(error))?;
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    serde_json::from_slice(&body)
        .map_err(|e| ProviderError::unavailable(format!("unreadable answer from DQE (HTTP {status})")).because(e))
}

/// DQE refused handset's own request, licence or token: the operator's
/// problem, logged loudly and counted, never the partner's.
fn ours(answer: &Answer) -> ProviderError {
    let reason = answer.described();
    tracing::error!(provider = "dqe", %reason, "DQE refused handset's request: check providers.dqe (licence, token, name)");
    metrics::counter!("handset_provider_auth_failures_total", "provider" => "dqe").increment(1);
    ProviderError::misconfigured(reason)
}

/// Step 1: `success` hands out the operator's URL; errors by id.
pub fn started_of(answer: &Answer) -> Result<Started, ProviderError> {
    match answer.status.as_str() {
        "success" => {
            let url = answer.url.clone().filter(|u| u.starts_with("https://") || u.starts_with("http://"));
            let url = url.ok_or_else(|| ProviderError::unavailable("DQE answered success without an operator URL"))?;
            Ok(Started { redirect_url: Some(url), ..Started::outcome(Outcome::Pending) })
        }
        // The operator's check failed: a decision, the check ends here.
        "error" if answer.error_id() == "12" => Ok(Started::outcome(Outcome::Failed(
            not_this_line(answer.error_type.as_deref().unwrap_or_default()).provider_code("12"),
        ))),
        "error" => Err(start_error(answer)),
        other => Err(ProviderError::unavailable(format!("DQE answered an unknown status {other:?}"))),
    }
}

fn start_error(answer: &Answer) -> ProviderError {
    let id = answer.error_id().to_owned();
    match id.as_str() {
        // Our request, licence or token.
        "01" | "02" | "04" | "05" | "06" | "30" => ours(answer),
        // Some operators need `user_infos`, which numVerify does not send:
        // that operator is not DQE's to serve here, the next provider may be.
        "07" => ProviderError::Ineligible { reason: answer.described(), provider_code: Some(id), temporary: false },
        // The number itself: the partner's input.
        "09" | "10" | "11" => ProviderError::Rejected(ApiError::with_message(
            ErrorCode::InvalidPhone,
            format!("Transaction parameter phone is missing or invalid ({})", answer.described()),
        )),
        // The operator cannot serve it: the next provider may.
        "13" | "14" | "15" | "17" => {
            ProviderError::Ineligible { reason: answer.described(), provider_code: Some(id), temporary: false }
        }
        // Unreachable for now: next provider, and 503 (not 422) when none is left.
        "16" => ProviderError::Ineligible { reason: answer.described(), provider_code: Some(id), temporary: true },
        _ => ProviderError::unavailable(format!("undocumented {}", answer.described())),
    }
}

/// Step 2: pending waits, success decides by `numVerify`, errors by id.
/// `with_session`: the call used DQE's session token (not the configured
/// fallback), so an expired token is this check's end.
pub fn outcome_of(answer: &Answer, with_session: bool) -> Result<Outcome, ProviderError> {
    match answer.status.as_str() {
        "pending" => Ok(Outcome::Pending),
        "success" => match answer.num_verify {
            Some(true) => Ok(Outcome::Succeeded(TransactionResult::Phone { phone: String::new() })),
            Some(false) => Ok(Outcome::Failed(not_this_line("numVerify is false"))),
            None => Err(ProviderError::unavailable("DQE answered success without numVerify")),
        },
        "error" => result_error(answer, with_session),
        other => Err(ProviderError::unavailable(format!("DQE answered an unknown status {other:?}"))),
    }
}

fn result_error(answer: &Answer, with_session: bool) -> Result<Outcome, ProviderError> {
    let id = answer.error_id().to_owned();
    let failed = |error: ResultError| Ok(Outcome::Failed(error.provider_code(id.clone())));
    match id.as_str() {
        "01" | "02" | "04" => Err(ours(answer)),
        // No data from the operator after its check.
        "18" => failed(ResultError {
            message: "The operator returned no result".into(),
            ..ResultError::new(ErrorCode::Internal)
        }),
        // The line is not the number given, or the user declined.
        "20" | "21" => failed(not_this_line(answer.error_type.as_deref().unwrap_or_default())),
        "30" if with_session => failed(ResultError::new(ErrorCode::CodeExpired)),
        // The configured token does not name this session: wait for the user's return.
        "30" => Ok(Outcome::Pending),
        "99" => Err(ProviderError::unavailable(answer.described())),
        _ => Err(ProviderError::unavailable(format!("undocumented {}", answer.described()))),
    }
}

/// The operator did not confirm that the user's line is this number.
fn not_this_line(info: &str) -> ResultError {
    ResultError::new(ErrorCode::UserNotFound)
        .additional_info(format!("The operator did not match this number ({info})"))
}
