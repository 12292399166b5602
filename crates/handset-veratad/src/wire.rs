//! Veratad's JSON, as `veratad-phonematch-sms.txt` documents it.

use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "PhoneMatch5.0.SMS";
pub const GATEWAY_PATH: &str = "/process/comprehensive/gateway";
/// Where to continue when an answer names no continuation URL.
pub const CONTINUE_PATH: &str = "/process/continue";

/// The initial request. `user` and `pass` ride in the body (as Veratad
/// wants), so they never appear in a URL or an access log.
#[derive(Serialize)]
pub struct GatewayIn<'a> {
    pub user: &'a str,
    pub pass: &'a str,
    pub service: &'static str,
    pub reference: String,
    pub target: Target<'a>,
    pub options: Options<'a>,
}

#[derive(Serialize)]
pub struct Target<'a> {
    #[serde(rename = "fn")]
    pub first_name: &'a str,
    #[serde(rename = "ln")]
    pub last_name: &'a str,
    pub phone: &'a str,
}

#[derive(Serialize)]
pub struct Options<'a> {
    pub outofband: OutOfBand<'a>,
}

#[derive(Serialize)]
pub struct OutOfBand<'a> {
    pub message: &'a str,
    pub do_not_send_to_types: &'a [String],
    #[serde(skip_serializing_if = "Countries::is_empty")]
    pub country: Countries<'a>,
}

#[derive(Serialize)]
pub struct Countries<'a> {
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub blacklist: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub whitelist: &'a [String],
}

impl Countries<'_> {
    fn is_empty(&self) -> bool {
        self.blacklist.is_empty() && self.whitelist.is_empty()
    }
}

/// The OTP validation request.
#[derive(Serialize)]
pub struct ContinueIn<'a> {
    pub token: &'a str,
    pub codematch: CodeMatch<'a>,
}

#[derive(Serialize)]
pub struct CodeMatch<'a> {
    pub key: &'a str,
}

/// Every answer: the initial one and the validation's.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Answer {
    pub result: Option<Verdict>,
    #[serde(default)]
    pub continuations: Option<Continuations>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Verdict {
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub detail: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Continuations {
    pub outofband: Option<Continuation>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Continuation {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub template: Option<Template>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Template {
    #[serde(default)]
    pub token: Option<String>,
}

impl Answer {
    /// The action and detail, verbatim, as handset keeps them in `provider_code`.
    pub fn provider_code(&self) -> String {
        let verdict = self.result.clone().unwrap_or_default();
        format!("{}: {}", verdict.action, verdict.detail)
    }

    pub fn action(&self) -> &str {
        self.result.as_ref().map(|r| r.action.as_str()).unwrap_or_default()
    }

    pub fn detail(&self) -> &str {
        self.result.as_ref().map(|r| r.detail.as_str()).unwrap_or_default()
    }

    /// The continuation to validate a code with, when the answer offers one.
    pub fn continuation(&self) -> Option<(&str, &str)> {
        let outofband = self.continuations.as_ref()?.outofband.as_ref()?;
        let token = outofband.template.as_ref()?.token.as_deref().filter(|t| !t.is_empty())?;
        Some((token, outofband.url.as_deref().unwrap_or(CONTINUE_PATH)))
    }
}
