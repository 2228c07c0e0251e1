//! Node sessions (see [`berth_protocol::session`]): opened by one
//! Ed25519-signed request, then each request is checked with an HMAC and a
//! counter. Held in this process's memory only: a restarted control plane
//! knows none, and its agents open new ones.

use berth_protocol::session::{self, ReplayWindow};
use std::collections::HashMap;
use std::sync::Mutex;

/// A session ends this long after it was opened (the agent opens the next
/// one before).
pub const SESSION_TTL_SECS: i64 = 3600;
/// Sessions a node may hold at once; opening one more ends its oldest.
const PER_NODE: usize = 4;
/// Expired sessions are swept out every this many openings.
const SWEEP_EVERY: u32 = 256;

#[derive(Default)]
pub struct NodeSessions {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Session>,
    /// Each node's session ids, oldest first.
    by_node: HashMap<String, Vec<String>>,
    opened_since_sweep: u32,
}

struct Session {
    node_id: String,
    key: [u8; 32],
    opened_at: i64,
    window: ReplayWindow,
}

/// Why a request's session did not authenticate it.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown, expired or another node's: open a new one.
    Invalid,
    /// The MAC does not verify.
    BadMac,
    /// The counter was seen already (or fell out of the window).
    Replayed,
}

impl NodeSessions {
    /// Opens a session for `node_id`: its id and key.
    pub fn open(&self, node_id: &str, now: i64) -> (String, [u8; 32]) {
        let id = hex::encode(rand::random::<[u8; 16]>());
        let key: [u8; 32] = rand::random();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.opened_since_sweep += 1;
        if inner.opened_since_sweep >= SWEEP_EVERY {
            inner.opened_since_sweep = 0;
            inner.by_id.retain(|_, s| now - s.opened_at < SESSION_TTL_SECS);
            let Inner { by_id, by_node, .. } = &mut *inner;
            by_node.retain(|_, ids| {
                ids.retain(|id| by_id.contains_key(id));
                !ids.is_empty()
            });
        }
        let mine = inner.by_node.entry(node_id.to_string()).or_default();
        let ended: Vec<String> = if mine.len() >= PER_NODE {
            mine.drain(..=mine.len() - PER_NODE).collect()
        } else {
            vec![]
        };
        mine.push(id.clone());
        for old in ended {
            inner.by_id.remove(&old);
        }
        inner.by_id.insert(
            id.clone(),
            Session {
                node_id: node_id.to_string(),
                key,
                opened_at: now,
                window: ReplayWindow::default(),
            },
        );
        (id, key)
    }

    /// Checks a request of session `id` from `node_id`, and spends its counter.
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &self,
        id: &str,
        node_id: &str,
        method: &str,
        path_and_query: &str,
        counter: u64,
        body: &[u8],
        mac: &str,
        now: i64,
    ) -> Result<(), Refusal> {
        let key = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match inner.by_id.get(id) {
                Some(s) if s.node_id == node_id && now - s.opened_at < SESSION_TTL_SECS => s.key,
                _ => return Err(Refusal::Invalid),
            }
        };
        // Outside the lock: a large body takes a while to hash.
        if !session::verify_mac(&key, method, path_and_query, counter, body, mac) {
            return Err(Refusal::BadMac);
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let s = inner.by_id.get_mut(id).ok_or(Refusal::Invalid)?;
        if s.window.accept(counter) {
            Ok(())
        } else {
            Err(Refusal::Replayed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &NodeSessions, id: &str, key: &[u8; 32], node: &str, counter: u64, now: i64) -> Result<(), Refusal> {
        let mac = session::mac(key, "POST", "/v1/agent/status", counter, b"{}");
        s.verify(id, node, "POST", "/v1/agent/status", counter, b"{}", &mac, now)
    }

    #[test]
    fn a_session_authenticates_its_node_once_per_counter() {
        let s = NodeSessions::default();
        let (id, key) = s.open("n1", 1000);
        assert_eq!(check(&s, &id, &key, "n1", 1, 1000), Ok(()));
        assert_eq!(check(&s, &id, &key, "n1", 1, 1000), Err(Refusal::Replayed));
        assert_eq!(check(&s, &id, &key, "n1", 2, 1000), Ok(()));
        assert_eq!(
            check(&s, &id, &key, "n2", 3, 1000),
            Err(Refusal::Invalid),
            "another node's"
        );
        assert_eq!(check(&s, &id, &[0; 32], "n1", 3, 1000), Err(Refusal::BadMac));
        assert_eq!(check(&s, "feed", &key, "n1", 3, 1000), Err(Refusal::Invalid));
        assert_eq!(
            check(&s, &id, &key, "n1", 3, 1000 + SESSION_TTL_SECS),
            Err(Refusal::Invalid),
            "expired"
        );
    }

    #[test]
    fn a_node_holds_at_most_four_sessions() {
        let s = NodeSessions::default();
        let opened: Vec<_> = (0..5).map(|i| s.open("n1", 1000 + i)).collect();
        let (other, other_key) = s.open("n2", 1000);
        assert_eq!(
            check(&s, &opened[0].0, &opened[0].1, "n1", 1, 1010),
            Err(Refusal::Invalid)
        );
        for (id, key) in &opened[1..] {
            assert_eq!(check(&s, id, key, "n1", 1, 1010), Ok(()));
        }
        assert_eq!(check(&s, &other, &other_key, "n2", 1, 1010), Ok(()));
    }

    #[test]
    fn expired_sessions_are_swept() {
        let s = NodeSessions::default();
        for i in 0..SWEEP_EVERY - 1 {
            s.open(&format!("n{i}"), 0);
        }
        assert_eq!(s.inner.lock().unwrap().by_id.len(), SWEEP_EVERY as usize - 1);
        s.open("late", SESSION_TTL_SECS + 1);
        let inner = s.inner.lock().unwrap();
        assert_eq!(inner.by_id.len(), 1, "only the late one is left");
        assert_eq!(inner.by_node.len(), 1);
    }
}
