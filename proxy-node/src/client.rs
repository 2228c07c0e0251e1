//! The upstream HTTP/1.1 client. It runs inside the task that serves the
//! client's request: no connection task and no channel between the two, so
//! a proxied request costs one task's polls. The request head (and body) is
//! written, the response head read, and the response body is then read from
//! the upstream socket as the client side pulls it. A connection whose
//! exchange ended cleanly waits in its upstream's [`IdleConns`] for reuse.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Largest response head accepted from an upstream.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// Idle connections kept per upstream address.
const MAX_IDLE: usize = 1024;
/// How often [`IdleConns::prune`] should run; a connection idle for
/// [`IDLE_PRUNES`] of its runs is closed.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(15);
const IDLE_PRUNES: u64 = 4;
/// Counts [`prune_all`] runs: idle connections are stamped with it instead of
/// reading the clock for every request.
static PRUNE_EPOCH: AtomicU64 = AtomicU64::new(0);

/// Starts a new prune epoch; then call [`IdleConns::prune`] on every list.
pub fn prune_all<'a>(lists: impl Iterator<Item = &'a IdleConns>) {
    PRUNE_EPOCH.fetch_add(1, Relaxed);
    for l in lists {
        l.prune();
    }
}

/// Why a request to an upstream failed.
#[derive(Debug)]
pub enum Error {
    /// No connection could be made: nothing was sent, another upstream may be tried.
    Connect(String),
    /// Reading the client's request body failed; the upstream is not at fault.
    Client(hyper::Error),
    /// The upstream failed, closed early, or answered something that is not HTTP/1.1.
    Upstream(String),
    /// A reused connection was closed by the upstream before it answered (its
    /// keep-alive timeout raced the request), and the request could not be
    /// sent again. Not the upstream's failure.
    Closed(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "connecting: {e}"),
            Error::Client(e) => write!(f, "reading the client's request body: {e}"),
            Error::Upstream(e) => f.write_str(e),
            Error::Closed(e) => write!(f, "{e} (a reused connection; not sent again)"),
        }
    }
}

fn upstream(what: &str, e: io::Error) -> Error {
    Error::Upstream(format!("{what}: {e}"))
}

/// One keep-alive connection to an upstream.
pub struct Conn {
    /// Shared only while a request body is still being sent after the
    /// upstream has started its response (see [`send_body`]).
    stream: Arc<TcpStream>,
    /// Bytes read from the upstream and not used yet.
    buf: BytesMut,
    /// The request head being written; kept to reuse its allocation.
    wbuf: Vec<u8>,
}

impl Conn {
    async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, Error> {
        let stream = crate::upstream::connect(addr, timeout).await.map_err(Error::Connect)?;
        Ok(Conn {
            stream: Arc::new(stream),
            buf: BytesMut::new(),
            wbuf: Vec::with_capacity(512),
        })
    }

    /// An idle connection is usable while the upstream has neither closed it
    /// nor sent anything. `try_read` makes no syscall unless the runtime has
    /// seen the socket become readable.
    fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads what the upstream has sent into `buf`; `Ok(0)` is end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(READ_CHUNK);
        }
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match read_draining(&self.stream, &mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// The stream and the bytes already read from it, for an upgraded
    /// connection. None while a request body is still being sent on it.
    pub fn into_parts(self) -> Option<(TcpStream, Bytes)> {
        let stream = Arc::try_unwrap(self.stream).ok()?;
        Some((stream, self.buf.freeze()))
    }
}

/// Idle keep-alive connections to one upstream address, newest last.
#[derive(Default)]
pub struct IdleConns(Mutex<Vec<(Conn, u64)>>);

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdleConns({})", self.list().len())
    }
}

impl IdleConns {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<(Conn, u64)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest idle connection that is still open.
    fn checkout(&self) -> Option<Conn> {
        loop {
            let (c, _) = self.list().pop()?;
            if c.still_open() {
                return Some(c);
            }
        }
    }

    fn checkin(&self, c: Conn) {
        let mut list = self.list();
        if list.len() < MAX_IDLE {
            list.push((c, PRUNE_EPOCH.load(Relaxed)));
        }
    }

