//! Deltas equal full documents: for random sequences of fleet changes
//! (joins, removals, address moves, deploys, scales, health and rollout
//! steps, domains and certificates, challenges, upgrades), the delta from
//! any earlier view applied to the document of that view gives exactly
//! the document [`for_node`] builds for the current one.

use super::*;
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use berth_protocol::delta::DesiredUpdate;
use berth_protocol::routes::DomainSpec;
use proptest::prelude::*;

const MESH: &str = "10.100.0.0/16";
const POOL: &str = "10.200.0.0/13";

fn cp_key() -> StaticSecret {
    StaticSecret::from([3u8; 32])
}

/// Node `i`'s sealing secret: the test opens what was sealed to it.
fn node_secret(i: u8) -> StaticSecret {
    StaticSecret::from([i.wrapping_add(10); 32])
}

fn seal_to_cp(plain: &[u8]) -> String {
    berth_protocol::seal::seal(&x25519_dalek::PublicKey::from(&cp_key()), plain)
}

/// The fleet the changes act on; each step becomes one view.
#[derive(Clone, Debug)]
struct Model {
    next_node: u8,
    nodes: Vec<NodeRow>,
    services: Vec<ServiceRow>,
    replicas: Vec<ReplicaRow>,
    domains: Vec<DomainRow>,
    challenges: Vec<ChallengeRow>,
}

#[derive(Clone, Debug)]
enum Change {
    Join { proxy: bool, lan: u8 },
    Remove(usize),
    Move { node: usize, lan: u8, public: u8 },
    Upgrade { node: usize, to: Option<u8> },
    Deploy { service: u8, image: u8, secret: bool },
    Scale { service: u8, node: usize },
    Unscale(usize),
    Health(usize),
    Drain(usize),
    Domain { service: u8, cert: bool },
    Undomain(usize),
    Challenge(u8),
    Nothing,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (any::<bool>(), 0u8..3).prop_map(|(proxy, lan)| Change::Join { proxy, lan }),
        2 => any::<usize>().prop_map(Change::Remove),
        2 => (any::<usize>(), 0u8..3, 0u8..3).prop_map(|(node, lan, public)| Change::Move { node, lan, public }),
        1 => (any::<usize>(), proptest::option::of(0u8..3)).prop_map(|(node, to)| Change::Upgrade { node, to }),
        2 => (0u8..3, 0u8..4, any::<bool>()).prop_map(|(service, image, secret)| Change::Deploy { service, image, secret }),
        3 => (0u8..3, any::<usize>()).prop_map(|(service, node)| Change::Scale { service, node }),
        1 => any::<usize>().prop_map(Change::Unscale),
        2 => any::<usize>().prop_map(Change::Health),
        1 => any::<usize>().prop_map(Change::Drain),
        2 => (0u8..3, any::<bool>()).prop_map(|(service, cert)| Change::Domain { service, cert }),
        1 => any::<usize>().prop_map(Change::Undomain),
        1 => (0u8..3).prop_map(Change::Challenge),
        1 => Just(Change::Nothing),
    ]
}

fn lan(lan: u8, host: u8) -> Option<Ipv4Net> {
    match lan {
        0 => None,
        n => Some(format!("192.168.{n}.{}/24", host.wrapping_add(10)).parse().unwrap()),
    }
}

impl Model {
    fn new() -> Model {
        Model {
            next_node: 0,
            nodes: vec![],
            services: vec![],
            replicas: vec![],
            domains: vec![],
            challenges: vec![],
        }
    }

