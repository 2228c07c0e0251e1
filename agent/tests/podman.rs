//! The Podman client against a real Podman: each test starts its own
//! `podman system service` (own --root, --runroot, network config dir and
//! socket), imports the busybox test image (scripts/make-test-image.sh) and
//! gets its own bridge network on a /24 of 10.231.0.0/16, so tests (and
//! several test runs) can run side by side. Everything is removed at the end,
//! even when the test fails (see tests/common).
//!
//! Needs root and Podman set up by scripts/podman-setup.sh.

mod common;

use berth_agent::podman::{ContainerState, Error, HealthCheck, HealthStatus, Podman, RestartPolicy, Volume};
use common::podman::{http_get, http_get_eventually, Env, IMAGE};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

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
    let err = env.podman.pull(reference, false, None).await.unwrap_err();
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

#[tokio::test]
async fn stop_signal_stop_timeout_restart_and_log_tail() {
    let env = Env::start().await;
    env.podman.network_ensure(&env.network_spec()).await.unwrap();
    let mut spec = env.container("graceful");
    // Stops cleanly on SIGUSR1 only (PID 1 ignores signals it has no trap for).
    spec.command = Some(vec![
        "sh".into(),
        "-c".into(),
        "trap 'echo got usr1; exit 0' USR1; echo ready; echo to-stderr >&2; while true; do sleep 0.1; done".into(),
    ]);
    spec.stop_signal = berth_agent::podman::signal_number("SIGUSR1");
    spec.stop_timeout = Some(20);
    let id = env.podman.create(&spec).await.unwrap();
    env.podman.start(&id).await.unwrap();
    let d = env.podman.inspect(&id).await.unwrap();
    assert_eq!((d.stop_signal, d.stop_timeout), (Some(10), Some(20)), "{d:?}");

    // Both streams, in order, without frame headers.
    let deadline = Instant::now() + Duration::from_secs(10);
    let tail = loop {
        let tail = env.podman.logs_tail(&id, 20, 300).await.unwrap();
        if tail.len() >= 2 {
            break tail;
        }
        assert!(Instant::now() < deadline, "no log lines: {tail:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(tail, ["ready", "to-stderr"]);
    assert_eq!(env.podman.logs_tail(&id, 1, 300).await.unwrap(), ["to-stderr"]);

    // Restart: the stop signal, then a new start of the same container.
    let t = Instant::now();
    env.podman.restart(&id, 20).await.unwrap();
    let took = t.elapsed();
    let after = env.podman.inspect(&id).await.unwrap();
    assert!(after.is_running(), "{after:?}");
    assert_ne!(after.started_at, d.started_at);
    assert!(
        took < Duration::from_secs(10),
        "the signal was not the stop signal: {took:?}"
    );

    // Stop sends SIGUSR1: the trap runs and the container exits 0 long
    // before its timeout. Once the restarted shell has set its trap (it
    // prints "ready" after): before, PID 1 would ignore the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env
        .podman
        .logs_tail(&id, 20, 300)
        .await
        .unwrap()
        .iter()
        .filter(|l| *l == "ready")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the restarted container never got ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    env.podman.stop(&id, 20).await.unwrap();
    let took = t.elapsed();
    let d = env.podman.inspect(&id).await.unwrap();
    assert!(!d.is_running(), "{d:?}");
    assert_eq!(d.exit_code, 0, "exited by its trap, not killed");
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    let tail = env.podman.logs_tail(&id, 20, 300).await.unwrap();
    assert_eq!(tail.iter().filter(|l| *l == "got usr1").count(), 2, "{tail:?}");
    assert_eq!(tail.last().map(String::as_str), Some("got usr1"), "{tail:?}");

    let err = env.podman.logs_tail("no-such-container", 20, 300).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
}

/// Packs `files` (name, contents) as a build context tar in `dir`.
fn context_tar(dir: &std::path::Path, files: &[(&str, &str)]) -> std::path::PathBuf {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    for (name, text) in files {
        std::fs::write(ctx.join(name), text).unwrap();
    }
    let tar = dir.join("ctx.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&ctx)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    tar
}

/// Runs a build, returning its result and everything it printed.
async fn build(
    env: &Env,
    p: &berth_agent::podman::BuildParams,
    tar: &std::path::Path,
) -> (Result<String, Error>, String) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
    let collect = tokio::spawn(async move {
        let mut out = String::new();
        while let Some(s) = rx.recv().await {
            out.push_str(&s);
        }
        out
    });
    let r = env.podman.build(p, tar, tx).await;
    (r, collect.await.unwrap())
}

#[tokio::test]
async fn builds_stream_their_steps_and_a_failing_step_is_named() {
    let env = Env::start().await;
    let tar = context_tar(
        env.dir.path(),
        &[
            (
                "Dockerfile.web",
                &format!("FROM {IMAGE}\nARG GREETING\nCOPY hello.txt /hello.txt\nRUN cat /hello.txt && echo \"arg=$GREETING\"\n"),
            ),
            ("hello.txt", "hello from the context\n"),
            ("Dockerfile.bad", &format!("FROM {IMAGE}\nRUN echo going-down && exit 4\n")),
        ],
    );
    let mut p = berth_agent::podman::BuildParams {
        dockerfile: "Dockerfile.web".into(),
        tag: "localhost/berth-test/built:1".into(),
        ..Default::default()
    };
    p.build_args.insert("GREETING".into(), "hi there".into());
    let (r, out) = build(&env, &p, &tar).await;
    let id = r.unwrap_or_else(|e| panic!("{e}\n{out}"));
    for want in [
        "STEP 1/4: FROM",
        "STEP 3/4: COPY hello.txt",
        "hello from the context",
        "arg=hi there",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    assert!(out.contains(&id), "the image id {id} is not the last line:\n{out}");
    assert!(env.podman.image_exists("localhost/berth-test/built:1").await.unwrap());

    p.dockerfile = "Dockerfile.bad".into();
    p.tag = "localhost/berth-test/built:2".into();
    let (r, out) = build(&env, &p, &tar).await;
    assert!(out.contains("going-down"), "{out}");
    match r {
        Err(Error::Build { message }) => {
            assert!(message.contains(r#"STEP "RUN echo going-down && exit 4""#), "{message}");
            assert!(message.contains("exit status 4"), "{message}");
        }
        other => panic!("not a build error: {other:?}"),
    }
    assert!(!env.podman.image_exists("localhost/berth-test/built:2").await.unwrap());

    // A context that is not there fails before Podman is asked.
    let err = env
        .podman
        .build(
            &p,
            &env.dir.path().join("none.tar"),
            tokio::sync::mpsc::channel::<String>(1).0,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Context { .. }), "{err:?}");
}
