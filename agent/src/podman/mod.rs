//! A thin client of Podman's libpod REST API over its unix socket.
//!
//! Paths are versioned (`/v4.0.0/libpod/...`): Podman 4.x and 5.x both serve
//! them. Verified against Podman 4.3.1 (Debian 12) with runc and cgroupfs.
//!
//! Things the caller must know:
//! - `create` does not pull: check [`Podman::image_exists`] and [`Podman::pull`]
//!   first (create on a missing image fails with a 500 naming the image).
//! - Health checks only run by themselves where Podman can create systemd
//!   timers. Without systemd (this machine, containers run by a service outside
//!   systemd) call [`Podman::healthcheck`] every interval; Podman then keeps
//!   the streak and the `healthy`/`unhealthy` state shown by `inspect`.
//! - The restart policy is applied by conmon's exit hook and works without
//!   systemd; a container stopped through the API stays stopped.
//! - `env` (secrets included) travels in the request body only.
//! - The SpecGenerator's `stop_signal` is a number (Go's syscall.Signal); a
//!   name fails the create. `restart` takes its timeout as `timeout` (libpod)
//!   and kills at once without it.

mod build;
mod exec;
mod inspect;
pub mod logs;
mod spec;
mod transport;

pub use build::BuildParams;
pub use exec::{next_chunk, ExecState};
pub use inspect::{
    ContainerDetails, ContainerState, ContainerSummary, Health, HealthCheckRun, HealthStatus, NetworkAttachment,
};
pub use spec::{
    signal_name, signal_number, ContainerSpec, HealthCheck, NetworkSpec, RestartPolicy, Volume, CPU_PERIOD_US,
};

use hyper::{Method, StatusCode};
use ipnet::Ipv4Net;
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use transport::encode;

/// API prefix; accepted by Podman 4.0 and later, including 5.x.
const API: &str = "/v4.0.0/libpod";
/// Bound on ordinary calls (Podman answers them in milliseconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a pull, which may move gigabytes.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// What stop may take beyond the container's own stop timeout.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Bound on a log read (a tail of a few lines comes at once).
const LOGS_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of log read for a tail; the rest is not waited for.
const LOGS_MAX_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the Podman socket {socket}: {source}")]
    Connect { socket: PathBuf, source: std::io::Error },
    #[error("Podman API {what}: {source}")]
    Http { what: String, source: hyper::Error },
    #[error("Podman API {what}: no answer after {after:?}")]
    Timeout { what: String, after: Duration },
    /// Podman answered with an error status; `message` is Podman's own.
    #[error("Podman: {message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("pulling {reference}: {message}")]
    Pull { reference: String, message: String },
    /// A build step failed; Podman's message names the step and its exit status.
    #[error("{message}")]
    Build { message: String },
    #[error("pushing {name}: {message}")]
    Push { name: String, message: String },
    #[error("reading the build context {path}: {source}")]
    Context { path: PathBuf, source: std::io::Error },
    #[error("network {name} exists with subnet {existing}, not {wanted}")]
    NetworkMismatch {
        name: String,
        existing: String,
        wanted: String,
    },
    #[error("unexpected answer from Podman: {0}")]
    Decode(String),
}

impl Error {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The container, image or network does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A client of one Podman service socket (e.g. `/run/podman/podman.sock`).
#[derive(Debug, Clone)]
pub struct Podman {
    socket: PathBuf,
}

impl Podman {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Podman { socket: socket.into() }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>, timeout: Duration) -> Result<Response> {
        let body = body.map(|b| serde_json::to_vec(b).expect("a serde_json::Value serialises"));
        let (status, data) = transport::call(&self.socket, method, path, body, timeout).await?;
        Ok(Response { status, data })
    }

    /// Podman's version (e.g. "4.3.1"); fails when the service is not up.
    pub async fn ping(&self) -> Result<String> {
        let r = self
            .call(Method::GET, &format!("{API}/version"), None, CALL_TIMEOUT)
            .await?
            .ok()?;
        let v = r.json()?;
        let version = v["Version"]
            .as_str()
            .or_else(|| {
                v["Components"]
                    .as_array()?
                    .iter()
                    .find(|c| c["Name"] == "Podman Engine")?["Version"]
                    .as_str()
            })
            .ok_or_else(|| Error::Decode("version without a Version field".into()))?;
        Ok(version.to_string())
    }

