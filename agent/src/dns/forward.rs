//! Names outside the cluster zone: the upstream resolvers (read from the
//! host's resolv.conf) and the hickory forwarder that sends queries to them.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hickory_server::proto::rr::{LowerName, Name};
use hickory_server::resolver::config::{NameServerConfig, ResolverOpts};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::Catalog;

/// How long the forwarder waits for one upstream before trying the next.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the `nameserver` lines of a resolv.conf (port 53 each), skipping the
/// addresses in `exclude` (our own listen addresses: forwarding to ourselves would
/// loop) and scoped IPv6 addresses. Errors, naming the file, when it cannot be read
/// or lists no usable nameserver.
pub fn upstreams_from_resolv_conf(path: &Path, exclude: &[IpAddr]) -> anyhow::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let upstreams = parse_resolv_conf(&text, exclude);
    if upstreams.is_empty() {
        bail!(
            "{}: no usable nameserver (none listed, or all of them are this DNS server's own addresses)",
            path.display()
        );
    }
    Ok(upstreams)
}

fn parse_resolv_conf(text: &str, exclude: &[IpAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else { continue };
        if word.contains('%') {
            tracing::warn!(nameserver = word, "skipping scoped nameserver address");
            continue;
        }
        let Ok(ip) = word.parse::<IpAddr>() else {
            tracing::warn!(nameserver = word, "skipping unparsable nameserver address");
            continue;
        };
        let addr = SocketAddr::new(ip, 53);
        if exclude.contains(&ip) || out.contains(&addr) {
            continue;
        }
        out.push(addr);
    }
    out
}

/// A catalog forwarding every name to `upstreams`; empty (every query refused)
/// when there is none.
pub(super) fn forward_catalog(upstreams: &[SocketAddr]) -> anyhow::Result<Catalog> {
    let mut catalog = Catalog::new();
    if upstreams.is_empty() {
        tracing::warn!("DNS: no upstream resolver, names outside the cluster zone are refused");
        return Ok(catalog);
    }
    let name_servers = upstreams
        .iter()
        .map(|u| {
            let mut ns = NameServerConfig::udp_and_tcp(u.ip());
            for conn in &mut ns.connections {
                conn.port = u.port();
            }
            ns
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.timeout = UPSTREAM_TIMEOUT;
    options.attempts = 1;
    options.num_concurrent_reqs = 1;
    let handler = ForwardZoneHandler::builder_tokio(ForwardConfig {
        name_servers,
        options: Some(options),
    })
    .build()
    .map_err(|e| anyhow::anyhow!("DNS: forwarder: {e}"))?;
    catalog.upsert(LowerName::new(&Name::root()), vec![Arc::new(handler)]);
    Ok(catalog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_parsing() {
        let text = "# generated\nsearch example.org\nnameserver 10.0.0.2\nnameserver  127.0.0.53 # stub\n\
                    nameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver ::1\n;nameserver 9.9.9.9\n\
                    nameserver bogus\noptions edns0\nnameserver 10.1.1.1\n";
        let exclude: Vec<IpAddr> = vec!["10.1.1.1".parse().unwrap()];
        let got = parse_resolv_conf(text, &exclude);
        let want: Vec<SocketAddr> = ["10.0.0.2:53", "127.0.0.53:53", "[::1]:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn resolv_conf_without_nameserver_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 10.9.9.9\n").unwrap();
        let err = upstreams_from_resolv_conf(&path, &["10.9.9.9".parse().unwrap()]).unwrap_err();
        assert!(format!("{err:#}").contains(&path.display().to_string()), "{err:#}");
        let missing = dir.path().join("missing.conf");
        let err = upstreams_from_resolv_conf(&missing, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("missing.conf"), "{err:#}");
    }
}
