//! The mesh against real WireGuard: `wireguard-go` daemons in network
//! namespaces (tests/common/netns.rs), driven through `berth_agent::mesh`,
//! checked with `wg`, `ip` and `ping`.
//!
//! Needs root, `wireguard-go`, `wg` (wireguard-tools) and `ping`.

mod common;

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::unix::net::UnixListener,
    process::{Command as StdCommand, Stdio},
    sync::Arc,
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use berth_agent::mesh::{uapi, wireguard_go, Backend, Mesh, MeshConfig, PeerDiff};
use common::netns::{in_netns, run_ok, Lab};
use defguard_wireguard_rs::key::Key;

fn b64(key: &Key) -> String {
    BASE64.encode(key.as_slice())
}

fn protocol_peer(
    name: &str,
    key: &Key,
    mesh_ip: [u8; 4],
    subnet: &str,
    endpoint: Option<&str>,
) -> berth_protocol::Peer {
    berth_protocol::Peer {
        node_id: format!("id-{name}"),
        name: name.into(),
        wg_public_key: b64(key),
        mesh_ip: Ipv4Addr::from(mesh_ip),
        subnet: subnet.into(),
        endpoint: endpoint.map(|e| e.parse().unwrap()),
    }
}

fn mesh_cfg(ifname: &str, key: &Key, address: &str, port: u16) -> MeshConfig {
    MeshConfig {
        interface: ifname.into(),
        listen_port: port,
        private_key: b64(key),
        address: address.parse().unwrap(),
        subnet_pool: "10.200.0.0/16".parse().unwrap(),
        wireguard_go: "wireguard-go".into(),
    }
}

/// One peer line of `wg show <if> dump`.
#[derive(Debug, Clone, PartialEq)]
struct DumpPeer {
    endpoint: String,
    allowed_ips: String,
    latest_handshake: u64,
    rx: u64,
    tx: u64,
    keepalive: String,
}

/// Listen port and peers (by base64 key) from `wg show <if> dump`.
fn wg_dump(ns: &str, ifname: &str) -> (u16, HashMap<String, DumpPeer>) {
    let out = run_ok("ip", &["netns", "exec", ns, "wg", "show", ifname, "dump"], None);
    let mut lines = out.lines();
    let first: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let port = first[2].parse().unwrap();
    let peers = lines
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            (
                f[0].to_owned(),
                DumpPeer {
                    endpoint: f[2].into(),
                    allowed_ips: f[3].into(),
                    latest_handshake: f[4].parse().unwrap(),
                    rx: f[5].parse().unwrap(),
                    tx: f[6].parse().unwrap(),
                    keepalive: f[7].into(),
                },
            )
        })
        .collect();
    (port, peers)
}

