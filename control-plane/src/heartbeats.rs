//! The status-report hot path. Most reports are heartbeats that say
//! nothing new: same applied revision, version, errors, served domains
//! and container states, only a later time. Such a report is answered
//! from memory: its time is written behind to the store with everyone
//! else's, once per [`FLUSH_EVERY`], in one statement per batch. A report
//! that says anything new takes the full path, which writes it at once.
//!
//! SQLite only: on PostgreSQL several control planes may share the store,
//! and one of them cannot tell from its own memory that a report equal to
//! the last it recorded is equal to the last the store holds.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

/// How often heartbeat times are written; `last_seen` lags by at most this.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Heartbeats {
    /// False on PostgreSQL: every report takes the full path.
    enabled: bool,
    /// Node id → fingerprint of its last report the full path recorded.
    recorded: Mutex<HashMap<String, u64>>,
    /// Node id → time of its latest heartbeat not yet written.
    unwritten: Mutex<HashMap<String, i64>>,
}

/// What a report says that the store keeps, hashed: everything but its
/// time, its peers and its CPU and memory figures (kept in memory by the
/// usage board, and different in every report).
pub fn fingerprint(report: &berth_protocol::StatusReport) -> u64 {
    let mut h = DefaultHasher::new();
    report.applied_revision.hash(&mut h);
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
    pub fn new(enabled: bool) -> Heartbeats {
        Heartbeats {
            enabled,
            ..Default::default()
        }
    }

    /// If the node's last recorded report said the same (`fingerprint`),
    /// notes the time to write behind and returns true.
    pub fn same_as_recorded(&self, node_id: &str, fingerprint: u64, now: i64) -> bool {
        let same = self.enabled
            && self
                .recorded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(node_id)
                .is_some_and(|f| *f == fingerprint);
        if same {
            let mut unwritten = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
            unwritten.insert(node_id.to_string(), now);
        }
        same
    }

    /// The full path wrote a report with this fingerprint.
    pub fn recorded(&self, node_id: &str, fingerprint: u64) {
        if !self.enabled {
            return;
        }
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        recorded.insert(node_id.to_string(), fingerprint);
    }

    /// Forgets a removed node.
    pub fn forget(&self, node_id: &str) {
        self.recorded.lock().unwrap_or_else(|e| e.into_inner()).remove(node_id);
        self.unwritten.lock().unwrap_or_else(|e| e.into_inner()).remove(node_id);
    }

    fn take_unwritten(&self) -> HashMap<String, i64> {
        std::mem::take(&mut *self.unwritten.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Writes the heartbeat times every [`FLUSH_EVERY`].
pub async fn write_behind(state: crate::state::SharedState) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tick.tick().await;
        let batch = state.heartbeats.take_unwritten();
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = state.store.record_seen(&batch).await {
            tracing::warn!(error = %e, nodes = batch.len(), "writing heartbeat times failed");
            // Put them back unless a newer heartbeat came meanwhile.
            let mut unwritten = state.heartbeats.unwritten.lock().unwrap_or_else(|e| e.into_inner());
            for (id, at) in batch {
                unwritten.entry(id).or_insert(at);
            }
        }
    }
}
