//! Builds (see `berth_protocol::build`): created `uploading`, `queued` once
//! the context is stored, `running` once a builder claimed it, then final.
//! Each move is one conditional UPDATE, so two control-plane tasks (or a
//! builder and a cancel) never both win.

use super::{is_unique_violation, now, Store};
use berth_protocol::build::{BuildRequest, BuildState};
use sqlx::Row;

#[derive(Debug, Clone)]
pub struct BuildRow {
    pub id: u64,
    pub service: String,
    pub state: BuildState,
    pub request: BuildRequest,
    pub secrets_sealed: Option<String>,
    pub arch: String,
    pub created_by: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub node_id: Option<String>,
    pub context_bytes: Option<u64>,
    pub image: Option<String>,
    pub release: Option<u64>,
    pub error: Option<String>,
    pub timeout_secs: u32,
    pub commit: Option<String>,
    /// The multi-platform build this is one platform of.
    pub parent: Option<u64>,
}

const COLUMNS: &str = "id, service, state, request_json, secrets_sealed, arch, created_by, created_at, \
     started_at, finished_at, node_id, context_bytes, image, release_number, error, timeout_secs, git_commit, parent_id";

fn row(r: &sqlx::any::AnyRow) -> sqlx::Result<BuildRow> {
    let state: String = r.get(2);
    let json: String = r.get(3);
    Ok(BuildRow {
        id: r.get::<i64, _>(0) as u64,
        service: r.get(1),
        state: BuildState::parse(&state).ok_or_else(|| sqlx::Error::Decode(format!("build state {state:?}").into()))?,
        request: serde_json::from_str(&json).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        secrets_sealed: r.get(4),
        arch: r.get(5),
        created_by: r.get(6),
        created_at: r.get(7),
        started_at: r.get(8),
        finished_at: r.get(9),
        node_id: r.get(10),
        context_bytes: r.get::<Option<i64>, _>(11).map(|b| b as u64),
        image: r.get(12),
        release: r.get::<Option<i64>, _>(13).map(|n| n as u64),
        error: r.get(14),
        timeout_secs: r.get::<i64, _>(15) as u32,
        commit: r.get(16),
        parent: r.get::<Option<i64>, _>(17).map(|p| p as u64),
    })
}

impl Store {
    /// Stores a new build, `uploading` (or `queued` for a git build, which
    /// has nothing to upload), one platform of `parent` if given; returns
    /// its ID.
    pub async fn create_build(
        &self,
        request: &BuildRequest,
        secrets_sealed: Option<&str>,
        arch: &str,
        created_by: &str,
        timeout_secs: u32,
        parent: Option<u64>,
    ) -> anyhow::Result<u64> {
        let json = serde_json::to_string(request)?;
        // IDs are small and sequential (people type them); a concurrent
        // create takes the same one and tries the next.
        for _ in 0..50 {
            let next: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) + 1 FROM builds")
                .fetch_one(&self.pool)
                .await?
                .get(0);
            let res = sqlx::query(
                "INSERT INTO builds (id, service, state, request_json, secrets_sealed, arch, created_by, created_at, \
                 timeout_secs, parent_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(next)
            .bind(&request.spec.name)
            .bind(if request.git.is_some() { "queued" } else { "uploading" })
            .bind(&json)
            .bind(secrets_sealed)
            .bind(arch)
            .bind(created_by)
            .bind(now())
            .bind(timeout_secs as i64)
            .bind(parent.map(|p| p as i64))
            .execute(&self.pool)
            .await;
            match res {
                Ok(_) => return Ok(next as u64),
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("could not take a build ID")
    }

    pub async fn get_build(&self, id: u64) -> sqlx::Result<Option<BuildRow>> {
        sqlx::query(&format!("SELECT {COLUMNS} FROM builds WHERE id = $1"))
            .bind(id as i64)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(row)
            .transpose()
    }

    /// Newest first; `limit` rows at most.
    pub async fn list_builds(&self, service: Option<&str>, limit: u32) -> sqlx::Result<Vec<BuildRow>> {
        let rows = match service {
            Some(s) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM builds WHERE service = $1 ORDER BY id DESC LIMIT $2"
                ))
                .bind(s)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM builds ORDER BY id DESC LIMIT $1"))
                    .bind(limit as i64)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(row).collect()
    }

    /// `uploading` → `queued` with the context's size; false if it was not uploading.
    pub async fn build_uploaded(&self, id: u64, bytes: u64) -> sqlx::Result<bool> {
        let r =
            sqlx::query("UPDATE builds SET state = 'queued', context_bytes = $2 WHERE id = $1 AND state = 'uploading'")
                .bind(id as i64)
                .bind(bytes as i64)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Claims the oldest queued build of `arch` for `node_id` (→ `running`).
    pub async fn claim_build(&self, node_id: &str, arch: &str) -> sqlx::Result<Option<BuildRow>> {
        for _ in 0..10 {
            let Some(id) =
                sqlx::query("SELECT id FROM builds WHERE state = 'queued' AND arch = $1 ORDER BY id LIMIT 1")
                    .bind(arch)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(|r| r.get::<i64, _>(0))
            else {
                return Ok(None);
            };
            let r = sqlx::query(
                "UPDATE builds SET state = 'running', node_id = $2, started_at = $3 WHERE id = $1 AND state = 'queued'",
            )
            .bind(id)
            .bind(node_id)
            .bind(now())
            .execute(&self.pool)
            .await?;
            if r.rows_affected() == 1 {
                return self.get_build(id as u64).await;
            }
            // Another builder took it: try the next.
        }
        Ok(None)
    }

    /// Ends a build that is not over yet; false if it already was.
    pub async fn finish_build(
        &self,
        id: u64,
        state: BuildState,
        error: Option<&str>,
        image: Option<&str>,
        release: Option<u64>,
    ) -> sqlx::Result<bool> {
        debug_assert!(state.is_final());
        let r = sqlx::query(
            "UPDATE builds SET state = $2, error = $3, image = $4, release_number = $5, finished_at = $6 \
             WHERE id = $1 AND state IN ('uploading', 'queued', 'running')",
        )
        .bind(id as i64)
        .bind(state.as_str())
        .bind(error)
        .bind(image)
        .bind(release.map(|n| n as i64))
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records the commit a running git build built.
    pub async fn set_build_commit(&self, id: u64, commit: &str) -> sqlx::Result<()> {
        sqlx::query("UPDATE builds SET git_commit = $2 WHERE id = $1 AND state = 'running'")
            .bind(id as i64)
            .bind(commit)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The platforms of multi-platform build `parent`, in order.
    pub async fn build_parts(&self, parent: u64) -> sqlx::Result<Vec<BuildRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM builds WHERE parent_id = $1 ORDER BY id"
        ))
        .bind(parent as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row)
        .collect()
    }

    /// A multi-platform build is `running` once a builder took one of its
    /// platforms (nothing claims the build itself).
    pub async fn parent_started(&self, id: u64) -> sqlx::Result<()> {
        sqlx::query("UPDATE builds SET state = 'running', started_at = $2 WHERE id = $1 AND state = 'queued'")
            .bind(id as i64)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Builds not over yet, for the timeout sweep.
    pub async fn unfinished_builds(&self) -> sqlx::Result<Vec<BuildRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM builds WHERE state IN ('uploading', 'queued', 'running') ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row)
        .collect()
    }
}
