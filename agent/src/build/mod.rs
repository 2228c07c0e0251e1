//! The builder: on workers (unless `--no-builds`), long-polls the control
//! plane for builds, one at a time. For each it downloads the context,
//! builds it with Podman's builder (libpod build API) or BuildKit
//! (`buildkit.rs`), streams the output to the build's log, pushes the
//! image to the fleet registry with the build's own credentials and
//! reports the result; the control plane then pins the digest and
//! releases the service (docs/builds.md).

pub mod buildkit;
pub mod git;

use crate::client::{Client, Refused};
use crate::podman::{BuildParams, Podman};
use crate::registry;
use berth_protocol::build::{BuildDone, BuildJob, BuilderQuery};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Output is posted to the log at least this often while there is some...
const LOG_EVERY: Duration = Duration::from_millis(250);
/// ...or as soon as this much is waiting.
const LOG_CHUNK: usize = 32 * 1024;
/// With no output, the log is still posted to (empty) this often, to learn
/// of a cancel.
const STOP_CHECK_EVERY: Duration = Duration::from_secs(2);

/// `--build-engine`, as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// BuildKit when `buildctl` is installed and buildkitd answers, else Podman.
    Auto,
    Podman,
    BuildKit,
}

impl EngineChoice {
    pub fn parse(s: &str) -> Result<EngineChoice, String> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "podman" => Ok(EngineChoice::Podman),
            "buildkit" => Ok(EngineChoice::BuildKit),
            other => Err(format!("--build-engine {other:?}: expected auto, buildkit or podman")),
        }
    }

    /// The engine builds run with: for `buildkit`, buildkitd at `addr`
    /// must answer (an error says why not); `auto` falls back to Podman.
    pub async fn resolve(self, addr: &str) -> Result<Engine, String> {
        match self {
            EngineChoice::Podman => Ok(Engine::Podman),
            EngineChoice::BuildKit => buildkit::available(addr)
                .await
                .map(|()| Engine::BuildKit(addr.to_string()))
                .map_err(|e| format!("--build-engine buildkit: {e}")),
            EngineChoice::Auto => Ok(match buildkit::available(addr).await {
                Ok(()) => Engine::BuildKit(addr.to_string()),
                Err(e) => {
                    tracing::debug!(error = %e, "no BuildKit: building with Podman");
                    Engine::Podman
                }
            }),
        }
    }
}

/// Which builder runs the builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// Podman's builder, through the node's Podman service.
    Podman,
    /// BuildKit through `buildctl`, at this buildkitd address.
    BuildKit(String),
}

pub struct BuilderSettings {
    pub engine: Engine,
    pub podman: Podman,
    /// Opens the build secrets sealed to this node.
    pub sealing: x25519_dalek::StaticSecret,
    /// Where contexts are kept while they build.
    pub work_dir: PathBuf,
    pub arch: String,
    /// Started with `--builder`.
    pub preferred: bool,
}