    fn apply(&mut self, c: &Change, rev: i64) {
        let pick = |len: usize, i: usize| (len > 0).then(|| i % len);
        match *c {
            Change::Join { proxy, lan: l } => {
                let i = self.next_node;
                self.next_node += 1;
                let secret = node_secret(i);
                self.nodes.push(NodeRow {
                    id: format!("id-{i:03}"),
                    // Names sort apart from ids, so the order that counts is checked.
                    name: format!("node-{}", 255 - i),
                    role: if proxy { Role::Proxy } else { Role::Worker },
                    signing_key: String::new(),
                    wg_public_key: format!("key-{i}"),
                    wg_port: 51820,
                    private_addr: lan(l, i),
                    public_ip: Some(format!("203.0.113.{i}").parse().unwrap()),
                    mesh_ip: format!("10.100.0.{}", i + 1).parse().unwrap(),
                    subnet: format!("10.200.{i}.0/24").parse().unwrap(),
                    revision: rev,
                    applied_revision: 0,
                    last_seen: None,
                    agent_version: None,
                    last_error: None,
                    sealing_key: Some(B64.encode(x25519_dalek::PublicKey::from(&secret).as_bytes())),
                    target_version: None,
                });
            }
            Change::Remove(i) => {
                if let Some(i) = pick(self.nodes.len(), i) {
                    let gone = self.nodes.remove(i);
                    self.replicas.retain(|r| r.node_id != gone.id);
                }
            }
            Change::Move { node, lan: l, public } => {
                if let Some(i) = pick(self.nodes.len(), node) {
                    let n = &mut self.nodes[i];
                    n.private_addr = lan(l, i as u8);
                    n.public_ip = (public > 0).then(|| format!("198.51.100.{public}").parse().unwrap());
                }
            }
            Change::Upgrade { node, to } => {
                if let Some(i) = pick(self.nodes.len(), node) {
                    self.nodes[i].target_version = to.map(|v| format!("0.{v}.0"));
                }
            }
            Change::Deploy { service, image, secret } => {
                let name = format!("svc{service}");
                let spec: berth_protocol::service::ServiceSpec = serde_json::from_value(
                    serde_json::json!({"name": name, "image": format!("img:{image}"), "port": 8080}),
                )
                .unwrap();
                let secrets_sealed = secret.then(|| seal_to_cp(format!("{{\"K\":\"{image}\"}}").as_bytes()));
                match self.services.iter_mut().find(|s| s.name == name) {
                    Some(s) => {
                        s.spec = spec;
                        s.secrets_sealed = secrets_sealed;
                    }
                    None => self.services.push(ServiceRow {
                        name,
                        spec,
                        secrets_sealed,
                        latest_release: 1,
                        current_release: Some(1),
                    }),
                }
            }
            Change::Scale { service, node } => {
                let name = format!("svc{service}");
                let Some(n) = pick(self.nodes.len(), node) else { return };
                if !self.services.iter().any(|s| s.name == name) {
                    return;
                }
                let slot = self.replicas.iter().filter(|r| r.service == name).count() as u32;
                let ip_host = self.replicas.len() as u8 + 2;
                self.replicas.push(ReplicaRow {
                    service: name.clone(),
                    name: format!("{name}-{}", rev),
                    slot,
                    release: 1,
                    phase: Phase::Active,
                    node_id: self.nodes[n].id.clone(),
                    ip: format!("10.200.{n}.{ip_host}").parse().unwrap(),
                    state: None,
                    healthy: false,
                    restarts: 0,
                    container_id: None,
                    last_error: None,
                    created_ms: 0,
                    healthy_since_ms: None,
                    healthy_revision: None,
                    phase_ms: 0,
                    phase_revision: None,
                    trouble: None,
                    recreates: 0,
                    gave_up: false,
                });
            }
            Change::Unscale(i) => {
                if let Some(i) = pick(self.replicas.len(), i) {
                    self.replicas.remove(i);
                }
            }
            Change::Health(i) => {
                if let Some(i) = pick(self.replicas.len(), i) {
                    self.replicas[i].healthy = !self.replicas[i].healthy;
                }
            }
            Change::Drain(i) => {
                if let Some(i) = pick(self.replicas.len(), i) {
                    self.replicas[i].phase = Phase::Draining;
                }
            }
            Change::Domain { service, cert } => {
                let domain = format!("app{service}.example.com");
                self.domains.retain(|d| d.spec.domain != domain);
                self.domains.push(DomainRow {
                    spec: DomainSpec {
                        domain: domain.clone(),
                        service: format!("svc{service}"),
                        port: 8080,
                        passthrough: service == 2,
                    },
                    chain_pem: cert.then(|| format!("CHAIN {rev}")),
                    key_sealed: cert.then(|| seal_to_cp(format!("KEY {rev}").as_bytes())),
                    not_before: None,
                    not_after: None,
                    last_error: None,
                    next_attempt_at: 0,
                    failures: 0,
                });
            }
            Change::Undomain(i) => {
                if let Some(i) = pick(self.domains.len(), i) {
                    self.domains.remove(i);
                }
            }
            Change::Challenge(n) => {
                self.challenges = vec![ChallengeRow {
                    domain: format!("app{n}.example.com"),
                    kind: if n == 1 {
                        ChallengeKind::TlsAlpn01
                    } else {
                        ChallengeKind::Http01
                    },
                    token: format!("tok{rev}"),
                    key_authorization: format!("tok{rev}.thumb"),
                }]
            }
            Change::Nothing => {}
        }
        // As the store does, every node moves to the view's revision.
        for n in &mut self.nodes {
            n.revision = rev;
        }
    }

    fn view(&self, rev: i64, prev: &FleetView) -> FleetView {
        FleetView::new(rev, self.nodes.clone(), self.services.clone(), self.replicas.clone())
            .with_routes(Routes {
                domains: self.domains.clone(),
                tcp: vec![],
                challenges: self.challenges.clone(),
            })
            .after(prev)
    }
}

/// A document with what was sealed to `node_id` opened: sealing is
/// randomised, so two sealings of one secret differ.
fn opened(mut d: DesiredState) -> DesiredState {
    let i: u8 = d.node.node_id.trim_start_matches("id-").parse().unwrap();
    let secret = node_secret(i);
    let open = |s: &mut String| *s = String::from_utf8(berth_protocol::seal::open(&secret, s).unwrap()).unwrap();
    for c in &mut d.containers {
        c.sealed_secrets.iter_mut().for_each(open);
    }
    if let Some(p) = &mut d.proxy {
        p.certs.iter_mut().for_each(|c| open(&mut c.sealed_key_pem));
    }
    d
}

