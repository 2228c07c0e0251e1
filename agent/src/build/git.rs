//! Git builds: the builder clones the repository (the `git` binary, never
//! prompting) into its work dir and packs the context directory as the tar
//! Podman's build API takes.

use berth_protocol::build::{GitSource, GitTransport};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use tokio::process::Command;

/// The files looked for when a git build names no Dockerfile, in order.
const DOCKERFILE_NAMES: &[&str] = &["Containerfile", "Dockerfile"];

/// How git signs in to the repository: options and environment for every
/// git run. A token goes to a credential helper through the environment
/// (never the command line or the URL, which other users and logs see),
/// the helper scoped to the repository's origin; a deploy key is a 0600
/// file in the build's own directory, used by ssh with host keys checked
/// strictly.
#[derive(Debug, Default)]
pub struct GitAuth {
    /// `-c NAME=VALUE` before the subcommand (no secret in them).
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// The username sent with a bare token: GitHub, Gitea and Forgejo take any
/// non-empty name with a token; GitLab wants `USER:TOKEN` in the credential.
const TOKEN_USER: &str = "x-access-token";

/// Prints the credential from the environment when git asks for it.
const CREDENTIAL_HELPER: &str =
    "!f() { test \"$1\" = get && printf 'username=%s\\npassword=%s\\n' \"$BERTH_GIT_USER\" \"$BERTH_GIT_PASSWORD\"; }; f";

impl GitAuth {
    /// Prepares the sign-in for `src` with `credential` (the opened
    /// `credential_sealed`); ssh's files go in `dir` (made 0700), which the
    /// caller removes after the clone.
    pub fn new(src: &GitSource, credential: Option<&str>, dir: &Path) -> Result<GitAuth, String> {
        let mut env = vec![];
        let mut args = vec![];
        match src.transport() {
            GitTransport::Http => {
                if let Some(c) = credential {
                    let c = c.trim();
                    let (user, password) = c.split_once(':').unwrap_or((TOKEN_USER, c));
                    let origin = origin(&src.url).ok_or("git.url: has no host")?;
                    // Empty first: forget the helpers configured on the builder.
                    args.extend(["-c".into(), "credential.helper=".into()]);
                    args.extend(["-c".into(), format!("credential.{origin}.helper={CREDENTIAL_HELPER}")]);
                    env.push(("BERTH_GIT_USER".into(), user.to_string()));
                    env.push(("BERTH_GIT_PASSWORD".into(), password.to_string()));
                }
            }
            GitTransport::Ssh => {
                let d = dir
                    .to_str()
                    .filter(|d| !d.contains('\''))
                    .ok_or("the work dir's path cannot be quoted")?;
                std::fs::create_dir_all(dir).map_err(|e| format!("{d}: {e}"))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| format!("{d}: {e}"))?;
                // Never a prompt, never an unknown host key accepted.
                let mut cmd = "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes".to_string();
                let private = |name: &str, text: &str| -> Result<String, String> {
                    let path = dir.join(name);
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    // ssh refuses a key file without its final newline.
                    f.write_all(format!("{}\n", text.trim_end()).as_bytes())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    Ok(format!("{d}/{name}"))
                };
                if let Some(key) = credential {
                    let key = private("deploy-key", key)?;
                    cmd.push_str(&format!(" -i '{key}' -o IdentitiesOnly=yes -o IdentityAgent=none"));
                }
                match &src.known_hosts {
                    Some(hosts) => {
                        let hosts = private("known_hosts", hosts)?;
                        cmd.push_str(&format!(" -o UserKnownHostsFile='{hosts}'"));
                    }
                    // The builder's /etc/ssh/ssh_known_hosts only.
                    None => cmd.push_str(" -o UserKnownHostsFile=/dev/null"),
                }
                env.push(("GIT_SSH_COMMAND".into(), cmd));
            }
            GitTransport::Plain => {}
        }
        Ok(GitAuth { args, env })
    }
}

/// `SCHEME://HOST[:PORT]` of an http(s) URL, without any user.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then(|| format!("{scheme}://{host}"))
}

