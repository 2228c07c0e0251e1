//! A typed client of the control plane's admin API, used by the `berth` CLI,
//! the lab, the end-to-end tests and the benchmarks. Start at [`AdminClient`]:
//! one method per endpoint, request and response types from `berth_protocol`,
//! and errors as [`Error`], whose API variant carries the stable error code.

mod streams;
pub use streams::{EventsQuery, ExecQuery, ExecSocket, LogsQuery};

use berth_protocol::build::{BuildInfo, BuildRequest, GitLink, GitLinkInfo};
use berth_protocol::release::{ReleaseInfo, RollbackRequest};
use berth_protocol::routes::{DomainInfo, DomainSpec, TcpRouteSpec};
use berth_protocol::service::{ScaleRequest, ServiceInfo, ServiceSpec};
use berth_protocol::user::{CreateUserRequest, UserInfo, UserRemoved};
use berth_protocol::{
    ApiError, CreateTokenRequest, CreatedToken, ErrorCode, NodeInfo, Removed, Revision, TokenInfo, TokenRevoked,
    UpgradeRequest, UpgradeStarted,
};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the control plane is and the admin's credentials for it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub url: String,
    pub admin_token_file: PathBuf,
    pub ca_file: PathBuf,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A local file (token, CA) could not be used; names the flag.
    #[error("{0}")]
    Config(String),
    /// The control plane could not be reached or the connection broke.
    #[error("cannot reach the control plane at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The control plane refused the call: its error body, with the status.
    #[error("{} (HTTP {status})", body.error)]
    Api { status: u16, body: ApiError },
    /// A success answer that is not what the endpoint promises.
    #[error("unexpected answer from {path}: {reason}")]
    Decode { path: String, reason: String },
}

impl Error {
    /// The API's error body, for callers that act on its code or field.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Error::Api { body, .. } => Some(body),
            _ => None,
        }
    }

    /// The API's stable error code, if the control plane refused the call.
    pub fn code(&self) -> Option<ErrorCode> {
        self.api().map(|b| b.code)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
    /// The control plane's CA, for the exec WebSocket.
    ca_pem: Vec<u8>,
}

