//! The rollout state machine: given a service's replicas as the store and
//! the nodes' reports see them now, what to do next. Pure, so every case
//! (batches, waits, failure, rollback) is unit-tested, and the invariant is
//! checked over random event orders.
//!
//! The machine never remembers anything itself: each call reads the whole
//! situation, so a control plane restarted mid-rollout carries on where the
//! store says it is.

use berth_protocol::release::{RolloutPolicy, StepStage};
use std::collections::{BTreeMap, BTreeSet};

/// Whether a replica is in DNS and the proxies' routes (once healthy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Active,
    /// Out of every route; removed once drained.
    Draining,
}

/// One replica of the service, as the machine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub name: String,
    pub slot: u32,
    pub release: u64,
    pub phase: Phase,
    /// Its node is online (reports within the offline limit).
    pub node_online: bool,
    pub healthy: bool,
    /// Unix ms since it has been healthy without a break.
    pub healthy_since_ms: Option<i64>,
    /// Healthy, and every online node has loaded the revision that said so:
    /// it is in DNS everywhere and in every online proxy's routes.
    pub routed: bool,
    /// Draining, and every online node has loaded the revision that took it out.
    pub unrouted: bool,
    pub created_ms: i64,
    /// When it started draining.
    pub phase_ms: i64,
    pub restarts: u32,
    pub gave_up: bool,
    /// Why it is not healthy, from its node's report (health output, exit
    /// code, log tail), for a failed release's reason.
    pub trouble: Option<String>,
}

/// The rollout the machine drives.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The release every replica should end up running.
    pub target: u64,
    /// How many replicas the target wants.
    pub want: u32,
    pub policy: RolloutPolicy,
    /// Old replicas stop before their successors start (volume services).
    pub stop_first: bool,
    /// Healthy, routed replicas that must always remain (what there were
    /// at the start, minus max_unavailable).
    pub floor: u32,
    /// Going back to the last complete release after a failure: a second
    /// failure ends the rollout instead of turning it around again.
    pub rolling_back: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create a replica of the target release in `slot`.
    StartNew { slot: u32 },
    /// Take a replica out of DNS and every route.
    Drain { name: String },
    /// Stop and remove a replica (drained, or never serving).
    Remove { name: String },
    /// The target release failed: roll back to the last complete one.
    Fail { reason: String },
    /// Every replica runs the target and serves.
    Complete,
}

/// Restarts after which a new replica counts as crash-looping.
pub const CRASH_LOOP_RESTARTS: u32 = 3;

impl Replica {
    /// Serving: healthy, and in every route.
    fn available(&self) -> bool {
        self.phase == Phase::Active && self.node_online && self.healthy && self.routed
    }

    /// Available for long enough to count as a finished replacement.
    fn ready(&self, now_ms: i64, min_ready_ms: i64) -> bool {
        self.available() && self.healthy_since_ms.is_some_and(|t| now_ms - t >= min_ready_ms)
    }
}

