//! End-to-end: image builds on a lab (two workers, a proxy, Pebble, the
//! fleet registry). `berth service deploy site --build DIR` packs a
//! directory whose Dockerfile starts `FROM` the test image in the fleet
//! registry; a worker builds it with Podman's builder, pushes it, and the
//! release runs it by digest on both workers. Cases, in order: the first
//! build serves by name and over HTTPS; a second build rolls out under load
//! with no failed request; a failing `RUN` changes nothing; a cancel stops
//! a running build; a build secret is usable in `RUN` and found nowhere
//! after it; a git build clones from `git daemon` in a lab namespace.

use berth_client::AdminClient;
use berth_protocol::build::BuildState;
use berth_protocol::routes::DomainSpec;
use berth_tests::load::{Load, LoadSpec};
use berth_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(90);
const DOMAIN: &str = "site.example.com";
/// The site's spec on every deploy: two spread replicas, health on `/`.
const SITE_FLAGS: &[&str] = &[
    "--replicas",
    "2",
    "--port",
    "8080",
    "--health-http",
    "/",
    "--min-ready",
    "1",
    "--drain",
    "2",
];

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A build context: a Dockerfile from the fleet registry's test image and
/// an index.html saying `page`.
fn context(dir: &Path, registry: &str, page: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!("FROM {registry}/berth-test/busybox:latest\nCOPY index.html /www/index.html\n{extra}"),
    )
    .unwrap();
    std::fs::write(dir.join("index.html"), page).unwrap();
    // Ignored: never reaches the builder.
    std::fs::write(dir.join(".dockerignore"), "secret.txt\n").unwrap();
    std::fs::write(dir.join("secret.txt"), "not for the image").unwrap();
    dir.to_path_buf()
}

/// `berth service deploy site --build DIR` with two spread replicas.
fn deploy_site(lab: &Lab, dir: &Path) -> Output {
    let mut cmd = deploy_command(lab, dir);
    tokio::task::block_in_place(|| cmd.output().expect("run berth"))
}

fn deploy_command(lab: &Lab, dir: &Path) -> Command {
    let mut cmd = berth_command(lab, &["service", "deploy", "site", "--build", dir.to_str().unwrap()]);
    cmd.args(SITE_FLAGS);
    cmd
}

/// One HTTPS request for `DOMAIN` through the proxy at `ip`: status and body.
fn fetch(ip: &str, root: &Path) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--max-time", "20", "--cacert"])
        .arg(root)
        .args(["--resolve", &format!("{DOMAIN}:443:{ip}")])
        .arg(format!("https://{DOMAIN}/"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().to_string(), body.to_string())
}

