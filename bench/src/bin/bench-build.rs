//! bench-build: what `berth service deploy NAME --build DIR` costs beyond
//! the build itself, and how long the fleet takes to pull a large image
//! from the fleet registry, on a real lab (2 workers, the fleet registry).
//!
//! **Build overhead.** Every round builds a small context (a Dockerfile
//! `FROM` the test image in the fleet registry, `COPY index.html`,
//! `RUN cat`) whose index.html is new each time, so `FROM` comes from the
//! cache and `COPY` and `RUN` do not. Berth's path is driven through the
//! API exactly as the CLI does it (pack with `berth_cli::context`, create
//! the build, upload, follow the log, then the rollout to 2 replicas); the
//! stages come from the first appearance of the control plane's and the
//! builder's log lines in the followed log:
//!
//! | stage | from | to |
//! |---|---|---|
//! | pack | start | the tar is written |
//! | create + upload | the tar is written | `PUT /v1/builds/ID/context` answered |
//! | queued -> claimed | uploaded | `builder: NODE` (the control plane, at the claim) |
//! | context download | claimed | `context: N bytes` (the builder, after its download) |
//! | podman build (agent) | `context: N bytes` | `pushing TAG` (the builder, once Podman's build ended) |
//! | push + release | `pushing TAG` | `pushed IMAGE` / `release N of S made` (the control plane, digest pinned, release made) |
//! | rollout | `release N` | the release is complete (2 replicas running and healthy), polled every 20 ms |
//!
//! The builder posts its log every 250 ms, so the builder's markers are up
//! to 250 ms late (`pushing` is posted at once). The baseline is a plain
//! `podman build` of the same context (another index.html, so nothing is
//! cached either) on the node that built Berth's round, right after it.
//! Both are equally warm: the base image is pulled into both workers'
//! storage before the first round, and a warm-up round (not counted) makes
//! the service, so every counted round replaces 2 running replicas.
//! Overhead = total − the agent's podman build (− the configured drain and
//! min_ready waits, 0 by default), and total − the baseline build.
//!
//! **Image distribution.** A ~50 MB image (`RUN dd if=/dev/urandom`) built
//! on n1 and pushed to the fleet registry as the admin, then removed from
//! both workers. `podman pull` of it on n2 alone, on both at once, and a
//! 2-replica service of it (the agents pull it by digest) from deploy to
//! both replicas running; then a second service of the same, now local,
//! image for what a deploy takes without the pull.

use anyhow::{bail, Context};
use berth_bench::{init_tls, loadavg, ms, print_summary, until_interrupted};
use berth_client::AdminClient;
use berth_lab::LabGuard;
use berth_protocol::build::{BuildRequest, BuildState};
use berth_protocol::release::{ReleaseState, RolloutInfo, RolloutPolicy, RolloutStep, StepStage};
use berth_protocol::service::ServiceSpec;
use berth_protocol::ErrorCode;
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SETTLE: Duration = Duration::from_secs(180);
const SERVICE: &str = "site";
const REPLICAS: usize = 2;
const PORT: u16 = 8080;

#[derive(Parser)]
#[command(
    name = "bench-build",
    about = "deploy --build overhead against a plain podman build, and image distribution, on a lab"
)]
struct Args {
    /// Lab id (underlay 198.18.ID.0/24).
    #[arg(long, default_value_t = 94)]
    id: u8,
    /// Lab directory (removed afterwards unless --keep-logs).
    #[arg(long, default_value = "/tmp/berth-bench-94")]
    dir: PathBuf,
    /// Counted build rounds (after one warm-up round).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// The rollout's drain, seconds.
    #[arg(long, default_value_t = 0)]
    drain: u32,
    /// Seconds a new replica must stay healthy before it counts.
    #[arg(long, default_value_t = 0)]
    min_ready: u32,
    /// New replicas started beyond the wanted count at a time (the CLI's
    /// default is 1: the 2 replicas are replaced one after the other).
    #[arg(long, default_value_t = 1)]
    max_surge: u32,
    /// Size of the image-distribution blob, MiB.
    #[arg(long, default_value_t = 50)]
    blob_mib: u32,
    /// Image-distribution rounds.
    #[arg(long, default_value_t = 1)]
    pull_rounds: u32,
    /// Keep the lab directory (logs) afterwards.
    #[arg(long)]
    keep_logs: bool,
    /// Print every build's log.
    #[arg(long)]
    verbose: bool,
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn fms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// The admin's registry credentials for the podman CLI: `--cert-dir` (the
/// control plane's CA, which push_test_image wrote) and `--creds`.
struct Creds {
    cert_dir: String,
    creds: String,
}

impl Creds {
    fn of(lab: &LabGuard) -> anyhow::Result<Creds> {
        let cfg = lab.client_config();
        let token = std::fs::read_to_string(&cfg.admin_token_file).context("reading the admin token")?;
        Ok(Creds {
            cert_dir: lab.state.dir.join("registry-certs").display().to_string(),
            creds: format!("admin:{}", token.trim()),
        })
    }