impl AdminClient {
    pub fn new(cfg: &ClientConfig) -> Result<AdminClient> {
        let token = read(&cfg.admin_token_file, "--admin-token-file")?;
        let ca = std::fs::read(&cfg.ca_file).map_err(|e| {
            Error::Config(format!(
                "--ca-file {}: cannot read the control plane's CA: {e}",
                cfg.ca_file.display()
            ))
        })?;
        let ca_pem = ca.clone();
        let ca = reqwest::Certificate::from_pem(&ca)
            .map_err(|e| Error::Config(format!("--ca-file: not a PEM certificate: {e}")))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Config(format!("building the HTTPS client: {e}")))?;
        Ok(AdminClient {
            http,
            base: cfg.url.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            ca_pem,
        })
    }

    async fn call<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<&impl Serialize>) -> Result<T> {
        let unreachable = |e| self.unreachable(e);
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(unreachable)?;
        self.decode(resp, path).await
    }

    fn unreachable(&self, source: reqwest::Error) -> Error {
        Error::Unreachable {
            url: self.base.clone(),
            source,
        }
    }

    /// The error body of a refused call.
    async fn refused(&self, resp: reqwest::Response) -> Error {
        let status = resp.status().as_u16();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => return self.unreachable(e),
        };
        let body = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| unparsed(text));
        Error::Api { status, body }
    }

    async fn decode<T: DeserializeOwned>(&self, resp: reqwest::Response, path: &str) -> Result<T> {
        if !resp.status().is_success() {
            return Err(self.refused(resp).await);
        }
        let text = resp.text().await.map_err(|e| self.unreachable(e))?;
        serde_json::from_str(&text).map_err(|e| Error::Decode {
            path: path.to_string(),
            reason: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    /// The cluster's revision.
    pub async fn revision(&self) -> Result<u64> {
        Ok(self.get::<Revision>("/v1/revision").await?.revision)
    }

    // --- tokens ---

    pub async fn create_token(&self, proxy: bool, ttl_secs: u64) -> Result<CreatedToken> {
        self.post("/v1/tokens", &CreateTokenRequest { proxy, ttl_secs }).await
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        self.get("/v1/tokens").await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        self.delete::<TokenRevoked>(&format!("/v1/tokens/{id}")).await.map(drop)
    }

    // --- dashboard users ---

    pub async fn add_user(&self, name: &str, password: &str) -> Result<UserInfo> {
        let body = CreateUserRequest {
            name: name.to_string(),
            password: password.to_string(),
        };
        self.post("/v1/users", &body).await
    }

    pub async fn list_users(&self) -> Result<Vec<UserInfo>> {
        self.get("/v1/users").await
    }

    /// Removes a user; its sessions end at once.
    pub async fn remove_user(&self, name: &str) -> Result<UserRemoved> {
        self.delete(&format!("/v1/users/{name}")).await
    }

    // --- nodes ---

    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>> {
        self.get("/v1/nodes").await
    }

    /// Removes a node; returns the revision that drops it from every peer list.
    pub async fn remove_node(&self, name: &str) -> Result<u64> {
        Ok(self.delete::<Removed>(&format!("/v1/nodes/{name}")).await?.revision)
    }

    /// Starts an upgrade to `version`: `canary` (default: the first node by name) first.
    pub async fn upgrade_nodes(&self, version: &str, canary: Option<&str>) -> Result<UpgradeStarted> {
        let body = UpgradeRequest {
            version: version.to_string(),
            canary: canary.map(str::to_string),
        };
        self.post("/v1/nodes/upgrade", &body).await
    }

    // --- services ---

    /// Makes a new release of `spec`. While a rollout runs it queues behind
    /// it, or with `force` replaces it.
    pub async fn deploy_service(&self, spec: &ServiceSpec) -> Result<ServiceInfo> {
        self.post("/v1/services", spec).await
    }

    pub async fn deploy_service_forced(&self, spec: &ServiceSpec, force: bool) -> Result<ServiceInfo> {
        let path = if force {
            "/v1/services?force=true"
        } else {
            "/v1/services"
        };
        self.post(path, spec).await
    }

    /// The service's releases, newest first.
    pub async fn list_releases(&self, name: &str) -> Result<Vec<ReleaseInfo>> {
        self.get(&format!("/v1/services/{name}/releases")).await
    }

    /// Rolls out an earlier release's spec as a new release.
    pub async fn rollback_service(&self, name: &str, req: &RollbackRequest) -> Result<ServiceInfo> {
        self.post(&format!("/v1/services/{name}/rollback"), req).await
    }

    /// A rolling restart: a new release of the same spec.
    pub async fn restart_service(&self, name: &str, force: bool) -> Result<ServiceInfo> {
        let force = if force { "?force=true" } else { "" };
        self.post(&format!("/v1/services/{name}/restart{force}"), &serde_json::json!({}))
            .await
    }

    pub async fn list_services(&self) -> Result<Vec<ServiceInfo>> {
        self.get("/v1/services").await
    }

    pub async fn show_service(&self, name: &str) -> Result<ServiceInfo> {
        self.get(&format!("/v1/services/{name}")).await
    }

    pub async fn scale_service(&self, name: &str, replicas: u32) -> Result<ServiceInfo> {
        self.post(&format!("/v1/services/{name}/scale"), &ScaleRequest { replicas })
            .await
    }

    pub async fn remove_service(&self, name: &str) -> Result<()> {
        self.delete::<Removed>(&format!("/v1/services/{name}")).await.map(drop)
    }

    // --- public domains and TCP routes (proxy nodes) ---

    pub async fn add_domain(&self, spec: &DomainSpec) -> Result<DomainInfo> {
        self.post("/v1/domains", spec).await
    }

    pub async fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        self.get("/v1/domains").await
    }

    /// One domain, with its certificate state and the proxies serving it.
    pub async fn get_domain(&self, domain: &str) -> Result<DomainInfo> {
        self.get(&format!("/v1/domains/{domain}")).await
    }

    pub async fn remove_domain(&self, domain: &str) -> Result<()> {
        self.delete::<Removed>(&format!("/v1/domains/{domain}")).await.map(drop)
    }

    pub async fn add_tcp_route(&self, spec: &TcpRouteSpec) -> Result<TcpRouteSpec> {
        self.post("/v1/routes/tcp", spec).await
    }

    /// Where the fleet registry is (404 `not_found` when none runs).
    pub async fn registry_info(&self) -> Result<berth_protocol::api::RegistryInfo> {
        self.get("/v1/registry").await
    }

    /// The fleet registry's tags, with the releases using each; only those
    /// of `service`'s releases when given.
    pub async fn list_images(&self, service: Option<&str>) -> Result<Vec<berth_protocol::api::ImageInfo>> {
        match service {
            Some(s) => {
                let s: String = form_urlencoded::byte_serialize(s.as_bytes()).collect();
                self.get(&format!("/v1/images?service={s}")).await
            }
            None => self.get("/v1/images").await,
        }
    }

    /// Retention now (keeping `keep` releases per service, or the control
    /// plane's `--image-retention`), then garbage collection.
    pub async fn prune_images(&self, keep: Option<u64>) -> Result<berth_protocol::api::PruneReport> {
        match keep {
            Some(k) => self.post(&format!("/v1/images/prune?keep={k}"), &()).await,
            None => self.post("/v1/images/prune", &()).await,
        }
    }

    /// The control plane's URL, as configured.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The admin token, which is also the admin's registry password.
    pub fn admin_token(&self) -> &str {
        &self.token
    }

    /// Makes a build; its context is uploaded next ([`Self::upload_build_context`]).
    pub async fn create_build(&self, req: &BuildRequest) -> Result<BuildInfo> {
        self.post("/v1/builds", req).await
    }

    /// Uploads build `id`'s context, a tar file, streamed from disk.
    pub async fn upload_build_context(&self, id: u64, tar: &Path) -> Result<BuildInfo> {
        let path = format!("/v1/builds/{id}/context");
        let file = tokio::fs::File::open(tar)
            .await
            .map_err(|e| Error::Config(format!("{}: {e}", tar.display())))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| Error::Config(format!("{}: {e}", tar.display())))?
            .len();
        let resp = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", "application/x-tar")
            .header("content-length", len)
            .body(reqwest::Body::from(file))
            // At 10 MB/s a 1 GiB context takes under two minutes.
            .timeout(Duration::from_secs(30 * 60))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.decode(resp, &path).await
    }

    /// Links service `name` to a repository's branch; the answer carries
    /// the webhook secret, shown this once.
    pub async fn link_service(&self, name: &str, link: &GitLink) -> Result<GitLinkInfo> {
        self.call(Method::PUT, &format!("/v1/services/{name}/link"), Some(link))
            .await
    }

    pub async fn unlink_service(&self, name: &str) -> Result<()> {
        self.delete::<Removed<String>>(&format!("/v1/services/{name}/link"))
            .await
            .map(drop)
    }

    pub async fn get_build(&self, id: u64) -> Result<BuildInfo> {
        self.get(&format!("/v1/builds/{id}")).await
    }

    /// Builds, newest first; only `service`'s when given.
    pub async fn list_builds(&self, service: Option<&str>, limit: u32) -> Result<Vec<BuildInfo>> {
        let mut path = format!("/v1/builds?limit={limit}");
        if let Some(s) = service {
            path.push_str("&service=");
            path.extend(form_urlencoded::byte_serialize(s.as_bytes()));
        }
        self.get(&path).await
    }

    pub async fn cancel_build(&self, id: u64) -> Result<BuildInfo> {
        self.post(&format!("/v1/builds/{id}/cancel"), &()).await
    }

    /// Build `id`'s log, each piece passed to `each` as it comes; with
    /// `follow`, until the build ends.
    pub async fn build_logs(&self, id: u64, follow: bool, mut each: impl FnMut(&[u8])) -> Result<()> {
        let resp = self
            .http
            .get(format!("{}/v1/builds/{id}/logs?follow={follow}", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(self.refused(resp).await);
        }
        let mut resp = resp;
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
            each(&chunk);
        }
        Ok(())
    }

    pub async fn list_tcp_routes(&self) -> Result<Vec<TcpRouteSpec>> {
        self.get("/v1/routes/tcp").await
    }

    pub async fn remove_tcp_route(&self, listen: u16) -> Result<()> {
        self.delete::<Removed<u16>>(&format!("/v1/routes/tcp/{listen}"))
            .await
            .map(drop)
    }
}

fn read(path: &Path, flag: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{flag} {}: cannot read: {e}", path.display())))
}

/// An error answer without Berth's JSON body (e.g. from a proxy in between).
fn unparsed(text: String) -> ApiError {
    ApiError {
        error: text,
        code: ErrorCode::Unknown,
        field: None,
        detail: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_read_as_message_and_status_and_keep_their_code() {
        let body: ApiError =
            serde_json::from_str(r#"{"error":"name: taken","code":"name_taken","field":"name"}"#).unwrap();
        let e = Error::Api { status: 409, body };
        assert_eq!(e.to_string(), "name: taken (HTTP 409)");
        assert_eq!(e.code(), Some(ErrorCode::NameTaken));
        assert_eq!(e.api().and_then(|b| b.field.as_deref()), Some("name"));
    }

    #[test]
    fn a_foreign_error_page_is_unknown_and_shown_whole() {
        let e = Error::Api {
            status: 502,
            body: unparsed("<html>Bad Gateway</html>".into()),
        };
        assert_eq!(e.code(), Some(ErrorCode::Unknown));
        assert_eq!(e.to_string(), "<html>Bad Gateway</html> (HTTP 502)");
        assert_eq!(Error::Config("x".into()).code(), None);
    }
}
