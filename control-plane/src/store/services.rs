//! Services and replicas: deploy, scale, remove, and the health reported by nodes.

use super::{bump_all, events, now, retry, Store, StoreFailure};
use crate::placement::{self, Candidate};
pub use crate::rollout::machine::Phase;
use berth_protocol::event::EventKind;
use berth_protocol::service::{ContainerStatus, ServiceSpec};
use berth_protocol::FieldError;
use ipnet::Ipv4Net;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

#[derive(Debug, Clone)]
pub struct ServiceRow {
    pub name: String,
    /// The newest release's spec, with `secrets` emptied.
    pub spec: ServiceSpec,
    /// The newest release's secrets as a JSON map, sealed to the control plane's key.
    pub secrets_sealed: Option<String>,
    pub latest_release: u64,
    /// The last complete release.
    pub current_release: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRow {
    pub service: String,
    pub name: String,
    pub slot: u32,
    pub release: u64,
    pub phase: Phase,
    pub node_id: String,
    pub ip: Ipv4Addr,
    pub state: Option<String>,
    pub healthy: bool,
    pub restarts: u32,
    pub container_id: Option<String>,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub healthy_since_ms: Option<i64>,
    /// The revision that told the fleet it is healthy.
    pub healthy_revision: Option<i64>,
    pub phase_ms: i64,
    /// The revision of the last phase change (draining: taken out of routes).
    pub phase_revision: Option<i64>,
    /// What its node said is wrong with it, for a failed release's reason.
    pub trouble: Option<String>,
    pub recreates: u32,
    pub gave_up: bool,
}

/// The outcome of [`Store::remove_service`].
#[derive(Debug, PartialEq, Eq)]
pub enum RemoveService {
    /// Removed; the new revision.
    Removed(i64),
    NotFound,
    /// Domains and TCP routes that still point at it.
    Routed(Vec<String>),
}

impl ReplicaRow {
    pub fn name(&self) -> String {
        self.name.clone()
    }

    fn from_row(r: &AnyRow) -> ReplicaRow {
        ReplicaRow {
            service: r.get("service"),
            name: r.get("name"),
            slot: r.get::<i64, _>("slot") as u32,
            release: r.get::<i64, _>("release") as u64,
            phase: if r.get::<String, _>("phase") == "draining" {
                Phase::Draining
            } else {
                Phase::Active
            },
            node_id: r.get("node_id"),
            ip: r.get::<String, _>("ip").parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            state: r.get("state"),
            healthy: r.get::<i64, _>("healthy") != 0,
            restarts: r.get::<i64, _>("restarts") as u32,
            container_id: r.get("container_id"),
            last_error: r.get("last_error"),
            created_ms: r.get("created_ms"),
            healthy_since_ms: r.get("healthy_since_ms"),
            healthy_revision: r.get("healthy_revision"),
            phase_ms: r.get("phase_ms"),
            phase_revision: r.get("phase_revision"),
            trouble: r.get("trouble_json"),
            recreates: r.get::<i64, _>("recreates") as u32,
            gave_up: r.get::<i64, _>("gave_up") != 0,
        }
    }

    pub fn phase_str(&self) -> &'static str {
        match self.phase {
            Phase::Active => "active",
            Phase::Draining => "draining",
        }
    }
}

pub const REPLICA_COLUMNS: &str = "service, name, slot, release, phase, node_id, ip, state, healthy, restarts, \
     container_id, last_error, created_ms, healthy_since_ms, healthy_revision, phase_ms, phase_revision, \
     trouble_json, recreates, gave_up";

/// What [`Store::deploy_service`] does with the service's stored secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretsUpdate {
    /// Leave them as they are (a scale, or a deploy that gives none).
    Keep,
    /// Replace them with this JSON map, sealed to the control plane's key.
    Set(String),
    /// None at all (a rollback to a release that had none).
    Clear,
}

/// Why a deploy was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The replicas cannot be placed (`nodes`, `replicas`).
    #[error(transparent)]
    Placement(FieldError),
    #[error("replicas: no free address left in the subnet of node {0:?}")]
    SubnetFull(String),
    #[error("encoding the spec: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

impl StoreFailure for DeployError {
    fn store_error(&self) -> Option<&sqlx::Error> {
        match self {
            DeployError::Store(e) => Some(e),
            _ => None,
        }
    }
}

fn service_from_row(r: &AnyRow) -> ServiceRow {
    let spec: ServiceSpec = serde_json::from_str(&r.get::<String, _>("spec_json")).unwrap_or_else(|_| ServiceSpec {
        name: r.get("name"),
        ..Default::default()
    });
    ServiceRow {
        name: r.get("name"),
        spec,
        secrets_sealed: r.get("secrets_sealed"),
        latest_release: r.get::<i64, _>("latest_release") as u64,
        current_release: r.get::<Option<i64>, _>("current_release").map(|n| n as u64),
    }
}

