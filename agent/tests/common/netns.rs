//! Network-namespace lab for the mesh and firewall tests: namespaces, veths
//! and `wireguard-go` daemons, all removed on drop even when a test fails.
//!
//! Needs root (network namespaces, TUN devices, /var/run/wireguard).

use std::{
    future::Future,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use berth_agent::mesh::{uapi, wireguard_go};

/// Everything one test created, removed on drop.
pub struct Lab {
    tag: String,
    namespaces: Vec<String>,
    interfaces: Vec<String>,
}

impl Lab {
    /// `tag`: two characters, unique per test (names must not clash
    /// between tests running in parallel).
    pub fn new(tag: &str) -> Lab {
        assert_eq!(tag.len(), 2);
        Lab {
            tag: tag.to_owned(),
            namespaces: Vec::new(),
            interfaces: Vec::new(),
        }
    }

    /// A fresh network namespace with loopback up.
    pub fn netns(&mut self, side: &str) -> String {
        let name = format!("bm-test-{}-{side}-{}", self.tag, std::process::id());
        // Left over from a crashed run with the same pid: start clean.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok("ip", &["netns", "add", &name], None);
        self.namespaces.push(name.clone());
        run_ok("ip", &["-n", &name, "link", "set", "lo", "up"], None);
        name
    }

    /// A WireGuard interface name unique on the host, cleaned up on drop
    /// (wireguard-go killed, UAPI socket removed).
    pub fn ifname(&mut self, side: &str) -> String {
        let name = format!("bm{}{side}{}", self.tag, std::process::id());
        assert!(name.len() <= 15, "{name} too long");
        cleanup_interface(&name);
        self.interfaces.push(name.clone());
        name
    }

    /// A veth pair between two namespaces, both ends up and addressed.
    pub fn veth(&self, ns_a: &str, addr_a: &str, ns_b: &str, addr_b: &str) {
        run_ok(
            "ip",
            &[
                "-n", ns_a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", ns_b,
            ],
            None,
        );
        for (ns, addr) in [(ns_a, addr_a), (ns_b, addr_b)] {
            run_ok("ip", &["-n", ns, "addr", "add", addr, "dev", "veth0"], None);
            run_ok("ip", &["-n", ns, "link", "set", "veth0", "up"], None);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Daemons first: their sockets keep the namespaces alive.
        for ifname in &self.interfaces {
            cleanup_interface(ifname);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn cleanup_interface(ifname: &str) {
    while let Some(pid) = wireguard_go::find_pid(ifname, Path::new("wireguard-go")) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        for _ in 0..100 {
            if !wireguard_go::process_alive(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(uapi::path(ifname));
}

/// Runs a command, panicking with its stderr unless it succeeds; returns
/// stdout.
pub fn run_ok(cmd: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread of its own that has entered network namespace
/// `ns`, under a current-thread tokio runtime (so every command it
/// spawns, and every blocking-pool thread, is in `ns` too).
pub fn in_netns<F, Fut, T>(ns: &str, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
