//! Certificates: parsing the PEM pairs from the config, the SNI resolver
//! (which reads the current loaded config, so a reload swaps certificates
//! for new handshakes), TLS-ALPN-01 challenge certificates, and the server
//! config.

use crate::config::LoadedConfig;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
pub const ALPN_ACME: &[u8] = b"acme-tls/1";

/// Parses a PEM chain (leaf first) and PEM private key into a signing pair.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("certificate chain: no CERTIFICATE block".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("private key: {e}"))?;
    let signer = any_supported_type(&key).map_err(|e| format!("private key: {e}"))?;
    let ck = CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(e) => Err(format!("certificate and private key do not match: {e}")),
    }
}

/// A self-signed certificate for `domain` carrying the critical
/// acmeIdentifier extension with SHA-256(`key_authorization`) (RFC 8737).
pub fn alpn_challenge_cert(domain: &str, key_authorization: &str) -> Result<CertifiedKey, String> {
    let digest = Sha256::digest(key_authorization.as_bytes());
    let key = rcgen::KeyPair::generate().map_err(|e| format!("challenge key: {e}"))?;
    let mut params =
        rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(|e| format!("challenge certificate: {e}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("challenge certificate: {e}"))?;
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = any_supported_type(&der).map_err(|e| format!("challenge key: {e}"))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// Exact name first, then a wildcard certificate for the parent domain.
pub fn lookup<'a, V>(map: &'a HashMap<Box<str>, V>, name: &str) -> Option<&'a V> {
    if let Some(v) = map.get(name) {
        return Some(v);
    }
    let (_, parent) = name.split_once('.')?;
    if parent.contains('.') {
        let mut w = String::with_capacity(parent.len() + 2);
        w.push_str("*.");
        w.push_str(parent);
        return map.get(w.as_str());
    }
    None
}

/// Chooses the certificate by SNI from the current loaded config.
#[derive(Debug)]
pub struct Resolver {
    snap: watch::Receiver<Arc<LoadedConfig>>,
}

impl Resolver {
    pub fn new(snap: watch::Receiver<Arc<LoadedConfig>>) -> Self {
        Resolver { snap }
    }

    pub fn resolve_name(&self, name: &str, acme: bool) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let snap = self.snap.borrow();
        if acme {
            // Only a challenge answers acme-tls/1; never the real certificate.
            return snap.alpn01.get(name.as_str()).cloned();
        }
        lookup(&snap.certs, &name).cloned()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        let acme = hello.alpn().is_some_and(|mut a| a.any(|p| p == ALPN_ACME));
        self.resolve_name(name, acme)
    }
}

/// The server config of the HTTPS listener: SNI resolver, ALPN h2,
/// http/1.1 and acme-tls/1 (only ever selected with a challenge certificate).
pub fn server_config(resolver: Arc<Resolver>) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS config: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec(), ALPN_ACME.to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS session tickets: {e}"))?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn self_signed(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn parses_pairs_and_names_errors() {
        let (c, k) = self_signed(&["a.example.com"]);
        certified_key(&c, &k).unwrap();
        let (_, other_key) = self_signed(&["b.example.com"]);
        let e = certified_key(&c, &other_key).unwrap_err();
        assert!(e.contains("do not match"), "{e}");
        assert!(certified_key("junk", &k).unwrap_err().starts_with("certificate chain"));
        assert!(certified_key(&c, "junk").unwrap_err().starts_with("private key"));
    }

    #[test]
    fn challenge_cert_carries_acme_identifier() {
        let ck = alpn_challenge_cert("a.example.com", "token.thumb").unwrap();
        let der = ck.cert[0].as_ref();
        let digest = Sha256::digest(b"token.thumb");
        // OID 1.3.6.1.5.5.7.1.31, critical TRUE, OCTET STRING { OCTET STRING digest }
        let mut want = vec![
            0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f, 0x01, 0x01, 0xff,
        ];
        want.extend_from_slice(&[0x04, 0x22, 0x04, 0x20]);
        want.extend_from_slice(&digest);
        assert!(der.windows(want.len()).any(|w| w == want.as_slice()));
    }

    #[test]
    fn resolver_picks_by_name_wildcard_and_acme() {
        let (c, k) = self_signed(&["a.example.com"]);
        let (wc, wk) = self_signed(&["*.example.org"]);
        let mut snap = LoadedConfig::default();
        snap.certs
            .insert("a.example.com".into(), Arc::new(certified_key(&c, &k).unwrap()));
        snap.certs
            .insert("*.example.org".into(), Arc::new(certified_key(&wc, &wk).unwrap()));
        snap.alpn01.insert(
            "a.example.com".into(),
            Arc::new(alpn_challenge_cert("a.example.com", "x").unwrap()),
        );
        let (tx, rx) = watch::channel(Arc::new(snap));
        let r = Resolver::new(rx);
        let a = r.resolve_name("A.Example.com", false).unwrap();
        assert!(r.resolve_name("b.example.org", false).is_some());
        assert!(r.resolve_name("example.org", false).is_none());
        assert!(r.resolve_name("x.y.example.org", false).is_none());
        assert!(r.resolve_name("unknown.example.com", false).is_none());
        let ch = r.resolve_name("a.example.com", true).unwrap();
        assert_ne!(ch.cert[0], a.cert[0]);
        assert!(
            r.resolve_name("b.example.org", true).is_none(),
            "acme-tls/1 without a challenge"
        );
        // A new loaded config swaps certificates.
        tx.send_replace(Arc::new(LoadedConfig::default()));
        assert!(r.resolve_name("a.example.com", false).is_none());
    }
}
