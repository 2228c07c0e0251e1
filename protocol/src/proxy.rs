//! Proxy nodes: what the control plane tells a `--proxy` node to serve
//! ([`ProxyDesired`], inside its desired state), and what the agent hands to
//! the `berth-proxy` process ([`ProxyConfig`], a JSON file swapped atomically).
//! The API's domains and TCP routes these are made from are in [`crate::routes`].

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};

/// One replica a route may send traffic to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpstreamDesired {
    pub replica: String,
    pub node: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub ip: Ipv4Addr,
    pub port: u16,
    pub healthy: bool,
    /// Balancing weight, passed through to [`Upstream::weight`].
    #[serde(default = "default_weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HttpRouteDesired {
    pub domain: String,
    pub service: String,
    pub upstreams: Vec<UpstreamDesired>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PassthroughDesired {
    pub domain: String,
    pub service: String,
    pub upstreams: Vec<UpstreamDesired>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TcpRouteDesired {
    pub listen: u16,
    pub service: String,
    pub upstreams: Vec<UpstreamDesired>,
}

/// A certificate for a domain: the chain in clear, the private key sealed
/// to the proxy node's key ([`crate::seal`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertDesired {
    pub domain: String,
    pub chain_pem: String,
    pub sealed_key_pem: String,
}

/// An ACME HTTP-01 challenge: answer `GET /.well-known/acme-challenge/TOKEN`
/// with `key_authorization`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Http01Challenge {
    pub token: String,
    pub key_authorization: String,
}

/// An ACME TLS-ALPN-01 challenge: answer a handshake for `domain` with ALPN
/// `acme-tls/1` using a self-signed certificate carrying the acmeIdentifier
/// extension (SHA-256 of `key_authorization`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AlpnChallenge {
    pub domain: String,
    pub key_authorization: String,
}

/// What a proxy node serves; part of its desired state (None on workers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProxyDesired {
    #[serde(default)]
    pub http_routes: Vec<HttpRouteDesired>,
    #[serde(default)]
    pub passthrough: Vec<PassthroughDesired>,
    #[serde(default)]
    pub tcp_routes: Vec<TcpRouteDesired>,
    #[serde(default)]
    pub certs: Vec<CertDesired>,
    #[serde(default)]
    pub http01: Vec<Http01Challenge>,
    #[serde(default)]
    pub alpn01: Vec<AlpnChallenge>,
}

/// One upstream as berth-proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Upstream {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub addr: SocketAddr,
    /// On the proxy's own node: preferred.
    pub local: bool,
    /// Healthy as far as the control plane knows; the proxy also ejects
    /// upstreams it fails to reach.
    pub healthy: bool,
    /// Share of new requests among the upstreams of its tier (smooth
    /// weighted round-robin), 0..=[`MAX_WEIGHT`]. 0 drains it: it gets new
    /// requests only when no upstream with a weight can be used. Absent: 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Largest upstream weight; keeps the balancer's arithmetic small and a typo
/// (an extra zero or three) visible.
pub const MAX_WEIGHT: u32 = 1000;

/// The weight of an upstream whose config does not say.
pub fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProxyRoute {
    pub domain: String,
    pub upstreams: Vec<Upstream>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProxyTcpRoute {
    pub listen: u16,
    pub upstreams: Vec<Upstream>,
}

/// A certificate with its key in clear (the config file is 0600, owned by
/// the proxy's user).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProxyCert {
    pub domain: String,
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ProxyCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCert")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// The file the agent writes for `berth-proxy` (`--config`), replaced
/// atomically (write + rename); the proxy reloads it when it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProxyConfig {
    pub revision: u64,
    #[serde(default)]
    pub http_routes: Vec<ProxyRoute>,
    #[serde(default)]
    pub passthrough: Vec<ProxyRoute>,
    #[serde(default)]
    pub tcp_routes: Vec<ProxyTcpRoute>,
    #[serde(default)]
    pub certs: Vec<ProxyCert>,
    #[serde(default)]
    pub http01: Vec<Http01Challenge>,
    #[serde(default)]
    pub alpn01: Vec<AlpnChallenge>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_defaults_to_one() {
        let u: Upstream = serde_json::from_str(r#"{"addr": "10.0.0.1:80", "local": false, "healthy": true}"#).unwrap();
        assert_eq!(u.weight, 1);
        let u: UpstreamDesired = serde_json::from_str(
            r#"{"replica": "web-1", "node": "n1", "ip": "10.0.0.1", "port": 80, "healthy": true}"#,
        )
        .unwrap();
        assert_eq!(u.weight, 1);
    }

    #[test]
    fn cert_debug_hides_the_key() {
        let c = ProxyCert {
            domain: "a.b".into(),
            chain_pem: "CHAIN".into(),
            key_pem: "SECRET-KEY".into(),
        };
        assert!(!format!("{c:?}").contains("SECRET-KEY"));
    }
}
