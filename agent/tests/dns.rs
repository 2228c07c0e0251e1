//! The agent's DNS server answered over real sockets: `dig` (Debian's bind9-dnsutils)
//! for the protocol-level checks, a raw hickory-proto client for the query loop of
//! the atomic-swap test. Every server listens on 127.0.0.x; the forwarding test
//! starts its own upstream (a second server) and never reaches outside the host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_agent::dns::{upstreams_from_resolv_conf, DnsConfig, DnsServer, Records, ServiceAddr};
use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, RecordType};
use tokio::net::UdpSocket;

/// A parsed `dig` answer.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    /// (name, type, data) of the answer section, in order.
    answers: Vec<(String, String, String)>,
    authority: Vec<(String, String, String)>,
}

impl Dig {
    fn ips(&self) -> Vec<String> {
        self.answers
            .iter()
            .filter(|a| a.1 == "A")
            .map(|a| a.2.clone())
            .collect()
    }
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

fn require_dig() {
    match std::process::Command::new("dig").arg("-v").output() {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("these tests need `dig`: apt-get install bind9-dnsutils")
        }
        Err(e) => panic!("running dig: {e}"),
    }
}

async fn dig(server: SocketAddr, name: &str, qtype: &str, extra: &[&str]) -> Dig {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), name, qtype, "+tries=1", "+time=3"])
        .args(extra)
        .output()
        .await
        .expect("dig (apt-get install bind9-dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "dig {name} {qtype} {extra:?} failed:\n{text}");
    parse_dig(&text)
}

fn parse_dig(text: &str) -> Dig {
    let mut dig = Dig {
        status: String::new(),
        flags: Vec::new(),
        answers: Vec::new(),
        authority: Vec::new(),
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            dig.status = rest.split(',').next().unwrap().to_string();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            dig.flags = rest
                .split(';')
                .next()
                .unwrap()
                .split_whitespace()
                .map(String::from)
                .collect();
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.is_empty() || line.starts_with(';') {
            section = "";
        } else {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() < 5 {
                continue;
            }
            let rr = (words[0].to_string(), words[3].to_string(), words[4..].join(" "));
            match section {
                "answer" => dig.answers.push(rr),
                "authority" => dig.authority.push(rr),
                _ => {}
            }
        }
    }
    assert!(!dig.status.is_empty(), "no status in dig output:\n{text}");
    dig
}

fn addr(ip: [u8; 4], local: bool, healthy: bool) -> ServiceAddr {
    ServiceAddr {
        ip: Ipv4Addr::from(ip),
        local,
        healthy,
    }
}

fn cfg(listen: &str, zone: &str, upstreams: Vec<SocketAddr>) -> DnsConfig {
    DnsConfig {
        listen: vec![listen.parse().unwrap()],
        zone: zone.to_string(),
        upstreams,
    }
}

/// web: 2 local + 3 remote healthy, 1 unhealthy of each kind; one replica name; two nodes.
fn sample() -> Records {
    let mut r = Records::default();
    r.services.insert(
        "web".into(),
        vec![
            addr([10, 1, 0, 11], false, true),
            addr([10, 1, 1, 2], true, true),
            addr([10, 1, 0, 12], false, true),
            addr([10, 1, 1, 9], true, false),
            addr([10, 1, 0, 13], false, true),
            addr([10, 1, 1, 3], true, true),
            addr([10, 1, 0, 19], false, false),
        ],
    );
    r.services.insert("down".into(), vec![addr([10, 1, 1, 4], true, false)]);
    r.replicas
        .insert(("web-1".into(), "web".into()), Ipv4Addr::new(10, 1, 1, 2));
    r.nodes.insert("n1".into(), Ipv4Addr::new(100, 64, 0, 1));
    r.nodes.insert("n2".into(), Ipv4Addr::new(100, 64, 0, 2));
    r
}

