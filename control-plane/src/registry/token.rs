//! Bearer tokens for the fleet registry. Distribution answers a request
//! without one with `401 WWW-Authenticate: Bearer realm=...,service=...,
//! scope=repository:NAME:pull`; the client fetches a token from the realm
//! (the control plane's `/v1/registry/token`), which checks who it is and
//! signs a JWT granting only what that caller may do. The registry verifies
//! the signature against the certificate in its `rootcertbundle`, found
//! through the token's `x5c` header.

use anyhow::Context;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;
use std::path::Path;

/// The `service` the registry is configured with and asks tokens for.
pub const SERVICE: &str = "berth-registry";
/// The `issuer` the registry accepts.
pub const ISSUER: &str = "berth-control-plane";
/// How long a token is good for.
pub const TTL_SECS: i64 = 300;

/// One entry of a token request's `scope`: `repository:NAME:pull,push`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Access {
    /// Parses `TYPE:NAME:ACTIONS`. A repository name has no colon, but
    /// other resource names may (`registry:catalog:*`), so the type is cut
    /// at the first colon and the actions at the last.
    pub fn parse(scope: &str) -> Result<Access, String> {
        let (kind, rest) = scope
            .split_once(':')
            .ok_or_else(|| format!("scope: {scope:?} is not TYPE:NAME:ACTIONS"))?;
        let (name, actions) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("scope: {scope:?} is not TYPE:NAME:ACTIONS"))?;
        if kind.is_empty() || name.is_empty() {
            return Err(format!("scope: {scope:?} is not TYPE:NAME:ACTIONS"));
        }
        Ok(Access {
            kind: kind.into(),
            name: name.into(),
            actions: actions.split(',').filter(|a| !a.is_empty()).map(String::from).collect(),
        })
    }
}

/// Who asks for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin token: everything.
    Admin,
    /// A node's own credentials: pull only.
    Node { name: String },
    /// A running build's credentials: push (and pull) on its service's
    /// repository, pull on the others (base images).
    Build { id: u64, repository: String },
}

impl Caller {
    pub fn subject(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Node { name } => format!("node:{name}"),
            Caller::Build { id, .. } => format!("build:{id}"),
        }
    }

    /// What of `asked` this caller gets: the admin all of it, a node
    /// `pull` on repositories and nothing else. An entry left with no
    /// action is dropped (the registry then refuses that request).
    pub fn grant(&self, asked: &[Access]) -> Vec<Access> {
        asked
            .iter()
            .filter_map(|a| {
                let actions: Vec<String> = match self {
                    Caller::Admin => a.actions.clone(),
                    Caller::Build { repository, .. } if a.kind == "repository" && &a.name == repository => a
                        .actions
                        .iter()
                        .filter(|x| *x == "pull" || *x == "push")
                        .cloned()
                        .collect(),
                    Caller::Node { .. } | Caller::Build { .. } if a.kind == "repository" => {
                        a.actions.iter().filter(|x| *x == "pull").cloned().collect()
                    }
                    Caller::Node { .. } | Caller::Build { .. } => vec![],
                };
                (!actions.is_empty()).then(|| Access { actions, ..a.clone() })
            })
            .collect()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    nbf: i64,
    iat: i64,
    jti: String,
    access: &'a [Access],
}

/// The token signing key (ECDSA P-256) and its self-signed certificate,
/// which is the registry's whole `rootcertbundle`.
pub struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    pub cert_pem: String,
}

