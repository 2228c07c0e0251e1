//! Request and response bodies of the control-plane API: what agents send
//! and get (registration, desired state, status), and the admin API's
//! nodes, tokens, upgrades and revision. Services are in [`crate::service`],
//! domains and TCP routes in [`crate::routes`], errors in [`crate::error`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Role of a node in the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Worker,
    Proxy,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Proxy => "proxy",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "worker" => Some(Role::Worker),
            "proxy" => Some(Role::Proxy),
            _ => None,
        }
    }
}

/// Sent once by a new agent, authenticated by a join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterRequest {
    /// The full join token as printed by `berth token create`.
    pub token: String,
    /// Node name, a DNS label; unique in the fleet.
    pub name: String,
    /// Ed25519 verifying key, base64 (32 bytes). Signs every later request.
    pub signing_key: String,
    /// WireGuard public key, base64 (32 bytes).
    pub wg_public_key: String,
    /// UDP port WireGuard listens on.
    pub wg_port: u16,
    /// The node's address on its local network, with prefix (e.g. `192.168.1.5/24`).
    /// Peers on the same network reach it there.
    #[serde(default)]
    pub private_addr: Option<String>,
    /// Address peers on other networks reach it at. When absent the control
    /// plane uses the source address it saw the registration come from.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub public_ip: Option<IpAddr>,
    /// Whether the agent was started with `--proxy`; must match the token.
    #[serde(default)]
    pub proxy: bool,
    /// X25519 public key, base64: secrets for this node are sealed to it.
    #[serde(default)]
    pub sealing_key: Option<String>,
}

/// The answer to a registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    pub node_id: String,
    pub name: String,
    pub role: Role,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub mesh_ip: Ipv4Addr,
    /// The whole mesh pool, so the agent can route it through the tunnel.
    pub mesh_cidr: String,
    /// This node's container subnet.
    pub subnet: String,
}

/// One other node as seen by a node's WireGuard interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Peer {
    pub node_id: String,
    pub name: String,
    pub wg_public_key: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub mesh_ip: Ipv4Addr,
    pub subnet: String,
    /// Where to send this peer's packets; chosen per pair of nodes
    /// (private address on a shared network, else public).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub endpoint: Option<SocketAddr>,
}

/// The node a desired-state document is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeSelf {
    pub node_id: String,
    pub name: String,
    pub role: Role,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub mesh_ip: Ipv4Addr,
    pub mesh_cidr: String,
    pub subnet: String,
    /// The pool all container subnets come from; routed through the mesh
    /// (the node's own, more specific subnet stays local).
    pub subnet_pool: String,
    pub wg_port: u16,
}

/// Everything a node should be running, at one revision. The agent caches it
/// and brings the data plane up from the cache before talking to the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredState {
    pub revision: u64,
    pub node: NodeSelf,
    pub peers: Vec<Peer>,
    /// Containers this node runs.
    #[serde(default)]
    pub containers: Vec<crate::service::ContainerDesired>,
    /// Every service's replicas, for the node's DNS server.
    #[serde(default)]
    pub dns: Vec<DnsService>,
    /// Routes, certificates and ACME challenges; proxy nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<crate::proxy::ProxyDesired>,
    /// Agent version this node should run (`berth nodes upgrade`); the agent
    /// starts `update.sh` when it runs another one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_to: Option<String>,
    /// The fleet registry and this node's pull-only credentials, when the
    /// control plane runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryAccess>,
}

/// Where the fleet registry is and how this node logs in to it. The
/// registry serves a certificate of the control plane's CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegistryAccess {
    /// `HOST:PORT`, the prefix of image references stored there.
    pub host: String,
    pub username: String,
    pub password: String,
}

/// `GET /v1/registry`: where the fleet registry is (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegistryInfo {
    /// `HOST:PORT`: push to and pull from `HOST:PORT/NAME:TAG`.
    pub host: String,
}

/// `GET /v1/images[?service=S]`: one tag in the fleet registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageInfo {
    pub repository: String,
    pub tag: String,
    /// `HOST:PORT/REPOSITORY:TAG`, as a service's `image`.
    pub reference: String,
    /// The manifest's digest (`sha256:...`).
    pub digest: String,
    /// Config and layers, compressed; none for a multi-platform index.
    pub size: Option<u64>,
    /// The releases whose image is this tag or this digest.
    pub releases: Vec<ReleaseRef>,
}

/// `POST /v1/images/prune[?keep=N]`: what retention deleted, and the
/// garbage collection's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PruneReport {
    /// Releases kept per service.
    pub keep: usize,
    pub deleted: Vec<PrunedImage>,
    /// The registry's own summary (`N blobs marked, M blobs and K
    /// manifests eligible for deletion`).
    pub garbage_collection: String,
}

/// A manifest deleted by retention, with the tags that named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PrunedImage {
    pub repository: String,
    pub digest: String,
    pub tags: Vec<String>,
}

/// A release of a service, by number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseRef {
    pub service: String,
    pub number: u64,
}