fn set(ips: &[&str]) -> BTreeSet<String> {
    ips.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_replica_and_node_names() {
    require_dig();
    let server = DnsServer::start(cfg("127.0.0.1:0", "internal", vec![]), sample())
        .await
        .unwrap();
    let at = server.local_addrs()[0];
    assert_ne!(at.port(), 0);
    let local = set(&["10.1.1.2", "10.1.1.3"]);
    let remote = set(&["10.1.0.11", "10.1.0.12", "10.1.0.13"]);

    // All healthy IPs, unhealthy ones left out, local ones first; both groups rotate.
    let mut local_orders = BTreeSet::new();
    let mut remote_orders = BTreeSet::new();
    for _ in 0..6 {
        let d = dig(at, "web.internal", "A", &[]).await;
        assert_eq!(d.status, "NOERROR");
        assert!(d.has_flag("aa") && d.has_flag("ra"), "{d:?}");
        assert!(d.answers.iter().all(|a| a.0 == "web.internal."), "{d:?}");
        let ips = d.ips();
        assert_eq!(ips.len(), 5, "{d:?}");
        assert_eq!(ips[..2].iter().cloned().collect::<BTreeSet<_>>(), local, "{ips:?}");
        assert_eq!(ips[2..].iter().cloned().collect::<BTreeSet<_>>(), remote, "{ips:?}");
        local_orders.insert(ips[..2].to_vec());
        remote_orders.insert(ips[2..].to_vec());
    }
    assert_eq!(local_orders.len(), 2, "local group not rotated: {local_orders:?}");
    assert_eq!(remote_orders.len(), 3, "remote group not rotated: {remote_orders:?}");

    // TTL is small.
    let out = tokio::process::Command::new("dig")
        .args([
            &format!("@{}", at.ip()),
            "-p",
            &at.port().to_string(),
            "web.internal",
            "+noall",
            "+answer",
        ])
        .output()
        .await
        .unwrap();
    let ttls: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect();
    assert_eq!(ttls, set(&["5"]));

    // Replica and node names.
    let d = dig(at, "web-1.web.internal", "A", &[]).await;
    assert_eq!((d.status.as_str(), d.ips()), ("NOERROR", vec!["10.1.1.2".to_string()]));
    let d = dig(at, "n2.node.internal", "A", &[]).await;
    assert_eq!(
        (d.status.as_str(), d.ips()),
        ("NOERROR", vec!["100.64.0.2".to_string()])
    );

    // Case-insensitive.
    let d = dig(at, "WeB.InTeRnAl", "A", &[]).await;
    assert_eq!(d.ips().into_iter().collect::<BTreeSet<_>>(), &local | &remote);
    let d = dig(at, "N1.NODE.internal.", "A", &[]).await;
    assert_eq!(d.ips(), vec!["100.64.0.1".to_string()]);
    let d = dig(at, "Web-1.WEB.Internal", "A", &[]).await;
    assert_eq!(d.ips(), vec!["10.1.1.2".to_string()]);

    // Unknown names in the zone: NXDOMAIN with the SOA in authority.
    for name in [
        "nope.internal",
        "x.web-1.web.internal",
        "n3.node.internal",
        "a.b.c.internal",
    ] {
        let d = dig(at, name, "A", &[]).await;
        assert_eq!(d.status, "NXDOMAIN", "{name}: {d:?}");
        assert!(d.has_flag("aa"), "{d:?}");
        assert!(d.answers.is_empty());
        assert_eq!(d.authority.len(), 1, "{d:?}");
        assert_eq!(
            (d.authority[0].0.as_str(), d.authority[0].1.as_str()),
            ("internal.", "SOA")
        );
    }

    // AAAA (and other types) for a known name: NOERROR, no answer, SOA in authority.
    for (name, qtype) in [
        ("web.internal", "AAAA"),
        ("n1.node.internal", "AAAA"),
        ("web.internal", "TXT"),
    ] {
        let d = dig(at, name, qtype, &[]).await;
        assert_eq!(d.status, "NOERROR", "{name} {qtype}: {d:?}");
        assert!(d.answers.is_empty(), "{d:?}");
        assert_eq!(d.authority.first().map(|a| a.1.as_str()), Some("SOA"), "{d:?}");
    }
    // A service whose replicas are all unhealthy, and empty non-terminals, exist without addresses.
    for name in ["down.internal", "node.internal", "internal"] {
        let d = dig(at, name, "A", &[]).await;
        assert_eq!((d.status.as_str(), d.answers.len()), ("NOERROR", 0), "{name}: {d:?}");
    }
    let d = dig(at, "internal", "SOA", &[]).await;
    assert_eq!(d.answers.first().map(|a| a.1.as_str()), Some("SOA"), "{d:?}");

    // Without upstreams, names outside the zone are refused (nothing leaves the host).
    let d = dig(at, "example.com", "A", &[]).await;
    assert_eq!(d.status, "REFUSED", "{d:?}");

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_truncation() {
    require_dig();
    let mut records = sample();
    // 60 addresses do not fit in 512 bytes.
    let many: Vec<ServiceAddr> = (0..60).map(|i| addr([10, 9, 0, i + 1], i % 2 == 0, true)).collect();
    records.services.insert("many".into(), many);
    let server = DnsServer::start(cfg("127.0.0.2:0", "internal", vec![]), records)
        .await
        .unwrap();
    let at = server.local_addrs()[0];
    assert_eq!(at.ip(), IpAddr::from([127, 0, 0, 2]));

    let d = dig(at, "WEB.internal", "A", &["+tcp"]).await;
    assert_eq!(d.status, "NOERROR");
    assert_eq!(d.ips().len(), 5, "{d:?}");
    let d = dig(at, "nope.internal", "A", &["+tcp"]).await;
    assert_eq!(d.status, "NXDOMAIN");
    assert_eq!(d.authority.first().map(|a| a.1.as_str()), Some("SOA"));

    // Several queries on one TCP connection.
    let out = tokio::process::Command::new("dig")
        .args([
            &format!("@{}", at.ip()),
            "-p",
            &at.port().to_string(),
            "+tcp",
            "+keepopen",
            "+short",
        ])
        .args(["web-1.web.internal", "n1.node.internal", "n2.node.internal"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["10.1.1.2", "100.64.0.1", "100.64.0.2"],
        "{text}"
    );

    // Plain UDP without EDNS: truncated; over TCP: everything, local ones first.
    let d = dig(at, "many.internal", "A", &["+noedns", "+ignore"]).await;
    assert!(d.has_flag("tc"), "{d:?}");
    assert!(d.ips().len() < 60);
    let d = dig(at, "many.internal", "A", &["+tcp"]).await;
    let ips = d.ips();
    assert_eq!(ips.len(), 60, "{d:?}");
    assert!(ips[..30]
        .iter()
        .all(|ip| ip.rsplit('.').next().unwrap().parse::<u8>().unwrap() % 2 == 1));
    // With EDNS (dig advertises 1232 bytes) it fits over UDP.
    let d = dig(at, "many.internal", "A", &["+ignore"]).await;
    assert!(!d.has_flag("tc"), "{d:?}");
    assert_eq!(d.ips().len(), 60);

    server.shutdown().await;
}

/// One A query over UDP with a raw client; (rcode, addresses in answer order).
async fn query_a(sock: &UdpSocket, server: SocketAddr, name: &Name, id: u16) -> (ResponseCode, Vec<Ipv4Addr>) {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name.clone(), RecordType::A));
    sock.send_to(&msg.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
            .await
            .expect("no DNS answer within 3 s")
            .unwrap();
        let resp = Message::from_vec(&buf[..n]).unwrap();
        if resp.metadata.id != id {
            continue;
        }
        let ips = resp
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        return (resp.metadata.response_code, ips);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_records_is_atomic() {
    let mut a = Records::default();
    a.services.insert(
        "web".into(),
        vec![addr([10, 1, 0, 1], true, true), addr([10, 1, 0, 2], false, true)],
    );
    a.replicas
        .insert(("r1".into(), "web".into()), Ipv4Addr::new(10, 1, 0, 1));
    let mut b = Records::default();
    b.services.insert(
        "web".into(),
        vec![
            addr([10, 2, 0, 1], true, true),
            addr([10, 2, 0, 2], false, true),
            addr([10, 2, 0, 3], false, true),
            addr([10, 1, 0, 2], true, false),
        ],
    );
    b.services.insert("api".into(), vec![addr([10, 2, 9, 9], true, true)]);
    let set_a: BTreeSet<Ipv4Addr> = [[10, 1, 0, 1], [10, 1, 0, 2]].map(Ipv4Addr::from).into();
    let set_b: BTreeSet<Ipv4Addr> = [[10, 2, 0, 1], [10, 2, 0, 2], [10, 2, 0, 3]].map(Ipv4Addr::from).into();

    let server = Arc::new(
        DnsServer::start(cfg("127.0.0.3:0", "internal", vec![]), a.clone())
            .await
            .unwrap(),
    );
    let at = server.local_addrs()[0];
    let stop = Arc::new(AtomicBool::new(false));
    let (seen_a, seen_b, seen_api_nx, seen_api) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );

    let mut loops = Vec::new();
    for worker in 0..2u16 {
        let (stop, seen_a, seen_b, set_a, set_b) = (
            stop.clone(),
            seen_a.clone(),
            seen_b.clone(),
            set_a.clone(),
            set_b.clone(),
        );
        let (seen_api_nx, seen_api) = (seen_api_nx.clone(), seen_api.clone());
        loops.push(tokio::spawn(async move {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let web = Name::from_ascii("web.internal.").unwrap();
            let api = Name::from_ascii("api.internal.").unwrap();
            let mut id = worker << 15;
            while !stop.load(Ordering::Relaxed) {
                id = id.wrapping_add(1);
                let (rcode, ips) = query_a(&sock, at, &web, id).await;
                assert_eq!(rcode, ResponseCode::NoError);
                let got: BTreeSet<Ipv4Addr> = ips.iter().copied().collect();
                assert_eq!(got.len(), ips.len(), "duplicate addresses: {ips:?}");
                if got == set_a {
                    assert_eq!(ips[0], Ipv4Addr::new(10, 1, 0, 1), "local first: {ips:?}");
                    seen_a.fetch_add(1, Ordering::Relaxed);
                } else if got == set_b {
                    assert_eq!(ips[0], Ipv4Addr::new(10, 2, 0, 1), "local first: {ips:?}");
                    seen_b.fetch_add(1, Ordering::Relaxed);
                } else {
                    panic!("mixed answer: {ips:?}");
                }
                id = id.wrapping_add(1);
                let (rcode, ips) = query_a(&sock, at, &api, id).await;
                match rcode {
                    ResponseCode::NXDomain => {
                        assert!(ips.is_empty());
                        seen_api_nx.fetch_add(1, Ordering::Relaxed);
                    }
                    ResponseCode::NoError => {
                        assert_eq!(ips, [Ipv4Addr::new(10, 2, 9, 9)]);
                        seen_api.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("api.internal: {other:?}"),
                }
            }
        }));
    }

    for i in 0..1000 {
        server.set_records(if i % 2 == 0 { b.clone() } else { a.clone() });
        tokio::time::sleep(Duration::from_micros(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("query loop failed (see the panic above)");
    }
    let (na, nb) = (seen_a.load(Ordering::Relaxed), seen_b.load(Ordering::Relaxed));
    let (nx, napi) = (seen_api_nx.load(Ordering::Relaxed), seen_api.load(Ordering::Relaxed));
    eprintln!("answers: set A {na}, set B {nb}; api NXDOMAIN {nx}, api found {napi}");
    assert!(na > 10 && nb > 10, "the loop did not see both sets: A {na}, B {nb}");
    assert!(nx > 0 && napi > 0);

    // The last call (i = 999) installed A.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_, ips) = query_a(&sock, at, &Name::from_ascii("web.internal.").unwrap(), 1).await;
    assert_eq!(ips.into_iter().collect::<BTreeSet<_>>(), set_a);

    Arc::into_inner(server).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_outside_names_to_resolv_conf_upstreams() {
    require_dig();
    // The upstream: a second server, authoritative for `test`, on port 53 of an address
    // of its own (resolv.conf has no port).
    let pid = std::process::id();
    let upstream_ip = Ipv4Addr::new(127, 53, (pid >> 8) as u8, (pid as u8).max(1));
    let mut up_records = Records::default();
    up_records
        .services
        .insert("example".into(), vec![addr([192, 0, 2, 10], true, true)]);
    let upstream = DnsServer::start(
        DnsConfig {
            listen: vec![SocketAddr::new(upstream_ip.into(), 53)],
            zone: "test".into(),
            upstreams: vec![],
        },
        up_records,
    )
    .await
    .expect("starting the upstream on port 53 (needs root)");

    // The server's upstreams come from a resolv.conf written here; its own listen
    // address, listed first, is skipped.
    let listen_ip = Ipv4Addr::new(127, 0, 0, 4);
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("# test\nsearch example.org\nnameserver {listen_ip}\nnameserver {upstream_ip}\noptions ndots:2\n"),
    )
    .unwrap();
    let upstreams = upstreams_from_resolv_conf(&resolv, &[listen_ip.into()]).unwrap();
    assert_eq!(upstreams, vec![SocketAddr::new(upstream_ip.into(), 53)]);

    let mut records = Records::default();
    records
        .services
        .insert("web".into(), vec![addr([10, 1, 1, 2], true, true)]);
    let server = DnsServer::start(
        DnsConfig {
            listen: vec![SocketAddr::new(listen_ip.into(), 0)],
            zone: "internal".into(),
            upstreams,
        },
        records,
    )
    .await
    .unwrap();
    let at = server.local_addrs()[0];

    // Directly from the upstream: authoritative.
    let d = dig(SocketAddr::new(upstream_ip.into(), 53), "example.test", "A", &[]).await;
    assert_eq!(d.ips(), ["192.0.2.10"]);

    // Through the server: forwarded, recursion available, not authoritative.
    for extra in [&[][..], &["+tcp"][..]] {
        let d = dig(at, "example.test", "A", extra).await;
        assert_eq!(d.status, "NOERROR", "{d:?}");
        assert_eq!(d.ips(), ["192.0.2.10"], "{d:?}");
        assert!(d.has_flag("ra") && !d.has_flag("aa"), "{d:?}");
        let d = dig(at, "EXAMPLE.Test", "A", extra).await;
        assert_eq!(d.ips(), ["192.0.2.10"], "{d:?}");
        let d = dig(at, "nope.test", "A", extra).await;
        assert_eq!(d.status, "NXDOMAIN", "{d:?}");
    }
    // The cluster zone is still answered locally.
    let d = dig(at, "web.internal", "A", &[]).await;
    assert_eq!(d.ips(), ["10.1.1.2"]);
    assert!(d.has_flag("aa"));

    server.shutdown().await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_listen_addresses_and_restart_on_same_port() {
    require_dig();
    let config = DnsConfig {
        listen: vec!["127.0.0.5:0".parse().unwrap(), "127.0.0.6:0".parse().unwrap()],
        zone: "cluster.test".into(),
        upstreams: vec![],
    };
    let records = Records {
        nodes: BTreeMap::from([("n1".to_string(), Ipv4Addr::new(100, 64, 0, 1))]),
        ..Records::default()
    };
    let server = DnsServer::start(config, records.clone()).await.unwrap();
    let addrs = server.local_addrs();
    assert_eq!(addrs.len(), 2);
    for at in &addrs {
        let d = dig(*at, "n1.node.cluster.test", "A", &[]).await;
        assert_eq!(d.ips(), ["100.64.0.1"]);
        let d = dig(*at, "n1.node.cluster.test", "A", &["+tcp"]).await;
        assert_eq!(d.ips(), ["100.64.0.1"]);
    }
    server.shutdown().await;

    // After shutdown the ports are free again.
    let again = DnsServer::start(
        DnsConfig {
            listen: addrs.clone(),
            zone: "cluster.test".into(),
            upstreams: vec![],
        },
        records,
    )
    .await
    .expect("ports released by shutdown");
    assert_eq!(again.local_addrs(), addrs);
    let d = dig(addrs[1], "n1.node.cluster.test", "A", &[]).await;
    assert_eq!(d.ips(), ["100.64.0.1"]);
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_a_gateway_address_before_it_exists() {
    // A container gateway address is only configured once Podman brings its bridge up;
    // the server binds it anyway (IP_FREEBIND). 198.18.0.0/15 is the lab's test range.
    let server = DnsServer::start(cfg("198.18.255.253:0", "internal", vec![]), sample())
        .await
        .expect("binding an address this host does not have yet");
    assert_eq!(server.local_addrs()[0].ip(), IpAddr::from([198, 18, 255, 253]));
    server.shutdown().await;
}
