//! End-to-end: control plane, agents and a real wireguard-go mesh in lab
//! namespaces. Each test builds its own lab (distinct id) and removes it.

use berth_tests::*;
use std::process::Command;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(60);

async fn assert_full_mesh(lab: &LabGuard) {
    let names: Vec<String> = lab.state.nodes.iter().map(|n| n.name.clone()).collect();
    let mut ips = vec![];
    for n in &names {
        ips.push(mesh_ip(lab, n).await);
    }
    for from in &names {
        for ip in &ips {
            ping_within(lab, from, ip, Duration::from_secs(10)).unwrap();
        }
        // Every node has every other node as a WireGuard peer, and nothing else.
        let mut peers = wg_peers(lab, from).unwrap();
        peers.sort();
        let mut want: Vec<String> = names
            .iter()
            .filter(|n| *n != from)
            .map(|n| wg_public_key(lab, n).unwrap())
            .collect();
        want.sort();
        assert_eq!(peers, want, "peers of {from}");
    }
}

fn assert_lossless(r: PingResult, what: &str) {
    assert!(r.sent >= 20, "{what}: too few pings sent ({r:?})");
    assert_eq!(r.received, r.sent, "{what}: lost pings ({r:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mesh_grows_and_shrinks_without_disturbing_others() {
    let mut lab = lab_up(201, 3).await;
    assert_full_mesh(&lab).await;

    // A fourth node joins while n1 pings n2: nothing is lost.
    let n2_ip = mesh_ip(&lab, "n2").await;
    let ping = ContinuousPing::start(&lab, "n1", &n2_ip);
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.add_node(false).await.unwrap();
    lab.wait_converged(CONVERGE).await.unwrap();
    assert_full_mesh(&lab).await;
    assert_lossless(ping.finish(), "n1 -> n2 while n4 joined");

    // n4 is removed: it disappears from every peer list, the others keep talking.
    let n4_key = wg_public_key(&lab, "n4").unwrap();
    let ping = ContinuousPing::start(&lab, "n1", &n2_ip);
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.remove_node("n4").await.unwrap();
    lab.wait_converged(CONVERGE).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_lossless(ping.finish(), "n1 -> n2 while n4 was removed");
    for n in ["n1", "n2", "n3"] {
        assert!(
            !wg_peers(&lab, n).unwrap().contains(&n4_key),
            "{n} still has n4 as a peer"
        );
    }
    let names: Vec<String> = lab
        .admin()
        .unwrap()
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    assert_full_mesh(&lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_and_restart_loses_no_packets() {
    let mut lab = lab_up(202, 3).await;
    let n2_ip = mesh_ip(&lab, "n2").await;
    ping_within(&lab, "n1", &n2_ip, Duration::from_secs(10)).unwrap();
    let wg_before = wireguard_go_pids(&lab, "n2").unwrap();
    assert_eq!(wg_before.len(), 1, "one wireguard-go in n2");
    let peers_before = wg_peers(&lab, "n2").unwrap();

    let ping = ContinuousPing::start(&lab, "n1", &n2_ip);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idx = lab.node("n2").unwrap().index;
    lab.kill_agent(idx).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.start_agent(idx, None).unwrap();
    lab.wait_converged(CONVERGE).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_lossless(ping.finish(), "n1 -> n2 across an agent SIGKILL");

    // The tunnel process outlived the agent and was adopted, not replaced.
    assert_eq!(wireguard_go_pids(&lab, "n2").unwrap(), wg_before);
    assert_eq!(wg_peers(&lab, "n2").unwrap(), peers_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_survives_a_control_plane_outage_and_resyncs() {
    let mut lab = lab_up(203, 3).await;
    let n3_ip = mesh_ip(&lab, "n3").await;
    let n2_ip = mesh_ip(&lab, "n2").await;
    let ping = ContinuousPing::start(&lab, "n1", &n3_ip);
    tokio::time::sleep(Duration::from_secs(1)).await;

    lab.stop_cp().unwrap();
    // An agent restarted while the control plane is down comes up from its cache.
    let idx = lab.node("n2").unwrap().index;
    lab.kill_agent(idx).unwrap();
    lab.start_agent(idx, None).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    ping_within(&lab, "n1", &n2_ip, Duration::from_secs(5)).unwrap();
    let log = std::fs::read_to_string(lab.state.dir.join("n2.log")).unwrap();
    assert!(
        log.contains("applied the cached desired state"),
        "n2 did not start from its cache:\n{log}"
    );

    lab.start_cp().await.unwrap();
    lab.wait_converged(CONVERGE).await.unwrap();
    assert_lossless(ping.finish(), "n1 -> n3 across a control plane outage");

    // A fresh node joins after the restart and meets everyone.
    lab.add_node(false).await.unwrap();
    lab.wait_converged(CONVERGE).await.unwrap();
    assert_full_mesh(&lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_clear_errors() {
    let lab = lab_up(204, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = default_bin_dir().join("berth-agent");
    let run_agent = |token: &str| {
        Command::new(&agent)
            .args([
                "--url",
                &lab.url(),
                "--token",
                token,
                "--name",
                "intruder",
                "--interface",
                "blt204x",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--log-format", "text"])
            .output()
            .unwrap()
    };
    let used = lab.admin().unwrap().list_tokens().await.unwrap();
    assert_eq!(used.len(), 1);
    let cases = [
        ("berth1.nope".to_string(), "token: malformed"),
        (
            format!("berth1.aaaaaaaa.{}.{}", "b".repeat(32), "c".repeat(64)),
            "not the one the token names",
        ),
    ];
    for (token, want) in cases {
        let out = run_agent(&token);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "agent accepted {token}");
        assert!(err.contains(want), "for {token}: {err}");
    }
    // A real token of this control plane, revoked: refused by the control plane.
    let admin = lab.admin().unwrap();
    let t = admin.create_token(false, 600).await.unwrap();
    admin.revoke_token(&t.id).await.unwrap();
    let out = run_agent(&t.token);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("token: revoked"), "{err}");
    assert_eq!(admin.list_nodes().await.unwrap().len(), 1, "nothing registered");

    // The CLI prints API errors readably and exits non-zero.
    let target = lab.client_config();
    let out = Command::new(default_bin_dir().join("berth"))
        .args(["token", "revoke", "nosuchid"])
        .env("BERTH_URL", &target.url)
        .env("BERTH_ADMIN_TOKEN_FILE", &target.admin_token_file)
        .env("BERTH_CA_FILE", &target.ca_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("id: no token \"nosuchid\"") && err.contains("404"),
        "{err}"
    );
}
