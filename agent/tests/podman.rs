//! The Podman client against a real Podman: each test starts its own
//! `podman system service` (own --root, --runroot, network config dir and
//! socket), imports the busybox test image (scripts/make-test-image.sh) and
//! gets its own bridge network on a /24 of 10.231.0.0/16, so tests (and
//! several test runs) can run side by side. Everything is removed at the end,
//! even when the test fails.
//!
//! Needs root and Podman set up by scripts/podman-setup.sh.

use berth_agent::podman::{
    ContainerSpec, ContainerState, Error, HealthCheck, HealthStatus, NetworkSpec, Podman, RestartPolicy, Volume,
};
use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "localhost/berth-test/busybox:latest";
const HTTPD: [&str; 7] = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Fails (never skips) when this machine cannot run the tests.
fn check_host() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        let out = match Command::new("podman").args(["info", "--format", "{{.Host.NetworkBackend}} {{.Host.OCIRuntime.Name}}"]).output() {
            Ok(out) => out,
            Err(e) => {
                return Err(format!(
                    "podman is not installed ({e}): run `sudo scripts/podman-setup.sh`; these tests need a real Podman"
                ))
            }
        };
        if !nix::unistd::geteuid().is_root() {
            return Err("the Podman tests need root (bridge networks, host access to container IPs)".into());
        }
        let info = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || info != "netavark runc" {
            return Err(format!(
                "Podman is not set up for Berth (network backend and runtime: {info:?}, {}): run `sudo scripts/podman-setup.sh`",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// A /24 of 10.231.0.0/16 held (flock) for the life of a test.
struct Subnet {
    octet: u8,
    _lock: Flock<File>,
}

fn route_exists(net: &str) -> bool {
    let out = Command::new("ip")
        .args(["-4", "route", "show", net])
        .output()
        .expect("run ip");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn take_subnet() -> Subnet {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join("berth-podman-test-subnets");
    std::fs::create_dir_all(&dir).unwrap();
    let start = std::process::id()
        .wrapping_mul(7)
        .wrapping_add(NEXT.fetch_add(1, Ordering::SeqCst) * 13);
    for i in 0..250u32 {
        let octet = ((start + i) % 250 + 1) as u8;
        let file = File::create(dir.join(format!("{octet}.lock"))).unwrap();
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        // A leftover of a crashed run keeps its subnet: skip it.
        if route_exists(&format!("10.231.{octet}.0/24")) || link_exists(&format!("btest{octet}")) {
            continue;
        }
        return Subnet { octet, _lock: lock };
    }
    panic!("no free test subnet in 10.231.0.0/16");
}

/// One Podman service with its own storage, network config and socket.
struct Env {
    dir: tempfile::TempDir,
    flags: Vec<String>,
    service: Option<Child>,
    podman: Podman,
    subnet: Subnet,
    /// Unique per test run: network name, label value.
    tag: String,
}

impl Env {
    async fn start() -> Env {
        check_host();
        let subnet = take_subnet();
        let dir = tempfile::Builder::new().prefix("berth-podman-").tempdir().unwrap();
        let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
        let flags: Vec<String> = [
            "--root",
            &p("root"),
            "--runroot",
            &p("runroot"),
            "--network-config-dir",
            &p("net"),
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            "runc",
            "--events-backend",
            "file",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let socket = dir.path().join("podman.sock");
        let log = File::create(dir.path().join("service.log")).unwrap();
        let service = Command::new("podman")
            .args(&flags)
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start podman system service");
        let tag = format!("btest-{}-{}", std::process::id(), subnet.octet);
        let mut env = Env {
            podman: Podman::new(&socket),
            dir,
            flags,
            service: Some(service),
            subnet,
            tag,
        };

        let out = Command::new(repo_root().join("scripts/make-test-image.sh"))
            .args(&env.flags)
            .output()
            .expect("run scripts/make-test-image.sh");
        assert!(
            out.status.success(),
            "make-test-image.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if env.podman.ping().await.is_ok() {
                break;
            }
            if let Some(status) = env.service.as_mut().unwrap().try_wait().unwrap() {
                panic!("podman system service exited ({status}): {}", env.service_log());
            }
            assert!(
                Instant::now() < deadline,
                "podman service not up after 30 s: {}",
                env.service_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        env
    }

    fn service_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }

    fn network_spec(&self) -> NetworkSpec {
        let o = self.subnet.octet;
        NetworkSpec {
            name: self.tag.clone(),
            subnet: format!("10.231.{o}.0/24").parse().unwrap(),
            gateway: Ipv4Addr::new(10, 231, o, 1),
            interface_name: Some(format!("btest{o}")),
            options: BTreeMap::new(),
            labels: [("io.berth.test".to_string(), self.tag.clone())].into(),
        }
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.subnet.octet, host)
    }

    /// A container on our network: the image's httpd, our label.
    fn container(&self, name: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: IMAGE.into(),
            command: Some(HTTPD.iter().map(|s| s.to_string()).collect()),
            labels: [("io.berth.test".to_string(), self.tag.clone())].into(),
            network: self.tag.clone(),
            restart_policy: RestartPolicy::No,
            ..Default::default()
        }
    }

    fn podman_cli(&self, args: &[&str]) {
        let _ = Command::new("podman")
            .args(&self.flags)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- podman service log ---\n{}", self.service_log());
        }
        // Containers first (their network namespaces, conmon processes and
        // IPAM leases), then the network (its bridge, firewall rules and its
        // bucket in the host-wide IPAM db), then the service.
        self.podman_cli(&["rm", "--all", "--force", "--time", "0"]);
        self.podman_cli(&["network", "rm", "--force", &self.tag]);
        if let Some(mut child) = self.service.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Storage mounts left behind (the overlay home is bind-mounted on
        // itself while the service runs), deepest first.
        let root = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
    }
}

/// GET over plain TCP from the host; the body on a 200.
async fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> Result<String, String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect((ip, port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .or_else(|| text.split_once("\n\n"))
            .ok_or_else(|| format!("no HTTP head: {text:?}"))?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(format!("not 200: {head}"));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| "timeout".to_string())?
}

async fn http_get_eventually(ip: Ipv4Addr, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match http_get(ip, 8080, path).await {
            Ok(body) => return body,
            Err(e) if Instant::now() > deadline => panic!("GET http://{ip}:8080{path}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn ping_reports_the_version_and_images() {
    let env = Env::start().await;
    let version = env.podman.ping().await.unwrap();
    println!("Podman {version}");
    assert!(version.starts_with("4.") || version.starts_with("5."), "{version}");
    assert!(env.podman.image_exists(IMAGE).await.unwrap());
    assert!(!env.podman.image_exists("localhost/berth-test/absent:1").await.unwrap());

    let nobody = Podman::new(env.dir.path().join("nobody.sock"));
    let err = nobody.ping().await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("nobody.sock"), "{err}");
}

#[tokio::test]
async fn network_ensure_is_idempotent_and_checks_the_subnet() {
    let env = Env::start().await;
    let spec = env.network_spec();
    env.podman.network_ensure(&spec).await.unwrap();
    env.podman.network_ensure(&spec).await.unwrap();

    let mut other = spec.clone();
    other.subnet = "10.231.0.0/24".parse().unwrap();
    other.gateway = Ipv4Addr::new(10, 231, 0, 1);
    let err = env.podman.network_ensure(&other).await.unwrap_err();
    assert!(matches!(err, Error::NetworkMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&spec.subnet.to_string()) && msg.contains("10.231.0.0/24"),
        "{msg}"
    );

    let mut other_gateway = spec.clone();
    other_gateway.gateway = env.ip(254);
    assert!(env.podman.network_ensure(&other_gateway).await.is_err());

    env.podman.network_remove(&spec.name).await.unwrap();
    let err = env.podman.network_remove(&spec.name).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    env.podman.network_ensure(&spec).await.unwrap();
}

#[tokio::test]
async fn container_lifecycle() {
    let env = Env::start().await;
    let net = env.network_spec();
    env.podman.network_ensure(&net).await.unwrap();

    // A read-only bind mount served by httpd.
    let extra = env.dir.path().join("extra");
    std::fs::create_dir(&extra).unwrap();
    std::fs::write(extra.join("hello.txt"), "hello from the host\n").unwrap();

    let secret = format!("s3cret-{}-{}", std::process::id(), env.subnet.octet);
    let ip = env.ip(10);
    let mut spec = env.container("web");
    spec.env = [
        ("BERTH_SECRET".to_string(), secret.clone()),
        ("GREETING".to_string(), "hello".to_string()),
    ]
    .into();
    spec.labels.insert("io.berth.replica".into(), "web-1".into());
    spec.hostname = Some("web-1".into());
    spec.static_ip = Some(ip);
    spec.dns_servers = vec![IpAddr::V4(net.gateway)];
    spec.dns_search = vec!["internal".into()];
    spec.cpu_limit = Some(0.5);
    spec.memory_limit = Some(64 << 20);
    spec.restart_policy = RestartPolicy::Always;
    spec.healthcheck = Some(HealthCheck::shell(
        "wget -q -O /dev/null http://127.0.0.1:8080/",
        Duration::from_secs(1),
        Duration::from_secs(2),
        2,
    ));
    spec.volumes = vec![Volume {
        host_path: extra.clone(),
        container_path: "/www/extra".into(),
        read_only: true,
    }];
    spec.cap_drop = vec!["ALL".into()];
    spec.cap_add = vec!["NET_BIND_SERVICE".into()];
    spec.log_max_size = Some(1 << 20);
    spec.stop_timeout = Some(2);

    let id = env.podman.create(&spec).await.unwrap();
    env.podman.start(&id).await.unwrap();
    env.podman.start(&id).await.unwrap(); // already running: fine

    let d = env.podman.inspect(&id).await.unwrap();
    assert!(d.is_running(), "{d:?}");
    assert_eq!(d.name, "web");
    assert_eq!(d.image, IMAGE);
    assert_eq!(d.ip_on(&net.name), Some(ip));
    assert_eq!(d.networks[&net.name].gateway, Some(net.gateway));
    assert_eq!(d.labels.get("io.berth.replica").map(String::as_str), Some("web-1"));
    assert_eq!(d.restart_policy, Some(RestartPolicy::Always));
    assert_eq!(d.cpu_limit, Some(0.5));
    assert_eq!(d.memory_limit, Some(64 << 20));
    assert_eq!(d.healthcheck.as_ref().map(|h| h.interval), Some(Duration::from_secs(1)));
    assert!(d.started_at.is_some() && d.pid > 0);
    assert!(
        !format!("{d:?}").contains(&secret),
        "inspect details must not carry the environment"
    );

    // From the host straight to the container's IP on the bridge.
    let env_out = http_get_eventually(ip, "/cgi-bin/env").await;
    assert!(env_out.contains(&format!("BERTH_SECRET={secret}")), "{env_out}");
    assert!(env_out.contains("GREETING=hello"), "{env_out}");
    assert!(env_out.contains("HOSTNAME=web-1"), "{env_out}");
    assert_eq!(
        http_get(ip, 8080, "/extra/hello.txt").await.unwrap(),
        "hello from the host\n"
    );

    // Only NET_BIND_SERVICE (bit 10) is left.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid)).unwrap();
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert_eq!(cap_eff.split_whitespace().nth(1), Some("0000000000000400"), "{cap_eff}");

    // The secret is in no host command line.
    let ps = Command::new("ps").args(["auxww"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(!ps.contains(&secret), "the secret shows in ps");

    // List: ours by label, not an unlabelled container.
    let mut other = env.container("unlabelled");
    other.labels.clear();
    let other_id = env.podman.create(&other).await.unwrap();
    let listed = env.podman.list(&[("io.berth.test", &env.tag)]).await.unwrap();
    assert_eq!(
        listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![id.as_str()]
    );
    assert_eq!(listed[0].name, "web");
    assert!(listed[0].state.is_running());
    let both = env
        .podman
        .list(&[("io.berth.test", &env.tag), ("io.berth.replica", "web-1")])
        .await
        .unwrap();
    assert_eq!(both.len(), 1);
    let none = env
        .podman
        .list(&[("io.berth.test", &env.tag), ("io.berth.replica", "web-2")])
        .await
        .unwrap();
    assert!(none.is_empty());
    let all = env.podman.list(&[]).await.unwrap();
    assert!(all.iter().any(|c| c.id == other_id) && all.iter().any(|c| c.id == id));

    // Stop: stays stopped despite restart=always; stopping again is fine.
    env.podman.stop(&id, 5).await.unwrap();
    env.podman.stop(&id, 5).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let d = env.podman.inspect(&id).await.unwrap();
    assert!(!d.is_running(), "{d:?}");
    assert!(
        matches!(d.state, ContainerState::Exited | ContainerState::Stopped),
        "{:?}",
        d.state
    );
    assert!(d.finished_at.is_some());

    // Start again: same address.
    env.podman.start(&id).await.unwrap();
    assert_eq!(env.podman.inspect(&id).await.unwrap().ip_on(&net.name), Some(ip));
    http_get_eventually(ip, "/").await;

    // Remove (forced while running), then it is gone.
    env.podman.remove(&id, true).await.unwrap();
    let err = env.podman.inspect(&id).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(env.podman.remove(&id, true).await.unwrap_err().is_not_found());
    env.podman.remove(&other_id, false).await.unwrap();
    assert!(env
        .podman
        .list(&[("io.berth.test", &env.tag)])
        .await
        .unwrap()
        .is_empty());

    // Without containers the network can go.
    env.podman.network_remove(&net.name).await.unwrap();
}

#[tokio::test]
async fn restart_policy_brings_a_killed_container_back() {
    let env = Env::start().await;
    env.podman.network_ensure(&env.network_spec()).await.unwrap();
    let mut spec = env.container("phoenix");
    spec.restart_policy = RestartPolicy::Always;
    let id = env.podman.create(&spec).await.unwrap();
    env.podman.start(&id).await.unwrap();
    let before = env.podman.inspect(&id).await.unwrap();
    assert!(before.is_running() && before.pid > 0);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = env.podman.inspect(&id).await.unwrap();
        if d.is_running() && d.restart_count >= 1 && d.pid != before.pid {
            break;
        }
        assert!(Instant::now() < deadline, "not restarted: {d:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn stop_honours_the_timeout() {
    let env = Env::start().await;
    env.podman.network_ensure(&env.network_spec()).await.unwrap();
    let mut spec = env.container("stubborn");
    spec.command = Some(vec!["sh".into(), "-c".into(), "trap '' TERM; sleep 1000".into()]);
    let id = env.podman.create(&spec).await.unwrap();
    env.podman.start(&id).await.unwrap();
    assert!(env.podman.inspect(&id).await.unwrap().is_running());

    let t = Instant::now();
    env.podman.stop(&id, 1).await.unwrap();
    let took = t.elapsed();
    println!("stop with timeout=1 on a container ignoring SIGTERM took {took:?}");
    let d = env.podman.inspect(&id).await.unwrap();
    assert!(!d.is_running(), "{d:?}");
    assert_eq!(d.exit_code, 137, "killed after the timeout");
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
}

#[tokio::test]
async fn errors_name_the_missing_image() {
    let env = Env::start().await;
    env.podman.network_ensure(&env.network_spec()).await.unwrap();
    let missing = "localhost/berth-test/missing:404";
    let mut spec = env.container("ghost");
    spec.image = missing.into();
    let err = env.podman.create(&spec).await.unwrap_err();
    assert!(err.status().is_some(), "{err:?}");
    assert!(err.to_string().contains(missing), "{err}");

    // Nothing listens on port 1 of loopback: the pull fails and says why.
    let reference = "127.0.0.1:1/berth-test/missing:1";
    let err = env.podman.pull(reference, false).await.unwrap_err();
    assert!(matches!(err, Error::Pull { .. }), "{err:?}");
    assert!(err.to_string().contains(reference), "{err}");
    println!("{err}");

    let err = env.podman.inspect("no-such-container").await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(err.to_string().contains("no-such-container"), "{err}");
}

#[tokio::test]
async fn health_turns_healthy_and_unhealthy() {
    let env = Env::start().await;
    env.podman.network_ensure(&env.network_spec()).await.unwrap();
    let check = |script: &str| HealthCheck::shell(script, Duration::from_secs(1), Duration::from_secs(2), 2);

    let mut good = env.container("good");
    good.healthcheck = Some(check("wget -q -O /dev/null http://127.0.0.1:8080/"));
    let mut bad = env.container("bad");
    bad.healthcheck = Some(check("exit 1"));
    let good = env.podman.create(&good).await.unwrap();
    let bad = env.podman.create(&bad).await.unwrap();
    env.podman.start(&good).await.unwrap();
    env.podman.start(&bad).await.unwrap();
    let d = env.podman.inspect(&bad).await.unwrap();
    assert_eq!(d.health.map(|h| h.status), Some(HealthStatus::Starting));

    // Where Podman cannot use systemd timers nothing runs the checks by
    // itself: run them every interval, as the agent does.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let g = env.podman.inspect(&good).await.unwrap().health.map(|h| h.status);
        let b = env.podman.inspect(&bad).await.unwrap().health;
        if g == Some(HealthStatus::Healthy) && b.as_ref().map(|h| &h.status) == Some(&HealthStatus::Unhealthy) {
            assert!(b.unwrap().failing_streak >= 2);
            break;
        }
        assert!(Instant::now() < deadline, "good: {g:?}, bad: {b:?}");
        let _ = env.podman.healthcheck(&good).await;
        let _ = env.podman.healthcheck(&bad).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        env.podman.healthcheck(&good).await.unwrap().status,
        HealthStatus::Healthy
    );

    // A check can only run in a running container.
    env.podman.stop(&good, 1).await.unwrap();
    let err = env.podman.healthcheck(&good).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err:?}");
}
