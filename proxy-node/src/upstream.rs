//! Upstream pools: smooth weighted round-robin that prefers local healthy
//! upstreams, and passive ejection after failures. Each upstream address
//! has an [`UpstreamState`] that outlives config reloads.

use crate::client::IdleConns;
use crate::io::now_ms;
use berth_protocol::proxy::{Upstream, MAX_WEIGHT};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// What is known of one upstream address, kept across reloads: its
/// passive-health state and its idle keep-alive connections.
#[derive(Debug, Default)]
pub struct UpstreamState {
    /// `now_ms()` until which the upstream is out of rotation (0: never ejected).
    ejected_until: AtomicU64,
    pub idle: Arc<IdleConns>,
}

impl UpstreamState {
    /// Reads the clock only for an upstream ejected at some point.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Relaxed);
        if until == 0 {
            return false;
        }
        if until > now_ms() {
            return true;
        }
        // Expired: back to the state that needs no clock.
        let _ = self.ejected_until.compare_exchange(until, 0, Relaxed, Relaxed);
        false
    }
    /// Takes the upstream out of rotation for `window`; true when it was in rotation.
    pub fn eject(&self, window: Duration) -> bool {
        let now = now_ms();
        let prev = self.ejected_until.swap(now + window.as_millis() as u64, Relaxed);
        prev <= now
    }
}

/// Upstream states by address, carried from one config to the next.
pub type UpstreamStates = HashMap<SocketAddr, Arc<UpstreamState>>;

/// One upstream of a [`Pool`]: what the config says of it, and the
/// [`UpstreamState`] of its address.
#[derive(Debug)]
pub struct Member {
    pub addr: SocketAddr,
    pub local: bool,
    pub healthy: bool,
    /// 0: drained (see [`Pool::pick`]).
    pub weight: u32,
    pub state: Arc<UpstreamState>,
}

/// The upstreams of one route.
#[derive(Debug)]
pub struct Pool {
    pub members: Box<[Member]>,
    /// Smooth weighted round-robin: each member's current weight. One short
    /// lock per pick; the rotation restarts when a config is loaded.
    current: Mutex<Box<[i64]>>,
}

/// Bit set of member indexes already tried by one request.
pub type Tried = u128;

