//! The store: one code path (sqlx `Any`) for SQLite and PostgreSQL.

pub mod builds;
pub mod events;
pub mod links;
pub mod nodes;
pub mod releases;
pub mod routes;
pub mod services;
pub mod tokens;
pub mod upgrades;
pub mod users;

use anyhow::Context;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};

#[derive(Clone)]
pub struct Store {
    pub pool: AnyPool,
    /// Which database the pool talks to (for the few things that differ).
    pub database: Database,
}

/// The database a store runs on, from its URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Database {
    Sqlite,
    Postgres,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Connects and runs the migrations. `url` is `sqlite://PATH` or `postgres://...`.
    pub async fn connect(url: &str) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let database = if url.starts_with("sqlite:") {
            Database::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Database::Postgres
        } else {
            anyhow::bail!("--database: {url:?} is neither sqlite://PATH nor postgres://...");
        };
        let url = match database {
            // Create the file on first start; WAL lets readers run beside the writer.
            Database::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let max = if database == Database::Sqlite { 8 } else { 16 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if database == Database::Sqlite {
                        sqlx::query("PRAGMA journal_mode=WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA synchronous=NORMAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout=5000").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA foreign_keys=ON").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .with_context(|| format!("connecting to the store at {}", redact(&url)))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .context("running store migrations")?;
        Ok(Store { pool, database })
    }

    pub async fn setting(&self, key: &str) -> sqlx::Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<String, _>(0)))
    }

    /// Sets a setting only if it is absent; returns the value that is stored.
    pub async fn setting_insert_if_absent(&self, key: &str, value: &str) -> sqlx::Result<String> {
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(self.setting(key).await?.unwrap_or_default())
    }

    pub async fn revision(&self) -> sqlx::Result<i64> {
        let row = sqlx::query("SELECT value FROM revision_counter WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<i64, _>(0))
    }

    /// Records a request nonce; `false` if it was seen before (a replay).
    pub async fn record_nonce(&self, node_id: &str, nonce: &str, expires_at: i64) -> sqlx::Result<bool> {
        inserted(
            sqlx::query("INSERT INTO nonces (node_id, nonce, expires_at) VALUES ($1, $2, $3)")
                .bind(node_id)
                .bind(nonce)
                .bind(expires_at)
                .execute(&self.pool)
                .await,
        )
    }

    /// Records nonces accepted from memory ([`crate::replay`]); ones
    /// already stored are skipped.
    pub async fn record_nonces(&self, batch: &[(String, String, i64)]) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in batch.chunks(300) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| format!("({})", params(3 * i + 1, 3)))
                .collect();
            let sql = format!(
                "INSERT INTO nonces (node_id, nonce, expires_at) VALUES {} ON CONFLICT DO NOTHING",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (node, nonce, exp) in chunk {
                q = q.bind(node).bind(nonce).bind(*exp);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    /// The nonces that are still unspent at `now`: (node id, nonce, expiry).
    pub async fn live_nonces(&self, now: i64) -> sqlx::Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query("SELECT node_id, nonce, expires_at FROM nonces WHERE expires_at >= $1")
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    /// Rows of `table` (`releases` or `builds`) by their `state`, for metrics.
    pub async fn count_by_state(&self, table: &'static str) -> sqlx::Result<Vec<(String, i64)>> {
        debug_assert!(matches!(table, "releases" | "builds"));
        let rows = sqlx::query(&format!(
            "SELECT state, COUNT(*) FROM {table} GROUP BY state ORDER BY state"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn count_rolling_back(&self) -> sqlx::Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM releases WHERE rolling_back = 1")
            .fetch_one(&self.pool)
            .await?
            .get(0))
    }

    pub async fn prune_nonces(&self, now: i64) -> sqlx::Result<u64> {
        Ok(sqlx::query("DELETE FROM nonces WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

/// Takes the next cluster revision inside `tx` (callers stamp it on the
/// nodes it concerns).
pub async fn next_revision(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> sqlx::Result<i64> {
    sqlx::query("UPDATE revision_counter SET value = value + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    Ok(sqlx::query("SELECT value FROM revision_counter WHERE id = 1")
        .fetch_one(&mut **tx)
        .await?
        .get(0))
}

/// Takes the next cluster revision inside `tx` and stamps it on every node.
/// Mesh changes affect every node's peer list, so every node moves.
pub async fn bump_all(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> sqlx::Result<i64> {
    let rev = next_revision(tx).await?;
    sqlx::query("UPDATE nodes SET revision = $1")
        .bind(rev)
        .execute(&mut **tx)
        .await?;
    Ok(rev)
}

pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// `$first, $first+1, …`: `n` numbered parameters, for statements built
/// for a batch.
pub(crate) fn params(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An INSERT's outcome as "was it new": false when the key was taken.
pub fn inserted<T>(res: sqlx::Result<T>) -> sqlx::Result<bool> {
    match res {
        Ok(_) => Ok(true),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// An error that may wrap a store error (so [`retry`] can tell whether the
/// transaction lost a race and is worth running again).
pub trait StoreFailure {
    fn store_error(&self) -> Option<&sqlx::Error>;
}

impl StoreFailure for sqlx::Error {
    fn store_error(&self) -> Option<&sqlx::Error> {
        Some(self)
    }
}

/// Runs a whole transaction again while it fails because a concurrent writer
/// won ([`is_retryable`]): up to 20 attempts, with a growing, jittered pause.
pub async fn retry<T, E, F, Fut>(mut transaction: F) -> Result<T, E>
where
    E: StoreFailure,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        match transaction().await {
            Err(e) if attempt < 20 && e.store_error().is_some_and(is_retryable) => {
                let jitter = rand::random::<u64>() % (5 * attempt);
                tokio::time::sleep(std::time::Duration::from_millis(2 + jitter)).await;
            }
            other => return other,
        }
    }
}

/// Errors worth retrying a whole transaction for: a concurrent writer won
/// (SQLite busy / Postgres serialization) or picked the same address.
pub fn is_retryable(e: &sqlx::Error) -> bool {
    if is_unique_violation(e) {
        return true;
    }
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code().unwrap_or_default();
            let msg = d.message();
            code == "5" || code == "517" || code == "40001" || code == "40P01" || msg.contains("database is locked")
        }
        _ => false,
    }
}

fn redact(url: &str) -> String {
    // Hide a password in postgres://user:pass@host/db.
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::redact("sqlite:///x.db"), "sqlite:///x.db");
    }
}
