//! Continuous load for the end-to-end tests: the traffic a rollout must not
//! disturb. Two clients run in the background, each on a steady schedule
//! (20 requests/s by default), each request bounded by a timeout (5 s):
//!
//! - [`HttpsLoad`]: `curl` from the host (which reaches the lab's underlay
//!   on its host link) to `https://DOMAIN/PATH` through a proxy node, the
//!   name pinned to the proxy's address with `--resolve`, the certificate
//!   checked against Pebble's root only. One curl per request, started on
//!   the schedule whether earlier ones have finished or not (a slow request
//!   does not slow the schedule down).
//! - [`DnsLoad`]: a container of the test image on a lab node running a
//!   busybox shell loop: for every request a new `wget` resolves
//!   `NAME.internal` through the node's DNS and fetches
//!   `http://NAME.internal:PORT/PATH`. A failed request also records what
//!   `nslookup` answers right after it.
//!
//! [`Load`] runs both. Stopping ([`Load::stop`], or dropping it) ends them
//! and gives a [`LoadSummary`]: per client the requests, the successes and
//! every failure with its time and reason.
//!
//! ```no_run
//! # async fn case(lab: &berth_tests::LabGuard, root: &std::path::Path) {
//! use berth_tests::load::{Load, LoadSpec};
//! // demo.example.com through the proxy node n3, demo.internal:8080 from n2.
//! let load = Load::start(lab, &LoadSpec::new("n3", root, "n2")).unwrap();
//! // ... deploy, roll out, restart things ...
//! let summary = load.stop();
//! println!("{summary}");
//! summary.assert_no_failures();
//! # }
//! ```

use crate::{demo, Lab};
use anyhow::{bail, Context};
use berth_lab::podman::{self, NodePodman};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Requests per second of each client, unless told otherwise.
pub const DEFAULT_RATE: u32 = 20;
/// Upper bound of every request, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Load::start`] waits for each client's first answer (the client
/// container has to start first).
const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(60);
/// Failures listed in a summary's text (all are in [`ClientSummary::failures`]).
const LISTED_FAILURES: usize = 40;

/// What [`Load`] sends where.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The proxy node the HTTPS requests go through (its underlay address).
    pub proxy: String,
    /// Pebble's issuing root (PEM), the only CA curl trusts.
    pub ca: PathBuf,
    /// The public name, e.g. `demo.example.com`.
    pub domain: String,
    /// The path of the HTTPS requests, e.g. `/`.
    pub https_path: String,
    /// The node whose Podman runs the DNS client's container.
    pub client_node: String,
    /// The service the DNS client resolves as `SERVICE.internal`.
    pub service: String,
    /// The port the DNS client fetches on every replica.
    pub port: u16,
    /// The path of the DNS client's requests.
    pub dns_path: String,
    /// Requests per second of each client.
    pub rate: u32,
    /// Upper bound of every request.
    pub timeout: Duration,
}

