//! Rules for partners' callback URLs: http(s) only, and never an address
//! inside our own network (server-side request forgery). Name resolution is
//! the caller's; this module classifies what it resolved.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

use crate::error::{ApiError, ErrorCode};

const MAX_URL_LEN: usize = 2048;

/// A syntactically acceptable callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackUrl(Url);

impl CallbackUrl {
    pub fn parse(raw: &str) -> Result<CallbackUrl, ApiError> {
        let invalid = || ApiError::new(ErrorCode::InvalidCallbackUrl);
        if raw.len() > MAX_URL_LEN {
            return Err(invalid());
        }
        let url = Url::parse(raw).map_err(|_| invalid())?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(invalid());
        }
        // Credentials in a URL end up in logs and in the callback list.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ApiError::with_message(
                ErrorCode::InvalidCallbackUrl,
                "Transaction parameter callback_url is invalid: it must not carry credentials (user:pass@)",
            ));
        }
        Ok(CallbackUrl(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The host to resolve, or `None` when the URL names an IP address.
    pub fn domain(&self) -> Option<&str> {
        match self.0.host() {
            Some(Host::Domain(domain)) => Some(domain),
            _ => None,
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self.0.host() {
            Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        }
    }

    pub fn port(&self) -> u16 {
        self.0.port_or_known_default().unwrap_or(80)
    }

    /// Names that always mean this machine, whatever DNS says.
    pub fn names_local_host(&self) -> bool {
        self.domain().is_some_and(|d| {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost") || d == "metadata.google.internal"
        })
    }
}

/// Whether handset must refuse to call `ip`: loopback, private, link-local,
/// unique-local, multicast, unspecified, cloud-metadata, carrier-grade NAT,
/// reserved and documentation ranges, including IPv4 inside IPv6 (mapped,
/// compatible, NAT64).
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, includes the 169.254.169.254 metadata service
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT, includes 100.100.100.200 metadata
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        return is_forbidden_v4(v4);
    }
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7, includes fd00:ec2::254 metadata
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (first & 0xffc0) == 0xfec0 // deprecated site-local
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
}

/// IPv4 carried inside IPv6: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d),
/// NAT64 (64:ff9b::a.b.c.d and the local 64:ff9b:1::/48) and 6to4 (2002:aabb:ccdd::).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..3] == [0x64, 0xff9b, 1] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(CallbackUrl::parse("https://partner.example/hook").is_ok());
        assert!(CallbackUrl::parse("http://203.0.114.9:8080/x").is_ok());
        for bad in ["ftp://partner.example/", "partner.example/hook", "https://", "javascript:alert(1)", ""] {
            assert!(CallbackUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(CallbackUrl::parse("http://LOCALHOST./x").unwrap().names_local_host());
    }

    #[test]
    fn forbidden_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::7f00:1",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
        ] {
            assert!(is_forbidden_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "203.0.114.9", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"] {
            assert!(!is_forbidden_ip(ip.parse().unwrap()), "{ip}");
        }
    }
}