/// Runs `git ARGS`, appending what it printed to `out`.
async fn git(args: &[&str], auth: &GitAuth, out: &mut String) -> Result<(), String> {
    let o = Command::new("git")
        .args(&auth.args)
        .args(args)
        .envs(auth.env.iter().map(|(k, v)| (k, v)))
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("git: {e} (is git installed on the builder?)"))?;
    out.push_str(&String::from_utf8_lossy(&o.stdout));
    out.push_str(&String::from_utf8_lossy(&o.stderr));
    if !o.status.success() {
        return Err(format!(
            "git {}: {}",
            args[0],
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

/// Clones `src` into `dir` at its ref; returns the commit. A branch or tag
/// is cloned shallow; a full commit ID needs the whole history.
pub async fn checkout(src: &GitSource, auth: &GitAuth, dir: &Path, out: &mut String) -> Result<String, String> {
    let d = dir.to_str().ok_or("the work dir is not UTF-8")?;
    match src.reference.as_deref() {
        Some(commit) if src.is_commit() => {
            git(&["clone", "-q", "--no-checkout", "--", &src.url, d], auth, out).await?;
            git(&["-C", d, "checkout", "-q", commit], auth, out).await?;
        }
        Some(r) => {
            git(
                &["clone", "-q", "--depth", "1", "--branch", r, "--", &src.url, d],
                auth,
                out,
            )
            .await?
        }
        None => git(&["clone", "-q", "--depth", "1", "--", &src.url, d], auth, out).await?,
    }
    let mut rev = String::new();
    git(&["-C", d, "rev-parse", "HEAD"], auth, &mut rev).await?;
    Ok(rev.trim().to_string())
}

/// The context directory inside the checkout, and the Dockerfile in it
/// (`given`, else the first of [`DOCKERFILE_NAMES`]).
pub fn context_and_dockerfile(
    checkout: &Path,
    src: &GitSource,
    given: &str,
) -> Result<(std::path::PathBuf, String), String> {
    let sub = src.context.as_deref().unwrap_or("");
    let root = checkout.canonicalize().map_err(|e| format!("the checkout: {e}"))?;
    // Symlinks are resolved and must stay inside the repository: a link to
    // a host directory or file would be packed or read otherwise.
    let ctx = match checkout.join(sub).canonicalize() {
        Ok(c) if c.is_dir() && c.starts_with(&root) => c,
        Ok(c) if c.is_dir() => return Err(format!("git.context: {sub:?} links outside the repository")),
        _ => return Err(format!("git.context: {sub:?} is not a directory of the repository")),
    };
    let inside = |name: &str| {
        let p = ctx.join(name);
        let plain = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file());
        plain && p.canonicalize().is_ok_and(|c| c.starts_with(&ctx))
    };
    if !given.is_empty() {
        if !inside(given) {
            return Err(format!(
                "dockerfile: {given:?} is not a file in the context {sub:?} (symlinks are not followed)"
            ));
        }
        return Ok((ctx, given.to_string()));
    }
    match DOCKERFILE_NAMES.iter().find(|n| inside(n)) {
        Some(n) => Ok((ctx, n.to_string())),
        None => Err(format!(
            "dockerfile: none in the context {:?} of the repository (looked for {})",
            if sub.is_empty() { "." } else { sub },
            DOCKERFILE_NAMES.join(", ")
        )),
    }
}

/// Packs `ctx` (without `.git`) into `tar`. Podman applies the context's
/// .containerignore / .dockerignore itself.
pub async fn pack(ctx: &Path, tar: &Path) -> Result<(), String> {
    let o = Command::new("tar")
        .arg("-cf")
        .arg(tar)
        .arg("--exclude=./.git")
        .arg("-C")
        .arg(ctx)
        .arg(".")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("tar: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "packing the checkout: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &Path, args: &[&str]) {
        let st = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }

    /// A repository with two commits on main (the first tagged v1) and
    /// web/Containerfile.
    fn repo(dir: &Path) -> (String, String) {
        run(dir, &["init", "-q", "-b", "main"]);
        std::fs::create_dir(dir.join("web")).unwrap();
        std::fs::write(dir.join("web/Containerfile"), "FROM scratch\n").unwrap();
        std::fs::write(dir.join("web/page"), "one").unwrap();
        run(dir, &["add", "."]);
        run(dir, &["commit", "-q", "-m", "one"]);
        run(dir, &["tag", "v1"]);
        let mut first = String::new();
        let o = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(dir)
            .output()
            .unwrap();
        first.push_str(String::from_utf8_lossy(&o.stdout).trim());
        std::fs::write(dir.join("web/page"), "two").unwrap();
        run(dir, &["commit", "-q", "-am", "two"]);
        let o = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(dir)
            .output()
            .unwrap();
        (first, String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    #[tokio::test]
    async fn checks_out_branches_tags_and_commits() {
        let tmp = tempfile::tempdir().unwrap();
        let origin = tmp.path().join("origin");
        std::fs::create_dir(&origin).unwrap();
        let (first, second) = repo(&origin);
        let url = format!("file://{}", origin.display());
        let src = |r: Option<&str>| GitSource::new(&url, r, Some("web"));
        for (i, (r, want, page)) in [
            (None, &second, "two"),
            (Some("main"), &second, "two"),
            (Some("v1"), &first, "one"),
            (Some(first.as_str()), &first, "one"),
        ]
        .into_iter()
        .enumerate()
        {
            let dir = tmp.path().join(format!("co{i}"));
            let mut out = String::new();
            let commit = checkout(&src(r), &GitAuth::default(), &dir, &mut out).await.unwrap();
            assert_eq!(&commit, want, "{r:?}");
            let (ctx, dockerfile) = context_and_dockerfile(&dir, &src(r), "").unwrap();
            assert_eq!(dockerfile, "Containerfile");
            assert_eq!(std::fs::read_to_string(ctx.join("page")).unwrap(), page);
        }

        let mut out = String::new();
        let err = checkout(
            &src(Some("nope")),
            &GitAuth::default(),
            &tmp.path().join("bad"),
            &mut out,
        )
        .await
        .unwrap_err();
        assert!(err.starts_with("git clone"), "{err}");
        let dir = tmp.path().join("co0");
        let mut root = src(None);
        root.context = None;
        let err = context_and_dockerfile(&dir, &root, "").unwrap_err();
        assert!(err.contains("Containerfile, Dockerfile"), "{err}");
        assert!(context_and_dockerfile(&dir, &src(None), "Nope")
            .unwrap_err()
            .starts_with("dockerfile:"));

        // Links out of the repository are refused.
        std::os::unix::fs::symlink("/etc", dir.join("out")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.join("web/Linked")).unwrap();
        let mut out_ctx = src(None);
        out_ctx.context = Some("out".into());
        assert!(context_and_dockerfile(&dir, &out_ctx, "")
            .unwrap_err()
            .contains("outside"));
        assert!(context_and_dockerfile(&dir, &src(None), "Linked")
            .unwrap_err()
            .starts_with("dockerfile:"));
        std::fs::remove_file(dir.join("out")).unwrap();
        std::fs::remove_file(dir.join("web/Linked")).unwrap();

        let tar = tmp.path().join("ctx.tar");
        pack(&dir, &tar).await.unwrap();
        let list = std::process::Command::new("tar").arg("-tf").arg(&tar).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(list.contains("./web/Containerfile"), "{list}");
        assert!(!list.contains(".git/"), "{list}");
    }
}
