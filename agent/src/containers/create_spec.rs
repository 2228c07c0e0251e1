//! The create spec of a replica's container: from a replica the control
//! plane wants to the [`ContainerSpec`] Podman is asked to create (pure, so
//! every field is unit-tested). Podman's own types are in `crate::podman::spec`.

use super::diff::{spec_hash, LABEL_OWNER, LABEL_REPLICA, LABEL_SERVICE, LABEL_SPEC};
use crate::podman::{signal_number, ContainerSpec, HealthCheck, RestartPolicy, Volume};
use berth_protocol::service::{ContainerDesired, DEFAULT_STOP_TIMEOUT};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Value of [`LABEL_OWNER`] on every container this agent runs.
pub const OWNER: &str = "berth";
/// Health checks: how often, how long one may take, and how many failures
/// in a row make a replica unhealthy.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(3);
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
pub const HEALTH_RETRIES: u32 = 2;
/// Container log (k8s-file) is truncated at this size.
pub const LOG_MAX_SIZE: u64 = 10 << 20;
/// Seconds between the stop signal and SIGKILL when a replica asks for no
/// other timeout.
pub const STOP_TIMEOUT: u32 = DEFAULT_STOP_TIMEOUT;
/// Capabilities dropped from Podman's default set: none of them is needed by
/// a network service, and each widens what a compromised container can do
/// (raw sockets, device nodes, chroot escapes, file capabilities, audit).
pub const CAP_DROP: [&str; 5] = ["NET_RAW", "MKNOD", "SYS_CHROOT", "SETFCAP", "AUDIT_WRITE"];

/// Where this node's containers live: its Podman network and DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    pub network: String,
    pub gateway: Ipv4Addr,
    pub zone: String,
    /// Volumes live under `<volumes_dir>/<service>/<volume>`.
    pub volumes_dir: PathBuf,
}

/// Podman's name for a replica's container.
pub fn container_name(replica: &str) -> String {
    format!("berth-{replica}")
}

/// The MAC of the container at `ip`: locally administered, derived from the
/// IP, so a replaced or restarted replica keeps it and no neighbour (the host,
/// other containers) sends its traffic to a stale ARP entry.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Host directory of a service's volume.
pub fn volume_dir(volumes_dir: &Path, service: &str, volume: &str) -> PathBuf {
    volumes_dir.join(service).join(volume)
}

