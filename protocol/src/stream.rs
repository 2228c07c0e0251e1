//! Live streams between a replica and the admin: `berth logs` and `berth exec`.
//!
//! The control plane is not on the mesh and agents may sit behind NAT, so
//! the agent dials out. The control plane queues a [`StreamJob`] for the
//! node. The agent, which long-polls `GET /v1/agent/streams/next`, opens a
//! WebSocket to `GET /v1/agent/streams/ID`, signed like any node request.
//! The control plane then relays between that socket and the admin's
//! request. Nothing is stored on the way. See docs/logs.md.

use serde::{Deserialize, Serialize};

/// Longest `cmd` accepted for an exec, in bytes over all its arguments.
pub const MAX_EXEC_CMD_BYTES: usize = 16 * 1024;

/// The answer of `GET /v1/agent/streams/next` when work is waiting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StreamJobs {
    pub jobs: Vec<StreamJob>,
}

/// Work for an agent: stream a replica's log or run a command in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StreamJob {
    /// 32 hex characters, unguessable; the agent's WebSocket names it.
    pub id: String,
    pub replica: String,
    #[serde(flatten)]
    pub kind: StreamKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StreamKind {
    Logs(LogsRequest),
    Exec(ExecRequest),
    /// The agent's own log (`berth nodes logs`); `replica` is the node's name.
    AgentLog(LogsRequest),
}

/// A replica's log: the last `tail` lines (all when absent) written since
/// `since` (Unix seconds), then, with `follow`, what comes until the
/// container stops or the admin leaves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogsRequest {
    #[serde(default)]
    pub follow: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u32>,
}

/// A command to run in a replica. With `tty` it gets a terminal of
/// `rows`×`cols`; with `interactive` its stdin is the admin's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub interactive: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

/// One line of a log, as `GET /v1/services/NAME/logs` sends it: one JSON
/// object per line (NDJSON). A line with `notice` instead of `line` says
/// something about the stream (a replica joined or ended, a limit was hit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    pub replica: String,
    /// `stdout` or `stderr`; absent on a notice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// When the container wrote it (RFC 3339, as Podman logged it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
}

impl LogLine {
    pub fn notice(replica: &str, notice: impl Into<String>) -> LogLine {
        LogLine {
            replica: replica.to_string(),
            stream: None,
            ts: None,
            line: None,
            notice: Some(notice.into()),
        }
    }
}

/// Control messages of an exec socket, sent as WebSocket text. Output and
/// input travel as binary messages: from the replica, the first byte is the
/// stream (1 stdout, 2 stderr) and the rest its bytes; to the replica, the
/// whole message is stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ExecControl {
    /// The admin's terminal changed size.
    Resize { rows: u16, cols: u16 },
    /// The admin's stdin ended.
    Eof,
    /// The command ended with this code; the last message.
    Exit { code: i32 },
    /// The command could not run, or the stream broke; the last message.
    Error { message: String },
}

/// First byte of a binary exec message from the replica: which stream.
pub const EXEC_STDOUT: u8 = 1;
pub const EXEC_STDERR: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_and_controls_keep_their_wire_form() {
        let job = StreamJob {
            id: "ab".into(),
            replica: "web-3".into(),
            kind: StreamKind::Exec(ExecRequest {
                cmd: vec!["sh".into()],
                tty: true,
                interactive: true,
                rows: 24,
                cols: 80,
            }),
        };
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(v["kind"], "exec");
        assert_eq!(v["replica"], "web-3");
        assert_eq!(v["cmd"][0], "sh");
        assert_eq!(serde_json::from_value::<StreamJob>(v).unwrap(), job);

        let logs: StreamJob =
            serde_json::from_str(r#"{"id":"cd","replica":"web-1","kind":"logs","follow":true,"tail":10}"#).unwrap();
        assert_eq!(
            logs.kind,
            StreamKind::Logs(LogsRequest {
                follow: true,
                since: None,
                tail: Some(10)
            })
        );

        assert_eq!(
            serde_json::to_string(&ExecControl::Exit { code: 3 }).unwrap(),
            r#"{"exit":{"code":3}}"#
        );
        assert_eq!(serde_json::to_string(&ExecControl::Eof).unwrap(), r#""eof""#);
        let line = LogLine::notice("web-1", "ended");
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"replica":"web-1","notice":"ended"}"#
        );
    }
}
