//! Image builds and pushes through the libpod API (Podman's own builder,
//! buildah). Verified against Podman 4.3.1:
//! - `POST /libpod/build` takes the context as an `application/x-tar` body
//!   and answers 200 at once, then streams `{"stream": ...}` lines; a failed
//!   step ends the stream with `{"error": "building at STEP \"...\": ...
//!   exit status N"}`, still under that 200.
//! - Closing the connection cancels the build once the running step ends.
//! - Registry credentials for `FROM` pulls come in `X-Registry-Config`
//!   (host → credentials), the push's in `X-Registry-Auth`.
//! - Secrets (`RUN --mount=type=secret,id=NAME`) travel as files at the top
//!   of the context tar, named in `secrets=["id=NAME,src=FILE"]`; Podman
//!   moves them out of the context before the build, so no `COPY` sees them.

use super::transport::{self, encode, ReqBody};
use super::{Error, Podman, Result, API};
use hyper::Method;
use std::collections::BTreeMap;
use std::path::Path;
use tokio::sync::mpsc;

/// What to build from a context.
#[derive(Debug, Clone, Default)]
pub struct BuildParams {
    /// The Dockerfile's path inside the context.
    pub dockerfile: String,
    /// The name the image gets.
    pub tag: String,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    /// `linux/arm64`: build for this platform (base images of it are pulled).
    pub platform: Option<String>,
    /// `X-Registry-Config`: credentials for base images, see
    /// [`crate::registry::config_header`].
    pub registry_config: Option<String>,
    /// Build secrets, NAME → value.
    pub secrets: BTreeMap<String, String>,
}

/// The tar entries that carry `secrets` ahead of the context (no end
/// blocks: the context's tar follows), and the `secrets` parameter.
fn secret_entries(secrets: &BTreeMap<String, String>) -> (Vec<u8>, Vec<String>) {
    let mut tar = Vec::new();
    let mut param = Vec::new();
    // Unguessable: a context entry of the same name (a symlink, say) would
    // replace the secret's entry and make Podman read what it points to.
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    for (i, (name, value)) in secrets.iter().enumerate() {
        let file = format!(".berth-build-secret-{nonce}-{i}");
        tar.extend_from_slice(&tar_header(&file, value.len() as u64));
        tar.extend_from_slice(value.as_bytes());
        tar.resize(tar.len().next_multiple_of(512), 0);
        param.push(format!("id={name},src={file}"));
    }
    (tar, param)
}

/// A ustar header of a regular file, mode 0600, owned by root.
fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, len: usize, v: &[u8]| {
        h[at..at + v.len().min(len)].copy_from_slice(&v[..v.len().min(len)])
    };
    put(&mut h, 0, 100, name.as_bytes());
    put(&mut h, 100, 8, b"0000600\0");
    put(&mut h, 108, 8, b"0000000\0");
    put(&mut h, 116, 8, b"0000000\0");
    put(&mut h, 124, 12, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, 12, b"00000000000\0");
    h[156] = b'0';
    put(&mut h, 257, 8, b"ustar\x0000");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    put(&mut h, 148, 8, format!("{sum:06o}\0 ").as_bytes());
    h
}

