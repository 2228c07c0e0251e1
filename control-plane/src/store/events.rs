//! The event stream's rows. Events are written inside the transaction of
//! the change they tell of, so one is stored exactly when its change is.

use super::Store;
use berth_protocol::event::{Event, EventKind};
use sqlx::{Any, Row, Transaction};
use std::sync::atomic::{AtomicI64, Ordering};

static LAST_ID: AtomicI64 = AtomicI64::new(0);

/// The time in microseconds, above every id this process gave before.
fn next_id() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let mut last = LAST_ID.load(Ordering::Relaxed);
    loop {
        let id = now.max(last + 1);
        match LAST_ID.compare_exchange(last, id, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return id,
            Err(seen) => last = seen,
        }
    }
}

fn from_row(r: &sqlx::any::AnyRow) -> Event {
    Event {
        id: r.get("id"),
        at_ms: r.get("at_ms"),
        kind: EventKind::parse(&r.get::<String, _>("kind")),
        service: r.get("service"),
        node: r.get("node"),
        message: r.get("message"),
    }
}

/// Records an event in `tx`.
pub async fn record(
    tx: &mut Transaction<'_, Any>,
    kind: EventKind,
    service: Option<&str>,
    node: Option<&str>,
    message: &str,
) -> sqlx::Result<()> {
    let id = next_id();
    sqlx::query("INSERT INTO events (id, at_ms, kind, service, node, message) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(id)
        .bind(id / 1000)
        .bind(kind.as_str())
        .bind(service)
        .bind(node)
        .bind(message)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl Store {
    /// Records an event on its own (a change with no transaction of its own).
    pub async fn record_event(
        &self,
        kind: EventKind,
        service: Option<&str>,
        node: Option<&str>,
        message: &str,
    ) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        record(&mut tx, kind, service, node, message).await?;
        tx.commit().await
    }

    /// Events after `after` (oldest first), at most `limit`; only
    /// `service`'s when given.
    pub async fn events_after(&self, after: i64, service: Option<&str>, limit: u32) -> sqlx::Result<Vec<Event>> {
        let rows = match service {
            Some(s) => {
                sqlx::query(
                    "SELECT id, at_ms, kind, service, node, message FROM events \
                     WHERE id > $1 AND service = $2 ORDER BY id LIMIT $3",
                )
                .bind(after)
                .bind(s)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT id, at_ms, kind, service, node, message FROM events WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .bind(after)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows.iter().map(from_row).collect())
    }

    /// The last `n` events (oldest first); only `service`'s when given.
    pub async fn events_tail(&self, n: u32, service: Option<&str>) -> sqlx::Result<Vec<Event>> {
        let rows = match service {
            Some(s) => {
                sqlx::query(
                    "SELECT id, at_ms, kind, service, node, message FROM events WHERE service = $1 \
                     ORDER BY id DESC LIMIT $2",
                )
                .bind(s)
                .bind(n as i64)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query("SELECT id, at_ms, kind, service, node, message FROM events ORDER BY id DESC LIMIT $1")
                    .bind(n as i64)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut out: Vec<Event> = rows.iter().map(from_row).collect();
        out.reverse();
        Ok(out)
    }

    /// Keeps the newest `keep` events and deletes the older ones.
    pub async fn prune_events(&self, keep: u64) -> sqlx::Result<u64> {
        let cut = sqlx::query("SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET $1")
            .bind(keep as i64)
            .fetch_optional(&self.pool)
            .await?;
        let Some(cut) = cut else { return Ok(0) };
        let cut: i64 = cut.get(0);
        Ok(sqlx::query("DELETE FROM events WHERE id <= $1")
            .bind(cut)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// The newest event's id (0 when there is none).
    pub async fn last_event_id(&self) -> sqlx::Result<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_only_go_up() {
        let a = super::next_id();
        let b = super::next_id();
        let c = super::next_id();
        assert!(a < b && b < c);
    }
}
