//! `berth release`: the Ed25519 release key and signed builds, laid out as
//! the control plane serves them (see control-plane/src/releases.rs):
//! `DIR/release.pub`, `DIR/latest`, `DIR/VERSION/{manifest,manifest.sig,FILES}`.
//!
//! The manifest is in `sha256sum` format and its signature is a raw 64-byte
//! Ed25519 signature, so a node checks both with coreutils and
//! `openssl pkeyutl -verify -rawin`, no Berth code involved.

use anyhow::{bail, Context};
use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Makes a release key: `out` (private, PKCS#8 PEM, 0600) and `out.pub`.
pub fn keygen(out: &Path) -> anyhow::Result<PathBuf> {
    if out.exists() {
        bail!("--out: {} exists; not overwriting a release key", out.display());
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key.to_pkcs8_pem(LineEnding::LF).context("encoding the key")?;
    write_private(out, pem.as_bytes())?;
    let public = public_pem(&key)?;
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    std::fs::write(&pub_path, public).with_context(|| format!("writing {}", pub_path.display()))?;
    Ok(pub_path)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

fn public_pem(key: &SigningKey) -> anyhow::Result<String> {
    key.verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .context("encoding the public key")
}

pub fn load_key(path: &Path) -> anyhow::Result<SigningKey> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("--key {}", path.display()))?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| anyhow::anyhow!("--key {}: not an Ed25519 PKCS#8 key: {e}", path.display()))
}

#[derive(Debug)]
pub struct Signed {
    pub dir: PathBuf,
    pub files: Vec<String>,
}

/// Copies `binaries` into `dir/version/` as `NAME-linux-ARCH`, adds them to
/// the version's manifest (other architectures already there stay), signs
/// it, and makes the version the latest unless `latest` is false.
pub fn sign(
    key: &SigningKey,
    dir: &Path,
    version: &str,
    arch: &str,
    binaries: &[PathBuf],
    latest: bool,
) -> anyhow::Result<Signed> {
    if !berth_protocol::names::valid_version(version) {
        bail!("--version: {version:?} is not a version name (letters, digits, . + - _; at most 64)");
    }
    if binaries.is_empty() {
        bail!("BINARY: give at least one file to sign (e.g. target/release/berth-agent)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("--dir {}", dir.display()))?;
    let public = public_pem(key)?;
    let pub_path = dir.join("release.pub");
    match std::fs::read_to_string(&pub_path) {
        Ok(existing) if existing.trim() != public.trim() => bail!(
            "--key: {} holds another release key; nodes pinned that one and would refuse these builds",
            pub_path.display()
        ),
        Ok(_) => {}
        Err(_) => std::fs::write(&pub_path, &public)?,
    }
    let vdir = dir.join(version);
    std::fs::create_dir_all(&vdir)?;
    let mut manifest: BTreeMap<String, String> = std::fs::read_to_string(vdir.join("manifest"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (sum, name) = l.split_once("  ")?;
            Some((name.to_string(), sum.to_string()))
        })
        .collect();
    let mut files = vec![];
    for bin in binaries {
        let base = bin
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("BINARY {}: no file name", bin.display()))?;
        let bytes = std::fs::read(bin).with_context(|| format!("BINARY {}", bin.display()))?;
        let name = format!("{base}-linux-{arch}");
        let tmp = vdir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, vdir.join(&name))?;
        manifest.insert(name.clone(), hex::encode(Sha256::digest(&bytes)));
        files.push(name);
    }
    let text: String = manifest.iter().map(|(name, sum)| format!("{sum}  {name}\n")).collect();
    let sig = key.sign(text.as_bytes());
    // Signature first: a reader never sees a new manifest with an old signature
    // for long, and a mismatch is refused, not trusted.
    std::fs::write(vdir.join("manifest.sig.tmp"), sig.to_bytes())?;
    std::fs::write(vdir.join("manifest.tmp"), &text)?;
    std::fs::rename(vdir.join("manifest.sig.tmp"), vdir.join("manifest.sig"))?;
    std::fs::rename(vdir.join("manifest.tmp"), vdir.join("manifest"))?;
    if latest {
        std::fs::write(dir.join("latest.tmp"), format!("{version}\n"))?;
        std::fs::rename(dir.join("latest.tmp"), dir.join("latest"))?;
    }
    Ok(Signed { dir: vdir, files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::DecodePublicKey;
    use ed25519_dalek::{Signature, VerifyingKey};

    #[test]
    fn signs_a_manifest_that_verifies_and_keeps_other_arches() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("release.key");
        let pub_path = keygen(&key_path).unwrap();
        assert!(keygen(&key_path).is_err(), "never overwrites a key");
        let key = load_key(&key_path).unwrap();
        let bin = dir.path().join("berth-agent");
        std::fs::write(&bin, b"build one").unwrap();
        let out = dir.path().join("releases");
        sign(&key, &out, "1.0.0", "amd64", std::slice::from_ref(&bin), true).unwrap();
        std::fs::write(&bin, b"build two").unwrap();
        sign(&key, &out, "1.0.0", "arm64", &[bin], false).unwrap();

        let manifest = std::fs::read(out.join("1.0.0/manifest")).unwrap();
        let text = String::from_utf8(manifest.clone()).unwrap();
        assert!(text.contains(&format!(
            "{}  berth-agent-linux-amd64\n",
            hex::encode(Sha256::digest(b"build one"))
        )));
        assert!(text.contains(&format!(
            "{}  berth-agent-linux-arm64\n",
            hex::encode(Sha256::digest(b"build two"))
        )));
        let sig = Signature::from_slice(&std::fs::read(out.join("1.0.0/manifest.sig")).unwrap()).unwrap();
        let public = VerifyingKey::from_public_key_pem(&std::fs::read_to_string(pub_path).unwrap()).unwrap();
        public.verify_strict(&manifest, &sig).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "1.0.0\n");
        assert_eq!(
            std::fs::read_to_string(out.join("release.pub")).unwrap(),
            public_pem(&key).unwrap()
        );

        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        let e = sign(&other, &out, "1.0.1", "amd64", &[dir.path().join("berth-agent")], true).unwrap_err();
        assert!(e.to_string().contains("another release key"), "{e}");
        let e = sign(&key, &out, "../1", "amd64", &[dir.path().join("berth-agent")], true).unwrap_err();
        assert!(e.to_string().starts_with("--version"), "{e}");
    }
}
