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
    /// Node sessions: requests authenticated by an HMAC, not a signature.
    pub node_sessions: crate::node_sessions::NodeSessions,
    /// The status-report hot path.
    pub heartbeats: crate::heartbeats::Heartbeats,
    /// Status reports read and handled at once: a burst of them (from
    /// agents before peer state, up to ~100 bytes a node each) waits in
    /// its senders, not in memory.
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
/// peer state they last reported: shown by `berth nodes list` and `berth
/// service show`, kept in memory only.
#[derive(Default)]
pub struct UsageBoard {
    pub nodes: std::collections::HashMap<String, berth_protocol::NodeUsage>,
    /// Each node's peers up and down, from its last report with peer state.
    pub peers: PeerBoard,
    /// By replica name: (thousandths of a core, memory bytes).
    pub replicas: std::collections::HashMap<String, (Option<u32>, Option<u64>)>,
}

impl UsageBoard {
    /// Takes in a heartbeat's figures; a report without them changes nothing.
    pub fn report(&mut self, node_id: &str, report: &berth_protocol::StatusReport) {
        // Agents send both or neither; either one is taken as peer state.
        if report.peers_up.is_some() || report.peers_down.is_some() {
            let down = report.peers_down.as_deref().unwrap_or_default();
            self.peers
                .report(node_id, report.peers_up.unwrap_or(0), down, crate::store::now());
        } else if !report.peers.is_empty() {
            // An agent from before `peers_up`: its whole list.
            let (up, down) = berth_protocol::split_peers(&report.peers);
            self.peers.report(node_id, up, &down, crate::store::now());
        }
        let Some(u) = report.usage else { return };
        self.nodes.insert(node_id.to_string(), u);
        for c in &report.containers {
            self.replicas
                .insert(c.replica.clone(), (c.cpu_millicores, c.memory_bytes));
        }
    }
}

/// The peer state nodes report: per node how many peers are up and which
/// are down, so memory grows with the peers down, not with pairs of nodes.
/// A down peer is kept as (its key's index in `keys`, when it last
/// handshook): 8 bytes, even when half a large fleet cannot reach the
/// other half.
#[derive(Default)]
pub struct PeerBoard {
    by_node: std::collections::HashMap<String, NodePeers>,
    keys: KeyTable,
}

/// One node's last reported peer state.
struct NodePeers {
    up: u32,
    down: Vec<(u32, HandshakeAt)>,
}

/// When a down peer last handshook, in Unix seconds of the control
/// plane's clock (report time minus the reported age), or None for never.
/// A time rather than the age: the age shown is then as of now, however
/// long ago the report came, and exact at any age.
type HandshakeAt = Option<std::num::NonZeroU32>;

fn handshake_at(age: Option<u64>, reported_at: i64) -> HandshakeAt {
    let age = i64::try_from(age?).unwrap_or(i64::MAX);
    let at = reported_at.saturating_sub(age).clamp(1, u32::MAX as i64);
    std::num::NonZeroU32::new(at as u32)
}

fn age_at(at: HandshakeAt, now: i64) -> Option<u64> {
    at.map(|at| (now - at.get() as i64).max(0) as u64)
}

/// A node's peer state: how many peers are up, and the peers down as
/// (WireGuard key, handshake age as of now).
pub type PeersOf<'a> = (u32, Vec<(&'a str, Option<u64>)>);

impl PeerBoard {
    /// Replaces `node_id`'s peer state with a report's, made at `reported_at`.
    fn report(&mut self, node_id: &str, up: u32, down: &[berth_protocol::PeerStatus], reported_at: i64) {
        let down: Vec<(u32, HandshakeAt)> = down
            .iter()
            .map(|p| {
                (
                    self.keys.hold(&p.wg_public_key),
                    handshake_at(p.handshake_age_secs, reported_at),
                )
            })
            .collect();
        // Held before the old ones are let go: a key down in both stays put.
        if let Some(old) = self.by_node.insert(node_id.to_string(), NodePeers { up, down }) {
            old.down.iter().for_each(|(key, _)| self.keys.release(*key));
        }
    }

    /// `node_id`'s last reported peer state as of `now`; None before any.
    pub fn of(&self, node_id: &str, now: i64) -> Option<PeersOf<'_>> {
        let node = self.by_node.get(node_id)?;
        let down = node
            .down
            .iter()
            .map(|(key, at)| (self.keys.get(*key), age_at(*at, now)))
            .collect();
        Some((node.up, down))
    }

    pub fn remove(&mut self, node_id: &str) {
        if let Some(old) = self.by_node.remove(node_id) {
            old.down.iter().for_each(|(key, _)| self.keys.release(*key));
        }
    }
}

/// The WireGuard keys of peers reported down, each stored once and
/// counted by the down entries that name it; a key none names any more
/// (its peer came back up, or left the fleet) is dropped and its index
/// reused.
#[derive(Default)]
struct KeyTable {
    index: std::collections::HashMap<Arc<str>, u32>,
    /// By index: the key and how many down entries name it; None when free.
    slots: Vec<Option<(Arc<str>, u32)>>,
    free: Vec<u32>,
}

