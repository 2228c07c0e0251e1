//! Public routes: domains (with their certificates), TCP routes, and the
//! ACME challenges every proxy answers while an order is pending. Changes
//! here only move the revision of proxy nodes: workers ignore routes.

use super::{now, retry, Store, StoreFailure};
use crate::acme::ChallengeKind;
use berth_protocol::event::EventKind;
use berth_protocol::routes::{CertState, DomainInfo, DomainSpec, TcpRouteSpec};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone)]
pub struct DomainRow {
    pub spec: DomainSpec,
    pub chain_pem: Option<String>,
    /// The certificate's private key (PEM), sealed to the control plane's key.
    pub key_sealed: Option<String>,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    pub last_error: Option<String>,
    pub next_attempt_at: i64,
    pub failures: i64,
}

const DOMAIN_COLUMNS: &str = "domain, service, port, passthrough, cert_chain, cert_key_sealed, cert_not_before, \
     cert_not_after, last_error, next_attempt_at, failures";

impl DomainRow {
    fn from_row(r: &AnyRow) -> DomainRow {
        DomainRow {
            spec: DomainSpec {
                domain: r.get("domain"),
                service: r.get("service"),
                port: r.get::<i64, _>("port") as u16,
                passthrough: r.get::<i64, _>("passthrough") != 0,
            },
            chain_pem: r.get("cert_chain"),
            key_sealed: r.get("cert_key_sealed"),
            not_before: r.get("cert_not_before"),
            not_after: r.get("cert_not_after"),
            last_error: r.get("last_error"),
            next_attempt_at: r.get("next_attempt_at"),
            failures: r.get("failures"),
        }
    }

    /// Whether a usable certificate is stored.
    pub fn has_valid_cert(&self, now: i64) -> bool {
        self.chain_pem.is_some() && self.key_sealed.is_some() && self.not_after.is_some_and(|t| t > now)
    }

    /// Whether the ACME task should order a certificate: none yet, or past
    /// two thirds of the current one's lifetime.
    pub fn needs_cert(&self, now: i64) -> bool {
        if self.spec.passthrough {
            return false;
        }
        match (self.has_valid_cert(now), self.not_before, self.not_after) {
            (true, Some(nb), Some(na)) => now >= nb + (na - nb) * 2 / 3,
            _ => true,
        }
    }

    /// The domain as the API shows it; `proxies` counts the proxies serving it.
    pub fn info(&self, now: i64, proxies: &ProxyCounts) -> DomainInfo {
        let cert_state = if self.spec.passthrough {
            CertState::Passthrough
        } else if self.has_valid_cert(now) {
            CertState::Valid
        } else if self.last_error.is_some() {
            CertState::Failed
        } else {
            CertState::Pending
        };
        DomainInfo {
            spec: self.spec.clone(),
            cert_state,
            cert_not_after: self.not_after.map(rfc3339),
            last_error: self.last_error.clone(),
            proxies_serving: proxies.serving(&self.spec.domain),
            proxies_online: proxies.online,
        }
    }
}

/// The online proxy nodes, and how many of them serve each domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    pub online: u32,
    serving: HashMap<String, u32>,
}

/// A proxy node as [`ProxyCounts`] sees it: when it last reported and the
/// domains it served then (the `served_domains` column, a JSON array).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxySeen {
    pub last_seen: Option<i64>,
    pub served_json: Option<String>,
}

impl ProxyCounts {
    /// Counts the proxies that reported within `offline_after` seconds of
    /// `now` (online, as `berth nodes list` judges it) and, per domain, those
    /// of them that serve it. A proxy that reported no list (an older agent)
    /// or an unreadable one is online but serves nothing.
    pub fn count(proxies: &[ProxySeen], now: i64, offline_after: i64) -> ProxyCounts {
        let mut c = ProxyCounts::default();
        for p in proxies {
            let online = super::nodes::seen_recently(p.last_seen, now, offline_after);
            if !online {
                continue;
            }
            c.online += 1;
            let served: HashSet<String> = p
                .served_json
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default();
            for d in served {
                *c.serving.entry(d).or_default() += 1;
            }
        }
        c
    }

    /// Online proxies serving `domain`.
    pub fn serving(&self, domain: &str) -> u32 {
        self.serving.get(domain).copied().unwrap_or(0)
    }
}

/// Unix seconds as RFC 3339 UTC (`2025-01-31T12:00:00Z`).
pub fn rfc3339(t: i64) -> String {
    berth_protocol::time::Utc::from_secs(t).rfc3339()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRouteRow {
    pub spec: TcpRouteSpec,
}

/// A challenge published to every proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeRow {
    pub domain: String,
    /// HTTP-01 or TLS-ALPN-01 (DNS-01 challenges go through the hook, not the proxies).
    pub kind: ChallengeKind,
    pub token: String,
    pub key_authorization: String,
}