fn ping(ns: &str, count: &str, target: &str) -> bool {
    StdCommand::new("ip")
        .args(["netns", "exec", ns, "ping", "-n", "-q", "-c", count, "-W", "1", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Pings until one answer (the first packets wait for the handshake),
/// then asserts `ping -c 3 -W 1` works.
fn assert_ping(ns: &str, target: &str) {
    let reached = (0..10).any(|_| ping(ns, "1", target));
    assert!(reached, "{target} unreachable from {ns}");
    assert!(ping(ns, "3", target), "ping -c 3 {target} from {ns} failed");
}

#[test]
fn two_nodes_talk_and_peers_change_in_place() {
    let mut lab = Lab::new("pg");
    let ns_a = lab.netns("a");
    let ns_b = lab.netns("b");
    lab.veth(&ns_a, "198.18.200.1/24", &ns_b, "198.18.200.2/24");
    let if_a = lab.ifname("a");
    let if_b = lab.ifname("b");
    // A container address behind B, inside B's subnet (no dummy module
    // here, so on loopback).
    run_ok("ip", &["-n", &ns_b, "addr", "add", "10.200.2.1/32", "dev", "lo"], None);

    let (key_a, key_b, key_c) = (Key::generate(), Key::generate(), Key::generate());
    let peer_a = protocol_peer(
        "a",
        &key_a.public_key(),
        [10, 100, 0, 1],
        "10.200.1.0/24",
        Some("198.18.200.1:51820"),
    );
    let peer_b = protocol_peer(
        "b",
        &key_b.public_key(),
        [10, 100, 0, 2],
        "10.200.2.0/24",
        Some("198.18.200.2:51820"),
    );
    // Nobody answers for C; its endpoint stays inside the lab.
    let peer_c = protocol_peer(
        "c",
        &key_c.public_key(),
        [10, 100, 0, 3],
        "10.200.3.0/24",
        Some("198.18.200.3:51820"),
    );

    let cfg_a = mesh_cfg(&if_a, &key_a, "10.100.0.1/16", 51820);
    let cfg_b = mesh_cfg(&if_b, &key_b, "10.100.0.2/16", 51820);
    let mesh_a = Arc::new(in_netns(&ns_a, move || async move { Mesh::ensure_up(cfg_a).await }).unwrap());
    let mesh_b = Arc::new(in_netns(&ns_b, move || async move { Mesh::ensure_up(cfg_b).await }).unwrap());
    assert_eq!(mesh_a.backend(), Backend::Userspace);
    assert_eq!(mesh_a.public_key(), b64(&key_a.public_key()));

    let apply = |ns: &str, mesh: &Arc<Mesh>, peers: Vec<berth_protocol::Peer>| {
        let mesh = Arc::clone(mesh);
        in_netns(ns, move || async move { mesh.apply(&peers).await }).unwrap()
    };

    // Each node's own entry in the list is skipped.
    let diff = apply(&ns_a, &mesh_a, vec![peer_a.clone(), peer_b.clone()]);
    assert_eq!(diff.add, vec![peer_b.wg_public_key.clone()]);
    assert!(diff.update.is_empty() && diff.remove.is_empty());
    let diff = apply(&ns_b, &mesh_b, vec![peer_a.clone(), peer_b.clone()]);
    assert_eq!(diff.add, vec![peer_a.wg_public_key.clone()]);

    assert_ping(&ns_a, "10.100.0.2");
    assert_ping(&ns_b, "10.100.0.1");
    // Through the subnet route and B's allowed IPs to B's container side.
    assert_ping(&ns_a, "10.200.2.1");

    let (_, before) = wg_dump(&ns_a, &if_a);
    let b_before = before[&peer_b.wg_public_key].clone();
    assert_eq!(b_before.endpoint, "198.18.200.2:51820");
    assert_eq!(b_before.keepalive, "25");
    assert!(b_before.latest_handshake > 0);

    // A continuous ping from A to B while C is added, changed and removed.
    let pinger = StdCommand::new("ip")
        .args([
            "netns",
            "exec",
            &ns_a,
            "ping",
            "-n",
            "-q",
            "-i",
            "0.2",
            "-c",
            "20",
            "-W",
            "1",
            "10.100.0.2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let diff = apply(&ns_a, &mesh_a, vec![peer_b.clone(), peer_c.clone()]);
    assert_eq!(
        diff,
        PeerDiff {
            add: vec![peer_c.wg_public_key.clone()],
            ..PeerDiff::default()
        }
    );
    std::thread::sleep(Duration::from_millis(500));

    let mut peer_c2 = peer_c.clone();
    peer_c2.endpoint = Some("198.18.200.4:51820".parse().unwrap());
    peer_c2.subnet = "10.200.33.0/24".into();
    let diff = apply(&ns_a, &mesh_a, vec![peer_b.clone(), peer_c2.clone()]);
    assert_eq!(
        diff,
        PeerDiff {
            update: vec![peer_c.wg_public_key.clone()],
            ..PeerDiff::default()
        }
    );
    let (_, during) = wg_dump(&ns_a, &if_a);
    let c = &during[&peer_c.wg_public_key];
    assert_eq!(c.endpoint, "198.18.200.4:51820");
    assert!(c.allowed_ips.contains("10.200.33.0/24"), "{c:?}");
    assert!(!c.allowed_ips.contains("10.200.3.0/24"), "{c:?}");

    let out = pinger.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && summary.contains("20 received") && summary.contains(" 0% packet loss"),
        "continuous ping lost packets: {summary}"
    );

    // B's peer entry was never touched: same endpoint, same handshake.
    let (_, after) = wg_dump(&ns_a, &if_a);
    let b_after = &after[&peer_b.wg_public_key];
    assert_eq!(b_after.endpoint, b_before.endpoint);
    assert_eq!(b_after.allowed_ips, b_before.allowed_ips);
    assert_eq!(b_after.latest_handshake, b_before.latest_handshake);
    assert!(b_after.rx > b_before.rx && b_after.tx > b_before.tx);

    // Remove C.
    let diff = apply(&ns_a, &mesh_a, vec![peer_b.clone()]);
    assert_eq!(
        diff,
        PeerDiff {
            remove: vec![peer_c.wg_public_key.clone()],
            ..PeerDiff::default()
        }
    );
    let peers = run_ok("ip", &["netns", "exec", &ns_a, "wg", "show", &if_a, "peers"], None);
    assert!(!peers.contains(&peer_c.wg_public_key), "{peers}");
    assert!(peers.contains(&peer_b.wg_public_key), "{peers}");
    // Nothing left to do.
    assert!(apply(&ns_a, &mesh_a, vec![peer_b.clone()]).is_empty());
    assert_ping(&ns_a, "10.100.0.2");

    let mesh = Arc::clone(&mesh_a);
    let status = in_netns(&ns_a, move || async move { mesh.status().await }).unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].wg_public_key, peer_b.wg_public_key);
    assert!(status[0].handshake_age_secs.is_some_and(|age| age < 60), "{status:?}");
    assert!(status[0].rx_bytes > 0 && status[0].tx_bytes > 0);

    // Tear down through the API.
    for (ns, mesh, ifname) in [(&ns_a, mesh_a, &if_a), (&ns_b, mesh_b, &if_b)] {
        let pid = mesh.wireguard_go_pid().expect("wireguard-go pid");
        let mesh = Arc::try_unwrap(mesh).unwrap();
        in_netns(ns, move || async move { mesh.destroy().await }).unwrap();
        assert!(!wireguard_go::process_alive(pid));
        assert!(!uapi::path(ifname).exists());
        let links = run_ok("ip", &["-n", ns, "-o", "link"], None);
        assert!(!links.contains(ifname.as_str()), "{links}");
    }
}

#[test]
fn ensure_up_adopts_running_daemon_and_keeps_peers() {
    let mut lab = Lab::new("ad");
    let ns = lab.netns("a");
    let ifname = lab.ifname("a");

    // A stale socket (nobody listening) from a dead daemon.
    std::fs::create_dir_all(uapi::path(&ifname).parent().unwrap()).unwrap();
    drop(UnixListener::bind(uapi::path(&ifname)).unwrap());
    assert!(uapi::path(&ifname).exists());

    let key = Key::generate();
    let cfg = mesh_cfg(&ifname, &key, "10.100.0.1/16", 51821);
    let up = |cfg: MeshConfig| in_netns(&ns, move || async move { Mesh::ensure_up(cfg).await });

    let mesh = up(cfg.clone()).expect("ensure_up over a stale socket");
    assert_eq!(mesh.backend(), Backend::Userspace);
    let pid = mesh.wireguard_go_pid().expect("wireguard-go running");

    // The daemon is not in our process group and not our child: killing
    // the agent (or its group) leaves it running.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let (ppid, pgrp): (u32, i32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    assert_ne!(pgrp, nix::unistd::getpgrp().as_raw());
    assert_ne!(ppid, std::process::id());

    let (x, y) = (Key::generate().public_key(), Key::generate().public_key());
    let peers = vec![
        protocol_peer("x", &x, [10, 100, 0, 8], "10.200.8.0/24", None),
        protocol_peer("y", &y, [10, 100, 0, 9], "10.200.9.0/24", Some("198.18.200.9:51820")),
    ];
    let mesh = Arc::new(mesh);
    let m = Arc::clone(&mesh);
    let p = peers.clone();
    let diff = in_netns(&ns, move || async move { m.apply(&p).await }).unwrap();
    assert_eq!(diff.add.len(), 2);
    let (port, dump) = wg_dump(&ns, &ifname);
    assert_eq!(port, 51821);
    assert_eq!(dump[&b64(&x)].endpoint, "(none)");
    assert_eq!(dump[&b64(&y)].endpoint, "198.18.200.9:51820");

    // Again, same config: the same daemon is adopted, peers kept.
    let again = up(cfg.clone()).unwrap();
    assert_eq!(again.wireguard_go_pid(), Some(pid));
    assert_eq!(wg_dump(&ns, &ifname).1.len(), 2);
    let p = peers.clone();
    let diff = in_netns(&ns, move || async move { again.apply(&p).await }).unwrap();
    assert!(diff.is_empty(), "{diff:?}");

    // New port, key and address: applied in place, peers kept, the old
    // address removed.
    let key2 = Key::generate();
    let mut cfg2 = mesh_cfg(&ifname, &key2, "10.100.0.77/16", 51822);
    cfg2.subnet_pool = "10.200.0.0/15".parse().unwrap();
    let moved = up(cfg2).unwrap();
    assert_eq!(moved.wireguard_go_pid(), Some(pid));
    assert_eq!(moved.public_key(), b64(&key2.public_key()));
    let (port, dump) = wg_dump(&ns, &ifname);
    assert_eq!(port, 51822);
    assert_eq!(dump.len(), 2);
    let iface = run_ok("ip", &["netns", "exec", &ns, "wg", "show", &ifname, "public-key"], None);
    assert_eq!(iface.trim(), b64(&key2.public_key()));
    let addrs = run_ok("ip", &["-n", &ns, "-4", "-o", "addr", "show", "dev", &ifname], None);
    assert!(addrs.contains("10.100.0.77/16"), "{addrs}");
    assert!(!addrs.contains("10.100.0.1/"), "{addrs}");
    let routes = run_ok("ip", &["-n", &ns, "route", "show", "dev", &ifname], None);
    assert!(routes.contains("10.200.0.0/15"), "{routes}");
    assert!(routes.contains("10.100.0.0/16"), "{routes}");
    let link = run_ok("ip", &["-n", &ns, "-o", "link", "show", "dev", &ifname], None);
    assert!(link.contains(",UP") || link.contains("<UP"), "{link}");

    // Drop the handle: the daemon keeps running.
    drop(moved);
    drop(mesh);
    assert!(wireguard_go::process_alive(pid));

    let last = up(cfg).unwrap();
    assert_eq!(last.wireguard_go_pid(), Some(pid));
    in_netns(&ns, move || async move { last.destroy().await }).unwrap();
    assert!(!wireguard_go::process_alive(pid));
    assert!(!uapi::path(&ifname).exists());
}

#[test]
fn ensure_up_rejects_a_name_taken_in_another_namespace() {
    let mut lab = Lab::new("ns");
    let ns_a = lab.netns("a");
    let ns_b = lab.netns("b");
    let ifname = lab.ifname("a");
    let cfg = mesh_cfg(&ifname, &Key::generate(), "10.100.0.1/16", 51820);
    let c = cfg.clone();
    let mesh = in_netns(&ns_a, move || async move { Mesh::ensure_up(c).await }).unwrap();
    let pid = mesh.wireguard_go_pid().unwrap();
    // Same name in another namespace: refused, and A's daemon survives.
    let err = in_netns(&ns_b, move || async move { Mesh::ensure_up(cfg).await }).unwrap_err();
    assert!(
        err.to_string().contains("another") || format!("{err:#}").contains("elsewhere"),
        "{err:#}"
    );
    assert!(wireguard_go::process_alive(pid));
    in_netns(&ns_a, move || async move { mesh.destroy().await }).unwrap();
}
