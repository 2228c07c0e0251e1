//! Releases and their rollouts: a deploy, scale or rollback makes a
//! release; [`Store::drive_rollout`] moves a rolling one on, one
//! transaction per step, with what [`crate::rollout::machine::step`] decides.

use super::services::{
    all_replicas, drain_replica, node_facts, now_ms, remove_replica, start_replica, DeployError, NodeFacts, Phase,
    ReplicaRow, SecretsUpdate,
};
use super::{bump_all, events, now, retry, Store};
use crate::rollout::machine::{self, Action, Rollout};
use berth_protocol::event::EventKind;
use berth_protocol::release::{ReleaseInfo, ReleaseState, RolloutInfo, RolloutStep, StepStage};
use berth_protocol::service::ServiceSpec;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

#[derive(Debug, Clone)]
pub struct ReleaseRow {
    pub service: String,
    pub number: u64,
    /// Without secret values.
    pub spec: ServiceSpec,
    pub secrets_sealed: Option<String>,
    pub image_digest: Option<String>,
    pub created_at: i64,
    pub created_by: String,
    pub state: ReleaseState,
    pub reason: Option<String>,
    pub finished_at: Option<i64>,
    pub rollout: bool,
    pub from_release: Option<u64>,
    pub rolling_back: bool,
    pub floor: u32,
    pub steps: Vec<RolloutStep>,
    /// Replace every replica even though the spec is the one running.
    pub restart: bool,
}

const RELEASE_COLUMNS: &str = "service, number, spec_json, secrets_sealed, image_digest, created_at, created_by, \
     state, reason, finished_at, rollout, from_release, rolling_back, floor, steps_json, restart";

impl ReleaseRow {
    fn from_row(r: &AnyRow) -> ReleaseRow {
        ReleaseRow {
            service: r.get("service"),
            number: r.get::<i64, _>("number") as u64,
            spec: serde_json::from_str(&r.get::<String, _>("spec_json")).unwrap_or_default(),
            secrets_sealed: r.get("secrets_sealed"),
            image_digest: r.get("image_digest"),
            created_at: r.get("created_at"),
            created_by: r.get("created_by"),
            state: ReleaseState::parse(&r.get::<String, _>("state")).unwrap_or(ReleaseState::Failed),
            reason: r.get("reason"),
            finished_at: r.get("finished_at"),
            rollout: r.get::<i64, _>("rollout") != 0,
            from_release: r.get::<Option<i64>, _>("from_release").map(|n| n as u64),
            rolling_back: r.get::<i64, _>("rolling_back") != 0,
            floor: r.get::<i64, _>("floor") as u32,
            steps: r
                .get::<Option<String>, _>("steps_json")
                .and_then(|j| serde_json::from_str(&j).ok())
                .unwrap_or_default(),
            restart: r.get::<i64, _>("restart") != 0,
        }
    }

    pub fn info(&self) -> ReleaseInfo {
        ReleaseInfo {
            service: self.service.clone(),
            number: self.number,
            spec: self.spec.clone(),
            image_digest: self.image_digest.clone(),
            created_at: self.created_at,
            created_by: self.created_by.clone(),
            state: self.state,
            reason: self.reason.clone(),
            finished_at: self.finished_at,
            rollout: self.rollout,
        }
    }

    /// The release every replica should end up on, while this one drives.
    fn target(&self) -> u64 {
        match (self.rolling_back, self.from_release) {
            (true, Some(from)) => from,
            _ => self.number,
        }
    }

    pub fn rollout_info(&self) -> RolloutInfo {
        let stop_first = stop_first(&self.spec);
        RolloutInfo {
            service: self.service.clone(),
            release: self.number,
            from_release: self.from_release,
            state: self.state,
            rolling_back: self.rolling_back,
            batch: if stop_first {
                self.spec.rollout.max_unavailable.max(1)
            } else {
                self.spec.rollout.max_surge.max(self.spec.rollout.max_unavailable)
            },
            stop_first,
            reason: self.reason.clone(),
            steps: self.steps.clone(),
        }
    }
}

