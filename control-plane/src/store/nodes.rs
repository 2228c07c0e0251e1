//! Nodes: registration (token use + address allocation in one transaction),
//! heartbeats, listing and removal.

use super::{bump_all, now, retry, Store, StoreFailure};
use crate::alloc;
use berth_protocol::event::EventKind;
use berth_protocol::{Role, StatusReport, TokenState};
use ipnet::Ipv4Net;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub signing_key: String,
    pub wg_public_key: String,
    pub wg_port: u16,
    pub private_addr: Option<Ipv4Net>,
    pub public_ip: Option<IpAddr>,
    pub mesh_ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub revision: i64,
    pub applied_revision: i64,
    pub last_seen: Option<i64>,
    pub agent_version: Option<String>,
    pub last_error: Option<String>,
    pub sealing_key: Option<String>,
    /// Version `berth nodes upgrade` asked this node to run.
    pub target_version: Option<String>,
}

const COLUMNS: &str = "id, name, role, signing_key, wg_public_key, wg_port, private_addr, public_ip, \
     mesh_ip, subnet, revision, applied_revision, last_seen, agent_version, last_error, sealing_key, target_version";
// status_json (a peer list as long as the fleet, which reports once carried
// into the store) is no longer written or read: peers are kept in memory.

/// What [`Store::record_seen`] did with a batch: the nodes `written`, the
/// `busy` ones (their rows locked by a change in flight: try again), and
/// by elimination the refused ones (the store holds another report).
#[derive(Debug, Default)]
pub struct SeenWritten {
    pub written: HashSet<String>,
    pub busy: HashSet<String>,
}

/// Online: reported within `offline_after` seconds of `now`. The one rule
/// behind `berth nodes list`, placement, proxy counts and the node watcher.
pub fn seen_recently(last_seen: Option<i64>, now: i64, offline_after: i64) -> bool {
    last_seen.is_some_and(|t| now - t <= offline_after)
}

impl NodeRow {
    /// See [`seen_recently`].
    pub fn online(&self, now: i64, offline_after: i64) -> bool {
        seen_recently(self.last_seen, now, offline_after)
    }

    fn from_row(r: &AnyRow) -> NodeRow {
        let opt = |c: &str| r.get::<Option<String>, _>(c);
        NodeRow {
            id: r.get("id"),
            name: r.get("name"),
            role: Role::parse(&r.get::<String, _>("role")).unwrap_or(Role::Worker),
            signing_key: r.get("signing_key"),
            wg_public_key: r.get("wg_public_key"),
            wg_port: r.get::<i64, _>("wg_port") as u16,
            private_addr: opt("private_addr").and_then(|s| s.parse().ok()),
            public_ip: opt("public_ip").and_then(|s| s.parse().ok()),
            mesh_ip: r.get::<String, _>("mesh_ip").parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            subnet: r.get::<String, _>("subnet").parse().unwrap_or_default(),
            revision: r.get("revision"),
            applied_revision: r.get("applied_revision"),
            last_seen: r.get("last_seen"),
            agent_version: opt("agent_version"),
            last_error: opt("last_error"),
            sealing_key: opt("sealing_key"),
            target_version: opt("target_version"),
        }
    }
}

/// The name of node `id` in `nodes` (empty if it is gone).
pub fn name_of(nodes: &[NodeRow], id: &str) -> String {
    nodes
        .iter()
        .find(|n| n.id == id)
        .map(|n| n.name.clone())
        .unwrap_or_default()
}

