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
//! The record set lives in an immutable snapshot behind an `RwLock<Arc<_>>`: a query
//! clones the `Arc` once and answers from it, so it sees the old set or the new one,
//! never a mix.

use std::collections::{BTreeMap, HashMap};
use std::iter;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SOA};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::resolver::config::{NameServerConfig, ResolverOpts};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::{Catalog, MessageResponse, MessageResponseBuilder};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

/// TTL of every record in the cluster zone, and the SOA's negative-caching TTL.
pub const TTL: u32 = 5;
/// How long an idle TCP client connection is kept open.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long the forwarder waits for one upstream before trying the next.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

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
            snapshot: RwLock::new(Arc::new(Snapshot::build(&origin, &records, 1))),
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
        let snapshot = Arc::new(Snapshot::build(&self.shared.origin_name, &records, serial));
        let mut guard = self.shared.snapshot.write().unwrap_or_else(|e| e.into_inner());
        *guard = snapshot;
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

fn zone_name(zone: &str) -> anyhow::Result<Name> {
    let zone = zone.trim().trim_end_matches('.');
    if zone.is_empty() {
        bail!("DNS: empty zone name");
    }
    let mut name = Name::from_ascii(zone).with_context(|| format!("DNS: bad zone name {zone:?}"))?;
    name.set_fqdn(true);
    Ok(name)
}

/// Binds UDP then TCP on the same address; with port 0, TCP takes the port UDP got.
async fn bind_pair(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let mut attempts = 0;
    loop {
        let udp = bind(addr, Type::DGRAM).with_context(|| format!("DNS: binding UDP {addr}"))?;
        let udp = UdpSocket::from_std(udp.into())?;
        let bound = udp.local_addr()?;
        match bind(bound, Type::STREAM) {
            Ok(tcp) => return Ok((udp, TcpListener::from_std(tcp.into())?)),
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse && attempts < 20 => {
                attempts += 1;
            }
            Err(e) => return Err(e).with_context(|| format!("DNS: binding TCP {bound}")),
        }
    }
}

/// A non-blocking socket bound to `addr` (listening, for TCP). IP_FREEBIND lets it
/// bind a container gateway address before Podman has brought the bridge up.
fn bind(addr: SocketAddr, ty: Type) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    let freebind = match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true),
        SocketAddr::V6(_) => socket.set_only_v6(true).and_then(|()| socket.set_freebind_v6(true)),
    };
    if let Err(e) = freebind {
        tracing::debug!(error = %e, "DNS: IP_FREEBIND");
    }
    if ty == Type::STREAM {
        socket.set_reuse_address(true)?;
    } else {
        // Room for bursts; the kernel caps it at net.core.rmem_max.
        let _ = socket.set_recv_buffer_size(1 << 20);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if ty == Type::STREAM {
        socket.listen(1024)?;
    }
    Ok(socket)
}

fn forward_catalog(upstreams: &[SocketAddr]) -> anyhow::Result<Catalog> {
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

struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    serial: AtomicU32,
    origin: LowerName,
    origin_name: Name,
}

impl Shared {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An immutable, query-ready form of [`Records`].
struct Snapshot {
    names: HashMap<LowerName, Node>,
    soa: Record,
}

/// A name of the zone; empty for names that only exist because names below them
/// do (the apex, `node.<zone>`, a service with no healthy replica).
#[derive(Default)]
struct Node {
    local: Vec<Record>,
    remote: Vec<Record>,
    next: AtomicUsize,
}

impl Snapshot {
    fn build(origin: &Name, records: &Records, serial: u32) -> Snapshot {
        let mut names: HashMap<LowerName, Node> = HashMap::new();
        let mut add = |labels: &[&str], local: Vec<Ipv4Addr>, remote: Vec<Ipv4Addr>| {
            let Some(name) = child(origin, labels) else {
                tracing::warn!(name = ?labels, "DNS: skipping a name that is not valid");
                return;
            };
            let rec = |ip: Ipv4Addr| Record::from_rdata(name.clone(), TTL, RData::A(A(ip)));
            // Ancestors up to the apex exist (empty) so that they answer NOERROR.
            let mut parent = name.base_name();
            while parent.num_labels() >= origin.num_labels() {
                names.entry(LowerName::new(&parent)).or_default();
                if parent.num_labels() == origin.num_labels() {
                    break;
                }
                parent = parent.base_name();
            }
            names.insert(
                LowerName::new(&name),
                Node {
                    local: local.into_iter().map(rec).collect(),
                    remote: remote.into_iter().map(rec).collect(),
                    next: AtomicUsize::new(0),
                },
            );
        };
        for (service, addrs) in &records.services {
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for a in addrs.iter().filter(|a| a.healthy) {
                if local.contains(&a.ip) || remote.contains(&a.ip) {
                    continue;
                }
                if a.local {
                    local.push(a.ip);
                } else {
                    remote.push(a.ip);
                }
            }
            add(&[service], local, remote);
        }
        for ((replica, service), ip) in &records.replicas {
            add(&[replica, service], vec![*ip], Vec::new());
        }
        // Nodes last: `x.node.<zone>` is a node even if a service is named "node".
        for (node, ip) in &records.nodes {
            add(&[node, "node"], vec![*ip], Vec::new());
        }
        names.entry(LowerName::new(origin)).or_default();

        let mname = child(origin, &["ns"]).unwrap_or_else(|| origin.clone());
        let rname = child(origin, &["hostmaster"]).unwrap_or_else(|| origin.clone());
        let soa = SOA::new(mname, rname, serial, 60, 10, 3600, TTL);
        let soa = Record::from_rdata(origin.clone(), TTL, RData::SOA(soa));
        Snapshot { names, soa }
    }
}

/// `labels` (leftmost first) prepended to `origin`; None if a label is not a valid DNS label.
fn child(origin: &Name, labels: &[&str]) -> Option<Name> {
    let mut name = origin.clone();
    for label in labels.iter().rev() {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return None;
        }
        name = name.prepend_label(label.to_ascii_lowercase()).ok()?;
    }
    Some(name)
}

