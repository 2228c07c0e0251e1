//! The container reconciler (`berth_agent::containers::Runtime`) against a
//! real Podman: each test gets its own `podman system service`, storage,
//! network config dir, socket and /24 of 10.231.0.0/16 (tests/common), lets a
//! `Runtime` run replicas of the busybox test image there, and checks Podman's
//! state (API and CLI) and real HTTP from the host to the replicas' IPs.
//!
//! Needs root and Podman set up by scripts/podman-setup.sh.

mod common;

use berth_agent::containers::autoheal::Policy;
use berth_agent::containers::{Runtime, RuntimeConfig};
use berth_agent::podman::{ContainerDetails, ContainerSummary, HealthStatus, RestartPolicy};
use berth_protocol::service::{ContainerDesired, ContainerStatus};
use common::podman::{http_get, http_get_eventually, Env, IMAGE};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

const OWNER: (&str, &str) = ("io.berth.owner", "berth");

/// [`config`] with another autoheal policy.
fn config_with(env: &Env, autoheal: Policy) -> RuntimeConfig {
    RuntimeConfig {
        autoheal,
        ..config(env)
    }
}

/// Autoheal off: tests of health alone.
fn no_autoheal() -> Policy {
    Policy {
        after: Duration::ZERO,
        ..Policy::default()
    }
}

/// The agent's config for the env's Podman: the env's network name (removed
/// by the env at the end) and bridge.
fn config(env: &Env) -> RuntimeConfig {
    RuntimeConfig {
        socket: env.socket(),
        network: env.tag.clone(),
        bridge: env.bridge(),
        zone: "internal".into(),
        volumes_dir: env.dir.path().join("volumes"),
        autoheal: Policy::default(),
    }
}

fn node_key() -> StaticSecret {
    StaticSecret::from(rand::random::<[u8; 32]>())
}

/// Replica `web-<n>` of the test image at `ip`.
fn replica_at(n: u8, ip: Ipv4Addr) -> ContainerDesired {
    ContainerDesired {
        replica: format!("web-{n}"),
        service: "web".into(),
        image: IMAGE.into(),
        ip,
        port: Some(8080),
        env: BTreeMap::from([("GREETING".to_string(), format!("hello-from-web-{n}"))]),
        sealed_secrets: None,
        command: None,
        cpu: None,
        memory: None,
        health_cmd: None,
        health_http: None,
        volumes: vec![],
        stop_signal: None,
        stop_timeout: None,
    }
}

/// Replica `web-<n>` at host `n + 1` of the env's subnet (the gateway is .1).
fn replica(env: &Env, n: u8) -> ContainerDesired {
    replica_at(n, env.ip(n + 1))
}

fn seal_secrets(key: &StaticSecret, secrets: &[(&str, &str)]) -> String {
    let map: BTreeMap<&str, &str> = secrets.iter().copied().collect();
    berth_protocol::seal::seal(&PublicKey::from(key), &serde_json::to_vec(&map).unwrap())
}

fn status(rt: &Runtime, replica: &str) -> ContainerStatus {
    rt.statuses()
        .into_iter()
        .find(|s| s.replica == replica)
        .unwrap_or_else(|| panic!("no status for {replica}: {:#?}", rt.statuses()))
}

fn healthy(rt: &Runtime, replica: &str) -> bool {
    rt.local_health().get(replica).copied().unwrap_or(false)
}

/// Every Berth-owned container of the env's Podman.
async fn owned(env: &Env) -> Vec<ContainerSummary> {
    env.podman.list(&[OWNER]).await.unwrap()
}

/// The single Berth-owned container of `replica`.
async fn container_of(env: &Env, replica: &str) -> ContainerDetails {
    let list = env.podman.list(&[OWNER, ("io.berth.replica", replica)]).await.unwrap();
    assert_eq!(list.len(), 1, "containers of {replica}: {list:#?}");
    env.podman.inspect(&list[0].id).await.unwrap()
}