/// Services with volumes keep their data on one node: the old replica must
/// stop before the new one mounts it.
pub fn stop_first(spec: &ServiceSpec) -> bool {
    !spec.volumes.is_empty()
}

/// Who asked for a release, and why (history shows both).
#[derive(Debug, Clone)]
pub struct Origin {
    pub created_by: String,
    pub reason: Option<String>,
    /// Replace a rollout in progress instead of queueing behind it.
    pub force: bool,
    /// Replace every replica, even with the spec unchanged.
    pub restart: bool,
}

async fn release_in(tx: &mut Transaction<'_, Any>, service: &str, number: u64) -> sqlx::Result<Option<ReleaseRow>> {
    let row = sqlx::query(&format!(
        "SELECT {RELEASE_COLUMNS} FROM releases WHERE service = $1 AND number = $2"
    ))
    .bind(service)
    .bind(number as i64)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.as_ref().map(ReleaseRow::from_row))
}

async fn set_state(
    tx: &mut Transaction<'_, Any>,
    service: &str,
    number: u64,
    state: ReleaseState,
    reason: Option<&str>,
) -> sqlx::Result<()> {
    let finished = state.is_final().then(now);
    if state.is_final() {
        let message = match reason {
            Some(r) => format!("release {number} {}: {r}", state.as_str()),
            None => format!("release {number} {}", state.as_str()),
        };
        events::record(tx, EventKind::Release, Some(service), None, &message).await?;
    }
    sqlx::query(
        "UPDATE releases SET state = $1, reason = COALESCE($2, reason), finished_at = COALESCE($3, finished_at) \
         WHERE service = $4 AND number = $5",
    )
    .bind(state.as_str())
    .bind(reason)
    .bind(finished)
    .bind(service)
    .bind(number as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn serving(r: &ReplicaRow, nodes: &[NodeFacts]) -> bool {
    r.phase == Phase::Active && r.healthy && nodes.iter().any(|n| n.id == r.node_id && n.online)
}

/// Every online node has loaded `rev`.
fn loaded_everywhere(rev: Option<i64>, nodes: &[NodeFacts]) -> bool {
    match rev {
        None => false,
        Some(rev) => nodes.iter().filter(|n| n.online).all(|n| n.applied_revision >= rev),
    }
}

fn machine_view(replicas: &[ReplicaRow], nodes: &[NodeFacts]) -> Vec<machine::Replica> {
    replicas
        .iter()
        .map(|r| machine::Replica {
            name: r.name.clone(),
            slot: r.slot,
            release: r.release,
            phase: r.phase,
            node_online: nodes.iter().any(|n| n.id == r.node_id && n.online),
            healthy: r.healthy,
            healthy_since_ms: r.healthy_since_ms,
            routed: r.healthy && loaded_everywhere(r.healthy_revision, nodes),
            unrouted: r.phase == Phase::Draining && loaded_everywhere(r.phase_revision, nodes),
            created_ms: r.created_ms,
            phase_ms: r.phase_ms,
            restarts: r.restarts,
            gave_up: r.gave_up,
            trouble: r.trouble.clone(),
        })
        .collect()
}

/// What one transaction of the driver did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stepped {
    /// The revision it made (replicas changed), if any.
    pub revision: Option<i64>,
    /// The release reached a final state (or finished rolling back).
    pub finished: bool,
}

impl Store {
    /// Makes a new release of `spec` and starts it: rolled out when it needs
    /// new containers, applied at once when only the count changed, queued
    /// behind a rollout in progress (or replacing it, with `force`).
    /// Returns the new revision and the release number. Nothing is stored
    /// when its first replicas cannot be placed.
    pub async fn deploy_service(
        &self,
        spec: &ServiceSpec,
        secrets: &SecretsUpdate,
        offline_after: i64,
        origin: &Origin,
    ) -> Result<(i64, u64), DeployError> {
        retry(|| self.try_deploy(spec, secrets, offline_after, origin)).await
    }

    async fn try_deploy(
        &self,
        spec: &ServiceSpec,
        secrets: &SecretsUpdate,
        offline_after: i64,
        origin: &Origin,
    ) -> Result<(i64, u64), DeployError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        // Serialise writers (see register_node).
        sqlx::query("UPDATE revision_counter SET value = value WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let mut stored = spec.clone();
        stored.secrets.clear();
        let json = serde_json::to_string(&stored)?;
        let existing = sqlx::query("SELECT secrets_sealed, latest_release FROM services WHERE name = $1")
            .bind(&spec.name)
            .fetch_optional(&mut *tx)
            .await?;
        let (sealed, number) = match &existing {
            Some(row) => {
                let sealed: Option<String> = match secrets {
                    SecretsUpdate::Keep => row.get(0),
                    SecretsUpdate::Set(s) => Some(s.clone()),
                    SecretsUpdate::Clear => None,
                };
                (sealed, row.get::<i64, _>(1) as u64 + 1)
            }
            None => {
                let sealed = match secrets {
                    SecretsUpdate::Keep | SecretsUpdate::Clear => None,
                    SecretsUpdate::Set(s) => Some(s.clone()),
                };
                sqlx::query(
                    "INSERT INTO services (name, spec_json, secrets_sealed, created_at, updated_at, latest_release, next_replica) \
                     VALUES ($1, $2, $3, $4, $4, 0, 1)",
                )
                .bind(&spec.name)
                .bind(&json)
                .bind(&sealed)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                (sealed, 1)
            }
        };
        sqlx::query(
            "UPDATE services SET spec_json = $1, secrets_sealed = $2, updated_at = $3, latest_release = $4 WHERE name = $5",
        )
        .bind(&json)
        .bind(&sealed)
        .bind(now)
        .bind(number as i64)
        .bind(&spec.name)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO releases (service, number, spec_json, secrets_sealed, created_at, created_by, state, reason, restart) \
             VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8)",
        )
        .bind(&spec.name)
        .bind(number as i64)
        .bind(&json)
        .bind(&sealed)
        .bind(now)
        .bind(&origin.created_by)
        .bind(&origin.reason)
        .bind(i64::from(origin.restart))
        .execute(&mut *tx)
        .await?;
        let what = match &origin.reason {
            Some(r) => format!("release {number}: {r}"),
            None => format!("release {number}: {} × {}", spec.replicas, spec.image),
        };
        events::record(
            &mut tx,
            EventKind::Deploy,
            Some(&spec.name),
            None,
            &format!("{what} (by {})", origin.created_by),
        )
        .await?;
        // A restart waiting in the queue is not lost when overtaken: the
        // new release replaces every replica too.
        sqlx::query(
            "UPDATE releases SET restart = 1 WHERE service = $1 AND number = $2 AND EXISTS \
             (SELECT 1 FROM releases q WHERE q.service = $1 AND q.state = 'queued' AND q.restart <> 0 AND q.number <> $2)",
        )
        .bind(&spec.name)
        .bind(number as i64)
        .execute(&mut *tx)
        .await?;
        // Whatever waited in the queue is overtaken by this one.
        let superseded = format!("superseded by release {number} before it started");
        sqlx::query("UPDATE releases SET state = 'failed', reason = $1, finished_at = $2 WHERE service = $3 AND state = 'queued' AND number <> $4")
            .bind(&superseded)
            .bind(now)
            .bind(&spec.name)
            .bind(number as i64)
            .execute(&mut *tx)
            .await?;
        let running = sqlx::query(
            "SELECT number FROM releases WHERE service = $1 AND (state = 'rolling' OR rolling_back = 1) AND number <> $2",
        )
        .bind(&spec.name)
        .bind(number as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut changed = false;
        if running.is_empty() || origin.force {
            for r in &running {
                let n: i64 = r.get(0);
                let why = format!("replaced by release {number} (--force)");
                sqlx::query(
                    "UPDATE releases SET state = CASE WHEN state = 'rolling' THEN 'failed' ELSE state END, \
                     reason = CASE WHEN state = 'rolling' THEN $1 ELSE reason END, rolling_back = 0, \
                     finished_at = $2 WHERE service = $3 AND number = $4",
                )
                .bind(&why)
                .bind(now)
                .bind(&spec.name)
                .bind(n)
                .execute(&mut *tx)
                .await?;
            }
            changed = begin_release(&mut tx, &spec.name, number, offline_after).await?;
        }
        let rev = if changed || existing.is_none() {
            bump_all(&mut tx).await?
        } else {
            super::next_revision(&mut tx).await?
        };
        fix_drain_revisions(&mut tx, &spec.name, rev).await?;
        tx.commit().await?;
        Ok((rev, number))
    }

    pub async fn list_releases(&self, service: &str) -> sqlx::Result<Vec<ReleaseRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE service = $1 ORDER BY number DESC"
        ))
        .bind(service)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(ReleaseRow::from_row).collect())
    }

    /// The releases some replica runs, for the nodes' desired state.
    pub async fn releases_in_use(&self) -> sqlx::Result<Vec<ReleaseRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases r WHERE EXISTS \
             (SELECT 1 FROM replicas p WHERE p.service = r.service AND p.release = r.number)"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(ReleaseRow::from_row).collect())
    }

    /// Releases a driver should move on: rolling ones, ones rolling back,
    /// and services with draining replicas or a queue and nothing rolling.
    pub async fn releases_to_drive(&self) -> sqlx::Result<Vec<(String, u64)>> {
        let rows = sqlx::query(
            "SELECT service, number FROM releases WHERE state = 'rolling' OR rolling_back = 1 \
             UNION SELECT s.name, s.latest_release FROM services s WHERE EXISTS \
             (SELECT 1 FROM replicas p WHERE p.service = s.name AND p.phase = 'draining') \
             OR EXISTS (SELECT 1 FROM releases q WHERE q.service = s.name AND q.state = 'queued')",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1) as u64))
            .collect())
    }

    /// Takes (or renews) the right to drive a service's rollouts until
    /// `until_ms`: one control-plane process at a time, as for ACME orders.
    pub async fn lease_rollout(&self, service: &str, owner: &str, now_ms: i64, until_ms: i64) -> sqlx::Result<bool> {
        let got = sqlx::query(
            "UPDATE releases SET lease_until = $1, lease_owner = $2 WHERE service = $3 \
             AND number = (SELECT latest_release FROM services WHERE name = $3) \
             AND (lease_until < $4 OR lease_owner = $2)",
        )
        .bind(until_ms)
        .bind(owner)
        .bind(service)
        .bind(now_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(got > 0)
    }

    /// One step of `service`'s rollout (and its drain sweep and queue).
    pub async fn drive_rollout(&self, service: &str, offline_after: i64) -> Result<Stepped, DeployError> {
        retry(|| self.try_drive(service, offline_after)).await
    }

    async fn try_drive(&self, service: &str, offline_after: i64) -> Result<Stepped, DeployError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE revision_counter SET value = value WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let nodes = node_facts(&mut tx, offline_after).await?;
        let now_ms = now_ms();
        let mut out = Stepped::default();
        let mut changed = false;
        let rolling = sqlx::query(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE service = $1 AND (state = 'rolling' OR rolling_back = 1) \
             ORDER BY number DESC"
        ))
        .bind(service)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(ReleaseRow::from_row);
        let replicas: Vec<ReplicaRow> = all_replicas(&mut tx)
            .await?
            .into_iter()
            .filter(|r| r.service == service)
            .collect();
        match rolling {
            Some(rel) => {
                let target = rel.target();
                let spec = match release_in(&mut tx, service, target).await? {
                    Some(t) => t.spec,
                    None => rel.spec.clone(),
                };
                let policy = rel.spec.rollout;
                let m = Rollout {
                    target,
                    want: spec.replicas,
                    policy,
                    stop_first: stop_first(&rel.spec) || stop_first(&spec),
                    floor: rel.floor,
                    rolling_back: rel.rolling_back,
                };
                let view = machine_view(&replicas, &nodes);
                let actions = machine::step(&m, &view, now_ms);
                for a in &actions {
                    match a {
                        Action::StartNew { slot } => {
                            let prefer = replicas
                                .iter()
                                .filter(|r| r.slot == *slot)
                                .max_by_key(|r| r.created_ms)
                                .map(|r| r.node_id.clone());
                            start_replica(&mut tx, &spec, target, *slot, prefer.as_deref(), &nodes).await?;
                            changed = true;
                        }
                        Action::Drain { name } => {
                            drain_replica(&mut tx, service, name, 0).await?;
                            changed = true;
                        }
                        Action::Remove { name } => {
                            remove_replica(&mut tx, service, name).await?;
                            changed = true;
                        }
                        Action::Fail { reason } => {
                            tracing::warn!(%service, release = rel.number, %reason, "rollout failed");
                            self.fail(&mut tx, &rel, reason, &replicas, &nodes).await?;
                            out.finished = rel.rolling_back || rel.from_release.is_none();
                        }
                        Action::Complete => {
                            if rel.rolling_back {
                                sqlx::query("UPDATE releases SET rolling_back = 0, finished_at = $1 WHERE service = $2 AND number = $3")
                                    .bind(now())
                                    .bind(service)
                                    .bind(rel.number as i64)
                                    .execute(&mut *tx)
                                    .await?;
                                tracing::info!(%service, release = rel.number, back_to = target, "rolled back");
                                let message = format!("release {} rolled back to release {target}", rel.number);
                                events::record(&mut tx, EventKind::Release, Some(service), None, &message).await?;
                            } else {
                                if let Some(prev) = rel.from_release {
                                    if rel.reason.as_deref().is_some_and(|r| r.starts_with("rollback to")) {
                                        set_state(&mut tx, service, prev, ReleaseState::RolledBack, None).await?;
                                    }
                                }
                                set_state(&mut tx, service, rel.number, ReleaseState::Complete, None).await?;
                                sqlx::query("UPDATE services SET current_release = $1 WHERE name = $2")
                                    .bind(rel.number as i64)
                                    .bind(service)
                                    .execute(&mut *tx)
                                    .await?;
                                tracing::info!(%service, release = rel.number, "rollout complete");
                            }
                            out.finished = true;
                        }
                    }
                }
                // Progress, with the time each slot reached each stage.
                let after: Vec<ReplicaRow> = all_replicas(&mut tx)
                    .await?
                    .into_iter()
                    .filter(|r| r.service == service)
                    .collect();
                let failed_now = actions.iter().any(|a| matches!(a, Action::Fail { .. }));
                let steps = if rel.rolling_back || failed_now {
                    // The failed release's steps stay as they ended; those
                    // not done are marked failed.
                    let mut steps = rel.steps.clone();
                    for st in steps
                        .iter_mut()
                        .filter(|s| s.stage != StepStage::Done && s.stage != StepStage::Failed)
                    {
                        st.stage = StepStage::Failed;
                        st.times.push((StepStage::Failed, now_ms));
                    }
                    steps
                } else {
                    let stages = machine::stages(&m, &machine_view(&after, &nodes), now_ms);
                    merge_steps(&rel.steps, &stages, &after, &nodes, out.finished, now_ms)
                };
                for st in &steps {
                    let before = rel.steps.iter().find(|b| b.slot == st.slot);
                    if before.is_none_or(|b| b.stage != st.stage || b.new_replica != st.new_replica) {
                        let who = st.new_replica.as_deref().or(st.old_replica.as_deref()).unwrap_or("-");
                        let message = format!("release {} slot {}: {who} {}", rel.number, st.slot, st.stage.as_str());
                        events::record(&mut tx, EventKind::Rollout, Some(service), st.node.as_deref(), &message)
                            .await?;
                    }
                }
                if steps != rel.steps {
                    sqlx::query("UPDATE releases SET steps_json = $1 WHERE service = $2 AND number = $3")
                        .bind(serde_json::to_string(&steps)?)
                        .bind(service)
                        .bind(rel.number as i64)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            None => {
                // Draining replicas of a finished rollout or a scale-down go
                // once drained; the next queued release starts.
                for r in &replicas {
                    if r.phase != Phase::Draining {
                        continue;
                    }
                    let drain_ms = match release_in(&mut tx, service, r.release).await? {
                        Some(rel) => i64::from(rel.spec.rollout.drain_secs) * 1000,
                        None => 0,
                    };
                    let off_node = !nodes.iter().any(|n| n.id == r.node_id);
                    if off_node || loaded_everywhere(r.phase_revision, &nodes) && now_ms - r.phase_ms >= drain_ms {
                        remove_replica(&mut tx, service, &r.name).await?;
                        changed = true;
                    }
                }
            }
        }
        let queued =
            sqlx::query("SELECT number FROM releases WHERE service = $1 AND state = 'queued' ORDER BY number LIMIT 1")
                .bind(service)
                .fetch_optional(&mut *tx)
                .await?;
        let still_rolling =
            sqlx::query("SELECT 1 FROM releases WHERE service = $1 AND (state = 'rolling' OR rolling_back = 1)")
                .bind(service)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
        if let (Some(q), false) = (queued, still_rolling) {
            let n = q.get::<i64, _>(0) as u64;
            match begin_release(&mut tx, service, n, offline_after).await {
                Ok(c) => changed |= c,
                Err(DeployError::Placement(e)) => {
                    set_state(&mut tx, service, n, ReleaseState::Failed, Some(&e.to_string())).await?;
                }
                Err(e) => return Err(e),
            }
        }
        if changed {
            let rev = bump_all(&mut tx).await?;
            fix_drain_revisions(&mut tx, service, rev).await?;
            out.revision = Some(rev);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The release failed: its replicas that never served go at once, and
    /// the rollout turns back to the last complete release (or, when it
    /// was the first one or the way back failed too, ends).
    async fn fail(
        &self,
        tx: &mut Transaction<'_, Any>,
        rel: &ReleaseRow,
        reason: &str,
        replicas: &[ReplicaRow],
        nodes: &[NodeFacts],
    ) -> sqlx::Result<()> {
        let service = &rel.service;
        if rel.rolling_back {
            let why = format!(
                "{}; rolling back failed too: {reason}",
                rel.reason.clone().unwrap_or_default()
            );
            sqlx::query("UPDATE releases SET rolling_back = 0, reason = $1, finished_at = $2 WHERE service = $3 AND number = $4")
                .bind(why)
                .bind(now())
                .bind(service)
                .bind(rel.number as i64)
                .execute(&mut **tx)
                .await?;
            return Ok(());
        }
        let serving_now = replicas.iter().filter(|r| serving(r, nodes)).count() as u32;
        let back = match rel.from_release {
            Some(from) => release_in(tx, service, from).await?,
            None => None,
        };
        let want = back.as_ref().map_or(0, |b| b.spec.replicas);
        let mu = rel.spec.rollout.max_unavailable;
        let floor = serving_now.min(want).saturating_sub(mu);
        sqlx::query(
            "UPDATE releases SET state = 'failed', reason = $1, finished_at = $2, rolling_back = $3, floor = $4 \
             WHERE service = $5 AND number = $6",
        )
        .bind(reason)
        .bind(now())
        .bind(back.is_some() as i64)
        .bind(floor as i64)
        .bind(service)
        .bind(rel.number as i64)
        .execute(&mut **tx)
        .await?;
        if back.is_none() {
            // Nothing to go back to: the failed replicas go.
            for r in replicas.iter().filter(|r| r.phase == Phase::Active) {
                drain_replica(tx, service, &r.name, 0).await?;
            }
        }
        Ok(())
    }
}

/// Starts release `number` (queued until now): a scale is applied at once
/// and completes; anything else becomes a rollout and takes its first step.
/// Returns whether replicas changed.
async fn begin_release(
    tx: &mut Transaction<'_, Any>,
    service: &str,
    number: u64,
    offline_after: i64,
) -> Result<bool, DeployError> {
    let rel = release_in(tx, service, number)
        .await?
        .ok_or(DeployError::Store(sqlx::Error::RowNotFound))?;
    let current: Option<u64> = sqlx::query("SELECT current_release FROM services WHERE name = $1")
        .bind(service)
        .fetch_one(&mut **tx)
        .await?
        .get::<Option<i64>, _>(0)
        .map(|n| n as u64);
    let cur = match current {
        Some(c) => release_in(tx, service, c).await?,
        None => None,
    };
    let nodes = node_facts(tx, offline_after).await?;
    let replicas: Vec<ReplicaRow> = all_replicas(tx)
        .await?
        .into_iter()
        .filter(|r| r.service == service)
        .collect();
    let active: Vec<&ReplicaRow> = replicas.iter().filter(|r| r.phase == Phase::Active).collect();
    let same_containers = !rel.restart
        && cur.as_ref().is_some_and(|c| {
            !c.spec.needs_new_containers(&rel.spec)
                && c.secrets_sealed == rel.secrets_sealed
                && active.iter().all(|r| r.release == c.number || r.release == number)
        });
    let pinned_elsewhere = |r: &ReplicaRow| {
        !rel.spec.nodes.is_empty()
            && !nodes
                .iter()
                .any(|n| n.id == r.node_id && rel.spec.nodes.contains(&n.name))
    };
    let mut changed = false;
    if same_containers && !active.iter().any(|r| pinned_elsewhere(r)) {
        // A scale: new slots get replicas, extra slots drain. No rollout.
        // The replicas that stay now run this release (their containers
        // are the same), so a later rollback to it keeps them.
        let want = rel.spec.replicas;
        sqlx::query("UPDATE replicas SET release = $1 WHERE service = $2 AND phase = 'active'")
            .bind(number as i64)
            .bind(service)
            .execute(&mut **tx)
            .await?;
        for r in &active {
            if r.slot >= want {
                drain_replica(tx, service, &r.name, 0).await?;
                changed = true;
            }
        }
        for slot in 0..want {
            if !active.iter().any(|r| r.slot == slot) {
                start_replica(tx, &rel.spec, number, slot, None, &nodes).await?;
                changed = true;
            }
        }
        let reason = rel.reason.clone().unwrap_or_else(|| match cur.as_ref() {
            Some(c) if c.spec.replicas != want => format!("scale {} → {want}", c.spec.replicas),
            _ => "no container changes".into(),
        });
        sqlx::query("UPDATE releases SET state = 'complete', reason = $1, finished_at = $2, rollout = 0, from_release = $3 WHERE service = $4 AND number = $5")
            .bind(reason)
            .bind(now())
            .bind(current.map(|c| c as i64))
            .bind(service)
            .bind(number as i64)
            .execute(&mut **tx)
            .await?;
        sqlx::query("UPDATE services SET current_release = $1 WHERE name = $2")
            .bind(number as i64)
            .bind(service)
            .execute(&mut **tx)
            .await?;
        return Ok(changed);
    }
    // A rollout: what serves now, minus what may go missing, must remain.
    let serving_now = active.iter().filter(|r| serving(r, &nodes)).count() as u32;
    let mu = if stop_first(&rel.spec) {
        rel.spec.rollout.max_unavailable.max(1)
    } else {
        rel.spec.rollout.max_unavailable
    };
    let floor = serving_now.min(rel.spec.replicas).saturating_sub(mu);
    sqlx::query(
        "UPDATE releases SET state = 'rolling', rollout = 1, from_release = $1, floor = $2 WHERE service = $3 AND number = $4",
    )
    .bind(current.map(|c| c as i64))
    .bind(floor as i64)
    .bind(service)
    .bind(number as i64)
    .execute(&mut **tx)
    .await?;
    // The first step now, so that a deploy that cannot be placed is refused.
    let m = Rollout {
        target: number,
        want: rel.spec.replicas,
        policy: rel.spec.rollout,
        stop_first: stop_first(&rel.spec),
        floor,
        rolling_back: false,
    };
    let actions = machine::step(&m, &machine_view(&replicas, &nodes), now_ms());
    for a in actions {
        match a {
            Action::StartNew { slot } => {
                let prefer = replicas
                    .iter()
                    .filter(|r| r.slot == slot)
                    .max_by_key(|r| r.created_ms)
                    .map(|r| r.node_id.clone());
                start_replica(tx, &rel.spec, number, slot, prefer.as_deref(), &nodes).await?;
                changed = true;
            }
            Action::Drain { name } => {
                drain_replica(tx, service, &name, 0).await?;
                changed = true;
            }
            Action::Remove { name } => {
                remove_replica(tx, service, &name).await?;
                changed = true;
            }
            Action::Fail { .. } | Action::Complete => {}
        }
    }
    if rel.spec.replicas == 0 && !changed {
        set_state(tx, service, number, ReleaseState::Complete, None).await?;
    }
    Ok(changed)
}

/// Drains were marked with revision 0 inside the transaction; stamp the
/// revision that actually tells the nodes.
async fn fix_drain_revisions(tx: &mut Transaction<'_, Any>, service: &str, rev: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE replicas SET phase_revision = $1 WHERE service = $2 AND phase = 'draining' AND phase_revision = 0",
    )
    .bind(rev)
    .bind(service)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

type Stages = std::collections::BTreeMap<u32, (Option<String>, Option<String>, StepStage)>;

/// The rollout's steps after this pass: each slot's current stage, with the
/// time it first reached each stage.
fn merge_steps(
    before: &[RolloutStep],
    stages: &Stages,
    replicas: &[ReplicaRow],
    nodes: &[NodeFacts],
    finished: bool,
    now_ms: i64,
) -> Vec<RolloutStep> {
    let node_name = |id: &str| nodes.iter().find(|n| n.id == id).map(|n| n.name.clone());
    let mut out: Vec<RolloutStep> = vec![];
    for (slot, (new, old, stage)) in stages {
        let prev = before.iter().find(|s| s.slot == *slot);
        let mut step = prev.cloned().unwrap_or(RolloutStep {
            slot: *slot,
            new_replica: None,
            old_replica: None,
            node: None,
            stage: StepStage::Waiting,
            times: vec![],
        });
        if new.is_some() {
            step.new_replica = new.clone();
        }
        if old.is_some() {
            step.old_replica = old.clone();
        }
        let on = step
            .new_replica
            .as_ref()
            .or(step.old_replica.as_ref())
            .and_then(|n| replicas.iter().find(|r| &r.name == n))
            .and_then(|r| node_name(&r.node_id));
        if on.is_some() {
            step.node = on;
        }
        let mut stage = *stage;
        if finished && stage != StepStage::Failed && step.new_replica.is_some() && old.is_none() {
            stage = StepStage::Done;
        }
        // A slot whose old replica is gone once routed is done.
        if stage == StepStage::Waiting
            && step.new_replica.is_some()
            && prev.is_some_and(|p| p.stage == StepStage::Draining)
        {
            stage = StepStage::Done;
        }
        if step.times.last().map(|(s, _)| *s) != Some(stage) {
            step.times.push((stage, now_ms));
        }
        step.stage = stage;
        out.push(step);
    }
    out
}

/// After a node was removed: the slots its replicas held get new replicas
/// of the service's current release elsewhere (a rollout in progress
/// refills them itself). A service that no longer fits keeps what it has.
pub async fn refill_after_node_removal(tx: &mut Transaction<'_, Any>, offline_after: i64) -> sqlx::Result<()> {
    let nodes = node_facts(tx, offline_after).await?;
    let services = sqlx::query("SELECT name, current_release FROM services")
        .fetch_all(&mut **tx)
        .await?;
    for s in services {
        let name: String = s.get(0);
        let Some(current) = s.get::<Option<i64>, _>(1).map(|n| n as u64) else {
            continue;
        };
        let rolling =
            sqlx::query("SELECT 1 FROM releases WHERE service = $1 AND (state = 'rolling' OR rolling_back = 1)")
                .bind(&name)
                .fetch_optional(&mut **tx)
                .await?
                .is_some();
        let Some(rel) = release_in(tx, &name, current).await? else {
            continue;
        };
        if rolling {
            continue;
        }
        let replicas = all_replicas(tx).await?;
        for slot in 0..rel.spec.replicas {
            let held = replicas
                .iter()
                .any(|r| r.service == name && r.slot == slot && r.phase == Phase::Active);
            if held {
                continue;
            }
            match start_replica(tx, &rel.spec, current, slot, None, &nodes).await {
                Ok(_) => {}
                Err(DeployError::Store(e)) => return Err(e),
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "a replica of the removed node could not be moved");
                    break;
                }
            }
        }
    }
    Ok(())
}