    /// `podman VERB --cert-dir D --creds C rest...`
    fn args<'a>(&'a self, verb: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![verb, "--cert-dir", &self.cert_dir, "--creds", &self.creds];
        v.extend_from_slice(rest);
        v
    }
}

/// Runs podman on `node`, failing with its output unless it exits 0.
fn podman_ok(lab: &LabGuard, node: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = lab.podman(node, args)?;
    if !out.status.success() {
        bail!("`podman {}` on {node} failed: {}", args[0], text(&out));
    }
    Ok(out)
}

/// A build context: `FROM` the test image in the fleet registry, a COPY of
/// an index.html saying `page`, and a RUN.
fn write_context(dir: &Path, registry: &str, page: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {registry}/berth-test/busybox:latest\nCOPY index.html /www/index.html\nRUN cat /www/index.html\n"
        ),
    )?;
    std::fs::write(dir.join("index.html"), page)?;
    Ok(())
}

fn build_spec(args: &Args) -> ServiceSpec {
    ServiceSpec {
        name: SERVICE.into(),
        image: String::new(),
        replicas: REPLICAS as u32,
        port: Some(PORT),
        health_http: Some("/".into()),
        rollout: RolloutPolicy {
            min_ready_secs: args.min_ready,
            drain_secs: args.drain,
            max_surge: args.max_surge,
            ..RolloutPolicy::default()
        },
        ..Default::default()
    }
}

/// When each marker line first appeared in the followed build log.
#[derive(Default, Debug)]
struct Marks {
    claimed: Option<Instant>,
    builder: Option<String>,
    context: Option<Instant>,
    step1: Option<Instant>,
    tagged: Option<Instant>,
    pushing: Option<Instant>,
    pushed: Option<Instant>,
    released: Option<Instant>,
}

impl Marks {
    fn line(&mut self, line: &str, at: Instant) {
        let set = |slot: &mut Option<Instant>| {
            slot.get_or_insert(at);
        };
        if let Some(node) = line.strip_prefix("builder: ") {
            if self.claimed.is_none() {
                self.claimed = Some(at);
                self.builder = Some(node.trim().to_string());
            }
        } else if line
            .strip_prefix("context: ")
            .and_then(|r| r.strip_suffix(" bytes"))
            .is_some_and(|n| n.parse::<u64>().is_ok())
        {
            // The builder's line; the control plane's at the upload says
            // "bytes received; waiting for a builder".
            set(&mut self.context);
        } else if line.starts_with("STEP 1/") {
            set(&mut self.step1);
        } else if line.starts_with("Successfully tagged") {
            set(&mut self.tagged);
        } else if line.starts_with("pushing ") {
            set(&mut self.pushing);
        } else if line.starts_with("pushed ") {
            set(&mut self.pushed);
        } else if line.starts_with("release ") && line.contains(" of ") {
            set(&mut self.released);
        }
    }
}

/// Gap between two marks (zero when `b` came in the same chunk or earlier).
fn gap(a: Option<Instant>, b: Option<Instant>) -> anyhow::Result<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(b.saturating_duration_since(a)),
        _ => bail!("a marker is missing from the build log"),
    }
}

/// One `deploy --build`'s stages.
#[derive(Debug, Clone, Copy, Default)]
struct Stages {
    pack: Duration,
    upload: Duration,
    claim: Duration,
    download: Duration,
    build: Duration,
    push_release: Duration,
    rollout: Duration,
    total: Duration,
    steps: StepTimes,
}