    /// Closes connections idle for [`IDLE_PRUNES`] prune epochs (45-60 s),
    /// and those the upstream closed meanwhile.
    fn prune(&self) {
        let oldest = PRUNE_EPOCH.load(Relaxed).saturating_sub(IDLE_PRUNES - 1);
        self.list().retain_mut(|(c, epoch)| *epoch >= oldest && c.still_open());
    }
}

/// What is sent upstream. `headers` are sent as they are, except
/// Content-Length and Transfer-Encoding, which follow from `body`.
pub struct Request<'a> {
    pub method: &'a Method,
    /// Path and query.
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// None: no body (such a request may be sent twice, see [`send`]).
    pub body: Option<Incoming>,
}

/// The upstream's answer.
pub enum Answer {
    Response(Response<ResponseBody>),
    /// `101 Switching Protocols`: the connection now belongs to the upgrade.
    Switching(Response<()>, Conn),
}

/// Sends `req` to `addr` on an idle connection from `idle` or a new one.
/// An idempotent bodyless request whose reused connection turns out closed
/// before any response byte (the upstream's keep-alive timeout raced us) is
/// sent again on a new connection; others would risk running twice.
pub async fn send(
    idle: &Arc<IdleConns>,
    addr: SocketAddr,
    connect_timeout: Duration,
    mut req: Request<'_>,
) -> Result<Answer, Error> {
    if req.body.as_ref().is_some_and(|b| b.is_end_stream()) {
        req.body = None;
    }
    // Reused: came from the idle list, so the upstream may have closed it meanwhile.
    let (conn, reused) = match idle.checkout() {
        Some(c) => (c, true),
        None => (Box::pin(Conn::connect(addr, connect_timeout)).await?, false),
    };
    let may_resend = req.body.is_none() && crate::http::is_idempotent(req.method);
    match exchange(conn, &mut req, idle).await {
        Err(Failed { error, stale: true }) if reused && may_resend => {
            tracing::debug!("upstream {addr}: reused connection was closed ({error}); sending again");
            let conn = Box::pin(Conn::connect(addr, connect_timeout)).await?;
            exchange(conn, &mut req, idle).await.map_err(|f| f.error)
        }
        Err(Failed { error, stale: true }) if reused => Err(Error::Closed(error.to_string())),
        r => r.map_err(|f| f.error),
    }
}

struct Failed {
    error: Error,
    /// Nothing came back: the connection was closed before the request.
    stale: bool,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        Failed { error, stale: false }
    }
}

/// How the request body is framed.
enum ReqFraming {
    None,
    Length(u64),
    Chunked,
}

async fn exchange(mut conn: Conn, req: &mut Request<'_>, idle: &Arc<IdleConns>) -> Result<Answer, Failed> {
    let framing = match &req.body {
        None if matches!(*req.method, Method::POST | Method::PUT | Method::PATCH) => ReqFraming::Length(0),
        None => ReqFraming::None,
        Some(b) => match b.size_hint().exact() {
            Some(n) => ReqFraming::Length(n),
            None => ReqFraming::Chunked,
        },
    };
    encode_head(&mut conn.wbuf, req, &framing);
    let sent_all = match req.body.take() {
        None => {
            if let Err(e) = write_all(&conn.stream, &conn.wbuf).await {
                return Err(Failed {
                    error: upstream("sending the request", e),
                    stale: true,
                });
            }
            true
        }
        // Boxed, like connecting above: the rarer paths do not size the
        // future every request (and every idle client connection) carries.
        Some(body) => match Box::pin(send_body(&mut conn, body, matches!(framing, ReqFraming::Chunked))).await? {
            BodySent::All => true,
            BodySent::Refused => false,
            BodySent::Answered(rest) => {
                // Full duplex: the rest goes out while the response comes back.
                tokio::spawn(rest.finish(conn.stream.clone()));
                false
            }
        },
    };
    let head = read_head(&mut conn).await?;
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        let mut resp = Response::new(());
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        return Ok(Answer::Switching(resp, conn));
    }
    let (framing, length) = response_framing(req.method, &head).map_err(Error::Upstream)?;
    let mut headers = head.headers;
    let te = headers.contains_key(header::TRANSFER_ENCODING);
    let both = te && headers.contains_key(header::CONTENT_LENGTH);
    let keep_alive = sent_all
        && head.version == Version::HTTP_11
        && !matches!(framing, Framing::Eof)
        // Both framings at once may be a response-splitting attempt (RFC 9112 §6.3): never reused.
        && !both
        && !crate::http::has_token(&headers, header::CONNECTION, "close");
    if te {
        // Transfer-Encoding wins over Content-Length.
        headers.remove(header::CONTENT_LENGTH);
    } else if let Some(n) = length {
        // One plain number for the client, whatever list or zeros the upstream wrote.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let mut body = ResponseBody {
        conn: Some(conn),
        framing,
        keep_alive,
        idle: idle.clone(),
    };
    body.finish_if_done();
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = headers;
    Ok(Answer::Response(resp))
}

