//! The upstream HTTP/1.1 client. It runs inside the task that serves the
//! client's request: no connection task and no channel between the two, so
//! a proxied request costs one task's polls. The request head (and body) is
//! written, the response head read, and the response body is then read from
//! the upstream socket as the client side pulls it. A connection whose
//! exchange ended cleanly waits in its upstream's [`IdleConns`] for reuse.
//!
//! By job: `pool` keeps the connections, `codec` writes request heads
//! and reads response heads and framing, `chunked` is the chunked coding,
//! `body` sends request bodies and reads response bodies. This file is
//! the flow of one request: [`send`] and the exchange on one connection.

mod body;
mod chunked;
mod codec;
mod pool;

pub use body::ResponseBody;
pub use pool::{prune_all, Conn, IdleConns, PRUNE_INTERVAL};

use body::{send_body, write_all, BodySent};
use codec::{encode_head, response_framing, take_head, Framing, Head, ReqFraming, MAX_HEAD};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
