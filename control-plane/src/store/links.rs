//! Git links (a service built from a repository's branch on every push)
//! and the webhook deliveries already acted on.

use super::{inserted, now, Store};
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRow {
    pub service: String,
    pub url: String,
    pub branch: String,
    pub context: Option<String>,
    pub dockerfile: Option<String>,
    pub secret_sealed: String,
    /// The builder's credential for the repository, sealed to the control plane's key.
    pub credential_sealed: Option<String>,
    pub known_hosts: Option<String>,
}

const COLUMNS: &str = "service, url, branch, context, dockerfile, secret_sealed, credential_sealed, known_hosts";

fn row(r: &sqlx::any::AnyRow) -> LinkRow {
    LinkRow {
        service: r.get(0),
        url: r.get(1),
        branch: r.get(2),
        context: r.get(3),
        dockerfile: r.get(4),
        secret_sealed: r.get(5),
        credential_sealed: r.get(6),
        known_hosts: r.get(7),
    }
}

impl Store {
    /// Links `l.service` (replacing its link, secret included).
    pub async fn set_link(&self, l: &LinkRow) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM git_links WHERE service = $1")
            .bind(&l.service)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO git_links (service, url, branch, context, dockerfile, secret_sealed, credential_sealed, \
             known_hosts, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&l.service)
        .bind(&l.url)
        .bind(&l.branch)
        .bind(&l.context)
        .bind(&l.dockerfile)
        .bind(&l.secret_sealed)
        .bind(&l.credential_sealed)
        .bind(&l.known_hosts)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    pub async fn get_link(&self, service: &str) -> sqlx::Result<Option<LinkRow>> {
        Ok(
            sqlx::query(&format!("SELECT {COLUMNS} FROM git_links WHERE service = $1"))
                .bind(service)
                .fetch_optional(&self.pool)
                .await?
                .as_ref()
                .map(row),
        )
    }

    pub async fn list_links(&self) -> sqlx::Result<Vec<LinkRow>> {
        Ok(
            sqlx::query(&format!("SELECT {COLUMNS} FROM git_links ORDER BY service"))
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(row)
                .collect(),
        )
    }

    /// False if there was none.
    pub async fn remove_link(&self, service: &str) -> sqlx::Result<bool> {
        let r = sqlx::query("DELETE FROM git_links WHERE service = $1")
            .bind(service)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Claims `delivery` (before acting on it, so two copies arriving at
    /// once build once); false if it was claimed before.
    pub async fn claim_delivery(&self, delivery: &str) -> sqlx::Result<bool> {
        inserted(
            sqlx::query("INSERT INTO hook_deliveries (delivery, builds, received_at) VALUES ($1, '[]', $2)")
                .bind(delivery)
                .bind(now())
                .execute(&self.pool)
                .await,
        )
    }

    pub async fn set_delivery_builds(&self, delivery: &str, builds: &[u64]) -> sqlx::Result<()> {
        sqlx::query("UPDATE hook_deliveries SET builds = $2 WHERE delivery = $1")
            .bind(delivery)
            .bind(serde_json::to_string(builds).unwrap_or_default())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets a claimed delivery that built nothing, so a redelivery may.
    pub async fn forget_delivery(&self, delivery: &str) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM hook_deliveries WHERE delivery = $1")
            .bind(delivery)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The builds an earlier `delivery` made, if it was seen.
    pub async fn delivery(&self, delivery: &str) -> sqlx::Result<Option<Vec<u64>>> {
        Ok(sqlx::query("SELECT builds FROM hook_deliveries WHERE delivery = $1")
            .bind(delivery)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| serde_json::from_str(&r.get::<String, _>(0)).unwrap_or_default()))
    }
}
