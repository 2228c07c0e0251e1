//! Node sessions: a cheaper way for an agent to authenticate its requests.
//!
//! An Ed25519 verification costs the control plane tens of microseconds,
//! more than the whole rest of a status report. So the agent signs one
//! request, `POST /v1/agent/session`, and gets back a session: an id and a
//! random 32-byte key sealed to the node's X25519 key ([`crate::seal`]).
//! Each later request carries the session id, a counter and
//! `HMAC-SHA256(key, "berth-session-v1\nMETHOD\nPATH_AND_QUERY\nCOUNTER\n" || body)`.
//!
//! Replay: a counter is accepted once. The agent counts up from 1; requests
//! in flight together may arrive out of order, so the control plane keeps
//! the highest counter seen and a bitmap of the [`REPLAY_WINDOW`] below it
//! ([`ReplayWindow`], as IPsec and WireGuard do). That is 16 bytes per
//! session, where nonces had to be remembered (and stored) one by one.
//!
//! Sessions live in one control-plane process's memory and end after
//! `expires_in_secs`; a restarted control plane knows none, and answers
//! [`crate::ErrorCode::SessionInvalid`], upon which the agent opens a new
//! one and sends the request again.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const HEADER_SESSION: &str = "x-berth-session";
pub const HEADER_COUNTER: &str = "x-berth-counter";
pub const HEADER_MAC: &str = "x-berth-mac";

/// How far below the highest counter seen a request may still arrive: a
/// report waiting seconds for its turn while the same agent sends build
/// logs must still be taken.
pub const REPLAY_WINDOW: u64 = 1024;
const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// The answer to `POST /v1/agent/session`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OpenedSession {
    /// Sent as `x-berth-session` with each request of the session.
    pub id: String,
    /// The 32-byte session key, sealed to the node's sealing key (base64).
    pub key_sealed: String,
    /// The session ends this many seconds after it was opened; open the
    /// next one before.
    pub expires_in_secs: u64,
}

type HmacSha256 = Hmac<Sha256>;

fn keyed(key: &[u8; 32], method: &str, path_and_query: &str, counter: u64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(b"berth-session-v1\n");
    mac.update(method.to_ascii_uppercase().as_bytes());
    mac.update(b"\n");
    mac.update(path_and_query.as_bytes());
    mac.update(b"\n");
    mac.update(counter.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(body);
    mac
}

/// The `x-berth-mac` of a request (hex).
pub fn mac(key: &[u8; 32], method: &str, path_and_query: &str, counter: u64, body: &[u8]) -> String {
    hex::encode(
        keyed(key, method, path_and_query, counter, body)
            .finalize()
            .into_bytes(),
    )
}

/// The three headers of a request in session `id` (with `x-berth-node`).
pub fn headers(
    id: &str,
    key: &[u8; 32],
    method: &str,
    path_and_query: &str,
    counter: u64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    [
        (HEADER_SESSION, id.to_string()),
        (HEADER_COUNTER, counter.to_string()),
        (HEADER_MAC, mac(key, method, path_and_query, counter, body)),
    ]
}

/// Whether `given` (hex) is the request's MAC; compared in constant time.
pub fn verify_mac(key: &[u8; 32], method: &str, path_and_query: &str, counter: u64, body: &[u8], given: &str) -> bool {
    let Ok(given) = hex::decode(given) else { return false };
    keyed(key, method, path_and_query, counter, body)
        .verify_slice(&given)
        .is_ok()
}

/// The counters a session has accepted: the highest, and which of the
/// [`REPLAY_WINDOW`] up to it (a ring of bits indexed by the counter, as
/// WireGuard keeps it; 136 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindow {
    highest: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            highest: 0,
            bits: [0; WORDS],
        }
    }
}

fn slot(counter: u64) -> (usize, u64) {
    let i = counter % REPLAY_WINDOW;
    ((i / 64) as usize, 1 << (i % 64))
}