impl LoadSpec {
    /// Load on the lab's demo: `https://demo.example.com/` through `proxy`
    /// (trusting only `ca`), and `http://demo.internal:8080/` from a
    /// container on `client_node`; 20 requests/s each, 5 s per request.
    pub fn new(proxy: &str, ca: &Path, client_node: &str) -> LoadSpec {
        LoadSpec {
            proxy: proxy.into(),
            ca: ca.into(),
            domain: demo::DEMO_DOMAIN.into(),
            https_path: "/".into(),
            client_node: client_node.into(),
            service: "demo".into(),
            port: demo::WEB_PORT,
            dns_path: "/".into(),
            rate: DEFAULT_RATE,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The HTTPS client's part, with the proxy's address looked up in `lab`.
    pub fn https(&self, lab: &Lab) -> anyhow::Result<HttpsTarget> {
        let index = lab.node(&self.proxy)?.index;
        Ok(HttpsTarget {
            domain: self.domain.clone(),
            path: self.https_path.clone(),
            proxy_ip: lab.net.node_ip(index),
            ca: self.ca.clone(),
            rate: self.rate,
            timeout: self.timeout,
        })
    }

    /// The DNS client's part.
    pub fn dns(&self) -> DnsTarget {
        DnsTarget {
            node: self.client_node.clone(),
            service: self.service.clone(),
            port: self.port,
            path: self.dns_path.clone(),
            rate: self.rate,
            timeout: self.timeout,
        }
    }
}

/// Both clients of a [`LoadSpec`], running until [`stop`](Load::stop) or drop.
pub struct Load {
    pub https: HttpsLoad,
    pub dns: DnsLoad,
}

impl Load {
    /// Starts both clients and returns once each has finished its first
    /// request (successful or not), so the counting starts with both running.
    /// Blocks (up to a minute, normally one or two seconds: the DNS client's
    /// container starting).
    pub fn start(lab: &Lab, spec: &LoadSpec) -> anyhow::Result<Load> {
        let https = HttpsLoad::start(&spec.https(lab)?)?;
        let dns = DnsLoad::start(lab, &spec.dns())?;
        https.wait_first(FIRST_ANSWER_WITHIN)?;
        Ok(Load { https, dns })
    }

    /// The counts so far; the clients go on.
    pub fn summary(&self) -> LoadSummary {
        LoadSummary {
            https: self.https.summary(),
            dns: self.dns.summary(),
        }
    }

    /// Stops both clients (requests in flight finish or time out first) and
    /// returns what they saw. Blocks for up to the request timeout and the
    /// client container's stop.
    pub fn stop(mut self) -> LoadSummary {
        self.https.signal_stop();
        LoadSummary {
            dns: self.dns.stop_now(),
            https: self.https.stop_now(),
        }
    }
}

/// What both clients of a [`Load`] saw.
#[derive(Debug, Clone)]
pub struct LoadSummary {
    pub https: ClientSummary,
    pub dns: ClientSummary,
}

impl LoadSummary {
    /// Failed requests of both clients.
    pub fn failed(&self) -> u64 {
        self.https.failed + self.dns.failed
    }

    /// Panics, listing every client's failures, unless no request failed.
    pub fn assert_no_failures(&self) {
        if self.failed() > 0 {
            panic!("requests failed under load:\n{self}");
        }
    }

    /// Panics unless each client completed at least `n` requests
    /// successfully (so the load really ran).
    pub fn assert_ok_at_least(&self, n: u64) {
        for c in [&self.https, &self.dns] {
            assert!(c.ok >= n, "fewer than {n} successful requests:\n{self}");
        }
    }
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.https, self.dns)
    }
}

/// What one client saw.
#[derive(Debug, Clone)]
pub struct ClientSummary {
    /// What the client requests, e.g. `https://demo.example.com/ via 198.18.9.13`.
    pub client: String,
    /// Requests finished (and requests that could not be sent).
    pub total: u64,
    pub ok: u64,
    pub failed: u64,
    /// Every failure, in the order the requests were sent.
    pub failures: Vec<Failure>,
    /// From the client's first request to the summary (or the stop).
    pub elapsed: Duration,
    /// The longest request.
    pub slowest: Duration,
}

impl ClientSummary {
    /// Requests per second over [`elapsed`](Self::elapsed).
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.total as f64 / secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for ClientSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} requests in {:.1} s ({:.1}/s), {} ok, {} failed, slowest {:.2} s",
            self.client,
            self.total,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.ok,
            self.failed,
            self.slowest.as_secs_f64()
        )?;
        for failure in self.failures.iter().take(LISTED_FAILURES) {
            writeln!(f, "  {failure}")?;
        }
        if self.failures.len() > LISTED_FAILURES {
            writeln!(f, "  ... and {} more", self.failures.len() - LISTED_FAILURES)?;
        }
        Ok(())
    }
}

/// A request that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The request's number (from 1, in the order sent).
    pub seq: u64,
    /// When it was sent, from the start of the load.
    pub at: Duration,
    /// When it was sent (for reading logs beside it).
    pub wall: SystemTime,
    /// What went wrong: `HTTP 502`, `curl exit 28: ...`, `wget exit 1: ...`.
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} at +{:.2} s ({}): {}",
            self.seq,
            self.at.as_secs_f64(),
            utc(self.wall),
            self.reason
        )
    }
}

/// The clock both clients' times are read on: when the load started, as an
/// instant, as wall time and as the kernel's uptime (which the DNS client's
/// container reads from /proc/uptime: containers share the host's).
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    wall: SystemTime,
    uptime_cs: u64,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            start: Instant::now(),
            wall: SystemTime::now(),
            uptime_cs: uptime_cs().unwrap_or(0),
        }
    }

    fn since_start(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }

    /// Time from the start to a moment read as uptime (centiseconds).
    fn at_uptime(&self, cs: u64) -> Duration {
        Duration::from_millis(cs.saturating_sub(self.uptime_cs) * 10)
    }
}

