//! The fleet registry as this node uses it: Podman trusts the control
//! plane's CA for the registry's host (a `certs.d` directory, as Podman
//! looks it up), and pulls of images stored there carry the node's own
//! pull-only credentials from the desired state.

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use berth_protocol::api::RegistryAccess;
use std::path::Path;

/// Writes `CERTS_DIR/HOST/ca.crt` (the control plane's CA) unless it already
/// holds exactly that.
pub fn trust(certs_dir: &Path, host: &str, ca_pem: &[u8]) -> std::io::Result<()> {
    let dir = certs_dir.join(host);
    let file = dir.join("ca.crt");
    if std::fs::read(&file).ok().as_deref() == Some(ca_pem) {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(".ca.crt.tmp");
    std::fs::write(&tmp, ca_pem)?;
    std::fs::rename(&tmp, &file)
}

/// The credentials for pulling `image`: the node's, when the image is in
/// the fleet registry.
pub fn credentials_for<'a>(access: Option<&'a RegistryAccess>, image: &str) -> Option<&'a RegistryAccess> {
    access.filter(|a| image.strip_prefix(&a.host).is_some_and(|rest| rest.starts_with('/')))
}

/// The libpod API's `X-Registry-Auth`: URL-safe base64, with padding, of
/// `{"username", "password"}` (anything else is refused or ignored).
pub fn auth_header(access: &RegistryAccess) -> String {
    let json = serde_json::json!({ "username": access.username, "password": access.password });
    URL_SAFE.encode(json.to_string())
}

/// The libpod build API's `X-Registry-Config`: URL-safe base64 of
/// `{HOST: {"username", "password"}}`, the credentials `FROM` pulls use.
pub fn config_header(access: &RegistryAccess) -> String {
    let json = serde_json::json!({
        access.host.clone(): { "username": access.username, "password": access.password }
    });
    URL_SAFE.encode(json.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> RegistryAccess {
        RegistryAccess {
            host: "198.18.9.1:5000".into(),
            username: "n1".into(),
            password: "s3cret".into(),
        }
    }

    #[test]
    fn only_images_of_the_registry_get_credentials() {
        let a = access();
        assert!(credentials_for(Some(&a), "198.18.9.1:5000/demo:v1").is_some());
        assert!(credentials_for(Some(&a), "198.18.9.1:50000/demo:v1").is_none());
        assert!(credentials_for(Some(&a), "docker.io/library/busybox").is_none());
        assert!(credentials_for(Some(&a), "198.18.9.1:5000").is_none());
        assert!(credentials_for(None, "198.18.9.1:5000/demo:v1").is_none());
    }

    #[test]
    fn the_auth_header_is_padded_url_safe_json() {
        let h = auth_header(&access());
        let json: serde_json::Value = serde_json::from_slice(&URL_SAFE.decode(&h).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"username": "n1", "password": "s3cret"}));
        assert!(!h.contains('+') && !h.contains('/'));
    }

    #[test]
    fn the_config_header_maps_the_host_to_credentials() {
        let h = config_header(&access());
        let json: serde_json::Value = serde_json::from_slice(&URL_SAFE.decode(&h).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"198.18.9.1:5000": {"username": "n1", "password": "s3cret"}})
        );
    }

    #[test]
    fn trust_writes_the_ca_once_where_podman_looks() {
        let dir = tempfile::tempdir().unwrap();
        trust(dir.path(), "198.18.9.1:5000", b"PEM").unwrap();
        let file = dir.path().join("198.18.9.1:5000/ca.crt");
        assert_eq!(std::fs::read(&file).unwrap(), b"PEM");
        let before = std::fs::metadata(&file).unwrap().modified().unwrap();
        trust(dir.path(), "198.18.9.1:5000", b"PEM").unwrap();
        assert_eq!(
            std::fs::metadata(&file).unwrap().modified().unwrap(),
            before,
            "rewritten"
        );
        trust(dir.path(), "198.18.9.1:5000", b"NEW").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"NEW");
    }
}
