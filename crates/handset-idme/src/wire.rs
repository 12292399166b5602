//! ID.me's JSON, as documented: transaction answers (also the result
//! webhook's body) and the error envelope.

use serde::Deserialize;
use serde_json::Value;

/// A telecom transaction as ID.me returns it (`send`, `confirm`, `identity`,
/// `GET /api/v2/telecom/:id`, and the result webhook's body).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TelecomResponse {
    pub transaction_id: Option<String>,
    pub verification_id: Option<String>,
    pub product: Option<String>,
    pub status: Option<StatusBody>,
    /// The overview document also names it `results`.
    #[serde(alias = "results")]
    pub result: Option<ResultBody>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StatusBody {
    pub code: i64,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Clone, Default, Deserialize)]
pub struct ResultBody {
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub address: Option<Value>,
    #[serde(default)]
    pub verified: Option<bool>,
    #[serde(default)]
    pub errors: Vec<ErrorBody>,
}

// The number and the address are personal data: never printed.
handset_core::debug_only!(ResultBody { verified, errors });

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorBody {
    pub code: i64,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub additional_info: Option<String>,
}

/// `{"errors":[{"code":2200,"message":"..."}]}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub errors: Vec<ErrorBody>,
}
