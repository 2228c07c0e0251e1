//! End-to-end: rolling deploys on a real lab (two workers, a proxy, Pebble)
//! with continuous load during every case: HTTPS through the proxy and a
//! client on n2 that resolves demo.internal for every request
//! (`berth_tests::load`). Each case must cost 0 failed requests.

use berth_client::AdminClient;
use berth_protocol::release::{ReleaseState, RolloutInfo, StepStage};
use berth_protocol::routes::DomainSpec;
use berth_protocol::service::{ServiceSpec, Volume};
use berth_tests::load::{Load, LoadSpec};
use berth_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(90);
/// A rollout in these cases takes well under this.
const ROLLOUT: Duration = Duration::from_secs(120);

/// The demo as these cases change it: two replicas, spread, health on `/`.
fn demo_spec(lab: &Lab, version: &str) -> ServiceSpec {
    let mut s = demo::web_service(lab, "demo", 2);
    s.env.insert("VERSION".into(), version.into());
    s.rollout.drain_secs = 2;
    s.rollout.min_ready_secs = 1;
    s
}

/// Waits until `release` of `name` is final (and done rolling back).
async fn wait_release(admin: &AdminClient, name: &str, release: u64) -> RolloutInfo {
    let deadline = Instant::now() + ROLLOUT;
    loop {
        let info = admin.show_service(name).await.unwrap();
        if let Some(r) = info.rollout.filter(|r| r.release == release) {
            if r.state.is_final() && !r.rolling_back {
                return r;
            }
        }
        assert!(Instant::now() < deadline, "release {release} of {name} never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deploys `spec` and returns its release number.
async fn deploy(admin: &AdminClient, spec: &ServiceSpec) -> u64 {
    let info = admin.deploy_service(spec).await.unwrap();
    info.rollout.expect("the deploy makes a rollout").release
}

/// Waits until a replica of `release` exists (the rollout is under way).
async fn wait_started(admin: &AdminClient, name: &str, release: u64) {
    let deadline = Instant::now() + SETTLE;
    while !admin
        .show_service(name)
        .await
        .unwrap()
        .replicas
        .iter()
        .any(|r| r.release == release)
    {
        assert!(Instant::now() < deadline, "release {release} started no replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One HTTPS request through the proxy at `ip` (curl, Pebble's root only):
/// the status and the body.
fn fetch(ip: &str, root: &Path, path: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--max-time", "20", "--cacert"])
        .arg(root)
        .args(["--resolve", &format!("{}:443:{ip}", demo::DEMO_DOMAIN)])
        .arg(format!("https://{}{path}", demo::DEMO_DOMAIN))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().to_string(), body.to_string())
}

struct Rig {
    lab: LabGuard,
    admin: AdminClient,
    root: PathBuf,
    proxy: String,
    proxy_ip: String,
}

impl Rig {
    async fn up(id: u8) -> Rig {
        let mut lab = lab_up(id, 2).await;
        let proxy = lab.add_node(true).await.unwrap();
        lab.wait_converged(SETTLE).await.unwrap();
        lab.start_pebble(&proxy).await.unwrap();
        lab.wait_converged(SETTLE).await.unwrap();
        let admin = lab.admin().unwrap();
        let first = deploy(&admin, &demo_spec(&lab, "1")).await;
        assert_eq!(wait_release(&admin, "demo", first).await.state, ReleaseState::Complete);
        admin
            .add_domain(&DomainSpec {
                domain: demo::DEMO_DOMAIN.into(),
                service: "demo".into(),
                port: demo::WEB_PORT,
                passthrough: false,
            })
            .await
            .unwrap();
        demo::wait_cert(&admin, demo::DEMO_DOMAIN, SETTLE).await.unwrap();
        let root = lab.state.dir.join("pebble-root.pem");
        let pebble = lab.state.pebble.clone().unwrap();
        std::fs::write(&root, pebble.issuing_root().await.unwrap()).unwrap();
        let proxy_ip = lab.net.node_ip(lab.node(&proxy).unwrap().index).to_string();
        let deadline = Instant::now() + SETTLE;
        while fetch(&proxy_ip, &root, "/").0 != "200" {
            assert!(Instant::now() < deadline, "the proxy does not serve the demo");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Rig {
            lab,
            admin,
            root,
            proxy,
            proxy_ip,
        }
    }

    fn load(&self) -> Load {
        Load::start(&self.lab, &LoadSpec::new(&self.proxy, &self.root, "n2")).unwrap()
    }

    /// Stops `load`, prints what it saw under `case`, and checks it failed nothing.
    fn no_failures(&self, case: &str, load: Load) {
        let s = load.stop();
        println!("{case}:\n{s}");
        s.assert_no_failures();
        s.assert_ok_at_least(20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deploys_lose_no_request() {
    let mut rig = Rig::up(210).await;
    let admin = rig.admin.clone();

    // (a) An app that takes 4 s to start listening: new before old, 0 failures.
    let load = rig.load();
    let mut slow = demo_spec(&rig.lab, "2");
    slow.command = Some("sleep 4; exec /bin/serve".into());
    let n = deploy(&admin, &slow).await;
    let r = wait_release(&admin, "demo", n).await;
    rig.no_failures("(a) slow start", load);
    assert_eq!(r.state, ReleaseState::Complete, "{r:?}");
    assert!(r.steps.iter().all(|s| s.stage == StepStage::Done), "{r:?}");
    let info = admin.show_service("demo").await.unwrap();
    assert_eq!(info.current_release, Some(n));
    assert!(info.replicas.iter().all(|x| x.release == n && x.healthy), "{info:?}");
    // Pinned to the image its replicas run, as Podman reported it.
    let release = admin
        .list_releases("demo")
        .await
        .unwrap()
        .into_iter()
        .find(|x| x.number == n)
        .unwrap();
    let digest = release.image_digest.unwrap_or_default();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest:?}");

    // (b) A health check that never passes: the release fails with the
    // reason, the old one keeps serving, history says failed.
    let load = rig.load();
    let mut bad = demo_spec(&rig.lab, "3");
    bad.health_http = Some("/nope".into());
    bad.rollout.timeout_secs = 8;
    let n_bad = deploy(&admin, &bad).await;
    let r = wait_release(&admin, "demo", n_bad).await;
    rig.no_failures("(b) never healthy", load);
    assert_eq!(r.state, ReleaseState::Failed);
    let reason = r.reason.unwrap();
    assert!(
        reason.contains("not healthy within 8 s") && reason.contains("404"),
        "{reason}"
    );
    let history = admin.list_releases("demo").await.unwrap();
    assert_eq!(history[0].state, ReleaseState::Failed);
    let info = admin.show_service("demo").await.unwrap();
    assert_eq!(info.current_release, Some(n));
    assert!(info.replicas.iter().all(|x| x.release == n), "{info:?}");

    // (c) A crash-looping command: the same, with its exit code and output.
    let load = rig.load();
    let mut crash = demo_spec(&rig.lab, "4");
    crash.command = Some("echo crashing on purpose; exit 3".into());
    let n_crash = deploy(&admin, &crash).await;
    let r = wait_release(&admin, "demo", n_crash).await;
    rig.no_failures("(c) crash loop", load);
    assert_eq!(r.state, ReleaseState::Failed);
    let reason = r.reason.unwrap();
    assert!(
        reason.contains("code 3") || reason.contains("crash-looping"),
        "{reason}"
    );
    assert!(
        reason.contains("crashing on purpose"),
        "the log tail is in the reason: {reason}"
    );

    // (d) Rollback to release 1's spec: a new release, 0 failures.
    let load = rig.load();
    let info = admin
        .rollback_service(
            "demo",
            &berth_protocol::release::RollbackRequest {
                to: Some(1),
                force: false,
            },
        )
        .await
        .unwrap();
    let n_back = info.rollout.unwrap().release;
    let r = wait_release(&admin, "demo", n_back).await;
    rig.no_failures("(d) rollback", load);
    assert_eq!(r.state, ReleaseState::Complete);
    let history = admin.list_releases("demo").await.unwrap();
    assert_eq!(history[0].reason.as_deref(), Some("rollback to 1"));
    assert_eq!(history[0].spec.env["VERSION"], "1");
    assert_eq!(
        history.iter().find(|h| h.number == n).unwrap().state,
        ReleaseState::RolledBack
    );

    // (e) The control plane restarted mid-rollout, then an agent SIGKILLed
    // mid-rollout: both rollouts complete with 0 failures.
    let load = rig.load();
    let n_e = deploy(&admin, &slow_with(&slow, "5")).await;
    wait_started(&admin, "demo", n_e).await;
    rig.lab.stop_cp().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.lab.start_cp().await.unwrap();
    let admin = rig.lab.admin().unwrap();
    let r = wait_release(&admin, "demo", n_e).await;
    assert_eq!(r.state, ReleaseState::Complete, "{r:?}");
    let n_k = deploy(&admin, &slow_with(&slow, "6")).await;
    wait_started(&admin, "demo", n_k).await;
    let n1 = rig.lab.node("n1").unwrap().index;
    rig.lab.kill_agent(n1).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    rig.lab.start_agent(n1, None).unwrap();
    let r = wait_release(&admin, "demo", n_k).await;
    rig.no_failures("(e) control plane restarted, agent killed", load);
    assert_eq!(r.state, ReleaseState::Complete, "{r:?}");

    // (g) A replica serving a 3 s response when it is replaced: the
    // response completes (the old replica drains before it is stopped).
    let load = rig.load();
    let ip = rig.proxy_ip.clone();
    let root = rig.root.clone();
    let slow_request = std::thread::spawn(move || fetch(&ip, &root, "/cgi-bin/slow"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut quick = demo_spec(&rig.lab, "7");
    quick.rollout.drain_secs = 5;
    let n_g = deploy(&admin, &quick).await;
    let r = wait_release(&admin, "demo", n_g).await;
    let (code, body) = slow_request.join().unwrap();
    rig.no_failures("(g) in-flight response", load);
    assert_eq!(r.state, ReleaseState::Complete);
    assert_eq!((code.as_str(), body.trim()), ("200", "slow done"));

    // (f) A service with a volume is stop-first, as its plan says.
    let load = rig.load();
    let mut vol = demo::web_service(&rig.lab, "vol", 1);
    vol.volumes.push(Volume {
        name: "data".into(),
        path: "/data".into(),
    });
    vol.rollout.drain_secs = 0;
    let n_v = deploy(&admin, &vol).await;
    assert_eq!(wait_release(&admin, "vol", n_v).await.state, ReleaseState::Complete);
    vol.env.insert("VERSION".into(), "2".into());
    let info = admin.deploy_service(&vol).await.unwrap();
    let plan = info.rollout.unwrap();
    assert!(plan.stop_first, "{plan:?}");
    let r = wait_release(&admin, "vol", plan.release).await;
    rig.no_failures("(f) volume service", load);
    assert_eq!(r.state, ReleaseState::Complete);
    let times = &r.steps[0].times;
    let at = |s: StepStage| times.iter().position(|(x, _)| *x == s);
    assert!(
        at(StepStage::StoppingOld).is_some() && at(StepStage::StoppingOld) < at(StepStage::Starting),
        "the old replica stopped before the new one started: {times:?}"
    );

    // (h) Autoheal: a demo replica whose page goes missing (its HTTP check
    // answers 404) is restarted, which does not bring the file back, then
    // recreated from the image, and is healthy again. The load starts once
    // the control plane shows it unhealthy (out of DNS and the proxies;
    // before that its requests fail, as any broken replica's do): from then
    // on, autoheal costs no request.
    let info = admin.show_service("demo").await.unwrap();
    let sick = info.replicas[0].clone();
    let container = format!("berth-{}", sick.replica);
    let out = rig
        .lab
        .podman(&sick.node, &["exec", &container, "rm", "/www/index.html"])
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replica =
        |info: &berth_protocol::service::ServiceInfo| info.replicas.iter().find(|r| r.replica == sick.replica).cloned();
    let deadline = Instant::now() + SETTLE;
    while replica(&admin.show_service("demo").await.unwrap()).is_some_and(|r| r.healthy) {
        assert!(Instant::now() < deadline, "{} never became unhealthy", sick.replica);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let load = rig.load();
    let (mut restarted, mut recreated) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = replica(&admin.show_service("demo").await.unwrap()).expect("the replica stays");
        assert!(!r.gave_up, "autoheal gave up: {r:?}");
        restarted |= r.restarts > sick.restarts && r.recreates == sick.recreates;
        recreated |= r.recreates > sick.recreates;
        if recreated && r.healthy {
            break;
        }
        assert!(Instant::now() < deadline, "not healed within 180 s: {r:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    rig.no_failures("(h) autoheal", load);
    assert!(restarted, "it was recreated without being restarted first");
}

fn slow_with(base: &ServiceSpec, version: &str) -> ServiceSpec {
    let mut s = base.clone();
    s.env.insert("VERSION".into(), version.into());
    s
}
