//! Upstream pools: round-robin balancing that prefers local healthy
//! upstreams, passive ejection after failures, and the HTTP/1.1 client with
//! its connection pool.

use crate::io::now_ms;
use berth_protocol::proxy::Upstream;
use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::http::uri::Authority;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Body sent upstream: the client's, or nothing (for requests that may be retried).
pub type ReqBody = Either<Incoming, Empty<Bytes>>;
pub type HttpClient = Client<HttpConnector, ReqBody>;

/// Builds the shared upstream client (HTTP/1.1, keep-alive pool).
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(connect_timeout));
    c.set_nodelay(true);
    c.set_keepalive(Some(Duration::from_secs(60)));
    c.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build(c)
}

/// Passive-health state of one upstream address, kept across reloads.
#[derive(Debug, Default)]
pub struct Health {
    /// `now_ms()` until which the upstream is out of rotation (0: never ejected).
    ejected_until: AtomicU64,
}

impl Health {
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }
    /// Takes the upstream out of rotation for `window`; true when it was in rotation.
    pub fn eject(&self, window: Duration) -> bool {
        let now = now_ms();
        let prev = self.ejected_until.swap(now + window.as_millis() as u64, Relaxed);
        prev <= now
    }
}

/// Ejection state by address, carried from one config to the next.
pub type HealthRegistry = HashMap<SocketAddr, Arc<Health>>;

#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub local: bool,
    pub healthy: bool,
    pub health: Arc<Health>,
    /// `ip:port`, ready for a request URI.
    pub authority: Authority,
}

/// The upstreams of one route.
#[derive(Debug)]
pub struct Pool {
    pub targets: Box<[Target]>,
    next: AtomicUsize,
}

/// Bit set of target indexes already tried by one request.
pub type Tried = u128;

