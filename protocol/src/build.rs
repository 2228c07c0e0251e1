//! Builds: a service's image built from an uploaded context on a builder
//! node, pushed to the fleet registry and deployed by digest (docs/builds.md).
//! The admin creates a build (`POST /v1/builds`), uploads its context
//! (`PUT /v1/builds/ID/context`) and follows its log; a builder node claims
//! it (`GET /v1/agent/builds/next`), posts its log and reports the result.

use crate::service::ServiceSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default bound on one build, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u32 = 30 * 60;
/// The control plane's default bound on an uploaded context
/// (`--max-build-context-mib`), which the CLI also packs at most.
pub const DEFAULT_MAX_CONTEXT_MIB: u64 = 1024;
/// Longest a build may be allowed to take.
pub const MAX_TIMEOUT_SECS: u32 = 24 * 3600;

/// `POST /v1/builds`: what to build and how to deploy it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// The service as deployed once the image is built; its `image` is left
    /// empty (the build makes it).
    pub spec: ServiceSpec,
    /// The Dockerfile's path inside the context, `/`-separated.
    pub dockerfile: String,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// The stage to build (`--target`).
    #[serde(default)]
    pub target: Option<String>,
    /// Seconds the build may take [default: 1800].
    #[serde(default)]
    pub timeout_secs: Option<u32>,
    /// Replace a rollout in progress instead of queueing behind it.
    #[serde(default)]
    pub force: bool,
    /// Architecture to build for (`amd64`, `arm64`); default: `amd64` when
    /// a builder of it is ready, else that of a ready builder.
    #[serde(default)]
    pub arch: Option<String>,
    /// Build for each of these platforms (`linux/amd64`, `linux/arm64`),
    /// each on a builder of its architecture, and deploy them as one
    /// manifest list. Not with `arch`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// Build from this repository (cloned by the builder) instead of an
    /// uploaded context. `dockerfile` may then be empty: Containerfile,
    /// else Dockerfile, in the context directory.
    #[serde(default)]
    pub git: Option<GitSource>,
}

/// The architecture of a platform `linux/ARCH[/VARIANT]` (`amd64` for
/// `linux/amd64`), which picks its builder.
pub fn platform_arch(p: &str) -> Result<&str, crate::FieldError> {
    let word = |w: &str| !w.is_empty() && w.len() <= 32 && w.bytes().all(|b| b.is_ascii_alphanumeric());
    let mut parts = p.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("linux"), Some(arch), variant, None) if word(arch) && variant.is_none_or(word) => Ok(arch),
        _ => Err(crate::FieldError::new(
            "platforms",
            format_args!("{p:?} is not a platform like linux/amd64 or linux/arm64/v8"),
        )),
    }
}

/// Whether `p` is a `/`-separated path that stays inside its root: not
/// absolute, no `..`, no NUL (empty is the root itself).
pub fn stays_inside(p: &str) -> bool {
    !p.starts_with('/') && !p.split('/').any(|c| c == "..") && !p.contains('\0')
}

/// Whether `s` is a full commit ID (40 hex digits).
pub fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A git repository to build from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GitSource {
    /// `https://`, `http://`, `git://`, `ssh://` or `file://` URL.
    pub url: String,
    /// Branch, tag or commit [default: the default branch].
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
    /// The build context inside the repository [default: its root].
    #[serde(default)]
    pub context: Option<String>,
    /// How the builder signs in, for a private repository: with an
    /// `https://` URL a token (`TOKEN`, or `USER:TOKEN` where the host
    /// wants a user), with ssh a deploy key (an OpenSSH private key). Sent
    /// by the admin once: the control plane keeps it sealed
    /// (`credential_sealed`) and never shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// `credential`, sealed: to the control plane's key in the store, to
    /// the builder's key in a job. Set by the control plane only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_sealed: Option<String>,
    /// For ssh: the host's keys as `known_hosts` lines (`ssh-keyscan HOST`).
    /// Without them the builder's /etc/ssh/ssh_known_hosts must know the
    /// host: an unknown host key is never accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<String>,
}

/// How a git URL is fetched, which decides the credential it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitTransport {
    /// `https://`, `http://`: a token.
    Http,
    /// `ssh://` or scp-like `USER@HOST:PATH`: a deploy key.
    Ssh,
    /// `git://`, `file://`: no credential.
    Plain,
}

/// Longest credential or known_hosts text taken.
const MAX_CREDENTIAL_BYTES: usize = 64 * 1024;

