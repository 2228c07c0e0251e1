//! Image builds and pushes through the libpod API (Podman's own builder,
//! buildah). Verified against Podman 4.3.1:
//! - `POST /libpod/build` takes the context as an `application/x-tar` body
//!   and answers 200 at once, then streams `{"stream": ...}` lines; a failed
//!   step ends the stream with `{"error": "building at STEP \"...\": ...
//!   exit status N"}`, still under that 200.
//! - Closing the connection cancels the build once the running step ends.
//! - Registry credentials for `FROM` pulls come in `X-Registry-Config`
//!   (host → credentials), the push's in `X-Registry-Auth`.

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
    /// `X-Registry-Config`: credentials for base images, see
    /// [`crate::registry::config_header`].
    pub registry_config: Option<String>,
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
        if let Some(t) = &p.target {
            path.push_str(&format!("&target={}", encode(t, b"")));
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
        let mut resp =
            transport::send_with(&self.socket, Method::POST, &path, Some(ReqBody::file(file)), &headers).await?;
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
