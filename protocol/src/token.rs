//! Join tokens: `berth1.<id>.<secret>.<ca-hash>`.
//!
//! The id names the token in the store, the secret proves possession (only
//! its SHA-256 is stored), and the CA hash is the SHA-256 of the control
//! plane's CA certificate (DER), so a new agent can verify the control plane
//! on first contact without `--insecure`, like kubeadm's discovery hash.

use rand::{distributions::Alphanumeric, Rng};
use sha2::{Digest, Sha256};

const PREFIX: &str = "berth1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    /// Lowercase hex SHA-256 of the CA certificate, DER.
    pub ca_hash: String,
}

impl JoinToken {
    pub fn generate(ca_hash: &str) -> JoinToken {
        let mut rng = rand::thread_rng();
        let mut word = |n: usize| -> String {
            (&mut rng)
                .sample_iter(&Alphanumeric)
                .take(n)
                .map(|c| (c as char).to_ascii_lowercase())
                .collect()
        };
        JoinToken {
            id: word(8),
            secret: word(32),
            ca_hash: ca_hash.to_string(),
        }
    }

    pub fn parse(s: &str) -> Result<JoinToken, String> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        if parts.len() != 4 || parts[0] != PREFIX {
            return Err("token: malformed (expected berth1.<id>.<secret>.<ca-hash>)".into());
        }
        let alnum = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !alnum(parts[1], 8) {
            return Err("token: malformed id".into());
        }
        if !alnum(parts[2], 32) {
            return Err("token: malformed secret".into());
        }
        if parts[3].len() != 64 || !parts[3].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("token: malformed CA hash".into());
        }
        Ok(JoinToken {
            id: parts[1].into(),
            secret: parts[2].into(),
            ca_hash: parts[3].to_ascii_lowercase(),
        })
    }

    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_hash)
    }
}

/// SHA-256 of a DER certificate, lowercase hex: the CA hash carried in tokens.
pub fn ca_hash(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let t = JoinToken::generate(&ca_hash(b"ca"));
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
    }

    #[test]
    fn rejects_malformed() {
        let good = JoinToken::generate(&ca_hash(b"ca")).to_string();
        let cases = [
            String::new(),
            good.replacen("berth1", "berth2", 1),
            good[..good.len() - 1].to_string(),
            good.replace('.', "-"),
            format!("{good}.x"),
        ];
        for bad in cases {
            assert!(JoinToken::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_differ() {
        let a = JoinToken::generate("00");
        let b = JoinToken::generate("00");
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.secret_hash(), b.secret_hash());
    }
}
