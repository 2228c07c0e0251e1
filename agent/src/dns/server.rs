//! The DNS listeners: UDP and TCP sockets on each listen address, the receive
//! loops that hand each query to the [`Handler`], and the responders that
//! encode and send its answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

use super::Handler;

/// How long an idle TCP client connection is kept open.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Most forwarded UDP queries in flight per socket; beyond that they get SERVFAIL.
const MAX_FORWARDS: usize = 4096;
/// Most TCP client connections per listener.
const MAX_TCP_CONNS: usize = 512;

/// Binds UDP then TCP on the same address; with port 0, TCP takes the port UDP got.
pub(super) async fn bind_pair(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
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

pub(super) async fn serve_udp(socket: Arc<UdpSocket>, handler: Arc<Handler>) {
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
                crate::metrics::dns(crate::metrics::DnsAnswer::Failed);
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
            crate::metrics::dns(crate::metrics::DnsAnswer::Failed);
            let _ = socket.send_to(&error_reply(packet, ResponseCode::ServFail), src).await;
        } else {
            let handler = handler.clone();
            forwards.spawn(async move {
                handler.handle(&request, responder).await;
            });
        }
    }
}

pub(super) async fn serve_tcp(listener: TcpListener, handler: Arc<Handler>) {
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