struct Handler {
    shared: Arc<Shared>,
    /// Empty, or a forwarder at the root.
    forward: Catalog,
}

/// Most forwarded UDP queries in flight per socket; beyond that they get SERVFAIL.
const MAX_FORWARDS: usize = 4096;
/// Most TCP client connections per listener.
const MAX_TCP_CONNS: usize = 512;

async fn serve_udp(socket: Arc<UdpSocket>, handler: Arc<Handler>) {
    // Queries are small; anything longer than this is not a query we answer.
    let mut buf = vec![0u8; 4096];
    let mut forwards = JoinSet::new();
    loop {
        let (len, src) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // Not fatal (e.g. an ICMP error from an earlier send); do not spin on it.
                tracing::debug!(error = %e, "DNS: UDP receive");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        while forwards.try_join_next().is_some() {}
        if src.port() == 0 || len < HEADER_LEN {
            continue;
        }
        let packet = &buf[..len];
        if packet[2] & 0x80 != 0 {
            continue; // a response: never answer those (reflection)
        }
        let request = match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
            Ok(request) => request,
            Err(_) => {
                let _ = socket.send_to(&error_reply(packet, ResponseCode::FormErr), src).await;
                continue;
            }
        };
        let responder = UdpResponder {
            socket: socket.clone(),
            dst: src,
        };
        if handler.in_zone(&request) {
            handler.answer_zone(&request, responder).await;
        } else if forwards.len() >= MAX_FORWARDS {
            let _ = socket.send_to(&error_reply(packet, ResponseCode::ServFail), src).await;
        } else {
            let handler = handler.clone();
            forwards.spawn(async move {
                handler.handle(&request, responder).await;
            });
        }
    }
}

async fn serve_tcp(listener: TcpListener, handler: Arc<Handler>) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "DNS: TCP accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        if conns.len() >= MAX_TCP_CONNS {
            continue; // dropping the stream closes it
        }
        conns.spawn(serve_tcp_conn(stream, src, handler.clone()));
    }
}

/// Answers the length-prefixed queries of one connection in order, until the client
/// closes it or stays idle for [`TCP_IDLE`].
async fn serve_tcp_conn(stream: TcpStream, src: SocketAddr, handler: Arc<Handler>) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    loop {
        let mut len = [0u8; 2];
        if !matches!(tokio::time::timeout(TCP_IDLE, rd.read_exact(&mut len)).await, Ok(Ok(_))) {
            return;
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        if !matches!(tokio::time::timeout(TCP_IDLE, rd.read_exact(&mut msg)).await, Ok(Ok(_))) {
            return;
        }
        if msg.len() < HEADER_LEN || msg[2] & 0x80 != 0 {
            return;
        }
        let formerr = error_reply(&msg, ResponseCode::FormErr);
        let responder = TcpResponder { wr: wr.clone() };
        match Request::from_bytes(msg, src, Protocol::Tcp) {
            Ok(request) => {
                handler.handle(&request, responder).await;
            }
            Err(_) => {
                if responder.write(&formerr).await.is_err() {
                    return;
                }
            }
        }
    }
}

const HEADER_LEN: usize = 12;

/// A header-only reply to `query` (at least [`HEADER_LEN`] bytes) with `rcode`.
fn error_reply(query: &[u8], rcode: ResponseCode) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..2].copy_from_slice(&query[..2]);
    // QR, the request's opcode and RD; RA; the rcode's low 4 bits.
    out[2] = 0x80 | (query[2] & 0x79);
    out[3] = 0x80 | (u16::from(rcode) & 0x0f) as u8;
    out
}

/// Encodes a response within `max` bytes (setting TC if records had to be left
/// out); like hickory's own server, falls back to a bare SERVFAIL if encoding fails.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    udp: bool,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let max = match (udp, response.edns()) {
        (false, _) => u16::MAX,
        (true, Some(edns)) => edns.max_payload().max(512),
        (true, None) => 512,
    };
    let metadata = *response.metadata();
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max);
    match response.destructive_emit(&mut encoder) {
        Ok(info) => Ok((info, bytes)),
        Err(e) => {
            tracing::warn!(error = %e, "DNS: encoding a response");
            let mut metadata = Metadata::response_from_request(&metadata);
            metadata.response_code = ResponseCode::ServFail;
            let header = Header {
                metadata,
                counts: HeaderCounts::default(),
            };
            bytes.clear();
            let mut encoder = BinEncoder::new(&mut bytes);
            header.emit(&mut encoder)?;
            Ok((ResponseInfo::from(header), bytes))
        }
    }
}

