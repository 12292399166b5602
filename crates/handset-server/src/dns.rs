//! Where callbacks may go: one guard, used when a partner gives a
//! `callback_url` and again when a delivery connects, so that a host name
//! that resolved to a public address at request time and to an internal one
//! at delivery time (DNS rebinding) is refused at delivery.
//!
//! Name resolution goes through `HostLookup`: the system's resolver in the
//! binary, another one in tests (a name that changes its address between
//! the two checks cannot be had from the system resolver on demand).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use handset_core::callback::is_forbidden_ip;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

pub type Lookup = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;

/// Resolves a host name to its addresses.
pub trait HostLookup: Send + Sync + 'static {
    fn lookup(&self, host: &str) -> Lookup;
}

/// The operating system's resolver (`getaddrinfo`, through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLookup;

impl HostLookup for SystemLookup {
    fn lookup(&self, host: &str) -> Lookup {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.map(|a| a.ip()).collect()) })
    }
}

/// Whether callbacks may reach internal addresses, and how names are resolved.
#[derive(Clone)]
pub struct CallbackGuard {
    pub allow_private_networks: bool,
    pub lookup: Arc<dyn HostLookup>,
}

impl std::fmt::Debug for CallbackGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackGuard").field("allow_private_networks", &self.allow_private_networks).finish()
    }
}

impl CallbackGuard {
    /// Every address `host` resolves to.
    pub async fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        self.lookup.lookup(host).await
    }

    /// The addresses a delivery may connect to: `host`'s, less internal ones
    /// (unless private networks are allowed); an error when none is left.
    pub async fn allowed_addresses(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let found = self.resolve(host).await.map_err(|e| format!("callback host {host} does not resolve: {e}"))?;
        let allowed: Vec<IpAddr> =
            found.iter().copied().filter(|ip| self.allow_private_networks || !is_forbidden_ip(*ip)).collect();
        if allowed.is_empty() {
            let why = if found.is_empty() { "resolves to no address" } else { "resolves only to internal addresses" };
            return Err(format!("callback host {host} {why}"));
        }
        Ok(allowed)
    }
}

/// The delivery client's resolver: it connects only to what the guard allows.
impl Resolve for CallbackGuard {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.clone();
        Box::pin(async move {
            let allowed = guard.allowed_addresses(name.as_str()).await?;
            Ok(Box::new(allowed.into_iter().map(|ip| SocketAddr::new(ip, 0))) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn system(allow_private_networks: bool) -> CallbackGuard {
        CallbackGuard { allow_private_networks, lookup: Arc::new(SystemLookup) }
    }

    #[tokio::test]
    async fn the_guard_drops_internal_addresses() {
        let guarded = system(false);
        let error = Resolve::resolve(&guarded, Name::from_str("localhost").unwrap()).await.err().expect("refused");
        assert!(error.to_string().contains("internal"), "{error}");
        let open = system(true);
        let addrs: Vec<SocketAddr> =
            Resolve::resolve(&open, Name::from_str("localhost").unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