/// The next actions for `r`, given the service's `replicas` at `now_ms`.
/// Calling it again before the actions took effect is harmless: the store
/// applies them against the rows it reads in the same transaction.
pub fn step(r: &Rollout, replicas: &[Replica], now_ms: i64) -> Vec<Action> {
    let min_ready_ms = i64::from(r.policy.min_ready_secs) * 1000;
    let timeout_ms = i64::from(r.policy.timeout_secs) * 1000;
    let drain_ms = i64::from(r.policy.drain_secs) * 1000;
    let is_new = |x: &Replica| x.release == r.target && x.phase == Phase::Active;
    let mut out = vec![];

    // A new replica that will not serve fails the release.
    for x in replicas.iter().filter(|x| is_new(x) && x.node_online) {
        let why = if x.gave_up {
            Some("autoheal gave up on it".to_string())
        } else if x.restarts >= CRASH_LOOP_RESTARTS && !x.available() {
            Some(format!("crash-looping ({} restarts)", x.restarts))
        } else if x.healthy_since_ms.is_none() && now_ms - x.created_ms > timeout_ms {
            Some(format!("not healthy within {} s", r.policy.timeout_secs))
        } else if !x.routed && x.healthy_since_ms.is_some_and(|t| now_ms - t > timeout_ms) {
            Some(format!(
                "healthy, but not loaded by every online node within {} s",
                r.policy.timeout_secs
            ))
        } else {
            None
        };
        if let Some(why) = why {
            let trouble = x.trouble.as_deref().map(|t| format!(": {t}")).unwrap_or_default();
            return vec![Action::Fail {
                reason: format!("replica {}: {why}{trouble}", x.name),
            }];
        }
    }

    // Drained replicas go; so do replicas that never served and are not
    // wanted any more, and new ones stuck on a node that went offline.
    for x in replicas {
        let gone = match x.phase {
            Phase::Draining => x.unrouted && now_ms - x.phase_ms >= drain_ms,
            Phase::Active => !x.node_online && x.release == r.target && x.healthy_since_ms.is_none(),
        };
        if gone {
            out.push(Action::Remove { name: x.name.clone() });
        }
    }
    let removed_names: BTreeSet<String> = out
        .iter()
        .filter_map(|a| match a {
            Action::Remove { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    let removed = |x: &Replica| removed_names.contains(&x.name);

    let new: Vec<&Replica> = replicas.iter().filter(|x| is_new(x) && !removed(x)).collect();
    let old: Vec<&Replica> = replicas
        .iter()
        .filter(|x| x.phase == Phase::Active && x.release != r.target)
        .collect();
    let draining: Vec<&Replica> = replicas.iter().filter(|x| x.phase == Phase::Draining).collect();

    // Old replicas out: the ones that serve nobody at once, the others while
    // what serves stays at or above the floor. New replicas count once ready.
    let mut serving: u32 = old.iter().filter(|x| x.available()).count() as u32
        + new.iter().filter(|x| x.ready(now_ms, min_ready_ms)).count() as u32;
    let new_ready = new.iter().filter(|x| x.ready(now_ms, min_ready_ms)).count() as u32;
    let mut old_left = old.len() as u32;
    let mut by_preference: Vec<&&Replica> = old.iter().collect();
    by_preference.sort_by_key(|x| (x.available(), x.slot));
    for x in by_preference {
        let drain = if !x.available() {
            // Not serving anyway; but in a stop-first rollout (or one that
            // may go below the wanted count) only as many as a batch.
            !r.stop_first || draining.len() < r.policy.max_unavailable.max(1) as usize
        } else {
            // Worth it when the new ones already cover it, or when the
            // policy allows a gap (max_unavailable, stop-first).
            let excess = new_ready + old_left > r.want;
            let gap_allowed = r.stop_first || r.policy.max_unavailable > 0;
            serving > r.floor && (excess || gap_allowed)
        };
        if drain {
            out.push(Action::Drain { name: x.name.clone() });
            if x.available() {
                serving -= 1;
            }
            old_left -= 1;
            if r.stop_first {
                break;
            }
        }
    }

    // New replicas in: up to want + max_surge running, in the slots of the
    // old replicas first; stop-first only in a slot that is empty.
    let drained_names: BTreeSet<String> = out
        .iter()
        .filter_map(|a| match a {
            Action::Drain { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    let drained_now = |x: &Replica| drained_names.contains(&x.name);
    let mut running = new.len() as u32 + old.iter().filter(|x| !drained_now(x)).count() as u32;
    let mut new_count = new.len() as u32;
    let limit = r.want + if r.stop_first { 0 } else { r.policy.max_surge };
    let taken: BTreeMap<u32, ()> = new.iter().map(|x| (x.slot, ())).collect();
    let occupied = |slot: u32| {
        replicas
            .iter()
            .any(|x| x.slot == slot && x.release != r.target && !removed(x))
    };
    // Old slots first (a replacement lands where the old replica is), then
    // the free ones.
    let mut slots: Vec<u32> = old.iter().map(|x| x.slot).filter(|s| *s < r.want).collect();
    slots.sort();
    slots.dedup();
    let free: Vec<u32> = (0..r.want).filter(|s| !slots.contains(s)).collect();
    slots.extend(free);
    for slot in slots {
        if new_count >= r.want || running >= limit {
            break;
        }
        if taken.contains_key(&slot) || (r.stop_first && occupied(slot)) {
            continue;
        }
        out.push(Action::StartNew { slot });
        new_count += 1;
        running += 1;
    }

    let settled = out.is_empty()
        && old.is_empty()
        && draining.is_empty()
        && new.len() as u32 == r.want
        && new.iter().all(|x| x.ready(now_ms, min_ready_ms));
    if settled {
        out.push(Action::Complete);
    }
    out
}

/// Where each slot of the rollout is, for progress output.
pub fn stages(
    r: &Rollout,
    replicas: &[Replica],
    now_ms: i64,
) -> BTreeMap<u32, (Option<String>, Option<String>, StepStage)> {
    let min_ready_ms = i64::from(r.policy.min_ready_secs) * 1000;
    let mut out = BTreeMap::new();
    let slots = replicas.iter().map(|x| x.slot).chain(0..r.want);
    for slot in slots {
        let new = replicas
            .iter()
            .find(|x| x.slot == slot && x.release == r.target && x.phase == Phase::Active);
        let old = replicas
            .iter()
            .filter(|x| x.slot == slot && (x.release != r.target || x.phase == Phase::Draining))
            .max_by_key(|x| x.created_ms);
        let stage = match (new, old) {
            (None, Some(o)) if o.phase == Phase::Draining && r.stop_first => StepStage::StoppingOld,
            (None, Some(o)) if o.phase == Phase::Draining => StepStage::Draining,
            (None, Some(_)) => StepStage::Waiting,
            (None, None) => StepStage::Waiting,
            (Some(n), _) if !n.healthy => StepStage::Starting,
            (Some(n), _) if !n.available() => StepStage::Healthy,
            // Serving, and staying healthy for min_ready before it counts.
            (Some(n), None) if !n.ready(now_ms, min_ready_ms) => StepStage::Routed,
            (Some(_), Some(o)) if o.phase == Phase::Active => StepStage::Routed,
            (Some(_), Some(_)) => StepStage::Draining,
            (Some(_), None) => StepStage::Done,
        };
        out.insert(slot, (new.map(|x| x.name.clone()), old.map(|x| x.name.clone()), stage));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            min_ready_secs: 0,
            drain_secs: 5,
            ..RolloutPolicy::default()
        }
    }

    fn rollout(want: u32, floor: u32) -> Rollout {
        Rollout {
            target: 2,
            want,
            policy: policy(),
            stop_first: false,
            floor,
            rolling_back: false,
        }
    }

    fn serving(name: &str, slot: u32, release: u64) -> Replica {
        Replica {
            name: name.into(),
            slot,
            release,
            phase: Phase::Active,
            node_online: true,
            healthy: true,
            healthy_since_ms: Some(0),
            routed: true,
            unrouted: false,
            created_ms: 0,
            phase_ms: 0,
            restarts: 0,
            gave_up: false,
            trouble: None,
        }
    }

    fn starting(name: &str, slot: u32, created_ms: i64) -> Replica {
        Replica {
            healthy: false,
            healthy_since_ms: None,
            routed: false,
            created_ms,
            ..serving(name, slot, 2)
        }
    }

    #[test]
    fn one_at_a_time_new_before_old() {
        let r = rollout(2, 2);
        let mut reps = vec![serving("web-1", 0, 1), serving("web-2", 1, 1)];
        // Start one new replica in the first old one's slot; drain nothing.
        assert_eq!(step(&r, &reps, 1000), vec![Action::StartNew { slot: 0 }]);
        reps.push(starting("web-3", 0, 1000));
        // Starting, then healthy but not routed everywhere: wait.
        assert!(step(&r, &reps, 2000).is_empty());
        reps[2].healthy = true;
        reps[2].healthy_since_ms = Some(2000);
        assert!(step(&r, &reps, 2100).is_empty());
        // Routed: the old one in its slot drains, the next new one starts.
        reps[2].routed = true;
        assert_eq!(
            step(&r, &reps, 2200),
            vec![Action::Drain { name: "web-1".into() }, Action::StartNew { slot: 1 }]
        );
        reps[0].phase = Phase::Draining;
        reps[0].phase_ms = 2200;
        reps.push(starting("web-4", 1, 2200));
        // Drained only once every node confirmed and the drain time passed.
        assert!(step(&r, &reps, 8000).is_empty());
        reps[0].unrouted = true;
        assert!(step(&r, &reps, 7000).is_empty());
        assert_eq!(step(&r, &reps, 7300), vec![Action::Remove { name: "web-1".into() }]);
        reps.remove(0);
        reps[2].healthy = true;
        reps[2].healthy_since_ms = Some(7400);
        reps[2].routed = true;
        assert_eq!(step(&r, &reps, 7500), vec![Action::Drain { name: "web-2".into() }]);
        reps[0].phase = Phase::Draining;
        reps[0].phase_ms = 7500;
        reps[0].unrouted = true;
        assert_eq!(step(&r, &reps, 12600), vec![Action::Remove { name: "web-2".into() }]);
        reps.remove(0);
        assert_eq!(step(&r, &reps, 12700), vec![Action::Complete]);
    }

    #[test]
    fn min_ready_holds_back_a_replica_without_health_check() {
        let mut r = rollout(1, 1);
        r.policy.min_ready_secs = 2;
        let mut new = starting("web-2", 0, 0);
        new.healthy = true;
        new.healthy_since_ms = Some(1000);
        new.routed = true;
        let reps = vec![serving("web-1", 0, 1), new];
        assert!(step(&r, &reps, 2500).is_empty());
        assert_eq!(step(&r, &reps, 3000), vec![Action::Drain { name: "web-1".into() }]);
    }

    #[test]
    fn surge_and_unavailable_make_bigger_batches() {
        let mut r = rollout(4, 3);
        r.policy.max_surge = 2;
        r.policy.max_unavailable = 1;
        let reps: Vec<Replica> = (0..4).map(|i| serving(&format!("web-{}", i + 1), i, 1)).collect();
        // One old replica may go at once (floor 3) and two new ones start.
        assert_eq!(
            step(&r, &reps, 0),
            vec![
                Action::Drain { name: "web-1".into() },
                Action::StartNew { slot: 0 },
                Action::StartNew { slot: 1 },
                Action::StartNew { slot: 2 },
            ]
        );
    }

    #[test]
    fn a_replica_that_never_gets_healthy_fails_the_release_with_its_trouble() {
        let r = rollout(1, 1);
        let mut new = starting("web-2", 0, 0);
        new.trouble = Some("GET /nope: HTTP 404".into());
        let reps = vec![serving("web-1", 0, 1), new];
        assert!(step(&r, &reps, 299_000).is_empty());
        assert_eq!(
            step(&r, &reps, 301_000),
            vec![Action::Fail {
                reason: "replica web-2: not healthy within 300 s: GET /nope: HTTP 404".into()
            }]
        );
    }

    #[test]
    fn crash_loops_and_gave_up_fail_at_once() {
        let r = rollout(1, 1);
        let mut new = starting("web-2", 0, 0);
        new.restarts = 3;
        let reps = vec![serving("web-1", 0, 1), new.clone()];
        assert!(matches!(&step(&r, &reps, 1)[..], [Action::Fail { reason }] if reason.contains("crash-looping")));
        new.restarts = 0;
        new.gave_up = true;
        let reps = vec![serving("web-1", 0, 1), new];
        assert!(matches!(&step(&r, &reps, 1)[..], [Action::Fail { reason }] if reason.contains("gave up")));
    }

    #[test]
    fn rolling_back_replaces_the_failed_releases_replicas() {
        // Release 2 failed after replacing one of two; rolling back to 1.
        let mut r = rollout(2, 1);
        r.target = 1;
        r.rolling_back = true;
        let mut unhealthy = starting("web-4", 1, 0);
        unhealthy.release = 2;
        let reps = vec![serving("web-3", 0, 2), serving("web-2", 1, 1), unhealthy];
        let a = step(&r, &reps, 10);
        // The never-healthy one goes at once; a release-1 replica starts in
        // the slot of the healthy release-2 one, which stays until then.
        assert_eq!(
            a,
            vec![Action::Drain { name: "web-4".into() }, Action::StartNew { slot: 0 }]
        );
    }

    #[test]
    fn stop_first_takes_the_old_one_out_before_starting() {
        let mut r = rollout(1, 0);
        r.stop_first = true;
        r.policy.max_surge = 0;
        r.policy.max_unavailable = 1;
        let mut reps = vec![serving("db-1", 0, 1)];
        assert_eq!(step(&r, &reps, 0), vec![Action::Drain { name: "db-1".into() }]);
        reps[0].phase = Phase::Draining;
        reps[0].unrouted = true;
        // Not started while the old container may still hold the volume.
        assert!(step(&r, &reps, 1000).is_empty());
        assert_eq!(
            step(&r, &reps, 6000),
            vec![Action::Remove { name: "db-1".into() }, Action::StartNew { slot: 0 }]
        );
    }

    #[test]
    fn a_first_deploy_starts_everything_and_completes() {
        let r = rollout(3, 0);
        assert_eq!(
            step(&r, &[], 0),
            vec![
                Action::StartNew { slot: 0 },
                Action::StartNew { slot: 1 },
                Action::StartNew { slot: 2 },
            ]
        );
        let reps: Vec<Replica> = (0..3).map(|i| serving(&format!("w-{i}"), i, 2)).collect();
        assert_eq!(step(&r, &reps, 0), vec![Action::Complete]);
    }

    #[test]
    fn a_new_replica_on_a_lost_node_is_replaced_elsewhere() {
        let r = rollout(1, 1);
        let mut new = starting("web-2", 0, 0);
        new.node_online = false;
        let reps = vec![serving("web-1", 0, 1), new];
        assert_eq!(
            step(&r, &reps, 10),
            vec![Action::Remove { name: "web-2".into() }, Action::StartNew { slot: 0 }]
        );
    }

    /// A tiny deterministic PRNG (xorshift), so failures replay.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    /// The invariant, over random event orders: the machine's own actions
    /// never take the number of serving replicas below the floor (health
    /// flaps and lost nodes may; the machine must not add to them), and
    /// every rollout ends, complete or failed. A "restart" of the control
    /// plane is a call with no memory, which every call already is.
    #[test]
    fn never_below_the_floor_over_random_event_orders() {
        for seed in 1..400u64 {
            let mut rng = Rng(seed * 7919);
            let want = 1 + (rng.next() % 4) as u32;
            let mut r = rollout(want, 0);
            r.policy.max_surge = (rng.next() % 3) as u32;
            r.policy.max_unavailable = (rng.next() % 2) as u32;
            if r.policy.max_surge == 0 && r.policy.max_unavailable == 0 {
                r.policy.max_surge = 1;
            }
            r.floor = want - r.policy.max_unavailable.min(want);
            let mut reps: Vec<Replica> = (0..want).map(|i| serving(&format!("old-{i}"), i, 1)).collect();
            let mut seq = 0;
            let mut now = 0i64;
            let mut ended = false;
            for _ in 0..2000 {
                now += 200;
                // The world moves: starts, health, confirmations, flaps.
                for x in reps.iter_mut() {
                    if x.release == 2 && !x.healthy && rng.chance(30) {
                        x.healthy = true;
                        x.healthy_since_ms = Some(now);
                    } else if x.healthy && !x.routed && rng.chance(50) {
                        x.routed = true;
                    } else if x.phase == Phase::Draining && rng.chance(50) {
                        x.unrouted = true;
                    } else if x.healthy && rng.chance(1) {
                        x.healthy = false;
                        x.healthy_since_ms = None;
                        x.routed = false;
                    }
                }
                let before = reps.iter().filter(|x| x.available()).count() as u32;
                let actions = step(&r, &reps, now);
                for a in &actions {
                    match a {
                        Action::StartNew { slot } => {
                            seq += 1;
                            reps.push(starting(&format!("new-{seq}"), *slot, now));
                        }
                        Action::Drain { name } => {
                            let x = reps.iter_mut().find(|x| &x.name == name).unwrap();
                            x.phase = Phase::Draining;
                            x.phase_ms = now;
                            x.unrouted = false;
                        }
                        Action::Remove { name } => reps.retain(|x| &x.name != name),
                        Action::Fail { .. } | Action::Complete => ended = true,
                    }
                }
                let after = reps.iter().filter(|x| x.available()).count() as u32;
                assert!(
                    after >= before.min(r.floor),
                    "seed {seed}: {before} → {after} serving, floor {}, actions {actions:?}",
                    r.floor
                );
                let running = reps.iter().filter(|x| x.phase == Phase::Active).count() as u32;
                assert!(
                    running <= want + r.policy.max_surge,
                    "seed {seed}: {running} active replicas"
                );
                if ended {
                    break;
                }
            }
            assert!(ended, "seed {seed}: the rollout never ended: {reps:?}");
        }
    }
}