/// The kernel's uptime in centiseconds (/proc/uptime).
fn uptime_cs() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 100.0).round() as u64)
}

/// The counts of one client, shared with its threads.
#[derive(Debug)]
struct Recorder {
    client: String,
    clock: Clock,
    stats: Mutex<Stats>,
    answered: Condvar,
}

#[derive(Debug, Default)]
struct Stats {
    total: u64,
    ok: u64,
    failures: Vec<Failure>,
    slowest: Duration,
    /// When the first request was sent, from the start.
    first_at: Option<Duration>,
    /// When the client stopped (for the rate), from the start.
    stopped_at: Option<Duration>,
    /// Why the client could not start, if it could not.
    broken: Option<String>,
}

impl Recorder {
    fn new(client: String, clock: Clock) -> Arc<Recorder> {
        Arc::new(Recorder {
            client,
            clock,
            stats: Mutex::new(Stats::default()),
            answered: Condvar::new(),
        })
    }

    /// A request sent `at` (from the start) that took `took`: `Ok` or the
    /// reason it failed.
    fn record(&self, seq: u64, at: Duration, took: Duration, outcome: Result<(), String>) {
        let mut s = self.stats.lock().unwrap();
        s.total += 1;
        s.first_at = Some(s.first_at.map_or(at, |f| f.min(at)));
        s.slowest = s.slowest.max(took);
        match outcome {
            Ok(()) => s.ok += 1,
            Err(reason) => {
                let failure = Failure {
                    seq,
                    at,
                    wall: self.clock.wall + at,
                    reason,
                };
                let pos = s.failures.partition_point(|f| f.seq < seq);
                s.failures.insert(pos, failure);
            }
        }
        drop(s);
        self.answered.notify_all();
    }

    /// The client could not run at all (before its first request).
    fn broken(&self, why: String) {
        self.stats.lock().unwrap().broken = Some(why);
        self.answered.notify_all();
    }

    fn mark_stopped(&self) {
        let at = self.clock.since_start(Instant::now());
        let mut s = self.stats.lock().unwrap();
        s.stopped_at.get_or_insert(at);
    }

    /// Waits until the first request has finished.
    fn wait_first(&self, within: Duration) -> anyhow::Result<()> {
        let s = self.stats.lock().unwrap();
        let (s, _) = self
            .answered
            .wait_timeout_while(s, within, |s| s.total == 0 && s.broken.is_none())
            .unwrap();
        if let Some(why) = &s.broken {
            bail!("{}: {why}", self.client);
        }
        if s.total == 0 {
            bail!("{}: no answer within {} s", self.client, within.as_secs());
        }
        Ok(())
    }

    fn summary(&self) -> ClientSummary {
        let s = self.stats.lock().unwrap();
        let end = s.stopped_at.unwrap_or_else(|| self.clock.since_start(Instant::now()));
        ClientSummary {
            client: self.client.clone(),
            total: s.total,
            ok: s.ok,
            failed: s.failures.len() as u64,
            failures: s.failures.clone(),
            elapsed: end.saturating_sub(s.first_at.unwrap_or(end)),
            slowest: s.slowest,
        }
    }
}

/// Where [`HttpsLoad`] sends its requests.
#[derive(Debug, Clone)]
pub struct HttpsTarget {
    pub domain: String,
    pub path: String,
    /// The proxy's underlay address, which `domain` resolves to.
    pub proxy_ip: Ipv4Addr,
    /// The only CA curl trusts (Pebble's issuing root).
    pub ca: PathBuf,
    pub rate: u32,
    pub timeout: Duration,
}

impl HttpsTarget {
    fn url(&self) -> String {
        format!("https://{}{}", self.domain, self.path)
    }
}

/// `curl` through a proxy on a steady schedule, in the background.
pub struct HttpsLoad {
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    scheduler: Option<JoinHandle<()>>,
}

