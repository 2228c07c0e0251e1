//! Dashboard sign-in: password hashing (Argon2id), the session cookie, and
//! the in-memory limit on failed sign-ins. The routes are in
//! [`crate::api::session`] and [`crate::api::users`]; the cookie is checked
//! on admin routes by [`crate::auth::admin_only`].

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use berth_protocol::user::SESSION_COOKIE;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failed sign-ins allowed per address and per user name within [`WINDOW`].
pub const MAX_FAILURES: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(5 * 60);
/// Every failed sign-in takes at least this long from the request's start,
/// so the time it takes says nothing about why it failed.
pub const FAILURE_PADDING: Duration = Duration::from_millis(400);
pub const DEFAULT_TTL: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How long a session lasts after sign-in (`--session-ttl`).
    pub ttl: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { ttl: DEFAULT_TTL }
    }
}

/// The sign-in state the control plane keeps in memory.
pub struct Sessions {
    pub config: SessionConfig,
    limiter: std::sync::Mutex<Limiter>,
    /// A hash of no one's password: verified against when the user is
    /// unknown or a token was given, so every sign-in costs one Argon2 run.
    dummy_hash: tokio::sync::OnceCell<String>,
}

impl Sessions {
    pub fn new(config: SessionConfig) -> Sessions {
        Sessions {
            config,
            limiter: Default::default(),
            dummy_hash: Default::default(),
        }
    }

    /// The limiter, even after a panic elsewhere held its lock.
    pub fn limiter(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn dummy_hash(&self) -> &str {
        self.dummy_hash
            .get_or_init(|| async {
                let random = hex::encode(rand::random::<[u8; 16]>());
                let h = tokio::task::spawn_blocking(move || hash_password(&random)).await;
                // Unreachable in practice; an unparsable hash still costs a parse, not a panic.
                h.ok().and_then(Result::ok).unwrap_or_default()
            })
            .await
    }
}

/// What failures are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Ip(IpAddr),
    User(String),
}

/// Failed sign-ins per [`Key`] within the last [`WINDOW`].
#[derive(Default)]
pub struct Limiter {
    failures: HashMap<Key, VecDeque<Instant>>,
}

impl Limiter {
    /// When `key` may try again, if it is refused now: once it has
    /// [`MAX_FAILURES`] failures in the window, until the oldest leaves it.
    pub fn refused_until(&mut self, key: &Key, now: Instant) -> Option<Instant> {
        let q = self.failures.get_mut(key)?;
        while q.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            q.pop_front();
        }
        if q.is_empty() {
            self.failures.remove(key);
            return None;
        }
        (q.len() >= MAX_FAILURES).then(|| q[q.len() - MAX_FAILURES] + WINDOW)
    }

    /// Counts a sign-in against every key before its outcome is known, so
    /// parallel attempts cannot all pass the check; or, when a key is
    /// already refused, when the last of them may try again.
    pub fn attempt(&mut self, keys: &[Key], now: Instant) -> Result<(), Instant> {
        if let Some(until) = keys.iter().filter_map(|k| self.refused_until(k, now)).max() {
            return Err(until);
        }
        for k in keys {
            self.failed(k.clone(), now);
        }
        Ok(())
    }

    /// Takes back what [`Limiter::attempt`] counted at `at`: it succeeded.
    pub fn succeeded(&mut self, keys: &[Key], at: Instant) {
        for k in keys {
            if let Some(q) = self.failures.get_mut(k) {
                if let Some(i) = q.iter().rposition(|t| *t == at) {
                    q.remove(i);
                }
                if q.is_empty() {
                    self.failures.remove(k);
                }
            }
        }
    }

    pub fn failed(&mut self, key: Key, now: Instant) {
        // Forget keys whose failures have all left the window, so the map
        // stays as small as the last five minutes' failures.
        if self.failures.len() > 10_000 {
            self.failures
                .retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < WINDOW));
        }
        let q = self.failures.entry(key).or_default();
        q.push_back(now);
        // Only the last MAX_FAILURES matter.
        while q.len() > MAX_FAILURES {
            q.pop_front();
        }
    }
}

/// An Argon2id PHC string of `password` with a random salt (slow: call it
/// off the async threads).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Ok(Argon2::default().hash_password(password.as_bytes(), &salt)?.to_string())
}

/// Whether `password` matches the PHC string `hash` (slow, as hashing).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A new cookie secret (32 random bytes, hex) and the id it is stored under.
pub fn new_secret() -> (String, String) {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let id = session_id(&secret);
    (secret, id)
}