impl Pool {
    /// Builds a pool, reusing the health state of known addresses from `old`
    /// and recording every address in `new`.
    pub fn new(ups: &[Upstream], old: &UpstreamStates, new: &mut UpstreamStates) -> Result<Pool, String> {
        let mut members = Vec::with_capacity(ups.len());
        for u in ups {
            let state = new
                .get(&u.addr)
                .or_else(|| old.get(&u.addr))
                .cloned()
                .unwrap_or_default();
            new.insert(u.addr, state.clone());
            if u.addr.port() == 0 {
                return Err(format!("upstream {}: port 0", u.addr));
            }
            if u.weight > MAX_WEIGHT {
                return Err(format!(
                    "upstream {}: weight: {} is not 0-{MAX_WEIGHT}",
                    u.addr, u.weight
                ));
            }
            members.push(Member {
                addr: u.addr,
                local: u.local,
                healthy: u.healthy,
                weight: u.weight,
                state,
            });
        }
        Ok(Pool {
            current: Mutex::new(vec![0; members.len()].into_boxed_slice()),
            members: members.into_boxed_slice(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// Picks the next upstream by smooth weighted round-robin within the
    /// first tier that has one: local weighted, remote weighted, drained
    /// (weight 0), then (everything is ejected) any of them. Ejected
    /// upstreams are left out of the first three tiers. Drained ones come
    /// before ejected ones because they still answer; an ejected one has
    /// just failed. Upstreams the config marks unhealthy are never picked;
    /// indexes in `tried` are skipped.
    pub fn pick(&self, tried: Tried) -> Option<usize> {
        let tiers: [&dyn Fn(&Member) -> bool; 4] = [
            &|t| t.weight > 0 && t.local && !t.state.is_ejected(),
            &|t| t.weight > 0 && !t.local && !t.state.is_ejected(),
            &|t| t.weight == 0 && !t.state.is_ejected(),
            &|_| true,
        ];
        let usable = |i: usize, t: &Member| t.healthy && (i >= 128 || tried & (1 << i) == 0);
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        tiers
            .iter()
            .find_map(|tier| smooth_wrr(&self.members, &mut current, |i, t| usable(i, t) && tier(t)))
    }
}

/// One step of nginx's smooth weighted round-robin over the members `in_set`
/// accepts: each one's current weight grows by its weight, the largest
/// wins and gives back the set's total. Over a full cycle each one is
/// picked in proportion to its weight, spread out (5,1,1 gives a a b a c a a).
/// A set of only drained members is taken as equal weights.
fn smooth_wrr(members: &[Member], current: &mut [i64], in_set: impl Fn(usize, &Member) -> bool) -> Option<usize> {
    let set = || members.iter().enumerate().filter(|(i, t)| in_set(*i, t));
    let floor = if set().all(|(_, t)| t.weight == 0) { 1 } else { 0 };
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, t) in set() {
        let w = i64::from(t.weight.max(floor));
        if w == 0 {
            continue;
        }
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

/// Marks index `i` as tried.
pub fn mark(tried: &mut Tried, i: usize) {
    if i < 128 {
        *tried |= 1 << i;
    }
}

/// Connects to `addr` within `timeout`, with Nagle off; the error says why.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {timeout:?}")),
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
        let t = &pool.members[i];
        match connect(t.addr, connect_timeout).await {
            Ok(s) => return Ok((s, t.addr)),
            Err(e) => last_err = format!("connecting to {}: {e}", t.addr),
        }
        metrics.upstream_connect_errors.fetch_add(1, Relaxed);
        if t.state.eject(ejection) {
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
            weight: 1,
        }
    }

    fn weighted(addr: &str, local: bool, weight: u32) -> Upstream {
        Upstream {
            weight,
            ..up(addr, local, true)
        }
    }

    /// Picks as letters: member 0 is 'a', 1 is 'b', ...
    fn letters(p: &Pool, n: usize) -> String {
        (0..n).map(|_| (b'a' + p.pick(0).unwrap() as u8) as char).collect()
    }

    fn pool(ups: &[Upstream]) -> Pool {
        Pool::new(ups, &HashMap::new(), &mut HashMap::new()).unwrap()
    }

    fn picks(p: &Pool, n: usize) -> Vec<SocketAddr> {
        (0..n).map(|_| p.members[p.pick(0).unwrap()].addr).collect()
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
        p.members[1].state.eject(Duration::from_secs(10));
        assert!(picks(&p, 5).iter().all(|a| *a == "10.0.0.1:80".parse().unwrap()));
    }

    #[test]
    fn all_ejected_still_tried_none_configured_none() {
        let p = pool(&[up("10.0.0.1:80", false, true), up("10.0.0.2:80", true, true)]);
        for t in p.members.iter() {
            assert!(t.state.eject(Duration::from_secs(10)));
            assert!(!t.state.eject(Duration::from_secs(10)), "already ejected");
        }
        assert!(p.pick(0).is_some());
        assert_eq!(pool(&[]).pick(0), None);
        assert_eq!(pool(&[up("10.0.0.1:80", true, false)]).pick(0), None);
    }

    #[test]
    fn ejection_expires() {
        let p = pool(&[up("10.0.0.1:80", false, true), up("10.0.0.2:80", false, true)]);
        p.members[0].state.eject(Duration::from_millis(30));
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
        p.members[0].state.eject(Duration::from_secs(10));
        let mut reg2 = HashMap::new();
        let p2 = Pool::new(&ups, &reg, &mut reg2).unwrap();
        assert!(p2.members[0].state.is_ejected());
    }

    #[test]
    fn weights_are_exact_and_interleaved() {
        let p = pool(&[
            weighted("10.0.0.1:80", false, 5),
            weighted("10.0.0.2:80", false, 1),
            weighted("10.0.0.3:80", false, 1),
        ]);
        // nginx's sequence: never more than two a's in a row, not aaaaabc.
        assert_eq!(letters(&p, 7), "aabacaa");
        assert_eq!(letters(&p, 7), "aabacaa", "every cycle of 7 is the same");
        let p = pool(&[weighted("10.0.0.1:80", false, 3), weighted("10.0.0.2:80", false, 2)]);
        assert_eq!(letters(&p, 10), "ababaababa");
        let p = pool(&[weighted("10.0.0.1:80", false, 1000), weighted("10.0.0.2:80", false, 1)]);
        let got = letters(&p, 1001);
        assert_eq!(got.matches('b').count(), 1);
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        let p = pool(&[
            up("10.0.0.1:80", false, true),
            up("10.0.0.2:80", false, true),
            up("10.0.0.3:80", false, true),
        ]);
        assert_eq!(letters(&p, 6), "abcabc");
    }

    #[test]
    fn weights_apply_within_the_local_tier_only() {
        // The remote upstream's big weight does not pull traffic off the
        // local ones; the local ones share by their own weights.
        let p = pool(&[
            weighted("10.0.0.1:80", false, 100),
            weighted("10.0.0.2:80", true, 2),
            weighted("10.0.0.3:80", true, 1),
        ]);
        assert_eq!(letters(&p, 6), "bcbbcb");
        p.members[1].state.eject(Duration::from_secs(10));
        p.members[2].state.eject(Duration::from_secs(10));
        assert_eq!(letters(&p, 3), "aaa");
    }

    #[test]
    fn ejected_upstream_leaves_the_rotation_and_the_rest_keep_their_ratio() {
        let p = pool(&[
            weighted("10.0.0.1:80", false, 3),
            weighted("10.0.0.2:80", false, 1),
            weighted("10.0.0.3:80", false, 2),
        ]);
        p.members[0].state.eject(Duration::from_secs(10));
        let got = letters(&p, 6);
        assert_eq!((got.matches('b').count(), got.matches('c').count()), (2, 4), "{got}");
        assert!(!got.contains('a'));
        // Everything ejected: tried anyway, still by weight.
        p.members[1].state.eject(Duration::from_secs(10));
        p.members[2].state.eject(Duration::from_secs(10));
        let got = letters(&p, 12);
        let n = |c| got.matches(c).count();
        assert_eq!((n('a'), n('b'), n('c')), (6, 2, 4), "{got}");
    }

    #[test]
    fn drained_upstream_is_the_last_resort_before_ejected_ones() {
        let p = pool(&[
            weighted("10.0.0.1:80", true, 0),
            weighted("10.0.0.2:80", false, 1),
            weighted("10.0.0.3:80", false, 0),
        ]);
        // A drained local upstream gets nothing while a remote one can serve.
        assert_eq!(letters(&p, 4), "bbbb");
        // The weighted one fails: the drained ones share the traffic.
        p.members[1].state.eject(Duration::from_secs(10));
        assert_eq!(letters(&p, 4), "acac");
        // A retry skips what was tried, drained or not.
        let mut tried = 0;
        mark(&mut tried, 0);
        mark(&mut tried, 2);
        assert_eq!(p.pick(tried), Some(1), "the ejected one, as a last resort");
        // Everything ejected: the weighted one first.
        p.members[0].state.eject(Duration::from_secs(10));
        p.members[2].state.eject(Duration::from_secs(10));
        assert_eq!(letters(&p, 3), "bbb");
        // Only drained upstreams configured: they still serve.
        let p = pool(&[weighted("10.0.0.1:80", false, 0), weighted("10.0.0.2:80", false, 0)]);
        assert_eq!(letters(&p, 4), "abab");
    }

    #[test]
    fn weight_over_the_maximum_is_refused() {
        let bad = [weighted("10.0.0.1:80", false, MAX_WEIGHT + 1)];
        let e = Pool::new(&bad, &HashMap::new(), &mut HashMap::new()).unwrap_err();
        assert!(e.contains("weight: 1001"), "{e}");
        Pool::new(
            &[weighted("10.0.0.1:80", false, MAX_WEIGHT)],
            &HashMap::new(),
            &mut HashMap::new(),
        )
        .unwrap();
    }
}
