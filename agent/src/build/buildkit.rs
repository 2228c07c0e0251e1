//! BuildKit as the build engine (`--build-engine buildkit`, or `auto` when
//! `buildctl` is installed and its `buildkitd` answers): the context is
//! unpacked into a directory and built by `buildctl build` with the
//! Dockerfile frontend, which pushes the image itself (`push=true`).
//!
//! Not tested against a real BuildKit: it is not packaged for Debian, so
//! none runs on the test machines. The tests run this module against a
//! stand-in `buildctl` that records what it was given.

use crate::podman::BuildParams;
use berth_protocol::RegistryAccess;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Where buildkitd listens by default (its own default, rootful).
pub const DEFAULT_ADDR: &str = "unix:///run/buildkit/buildkitd.sock";

/// Whether `buildctl` is installed and its buildkitd at `addr` answers.
pub async fn available(addr: &str) -> Result<(), String> {
    let out = Command::new("buildctl")
        .args(["--addr", addr, "debug", "workers"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(std::time::Duration::from_secs(10), out).await {
        Err(_) => Err(format!("buildctl --addr {addr}: no answer within 10 s")),
        Ok(Err(e)) => Err(format!("buildctl: {e} (is BuildKit installed?)")),
        Ok(Ok(o)) if !o.status.success() => Err(format!(
            "buildctl --addr {addr} debug workers: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(Ok(_)) => Ok(()),
    }
}

/// `buildctl build`'s arguments for `p`, the context and Dockerfile in
/// `context_dir`, secrets as files in `secrets_dir`, pushed as `names`.
pub fn build_args(
    addr: &str,
    p: &BuildParams,
    context_dir: &Path,
    secrets_dir: &Path,
    names: &[String],
) -> Vec<String> {
    let dir = context_dir.display().to_string();
    let mut a: Vec<String> = vec![
        "--addr".into(),
        addr.into(),
        "build".into(),
        "--frontend".into(),
        "dockerfile.v0".into(),
        "--local".into(),
        format!("context={dir}"),
        "--local".into(),
        format!("dockerfile={dir}"),
        "--opt".into(),
        format!("filename={}", p.dockerfile),
        "--progress".into(),
        "plain".into(),
    ];
    if let Some(t) = &p.target {
        a.extend(["--opt".into(), format!("target={t}")]);
    }
    if let Some(pl) = &p.platform {
        a.extend(["--opt".into(), format!("platform={pl}")]);
    }
    for (k, v) in &p.build_args {
        a.extend(["--opt".into(), format!("build-arg:{k}={v}")]);
    }
    for (i, k) in p.secrets.keys().enumerate() {
        a.extend([
            "--secret".into(),
            format!("id={k},src={}", secrets_dir.join(i.to_string()).display()),
        ]);
    }
    // The quotes keep the comma between names inside the one attribute.
    a.extend([
        "--output".into(),
        format!("type=image,\"name={}\",push=true", names.join(",")),
    ]);
    a
}

/// Builds the context tar `context` with BuildKit and pushes it as
/// `names` (the job's tag first) with the build's credentials; output
/// lines go to `out`. `work` is the build's own directory (made 0700,
/// removed by the caller).
pub async fn build(
    addr: &str,
    p: &BuildParams,
    registry: &RegistryAccess,
    names: &[String],
    context: &Path,
    work: &Path,
    out: mpsc::Sender<String>,
) -> Result<(), String> {
    let private = |d: &Path| -> Result<(), String> {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).map_err(|e| format!("{}: {e}", d.display()))
    };
    let (ctx, secrets, docker) = (work.join("context"), work.join("secrets"), work.join("docker"));
    for d in [work, &ctx, &secrets, &docker] {
        private(d)?;
    }
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(context)
        .arg("-C")
        .arg(&ctx)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("tar: {e}"))?;
    if !untar.status.success() {
        return Err(format!(
            "unpacking the context: {}",
            String::from_utf8_lossy(&untar.stderr).trim()
        ));
    }
    let write = |path: &Path, bytes: &[u8]| -> Result<(), String> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    for (i, v) in p.secrets.values().enumerate() {
        write(&secrets.join(i.to_string()), v.as_bytes())?;
    }
    // buildctl signs in to registries (the push, FROM pulls) with a Docker
    // config: this build's credentials only.
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{}:{}", registry.username, registry.password),
    );
    let config = serde_json::json!({"auths": {registry.host.clone(): {"auth": auth}}});
    write(&docker.join("config.json"), config.to_string().as_bytes())?;

    let mut child = Command::new("buildctl")
        .args(build_args(addr, p, &ctx, &secrets, names))
        .env("DOCKER_CONFIG", &docker)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A cancel or timeout drops this future: buildctl goes with it,
        // and buildkitd cancels the solve when its client leaves.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("buildctl: {e} (is BuildKit installed?)"))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let mut tail: Vec<String> = vec![];
    let mut lines = tokio_stream_lines(stdout, stderr);
    while let Some(line) = lines.recv().await {
        tail.push(line.clone());
        if tail.len() > 50 {
            tail.remove(0);
        }
        let _ = out.send(format!("{line}\n")).await;
    }
    let status = child.wait().await.map_err(|e| format!("buildctl: {e}"))?;
    if !status.success() {
        // BuildKit names the failing step on an `ERROR:` line (and buildctl
        // ends with `error: failed to solve: ...`); else the last line.
        let last = tail
            .iter()
            .rev()
            .find(|l| l.contains("ERROR") || l.starts_with("error:"))
            .or_else(|| tail.iter().rev().find(|l| !l.trim().is_empty()))
            .cloned()
            .unwrap_or_default();
        return Err(format!("buildctl build failed ({status}): {last}"));
    }
    Ok(())
}

/// Both streams' lines, as they come.
fn tokio_stream_lines(
    stdout: tokio::process::ChildStdout,
    stderr: tokio::process::ChildStderr,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(256);
    let tx2 = tx.clone();
    tokio::spawn(async move {
        let mut l = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = l.next_line().await {
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut l = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = l.next_line().await {
            if tx2.send(line).await.is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn params() -> BuildParams {
        BuildParams {
            dockerfile: "web/Containerfile".into(),
            tag: "cp:5000/site:build-4".into(),
            build_args: BTreeMap::from([("VERSION".into(), "1.2".into())]),
            target: Some("final".into()),
            platform: Some("linux/arm64".into()),
            registry_config: None,
            secrets: BTreeMap::from([("NPM_TOKEN".into(), "s3cret".into())]),
        }
    }

    #[test]
    fn buildctl_gets_the_frontend_its_options_secrets_and_one_push() {
        let names = [
            "cp:5000/site:build-4".to_string(),
            "cp:5000/site:git-0123456789ab".to_string(),
        ];
        let a = build_args(
            DEFAULT_ADDR,
            &params(),
            Path::new("/w/context"),
            Path::new("/w/secrets"),
            &names,
        );
        let s = a.join(" ");
        assert!(
            s.starts_with("--addr unix:///run/buildkit/buildkitd.sock build --frontend dockerfile.v0"),
            "{s}"
        );
        for want in [
            "--local context=/w/context",
            "--local dockerfile=/w/context",
            "--opt filename=web/Containerfile",
            "--opt target=final",
            "--opt platform=linux/arm64",
            "--opt build-arg:VERSION=1.2",
            "--secret id=NPM_TOKEN,src=/w/secrets/0",
            "--output type=image,\"name=cp:5000/site:build-4,cp:5000/site:git-0123456789ab\",push=true",
        ] {
            assert!(s.contains(want), "{want:?} not in {s}");
        }
        // The secret's value is never an argument.
        assert!(!s.contains("s3cret"), "{s}");
    }
}