fn encode_head(w: &mut Vec<u8>, req: &Request<'_>, framing: &ReqFraming) {
    w.clear();
    w.extend_from_slice(req.method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(req.target.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => {
            w.extend_from_slice(b"content-length: ");
            w.extend_from_slice(n.to_string().as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        ReqFraming::Chunked => w.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    w.extend_from_slice(b"\r\n");
}

/// How sending a request body ended.
enum BodySent {
    All,
    /// The upstream answered with an error or `Connection: close` before the
    /// body was sent (a 413 to a large upload, say): the rest is not sent
    /// (RFC 9112 §9.3) and the connection is not reused.
    Refused,
    /// The upstream answered with a success before the body was sent: the
    /// rest still goes out, next to the response (full duplex).
    Answered(RestOfBody),
}

/// A request body still to be sent after the upstream answered. `chunked`:
/// the last chunk is still to be written.
struct RestOfBody {
    pending: Bytes,
    body: Incoming,
    chunked: bool,
}

impl RestOfBody {
    async fn finish(mut self, stream: Arc<TcpStream>) {
        let r = async {
            loop {
                write_all(&stream, &self.pending).await?;
                match next_piece(&mut self.body, self.chunked).await {
                    Some(next) => self.pending = next?,
                    None => break,
                }
            }
            if self.chunked {
                write_all(&stream, LAST_CHUNK).await?;
            }
            Ok::<(), io::Error>(())
        };
        if let Err(e) = r.await {
            tracing::debug!("rest of a request body after the upstream answered: {e}");
        }
    }
}

/// The next piece of the request body as it goes on the wire (chunk framing
/// included); None after the last one.
async fn next_piece(body: &mut Incoming, chunked: bool) -> Option<io::Result<Bytes>> {
    loop {
        match body.frame().await {
            None => return None,
            Some(Err(e)) => return Some(Err(io::Error::other(e))),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if d.is_empty() => {}
                Ok(d) if chunked => return Some(Ok(chunk(&d))),
                Ok(d) => return Some(Ok(d)),
                Err(_) => {} // trailers are not forwarded
            },
        }
    }
}

fn chunk(data: &[u8]) -> Bytes {
    let mut c = Vec::with_capacity(data.len() + 20);
    c.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    c.extend_from_slice(data);
    c.extend_from_slice(b"\r\n");
    c.into()
}

const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Writes all of `data` (no watching: the response is being read elsewhere).
async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Streams the request body upstream while watching for an early answer.
async fn send_body(conn: &mut Conn, mut body: Incoming, chunked: bool) -> Result<BodySent, Failed> {
    let Conn { stream, buf, wbuf, .. } = conn;
    let mut pending = Bytes::copy_from_slice(wbuf);
    let mut ended = false;
    loop {
        if let Some(answer) = write_watching(stream, buf, &mut pending).await? {
            return Ok(early(answer, pending, body, chunked && !ended));
        }
        if ended {
            return Ok(BodySent::All);
        }
        let next = tokio::select! {
            biased;
            answer = answer_arrived(stream, buf) => match answer? {
                Some(answer) => return Ok(early(answer, Bytes::new(), body, chunked)),
                None => continue,
            },
            f = body.frame() => f,
        };
        match next {
            None => {
                ended = true;
                if chunked {
                    pending = Bytes::from_static(LAST_CHUNK);
                }
            }
            Some(Err(e)) => return Err(Error::Client(e).into()),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if d.is_empty() => {}
                Ok(d) if chunked => pending = chunk(&d),
                Ok(d) => pending = d,
                Err(_) => {} // trailers are not forwarded
            },
        }
    }
}

/// What to do with the rest of the body once a final answer arrived.
fn early(answer: Early, pending: Bytes, body: Incoming, chunked: bool) -> BodySent {
    match answer {
        Early::Refusal => BodySent::Refused,
        Early::Success => BodySent::Answered(RestOfBody { pending, body, chunked }),
    }
}

/// A final response head that arrived while the request body was sent.
enum Early {
    /// 2xx/3xx without `Connection: close`.
    Success,
    /// Anything else, including a head that does not parse.
    Refusal,
}

/// `try_read_buf` that, like tokio's own `poll_read`, also forgets the
/// socket's read readiness after a short read: the kernel's buffer was
/// drained, so neither the next read nor the idle check (`still_open`) makes a
/// syscall only to learn `EAGAIN` (it was one of five per proxied request).
/// A readiness event newer than the read, and a close, are never forgotten.
fn read_draining(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let mut short = None;
    let r = stream.try_io(Interest::READABLE, || {
        let n = stream.try_read_buf(buf)?;
        if n > 0 && n < room {
            short = Some(n);
            // WouldBlock is how try_io is told to clear the readiness.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => r,
    }
}

/// Waits until the upstream sends something and reads it into `buf`. Interim
/// 1xx heads (not 101) are dropped; Some once a final head is complete;
/// None for a spurious wake-up or a partial head; an error if it closed.
async fn answer_arrived(stream: &TcpStream, buf: &mut BytesMut) -> Result<Option<Early>, Failed> {
    let closed = |e: Error, buf: &BytesMut| Failed {
        error: e,
        stale: buf.is_empty(),
    };
    if let Err(e) = stream.readable().await {
        return Err(closed(upstream("waiting for the response", e), buf));
    }
    buf.reserve(READ_CHUNK);
    match stream.try_read_buf(buf) {
        Ok(0) => {
            let e = Error::Upstream("the upstream closed the connection while the request was sent".into());
            Err(closed(e, buf))
        }
        Ok(_) => Ok(final_head(buf)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(closed(upstream("sending the request", e), buf)),
    }
}

/// Drops complete interim heads from the front of `buf` and says what the
/// final head there means for the request body; None while it is incomplete.
fn final_head(buf: &mut BytesMut) -> Option<Early> {
    loop {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut r, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return None,
            _ => return Some(Early::Refusal),
        };
        let code = r.code.unwrap_or(0);
        if (100..200).contains(&code) && code != 101 {
            let _ = buf.split_to(len);
            continue;
        }
        let close = r.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection")
                && h.value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        });
        return Some(if (200..400).contains(&code) && !close {
            Early::Success
        } else {
            Early::Refusal
        });
    }
}

/// Writes `data` unless a final answer arrives first: then what it means,
/// with `data` left holding what was not written.
async fn write_watching(stream: &TcpStream, buf: &mut BytesMut, data: &mut Bytes) -> Result<Option<Early>, Failed> {
    while !data.is_empty() {
        tokio::select! {
            biased;
            answer = answer_arrived(stream, buf) => {
                if let Some(answer) = answer? {
                    return Ok(Some(answer));
                }
            }
            w = stream.writable() => {
                let r = w.and_then(|()| stream.try_write(data));
                match r {
                    Ok(n) => {
                        let _ = data.split_to(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        // A reset may have come with an answer: read it before giving up.
                        buf.reserve(READ_CHUNK);
                        if matches!(stream.try_read_buf(buf), Ok(n) if n > 0) {
                            if let Some(answer) = final_head(buf) {
                                return Ok(Some(answer));
                            }
                        }
                        return Err(Failed {
                            stale: buf.is_empty(),
                            error: upstream("sending the request", e),
                        });
                    }
                }
            }
        }
    }
    Ok(None)
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Reads the final response head (interim 1xx responses other than 101 are skipped).
async fn read_head(conn: &mut Conn) -> Result<Head, Failed> {
    let mut got_any = !conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            if let Some(head) = take_head(&mut conn.buf).map_err(Error::Upstream)? {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                return Ok(head);
            }
            if conn.buf.len() > MAX_HEAD {
                return Err(Error::Upstream(format!("response head larger than {MAX_HEAD} bytes")).into());
            }
        }
        match conn.fill().await {
            Ok(0) => {
                return Err(Failed {
                    error: Error::Upstream("the upstream closed the connection before answering".into()),
                    stale: !got_any,
                })
            }
            Ok(_) => got_any = true,
            Err(e) => {
                return Err(Failed {
                    error: upstream("reading the response", e),
                    stale: !got_any,
                })
            }
        }
    }
}

/// Takes a complete response head off the front of `buf`: None (and `buf`
/// untouched) while it is incomplete. Header values share the head's bytes.
fn take_head(buf: &mut BytesMut) -> Result<Option<Head>, String> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut r, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = r
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("malformed response head: bad status code")?;
    let version = if r.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each name and value lies in `buf`, to slice them off the frozen head.
    let base = buf.as_ptr() as usize;
    let offset = |b: &[u8]| (b.as_ptr() as usize - base) as u32;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let n = r.headers.len();
    for (span, h) in spans.iter_mut().zip(r.headers.iter()) {
        *span = (
            offset(h.name.as_bytes()),
            h.name.len() as u32,
            offset(h.value),
            h.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(n);
    for &(ns, nl, vs, vl) in &spans[..n] {
        let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
        let name = HeaderName::from_bytes(&head[ns..ns + nl]).map_err(|_| {
            format!(
                "malformed response header name {:?}",
                String::from_utf8_lossy(&head[ns..ns + nl])
            )
        })?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
            .map_err(|_| format!("malformed value of response header {name}"))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
    }))
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, PartialEq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Eof,
    Done,
}

/// The response body's framing, and the response's Content-Length when it
/// has no Transfer-Encoding (which wins: the length is then not read).
fn response_framing(method: &Method, head: &Head) -> Result<(Framing, Option<u64>), String> {
    if head.headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok((body_framing(method, head, None)?, None));
    }
    let length = content_length(&head.headers)?;
    Ok((body_framing(method, head, length)?, length))
}