/// Everything registration needs, already validated by the API layer.
#[derive(Debug, Clone)]
pub struct NewNode {
    pub token_id: String,
    pub token_secret_hash: String,
    pub name: String,
    pub proxy: bool,
    pub signing_key: String,
    pub wg_public_key: String,
    pub wg_port: u16,
    pub private_addr: Option<Ipv4Net>,
    pub public_ip: Option<IpAddr>,
    pub sealing_key: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct Pools {
    pub mesh: Ipv4Net,
    pub subnets: Ipv4Net,
    pub subnet_prefix: u8,
}

/// Why registration was refused; the API maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("token: unknown")]
    UnknownToken,
    /// Used, revoked or expired (never [`TokenState::Valid`]).
    #[error("token: {}", unusable(*.0))]
    TokenNotUsable(TokenState),
    #[error("proxy: the token is for a {token} node but the agent was started {flag}")]
    RoleMismatch { token: &'static str, flag: &'static str },
    #[error("name: a node named {0:?} already exists")]
    NameTaken(String),
    #[error("{0}: this key is already registered to another node")]
    KeyTaken(&'static str),
    #[error("no free {0} left in the pool; widen it with --{0}-pool")]
    PoolExhausted(&'static str),
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

fn unusable(state: TokenState) -> &'static str {
    match state {
        TokenState::Used => "already used",
        TokenState::Revoked => "revoked",
        TokenState::Expired | TokenState::Valid => "expired",
    }
}

impl StoreFailure for RegisterError {
    fn store_error(&self) -> Option<&sqlx::Error> {
        match self {
            RegisterError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl Store {
    pub async fn list_nodes(&self) -> sqlx::Result<Vec<NodeRow>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM nodes ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(NodeRow::from_row).collect())
    }

    pub async fn get_node(&self, id: &str) -> sqlx::Result<Option<NodeRow>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM nodes WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(NodeRow::from_row))
    }

    /// Consumes the token, allocates addresses and inserts the node, all in
    /// one transaction; retried when a concurrent registration won a race.
    /// Returns the new node and the revision it was registered at.
    pub async fn register_node(&self, new: &NewNode, pools: Pools) -> Result<(NodeRow, i64), RegisterError> {
        retry(|| self.try_register(new, pools)).await
    }

    async fn try_register(&self, new: &NewNode, pools: Pools) -> Result<(NodeRow, i64), RegisterError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        // Take the write lock first (SQLite) / the revision counter's row lock
        // (Postgres; bump_all takes it anyway). Without it concurrent
        // registrations all pick the same lowest free address and only one
        // per round commits, so a burst of joins ran out of retries.
        sqlx::query("UPDATE revision_counter SET value = value WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let taken = sqlx::query(
            "UPDATE tokens SET used_at = $1, used_by = $2 \
             WHERE id = $3 AND secret_hash = $4 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $1",
        )
        .bind(now)
        .bind(&new.name)
        .bind(&new.token_id)
        .bind(&new.token_secret_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let token = Store::get_token(&mut *tx, &new.token_id).await?;
        let token = match token {
            Some(t) if t.secret_hash == new.token_secret_hash => t,
            _ => return Err(RegisterError::UnknownToken),
        };
        if taken != 1 {
            return Err(RegisterError::TokenNotUsable(match token.state(now) {
                TokenState::Valid => TokenState::Expired,
                s => s,
            }));
        }
        let flag_role = if new.proxy { Role::Proxy } else { Role::Worker };
        if token.role != flag_role {
            return Err(RegisterError::RoleMismatch {
                token: token.role.as_str(),
                flag: if new.proxy { "with --proxy" } else { "without --proxy" },
            });
        }
        let existing = sqlx::query("SELECT name, signing_key, wg_public_key, mesh_ip, subnet FROM nodes")
            .fetch_all(&mut *tx)
            .await?;
        let mut used_ips = HashSet::new();
        let mut used_nets = HashSet::new();
        for r in &existing {
            if r.get::<String, _>(0) == new.name {
                return Err(RegisterError::NameTaken(new.name.clone()));
            }
            if r.get::<String, _>(1) == new.signing_key {
                return Err(RegisterError::KeyTaken("signing_key"));
            }
            if r.get::<String, _>(2) == new.wg_public_key {
                return Err(RegisterError::KeyTaken("wg_public_key"));
            }
            if let Ok(ip) = r.get::<String, _>(3).parse::<Ipv4Addr>() {
                used_ips.insert(ip);
            }
            if let Ok(net) = r.get::<String, _>(4).parse::<Ipv4Net>() {
                used_nets.insert(net);
            }
        }
        let mesh_ip = alloc::next_mesh_ip(pools.mesh, &used_ips).ok_or(RegisterError::PoolExhausted("mesh"))?;
        let subnet = alloc::next_subnet(pools.subnets, pools.subnet_prefix, &used_nets)
            .ok_or(RegisterError::PoolExhausted("subnet"))?;
        let id = format!("n{}", hex::encode(rand::random::<[u8; 8]>()));
        sqlx::query(
            "INSERT INTO nodes (id, name, role, signing_key, wg_public_key, wg_port, private_addr, public_ip, \
             mesh_ip, subnet, revision, applied_revision, created_at, sealing_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, 0, $11, $12)",
        )
        .bind(&id)
        .bind(&new.name)
        .bind(token.role.as_str())
        .bind(&new.signing_key)
        .bind(&new.wg_public_key)
        .bind(new.wg_port as i64)
        .bind(new.private_addr.map(|n| n.to_string()))
        .bind(new.public_ip.map(|n| n.to_string()))
        .bind(mesh_ip.to_string())
        .bind(subnet.to_string())
        .bind(now)
        .bind(&new.sealing_key)
        .execute(&mut *tx)
        .await?;
        let message = format!(
            "{} joined as a {} ({mesh_ip}, subnet {subnet})",
            new.name,
            token.role.as_str()
        );
        super::events::record(&mut tx, EventKind::Node, None, Some(&new.name), &message).await?;
        let rev = bump_all(&mut tx).await?;
        tx.commit().await?;
        let node = self.get_node(&id).await?.ok_or(sqlx::Error::RowNotFound)?;
        Ok((node, rev))
    }

    /// Removes a node; every other node's peer list changes. Returns the new
    /// revision, or None if there was no such node.
    pub async fn remove_node(&self, name: &str, offline_after: i64) -> sqlx::Result<Option<i64>> {
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            let gone = sqlx::query("DELETE FROM nodes WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 0 {
                return Ok(None);
            }
            // Its replicas move to other nodes.
            sqlx::query("DELETE FROM replicas WHERE node_id NOT IN (SELECT id FROM nodes)")
                .execute(&mut *tx)
                .await?;
            super::releases::refill_after_node_removal(&mut tx, offline_after).await?;
            super::events::record(&mut tx, EventKind::Node, None, Some(name), &format!("{name} removed")).await?;
            let rev = bump_all(&mut tx).await?;
            tx.commit().await?;
            Ok(Some(rev))
        })
        .await
    }

    /// Records a status report, and its `fingerprint` (see
    /// [`crate::heartbeats`]). Its peers are not stored: they grow with
    /// the fleet and change with every report (the usage board keeps the
    /// last ones in memory). The domains a proxy serves come with every
    /// report and replace the stored list.
    pub async fn record_status(&self, node_id: &str, report: &StatusReport, fingerprint: u64) -> sqlx::Result<()> {
        let served = report
            .served_domains
            .as_ref()
            .map(|d| serde_json::to_string(d).unwrap_or_default());
        sqlx::query(
            "UPDATE nodes SET last_seen = $1, applied_revision = $2, agent_version = $3, \
             last_error = $4, served_domains = $5, report_fingerprint = $6 WHERE id = $7",
        )
        .bind(now())
        .bind(report.applied_revision as i64)
        .bind(&report.agent_version)
        .bind(report.error.as_ref().or(report.upgrade_error.as_ref()))
        .bind(served)
        .bind(fingerprint as i64)
        .bind(node_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes the reports' times and applied revisions kept in memory by
    /// [`crate::heartbeats`], each only where the store still holds the
    /// report it repeats (its fingerprint) and no newer time.
    pub async fn record_seen(
        &self,
        seen: &std::collections::HashMap<String, crate::heartbeats::Seen>,
    ) -> sqlx::Result<SeenWritten> {
        // The batch goes as one JSON parameter, `[[id, at, applied,
        // fingerprint], ...]`: one statement text whatever its size (so it
        // is prepared once), and no thousands of parameters to bind.
        let rows_from = match self.database {
            super::Database::Sqlite => "json_each($1)",
            super::Database::Postgres => "json_array_elements(CAST($1 AS JSON))",
        };
        let batch = |ids: &[&String]| {
            let rows: Vec<_> = ids
                .iter()
                .map(|&id| {
                    let s = &seen[id];
                    (id, s.at, s.applied_revision, s.fingerprint as i64)
                })
                .collect();
            serde_json::to_string(&rows).unwrap_or_default()
        };
        let mut out = SeenWritten::default();
        let mut tx = self.pool.begin().await?;
        let mut ids: Vec<&String> = seen.keys().collect();
        if self.database == super::Database::Postgres {
            // A change locks every node's row (`bump_all`), in an order of
            // its own: the batch waits for no row, so the two never
            // deadlock. A row it could not lock is tried again later.
            let locked: HashSet<String> = sqlx::query(&format!(
                "SELECT id FROM nodes WHERE id IN (SELECT value ->> 0 FROM {rows_from}) FOR UPDATE SKIP LOCKED"
            ))
            .bind(batch(&ids))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<sqlx::Result<_>>()?;
            let (free, busy): (Vec<&String>, Vec<&String>) = ids.into_iter().partition(|id| locked.contains(*id));
            out.busy = busy.into_iter().cloned().collect();
            ids = free;
        }
        if !ids.is_empty() {
            let sql = format!(
                "WITH v AS (SELECT value ->> 0 AS id, CAST(value ->> 1 AS BIGINT) AS at, \
                 CAST(value ->> 2 AS BIGINT) AS applied, CAST(value ->> 3 AS BIGINT) AS fingerprint \
                 FROM {rows_from}) \
                 UPDATE nodes SET last_seen = v.at, applied_revision = v.applied FROM v \
                 WHERE nodes.id = v.id AND nodes.report_fingerprint = v.fingerprint \
                 AND (nodes.last_seen IS NULL OR nodes.last_seen <= v.at) RETURNING nodes.id"
            );
            for row in sqlx::query(&sql).bind(batch(&ids)).fetch_all(&mut *tx).await? {
                out.written.insert(row.try_get::<String, _>(0)?);
            }
        }
        tx.commit().await?;
        Ok(out)
    }
}
