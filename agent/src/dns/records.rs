//! The DNS record set this node serves, from its desired state and what it
//! sees of its own replicas. Local health is the agent's own (it changes DNS
//! the moment a check fails); remote health is what the control plane
//! learned from the other nodes' reports.

use berth_protocol::DesiredState;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The record set of the zone, as computed by the agent from desired state (pure data).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Records {
    /// service name → its replicas' addresses (unhealthy ones are kept here and left out of answers).
    pub services: BTreeMap<String, Vec<ServiceAddr>>,
    /// (replica name, service name) → the replica's address.
    pub replicas: BTreeMap<(String, String), Ipv4Addr>,
    /// node name → mesh address.
    pub nodes: BTreeMap<String, Ipv4Addr>,
}

/// One replica address of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAddr {
    pub ip: Ipv4Addr,
    /// Runs on this node (answered before the remote ones).
    pub local: bool,
    pub healthy: bool,
}

/// The record set for desired state `d`, with this node's own replicas
/// healthy as `local_health` says (unknown: unhealthy).
pub fn build(d: &DesiredState, local_health: &BTreeMap<String, bool>) -> Records {
    let mut r = Records::default();
    r.nodes.insert(d.node.name.clone(), d.node.mesh_ip);
    for p in &d.peers {
        r.nodes.insert(p.name.clone(), p.mesh_ip);
    }
    for s in &d.dns {
        let addrs = s
            .replicas
            .iter()
            .map(|rep| {
                let local = rep.node == d.node.name;
                ServiceAddr {
                    ip: rep.ip,
                    local,
                    healthy: if local {
                        local_health.get(&rep.replica).copied().unwrap_or(false)
                    } else {
                        rep.healthy
                    },
                }
            })
            .collect();
        r.services.insert(s.name.clone(), addrs);
        for rep in &s.replicas {
            r.replicas.insert((rep.replica.clone(), s.name.clone()), rep.ip);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> DesiredState {
        serde_json::from_value(serde_json::json!({
            "revision": 7,
            "node": {"node_id": "a", "name": "n1", "role": "worker", "mesh_ip": "10.100.0.1",
                     "mesh_cidr": "10.100.0.0/16", "subnet": "10.200.0.0/24",
                     "subnet_pool": "10.200.0.0/13", "wg_port": 51820},
            "peers": [{"node_id": "b", "name": "n2", "wg_public_key": "k", "mesh_ip": "10.100.0.2",
                       "subnet": "10.200.1.0/24", "endpoint": null}],
            "dns": [{"name": "web", "replicas": [
                {"replica": "web-1", "node": "n1", "ip": "10.200.0.2", "healthy": false},
                {"replica": "web-2", "node": "n2", "ip": "10.200.1.2", "healthy": true},
                {"replica": "web-3", "node": "n2", "ip": "10.200.1.3", "healthy": false}
            ]}]
        }))
        .unwrap()
    }

    #[test]
    fn local_health_is_the_agents_own_remote_the_control_planes() {
        let local = BTreeMap::from([("web-1".to_string(), true)]);
        let r = build(&desired(), &local);
        let web = &r.services["web"];
        assert_eq!(
            web,
            &vec![
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 200, 0, 2),
                    local: true,
                    healthy: true
                },
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 200, 1, 2),
                    local: false,
                    healthy: true
                },
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 200, 1, 3),
                    local: false,
                    healthy: false
                },
            ]
        );
        // Unknown locally (not yet checked): not in DNS.
        let r = build(&desired(), &BTreeMap::new());
        assert!(!r.services["web"][0].healthy);
        assert_eq!(
            r.replicas[&("web-3".to_string(), "web".to_string())],
            Ipv4Addr::new(10, 200, 1, 3)
        );
        assert_eq!(r.nodes["n1"], Ipv4Addr::new(10, 100, 0, 1));
        assert_eq!(r.nodes["n2"], Ipv4Addr::new(10, 100, 0, 2));
    }
}
