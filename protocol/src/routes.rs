//! Public domains and TCP routes, as the API takes and lists them
//! (`/v1/domains`, `/v1/routes/tcp`). What a proxy node is then told to
//! serve is in [`crate::proxy`].

use crate::error::FieldError;
use crate::names::validate_dns_label;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A public domain routed to a service (`berth domain add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    /// Fully qualified host name, lowercase, e.g. `app.example.com`.
    pub domain: String,
    pub service: String,
    /// The service's port inside its containers.
    pub port: u16,
    /// Pass TLS through by SNI to the service (it terminates TLS itself);
    /// no certificate is ordered.
    #[serde(default)]
    pub passthrough: bool,
}

/// A TCP port on every proxy forwarded to a service (`berth route tcp add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRouteSpec {
    pub listen: u16,
    pub service: String,
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
pub struct DomainInfo {
    pub spec: DomainSpec,
    pub cert_state: CertState,
    /// RFC 3339 expiry of the current certificate.
    pub cert_not_after: Option<String>,
    pub last_error: Option<String>,
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
