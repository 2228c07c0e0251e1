//! The firewall against real nftables: Berth's table installed, replaced
//! and removed in a fresh network namespace (tests/common/netns.rs), next to
//! a table of someone else's that must stay untouched.
//!
//! Needs root and `nft` (nftables).

mod common;

use berth_agent::firewall::{apply, remove, FirewallConfig};
use common::netns::{in_netns, run_ok, Lab};

fn cfg() -> FirewallConfig {
    FirewallConfig {
        interface: "berth0".into(),
        listen_port: 51820,
        subnet: "10.200.3.0/24".parse().unwrap(),
        mesh_cidr: "10.100.0.0/16".parse().unwrap(),
        subnet_pool: "10.200.0.0/13".parse().unwrap(),
    }
}

/// Real nftables in a fresh network namespace: rules present, apply is
/// idempotent, another table is untouched, remove deletes only ours.
#[test]
fn nftables_in_namespace() {
    let mut lab = Lab::new("fw");
    let ns = lab.netns("a");

    // Someone else's table, with a chain and a rule.
    run_ok(
        "ip",
        &["netns", "exec", &ns, "nft", "-f", "-"],
        Some("table inet other {\n chain c {\n  type filter hook input priority 0; policy accept;\n  tcp dport 22 accept\n }\n}\n"),
    );
    let list = |table: &str| {
        run_ok(
            "ip",
            &["netns", "exec", &ns, "nft", "list", "table", "inet", table],
            None,
        )
    };
    let other_before = list("other");
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();

    let c = cfg();
    let c2 = c.clone();
    in_netns(&ns, move || async move { apply(&c2).await }).unwrap();
    let first = list("berth");
    for needle in [
        "udp dport 51820 accept",
        "iifname \"berth0\" ip daddr 10.200.3.0/24 accept",
        "oifname \"berth0\" ip saddr 10.200.3.0/24 accept",
        "ct state established,related accept",
        "policy accept",
    ] {
        assert!(first.contains(needle), "missing {needle:?} in:\n{first}");
    }
    let forward = run_ok(
        "ip",
        &["netns", "exec", &ns, "cat", "/proc/sys/net/ipv4/ip_forward"],
        None,
    );
    assert_eq!(forward.trim(), "1");
    // Only the namespace's setting changed, not the host's.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward
    );

    // Idempotent.
    let c2 = c.clone();
    in_netns(&ns, move || async move { apply(&c2).await }).unwrap();
    assert_eq!(list("berth"), first);
    // A changed config replaces the table.
    let mut changed = c.clone();
    changed.listen_port = 51999;
    in_netns(&ns, move || async move { apply(&changed).await }).unwrap();
    let after_change = list("berth");
    assert!(after_change.contains("udp dport 51999 accept"));
    assert!(!after_change.contains("51820"));

    assert_eq!(list("other"), other_before);

    in_netns(&ns, || async { remove().await }).unwrap();
    let tables = run_ok("ip", &["netns", "exec", &ns, "nft", "list", "tables"], None);
    assert!(!tables.contains("inet berth"), "{tables}");
    assert!(tables.contains("inet other"), "{tables}");
    // Removing again is fine.
    in_netns(&ns, || async { remove().await }).unwrap();
    assert_eq!(list("other"), other_before);
}