impl Signer {
    /// Loads `token.key` and `token.pem` from `dir`, making them on first use.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Signer> {
        let key_path = dir.join("token.key");
        let cert_path = dir.join("token.pem");
        let (key, cert_pem) = if key_path.exists() && cert_path.exists() {
            let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key_path)?)
                .with_context(|| format!("reading {}", key_path.display()))?;
            (key, std::fs::read_to_string(&cert_path)?)
        } else {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = rcgen::CertificateParams::new(vec!["berth-registry-token".to_string()])?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "Berth registry token signer");
            let cert = params.self_signed(&key)?;
            crate::tls::write_private(&key_path, key.serialize_pem().as_bytes())?;
            std::fs::write(&cert_path, cert.pem())?;
            (key, cert.pem())
        };
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .context("token.pem holds no certificate")??
            .to_vec();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("token.key is not an ECDSA P-256 key: {e}"))?;
        Ok(Signer {
            key,
            cert_der,
            cert_pem,
        })
    }

    /// A signed JWT for `subject` granting `access`, valid from `now`
    /// (Unix seconds) for [`TTL_SECS`].
    pub fn sign(&self, subject: &str, access: &[Access], now: i64) -> anyhow::Result<String> {
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [STANDARD.encode(&self.cert_der)],
        });
        let claims = Claims {
            iss: ISSUER,
            sub: subject,
            aud: SERVICE,
            exp: now + TTL_SECS,
            // A little slack for clocks that differ between the hosts.
            nbf: now - 10,
            iat: now,
            jti: hex::encode(rand::random::<[u8; 16]>()),
            access,
        };
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing the registry token failed"))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }

    /// The public key, for tests that check a signature.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn scopes_parse_and_bad_ones_name_the_field() {
        let a = Access::parse("repository:berth/demo:pull,push").unwrap();
        assert_eq!((a.kind.as_str(), a.name.as_str()), ("repository", "berth/demo"));
        assert_eq!(a.actions, ["pull", "push"]);
        let c = Access::parse("registry:catalog:*").unwrap();
        assert_eq!(
            (c.kind.as_str(), c.name.as_str(), c.actions.as_slice()),
            ("registry", "catalog", &["*".to_string()][..])
        );
        for bad in ["", "repository", "repository:demo", ":demo:pull", "repository::pull"] {
            let e = Access::parse(bad).unwrap_err();
            assert!(e.starts_with("scope: "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn nodes_get_pull_only_and_the_admin_everything() {
        let asked = vec![
            Access::parse("repository:demo:pull,push").unwrap(),
            Access::parse("repository:other:push").unwrap(),
            Access::parse("registry:catalog:*").unwrap(),
        ];
        let node = Caller::Node { name: "n1".into() }.grant(&asked);
        assert_eq!(node, vec![Access::parse("repository:demo:pull").unwrap()]);
        assert_eq!(Caller::Admin.grant(&asked), asked);
    }

    #[test]
    fn tokens_are_signed_jwts_with_the_certificate_and_the_grant() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::load_or_create(dir.path()).unwrap();
        let again = Signer::load_or_create(dir.path()).unwrap();
        assert_eq!(signer.cert_pem, again.cert_pem, "the key survives a restart");
        let access = vec![Access::parse("repository:demo:pull").unwrap()];
        let jwt = signer.sign("node:n1", &access, 1_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(
            STANDARD.decode(header["x5c"][0].as_str().unwrap()).unwrap(),
            signer.cert_der
        );
        let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["iss"], ISSUER);
        assert_eq!(claims["aud"], SERVICE);
        assert_eq!(claims["sub"], "node:n1");
        assert_eq!(claims["exp"], 1_000_000 + TTL_SECS);
        assert_eq!(claims["access"][0]["type"], "repository");
        assert_eq!(claims["access"][0]["actions"][0], "pull");
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let input = format!("{}.{}", parts[0], parts[1]);
        let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, signer.public_key());
        key.verify(input.as_bytes(), &sig).expect("the signature verifies");
        let mut forged = sig.clone();
        forged[0] ^= 1;
        assert!(key.verify(input.as_bytes(), &forged).is_err());
    }

    #[test]
    fn a_build_pushes_only_to_its_own_repository() {
        let b = Caller::Build {
            id: 7,
            repository: "site".into(),
        };
        let asked = [
            Access::parse("repository:site:pull,push").unwrap(),
            Access::parse("repository:base:pull,push").unwrap(),
            Access::parse("repository:site-other:push").unwrap(),
            Access::parse("registry:catalog:*").unwrap(),
        ];
        let got = b.grant(&asked);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            (got[0].name.as_str(), got[0].actions.as_slice()),
            ("site", &["pull".to_string(), "push".to_string()][..])
        );
        assert_eq!(
            (got[1].name.as_str(), got[1].actions.as_slice()),
            ("base", &["pull".to_string()][..])
        );
        assert_eq!(b.subject(), "build:7");
    }
}
