//! Desired state: what each node should run, computed from a [`FleetView`]
//! (the store read once, at one revision). One view serves every long-poll
//! that wakes for the same revision, so a change fans out to all nodes with
//! one store read.

use crate::acme::ChallengeKind;
use crate::store::nodes::{name_of, NodeRow};
use crate::store::releases::ReleaseRow;
use crate::store::routes::{ChallengeRow, DomainRow, TcpRouteRow};
use crate::store::services::{Phase, ReplicaRow, ServiceRow};
use berth_protocol::proxy::{
    AlpnChallenge, CertDesired, Http01Challenge, HttpRouteDesired, PassthroughDesired, ProxyDesired, TcpRouteDesired,
    UpstreamDesired,
};
use berth_protocol::service::{ContainerDesired, DnsReplica};
use berth_protocol::{DesiredState, DnsService, NodeSelf, Peer, Role};
use bytes::Bytes;
use ipnet::Ipv4Net;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use x25519_dalek::StaticSecret;

/// The whole fleet as the store had it at one cluster revision: nodes,
/// services, replicas and routes, with what is encoded once per revision.
#[derive(Debug, Default)]
pub struct FleetView {
    pub revision: i64,
    /// Names this view among every view this process builds (random, so a
    /// view of a control plane that restarted never passes for one of its
    /// predecessor's): the `base` of a delta.
    pub id: u64,
    /// Sorted by name (bytewise), as documents list peers.
    pub nodes: Vec<NodeRow>,
    /// Index into `nodes` by node id.
    by_id: HashMap<String, usize>,
    /// Node ids whose peer entry differs from the view built before this
    /// one (added, changed or removed): what a delta's peers come from.
    pub peers_changed: HashSet<String>,
    /// DNS records, built once per view.
    dns: OnceLock<Vec<DnsService>>,
    pub services: Vec<ServiceRow>,
    pub replicas: Vec<ReplicaRow>,
    /// The releases some replica runs: a replica runs its release's spec.
    pub releases: Vec<ReleaseRow>,
    /// Each node as a peer, JSON-encoded once per view (see [`encode_for_node`]).
    peers: PeerBlocks,
    /// Domains, TCP routes and pending challenges: what proxy nodes serve.
    pub routes: Routes,
    /// Certificate keys resealed to each proxy, (node id, domain) → sealed
    /// PEM: sealing is randomised, so every document built from this
    /// view must reuse one result (and a wake-up of N long-polls then
    /// seals once per proxy, not once per poll).
    pub sealed_keys: std::sync::Mutex<HashMap<(String, String), String>>,
    /// The fleet registry, whose per-node credentials each document carries.
    pub registry: Option<Arc<crate::registry::Registry>>,
}

/// The proxy part of the store at one revision.
#[derive(Debug, Default, Clone)]
pub struct Routes {
    pub domains: Vec<DomainRow>,
    pub tcp: Vec<TcpRouteRow>,
    pub challenges: Vec<ChallengeRow>,
}

/// Every node's peer entry, encoded once per view as `,{...}` in `nodes`
/// order, into two blocks: with its public endpoint (or none), and with its
/// private one (for nodes on the same network; nodes without a private
/// address have no entry there). A full document's peer list is slices of
/// these blocks, shared by every document built from the view rather than
/// copied into each: a fleet resyncing at once holds one copy.
#[derive(Debug, Default)]
struct PeerBlocks {
    public: Bytes,
    private: Bytes,
    /// Per node, as `nodes`: its entry's range in `public`, and in `private`.
    spans: Vec<(Range<usize>, Option<Range<usize>>)>,
}

impl PeerBlocks {
    fn new(nodes: &[NodeRow]) -> PeerBlocks {
        let (mut public, mut private) = (Vec::new(), Vec::new());
        let add = |block: &mut Vec<u8>, p: Peer| {
            let start = block.len();
            block.push(b',');
            serde_json::to_writer(&mut *block, &p).expect("a peer encodes");
            start..block.len()
        };
        let spans = nodes
            .iter()
            .map(|n| {
                let pub_span = add(&mut public, peer(n, public_endpoint(n)));
                let priv_span = private_endpoint(n).map(|e| add(&mut private, peer(n, Some(e))));
                (pub_span, priv_span)
            })
            .collect();
        PeerBlocks {
            public: public.into(),
            private: private.into(),
            spans,
        }
    }

