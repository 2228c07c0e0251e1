//! Placement: which node runs each replica of a service. Pure functions;
//! the store applies the result inside a transaction.

use berth_protocol::service::ServiceSpec;
use berth_protocol::FieldError;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

/// A node as placement sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub name: String,
    pub online: bool,
    pub worker: bool,
    /// Replicas of all services already on the node.
    pub load: usize,
}

/// Assigns every ordinal `0..spec.replicas` a node id. Replicas already
/// placed on a node that is still eligible stay where they are.
pub fn place(
    spec: &ServiceSpec,
    existing: &BTreeMap<u32, String>,
    nodes: &[Candidate],
) -> Result<BTreeMap<u32, String>, FieldError> {
    for n in &spec.nodes {
        if !nodes.iter().any(|c| &c.name == n) {
            return Err(FieldError::new("nodes", format_args!("no node named {n:?}")));
        }
    }
    let eligible: Vec<&Candidate> = nodes
        .iter()
        .filter(|c| {
            if spec.nodes.is_empty() {
                c.online && c.worker
            } else {
                spec.nodes.contains(&c.name)
            }
        })
        .collect();
    let is_eligible = |id: &str| eligible.iter().any(|c| c.id == id);
    let mut out: BTreeMap<u32, String> = existing
        .iter()
        .filter(|(o, id)| **o < spec.replicas && is_eligible(id))
        .map(|(o, id)| (*o, id.clone()))
        .collect();
    if out.len() == spec.replicas as usize {
        return Ok(out);
    }
    if eligible.is_empty() {
        return Err(if spec.nodes.is_empty() {
            FieldError::new("replicas", "no online worker node to place them on")
        } else {
            FieldError::new("nodes", format_args!("none of {:?} can take replicas", spec.nodes))
        });
    }
    // A service with volumes keeps all its replicas on one node, the one
    // that already holds its data if any.
    let sticky: Option<String> = if spec.volumes.is_empty() {
        None
    } else {
        existing
            .values()
            .next()
            .filter(|id| is_eligible(id))
            .cloned()
            .or_else(|| {
                eligible
                    .iter()
                    .min_by_key(|c| (c.load, c.name.clone()))
                    .map(|c| c.id.clone())
            })
    };
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for id in out.values() {
        *per_node.entry(id.as_str()).or_default() += 1;
    }
    let mut extra: BTreeMap<String, usize> = BTreeMap::new();
    for ordinal in 0..spec.replicas {
        if out.contains_key(&ordinal) {
            continue;
        }
        let id = match &sticky {
            Some(id) => id.clone(),
            None => {
                let mine = |c: &Candidate| out.values().filter(|v| **v == c.id).count();
                eligible
                    .iter()
                    .min_by_key(|c| (mine(c), c.load + extra.get(&c.id).copied().unwrap_or(0), c.name.clone()))
                    .map(|c| c.id.clone())
                    .expect("eligible is not empty")
            }
        };
        *extra.entry(id.clone()).or_default() += 1;
        out.insert(ordinal, id);
    }
    Ok(out)
}

/// Lowest free address of `subnet` for a container: the gateway (.1),
/// network and broadcast addresses are never handed out.
pub fn next_container_ip(subnet: Ipv4Net, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    subnet.hosts().skip(1).find(|ip| !used.contains(ip))
}

