//! The lab's network on its own (needs root): namespaces, links and the
//! bridge made, pinged across and removed, and the errors on bad use.

use anyhow::Result;
use berth_lab::net::{existing_labs, ip, link_exists, netns_list, ns_pids, LabNet, MAX_NODES};
use berth_lab::process;
use std::net::Ipv4Addr;
use std::path::Path;

/// Destroys the lab on drop, also when the test fails.
struct LabGuard(LabNet);
impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.destroy() {
            eprintln!("cleanup of lab {}: {e:#}", self.0.id);
        }
    }
}

/// Kills a process on drop.
struct ProcGuard(u32);
impl Drop for ProcGuard {
    fn drop(&mut self) {
        let _ = process::kill9(self.0);
    }
}

/// Removes a file on drop.
struct FileGuard(std::path::PathBuf);
impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh lab `id` (leftovers of an earlier run are removed first).
fn fresh_lab(id: u8) -> LabGuard {
    assert!(id >= 240, "tests use lab ids >= 240");
    let lab = LabNet { id };
    lab.destroy().unwrap();
    let g = LabGuard(lab);
    lab.create_base().unwrap();
    g
}

fn ping(from_ns: &str, to: Ipv4Addr) -> Result<()> {
    ip(&["netns", "exec", from_ns, "ping", "-c", "1", "-W", "5", &to.to_string()]).map(drop)
}

fn lab_namespaces(lab: &LabNet) -> Vec<String> {
    netns_list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&lab.ns_prefix()))
        .collect()
}

#[test]
fn lab_pings_runs_daemon_and_destroys() {
    let guard = fresh_lab(250);
    let lab = guard.0;
    assert!(lab.exists());
    assert!(existing_labs().contains(&250));
    lab.add_node(1).unwrap();
    lab.add_node(2).unwrap();
    assert_eq!(lab.nodes(), vec![1, 2]);

    ping(&lab.node_ns(1), lab.node_ip(2)).unwrap();
    ping(&lab.node_ns(1), lab.host_ip()).unwrap();
    ping(&lab.node_ns(2), lab.node_ip(1)).unwrap();

    let log = FileGuard(std::env::temp_dir().join(format!("berth-lab-net-test-{}.log", std::process::id())));
    let ns = lab.node_ns(1);
    let pid = process::spawn_daemon(Some(&ns), Path::new("/bin/sleep"), &["300".to_string()], &[], &log.0).unwrap();
    let _proc = ProcGuard(pid);
    assert!(process::is_alive(pid));
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().trim(),
        "sleep"
    );
    assert!(ns_pids(&ns).unwrap().contains(&pid), "sleep is in {ns}");

    lab.destroy().unwrap();
    assert!(lab_namespaces(&lab).is_empty(), "{:?}", lab_namespaces(&lab));
    assert!(!link_exists(&lab.host_link()));
    assert!(!process::is_alive(pid), "sleep was killed");
    assert!(!lab.exists());
    assert!(!existing_labs().contains(&250));
    // Twice is fine.
    lab.destroy().unwrap();
}

#[test]
fn lab_errors_node_lifecycle_and_isolation() {
    let guard = fresh_lab(251);
    let lab = guard.0;

    let err = lab.create_base().unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    assert!(lab.exists(), "a failed create_base leaves the lab alone");

    assert!(lab.add_node(0).is_err());
    assert!(lab.add_node(MAX_NODES + 1).is_err());
    lab.add_node(1).unwrap();
    let err = lab.add_node(1).unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    lab.add_node(MAX_NODES).unwrap();

    // No default route anywhere in the node; forwarding on in the node,
    // off on the host end.
    let routes = ip(&["-n", &lab.node_ns(1), "route", "show", "default"]).unwrap();
    assert!(routes.trim().is_empty(), "{routes}");
    let fwd = ip(&["netns", "exec", &lab.node_ns(1), "sysctl", "-n", "net.ipv4.ip_forward"]).unwrap();
    assert_eq!(fwd.trim(), "1");
    let host_fwd = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{}/forwarding", lab.host_link())).unwrap();
    assert_eq!(host_fwd.trim(), "0");
    let addr = ip(&["-o", "-4", "addr", "show", "dev", &lab.host_link()]).unwrap();
    assert!(addr.contains("198.18.251.1/24"), "{addr}");

    ping(&lab.node_ns(MAX_NODES), lab.node_ip(1)).unwrap();
    ping(&lab.node_ns(1), lab.host_ip()).unwrap();
    // Nothing beyond the lab: another lab's host address is unreachable.
    assert!(ip(&[
        "netns",
        "exec",
        &lab.node_ns(1),
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        "198.18.250.1"
    ])
    .is_err());

    // Remove a node with a process in it, then re-add it.
    let log = FileGuard(std::env::temp_dir().join(format!("berth-lab-net-test2-{}.log", std::process::id())));
    let pid = process::spawn_daemon(
        Some(&lab.node_ns(1)),
        Path::new("sleep"),
        &["300".to_string()],
        &[],
        &log.0,
    )
    .unwrap();
    let _proc = ProcGuard(pid);
    assert!(process::is_alive(pid));
    lab.remove_node(1).unwrap();
    assert!(!process::is_alive(pid));
    assert!(!lab.node_exists(1));
    assert!(lab.remove_node(1).is_err());
    assert_eq!(lab.nodes(), vec![MAX_NODES]);
    lab.add_node(1).unwrap();
    ping(&lab.node_ns(1), lab.node_ip(MAX_NODES)).unwrap();

    lab.destroy().unwrap();
    assert!(lab_namespaces(&lab).is_empty());
    assert!(!link_exists(&lab.host_link()));
    assert!(!lab.exists());
    lab.destroy().unwrap();

    // add_node without a lab fails clearly.
    let err = lab.add_node(1).unwrap_err();
    assert!(format!("{err:#}").contains("no bridge namespace"), "{err:#}");
}