/// Takes and runs builds until the process ends.
pub async fn run(client: Arc<Client>, s: BuilderSettings) {
    let query = BuilderQuery {
        arch: s.arch.clone(),
        preferred: s.preferred,
        wait: Some(25),
    };
    // Contexts left by a build that an agent restart cut off.
    let _ = std::fs::remove_dir_all(&s.work_dir);
    let mut backoff = Duration::from_secs(1);
    loop {
        match client.next_build(&query).await {
            Ok(Some(job)) => {
                backoff = Duration::from_secs(1);
                tracing::info!(build = job.id, tag = %job.tag, "building");
                let mut commit = None;
                let error = build(&client, &s, &job, &mut commit).await.err();
                let done = BuildDone { error, commit };
                match &done.error {
                    None => tracing::info!(build = job.id, "built and pushed"),
                    Some(e) => tracing::warn!(build = job.id, error = %e, "build failed"),
                }
                report(&client, job.id, &done).await;
            }
            Ok(None) => backoff = Duration::from_secs(1),
            Err(e) => {
                // A control plane without a registry (409) or one that is
                // down: ask again later.
                let status = e.downcast_ref::<Refused>().map(|r| r.status.as_u16());
                tracing::debug!(error = %format!("{e:#}"), ?status, "asking for builds failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Reports the result, retrying while the control plane is unreachable
/// (a lost report would leave the build running until it times out).
async fn report(client: &Client, id: u64, done: &BuildDone) {
    for attempt in 0..10u32 {
        match client.build_done(id, done).await {
            Ok(()) => return,
            Err(e) => {
                if e.downcast_ref::<Refused>().is_some() {
                    tracing::warn!(build = id, error = %format!("{e:#}"), "the control plane refused the build's result");
                    return;
                }
                tracing::debug!(build = id, attempt, error = %format!("{e:#}"), "reporting the build failed");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Why a build ended early, as its log and the control plane see it. A
/// git build sets `commit` once it is checked out.
async fn build(
    client: &Client,
    s: &BuilderSettings,
    job: &BuildJob,
    commit: &mut Option<String>,
) -> Result<(), String> {
    std::fs::create_dir_all(&s.work_dir).map_err(|e| format!("builder: {}: {e}", s.work_dir.display()))?;
    let context = s.work_dir.join(format!("build-{}.tar", job.id));
    let secrets = crate::containers::open_secret_map(&s.sealing, job.sealed_secrets.as_deref())
        .map_err(|e| format!("build secrets: {e}"))?;
    let credential = match job.git.as_ref().and_then(|g| g.credential_sealed.as_deref()) {
        Some(sealed) => Some(
            berth_protocol::seal::open(&s.sealing, sealed)
                .ok()
                .and_then(|c| String::from_utf8(c).ok())
                .ok_or("git.credential: cannot be opened with this node's key")?,
        ),
        None => None,
    };
    // The log never shows a credential either (a token, or its USER:TOKEN's token).
    let mut masked = secrets.clone();
    if let Some(c) = &credential {
        masked.insert("git.credential".into(), c.trim().to_string());
        if let Some((_, token)) = c.trim().split_once(':') {
            masked.insert("git.credential token".into(), token.to_string());
        }
    }
    let mut log = Log::new(client, job.id, &masked);
    let opened = Opened { secrets, credential };
    let result = run_build(client, s, job, opened, &context, &mut log, commit).await;
    let _ = std::fs::remove_file(&context);
    // The control plane ends the log with the error, which may quote a
    // step's output.
    log.flush().await;
    result.map_err(|e| mask(&log.masks, &e))
}

/// What the job's sealed fields opened to.
struct Opened {
    /// Mounted with `RUN --mount=type=secret,id=NAME`.
    secrets: BTreeMap<String, String>,
    /// The git credential: for the clone only, never in the build.
    credential: Option<String>,
}

async fn run_build(
    client: &Client,
    s: &BuilderSettings,
    job: &BuildJob,
    opened: Opened,
    context: &std::path::Path,
    log: &mut Log<'_>,
    built_commit: &mut Option<String>,
) -> Result<(), String> {
    let dockerfile = match &job.git {
        None => {
            let bytes = client
                .build_context(job.id, context)
                .await
                .map_err(|e| format!("fetching the context: {e:#}"))?;
            log.push(&format!("context: {bytes} bytes\n"));
            job.dockerfile.clone()
        }
        Some(src) => {
            let checkout = s.work_dir.join(format!("build-{}-git", job.id));
            let _ = std::fs::remove_dir_all(&checkout);
            log.push(&format!(
                "cloning {}{}\n",
                src.url,
                src.reference.as_deref().map(|r| format!(" at {r}")).unwrap_or_default()
            ));
            log.flush().await;
            let mut out = String::new();
            let auth_dir = s.work_dir.join(format!("build-{}-auth", job.id));
            let cloned = match git::GitAuth::new(src, opened.credential.as_deref(), &auth_dir) {
                Ok(auth) => {
                    tokio::time::timeout(
                        Duration::from_secs(job.timeout_secs.into()),
                        git::checkout(src, &auth, &checkout, &mut out),
                    )
                    .await
                }
                Err(e) => Ok(Err(e)),
            };
            let _ = std::fs::remove_dir_all(&auth_dir);
            log.push(&out);
            let result = async {
                let commit = cloned.map_err(|_| format!("timed out after {} s", job.timeout_secs))??;
                log.push(&format!("commit {commit}\n"));
                let (ctx, dockerfile) = git::context_and_dockerfile(&checkout, src, &job.dockerfile)?;
                git::pack(&ctx, context).await?;
                Ok::<_, String>((commit, dockerfile))
            }
            .await;
            let _ = std::fs::remove_dir_all(&checkout);
            let (commit, dockerfile) = result?;
            *built_commit = Some(commit);
            dockerfile
        }
    };
    let params = BuildParams {
        dockerfile,
        tag: job.tag.clone(),
        build_args: job.build_args.clone(),
        target: job.target.clone(),
        platform: job.platform.clone(),
        registry_config: Some(registry::config_header(&job.registry)),
        secrets: opened.secrets,
    };
    // A git build is also tagged with its commit (the layers are there
    // already: this push sends a manifest). One platform of several is
    // not: the control plane tags their manifest list.
    let commit_tag = built_commit
        .as_deref()
        .filter(|_| job.platform.is_none())
        .zip(job.tag.rsplit_once(':'))
        .map(|(c, (repo, _))| (repo.to_string(), format!("git-{}", &c[..c.len().min(12)])));
    let (tx, mut rx) = mpsc::channel::<String>(256);
    let kit_dir = s.work_dir.join(format!("build-{}-buildkit", job.id));
    let building = async {
        match &s.engine {
            Engine::Podman => s
                .podman
                .build(&params, context, tx)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Engine::BuildKit(addr) => {
                let mut names = vec![job.tag.clone()];
                names.extend(commit_tag.iter().map(|(repo, tag)| format!("{repo}:{tag}")));
                buildkit::build(addr, &params, &job.registry, &names, context, &kit_dir, tx).await
            }
        }
    };
    tokio::pin!(building);
    let deadline = tokio::time::sleep(Duration::from_secs(job.timeout_secs.into()));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(LOG_EVERY);
    let built = loop {
        tokio::select! {
            r = &mut building => break r,
            Some(text) = rx.recv() => {
                log.push(&text);
                if log.pending() >= LOG_CHUNK && log.flush().await {
                    return Err("cancelled".into());
                }
            }
            _ = tick.tick() => {
                if log.due() && log.flush().await {
                    return Err("cancelled".into());
                }
            }
            _ = &mut deadline => return Err(format!("timed out after {} s", job.timeout_secs)),
        }
    };
    while let Ok(text) = rx.try_recv() {
        log.push(&text);
    }
    let _ = std::fs::remove_dir_all(&kit_dir);
    built?;
    if let Engine::BuildKit(_) = s.engine {
        return Ok(()); // pushed by buildctl, with the commit tag
    }
    log.push(&format!("pushing {}\n", job.tag));
    if log.flush().await {
        return Err("cancelled".into());
    }
    let auth = registry::auth_header(&job.registry);
    s.podman.push(&job.tag, &auth).await.map_err(|e| e.to_string())?;
    if let Some((repo, tag)) = &commit_tag {
        s.podman.tag(&job.tag, repo, tag).await.map_err(|e| e.to_string())?;
        let name = format!("{repo}:{tag}");
        log.push(&format!("pushing {name}\n"));
        s.podman.push(&name, &auth).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Secret values shorter than this are not masked in the log (masking
/// "1" would garble every line).
const MASK_MIN: usize = 4;

/// The build's log as posted to the control plane: output is batched
/// (every [`LOG_EVERY`] or [`LOG_CHUNK`] bytes), with every secret value a
/// step prints replaced by `[secret NAME]`; each post's answer says whether
/// the build was cancelled or timed out there.
struct Log<'a> {
    client: &'a Client,
    id: u64,
    buf: Vec<u8>,
    last_post: tokio::time::Instant,
    masks: Vec<(String, String)>,
}

impl<'a> Log<'a> {
    fn new(client: &'a Client, id: u64, secrets: &BTreeMap<String, String>) -> Self {
        Log {
            client,
            id,
            buf: Vec::new(),
            last_post: tokio::time::Instant::now(),
            masks: masks(secrets),
        }
    }

    fn push(&mut self, text: &str) {
        self.buf.extend_from_slice(text.as_bytes());
    }

    fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Output waits, or the control plane was not asked for a while.
    fn due(&self) -> bool {
        !self.buf.is_empty() || self.last_post.elapsed() >= STOP_CHECK_EVERY
    }

    /// Posts what waits; true when the build is to stop. A post that fails
    /// keeps its text for the next one.
    async fn flush(&mut self) -> bool {
        self.last_post = tokio::time::Instant::now();
        // Masked as a whole: a value may come split over two pieces.
        let text = mask(&self.masks, &String::from_utf8_lossy(&self.buf)).into_bytes();
        match self.client.build_log(self.id, text).await {
            Ok(ack) => {
                self.buf.clear();
                ack.stop
            }
            Err(e) => {
                // Refused: the build is not this node's any more.
                if e.downcast_ref::<Refused>().is_some() {
                    self.buf.clear();
                    return true;
                }
                tracing::debug!(build = self.id, error = %format!("{e:#}"), "posting the build log failed");
                false
            }
        }
    }
}

/// (value, replacement) pairs, longest value first (a secret that contains
/// another is masked whole).
fn masks(secrets: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut m: Vec<(String, String)> = secrets
        .iter()
        .filter(|(_, v)| v.len() >= MASK_MIN)
        .map(|(k, v)| (v.clone(), format!("[secret {k}]")))
        .collect();
    m.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
    m
}

fn mask(masks: &[(String, String)], text: &str) -> String {
    let mut out = text.to_string();
    for (value, with) in masks {
        if out.contains(value.as_str()) {
            out = out.replace(value.as_str(), with);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_masked_in_the_log() {
        let secrets: BTreeMap<String, String> = [
            ("TOKEN".to_string(), "abcd1234".to_string()),
            ("LONG".to_string(), "xxabcd1234yy".to_string()),
            ("PIN".to_string(), "42".to_string()),
        ]
        .into();
        let m = masks(&secrets);
        assert_eq!(
            mask(&m, "t=abcd1234 l=xxabcd1234yy n=42\n"),
            "t=[secret TOKEN] l=[secret LONG] n=42\n"
        );
        assert_eq!(mask(&m, "nothing here"), "nothing here");
    }

    #[test]
    fn only_podman_is_an_engine_today() {
        assert_eq!(EngineChoice::parse("auto"), Ok(EngineChoice::Auto));
        assert_eq!(EngineChoice::parse("podman"), Ok(EngineChoice::Podman));
        assert_eq!(EngineChoice::parse("buildkit"), Ok(EngineChoice::BuildKit));
        assert!(EngineChoice::parse("kaniko").unwrap_err().contains("kaniko"));
    }
}