/// Why a route change was refused; the API maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// 409: the domain is routed already (to `service`, when known: a
    /// concurrent add that won the race is only seen as a unique violation).
    #[error("domain: {domain:?} is already routed{}", to_service(service))]
    DomainTaken { domain: String, service: Option<String> },
    /// 409: the port is routed already.
    #[error("listen: port {listen} is already routed{}", to_service(service))]
    ListenTaken { listen: u16, service: Option<String> },
    /// 422: the route names a service that does not exist.
    #[error("service: no service named {0:?}")]
    UnknownService(String),
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

fn to_service(service: &Option<String>) -> String {
    service
        .as_ref()
        .map(|s| format!(" to service {s:?}"))
        .unwrap_or_default()
}

impl StoreFailure for RouteError {
    fn store_error(&self) -> Option<&sqlx::Error> {
        match self {
            RouteError::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// Takes the next cluster revision inside `tx` and stamps it on proxy nodes
/// only: routes, certificates and challenges are theirs alone.
pub async fn bump_proxies(tx: &mut Transaction<'_, Any>) -> sqlx::Result<i64> {
    let rev = super::next_revision(tx).await?;
    sqlx::query("UPDATE nodes SET revision = $1 WHERE role = 'proxy'")
        .bind(rev)
        .execute(&mut **tx)
        .await?;
    Ok(rev)
}

async fn service_exists(tx: &mut Transaction<'_, Any>, name: &str) -> sqlx::Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM services WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?
        .is_some())
}

/// A unique violation on insert means a concurrent add of the same key won.
fn taken_or(e: sqlx::Error, taken: impl FnOnce() -> RouteError) -> RouteError {
    if super::is_unique_violation(&e) {
        taken()
    } else {
        RouteError::Store(e)
    }
}

impl Store {
    pub async fn list_domains(&self) -> sqlx::Result<Vec<DomainRow>> {
        let rows = sqlx::query(&format!("SELECT {DOMAIN_COLUMNS} FROM domains ORDER BY domain"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(DomainRow::from_row).collect())
    }

    /// The proxy nodes' view for [`DomainRow::info`]: online ones and the
    /// domains each serves.
    pub async fn proxy_counts(&self, now: i64, offline_after: i64) -> sqlx::Result<ProxyCounts> {
        let rows = sqlx::query("SELECT last_seen, served_domains FROM nodes WHERE role = 'proxy'")
            .fetch_all(&self.pool)
            .await?;
        let seen: Vec<ProxySeen> = rows
            .iter()
            .map(|r| ProxySeen {
                last_seen: r.get(0),
                served_json: r.get(1),
            })
            .collect();
        Ok(ProxyCounts::count(&seen, now, offline_after))
    }

    pub async fn get_domain(&self, domain: &str) -> sqlx::Result<Option<DomainRow>> {
        let row = sqlx::query(&format!("SELECT {DOMAIN_COLUMNS} FROM domains WHERE domain = $1"))
            .bind(domain)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(DomainRow::from_row))
    }

    /// Adds a domain (already validated). Returns the new revision.
    pub async fn add_domain(&self, spec: &DomainSpec) -> Result<i64, RouteError> {
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            let taken = sqlx::query("SELECT service FROM domains WHERE domain = $1")
                .bind(&spec.domain)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(r) = taken {
                return Err(RouteError::DomainTaken {
                    domain: spec.domain.clone(),
                    service: Some(r.get(0)),
                });
            }
            if !service_exists(&mut tx, &spec.service).await? {
                return Err(RouteError::UnknownService(spec.service.clone()));
            }
            sqlx::query(
                "INSERT INTO domains (domain, service, port, passthrough, created_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&spec.domain)
            .bind(&spec.service)
            .bind(spec.port as i64)
            .bind(spec.passthrough as i64)
            .bind(now())
            .execute(&mut *tx)
            .await?;
            let rev = bump_proxies(&mut tx).await?;
            tx.commit().await?;
            Ok(rev)
        })
        .await
        .map_err(|e| match e {
            RouteError::Store(e) => taken_or(e, || RouteError::DomainTaken {
                domain: spec.domain.clone(),
                service: None,
            }),
            e => e,
        })
    }

    /// Removes a domain, its certificate and its pending challenges.
    /// Returns the new revision, or None if there was no such domain.
    pub async fn remove_domain(&self, domain: &str) -> sqlx::Result<Option<i64>> {
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            let gone = sqlx::query("DELETE FROM domains WHERE domain = $1")
                .bind(domain)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 0 {
                return Ok(None);
            }
            sqlx::query("DELETE FROM acme_challenges WHERE domain = $1")
                .bind(domain)
                .execute(&mut *tx)
                .await?;
            let rev = bump_proxies(&mut tx).await?;
            tx.commit().await?;
            Ok(Some(rev))
        })
        .await
    }

    pub async fn list_tcp_routes(&self) -> sqlx::Result<Vec<TcpRouteRow>> {
        let rows = sqlx::query("SELECT listen, service, port FROM tcp_routes ORDER BY listen")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| TcpRouteRow {
                spec: TcpRouteSpec {
                    listen: r.get::<i64, _>(0) as u16,
                    service: r.get(1),
                    port: r.get::<i64, _>(2) as u16,
                },
            })
            .collect())
    }

    /// Adds a TCP route (already validated). Returns the new revision.
    pub async fn add_tcp_route(&self, spec: &TcpRouteSpec) -> Result<i64, RouteError> {
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            let taken = sqlx::query("SELECT service FROM tcp_routes WHERE listen = $1")
                .bind(spec.listen as i64)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(r) = taken {
                return Err(RouteError::ListenTaken {
                    listen: spec.listen,
                    service: Some(r.get(0)),
                });
            }
            if !service_exists(&mut tx, &spec.service).await? {
                return Err(RouteError::UnknownService(spec.service.clone()));
            }
            sqlx::query("INSERT INTO tcp_routes (listen, service, port, created_at) VALUES ($1, $2, $3, $4)")
                .bind(spec.listen as i64)
                .bind(&spec.service)
                .bind(spec.port as i64)
                .bind(now())
                .execute(&mut *tx)
                .await?;
            let rev = bump_proxies(&mut tx).await?;
            tx.commit().await?;
            Ok(rev)
        })
        .await
        .map_err(|e| match e {
            RouteError::Store(e) => taken_or(e, || RouteError::ListenTaken {
                listen: spec.listen,
                service: None,
            }),
            e => e,
        })
    }

    pub async fn remove_tcp_route(&self, listen: u16) -> sqlx::Result<Option<i64>> {
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            let gone = sqlx::query("DELETE FROM tcp_routes WHERE listen = $1")
                .bind(listen as i64)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 0 {
                return Ok(None);
            }
            let rev = bump_proxies(&mut tx).await?;
            tx.commit().await?;
            Ok(Some(rev))
        })
        .await
    }

    pub async fn list_challenges(&self) -> sqlx::Result<Vec<ChallengeRow>> {
        let rows = sqlx::query("SELECT domain, kind, token, key_authorization FROM acme_challenges ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(ChallengeRow {
                    domain: r.get(0),
                    // Only this code writes the column; a kind it does not know is skipped.
                    kind: r.get::<String, _>(1).parse().ok()?,
                    token: r.get(2),
                    key_authorization: r.get(3),
                })
            })
            .collect())
    }

    /// Publishes a challenge to every proxy. Returns the new revision.
    pub async fn add_challenge(&self, c: &ChallengeRow) -> sqlx::Result<i64> {
        let id = format!("{}:{}:{}", c.domain, c.kind.as_str(), c.token);
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("DELETE FROM acme_challenges WHERE id = $1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO acme_challenges (id, domain, kind, token, key_authorization, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&id)
            .bind(&c.domain)
            .bind(c.kind.as_str())
            .bind(&c.token)
            .bind(&c.key_authorization)
            .bind(now())
            .execute(&mut *tx)
            .await?;
            let rev = bump_proxies(&mut tx).await?;
            tx.commit().await?;
            Ok(rev)
        })
        .await
    }

    /// Withdraws a domain's challenges; the new revision if there were any.
    pub async fn clear_challenges(&self, domain: &str) -> sqlx::Result<Option<i64>> {
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            let gone = sqlx::query("DELETE FROM acme_challenges WHERE domain = $1")
                .bind(domain)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 0 {
                return Ok(None);
            }
            let rev = bump_proxies(&mut tx).await?;
            tx.commit().await?;
            Ok(Some(rev))
        })
        .await
    }

    /// Claims a domain for one ACME attempt: moves its next attempt to
    /// `lease_until` if it was due. `false` when it was not due, or another
    /// control-plane replica claimed it first.
    pub async fn claim_domain(&self, domain: &str, now: i64, lease_until: i64) -> sqlx::Result<bool> {
        let n = sqlx::query(
            "UPDATE domains SET next_attempt_at = $1 WHERE domain = $2 AND next_attempt_at <= $3 AND passthrough = 0",
        )
        .bind(lease_until)
        .bind(domain)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Stores a new certificate (key already sealed) and clears the domain's
    /// error and challenges. Returns the new revision (None: domain gone).
    pub async fn store_cert(
        &self,
        domain: &str,
        chain_pem: &str,
        key_sealed: &str,
        not_before: i64,
        not_after: i64,
    ) -> sqlx::Result<Option<i64>> {
        retry(|| async {
            let mut tx = self.pool.begin().await?;
            let n = sqlx::query(
                "UPDATE domains SET cert_chain = $1, cert_key_sealed = $2, cert_not_before = $3, cert_not_after = $4, \
                 last_error = NULL, failures = 0, next_attempt_at = 0 WHERE domain = $5",
            )
            .bind(chain_pem)
            .bind(key_sealed)
            .bind(not_before)
            .bind(not_after)
            .bind(domain)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query("DELETE FROM acme_challenges WHERE domain = $1")
                .bind(domain)
                .execute(&mut *tx)
                .await?;
            if n == 1 {
                let message = format!("{domain}: certificate issued, valid until {not_after} (Unix seconds)");
                super::events::record(&mut tx, EventKind::Certificate, None, None, &message).await?;
            }
            let rev = bump_proxies(&mut tx).await?;
            tx.commit().await?;
            Ok((n == 1).then_some(rev))
        })
        .await
    }

    /// Records a failed attempt: the error, and when to try again.
    pub async fn record_cert_failure(
        &self,
        domain: &str,
        error: &str,
        failures: i64,
        retry_at: i64,
    ) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE domains SET last_error = $1, failures = $2, next_attempt_at = $3 WHERE domain = $4")
            .bind(error)
            .bind(failures)
            .bind(retry_at)
            .bind(domain)
            .execute(&mut *tx)
            .await?;
        let message =
            format!("{domain}: certificate order failed ({failures} in a row; next try at {retry_at}): {error}");
        super::events::record(&mut tx, EventKind::Certificate, None, None, &message).await?;
        tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(passthrough: bool, nb: Option<i64>, na: Option<i64>) -> DomainRow {
        DomainRow {
            spec: DomainSpec {
                domain: "a.example.com".into(),
                service: "web".into(),
                port: 80,
                passthrough,
            },
            chain_pem: na.map(|_| "CHAIN".into()),
            key_sealed: na.map(|_| "KEY".into()),
            not_before: nb,
            not_after: na,
            last_error: None,
            next_attempt_at: 0,
            failures: 0,
        }
    }

    #[test]
    fn renewal_at_two_thirds_of_the_lifetime() {
        assert!(row(false, None, None).needs_cert(100));
        assert!(!row(true, None, None).needs_cert(100));
        let r = row(false, Some(0), Some(90));
        assert!(!r.needs_cert(59));
        assert!(r.needs_cert(60));
        assert!(r.needs_cert(91), "expired");
        let none = ProxyCounts::default();
        assert_eq!(r.info(10, &none).cert_state, CertState::Valid);
        assert_eq!(r.info(100, &none).cert_state, CertState::Pending);
        assert_eq!(row(true, None, None).info(0, &none).cert_state, CertState::Passthrough);
    }

    #[test]
    fn counts_online_proxies_serving_each_domain() {
        let p = |last_seen: Option<i64>, served: Option<&str>| ProxySeen {
            last_seen,
            served_json: served.map(String::from),
        };
        let proxies = [
            p(Some(100), Some(r#"["a.example.com","b.example.com"]"#)),
            p(Some(95), Some(r#"["a.example.com"]"#)),
            // Offline: neither online nor serving.
            p(Some(50), Some(r#"["a.example.com","b.example.com"]"#)),
            // Never reported.
            p(None, None),
            // An older agent, and an unreadable list: online, serving nothing.
            p(Some(100), None),
            p(Some(100), Some("not json")),
        ];
        let c = ProxyCounts::count(&proxies, 100, 30);
        assert_eq!(c.online, 4);
        assert_eq!(c.serving("a.example.com"), 2);
        assert_eq!(c.serving("b.example.com"), 1);
        assert_eq!(c.serving("c.example.com"), 0);
        let info = row(false, Some(0), Some(1000)).info(100, &c);
        assert_eq!((info.proxies_serving, info.proxies_online), (2, 4));
        assert!(!info.served_everywhere());
        let all = ProxyCounts::count(&proxies[..2], 100, 30);
        assert!(row(false, Some(0), Some(1000)).info(100, &all).served_everywhere());
        assert_eq!(ProxyCounts::count(&[], 100, 30), ProxyCounts::default());
    }

    #[test]
    fn taken_routes_keep_their_messages() {
        let e = RouteError::DomainTaken {
            domain: "a.b".into(),
            service: Some("web".into()),
        };
        assert_eq!(e.to_string(), r#"domain: "a.b" is already routed to service "web""#);
        let e = RouteError::ListenTaken {
            listen: 22,
            service: None,
        };
        assert_eq!(e.to_string(), "listen: port 22 is already routed");
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
    }
}
