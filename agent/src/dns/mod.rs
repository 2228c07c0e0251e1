//! Cluster DNS: the agent answers the cluster zone (default `internal`) from the
//! record set it computes from desired state, and forwards every other name to
//! the host's own upstream resolvers.
//!
//! Names served (all case-insensitive, TTL 5 s):
//! - `NAME.<zone>` A: the service's healthy replicas, local ones first; each group
//!   is rotated round robin between answers.
//! - `REPLICA.NAME.<zone>` A: that replica.
//! - `NODE.node.<zone>` A: the node's mesh address.
//! - other types for a known name (AAAA, TXT, ...): NOERROR with no answer and the
//!   zone's SOA in the authority section; `SOA` at the apex answers the SOA.
//! - unknown names inside the zone: NXDOMAIN with the SOA in the authority section.
//! - names outside the zone: forwarded (hickory `ForwardZoneHandler`, with its cache)
//!   to the upstreams, normally read from the host's resolv.conf.
//!
//! The record set ([`Records`], built from desired state in [`records`]) is
//! compiled into an immutable, query-ready zone (`zone.rs`) behind an
//! `RwLock<Arc<_>>`: a query clones the `Arc` once and answers from it, so it sees
//! the old set or the new one, never a mix. `server.rs` holds the UDP and TCP
//! listeners, `forward.rs` the upstream resolvers and the forwarder.

mod forward;
pub mod records;
mod server;
mod zone;

pub use forward::upstreams_from_resolv_conf;
pub use records::{Records, ServiceAddr};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::bail;
use hickory_server::net::runtime::TokioTime;
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::{LowerName, Name};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::Catalog;
use tokio::task::JoinHandle;

use forward::forward_catalog;
use server::{bind_pair, serve_tcp, serve_udp};
use zone::{zone_name, Zone};

/// TTL of every record in the cluster zone, and the SOA's negative-caching TTL.
pub const TTL: u32 = 5;

/// Where and what the DNS server serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP are served on each address; port 0 picks one ephemeral port
    /// (the same for UDP and TCP).
    pub listen: Vec<SocketAddr>,
    /// The cluster zone, without trailing dot; default "internal".
    pub zone: String,
    /// Where names outside the zone go (normally [`upstreams_from_resolv_conf`]).
    /// Empty: such queries are refused.
    pub upstreams: Vec<SocketAddr>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: Vec::new(),
            zone: "internal".to_string(),
            upstreams: Vec::new(),
        }
    }
}

/// The running DNS server. Dropping it stops the listeners too (the sockets close
/// once their tasks have been cancelled; [`DnsServer::shutdown`] waits for that).
pub struct DnsServer {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP and TCP on every listen address and starts answering.
    pub async fn start(cfg: DnsConfig, records: Records) -> anyhow::Result<DnsServer> {
        if cfg.listen.is_empty() {
            bail!("DNS: no listen address");
        }
        let origin = zone_name(&cfg.zone)?;
        let shared = Arc::new(Shared {
            zone: RwLock::new(Arc::new(Zone::build(&origin, &records, 1))),
            serial: AtomicU32::new(1),
            origin: LowerName::new(&origin),
            origin_name: origin,
        });

        let mut sockets = Vec::new();
        for addr in &cfg.listen {
            sockets.push(bind_pair(*addr).await?);
        }
        let addrs: Vec<SocketAddr> = sockets
            .iter()
            .map(|(udp, _)| udp.local_addr())
            .collect::<Result<_, _>>()?;

        // Never forward to ourselves.
        let upstreams: Vec<SocketAddr> = cfg
            .upstreams
            .iter()
            .copied()
            .filter(|u| !addrs.contains(u) && !cfg.listen.contains(u))
            .collect();
        let handler = Arc::new(Handler {
            shared: shared.clone(),
            forward: forward_catalog(&upstreams)?,
        });

        let mut tasks = Vec::new();
        for (udp, tcp) in sockets {
            tasks.push(tokio::spawn(serve_udp(Arc::new(udp), handler.clone())));
            tasks.push(tokio::spawn(serve_tcp(tcp, handler.clone())));
        }
        tracing::info!(zone = %cfg.zone, listen = ?addrs, upstreams = ?upstreams, "DNS server started");
        Ok(DnsServer { shared, addrs, tasks })
    }

    /// Replaces the record set at once: every query is answered from the old set
    /// or from the new one, never from a mix.
    pub fn set_records(&self, records: Records) {
        let serial = self.shared.serial.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let zone = Arc::new(Zone::build(&self.shared.origin_name, &records, serial));
        let mut guard = self.shared.zone.write().unwrap_or_else(|e| e.into_inner());
        *guard = zone;
    }

    /// The bound addresses (UDP and TCP share each one), in the order of `listen`.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// Stops answering and closes every socket (in-flight forwarded queries are dropped).
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the server and every query share: the current zone and its origin.
struct Shared {
    zone: RwLock<Arc<Zone>>,
    serial: AtomicU32,
    origin: LowerName,
    origin_name: Name,
}

impl Shared {
    fn zone(&self) -> Arc<Zone> {
        self.zone.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Answers one request: from the zone, or through the forwarder.
struct Handler {
    shared: Arc<Shared>,
    /// Empty, or a forwarder at the root.
    forward: Catalog,
}

impl Handler {
    /// Whether the request asks for a name of the cluster zone (answered at once,
    /// from the zone); everything else goes to the forwarder.
    fn in_zone(&self, request: &Request) -> bool {
        match request.request_info() {
            Ok(info) => self.shared.origin.zone_of(info.query.name()),
            Err(_) => false,
        }
    }

    async fn handle<R: ResponseHandler>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        if self.in_zone(request) {
            self.answer_zone(request, response_handle).await
        } else {
            // Also answers malformed requests (FORMERR) and unsupported opcodes.
            let info = self
                .forward
                .handle_request::<R, TokioTime>(request, response_handle)
                .await;
            crate::metrics::dns(match info.response_code {
                ResponseCode::ServFail | ResponseCode::FormErr | ResponseCode::NotImp | ResponseCode::Refused => {
                    crate::metrics::DnsAnswer::Failed
                }
                _ => crate::metrics::DnsAnswer::Forwarded,
            });
            info
        }
    }

    async fn answer_zone<R: ResponseHandler>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        let info = zone::answer(&self.shared.zone(), &self.shared.origin, request, response_handle).await;
        crate::metrics::dns(match info.response_code {
            ResponseCode::NoError => crate::metrics::DnsAnswer::NoError,
            ResponseCode::NXDomain => crate::metrics::DnsAnswer::NxDomain,
            _ => crate::metrics::DnsAnswer::Failed,
        });
        info
    }
}
