//! One signed POST of a callback to a partner, guarded against server-side
//! request forgery at delivery time.
//!
//! The client resolves host names through `GuardedResolver`, which drops
//! internal addresses, and connects only to what that resolver returned: a
//! name that resolved to a public address when the partner registered it and
//! to a private one now (DNS rebinding) is refused here. IP literals skip name
//! resolution, so they are checked before sending. Redirects are never
//! followed and proxies from the environment are ignored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use handset_core::callback::{CallbackUrl, is_forbidden_ip};
use handset_core::model::{CallbackAttempt, ClaimedCallback};
use handset_core::webhook;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

const USER_AGENT: &str = concat!("handset-webhooks/", env!("CARGO_PKG_VERSION"));

/// Resolves names with the system resolver and keeps only public addresses
/// (unless private networks are allowed).
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_private_networks: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private_networks;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                found.iter().copied().filter(|a| allow_private || !is_forbidden_ip(a.ip())).collect();
            if allowed.is_empty() {
                let why =
                    if found.is_empty() { "resolves to no address" } else { "resolves only to internal addresses" };
                return Err(format!("callback host {host} {why}").into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

pub struct Delivery {
    client: reqwest::Client,
    allow_private_networks: bool,
}

impl Delivery {
    pub fn new(allow_private_networks: bool, timeout: Duration) -> Result<Delivery, reqwest::Error> {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { allow_private_networks }))
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
        let signature =
            webhook::sign(callback.webhook_secret.expose(), &webhook_id, timestamp, message.payload.as_bytes())
                .map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[tokio::test]
    async fn the_resolver_drops_internal_addresses() {
        let guarded = GuardedResolver { allow_private_networks: false };
        let error = guarded.resolve(Name::from_str("localhost").unwrap()).await.err().expect("refused");
        assert!(error.to_string().contains("internal"), "{error}");
        let open = GuardedResolver { allow_private_networks: true };
        let addrs: Vec<SocketAddr> = open.resolve(Name::from_str("localhost").unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
