//! Join tokens: single use, expiring, revocable. Only the secret's hash is stored.

use super::{now, Store};
use berth_protocol::token::JoinToken;
use berth_protocol::{Role, TokenInfo, TokenState};
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone)]
pub struct TokenRow {
    pub id: String,
    pub secret_hash: String,
    pub role: Role,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    pub used_at: Option<i64>,
    pub used_by: Option<String>,
}

/// A token just made: the only time its secret is seen.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub id: String,
    /// The full join token, `berth1.<id>.<secret>.<ca-hash>`.
    pub token: String,
    pub role: Role,
    pub expires_at: i64,
}

impl TokenRow {
    pub fn state(&self, now: i64) -> TokenState {
        if self.revoked_at.is_some() {
            TokenState::Revoked
        } else if self.used_at.is_some() {
            TokenState::Used
        } else if now >= self.expires_at {
            TokenState::Expired
        } else {
            TokenState::Valid
        }
    }

    fn from_row(r: &AnyRow) -> TokenRow {
        TokenRow {
            id: r.get("id"),
            secret_hash: r.get("secret_hash"),
            role: Role::parse(&r.get::<String, _>("role")).unwrap_or(Role::Worker),
            created_at: r.get("created_at"),
            expires_at: r.get("expires_at"),
            revoked_at: r.get("revoked_at"),
            used_at: r.get("used_at"),
            used_by: r.get("used_by"),
        }
    }

    pub fn info(&self, now: i64) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            role: self.role,
            created_at: self.created_at,
            expires_at: self.expires_at,
            state: self.state(now),
            used_by: self.used_by.clone(),
        }
    }
}

const COLUMNS: &str = "id, secret_hash, role, created_at, expires_at, revoked_at, used_at, used_by";

impl Store {
    pub async fn create_token(&self, role: Role, ttl_secs: i64, ca_hash: &str) -> sqlx::Result<IssuedToken> {
        let token = JoinToken::generate(ca_hash);
        let now = now();
        sqlx::query("INSERT INTO tokens (id, secret_hash, role, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&token.id)
            .bind(token.secret_hash())
            .bind(role.as_str())
            .bind(now)
            .bind(now + ttl_secs)
            .execute(&self.pool)
            .await?;
        Ok(IssuedToken {
            id: token.id.clone(),
            token: token.to_string(),
            role,
            expires_at: now + ttl_secs,
        })
    }

    pub async fn list_tokens(&self) -> sqlx::Result<Vec<TokenRow>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM tokens ORDER BY created_at, id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(TokenRow::from_row).collect())
    }

    pub async fn get_token<'e, E>(exec: E, id: &str) -> sqlx::Result<Option<TokenRow>>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM tokens WHERE id = $1"))
            .bind(id)
            .fetch_optional(exec)
            .await?;
        Ok(row.as_ref().map(TokenRow::from_row))
    }

    /// Revokes an unused token. Returns its state before, or None if unknown.
    pub async fn revoke_token(&self, id: &str) -> sqlx::Result<Option<TokenState>> {
        let Some(row) = Self::get_token(&self.pool, id).await? else {
            return Ok(None);
        };
        let state = row.state(now());
        if state == TokenState::Valid || state == TokenState::Expired {
            sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL")
                .bind(now())
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        Ok(Some(state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> TokenRow {
        TokenRow {
            id: "abcdefgh".into(),
            secret_hash: String::new(),
            role: Role::Worker,
            created_at: 100,
            expires_at: 200,
            revoked_at: None,
            used_at: None,
            used_by: None,
        }
    }

    #[test]
    fn lifecycle_states() {
        let mut t = row();
        assert_eq!(t.state(150), TokenState::Valid);
        assert_eq!(t.state(200), TokenState::Expired);
        t.used_at = Some(160);
        assert_eq!(t.state(170), TokenState::Used);
        assert_eq!(t.state(300), TokenState::Used, "a used token stays used after expiry");
        t.revoked_at = Some(180);
        assert_eq!(t.state(190), TokenState::Revoked);
    }
}