/// The first free address of `subnet` after `cursor` (the last one handed
/// out), wrapping round; the lowest free one without a cursor.
pub fn next_container_ip_after(
    subnet: Ipv4Net,
    used: &HashSet<Ipv4Addr>,
    cursor: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let after = |ip: &Ipv4Addr| cursor.is_none_or(|c| *ip > c);
    subnet
        .hosts()
        .skip(1)
        .filter(|ip| !used.contains(ip))
        .find(after)
        .or_else(|| next_container_ip(subnet, used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::service::Volume;

    fn spec(replicas: u32) -> ServiceSpec {
        let mut s: ServiceSpec = serde_json::from_str(r#"{"name":"web","image":"busybox"}"#).unwrap();
        s.replicas = replicas;
        s
    }

    fn nodes() -> Vec<Candidate> {
        ["a", "b", "c"]
            .iter()
            .map(|n| Candidate {
                id: format!("id-{n}"),
                name: n.to_string(),
                online: true,
                worker: true,
                load: 0,
            })
            .collect()
    }

    fn count(p: &BTreeMap<u32, String>, id: &str) -> usize {
        p.values().filter(|v| *v == id).count()
    }

    #[test]
    fn spreads_across_nodes() {
        let p = place(&spec(3), &BTreeMap::new(), &nodes()).unwrap();
        assert_eq!(p.len(), 3);
        for n in ["id-a", "id-b", "id-c"] {
            assert_eq!(count(&p, n), 1);
        }
        let p = place(&spec(5), &p, &nodes()).unwrap();
        assert!(["id-a", "id-b", "id-c"].iter().all(|n| (1..=2).contains(&count(&p, n))));
    }

    #[test]
    fn prefers_less_loaded_nodes_and_skips_offline_and_proxies() {
        let mut ns = nodes();
        ns[0].load = 5;
        ns[1].online = false;
        ns.push(Candidate {
            id: "id-p".into(),
            name: "p".into(),
            online: true,
            worker: false,
            load: 0,
        });
        let p = place(&spec(1), &BTreeMap::new(), &ns).unwrap();
        assert_eq!(p[&0], "id-c");
    }

    #[test]
    fn existing_replicas_stay_and_scale_down_drops_high_ordinals() {
        let existing: BTreeMap<u32, String> = [(0, "id-c".to_string()), (1, "id-a".to_string())].into();
        let p = place(&spec(2), &existing, &nodes()).unwrap();
        assert_eq!(p, existing);
        let p = place(&spec(1), &existing, &nodes()).unwrap();
        assert_eq!(p, [(0, "id-c".to_string())].into());
    }

    #[test]
    fn replicas_move_off_a_removed_node() {
        let existing: BTreeMap<u32, String> = [(0, "id-gone".to_string()), (1, "id-a".to_string())].into();
        let p = place(&spec(2), &existing, &nodes()).unwrap();
        assert_eq!(p[&1], "id-a");
        assert_ne!(p[&0], "id-gone");
        assert_ne!(p[&0], "id-a", "spread: the moved replica goes to another node");
    }

    #[test]
    fn pinned_and_volume_services() {
        let mut s = spec(2);
        s.nodes = vec!["b".into()];
        let p = place(&s, &BTreeMap::new(), &nodes()).unwrap();
        assert_eq!(count(&p, "id-b"), 2);
        s.nodes = vec!["zz".into()];
        let e = place(&s, &BTreeMap::new(), &nodes()).unwrap_err();
        assert!(e.to_string().starts_with("nodes:"), "{e}");
        assert_eq!(e.field, "nodes");

        let mut v = spec(2);
        v.volumes.push(Volume {
            name: "data".into(),
            path: "/data".into(),
        });
        let existing: BTreeMap<u32, String> = [(0, "id-c".to_string())].into();
        let p = place(&v, &existing, &nodes()).unwrap();
        assert_eq!(count(&p, "id-c"), 2, "volume services stay on their node");
    }

    #[test]
    fn no_node_fits() {
        let mut ns = nodes();
        ns.iter_mut().for_each(|n| n.online = false);
        assert!(place(&spec(1), &BTreeMap::new(), &ns)
            .unwrap_err()
            .to_string()
            .starts_with("replicas:"));
        assert!(place(&spec(0), &BTreeMap::new(), &ns).unwrap().is_empty());
    }

    #[test]
    fn container_ips_skip_the_gateway() {
        let net: Ipv4Net = "10.200.3.0/24".parse().unwrap();
        let mut used = HashSet::new();
        assert_eq!(next_container_ip(net, &used), Some(Ipv4Addr::new(10, 200, 3, 2)));
        used.insert(Ipv4Addr::new(10, 200, 3, 2));
        assert_eq!(next_container_ip(net, &used), Some(Ipv4Addr::new(10, 200, 3, 3)));
        let full: HashSet<_> = net.hosts().collect();
        assert_eq!(next_container_ip(net, &full), None);
        // Round the subnet: a freed address is not handed out again at once.
        let ip = |d| Ipv4Addr::new(10, 200, 3, d);
        let used: HashSet<_> = [ip(3)].into();
        assert_eq!(next_container_ip_after(net, &used, Some(ip(4))), Some(ip(5)));
        assert_eq!(next_container_ip_after(net, &used, Some(ip(254))), Some(ip(2)));
        assert_eq!(next_container_ip_after(net, &full, Some(ip(9))), None);
    }
}