    /// Node `i`'s entries: public, private.
    fn entries(&self, i: usize) -> (&[u8], Option<&[u8]>) {
        let (public, private) = &self.spans[i];
        (&self.public[public.clone()], private.clone().map(|r| &self.private[r]))
    }
}

fn peer(n: &NodeRow, endpoint: Option<SocketAddr>) -> Peer {
    Peer {
        node_id: n.id.clone(),
        name: n.name.clone(),
        wg_public_key: n.wg_public_key.clone(),
        mesh_ip: n.mesh_ip,
        subnet: n.subnet.to_string(),
        endpoint,
    }
}

fn same_network(a: &NodeRow, b: &NodeRow) -> bool {
    matches!((a.private_addr, b.private_addr), (Some(x), Some(y)) if x.network() == y.network() && x.prefix_len() == y.prefix_len())
}

impl FleetView {
    pub fn new(
        revision: i64,
        mut nodes: Vec<NodeRow>,
        services: Vec<ServiceRow>,
        replicas: Vec<ReplicaRow>,
    ) -> FleetView {
        // The store's ORDER BY name follows the database's collation; the
        // documents and the agents' merged deltas sort bytewise.
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let by_id = nodes.iter().enumerate().map(|(i, n)| (n.id.clone(), i)).collect();
        let peers = PeerBlocks::new(&nodes);
        FleetView {
            revision,
            id: rand::random::<u64>() >> 11,
            nodes,
            by_id,
            peers_changed: HashSet::new(),
            dns: OnceLock::new(),
            services,
            replicas,
            releases: vec![],
            peers,
            routes: Routes::default(),
            sealed_keys: Default::default(),
            registry: None,
        }
    }

    pub fn with_routes(mut self, routes: Routes) -> FleetView {
        self.routes = routes;
        self
    }

    pub fn with_registry(mut self, registry: Option<Arc<crate::registry::Registry>>) -> FleetView {
        self.registry = registry;
        self
    }

    pub fn with_releases(mut self, releases: Vec<ReleaseRow>) -> FleetView {
        self.releases = releases;
        self
    }

    /// Records which peer entries differ from `prev`'s, the view built
    /// before this one.
    pub fn after(mut self, prev: &FleetView) -> FleetView {
        let mut changed: HashSet<String> = prev
            .nodes
            .iter()
            .filter(|n| !self.by_id.contains_key(&n.id))
            .map(|n| n.id.clone())
            .collect();
        for (i, n) in self.nodes.iter().enumerate() {
            let before = prev.by_id.get(&n.id).map(|&j| prev.peers.entries(j));
            if before != Some(self.peers.entries(i)) {
                changed.insert(n.id.clone());
            }
        }
        self.peers_changed = changed;
        self
    }

    pub fn node(&self, id: &str) -> Option<&NodeRow> {
        self.by_id.get(id).and_then(|&i| self.nodes.get(i))
    }

    /// Every service's replicas as DNS answers them, built on first use.
    pub fn dns(&self) -> &[DnsService] {
        self.dns.get_or_init(|| dns_records(self))
    }

    /// The spec and sealed secrets replica `r` runs: its release's, or the
    /// service's newest when the release is not in the view.
    fn spec_of(&self, r: &ReplicaRow) -> Option<(&berth_protocol::service::ServiceSpec, Option<&str>)> {
        if let Some(rel) = self
            .releases
            .iter()
            .find(|x| x.service == r.service && x.number == r.release)
        {
            return Some((&rel.spec, rel.secrets_sealed.as_deref()));
        }
        let s = self.services.iter().find(|s| s.name == r.service)?;
        Some((&s.spec, s.secrets_sealed.as_deref()))
    }
}

/// Where `from` should send packets for `to`: `to`'s private address when
/// both sit on the same network, otherwise its public address. (The
/// encoded documents pick between the two pre-encoded peer entries by the
/// same rule.)
fn endpoint(from: &NodeRow, to: &NodeRow) -> Option<SocketAddr> {
    match same_network(from, to) {
        true => private_endpoint(to),
        false => public_endpoint(to),
    }
}

fn private_endpoint(n: &NodeRow) -> Option<SocketAddr> {
    n.private_addr.map(|p| SocketAddr::new(IpAddr::V4(p.addr()), n.wg_port))
}

