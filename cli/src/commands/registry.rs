//! `berth registry show|login` and `berth image list`: the fleet registry
//! from an admin's machine.

use crate::args::{ImageCmd, RegistryCmd};
use anyhow::{bail, Context};
use berth_client::AdminClient;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub async fn run(api: &AdminClient, ca_file: &Path, cmd: RegistryCmd) -> anyhow::Result<()> {
    let host = api.registry_info().await?.host;
    match cmd {
        RegistryCmd::Show => println!("{host}"),
        RegistryCmd::Login { docker } => {
            let tool = if docker { "docker" } else { "podman" };
            let ca = std::fs::read(ca_file).with_context(|| format!("--ca-file {}", ca_file.display()))?;
            let file = trust(&host, &ca, docker)?;
            println!("trusting the control plane's CA for {host}: {}", file.display());
            let mut child = Command::new(tool)
                .args(["login", "--username", "admin", "--password-stdin", &host])
                .stdin(Stdio::piped())
                .spawn()
                .with_context(|| format!("running `{tool} login` (is {tool} installed?)"))?;
            child
                .stdin
                .take()
                .context("the login's stdin")?
                .write_all(format!("{}\n", api.admin_token()).as_bytes())?;
            let status = child.wait()?;
            if !status.success() {
                bail!("`{tool} login {host}` failed ({status})");
            }
            println!("push with: {tool} push IMAGE {host}/NAME:TAG");
        }
    }
    Ok(())
}

pub async fn run_image(api: &AdminClient, cmd: ImageCmd) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::List { service } => {
            let list = api.list_images(service.as_deref()).await?;
            println!(
                "{:<30} {:<16} {:<19} {:>9}  RELEASES",
                "REPOSITORY", "TAG", "DIGEST", "SIZE"
            );
            for i in list {
                let digest = i.digest.split_once(':').map_or(i.digest.as_str(), |(_, h)| h);
                let releases: Vec<String> = i
                    .releases
                    .iter()
                    .map(|r| format!("{}#{}", r.service, r.number))
                    .collect();
                println!(
                    "{:<30} {:<16} {:<19} {:>9}  {}",
                    i.repository,
                    i.tag,
                    format!("sha256:{}", &digest[..digest.len().min(12)]),
                    i.size.map(size).unwrap_or_else(|| "-".into()),
                    if releases.is_empty() {
                        "-".into()
                    } else {
                        releases.join(" ")
                    }
                );
            }
        }
        ImageCmd::Prune { keep } => {
            eprintln!("pruning the fleet registry (retention, then garbage collection)...");
            let report = api.prune_images(keep).await?;
            for d in &report.deleted {
                let tags = if d.tags.is_empty() {
                    "(untagged)".to_string()
                } else {
                    d.tags.join(", ")
                };
                println!("deleted {}@{}  {tags}", d.repository, d.digest);
            }
            println!(
                "{} image(s) deleted, keeping {} release(s) per service; garbage collection: {}",
                report.deleted.len(),
                report.keep,
                report.garbage_collection
            );
        }
    }
    Ok(())
}

/// Bytes as people read them.
fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} kB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// Writes the CA where the tool looks for `host`'s: Docker's system
/// directory, or Podman's (the system one as root, else the user's).
fn trust(host: &str, ca: &[u8], docker: bool) -> anyhow::Result<PathBuf> {
    let mut roots = vec![];
    if docker {
        roots.push(PathBuf::from("/etc/docker/certs.d"));
    } else {
        roots.push(PathBuf::from("/etc/containers/certs.d"));
        if let Some(home) = std::env::var_os("HOME") {
            roots.push(Path::new(&home).join(".config/containers/certs.d"));
        }
    }
    let mut last = None;
    for root in roots {
        let dir = root.join(host);
        match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join("ca.crt"), ca)) {
            Ok(()) => return Ok(dir.join("ca.crt")),
            Err(e) => last = Some(format!("{}: {e}", dir.display())),
        }
    }
    bail!("cannot write the registry's CA: {}", last.unwrap_or_default())
}
