//! Shared server state: the store, the pools, and the revision signal that
//! wakes long-polls.

use crate::desired::FleetView;
use crate::store::nodes::Pools;
use crate::store::{Database, Store};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::{watch, Mutex};

pub struct AppState {
    pub store: Store,
    pub pools: Pools,
    /// SHA-256 of the CA certificate, carried in join tokens.
    pub ca_hash: String,
    pub ca_pem: String,
    /// SHA-256 (hex) of the admin bearer token.
    pub admin_token_hash: String,
    /// The control plane's own X25519 key: secrets are stored sealed to it.
    pub secrets_key: x25519_dalek::StaticSecret,
    /// URL agents are told to use, printed with new tokens.
    pub advertise_url: String,
    /// A node is online when its last heartbeat is newer than this many seconds.
    pub offline_after_secs: i64,
    /// Signed agent builds and the installer scripts' release key.
    pub releases: crate::api::releases::Releases,
    /// Wakes the ACME task (a domain was added); unused without ACME.
    pub acme_wake: tokio::sync::Notify,
    /// ACME orders this process created (for tests and logs).
    pub acme_orders: std::sync::atomic::AtomicU64,
    /// Wakes the rollout driver (a node reported; its replicas may have moved on).
    pub rollout_wake: tokio::sync::Notify,
    /// The fleet registry, unless started without one.
    pub registry: Option<Arc<crate::registry::Registry>>,
    /// Build contexts, logs and the builder nodes that are ready.
    pub builds: crate::builds::Builds,
    /// Live log and exec streams (not stored).
    pub streams: Arc<crate::streams::Streams>,
    pub metrics: crate::metrics::Metrics,
    pub usage: std::sync::Mutex<UsageBoard>,
    /// SHA-256 (hex) of the token `/metrics` also takes, if one is set.
    pub metrics_token_hash: Option<String>,
    /// Dashboard sign-in: session settings and failed-attempt counts.
    pub sessions: crate::sessions::Sessions,
    /// Nonces of node-signed requests.
    pub replay: crate::replay::Replay,
    /// The status-report hot path.
    pub heartbeats: crate::heartbeats::Heartbeats,
    /// Status reports read and handled at once: a burst of peer reports
    /// (each up to ~100 bytes a node) waits in its senders, not in memory.
    pub report_bodies: tokio::sync::Semaphore,
    revision: watch::Sender<i64>,
    fleet_view: Mutex<Arc<FleetView>>,
    /// The last [`VIEW_HISTORY`] views, oldest first: the bases deltas
    /// are built against.
    views: std::sync::Mutex<std::collections::VecDeque<Arc<FleetView>>>,
}

/// Views kept for deltas. An agent whose base is older gets a full
/// document; each view holds every node row and peer entry (about 1 KB
/// per node).
pub const VIEW_HISTORY: usize = 16;

pub type SharedState = Arc<AppState>;

/// See [`AppState::report_bodies`].
pub const REPORT_BODIES: usize = 8;

/// The CPU and memory nodes last reported with a heartbeat, and the mesh
/// peers they last reported: shown by `berth nodes list` and `berth
/// service show`, kept in memory only.
#[derive(Default)]
pub struct UsageBoard {
    pub nodes: std::collections::HashMap<String, berth_protocol::NodeUsage>,
    /// Each node's peers' handshakes, from its last report with peers.
    pub peers: PeerBoard,
    /// By replica name: (thousandths of a core, memory bytes).
    pub replicas: std::collections::HashMap<String, (Option<u32>, Option<u64>)>,
}

impl UsageBoard {
    /// Takes in a heartbeat's figures; a report without them changes nothing.
    pub fn report(&mut self, node_id: &str, report: &berth_protocol::StatusReport) {
        if !report.peers.is_empty() {
            self.peers.report(node_id, &report.peers);
        }
        let Some(u) = report.usage else { return };
        self.nodes.insert(node_id.to_string(), u);
        for c in &report.containers {
            self.replicas
                .insert(c.replica.clone(), (c.cpu_millicores, c.memory_bytes));
        }
    }
}

/// The handshake ages nodes report for their peers: one entry per pair of
/// nodes, so kept dense: per node a row of 2-byte ages indexed by the
/// peer's key (its index among the keys seen). 5,000 nodes: 50 MB.
#[derive(Default)]
pub struct PeerBoard {
    key_index: std::collections::HashMap<String, u32>,
    keys: Vec<String>,
    by_node: std::collections::HashMap<String, Vec<u16>>,
}

