//! Health of the local replicas, as the agent observes it. Podman runs health
//! checks by itself only through systemd timers, so the agent drives them:
//! a command check through Podman's healthcheck endpoint (Podman counts the
//! streak), an HTTP check itself, from the node to the replica's IP (no tool
//! needed in the image, and it proves the replica is reachable). A replica
//! with a port and no check of its own must accept TCP connections on it, so
//! that one which takes a while to start listening is not served too early.

use super::create_spec::{HEALTH_INTERVAL, HEALTH_RETRIES, HEALTH_TIMEOUT};
use berth_protocol::service::ContainerDesired;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Until the first pass a replica is checked this often (so a new replica
/// enters DNS, and a rollout moves on, quickly), then every
/// [`HEALTH_INTERVAL`].
pub const FIRST_PASS_INTERVAL: Duration = Duration::from_millis(200);
/// ...but only for this long: one that never passes is not worth the haste.
pub const FIRST_PASS_WINDOW: Duration = Duration::from_secs(60);

/// The check a replica has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// No check: healthy while running.
    None,
    /// A command run in the container by Podman.
    Command,
    /// `GET path` on `ip:port` must answer 2xx or 3xx.
    Http { ip: Ipv4Addr, port: u16, path: String },
    /// `ip:port` must accept a TCP connection.
    Tcp { ip: Ipv4Addr, port: u16 },
}

impl Check {
    /// The check replica `c` gets: its command, else its HTTP path on its
    /// port, else a TCP connect to its port; none without a port.
    pub fn for_replica(c: &ContainerDesired) -> Check {
        match (&c.health_cmd, &c.health_http, c.port) {
            (Some(_), _, _) => Check::Command,
            (None, Some(path), Some(port)) => Check::Http {
                ip: c.ip,
                port,
                path: path.clone(),
            },
            (None, None, Some(port)) => Check::Tcp { ip: c.ip, port },
            // An HTTP path without a port has nowhere to go.
            (None, _, None) => Check::None,
        }
    }
}

/// The outcome of one check run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Podman's verdict after counting the streak (command checks).
    Verdict {
        healthy: bool,
    },
}

/// One replica's health over time.
#[derive(Debug, Clone)]
pub struct Tracker {
    pub healthy: bool,
    passed_once: bool,
    failures: u32,
    /// The checks so far say it fails (enough failures in a row, or
    /// Podman's verdict), as opposed to not checked yet.
    failing: bool,
    next_due: Instant,
    /// When it began (a new container gets a new tracker).
    since: Instant,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            healthy: false,
            passed_once: false,
            failures: 0,
            failing: false,
            next_due: Instant::now(),
            since: Instant::now(),
        }
    }
}

impl Tracker {
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_due
    }

    /// New and not passed yet: checked every [`FIRST_PASS_INTERVAL`].
    pub fn awaiting_first_pass(&self, now: Instant) -> bool {
        !self.passed_once && now.duration_since(self.since) < FIRST_PASS_WINDOW
    }

    /// Its checks fail: unhealthy for a reason, not merely unchecked.
    pub fn failing(&self) -> bool {
        self.failing
    }

    /// Records a check; returns whether `healthy` changed.
    pub fn record(&mut self, outcome: Outcome, now: Instant) -> bool {
        let before = self.healthy;
        match outcome {
            Outcome::Pass => {
                self.failures = 0;
                self.passed_once = true;
                self.healthy = true;
                self.failing = false;
            }
            Outcome::Fail => {
                self.failures += 1;
                if self.failures >= HEALTH_RETRIES {
                    self.healthy = false;
                    self.failing = true;
                }
            }
            Outcome::Verdict { healthy } => {
                self.passed_once |= healthy;
                self.healthy = healthy;
                self.failing = !healthy;
            }
        }
        self.next_due = now
            + if self.awaiting_first_pass(now) {
                FIRST_PASS_INTERVAL
            } else {
                HEALTH_INTERVAL
            };
        before != self.healthy
    }
}

