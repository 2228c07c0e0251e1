//! Health of the local replicas, as the agent observes it. Podman runs health
//! checks by itself only through systemd timers, so the agent drives them:
//! a command check through Podman's healthcheck endpoint (Podman counts the
//! streak), an HTTP check itself, from the node to the replica's IP (no tool
//! needed in the image, and it proves the replica is reachable).

use super::create_spec::{HEALTH_INTERVAL, HEALTH_RETRIES, HEALTH_TIMEOUT};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Until the first pass a replica is checked this often (so a new replica
/// enters DNS quickly), then every [`HEALTH_INTERVAL`].
pub const FIRST_PASS_INTERVAL: Duration = Duration::from_millis(500);

/// The check a replica has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// No check: healthy while running.
    None,
    /// A command run in the container by Podman.
    Command,
    /// `GET path` on `ip:port` must answer 2xx or 3xx.
    Http { ip: Ipv4Addr, port: u16, path: String },
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
    next_due: Instant,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            healthy: false,
            passed_once: false,
            failures: 0,
            next_due: Instant::now(),
        }
    }
}

impl Tracker {
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_due
    }

    /// Records a check; returns whether `healthy` changed.
    pub fn record(&mut self, outcome: Outcome, now: Instant) -> bool {
        let before = self.healthy;
        match outcome {
            Outcome::Pass => {
                self.failures = 0;
                self.passed_once = true;
                self.healthy = true;
            }
            Outcome::Fail => {
                self.failures += 1;
                if self.failures >= HEALTH_RETRIES {
                    self.healthy = false;
                }
            }
            Outcome::Verdict { healthy } => {
                self.passed_once |= healthy;
                self.healthy = healthy;
            }
        }
        self.next_due = now
            + if self.passed_once {
                HEALTH_INTERVAL
            } else {
                FIRST_PASS_INTERVAL
            };
        before != self.healthy
    }
}

/// One HTTP/1.1 GET with a deadline; any 2xx or 3xx passes.
pub async fn http_check(ip: Ipv4Addr, port: u16, path: &str) -> Outcome {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(SocketAddr::from((ip, port))).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: berth-health\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut head = [0u8; 16];
        let mut n = 0;
        while n < 12 {
            let got = s.read(&mut head[n..]).await?;
            if got == 0 {
                break;
            }
            n += got;
        }
        Ok::<_, std::io::Error>(status_passes(&head[..n]))
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, attempt).await {
        Ok(Ok(true)) => Outcome::Pass,
        _ => Outcome::Fail,
    }
}

/// `HTTP/1.x 2xx` or `3xx`.
fn status_passes(head: &[u8]) -> bool {
    head.len() >= 12 && head.starts_with(b"HTTP/1.") && matches!(head[9], b'2' | b'3')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_line() {
        assert!(status_passes(b"HTTP/1.1 200 OK"));
        assert!(status_passes(b"HTTP/1.0 302 Found"));
        assert!(!status_passes(b"HTTP/1.1 404 Not Found"));
        assert!(!status_passes(b"HTTP/1.1 500 x"));
        assert!(!status_passes(b"SSH-2.0-x"));
        assert!(!status_passes(b"HTTP/1.1"));
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
        assert_eq!(http_check(ip, port, "/healthz").await, Outcome::Pass);
        assert_eq!(http_check(ip, port, "/healthz").await, Outcome::Fail);
        // Nobody listening any more.
        assert_eq!(http_check(ip, port, "/healthz").await, Outcome::Fail);
    }
}
