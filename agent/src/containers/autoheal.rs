//! Autoheal: what to do about a replica that was healthy and no longer is.
//! Pure (the caller feeds it observations and carries out its decisions), so
//! the whole policy is unit-tested over timelines.
//!
//! An *episode* starts when a replica that has passed its health check at
//! least once stops being healthy (fails its check, or stops running). Once
//! it has been unhealthy without a break for [`Policy::after`], it is
//! restarted; while it stays unhealthy, up to [`Policy::max_restarts`]
//! restarts are made, then up to [`Policy::max_recreates`] recreations (a
//! new container from the same spec), with a backoff after each attempt
//! ([`Policy::backoff`], doubling, at most [`Policy::backoff_max`]). When
//! the last one has not helped either, autoheal gives up and leaves the
//! replica as it is. Healthy again ends the episode: the next one starts
//! from the first restart. Replicas that never were healthy are left to
//! the control plane's rollout.

use std::time::{Duration, Instant};

/// The autoheal policy of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Unhealthy for this long (without a break) before the first restart.
    /// Zero turns autoheal off.
    pub after: Duration,
    /// Wait after the first attempt before the next; doubles each time.
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub max_restarts: u32,
    pub max_recreates: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            after: Duration::from_secs(10),
            backoff: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            max_restarts: 3,
            max_recreates: 3,
        }
    }
}

impl Policy {
    pub fn enabled(&self) -> bool {
        !self.after.is_zero()
    }

    /// The wait after attempt `n` (0 for the first) of an episode.
    pub fn backoff_after(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }
}

/// What autoheal wants done now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Restart,
    Recreate,
    /// The last attempt did not help either: leave it (reported once).
    GiveUp,
}

/// One replica's autoheal state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    healthy_once: bool,
    /// Since when it has been unhealthy in this episode.
    failing_since: Option<Instant>,
    /// Attempts of this episode.
    restarts: u32,
    recreates: u32,
    /// An attempt is being carried out.
    busy: bool,
    /// No attempt before this (backoff after the last one).
    next_at: Option<Instant>,
    gave_up: bool,
    /// Recreations over the replica's life on this node.
    pub total_recreates: u32,
}

impl State {
    /// Feeds one observation (`healthy`: running and passing its check) and
    /// returns what is due now. Each decision must be followed by
    /// [`State::done`] once carried out (or failed).
    pub fn observe(&mut self, policy: &Policy, healthy: bool, now: Instant) -> Option<Decision> {
        if healthy {
            self.healthy_once = true;
            self.failing_since = None;
            self.restarts = 0;
            self.recreates = 0;
            self.next_at = None;
            self.gave_up = false;
            return None;
        }
        if !policy.enabled() || !self.healthy_once || self.gave_up || self.busy {
            return None;
        }
        let since = *self.failing_since.get_or_insert(now);
        let due = match self.next_at {
            None => now.saturating_duration_since(since) >= policy.after,
            Some(at) => now >= at,
        };
        if !due {
            return None;
        }
        let decision = if self.restarts < policy.max_restarts {
            self.restarts += 1;
            Decision::Restart
        } else if self.recreates < policy.max_recreates {
            self.recreates += 1;
            self.total_recreates += 1;
            Decision::Recreate
        } else {
            self.gave_up = true;
            return Some(Decision::GiveUp);
        };
        self.busy = true;
        Some(decision)
    }

    /// The attempt decided last has ended (`now`): the backoff starts.
    pub fn done(&mut self, policy: &Policy, now: Instant) {
        self.busy = false;
        let n = (self.restarts + self.recreates).saturating_sub(1);
        self.next_at = Some(now + policy.backoff_after(n));
    }

    /// A new container that has nothing to do with autoheal (its spec
    /// changed): it starts out never healthy. Totals stay.
    pub fn reset(&mut self) {
        *self = State {
            total_recreates: self.total_recreates,
            ..State::default()
        };
    }

    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// How long this episode has lasted at `now`.
    pub fn failing_for(&self, now: Instant) -> Option<Duration> {
        self.failing_since.map(|t| now.saturating_duration_since(t))
    }