fn body_framing(method: &Method, head: &Head, length: Option<u64>) -> Result<Framing, String> {
    let s = head.status;
    if *method == Method::HEAD || s.is_informational() || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    if head.headers.contains_key(header::TRANSFER_ENCODING) {
        // Any other coding would reach the client undecoded and unlabelled
        // (Transfer-Encoding is hop-by-hop): refused, as nginx does.
        let mut codings = head
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty());
        return match (codings.next(), codings.next()) {
            (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked(Chunk::Size)),
            _ => Err("upstream Transfer-Encoding other than chunked".into()),
        };
    }
    Ok(length.map_or(Framing::Eof, Framing::Length))
}

/// The Content-Length of a message: digits only; a list or repeated headers
/// must all agree (RFC 9110 §8.6).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, String> {
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let digits = part.trim_ascii();
            let n = std::str::from_utf8(digits)
                .ok()
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or_else(|| format!("bad Content-Length {v:?} from the upstream"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers from the upstream".into());
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Where a chunked body's decoder is.
#[derive(Debug, PartialEq)]
enum Chunk {
    Size,
    /// This many bytes of chunk data are left.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    Trailers,
}

/// One step of the chunked decoder over `buf`.
#[derive(Debug, PartialEq)]
enum Decoded {
    Data(Bytes),
    End,
    NeedMore,
}

fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(format!("chunked body: line longer than {MAX_LINE} bytes")),
        None => Ok(None),
    }
}