/// The container for replica `c`, with its opened `secrets` merged into the
/// environment (they only ever travel in the create request's body).
pub fn container_spec(c: &ContainerDesired, secrets: &BTreeMap<String, String>, net: &NodeNet) -> ContainerSpec {
    let mut env = c.env.clone();
    env.extend(secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
    let labels = BTreeMap::from([
        (LABEL_OWNER.to_string(), OWNER.to_string()),
        (LABEL_REPLICA.to_string(), c.replica.clone()),
        (LABEL_SERVICE.to_string(), c.service.clone()),
        (LABEL_SPEC.to_string(), spec_hash(c, secrets)),
    ]);
    ContainerSpec {
        name: container_name(&c.replica),
        image: c.image.clone(),
        command: c
            .command
            .as_ref()
            .map(|cmd| vec!["/bin/sh".to_string(), "-c".to_string(), cmd.clone()]),
        env,
        labels,
        hostname: Some(c.replica.clone()),
        network: net.network.clone(),
        static_ip: Some(c.ip),
        static_mac: Some(mac_for(c.ip)),
        dns_servers: vec![IpAddr::V4(net.gateway)],
        dns_search: vec![net.zone.clone()],
        cpu_limit: c.cpu,
        memory_limit: c.memory,
        restart_policy: RestartPolicy::Always,
        // HTTP checks are made by the agent from outside (no tool needed in
        // the image); a command check must run inside, through Podman.
        healthcheck: c
            .health_cmd
            .as_ref()
            .map(|cmd| HealthCheck::shell(cmd.clone(), HEALTH_INTERVAL, HEALTH_TIMEOUT, HEALTH_RETRIES)),
        volumes: c
            .volumes
            .iter()
            .map(|v| Volume {
                host_path: volume_dir(&net.volumes_dir, &c.service, &v.name),
                container_path: v.path.clone(),
                read_only: false,
            })
            .collect(),
        cap_drop: CAP_DROP.iter().map(|s| s.to_string()).collect(),
        cap_add: vec![],
        log_max_size: Some(LOG_MAX_SIZE),
        stop_timeout: Some(stop_timeout(c)),
        // Unknown names were refused by the control plane; Podman's default
        // (SIGTERM) is the safe reading of one that got through anyway.
        stop_signal: c.stop_signal.as_deref().and_then(signal_number),
    }
}

/// Seconds replica `c` is given between its stop signal and SIGKILL.
pub fn stop_timeout(c: &ContainerDesired) -> u32 {
    c.stop_timeout.unwrap_or(STOP_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> ContainerDesired {
        serde_json::from_value(serde_json::json!({
            "replica": "web-2", "service": "web", "image": "localhost/x:1", "ip": "10.200.3.7", "port": 8080,
            "env": {"A": "1"}, "sealed_secrets": "sealed", "command": "exec httpd -f", "cpu": 0.5,
            "memory": 268435456, "health_cmd": "test -f /ok", "health_http": null,
            "volumes": [{"name": "data", "path": "/var/data"}]
        }))
        .unwrap()
    }

    fn net() -> NodeNet {
        NodeNet {
            network: "berth".into(),
            gateway: Ipv4Addr::new(10, 200, 3, 1),
            zone: "internal".into(),
            volumes_dir: "/var/lib/berth/volumes".into(),
        }
    }

    #[test]
    fn every_field_is_mapped() {
        let secrets = BTreeMap::from([("TOKEN".to_string(), "s3cret".to_string())]);
        let s = container_spec(&desired(), &secrets, &net());
        assert_eq!(s.name, "berth-web-2");
        assert_eq!(s.hostname.as_deref(), Some("web-2"));
        assert_eq!(s.image, "localhost/x:1");
        assert_eq!(
            s.command,
            Some(vec!["/bin/sh".into(), "-c".into(), "exec httpd -f".into()])
        );
        assert_eq!(s.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(s.env.get("TOKEN").map(String::as_str), Some("s3cret"));
        assert_eq!(s.static_ip, Some(Ipv4Addr::new(10, 200, 3, 7)));
        assert_eq!(s.network, "berth");
        assert_eq!(s.static_mac.as_deref(), Some("02:42:0a:c8:03:07"));
        assert_eq!(s.dns_servers, vec![IpAddr::V4(Ipv4Addr::new(10, 200, 3, 1))]);
        assert_eq!(s.dns_search, vec!["internal".to_string()]);
        assert_eq!(s.cpu_limit, Some(0.5));
        assert_eq!(s.memory_limit, Some(256 << 20));
        assert_eq!(s.restart_policy, RestartPolicy::Always);
        let hc = s.healthcheck.as_ref().unwrap();
        assert_eq!(hc.cmd, vec!["CMD-SHELL".to_string(), "test -f /ok".to_string()]);
        assert_eq!(hc.retries, HEALTH_RETRIES);
        assert_eq!(s.volumes.len(), 1);
        assert_eq!(s.volumes[0].host_path, PathBuf::from("/var/lib/berth/volumes/web/data"));
        assert_eq!(s.volumes[0].container_path, "/var/data");
        assert!(s.cap_drop.contains(&"NET_RAW".to_string()));
        assert_eq!(s.log_max_size, Some(LOG_MAX_SIZE));
        assert_eq!(s.labels[LABEL_OWNER], OWNER);
        assert_eq!(s.labels[LABEL_REPLICA], "web-2");
        assert_eq!(s.labels[LABEL_SERVICE], "web");
        assert_eq!(s.labels[LABEL_SPEC], spec_hash(&desired(), &secrets));
        // Secrets never reach a label or the Debug output.
        assert!(!s.labels.values().any(|v| v.contains("s3cret")));
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn stop_signal_and_timeout() {
        let s = container_spec(&desired(), &BTreeMap::new(), &net());
        assert_eq!(s.stop_timeout, Some(STOP_TIMEOUT));
        assert_eq!(s.stop_signal, None, "Podman's default, SIGTERM");
        let mut c = desired();
        c.stop_signal = Some("SIGQUIT".into());
        c.stop_timeout = Some(45);
        let s = container_spec(&c, &BTreeMap::new(), &net());
        assert_eq!(s.stop_timeout, Some(45));
        assert_eq!(s.stop_signal, Some(3));
        assert_eq!(stop_timeout(&c), 45);
        c.stop_signal = Some("SIGBOGUS".into());
        assert_eq!(container_spec(&c, &BTreeMap::new(), &net()).stop_signal, None);
        // Either field changes the container: it is replaced.
        let base = spec_hash(&desired(), &BTreeMap::new());
        let mut t = desired();
        t.stop_timeout = Some(10);
        assert_ne!(spec_hash(&t, &BTreeMap::new()), base);
        let mut g = desired();
        g.stop_signal = Some("SIGTERM".into());
        assert_ne!(spec_hash(&g, &BTreeMap::new()), base);
    }

    #[test]
    fn http_health_is_not_a_podman_check() {
        let mut c = desired();
        c.health_cmd = None;
        c.health_http = Some("/healthz".into());
        assert!(container_spec(&c, &BTreeMap::new(), &net()).healthcheck.is_none());
    }
}
