//! Dashboard users (name and Argon2id hash) and their browser sessions
//! (keyed by the SHA-256 of the cookie's secret, never the secret).

use super::{inserted, Store};
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// SHA-256 (hex) of the cookie's secret.
    pub id: String,
    /// A user's name, or `admin` for a sign-in with the admin token.
    pub user: String,
    pub csrf: String,
    pub created_at: i64,
    pub expires_at: i64,
}

impl Store {
    /// Adds a user; false when the name is taken.
    pub async fn create_user(&self, name: &str, password_hash: &str, now: i64) -> sqlx::Result<bool> {
        inserted(
            sqlx::query("INSERT INTO users (name, password_hash, created_at) VALUES ($1, $2, $3)")
                .bind(name)
                .bind(password_hash)
                .bind(now)
                .execute(&self.pool)
                .await,
        )
    }

    pub async fn list_users(&self) -> sqlx::Result<Vec<UserRow>> {
        let rows = sqlx::query("SELECT name, created_at FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| UserRow {
                name: r.get(0),
                created_at: r.get(1),
            })
            .collect())
    }

    /// The user's password hash (PHC string), if there is such a user.
    pub async fn user_password_hash(&self, name: &str) -> sqlx::Result<Option<String>> {
        let row = sqlx::query("SELECT password_hash FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Removes a user and, in the same transaction, every session of it;
    /// returns how many sessions ended, or None when there is no such user.
    pub async fn delete_user(&self, name: &str) -> sqlx::Result<Option<u64>> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if gone == 0 {
            return Ok(None);
        }
        let ended = sqlx::query("DELETE FROM sessions WHERE user_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(Some(ended))
    }

    pub async fn create_session(&self, s: &SessionRow) -> sqlx::Result<()> {
        sqlx::query("INSERT INTO sessions (id, user_name, csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&s.id)
            .bind(&s.user)
            .bind(&s.csrf)
            .bind(s.created_at)
            .bind(s.expires_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The session `id` names, unless it has expired by `now` (an expired
    /// one is deleted on the way).
    pub async fn session(&self, id: &str, now: i64) -> sqlx::Result<Option<SessionRow>> {
        // A session opened while its user was being removed dies with it.
        let row = sqlx::query(
            "SELECT id, user_name, csrf, created_at, expires_at FROM sessions WHERE id = $1 \
             AND (user_name = $2 OR EXISTS (SELECT 1 FROM users WHERE users.name = sessions.user_name))",
        )
        .bind(id)
        .bind(berth_protocol::user::ADMIN_USER)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let s = SessionRow {
            id: r.get(0),
            user: r.get(1),
            csrf: r.get(2),
            created_at: r.get(3),
            expires_at: r.get(4),
        };
        if s.expires_at <= now {
            self.delete_session(id).await?;
            return Ok(None);
        }
        Ok(Some(s))
    }

    /// Ends a session; false when there was none.
    pub async fn delete_session(&self, id: &str) -> sqlx::Result<bool> {
        Ok(sqlx::query("DELETE FROM sessions WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }

    pub async fn prune_sessions(&self, now: i64) -> sqlx::Result<u64> {
        Ok(sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
