//! Public domains and TCP routes, as the API takes and lists them
//! (`/v1/domains`, `/v1/routes/tcp`). What a proxy node is then told to
//! serve is in [`crate::proxy`].

use crate::error::FieldError;
use crate::names::validate_dns_label;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A public domain routed to a service (`berth domain add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    /// Fully qualified host name, lowercase, e.g. `app.example.com`.
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
            max_length = 253
        )
    )]
    pub domain: String,
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub service: String,
    /// The service's port inside its containers.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub port: u16,
    /// Pass TLS through by SNI to the service (it terminates TLS itself);
    /// no certificate is ordered.
    #[serde(default)]
    pub passthrough: bool,
}

/// A TCP port on every proxy forwarded to a service (`berth route tcp add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TcpRouteSpec {
    /// Not 80 or 443 (the proxy's own).
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub listen: u16,
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub service: String,
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub port: u16,
}

/// Ports the proxy itself uses; a TCP route may not take them.
pub const RESERVED_PORTS: [u16; 2] = [80, 443];

/// Checks a public host name: 1–253 characters, at least two labels, each a
/// DNS label (lowercase letters, digits, '-'); no wildcard, no trailing dot.
pub fn validate_domain(field: &str, domain: &str) -> Result<(), FieldError> {
    if domain.is_empty() || domain.len() > 253 {
        return Err(FieldError::new(
            field,
            format_args!("{domain:?} must be 1-253 characters"),
        ));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err(FieldError::new(
            field,
            format_args!("{domain:?} is not a fully qualified host name"),
        ));
    }
    for l in labels {
        validate_dns_label(field, l).map_err(|_| {
            FieldError::new(
                field,
                format_args!("{domain:?} is not a valid host name (labels are lowercase letters, digits and '-')"),
            )
        })?;
    }
    Ok(())
}

impl DomainSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_domain("domain", &self.domain)?;
        validate_dns_label("service", &self.service)?;
        if self.port == 0 {
            return Err(FieldError::new("port", "must be 1-65535"));
        }
        Ok(())
    }
}

impl TcpRouteSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.listen == 0 {
            return Err(FieldError::new("listen", "must be 1-65535"));
        }
        if RESERVED_PORTS.contains(&self.listen) {
            return Err(FieldError::new(
                "listen",
                format_args!("port {} is the proxy's own HTTP(S) port", self.listen),
            ));
        }
        validate_dns_label("service", &self.service)?;
        if self.port == 0 {
            return Err(FieldError::new("port", "must be 1-65535"));
        }
        Ok(())
    }
}

/// Where a domain's certificate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// None yet (or the last one expired); an order is due or running.
    Pending,
    /// A certificate that has not expired is stored.
    Valid,
    /// The last order failed; see `last_error`. It is retried with backoff.
    Failed,
    /// TLS is passed through to the service: no certificate.
    Passthrough,
}

impl CertState {
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Pending => "pending",
            CertState::Valid => "valid",
            CertState::Failed => "failed",
            CertState::Passthrough => "passthrough",
        }
    }
}

impl fmt::Display for CertState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A domain as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DomainInfo {
    pub spec: DomainSpec,
    pub cert_state: CertState,
    /// RFC 3339 expiry of the current certificate.
    pub cert_not_after: Option<String>,
    pub last_error: Option<String>,
    /// Online proxy nodes whose berth-proxy has loaded this domain: its
    /// route with a certificate (or its passthrough route), as the proxy's
    /// last status report says.
    #[serde(default)]
    pub proxies_serving: u32,
    /// Proxy nodes online (reported within the control plane's
    /// `--offline-after`).
    #[serde(default)]
    pub proxies_online: u32,
}

impl DomainInfo {
    /// Served: the certificate is issued (or none is needed) and every
    /// online proxy, at least one, serves the domain.
    pub fn served_everywhere(&self) -> bool {
        matches!(self.cert_state, CertState::Valid | CertState::Passthrough)
            && self.proxies_online > 0
            && self.proxies_serving >= self.proxies_online
    }

    /// `2/2`: online proxies serving the domain, of the online proxies.
    pub fn proxies(&self) -> String {
        format!("{}/{}", self.proxies_serving, self.proxies_online)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        for ok in ["app.example.com", "a.b", "x-1.example.org"] {
            validate_domain("domain", ok).unwrap();
        }
        for bad in [
            "",
            "localhost",
            "App.example.com",
            "*.example.com",
            "a..b",
            "a.b.",
            "-a.b",
            "a b.c",
        ] {
            let e = validate_domain("domain", bad).unwrap_err();
            assert!(e.to_string().starts_with("domain:"), "{bad}: {e}");
            assert_eq!(e.field, "domain");
        }
    }

    #[test]
    fn specs_name_the_field() {
        let d = DomainSpec {
            domain: "app.example.com".into(),
            service: "web".into(),
            port: 0,
            passthrough: false,
        };
        assert!(d.validate().unwrap_err().to_string().starts_with("port:"));
        assert_eq!(d.validate().unwrap_err().field, "port");
        let t = TcpRouteSpec {
            listen: 443,
            service: "db".into(),
            port: 5432,
        };
        assert!(t.validate().unwrap_err().to_string().starts_with("listen:"));
        assert_eq!(t.validate().unwrap_err().field, "listen");
        let t = TcpRouteSpec { listen: 5432, ..t };
        t.validate().unwrap();
    }

    #[test]
    fn served_everywhere_needs_a_certificate_and_every_online_proxy() {
        let info = |cert_state, serving, online| DomainInfo {
            spec: DomainSpec {
                domain: "app.example.com".into(),
                service: "web".into(),
                port: 80,
                passthrough: cert_state == CertState::Passthrough,
            },
            cert_state,
            cert_not_after: None,
            last_error: None,
            proxies_serving: serving,
            proxies_online: online,
        };
        assert!(info(CertState::Valid, 2, 2).served_everywhere());
        assert!(info(CertState::Passthrough, 1, 1).served_everywhere());
        assert!(!info(CertState::Valid, 1, 2).served_everywhere());
        assert!(!info(CertState::Valid, 0, 0).served_everywhere(), "no proxy serves it");
        assert!(!info(CertState::Pending, 2, 2).served_everywhere());
        assert!(!info(CertState::Failed, 2, 2).served_everywhere());
        assert_eq!(info(CertState::Valid, 1, 2).proxies(), "1/2");
        // A control plane that does not count proxies yet: 0/0.
        let old: DomainInfo = serde_json::from_value(serde_json::json!({
            "spec": {"domain": "a.b", "service": "web", "port": 80},
            "cert_state": "valid", "cert_not_after": null, "last_error": null
        }))
        .unwrap();
        assert_eq!(old.proxies(), "0/0");
    }

    #[test]
    fn cert_states_keep_their_strings_and_pad() {
        for (s, text) in [
            (CertState::Pending, "pending"),
            (CertState::Valid, "valid"),
            (CertState::Failed, "failed"),
            (CertState::Passthrough, "passthrough"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), text);
            assert_eq!(s.to_string(), text);
        }
        assert_eq!(format!("[{:<8}]", CertState::Valid), "[valid   ]");
    }
}