impl Pool {
    /// Builds a pool, reusing the health state of known addresses from `old`
    /// and recording every address in `new`.
    pub fn new(ups: &[Upstream], old: &HealthRegistry, new: &mut HealthRegistry) -> Result<Pool, String> {
        let mut targets = Vec::with_capacity(ups.len());
        for u in ups {
            let health = new
                .get(&u.addr)
                .or_else(|| old.get(&u.addr))
                .cloned()
                .unwrap_or_default();
            new.insert(u.addr, health.clone());
            let authority: Authority = u
                .addr
                .to_string()
                .parse()
                .map_err(|e| format!("upstream {}: {e}", u.addr))?;
            if u.addr.port() == 0 {
                return Err(format!("upstream {}: port 0", u.addr));
            }
            targets.push(Target {
                addr: u.addr,
                local: u.local,
                healthy: u.healthy,
                health,
                authority,
            });
        }
        Ok(Pool {
            targets: targets.into_boxed_slice(),
            next: AtomicUsize::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Picks the next upstream, round-robin, from the first non-empty tier:
    /// local healthy, remote healthy, then (everything is ejected) any
    /// healthy one. Upstreams the config marks unhealthy are never picked;
    /// indexes in `tried` are skipped.
    pub fn pick(&self, tried: Tried) -> Option<usize> {
        let now = now_ms();
        let tiers: [&dyn Fn(&Target) -> bool; 3] = [
            &|t| t.local && !t.health.is_ejected(now),
            &|t| !t.local && !t.health.is_ejected(now),
            &|_| true,
        ];
        let usable = |i: usize, t: &Target| t.healthy && (i >= 128 || tried & (1 << i) == 0);
        for tier in tiers {
            let count = self
                .targets
                .iter()
                .enumerate()
                .filter(|(i, t)| usable(*i, t) && tier(t))
                .count();
            if count == 0 {
                continue;
            }
            let n = self.next.fetch_add(1, Relaxed) % count;
            return self
                .targets
                .iter()
                .enumerate()
                .filter(|(i, t)| usable(*i, t) && tier(t))
                .nth(n)
                .map(|(i, _)| i);
        }
        None
    }
}

/// Marks index `i` as tried.
pub fn mark(tried: &mut Tried, i: usize) {
    if i < 128 {
        *tried |= 1 << i;
    }
}

/// Connects to an upstream of `pool` for a TCP splice, trying up to
/// `1 + retries` upstreams; failures eject.
pub async fn connect_tcp(
    pool: &Pool,
    retries: u32,
    connect_timeout: Duration,
    ejection: Duration,
    metrics: &crate::metrics::Metrics,
) -> Result<(TcpStream, SocketAddr), String> {
    let mut tried: Tried = 0;
    let mut last_err = String::from("no healthy upstream");
    for _ in 0..=retries {
        let Some(i) = pool.pick(tried) else { break };
        mark(&mut tried, i);
        let t = &pool.targets[i];
        let r = tokio::time::timeout(connect_timeout, TcpStream::connect(t.addr)).await;
        match r {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok((s, t.addr));
            }
            Ok(Err(e)) => last_err = format!("connecting to {}: {e}", t.addr),
            Err(_) => last_err = format!("connecting to {}: timed out after {connect_timeout:?}", t.addr),
        }
        metrics.upstream_connect_errors.fetch_add(1, Relaxed);
        if t.health.eject(ejection) {
            metrics.ejections.fetch_add(1, Relaxed);
            tracing::warn!("upstream {} ejected for {ejection:?}: {last_err}", t.addr);
        }
    }
    Err(last_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(addr: &str, local: bool, healthy: bool) -> Upstream {
        Upstream {
            addr: addr.parse().unwrap(),
            local,
            healthy,
        }
    }

    fn pool(ups: &[Upstream]) -> Pool {
        Pool::new(ups, &HashMap::new(), &mut HashMap::new()).unwrap()
    }

    fn picks(p: &Pool, n: usize) -> Vec<SocketAddr> {
        (0..n).map(|_| p.targets[p.pick(0).unwrap()].addr).collect()
    }

    #[test]
    fn round_robin_over_healthy() {
        let p = pool(&[
            up("10.0.0.1:80", false, true),
            up("10.0.0.2:80", false, true),
            up("10.0.0.3:80", false, false),
        ]);
        let got = picks(&p, 6);
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(got.iter().filter(|x| **x == a).count(), 3);
        assert_eq!(got.iter().filter(|x| **x == b).count(), 3);
    }

    #[test]
    fn local_preferred_then_remote() {
        let p = pool(&[
            up("10.0.0.1:80", false, true),
            up("10.0.0.2:80", true, true),
            up("10.0.0.3:80", true, false),
        ]);
        assert!(picks(&p, 5).iter().all(|a| *a == "10.0.0.2:80".parse().unwrap()));
        p.targets[1].health.eject(Duration::from_secs(10));
        assert!(picks(&p, 5).iter().all(|a| *a == "10.0.0.1:80".parse().unwrap()));
    }

    #[test]
    fn all_ejected_still_tried_none_configured_none() {
        let p = pool(&[up("10.0.0.1:80", false, true), up("10.0.0.2:80", true, true)]);
        for t in p.targets.iter() {
            assert!(t.health.eject(Duration::from_secs(10)));
            assert!(!t.health.eject(Duration::from_secs(10)), "already ejected");
        }
        assert!(p.pick(0).is_some());
        assert_eq!(pool(&[]).pick(0), None);
        assert_eq!(pool(&[up("10.0.0.1:80", true, false)]).pick(0), None);
    }

    #[test]
    fn ejection_expires() {
        let p = pool(&[up("10.0.0.1:80", false, true), up("10.0.0.2:80", false, true)]);
        p.targets[0].health.eject(Duration::from_millis(30));
        assert!(picks(&p, 4).iter().all(|a| *a == "10.0.0.2:80".parse().unwrap()));
        std::thread::sleep(Duration::from_millis(50));
        assert!(picks(&p, 4).contains(&"10.0.0.1:80".parse().unwrap()));
    }

    #[test]
    fn tried_are_skipped() {
        let p = pool(&[up("10.0.0.1:80", false, true), up("10.0.0.2:80", false, true)]);
        let mut tried = 0;
        let first = p.pick(tried).unwrap();
        mark(&mut tried, first);
        let second = p.pick(tried).unwrap();
        assert_ne!(first, second);
        mark(&mut tried, second);
        assert_eq!(p.pick(tried), None);
    }

    #[test]
    fn health_survives_rebuild() {
        let ups = [up("10.0.0.1:80", false, true)];
        let mut reg = HashMap::new();
        let p = Pool::new(&ups, &HashMap::new(), &mut reg).unwrap();
        p.targets[0].health.eject(Duration::from_secs(10));
        let mut reg2 = HashMap::new();
        let p2 = Pool::new(&ups, &reg, &mut reg2).unwrap();
        assert!(p2.targets[0].health.is_ejected(now_ms()));
    }
}