impl KeyTable {
    /// The index of `key`, counted once more.
    fn hold(&mut self, key: &str) -> u32 {
        if let Some(&i) = self.index.get(key) {
            if let Some((_, refs)) = &mut self.slots[i as usize] {
                *refs += 1;
            }
            return i;
        }
        let key: Arc<str> = key.into();
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some((key.clone(), 1));
                i
            }
            None => {
                self.slots.push(Some((key.clone(), 1)));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(key, i);
        i
    }

    /// Counts `i` once less; drops its key at zero.
    fn release(&mut self, i: u32) {
        let slot = &mut self.slots[i as usize];
        if let Some((key, refs)) = slot {
            *refs -= 1;
            if *refs == 0 {
                self.index.remove(&**key);
                *slot = None;
                self.free.push(i);
            }
        }
    }

    fn get(&self, i: u32) -> &str {
        self.slots[i as usize].as_ref().map_or("", |(key, _)| key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.index.len()
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
        Ok(Arc::new(AppState {
            store,
            heartbeats: Default::default(),
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
            node_sessions: Default::default(),
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

    fn new_style(up: u32, down: Vec<berth_protocol::PeerStatus>) -> berth_protocol::StatusReport {
        berth_protocol::StatusReport {
            peers_up: Some(up),
            peers_down: Some(down),
            ..Default::default()
        }
    }

    #[test]
    fn down_peers_age_from_the_report_on() {
        let mut b = PeerBoard::default();
        b.report("n1", 4998, &[status("k1", Some(400)), status("k2", None)], 10_000);
        // 60 s later the down peer is 60 s older; never stays never.
        assert_eq!(b.of("n1", 10_060), Some((4998, vec![("k1", Some(460)), ("k2", None)])));
        // Ages of days and more stay exact to the second.
        b.report("n2", 0, &[status("k1", Some(9 * 86_400 + 1))], 1_000_000);
        assert_eq!(b.of("n2", 1_000_000), Some((0, vec![("k1", Some(9 * 86_400 + 1))])));
        assert_eq!(b.of("unknown", 10_000), None);
    }

    #[test]
    fn a_report_replaces_the_last_and_keys_are_kept_while_named() {
        const T: i64 = 1_700_000_000;
        let mut b = PeerBoard::default();
        b.report("n1", 1, &[status("k1", Some(200)), status("k2", None)], T);
        b.report("n2", 2, &[status("k1", Some(300))], T);
        assert_eq!(b.keys.len(), 2);
        // n1's peers came back up: only n2 still names k1; k2 is dropped.
        b.report("n1", 3, &[], T + 100);
        assert_eq!(b.of("n1", T + 100), Some((3, vec![])));
        assert_eq!(b.keys.len(), 1);
        // A new key takes the freed index; n2's entry is untouched.
        b.report("n3", 0, &[status("k3", None)], T + 100);
        assert_eq!(b.keys.slots.len(), 2, "k3 took k2's index");
        assert_eq!(b.of("n2", T + 100), Some((2, vec![("k1", Some(400))])));
        assert_eq!(b.of("n3", T + 100), Some((0, vec![("k3", None)])));
        // A key down in the last report and this one stays held.
        b.report("n2", 2, &[status("k1", Some(310))], T + 110);
        assert_eq!(b.of("n2", T + 110), Some((2, vec![("k1", Some(310))])));
        b.remove("n2");
        b.remove("n3");
        assert_eq!(b.of("n2", T + 110), None);
        assert_eq!(b.keys.len(), 0, "no node names a key down");
    }

    #[test]
    fn the_board_takes_new_reports_and_old_agents_lists() {
        let mut u = UsageBoard::default();
        u.report("new", &new_style(2, vec![status("k9", None)]));
        let (up, down) = u.peers.of("new", crate::store::now()).unwrap();
        assert_eq!((up, down), (2, vec![("k9", None)]));
        // Without peer state the last one is kept.
        u.report("new", &berth_protocol::StatusReport::default());
        assert_eq!(u.peers.of("new", crate::store::now()).unwrap().0, 2);
        // An old agent sends every peer: below 180 s is up, the rest down.
        let old = berth_protocol::StatusReport {
            peers: vec![status("a", Some(7)), status("b", Some(400)), status("c", None)],
            ..Default::default()
        };
        u.report("old", &old);
        let (up, down) = u.peers.of("old", crate::store::now()).unwrap();
        assert_eq!(up, 1);
        let keys: Vec<&str> = down.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["b", "c"]);
        assert!(down[0].1.is_some_and(|age| (400..410).contains(&age)), "{down:?}");
        assert_eq!(down[1].1, None);
        // A node with no peers at all reports 0 up, none down.
        u.report("alone", &new_style(0, vec![]));
        assert_eq!(u.peers.of("alone", crate::store::now()), Some((0, vec![])));
    }
}
