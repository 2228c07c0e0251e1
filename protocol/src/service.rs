//! Services: what a user deploys, and what a node is told to run.

use crate::error::FieldError;
use crate::names::validate_dns_label;
use crate::release::RolloutPolicy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

fn one() -> u32 {
    1
}

/// A named volume, kept under the node's data dir and mounted at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Volume {
    pub name: String,
    pub path: String,
}

/// A service as the user describes it (`berth service deploy`, `berth apply -f`).
/// `Default` is an empty spec (no name, no image, no replicas) to fill in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// A DNS label: the service is found as NAME.internal.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub name: String,
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 255))]
    pub image: String,
    #[serde(default = "one")]
    #[cfg_attr(feature = "openapi", schema(maximum = 100))] // MAX_REPLICAS
    pub replicas: u32,
    /// The port the service listens on inside its containers.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub port: Option<u16>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Write-only: stored encrypted, sent sealed to the nodes that run the
    /// service, never returned by the API.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// CPU limit in cores (e.g. 0.5).
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Memory limit in bytes.
    #[serde(default)]
    pub memory: Option<u64>,
    /// Health check: a shell command run inside the container...
    #[serde(default)]
    pub health_cmd: Option<String>,
    /// ...or an HTTP path fetched on `port`.
    #[serde(default)]
    pub health_http: Option<String>,
    /// Command to run instead of the image's (shell form).
    #[serde(default)]
    pub command: Option<String>,
    /// Pin the replicas to these nodes.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Signal that asks a replica to stop (default SIGTERM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Seconds between the stop signal and SIGKILL (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<u32>,
    /// How a new release replaces the replicas of the one before.
    #[serde(default, skip_serializing_if = "RolloutPolicy::is_default")]
    pub rollout: RolloutPolicy,
}

/// Signals a replica may be asked to stop with.
pub const STOP_SIGNALS: [&str; 8] = [
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGKILL",
];
/// Longest `stop_timeout`.
pub const MAX_STOP_TIMEOUT: u32 = 3600;
/// `stop_timeout` when none is given.
pub const DEFAULT_STOP_TIMEOUT: u32 = 10;

pub const MAX_REPLICAS: u32 = 100;

fn valid_env_key(k: &str) -> bool {
    let mut c = k.chars();
    matches!(c.next(), Some(f) if f == '_' || f.is_ascii_alphabetic())
        && c.all(|ch| ch == '_' || ch.is_ascii_alphanumeric())
}

/// Checks an image reference (`[registry/]repo[:tag][@digest]`), lowercase repository.
pub fn validate_image(image: &str) -> Result<(), FieldError> {
    let bad = |why: &str| Err(FieldError::new("image", format_args!("{image:?} {why}")));
    if image.is_empty() || image.len() > 255 {
        return bad("must be 1-255 characters");
    }
    if !image
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
    {
        return bad("has characters not allowed in an image reference");
    }
    let (repo, _digest) = image.split_once('@').unwrap_or((image, ""));
    let name = match repo.rfind(':') {
        Some(i) if !repo[i..].contains('/') => &repo[..i],
        _ => repo,
    };
    let path = name
        .split_once('/')
        .map(|(first, rest)| {
            if first.contains('.') || first.contains(':') || first == "localhost" {
                rest
            } else {
                name
            }
        })
        .unwrap_or(name);
    if path.is_empty()
        || path.bytes().any(|b| b.is_ascii_uppercase())
        || path.starts_with(['.', '-', '/'])
        || path.ends_with('/')
    {
        return bad("is not a valid image reference (repository must be lowercase)");
    }
    Ok(())
}