fn decode_chunked(buf: &mut BytesMut, st: &mut Chunk) -> Result<Decoded, String> {
    loop {
        match st {
            Chunk::Size => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Decoded::NeedMore);
                };
                let end = line.iter().position(|&b| b == b';' || b == b' ' || b == b'\t');
                let digits = &line[..end.unwrap_or(line.len())];
                if digits.is_empty() || digits.len() > 16 {
                    return Err("chunked body: bad chunk size".into());
                }
                let mut n: u64 = 0;
                for &d in digits {
                    let v = (d as char).to_digit(16).ok_or("chunked body: bad chunk size")?;
                    n = (n << 4) | u64::from(v);
                }
                *st = if n == 0 { Chunk::Trailers } else { Chunk::Data(n) };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                let data = buf.split_to(n as usize).freeze();
                if *left == 0 {
                    *st = Chunk::DataEnd;
                }
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Decoded::NeedMore);
                };
                if !line.is_empty() {
                    return Err("chunked body: no CRLF after chunk data".into());
                }
                *st = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Decoded::NeedMore);
                };
                if line.is_empty() {
                    return Ok(Decoded::End);
                }
            }
        }
    }
}

/// The upstream's response body, read from its connection as it is polled.
/// Once it is complete, the connection goes back to the idle list when it
/// may be reused.
pub struct ResponseBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    idle: Arc<IdleConns>,
}

