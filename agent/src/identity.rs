//! The node's identity: an Ed25519 signing key and a WireGuard key pair,
//! made on first run and kept 0600 in the data dir. Private keys never
//! leave the node. After registration, `node.json` records who we are.

use anyhow::Context;
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub struct Identity {
    pub signing_key: SigningKey,
    /// WireGuard private key, base64.
    pub wg_private: String,
    /// WireGuard public key, base64.
    pub wg_public: String,
    /// X25519 key the control plane seals this node's secrets to.
    pub sealing: x25519_dalek::StaticSecret,
}

/// What registration told us; written once, read at every start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub node_id: String,
    pub name: String,
    pub url: String,
    pub proxy: bool,
}

pub use berth_protocol::keyfile::write_private;

fn load_or_make(path: &Path) -> anyhow::Result<[u8; 32]> {
    Ok(berth_protocol::keyfile::load_or_create_key(path)?)
}

impl Identity {
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Identity> {
        let signing_key = SigningKey::from_bytes(&load_or_make(&data_dir.join("signing.key"))?);
        let wg = x25519_dalek::StaticSecret::from(load_or_make(&data_dir.join("wireguard.key"))?);
        let public = x25519_dalek::PublicKey::from(&wg);
        let sealing = x25519_dalek::StaticSecret::from(load_or_make(&data_dir.join("sealing.key"))?);
        Ok(Identity {
            signing_key,
            wg_private: B64.encode(wg.to_bytes()),
            wg_public: B64.encode(public.as_bytes()),
            sealing,
        })
    }

    pub fn sealing_public(&self) -> String {
        B64.encode(x25519_dalek::PublicKey::from(&self.sealing).as_bytes())
    }

    pub fn signing_public(&self) -> String {
        B64.encode(self.signing_key.verifying_key().as_bytes())
    }
}

pub fn registration_path(data_dir: &Path) -> PathBuf {
    data_dir.join("node.json")
}

pub fn load_registration(data_dir: &Path) -> anyhow::Result<Option<Registration>> {
    let p = registration_path(data_dir);
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

pub fn save_registration(data_dir: &Path, r: &Registration) -> anyhow::Result<()> {
    Ok(write_private(
        &registration_path(data_dir),
        &serde_json::to_vec_pretty(r)?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.wg_public, b.wg_public);
        assert_eq!(a.signing_public(), b.signing_public());
        for f in ["signing.key", "wireguard.key", "sealing.key"] {
            let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // The public key is the X25519 public key of the private key, as `wg pubkey` computes it.
        let out = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(a.wg_private.as_bytes())?;
                c.wait_with_output()
            });
        if let Ok(out) = out {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), a.wg_public);
        }
    }

    #[test]
    fn corrupt_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("signing.key"), "garbage").unwrap();
        let err = Identity::load_or_create(dir.path()).err().unwrap();
        assert!(err.to_string().contains("signing.key"), "{err}");
    }
}