fn public_endpoint(n: &NodeRow) -> Option<SocketAddr> {
    n.public_ip.map(|ip| SocketAddr::new(ip, n.wg_port))
}

/// How a document carries what is sealed (secrets, certificate keys).
#[derive(Clone, Copy)]
pub enum Sealing<'a> {
    /// Resealed to the node, with the control plane's key: what is sent.
    ToNode(&'a StaticSecret),
    /// As the store keeps it, sealed to the control plane: sealing is
    /// randomised, so two views' documents are compared in this form.
    Stable,
}

/// Reseals a service's secrets (sealed to the control plane) to one node.
pub(crate) fn reseal(cp_key: &StaticSecret, sealed: &str, node_key: Option<&str>) -> Option<String> {
    let plain = berth_protocol::seal::open(cp_key, sealed).ok()?;
    let node_key = berth_protocol::seal::parse_public("sealing_key", node_key?).ok()?;
    Some(berth_protocol::seal::seal(&node_key, &plain))
}

/// DNS records: every service with its replicas, whatever node they are on.
pub fn dns_records(fleet: &FleetView) -> Vec<DnsService> {
    fleet
        .services
        .iter()
        .map(|s| DnsService {
            name: s.name.clone(),
            replicas: fleet
                .replicas
                .iter()
                .filter(|r| r.service == s.name && r.phase == Phase::Active)
                .map(|r| DnsReplica {
                    replica: r.name(),
                    node: name_of(&fleet.nodes, &r.node_id),
                    ip: r.ip,
                    healthy: r.healthy,
                })
                .collect(),
        })
        .collect()
}

/// The containers `node` runs: its replicas, secrets sealed to its key.
pub fn containers(fleet: &FleetView, node: &NodeRow, sealing: Sealing) -> Vec<ContainerDesired> {
    fleet
        .replicas
        .iter()
        .filter(|r| r.node_id == node.id)
        .filter_map(|r| {
            let (spec, secrets_sealed) = fleet.spec_of(r)?;
            Some(ContainerDesired {
                replica: r.name(),
                service: r.service.clone(),
                image: spec.image.clone(),
                ip: r.ip,
                port: spec.port,
                env: spec.env.clone(),
                sealed_secrets: secrets_sealed.and_then(|x| match sealing {
                    Sealing::ToNode(cp_key) => reseal(cp_key, x, node.sealing_key.as_deref()),
                    Sealing::Stable => Some(x.to_string()),
                }),
                command: spec.command.clone(),
                cpu: spec.cpu,
                memory: spec.memory,
                health_cmd: spec.health_cmd.clone(),
                health_http: spec.health_http.clone(),
                volumes: spec.volumes.clone(),
                stop_signal: spec.stop_signal.clone(),
                stop_timeout: spec.stop_timeout,
            })
        })
        .collect()
}

/// The desired state of `node` in `fleet`, or None if it is not in the view:
/// the plain build [`encode_for_node`] is checked against (the server only
/// ever sends the encoded form).
#[cfg(test)]
fn for_node(
    fleet: &FleetView,
    node_id: &str,
    mesh: Ipv4Net,
    subnet_pool: Ipv4Net,
    cp_key: &StaticSecret,
) -> Option<DesiredState> {
    let mut d = without_peers(fleet, node_id, mesh, subnet_pool, Sealing::ToNode(cp_key))?;
    let me = fleet.node(node_id)?;
    d.peers = fleet
        .nodes
        .iter()
        .filter(|n| n.id != me.id)
        .map(|n| peer(n, endpoint(me, n)))
        .collect();
    Some(d)
}

fn without_peers(
    fleet: &FleetView,
    node_id: &str,
    mesh: Ipv4Net,
    subnet_pool: Ipv4Net,
    sealing: Sealing,
) -> Option<DesiredState> {
    let me = fleet.node(node_id)?;
    Some(DesiredState {
        revision: me.revision as u64,
        node: node_self(me, mesh, subnet_pool),
        peers: vec![],
        containers: containers(fleet, me, sealing),
        dns: fleet.dns().to_vec(),
        proxy: proxy(fleet, me, sealing),
        upgrade_to: me.target_version.clone(),
        registry: registry_access(fleet, me),
    })
}