const SERVICE_COLUMNS: &str = "name, spec_json, secrets_sealed, latest_release, current_release";

/// What a node's report says is wrong with a replica, in one line.
fn trouble(st: &ContainerStatus) -> Option<String> {
    let mut parts = vec![];
    if let Some(h) = &st.health_output {
        parts.push(format!("health check: {h}"));
    }
    if let Some(c) = st.exit_code.filter(|_| st.state != "running") {
        parts.push(format!("exited with code {c}"));
    }
    if let Some(e) = &st.error {
        parts.push(e.clone());
    }
    if !st.log_tail.is_empty() {
        parts.push(format!("last log lines:\n{}", st.log_tail.join("\n")));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

impl Store {
    pub async fn list_services(&self) -> sqlx::Result<Vec<ServiceRow>> {
        let rows = sqlx::query(&format!("SELECT {SERVICE_COLUMNS} FROM services ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(service_from_row).collect())
    }

    pub async fn list_replicas(&self) -> sqlx::Result<Vec<ReplicaRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {REPLICA_COLUMNS} FROM replicas ORDER BY service, slot, created_ms"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(ReplicaRow::from_row).collect())
    }

    pub async fn get_service(&self, name: &str) -> sqlx::Result<Option<ServiceRow>> {
        let row = sqlx::query(&format!("SELECT {SERVICE_COLUMNS} FROM services WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(service_from_row))
    }

    /// Removes a service, its releases and its replicas. Refused (nothing
    /// changed) while a domain or TCP route still sends traffic to it:
    /// removing those first is an explicit choice, not a side effect.
    pub async fn remove_service(&self, name: &str) -> sqlx::Result<RemoveService> {
        retry(|| self.try_remove_service(name)).await
    }

    async fn try_remove_service(&self, name: &str) -> sqlx::Result<RemoveService> {
        let mut tx = self.pool.begin().await?;
        let mut routes: Vec<String> = sqlx::query("SELECT domain FROM domains WHERE service = $1 ORDER BY domain")
            .bind(name)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| format!("domain {}", r.get::<String, _>("domain")))
            .collect();
        routes.extend(
            sqlx::query("SELECT listen FROM tcp_routes WHERE service = $1 ORDER BY listen")
                .bind(name)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| format!("TCP route {}", r.get::<i64, _>("listen"))),
        );
        if !routes.is_empty() {
            return Ok(RemoveService::Routed(routes));
        }
        let gone = sqlx::query("DELETE FROM services WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if gone == 0 {
            return Ok(RemoveService::NotFound);
        }
        // Its git link goes too: a later service of the name must not
        // inherit the repository and the webhook secret.
        for table in ["replicas", "releases", "git_links"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE service = $1"))
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        let rev = bump_all(&mut tx).await?;
        tx.commit().await?;
        Ok(RemoveService::Removed(rev))
    }

    /// Records what a node reports about its containers. Returns the new
    /// revision when a replica's health changed (DNS everywhere must follow);
    /// that revision is the one a rollout waits for every node to load.
    pub async fn record_containers(&self, node_id: &str, report: &[ContainerStatus]) -> sqlx::Result<Option<i64>> {
        retry(|| self.try_record_containers(node_id, report)).await
    }

    async fn try_record_containers(&self, node_id: &str, report: &[ContainerStatus]) -> sqlx::Result<Option<i64>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!("SELECT {REPLICA_COLUMNS} FROM replicas WHERE node_id = $1"))
            .bind(node_id)
            .fetch_all(&mut *tx)
            .await?;
        let mine: Vec<ReplicaRow> = rows.iter().map(ReplicaRow::from_row).collect();
        let changed: Vec<(&ReplicaRow, &ContainerStatus, Option<String>)> = mine
            .iter()
            .filter_map(|r| {
                let st = report.iter().find(|s| s.replica == r.name)?;
                let t = trouble(st);
                let same = st.healthy == r.healthy
                    && Some(&st.state) == r.state.as_ref()
                    && st.restarts == r.restarts
                    && st.container_id == r.container_id
                    && st.error == r.last_error
                    && t == r.trouble
                    && st.recreates == r.recreates
                    && st.gave_up == r.gave_up;
                (!same).then_some((r, st, t))
            })
            .collect();
        if changed.is_empty() {
            return Ok(None);
        }
        let health_changed = changed.iter().any(|(r, st, _)| st.healthy != r.healthy);
        let rev = if health_changed {
            Some(bump_all(&mut tx).await?)
        } else {
            None
        };
        let now_ms = now_ms();
        let node_name: Option<String> = sqlx::query("SELECT name FROM nodes WHERE id = $1")
            .bind(node_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| row.get(0));
        for (r, st, t) in &changed {
            for (kind, message) in replica_events(r, st, t.as_deref()) {
                events::record(&mut tx, kind, Some(&r.service), node_name.as_deref(), &message).await?;
            }
        }
        for (r, st, t) in changed {
            let (since, health_rev) = match (st.healthy, r.healthy) {
                (true, false) => (Some(now_ms), rev),
                (true, true) => (r.healthy_since_ms, r.healthy_revision),
                (false, _) => (None, None),
            };
            sqlx::query(
                "UPDATE replicas SET state = $1, healthy = $2, restarts = $3, container_id = $4, last_error = $5, \
                 healthy_since_ms = $6, healthy_revision = $7, trouble_json = $8, recreates = $9, gave_up = $10 \
                 WHERE service = $11 AND name = $12 AND node_id = $13",
            )
            .bind(&st.state)
            .bind(st.healthy as i64)
            .bind(st.restarts as i64)
            .bind(&st.container_id)
            .bind(&st.error)
            .bind(since)
            .bind(health_rev)
            .bind(t)
            .bind(st.recreates as i64)
            .bind(st.gave_up as i64)
            .bind(&r.service)
            .bind(&r.name)
            .bind(node_id)
            .execute(&mut *tx)
            .await?;
            // The first image a replica of the release runs pins the
            // release to those bits (history shows it; later ones are the same
            // image wherever the nodes got the same bits).
            if let Some(id) = st.image_id.as_deref().filter(|_| st.container_id != r.container_id) {
                let digest = if id.contains(':') {
                    id.to_string()
                } else {
                    format!("sha256:{id}")
                };
                sqlx::query(
                    "UPDATE releases SET image_digest = $1 \
                     WHERE service = $2 AND number = $3 AND image_digest IS NULL",
                )
                .bind(digest)
                .bind(&r.service)
                .bind(r.release as i64)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(rev)
    }
}

/// What a status report says happened to a replica, for the event stream.
fn replica_events(r: &ReplicaRow, st: &ContainerStatus, trouble: Option<&str>) -> Vec<(EventKind, String)> {
    let mut out = vec![];
    let name = &r.name;
    match (r.healthy, st.healthy) {
        (false, true) => out.push((EventKind::Health, format!("{name} healthy"))),
        (true, false) => out.push((
            EventKind::Health,
            format!("{name} unhealthy: {}", trouble.unwrap_or("no reason given")),
        )),
        _ => {}
    }
    if st.restarts > r.restarts {
        out.push((
            EventKind::Restart,
            format!("{name} restarted ({} restarts)", st.restarts),
        ));
    }
    if st.recreates > r.recreates {
        out.push((
            EventKind::Restart,
            format!("{name} made anew by autoheal ({} times)", st.recreates),
        ));
    }
    if st.gave_up && !r.gave_up {
        let why = st.error.as_deref().unwrap_or("no reason given");
        out.push((EventKind::Restart, format!("autoheal gave up on {name}: {why}")));
    }
    out
}

/// A node as placement and the rollout driver see it.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub id: String,
    pub name: String,
    pub online: bool,
    pub worker: bool,
    pub subnet: Ipv4Net,
    pub applied_revision: i64,
}

pub async fn node_facts(tx: &mut Transaction<'_, Any>, offline_after: i64) -> sqlx::Result<Vec<NodeFacts>> {
    let now = now();
    let nodes = sqlx::query("SELECT id, name, role, last_seen, subnet, applied_revision FROM nodes ORDER BY name")
        .fetch_all(&mut **tx)
        .await?;
    Ok(nodes
        .iter()
        .map(|n| NodeFacts {
            id: n.get("id"),
            name: n.get("name"),
            online: super::nodes::seen_recently(n.get("last_seen"), now, offline_after),
            worker: n.get::<String, _>("role") == "worker",
            subnet: n.get::<String, _>("subnet").parse().unwrap_or_default(),
            applied_revision: n.get("applied_revision"),
        })
        .collect())
}

pub async fn all_replicas(tx: &mut Transaction<'_, Any>) -> sqlx::Result<Vec<ReplicaRow>> {
    let rows = sqlx::query(&format!(
        "SELECT {REPLICA_COLUMNS} FROM replicas ORDER BY service, slot, created_ms"
    ))
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(ReplicaRow::from_row).collect())
}

/// Creates a replica of `spec` (release `release`) in `slot`: on the node
/// `prefer` if it may take it, else where placement puts it; with the next
/// name of the service's sequence and a free address on its node.
pub async fn start_replica(
    tx: &mut Transaction<'_, Any>,
    spec: &ServiceSpec,
    release: u64,
    slot: u32,
    prefer: Option<&str>,
    nodes: &[NodeFacts],
) -> Result<ReplicaRow, DeployError> {
    let all = all_replicas(tx).await?;
    let mut load: HashMap<&str, usize> = HashMap::new();
    for r in all.iter().filter(|r| r.service != spec.name) {
        *load.entry(r.node_id.as_str()).or_default() += 1;
    }
    let candidates: Vec<Candidate> = nodes
        .iter()
        .map(|n| Candidate {
            id: n.id.clone(),
            name: n.name.clone(),
            online: n.online,
            worker: n.worker,
            load: load.get(n.id.as_str()).copied().unwrap_or(0),
        })
        .collect();
    // Where the service's other replicas are (one per slot, newest first),
    // with this slot on the preferred node: placement keeps what is
    // eligible and spreads the rest.
    let mut existing: BTreeMap<u32, String> = BTreeMap::new();
    for r in all
        .iter()
        .filter(|r| r.service == spec.name && r.phase == Phase::Active && r.slot != slot)
    {
        existing.insert(r.slot, r.node_id.clone());
    }
    if let Some(p) = prefer {
        existing.insert(slot, p.to_string());
    }
    let mut want = spec.clone();
    want.replicas = want
        .replicas
        .max(slot + 1)
        .max(existing.keys().max().map_or(0, |m| m + 1));
    let plan = placement::place(&want, &existing, &candidates).map_err(DeployError::Placement)?;
    let node_id = plan
        .get(&slot)
        .cloned()
        .ok_or_else(|| DeployError::Placement(FieldError::new("replicas", "no online worker node to place them on")))?;
    let node = nodes
        .iter()
        .find(|n| n.id == node_id)
        .ok_or_else(|| DeployError::Placement(FieldError::new("nodes", "the chosen node vanished")))?;
    // Addresses go round the subnet from where the last one was handed
    // out: one freed a moment ago may still be held by the container
    // being stopped (and by Podman's IPAM, and by DNS caches).
    let used: HashSet<Ipv4Addr> = all.iter().map(|r| r.ip).collect();
    let cursor_key = format!("ip_cursor:{node_id}");
    let cursor: Option<Ipv4Addr> = sqlx::query("SELECT value FROM settings WHERE key = $1")
        .bind(&cursor_key)
        .fetch_optional(&mut **tx)
        .await?
        .and_then(|r| r.get::<String, _>(0).parse().ok());
    let ip = placement::next_container_ip_after(node.subnet, &used, cursor)
        .ok_or_else(|| DeployError::SubnetFull(node.name.clone()))?;
    sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2")
        .bind(&cursor_key)
        .bind(ip.to_string())
        .execute(&mut **tx)
        .await?;
    let seq: i64 = sqlx::query("SELECT next_replica FROM services WHERE name = $1")
        .bind(&spec.name)
        .fetch_one(&mut **tx)
        .await?
        .get(0);
    sqlx::query("UPDATE services SET next_replica = $1 WHERE name = $2")
        .bind(seq + 1)
        .bind(&spec.name)
        .execute(&mut **tx)
        .await?;
    let name = format!("{}-{seq}", spec.name);
    let created_ms = now_ms();
    sqlx::query(
        "INSERT INTO replicas (service, name, slot, release, phase, node_id, ip, state, created_ms, phase_ms) \
         VALUES ($1, $2, $3, $4, 'active', $5, $6, 'pending', $7, $7)",
    )
    .bind(&spec.name)
    .bind(&name)
    .bind(slot as i64)
    .bind(release as i64)
    .bind(&node_id)
    .bind(ip.to_string())
    .bind(created_ms)
    .execute(&mut **tx)
    .await?;
    Ok(ReplicaRow {
        service: spec.name.clone(),
        name,
        slot,
        release,
        phase: Phase::Active,
        node_id,
        ip,
        state: Some("pending".into()),
        healthy: false,
        restarts: 0,
        container_id: None,
        last_error: None,
        created_ms,
        healthy_since_ms: None,
        healthy_revision: None,
        phase_ms: created_ms,
        phase_revision: None,
        trouble: None,
        recreates: 0,
        gave_up: false,
    })
}

/// Takes a replica out of DNS and every route, at revision `rev`.
pub async fn drain_replica(tx: &mut Transaction<'_, Any>, service: &str, name: &str, rev: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE replicas SET phase = 'draining', phase_ms = $1, phase_revision = $2 WHERE service = $3 AND name = $4",
    )
    .bind(now_ms())
    .bind(rev)
    .bind(service)
    .bind(name)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn remove_replica(tx: &mut Transaction<'_, Any>, service: &str, name: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM replicas WHERE service = $1 AND name = $2")
        .bind(service)
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
