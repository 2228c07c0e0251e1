//! The control plane as a client of its own registry: what repositories,
//! tags and manifests it holds (`berth image list`). It signs its own
//! tokens, granting itself only what each call needs.

use super::token::{Access, Signer};
use anyhow::{bail, Context};
use std::net::SocketAddr;

/// Every manifest type a client may find: without the OCI types in
/// `Accept`, the registry answers 404 for what Podman pushed.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// Repositories asked for at most (one page of the catalog).
pub const MAX_REPOSITORIES: usize = 1000;

pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
}

/// One tag's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub digest: String,
    /// Config and layers, compressed, as the manifest lists them; none for
    /// an index (its images have sizes of their own).
    pub size: Option<u64>,
}

impl RegistryClient {
    /// A client for `host` (`HOST:PORT`, the name its certificate has),
    /// connecting to where it listens locally when HOST is a name.
    pub fn new(host: &str, listen: SocketAddr, ca_pem: &str) -> anyhow::Result<RegistryClient> {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).context("the control plane's CA")?;
        let mut b = reqwest::Client::builder()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .use_rustls_tls()
            .timeout(std::time::Duration::from_secs(30));
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
        if name.parse::<std::net::IpAddr>().is_err() {
            let ip = if listen.ip().is_unspecified() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                listen.ip()
            };
            b = b.resolve(name, SocketAddr::new(ip, listen.port()));
        }
        Ok(RegistryClient {
            http: b.build()?,
            base: format!("https://{host}"),
        })
    }

    async fn get(&self, signer: &Signer, path: &str, access: Access, head: bool) -> anyhow::Result<reqwest::Response> {
        let resp = self.send(signer, path, access, head).await?;
        if !resp.status().is_success() {
            bail!("the fleet registry: GET {path}: {}", resp.status());
        }
        Ok(resp)
    }

    /// One request with a token for `access`, whatever the answer.
    async fn send(&self, signer: &Signer, path: &str, access: Access, head: bool) -> anyhow::Result<reqwest::Response> {
        let token = signer.sign("control-plane", &[access], crate::store::now())?;
        let url = format!("{}{path}", self.base);
        let req = if head {
            self.http.head(&url)
        } else {
            self.http.get(&url)
        };
        let resp = req
            .bearer_auth(token)
            .header("accept", MANIFEST_TYPES)
            .send()
            .await
            .with_context(|| format!("the fleet registry: GET {path}"))?;
        Ok(resp)
    }

    /// Deletes the manifest `digest` of `repository` and every tag naming
    /// it; one already gone is no error.
    pub async fn delete_manifest(&self, signer: &Signer, repository: &str, digest: &str) -> anyhow::Result<()> {
        let access = Access {
            kind: "repository".into(),
            name: repository.into(),
            actions: vec!["delete".into()],
        };
        let path = format!("/v2/{repository}/manifests/{digest}");
        let token = signer.sign("control-plane", &[access], crate::store::now())?;
        let resp = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("the fleet registry: DELETE {path}"))?;
        if !resp.status().is_success() && resp.status() != reqwest::StatusCode::NOT_FOUND {
            bail!("the fleet registry: DELETE {path}: {}", resp.status());
        }
        Ok(())
    }

    /// The manifest `reference` (a tag or digest) names, as stored: its
    /// media type and its bytes; None when the registry has none.
    pub async fn manifest_raw(
        &self,
        signer: &Signer,
        repository: &str,
        reference: &str,
    ) -> anyhow::Result<Option<(String, bytes::Bytes)>> {
        let path = format!("/v2/{repository}/manifests/{reference}");
        let resp = self.send(signer, &path, pull(repository), false).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            bail!("the fleet registry: GET {path}: {}", resp.status());
        }
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("the fleet registry: GET {path}: no Content-Type"))?
            .to_string();
        Ok(Some((media_type, resp.bytes().await?)))
    }

    /// Puts `manifest` under `tag` of `repository` (moving `tag` if it
    /// named another); returns its digest.
    pub async fn put_manifest(
        &self,
        signer: &Signer,
        repository: &str,
        tag: &str,
        media_type: &str,
        manifest: bytes::Bytes,
    ) -> anyhow::Result<String> {
        let access = Access {
            kind: "repository".into(),
            name: repository.into(),
            actions: vec!["pull".into(), "push".into()],
        };
        let path = format!("/v2/{repository}/manifests/{tag}");
        let token = signer.sign("control-plane", &[access], crate::store::now())?;
        let resp = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", media_type)
            .body(manifest)
            .send()
            .await
            .with_context(|| format!("the fleet registry: PUT {path}"))?;
        if !resp.status().is_success() {
            bail!("the fleet registry: PUT {path}: {}", resp.status());
        }
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("the fleet registry: PUT {path}: no Docker-Content-Digest"))?;
        Ok(digest.to_string())
    }

    /// Tags the manifest `digest` of `repository` as `tag` too: put back
    /// under the new name byte for byte, so its digest stays.
    pub async fn add_tag(&self, signer: &Signer, repository: &str, digest: &str, tag: &str) -> anyhow::Result<()> {
        let (media_type, manifest) = self
            .manifest_raw(signer, repository, digest)
            .await?
            .with_context(|| format!("the fleet registry has no {repository}@{digest}"))?;
        self.put_manifest(signer, repository, tag, &media_type, manifest)
            .await?;
        Ok(())
    }

    /// The digest of the manifest `tag` names now, or None when the
    /// registry has no such repository or tag.
    pub async fn digest(&self, signer: &Signer, repository: &str, tag: &str) -> anyhow::Result<Option<String>> {
        let path = format!("/v2/{repository}/manifests/{tag}");
        let resp = self.send(signer, &path, pull(repository), true).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            bail!("the fleet registry: HEAD {path}: {}", resp.status());
        }
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| d.starts_with("sha256:"))
            .with_context(|| format!("the fleet registry: HEAD {path}: no Docker-Content-Digest"))?;
        Ok(Some(digest.to_string()))
    }

    pub async fn repositories(&self, signer: &Signer) -> anyhow::Result<Vec<String>> {
        let access = Access {
            kind: "registry".into(),
            name: "catalog".into(),
            actions: vec!["*".into()],
        };
        let path = format!("/v2/_catalog?n={MAX_REPOSITORIES}");
        let v: serde_json::Value = self.get(signer, &path, access, false).await?.json().await?;
        Ok(strings(&v["repositories"]))
    }

    pub async fn tags(&self, signer: &Signer, repository: &str) -> anyhow::Result<Vec<String>> {
        let v: serde_json::Value = self
            .get(signer, &format!("/v2/{repository}/tags/list"), pull(repository), false)
            .await?
            .json()
            .await?;
        // An emptied repository answers `"tags": null`.
        Ok(strings(&v["tags"]))
    }

    pub async fn manifest(&self, signer: &Signer, repository: &str, tag: &str) -> anyhow::Result<Manifest> {
        let resp = self
            .get(
                signer,
                &format!("/v2/{repository}/manifests/{tag}"),
                pull(repository),
                false,
            )
            .await?;
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let m: serde_json::Value = resp.json().await?;
        Ok(Manifest {
            digest,
            size: manifest_size(&m),
        })
    }
}

fn pull(repository: &str) -> Access {
    Access {
        kind: "repository".into(),
        name: repository.into(),
        actions: vec!["pull".into()],
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(String::from))
        .collect()
}

/// Config plus layers of an image manifest; None for an index.
fn manifest_size(m: &serde_json::Value) -> Option<u64> {
    let layers = m["layers"].as_array()?;
    let config = m["config"]["size"].as_u64().unwrap_or(0);
    Some(config + layers.iter().filter_map(|l| l["size"].as_u64()).sum::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_add_config_and_layers_and_indexes_have_none() {
        let image = serde_json::json!({
            "schemaVersion": 2,
            "config": {"size": 100},
            "layers": [{"size": 1000}, {"size": 24}]
        });
        assert_eq!(manifest_size(&image), Some(1124));
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"size": 500}]});
        assert_eq!(manifest_size(&index), None);
        assert!(strings(&serde_json::Value::Null).is_empty());
    }
}
