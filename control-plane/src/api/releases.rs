//! What a server needs to join and upgrade: `setup.sh`, `update.sh` and
//! `uninstall.sh` (with this control plane's URL, CA and release key filled
//! in), and the signed agent builds `berth release sign` put in the releases
//! directory:
//!
//! ```text
//! RELEASES_DIR/release.pub          Ed25519 public key (PEM)
//! RELEASES_DIR/latest               the version setup.sh installs
//! RELEASES_DIR/VERSION/manifest     "SHA256  FILE" lines (sha256sum format)
//! RELEASES_DIR/VERSION/manifest.sig Ed25519 signature of manifest (64 bytes)
//! RELEASES_DIR/VERSION/FILE         berth-agent-linux-amd64, berth-proxy-linux-arm64, ...
//! ```
//!
//! Nodes verify the signature with the key setup.sh pinned in
//! /etc/berth/release.pub, so a control plane alone cannot push a build
//! that was not signed with the release key. All of it is public.

use super::{Path, Routes};
use crate::error::{ApiErr, ApiResult};
use crate::state::SharedState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_protocol::names::valid_version;
use berth_protocol::ErrorCode;
use std::path::PathBuf;
use utoipa_axum::routes;

const SETUP: &str = include_str!("../../../installer/setup.sh");
const UPDATE: &str = include_str!("../../../installer/update.sh");
const UNINSTALL: &str = include_str!("../../../installer/uninstall.sh");
const UNITS: [(&str, &str); 4] = [
    (
        "berth-agent.service",
        include_str!("../../../systemd/berth-agent.service"),
    ),
    (
        "berth-proxy.service",
        include_str!("../../../systemd/berth-proxy.service"),
    ),
    (
        "berth-wireguard.service",
        include_str!("../../../systemd/berth-wireguard.service"),
    ),
    (
        "berth-control-plane.service",
        include_str!("../../../systemd/berth-control-plane.service"),
    ),
];

pub struct Releases {
    pub dir: PathBuf,
}

impl Releases {
    pub fn latest(&self) -> Option<String> {
        let v = std::fs::read_to_string(self.dir.join("latest")).ok()?;
        let v = v.trim();
        valid_version(v).then(|| v.to_string())
    }

    pub fn public_key_pem(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("release.pub")).ok()
    }

    /// Whether `version` was published (has a signed manifest).
    pub fn exists(&self, version: &str) -> bool {
        valid_version(version)
            && self.dir.join(version).join("manifest").is_file()
            && self.dir.join(version).join("manifest.sig").is_file()
    }

    /// Files of a release: the manifest, its signature, and what it lists.
    fn file(&self, version: &str, name: &str) -> Option<PathBuf> {
        if !valid_version(version) {
            return None;
        }
        let dir = self.dir.join(version);
        if name == "manifest" || name == "manifest.sig" {
            return Some(dir.join(name));
        }
        let manifest = std::fs::read_to_string(dir.join("manifest")).ok()?;
        manifest
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|f| f == name)
            .then(|| dir.join(name))
    }
}

/// Fills the placeholders of an installer script.
pub fn render(script: &str, url: &str, ca_pem: &str, release_key: &str, latest: &str) -> String {
    let mut out = String::with_capacity(script.len() + 8192);
    for line in script.split_inclusive('\n') {
        if let Some(name) = line.trim().strip_prefix("@@UNIT:").and_then(|l| l.strip_suffix("@@")) {
            if let Some((_, body)) = UNITS.iter().find(|(n, _)| *n == name) {
                out.push_str(body);
                continue;
            }
        }
        out.push_str(
            &line
                .replace("@@BERTH_URL@@", url)
                .replace("@@BERTH_LATEST@@", latest)
                .replace("@@BERTH_CA_PEM@@", ca_pem.trim_end())
                .replace("@@BERTH_RELEASE_KEY@@", release_key.trim_end()),
        );
    }
    out
}

pub fn routes() -> Routes {
    Routes::default()
        .routes(routes!(setup_sh))
        .routes(routes!(update_sh))
        .routes(routes!(uninstall_sh))
        .routes(routes!(latest))
        .routes(routes!(release_file))
}

/// The installer: `curl -sSL https://CONTROL-PLANE/setup.sh | sudo bash -s -- --token T`.
#[utoipa::path(get, path = "/setup.sh", tag = "public",
    responses((status = 200, description = "The script", content_type = "text/x-shellscript", body = String)))]
async fn setup_sh(s: State<SharedState>, h: HeaderMap) -> Response {
    script(s, h, SETUP).await
}

/// Upgrades the agent on a server to the latest release.
#[utoipa::path(get, path = "/update.sh", tag = "public",
    responses((status = 200, description = "The script", content_type = "text/x-shellscript", body = String)))]
