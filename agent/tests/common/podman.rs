//! The private Podman every Podman-backed test runs against: its own
//! `podman system service` (own --root, --runroot, network config dir and
//! socket), the busybox test image (scripts/make-test-image.sh) and a /24 of
//! 10.231.0.0/16 held by a flock, so tests (and several test runs) can run
//! side by side. Everything is removed at the end, even when the test fails.
//!
//! Used by agent/tests/podman.rs and agent/tests/containers.rs.

use berth_agent::podman::{ContainerSpec, NetworkSpec, Podman, RestartPolicy};
use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const IMAGE: &str = "localhost/berth-test/busybox:latest";
pub const HTTPD: [&str; 7] = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Fails (never skips) when this machine cannot run the tests.
pub fn check_host() {
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
pub struct Subnet {
    pub octet: u8,
    _lock: Flock<File>,
}

pub fn route_exists(net: &str) -> bool {
    let out = Command::new("ip")
        .args(["-4", "route", "show", net])
        .output()
        .expect("run ip");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

pub fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn take_subnet() -> Subnet {
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

/// `podman system service` on `socket`, logging to `dir`/service.log.
fn spawn_service(dir: &Path, flags: &[String], socket: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("service.log"))
        .unwrap();
    Command::new("podman")
        .args(flags)
        .args(["system", "service", "--time=0"])
        .arg(format!("unix://{}", socket.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start podman system service")
}

/// One Podman service with its own storage, network config and socket.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub flags: Vec<String>,
    pub service: Option<Child>,
    pub podman: Podman,
    pub subnet: Subnet,
    /// Unique per test run: network name, label value.
    pub tag: String,
}

impl Env {
    pub async fn start() -> Env {
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
        let service = spawn_service(dir.path(), &flags, &socket);
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

        env.wait_for_service().await;
        env
    }

    async fn wait_for_service(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.podman.ping().await.is_ok() {
                break;
            }
            if let Some(status) = self.service.as_mut().unwrap().try_wait().unwrap() {
                panic!("podman system service exited ({status}): {}", self.service_log());
            }
            assert!(
                Instant::now() < deadline,
                "podman service not up after 30 s: {}",
                self.service_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the Podman service (SIGTERM, SIGKILL after 10 s); containers
    /// keep running (conmon watches them).
    pub fn stop_service(&mut self) {
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
    }

    /// Starts the Podman service again on the same socket, storage and
    /// network config.
    pub async fn start_service(&mut self) {
        assert!(self.service.is_none(), "the service runs");
        self.service = Some(spawn_service(self.dir.path(), &self.flags, &self.socket()));
        self.wait_for_service().await;
    }

    pub fn service_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }

    pub fn network_spec(&self) -> NetworkSpec {
        let o = self.subnet.octet;
        NetworkSpec {
            name: self.tag.clone(),
            subnet: format!("10.231.{o}.0/24").parse().unwrap(),
            gateway: Ipv4Addr::new(10, 231, o, 1),
            interface_name: Some(self.bridge()),
            options: BTreeMap::new(),
            labels: [("io.berth.test".to_string(), self.tag.clone())].into(),
        }
    }

    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.subnet.octet, host)
    }

    /// A container on our network: the image's httpd, our label.
    pub fn container(&self, name: &str) -> ContainerSpec {
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

    pub fn podman_cli(&self, args: &[&str]) {
        let _ = Command::new("podman")
            .args(&self.flags)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Runs the podman CLI on this env's storage and network config; panics
    /// unless it succeeds. Returns its stdout.
    pub fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman_output(args);
        assert!(
            out.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn podman_output(&self, args: &[&str]) -> Output {
        Command::new("podman")
            .args(&self.flags)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run podman")
    }

    /// The service's socket.
    pub fn socket(&self) -> PathBuf {
        self.podman.socket().to_path_buf()
    }

    /// This env's /24 and its bridge's name.
    pub fn subnet_net(&self) -> ipnet::Ipv4Net {
        format!("10.231.{}.0/24", self.subnet.octet).parse().unwrap()
    }

    pub fn bridge(&self) -> String {
        format!("btest{}", self.subnet.octet)
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
        self.stop_service();
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
pub async fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> Result<String, String> {
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

pub async fn http_get_eventually(ip: Ipv4Addr, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match http_get(ip, 8080, path).await {
            Ok(body) => return body,
            Err(e) if Instant::now() > deadline => panic!("GET http://{ip}:8080{path}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
