//! Rollouts of agent versions: the canary node is asked first; when it
//! reports the new version, every other node is asked too.

use super::{next_revision, now, retry, Store, StoreFailure};
use sqlx::Row;

/// What `berth nodes upgrade` started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub version: String,
    /// The node upgraded first.
    pub canary: String,
    /// Nodes that get the version once the canary reports it.
    pub waiting: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("canary: no node named {0:?}")]
    UnknownCanary(String),
    #[error("no nodes to upgrade")]
    NoNodes,
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

impl StoreFailure for UpgradeError {
    fn store_error(&self) -> Option<&sqlx::Error> {
        match self {
            UpgradeError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl Store {
    /// Asks `canary` (default: the first node by name) to run `version`, and
    /// records the rollout so the others follow once it reports the version.
    /// Returns the rollout and the new revision.
    pub async fn start_rollout(&self, version: &str, canary: Option<&str>) -> Result<(Rollout, i64), UpgradeError> {
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            let names: Vec<(String, String)> = sqlx::query("SELECT id, name FROM nodes ORDER BY name")
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let (canary_id, canary_name) = match canary {
                Some(c) => names
                    .iter()
                    .find(|(_, n)| n == c)
                    .cloned()
                    .ok_or_else(|| UpgradeError::UnknownCanary(c.to_string()))?,
                None => names.first().cloned().ok_or(UpgradeError::NoNodes)?,
            };
            // A newer request replaces any rollout still waiting for its canary.
            sqlx::query("DELETE FROM rollouts").execute(&mut *tx).await?;
            sqlx::query("INSERT INTO rollouts (version, canary_id, started_at) VALUES ($1, $2, $3)")
                .bind(version)
                .bind(&canary_id)
                .bind(now())
                .execute(&mut *tx)
                .await?;
            let rev = next_revision(&mut tx).await?;
            sqlx::query("UPDATE nodes SET target_version = $1, revision = $2 WHERE id = $3")
                .bind(version)
                .bind(rev)
                .bind(&canary_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            let waiting = names
                .into_iter()
                .filter(|(id, _)| *id != canary_id)
                .map(|(_, n)| n)
                .collect();
            Ok((
                Rollout {
                    version: version.to_string(),
                    canary: canary_name,
                    waiting,
                },
                rev,
            ))
        })
        .await
    }

    /// Called with every status report: when the canary of the open rollout
    /// reports its version, every other node is asked for it. Returns the
    /// new revision when that happened.
    pub async fn advance_rollout(&self, node_id: &str, agent_version: &str) -> sqlx::Result<Option<i64>> {
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            let done = sqlx::query("DELETE FROM rollouts WHERE canary_id = $1 AND version = $2")
                .bind(node_id)
                .bind(agent_version)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if done == 0 {
                return Ok(None);
            }
            let rev = next_revision(&mut tx).await?;
            sqlx::query("UPDATE nodes SET target_version = $1, revision = $2 WHERE id <> $3")
                .bind(agent_version)
                .bind(rev)
                .bind(node_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version = agent_version, "canary upgraded; upgrading the other nodes");
            Ok(Some(rev))
        })
        .await
    }
}