/// Whether `u` is an scp-like ssh address, `USER@HOST:PATH` (what GitHub
/// shows as the SSH URL).
fn is_scp_like(u: &str) -> bool {
    let Some((user_host, path)) = u.split_once(':') else {
        return false;
    };
    let Some((user, host)) = user_host.split_once('@') else {
        return false;
    };
    let word = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    word(user) && word(host) && !user.starts_with('-') && !path.is_empty() && !path.starts_with('-')
}

impl GitSource {
    /// A source of `url` at `reference`, without credentials.
    pub fn new(url: &str, reference: Option<&str>, context: Option<&str>) -> GitSource {
        GitSource {
            url: url.into(),
            reference: reference.map(String::from),
            context: context.map(String::from),
            credential: None,
            credential_sealed: None,
            known_hosts: None,
        }
    }

    pub fn transport(&self) -> GitTransport {
        let u = &self.url;
        if u.starts_with("https://") || u.starts_with("http://") {
            GitTransport::Http
        } else if u.starts_with("ssh://") || is_scp_like(u) {
            GitTransport::Ssh
        } else {
            GitTransport::Plain
        }
    }

    /// Checks the URL, ref and context as the builder will use them.
    pub fn validate(&self) -> Result<(), crate::FieldError> {
        let u = &self.url;
        let schemes = ["https://", "http://", "git://", "ssh://", "file://"];
        if !(schemes.iter().any(|s| u.starts_with(s) && u.len() > s.len()) || is_scp_like(u))
            || u.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(crate::FieldError::new(
                "git.url",
                format_args!("{u:?} is not a https://, http://, git://, ssh:// or file:// URL, or USER@HOST:PATH"),
            ));
        }
        // A password in the URL would be stored and shown with the build.
        if let Some((_, rest)) = u.split_once("://") {
            let authority = rest.split('/').next().unwrap_or("");
            if authority
                .rsplit_once('@')
                .is_some_and(|(userinfo, _)| userinfo.contains(':'))
            {
                return Err(crate::FieldError::new(
                    "git.url",
                    "has a password in it: give the token as the credential (--git-credential), which is kept sealed",
                ));
            }
        }
        if let Some(r) = &self.reference {
            // Never an option to git, never a path outside refs.
            if r.is_empty()
                || r.starts_with('-')
                || r.contains("..")
                || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
            {
                return Err(crate::FieldError::new(
                    "git.ref",
                    format_args!("{r:?} is not a branch, tag or commit"),
                ));
            }
        }
        if let Some(c) = &self.context {
            if !stays_inside(c) {
                return Err(crate::FieldError::new(
                    "git.context",
                    format_args!("{c:?} must be a directory inside the repository"),
                ));
            }
        }
        self.validate_credentials()
    }

    fn validate_credentials(&self) -> Result<(), crate::FieldError> {
        let transport = self.transport();
        if let Some(c) = &self.credential {
            let bad = |why: &str| Err(crate::FieldError::new("git.credential", why));
            match transport {
                GitTransport::Plain => return bad("git:// and file:// URLs take no credential"),
                _ if c.trim().is_empty() => return bad("is empty"),
                _ if c.len() > MAX_CREDENTIAL_BYTES => return bad("is longer than 64 KiB"),
                GitTransport::Http if c.trim().chars().any(|ch| ch.is_whitespace() || ch.is_control()) => {
                    return bad("must be one token (TOKEN or USER:TOKEN) for an https:// URL")
                }
                GitTransport::Ssh if !c.contains("PRIVATE KEY-----") => {
                    return bad("must be an OpenSSH private key (a deploy key) for an ssh URL")
                }
                _ => {}
            }
        }
        if let Some(k) = &self.known_hosts {
            let bad = |why: String| Err(crate::FieldError::new("git.known_hosts", why));
            if transport != GitTransport::Ssh {
                return bad("only an ssh URL takes known_hosts".into());
            }
            if k.len() > MAX_CREDENTIAL_BYTES {
                return bad("is longer than 64 KiB".into());
            }
            let lines: Vec<&str> = k
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect();
            if lines.is_empty() {
                return bad("has no host key lines (`ssh-keyscan HOST` prints them)".into());
            }
            if let Some(l) = lines
                .iter()
                .find(|l| l.split_whitespace().count() < 3 || l.chars().any(|c| c.is_control() && c != '\t'))
            {
                return bad(format!("{l:?} is not a known_hosts line (HOST KEYTYPE KEY)"));
            }
        }
        Ok(())
    }

    /// A full commit ID, which a shallow clone of a branch cannot fetch.
    pub fn is_commit(&self) -> bool {
        self.reference.as_deref().is_some_and(is_commit_id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    /// Made; its context is not uploaded yet.
    Uploading,
    /// Waiting for a builder node.
    Queued,
    /// A builder builds and pushes it.
    Running,
    /// Built, pushed and released.
    Succeeded,
    Failed,
    Cancelled,
}

impl BuildState {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Uploading => "uploading",
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
            BuildState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<BuildState> {
        Some(match s {
            "uploading" => BuildState::Uploading,
            "queued" => BuildState::Queued,
            "running" => BuildState::Running,
            "succeeded" => BuildState::Succeeded,
            "failed" => BuildState::Failed,
            "cancelled" => BuildState::Cancelled,
            _ => return None,
        })
    }

    /// Whether the build is over (nothing changes it any more).
    pub fn is_final(self) -> bool {
        matches!(self, BuildState::Succeeded | BuildState::Failed | BuildState::Cancelled)
    }
}

/// A build as `berth build list|show` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildInfo {
    pub id: u64,
    pub service: String,
    pub state: BuildState,
    pub dockerfile: String,
    /// Who started it (`admin`).
    pub created_by: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The builder node, once one took it.
    pub node: Option<String>,
    /// Bytes of the uploaded context.
    pub context_bytes: Option<u64>,
    /// `HOST:PORT/SERVICE@sha256:...`, once pushed.
    pub image: Option<String>,
    /// The release deployed with the image.
    pub release: Option<u64>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    pub timeout_secs: u32,
    /// The repository (`URL#REF`), for a git build.
    #[serde(default)]
    pub git: Option<String>,
    /// The commit built, for a git build.
    #[serde(default)]
    pub commit: Option<String>,
    /// A multi-platform build's platforms; a part's own one.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// For one platform of a multi-platform build: that build.
    #[serde(default)]
    pub parent: Option<u64>,
}

