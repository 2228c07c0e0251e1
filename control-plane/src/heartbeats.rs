//! The status-report hot path. Most reports say nothing new but a later
//! time and, after each change, the revision the node applied: same
//! version, errors, served domains and container states. Such a report is
//! answered from memory, and its time and applied revision are written
//! behind to the store with everyone else's, in one statement per batch:
//! within [`APPLIED_EVERY`] when an applied revision moved (rollouts wait
//! for those, and are woken after the write), else within [`SEEN_EVERY`].
//! A report that says anything else new takes the full path, which writes
//! it at once, with its fingerprint.
//!
//! Several control planes may share a PostgreSQL store, and one of them
//! cannot tell from its own memory that the report it last recorded is the
//! last the store holds. So a time is written behind only where the store
//! still holds the fingerprint of the report it repeats. Where another
//! report was recorded since, nothing is written, the memory forgets the
//! node, and its next report takes the full path (within a heartbeat).

use crate::store::nodes::SeenWritten;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `last_seen` lags by at most this.
pub const SEEN_EVERY: Duration = Duration::from_secs(1);
/// An applied revision reaches the store (and the rollouts) within this.
pub const APPLIED_EVERY: Duration = Duration::from_millis(25);

#[derive(Default)]
pub struct Heartbeats {
    /// Node id → fingerprint of its last report the full path recorded,
    /// and the applied revision the store holds for it (the fleet view's
    /// copy lags: it is only read again when a revision moves).
    recorded: Mutex<HashMap<String, Recorded>>,
    unwritten: Mutex<Unwritten>,
    /// Woken when an applied revision moves: the writer sleeps otherwise.
    applied_moved: tokio::sync::Notify,
}

#[derive(Default)]
struct Unwritten {
    /// Node id → (time of its latest report, the revision it applied).
    seen: HashMap<String, Seen>,
    /// Some applied revision moved since the last write.
    applied_moved: bool,
}

#[derive(Clone, Copy)]
struct Recorded {
    fingerprint: u64,
    applied_revision: i64,
}

/// A report's time and applied revision, waiting to be written, and the
/// fingerprint of the recorded report it repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub at: i64,
    pub applied_revision: i64,
    pub fingerprint: u64,
}

/// What a report says that the store keeps, hashed: everything but its
/// time, its applied revision, its peers and its CPU and memory figures
/// (kept in memory by the usage board, and different in every report).
pub fn fingerprint(report: &berth_protocol::StatusReport) -> u64 {
    let mut h = DefaultHasher::new();
    report.agent_version.hash(&mut h);
    report.error.hash(&mut h);
    report.upgrade_error.hash(&mut h);
    report.served_domains.hash(&mut h);
    for c in &report.containers {
        c.replica.hash(&mut h);
        c.container_id.hash(&mut h);
        c.image_id.hash(&mut h);
        c.state.hash(&mut h);
        c.healthy.hash(&mut h);
        c.restarts.hash(&mut h);
        c.error.hash(&mut h);
        c.exit_code.hash(&mut h);
        c.health_output.hash(&mut h);
        c.log_tail.hash(&mut h);
        c.recreates.hash(&mut h);
        c.gave_up.hash(&mut h);
    }
    h.finish()
}

impl Heartbeats {
    /// If the node's last recorded report said the same (`seen.fingerprint`),
    /// keeps `seen` to write behind and returns true.
    pub fn same_as_recorded(&self, node_id: &str, seen: Seen) -> bool {
        let stored_applied = {
            let recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
            match recorded.get(node_id) {
                Some(r) if r.fingerprint == seen.fingerprint => r.applied_revision,
                _ => return false,
            }
        };
        let mut u = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        let moved = u.seen.get(node_id).map_or(stored_applied, |s| s.applied_revision) != seen.applied_revision;
        if moved && !u.applied_moved {
            self.applied_moved.notify_one();
        }
        u.applied_moved |= moved;
        u.seen.insert(node_id.to_string(), seen);
        true
    }

    /// The full path wrote a report with this fingerprint and applied
    /// revision (and its time, so what waited for that is dropped).
    pub fn recorded(&self, node_id: &str, fingerprint: u64, applied_revision: i64) {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner()).insert(
            node_id.to_string(),
            Recorded {
                fingerprint,
                applied_revision,
            },
        );
        self.unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .remove(node_id);
    }

    /// A batch taken by [`Heartbeats::take_due`] went to the store, which
    /// took the `written` nodes' part and could not yet lock the `busy`
    /// ones' (kept for the next write). The others' recorded reports are no
    /// longer the store's: forgotten, so their next reports take the full path.
    fn written(&self, mut batch: HashMap<String, Seen>, moved: bool, done: &SeenWritten) {
        let busy: HashMap<String, Seen> = done.busy.iter().filter_map(|id| batch.remove_entry(id)).collect();
        if !busy.is_empty() {
            self.put_back(busy, moved);
        }
        let written = &done.written;
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        for (id, s) in &batch {
            if !written.contains(id) {
                // Unless the full path recorded another report meanwhile.
                if recorded.get(id).is_some_and(|r| r.fingerprint == s.fingerprint) {
                    recorded.remove(id);
                }
            } else if let Some(r) = recorded.get_mut(id) {
                r.applied_revision = r.applied_revision.max(s.applied_revision);
            }
        }
    }

    /// Forgets a removed node.
    pub fn forget(&self, node_id: &str) {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner()).remove(node_id);
        self.unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .remove(node_id);
    }

    /// What is due: everything when an applied revision moved or `seen_due`.
    fn take_due(&self, seen_due: bool) -> Option<(HashMap<String, Seen>, bool)> {
        let mut u = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        if u.seen.is_empty() || !(u.applied_moved || seen_due) {
            return None;
        }
        let moved = std::mem::take(&mut u.applied_moved);
        Some((std::mem::take(&mut u.seen), moved))
    }

    fn put_back(&self, batch: HashMap<String, Seen>, moved: bool) {
        let mut u = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        u.applied_moved |= moved;
        if moved {
            self.applied_moved.notify_one();
        }
        for (id, s) in batch {
            u.seen.entry(id).or_insert(s);
        }
    }
}