/// One HTTP/1.1 GET with a deadline; any 2xx or 3xx passes. A failure says
/// what went wrong (`GET /nope: HTTP 404`).
pub async fn http_check(ip: Ipv4Addr, port: u16, path: &str) -> Result<(), String> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(SocketAddr::from((ip, port)))
            .await
            .map_err(|e| format!("connect {ip}:{port}: {e}"))?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: berth-health\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut head = [0u8; 16];
        let mut n = 0;
        while n < 12 {
            let got = s.read(&mut head[n..]).await.map_err(|e| e.to_string())?;
            if got == 0 {
                break;
            }
            n += got;
        }
        status_verdict(&head[..n])
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("GET {path}: {e}")),
        Err(_) => Err(format!("GET {path}: no answer within {HEALTH_TIMEOUT:?}")),
    }
}

/// `ip:port` accepts a TCP connection within the check's deadline.
pub async fn tcp_check(ip: Ipv4Addr, port: u16) -> Result<(), String> {
    match tokio::time::timeout(
        HEALTH_TIMEOUT,
        tokio::net::TcpStream::connect(SocketAddr::from((ip, port))),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect {ip}:{port}: {e}")),
        Err(_) => Err(format!("connect {ip}:{port}: no answer within {HEALTH_TIMEOUT:?}")),
    }
}