/// `GET /v1/agent/builds/next`: who asks. A node started with `--no-builds`
/// never asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct BuilderQuery {
    /// `amd64`, `arm64`, ... (Go's names, as image platforms use).
    pub arch: String,
    /// Started with `--builder`: preferred for builds.
    #[serde(default)]
    pub preferred: bool,
    /// Seconds to wait for a build [default 25].
    #[serde(default)]
    pub wait: Option<u64>,
}

/// A build a builder node has claimed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildJob {
    pub id: u64,
    pub dockerfile: String,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    /// `HOST:PORT/SERVICE:build-ID`: what to tag and push.
    pub tag: String,
    /// Credentials for the fleet registry: push on the service's
    /// repository, pull on the rest; valid while the build runs.
    pub registry: crate::api::RegistryAccess,
    /// Clone this instead of fetching an uploaded context.
    #[serde(default)]
    pub git: Option<GitSource>,
    pub timeout_secs: u32,
    /// Set for one platform of a multi-platform build (`linux/arm64`):
    /// built for it, and left to the control plane to list in the
    /// manifest list (and to tag with the commit).
    #[serde(default)]
    pub platform: Option<String>,
    /// The service's secrets (a JSON map), sealed to the builder's key:
    /// `RUN --mount=type=secret,id=NAME` reads them as /run/secrets/NAME.
    #[serde(default)]
    pub sealed_secrets: Option<String>,
}

/// `PUT /v1/services/NAME/link`: build and deploy the service on every
/// push to `branch` of `url` (the push webhook, `POST /v1/hooks/github`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GitLink {
    pub url: String,
    pub branch: String,
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default)]
    pub dockerfile: Option<String>,
    /// As [`GitSource::credential`]; never shown back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<String>,
}

/// A service's link as shown; `secret` only in the answer that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GitLinkInfo {
    pub service: String,
    pub link: GitLink,
    /// The link has a credential (kept sealed, never shown).
    #[serde(default)]
    pub has_credential: bool,
    /// The webhook's HMAC-SHA256 secret, shown once.
    #[serde(default)]
    pub secret: Option<String>,
    /// Where the repository's host sends pushes: `/v1/hooks/github`.
    pub hook_path: String,
}

/// The webhook's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HookOutcome {
    /// `building`, `duplicate` (this delivery was acted on before),
    /// `ignored` (no linked service for the repository and branch) or
    /// `pong` (the host's test delivery).
    pub status: String,
    /// The builds the delivery started.
    #[serde(default)]
    pub builds: Vec<u64>,
}

/// `POST /v1/agent/builds/ID/log`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildLogAck {
    /// The build was cancelled or timed out: stop it.
    pub stop: bool,
}

