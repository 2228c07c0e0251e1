//! What Podman reports about containers, read leniently from libpod's JSON
//! (fields differ a little between 4.x and 5.x; a missing field is a default,
//! never an error). Nothing here carries the container's environment, so these
//! types are safe to log.

use super::spec::{HealthCheck, RestartPolicy, CPU_PERIOD_US};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Podman's container states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Configured,
    Initialized,
    Running,
    Paused,
    Stopping,
    Stopped,
    Exited,
    Removing,
    Other(String),
}

impl ContainerState {
    pub fn parse(s: &str) -> ContainerState {
        match s.to_ascii_lowercase().as_str() {
            "created" => ContainerState::Created,
            "configured" => ContainerState::Configured,
            "initialized" => ContainerState::Initialized,
            "running" => ContainerState::Running,
            "paused" => ContainerState::Paused,
            "stopping" => ContainerState::Stopping,
            "stopped" => ContainerState::Stopped,
            "exited" => ContainerState::Exited,
            "removing" => ContainerState::Removing,
            other => ContainerState::Other(other.to_string()),
        }
    }

    pub fn is_running(&self) -> bool {
        *self == ContainerState::Running
    }
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ContainerState::Created => "created",
            ContainerState::Configured => "configured",
            ContainerState::Initialized => "initialized",
            ContainerState::Running => "running",
            ContainerState::Paused => "paused",
            ContainerState::Stopping => "stopping",
            ContainerState::Stopped => "stopped",
            ContainerState::Exited => "exited",
            ContainerState::Removing => "removing",
            ContainerState::Other(s) => s,
        };
        f.write_str(s)
    }
}

/// Health of a container with a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthStatus {
    Starting,
    Healthy,
    Unhealthy,
    Other(String),
}

impl HealthStatus {
    pub fn parse(s: &str) -> HealthStatus {
        match s {
            "starting" => HealthStatus::Starting,
            "healthy" => HealthStatus::Healthy,
            "unhealthy" => HealthStatus::Unhealthy,
            other => HealthStatus::Other(other.to_string()),
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthStatus::Starting => f.write_str("starting"),
            HealthStatus::Healthy => f.write_str("healthy"),
            HealthStatus::Unhealthy => f.write_str("unhealthy"),
            HealthStatus::Other(s) => f.write_str(s),
        }
    }
}

/// Health state as `inspect` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub status: HealthStatus,
    /// Consecutive failed checks.
    pub failing_streak: u32,
    /// Output of the most recent check (trimmed), if any.
    pub last_output: Option<String>,
}

/// The answer of one health check run (`GET /containers/{id}/healthcheck`):
/// the result of this run, not the container's overall health (a single
/// failure says `unhealthy` here while `inspect` still says `starting` or
/// `healthy` until `retries` runs failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckRun {
    pub status: HealthStatus,
    /// What the check printed, when Podman includes it in the answer
    /// (4.3 does not: `inspect`'s [`Health::last_output`] has it).
    pub output: Option<String>,
}

/// One entry of `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    pub name: String,
    /// The image as given at create.
    pub image: String,
    pub image_id: String,
    pub state: ContainerState,
    pub labels: BTreeMap<String, String>,
    pub networks: Vec<String>,
    pub exit_code: i64,
    /// When the container last started (Unix seconds; 0 if never). Podman
    /// 4.3's list has no restart count: a change of this for the same
    /// container is how a restart shows.
    pub started_at: i64,
}

/// A container's attachment to one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAttachment {
    pub ip: Option<Ipv4Addr>,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub mac: String,
}

/// `inspect`, reduced to what Berth uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerDetails {
    pub id: String,
    pub name: String,
    /// The image as given at create.
    pub image: String,
    pub image_id: String,
    pub state: ContainerState,
    /// Main process, 0 when not running.
    pub pid: u32,
    pub exit_code: i64,
    /// Podman's error for the last start or exit, empty when none.
    pub error: String,
    pub oom_killed: bool,
    /// RFC 3339; `None` when never started / not finished.
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub restart_count: u32,
    pub restart_policy: Option<RestartPolicy>,
    /// `None` when the container has no health check.
    pub health: Option<Health>,
    pub healthcheck: Option<HealthCheck>,
    pub labels: BTreeMap<String, String>,
    pub networks: BTreeMap<String, NetworkAttachment>,
    /// CPU cores from the CFS quota; `None` when unlimited.
    pub cpu_limit: Option<f64>,
    pub memory_limit: Option<u64>,
    /// The signal `stop` sends first (Linux number); `None` when Podman
    /// does not say.
    pub stop_signal: Option<i32>,
    /// Seconds `stop` waits after it before SIGKILL.
    pub stop_timeout: Option<u32>,
}