/// The store id of the session a cookie's secret opens.
pub fn session_id(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The `__Host-berth_session` cookie's value among the request's `Cookie` headers.
pub fn cookie(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// The Set-Cookie value of a session: script-proof, HTTPS only, never sent
/// with a cross-site request.
pub fn set_cookie(secret: &str, ttl: Duration) -> String {
    format!(
        "{SESSION_COOKIE}={secret}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={}",
        ttl.as_secs()
    )
}

/// The Set-Cookie value that makes the browser drop the session cookie.
pub fn clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0")
}

/// Equality whose time does not depend on where two strings differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a WebSocket's `Origin` (`https://host[:port]`) is the `host`
/// (`host[:port]`) it was sent to; a missing port is the scheme's default.
pub fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        "http" => 80,
        _ => return false,
    };
    let split = |a: &str| -> Option<(String, u16)> {
        // An IPv6 literal keeps its brackets; the port is after the last ':' past them.
        let after_bracket = a.rfind(']').map_or(0, |i| i + 1);
        match a[after_bracket..].rfind(':') {
            Some(i) => {
                let at = after_bracket + i;
                Some((a[..at].to_ascii_lowercase(), a[at + 1..].parse().ok()?))
            }
            None => Some((a.to_ascii_lowercase(), default)),
        }
    };
    match (split(authority), split(host)) {
        (Some(o), Some(h)) => !o.0.is_empty() && o == h,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_in_the_window_refuse_until_the_oldest_leaves_it() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let ip = Key::Ip("192.0.2.1".parse().unwrap());
        let other = Key::User("alice".into());
        for i in 0..MAX_FAILURES as u64 {
            assert_eq!(l.refused_until(&ip, t0 + Duration::from_secs(i)), None);
            l.failed(ip.clone(), t0 + Duration::from_secs(i));
        }
        let now = t0 + Duration::from_secs(10);
        assert_eq!(l.refused_until(&ip, now), Some(t0 + WINDOW));
        assert_eq!(l.refused_until(&other, now), None, "keys are counted apart");
        // The first failure leaves the window: four remain, one more try.
        assert_eq!(l.refused_until(&ip, t0 + WINDOW), None);
        l.failed(ip.clone(), t0 + WINDOW);
        assert_eq!(
            l.refused_until(&ip, t0 + WINDOW),
            Some(t0 + Duration::from_secs(1) + WINDOW)
        );
        // All gone after a quiet window.
        assert_eq!(l.refused_until(&ip, t0 + WINDOW * 3), None);
        assert!(l.failures.is_empty());
    }

    #[test]
    fn attempts_count_until_they_succeed_so_parallel_ones_cannot_all_pass() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let keys = [Key::Ip("192.0.2.1".parse().unwrap()), Key::User("alice".into())];
        // Five in flight at once: a sixth is refused before any has failed.
        for i in 0..MAX_FAILURES as u64 {
            assert_eq!(l.attempt(&keys, t0 + Duration::from_millis(i)), Ok(()));
        }
        assert_eq!(l.attempt(&keys, t0 + Duration::from_secs(1)), Err(t0 + WINDOW));
        // One of them succeeds: it no longer counts, for either key.
        l.succeeded(&keys, t0 + Duration::from_millis(2));
        assert_eq!(l.attempt(&keys[1..], t0 + Duration::from_secs(2)), Ok(()));
        assert!(l.attempt(&keys[..1], t0 + Duration::from_secs(2)).is_ok());
        assert!(l.attempt(&keys[..1], t0 + Duration::from_secs(3)).is_err());
        // A success takes back only its own attempt.
        let other = [Key::User("bob".into())];
        assert_eq!(l.attempt(&other, t0), Ok(()));
        l.succeeded(&other, t0);
        assert!(!l.failures.contains_key(&other[0]));
    }

    #[test]
    fn passwords_hash_with_salt_and_verify() {
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "salted");
        assert!(verify_password("correct horse", &a));
        assert!(!verify_password("correct hors", &a));
        assert!(!verify_password("correct horse", "not a hash"));
    }

    #[test]
    fn the_cookie_is_found_among_others_and_ids_are_hashes() {
        let mut h = axum::http::HeaderMap::new();
        h.append("cookie", "a=1; __Host-berth_session=abc ; b=2".parse().unwrap());
        assert_eq!(cookie(&h), Some("abc"));
        let mut other = axum::http::HeaderMap::new();
        other.append("cookie", "x_berth_session=abc".parse().unwrap());
        assert_eq!(cookie(&other), None);
        let (secret, id) = new_secret();
        assert_eq!((secret.len(), id.len()), (64, 64));
        assert_ne!(secret, id);
        assert_eq!(session_id(&secret), id);
    }

    #[test]
    fn origins_match_their_host_only() {
        assert!(same_origin("https://cp.example:7443", "cp.example:7443"));
        assert!(same_origin("https://CP.example", "cp.example"));
        assert!(same_origin("https://cp.example", "cp.example:443"));
        assert!(same_origin("https://[::1]:7443", "[::1]:7443"));
        assert!(!same_origin("https://evil.example:7443", "cp.example:7443"));
        assert!(!same_origin("https://cp.example:7444", "cp.example:7443"));
        assert!(!same_origin("null", "cp.example:7443"));
        assert!(!same_origin("https://", ""));
    }
}
