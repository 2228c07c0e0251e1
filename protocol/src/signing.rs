//! Request signing for agent → control plane calls.
//!
//! The agent signs `METHOD\nPATH_AND_QUERY\nSHA256(body)\nTIMESTAMP\nNONCE`
//! with its Ed25519 key. The control plane checks the signature against the
//! key registered for the node, rejects timestamps outside
//! [`MAX_CLOCK_SKEW_SECS`], and rejects a nonce it has already seen.

use crate::error::FieldError;
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

pub const HEADER_NODE: &str = "x-berth-node";
pub const HEADER_TIMESTAMP: &str = "x-berth-timestamp";
pub const HEADER_NONCE: &str = "x-berth-nonce";
pub const HEADER_SIGNATURE: &str = "x-berth-signature";

/// How far a request's timestamp may be from the control plane's clock.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

fn message(method: &str, path_and_query: &str, body: &[u8], timestamp: i64, nonce: &str) -> Vec<u8> {
    format!(
        "{}\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path_and_query,
        hex::encode(Sha256::digest(body)),
        timestamp,
        nonce
    )
    .into_bytes()
}

/// The four headers to attach to a request.
#[derive(Debug, Clone)]
pub struct SignedHeaders {
    pub timestamp: String,
    pub nonce: String,
    pub signature: String,
}

pub fn sign(key: &SigningKey, method: &str, path_and_query: &str, body: &[u8], timestamp: i64) -> SignedHeaders {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let sig = key.sign(&message(method, path_and_query, body, timestamp, &nonce));
    SignedHeaders {
        timestamp: timestamp.to_string(),
        nonce,
        signature: B64.encode(sig.to_bytes()),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("{0}: missing or malformed")]
    Malformed(&'static str),
    #[error("x-berth-timestamp: {0}s away from the control plane's clock (limit {MAX_CLOCK_SKEW_SECS}s)")]
    Stale(i64),
    #[error("x-berth-signature: does not verify")]
    BadSignature,
}

impl VerifyError {
    /// The header the error is about (its message starts with it).
    pub fn header(&self) -> &'static str {
        match self {
            VerifyError::Malformed(h) => h,
            VerifyError::Stale(_) => HEADER_TIMESTAMP,
            VerifyError::BadSignature => HEADER_SIGNATURE,
        }
    }
}

/// Checks signature and freshness. Replay (nonce reuse) is checked by the
/// caller against its store, after this succeeds.
pub fn verify(
    key: &VerifyingKey,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    headers: &SignedHeaders,
    now: i64,
) -> Result<(), VerifyError> {
    let SignedHeaders {
        timestamp,
        nonce,
        signature,
    } = headers;
    let ts: i64 = timestamp
        .parse()
        .map_err(|_| VerifyError::Malformed(HEADER_TIMESTAMP))?;
    if nonce.len() < 16 || nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(VerifyError::Malformed(HEADER_NONCE));
    }
    let sig_bytes: [u8; 64] = B64
        .decode(signature)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or(VerifyError::Malformed(HEADER_SIGNATURE))?;
    if (now - ts).abs() > MAX_CLOCK_SKEW_SECS {
        return Err(VerifyError::Stale(now - ts));
    }
    key.verify(
        &message(method, path_and_query, body, ts, nonce),
        &Signature::from_bytes(&sig_bytes),
    )
    .map_err(|_| VerifyError::BadSignature)
}

/// Parses a base64 Ed25519 verifying key.
pub fn parse_verifying_key(field: &str, b64: &str) -> Result<VerifyingKey, FieldError> {
    let bytes: [u8; 32] = B64
        .decode(b64)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| FieldError::new(field, "not 32 bytes of base64"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| FieldError::new(field, "not a valid Ed25519 key"))
}

/// Checks that a WireGuard key is 32 bytes of base64.
pub fn validate_wg_key(field: &str, b64: &str) -> Result<(), FieldError> {
    match B64.decode(b64) {
        Ok(v) if v.len() == 32 => Ok(()),
        _ => Err(FieldError::new(field, "not 32 bytes of base64")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn check(h: &SignedHeaders, method: &str, path: &str, body: &[u8], now: i64) -> Result<(), VerifyError> {
        verify(&key().verifying_key(), method, path, body, h, now)
    }

    #[test]
    fn signed_request_verifies() {
        let h = sign(&key(), "POST", "/v1/x?a=1", b"{}", 1000);
        assert_eq!(check(&h, "POST", "/v1/x?a=1", b"{}", 1000), Ok(()));
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let h = sign(&key(), "POST", "/v1/x?a=1", b"{}", 1000);
        assert_eq!(
            check(&h, "GET", "/v1/x?a=1", b"{}", 1000),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            check(&h, "POST", "/v1/x?a=2", b"{}", 1000),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            check(&h, "POST", "/v1/x?a=1", b"{ }", 1000),
            Err(VerifyError::BadSignature)
        );
        let mut other_nonce = h.clone();
        other_nonce.nonce = "00".repeat(16);
        assert_eq!(
            check(&other_nonce, "POST", "/v1/x?a=1", b"{}", 1000),
            Err(VerifyError::BadSignature)
        );
        let other_key = SigningKey::from_bytes(&[8u8; 32]);
        let h2 = sign(&other_key, "POST", "/v1/x?a=1", b"{}", 1000);
        assert_eq!(
            check(&h2, "POST", "/v1/x?a=1", b"{}", 1000),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn stale_timestamps_are_rejected() {
        let h = sign(&key(), "GET", "/v1/x", b"", 1000);
        assert!(matches!(
            check(&h, "GET", "/v1/x", b"", 1000 + MAX_CLOCK_SKEW_SECS + 1),
            Err(VerifyError::Stale(_))
        ));
        assert!(matches!(
            check(&h, "GET", "/v1/x", b"", 1000 - MAX_CLOCK_SKEW_SECS - 1),
            Err(VerifyError::Stale(_))
        ));
        assert_eq!(check(&h, "GET", "/v1/x", b"", 1000 + MAX_CLOCK_SKEW_SECS), Ok(()));
    }

    #[test]
    fn malformed_headers_name_the_header() {
        let mut h = sign(&key(), "GET", "/v1/x", b"", 1000);
        h.signature = "!!".into();
        assert_eq!(
            check(&h, "GET", "/v1/x", b"", 1000),
            Err(VerifyError::Malformed(HEADER_SIGNATURE))
        );
        h.timestamp = "soon".into();
        assert_eq!(
            check(&h, "GET", "/v1/x", b"", 1000),
            Err(VerifyError::Malformed(HEADER_TIMESTAMP))
        );
        for e in [
            VerifyError::Malformed(HEADER_NONCE),
            VerifyError::Stale(400),
            VerifyError::BadSignature,
        ] {
            assert!(e.to_string().starts_with(&format!("{}: ", e.header())), "{e}");
        }
    }
}
