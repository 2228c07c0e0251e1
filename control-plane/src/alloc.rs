//! Address allocation: node mesh IPs from the mesh pool, container subnets
//! from the subnet pool. Pure functions; the store calls them inside a
//! transaction and relies on UNIQUE constraints to catch concurrent picks.

use ipnet::Ipv4Net;
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// Lowest free host address of `pool` (skipping network and broadcast).
pub fn next_mesh_ip(pool: Ipv4Net, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    pool.hosts().find(|ip| !used.contains(ip))
}

/// Lowest free subnet of length `prefix` inside `pool`.
pub fn next_subnet(pool: Ipv4Net, prefix: u8, used: &HashSet<Ipv4Net>) -> Option<Ipv4Net> {
    pool.subnets(prefix).ok()?.find(|n| !used.contains(n))
}

/// How many nodes the two pools can hold together.
pub fn capacity(mesh: Ipv4Net, subnets: Ipv4Net, prefix: u8) -> u64 {
    let hosts = match mesh.prefix_len() {
        32 => 1,
        31 => 2,
        p => (1u64 << (32 - p)) - 2,
    };
    let nets = if prefix < subnets.prefix_len() {
        0
    } else {
        1u64 << (prefix - subnets.prefix_len())
    };
    hosts.min(nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_ips_fill_gaps_and_skip_network_address() {
        let pool: Ipv4Net = "10.100.0.0/16".parse().unwrap();
        let mut used = HashSet::new();
        assert_eq!(next_mesh_ip(pool, &used), Some(Ipv4Addr::new(10, 100, 0, 1)));
        used.insert(Ipv4Addr::new(10, 100, 0, 1));
        used.insert(Ipv4Addr::new(10, 100, 0, 3));
        assert_eq!(next_mesh_ip(pool, &used), Some(Ipv4Addr::new(10, 100, 0, 2)));
    }

    #[test]
    fn mesh_pool_runs_out() {
        let pool: Ipv4Net = "10.0.0.0/30".parse().unwrap();
        let used: HashSet<_> = pool.hosts().collect();
        assert_eq!(used.len(), 2);
        assert_eq!(next_mesh_ip(pool, &used), None);
    }

    #[test]
    fn subnets_are_distinct_and_inside_the_pool() {
        let pool: Ipv4Net = "10.200.0.0/13".parse().unwrap();
        let mut used = HashSet::new();
        for _ in 0..1500 {
            let n = next_subnet(pool, 24, &used).unwrap();
            assert!(pool.contains(&n));
            assert!(used.insert(n), "duplicate {n}");
        }
        assert_eq!(next_subnet(pool, 24, &used), Some("10.205.220.0/24".parse().unwrap()));
    }

    #[test]
    fn default_pools_hold_at_least_1000_nodes() {
        let cap = capacity("10.100.0.0/16".parse().unwrap(), "10.200.0.0/13".parse().unwrap(), 24);
        assert!(cap >= 1000, "{cap}");
        assert_eq!(
            capacity("10.100.0.0/16".parse().unwrap(), "10.200.0.0/16".parse().unwrap(), 24),
            256
        );
    }
}