/// In a row: the node did not report this key.
const NOT_REPORTED: u16 = u16::MAX;
/// In a row: the peer was never handshaken with.
const NO_HANDSHAKE: u16 = u16::MAX - 1;
/// Ages below this are kept in seconds, above in minutes (up to ~23 days).
const MINUTES_FROM: u64 = 1 << 15;

fn age_to_u16(age: Option<u64>) -> u16 {
    match age {
        None => NO_HANDSHAKE,
        Some(s) if s < MINUTES_FROM => s as u16,
        Some(s) => (MINUTES_FROM + ((s - MINUTES_FROM) / 60).min(NO_HANDSHAKE as u64 - 1 - MINUTES_FROM)) as u16,
    }
}

fn age_from_u16(v: u16) -> Option<u64> {
    match v as u64 {
        _ if v == NO_HANDSHAKE => None,
        s if s < MINUTES_FROM => Some(s),
        m => Some(MINUTES_FROM + (m - MINUTES_FROM) * 60),
    }
}

impl PeerBoard {
    fn report(&mut self, node_id: &str, peers: &[berth_protocol::PeerStatus]) {
        let mut row = self.by_node.remove(node_id).unwrap_or_default();
        row.iter_mut().for_each(|a| *a = NOT_REPORTED);
        for p in peers {
            let idx = match self.key_index.get(&p.wg_public_key) {
                Some(i) => *i as usize,
                None => {
                    self.keys.push(p.wg_public_key.clone());
                    self.key_index
                        .insert(p.wg_public_key.clone(), (self.keys.len() - 1) as u32);
                    self.keys.len() - 1
                }
            };
            if row.len() <= idx {
                row.resize(idx + 1, NOT_REPORTED);
            }
            row[idx] = age_to_u16(p.handshake_age_secs);
        }
        self.by_node.insert(node_id.to_string(), row);
    }

    /// `node_id`'s peers as (WireGuard key, handshake age), in the order
    /// their keys were first seen.
    pub fn of(&self, node_id: &str) -> Vec<(&str, Option<u64>)> {
        let Some(row) = self.by_node.get(node_id) else {
            return vec![];
        };
        row.iter()
            .zip(&self.keys)
            .filter(|(a, _)| **a != NOT_REPORTED)
            .map(|(a, key)| (key.as_str(), age_from_u16(*a)))
            .collect()
    }

    pub fn remove(&mut self, node_id: &str) {
        self.by_node.remove(node_id);
    }
}

/// What the server state is made from, besides the store.
pub struct StateParts {
    pub pools: Pools,
    pub ca_hash: String,
    pub ca_pem: String,
    pub admin_token_hash: String,
    pub secrets_key: x25519_dalek::StaticSecret,
    pub advertise_url: String,
    pub offline_after_secs: i64,
    pub releases_dir: std::path::PathBuf,
    pub registry: Option<crate::registry::Registry>,
    pub builds: crate::builds::Builds,
    pub streams: Arc<crate::streams::Streams>,
    pub metrics_token_hash: Option<String>,
    pub sessions: crate::sessions::SessionConfig,
}

impl AppState {
    pub async fn new(store: Store, parts: StateParts) -> anyhow::Result<SharedState> {
        let StateParts {
            pools,
            ca_hash,
            ca_pem,
            admin_token_hash,
            secrets_key,
            advertise_url,
            offline_after_secs,
            releases_dir,
            registry,
            builds,
            streams,
            metrics_token_hash,
            sessions,
        } = parts;
        let rev = store.revision().await?;
        let (tx, _) = watch::channel(rev);
        let replay = crate::replay::Replay::new(store.clone()).await?;
        let heartbeats = crate::heartbeats::Heartbeats::new(store.database == Database::Sqlite);
        Ok(Arc::new(AppState {
            store,
            pools,
            ca_hash,
            ca_pem,
            admin_token_hash,
            secrets_key,
            advertise_url,
            offline_after_secs,
            releases: crate::api::releases::Releases { dir: releases_dir },
            acme_wake: tokio::sync::Notify::new(),
            acme_orders: Default::default(),
            rollout_wake: tokio::sync::Notify::new(),
            registry: registry.map(Arc::new),
            builds,
            streams,
            metrics: Default::default(),
            usage: Default::default(),
            metrics_token_hash,
            sessions: crate::sessions::Sessions::new(sessions),
            replay,
            heartbeats,
            report_bodies: tokio::sync::Semaphore::new(REPORT_BODIES),
            revision: tx,
            fleet_view: Mutex::new(Arc::new(FleetView::new(-1, vec![], vec![], vec![]))),
            views: Default::default(),
        }))
    }