impl ReplayWindow {
    /// True the first time `counter` is offered, unless it is 0 or has
    /// fallen out of the window.
    pub fn accept(&mut self, counter: u64) -> bool {
        if counter == 0 {
            return false;
        }
        if counter > self.highest {
            // The slots between the old highest and this one are free again.
            if counter - self.highest >= REPLAY_WINDOW {
                self.bits = [0; WORDS];
            } else {
                for c in self.highest + 1..counter {
                    let (w, b) = slot(c);
                    self.bits[w] &= !b;
                }
            }
            self.highest = counter;
            let (w, b) = slot(counter);
            self.bits[w] |= b;
            return true;
        }
        if self.highest - counter >= REPLAY_WINDOW {
            return false;
        }
        let (w, b) = slot(counter);
        if self.bits[w] & b != 0 {
            return false;
        }
        self.bits[w] |= b;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [9; 32];

    #[test]
    fn a_mac_verifies_only_for_its_request() {
        let m = mac(&KEY, "post", "/v1/agent/status", 7, b"{}");
        assert!(verify_mac(&KEY, "POST", "/v1/agent/status", 7, b"{}", &m));
        assert!(!verify_mac(&KEY, "GET", "/v1/agent/status", 7, b"{}", &m));
        assert!(!verify_mac(&KEY, "POST", "/v1/agent/status?x=1", 7, b"{}", &m));
        assert!(!verify_mac(&KEY, "POST", "/v1/agent/status", 8, b"{}", &m));
        assert!(!verify_mac(&KEY, "POST", "/v1/agent/status", 7, b"{ }", &m));
        assert!(!verify_mac(&[8; 32], "POST", "/v1/agent/status", 7, b"{}", &m));
        assert!(!verify_mac(&KEY, "POST", "/v1/agent/status", 7, b"{}", "zz"));
        assert!(!verify_mac(&KEY, "POST", "/v1/agent/status", 7, b"{}", &m[..32]));
    }

    #[test]
    fn each_counter_is_accepted_once() {
        let mut w = ReplayWindow::default();
        assert!(!w.accept(0), "counters start at 1");
        assert!(w.accept(1));
        assert!(!w.accept(1));
        assert!(w.accept(3));
        assert!(w.accept(2), "out of order within the window");
        assert!(!w.accept(2));
        assert!(!w.accept(3));
        assert!(w.accept(3 + REPLAY_WINDOW - 1));
        assert!(!w.accept(3 + REPLAY_WINDOW - 1));
        // 4 is still within the window below the new highest, 2 is not.
        assert!(w.accept(4));
        assert!(!w.accept(2));
        let far = 10 * REPLAY_WINDOW;
        assert!(w.accept(far));
        assert!(!w.accept(far - REPLAY_WINDOW), "fell out of the window");
        assert!(w.accept(far - REPLAY_WINDOW + 1));
        assert!(w.accept(far - 5), "its slot was freed by the jump");
        assert!(!w.accept(far - 5));
    }

    #[test]
    fn a_slot_is_reused_only_once_its_counter_left_the_window() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(5));
        assert!(w.accept(5 + REPLAY_WINDOW - 1));
        assert!(!w.accept(5), "still in the window, and seen");
        assert!(w.accept(5 + REPLAY_WINDOW), "the same slot, a new counter");
        assert!(!w.accept(5 + REPLAY_WINDOW));
        assert!(!w.accept(5), "out of the window now");
        assert!(w.accept(6), "freed when the window moved past it, never seen");
    }

    #[test]
    fn a_long_jump_forgets_the_old_window() {
        let mut w = ReplayWindow::default();
        for c in 1..=10 {
            assert!(w.accept(c));
        }
        assert!(w.accept(10 + REPLAY_WINDOW * 3));
        assert!(!w.accept(10), "far below the window now");
        assert!(w.accept(10 + REPLAY_WINDOW * 3 - 1));
    }
}