fn node_self(me: &NodeRow, mesh: Ipv4Net, subnet_pool: Ipv4Net) -> NodeSelf {
    NodeSelf {
        node_id: me.id.clone(),
        name: me.name.clone(),
        role: me.role,
        mesh_ip: me.mesh_ip,
        mesh_cidr: mesh.to_string(),
        subnet: me.subnet.to_string(),
        subnet_pool: subnet_pool.to_string(),
        wg_port: me.wg_port,
    }
}

fn registry_access(fleet: &FleetView, me: &NodeRow) -> Option<berth_protocol::api::RegistryAccess> {
    fleet.registry.as_ref().map(|r| berth_protocol::api::RegistryAccess {
        host: r.host.clone(),
        username: me.name.clone(),
        password: r.node_password(&me.id),
    })
}

/// The replicas of `service`, each as an upstream on `port`.
fn upstreams(fleet: &FleetView, service: &str, port: u16) -> Vec<UpstreamDesired> {
    fleet
        .replicas
        .iter()
        .filter(|r| r.service == service && r.phase == Phase::Active)
        .map(|r| UpstreamDesired {
            replica: r.name(),
            node: name_of(&fleet.nodes, &r.node_id),
            ip: r.ip,
            port,
            healthy: r.healthy,
            // No source of unequal weights yet: every replica counts the same.
            weight: 1,
        })
        .collect()
}

/// A certificate key (sealed to the control plane) resealed to `node`,
/// once per view.
fn sealed_key(fleet: &FleetView, node: &NodeRow, d: &DomainRow, cp_key: &StaticSecret) -> Option<String> {
    let key = (node.id.clone(), d.spec.domain.clone());
    let mut cache = fleet.sealed_keys.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = cache.get(&key) {
        return Some(s.clone());
    }
    let sealed = reseal(cp_key, d.key_sealed.as_deref()?, node.sealing_key.as_deref())?;
    cache.insert(key, sealed.clone());
    Some(sealed)
}

/// What a proxy node serves; None for workers.
pub fn proxy(fleet: &FleetView, me: &NodeRow, sealing: Sealing) -> Option<ProxyDesired> {
    if me.role != Role::Proxy {
        return None;
    }
    let routes = &fleet.routes;
    let mut p = ProxyDesired::default();
    for d in &routes.domains {
        let ups = upstreams(fleet, &d.spec.service, d.spec.port);
        if d.spec.passthrough {
            p.passthrough.push(PassthroughDesired {
                domain: d.spec.domain.clone(),
                service: d.spec.service.clone(),
                upstreams: ups,
            });
            continue;
        }
        p.http_routes.push(HttpRouteDesired {
            domain: d.spec.domain.clone(),
            service: d.spec.service.clone(),
            upstreams: ups,
        });
        // A proxy without a sealing key cannot be sent keys: no certificate.
        let key = match sealing {
            Sealing::ToNode(cp_key) => sealed_key(fleet, me, d, cp_key),
            Sealing::Stable => me.sealing_key.as_ref().and(d.key_sealed.clone()),
        };
        if let (Some(chain), Some(key)) = (&d.chain_pem, key) {
            p.certs.push(CertDesired {
                domain: d.spec.domain.clone(),
                chain_pem: chain.clone(),
                sealed_key_pem: key,
            });
        }
    }
    p.tcp_routes = routes
        .tcp
        .iter()
        .map(|t| TcpRouteDesired {
            listen: t.spec.listen,
            service: t.spec.service.clone(),
            upstreams: upstreams(fleet, &t.spec.service, t.spec.port),
        })
        .collect();
    for c in &routes.challenges {
        match c.kind {
            ChallengeKind::Http01 => p.http01.push(Http01Challenge {
                token: c.token.clone(),
                key_authorization: c.key_authorization.clone(),
            }),
            ChallengeKind::TlsAlpn01 => p.alpn01.push(AlpnChallenge {
                domain: c.domain.clone(),
                key_authorization: c.key_authorization.clone(),
            }),
            // Answered by the DNS hook, not by proxies.
            ChallengeKind::Dns01 => {}
        }
    }
    Some(p)
}

/// An encoded answer: its JSON in the pieces it is sent as.
#[derive(Debug)]
pub struct Encoded {
    pub revision: u64,
    pub chunks: Vec<Bytes>,
}

