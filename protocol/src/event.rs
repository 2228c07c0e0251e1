//! The event stream, `GET /v1/events` (`berth events`): deploys, rollout
//! steps, health changes, nodes, certificates, builds, execs, upgrades.

use serde::{Deserialize, Serialize};

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A release was made: deploy, scale, rollback.
    Deploy,
    /// A rollout step reached a stage (starting, healthy, routed, draining, done, failed).
    Rollout,
    /// A release ended: complete, failed, rolled back.
    Release,
    /// A replica became healthy or unhealthy.
    Health,
    /// A replica's container restarted, or autoheal made it anew or gave up.
    Restart,
    /// A node joined, was removed, went offline or came back.
    Node,
    /// A certificate was issued, renewed, or its order failed.
    Certificate,
    /// A build was started or ended.
    Build,
    /// A command was run in a replica (`berth exec`): who, where, what; never its output.
    Exec,
    /// An agent upgrade was asked for, or a node reports a new version.
    Upgrade,
    /// A kind newer than this client.
    #[serde(other)]
    Unknown,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Deploy => "deploy",
            EventKind::Rollout => "rollout",
            EventKind::Release => "release",
            EventKind::Health => "health",
            EventKind::Restart => "restart",
            EventKind::Node => "node",
            EventKind::Certificate => "certificate",
            EventKind::Build => "build",
            EventKind::Exec => "exec",
            EventKind::Upgrade => "upgrade",
            EventKind::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> EventKind {
        serde_json::from_value(serde_json::Value::String(s.to_string())).unwrap_or(EventKind::Unknown)
    }
}

/// One event. `id` orders the stream: ask for `after=ID` to go on from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    pub id: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_read_back_and_unknown_ones_do_not_fail() {
        for k in [
            EventKind::Deploy,
            EventKind::Rollout,
            EventKind::Exec,
            EventKind::Certificate,
        ] {
            assert_eq!(EventKind::parse(k.as_str()), k);
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        let e: Event = serde_json::from_str(r#"{"id":1,"at_ms":2,"kind":"teleport","message":"m"}"#).unwrap();
        assert_eq!(e.kind, EventKind::Unknown);
    }
}