/// `HTTP/1.x 2xx` or `3xx` passes; anything else says what came.
fn status_verdict(head: &[u8]) -> Result<(), String> {
    if head.len() < 12 || !head.starts_with(b"HTTP/1.") {
        return Err(if head.is_empty() {
            "closed without an answer".to_string()
        } else {
            "not an HTTP answer".to_string()
        });
    }
    let code = String::from_utf8_lossy(&head[9..12]).into_owned();
    match head[9] {
        b'2' | b'3' => Ok(()),
        _ => Err(format!("HTTP {code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_line() {
        assert_eq!(status_verdict(b"HTTP/1.1 200 OK"), Ok(()));
        assert_eq!(status_verdict(b"HTTP/1.0 302 Found"), Ok(()));
        assert_eq!(status_verdict(b"HTTP/1.1 404 Not Found"), Err("HTTP 404".into()));
        assert_eq!(status_verdict(b"HTTP/1.1 500 x"), Err("HTTP 500".into()));
        assert_eq!(status_verdict(b"SSH-2.0-xxxxxx"), Err("not an HTTP answer".into()));
        assert_eq!(status_verdict(b"HTTP/1.1"), Err("not an HTTP answer".into()));
        assert_eq!(status_verdict(b""), Err("closed without an answer".into()));
    }

    fn desired(port: Option<u16>, cmd: Option<&str>, http: Option<&str>) -> ContainerDesired {
        let mut c: ContainerDesired = serde_json::from_value(serde_json::json!({
            "replica": "web-1", "service": "web", "image": "x", "ip": "10.200.0.2", "port": null,
            "env": {}, "sealed_secrets": null, "command": null, "cpu": null, "memory": null,
            "health_cmd": null, "health_http": null, "volumes": []
        }))
        .unwrap();
        c.port = port;
        c.health_cmd = cmd.map(str::to_string);
        c.health_http = http.map(str::to_string);
        c
    }

    #[test]
    fn check_selection() {
        let ip = Ipv4Addr::new(10, 200, 0, 2);
        assert_eq!(
            Check::for_replica(&desired(Some(8080), None, None)),
            Check::Tcp { ip, port: 8080 },
            "a port without a check of its own must accept connections"
        );
        assert_eq!(
            Check::for_replica(&desired(Some(8080), None, Some("/healthz"))),
            Check::Http {
                ip,
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(
            Check::for_replica(&desired(Some(8080), Some("true"), Some("/healthz"))),
            Check::Command,
            "the command wins"
        );
        assert_eq!(Check::for_replica(&desired(None, Some("true"), None)), Check::Command);
        assert_eq!(Check::for_replica(&desired(None, None, None)), Check::None);
        assert_eq!(Check::for_replica(&desired(None, None, Some("/healthz"))), Check::None);
    }

    #[test]
    fn failing_means_checked_and_failed() {
        let mut t = Tracker::default();
        let now = Instant::now();
        assert!(!t.failing(), "not checked yet");
        t.record(Outcome::Fail, now);
        assert!(
            !t.failing() && !t.healthy,
            "one failure while starting is not failing yet"
        );
        t.record(Outcome::Fail, now);
        assert!(t.failing());
        t.record(Outcome::Pass, now);
        assert!(!t.failing() && t.healthy);
        t.record(Outcome::Verdict { healthy: false }, now);
        assert!(t.failing() && !t.healthy);
    }

    #[test]
    fn unhealthy_after_retries_and_back_after_one_pass() {
        let mut t = Tracker::default();
        let now = Instant::now();
        assert!(!t.healthy && t.due(now));
        assert!(t.record(Outcome::Pass, now));
        assert!(!t.due(now), "checked again only after the interval");
        assert!(t.due(now + HEALTH_INTERVAL));
        for _ in 1..HEALTH_RETRIES {
            assert!(!t.record(Outcome::Fail, now));
            assert!(t.healthy, "one failure is not enough");
        }
        assert!(t.record(Outcome::Fail, now));
        assert!(!t.healthy);
        assert!(t.record(Outcome::Pass, now));
        assert!(t.healthy);
    }

    #[test]
    fn new_replica_is_polled_fast_until_first_pass() {
        let mut t = Tracker::default();
        let now = Instant::now();
        t.record(Outcome::Fail, now);
        assert!(t.due(now + FIRST_PASS_INTERVAL));
        t.record(Outcome::Verdict { healthy: true }, now);
        assert!(t.healthy);
        assert!(!t.due(now + FIRST_PASS_INTERVAL));
    }

    #[test]
    fn one_that_never_passes_is_polled_fast_only_for_the_window() {
        let mut t = Tracker::default();
        let start = Instant::now();
        assert!(t.awaiting_first_pass(start));
        t.record(Outcome::Fail, start);
        assert!(t.due(start + FIRST_PASS_INTERVAL));
        let late = start + FIRST_PASS_WINDOW;
        assert!(!t.awaiting_first_pass(late));
        t.record(Outcome::Fail, late);
        assert!(
            !t.due(late + FIRST_PASS_INTERVAL),
            "past the window: the normal interval"
        );
        assert!(t.due(late + HEALTH_INTERVAL));
    }

    #[tokio::test]
    async fn http_check_against_a_real_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for answer in ["HTTP/1.1 204 No Content\r\n\r\n", "HTTP/1.1 503 Busy\r\n\r\n"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"GET /healthz HTTP/1.1\r\n"));
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let ip = Ipv4Addr::LOCALHOST;
        assert_eq!(http_check(ip, port, "/healthz").await, Ok(()));
        assert_eq!(
            http_check(ip, port, "/healthz").await,
            Err("GET /healthz: HTTP 503".into())
        );
        // Nobody listening any more.
        let e = http_check(ip, port, "/healthz").await.unwrap_err();
        assert!(
            e.starts_with(&format!("GET /healthz: connect 127.0.0.1:{port}: ")),
            "{e}"
        );
        assert!(e.contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn tcp_check_against_a_real_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let ip = Ipv4Addr::LOCALHOST;
        assert_eq!(tcp_check(ip, port).await, Ok(()));
        drop(l);
        let e = tcp_check(ip, port).await.unwrap_err();
        assert!(
            e.starts_with(&format!("connect 127.0.0.1:{port}: ")) && e.contains("refused"),
            "{e}"
        );
    }
}