/// `POST /v1/agent/builds/ID/done`: how it ended on the builder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BuildDone {
    /// None: built and pushed as the job's tag.
    pub error: Option<String>,
    /// The commit a git build built.
    #[serde(default)]
    pub commit: Option<String>,
}

/// The platform name of this machine's architecture (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_sources_are_checked() {
        let ok = GitSource::new;
        ok("https://example.com/a/b.git", Some("main"), Some("web"))
            .validate()
            .unwrap();
        ok("git://198.18.1.11/site.git", Some("v1.2/rc-1"), None)
            .validate()
            .unwrap();
        for (bad, field) in [
            (ok("example.com/a.git", None, None), "git.url"),
            (ok("https://", None, None), "git.url"),
            (ok("https://x/a b", None, None), "git.url"),
            (ok("https://x/a", Some("--upload-pack=sh"), None), "git.ref"),
            (ok("https://x/a", Some("a..b"), None), "git.ref"),
            (ok("https://x/a", Some(""), None), "git.ref"),
            (ok("https://x/a", None, Some("../up")), "git.context"),
            (ok("https://x/a", None, Some("/abs")), "git.context"),
        ] {
            assert_eq!(bad.validate().unwrap_err().field, field, "{bad:?}");
        }
        assert!(ok("https://x/a", Some(&"a".repeat(40)), None).is_commit());
        assert!(!ok("https://x/a", Some("main"), None).is_commit());
    }

    #[test]
    fn platforms_name_their_architecture() {
        assert_eq!(platform_arch("linux/amd64").unwrap(), "amd64");
        assert_eq!(platform_arch("linux/arm64/v8").unwrap(), "arm64");
        for bad in ["amd64", "linux/", "windows/amd64", "linux/arm64/v8/x", "linux/a-b", ""] {
            assert_eq!(platform_arch(bad).unwrap_err().field, "platforms", "{bad}");
        }
    }

    #[test]
    fn git_credentials_are_checked() {
        let with = |url: &str, cred: Option<&str>, hosts: Option<&str>| GitSource {
            credential: cred.map(String::from),
            known_hosts: hosts.map(String::from),
            ..GitSource::new(url, None, None)
        };
        let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n";
        let hosts = "# scanned\n[127.0.0.1]:2222 ssh-ed25519 AAAAC3Nza\n";
        assert_eq!(
            with("git@github.com:org/app.git", None, None).transport(),
            GitTransport::Ssh
        );
        assert_eq!(with("ssh://git@h/app.git", None, None).transport(), GitTransport::Ssh);
        assert_eq!(with("https://h/app.git", None, None).transport(), GitTransport::Http);
        assert_eq!(with("git://h/app.git", None, None).transport(), GitTransport::Plain);
        with("https://h/app.git", Some("ghp_abc"), None).validate().unwrap();
        with("https://h/app.git", Some("ci:ghp_abc\n"), None)
            .validate()
            .unwrap();
        with("git@github.com:org/app.git", Some(key), Some(hosts))
            .validate()
            .unwrap();
        with("ssh://git@h:2222/app.git", Some(key), None).validate().unwrap();
        for (bad, field) in [
            (with("https://u:pw@h/app.git", None, None), "git.url"),
            (with("ssh://git:pw@h/app.git", None, None), "git.url"),
            (with("-oProxyCommand=x@h:p", None, None), "git.url"),
            (with("git://h/app.git", Some("tok"), None), "git.credential"),
            (with("https://h/app.git", Some("two words"), None), "git.credential"),
            (with("https://h/app.git", Some("  "), None), "git.credential"),
            (with("ssh://h/app.git", Some("not-a-key"), None), "git.credential"),
            (with("https://h/app.git", None, Some(hosts)), "git.known_hosts"),
            (
                with("ssh://h/app.git", None, Some("# only a comment\n")),
                "git.known_hosts",
            ),
            (
                with("ssh://h/app.git", None, Some("h ssh-ed25519\n")),
                "git.known_hosts",
            ),
        ] {
            assert_eq!(bad.validate().unwrap_err().field, field, "{bad:?}");
        }
        // A user without a password is no secret: allowed.
        with("https://ci@h/app.git", None, None).validate().unwrap();
    }

    #[test]
    fn states_round_trip_and_finality() {
        for s in [
            BuildState::Uploading,
            BuildState::Queued,
            BuildState::Running,
            BuildState::Succeeded,
            BuildState::Failed,
            BuildState::Cancelled,
        ] {
            assert_eq!(BuildState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!(BuildState::Failed.is_final() && !BuildState::Running.is_final());
        assert_eq!(BuildState::parse("done"), None);
    }
}