async fn update_sh(s: State<SharedState>, h: HeaderMap) -> Response {
    script(s, h, UPDATE).await
}

/// Removes Berth from a server.
#[utoipa::path(get, path = "/uninstall.sh", tag = "public",
    responses((status = 200, description = "The script", content_type = "text/x-shellscript", body = String)))]
async fn uninstall_sh(s: State<SharedState>, h: HeaderMap) -> Response {
    script(s, h, UNINSTALL).await
}

async fn script(State(s): State<SharedState>, headers: HeaderMap, body: &'static str) -> Response {
    let key = s.releases.public_key_pem().unwrap_or_default();
    let latest = s.releases.latest().unwrap_or_default();
    let text = render(body, &script_url(&s.advertise_url, &headers), &s.ca_pem, &key, &latest);
    ([(header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8")], text).into_response()
}

/// The URL nodes are told to use: the advertised one, unless that is a
/// wildcard listen address (no --advertise-url or --san), then the host the
/// script was fetched from, which evidently reaches this control plane.
fn script_url(advertised: &str, headers: &HeaderMap) -> String {
    let wildcard = advertised.starts_with("https://0.0.0.0:") || advertised.starts_with("https://[::]:");
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)));
    match host {
        Some(h) if wildcard => format!("https://{h}"),
        _ => advertised.to_string(),
    }
}

/// The latest published release's version.
#[utoipa::path(get, path = "/releases/latest", tag = "public",
    responses((status = 200, description = "The version, one line", content_type = "text/plain", body = String)))]
async fn latest(State(s): State<SharedState>) -> ApiResult<String> {
    s.releases.latest().map(|v| format!("{v}\n")).ok_or_else(|| {
        ApiErr::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "release: no release published (berth release sign)",
        )
        .on("release")
    })
}

/// A file of a release: an agent binary, its SHA256SUMS, the signature.
#[utoipa::path(get, path = "/releases/{version}/{file}", tag = "public",
    params(("version" = String, Path, description = "Release version"), ("file" = String, Path, description = "File name")),
    responses((status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>)))]
async fn release_file(
    State(s): State<SharedState>,
    Path((version, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let not_found = || {
        ApiErr::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("file: release {version} has no file {file:?}"),
        )
        .on("file")
    };
    let path = s.releases.file(&version, &file).ok_or_else(not_found)?;
    let f = tokio::fs::File::open(&path).await.map_err(|_| not_found())?;
    let len = f.metadata().await.map_err(|_| not_found())?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_values_and_units() {
        let script = "URL=@@BERTH_URL@@\nCA='@@BERTH_CA_PEM@@'\n  @@UNIT:berth-agent.service@@\nV=@@BERTH_LATEST@@\n";
        let out = render(script, "https://cp:7443", "-----CA-----\n", "KEY", "1.2.3");
        assert!(out.starts_with("URL=https://cp:7443\nCA='-----CA-----'\n"), "{out}");
        assert!(out.contains("Type=notify"), "the agent unit is inlined: {out}");
        assert!(out.ends_with("V=1.2.3\n"), "{out}");
        assert!(!out.contains("@@"), "{out}");
    }

    #[test]
    fn wildcard_advertise_url_falls_back_to_the_host_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "cp.example.com:7443".parse().unwrap());
        assert_eq!(script_url("https://0.0.0.0:7443", &h), "https://cp.example.com:7443");
        assert_eq!(script_url("https://cp.internal:7443", &h), "https://cp.internal:7443");
        h.insert(header::HOST, "evil\"$(x)".parse().unwrap());
        assert_eq!(
            script_url("https://0.0.0.0:7443", &h),
            "https://0.0.0.0:7443",
            "nothing unsafe in a script"
        );
    }

    #[test]
    fn only_published_files_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases { dir: dir.path().into() };
        std::fs::create_dir(dir.path().join("1.0.0")).unwrap();
        std::fs::write(dir.path().join("1.0.0/manifest"), "abc  berth-agent-linux-amd64\n").unwrap();
        assert!(r.file("1.0.0", "berth-agent-linux-amd64").is_some());
        assert!(r.file("1.0.0", "manifest.sig").is_some());
        assert!(r.file("1.0.0", "secrets.key").is_none());
        assert!(r.file("..", "release.pub").is_none());
        assert!(r.file("1.0.0", "../../secrets.key").is_none());
        assert!(!r.exists("1.0.0"), "unsigned: no manifest.sig");
        std::fs::write(dir.path().join("1.0.0/manifest.sig"), [0u8; 64]).unwrap();
        assert!(r.exists("1.0.0"));
        assert!(r.latest().is_none());
        std::fs::write(dir.path().join("latest"), "1.0.0\n").unwrap();
        assert_eq!(r.latest().as_deref(), Some("1.0.0"));
    }
}
