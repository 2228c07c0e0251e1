//! Services and replicas: deploy, scale, remove, and the health reported by nodes.

use super::{bump_all, now, retry, Store, StoreFailure};
use crate::placement::{self, Candidate};
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
    /// The spec with `secrets` emptied.
    pub spec: ServiceSpec,
    /// The secrets as a JSON map, sealed to the control plane's key.
    pub secrets_sealed: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ReplicaRow {
    pub service: String,
    pub ordinal: u32,
    pub node_id: String,
    pub ip: Ipv4Addr,
    pub state: Option<String>,
    pub healthy: bool,
    pub restarts: u32,
    pub container_id: Option<String>,
    pub last_error: Option<String>,
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
        format!("{}-{}", self.service, self.ordinal + 1)
    }

    fn from_row(r: &AnyRow) -> ReplicaRow {
        ReplicaRow {
            service: r.get("service"),
            ordinal: r.get::<i64, _>("ordinal") as u32,
            node_id: r.get("node_id"),
            ip: r.get::<String, _>("ip").parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            state: r.get("state"),
            healthy: r.get::<i64, _>("healthy") != 0,
            restarts: r.get::<i64, _>("restarts") as u32,
            container_id: r.get("container_id"),
            last_error: r.get("last_error"),
        }
    }
}

const REPLICA_COLUMNS: &str = "service, ordinal, node_id, ip, state, healthy, restarts, container_id, last_error";

/// What [`Store::deploy_service`] does with the service's stored secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretsUpdate {
    /// Leave them as they are (a scale, or a deploy that gives none).
    Keep,
    /// Replace them with this JSON map, sealed to the control plane's key.
    Set(String),
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
    }
}

impl Store {
    pub async fn list_services(&self) -> sqlx::Result<Vec<ServiceRow>> {
        let rows = sqlx::query("SELECT name, spec_json, secrets_sealed FROM services ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(service_from_row).collect())
    }

    pub async fn list_replicas(&self) -> sqlx::Result<Vec<ReplicaRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {REPLICA_COLUMNS} FROM replicas ORDER BY service, ordinal"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(ReplicaRow::from_row).collect())
    }

    /// Creates or updates a service and places its replicas; returns the
    /// new revision. `spec.secrets` is not stored: the secrets come sealed,
    /// in `secrets`.
    pub async fn deploy_service(
        &self,
        spec: &ServiceSpec,
        secrets: &SecretsUpdate,
        offline_after: i64,
    ) -> Result<i64, DeployError> {
        retry(|| self.try_deploy(spec, secrets, offline_after)).await
    }

