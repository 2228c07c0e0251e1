//! The admin client: talks to the control plane's API with the admin
//! bearer token, trusting only the control plane's CA.

use anyhow::{bail, Context};
use berth_protocol::{ApiError, CreateTokenRequest, NodeInfo, TokenInfo};
use reqwest::Method;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// Where the CLI finds the control plane and its credentials.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub admin_token_file: PathBuf,
    pub ca_file: PathBuf,
}

impl AdminClient {
    pub fn new(t: &Target) -> anyhow::Result<AdminClient> {
        let token = read(&t.admin_token_file, "--admin-token-file")?;
        let ca = std::fs::read(&t.ca_file)
            .with_context(|| format!("--ca-file {}: cannot read the control plane's CA", t.ca_file.display()))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).context("--ca-file: not a PEM certificate")?)
            .tls_built_in_root_certs(false)
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(AdminClient {
            http,
            base: t.url.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let msg = serde_json::from_str::<ApiError>(&text).map(|e| e.error).unwrap_or(text);
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected answer from {path}"))
    }

    pub async fn create_token(&self, proxy: bool, ttl_secs: u64) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::to_value(CreateTokenRequest { proxy, ttl_secs })?;
        self.call(Method::POST, "/v1/tokens", Some(body)).await
    }

    pub async fn list_tokens(&self) -> anyhow::Result<Vec<TokenInfo>> {
        self.call(Method::GET, "/v1/tokens", None).await
    }

    pub async fn revoke_token(&self, id: &str) -> anyhow::Result<()> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/tokens/{id}"), None)
            .await
            .map(|_| ())
    }

    pub async fn list_nodes(&self) -> anyhow::Result<Vec<NodeInfo>> {
        self.call(Method::GET, "/v1/nodes", None).await
    }

    pub async fn remove_node(&self, name: &str) -> anyhow::Result<u64> {
        let v: serde_json::Value = self.call(Method::DELETE, &format!("/v1/nodes/{name}"), None).await?;
        Ok(v["revision"].as_u64().unwrap_or(0))
    }

    /// Starts a rollout of `version`: `canary` (default: the first node by name) first.
    pub async fn upgrade_nodes(&self, version: &str, canary: Option<&str>) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({ "version": version, "canary": canary });
        self.call(Method::POST, "/v1/nodes/upgrade", Some(body)).await
    }

    pub async fn revision(&self) -> anyhow::Result<u64> {
        let v: serde_json::Value = self.call(Method::GET, "/v1/revision", None).await?;
        Ok(v["revision"].as_u64().unwrap_or(0))
    }
}

fn read(path: &Path, flag: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
}

/// Parses durations like `90s`, `15m`, `24h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30m, 24h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too long"))
}

impl AdminClient {
    pub async fn deploy_service(
        &self,
        spec: &berth_protocol::service::ServiceSpec,
    ) -> anyhow::Result<berth_protocol::service::ServiceInfo> {
        self.call(Method::POST, "/v1/services", Some(serde_json::to_value(spec)?))
            .await
    }

    pub async fn list_services(&self) -> anyhow::Result<Vec<berth_protocol::service::ServiceInfo>> {
        self.call(Method::GET, "/v1/services", None).await
    }

    pub async fn show_service(&self, name: &str) -> anyhow::Result<berth_protocol::service::ServiceInfo> {
        self.call(Method::GET, &format!("/v1/services/{name}"), None).await
    }

    pub async fn scale_service(
        &self,
        name: &str,
        replicas: u32,
    ) -> anyhow::Result<berth_protocol::service::ServiceInfo> {
        let body = serde_json::json!({ "replicas": replicas });
        self.call(Method::POST, &format!("/v1/services/{name}/scale"), Some(body))
            .await
    }

    pub async fn remove_service(&self, name: &str) -> anyhow::Result<()> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/services/{name}"), None)
            .await
            .map(|_| ())
    }
}

impl AdminClient {
    pub async fn add_domain(
        &self,
        spec: &berth_protocol::proxy::DomainSpec,
    ) -> anyhow::Result<berth_protocol::proxy::DomainInfo> {
        self.call(Method::POST, "/v1/domains", Some(serde_json::to_value(spec)?))
            .await
    }

    pub async fn list_domains(&self) -> anyhow::Result<Vec<berth_protocol::proxy::DomainInfo>> {
        self.call(Method::GET, "/v1/domains", None).await
    }

    pub async fn remove_domain(&self, domain: &str) -> anyhow::Result<()> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/domains/{domain}"), None)
            .await
            .map(|_| ())
    }

    pub async fn add_tcp_route(
        &self,
        spec: &berth_protocol::proxy::TcpRouteSpec,
    ) -> anyhow::Result<berth_protocol::proxy::TcpRouteSpec> {
        self.call(Method::POST, "/v1/routes/tcp", Some(serde_json::to_value(spec)?))
            .await
    }

    pub async fn list_tcp_routes(&self) -> anyhow::Result<Vec<berth_protocol::proxy::TcpRouteSpec>> {
        self.call(Method::GET, "/v1/routes/tcp", None).await
    }

    pub async fn remove_tcp_route(&self, listen: u16) -> anyhow::Result<()> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/routes/tcp/{listen}"), None)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(86400));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