/// A service name and its replicas, as DNS answers them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DnsService {
    pub name: String,
    pub replicas: Vec<crate::service::DnsReplica>,
}

/// A mesh peer counts as up when its last handshake is more recent than
/// this many seconds. Every peer has a 25 s persistent keepalive, so a live
/// pair re-handshakes about every 2 minutes; after WireGuard's
/// REJECT_AFTER_TIME (180 s) without one, its session keys are dropped
/// and the pair passes no traffic.
pub const PEER_UP_WITHIN_SECS: u64 = 180;

/// Handshake state of one WireGuard peer, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeerStatus {
    pub wg_public_key: String,
    /// Seconds since the last handshake; `None` when there was none.
    pub handshake_age_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl PeerStatus {
    /// Whether the peer had a handshake within [`PEER_UP_WITHIN_SECS`].
    pub fn is_up(&self) -> bool {
        self.handshake_age_secs.is_some_and(|age| age < PEER_UP_WITHIN_SECS)
    }
}

/// A whole peer list as a report carries it: how many peers are up, and
/// the ones down sorted by key. Agents report this; the control plane
/// turns the full lists of agents before `peers_up` into it.
pub fn split_peers(peers: &[PeerStatus]) -> (u32, Vec<PeerStatus>) {
    let mut down: Vec<PeerStatus> = peers.iter().filter(|p| !p.is_up()).cloned().collect();
    down.sort_by(|a, b| a.wg_public_key.cmp(&b.wg_public_key));
    ((peers.len() - down.len()) as u32, down)
}

/// Query of the desired-state long-poll, `GET /v1/agent/desired?after=N&wait=S`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct DesiredQuery {
    /// Answer once the node's revision is past this (default 0: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// Seconds to wait for that before answering 204 (default 25, at most 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<u64>,
    /// Answer with a [`crate::delta::DesiredUpdate`]: the changes since
    /// the document of view `base`, or a full document flagged as one.
    /// Without it (agents before deltas) the answer is a [`DesiredState`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<bool>,
    /// The view of the document the agent holds (the last answer's `view`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
}

/// Heartbeat and apply report, posted by the agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusReport {
    /// Revision of the last desired state applied completely.
    pub applied_revision: u64,
    pub agent_version: String,
    /// Every peer with its handshake age: sent by agents before
    /// `peers_up`/`peers_down`, empty from newer ones. Still read (an age
    /// below [`PEER_UP_WITHIN_SECS`] counts as up) while a fleet upgrades.
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    /// How many peers had a handshake within [`PEER_UP_WITHIN_SECS`].
    /// With `peers_down`, absent when this report carries no peer state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_up: Option<u32>,
    /// The peers that did not (never, or longer ago), with their ages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_down: Option<Vec<PeerStatus>>,
    /// Last apply error, if the last apply failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Resident memory of the agent, bytes.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// State of the containers this node runs.
    #[serde(default)]
    pub containers: Vec<crate::service::ContainerStatus>,
    /// Why the last upgrade the control plane asked for did not happen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_error: Option<String>,
    /// Proxy nodes: the domains berth-proxy has loaded a certificate for
    /// (or passes through), as of `applied_revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_domains: Option<Vec<String>>,
    /// The node's CPU and memory; sent with heartbeats only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<NodeUsage>,
}

/// A node as listed by `berth nodes list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeInfo {
    pub node_id: String,
    pub name: String,
    pub role: Role,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub mesh_ip: Ipv4Addr,
    pub subnet: String,
    pub online: bool,
    /// Unix seconds of the last heartbeat, if any.
    pub last_seen: Option<i64>,
    pub revision: u64,
    pub applied_revision: u64,
    pub agent_version: Option<String>,
    pub error: Option<String>,
    /// How many of its peers had a handshake within
    /// [`PEER_UP_WITHIN_SECS`], as the node last reported; absent when it
    /// never reported its peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_up: Option<u32>,
    /// Only the peers without a recent handshake (the ones down), with
    /// their ages as of now, sorted by name. Per-peer ages of every peer
    /// are in each agent's metrics (`berth_mesh_peer_handshake_age_seconds`).
    pub peers: Vec<PeerStatusNamed>,
    /// The node's CPU and memory, as it last reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<NodeUsage>,
    /// The agent version `berth nodes upgrade` asked this node to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
}

/// A node's CPU and memory, measured by its agent between two heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeUsage {
    /// CPU in use over all cores, in thousandths of a core.
    pub cpu_millicores: u32,
    pub cores: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// A peer of a listed node, by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeerStatusNamed {
    pub name: String,
    pub handshake_age_secs: Option<u64>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateTokenRequest {
    #[serde(default)]
    pub proxy: bool,
    /// Lifetime in seconds, from a minute to 30 days.
    #[cfg_attr(feature = "openapi", schema(minimum = 60, maximum = 2592000))]
    pub ttl_secs: u64,
}