    /// `plain` sealed to the control plane's key, as the store keeps secrets.
    pub fn seal_for_store(&self, plain: &[u8]) -> String {
        berth_protocol::seal::seal(&x25519_dalek::PublicKey::from(&self.secrets_key), plain)
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision.subscribe()
    }

    pub fn current_revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// Called after a commit that moved the revision: wakes local long-polls
    /// and, on PostgreSQL, the other control-plane replicas.
    pub async fn revision_moved(&self, rev: i64) {
        self.metrics.revision_moved(rev);
        self.revision.send_if_modified(|cur| {
            let moved = rev > *cur;
            if moved {
                *cur = rev;
            }
            moved
        });
        if self.store.database == Database::Postgres {
            let res = sqlx::query("SELECT pg_notify('berth_revision', $1)")
                .bind(rev.to_string())
                .execute(&self.store.pool)
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "pg_notify failed; other replicas catch up on their next poll");
            }
        }
    }

    /// The fleet at the current revision, read from the store once per revision.
    pub async fn fleet_view(&self) -> sqlx::Result<Arc<FleetView>> {
        let want = self.current_revision();
        let mut cached = self.fleet_view.lock().await;
        if cached.revision >= want {
            return Ok(cached.clone());
        }
        // Read the counter first: the node rows are then at least that new.
        let revision = self.store.revision().await?;
        let nodes = self.store.list_nodes().await?;
        let services = self.store.list_services().await?;
        let replicas = self.store.list_replicas().await?;
        let routes = crate::desired::Routes {
            domains: self.store.list_domains().await?,
            tcp: self.store.list_tcp_routes().await?,
            challenges: self.store.list_challenges().await?,
        };
        let releases = self.store.releases_in_use().await?;
        *cached = Arc::new(
            FleetView::new(revision, nodes, services, replicas)
                .with_routes(routes)
                .with_releases(releases)
                .with_registry(self.registry.clone())
                .after(&cached),
        );
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        views.push_back(cached.clone());
        while views.len() > VIEW_HISTORY {
            views.pop_front();
        }
        Ok(cached.clone())
    }

    /// The view `base` and every node id whose peer entry changed between
    /// it and `cur`; None when `base` is no longer (or never was) kept.
    pub fn delta_base(&self, base: u64, cur: &FleetView) -> Option<(Arc<FleetView>, HashSet<String>)> {
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        let from = views.iter().position(|v| v.id == base)?;
        let to = views.iter().position(|v| v.id == cur.id)?;
        if to < from {
            return None;
        }
        let changed = views
            .range(from + 1..=to)
            .flat_map(|v| v.peers_changed.iter().cloned())
            .collect();
        Some((views[from].clone(), changed))
    }
}

/// Keeps this replica's revision signal in step with changes made by other
/// replicas sharing the same PostgreSQL (LISTEN/NOTIFY, plus a slow poll
/// in case a notification was missed while reconnecting).
pub async fn follow_other_replicas(state: SharedState, url: String) {
    use sqlx::postgres::PgListener;
    loop {
        let mut listener = match PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen("berth_revision").await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            continue;
        }
        loop {
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv()).await;
            if let Ok(Err(e)) = got {
                tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                break;
            }
            if let Ok(rev) = state.store.revision().await {
                state.revision.send_if_modified(|cur| {
                    let moved = rev > *cur;
                    if moved {
                        *cur = rev;
                    }
                    moved
                });
            }
        }
    }
}

#[cfg(test)]
mod peer_board_tests {
    use super::*;

    fn status(key: &str, age: Option<u64>) -> berth_protocol::PeerStatus {
        berth_protocol::PeerStatus {
            wg_public_key: key.into(),
            handshake_age_secs: age,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    #[test]
    fn a_report_replaces_the_last_and_keeps_each_age() {
        let mut b = PeerBoard::default();
        b.report("n1", &[status("k1", Some(5)), status("k2", None)]);
        b.report("n2", &[status("k3", Some(40_000)), status("k1", Some(0))]);
        assert_eq!(b.of("n1"), vec![("k1", Some(5)), ("k2", None)]);
        // Above 2^15 s an age is kept to the minute; a key learned since
        // (k3) has no entry in rows made before it.
        assert_eq!(b.of("n2"), vec![("k1", Some(0)), ("k3", Some(39_968))]);
        b.report("n1", &[status("k3", Some(1 << 40))]);
        assert_eq!(b.of("n1"), vec![("k3", age_from_u16(NO_HANDSHAKE - 1))]);
        assert!(age_from_u16(NO_HANDSHAKE - 1).unwrap() > 20 * 86_400);
        b.remove("n1");
        assert!(b.of("n1").is_empty());
        assert!(b.of("unknown").is_empty());
    }
}