/// Writes what the hot path kept, on the schedule the module describes.
/// Between writes it sleeps (no ticking while nothing is due).
pub async fn write_behind(state: crate::state::SharedState) {
    let mut next_seen = Instant::now() + SEEN_EVERY;
    loop {
        tokio::select! {
            // Let the burst of reports after a change gather.
            _ = state.heartbeats.applied_moved.notified() => tokio::time::sleep(APPLIED_EVERY).await,
            _ = tokio::time::sleep_until(next_seen.into()) => {}
        }
        let seen_due = Instant::now() >= next_seen;
        if seen_due {
            next_seen = Instant::now() + SEEN_EVERY;
        }
        let Some((batch, moved)) = state.heartbeats.take_due(seen_due) else {
            continue;
        };
        match state.store.record_seen(&batch).await {
            Ok(done) => {
                let refused = batch.len() - done.written.len() - done.busy.len();
                if refused > 0 {
                    tracing::debug!(
                        nodes = refused,
                        "heartbeats not written: the store holds a newer report"
                    );
                }
                state.heartbeats.written(batch, moved, &done);
                if moved {
                    state.rollout_wake.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, nodes = batch.len(), "writing heartbeats failed; retrying");
                state.heartbeats.put_back(batch, moved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(written: &[&str], busy: &[&str]) -> SeenWritten {
        let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect();
        SeenWritten {
            written: set(written),
            busy: set(busy),
        }
    }

    fn seen(at: i64, applied_revision: i64, fingerprint: u64) -> Seen {
        Seen {
            at,
            applied_revision,
            fingerprint,
        }
    }

    #[test]
    fn a_moved_applied_revision_is_due_at_once_a_heartbeat_later() {
        let h = Heartbeats::default();
        assert!(!h.same_as_recorded("a", seen(1, 5, 7)), "nothing recorded yet");
        h.recorded("a", 7, 5);
        assert!(!h.same_as_recorded("a", seen(2, 5, 8)), "a new container state");
        assert!(h.same_as_recorded("a", seen(3, 5, 7)));
        assert!(h.take_due(false).is_none(), "a heartbeat waits");
        assert!(h.same_as_recorded("a", seen(4, 6, 7)));
        let (batch, moved) = h.take_due(false).unwrap();
        assert!(moved);
        assert_eq!(batch["a"], seen(4, 6, 7));
        assert!(h.take_due(true).is_none(), "taken");
        // Once written, the same applied revision is no longer news.
        h.written(batch, moved, &done(&["a"], &[]));
        assert!(h.same_as_recorded("a", seen(5, 6, 7)));
        assert!(h.take_due(false).is_none(), "applied 6 is in the store already");
        assert!(h.take_due(true).is_some(), "the time, a second later");
    }

    #[test]
    fn a_node_the_store_did_not_take_is_forgotten() {
        let h = Heartbeats::default();
        h.recorded("a", 7, 5);
        h.recorded("b", 7, 5);
        assert!(h.same_as_recorded("a", seen(1, 5, 7)));
        assert!(h.same_as_recorded("b", seen(1, 5, 7)));
        let (batch, _) = h.take_due(true).unwrap();
        // Another control plane recorded a different report of a's.
        h.written(batch, false, &done(&["b"], &[]));
        assert!(!h.same_as_recorded("a", seen(2, 5, 7)), "a takes the full path");
        assert!(h.same_as_recorded("b", seen(2, 5, 7)));
        // The full path recorded c anew while its batch was out: kept.
        h.recorded("c", 7, 5);
        assert!(h.same_as_recorded("c", seen(3, 5, 7)));
        let (batch, _) = h.take_due(true).unwrap();
        h.recorded("c", 9, 5);
        h.written(batch, false, &done(&[], &[]));
        assert!(h.same_as_recorded("c", seen(4, 5, 9)));
    }

    #[test]
    fn a_node_whose_row_was_locked_is_written_later() {
        let h = Heartbeats::default();
        h.recorded("a", 7, 5);
        assert!(h.same_as_recorded("a", seen(1, 6, 7)));
        let (batch, moved) = h.take_due(false).unwrap();
        h.written(batch, moved, &done(&[], &["a"]));
        let (batch, moved) = h
            .take_due(false)
            .expect("due again at once: its applied revision moved");
        assert!(moved);
        assert_eq!(batch["a"], seen(1, 6, 7));
        assert!(h.same_as_recorded("a", seen(2, 6, 7)), "still recorded");
    }
}
