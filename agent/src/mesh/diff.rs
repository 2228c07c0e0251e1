//! The peer diff (pure): the interface's current peers against the desired
//! ones, giving the peers to add, update and remove. [`super::Mesh::apply`]
//! changes only what this returns.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use defguard_wireguard_rs::{net::IpAddrMask, peer::Peer as WgPeer};
use ipnet::IpNet;

/// What [`super::Mesh::apply`] changed, as base64 public keys (each list sorted).
#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub struct PeerDiff {
    pub add: Vec<String>,
    pub update: Vec<String>,
    pub remove: Vec<String>,
}

impl PeerDiff {
    /// True when nothing had to change.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.update.is_empty() && self.remove.is_empty()
    }
}

/// A peer as configured on the interface right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentPeer {
    /// Base64 public key.
    pub public_key: String,
    /// The endpoint the interface uses (configured or learnt from the peer).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// `None` (or `Some(0)`) when off.
    pub persistent_keepalive: Option<u16>,
}

/// A peer as the control plane wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// Base64 public key.
    pub public_key: String,
    /// `None` means "no opinion": whatever the interface has (for instance an
    /// endpoint learnt from the peer's own handshakes) is kept.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// Sorted, deduplicated, host bits cleared (the way WireGuard stores them).
fn normalize_ips(ips: &[IpNet]) -> Vec<IpNet> {
    ips.iter()
        .map(IpNet::trunc)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Pure diff of the interface's peers against the desired ones.
///
/// * desired but not current: `add`;
/// * in both but different allowed IPs (order does not matter), a different
///   endpoint (only when the desired one is set) or a different keepalive:
///   `update`;
/// * current but not desired: `remove`.
///
/// Unchanged peers appear nowhere. When a key is desired twice, the last one
/// wins. Each list is sorted.
pub fn diff_peers(current: &[CurrentPeer], desired: &[DesiredPeer]) -> PeerDiff {
    let current: BTreeMap<&str, &CurrentPeer> = current.iter().map(|peer| (peer.public_key.as_str(), peer)).collect();
    let desired: BTreeMap<&str, &DesiredPeer> = desired.iter().map(|peer| (peer.public_key.as_str(), peer)).collect();

    let mut diff = PeerDiff::default();
    for (key, want) in &desired {
        match current.get(key) {
            None => diff.add.push((*key).to_owned()),
            Some(have) => {
                let ips_differ = normalize_ips(&want.allowed_ips) != normalize_ips(&have.allowed_ips);
                let endpoint_differs = want.endpoint.is_some() && want.endpoint != have.endpoint;
                let keepalive_differs =
                    want.persistent_keepalive.unwrap_or(0) != have.persistent_keepalive.unwrap_or(0);
                if ips_differ || endpoint_differs || keepalive_differs {
                    diff.update.push((*key).to_owned());
                }
            }
        }
    }
    diff.remove = current
        .keys()
        .filter(|key| !desired.contains_key(*key))
        .map(|key| (*key).to_owned())
        .collect();
    diff
}

pub(super) fn to_ipnet(mask: &IpAddrMask) -> Option<IpNet> {
    IpNet::new(mask.address, mask.cidr).ok()
}

/// The diff's view of a peer the interface reports.
pub(super) fn current_peer(peer: &WgPeer) -> CurrentPeer {
    CurrentPeer {
        public_key: BASE64.encode(peer.public_key.as_slice()),
        endpoint: peer.endpoint,
        allowed_ips: normalize_ips(&peer.allowed_ips.iter().filter_map(to_ipnet).collect::<Vec<_>>()),
        persistent_keepalive: peer.persistent_keepalive_interval.filter(|&k| k != 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn cur(key: &str, endpoint: Option<&str>, ips: &[&str]) -> CurrentPeer {
        CurrentPeer {
            public_key: key.into(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            persistent_keepalive: Some(25),
        }
    }

    fn des(key: &str, endpoint: Option<&str>, ips: &[&str]) -> DesiredPeer {
        DesiredPeer {
            public_key: key.into(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            persistent_keepalive: Some(25),
        }
    }

    #[test]
    fn diff_add_update_remove_unchanged() {
        let current = [
            cur("same", Some("198.18.0.1:51820"), &["10.100.0.1/32", "10.200.1.0/24"]),
            cur("moved", Some("198.18.0.2:51820"), &["10.100.0.2/32", "10.200.2.0/24"]),
            cur("renet", Some("198.18.0.3:51820"), &["10.100.0.3/32", "10.200.3.0/24"]),
            cur("gone", Some("198.18.0.4:51820"), &["10.100.0.4/32"]),
        ];
        let desired = [
            des("new", Some("198.18.0.5:51820"), &["10.100.0.5/32", "10.200.5.0/24"]),
            // Same allowed IPs in another order: unchanged.
            des("same", Some("198.18.0.1:51820"), &["10.200.1.0/24", "10.100.0.1/32"]),
            des("moved", Some("198.18.0.22:51820"), &["10.100.0.2/32", "10.200.2.0/24"]),
            des("renet", Some("198.18.0.3:51820"), &["10.100.0.3/32", "10.200.33.0/24"]),
        ];
        assert_eq!(
            diff_peers(&current, &desired),
            PeerDiff {
                add: vec!["new".into()],
                update: vec!["moved".into(), "renet".into()],
                remove: vec!["gone".into()],
            }
        );
    }

    #[test]
    fn diff_of_identical_sets_is_empty() {
        let current = [cur("a", Some("198.18.0.1:1"), &["10.100.0.1/32"])];
        let desired = [des("a", Some("198.18.0.1:1"), &["10.100.0.1/32"])];
        assert!(diff_peers(&current, &desired).is_empty());
        assert!(diff_peers(&[], &[]).is_empty());
    }

    #[test]
    fn diff_ignores_allowed_ip_order_duplicates_and_host_bits() {
        let current = [cur("a", None, &["10.200.1.0/24", "10.100.0.1/32"])];
        let desired = [des("a", None, &["10.100.0.1/32", "10.200.1.9/24", "10.100.0.1/32"])];
        assert!(diff_peers(&current, &desired).is_empty());
    }

    #[test]
    fn diff_without_desired_endpoint_keeps_learnt_one() {
        // The interface learnt an endpoint from the peer's handshakes; the
        // control plane has none to offer: nothing to do.
        let current = [cur("a", Some("198.18.0.9:4000"), &["10.100.0.1/32"])];
        let desired = [des("a", None, &["10.100.0.1/32"])];
        assert!(diff_peers(&current, &desired).is_empty());
        // But a desired endpoint on a peer that has none is an update.
        let current = [cur("a", None, &["10.100.0.1/32"])];
        let desired = [des("a", Some("198.18.0.9:4000"), &["10.100.0.1/32"])];
        assert_eq!(diff_peers(&current, &desired).update, vec!["a".to_owned()]);
    }

    #[test]
    fn diff_keepalive_change_is_an_update() {
        let mut current = cur("a", None, &["10.100.0.1/32"]);
        current.persistent_keepalive = None;
        let desired = [des("a", None, &["10.100.0.1/32"])];
        assert_eq!(diff_peers(&[current.clone()], &desired).update, vec!["a".to_owned()]);
        // 0 and None both mean "off".
        current.persistent_keepalive = Some(0);
        let mut off = des("a", None, &["10.100.0.1/32"]);
        off.persistent_keepalive = None;
        assert!(diff_peers(&[current], &[off]).is_empty());
    }

    #[test]
    fn diff_lists_are_sorted() {
        let desired = [des("c", None, &[]), des("a", None, &[]), des("b", None, &[])];
        assert_eq!(diff_peers(&[], &desired).add, vec!["a", "b", "c"]);
    }
}