impl ResponseBody {
    fn finish_if_done(&mut self) {
        if self.framing == Framing::Length(0) {
            self.framing = Framing::Done;
        }
        if self.framing != Framing::Done {
            return;
        }
        if let Some(c) = self.conn.take() {
            // Bytes after the end of the response: the upstream is confused.
            if self.keep_alive && c.buf.is_empty() {
                self.idle.checkin(c);
            }
        }
    }

    fn fail(&mut self, e: String) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(io::Error::other(e))))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if !conn.buf.is_empty() {
                let data = match &mut this.framing {
                    Framing::Length(left) => {
                        let n = (*left).min(conn.buf.len() as u64);
                        *left -= n;
                        Some(conn.buf.split_to(n as usize).freeze())
                    }
                    Framing::Eof => Some(conn.buf.split().freeze()),
                    Framing::Chunked(st) => match decode_chunked(&mut conn.buf, st) {
                        Ok(Decoded::Data(d)) => Some(d),
                        Ok(Decoded::End) => {
                            this.framing = Framing::Done;
                            None
                        }
                        Ok(Decoded::NeedMore) => None,
                        Err(e) => return this.fail(format!("upstream response body: {e}")),
                    },
                    Framing::Done => None,
                };
                if let Some(d) = data {
                    this.finish_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                if this.framing == Framing::Done {
                    this.finish_if_done();
                    return Poll::Ready(None);
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.framing == Framing::Eof => {
                    this.framing = Framing::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("the upstream closed the connection before the end of the body".into()),
                Ok(_) => {}
                Err(e) => return this.fail(format!("reading the upstream response body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<Vec<u8>, String> {
        let mut buf = BytesMut::new();
        let mut st = Chunk::Size;
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match decode_chunked(&mut buf, &mut st)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::End => return Ok(out),
                    Decoded::NeedMore => break,
                }
            }
        }
        Err("incomplete".into())
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            assert_eq!(decode_all(wire, step).unwrap(), b"hello 0123456789", "step {step}");
        }
        assert_eq!(decode_all(b"0\r\n\r\n", 1).unwrap(), b"");
        assert_eq!(decode_all(b"3\nabc\n0\n\n", 1).unwrap(), b"abc", "bare LF accepted");
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        assert!(decode_all(b"zz\r\n", 4).unwrap_err().contains("chunk size"));
        assert!(decode_all(b"\r\n", 4).unwrap_err().contains("chunk size"));
        assert!(decode_all(b"11111111111111111\r\n", 64)
            .unwrap_err()
            .contains("chunk size"));
        assert!(decode_all(b"3\r\nabcX\r\n", 64).unwrap_err().contains("CRLF"));
        let long = vec![b'1'; MAX_LINE + 1];
        assert!(decode_all(&long, 8192).unwrap_err().contains("longer"));
    }

    fn head(raw: &str) -> Head {
        take_head(&mut BytesMut::from(raw)).unwrap().unwrap()
    }

    #[test]
    fn heads_parse_and_partial_heads_wait() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nabc";
        let mut buf = BytesMut::from(raw);
        let h = take_head(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..], b"abc", "the body stays");
        assert_eq!(h.status, 200);
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.headers["content-length"], "3");
        let xa: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        let mut partial = BytesMut::from(&raw[..20]);
        assert!(take_head(&mut partial).unwrap().is_none());
        assert_eq!(partial.len(), 20, "nothing consumed");
        assert!(take_head(&mut BytesMut::from("HTTP/1.1 2000 OK\r\n\r\n")).is_err());
        assert!(take_head(&mut BytesMut::from("garbage\r\n\r\n")).is_err());
        assert_eq!(head("HTTP/1.0 200 OK\r\n\r\n").version, Version::HTTP_10);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let get = &Method::GET;
        let f = |m: &Method, raw: &str| response_framing(m, &head(raw)).map(|(f, _)| f);
        assert_eq!(
            f(get, "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            f(get, "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            f(get, "HTTP/1.1 200 OK\r\nContent-Length: 005\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert!(f(get, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").is_err());
        for bad in ["-1", "+5", "5 5", "", "0x10", "99999999999999999999"] {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(f(get, &raw).is_err(), "Content-Length {bad:?}");
        }
        assert_eq!(
            f(
                get,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Length: 5\r\n\r\n"
            ),
            Ok(Framing::Chunked(Chunk::Size)),
            "chunked wins over Content-Length"
        );
        for coding in ["gzip", "gzip, chunked", "chunked, chunked"] {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n");
            assert!(f(get, &raw).is_err(), "Transfer-Encoding {coding:?}");
        }
        assert_eq!(f(get, "HTTP/1.1 200 OK\r\n\r\n"), Ok(Framing::Eof));
        assert_eq!(
            f(&Method::HEAD, "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"),
            Ok(Framing::Length(0))
        );
        assert_eq!(f(get, "HTTP/1.1 204 No Content\r\n\r\n"), Ok(Framing::Length(0)));
        assert_eq!(
            f(get, "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            Ok(Framing::Length(0))
        );
    }

    #[test]
    fn answers_during_an_upload_are_told_apart() {
        let early = |raw: &str| {
            let mut buf = BytesMut::from(raw);
            let r = final_head(&mut buf);
            (r, buf.len())
        };
        let interim = "HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n";
        assert!(
            matches!(early(interim), (None, 0)),
            "interim heads dropped, the body goes on"
        );
        assert!(matches!(early("HTTP/1.1 100 Cont"), (None, 17)), "a partial head waits");
        let refusal = "HTTP/1.1 413 Payload Too Large\r\n\r\n";
        let r = early(&format!("{interim}{refusal}"));
        assert!(
            matches!(r, (Some(Early::Refusal), n) if n == refusal.len()),
            "the final head stays for read_head"
        );
        assert!(matches!(early("HTTP/1.1 200 OK\r\n\r\n"), (Some(Early::Success), _)));
        let close = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
        assert!(matches!(early(close), (Some(Early::Refusal), _)));
        assert!(matches!(early("garbage\r\n\r\n"), (Some(Early::Refusal), _)));
    }

    #[test]
    fn request_heads_carry_their_own_framing() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a.example.com"));
        h.insert("content-length", HeaderValue::from_static("999"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let req = Request {
            method: &Method::POST,
            target: "/p?q=1",
            headers: &h,
            body: None,
        };
        let mut w = Vec::new();
        encode_head(&mut w, &req, &ReqFraming::Length(0));
        assert_eq!(
            String::from_utf8(w.clone()).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: a.example.com\r\ncontent-length: 0\r\n\r\n"
        );
        encode_head(&mut w, &req, &ReqFraming::Chunked);
        assert!(String::from_utf8(w.clone())
            .unwrap()
            .ends_with("host: a.example.com\r\ntransfer-encoding: chunked\r\n\r\n"));
    }
}