impl ContainerDetails {
    pub fn is_running(&self) -> bool {
        self.state.is_running()
    }

    /// The container's IPv4 address on `network`.
    pub fn ip_on(&self, network: &str) -> Option<Ipv4Addr> {
        self.networks.get(network).and_then(|n| n.ip)
    }
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), s(v))).collect())
        .unwrap_or_default()
}

fn u32_of(v: &Value) -> u32 {
    v.as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// Podman reports "never" as Go's zero time.
fn time(v: &Value) -> Option<String> {
    let t = v.as_str()?;
    if t.is_empty() || t.starts_with("0001-01-01") {
        None
    } else {
        Some(t.to_string())
    }
}

fn ipv4(v: &Value) -> Option<Ipv4Addr> {
    v.as_str().filter(|s| !s.is_empty()).and_then(|s| s.parse().ok())
}

pub(crate) fn summary(v: &Value) -> ContainerSummary {
    let name = v["Names"].as_array().and_then(|n| n.first()).map(s).unwrap_or_default();
    ContainerSummary {
        id: s(&v["Id"]),
        name: name.trim_start_matches('/').to_string(),
        image: s(&v["Image"]),
        image_id: s(&v["ImageID"]),
        state: ContainerState::parse(v["State"].as_str().unwrap_or_default()),
        labels: labels(&v["Labels"]),
        networks: v["Networks"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default(),
        exit_code: v["ExitCode"].as_i64().unwrap_or(0),
        started_at: v["StartedAt"].as_i64().unwrap_or(0),
    }
}

fn health(state: &Value) -> Option<Health> {
    // "Health" on 4.x and 5.x; 4.x also had "Healthcheck".
    let h = [&state["Health"], &state["Healthcheck"]]
        .into_iter()
        .find(|h| h.is_object())?;
    let status = h["Status"].as_str().unwrap_or_default();
    if status.is_empty() {
        return None;
    }
    let last_output = last_health_output(&h["Log"]);
    Some(Health {
        status: HealthStatus::parse(status),
        failing_streak: u32_of(&h["FailingStreak"]),
        last_output,
    })
}

/// `Config.StopSignal`: a number on 4.x, a name (or a number as a string) on 5.x.
fn stop_signal(v: &Value) -> Option<i32> {
    match v {
        Value::Number(n) => n.as_i64().and_then(|n| i32::try_from(n).ok()).filter(|n| *n > 0),
        Value::String(s) => super::spec::signal_number(s),
        _ => None,
    }
}

/// The output of the newest entry of a health log (`[{"Output": ...}]`).
pub(crate) fn last_health_output(log: &Value) -> Option<String> {
    log.as_array()
        .and_then(|l| l.last())
        .and_then(|e| e["Output"].as_str())
        .map(|o| o.trim().to_string())
}

fn healthcheck(cfg: &Value) -> Option<HealthCheck> {
    let h = &cfg["Healthcheck"];
    let test: Vec<String> = h["Test"].as_array()?.iter().map(s).collect();
    if test.is_empty() || test[0] == "NONE" {
        return None;
    }
    let d = |v: &Value| Duration::from_nanos(v.as_u64().unwrap_or(0));
    Some(HealthCheck {
        cmd: test,
        interval: d(&h["Interval"]),
        timeout: d(&h["Timeout"]),
        retries: u32_of(&h["Retries"]),
        start_period: d(&h["StartPeriod"]),
    })
}

pub(crate) fn details(v: &Value) -> ContainerDetails {
    let state = &v["State"];
    let host = &v["HostConfig"];
    let networks = v["NetworkSettings"]["Networks"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(name, n)| {
                    let att = NetworkAttachment {
                        ip: ipv4(&n["IPAddress"]),
                        prefix_len: n["IPPrefixLen"]
                            .as_u64()
                            .and_then(|p| u8::try_from(p).ok())
                            .unwrap_or(0),
                        gateway: ipv4(&n["Gateway"]),
                        mac: s(&n["MacAddress"]),
                    };
                    (name.clone(), att)
                })
                .collect()
        })
        .unwrap_or_default();
    let quota = host["CpuQuota"].as_i64().unwrap_or(0);
    let period = host["CpuPeriod"].as_u64().filter(|p| *p > 0).unwrap_or(CPU_PERIOD_US);
    let restart = &host["RestartPolicy"];
    let name = s(&v["Name"]);
    ContainerDetails {
        id: s(&v["Id"]),
        name: name.trim_start_matches('/').to_string(),
        image: [&v["ImageName"], &v["Config"]["Image"]]
            .into_iter()
            .map(s)
            .find(|i| !i.is_empty())
            .unwrap_or_default(),
        image_id: s(&v["Image"]),
        state: ContainerState::parse(state["Status"].as_str().unwrap_or_default()),
        pid: state["Pid"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        exit_code: state["ExitCode"].as_i64().unwrap_or(0),
        error: s(&state["Error"]),
        oom_killed: state["OOMKilled"].as_bool().unwrap_or(false),
        started_at: time(&state["StartedAt"]),
        finished_at: time(&state["FinishedAt"]),
        restart_count: u32_of(&v["RestartCount"]),
        restart_policy: restart["Name"]
            .as_str()
            .and_then(|n| RestartPolicy::parse(n, u32_of(&restart["MaximumRetryCount"]))),
        health: health(state),
        healthcheck: healthcheck(&v["Config"]),
        labels: labels(&v["Config"]["Labels"]),
        networks,
        cpu_limit: (quota > 0).then(|| quota as f64 / period as f64),
        memory_limit: host["Memory"].as_u64().filter(|m| *m > 0),
        stop_signal: stop_signal(&v["Config"]["StopSignal"]),
        stop_timeout: v["Config"]["StopTimeout"].as_u64().and_then(|t| u32::try_from(t).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_inspect_of_podman_4_3() {
        let v = json!({
            "Id": "ad98", "Name": "web1", "Image": "1ad1", "ImageName": "localhost/berth-test/busybox:latest",
            "RestartCount": 2,
            "State": {"Status": "running", "Pid": 7484, "ExitCode": 0, "Error": "", "OOMKilled": false,
                "StartedAt": "2026-11-23T10:17:21.037709628Z", "FinishedAt": "0001-01-01T00:00:00Z",
                "Health": {"Status": "healthy", "FailingStreak": 0,
                    "Log": [{"ExitCode": 0, "Output": "ok\n"}]}},
            "NetworkSettings": {"Networks": {"bt-x": {"IPAddress": "10.231.250.10", "IPPrefixLen": 24,
                "Gateway": "10.231.250.1", "MacAddress": "1a:3b:45:db:3c:4e"}}},
            "Config": {"Labels": {"a": "b"}, "Env": ["SECRET=x"], "StopSignal": 2, "StopTimeout": 7,
                "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": 2000000000u64, "Timeout": 1000000000u64, "Retries": 2}},
            "HostConfig": {"CpuQuota": 50000, "CpuPeriod": 100000, "Memory": 67108864,
                "RestartPolicy": {"Name": "always", "MaximumRetryCount": 0}}
        });
        let d = details(&v);
        assert!(d.is_running());
        assert_eq!(d.ip_on("bt-x"), Some(Ipv4Addr::new(10, 231, 250, 10)));
        assert_eq!(d.finished_at, None);
        assert_eq!(d.restart_count, 2);
        assert_eq!(d.restart_policy, Some(RestartPolicy::Always));
        assert_eq!(d.health.as_ref().unwrap().status, HealthStatus::Healthy);
        assert_eq!(d.health.as_ref().unwrap().last_output.as_deref(), Some("ok"));
        assert_eq!(d.healthcheck.as_ref().unwrap().interval, Duration::from_secs(2));
        assert_eq!(d.cpu_limit, Some(0.5));
        assert_eq!(d.memory_limit, Some(64 << 20));
        assert_eq!(d.labels["a"], "b");
        assert_eq!(d.stop_signal, Some(2));
        assert_eq!(d.stop_timeout, Some(7));
        assert!(!format!("{d:?}").contains("SECRET"));
        // Podman 5 names the signal.
        let mut v5 = v.clone();
        v5["Config"]["StopSignal"] = json!("SIGQUIT");
        assert_eq!(details(&v5).stop_signal, Some(3));
    }

    #[test]
    fn no_healthcheck_no_limits() {
        let v = json!({"Id": "x", "State": {"Status": "exited", "Health": {"Status": "", "FailingStreak": 0}},
            "HostConfig": {"CpuQuota": 0, "Memory": 0, "RestartPolicy": {"Name": ""}}, "Config": {}});
        let d = details(&v);
        assert_eq!(d.state, ContainerState::Exited);
        assert_eq!(d.health, None);
        assert_eq!(d.healthcheck, None);
        assert_eq!(d.cpu_limit, None);
        assert_eq!(d.memory_limit, None);
        assert_eq!(d.restart_policy, Some(RestartPolicy::No));
        assert_eq!((d.stop_signal, d.stop_timeout), (None, None));
    }

    #[test]
    fn parses_list_entry() {
        let v = json!({"Id": "ad98", "Names": ["web1"], "Image": "img", "ImageID": "1ad1", "State": "running",
            "Labels": {"k": "v"}, "Networks": ["bt-x"], "ExitCode": 0});
        let c = summary(&v);
        assert_eq!(c.name, "web1");
        assert!(c.state.is_running());
        assert_eq!(c.networks, vec!["bt-x".to_string()]);
    }
}
