//! The control plane's TLS: a CA made on first start (kept in the data dir)
//! and a server certificate issued from it at every start, so new names
//! given with --san take effect on restart. Operators may bring their own
//! certificate instead.

use anyhow::{anyhow, Context};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Tls {
    pub server_config: Arc<rustls::ServerConfig>,
    /// The trust anchor agents pin: PEM and SHA-256 of its DER.
    pub ca_pem: String,
    pub ca_hash: String,
    /// The server chain and its key as PEM, for the fleet registry, which
    /// serves the same names with the same certificate.
    pub chain_pem: String,
    pub key_pem: String,
}

pub struct OwnCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed `cert`; when absent the last certificate of the chain is pinned.
    pub ca: Option<PathBuf>,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Berth control plane CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

pub use berth_protocol::keyfile::write_private;

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Loads the CA from `data_dir` (making it on first start) and issues the
/// server certificate for `sans`.
pub fn generated(data_dir: &Path, sans: &[String]) -> anyhow::Result<Tls> {
    let ca_cert_path = data_dir.join("ca.pem");
    let ca_key_path = data_dir.join("ca.key");
    let (ca_key, ca_pem) = if ca_key_path.exists() && ca_cert_path.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path)?)
            .with_context(|| format!("reading {}", ca_key_path.display()))?;
        (key, std::fs::read_to_string(&ca_cert_path)?)
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&ca_cert_path, cert.pem())?;
        tracing::info!(path = %ca_cert_path.display(), "created the control plane's CA");
        (key, cert.pem())
    };
    // An issuer object with the CA's name and key; the signature it makes
    // verifies against the CA certificate on disk.
    let issuer = ca_params().self_signed(&ca_key)?;
    let ca_der = pem_certs(ca_pem.as_bytes())?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("ca.pem is empty"))?;

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(h.trim().to_string());
    }
    for s in sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Berth control plane");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate()?;
    let leaf = params.signed_by(&leaf_key, &issuer, &ca_key)?;
    let chain_pem = format!("{}{}", leaf.pem(), pem_encode(&ca_der));
    let chain = vec![leaf.der().clone(), ca_der.clone()];
    let key_pem = leaf_key.serialize_pem();
    let key = PrivateKeyDer::try_from(leaf_key.serialize_der()).map_err(|e| anyhow!("{e}"))?;
    Ok(Tls {
        server_config: server_config(chain, key)?,
        ca_hash: berth_protocol::token::ca_hash(&ca_der),
        ca_pem,
        chain_pem,
        key_pem,
    })
}

/// Uses an operator's own certificate.
pub fn own(c: &OwnCert) -> anyhow::Result<Tls> {
    let chain = pem_certs(&std::fs::read(&c.cert).with_context(|| format!("--tls-cert {}", c.cert.display()))?)?;
    let key_pem = std::fs::read(&c.key).with_context(|| format!("--tls-key {}", c.key.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())?
        .ok_or_else(|| anyhow!("--tls-key: no private key in {}", c.key.display()))?;
    let anchor = match &c.ca {
        Some(p) => pem_certs(&std::fs::read(p).with_context(|| format!("--tls-ca {}", p.display()))?)?
            .pop()
            .ok_or_else(|| anyhow!("--tls-ca: no certificate in {}", p.display()))?,
        None => chain
            .last()
            .cloned()
            .ok_or_else(|| anyhow!("--tls-cert: no certificate"))?,
    };
    let ca_pem = pem_encode(&anchor);
    let chain_pem: String = chain.iter().map(|c| pem_encode(c)).collect();
    Ok(Tls {
        server_config: server_config(chain, key)?,
        ca_hash: berth_protocol::token::ca_hash(&anchor),
        ca_pem,
        chain_pem,
        key_pem: String::from_utf8_lossy(&key_pem).into_owned(),
    })
}

fn pem_certs(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    rustls_pemfile::certs(&mut &*pem)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing PEM certificates")
}

fn pem_encode(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_survives_restart_and_hash_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = generated(dir.path(), &["cp.example".into()]).unwrap();
        let b = generated(dir.path(), &["198.18.0.1".into()]).unwrap();
        assert_eq!(a.ca_hash, b.ca_hash);
        assert_eq!(a.ca_pem, b.ca_pem);
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