/// The rollout's steps, from the control plane's own stage times: the new
/// replica on the builder node and on the other one, starting -> healthy
/// (create, start, the first passing check, the status report; the other
/// node also pulls the new layer), healthy -> old draining summed over the
/// steps (every node's DNS loaded it, min_ready), and draining -> done of
/// the last step (drain, stop, the report), which ends the rollout.
#[derive(Debug, Clone, Copy, Default)]
struct StepTimes {
    start_builder: Duration,
    start_other: Duration,
    routed: Duration,
    last_stop: Duration,
}

fn stage_at(step: &RolloutStep, stage: StepStage) -> Option<i64> {
    step.times.iter().find(|(s, _)| *s == stage).map(|(_, t)| *t)
}

fn stage_gap(step: &RolloutStep, a: StepStage, b: StepStage) -> Duration {
    match (stage_at(step, a), stage_at(step, b)) {
        (Some(a), Some(b)) => Duration::from_millis((b - a).max(0) as u64),
        _ => Duration::ZERO,
    }
}

impl StepTimes {
    fn of(r: &RolloutInfo, builder: &str) -> StepTimes {
        let mut t = StepTimes::default();
        let mut last_done = i64::MIN;
        for step in &r.steps {
            let start = stage_gap(step, StepStage::Starting, StepStage::Healthy);
            if step.node.as_deref() == Some(builder) {
                t.start_builder = t.start_builder.max(start);
            } else {
                t.start_other = t.start_other.max(start);
            }
            t.routed += stage_gap(step, StepStage::Healthy, StepStage::Draining);
            if let Some(done) = stage_at(step, StepStage::Done).filter(|d| *d > last_done) {
                last_done = done;
                t.last_stop = stage_gap(step, StepStage::Draining, StepStage::Done);
            }
        }
        t
    }
}

/// Every step's stage times, in ms after the first step started.
fn print_steps(r: &RolloutInfo) {
    let first = r
        .steps
        .iter()
        .filter_map(|s| stage_at(s, StepStage::Starting))
        .min()
        .unwrap_or(0);
    for step in &r.steps {
        let times: Vec<String> = step.times.iter().map(|(x, t)| format!("{x} +{}", t - first)).collect();
        println!(
            "      slot {} on {}: {}",
            step.slot,
            step.node.as_deref().unwrap_or("?"),
            times.join(", ")
        );
    }
}

