//! Git builds: the builder clones the repository (the `git` binary, never
//! prompting) into its work dir and packs the context directory as the tar
//! Podman's build API takes.

use berth_protocol::build::GitSource;
use std::path::Path;
use tokio::process::Command;

/// The files looked for when a git build names no Dockerfile, in order.
const DOCKERFILE_NAMES: &[&str] = &["Containerfile", "Dockerfile"];

/// Runs `git ARGS`, appending what it printed to `out`.
async fn git(args: &[&str], out: &mut String) -> Result<(), String> {
    let o = Command::new("git")
        .args(args)
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
pub async fn checkout(src: &GitSource, dir: &Path, out: &mut String) -> Result<String, String> {
    let d = dir.to_str().ok_or("the work dir is not UTF-8")?;
    match src.reference.as_deref() {
        Some(commit) if src.is_commit() => {
            git(&["clone", "-q", "--no-checkout", "--", &src.url, d], out).await?;
            git(&["-C", d, "checkout", "-q", commit], out).await?;
        }
        Some(r) => git(&["clone", "-q", "--depth", "1", "--branch", r, "--", &src.url, d], out).await?,
        None => git(&["clone", "-q", "--depth", "1", "--", &src.url, d], out).await?,
    }
    let mut rev = String::new();
    git(&["-C", d, "rev-parse", "HEAD"], &mut rev).await?;
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
        let src = |r: Option<&str>| GitSource {
            url: url.clone(),
            reference: r.map(String::from),
            context: Some("web".into()),
        };
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
            let commit = checkout(&src(r), &dir, &mut out).await.unwrap();
            assert_eq!(&commit, want, "{r:?}");
            let (ctx, dockerfile) = context_and_dockerfile(&dir, &src(r), "").unwrap();
            assert_eq!(dockerfile, "Containerfile");
            assert_eq!(std::fs::read_to_string(ctx.join("page")).unwrap(), page);
        }

        let mut out = String::new();
        let err = checkout(&src(Some("nope")), &tmp.path().join("bad"), &mut out)
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
