//! What Berth asks Podman for, and its mapping onto libpod's JSON: the
//! network create body and the container SpecGenerator.
//!
//! Field names checked against Podman 4.3.1 (Debian 12) by creating and
//! inspecting containers; they are unchanged in the 5.x SpecGenerator.

use ipnet::Ipv4Net;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

/// A bridge network for one node's container subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Name of the Linux bridge (at most 15 characters). Podman picks
    /// `podmanN` when unset, counting per network config dir, so set it when
    /// several Podman instances share one host.
    pub interface_name: Option<String>,
    /// Driver options, passed verbatim (netavark bridge: `mtu`, `vlan`, ...).
    pub options: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl NetworkSpec {
    /// libpod `POST /networks/create` body: a bridge without Podman's own
    /// DNS (the agent serves DNS on the gateway).
    pub(crate) fn to_json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "driver": "bridge",
            "subnets": [{ "subnet": self.subnet.trunc().to_string(), "gateway": self.gateway.to_string() }],
            "ipv6_enabled": false,
            "internal": false,
            "dns_enabled": false,
            "labels": self.labels,
            "options": self.options,
        });
        if let Some(ifname) = &self.interface_name {
            v["network_interface"] = json!(ifname);
        }
        v
    }
}

/// Restart policy, applied by Podman (conmon's exit hook) without systemd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    No,
    #[default]
    Always,
    UnlessStopped,
    /// Restart after a non-zero exit; `max_retries` 0 means no limit.
    OnFailure {
        max_retries: u32,
    },
}

impl RestartPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::Always => "always",
            RestartPolicy::UnlessStopped => "unless-stopped",
            RestartPolicy::OnFailure { .. } => "on-failure",
        }
    }

    /// Parses Podman's name (`""` is Podman's "no").
    pub fn parse(name: &str, max_retries: u32) -> Option<RestartPolicy> {
        Some(match name {
            "" | "no" => RestartPolicy::No,
            "always" => RestartPolicy::Always,
            "unless-stopped" => RestartPolicy::UnlessStopped,
            "on-failure" => RestartPolicy::OnFailure { max_retries },
            _ => return None,
        })
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container health check. Podman only runs checks on its own through
/// systemd timers; on a host without systemd (or with `podman system service`
/// outside systemd) nothing runs them, so the agent calls
/// [`super::Podman::healthcheck`] every `interval` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Docker form: `["CMD-SHELL", "script"]`, `["CMD", "prog", "arg"...]`.
    /// A list without either prefix is taken as `CMD` arguments.
    pub cmd: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures before the container is `unhealthy`.
    pub retries: u32,
    /// Failures during this period after start do not count.
    pub start_period: Duration,
}

impl HealthCheck {
    /// A shell check (`CMD-SHELL`), run with `/bin/sh -c` in the container.
    pub fn shell(script: impl Into<String>, interval: Duration, timeout: Duration, retries: u32) -> Self {
        HealthCheck {
            cmd: vec!["CMD-SHELL".into(), script.into()],
            interval,
            timeout,
            retries,
            start_period: Duration::ZERO,
        }
    }

    fn test(&self) -> Vec<String> {
        match self.cmd.first().map(String::as_str) {
            Some("CMD") | Some("CMD-SHELL") | Some("NONE") => self.cmd.clone(),
            _ => std::iter::once("CMD".to_string())
                .chain(self.cmd.iter().cloned())
                .collect(),
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "Test": self.test(),
            "Interval": nanos(self.interval),
            "Timeout": nanos(self.timeout),
            "Retries": self.retries,
            "StartPeriod": nanos(self.start_period),
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A bind mount of a host directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// CFS period used for CPU limits (Podman's and the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Everything Berth sets on a container. `env` also carries secrets: it goes
/// into the JSON request body only, never onto a command line, and `Debug`
/// prints the variable names only.
#[derive(Clone, PartialEq, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Replaces the image's CMD (the entrypoint stays).
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub hostname: Option<String>,
    /// The bridge network to join (see [`NetworkSpec`]).
    pub network: String,
    pub static_ip: Option<Ipv4Addr>,
    /// A fixed MAC on that network (`aa:bb:..`). Without one every start gets
    /// a random MAC, and neighbours keep the old one cached for a while.
    pub static_mac: Option<String>,
    /// The container's resolvers; empty means the host's (Podman's default).
    pub dns_servers: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    /// CPU cores (0.5 = half a core), as a CFS quota over [`CPU_PERIOD_US`].
    pub cpu_limit: Option<f64>,
    pub memory_limit: Option<u64>,
    pub restart_policy: RestartPolicy,
    pub healthcheck: Option<HealthCheck>,
    pub volumes: Vec<Volume>,
    /// Capabilities to drop (`"ALL"` drops all) and to keep or add back.
    pub cap_drop: Vec<String>,
    pub cap_add: Vec<String>,
    /// `k8s-file` log, truncated when it reaches this size.
    pub log_max_size: Option<u64>,
    /// Default stop timeout (seconds) Podman uses when none is given.
    pub stop_timeout: Option<u32>,
    /// Signal (its Linux number, see [`signal_number`]) that asks the
    /// container to stop; Podman's default (SIGTERM) when unset.
    pub stop_signal: Option<i32>,
}

impl fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("command", &self.command)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("labels", &self.labels)
            .field("hostname", &self.hostname)
            .field("network", &self.network)
            .field("static_ip", &self.static_ip)
            .field("static_mac", &self.static_mac)
            .field("dns_servers", &self.dns_servers)
            .field("dns_search", &self.dns_search)
            .field("cpu_limit", &self.cpu_limit)
            .field("memory_limit", &self.memory_limit)
            .field("restart_policy", &self.restart_policy)
            .field("healthcheck", &self.healthcheck)
            .field("volumes", &self.volumes)
            .field("cap_drop", &self.cap_drop)
            .field("cap_add", &self.cap_add)
            .field("log_max_size", &self.log_max_size)
            .field("stop_timeout", &self.stop_timeout)
            .field("stop_signal", &self.stop_signal)
            .finish()
    }
}