    /// Attempts of this episode: (restarts, recreates).
    pub fn attempts(&self) -> (u32, u32) {
        (self.restarts, self.recreates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Runs `state` over a timeline of one observation a second, carrying
    /// out each decision at once (it takes `action_secs`); returns the
    /// decisions with the second they were made at.
    fn run(
        state: &mut State,
        policy: &Policy,
        t0: Instant,
        healthy_at: impl Fn(u64) -> bool,
        secs: u64,
        action_secs: u64,
    ) -> Vec<(u64, Decision)> {
        let mut out = vec![];
        let mut busy_until: Option<u64> = None;
        for t in 0..secs {
            let now = t0 + S * t as u32;
            if let Some(end) = busy_until {
                if t < end {
                    continue;
                }
                state.done(policy, now);
                busy_until = None;
            }
            if let Some(d) = state.observe(policy, healthy_at(t), now) {
                out.push((t, d));
                if d != Decision::GiveUp {
                    if action_secs == 0 {
                        state.done(policy, now);
                    } else {
                        busy_until = Some(t + action_secs);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = Policy::default();
        let waits: Vec<u64> = (0..8).map(|n| p.backoff_after(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(p.backoff_after(u32::MAX), p.backoff_max);
    }

    #[test]
    fn restarts_then_recreates_then_gives_up() {
        let p = Policy::default();
        let t0 = Instant::now();
        let mut st = State::default();
        // Healthy for 5 s, then never again.
        let got = run(&mut st, &p, t0, |t| t < 5, 1000, 0);
        assert_eq!(
            got,
            vec![
                (15, Decision::Restart),   // 10 s after the first failure at 5
                (20, Decision::Restart),   // + 5
                (30, Decision::Restart),   // + 10
                (50, Decision::Recreate),  // + 20
                (90, Decision::Recreate),  // + 40
                (170, Decision::Recreate), // + 80
                (330, Decision::GiveUp),   // + 160
            ]
        );
        assert!(st.gave_up());
        assert_eq!(st.total_recreates, 3);
        assert_eq!(st.attempts(), (3, 3));
        // Left alone afterwards.
        let now = t0 + S * 2000;
        assert_eq!(st.observe(&p, false, now), None);
    }

    #[test]
    fn the_backoff_runs_from_the_end_of_an_attempt() {
        let p = Policy::default();
        let mut st = State::default();
        // Each attempt takes 12 s (a stop running into its timeout).
        let got = run(&mut st, &p, Instant::now(), |t| t < 1, 200, 12);
        let at: Vec<u64> = got.iter().map(|(t, _)| *t).collect();
        assert_eq!(at[..4], [11, 28, 50, 82]);
    }

    #[test]
    fn never_healthy_is_left_to_the_rollout() {
        let p = Policy::default();
        let mut st = State::default();
        assert!(run(&mut st, &p, Instant::now(), |_| false, 1000, 0).is_empty());
        assert!(!st.gave_up());
    }

    #[test]
    fn short_failures_are_not_healed() {
        let p = Policy::default();
        let mut st = State::default();
        // Fails for 9 s out of every 20.
        let got = run(&mut st, &p, Instant::now(), |t| t % 20 < 11, 1000, 0);
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn healthy_again_starts_a_new_episode() {
        let p = Policy::default();
        let t0 = Instant::now();
        let mut st = State::default();
        // Healthy until 5; the second restart (at 20) helps at 22; fails
        // again at 100 for good.
        let got = run(&mut st, &p, t0, |t| t < 5 || (22..100).contains(&t), 400, 0);
        assert_eq!(
            got[..4],
            [
                (15, Decision::Restart),
                (20, Decision::Restart),
                // The counter started over: three restarts again.
                (110, Decision::Restart),
                (115, Decision::Restart),
            ]
        );
        assert_eq!(got[4], (125, Decision::Restart));
        assert_eq!(got[5], (145, Decision::Recreate));
    }

    #[test]
    fn a_replica_that_recovers_after_giving_up_is_healed_again_later() {
        let p = Policy {
            max_restarts: 1,
            max_recreates: 0,
            ..Policy::default()
        };
        let mut st = State::default();
        let got = run(
            &mut st,
            &p,
            Instant::now(),
            |t| t < 1 || (100..200).contains(&t),
            400,
            0,
        );
        assert_eq!(
            got,
            [
                (11, Decision::Restart),
                (16, Decision::GiveUp),
                (210, Decision::Restart),
                (215, Decision::GiveUp)
            ]
        );
    }

    #[test]
    fn zero_turns_it_off() {
        let p = Policy {
            after: Duration::ZERO,
            ..Policy::default()
        };
        let mut st = State::default();
        assert!(run(&mut st, &p, Instant::now(), |t| t < 5, 1000, 0).is_empty());
    }

    #[test]
    fn nothing_is_decided_while_an_attempt_runs() {
        let p = Policy::default();
        let t0 = Instant::now();
        let mut st = State::default();
        st.observe(&p, true, t0);
        assert_eq!(st.observe(&p, false, t0), None);
        assert_eq!(st.observe(&p, false, t0 + S * 10), Some(Decision::Restart));
        for t in 11..100 {
            assert_eq!(st.observe(&p, false, t0 + S * t), None, "at {t}");
        }
        st.done(&p, t0 + S * 100);
        assert_eq!(st.observe(&p, false, t0 + S * 104), None);
        assert_eq!(st.observe(&p, false, t0 + S * 105), Some(Decision::Restart));
    }

    #[test]
    fn reset_forgets_all_but_the_totals() {
        let p = Policy {
            max_restarts: 0,
            ..Policy::default()
        };
        let t0 = Instant::now();
        let mut st = State::default();
        st.observe(&p, true, t0);
        assert_eq!(st.observe(&p, false, t0), None);
        assert_eq!(st.observe(&p, false, t0 + S * 10), Some(Decision::Recreate));
        st.done(&p, t0 + S * 10);
        st.reset();
        assert_eq!(st.total_recreates, 1);
        // A new container that was never healthy: not healed.
        assert_eq!(st.observe(&p, false, t0 + S * 100), None);
        assert_eq!(st.failing_for(t0 + S * 100), None);
    }
}