impl ServiceSpec {
    /// Validates every field; the error names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_dns_label("name", &self.name)?;
        validate_image(&self.image)?;
        if self.replicas > MAX_REPLICAS {
            return Err(FieldError::new(
                "replicas",
                format_args!("{} is more than {MAX_REPLICAS}", self.replicas),
            ));
        }
        if self.port == Some(0) {
            return Err(FieldError::new("port", "must be 1-65535"));
        }
        for k in self.env.keys().chain(self.secrets.keys()) {
            if !valid_env_key(k) {
                return Err(FieldError::new(
                    "env",
                    format_args!("{k:?} is not a valid variable name"),
                ));
            }
        }
        if let Some(k) = self.env.keys().find(|k| self.secrets.contains_key(*k)) {
            return Err(FieldError::new("secrets", format_args!("{k:?} is also set in env")));
        }
        for v in &self.volumes {
            validate_dns_label("volumes.name", &v.name)?;
            if !v.path.starts_with('/') || v.path.contains("..") {
                return Err(FieldError::new(
                    "volumes.path",
                    format_args!("{:?} must be an absolute path without '..'", v.path),
                ));
            }
        }
        if let Some(c) = self.cpu {
            if !(c > 0.0 && c <= 256.0) {
                return Err(FieldError::new(
                    "cpu",
                    format_args!("{c} must be between 0 and 256 cores"),
                ));
            }
        }
        if let Some(m) = self.memory {
            if m < 4 * 1024 * 1024 {
                return Err(FieldError::new(
                    "memory",
                    format_args!("{m} bytes is below the 4 MiB minimum"),
                ));
            }
        }
        if self.health_cmd.is_some() && self.health_http.is_some() {
            return Err(FieldError::new(
                "health_http",
                "give either health_cmd or health_http, not both",
            ));
        }
        if let Some(p) = &self.health_http {
            if !p.starts_with('/') {
                return Err(FieldError::new(
                    "health_http",
                    format_args!("{p:?} must be a path starting with '/'"),
                ));
            }
            if self.port.is_none() {
                return Err(FieldError::new("health_http", "needs port"));
            }
        }
        for n in &self.nodes {
            validate_dns_label("nodes", n)?;
        }
        if let Some(sig) = &self.stop_signal {
            if !STOP_SIGNALS.contains(&sig.as_str()) {
                return Err(FieldError::new(
                    "stop_signal",
                    format_args!("{sig:?} is not one of {}", STOP_SIGNALS.join(", ")),
                ));
            }
        }
        if let Some(t) = self.stop_timeout {
            if t > MAX_STOP_TIMEOUT {
                return Err(FieldError::new(
                    "stop_timeout",
                    format_args!("{t} seconds is more than {MAX_STOP_TIMEOUT}"),
                ));
            }
        }
        self.rollout.validate()
    }

    /// Whether going from `self` to `next` needs new containers: anything
    /// but the replica count and the rollout policy shapes a container.
    pub fn needs_new_containers(&self, next: &ServiceSpec) -> bool {
        let strip = |s: &ServiceSpec| ServiceSpec {
            replicas: 0,
            rollout: RolloutPolicy::default(),
            ..s.clone()
        };
        strip(self) != strip(next)
    }
}

/// Parses sizes like `256M`, `1G`, `512Mi`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split]
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256M or 1G"))?;
    let mult: u64 = match t[split..].to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        u => return Err(format!("{s:?}: unknown unit {u:?}")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// One container a node should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ContainerDesired {
    /// Replica name, `<service>-<ordinal>`; also the container name.
    pub replica: String,
    pub service: String,
    pub image: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
    pub env: BTreeMap<String, String>,
    /// The service's secrets as a JSON map, sealed to this node's key.
    pub sealed_secrets: Option<String>,
    pub command: Option<String>,
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
    pub health_cmd: Option<String>,
    pub health_http: Option<String>,
    pub volumes: Vec<Volume>,
    /// Absent fields are left out of the encoding, which the agent hashes:
    /// a container made before these fields existed is not replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<u32>,
}

/// A replica as DNS should know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DnsReplica {
    pub replica: String,
    pub node: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub ip: Ipv4Addr,
    pub healthy: bool,
}

/// What a node reports about one of its containers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ContainerStatus {
    pub replica: String,
    /// CPU in use, in thousandths of a core (1000: one core), from Podman's
    /// stats between two heartbeats; sent with heartbeats only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millicores: Option<u32>,
    /// Memory in use (Podman's stats); sent with heartbeats only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    pub container_id: Option<String>,
    /// The ID (a sha256 digest of its config) of the image the container
    /// runs, as Podman reports it: the same bits give the same ID on every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// `running`, `starting`, `exited`, `missing`, ...
    pub state: String,
    pub healthy: bool,
    pub restarts: u32,
    pub error: Option<String>,
    /// Exit code of the container's last run, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// What the last failing health check said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_output: Option<String>,
    /// The container's last log lines, sent while it is unhealthy or exited.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
    /// Times autoheal made the container anew after restarts did not help.
    #[serde(default)]
    pub recreates: u32,
    /// Autoheal gave up on it: it is left as it is.
    #[serde(default)]
    pub gave_up: bool,
}

