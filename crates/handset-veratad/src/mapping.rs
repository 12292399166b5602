//! Veratad's answers mapped to handset's catalogue. The table is in
//! `docs/providers/veratad.md`; `provider_code` keeps `"{action}: {detail}"`
//! verbatim.

use handset_core::ErrorCode;
use handset_core::model::{ResultError, TransactionResult};
use handset_core::provider::{CodeCheck, Outcome, ProviderError, Renewed, Started};

use crate::reference::ContinuationRef;
use crate::wire::Answer;

pub const PENDING: &str = "PENDING";
pub const PASS: &str = "PASS";
pub const FAIL: &str = "FAIL";
pub const SUPPRESSED: &str = "SUPPRESSED SENDING CODE";
pub const FAILED_TO_SEND: &str = "FAILED TO SEND TO NUMBER";
pub const DATA_CHECK_FAILED: &str = "DATA CHECK FAILED";
pub const FAILED_CHECK: &str = "FAILED OUT-OF-BAND CHECK";

/// Reads an HTTP answer. `reaches_user`: the call may have sent an SMS, so
/// a lost or unreadable answer is not safe to retry elsewhere.
pub(crate) async fn read(
    sent: Result<reqwest::Response, reqwest::Error>,
    reaches_user: bool,
) -> Result<Answer, ProviderError> {
    let response = match sent {
        Ok(response) => response,
        Err(error) if error.is_connect() => {
            return Err(ProviderError::unavailable("Veratad unreachable").because(error));
        }
        Err(error) if reaches_user => {
            let why = if error.is_timeout() { "timeout" } else { "connection lost" };
            return Err(ProviderError::failed(format!("no answer from Veratad ({why}); the code may have been sent"))
                .because(error));
        }
        Err(error) => return Err(ProviderError::unavailable("no answer from Veratad").because(error)),
    };
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    match status {
        200..=299 => serde_json::from_slice(&body).map_err(|e| {
            let reason = format!("unreadable answer from Veratad ({status})");
            if reaches_user { ProviderError::failed(reason) } else { ProviderError::unavailable(reason) }.because(e)
        }),
        401 | 403 => Err(refused(format!("Veratad answered {status}: credentials refused"))),
        502 | 503 => Err(ProviderError::unavailable(format!("Veratad answered {status}"))),
        500..=599 if reaches_user => Err(ProviderError::failed(format!(
            "Veratad answered {status}; the code may have been sent, so no other provider is tried"
        ))),
        500..=599 => Err(ProviderError::unavailable(format!("Veratad answered {status}"))),
        // Veratad refusing what handset sent is handset's configuration (or bug), not the partner's.
        _ => Err(refused(format!("Veratad refused the request ({status})"))),
    }
}

/// Veratad refused handset's credentials or request: an operator problem,
/// logged loudly and counted; the user's request fails over.
fn refused(reason: String) -> ProviderError {
    tracing::error!(provider = "veratad", %reason, "check providers.veratad (user, pass, message, lists)");
    metrics::counter!("handset_provider_auth_failures_total", "provider" => "veratad").increment(1);
    ProviderError::misconfigured(reason)
}

/// The initial request's answer: PENDING waits for the code (its
/// continuation kept as the provider reference); FAIL ends the check.
pub fn started_of(answer: &Answer) -> Result<Started, ProviderError> {
    match answer.action() {
        PENDING => {
            let (token, url) = answer.continuation().ok_or_else(|| {
                ProviderError::failed(
                    "Veratad answered PENDING without a continuation token; the code may have been sent",
                )
            })?;
            let reference = ContinuationRef::new(token, url).to_string();
            Ok(Started { provider_ref: Some(reference), ..Started::outcome(Outcome::Pending) })
        }
        FAIL => Ok(Started::outcome(Outcome::Failed(send_failure(answer)))),
        PASS => Err(ProviderError::failed("Veratad passed the check before any code was entered")),
        other => Err(ProviderError::failed(format!("Veratad answered an unknown action {other:?}"))),
    }
}

/// Why a send failed, by Veratad's detail.
fn send_failure(answer: &Answer) -> ResultError {
    let code = match answer.detail() {
        // The line type is one of `do_not_send_to_types`.
        SUPPRESSED => ErrorCode::SmsNotSupported,
        FAILED_TO_SEND => ErrorCode::SmsNotSent,
        // The number is not a valid line.
        DATA_CHECK_FAILED => ErrorCode::CannotReceiveSms,
        _ => return unknown(answer),
    };
    ResultError::new(code).provider_code(answer.provider_code())
}

/// A FAIL whose detail Veratad does not document: 5000 with its words kept.
fn unknown(answer: &Answer) -> ResultError {
    tracing::warn!(provider = "veratad", provider_code = %answer.provider_code(), "an undocumented Veratad result");
    ResultError { message: "Transaction unsuccessful".into(), ..ResultError::new(ErrorCode::Internal) }
        .provider_code(answer.provider_code())
}

/// The validation's answer. A wrong code is a wrong code (one of handset's
/// attempts used), with the new continuation when Veratad offers one; when it
/// offers none, the same token is tried again next time, and if Veratad has
/// closed the check every further code fails until handset's own limit (or
/// the deadline) ends it. The `final` token of a PASS is not kept: nothing
/// more is asked of it.
pub fn check_of(answer: &Answer) -> Result<Renewed<CodeCheck>, ProviderError> {
    match (answer.action(), answer.detail()) {
        (PASS, _) => Ok(Renewed::same_ref(CodeCheck::Matched(TransactionResult::Phone { phone: String::new() }))),
        (FAIL, FAILED_CHECK) => Ok(Renewed {
            answer: CodeCheck::Mismatched,
            provider_ref: answer.continuation().map(|(token, url)| ContinuationRef::new(token, url).to_string()),
        }),
        (FAIL, _) => Ok(Renewed::same_ref(CodeCheck::Failed(unknown(answer)))),
        (action, _) => Err(ProviderError::failed(format!("Veratad answered the code with the action {action:?}"))),
    }
}