impl ContainerSpec {
    /// The libpod SpecGenerator (`POST /libpod/containers/create`).
    pub(crate) fn to_json(&self) -> Value {
        let mut s = Map::new();
        s.insert("name".into(), json!(self.name));
        s.insert("image".into(), json!(self.image));
        if let Some(cmd) = &self.command {
            s.insert("command".into(), json!(cmd));
        }
        s.insert("env".into(), json!(self.env));
        s.insert("labels".into(), json!(self.labels));
        if let Some(h) = &self.hostname {
            s.insert("hostname".into(), json!(h));
        }

        // Networking: a bridge namespace joined to exactly our network.
        s.insert("netns".into(), json!({ "nsmode": "bridge" }));
        let mut per_net = Map::new();
        if let Some(ip) = self.static_ip {
            per_net.insert("static_ips".into(), json!([ip.to_string()]));
        }
        if let Some(mac) = &self.static_mac {
            per_net.insert("static_mac".into(), json!(mac));
        }
        s.insert("Networks".into(), json!({ self.network.clone(): per_net }));
        if !self.dns_servers.is_empty() {
            let servers: Vec<String> = self.dns_servers.iter().map(|a| a.to_string()).collect();
            s.insert("dns_server".into(), json!(servers));
        }
        if !self.dns_search.is_empty() {
            s.insert("dns_search".into(), json!(self.dns_search));
        }

        // Resources: an OCI LinuxResources object.
        let mut res = Map::new();
        if let Some(cores) = self.cpu_limit.filter(|c| c.is_finite() && *c > 0.0) {
            // The kernel refuses quotas under 1 ms.
            let quota = ((cores * CPU_PERIOD_US as f64).round() as u64).max(1000);
            res.insert("cpu".into(), json!({ "quota": quota, "period": CPU_PERIOD_US }));
        }
        if let Some(bytes) = self.memory_limit {
            res.insert("memory".into(), json!({ "limit": bytes }));
        }
        if !res.is_empty() {
            s.insert("resource_limits".into(), Value::Object(res));
        }

        s.insert("restart_policy".into(), json!(self.restart_policy.as_str()));
        if let RestartPolicy::OnFailure { max_retries } = self.restart_policy {
            if max_retries > 0 {
                s.insert("restart_tries".into(), json!(max_retries));
            }
        }
        if let Some(hc) = &self.healthcheck {
            s.insert("healthconfig".into(), hc.to_json());
        }
        if !self.volumes.is_empty() {
            let mounts: Vec<Value> = self
                .volumes
                .iter()
                .map(|v| {
                    json!({
                        "type": "bind",
                        "source": v.host_path.to_string_lossy(),
                        "destination": v.container_path,
                        "options": ["rbind", if v.read_only { "ro" } else { "rw" }],
                    })
                })
                .collect();
            s.insert("mounts".into(), Value::Array(mounts));
        }
        if !self.cap_drop.is_empty() {
            s.insert("cap_drop".into(), json!(self.cap_drop));
        }
        if !self.cap_add.is_empty() {
            s.insert("cap_add".into(), json!(self.cap_add));
        }
        let mut log = Map::new();
        log.insert("driver".into(), json!("k8s-file"));
        if let Some(size) = self.log_max_size {
            log.insert("size".into(), json!(size));
        }
        s.insert("log_configuration".into(), Value::Object(log));
        if let Some(t) = self.stop_timeout {
            s.insert("stop_timeout".into(), json!(t));
        }
        // libpod's SpecGenerator takes a syscall.Signal: a number, not a name.
        if let Some(sig) = self.stop_signal {
            s.insert("stop_signal".into(), json!(sig));
        }
        Value::Object(s)
    }
}

/// The Linux number of a signal given as `SIGTERM`, `TERM` or `15`;
/// `None` for anything else.
pub fn signal_number(name: &str) -> Option<i32> {
    let name = name.trim();
    if let Ok(n) = name.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).ok().map(|s| s as i32);
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>().ok().map(|s| s as i32)
}