/// A replica as `berth service show` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplicaInfo {
    pub replica: String,
    /// CPU (thousandths of a core) and memory its node last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millicores: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    pub node: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub ip: Ipv4Addr,
    /// What its node last reported ([`ContainerStatus::state`]): Podman's
    /// state (`running`, `exited`, `created`, ...; open-ended), `missing`,
    /// or `pending` before the node has reported it.
    pub state: String,
    pub healthy: bool,
    pub restarts: u32,
    pub error: Option<String>,
    /// The release whose spec it runs.
    #[serde(default)]
    pub release: u64,
    /// `active` (in DNS and routes once healthy) or `draining` (taken out
    /// of every route, stopped soon).
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub recreates: u32,
    /// Autoheal gave up on it.
    #[serde(default)]
    pub gave_up: bool,
}

/// A service as the API returns it: never its secret values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceInfo {
    /// The spec of the newest release (which may still be rolling out).
    pub spec: ServiceSpec,
    pub secret_names: Vec<String>,
    pub replicas: Vec<ReplicaInfo>,
    /// The release every replica runs when no rollout is in progress.
    #[serde(default)]
    pub current_release: Option<u64>,
    /// The newest release's rollout, running or finished.
    #[serde(default)]
    pub rollout: Option<crate::release::RolloutInfo>,
}

/// `POST /v1/services/{name}/scale`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScaleRequest {
    #[cfg_attr(feature = "openapi", schema(maximum = 100))] // MAX_REPLICAS
    pub replicas: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        serde_json::from_str(r#"{"name":"web","image":"localhost/berth-test/busybox:latest","port":8080}"#).unwrap()
    }

    #[test]
    fn defaults_and_valid_spec() {
        let s = spec();
        assert_eq!(s.replicas, 1);
        s.validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        type Change = Box<dyn Fn(&mut ServiceSpec)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.name = "Web".into()), "name:"),
            (Box::new(|s| s.image = "Bad Image".into()), "image:"),
            (Box::new(|s| s.image = "docker.io/Library/x".into()), "image:"),
            (Box::new(|s| s.port = Some(0)), "port:"),
            (Box::new(|s| s.replicas = 1000), "replicas:"),
            (
                Box::new(|s| {
                    s.env.insert("1X".into(), "v".into());
                }),
                "env:",
            ),
            (
                Box::new(|s| {
                    s.env.insert("K".into(), "v".into());
                    s.secrets.insert("K".into(), "v".into());
                }),
                "secrets:",
            ),
            (
                Box::new(|s| {
                    s.volumes.push(Volume {
                        name: "data".into(),
                        path: "rel".into(),
                    })
                }),
                "volumes.path:",
            ),
            (Box::new(|s| s.cpu = Some(0.0)), "cpu:"),
            (Box::new(|s| s.memory = Some(10)), "memory:"),
            (Box::new(|s| s.health_http = Some("healthz".into())), "health_http:"),
            (Box::new(|s| s.nodes.push("N1".into())), "nodes:"),
        ];
        for (change, field) in cases {
            let mut s = spec();
            change(&mut s);
            let err = s.validate().unwrap_err();
            assert!(err.to_string().starts_with(field), "{err} should start with {field}");
            assert_eq!(format!("{}:", err.field), field);
        }
    }

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "localhost/a/b:1",
            "registry.example:5000/x/y@sha256:abc",
            "198.18.0.1:5000/demo:latest",
        ] {
            validate_image(ok).unwrap();
        }
        for bad in ["", "UPPER", "a b", "x/", "-x"] {
            assert!(validate_image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<ServiceSpec>(r#"{"name":"a","image":"b","replica":2}"#).unwrap_err();
        assert!(err.to_string().contains("replica"), "{err}");
    }
}