impl HttpsLoad {
    /// Starts sending requests (the first one now).
    pub fn start(target: &HttpsTarget) -> anyhow::Result<HttpsLoad> {
        if target.rate == 0 {
            bail!("a load needs a rate above 0");
        }
        if !target.ca.exists() {
            bail!("no CA file {}", target.ca.display());
        }
        let recorder = Recorder::new(format!("https {} via {}", target.url(), target.proxy_ip), Clock::now());
        let stop = Arc::new(AtomicBool::new(false));
        let scheduler = {
            let (target, recorder, stop) = (target.clone(), recorder.clone(), stop.clone());
            std::thread::Builder::new()
                .name("https-load".into())
                .spawn(move || https_schedule(&target, &recorder, &stop))
                .context("starting the HTTPS load")?
        };
        Ok(HttpsLoad {
            recorder,
            stop,
            scheduler: Some(scheduler),
        })
    }

    /// Waits until the first request has finished.
    pub fn wait_first(&self, within: Duration) -> anyhow::Result<()> {
        self.recorder.wait_first(within)
    }

    /// The counts so far.
    pub fn summary(&self) -> ClientSummary {
        self.recorder.summary()
    }

    /// Stops sending, waits for the requests in flight (at most the request
    /// timeout) and returns the counts.
    pub fn stop(mut self) -> ClientSummary {
        self.stop_now()
    }

    fn signal_stop(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            self.recorder.mark_stopped();
        }
    }

    fn stop_now(&mut self) -> ClientSummary {
        self.signal_stop();
        if let Some(h) = self.scheduler.take() {
            let _ = h.join();
        }
        self.recorder.summary()
    }
}

impl Drop for HttpsLoad {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// The HTTPS client's schedule: one curl every 1/rate s, each in its own
/// thread, until `stop`; then waits for those still running.
fn https_schedule(target: &HttpsTarget, recorder: &Arc<Recorder>, stop: &AtomicBool) {
    let interval = Duration::from_secs(1) / target.rate;
    // Enough for every request of a whole timeout (and a second) at once:
    // reaching it means curl itself hangs, and further requests are counted
    // as failures instead of piling up.
    let max_in_flight = (target.rate as usize) * (target.timeout.as_secs() as usize + 1) + 1;
    let mut in_flight: Vec<JoinHandle<()>> = Vec::new();
    let mut next = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        in_flight.retain(|h| !h.is_finished());
        let sent = Instant::now();
        let at = recorder.clock.since_start(sent);
        if in_flight.len() >= max_in_flight {
            let why = format!("not sent: {} requests still in flight", in_flight.len());
            recorder.record(seq, at, Duration::ZERO, Err(why));
        } else {
            let (target, rec) = (target.clone(), recorder.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("https-load-{seq}"))
                .spawn(move || {
                    let outcome = curl_once(&target);
                    rec.record(seq, at, sent.elapsed(), outcome);
                });
            match spawned {
                Ok(h) => in_flight.push(h),
                Err(e) => recorder.record(seq, at, Duration::ZERO, Err(format!("not sent: no thread: {e}"))),
            }
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            // Stalled (a loaded machine): go on from now rather than burst.
            next = now;
        }
    }
    for h in in_flight {
        let _ = h.join();
    }
}