    async fn try_deploy(
        &self,
        spec: &ServiceSpec,
        secrets: &SecretsUpdate,
        offline_after: i64,
    ) -> Result<i64, DeployError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        // Serialise writers (see register_node).
        sqlx::query("UPDATE revision_counter SET value = value WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let mut stored = spec.clone();
        stored.secrets.clear();
        let json = serde_json::to_string(&stored)?;
        let exists = sqlx::query("SELECT secrets_sealed FROM services WHERE name = $1")
            .bind(&spec.name)
            .fetch_optional(&mut *tx)
            .await?;
        let new_secrets = match secrets {
            SecretsUpdate::Keep => None,
            SecretsUpdate::Set(sealed) => Some(sealed.clone()),
        };
        match exists {
            Some(row) => {
                let sealed: Option<String> = new_secrets.or_else(|| row.get(0));
                sqlx::query("UPDATE services SET spec_json = $1, secrets_sealed = $2, updated_at = $3 WHERE name = $4")
                    .bind(&json)
                    .bind(sealed)
                    .bind(now)
                    .bind(&spec.name)
                    .execute(&mut *tx)
                    .await?;
            }
            None => {
                sqlx::query(
                    "INSERT INTO services (name, spec_json, secrets_sealed, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)",
                )
                .bind(&spec.name)
                .bind(&json)
                .bind(new_secrets)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        replan(&mut tx, &stored, offline_after, true).await?;
        let rev = bump_all(&mut tx).await?;
        tx.commit().await?;
        Ok(rev)
    }

    pub async fn get_service(&self, name: &str) -> sqlx::Result<Option<ServiceRow>> {
        let row = sqlx::query("SELECT name, spec_json, secrets_sealed FROM services WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(service_from_row))
    }

    /// Removes a service and its replicas. Refused (nothing changed) while a
    /// domain or TCP route still sends traffic to it: removing those first
    /// is an explicit choice, not a side effect.
    pub async fn remove_service(&self, name: &str) -> sqlx::Result<RemoveService> {
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
        sqlx::query("DELETE FROM replicas WHERE service = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let rev = bump_all(&mut tx).await?;
        tx.commit().await?;
        Ok(RemoveService::Removed(rev))
    }

    /// Records what a node reports about its containers. Returns the new
    /// revision when a replica's health changed (DNS everywhere must follow).
    pub async fn record_containers(&self, node_id: &str, report: &[ContainerStatus]) -> sqlx::Result<Option<i64>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!("SELECT {REPLICA_COLUMNS} FROM replicas WHERE node_id = $1"))
            .bind(node_id)
            .fetch_all(&mut *tx)
            .await?;
        let mine: Vec<ReplicaRow> = rows.iter().map(ReplicaRow::from_row).collect();
        let mut health_changed = false;
        for r in &mine {
            let Some(st) = report.iter().find(|s| s.replica == r.name()) else {
                continue;
            };
            if st.healthy != r.healthy {
                health_changed = true;
            }
            if st.healthy == r.healthy
                && Some(&st.state) == r.state.as_ref()
                && st.restarts == r.restarts
                && st.container_id == r.container_id
                && st.error == r.last_error
            {
                continue;
            }
            sqlx::query(
                "UPDATE replicas SET state = $1, healthy = $2, restarts = $3, container_id = $4, last_error = $5 \
                 WHERE service = $6 AND ordinal = $7 AND node_id = $8",
            )
            .bind(&st.state)
            .bind(st.healthy as i64)
            .bind(st.restarts as i64)
            .bind(&st.container_id)
            .bind(&st.error)
            .bind(&r.service)
            .bind(r.ordinal as i64)
            .bind(node_id)
            .execute(&mut *tx)
            .await?;
        }
        let rev = if health_changed {
            Some(bump_all(&mut tx).await?)
        } else {
            None
        };
        tx.commit().await?;
        Ok(rev)
    }
}

/// Re-places one service's replicas inside `tx`: keeps what can stay,
/// drops what is gone, adds what is missing with a fresh IP on its node.
/// With `strict` false (node removal), a service that no longer fits
/// keeps whatever replicas still have a node instead of failing.
pub async fn replan(
    tx: &mut Transaction<'_, Any>,
    spec: &ServiceSpec,
    offline_after: i64,
    strict: bool,
) -> Result<(), DeployError> {
    let now = now();
    let nodes = sqlx::query("SELECT id, name, role, last_seen, subnet FROM nodes")
        .fetch_all(&mut **tx)
        .await?;
    let all = sqlx::query(&format!("SELECT {REPLICA_COLUMNS} FROM replicas"))
        .fetch_all(&mut **tx)
        .await?;
    let all: Vec<ReplicaRow> = all.iter().map(ReplicaRow::from_row).collect();
    let mut load: HashMap<String, usize> = HashMap::new();
    for r in all.iter().filter(|r| r.service != spec.name) {
        *load.entry(r.node_id.clone()).or_default() += 1;
    }
    let mut subnets: HashMap<String, (String, Ipv4Net)> = HashMap::new();
    let candidates: Vec<Candidate> = nodes
        .iter()
        .map(|n| {
            let id: String = n.get("id");
            subnets.insert(
                id.clone(),
                (n.get("name"), n.get::<String, _>("subnet").parse().unwrap_or_default()),
            );
            Candidate {
                name: n.get("name"),
                online: n
                    .get::<Option<i64>, _>("last_seen")
                    .is_some_and(|t| now - t <= offline_after),
                worker: n.get::<String, _>("role") == "worker",
                load: load.get(&id).copied().unwrap_or(0),
                id,
            }
        })
        .collect();
    let existing: BTreeMap<u32, String> = all
        .iter()
        .filter(|r| r.service == spec.name)
        .map(|r| (r.ordinal, r.node_id.clone()))
        .collect();
    let plan = match placement::place(spec, &existing, &candidates) {
        Ok(p) => p,
        Err(e) if strict => return Err(DeployError::Placement(e)),
        Err(_) => existing
            .iter()
            .filter(|(_, id)| subnets.contains_key(*id))
            .map(|(o, id)| (*o, id.clone()))
            .collect(),
    };
    for (ordinal, node) in &existing {
        if plan.get(ordinal) != Some(node) {
            sqlx::query("DELETE FROM replicas WHERE service = $1 AND ordinal = $2")
                .bind(&spec.name)
                .bind(*ordinal as i64)
                .execute(&mut **tx)
                .await?;
        }
    }
    let mut used: HashSet<Ipv4Addr> = all
        .iter()
        .filter(|r| r.service != spec.name || plan.get(&r.ordinal) == Some(&r.node_id))
        .map(|r| r.ip)
        .collect();
    for (ordinal, node) in &plan {
        if existing.get(ordinal) == Some(node) {
            continue;
        }
        let (node_name, subnet) = subnets.get(node).cloned().unwrap_or_default();
        let ip = placement::next_container_ip(subnet, &used).ok_or(DeployError::SubnetFull(node_name))?;
        used.insert(ip);
        sqlx::query("INSERT INTO replicas (service, ordinal, node_id, ip, state) VALUES ($1, $2, $3, $4, 'pending')")
            .bind(&spec.name)
            .bind(*ordinal as i64)
            .bind(node)
            .bind(ip.to_string())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// After a node is removed: moves the replicas it held to other nodes.
pub async fn replan_after_node_removal(tx: &mut Transaction<'_, Any>, offline_after: i64) -> Result<(), DeployError> {
    let rows = sqlx::query("SELECT name, spec_json, secrets_sealed FROM services")
        .fetch_all(&mut **tx)
        .await?;
    for s in rows.iter().map(service_from_row) {
        replan(tx, &s.spec, offline_after, false).await?;
    }
    Ok(())
}