/// Waits until the newest build of site, newer than `after`, runs; its ID.
async fn wait_running(admin: &AdminClient, after: u64) -> u64 {
    let deadline = Instant::now() + SETTLE;
    loop {
        let b = admin.list_builds(Some("site"), 1).await.unwrap().remove(0);
        if b.state == BuildState::Running && b.id > after {
            return b.id;
        }
        assert!(Instant::now() < deadline, "the slow build never ran: {b:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn current_release(admin: &AdminClient) -> u64 {
    admin.show_service("site").await.unwrap().rollout.unwrap().release
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_is_built_on_the_fleet_and_deployed_by_digest() {
    if !Path::new("/usr/bin/docker-registry").exists() {
        assert!(std::env::var_os("CI").is_none(), "docker-registry is missing under CI");
        eprintln!("skipped: docker-registry is not installed");
        return;
    }
    let mut lab = lab_up(212, 2).await;
    let proxy = lab.add_node(true).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    let registry = lab.registry_host();
    let admin = lab.admin().unwrap();
    let work = lab.state.dir.join("contexts");

    // Case 1: the first build. Its replicas run on both workers, by digest;
    // n2 pulled the image from the registry (n1 built it).
    let out = deploy_site(&lab, &context(&work.join("v1"), &registry, "site v1\n", ""));
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for step in ["STEP 1/2: FROM", "STEP 2/2: COPY index.html", "release 1 complete"] {
        assert!(log.contains(step), "no {step:?} in:\n{log}");
    }
    let info = admin.show_service("site").await.unwrap();
    let image = info.spec.image.clone();
    assert!(
        image.starts_with(&format!("{registry}/site@sha256:")),
        "not pinned to a digest: {image}"
    );
    let mut nodes: Vec<&str> = info.replicas.iter().map(|r| r.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2"], "{info:?}");
    let builds = admin.list_builds(Some("site"), 10).await.unwrap();
    assert_eq!(builds.len(), 1, "{builds:?}");
    let b = &builds[0];
    assert_eq!(b.state, BuildState::Succeeded, "{b:?}");
    assert_eq!(b.image.as_deref(), Some(image.as_str()));
    assert_eq!(b.release, Some(1));
    let builder = b.node.clone().unwrap();
    let other = if builder == "n1" { "n2" } else { "n1" };
    let out = lab.podman(other, &["image", "exists", &image]).unwrap();
    assert!(out.status.success(), "{other} did not pull {image}");
    // The ignored file never reached the image.
    let out = lab
        .run_container(other, &["wget", "-qO-", "http://site.internal:8080/secret.txt"])
        .unwrap();
    assert!(!out.status.success(), "secret.txt is in the image: {}", text(&out));

    // By name from a container on a third node, and over HTTPS through the proxy.
    let out = lab
        .run_container(&proxy, &["wget", "-qO-", "http://site.internal:8080/"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "site v1\n", "{}", text(&out));
    lab.start_pebble(&proxy).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    admin
        .add_domain(&DomainSpec {
            domain: DOMAIN.into(),
            service: "site".into(),
            port: 8080,
            passthrough: false,
        })
        .await
        .unwrap();
    demo::wait_cert(&admin, DOMAIN, SETTLE).await.unwrap();
    let root = lab.state.dir.join("pebble-root.pem");
    let pebble = lab.state.pebble.clone().unwrap();
    std::fs::write(&root, pebble.issuing_root().await.unwrap()).unwrap();
    let proxy_ip = lab.net.node_ip(lab.node(&proxy).unwrap().index).to_string();
    let deadline = Instant::now() + SETTLE;
    loop {
        let (code, body) = fetch(&proxy_ip, &root);
        if code == "200" {
            assert_eq!(body, "site v1\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy does not serve the site: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Case 2: a second build with a changed file rolls out under load
    // without a failed request.
    let mut spec = LoadSpec::new(&proxy, &root, "n2");
    spec.domain = DOMAIN.into();
    spec.service = "site".into();
    let load = Load::start(&lab, &spec).unwrap();
    let out = deploy_site(&lab, &context(&work.join("v2"), &registry, "site v2\n", ""));
    let s = load.stop();
    println!("second build under load:\n{s}");
    assert!(out.status.success(), "{}", text(&out));
    s.assert_no_failures();
    s.assert_ok_at_least(20);
    assert_eq!(fetch(&proxy_ip, &root), ("200".to_string(), "site v2\n".to_string()));
    let good = current_release(&admin).await;
    assert_eq!(good, 2);

    // Case 3: a failing RUN: the CLI exits 1 naming the step and its exit
    // status; the running release is untouched.
    let bad = context(
        &work.join("bad"),
        &registry,
        "site v3\n",
        "RUN echo about-to-fail && exit 3\n",
    );
    let out = deploy_site(&lab, &bad);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("about-to-fail"), "the step's output is missing:\n{log}");
    assert!(
        log.contains(r#"STEP "RUN echo about-to-fail && exit 3""#) && log.contains("exit status 3"),
        "the failing step is not named:\n{log}"
    );
    let failed = &admin.list_builds(Some("site"), 1).await.unwrap()[0];
    assert_eq!(failed.state, BuildState::Failed, "{failed:?}");
    assert!(
        failed.error.as_deref().unwrap_or("").contains("exit status 3"),
        "{failed:?}"
    );
    assert_eq!(failed.release, None);
    assert_eq!(current_release(&admin).await, good);
    assert_eq!(fetch(&proxy_ip, &root), ("200".to_string(), "site v2\n".to_string()));
    // `berth build logs` shows the same log later.
    let out = berth(&lab, &["build", "logs", &failed.id.to_string()]);
    assert!(text(&out).contains("about-to-fail"), "{}", text(&out));

    // Case 4: `berth build cancel` stops a running build; nothing is
    // released, and the builder takes the next build.
    let slow = context(
        &work.join("slow"),
        &registry,
        "site v4\n",
        "RUN sleep 5\nRUN echo second-step-ran\n",
    );
    let child = deploy_command(&lab, &slow)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let running = wait_running(&admin, failed.id).await;
    let out = berth(&lab, &["build", "cancel", &running.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let deploying = tokio::task::block_in_place(|| child.wait_with_output().unwrap());
    let log = text(&deploying);
    assert_eq!(deploying.status.code(), Some(1), "{log}");
    assert!(log.contains("cancelled"), "{log}");
    assert!(!log.contains("second-step-ran"), "{log}");
    let cancelled = &admin.list_builds(Some("site"), 1).await.unwrap()[0];
    assert_eq!(cancelled.state, BuildState::Cancelled, "{cancelled:?}");
    assert_eq!(current_release(&admin).await, good);
    // Ctrl-C (SIGINT) during `deploy --build`, not on a terminal, cancels
    // the build and exits 130.
    let child = deploy_command(&lab, &slow)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let running = wait_running(&admin, cancelled.id).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let interrupted = tokio::task::block_in_place(|| child.wait_with_output().unwrap());
    assert_eq!(interrupted.status.code(), Some(130), "{}", text(&interrupted));
    assert_eq!(admin.get_build(running).await.unwrap().state, BuildState::Cancelled);
    assert_eq!(current_release(&admin).await, good);

    // Case 5: a build secret is usable in RUN and absent from the image's
    // history, its layers' files and the build log. The step prints it
    // (masked in the log) and stores only its hash.
    let secret = format!("tok-{}-c0ffee", std::process::id());
    let v5 = context(
        &work.join("v5"),
        &registry,
        "site v5\n",
        "RUN --mount=type=secret,id=TOKEN sha256sum /run/secrets/TOKEN | cut -d' ' -f1 > /www/token.sha && cat /run/secrets/TOKEN\n",
    );
    let mut cmd = deploy_command(&lab, &v5);
    cmd.args(["--secret", &format!("TOKEN={secret}")]);
    let out = tokio::task::block_in_place(|| cmd.output().unwrap());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains(&secret), "the secret is in the build's output:\n{log}");
    assert!(log.contains("[secret TOKEN]"), "{log}");
    assert_eq!(fetch(&proxy_ip, &root), ("200".to_string(), "site v5\n".to_string()));
    let hash = lab
        .run_container("n2", &["wget", "-qO-", "http://site.internal:8080/token.sha"])
        .unwrap();
    let want = Command::new("sh")
        .arg("-c")
        .arg(format!("printf %s '{secret}' | sha256sum | cut -d' ' -f1"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&hash.stdout),
        String::from_utf8_lossy(&want.stdout)
    );
    let b = admin.list_builds(Some("site"), 1).await.unwrap().remove(0);
    assert_eq!(b.state, BuildState::Succeeded, "{b:?}");
    let image = b.image.unwrap();
    let node = b.node.unwrap();
    let history = lab.podman(&node, &["history", "--no-trunc", &image]).unwrap();
    assert!(history.status.success(), "{}", text(&history));
    assert!(!text(&history).contains(&secret), "{}", text(&history));
    let saved = lab.podman(&node, &["save", &image]).unwrap();
    assert!(
        saved.status.success() && saved.stdout.len() > 100_000,
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    assert!(
        !saved.stdout.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret is in the image's layers"
    );
    let out = berth(&lab, &["build", "logs", &b.id.to_string()]);
    assert!(out.status.success() && !text(&out).contains(&secret), "{}", text(&out));

    // Case 6: a git build, from `git daemon` in the proxy node's namespace;
    // the context is a subdirectory, the Dockerfile found there, the commit
    // recorded.
    let repo = work.join("repo");
    context(&repo.join("web"), &registry, "site from git\n", "");
    let git = |args: &[&str]| {
        let o = Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "site"]);
    let commit = git(&["rev-parse", "HEAD"]);
    let index = lab.node(&proxy).unwrap().index;
    let daemon = KillOnDrop(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.net.node_ns(index),
                "git",
                "daemon",
                "--reuseaddr",
                "--export-all",
            ])
            .arg(format!("--listen={proxy_ip}"))
            .arg(format!("--base-path={}", work.display()))
            .arg(&work)
            .spawn()
            .unwrap(),
    );
    let url = format!("git://{proxy_ip}/repo");
    let mut cmd = berth_command(
        &lab,
        &[
            "service",
            "deploy",
            "site",
            "--git",
            &url,
            "--ref",
            "main",
            "--context",
            "web",
        ],
    );
    cmd.args(SITE_FLAGS);
    let out = tokio::task::block_in_place(|| cmd.output().unwrap());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains(&format!("commit {commit}")), "{log}");
    let b = admin.list_builds(Some("site"), 1).await.unwrap().remove(0);
    assert_eq!(b.commit.as_deref(), Some(commit.as_str()), "{b:?}");
    assert_eq!(b.git.as_deref(), Some(format!("{url}#main").as_str()));
    // Pushed as build-ID and as git-COMMIT, one digest.
    let images = admin.list_images(None).await.unwrap();
    let digest_of = |tag: &str| {
        images
            .iter()
            .find(|i| i.repository == "site" && i.tag == tag)
            .map(|i| i.digest.clone())
            .unwrap_or_else(|| panic!("no site:{tag} in {images:?}"))
    };
    assert_eq!(
        digest_of(&format!("git-{}", &commit[..12])),
        digest_of(&format!("build-{}", b.id))
    );
    assert_eq!(
        fetch(&proxy_ip, &root),
        ("200".to_string(), "site from git\n".to_string())
    );

    // Case 6b: a private repository over http, behind basic auth (busybox
    // httpd running `git http-backend` in the proxy node's namespace): the
    // token from --git-credential signs the builder in and shows nowhere.
    let token = "tok-private-repo-0451";
    let www = work.join("www");
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    let cgi = www.join("cgi-bin/git");
    std::fs::write(
        &cgi,
        format!(
            "#!/bin/sh\nGIT_PROJECT_ROOT='{}' GIT_HTTP_EXPORT_ALL=1 exec git http-backend\n",
            work.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cgi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(work.join("httpd.conf"), format!("/cgi-bin:ci:{token}\n")).unwrap();
    std::fs::write(work.join("token"), format!("ci:{token}\n")).unwrap();
    let httpd = KillOnDrop(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.net.node_ns(index),
                "busybox",
                "httpd",
                "-f",
                "-r",
                "git",
            ])
            .arg("-p")
            .arg(format!("{proxy_ip}:8099"))
            .arg("-h")
            .arg(&www)
            .arg("-c")
            .arg(work.join("httpd.conf"))
            .spawn()
            .unwrap(),
    );
    let private_url = format!("http://{proxy_ip}:8099/cgi-bin/git/repo");
    let deploy_private = |credential: Option<&Path>| {
        let mut cmd = berth_command(
            &lab,
            &["service", "deploy", "site", "--git", &private_url, "--context", "web"],
        );
        if let Some(c) = credential {
            cmd.arg("--git-credential").arg(c);
        }
        cmd.args(SITE_FLAGS);
        tokio::task::block_in_place(|| cmd.output().unwrap())
    };
    let out = deploy_private(None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("could not read Username"), "{}", text(&out));
    let out = deploy_private(Some(&work.join("token")));
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!("commit {commit}")) && !log.contains(token),
        "{log}"
    );
    let b = admin.list_builds(Some("site"), 1).await.unwrap().remove(0);
    assert_eq!(b.commit.as_deref(), Some(commit.as_str()), "{b:?}");
    let out = berth(&lab, &["build", "show", &b.id.to_string()]);
    assert!(out.status.success() && !text(&out).contains(token), "{}", text(&out));
    drop(httpd);

    // Case 7: the push webhook. `berth service link` prints the secret; a
    // badly signed delivery gets 401 and builds nothing, a signed one
    // builds and deploys the pushed commit, its redelivery builds nothing,
    // a push to another branch is ignored.
    let out = berth(
        &lab,
        &[
            "service",
            "link",
            "site",
            "--git",
            &url,
            "--branch",
            "main",
            "--context",
            "web",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let secret = text(&out)
        .lines()
        .find_map(|l| l.trim().strip_prefix("secret: ").map(String::from))
        .unwrap_or_else(|| panic!("no secret in:\n{}", text(&out)));
    std::fs::write(repo.join("web/index.html"), "site from a push\n").unwrap();
    git(&["commit", "-q", "-am", "push"]);
    let pushed = git(&["rev-parse", "HEAD"]);
    let payload = |branch: &str| {
        serde_json::json!({"ref": format!("refs/heads/{branch}"), "after": pushed, "repository": {"clone_url": url}})
            .to_string()
    };
    let cfg = lab.client_config();
    let post = |body: &str, signature: &str, delivery: &str| {
        let sig = format!("X-Hub-Signature-256: {signature}");
        let id = format!("X-GitHub-Delivery: {delivery}");
        let o = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
            .arg(&cfg.ca_file)
            .args([
                "-H",
                "Content-Type: application/json",
                "-H",
                "X-GitHub-Event: push",
                "-H",
                &sig,
                "-H",
                &id,
            ])
            .args(["--data-binary", body])
            .arg(format!("{}/v1/hooks/github", cfg.url))
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&o.stdout).to_string();
        let (body, code) = t.rsplit_once('\n').unwrap_or(("", &t));
        (code.trim().to_string(), body.to_string())
    };
    let sign = |body: &str| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        format!(
            "sha256={}",
            hex::encode(ring::hmac::sign(&key, body.as_bytes()).as_ref())
        )
    };
    let before = admin.list_builds(Some("site"), 100).await.unwrap().len();
    let main = payload("main");
    let (code, body) = tokio::task::block_in_place(|| post(&main, &sign("tampered"), "d-1"));
    assert_eq!(code, "401", "{body}");
    assert!(body.contains(r#""field":"signature""#), "{body}");
    assert_eq!(
        admin.list_builds(Some("site"), 100).await.unwrap().len(),
        before,
        "a badly signed delivery built"
    );
    let (code, body) = tokio::task::block_in_place(|| post(&main, &sign(&main), "d-1"));
    assert_eq!(code, "202", "{body}");
    let outcome: berth_protocol::build::HookOutcome = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome.status, "building");
    let [id] = outcome.builds[..] else { panic!("{body}") };
    let (code, body) = tokio::task::block_in_place(|| post(&main, &sign(&main), "d-1"));
    assert_eq!(
        (code.as_str(), body.contains(r#""status":"duplicate""#)),
        ("200", true),
        "{body}"
    );
    // The same signed body under a new delivery ID is a replay.
    let (code, body) = tokio::task::block_in_place(|| post(&main, &sign(&main), "d-3"));
    assert_eq!(
        (code.as_str(), body.contains(r#""status":"duplicate""#)),
        ("200", true),
        "{body}"
    );
    let other = payload("other");
    let (code, body) = tokio::task::block_in_place(|| post(&other, &sign(&other), "d-2"));
    assert_eq!(
        (code.as_str(), body.contains(r#""status":"ignored""#)),
        ("202", true),
        "{body}"
    );
    let deadline = Instant::now() + SETTLE;
    let b = loop {
        let b = admin.get_build(id).await.unwrap();
        if b.state.is_final() {
            break b;
        }
        assert!(Instant::now() < deadline, "the pushed build never ended: {b:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(b.state, BuildState::Succeeded, "{b:?}");
    assert_eq!(b.commit.as_deref(), Some(pushed.as_str()));
    assert!(b.created_by.starts_with("push "), "{b:?}");
    assert_eq!(
        admin.list_builds(Some("site"), 100).await.unwrap().len(),
        before + 1,
        "the redelivery or the other branch built"
    );
    let deadline = Instant::now() + SETTLE;
    while fetch(&proxy_ip, &root).1 != "site from a push\n" {
        assert!(Instant::now() < deadline, "the pushed commit was not deployed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(daemon);

    // Case 8: `berth apply -f` with a build table (its dir relative to the
    // file); `berth service unlink` ends the link.
    let out = berth(&lab, &["service", "unlink", "site"]);
    assert!(out.status.success(), "{}", text(&out));
    context(&work.join("v6"), &registry, "site from apply\n", "");
    let file = work.join("site.toml");
    std::fs::write(
        &file,
        "name = \"site\"\nreplicas = 2\nport = 8080\nhealth_http = \"/\"\n[build]\ndir = \"v6\"\n",
    )
    .unwrap();
    let out = berth(&lab, &["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fetch(&proxy_ip, &root),
        ("200".to_string(), "site from apply\n".to_string())
    );

    // Case 9: a multi-platform build with the one platform this machine
    // has (linux/amd64; arm64 needs an arm64 builder, which cannot run
    // here): a part builds it, the control plane pushes a manifest list of
    // it, and both workers pull that list and run its amd64 image.
    let v7 = work.join("v7");
    context(&v7, &registry, "site for linux/amd64\n", "");
    let mut cmd = berth_command(
        &lab,
        &[
            "service",
            "deploy",
            "site",
            "--build",
            v7.to_str().unwrap(),
            "--platform",
            "linux/amd64",
        ],
    );
    cmd.args(SITE_FLAGS);
    let out = tokio::task::block_in_place(|| cmd.output().unwrap());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("[linux/amd64] STEP 1/2") && log.contains("manifest list sha256:"),
        "{log}"
    );
    let b = admin
        .list_builds(Some("site"), 2)
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.parent.is_none())
        .unwrap();
    assert_eq!(
        (b.platforms.as_slice(), b.state),
        (&["linux/amd64".to_string()][..], BuildState::Succeeded)
    );
    let images = admin.list_images(None).await.unwrap();
    let list = images
        .iter()
        .find(|i| i.repository == "site" && i.tag == format!("build-{}", b.id))
        .unwrap_or_else(|| panic!("no site:build-{} in {images:?}", b.id));
    assert_eq!(list.size, None, "not a manifest list: {list:?}");
    assert_eq!(
        b.image.as_deref(),
        Some(format!("{registry}/site@{}", list.digest).as_str())
    );
    assert_eq!(
        fetch(&proxy_ip, &root),
        ("200".to_string(), "site for linux/amd64\n".to_string())
    );
}
