//! What the CLI prints: the tables of nodes, services and domains, and
//! human durations. Shared with `berth-lab`, which prints the same tables.

use berth_protocol::routes::DomainInfo;
use berth_protocol::service::ServiceInfo;
use berth_protocol::{NodeInfo, PeerStatusNamed};

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `90` -> `1m`, `5400` -> `1h30m`, `86400` -> `1d`.
pub fn humantime(secs: u64) -> String {
    match secs {
        s if s >= 86400 && s % 86400 == 0 => format!("{}d", s / 86400),
        s if s >= 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn ago(t: Option<i64>) -> String {
    match t {
        Some(t) => format!("{}s ago", (now() - t).max(0)),
        None => "never".into(),
    }
}

/// Thousandths of a core as a share of one core: `250m` is a quarter.
fn cpu(millicores: Option<u32>) -> String {
    millicores.map_or("-".into(), |m| format!("{m}m"))
}

fn bytes(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{:.0}Mi", b as f64 / (1u64 << 20) as f64),
    }
}

/// Down peers named in the PEERS column; the rest are counted (all of
/// them are in `--json`).
const DOWN_SHOWN: usize = 5;

/// The PEERS column: `4999 up`, or `4997 up, down: db-1 never, web-3 12m`
/// (a down peer with the time since its last handshake); `-` before the
/// node reported its peers.
fn peers_cell(up: Option<u32>, peers: &[PeerStatusNamed]) -> String {
    // A control plane before peer state sends no count and every peer.
    let old: Vec<PeerStatusNamed>;
    let (up, down) = match up {
        Some(up) => (up, peers),
        None if peers.is_empty() => return "-".into(),
        None => {
            let is_up = |p: &PeerStatusNamed| {
                p.handshake_age_secs
                    .is_some_and(|a| a < berth_protocol::PEER_UP_WITHIN_SECS)
            };
            old = peers.iter().filter(|p| !is_up(p)).cloned().collect();
            ((peers.len() - old.len()) as u32, old.as_slice())
        }
    };
    if down.is_empty() {
        return format!("{up} up");
    }
    let mut named: Vec<String> = down
        .iter()
        .take(DOWN_SHOWN)
        .map(|p| {
            let age = p.handshake_age_secs.map_or("never".into(), humantime);
            format!("{} {age}", p.name)
        })
        .collect();
    if down.len() > DOWN_SHOWN {
        named.push(format!("{} more", down.len() - DOWN_SHOWN));
    }
    format!("{up} up, down: {}", named.join(", "))
}

pub fn print_nodes(nodes: &[NodeInfo]) {
    println!(
        "{:<16} {:<8} {:<13} {:<16} {:<8} {:<10} {:<9} {:<12} {:<12} {:<15} PEERS",
        "NAME", "ROLE", "MESH IP", "SUBNET", "STATE", "LAST SEEN", "REVISION", "VERSION", "CPU", "MEMORY"
    );
    for n in nodes {
        let (cpu_text, mem_text) = match &n.usage {
            Some(u) => (
                format!("{}/{}", cpu(Some(u.cpu_millicores)), u.cores),
                format!(
                    "{}/{}",
                    bytes(Some(u.memory_used_bytes)),
                    bytes(Some(u.memory_total_bytes))
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<16} {:<8} {:<13} {:<16} {:<8} {:<10} {:<9} {:<12} {:<12} {:<15} {}",
            n.name,
            n.role.as_str(),
            n.mesh_ip,
            n.subnet,
            if n.online { "online" } else { "offline" },
            ago(n.last_seen),
            format!("{}/{}", n.applied_revision, n.revision),
            n.agent_version.as_deref().unwrap_or("-"),
            cpu_text,
            mem_text,
            peers_cell(n.peers_up, &n.peers)
        );
        if let Some(e) = &n.error {
            println!("  last error: {e}");
        }
    }
}

pub fn print_service(info: &ServiceInfo) {
    let s = &info.spec;
    println!("service {}  image {}  replicas {}", s.name, s.image, s.replicas);
    if let Some(p) = s.port {
        println!("  port {p}   DNS {}.internal", s.name);
    }
    if !info.secret_names.is_empty() {
        println!("  secrets: {} (values never shown)", info.secret_names.join(", "));
    }
    if let Some(c) = info.current_release {
        println!("  current release {c}");
    }
    println!(
        "  {:<14} {:<12} {:<14} {:<8} {:<10} {:<9} {:<8} {:<8} {:<7} {:<7} LAST ERROR",
        "REPLICA", "NODE", "IP", "RELEASE", "STATE", "HEALTH", "RESTARTS", "PHASE", "CPU", "MEMORY"
    );
    for r in &info.replicas {
        let health = match (r.healthy, r.gave_up) {
            (_, true) => "gave up",
            (true, _) => "healthy",
            _ => "-",
        };
        println!(
            "  {:<14} {:<12} {:<14} {:<8} {:<10} {:<9} {:<8} {:<8} {:<7} {:<7} {}",
            r.replica,
            r.node,
            r.ip,
            r.release,
            r.state,
            health,
            r.restarts,
            r.phase,
            cpu(r.cpu_millicores),
            bytes(r.memory_bytes),
            r.error.clone().unwrap_or_default()
        );
    }
}

pub fn print_services(list: &[ServiceInfo]) {
    println!("{:<20} {:<40} {:<9} PORT", "NAME", "IMAGE", "REPLICAS");
    for s in list {
        let healthy = s.replicas.iter().filter(|r| r.healthy).count();
        println!(
            "{:<20} {:<40} {:<9} {}",
            s.spec.name,
            s.spec.image,
            format!("{healthy}/{}", s.spec.replicas),
            s.spec.port.map(|p| p.to_string()).unwrap_or_default()
        );
    }
}

/// The domains table. PROXIES: online proxy nodes serving the domain (its
/// certificate or passthrough route loaded), of the online proxy nodes.
pub fn print_domains(list: &[DomainInfo]) {
    println!(
        "{:<32} {:<16} {:<6} {:<12} {:<8} {:<21} LAST ERROR",
        "DOMAIN", "SERVICE", "PORT", "CERT", "PROXIES", "EXPIRES"
    );
    for d in list {
        println!(
            "{:<32} {:<16} {:<6} {:<12} {:<8} {:<21} {}",
            d.spec.domain,
            d.spec.service,
            d.spec.port,
            d.cert_state,
            d.proxies(),
            d.cert_not_after.as_deref().unwrap_or("-"),
            d.last_error.as_deref().unwrap_or("")
        );
    }
}

/// `json` as pretty JSON, or the table `table` prints.
pub fn json_or<T: serde::Serialize + ?Sized>(json: bool, value: &T, table: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table(value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(name: &str, age: Option<u64>) -> PeerStatusNamed {
        PeerStatusNamed {
            name: name.into(),
            handshake_age_secs: age,
        }
    }

    #[test]
    fn the_peers_column_counts_the_up_and_names_the_down() {
        assert_eq!(peers_cell(None, &[]), "-");
        // From a control plane before peer state: every peer, no count.
        assert_eq!(
            peers_cell(None, &[down("a", Some(7)), down("b", None), down("c", Some(400))]),
            "1 up, down: b never, c 6m"
        );
        assert_eq!(peers_cell(Some(4999), &[]), "4999 up");
        assert_eq!(
            peers_cell(Some(4997), &[down("db-1", None), down("web-3", Some(725))]),
            "4997 up, down: db-1 never, web-3 12m"
        );
        let many: Vec<PeerStatusNamed> = (0..8).map(|i| down(&format!("n{i}"), Some(200))).collect();
        assert_eq!(
            peers_cell(Some(0), &many),
            "0 up, down: n0 3m, n1 3m, n2 3m, n3 3m, n4 3m, 3 more"
        );
    }
}
