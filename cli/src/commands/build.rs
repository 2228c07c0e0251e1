//! `berth build ...` and `berth service deploy NAME --build DIR`: pack the
//! context, upload it, follow the build's log, then the rollout of the
//! release it makes.

use super::service::started;
use crate::args::{BuildArgs, BuildCmd, GitAuthArgs, WaitArgs};
use crate::context;
use berth_client::AdminClient;
use berth_protocol::build::{BuildInfo, BuildRequest, BuildState, GitSource};
use berth_protocol::service::ServiceSpec;
use std::io::{IsTerminal, Write};

/// The CLI packs at most this much (the control plane's default limit;
/// one configured lower answers 413).
const MAX_CONTEXT_BYTES: u64 = berth_protocol::build::DEFAULT_MAX_CONTEXT_MIB << 20;

pub async fn run(api: &AdminClient, cmd: BuildCmd) -> anyhow::Result<i32> {
    match cmd {
        BuildCmd::List { service, limit } => print_builds(&api.list_builds(service.as_deref(), limit).await?),
        BuildCmd::Show { id } => print_build(&api.get_build(id).await?),
        BuildCmd::Logs { id, follow } => {
            api.build_logs(id, follow, write_out).await?;
            if follow {
                let b = api.get_build(id).await?;
                println!("build {id} {}", b.state.as_str());
                return Ok(if b.state == BuildState::Succeeded { 0 } else { 1 });
            }
        }
        BuildCmd::Cancel { id } => {
            let b = api.cancel_build(id).await?;
            println!("build {id} {}", b.state.as_str());
        }
    }
    Ok(0)
}

fn write_out(chunk: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(chunk);
    let _ = out.flush();
}

/// The contents of `--git-credential` and `--git-known-hosts`.
pub fn read_git_auth(a: &GitAuthArgs) -> anyhow::Result<(Option<String>, Option<String>)> {
    let read = |flag: &str, p: &Option<std::path::PathBuf>| -> anyhow::Result<Option<String>> {
        p.as_ref()
            .map(|p| {
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--{flag} {}: cannot read it: {e}", p.display()))
            })
            .transpose()
    };
    Ok((
        read("git-credential", &a.git_credential)?,
        read("git-known-hosts", &a.git_known_hosts)?,
    ))
}

/// A git source's error as the flag that was given: `--ref: ...`.
pub fn git_flag_error(e: &berth_protocol::FieldError) -> String {
    let flag = match e.field.as_str() {
        "git.url" => "git",
        "git.ref" => "ref",
        "git.context" => "context",
        "git.credential" => "git-credential",
        "git.known_hosts" => "git-known-hosts",
        other => other,
    };
    let why = e.message.strip_prefix(e.field.as_str()).unwrap_or(&e.message);
    format!("--{flag}{why}")
}

/// `service deploy NAME --build DIR | --git URL`: `spec` without an image.
pub async fn deploy(api: &AdminClient, b: BuildArgs, spec: ServiceSpec, wait: WaitArgs) -> anyhow::Result<i32> {
    // Everything is checked before anything is packed or uploaded.
    let mut planned = spec.clone();
    planned.image = format!("registry.invalid/{}:build", spec.name);
    planned.validate().map_err(anyhow::Error::msg)?;
    let git = match b.git {
        Some(url) => {
            let (credential, known_hosts) = read_git_auth(&b.auth)?;
            let g = GitSource {
                credential,
                known_hosts,
                ..GitSource::new(&url, b.git_ref.as_deref(), b.context.as_deref())
            };
            g.validate().map_err(|e| anyhow::anyhow!(git_flag_error(&e)))?;
            Some(g)
        }
        None => None,
    };
    let dir = b.build;
    let dockerfile = match (&dir, &b.dockerfile) {
        (Some(dir), explicit) => context::find_dockerfile(dir, explicit.as_deref())?,
        // The builder looks inside the repository.
        (None, Some(d)) => d.to_string_lossy().into_owned(),
        (None, None) => String::new(),
    };
    let name = spec.name.clone();
    let req = BuildRequest {
        spec,
        dockerfile: dockerfile.clone(),
        build_args: b.build_args.into_iter().collect(),
        target: b.target,
        timeout_secs: b.build_timeout,
        force: wait.force,
        arch: None,
        platforms: b.platforms,
        git,
    };
    // Packed into a private temporary file, removed when it drops.
    let tar = match &dir {
        Some(dir) => {
            let mut file = tempfile::Builder::new()
                .prefix("berth-context-")
                .suffix(".tar")
                .tempfile()?;
            let packed = context::pack(
                dir,
                &dockerfile,
                MAX_CONTEXT_BYTES,
                std::io::BufWriter::new(file.as_file_mut()),
            )?;
            println!(
                "context {}: {} files, {} (Dockerfile {dockerfile})",
                dir.display(),
                packed.files,
                human_bytes(packed.bytes)
            );
            Some(file)
        }
        None => None,
    };
    let build = api.create_build(&req).await?;
    let id = build.id;
    match &build.git {
        Some(g) => println!("build {id} of {name}: from {g}"),
        None => println!("build {id} of {name}: uploading"),
    }
    // Ctrl-C from here on is about this build, during the upload too.
    let run = async {
        if let Some(tar) = &tar {
            if let Err(e) = api.upload_build_context(id, tar.path()).await {
                // A refused upload already failed the build; a broken one
                // must not leave it waiting.
                let _ = api.cancel_build(id).await;
                return Err(anyhow::Error::from(e));
            }
        }
        api.build_logs(id, true, write_out).await?;
        Ok(())
    };
    tokio::select! {
        r = run => r?,
        _ = tokio::signal::ctrl_c() => return interrupted(api, id).await,
    }
    drop(tar);
    let b = api.get_build(id).await?;
    match (b.state, b.release) {
        (BuildState::Succeeded, Some(release)) => {
            println!(
                "build {id} succeeded: {} (release {release})",
                b.image.as_deref().unwrap_or("")
            );
            let info = api.show_service(&name).await?;
            started(api, &info, wait).await
        }
        // The log ended with the reason.
        (state, _) => {
            eprintln!("build {id} {}; nothing was deployed", state.as_str());
            Ok(1)
        }
    }
}