/// One HTTPS request: `Ok` for a 2xx answer.
fn curl_once(target: &HttpsTarget) -> Result<(), String> {
    let out = Command::new("curl")
        // --disable first: no ~/.curlrc; --noproxy: no proxy from the environment.
        .args([
            "--disable",
            "-sS",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--max-time")
        .arg(format!("{:.3}", target.timeout.as_secs_f64()))
        .arg("--cacert")
        .arg(&target.ca)
        .arg("--resolve")
        .arg(format!("{}:443:{}", target.domain, target.proxy_ip))
        .arg(target.url())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    curl_outcome(
        out.status.code(),
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
    )
}

/// Reads curl's exit code, `%{http_code}` and error message.
fn curl_outcome(code: Option<i32>, http_code: &str, stderr: &str) -> Result<(), String> {
    let status: u16 = http_code.trim().parse().unwrap_or(0);
    let message = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
    match code {
        Some(0) if (200..300).contains(&status) => Ok(()),
        Some(0) => Err(format!("HTTP {status}")),
        Some(c) if status != 0 => Err(format!("curl exit {c} after HTTP {status}: {message}")),
        Some(c) => Err(format!("curl exit {c}: {message}")),
        None => Err(format!("curl killed by a signal: {message}")),
    }
}

/// What [`DnsLoad`] resolves and fetches, and from where.
#[derive(Debug, Clone)]
pub struct DnsTarget {
    /// The node whose Podman runs the client container.
    pub node: String,
    /// Resolved as `SERVICE.internal` for every request.
    pub service: String,
    pub port: u16,
    pub path: String,
    /// Requests per second; the container's clock counts in hundredths of a
    /// second, so the interval is rounded to one (20/s: every 0.05 s).
    pub rate: u32,
    pub timeout: Duration,
}

impl DnsTarget {
    fn host(&self) -> String {
        format!("{}.{}", self.service, podman::ZONE)
    }

    fn url(&self) -> String {
        format!("http://{}:{}{}", self.host(), self.port, self.path)
    }

    /// Time between requests, in hundredths of a second (at least one).
    fn step_cs(&self) -> u32 {
        (100 / self.rate.max(1)).max(1)
    }
}

/// The DNS client's loop, run by the test image's busybox sh as PID 1 with
/// the arguments URL HOST STEP_CS TIMEOUT_S. Per request it prints
/// `SEQ START_CS TOOK_CS ok` or `SEQ START_CS TOOK_CS FAIL REASON`, times
/// from /proc/uptime. SIGTERM ends it after the request in flight.
const DNS_CLIENT: &str = r#"
url=$1 host=$2 step=$3 limit=$4
stop=0
trap 'stop=1' TERM INT
now() { read -r up _ </proc/uptime; t=${up%.*}${up#*.}; }
now; next=$t; i=0
while [ "$stop" = 0 ]; do
    i=$((i + 1))
    now; start=$t
    if err=$(timeout "$limit" wget -q -O /dev/null "$url" 2>&1); then
        now; echo "$i $start $((t - start)) ok"
    else
        rc=$?
        now; took=$((t - start))
        [ "$rc" = 143 ] && err="timed out after $limit s $err"
        dns=$(nslookup "$host" 2>&1 | sed -n '/^Name:/,$ s/^Address:[[:space:]]*//p' | tr '\n' ' ')
        err=$(printf '%s' "$err" | tr '\n' ' ')
        echo "$i $start $took FAIL wget exit $rc: $err (dns: ${dns:-no address})"
    fi
    next=$((next + step))
    now
    if [ "$next" -gt "$t" ]; then
        usleep $(((next - t) * 10000))
    elif [ $((t - next)) -gt 100 ]; then
        next=$t
    fi
done
echo "stopped after $i requests"
"#;

/// One line of the DNS client.
#[derive(Debug, PartialEq, Eq)]
struct DnsLine {
    seq: u64,
    start_cs: u64,
    took_cs: u64,
    outcome: Result<(), String>,
}

fn parse_dns_line(line: &str) -> Option<DnsLine> {
    let mut parts = line.trim_end().splitn(4, ' ');
    let seq = parts.next()?.parse().ok()?;
    let start_cs = parts.next()?.parse().ok()?;
    let took_cs = parts.next()?.parse().ok()?;
    let rest = parts.next()?;
    let outcome = if rest == "ok" {
        Ok(())
    } else {
        Err(rest.strip_prefix("FAIL ")?.trim().to_string())
    };
    Some(DnsLine {
        seq,
        start_cs,
        took_cs,
        outcome,
    })
}

/// Distinct containers (name and address) of this process's DNS clients.
static DNS_CLIENTS: AtomicU32 = AtomicU32::new(0);
/// DNS clients on one node at once: their addresses count down from the one
/// below `lab run`'s (the subnet's last), far from the replicas' (which the
/// control plane hands out from the bottom).
const DNS_CLIENT_SLOTS: u32 = 8;

/// A client container resolving and fetching a service by name, in the
/// background.
pub struct DnsLoad {
    recorder: Arc<Recorder>,
    podman: NodePodman,
    container: String,
    timeout: Duration,
    stopping: Arc<AtomicBool>,
    /// The `podman run` attached to the container.
    pid: u32,
    reader: Option<JoinHandle<()>>,
    /// What podman and the container said on stderr.
    stderr: Arc<Mutex<String>>,
}

impl DnsLoad {
    /// Starts the client container on `target.node` and returns once it has
    /// finished its first request.
    pub fn start(lab: &Lab, target: &DnsTarget) -> anyhow::Result<DnsLoad> {
        if target.rate == 0 {
            bail!("a load needs a rate above 0");
        }
        let node = lab.node(&target.node)?;
        let p = lab.node_podman(node.index);
        p.wait_network(
            Duration::from_secs(10),
            &lab.state.dir.join(format!("{}.log", node.name)),
        )?;
        let addrs = p.network_addrs()?;
        let slot = DNS_CLIENTS.fetch_add(1, Ordering::SeqCst);
        let ip = Ipv4Addr::from(u32::from(podman::run_ip(&addrs)?) - 1 - slot % DNS_CLIENT_SLOTS);
        if !addrs.subnet.contains(&ip) || ip == addrs.gateway {
            bail!("no address for a load client in {}", addrs.subnet);
        }
        let container = format!("berth-load-{}-{slot}", std::process::id());
        let (ip, gateway) = (ip.to_string(), addrs.gateway.to_string());
        let (url, host) = (target.url(), target.host());
        let (step, limit) = (
            target.step_cs().to_string(),
            target.timeout.as_secs().max(1).to_string(),
        );
        let image = lab.test_image();
        let mut child = p
            .command(&[
                "run",
                "--rm",
                "--name",
                &container,
                "--network",
                &p.network,
                "--ip",
                &ip,
                "--dns",
                &gateway,
                "--dns-search",
                podman::ZONE,
                &image,
                "sh",
                "-c",
                DNS_CLIENT,
                "load",
                &url,
                &host,
                &step,
                &limit,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the load client on {}", node.name))?;
        let recorder = Recorder::new(
            format!("dns {url} from {} ({ip}, resolved per request)", node.name),
            Clock::now(),
        );
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = err.read_to_end(&mut buf);
                stderr.lock().unwrap().push_str(&String::from_utf8_lossy(&buf));
            });
        }
        let stdout = child.stdout.take().context("no stdout of podman run")?;
        let stopping = Arc::new(AtomicBool::new(false));
        let pid = child.id();
        let reader = {
            let (recorder, stopping, stderr) = (recorder.clone(), stopping.clone(), stderr.clone());
            std::thread::Builder::new()
                .name("dns-load".into())
                .spawn(move || dns_read(child, stdout, &recorder, &stopping, &stderr))
                .context("starting the DNS load reader")?
        };
        let load = DnsLoad {
            recorder,
            podman: p,
            container,
            timeout: target.timeout,
            stopping,
            pid,
            reader: Some(reader),
            stderr,
        };
        load.recorder.wait_first(FIRST_ANSWER_WITHIN)?;
        Ok(load)
    }

    /// The counts so far.
    pub fn summary(&self) -> ClientSummary {
        self.recorder.summary()
    }

    /// Stops the container (after its request in flight) and returns the counts.
    pub fn stop(mut self) -> ClientSummary {
        self.stop_now()
    }

    fn stop_now(&mut self) -> ClientSummary {
        let Some(reader) = self.reader.take() else {
            return self.recorder.summary();
        };
        self.stopping.store(true, Ordering::SeqCst);
        self.recorder.mark_stopped();
        // SIGTERM: the loop finishes its request and exits; SIGKILL after
        // the request timeout and a little more.
        let grace = (self.timeout.as_secs() + 3).to_string();
        let _ = self.podman.output(&["stop", "--time", &grace, &self.container]);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !reader.is_finished() {
            let _ = self.podman.output(&["rm", "--force", "--time", "0", &self.container]);
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = reader.join();
        self.recorder.summary()
    }

    /// What podman and the container printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for DnsLoad {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Reads the DNS client's lines until the container ends; an end that was
/// not asked for is a failure.
fn dns_read(
    mut child: std::process::Child,
    stdout: std::process::ChildStdout,
    recorder: &Recorder,
    stopping: &AtomicBool,
    stderr: &Mutex<String>,
) {
    let clock = recorder.clock;
    let mut last_seq = 0;
    let mut other = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        match parse_dns_line(&line) {
            Some(l) => {
                last_seq = l.seq;
                let took = Duration::from_millis(l.took_cs * 10);
                recorder.record(l.seq, clock.at_uptime(l.start_cs), took, l.outcome);
            }
            None if line.starts_with("stopped after") => {}
            None => {
                other.push_str(&line);
                other.push('\n');
            }
        }
    }
    let status = child.wait();
    if stopping.load(Ordering::SeqCst) {
        return;
    }
    // Give the stderr reader a moment to collect podman's last words.
    std::thread::sleep(Duration::from_millis(200));
    let said = format!("{other}{}", stderr.lock().unwrap());
    let said = said.split_whitespace().collect::<Vec<_>>().join(" ");
    let why = match status {
        Ok(s) => format!("the client container ended ({s}): {said}"),
        Err(e) => format!("the client container is lost ({e}): {said}"),
    };
    if last_seq == 0 {
        recorder.broken(why);
    } else {
        let at = clock.since_start(Instant::now());
        recorder.record(last_seq + 1, at, Duration::ZERO, Err(why));
    }
}

/// `2026-12-02T20:40:32.123Z`.
fn utc(t: SystemTime) -> String {
    berth_protocol::time::Utc::from_system(t).rfc3339_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn dns_lines_are_parsed() {
        assert_eq!(
            parse_dns_line("12 654321 3 ok"),
            Some(DnsLine {
                seq: 12,
                start_cs: 654_321,
                took_cs: 3,
                outcome: Ok(())
            })
        );
        let l = parse_dns_line(
            "13 654326 1 FAIL wget exit 1: wget: can't connect to remote host (10.200.1.2): Connection refused (dns: 10.200.1.2 )",
        )
        .unwrap();
        assert_eq!(l.seq, 13);
        assert_eq!(
            l.outcome.unwrap_err(),
            "wget exit 1: wget: can't connect to remote host (10.200.1.2): Connection refused (dns: 10.200.1.2 )"
        );
        assert_eq!(parse_dns_line("stopped after 40 requests"), None);
        assert_eq!(parse_dns_line("Error: something from podman"), None);
        assert_eq!(parse_dns_line("1 2 3 maybe"), None);
    }

    #[test]
    fn curl_outcomes() {
        assert_eq!(curl_outcome(Some(0), "200", ""), Ok(()));
        assert_eq!(curl_outcome(Some(0), "204", ""), Ok(()));
        assert_eq!(curl_outcome(Some(0), "502", ""), Err("HTTP 502".into()));
        assert_eq!(
            curl_outcome(
                Some(28),
                "000",
                "curl: (28) Operation timed out after 5001 milliseconds\n"
            ),
            Err("curl exit 28: curl: (28) Operation timed out after 5001 milliseconds".into())
        );
        assert_eq!(
            curl_outcome(Some(18), "200", "curl: (18) transfer closed"),
            Err("curl exit 18 after HTTP 200: curl: (18) transfer closed".into())
        );
        assert!(curl_outcome(None, "", "").is_err());
    }

    #[test]
    fn failures_are_kept_in_request_order_and_counted() {
        let r = Recorder::new("test".into(), Clock::now());
        r.record(
            2,
            Duration::from_millis(50),
            Duration::from_millis(5),
            Err("late".into()),
        );
        r.record(1, Duration::ZERO, Duration::from_millis(900), Err("early".into()));
        r.record(3, Duration::from_millis(100), Duration::from_millis(5), Ok(()));
        r.mark_stopped();
        let s = r.summary();
        assert_eq!((s.total, s.ok, s.failed), (3, 1, 2));
        assert_eq!(s.failures.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(s.slowest, Duration::from_millis(900));
        let text = s.to_string();
        assert!(text.contains("3 requests"), "{text}");
        assert!(text.contains("#1 at +0.00 s"), "{text}");
        assert!(text.contains(": late"), "{text}");
    }

    #[test]
    #[should_panic(expected = "requests failed under load")]
    fn assert_no_failures_panics_on_a_failure() {
        let r = Recorder::new("test".into(), Clock::now());
        r.record(1, Duration::ZERO, Duration::ZERO, Err("HTTP 503".into()));
        let ok = Recorder::new("other".into(), Clock::now());
        LoadSummary {
            https: r.summary(),
            dns: ok.summary(),
        }
        .assert_no_failures();
    }

    #[test]
    fn the_dns_interval_is_in_hundredths() {
        let t = |rate| DnsTarget {
            node: "n1".into(),
            service: "demo".into(),
            port: 8080,
            path: "/".into(),
            rate,
            timeout: DEFAULT_TIMEOUT,
        };
        assert_eq!(t(20).step_cs(), 5);
        assert_eq!(t(1).step_cs(), 100);
        assert_eq!(t(500).step_cs(), 1);
        assert_eq!(t(20).url(), "http://demo.internal:8080/");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_243_984_123);
        assert_eq!(utc(t), "2026-12-02T20:39:44.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(utc(leap), "2000-02-29T00:00:00.000Z");
    }
}