    pub async fn image_exists(&self, name: &str) -> Result<bool> {
        let path = format!("{API}/images/{}/exists", encode(name, b"/:@"));
        let r = self.call(Method::GET, &path, None, CALL_TIMEOUT).await?;
        match r.status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(r.error()),
        }
    }

    /// Pulls an image. `tls_verify = false` allows a plain-HTTP registry.
    /// `auth`: an `X-Registry-Auth` value (see [`crate::registry::auth_header`]).
    /// The progress stream is consumed; an error line fails the call.
    pub async fn pull(&self, reference: &str, tls_verify: bool, auth: Option<String>) -> Result<()> {
        let path = format!(
            "{API}/images/pull?reference={}&tlsVerify={tls_verify}&quiet=false",
            encode(reference, b"")
        );
        let what = format!("POST {path}");
        let headers: Vec<(&str, String)> = auth.into_iter().map(|a| ("x-registry-auth", a)).collect();
        let fut = async {
            let mut resp = transport::send_with(&self.socket, Method::POST, &path, None, &headers).await?;
            if !resp.status().is_success() {
                let data = transport::read_all(resp.body_mut(), &what).await?;
                return Err(Response {
                    status: resp.status(),
                    data,
                }
                .error());
            }
            // One JSON object per line: {"stream": ...}, {"images": [...], "id": ...} or {"error": ...}.
            let mut error = None;
            let mut pulled = false;
            let mut lines = transport::JsonLines::new(resp.body_mut(), &what);
            while let Some(v) = lines.next().await? {
                if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
                    error = Some(e.to_string());
                }
                if v["id"].as_str().is_some_and(|id| !id.is_empty()) {
                    pulled = true;
                }
            }
            match error {
                Some(message) => Err(Error::Pull {
                    reference: reference.to_string(),
                    message,
                }),
                None if !pulled => Err(Error::Pull {
                    reference: reference.to_string(),
                    message: "Podman reported no image".into(),
                }),
                None => Ok(()),
            }
        };
        match tokio::time::timeout(PULL_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                what,
                after: PULL_TIMEOUT,
            }),
        }
    }

    /// Creates the bridge network unless it exists; an existing network with
    /// the same name must have the same subnet and gateway.
    pub async fn network_ensure(&self, spec: &NetworkSpec) -> Result<()> {
        for _ in 0..2 {
            if let Some(existing) = self.network_inspect(&spec.name).await? {
                return check_network(spec, &existing);
            }
            let r = self
                .call(
                    Method::POST,
                    &format!("{API}/networks/create"),
                    Some(&spec.to_json()),
                    CALL_TIMEOUT,
                )
                .await?;
            match r.status {
                s if s.is_success() => return Ok(()),
                // Created concurrently by someone else: check theirs.
                StatusCode::CONFLICT => continue,
                _ => return Err(r.error()),
            }
        }
        Err(Error::Decode(format!(
            "network {} neither exists nor can be created",
            spec.name
        )))
    }

    /// The network's libpod JSON, `None` when it does not exist.
    async fn network_inspect(&self, name: &str) -> Result<Option<Value>> {
        let r = self
            .call(
                Method::GET,
                &format!("{API}/networks/{}/json", encode(name, b"")),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        match r.status {
            StatusCode::NOT_FOUND => Ok(None),
            _ => Ok(Some(r.ok()?.json()?)),
        }
    }

    /// Removes a network (not forced: fails while containers use it).
    pub async fn network_remove(&self, name: &str) -> Result<()> {
        let path = format!("{API}/networks/{}", encode(name, b""));
        let r = self.call(Method::DELETE, &path, None, CALL_TIMEOUT).await?.ok()?;
        // [{"Name": ..., "Err": ...}]
        if let Ok(Value::Array(reports)) = r.json() {
            for rep in reports {
                if let Some(e) = rep["Err"].as_str().filter(|e| !e.is_empty()) {
                    return Err(Error::Api {
                        status: 500,
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Creates a container (without pulling; see the module notes) and
    /// returns its ID.
    pub async fn create(&self, spec: &ContainerSpec) -> Result<String> {
        let r = self
            .call(
                Method::POST,
                &format!("{API}/containers/create"),
                Some(&spec.to_json()),
                CALL_TIMEOUT,
            )
            .await?
            .ok()?;
        let v = r.json()?;
        v["Id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Decode("create answered without an Id".into()))
    }

    /// Starts a container; starting a running one is not an error.
    pub async fn start(&self, id: &str) -> Result<()> {
        let path = format!("{API}/containers/{}/start", encode(id, b""));
        self.call(Method::POST, &path, None, CALL_TIMEOUT).await?.ok()?;
        Ok(())
    }

    /// Stops a container: its stop signal, then SIGKILL after `timeout_secs`.
    /// Stopping a stopped container is not an error.
    pub async fn stop(&self, id: &str, timeout_secs: u32) -> Result<()> {
        let path = format!("{API}/containers/{}/stop?timeout={timeout_secs}", encode(id, b""));
        let limit = Duration::from_secs(u64::from(timeout_secs)) + STOP_GRACE;
        self.call(Method::POST, &path, None, limit).await?.ok()?;
        Ok(())
    }

    /// Restarts a container: its stop signal, SIGKILL after `timeout_secs`,
    /// then a start (a stopped container is just started).
    ///
    /// libpod reads `timeout` here (`t` is the Docker API's name); without
    /// it libpod sends SIGKILL at once. Both are sent.
    pub async fn restart(&self, id: &str, timeout_secs: u32) -> Result<()> {
        let path = format!(
            "{API}/containers/{}/restart?timeout={timeout_secs}&t={timeout_secs}",
            encode(id, b"")
        );
        let limit = Duration::from_secs(u64::from(timeout_secs)) + STOP_GRACE;
        self.call(Method::POST, &path, None, limit).await?.ok()?;
        Ok(())
    }

    /// The last `lines` lines of the container's stdout and stderr (in the
    /// order written), each cut to `max_line_bytes`.
    pub async fn logs_tail(&self, id: &str, lines: usize, max_line_bytes: usize) -> Result<Vec<String>> {
        let path = format!(
            "{API}/containers/{}/logs?stdout=true&stderr=true&follow=false&tail={lines}",
            encode(id, b"")
        );
        let what = format!("GET {path}");
        let fut = async {
            let mut resp = transport::send(&self.socket, Method::GET, &path, None).await?;
            let status = resp.status();
            let mut data = Vec::new();
            while let Some(chunk) = transport::next_chunk(resp.body_mut()).await {
                let chunk = chunk.map_err(|e| Error::Http {
                    what: what.clone(),
                    source: e,
                })?;
                data.extend_from_slice(&chunk);
                if data.len() >= LOGS_MAX_BYTES {
                    break;
                }
            }
            Response { status, data }.ok()
        };
        let r = match tokio::time::timeout(LOGS_TIMEOUT, fut).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Timeout {
                    what,
                    after: LOGS_TIMEOUT,
                })
            }
        };
        Ok(logs::last_lines(&r.data, lines, max_line_bytes))
    }

    /// Every container's figures (libpod's `containers/stats`, one sample):
    /// `Name`, `CPUNano` (CPU time used), `MemUsage`, `NetInput`, `NetOutput`, ….
    pub async fn stats(&self) -> Result<Vec<Value>> {
        let path = format!("{API}/containers/stats?stream=false");
        let r = self.call(Method::GET, &path, None, CALL_TIMEOUT).await?.ok()?;
        let v: Value = serde_json::from_slice(&r.data).map_err(|e| Error::Decode(e.to_string()))?;
        Ok(v["Stats"].as_array().cloned().unwrap_or_default())
    }

    /// Removes a container and its anonymous volumes; `force` kills it first
    /// if it runs.
    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        let path = format!("{API}/containers/{}?force={force}&v=true", encode(id, b""));
        let r = self
            .call(Method::DELETE, &path, None, CALL_TIMEOUT + STOP_GRACE)
            .await?
            .ok()?;
        // 4.x and 5.x answer 200 with [{"Id": ..., "Err": ...}]; older ones 204.
        if let Ok(Value::Array(reports)) = r.json() {
            for rep in reports {
                if let Some(e) = rep["Err"].as_str().filter(|e| !e.is_empty()) {
                    return Err(Error::Api {
                        status: 500,
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// All containers (running or not) carrying every given label.
    pub async fn list(&self, label_filter: &[(&str, &str)]) -> Result<Vec<ContainerSummary>> {
        let mut path = format!("{API}/containers/json?all=true");
        if !label_filter.is_empty() {
            let labels: Vec<String> = label_filter.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let filters = serde_json::json!({ "label": labels }).to_string();
            path.push_str("&filters=");
            path.push_str(&encode(&filters, b""));
        }
        let v = self.call(Method::GET, &path, None, CALL_TIMEOUT).await?.ok()?.json()?;
        let list = v
            .as_array()
            .ok_or_else(|| Error::Decode("container list is not an array".into()))?;
        Ok(list.iter().map(inspect::summary).collect())
    }

    pub async fn inspect(&self, id: &str) -> Result<ContainerDetails> {
        let path = format!("{API}/containers/{}/json", encode(id, b""));
        let v = self.call(Method::GET, &path, None, CALL_TIMEOUT).await?.ok()?.json()?;
        Ok(inspect::details(&v))
    }

    /// Runs the container's health check once now (Podman records the
    /// result; `inspect` shows the resulting health). Fails with 409 when
    /// the container is not running or has no health check.
    pub async fn healthcheck(&self, id: &str) -> Result<HealthCheckRun> {
        let path = format!("{API}/containers/{}/healthcheck", encode(id, b""));
        let v = self.call(Method::GET, &path, None, CALL_TIMEOUT).await?.ok()?.json()?;
        Ok(HealthCheckRun {
            status: HealthStatus::parse(v["Status"].as_str().unwrap_or_default()),
            output: inspect::last_health_output(&v["Log"]),
        })
    }
}

fn check_network(spec: &NetworkSpec, existing: &Value) -> Result<()> {
    let subnets: Vec<(Option<Ipv4Net>, Option<Ipv4Addr>)> = existing["subnets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["subnet"].as_str().and_then(|n| n.parse().ok()),
                        s["gateway"].as_str().and_then(|g| g.parse().ok()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let wanted = spec.subnet.trunc();
    let matches = subnets
        .iter()
        .any(|(net, gw)| *net == Some(wanted) && gw.is_none_or(|g| g == spec.gateway));
    if matches {
        return Ok(());
    }
    let existing = existing["subnets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    format!(
                        "{} gateway {}",
                        s["subnet"].as_str().unwrap_or("?"),
                        s["gateway"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    Err(Error::NetworkMismatch {
        name: spec.name.clone(),
        existing: if existing.is_empty() { "none".into() } else { existing },
        wanted: format!("{wanted} gateway {}", spec.gateway),
    })
}

struct Response {
    status: StatusCode,
    data: Vec<u8>,
}

impl Response {
    /// Success (2xx, or 304 "already in that state") or Podman's error.
    fn ok(self) -> Result<Response> {
        if self.status.is_success() || self.status == StatusCode::NOT_MODIFIED {
            Ok(self)
        } else {
            Err(self.error())
        }
    }

    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.data).map_err(|e| {
            let head = String::from_utf8_lossy(&self.data[..self.data.len().min(200)]).into_owned();
            Error::Decode(format!("{e}: {head}"))
        })
    }

    /// Podman's error body is {"cause": ..., "message": ..., "response": status}.
    fn error(&self) -> Error {
        let message = serde_json::from_slice::<Value>(&self.data)
            .ok()
            .and_then(|v| {
                v["message"]
                    .as_str()
                    .or_else(|| v["cause"].as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&self.data).trim().to_string());
        let message = if message.is_empty() {
            self.status.to_string()
        } else {
            message
        };
        Error::Api {
            status: self.status.as_u16(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn net(subnet: &str) -> NetworkSpec {
        NetworkSpec {
            name: "n".into(),
            subnet: subnet.parse().unwrap(),
            gateway: Ipv4Addr::new(10, 1, 2, 1),
            interface_name: None,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn network_check() {
        let existing = json!({"subnets": [{"subnet": "10.1.2.0/24", "gateway": "10.1.2.1"}]});
        assert!(check_network(&net("10.1.2.0/24"), &existing).is_ok());
        let e = check_network(&net("10.1.3.0/24"), &existing).unwrap_err().to_string();
        assert!(e.contains("10.1.2.0/24") && e.contains("10.1.3.0/24"), "{e}");
        let wrong_gw = json!({"subnets": [{"subnet": "10.1.2.0/24", "gateway": "10.1.2.254"}]});
        assert!(check_network(&net("10.1.2.0/24"), &wrong_gw).is_err());
    }

    #[test]
    fn api_error_carries_podman_message() {
        let r = Response {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            data: br#"{"cause":"image not known","message":"localhost/x:1: image not known","response":500}"#.to_vec(),
        };
        let e = r.ok().err().unwrap();
        assert_eq!(e.status(), Some(500));
        assert_eq!(e.to_string(), "Podman: localhost/x:1: image not known (HTTP 500)");
        let r = Response {
            status: StatusCode::NOT_MODIFIED,
            data: vec![],
        };
        assert!(r.ok().is_ok());
    }
}