fn update(fleet: &FleetView, base: Option<(&FleetView, &HashSet<String>)>, id: &str) -> DesiredUpdate {
    let (mesh, pool) = (MESH.parse().unwrap(), POOL.parse().unwrap());
    let doc = encode_update(fleet, base, id, mesh, pool, &cp_key()).unwrap();
    serde_json::from_slice(&doc.to_vec()).unwrap()
}

fn oracle(fleet: &FleetView, id: &str) -> DesiredState {
    let (mesh, pool) = (MESH.parse().unwrap(), POOL.parse().unwrap());
    opened(for_node(fleet, id, mesh, pool, &cp_key()).unwrap())
}

/// The views a run of changes makes, the first empty.
fn views(changes: &[Change]) -> Vec<FleetView> {
    let mut model = Model::new();
    // Start from a small fleet, so early changes have something to act on.
    let start = [
        Change::Join { proxy: false, lan: 1 },
        Change::Join { proxy: true, lan: 1 },
        Change::Join { proxy: false, lan: 2 },
    ];
    let mut out = vec![FleetView::new(0, vec![], vec![], vec![])];
    for (rev, c) in start.iter().chain(changes).enumerate() {
        let rev = rev as i64 + 1;
        model.apply(c, rev);
        let v = model.view(rev, out.last().unwrap());
        out.push(v);
    }
    out
}

fn changed_between(views: &[FleetView], from: usize, to: usize) -> HashSet<String> {
    views[from + 1..=to]
        .iter()
        .flat_map(|v| v.peers_changed.iter().cloned())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn deltas_from_any_earlier_view_give_the_full_document(changes in proptest::collection::vec(change(), 1..12)) {
        let views = views(&changes);
        for to in 1..views.len() {
            for node in &views[to].nodes {
                let want = oracle(&views[to], &node.id);
                // The full answer is the oracle's document.
                let full = update(&views[to], None, &node.id);
                prop_assert_eq!(full.view, views[to].id);
                prop_assert_eq!(opened(full.full.unwrap()), want.clone());
                for from in 1..to {
                    if views[from].node(&node.id).is_none() {
                        continue;
                    }
                    let mut held = update(&views[from], None, &node.id).full.unwrap();
                    let changed = changed_between(&views, from, to);
                    let got = update(&views[to], Some((&views[from], &changed)), &node.id);
                    prop_assert_eq!(got.view, views[to].id);
                    match (got.full, got.delta) {
                        (None, Some(delta)) => {
                            prop_assert_eq!(delta.base, views[from].id);
                            prop_assert!(delta.peers_set.len() + delta.peers_removed.len() <= changed.len());
                            delta.apply(&mut held);
                            prop_assert_eq!(opened(held), want.clone(), "delta {} -> {}", from, to);
                        }
                        (Some(full), None) => {
                            // Only when the node's own address changed.
                            let (was, now) = (views[from].node(&node.id).unwrap(), views[to].node(&node.id).unwrap());
                            prop_assert_ne!(was.private_addr, now.private_addr);
                            prop_assert_eq!(opened(full), want.clone());
                        }
                        other => prop_assert!(false, "neither or both: {:?}", other),
                    }
                }
            }
        }
    }
}

/// What a delta carries for the usual changes: only what changed.
#[test]
fn a_delta_carries_only_the_sections_that_changed() {
    let join = |lan| Change::Join { proxy: false, lan };
    let views = views(&[
        join(1),
        Change::Deploy {
            service: 0,
            image: 1,
            secret: false,
        },
        Change::Remove(3),
    ]);
    let n = views.len();
    let me = &views[n - 1].nodes[0].id.clone();
    // The deploy: DNS gains the service; no peer, no container on this node.
    let changed = changed_between(&views, n - 3, n - 2);
    let deploy = update(&views[n - 2], Some((&views[n - 3], &changed)), me)
        .delta
        .unwrap();
    assert!(changed.is_empty(), "a deploy changes no peer: {changed:?}");
    assert!(deploy.peers_set.is_empty() && deploy.peers_removed.is_empty());
    assert!(deploy.dns.is_some() && deploy.containers.is_none() && deploy.node.is_none());
    // The removal: one peer removed, nothing else.
    let changed = changed_between(&views, n - 2, n - 1);
    let removal = update(&views[n - 1], Some((&views[n - 2], &changed)), me)
        .delta
        .unwrap();
    assert_eq!(removal.peers_removed.len(), 1);
    assert!(removal.peers_set.is_empty() && removal.dns.is_none() && removal.containers.is_none());
    assert_eq!(removal.revision, (n - 1) as u64);
}