impl Podman {
    /// Builds `context` (a tar file) as `p.tag`, sending each piece of
    /// output to `out` as it comes. Ok: the image's id. A failed step is
    /// [`Error::Build`] with Podman's message, which names the step and
    /// its exit status. Dropping the future cancels the build (after its
    /// running step).
    pub async fn build(&self, p: &BuildParams, context: &Path, out: mpsc::Sender<String>) -> Result<String> {
        let mut path = format!(
            "{API}/build?dockerfile={}&t={}&layers=true&rm=true",
            encode(&p.dockerfile, b"/"),
            encode(&p.tag, b"/:")
        );
        if !p.build_args.is_empty() {
            let json = serde_json::to_string(&p.build_args).map_err(|e| Error::Decode(e.to_string()))?;
            path.push_str(&format!("&buildargs={}", encode(&json, b"")));
        }
        if let Some(pl) = &p.platform {
            path.push_str(&format!("&platform={}", encode(pl, b"")));
        }
        if let Some(t) = &p.target {
            path.push_str(&format!("&target={}", encode(t, b"")));
        }
        let (prefix, secrets) = secret_entries(&p.secrets);
        if !secrets.is_empty() {
            let json = serde_json::to_string(&secrets).map_err(|e| Error::Decode(e.to_string()))?;
            path.push_str(&format!("&secrets={}", encode(&json, b"")));
        }
        let what = "POST /libpod/build".to_string();
        let file = tokio::fs::File::open(context).await.map_err(|e| Error::Context {
            path: context.to_path_buf(),
            source: e,
        })?;
        let mut headers = vec![("content-type", "application/x-tar".to_string())];
        if let Some(c) = &p.registry_config {
            headers.push(("x-registry-config", c.clone()));
        }
        let mut resp = transport::send_with(
            &self.socket,
            Method::POST,
            &path,
            Some(ReqBody::file(prefix, file)),
            &headers,
        )
        .await?;
        if !resp.status().is_success() {
            let data = transport::read_all(resp.body_mut(), &what).await?;
            return Err(super::Response {
                status: resp.status(),
                data,
            }
            .error());
        }
        let mut error = None;
        let mut last = String::new();
        let mut lines = transport::JsonLines::new(resp.body_mut(), &what);
        while let Some(v) = lines.next().await? {
            if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
                error = Some(e.trim_end().to_string());
            } else if let Some(s) = v["stream"].as_str() {
                last = s.trim().to_string();
                // A reader that went away only loses the log.
                let _ = out.send(s.to_string()).await;
            }
        }
        match error {
            Some(message) => Err(Error::Build { message }),
            None => Ok(last),
        }
    }

    /// Names local image `name` also `repo:tag`.
    pub async fn tag(&self, name: &str, repo: &str, tag: &str) -> Result<()> {
        let path = format!(
            "{API}/images/{}/tag?repo={}&tag={}",
            encode(name, b"/:"),
            encode(repo, b"/:"),
            encode(tag, b"")
        );
        let (status, data) = transport::call(
            &self.socket,
            Method::POST,
            &path,
            None,
            std::time::Duration::from_secs(60),
        )
        .await?;
        if !status.is_success() {
            return Err(super::Response { status, data }.error());
        }
        Ok(())
    }

    /// Pushes local image `name` to its registry; `auth` is an
    /// `X-Registry-Auth` value.
    pub async fn push(&self, name: &str, auth: &str) -> Result<()> {
        let path = format!("{API}/images/{}/push?tlsVerify=true", encode(name, b"/:"));
        let what = format!("POST {API}/images/{name}/push");
        let headers = [("x-registry-auth", auth.to_string())];
        let mut resp = transport::send_with(&self.socket, Method::POST, &path, None, &headers).await?;
        let status = resp.status();
        if !status.is_success() {
            let data = transport::read_all(resp.body_mut(), &what).await?;
            return Err(super::Response { status, data }.error());
        }
        // {"stream"} and {"error"} lines; an error may come under the 200.
        let mut lines = transport::JsonLines::new(resp.body_mut(), &what);
        while let Some(v) = lines.next().await? {
            if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
                return Err(Error::Push {
                    name: name.to_string(),
                    message: e.trim_end().to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn secret_entries_lead_a_tar_that_tar_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        let ctx = dir.path().join("ctx.tar");
        let st = Command::new("tar")
            .arg("-cf")
            .arg(&ctx)
            .arg("-C")
            .arg(dir.path())
            .arg("Dockerfile")
            .status()
            .unwrap();
        assert!(st.success());
        let secrets: BTreeMap<String, String> =
            [("TOKEN".into(), "s3cret".into()), ("EMPTY".into(), String::new())].into();
        let (mut tar, param) = secret_entries(&secrets);
        let file = |p: &str| p.split_once(",src=").unwrap().1.to_string();
        let (f0, f1) = (file(&param[0]), file(&param[1]));
        assert!(
            param[0].starts_with("id=EMPTY,src=.berth-build-secret-") && f0.ends_with("-0"),
            "{param:?}"
        );
        assert!(
            param[1].starts_with("id=TOKEN,src=.berth-build-secret-") && f1.ends_with("-1"),
            "{param:?}"
        );
        assert_ne!(secret_entries(&secrets).1, param, "the names are not random");
        tar.extend_from_slice(&std::fs::read(&ctx).unwrap());
        let whole = dir.path().join("whole.tar");
        std::fs::write(&whole, &tar).unwrap();
        let out = Command::new("tar").arg("-tvf").arg(&whole).output().unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let names: Vec<&str> = list.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
        assert_eq!(names, [f0.as_str(), f1.as_str(), "Dockerfile"], "{list}");
        assert!(
            list.lines()
                .all(|l| !l.contains(".berth-build-secret") || l.starts_with("-rw-------")),
            "{list}"
        );
        let out = Command::new("tar").arg("-xOf").arg(&whole).arg(&f1).output().unwrap();
        assert_eq!(out.stdout, b"s3cret");
    }
}
