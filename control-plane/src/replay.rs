//! Replay protection for node-signed requests: each nonce is accepted
//! once while its signature could still verify (its timestamp plus the
//! allowed clock skew).
//!
//! On SQLite (one control plane) the nonces seen are kept in memory, which
//! answers at once, and written behind to the store in batches, so a
//! restarted control plane still refuses the ones it accepted before (all
//! but those of the last [`FLUSH_EVERY`] before a crash). On PostgreSQL
//! several control planes may share the store, so the store's unique key
//! decides, on every request.

use crate::store::{Database, Store};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How often accepted nonces are written to the store (and spent ones dropped).
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);

pub struct Replay {
    store: Store,
    /// SQLite only: `(node id, nonce)` → when it expires.
    seen: Option<Mutex<Seen>>,
}

#[derive(Default)]
struct Seen {
    live: HashMap<(String, String), i64>,
    unwritten: Vec<(String, String, i64)>,
}

impl Replay {
    /// Loads the unexpired nonces of an earlier run (SQLite).
    pub async fn new(store: Store) -> sqlx::Result<Replay> {
        let seen = match store.database {
            Database::Postgres => None,
            Database::Sqlite => {
                let live = store.live_nonces(crate::store::now()).await?;
                let live = live
                    .into_iter()
                    .map(|(node, nonce, exp)| ((node, nonce), exp))
                    .collect();
                Some(Mutex::new(Seen {
                    live,
                    unwritten: vec![],
                }))
            }
        };
        Ok(Replay { store, seen })
    }

    /// True the first time `(node_id, nonce)` is offered.
    pub async fn fresh(&self, node_id: &str, nonce: &str, expires_at: i64) -> sqlx::Result<bool> {
        let Some(seen) = &self.seen else {
            return self.store.record_nonce(node_id, nonce, expires_at).await;
        };
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        let key = (node_id.to_string(), nonce.to_string());
        if seen.live.contains_key(&key) {
            return Ok(false);
        }
        seen.unwritten.push((key.0.clone(), key.1.clone(), expires_at));
        seen.live.insert(key, expires_at);
        Ok(true)
    }

    /// Writes the nonces accepted since the last call and forgets spent ones.
    pub async fn flush(&self, now: i64) -> sqlx::Result<()> {
        let Some(seen) = &self.seen else { return Ok(()) };
        let batch = {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.live.retain(|_, exp| *exp >= now);
            std::mem::take(&mut seen.unwritten)
        };
        if !batch.is_empty() {
            self.store.record_nonces(&batch).await?;
        }
        Ok(())
    }
}

/// Runs [`Replay::flush`] every [`FLUSH_EVERY`].
pub async fn write_behind(state: crate::state::SharedState) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = state.replay.flush(crate::store::now()).await {
            tracing::warn!(error = %e, "writing nonces failed; retrying");
        }
    }
}