impl Encoded {
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

/// The desired state of `node_id` as JSON, built from the view's
/// pre-encoded peers: a change that wakes N long-polls encodes each peer
/// once instead of N times, and the documents share those bytes.
pub fn encode_for_node(
    fleet: &FleetView,
    node_id: &str,
    mesh: Ipv4Net,
    subnet_pool: Ipv4Net,
    cp_key: &StaticSecret,
) -> Option<Encoded> {
    let d = without_peers(fleet, node_id, mesh, subnet_pool, Sealing::ToNode(cp_key))?;
    let me = fleet.node(node_id)?;
    let head = Bytes::from(serde_json::to_vec(&d).ok()?);
    const EMPTY: &[u8] = b"\"peers\":[]";
    // The first match is the top-level field: `node` holds no such key and
    // quotes inside string values are escaped.
    let at = head.windows(EMPTY.len()).position(|w| w == EMPTY)? + EMPTY.len() - 1;
    let mut chunks = vec![head.slice(..at)];
    // Runs of entries that follow each other in one block go as one slice.
    let mut run: Option<(bool, Range<usize>)> = None;
    let blocks = &fleet.peers;
    let slice = |(private, r): (bool, Range<usize>)| match private {
        true => blocks.private.slice(r),
        false => blocks.public.slice(r),
    };
    for (i, n) in fleet.nodes.iter().enumerate().filter(|(_, n)| n.id != me.id) {
        let (public, private) = &blocks.spans[i];
        let (private, mut r) = match (private, same_network(me, n)) {
            (Some(r), true) => (true, r.clone()),
            _ => (false, public.clone()),
        };
        match &mut run {
            Some((p, cur)) if *p == private && cur.end == r.start => cur.end = r.end,
            _ => {
                if run.is_none() {
                    r.start += 1; // the list's first entry has no comma before it
                }
                chunks.extend(run.replace((private, r)).map(slice));
            }
        }
    }
    chunks.extend(run.map(slice));
    chunks.push(head.slice(at..));
    Some(Encoded {
        revision: d.revision,
        chunks,
    })
}

/// The answer to a `delta=true` long-poll (a [`DesiredUpdate`]), as JSON:
/// the changes since `base` (a view of this process and the peers changed
/// after it, from [`crate::state::AppState::delta_base`]) when it can be
/// diffed against, else the full document flagged as one. None when the
/// node is not in `fleet`.
///
/// [`DesiredUpdate`]: berth_protocol::delta::DesiredUpdate
pub fn encode_update(
    fleet: &FleetView,
    base: Option<(&FleetView, &HashSet<String>)>,
    node_id: &str,
    mesh: Ipv4Net,
    subnet_pool: Ipv4Net,
    cp_key: &StaticSecret,
) -> Option<Encoded> {
    if let Some(d) = base.and_then(|(b, changed)| delta(b, fleet, changed, node_id, mesh, subnet_pool, cp_key)) {
        let revision = d.revision;
        let update = berth_protocol::delta::DesiredUpdate {
            view: fleet.id,
            full: None,
            delta: Some(d),
        };
        return Some(Encoded {
            revision,
            chunks: vec![serde_json::to_vec(&update).ok()?.into()],
        });
    }
    let mut doc = encode_for_node(fleet, node_id, mesh, subnet_pool, cp_key)?;
    doc.chunks
        .insert(0, format!("{{\"view\":{},\"full\":", fleet.id).into());
    doc.chunks.push(Bytes::from_static(b"}"));
    Some(doc)
}

/// What turns `node_id`'s document in `base` into its document in `cur`;
/// None when it must be sent whole: the node is new to one of the views, or
/// its own address or sealing key changed (which changes every endpoint
/// or every sealed value it is sent).
fn delta(
    base: &FleetView,
    cur: &FleetView,
    peers_changed: &HashSet<String>,
    node_id: &str,
    mesh: Ipv4Net,
    subnet_pool: Ipv4Net,
    cp_key: &StaticSecret,
) -> Option<berth_protocol::delta::DesiredDelta> {
    let (was, me) = (base.node(node_id)?, cur.node(node_id)?);
    if was.private_addr != me.private_addr || was.sealing_key != me.sealing_key {
        return None;
    }
    let mut d = berth_protocol::delta::DesiredDelta {
        base: base.id,
        revision: me.revision as u64,
        ..Default::default()
    };
    let node = node_self(me, mesh, subnet_pool);
    if node_self(was, mesh, subnet_pool) != node {
        d.node = Some(node);
    }
    for id in peers_changed.iter().filter(|id| *id != node_id) {
        match cur.node(id) {
            Some(n) => d.peers_set.push(peer(n, endpoint(me, n))),
            None if base.node(id).is_some() => d.peers_removed.push(id.clone()),
            None => {}
        }
    }
    if containers(base, was, Sealing::Stable) != containers(cur, me, Sealing::Stable) {
        d.containers = Some(containers(cur, me, Sealing::ToNode(cp_key)));
    }
    if base.dns() != cur.dns() {
        d.dns = Some(cur.dns().to_vec());
    }
    if proxy(base, was, Sealing::Stable) != proxy(cur, me, Sealing::Stable) {
        d.proxy = proxy(cur, me, Sealing::ToNode(cp_key));
    }
    if was.target_version != me.target_version {
        d.upgrade_to = Some(me.target_version.clone());
    }
    let registry = registry_access(cur, me);
    if registry_access(base, was) != registry {
        d.registry = Some(registry);
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{engine::general_purpose::STANDARD as B64, Engine};
    use berth_protocol::routes::DomainSpec;

    fn node(id: &str, private: Option<&str>, public: Option<&str>, mesh: &str, rev: i64) -> NodeRow {
        NodeRow {
            id: id.into(),
            name: format!("name-{id}"),
            role: Role::Worker,
            signing_key: String::new(),
            wg_public_key: format!("key-{id}"),
            wg_port: 51820,
            private_addr: private.map(|s| s.parse().unwrap()),
            public_ip: public.map(|s| s.parse().unwrap()),
            mesh_ip: mesh.parse().unwrap(),
            subnet: "10.200.0.0/24".parse().unwrap(),
            revision: rev,
            applied_revision: 0,
            last_seen: None,
            agent_version: None,
            last_error: None,
            sealing_key: None,
            target_version: None,
        }
    }

    #[test]
    fn private_endpoint_on_shared_network_else_public() {
        let a = node("a", Some("192.168.1.10/24"), Some("203.0.113.1"), "10.100.0.1", 1);
        let b = node("b", Some("192.168.1.11/24"), Some("203.0.113.2"), "10.100.0.2", 1);
        let c = node("c", Some("192.168.7.11/24"), Some("203.0.113.3"), "10.100.0.3", 1);
        let d = node("d", None, None, "10.100.0.4", 1);
        assert_eq!(endpoint(&a, &b), Some("192.168.1.11:51820".parse().unwrap()));
        assert_eq!(endpoint(&a, &c), Some("203.0.113.3:51820".parse().unwrap()));
        assert_eq!(endpoint(&d, &a), Some("203.0.113.1:51820".parse().unwrap()));
        assert_eq!(endpoint(&a, &d), None);
    }

    #[test]
    fn desired_state_lists_every_other_node_at_the_nodes_revision() {
        let nodes = vec![
            node("a", Some("198.18.0.11/24"), None, "10.100.0.1", 9),
            node("b", Some("198.18.0.12/24"), None, "10.100.0.2", 9),
            node("c", Some("198.18.0.13/24"), None, "10.100.0.3", 7),
        ];
        let fleet = FleetView::new(9, nodes, vec![], vec![]);
        let mesh = "10.100.0.0/16".parse().unwrap();
        let pool = "10.200.0.0/13".parse().unwrap();
        let key = StaticSecret::from([3u8; 32]);
        let d = for_node(&fleet, "c", mesh, pool, &key).unwrap();
        assert_eq!(d.revision, 7);
        assert_eq!(d.node.mesh_ip.to_string(), "10.100.0.3");
        let names: Vec<_> = d.peers.iter().map(|p| p.node_id.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(d.peers[0].endpoint, Some("198.18.0.11:51820".parse().unwrap()));
        assert!(for_node(&fleet, "zz", mesh, pool, &key).is_none());
    }

    #[test]
    fn encoded_document_equals_the_built_one() {
        let nodes = vec![
            node("a", Some("198.18.0.11/24"), Some("203.0.113.1"), "10.100.0.1", 9),
            node("b", Some("198.18.0.12/24"), Some("203.0.113.2"), "10.100.0.2", 9),
            node("c", Some("192.168.9.13/24"), Some("203.0.113.3"), "10.100.0.3", 9),
            node("d", None, None, "10.100.0.4", 9),
        ];
        let key = StaticSecret::from([3u8; 32]);
        let mut nodes = nodes;
        let mut p = node("p", Some("198.18.0.14/24"), None, "10.100.0.5", 9);
        p.role = Role::Proxy;
        let p_seal = StaticSecret::from([4u8; 32]);
        p.sealing_key = Some(B64.encode(x25519_dalek::PublicKey::from(&p_seal).as_bytes()));
        nodes.push(p);
        let spec: berth_protocol::service::ServiceSpec =
            serde_json::from_value(serde_json::json!({"name": "web", "image": "x", "port": 8080})).unwrap();
        let services = vec![ServiceRow {
            name: "web".into(),
            spec,
            secrets_sealed: None,
            latest_release: 1,
            current_release: Some(1),
        }];
        let active = ReplicaRow {
            service: "web".into(),
            name: "web-1".into(),
            slot: 0,
            release: 1,
            phase: Phase::Active,
            node_id: "a".into(),
            ip: "10.200.0.2".parse().unwrap(),
            state: None,
            healthy: true,
            restarts: 0,
            container_id: None,
            last_error: None,
            created_ms: 0,
            healthy_since_ms: Some(0),
            healthy_revision: Some(1),
            phase_ms: 0,
            phase_revision: None,
            trouble: None,
            recreates: 0,
            gave_up: false,
        };
        // A draining replica still runs on its node, but is in no route and no DNS answer.
        let draining = ReplicaRow {
            name: "web-2".into(),
            ip: "10.200.0.3".parse().unwrap(),
            phase: Phase::Draining,
            ..active.clone()
        };
        let replicas = vec![active, draining];
        let domain = DomainRow {
            spec: DomainSpec {
                domain: "app.example.com".into(),
                service: "web".into(),
                port: 8080,
                passthrough: false,
            },
            chain_pem: Some("CHAIN".into()),
            key_sealed: Some(berth_protocol::seal::seal(&x25519_dalek::PublicKey::from(&key), b"KEY")),
            not_before: Some(0),
            not_after: Some(i64::MAX),
            last_error: None,
            next_attempt_at: 0,
            failures: 0,
        };
        let challenge = ChallengeRow {
            domain: "app.example.com".into(),
            kind: ChallengeKind::Http01,
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
        };
        let fleet = FleetView::new(9, nodes, services, replicas).with_routes(Routes {
            domains: vec![domain],
            tcp: vec![],
            challenges: vec![challenge],
        });
        let (mesh, pool) = ("10.100.0.0/16".parse().unwrap(), "10.200.0.0/13".parse().unwrap());
        let px = for_node(&fleet, "p", mesh, pool, &key).unwrap().proxy.unwrap();
        assert_eq!(px.http_routes[0].upstreams.len(), 1);
        assert_eq!(px.http_routes[0].upstreams[0].ip.to_string(), "10.200.0.2");
        let on_a = for_node(&fleet, "a", mesh, pool, &key).unwrap();
        assert_eq!(on_a.containers.len(), 2, "the draining replica keeps running");
        assert_eq!(on_a.dns[0].replicas.len(), 1, "but is not in DNS");
        assert_eq!(px.http01[0].token, "tok");
        assert_eq!(
            berth_protocol::seal::open(&p_seal, &px.certs[0].sealed_key_pem).unwrap(),
            b"KEY"
        );
        assert!(for_node(&fleet, "a", mesh, pool, &key).unwrap().proxy.is_none());
        for id in ["a", "b", "c", "d", "p"] {
            let built = for_node(&fleet, id, mesh, pool, &key).unwrap();
            let doc = encode_for_node(&fleet, id, mesh, pool, &key).unwrap();
            let decoded: DesiredState = serde_json::from_slice(&doc.to_vec()).unwrap();
            assert_eq!(decoded, built, "node {id}");
            assert_eq!(doc.revision, 9);
        }
        let a = for_node(&fleet, "a", mesh, pool, &key).unwrap();
        assert_eq!(a.peers[0].endpoint, Some("198.18.0.12:51820".parse().unwrap()));
        assert_eq!(a.peers[1].endpoint, Some("203.0.113.3:51820".parse().unwrap()));
        assert_eq!(a.peers[2].endpoint, None);
    }
}

#[cfg(test)]
mod delta_tests;
