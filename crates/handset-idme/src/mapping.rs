//! ID.me's answers mapped to handset's catalogue: HTTP statuses with their
//! envelope codes to `ProviderError`, transaction statuses and result errors
//! to `Outcome`. The table is in `docs/providers/idme.md`.

use std::time::Duration;

use handset_core::model::{Address, ResultError, TransactionResult};
use handset_core::provider::{CodeCheck, Outcome, ProviderError};
use handset_core::{ApiError, ErrorCode};
use serde_json::Value;

use crate::wire::{Envelope, ErrorBody, TelecomResponse};

/// `Retry-After` assumed when ID.me rate-limits without saying for how long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Reads an answer. `reaches_user`: the call may have sent an SMS, so a lost
/// answer is not safe to retry elsewhere.
pub(crate) async fn read(
    sent: Result<reqwest::Response, reqwest::Error>,
    reaches_user: bool,
) -> Result<TelecomResponse, ProviderError> {
    let response = match sent {
        Ok(response) => response,
        Err(error) if error.is_connect() => {
            return Err(ProviderError::unavailable("ID.me unreachable").because(error));
        }
        Err(error) if reaches_user => {
            let why = if error.is_timeout() { "timeout" } else { "connection lost" };
            return Err(ProviderError::failed(format!("no answer from ID.me ({why}); the code may have been sent"))
                .because(error));
        }
        Err(error) => return Err(ProviderError::unavailable("no answer from ID.me").because(error)),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response.bytes().await.unwrap_or_default();
    if (200..300).contains(&status) {
        return serde_json::from_slice(&body)
            .map_err(|e| ProviderError::failed(format!("unreadable answer from ID.me ({status})")).because(e));
    }
    let envelope: Envelope = serde_json::from_slice(&body).unwrap_or_default();
    Err(http_error(status, envelope.errors.first(), retry_after, reaches_user))
}

/// A non-2xx answer as a provider error. On a call that may reach the user
/// (a send), only 502 and 503 say the request was not processed; any other
/// 5xx may come after the SMS went out, so it is not failed over.
pub(crate) fn http_error(
    status: u16,
    error: Option<&ErrorBody>,
    retry_after: Option<Duration>,
    reaches_user: bool,
) -> ProviderError {
    let code = error.map(|e| e.code).unwrap_or_default();
    let text = error.and_then(|e| e.message.clone()).unwrap_or_default();
    let described = format!("ID.me answered {status} {code} {text}");
    let known = u16::try_from(code).ok().and_then(ErrorCode::from_code);
    match status {
        401 => credentials_refused(described),
        403 if matches!(code, 3200 | 3300) => ProviderError::failed(described),
        403 => credentials_refused(described),
        404 => ProviderError::failed(described),
        // ID.me refusing the callback URL handset gave it is handset's problem.
        422 if code == 3100 => ProviderError::misconfigured(described),
        422 => match known {
            Some(code) if code.http_status() == Some(422) => ProviderError::Rejected(ApiError::new(code)),
            _ => ProviderError::failed(described),
        },
        429 => {
            let code = match known {
                Some(code @ (ErrorCode::ProductRateLimited | ErrorCode::AccountRateLimited)) => code,
                _ => ErrorCode::AccountRateLimited,
            };
            ProviderError::Rejected(ApiError::new(code).retry_after(retry_after.unwrap_or(DEFAULT_RETRY_AFTER)))
        }
        502 | 503 => ProviderError::unavailable(described),
        500..=599 if reaches_user => {
            ProviderError::failed(format!("{described}; the code may have been sent, so no other provider is tried"))
        }
        500..=599 => ProviderError::unavailable(described),
        _ => ProviderError::failed(described),
    }
}

/// ID.me refused handset's own credentials or product access: an operator
/// problem, logged loudly and counted, never shown to the partner as theirs.
fn credentials_refused(described: String) -> ProviderError {
    tracing::error!(provider = "idme", answer = %described, "ID.me refused handset's credentials: check providers.idme.secret and the account's products");
    metrics::counter!("handset_provider_auth_failures_total", "provider" => "idme").increment(1);
    ProviderError::misconfigured(described)
}

/// A confirm's 422 answers are verdicts on the code, not failures of the call.
pub(crate) fn code_check_of(error: ProviderError) -> Result<CodeCheck, ProviderError> {
    match error {
        ProviderError::Rejected(rejected) => match rejected.code {
            ErrorCode::InvalidCode => Ok(CodeCheck::Mismatched),
            code @ (ErrorCode::CodeExpired | ErrorCode::RetryLimitExceeded | ErrorCode::NotPossessionCheck) => {
                Ok(CodeCheck::Failed(ResultError::new(code).provider_code(code.code().to_string())))
            }
            _ => Err(ProviderError::Rejected(rejected)),
        },
        other => Err(other),
    }
}

/// Where a transaction stands by ID.me's answer: result errors end it
/// (300), status 200 succeeds, 210 waits.
pub fn outcome_of(answer: &TelecomResponse) -> Result<Outcome, ProviderError> {
    if let Some(error) = answer.result.as_ref().and_then(|r| r.errors.first()) {
        return Ok(Outcome::Failed(result_error(error)));
    }
    match answer.status.as_ref().map(|s| s.code) {
        Some(200) => {
            let address = answer.result.as_ref().and_then(|r| r.address.as_ref()).and_then(address_of);
            Ok(Outcome::Succeeded(match address {
                Some(address) => TransactionResult::Address { address },
                // Possession: the number is the one handset checked (filled in
                // by the gateway). An identity match without a readable address
                // is refused there (5000), whatever `product` ID.me names.
                None => TransactionResult::Phone { phone: String::new() },
            }))
        }
        Some(210) => Ok(Outcome::Pending),
        Some(300) => Ok(Outcome::Failed(ResultError {
            code: ErrorCode::Internal.code(),
            message: "Transaction unsuccessful".into(),
            additional_info: None,
            provider_code: Some("300".into()),
        })),
        other => Err(ProviderError::failed(format!("ID.me answered an unknown transaction status {other:?}"))),
    }
}

/// A result error, with ID.me's code kept verbatim in `provider_code`.
fn result_error(error: &ErrorBody) -> ResultError {
    let known = u16::try_from(error.code).ok().and_then(ErrorCode::from_code).filter(|c| c.http_status().is_none());
    let mut mapped = match known {
        Some(code) => ResultError::new(code),
        // A code the catalogue does not know yet: say so, keep ID.me's words.
        None => ResultError {
            code: ErrorCode::Internal.code(),
            message: error.message.clone().unwrap_or_else(|| "Transaction unsuccessful".into()),
            additional_info: None,
            provider_code: None,
        },
    };
    mapped.provider_code = Some(error.code.to_string());
    mapped.additional_info = error.additional_info.clone();
    mapped
}

/// The carrier's address, accepting the usual spellings of its fields.
fn address_of(value: &Value) -> Option<Address> {
    let field = |names: &[&str]| {
        names.iter().find_map(|n| value.get(*n).and_then(Value::as_str)).map(str::to_owned).filter(|s| !s.is_empty())
    };
    Some(Address {
        line1: field(&["line1", "street", "address1", "street1"])?,
        line2: field(&["line2", "address2", "street2"]),
        city: field(&["city"]).unwrap_or_default(),
        region: field(&["region", "state"]).unwrap_or_default(),
        postal_code: field(&["postal_code", "zip", "zip_code", "zipcode"]).unwrap_or_default(),
        country: field(&["country"]).unwrap_or_else(|| "US".into()),
    })
}

/// Reads ID.me's result webhook (the body of `GET /api/v2/telecom/:id`):
/// ID.me's transaction id and where it stands.
pub fn webhook_result(body: &[u8]) -> Result<(String, Outcome), String> {
    let answer: TelecomResponse = serde_json::from_slice(body).map_err(|e| format!("{e}"))?;
    let reference = answer.transaction_id.clone().ok_or("no transaction_id")?;
    let outcome = outcome_of(&answer).map_err(|e| e.to_string())?;
    Ok((reference, outcome))
}