/// Ctrl-C while a build runs: on a terminal, asks whether to cancel it;
/// otherwise (a script's SIGINT) cancels it.
async fn interrupted(api: &AdminClient, id: u64) -> anyhow::Result<i32> {
    let cancel = if std::io::stdin().is_terminal() {
        eprint!("\ncancel the build? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let read = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut answer).map(|_| answer));
        matches!(read.await, Ok(Ok(a)) if a.trim().eq_ignore_ascii_case("y") || a.trim().eq_ignore_ascii_case("yes"))
    } else {
        true
    };
    if cancel {
        match api.cancel_build(id).await {
            Ok(b) => eprintln!("build {id} {}", b.state.as_str()),
            Err(e) => eprintln!("build {id}: {e}"),
        }
    } else {
        eprintln!("build {id} goes on; follow it with `berth build logs {id} -f`");
    }
    Ok(130)
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn print_builds(builds: &[BuildInfo]) {
    println!(
        "{:<6} {:<20} {:<10} {:<12} {:<10} IMAGE",
        "ID", "SERVICE", "STATE", "NODE", "RELEASE"
    );
    for b in builds {
        println!(
            "{:<6} {:<20} {:<10} {:<12} {:<10} {}",
            b.id,
            b.service,
            b.state.as_str(),
            match (&b.node, b.parent) {
                (Some(n), _) => n.clone(),
                (None, None) if b.platforms.len() > 1 => format!("{} platforms", b.platforms.len()),
                _ => "-".into(),
            },
            b.release.map_or("-".into(), |r| r.to_string()),
            b.image.as_deref().or(b.error.as_deref()).unwrap_or("-")
        );
    }
}

fn print_build(b: &BuildInfo) {
    println!("build {} of {}: {}", b.id, b.service, b.state.as_str());
    println!("  dockerfile: {}", b.dockerfile);
    if let Some(g) = &b.git {
        println!("  git:        {g}");
    }
    if let Some(c) = &b.commit {
        println!("  commit:     {c}");
    }
    println!("  started by: {}", b.created_by);
    if !b.platforms.is_empty() {
        println!("  platforms:  {}", b.platforms.join(", "));
    }
    if let Some(p) = b.parent {
        println!("  part of:    build {p}");
    }
    if let Some(n) = &b.node {
        println!("  builder:    {n}");
    }
    if let Some(n) = b.context_bytes {
        println!("  context:    {}", human_bytes(n));
    }
    if let (Some(s), Some(f)) = (b.started_at, b.finished_at) {
        println!("  took:       {} s", (f - s).max(0));
    }
    if let Some(i) = &b.image {
        println!("  image:      {i}");
    }
    if let Some(r) = b.release {
        println!("  release:    {r}");
    }
    if let Some(e) = &b.error {
        println!("  error:      {e}");
    }
    println!("  timeout:    {} s", b.timeout_secs);
}