/// The answer to `POST /v1/tokens`: the token, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedToken {
    pub id: String,
    /// The full join token, `berth1.<id>.<secret>.<ca-hash>`.
    pub token: String,
    pub role: Role,
    pub expires_at: i64,
    /// A ready-to-paste `berth-agent --url ... --token ...` line.
    pub agent_command: String,
    /// A ready-to-paste `curl ... setup.sh | sudo bash -s -- --token ...`
    /// line that installs and joins a fresh server.
    #[serde(default)]
    pub setup_command: String,
}

/// Where a join token is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TokenState {
    /// Unused and unexpired: a node may register with it.
    Valid,
    Used,
    Expired,
    Revoked,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Valid => "valid",
            TokenState::Used => "used",
            TokenState::Expired => "expired",
            TokenState::Revoked => "revoked",
        }
    }
}

impl fmt::Display for TokenState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A token as `GET /v1/tokens` lists it (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    pub id: String,
    pub role: Role,
    pub created_at: i64,
    pub expires_at: i64,
    pub state: TokenState,
    pub used_by: Option<String>,
}

/// The answer to `DELETE /v1/tokens/{id}`: `{"revoked": id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenRevoked {
    pub revoked: String,
}

/// The answer to a removal, `{"removed": what, "revision": N}`: the node,
/// service or domain name (`Removed`), or the TCP route's port (`Removed<u16>`),
/// and the revision the removal made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Removed<T = String> {
    pub removed: T,
    pub revision: u64,
}

/// `{"revision": N}`: the answer to `GET /v1/revision` (the cluster's
/// revision) and to a status report (the reporting node's revision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Revision {
    pub revision: u64,
}

/// `POST /v1/nodes/upgrade`: move the fleet to `version`, `canary` first
/// (default: the first node by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    pub version: String,
    #[serde(default)]
    pub canary: Option<String>,
}

/// The answer to `POST /v1/nodes/upgrade`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpgradeStarted {
    pub version: String,
    /// The node asked first.
    pub canary: String,
    /// The nodes asked once the canary reports the version.
    pub waiting: Vec<String>,
    pub revision: u64,
}

/// Path prefix of the versioned API.
pub const API_PREFIX: &str = "/v1";

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(key: &str, age: Option<u64>) -> PeerStatus {
        PeerStatus {
            wg_public_key: key.into(),
            handshake_age_secs: age,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    #[test]
    fn a_peer_is_up_below_reject_after_time_only() {
        let peers = [
            peer("d", Some(PEER_UP_WITHIN_SECS)),
            peer("a", Some(0)),
            peer("c", None),
            peer("b", Some(PEER_UP_WITHIN_SECS - 1)),
            peer("e", Some(400)),
        ];
        let (up, down) = split_peers(&peers);
        assert_eq!(up, 2);
        let down: Vec<(&str, Option<u64>)> = down
            .iter()
            .map(|p| (p.wg_public_key.as_str(), p.handshake_age_secs))
            .collect();
        assert_eq!(down, vec![("c", None), ("d", Some(180)), ("e", Some(400))]);
        assert_eq!(split_peers(&[]), (0, vec![]));
    }

    #[test]
    fn a_report_without_peer_state_says_nothing_of_it() {
        let r = serde_json::to_value(StatusReport::default()).unwrap();
        assert!(r.get("peers_up").is_none() && r.get("peers_down").is_none(), "{r}");
        // An old agent's report: no new fields.
        let old: StatusReport = serde_json::from_value(serde_json::json!({
            "applied_revision": 1, "agent_version": "0.0.9",
            "peers": [{"wg_public_key": "k", "handshake_age_secs": 7, "rx_bytes": 1, "tx_bytes": 2}]
        }))
        .unwrap();
        assert_eq!((old.peers.len(), old.peers_up, old.peers_down), (1, None, None));
        let new = StatusReport {
            peers_up: Some(4),
            peers_down: Some(vec![peer("k", None)]),
            ..Default::default()
        };
        let back: StatusReport = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!((back.peers_up, back.peers_down), (Some(4), Some(vec![peer("k", None)])));
    }

    #[test]
    fn token_states_are_lowercase_and_pad() {
        assert_eq!(serde_json::to_value(TokenState::Revoked).unwrap(), "revoked");
        assert_eq!(
            serde_json::from_str::<TokenState>("\"valid\"").unwrap(),
            TokenState::Valid
        );
        assert_eq!(format!("[{:<8}]", TokenState::Used), "[used    ]");
    }

    #[test]
    fn removals_and_revisions_keep_their_shape() {
        let r = Removed {
            removed: "web".to_string(),
            revision: 3,
        };
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            serde_json::json!({"removed": "web", "revision": 3})
        );
        let r: Removed<u16> = Removed {
            removed: 2222,
            revision: 4,
        };
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            serde_json::json!({"removed": 2222, "revision": 4})
        );
        assert!(serde_json::from_str::<UpgradeRequest>(r#"{"version": "1", "canery": "a"}"#).is_err());
    }
}