/// A signal's name (`SIGTERM`) from its Linux number.
pub fn signal_name(n: i32) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(n).ok().map(|s| s.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "web-1".into(),
            image: "localhost/web:1".into(),
            command: Some(vec!["httpd".into(), "-f".into()]),
            env: [("SECRET".to_string(), "hunter2".to_string())].into(),
            labels: [("io.berth.service".to_string(), "web".to_string())].into(),
            network: "berth".into(),
            static_ip: Some(Ipv4Addr::new(10, 200, 1, 5)),
            dns_servers: vec![IpAddr::V4(Ipv4Addr::new(10, 200, 1, 1))],
            dns_search: vec!["internal".into()],
            cpu_limit: Some(0.5),
            memory_limit: Some(256 << 20),
            restart_policy: RestartPolicy::OnFailure { max_retries: 3 },
            healthcheck: Some(HealthCheck {
                cmd: vec!["true".into()],
                interval: Duration::from_secs(5),
                timeout: Duration::from_millis(1500),
                retries: 3,
                start_period: Duration::from_secs(1),
            }),
            volumes: vec![Volume {
                host_path: "/var/lib/berth/v/data".into(),
                container_path: "/data".into(),
                read_only: false,
            }],
            cap_drop: vec!["ALL".into()],
            cap_add: vec!["NET_BIND_SERVICE".into()],
            log_max_size: Some(10 << 20),
            ..Default::default()
        }
    }

    #[test]
    fn spec_generator_fields() {
        let v = spec().to_json();
        assert_eq!(v["netns"], json!({"nsmode": "bridge"}));
        assert_eq!(v["Networks"], json!({"berth": {"static_ips": ["10.200.1.5"]}}));
        assert_eq!(v["dns_server"], json!(["10.200.1.1"]));
        assert_eq!(
            v["resource_limits"],
            json!({"cpu": {"quota": 50000, "period": 100000}, "memory": {"limit": 268435456}})
        );
        assert_eq!(v["restart_policy"], "on-failure");
        assert_eq!(v["restart_tries"], 3);
        assert_eq!(v["healthconfig"]["Test"], json!(["CMD", "true"]));
        assert_eq!(v["healthconfig"]["Interval"], 5_000_000_000u64);
        assert_eq!(v["healthconfig"]["Timeout"], 1_500_000_000u64);
        assert_eq!(v["healthconfig"]["StartPeriod"], 1_000_000_000u64);
        assert_eq!(v["mounts"][0]["source"], "/var/lib/berth/v/data");
        assert_eq!(v["mounts"][0]["options"], json!(["rbind", "rw"]));
        assert_eq!(v["log_configuration"], json!({"driver": "k8s-file", "size": 10485760}));
        assert_eq!(v["env"]["SECRET"], "hunter2");
        assert!(v.get("stop_timeout").is_none());
        assert!(v.get("stop_signal").is_none());
        let mut stop = spec();
        stop.stop_timeout = Some(30);
        stop.stop_signal = signal_number("SIGQUIT");
        let v = stop.to_json();
        assert_eq!(v["stop_timeout"], 30);
        assert_eq!(v["stop_signal"], 3, "libpod wants the signal's number");
    }

    #[test]
    fn signal_names_and_numbers() {
        for (name, n) in [
            ("SIGTERM", 15),
            ("SIGINT", 2),
            ("SIGQUIT", 3),
            ("SIGHUP", 1),
            ("SIGUSR1", 10),
            ("SIGUSR2", 12),
            ("SIGWINCH", 28),
            ("SIGKILL", 9),
        ] {
            assert_eq!(signal_number(name), Some(n), "{name}");
            assert_eq!(signal_name(n), Some(name));
        }
        assert_eq!(signal_number("term"), Some(15));
        assert_eq!(signal_number("15"), Some(15));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("999"), None);
        assert_eq!(signal_number(""), None);
        // Every signal the control plane accepts has a number.
        for name in berth_protocol::service::STOP_SIGNALS {
            assert!(signal_number(name).is_some(), "{name}");
        }
    }

    #[test]
    fn debug_hides_env_values() {
        let d = format!("{:?}", spec());
        assert!(d.contains("SECRET"));
        assert!(!d.contains("hunter2"));
    }

    #[test]
    fn tiny_cpu_limit_is_clamped() {
        let mut s = spec();
        s.cpu_limit = Some(0.001);
        assert_eq!(s.to_json()["resource_limits"]["cpu"]["quota"], 1000);
        s.cpu_limit = Some(0.0);
        assert!(s.to_json()["resource_limits"].get("cpu").is_none());
    }

    #[test]
    fn network_body() {
        let n = NetworkSpec {
            name: "berth".into(),
            subnet: "10.200.1.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 200, 1, 1),
            interface_name: Some("berth0".into()),
            options: BTreeMap::new(),
            labels: [("io.berth.owner".to_string(), "agent".to_string())].into(),
        };
        let v = n.to_json();
        assert_eq!(
            v["subnets"],
            json!([{"subnet": "10.200.1.0/24", "gateway": "10.200.1.1"}])
        );
        assert_eq!(v["dns_enabled"], false);
        assert_eq!(v["network_interface"], "berth0");
        assert_eq!(v["driver"], "bridge");
    }
}
