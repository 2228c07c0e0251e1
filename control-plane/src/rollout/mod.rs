//! Rollouts: the pure state machine ([`machine`]) and the task that drives
//! every rolling release with it ([`drive`]). The state lives in the store,
//! so the driver is stateless: a restarted control plane carries on, and
//! with several replicas on PostgreSQL a lease lets exactly one drive each
//! service.

pub mod machine;

use crate::state::SharedState;
use crate::store::services::now_ms;
use std::time::Duration;

/// How often rollouts are looked at without a wake-up (a status report or
/// a revision change wakes the driver earlier).
const TICK: Duration = Duration::from_millis(250);
/// The same while none needs driving: only a revision change (a deploy, a
/// scale, another replica's change) or a report can start one, and those
/// wake the driver; this is a fallback.
const IDLE_TICK: Duration = Duration::from_secs(5);
/// How long a lease on a service's rollouts lasts without renewal.
const LEASE_MS: i64 = 5_000;

/// Drives every rollout that needs it, forever.
pub async fn drive(state: SharedState) {
    let owner = format!("{:016x}", rand::random::<u64>());
    let mut revisions = state.subscribe();
    loop {
        let mut tick = IDLE_TICK;
        match state.store.releases_to_drive().await {
            Ok(list) => {
                if !list.is_empty() {
                    tick = TICK;
                }
                let mut seen = std::collections::BTreeSet::new();
                for (service, _) in list {
                    if !seen.insert(service.clone()) {
                        continue;
                    }
                    let now = now_ms();
                    match state.store.lease_rollout(&service, &owner, now, now + LEASE_MS).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::warn!(%service, error = %e, "taking the rollout lease failed");
                            continue;
                        }
                    }
                    match state.store.drive_rollout(&service, state.offline_after_secs).await {
                        Ok(stepped) => {
                            if let Some(rev) = stepped.revision {
                                state.revision_moved(rev).await;
                            }
                        }
                        Err(e) => tracing::warn!(%service, error = %e, "rollout step failed; retrying"),
                    }
                }
            }
            Err(e) => {
                tick = TICK;
                tracing::warn!(error = %e, "reading rollouts failed")
            }
        }
        tokio::select! {
            _ = state.rollout_wake.notified() => {}
            _ = revisions.changed() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