/// Makes the build, retrying while no builder is ready yet (right after
/// the lab comes up).
async fn create_build(admin: &AdminClient, req: &BuildRequest) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match admin.create_build(req).await {
            Ok(b) => return Ok(b.id),
            Err(e) if e.code() == Some(ErrorCode::NoBuilder) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `deploy --build` of `dir` through the API, as the CLI does it; returns
/// the stages and the builder node.
async fn deploy_build(lab: &LabGuard, args: &Args, dir: &Path, tar: &Path) -> anyhow::Result<(Stages, String)> {
    let admin = lab.admin()?;
    let t0 = Instant::now();
    let dockerfile = berth_cli::context::find_dockerfile(dir, None)?;
    let file = std::fs::File::create(tar)?;
    berth_cli::context::pack(dir, &dockerfile, 1 << 30, std::io::BufWriter::new(file))?;
    let packed = Instant::now();
    // Every other field at its default, whatever fields the request grows.
    let req: BuildRequest = serde_json::from_value(serde_json::json!({
        "spec": build_spec(args),
        "dockerfile": dockerfile,
    }))?;
    let id = create_build(&admin, &req).await?;
    admin.upload_build_context(id, tar).await?;
    let uploaded = Instant::now();
    let _ = std::fs::remove_file(tar);

    let mut marks = Marks::default();
    let mut log = String::new();
    let mut scanned = 0;
    admin
        .build_logs(id, true, |chunk| {
            let at = Instant::now();
            log.push_str(&String::from_utf8_lossy(chunk));
            while let Some(end) = log[scanned..].find('\n') {
                marks.line(&log[scanned..scanned + end], at);
                scanned += end + 1;
            }
        })
        .await?;
    if args.verbose {
        for l in log.lines() {
            println!("      | {l}");
        }
        let after = |m: Option<Instant>| m.map_or("-".to_string(), |m| fms(m.saturating_duration_since(uploaded)));
        println!(
            "      ms after the upload: claimed {}, context {}, STEP 1 {}, tagged {}, pushing {}, pushed {}, release {}",
            after(marks.claimed),
            after(marks.context),
            after(marks.step1),
            after(marks.tagged),
            after(marks.pushing),
            after(marks.pushed),
            after(marks.released)
        );
    }
    let b = admin.get_build(id).await?;
    if b.state != BuildState::Succeeded {
        bail!("build {id} ended {}: {:?}\n{log}", b.state.as_str(), b.error);
    }
    let release = b.release.context("a succeeded build without a release")?;
    let r = wait_complete(&admin, SERVICE, release, REPLICAS).await?;
    let done = Instant::now();
    let node = b.node.or(marks.builder).context("no builder node")?;
    if args.verbose {
        print_steps(&r);
    }
    let stages = Stages {
        pack: packed - t0,
        upload: uploaded - packed,
        claim: gap(Some(uploaded), marks.claimed)?,
        download: gap(marks.claimed, marks.context)?,
        build: gap(marks.context, marks.pushing)?,
        push_release: gap(marks.pushing, marks.pushed.or(marks.released))?,
        rollout: gap(marks.released, Some(done))?,
        total: done - t0,
        steps: StepTimes::of(&r, &node),
    };
    Ok((stages, node))
}

/// Waits until `release` of `name` is complete with `n` replicas of it
/// running and healthy.
async fn wait_complete(admin: &AdminClient, name: &str, release: u64, n: usize) -> anyhow::Result<RolloutInfo> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let info = admin.show_service(name).await?;
        if let Some(r) = info.rollout.as_ref().filter(|r| r.release == release) {
            if r.state.is_final() && !r.rolling_back {
                if r.state != ReleaseState::Complete {
                    bail!("release {release} of {name} ended {:?}: {:?}", r.state, r.reason);
                }
                let up = info
                    .replicas
                    .iter()
                    .filter(|x| x.release == release && x.state == "running" && x.healthy)
                    .count();
                if up >= n {
                    return Ok(r.clone());
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "release {release} of {name} did not complete within {} s",
                SETTLE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Containers of service `name` on every worker (old ones stop in the background).
fn containers(lab: &LabGuard, name: &str) -> anyhow::Result<usize> {
    let filter = format!("label=io.berth.service={name}");
    let mut n = 0;
    for node in lab.state.nodes.iter().filter(|n| !n.proxy) {
        let out = lab.podman(&node.name, &["ps", "-aq", "--filter", &filter])?;
        n += String::from_utf8_lossy(&out.stdout).lines().count();
    }
    Ok(n)
}

async fn wait_containers(lab: &LabGuard, name: &str, at_most: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE;
    while containers(lab, name)? > at_most {
        if Instant::now() > deadline {
            bail!("old containers of {name} still there after {} s", SETTLE.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// `podman build` of `dir` on `node`, timed.
fn baseline_build(lab: &LabGuard, creds: &Creds, node: &str, dir: &Path, tag: &str) -> anyhow::Result<Duration> {
    let d = dir.display().to_string();
    let t = Instant::now();
    podman_ok(lab, node, &creds.args("build", &["--quiet", "-t", tag, &d]))?;
    Ok(t.elapsed())
}

#[derive(Default)]
struct BuildFigures {
    rows: Vec<(u32, String, Stages, Duration)>,
}

impl BuildFigures {
    fn col(&self, f: impl Fn(&Stages, Duration) -> Duration) -> Vec<Duration> {
        self.rows.iter().map(|(_, _, s, b)| f(s, *b)).collect()
    }
}

fn print_round(label: &str, node: &str, s: &Stages, base: Duration, waits: Duration) {
    println!(
        "  {label:<8} on {node}: pack {} + upload {} | claimed {} | context {} | build {} | push+release {} | rollout {} (start on {node} {}, other {}, route {}, last stop {}) | \
         total {} ms; plain podman build {} ms; overhead {} ms (vs plain build {} ms)",
        fms(s.pack),
        fms(s.upload),
        fms(s.claim),
        fms(s.download),
        fms(s.build),
        fms(s.push_release),
        fms(s.rollout),
        fms(s.steps.start_builder),
        fms(s.steps.start_other),
        fms(s.steps.routed),
        fms(s.steps.last_stop),
        fms(s.total),
        fms(base),
        fms(s.total.saturating_sub(s.build + waits)),
        fms(s.total.saturating_sub(base + waits)),
    );
}

async fn build_rounds(lab: &LabGuard, args: &Args, creds: &Creds, registry: &str) -> anyhow::Result<BuildFigures> {
    let work = lab.state.dir.join("contexts");
    let tar = lab.state.dir.join("context.tar");
    let waits = Duration::from_secs((args.drain + REPLICAS as u32 * args.min_ready).into());
    let mut f = BuildFigures::default();
    for round in 0..=args.rounds {
        wait_containers(lab, SERVICE, REPLICAS).await?;
        let dir = work.join(format!("berth-{round}"));
        write_context(&dir, registry, &format!("berth round {round} {}\n", nanos()))?;
        let (s, node) = deploy_build(lab, args, &dir, &tar).await?;
        // The same context on the same node, another page: nothing cached
        // but FROM, as in Berth's build.
        let dir = work.join(format!("plain-{round}"));
        write_context(&dir, registry, &format!("plain round {round} {}\n", nanos()))?;
        let base = baseline_build(lab, creds, &node, &dir, &format!("localhost/bench/x:{round}"))?;
        let label = if round == 0 {
            "warm-up".to_string()
        } else {
            format!("round {round}")
        };
        print_round(&label, &node, &s, base, waits);
        if round > 0 {
            f.rows.push((round, node, s, base));
        }
    }
    Ok(f)
}

// ---------------------------------------------------------------------------
// Image distribution
// ---------------------------------------------------------------------------

struct PullFigures {
    size_mb: f64,
    build: Duration,
    push: Duration,
    one: Vec<Duration>,
    both: Vec<(Duration, Duration)>,
    deploy_first: Vec<Duration>,
    deploy_both: Vec<Duration>,
    cached_both: Vec<Duration>,
}

/// Removes image `id` from both workers (absent is fine), and checks it is gone.
fn remove_image(lab: &LabGuard, id: &str) -> anyhow::Result<()> {
    for node in ["n1", "n2"] {
        let _ = lab.podman(node, &["rmi", "-f", id])?;
        if lab.podman(node, &["image", "exists", id])?.status.success() {
            bail!("image {id} still on {node}");
        }
    }
    Ok(())
}

fn spawn_pull(lab: &LabGuard, creds: &Creds, node: &str, image: &str) -> anyhow::Result<Child> {
    let index = lab.node(node)?.index;
    let args = creds.args("pull", &["--quiet", image]);
    Ok(lab
        .node_podman(index)
        .command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// Waits for the children, each one's time from `t0`.
fn wait_all(mut children: Vec<(String, Child)>, t0: Instant) -> anyhow::Result<Vec<Duration>> {
    let mut took = vec![None; children.len()];
    while took.iter().any(Option::is_none) {
        for (i, (node, c)) in children.iter_mut().enumerate() {
            if took[i].is_none() {
                if let Some(st) = c.try_wait()? {
                    if !st.success() {
                        let mut err = String::new();
                        if let Some(mut e) = c.stderr.take() {
                            use std::io::Read;
                            let _ = e.read_to_string(&mut err);
                        }
                        bail!("podman pull on {node} failed: {}", err.trim());
                    }
                    took[i] = Some(t0.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(took.into_iter().flatten().collect())
}

fn service(name: &str, image: &str, args: &Args) -> ServiceSpec {
    ServiceSpec {
        image: image.into(),
        name: name.into(),
        ..build_spec(args)
    }
}

/// Deploys `spec` and waits until both replicas run: (first running, both
/// running and healthy, release complete).
async fn deploy_timed(admin: &AdminClient, spec: &ServiceSpec) -> anyhow::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let info = admin.deploy_service(spec).await?;
    let release = info.rollout.context("the deploy made no rollout")?.release;
    let deadline = Instant::now() + SETTLE;
    let mut first = None;
    loop {
        let info = admin.show_service(&spec.name).await?;
        let running = info.replicas.iter().filter(|r| r.state == "running").count();
        if running > 0 {
            first.get_or_insert(t0.elapsed());
        }
        let complete = info
            .rollout
            .as_ref()
            .is_some_and(|r| r.release == release && r.state == ReleaseState::Complete);
        if complete && running >= REPLICAS && info.replicas.iter().all(|r| r.healthy) {
            let mut nodes: Vec<&str> = info.replicas.iter().map(|r| r.node.as_str()).collect();
            nodes.sort();
            nodes.dedup();
            if nodes.len() != REPLICAS {
                bail!("{}'s replicas are not on both workers: {nodes:?}", spec.name);
            }
            return Ok((first.unwrap_or_default(), t0.elapsed()));
        }
        if let Some(r) = info
            .rollout
            .as_ref()
            .filter(|r| r.release == release && r.state.is_final())
        {
            if r.state != ReleaseState::Complete {
                bail!("{} ended {:?}: {:?}", spec.name, r.state, r.reason);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not run on both workers within {} s",
                spec.name,
                SETTLE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn distribution(lab: &LabGuard, args: &Args, creds: &Creds, registry: &str) -> anyhow::Result<PullFigures> {
    let admin = lab.admin()?;
    let dir = lab.state.dir.join("contexts").join("blob");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {registry}/berth-test/busybox:latest\nRUN dd if=/dev/urandom of=/blob bs=1M count={}\n",
            args.blob_mib
        ),
    )?;
    let image = format!("{registry}/bench/blob:1");
    let d = dir.display().to_string();
    println!(
        "building a {} MiB image on n1 and pushing it as {image} ...",
        args.blob_mib
    );
    let t = Instant::now();
    podman_ok(lab, "n1", &creds.args("build", &["--quiet", "-t", &image, &d]))?;
    let build = t.elapsed();
    let t = Instant::now();
    podman_ok(lab, "n1", &creds.args("push", &["--quiet", &image]))?;
    let push = t.elapsed();
    let out = podman_ok(
        lab,
        "n1",
        &["image", "inspect", "--format", "{{.Id}} {{.Size}}", &image],
    )?;
    let inspect = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (id, size) = inspect.split_once(' ').context("podman image inspect")?;
    let id = id.to_string();
    let size_mb = size.parse::<f64>().unwrap_or(0.0) / 1e6;
    println!(
        "  built in {} ms, pushed in {} ms; {size_mb:.1} MB uncompressed (base included)",
        fms(build),
        fms(push)
    );

    let mut f = PullFigures {
        size_mb,
        build,
        push,
        one: vec![],
        both: vec![],
        deploy_first: vec![],
        deploy_both: vec![],
        cached_both: vec![],
    };
    for round in 1..=args.pull_rounds {
        remove_image(lab, &id)?;
        // podman pull on n2 alone.
        let t0 = Instant::now();
        let one = wait_all(vec![("n2".into(), spawn_pull(lab, creds, "n2", &image)?)], t0)?[0];
        remove_image(lab, &id)?;
        // On both at once.
        let t0 = Instant::now();
        let children = vec![
            ("n1".to_string(), spawn_pull(lab, creds, "n1", &image)?),
            ("n2".to_string(), spawn_pull(lab, creds, "n2", &image)?),
        ];
        let both = wait_all(children, t0)?;
        remove_image(lab, &id)?;
        // A 2-replica service of it: both agents pull it by digest.
        let (first, all) = deploy_timed(&admin, &service("blob", &image, args)).await?;
        // And one of the same image, now in both nodes' storage.
        let (_, cached) = deploy_timed(&admin, &service("blob-cached", &image, args)).await?;
        println!(
            "  round {round}: podman pull on n2 {} ms; on n1 and n2 at once {} / {} ms; \
             service of 2 replicas: first running {} ms, both running+healthy {} ms; same with the image cached {} ms",
            fms(one),
            fms(both[0]),
            fms(both[1]),
            fms(first),
            fms(all),
            fms(cached)
        );
        f.one.push(one);
        f.both.push((both[0], both[1]));
        f.deploy_first.push(first);
        f.deploy_both.push(all);
        f.cached_both.push(cached);
        for name in ["blob", "blob-cached"] {
            admin.remove_service(name).await?;
        }
        for name in ["blob", "blob-cached"] {
            wait_containers(lab, name, 0).await?;
        }
    }
    Ok(f)
}

async fn run(args: &Args) -> anyhow::Result<(BuildFigures, PullFigures)> {
    let lab = berth_bench::lab_up(args.id, &args.dir, 2, args.keep_logs).await?;
    lab.wait_converged(SETTLE).await?;
    let base = lab.test_image();
    let registry = lab.registry_host();
    let creds = Creds::of(&lab)?;
    // Both workers have the base image under its registry name, so neither
    // path pulls it: FROM is as warm for Berth's builder as for the plain build.
    for node in ["n1", "n2"] {
        podman_ok(&lab, node, &creds.args("pull", &["--quiet", &base]))?;
    }
    println!(
        "build rounds: 1 warm-up + {} (load average {}); base image {base} already in both workers' storage",
        args.rounds,
        loadavg()
    );
    let b = build_rounds(&lab, args, &creds, &registry).await?;
    let admin = lab.admin()?;
    admin.remove_service(SERVICE).await?;
    wait_containers(&lab, SERVICE, 0).await?;
    println!("image distribution (load average {}):", loadavg());
    let p = distribution(&lab, args, &creds, &registry).await?;
    Ok((b, p))
}

fn report(args: &Args, b: &BuildFigures, p: &PullFigures) {
    let waits = Duration::from_secs((args.drain + REPLICAS as u32 * args.min_ready).into());
    println!();
    println!(
        "== bench-build: deploy --build of a 3-step context (FROM cached, COPY + RUN not), 2 replicas, \
         health_http /, max_surge {}, drain {} s, min_ready {} s, {} rounds ==",
        args.max_surge,
        args.drain,
        args.min_ready,
        b.rows.len()
    );
    print_summary("pack", &b.col(|s, _| s.pack));
    print_summary("create + upload", &b.col(|s, _| s.upload));
    print_summary("queued -> claimed", &b.col(|s, _| s.claim));
    print_summary("context download", &b.col(|s, _| s.download));
    print_summary("podman build (agent)", &b.col(|s, _| s.build));
    print_summary("push + pin + release", &b.col(|s, _| s.push_release));
    print_summary("rollout (2 replicas)", &b.col(|s, _| s.rollout));
    print_summary("  start, builder node", &b.col(|s, _| s.steps.start_builder));
    print_summary("  start, other node", &b.col(|s, _| s.steps.start_other));
    print_summary("  healthy -> draining, both", &b.col(|s, _| s.steps.routed));
    print_summary("  last draining -> done", &b.col(|s, _| s.steps.last_stop));
    print_summary("total", &b.col(|s, _| s.total));
    print_summary("plain podman build", &b.col(|_, base| base));
    let over = b.col(|s, _| s.total.saturating_sub(s.build + waits));
    print_summary("overhead (total - build)", &over);
    print_summary(
        "total - plain podman build",
        &b.col(|s, base| s.total.saturating_sub(base + waits)),
    );
    let mut sorted = over.clone();
    sorted.sort();
    let worst = sorted.last().copied().unwrap_or_default();
    println!(
        "  target overhead beyond the build < 2 s: {} (median {} ms, worst {} ms)",
        if worst < Duration::from_secs(2) {
            "met"
        } else {
            "MISSED"
        },
        ms(berth_bench::percentile(&sorted, 50.0)),
        ms(worst)
    );
    println!();
    println!(
        "== image distribution: {} MiB random layer on the test image ({:.1} MB), {} round(s) ==",
        args.blob_mib,
        p.size_mb,
        p.one.len()
    );
    println!(
        "  made on n1: podman build {} ms, podman push to the fleet registry {} ms",
        fms(p.build),
        fms(p.push)
    );
    print_summary("podman pull, n2 alone", &p.one);
    print_summary(
        "podman pull, n1+n2: n1",
        &p.both.iter().map(|x| x.0).collect::<Vec<_>>(),
    );
    print_summary(
        "podman pull, n1+n2: n2",
        &p.both.iter().map(|x| x.1).collect::<Vec<_>>(),
    );
    print_summary("deploy -> first running", &p.deploy_first);
    print_summary("deploy -> both running", &p.deploy_both);
    print_summary("same, image cached", &p.cached_both);
    let pull: Vec<Duration> = p
        .deploy_both
        .iter()
        .zip(&p.cached_both)
        .map(|(a, c)| a.saturating_sub(*c))
        .collect();
    print_summary("=> the agents' pull", &pull);
}

#[tokio::main]
async fn main() {
    init_tls();
    let args = Args::parse();
    match until_interrupted(run(&args)).await {
        Ok((b, p)) => report(&args, &b, &p),
        Err(e) => {
            eprintln!("bench-build: {e:#}");
            std::process::exit(1);
        }
    }
}