#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode(response, true)?;
        self.socket.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}

#[derive(Clone)]
struct TcpResponder {
    wr: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

impl TcpResponder {
    async fn write(&self, msg: &[u8]) -> std::io::Result<()> {
        let len = u16::try_from(msg.len()).map_err(std::io::Error::other)?;
        let mut framed = Vec::with_capacity(msg.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(msg);
        self.wr.lock().await.write_all(&framed).await
    }
}

#[async_trait::async_trait]
impl ResponseHandler for TcpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode(response, false)?;
        self.write(&bytes).await?;
        Ok(info)
    }
}

impl Handler {
    /// Whether the request asks for a name of the cluster zone (answered at once,
    /// from the snapshot); everything else goes to the forwarder.
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
            self.forward
                .handle_request::<R, TokioTime>(request, response_handle)
                .await
        }
    }

    async fn answer_zone<R: ResponseHandler>(&self, request: &Request, mut response_handle: R) -> ResponseInfo {
        let snapshot = self.shared.snapshot();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        meta.recursion_available = true;

        let edns = request.edns.as_ref().map(|req| {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().max(512));
            edns.set_version(0);
            edns
        });
        let bad_version = request.edns.as_ref().is_some_and(|e| e.version() > 0);

        let empty: &[Record] = &[];
        let (mut local, mut remote, mut soa) = (empty, empty, None);
        let (mut lk, mut rk) = (0, 0);
        let query = request.request_info().map(|i| i.query);
        match query {
            _ if bad_version => meta.response_code = ResponseCode::BADVERS,
            _ if request.metadata.op_code != OpCode::Query => meta.response_code = ResponseCode::NotImp,
            Err(_) => meta.response_code = ResponseCode::FormErr,
            Ok(q) if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) => {
                meta.response_code = ResponseCode::Refused
            }
            Ok(q) if matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR) => {
                meta.response_code = ResponseCode::Refused
            }
            Ok(q) => match snapshot.names.get(q.name()) {
                None => {
                    meta.response_code = ResponseCode::NXDomain;
                    soa = Some(&snapshot.soa);
                }
                Some(node) => match q.query_type() {
                    RecordType::A | RecordType::ANY if !(node.local.is_empty() && node.remote.is_empty()) => {
                        let n = node.next.fetch_add(1, Ordering::Relaxed);
                        (local, remote) = (&node.local[..], &node.remote[..]);
                        lk = if local.is_empty() { 0 } else { n % local.len() };
                        rk = if remote.is_empty() { 0 } else { n % remote.len() };
                    }
                    RecordType::SOA if *q.name() == self.shared.origin => {
                        local = std::slice::from_ref(&snapshot.soa);
                    }
                    _ => soa = Some(&snapshot.soa),
                },
            },
        }

        let answers = local[lk..]
            .iter()
            .chain(&local[..lk])
            .chain(&remote[rk..])
            .chain(&remote[..rk]);
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            meta,
            answers,
            iter::empty(),
            soa,
            iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: sending a response");
                meta.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: meta,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
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

    #[test]
    fn snapshot_names() {
        let origin = zone_name("Internal.").unwrap();
        let mut records = Records::default();
        records.services.insert(
            "Web".into(),
            vec![
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 0, 0, 2),
                    local: false,
                    healthy: true,
                },
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 0, 1, 2),
                    local: true,
                    healthy: true,
                },
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 0, 1, 3),
                    local: true,
                    healthy: false,
                },
            ],
        );
        records
            .replicas
            .insert(("web-1".into(), "web".into()), Ipv4Addr::new(10, 0, 1, 2));
        records.nodes.insert("n1".into(), Ipv4Addr::new(100, 64, 0, 1));
        records.services.insert("bad name".into(), vec![]);
        let snap = Snapshot::build(&origin, &records, 7);
        let get = |n: &str| snap.names.get(&LowerName::new(&Name::from_ascii(n).unwrap()));
        let web = get("web.internal.").unwrap();
        let ips = |rs: &[Record]| rs.iter().map(|r| r.data.clone()).collect::<Vec<_>>();
        assert_eq!(ips(&web.local), vec![RData::A(A(Ipv4Addr::new(10, 0, 1, 2)))]);
        assert_eq!(ips(&web.remote), vec![RData::A(A(Ipv4Addr::new(10, 0, 0, 2)))]);
        assert_eq!(get("WEB-1.web.internal.").unwrap().local.len(), 1);
        assert_eq!(get("n1.node.internal.").unwrap().local.len(), 1);
        // Empty non-terminals and the apex exist, without records.
        assert!(get("node.internal.").unwrap().local.is_empty());
        assert!(get("internal.").is_some());
        assert!(get("nope.internal.").is_none());
        assert_eq!(snap.names.len(), 5);
    }
}
