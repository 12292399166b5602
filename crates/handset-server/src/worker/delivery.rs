//! One signed POST of a callback to a partner, guarded against server-side
//! request forgery at delivery time.
//!
//! The client resolves host names through the `CallbackGuard`, which drops
//! internal addresses, and connects only to what the guard returned: a
//! name that resolved to a public address when the partner registered it and
//! to a private one now (DNS rebinding) is refused here. IP literals skip name
//! resolution, so they are checked before sending. Redirects are never
//! followed and proxies from the environment are ignored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use handset_core::callback::{CallbackUrl, is_forbidden_ip};
use handset_core::model::{CallbackAttempt, ClaimedCallback};
use handset_core::webhook;

use crate::dns::CallbackGuard;

const USER_AGENT: &str = concat!("handset-webhooks/", env!("CARGO_PKG_VERSION"));

pub struct Delivery {
    client: reqwest::Client,
    allow_private_networks: bool,
}

impl Delivery {
    pub fn new(guard: CallbackGuard, timeout: Duration) -> Result<Delivery, reqwest::Error> {
        let allow_private_networks = guard.allow_private_networks;
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(guard))
            .build()?;
        Ok(Delivery { client, allow_private_networks })
    }

    /// Makes one attempt and reports it; never fails itself.
    pub async fn attempt(&self, callback: &ClaimedCallback, now: DateTime<Utc>) -> CallbackAttempt {
        let started = Instant::now();
        let outcome = self.send(callback, now).await;
        let latency_ms = started.elapsed().as_millis() as i64;
        let (status_code, error) = match outcome {
            Ok(status) => (Some(i32::from(status)), None),
            Err(error) => (None, Some(error)),
        };
        CallbackAttempt { attempted_at: now, status_code, error, latency_ms }
    }

    async fn send(&self, callback: &ClaimedCallback, now: DateTime<Utc>) -> Result<u16, String> {
        let message = &callback.message;
        let url = CallbackUrl::parse(&message.callback_url)
            .map_err(|_| "callback_url is not a valid http(s) URL".to_owned())?;
        if !self.allow_private_networks && (url.names_local_host() || url.ip().is_some_and(is_forbidden_ip)) {
            return Err("callback_url points to an internal address".into());
        }
        let webhook_id = message.webhook_id();
        let timestamp = now.timestamp();
        // During a secret rotation's overlap, one signature per secret
        // (space-separated, as Standard Webhooks allows): a receiver that
        // knows either secret verifies the message.
        let mut signature =
            webhook::sign(callback.webhook_secret.expose(), &webhook_id, timestamp, message.payload.as_bytes())
                .map_err(|e| e.to_string())?;
        if let Some(previous) = &callback.previous_webhook_secret {
            let old = webhook::sign(previous.expose(), &webhook_id, timestamp, message.payload.as_bytes())
                .map_err(|e| e.to_string())?;
            signature = format!("{signature} {old}");
        }
        let response = self
            .client
            .post(url.as_str())
            .header("content-type", "application/json")
            .header("webhook-id", &webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(message.payload.clone())
            .send()
            .await
            .map_err(describe)?;
        Ok(response.status().as_u16())
    }
}

/// A transport error as one line: its kind and the innermost cause.
fn describe(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut cause: &dyn std::error::Error = &error;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    format!("{kind}: {cause}")
}
