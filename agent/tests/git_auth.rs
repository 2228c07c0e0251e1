//! Git builds from private repositories, on real servers: a token against
//! `git http-backend` behind busybox httpd's basic auth, and a deploy key
//! against OpenSSH's sshd (unpacked by scripts/test-sshd.sh, run in a mount
//! namespace of its own so its privilege-separation user exists there
//! only). Loopback only.

use berth_agent::build::git::{checkout, GitAuth};
use berth_protocol::build::GitSource;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn run(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A bare repository `root/app.git` with one commit; returns the commit.
fn bare_repo(root: &Path) -> String {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    run(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("Containerfile"), "FROM scratch\n").unwrap();
    run(&work, &["add", "."]);
    run(&work, &["commit", "-q", "-m", "one"]);
    let commit = run(&work, &["rev-parse", "HEAD"]);
    run(root, &["clone", "-q", "--bare", "work", "app.git"]);
    commit
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "the server exited ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn clone(src: &GitSource, credential: Option<&str>, tmp: &Path, n: &str) -> Result<String, String> {
    let auth = GitAuth::new(src, credential, &tmp.join(format!("auth-{n}")))?;
    let mut out = String::new();
    let r = checkout(src, &auth, &tmp.join(format!("co-{n}")), &mut out).await;
    if let Some(c) = credential {
        assert!(!out.contains(c.trim()), "git printed the credential: {out}");
    }
    r
}

#[tokio::test]
async fn https_token_signs_in_and_is_not_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let commit = bare_repo(root);
    let cgi = root.join("www/cgi-bin");
    std::fs::create_dir_all(&cgi).unwrap();
    let script = cgi.join("git");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nGIT_PROJECT_ROOT='{}' GIT_HTTP_EXPORT_ALL=1 exec git http-backend\n",
            root.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Two accounts: a bare token (sent with the default user) and USER:TOKEN.
    std::fs::write(
        root.join("httpd.conf"),
        "/cgi-bin:x-access-token:tok-bare-123\n/cgi-bin:ci:tok-user-456\n",
    )
    .unwrap();
    let port = free_port();
    let log = root.join("httpd.log");
    let mut child = Command::new("busybox")
        .args([
            "httpd",
            "-f",
            "-vv",
            "-p",
            &format!("127.0.0.1:{port}"),
            "-r",
            "git",
            "-h",
        ])
        .arg(root.join("www"))
        .arg("-c")
        .arg(root.join("httpd.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("busybox httpd");
    wait_port(port, &mut child, &log);
    let _server = Server(child);
    let src = GitSource::new(
        &format!("http://127.0.0.1:{port}/cgi-bin/git/app.git"),
        Some("main"),
        None,
    );

    assert_eq!(clone(&src, Some("tok-bare-123"), root, "bare").await.unwrap(), commit);
    assert_eq!(
        clone(&src, Some("ci:tok-user-456\n"), root, "user").await.unwrap(),
        commit
    );
    // Nothing of the credential stays in the checkout.
    let config = std::fs::read_to_string(root.join("co-user/.git/config")).unwrap();
    assert!(!config.contains("tok-user-456") && !config.contains("ci@"), "{config}");

    let err = clone(&src, Some("tok-wrong"), root, "wrong").await.unwrap_err();
    assert!(err.contains("Authentication failed"), "{err}");
    let err = clone(&src, None, root, "none").await.unwrap_err();
    assert!(err.contains("could not read Username"), "{err}");
}

/// The sshd binary scripts/test-sshd.sh unpacked.
fn sshd_binary() -> PathBuf {
    let p = std::env::var_os("BERTH_TEST_SSHD")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-sshd/root/usr/sbin/sshd"));
    assert!(
        p.exists(),
        "no sshd at {}: run `bash scripts/test-sshd.sh` (or set BERTH_TEST_SSHD)",
        p.display()
    );
    p.canonicalize().unwrap()
}

fn keygen(path: &Path) -> String {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read_to_string(path).unwrap()
}

/// `[127.0.0.1]:PORT KEYTYPE KEY` for the public key at `pub_path`.
fn known_hosts_line(port: u16, pub_path: &Path) -> String {
    let key = std::fs::read_to_string(pub_path).unwrap();
    let mut f = key.split_whitespace();
    format!("[127.0.0.1]:{port} {} {}\n", f.next().unwrap(), f.next().unwrap())
}

#[tokio::test]
async fn ssh_deploy_key_with_strict_host_keys() {
    let sshd = sshd_binary();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let commit = bare_repo(root);
    let host_key = root.join("host_key");
    keygen(&host_key);
    let deploy_key = keygen(&root.join("deploy_key"));
    let other_key = keygen(&root.join("other_key"));
    std::fs::copy(root.join("deploy_key.pub"), root.join("authorized_keys")).unwrap();
    let port = free_port();
    std::fs::write(
        root.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nPidFile none\nStrictModes no\n",
            host_key.display(),
            root.join("authorized_keys").display()
        ),
    )
    .unwrap();
    // sshd wants its privilege-separation user and /run/sshd: both exist in
    // its own mount namespace only.
    let mut passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd.push_str("sshd:x:65534:65534:sshd:/run/sshd:/usr/sbin/nologin\n");
    std::fs::write(root.join("passwd"), passwd).unwrap();
    let libs = sshd.parent().unwrap().join("../lib/x86_64-linux-gnu");
    let script = format!(
        "set -e; mount --bind '{}' /etc/passwd; mount -t tmpfs tmpfs /run; mkdir -m 755 /run/sshd; \
         LD_LIBRARY_PATH='{}' exec '{}' -D -e -f '{}'",
        root.join("passwd").display(),
        libs.display(),
        sshd.display(),
        root.join("sshd_config").display()
    );
    let log = root.join("sshd.log");
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("unshare");
    wait_port(port, &mut child, &log);
    let _server = Server(child);

    let url = format!("ssh://root@127.0.0.1:{port}{}/app.git", root.display());
    let known = known_hosts_line(port, &root.join("host_key.pub"));
    let src = |hosts: Option<&str>| GitSource {
        known_hosts: hosts.map(String::from),
        ..GitSource::new(&url, Some("main"), None)
    };
    src(Some(&known)).validate().unwrap();
    assert_eq!(
        clone(&src(Some(&known)), Some(&deploy_key), root, "ok").await.unwrap(),
        commit
    );
    // The key and known_hosts files are the build's own, 0600.
    let mode = std::fs::metadata(root.join("auth-ok/deploy-key"))
        .unwrap()
        .permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);

    // A key the server does not know.
    let err = clone(&src(Some(&known)), Some(&other_key), root, "other")
        .await
        .unwrap_err();
    assert!(err.contains("Permission denied"), "{err}");
    // A host key other than the one given: refused before signing in.
    let wrong = known_hosts_line(port, &root.join("other_key.pub"));
    let err = clone(&src(Some(&wrong)), Some(&deploy_key), root, "spoofed")
        .await
        .unwrap_err();
    assert!(err.contains("Host key verification failed"), "{err}");
    // No known_hosts and the host is not in /etc/ssh/ssh_known_hosts: refused,
    // never accepted on first sight.
    let err = clone(&src(None), Some(&deploy_key), root, "unknown").await.unwrap_err();
    assert!(err.contains("Host key verification failed"), "{err}");
}
