//! Releases and rollouts: every change to a service is a numbered, immutable
//! release; a release that needs new containers is rolled out replica by
//! replica, new before old (docs/services.md).

use crate::error::FieldError;
use crate::service::ServiceSpec;
use serde::{Deserialize, Serialize};
use std::fmt;

/// How a release replaces the replicas of the one before
/// (`berth service deploy --max-surge ... --drain ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RolloutPolicy {
    /// New replicas started beyond the wanted count at one time.
    pub max_surge: u32,
    /// Healthy, routed replicas that may be missing at one time.
    pub max_unavailable: u32,
    /// Seconds a new replica must stay healthy (no check: running) and routed
    /// before it counts as ready and an old one is taken out.
    pub min_ready_secs: u32,
    /// Seconds between taking an old replica out of every route and stopping it.
    pub drain_secs: u32,
    /// Seconds a new replica has to become healthy before the rollout fails.
    pub timeout_secs: u32,
}

impl Default for RolloutPolicy {
    fn default() -> RolloutPolicy {
        RolloutPolicy {
            max_surge: 1,
            max_unavailable: 0,
            min_ready_secs: 2,
            drain_secs: 5,
            timeout_secs: 300,
        }
    }
}

impl RolloutPolicy {
    pub fn is_default(&self) -> bool {
        *self == RolloutPolicy::default()
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if self.max_surge == 0 && self.max_unavailable == 0 {
            return Err(FieldError::new(
                "rollout.max_surge",
                "max_surge and max_unavailable cannot both be 0: nothing could be replaced",
            ));
        }
        for (field, v, max) in [
            ("rollout.max_surge", self.max_surge, crate::service::MAX_REPLICAS),
            (
                "rollout.max_unavailable",
                self.max_unavailable,
                crate::service::MAX_REPLICAS,
            ),
            ("rollout.min_ready_secs", self.min_ready_secs, 3600),
            ("rollout.drain_secs", self.drain_secs, 3600),
            ("rollout.timeout_secs", self.timeout_secs, 24 * 3600),
        ] {
            if v > max {
                return Err(FieldError::new(field, format_args!("{v} is more than {max}")));
            }
        }
        if self.timeout_secs == 0 {
            return Err(FieldError::new("rollout.timeout_secs", "must be at least 1"));
        }
        Ok(())
    }
}

/// Where a release is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseState {
    /// Waiting for the rollout before it to end.
    Queued,
    /// Its replicas are being rolled out.
    Rolling,
    /// Every replica runs it: the service's current release.
    Complete,
    /// Its rollout failed (or was replaced with `--force`); the release
    /// before it kept serving.
    Failed,
    /// It was complete, and a rollback replaced it with an earlier spec.
    RolledBack,
}

impl ReleaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseState::Queued => "queued",
            ReleaseState::Rolling => "rolling",
            ReleaseState::Complete => "complete",
            ReleaseState::Failed => "failed",
            ReleaseState::RolledBack => "rolled-back",
        }
    }

    pub fn parse(s: &str) -> Option<ReleaseState> {
        [
            ReleaseState::Queued,
            ReleaseState::Rolling,
            ReleaseState::Complete,
            ReleaseState::Failed,
            ReleaseState::RolledBack,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// No more changes will happen to it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ReleaseState::Complete | ReleaseState::Failed | ReleaseState::RolledBack
        )
    }
}

impl fmt::Display for ReleaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One release as `berth service history` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseInfo {
    pub service: String,
    pub number: u64,
    /// The spec it runs (secret values never included).
    pub spec: ServiceSpec,
    /// The ID of the image its replicas run (`sha256:...`, Podman's image
    /// ID, i.e. the config digest; not a registry manifest digest), once a
    /// node has reported it.
    pub image_digest: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Who made it (`admin` for every release today).
    pub created_by: String,
    pub state: ReleaseState,
    /// Why it failed, or what it was for (`scale 2 → 3`, `rollback to 3`,
    /// `no container changes`).
    pub reason: Option<String>,
    pub finished_at: Option<i64>,
    /// Whether it needed new containers (a scale alone does not).
    pub rollout: bool,
}

/// Where one replacement of a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum StepStage {
    /// Not begun: waiting for an earlier batch.
    Waiting,
    /// The old replica is being taken out first (stop-first services).
    StoppingOld,
    /// The new replica is created and starting.
    Starting,
    /// Its health check passes (no check: it runs), not yet loaded everywhere.
    Healthy,
    /// Every online node's DNS and every online proxy has loaded it; it stays
    /// here until it has been healthy for min_ready.
    Routed,
    /// The old replica is out of every route and drains.
    Draining,
    /// The old replica is stopped and removed.
    Done,
    /// The new replica did not become healthy.
    Failed,
}

impl StepStage {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStage::Waiting => "waiting",
            StepStage::StoppingOld => "stopping-old",
            StepStage::Starting => "starting",
            StepStage::Healthy => "healthy",
            StepStage::Routed => "routed",
            StepStage::Draining => "old draining",
            StepStage::Done => "done",
            StepStage::Failed => "failed",
        }
    }
}

impl fmt::Display for StepStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One replacement: a new replica for an old one (either may be absent when
/// the count changes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutStep {
    /// The slot (0-based) the two replicas share.
    pub slot: u32,
    pub new_replica: Option<String>,
    pub old_replica: Option<String>,
    /// Node of the new replica (or of the old one, before it is placed).
    pub node: Option<String>,
    pub stage: StepStage,
    /// Unix milliseconds when it reached each stage so far, in order.
    #[serde(default)]
    pub times: Vec<(StepStage, i64)>,
}

/// A rollout as `berth service status` and `deploy` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutInfo {
    pub service: String,
    /// The release being rolled out.
    pub release: u64,
    /// The release it replaces (the last complete one), if any.
    pub from_release: Option<u64>,
    pub state: ReleaseState,
    /// Rolling back to `from_release` after a failure.
    pub rolling_back: bool,
    /// Replacements at a time, and whether old replicas stop before their
    /// successors start (services with volumes).
    pub batch: u32,
    pub stop_first: bool,
    pub reason: Option<String>,
    pub steps: Vec<RolloutStep>,
}

/// `POST /v1/services/{name}/rollback`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The release whose spec to roll out again (default: the complete one
    /// before the current).
    #[serde(default)]
    pub to: Option<u64>,
    /// Replace a rollout in progress instead of queueing behind it.
    #[serde(default)]
    pub force: bool,
}

/// Query of `POST /v1/services`: `?force=true` replaces a rollout in
/// progress instead of queueing behind it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct DeployQuery {
    #[serde(default)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_defaults_and_checks() {
        let p: RolloutPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, RolloutPolicy::default());
        assert_eq!(
            (p.max_surge, p.max_unavailable, p.min_ready_secs, p.drain_secs),
            (1, 0, 2, 5)
        );
        p.validate().unwrap();
        let both_zero = RolloutPolicy { max_surge: 0, ..p };
        assert_eq!(both_zero.validate().unwrap_err().field, "rollout.max_surge");
        assert!(serde_json::from_str::<RolloutPolicy>(r#"{"surge": 1}"#).is_err());
    }

    #[test]
    fn states_read_back() {
        for s in ["queued", "rolling", "complete", "failed", "rolled-back"] {
            let st = ReleaseState::parse(s).unwrap();
            assert_eq!(st.as_str(), s);
            assert_eq!(serde_json::to_value(st).unwrap(), s);
        }
        assert!(ReleaseState::Failed.is_final() && !ReleaseState::Rolling.is_final());
    }
}
