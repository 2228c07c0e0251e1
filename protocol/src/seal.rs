//! Sealed boxes: secrets encrypted to one node's X25519 public key.
//!
//! The sender makes an ephemeral X25519 key, derives a ChaCha20-Poly1305 key
//! with HKDF-SHA256 over the shared secret and both public keys, and sends
//! `ephemeral public key || nonce || ciphertext`. Only the holder of the
//! node's private key can open it; the control plane cannot, once sealed.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

const INFO: &[u8] = b"berth sealed box v1";

fn cipher(shared: &[u8; 32], eph: &PublicKey, recipient: &PublicKey) -> ChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph.as_bytes());
    salt[32..].copy_from_slice(recipient.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut key = [0u8; 32];
    hk.expand(INFO, &mut key).expect("32 bytes is a valid HKDF length");
    ChaCha20Poly1305::new(Key::from_slice(&key))
}

/// Parses a base64 X25519 public key.
pub fn parse_public(field: &str, b64: &str) -> Result<PublicKey, String> {
    let bytes: [u8; 32] = B64
        .decode(b64)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| format!("{field}: not 32 bytes of base64"))?;
    Ok(PublicKey::from(bytes))
}

/// Seals `plaintext` to `recipient`; returns base64.
pub fn seal(recipient: &PublicKey, plaintext: &[u8]) -> String {
    let eph = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let eph_pub = PublicKey::from(&eph);
    let shared = eph.diffie_hellman(recipient);
    let nonce: [u8; 12] = rand::random();
    let ct = cipher(shared.as_bytes(), &eph_pub, recipient)
        .encrypt(Nonce::from_slice(&nonce), plaintext)
        .expect("ChaCha20-Poly1305 encryption does not fail for in-memory data");
    let mut out = Vec::with_capacity(32 + 12 + ct.len());
    out.extend_from_slice(eph_pub.as_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    B64.encode(out)
}

/// Opens a sealed box with the recipient's private key.
pub fn open(secret: &StaticSecret, sealed_b64: &str) -> Result<Vec<u8>, String> {
    let raw = B64
        .decode(sealed_b64)
        .map_err(|_| "sealed box: not base64".to_string())?;
    if raw.len() < 32 + 12 + 16 {
        return Err("sealed box: too short".into());
    }
    let eph_bytes: [u8; 32] = raw[..32].try_into().expect("length checked");
    let eph = PublicKey::from(eph_bytes);
    let recipient = PublicKey::from(secret);
    let shared = secret.diffie_hellman(&eph);
    cipher(shared.as_bytes(), &eph, &recipient)
        .decrypt(Nonce::from_slice(&raw[32..44]), &raw[44..])
        .map_err(|_| "sealed box: does not open with this node's key".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_only_the_recipient_opens() {
        let node = StaticSecret::from([1u8; 32]);
        let other = StaticSecret::from([2u8; 32]);
        let sealed = seal(&PublicKey::from(&node), b"s3cret");
        assert_eq!(open(&node, &sealed).unwrap(), b"s3cret");
        assert!(open(&other, &sealed).is_err());
        assert!(!sealed.contains("s3cret"));
        // Fresh ephemeral key and nonce every time.
        assert_ne!(sealed, seal(&PublicKey::from(&node), b"s3cret"));
    }

    #[test]
    fn tampering_is_detected() {
        let node = StaticSecret::from([1u8; 32]);
        let sealed = seal(&PublicKey::from(&node), b"value");
        let mut raw = B64.decode(&sealed).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert!(open(&node, &B64.encode(raw)).is_err());
        assert!(open(&node, "AAAA").is_err());
    }
}