/// `podman container inspect` as the CLI prints it (every field).
fn inspect_json(env: &Env, id: &str) -> Value {
    let out = env.podman_ok(&["container", "inspect", id]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

/// Calls `tick` until `done` holds; fails naming `what` after `secs`.
async fn tick_until(rt: &mut Runtime, secs: u64, what: &str, mut done: impl FnMut(&Runtime) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        rt.tick().await;
        if done(rt) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still not so after {secs} s; statuses: {:#?}, health: {:?}",
            rt.statuses(),
            rt.local_health()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Container ID and StartedAt of every owned container, by replica.
async fn snapshot(env: &Env) -> BTreeMap<String, (String, Option<String>)> {
    let mut out = BTreeMap::new();
    for s in owned(env).await {
        let d = env.podman.inspect(&s.id).await.unwrap();
        let replica = d.labels.get("io.berth.replica").cloned().unwrap_or_default();
        assert!(
            out.insert(replica.clone(), (d.id.clone(), d.started_at.clone()))
                .is_none(),
            "two containers for {replica}"
        );
    }
    out
}

/// MAC addresses the host's ARP cache holds for `ip` on the env's bridge.
fn host_neighbours(env: &Env, ip: Ipv4Addr) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-j", "neigh", "show", "to", &ip.to_string(), "dev", &env.bridge()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip neigh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["lladdr"].as_str().map(str::to_ascii_lowercase))
        .collect()
}

/// The runtime pinned the env's bridge to the gateway's MAC address. A Linux
/// bridge otherwise takes the lowest MAC address of its ports, so a container
/// coming or going would change the gateway's address under every other
/// container (and flush the host's ARP cache on the bridge, which would hide
/// a stale entry left behind by a replaced container).
fn assert_bridge_mac_pinned(env: &Env) {
    let out = std::process::Command::new("ip")
        .args(["-j", "link", "show", "dev", &env.bridge()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip link: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v[0]["address"].as_str().map(str::to_ascii_lowercase),
        Some(berth_agent::containers::create_spec::mac_for(env.ip(1))),
        "the bridge's MAC address is not pinned"
    );
}

/// The host sends to `container`'s IP nowhere but its current MAC address
/// (or has yet to ask for it).
fn assert_no_stale_neighbour(env: &Env, ip: Ipv4Addr, container: &ContainerDetails) {
    let mac = container.networks[&env.tag].mac.to_ascii_lowercase();
    let held = host_neighbours(env, ip);
    assert!(
        held.iter().all(|m| *m == mac),
        "the host still sends {ip}'s traffic to {held:?}, the container's MAC is {mac}"
    );
}

/// ID, state, StartedAt and restart count of each container in `ids`.
async fn foreign(env: &Env, ids: &[String]) -> Vec<(String, String, Option<String>, u32)> {
    let mut out = vec![];
    for id in ids {
        let d = env.podman.inspect(id).await.unwrap();
        out.push((d.id, d.state.to_string(), d.started_at, d.restart_count));
    }
    out
}

/// Asserts that every wanted replica runs in the container Podman reports,
/// with no error, as `statuses()` says.
fn assert_all_running(rt: &Runtime, wanted: &[ContainerDesired], podman: &BTreeMap<String, (String, Option<String>)>) {
    let statuses = rt.statuses();
    assert_eq!(statuses.len(), wanted.len(), "{statuses:#?}");
    for c in wanted {
        let s = status(rt, &c.replica);
        assert_eq!(s.state, "running", "{s:?}");
        assert_eq!(s.error, None, "{s:?}");
        assert_eq!(
            s.container_id.as_deref(),
            podman.get(&c.replica).map(|p| p.0.as_str()),
            "{s:?}"
        );
    }
}

#[tokio::test]
async fn apply_runs_replicas_with_ips_labels_env_and_secrets_and_is_idempotent() {
    let env = Env::start().await;
    let key = node_key();
    let secret = format!("s3cret-{}-{}", std::process::id(), env.subnet.octet);
    let mut wanted = vec![replica(&env, 1), replica(&env, 2)];
    for c in &mut wanted {
        c.sealed_secrets = Some(seal_secrets(&key, &[("API_TOKEN", &secret)]));
    }
    let mut rt = Runtime::new(config(&env), key.clone());
    rt.apply(env.subnet_net(), &wanted).await.unwrap();

    let first = snapshot(&env).await;
    assert_eq!(first.len(), 2, "{first:?}");
    for c in &wanted {
        let d = container_of(&env, &c.replica).await;
        assert!(d.is_running(), "{d:?}");
        assert_eq!(d.name, format!("berth-{}", c.replica));
        assert_eq!(d.image, IMAGE);
        assert_eq!(d.ip_on(&env.tag), Some(c.ip), "{:?}", d.networks);
        assert_eq!(d.networks.len(), 1, "{:?}", d.networks);
        assert_eq!(d.networks[&env.tag].gateway, Some(env.ip(1)));
        assert_eq!(d.restart_policy, Some(RestartPolicy::Always));
        assert_eq!(d.labels.get("io.berth.owner").map(String::as_str), Some("berth"));
        assert_eq!(d.labels.get("io.berth.replica"), Some(&c.replica));
        assert_eq!(d.labels.get("io.berth.service").map(String::as_str), Some("web"));
        assert!(
            d.labels.get("io.berth.spec").is_some_and(|h| !h.is_empty()),
            "{:?}",
            d.labels
        );
        assert!(!d.labels.values().any(|v| v.contains(&secret)), "{:?}", d.labels);

        // The secret is in the container's environment and nowhere else in
        // what Podman shows: not in Cmd, Args, labels or any other field.
        let raw = inspect_json(&env, &d.id);
        let in_env = raw["Config"]["Env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v.as_str() == Some(&format!("API_TOKEN={secret}"))));
        assert!(in_env, "{}", raw["Config"]["Env"]);
        for field in [
            &raw["Config"]["Cmd"],
            &raw["Args"],
            &raw["Path"],
            &raw["Config"]["Labels"],
        ] {
            assert!(!field.to_string().contains(&secret), "{field}");
        }
        let mut without_env = raw.clone();
        without_env["Config"]["Env"] = Value::Null;
        assert!(
            !without_env.to_string().contains(&secret),
            "the secret shows outside Config.Env"
        );

        // Real traffic from the host to the static IP.
        let body = http_get_eventually(c.ip, "/cgi-bin/env").await;
        assert!(body.contains(&format!("API_TOKEN={secret}")), "{body}");
        assert!(body.contains(&format!("GREETING=hello-from-{}", c.replica)), "{body}");
        assert!(body.contains(&format!("HOSTNAME={}", c.replica)), "{body}");
    }
    assert_all_running(&rt, &wanted, &first);
    assert!(rt.statuses().iter().all(|s| s.restarts == 0), "{:#?}", rt.statuses());
    // No process on the host carries the secret on its command line.
    let ps = std::process::Command::new("ps").arg("auxww").output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains(&secret),
        "the secret shows in ps"
    );

    // Without a health check a running replica is healthy.
    tick_until(&mut rt, 15, "both replicas healthy", |rt| {
        healthy(rt, "web-1") && healthy(rt, "web-2")
    })
    .await;
    assert!(!rt.tick().await, "nothing changed, yet tick says so");

    // The same input again (freshly sealed, as the control plane would send
    // it): nothing is recreated or restarted.
    for c in &mut wanted {
        c.sealed_secrets = Some(seal_secrets(&key, &[("API_TOKEN", &secret)]));
    }
    rt.apply(env.subnet_net(), &wanted).await.unwrap();
    for _ in 0..3 {
        rt.tick().await;
    }
    assert_eq!(snapshot(&env).await, first, "apply again changed containers");
    assert_all_running(&rt, &wanted, &first);
    for c in &wanted {
        let d = container_of(&env, &c.replica).await;
        assert_eq!(d.restart_count, 0, "{d:?}");
        assert!(healthy(&rt, &c.replica));
        http_get(c.ip, 8080, "/").await.unwrap();
    }
}

#[tokio::test]
async fn a_new_runtime_adopts_running_containers() {
    let env = Env::start().await;
    let key = node_key();
    let mut wanted = vec![replica(&env, 1), replica(&env, 2)];
    for c in &mut wanted {
        c.sealed_secrets = Some(seal_secrets(&key, &[("API_TOKEN", "adopt-me")]));
    }
    let mut rt = Runtime::new(config(&env), key.clone());
    rt.apply(env.subnet_net(), &wanted).await.unwrap();
    let before = snapshot(&env).await;
    assert_eq!(before.len(), 2);
    drop(rt);

    // An agent restart: a new Runtime, the same config and key, the same
    // replicas (sealed anew).
    for c in &mut wanted {
        c.sealed_secrets = Some(seal_secrets(&key, &[("API_TOKEN", "adopt-me")]));
    }
    let mut rt = Runtime::new(config(&env), key.clone());
    rt.apply(env.subnet_net(), &wanted).await.unwrap();
    assert_eq!(
        snapshot(&env).await,
        before,
        "adoption recreated or restarted a container"
    );
    assert_all_running(&rt, &wanted, &before);
    tick_until(&mut rt, 15, "adopted replicas healthy", |rt| {
        healthy(rt, "web-1") && healthy(rt, "web-2")
    })
    .await;
    assert_eq!(snapshot(&env).await, before, "tick recreated or restarted a container");
    assert!(rt.statuses().iter().all(|s| s.restarts == 0), "{:#?}", rt.statuses());
    for c in &wanted {
        let body = http_get_eventually(c.ip, "/cgi-bin/env").await;
        assert!(body.contains("API_TOKEN=adopt-me"), "{body}");
    }
}

#[tokio::test]
async fn a_spec_change_replaces_only_that_replica() {
    let env = Env::start().await;
    let key = node_key();
    let mut wanted = vec![replica(&env, 1), replica(&env, 2)];
    let mut rt = Runtime::new(config(&env), key);
    rt.apply(env.subnet_net(), &wanted).await.unwrap();
    assert_bridge_mac_pinned(&env);
    let before = snapshot(&env).await;
    let body = http_get_eventually(wanted[1].ip, "/cgi-bin/env").await;
    assert!(body.contains("GREETING=hello-from-web-2"), "{body}");
    // The host now holds web-2's MAC address, derived from its IP, which its
    // new container keeps.
    let old_mac = container_of(&env, "web-2").await.networks[&env.tag].mac.clone();
    assert_eq!(
        old_mac.to_ascii_lowercase(),
        berth_agent::containers::create_spec::mac_for(wanted[1].ip)
    );
    assert_eq!(host_neighbours(&env, wanted[1].ip), vec![old_mac.clone()]);

    wanted[1].env.insert("GREETING".into(), "changed".into());
    rt.apply(env.subnet_net(), &wanted).await.unwrap();
    let after = snapshot(&env).await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after["web-1"], before["web-1"], "web-1 was touched");
    assert_ne!(after["web-2"].0, before["web-2"].0, "web-2 was not replaced");
    let err = env.podman.inspect(&before["web-2"].0).await.unwrap_err();
    assert!(err.is_not_found(), "the old container is still there: {err:?}");
    let d = container_of(&env, "web-2").await;
    assert_eq!(d.ip_on(&env.tag), Some(wanted[1].ip));
    assert_eq!(d.networks[&env.tag].mac, old_mac, "the MAC follows the IP");
    assert_no_stale_neighbour(&env, wanted[1].ip, &d);
    assert_all_running(&rt, &wanted, &after);

    let body = http_get_eventually(wanted[1].ip, "/cgi-bin/env").await;
    assert!(body.contains("GREETING=changed"), "{body}");
    let body = http_get_eventually(wanted[0].ip, "/cgi-bin/env").await;
    assert!(body.contains("GREETING=hello-from-web-1"), "{body}");
}

#[tokio::test]
async fn foreign_containers_are_never_touched_and_scale_to_zero_removes_only_owned() {
    let env = Env::start().await;
    let wanted = vec![replica(&env, 1), replica(&env, 2)];
    let mut rt = Runtime::new(config(&env), node_key());
    rt.apply(env.subnet_net(), &wanted).await.unwrap();
    assert_eq!(owned(&env).await.len(), 2);

    // Someone else's container on the agent's network...
    let mut spec = env.container("foreign-net");
    spec.static_ip = Some(env.ip(50));
    let on_net = env.podman.create(&spec).await.unwrap();
    env.podman.start(&on_net).await.unwrap();
    // ...and one on no network, claiming a replica's name in a label (but
    // not the owner label), stopped: it must stay stopped.
    let no_net = env
        .podman_ok(&[
            "run",
            "-d",
            "--name",
            "foreign-none",
            "--network",
            "none",
            "--label",
            "io.berth.replica=web-1",
            "--label",
            "io.berth.service=web",
            IMAGE,
        ])
        .trim()
        .to_string();
    let stopped = env
        .podman_ok(&["create", "--name", "foreign-stopped", "--network", "none", IMAGE])
        .trim()
        .to_string();
    let foreign_ids = [on_net, no_net, stopped];
    let before = foreign(&env, &foreign_ids).await;
    assert_eq!(before[0].1, "running");
    assert_eq!(before[1].1, "running");
    assert_ne!(before[2].1, "running");
    http_get_eventually(env.ip(50), "/").await;

    // apply (same list), then ticks.
    rt.apply(env.subnet_net(), &wanted).await.unwrap();
    for _ in 0..5 {
        rt.tick().await;
    }
    assert_eq!(
        foreign(&env, &foreign_ids).await,
        before,
        "apply or tick touched a foreign container"
    );
    assert_eq!(owned(&env).await.len(), 2);

    // Scale to zero: the owned containers go (in the background: busybox
    // httpd as PID 1 ignores SIGTERM, so each stop runs into its timeout).
    let owned_ids: Vec<String> = owned(&env).await.into_iter().map(|s| s.id).collect();
    rt.apply(env.subnet_net(), &[]).await.unwrap();
    assert!(rt.statuses().is_empty(), "{:#?}", rt.statuses());
    assert!(rt.local_health().is_empty());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        rt.tick().await;
        let left = owned(&env).await;
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still there after 30 s: {left:#?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for id in &owned_ids {
        assert!(env.podman.inspect(id).await.unwrap_err().is_not_found());
    }
    for _ in 0..3 {
        rt.tick().await;
    }
    assert_eq!(
        foreign(&env, &foreign_ids).await,
        before,
        "scale to zero touched a foreign container"
    );
    http_get(env.ip(50), 8080, "/").await.unwrap();
    // The other containers of the env are the foreign ones only.
    let all: Vec<String> = env.podman.list(&[]).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(all.len(), 3, "{all:?}");
}

#[tokio::test]
async fn tick_repairs_a_stopped_a_removed_and_a_killed_replica() {
    let env = Env::start().await;
    let wanted = vec![replica(&env, 1), replica(&env, 2)];
    let (ip1, ip2) = (wanted[0].ip, wanted[1].ip);
    let mut rt = Runtime::new(config(&env), node_key());
    rt.apply(env.subnet_net(), &wanted).await.unwrap();
    assert_bridge_mac_pinned(&env);
    let before = snapshot(&env).await;
    tick_until(&mut rt, 15, "both replicas healthy", |rt| {
        healthy(rt, "web-1") && healthy(rt, "web-2")
    })
    .await;
    // The host talks to both, so it holds their MAC addresses: a container
    // made or started anew gets another one, and the host must not keep
    // sending to the old.
    for (replica, ip) in [("web-1", ip1), ("web-2", ip2)] {
        http_get_eventually(ip, "/").await;
        let mac = container_of(&env, replica).await.networks[&env.tag].mac.clone();
        assert_eq!(host_neighbours(&env, ip), vec![mac], "the host's ARP entry for {ip}");
    }

    // Stopped through the API: the restart policy leaves it stopped, tick
    // starts it again.
    let (id1, started1) = before["web-1"].clone();
    env.podman.stop(&id1, 1).await.unwrap();
    assert!(!env.podman.inspect(&id1).await.unwrap().is_running());
    tick_until(&mut rt, 20, "web-1 running again", |rt| {
        status(rt, "web-1").state == "running"
    })
    .await;
    let d = env.podman.inspect(&id1).await.unwrap();
    assert!(d.is_running(), "{d:?}");
    assert_ne!(d.started_at, started1, "not started anew");
    assert_eq!(d.ip_on(&env.tag), Some(ip1));
    let s = status(&rt, "web-1");
    assert_eq!(s.container_id.as_deref(), Some(id1.as_str()), "{s:?}");
    assert!(s.restarts >= 1, "{s:?}");
    assert_eq!(s.error, None);
    assert_no_stale_neighbour(&env, ip1, &d);
    http_get_eventually(ip1, "/cgi-bin/env").await;
    assert_eq!(snapshot(&env).await["web-2"], before["web-2"], "web-2 was touched");

    // Removed by force: recreated with the same IP.
    let id2 = before["web-2"].0.clone();
    env.podman.remove(&id2, true).await.unwrap();
    tick_until(&mut rt, 20, "web-2 recreated", |rt| {
        let s = status(rt, "web-2");
        s.state == "running" && s.container_id.as_deref().is_some_and(|id| id != id2)
    })
    .await;
    let d = container_of(&env, "web-2").await;
    assert_ne!(d.id, id2);
    assert!(d.is_running(), "{d:?}");
    assert_eq!(d.ip_on(&env.tag), Some(ip2));
    assert_eq!(status(&rt, "web-2").error, None);
    assert_no_stale_neighbour(&env, ip2, &d);
    let body = http_get_eventually(ip2, "/cgi-bin/env").await;
    assert!(body.contains("GREETING=hello-from-web-2"), "{body}");

    // Killed: Podman's restart policy brings it back in the same container
    // (no tick meanwhile), and the agent takes it as it is. (Podman 4.3 does
    // not report restarts in its container list, so `restarts` in the status
    // does not count this one.)
    let d = env.podman.inspect(&id1).await.unwrap();
    http_get_eventually(ip1, "/").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now = env.podman.inspect(&id1).await.unwrap();
        if now.is_running() && now.pid != d.pid && now.restart_count >= 1 {
            break now;
        }
        assert!(Instant::now() < deadline, "not restarted by Podman: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Podman restarts it in the network namespace it had: same MAC.
    assert_eq!(after.networks[&env.tag].mac, d.networks[&env.tag].mac);
    assert_no_stale_neighbour(&env, ip1, &after);
    http_get_eventually(ip1, "/cgi-bin/env").await;
    for _ in 0..3 {
        rt.tick().await;
    }
    let s = status(&rt, "web-1");
    assert_eq!(s.container_id.as_deref(), Some(id1.as_str()), "{s:?}");
    assert_eq!((s.state.as_str(), s.error.as_deref()), ("running", None), "{s:?}");
    assert_eq!(
        env.podman.inspect(&id1).await.unwrap().pid,
        after.pid,
        "the agent restarted it again"
    );

    assert_eq!(owned(&env).await.len(), 2);
}

#[tokio::test]
async fn health_checks_over_http_and_through_podman() {
    let env = Env::start().await;
    let mut web = replica(&env, 1);
    web.health_http = Some("/index.html".into());
    let mut cmd = replica(&env, 2);
    cmd.health_cmd = Some("test -f /tmp/ok".into());
    let wanted = vec![web.clone(), cmd.clone()];
    let mut rt = Runtime::new(config_with(&env, no_autoheal()), node_key());
    rt.apply(env.subnet_net(), &wanted).await.unwrap();
    let web_id = container_of(&env, "web-1").await.id;
    let cmd_id = container_of(&env, "web-2").await.id;

    // The HTTP check passes; the command check keeps failing (Podman keeps
    // the streak: its own verdict turns unhealthy after 2 failures).
    tick_until(&mut rt, 20, "web-1 healthy", |rt| healthy(rt, "web-1")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        rt.tick().await;
        assert!(!healthy(&rt, "web-2"), "web-2 healthy without /tmp/ok");
        let h = env.podman.inspect(&cmd_id).await.unwrap().health;
        if h.as_ref().is_some_and(|h| h.status == HealthStatus::Unhealthy) {
            break;
        }
        assert!(Instant::now() < deadline, "Podman never ran web-2's check: {h:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = status(&rt, "web-2");
    assert!(!s.healthy && s.state == "running", "{s:?}");

    env.podman_ok(&["exec", &cmd_id, "touch", "/tmp/ok"]);
    tick_until(&mut rt, 20, "web-2 healthy after touch /tmp/ok", |rt| {
        healthy(rt, "web-2")
    })
    .await;
    let h = env.podman.inspect(&cmd_id).await.unwrap().health.unwrap();
    assert_eq!(h.status, HealthStatus::Healthy, "{h:?}");
    assert!(status(&rt, "web-2").healthy);

    // Without its page web-1 fails its check and, after the retries, is
    // unhealthy (still running); with the page back it is healthy again.
    env.podman_ok(&["exec", &web_id, "rm", "/www/index.html"]);
    assert!(http_get(web.ip, 8080, "/index.html").await.unwrap_err().contains("404"));
    tick_until(&mut rt, 30, "web-1 unhealthy without /index.html", |rt| {
        !healthy(rt, "web-1")
    })
    .await;
    let s = status(&rt, "web-1");
    assert!(!s.healthy && s.state == "running", "{s:?}");
    assert_eq!(s.health_output.as_deref(), Some("GET /index.html: HTTP 404"), "{s:?}");
    assert!(healthy(&rt, "web-2"), "web-2 followed web-1");
    assert_eq!(status(&rt, "web-2").health_output, None);

    env.podman_ok(&["exec", &web_id, "sh", "-c", "echo back > /www/index.html"]);
    tick_until(&mut rt, 30, "web-1 healthy again", |rt| healthy(rt, "web-1")).await;
    let s = status(&rt, "web-1");
    assert!(s.healthy, "{s:?}");
    assert_eq!(
        (s.health_output, s.log_tail.len()),
        (None, 0),
        "healthy replicas carry no trouble"
    );
    // With autoheal off, health never restarts or replaces a container.
    assert_eq!(container_of(&env, "web-1").await.id, web_id);
    assert_eq!(container_of(&env, "web-2").await.id, cmd_id);
}

#[tokio::test]
async fn a_bad_replica_fails_alone() {
    let env = Env::start().await;
    let key = node_key();
    let missing = "localhost/berth-test/nope:1";
    let good = replica(&env, 1);
    let mut no_image = replica(&env, 2);
    no_image.image = missing.into();
    let mut bad_secrets = replica(&env, 3);
    bad_secrets.sealed_secrets = Some("garbage".into());
    let wanted = vec![good.clone(), no_image.clone(), bad_secrets.clone()];
    let mut rt = Runtime::new(config(&env), key.clone());

    // No registry is reachable: the pull fails (Podman retries 3 times a
    // second apart), and so does the apply, naming replica and image.
    let t = Instant::now();
    let err = rt.apply(env.subnet_net(), &wanted).await.unwrap_err();
    println!("apply with a missing image failed after {:?}: {err:#}", t.elapsed());
    let msg = format!("{err:#}");
    assert!(msg.contains("web-2") && msg.contains(missing), "{msg}");
    assert!(msg.contains("web-3") && msg.contains("secrets: "), "{msg}");
    assert!(!msg.contains("web-1"), "{msg}");

    let s = status(&rt, "web-2");
    assert!(s.error.as_deref().is_some_and(|e| e.contains(missing)), "{s:?}");
    assert_ne!(s.state, "running", "{s:?}");
    assert_eq!(s.container_id, None, "{s:?}");
    let s = status(&rt, "web-3");
    assert!(s.error.as_deref().is_some_and(|e| e.starts_with("secrets: ")), "{s:?}");
    assert_eq!(s.container_id, None, "{s:?}");
    let s = status(&rt, "web-1");
    assert_eq!((s.state.as_str(), s.error.as_deref()), ("running", None), "{s:?}");
    let running = owned(&env).await;
    assert_eq!(running.len(), 1, "{running:#?}");
    assert_eq!(running[0].labels["io.berth.replica"], "web-1");
    let body = http_get_eventually(good.ip, "/cgi-bin/env").await;
    assert!(body.contains("GREETING=hello-from-web-1"), "{body}");

    // Ticks retry the broken ones without disturbing the good one.
    let web1 = container_of(&env, "web-1").await;
    rt.tick().await;
    assert_eq!(container_of(&env, "web-1").await.started_at, web1.started_at);
    assert!(status(&rt, "web-2").error.is_some() && status(&rt, "web-3").error.is_some());

    // Fixed input: everything runs, errors gone.
    let mut fixed = wanted.clone();
    fixed[1].image = IMAGE.into();
    fixed[2].sealed_secrets = Some(seal_secrets(&key, &[("API_TOKEN", "fixed")]));
    rt.apply(env.subnet_net(), &fixed).await.unwrap();
    let now = snapshot(&env).await;
    assert_eq!(now.len(), 3, "{now:?}");
    assert_all_running(&rt, &fixed, &now);
    assert_eq!(now["web-1"].0, web1.id);
    let body = http_get_eventually(fixed[2].ip, "/cgi-bin/env").await;
    assert!(body.contains("API_TOKEN=fixed"), "{body}");
}

#[tokio::test]
async fn podman_unreachable() {
    let dir = tempfile::Builder::new().prefix("berth-containers-").tempdir().unwrap();
    let socket = dir.path().join("no-podman.sock");
    let cfg = RuntimeConfig {
        socket: socket.clone(),
        network: "btest-unreachable".into(),
        bridge: "btestnone".into(),
        zone: "internal".into(),
        volumes_dir: dir.path().join("volumes"),
        autoheal: Policy::default(),
    };
    let subnet = "10.231.0.0/24".parse().unwrap();
    let mut rt = Runtime::new(cfg, node_key());

    // Nothing to run: nothing to do, Podman or not.
    rt.apply(subnet, &[]).await.unwrap();
    assert!(rt.statuses().is_empty());
    assert!(!rt.tick().await);

    let wanted = [replica_at(1, Ipv4Addr::new(10, 231, 0, 2))];
    let err = rt.apply(subnet, &wanted).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&socket.display().to_string()), "{msg}");
    let s = status(&rt, "web-1");
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains(&socket.display().to_string())),
        "{s:?}"
    );
    assert!(!s.healthy && s.state != "running" && s.container_id.is_none(), "{s:?}");
    rt.tick().await;
    let s = status(&rt, "web-1");
    assert!(s.error.is_some() && !s.healthy, "{s:?}");
    assert!(!socket.exists());
}

#[tokio::test]
async fn podman_coming_up_late_and_going_away_for_a_while() {
    let mut env = Env::start().await;
    let wanted = vec![replica(&env, 1)];
    let ip = wanted[0].ip;
    env.stop_service();

    // The agent starts before Podman: apply fails, tick keeps trying.
    let mut rt = Runtime::new(config(&env), node_key());
    let err = rt.apply(env.subnet_net(), &wanted).await.unwrap_err();
    let socket = env.socket().display().to_string();
    assert!(format!("{err:#}").contains(&socket), "{err:#}");
    rt.tick().await;
    assert!(status(&rt, "web-1").error.is_some());
    env.start_service().await;
    tick_until(&mut rt, 20, "web-1 running once Podman is up", |rt| {
        let s = status(rt, "web-1");
        s.state == "running" && s.error.is_none()
    })
    .await;
    let id = container_of(&env, "web-1").await.id;
    http_get_eventually(ip, "/cgi-bin/env").await;

    // Podman goes away: the replica keeps running, its status says why the
    // agent cannot see it...
    env.stop_service();
    rt.tick().await;
    let s = status(&rt, "web-1");
    assert!(s.error.as_deref().is_some_and(|e| e.contains(&socket)), "{s:?}");
    http_get(ip, 8080, "/").await.unwrap();

    // ...and once Podman is back the error is gone, the container the same.
    env.start_service().await;
    tick_until(&mut rt, 20, "web-1's error cleared once Podman is back", |rt| {
        status(rt, "web-1").error.is_none()
    })
    .await;
    let s = status(&rt, "web-1");
    assert_eq!(s.state, "running", "{s:?}");
    assert_eq!(s.container_id.as_deref(), Some(id.as_str()), "{s:?}");
    assert_eq!(container_of(&env, "web-1").await.id, id);
}

/// Polls until no Berth-owned container of `replica` is left; returns when.
async fn wait_gone(env: &Env, replica: &str, secs: u64) -> Instant {
    let t = Instant::now();
    loop {
        let left = env.podman.list(&[OWNER, ("io.berth.replica", replica)]).await.unwrap();
        if left.is_empty() {
            return Instant::now();
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{replica} still there: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn stop_signal_and_stop_timeout_reach_podman_and_removal_uses_them() {
    let env = Env::start().await;
    // web-1 handles SIGUSR1 (its stop signal) by writing a file to its
    // volume and exiting; it would get 30 s.
    let mut graceful = replica(&env, 1);
    graceful.command = Some(
        "trap 'echo got-usr1 > /data/stopped; exit 0' USR1; /bin/busybox httpd -f -p 8080 -h /www & \
         while true; do sleep 0.1; done"
            .into(),
    );
    graceful.volumes = vec![berth_protocol::service::Volume {
        name: "data".into(),
        path: "/data".into(),
    }];
    graceful.stop_signal = Some("SIGUSR1".into());
    graceful.stop_timeout = Some(30);
    // web-2 is busybox httpd as PID 1, which ignores SIGTERM: only its
    // 2 s timeout ends it.
    let mut stubborn = replica(&env, 2);
    stubborn.stop_timeout = Some(2);
    let wanted = vec![graceful.clone(), stubborn.clone()];
    let mut rt = Runtime::new(config(&env), node_key());
    rt.apply(env.subnet_net(), &wanted).await.unwrap();

    let g = container_of(&env, "web-1").await;
    let s = container_of(&env, "web-2").await;
    assert_eq!((g.stop_signal, g.stop_timeout), (Some(10), Some(30)), "{g:?}");
    assert_eq!((s.stop_signal, s.stop_timeout), (Some(15), Some(2)), "{s:?}");
    // The CLI shows the same (Podman 4 as a number, 5 as a name).
    let raw = inspect_json(&env, &g.id);
    assert!(
        raw["Config"]["StopSignal"] == 10 || raw["Config"]["StopSignal"] == "SIGUSR1",
        "{}",
        raw["Config"]["StopSignal"]
    );
    assert_eq!(raw["Config"]["StopTimeout"], 30);
    assert_eq!(inspect_json(&env, &s.id)["Config"]["StopTimeout"], 2);
    tick_until(&mut rt, 20, "both healthy", |rt| {
        healthy(rt, "web-1") && healthy(rt, "web-2")
    })
    .await;
    http_get_eventually(graceful.ip, "/").await;

    // Removed (no longer wanted): each gets its own signal and timeout.
    let t = Instant::now();
    rt.apply(env.subnet_net(), &[]).await.unwrap();
    let (g_gone, s_gone) = tokio::join!(wait_gone(&env, "web-1", 40), wait_gone(&env, "web-2", 40));
    let (g_took, s_took) = (g_gone - t, s_gone - t);
    println!("removal took {g_took:?} (SIGUSR1, trapped) and {s_took:?} (SIGTERM ignored, timeout 2 s)");
    let stopped = std::fs::read_to_string(env.dir.path().join("volumes/web/data/stopped")).unwrap();
    assert_eq!(stopped.trim(), "got-usr1", "web-1 did not get its stop signal");
    assert!(
        g_took < Duration::from_secs(15),
        "web-1 was not stopped by its signal: {g_took:?}"
    );
    assert!(
        s_took >= Duration::from_millis(1900),
        "web-2 went before its timeout: {s_took:?}"
    );
    assert!(
        s_took < Duration::from_secs(9),
        "web-2 waited longer than its 2 s timeout: {s_took:?}"
    );
}

#[tokio::test]
async fn a_crash_looping_replica_reports_exit_code_restarts_and_log_tail() {
    let env = Env::start().await;
    let mut crashing = replica(&env, 1);
    crashing.command = Some("echo 'boom: DATABASE_URL is not set'; echo 'giving up' >&2; exit 3".into());
    let good = replica(&env, 2);
    let mut rt = Runtime::new(config(&env), node_key());
    rt.apply(env.subnet_net(), &[crashing, good]).await.unwrap();

    tick_until(&mut rt, 60, "web-1 reported as crash-looping", |rt| {
        let s = status(rt, "web-1");
        s.exit_code == Some(3) && s.restarts >= 3 && s.log_tail.iter().any(|l| l == "boom: DATABASE_URL is not set")
    })
    .await;
    let s = status(&rt, "web-1");
    println!("{s:#?}");
    assert!(!s.healthy, "{s:?}");
    assert!(
        s.log_tail.iter().any(|l| l == "giving up"),
        "stderr too: {:?}",
        s.log_tail
    );
    assert!(s.log_tail.len() <= 20, "{:?}", s.log_tail);
    assert!(
        s.log_tail.iter().all(|l| !l.contains('\0') && l.len() <= 303),
        "{:?}",
        s.log_tail
    );
    assert!(
        !s.gave_up && s.recreates == 0,
        "a replica never healthy is not autohealed: {s:?}"
    );
    // Podman restarted it (restart policy): the same container throughout.
    let d = container_of(&env, "web-1").await;
    assert_eq!(s.container_id.as_deref(), Some(d.id.as_str()));
    assert!(d.restart_count >= 1 || d.exit_code == 3, "{d:?}");
    let restarts = s.restarts;
    tick_until(&mut rt, 30, "restarts keep counting", |rt| {
        status(rt, "web-1").restarts > restarts
    })
    .await;

    // The healthy neighbour reports no trouble.
    tick_until(&mut rt, 20, "web-2 healthy", |rt| healthy(rt, "web-2")).await;
    let s = status(&rt, "web-2");
    assert_eq!(
        (s.exit_code, s.health_output.as_deref(), s.log_tail.len(), s.restarts),
        (None, None, 0, 0),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_replica_is_healthy_only_once_it_listens_on_its_port() {
    let env = Env::start().await;
    let mut slow = replica(&env, 1);
    slow.command = Some("sleep 4; exec /bin/serve".into());
    // No port, no check: healthy as soon as it runs.
    let mut portless = replica(&env, 2);
    portless.port = None;
    portless.command = Some("exec sleep 1000".into());
    let mut rt = Runtime::new(config(&env), node_key());
    let t = Instant::now();
    rt.apply(env.subnet_net(), &[slow.clone(), portless]).await.unwrap();

    let mut saw_refused = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        rt.tick().await;
        let s = status(&rt, "web-1");
        if s.healthy {
            // Reported healthy (and so put in DNS) only when it serves.
            http_get(slow.ip, 8080, "/").await.unwrap();
            break;
        }
        saw_refused |= s.health_output.as_deref().is_some_and(|o| o.contains("refused"));
        assert!(Instant::now() < deadline, "web-1 never healthy: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t.elapsed();
    println!("web-1 healthy {took:?} after apply");
    assert!(
        took >= Duration::from_millis(3500),
        "healthy before it listened: {took:?}"
    );
    assert!(saw_refused, "the failing TCP check was not reported");
    assert!(healthy(&rt, "web-2"), "{:?}", status(&rt, "web-2"));
    assert_eq!(status(&rt, "web-1").health_output, None);
}

#[tokio::test]
async fn autoheal_restarts_then_recreates_then_gives_up_on_a_replica_whose_health_broke() {
    let env = Env::start().await;
    let policy = Policy {
        after: Duration::from_secs(1),
        backoff: Duration::from_secs(1),
        backoff_max: Duration::from_secs(2),
        max_restarts: 3,
        max_recreates: 2,
    };
    let check = "test -f /tmp/ok || { echo 'no /tmp/ok'; exit 1; }";
    let mut web = replica(&env, 1);
    web.health_cmd = Some(check.into());
    web.stop_timeout = Some(1);
    // Never healthy: left to the rollout, never touched by autoheal.
    let mut never = replica(&env, 2);
    never.health_cmd = Some("test -f /tmp/never".into());
    never.stop_timeout = Some(1);
    let mut rt = Runtime::new(config_with(&env, policy), node_key());
    rt.apply(env.subnet_net(), &[web.clone(), never]).await.unwrap();
    let never_before = container_of(&env, "web-2").await;

    let first = container_of(&env, "web-1").await;
    env.podman_ok(&["exec", &first.id, "touch", "/tmp/ok"]);
    tick_until(&mut rt, 20, "web-1 healthy", |rt| healthy(rt, "web-1")).await;

    // Its health breaks; a restart keeps the container's files, so it does
    // not help: restarted 3 times (the same container, started anew).
    env.podman_ok(&["exec", &first.id, "rm", "/tmp/ok"]);
    tick_until(&mut rt, 30, "web-1 unhealthy, saying why", |rt| {
        let s = status(rt, "web-1");
        !s.healthy && s.health_output.as_deref() == Some("no /tmp/ok")
    })
    .await;
    tick_until(&mut rt, 40, "web-1 restarted by autoheal", |rt| {
        status(rt, "web-1").restarts >= 1
    })
    .await;
    let d = container_of(&env, "web-1").await;
    assert_eq!(d.id, first.id, "a restart, not a new container");
    assert_ne!(d.started_at, first.started_at);
    tick_until(&mut rt, 60, "web-1 recreated after 3 restarts", |rt| {
        let s = status(rt, "web-1");
        s.recreates >= 1 && s.container_id.as_deref().is_some_and(|id| id != first.id)
    })
    .await;
    let s = status(&rt, "web-1");
    assert!(s.restarts >= 3, "recreated before 3 restarts: {s:?}");
    assert!(env.podman.inspect(&first.id).await.unwrap_err().is_not_found());
    let second = container_of(&env, "web-1").await;
    assert_eq!(second.ip_on(&env.tag), Some(web.ip));

    // The new container has no /tmp/ok either: after the last recreate,
    // autoheal gives up and says why.
    tick_until(&mut rt, 90, "autoheal gave up on web-1", |rt| {
        status(rt, "web-1").gave_up
    })
    .await;
    let s = status(&rt, "web-1");
    println!("{s:#?}");
    assert_eq!(s.recreates, 2, "{s:?}");
    let err = s.error.clone().unwrap_or_default();
    assert!(err.contains("autoheal gave up") && err.contains("no /tmp/ok"), "{err}");
    assert!(!s.healthy && s.state == "running", "{s:?}");

    // Left alone now.
    let left = container_of(&env, "web-1").await;
    for _ in 0..8 {
        rt.tick().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let now = container_of(&env, "web-1").await;
    assert_eq!(
        (&now.id, &now.started_at),
        (&left.id, &left.started_at),
        "touched after giving up"
    );
    assert!(status(&rt, "web-1").gave_up);

    // Healthy again (fixed by hand): no longer given up.
    env.podman_ok(&["exec", &now.id, "touch", "/tmp/ok"]);
    tick_until(&mut rt, 20, "web-1 healthy again", |rt| healthy(rt, "web-1")).await;
    let s = status(&rt, "web-1");
    assert!(!s.gave_up && s.error.is_none(), "{s:?}");
    assert_eq!(s.recreates, 2, "totals stay");

    // web-2 was never healthy: never restarted or replaced.
    let never_now = container_of(&env, "web-2").await;
    assert_eq!(
        (&never_now.id, &never_now.started_at),
        (&never_before.id, &never_before.started_at)
    );
    let s = status(&rt, "web-2");
    assert_eq!((s.restarts, s.recreates, s.gave_up), (0, 0, false), "{s:?}");
}
