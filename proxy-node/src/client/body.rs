//! Bodies: sending the request body while watching for an early answer (and
//! the rest of it after a success, full duplex), and the response body read
//! from the connection as the client side pulls it.

use super::chunked::{chunk, decode_chunked, Decoded, LAST_CHUNK};
use super::codec::{final_head, Early, Framing};
use super::pool::{Conn, IdleConns, READ_CHUNK};
use super::{upstream, Error, Failed};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::net::TcpStream;

/// How sending a request body ended.
pub(super) enum BodySent {
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
pub(super) struct RestOfBody {
    pending: Bytes,
    body: Incoming,
    chunked: bool,
}

impl RestOfBody {
    pub(super) async fn finish(mut self, stream: Arc<TcpStream>) {
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

/// Writes all of `data` (no watching: the response is being read elsewhere).
pub(super) async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
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
pub(super) async fn send_body(conn: &mut Conn, mut body: Incoming, chunked: bool) -> Result<BodySent, Failed> {
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

/// The upstream's response body, read from its connection as it is polled.
/// Once it is complete, the connection goes back to the idle list when it
/// may be reused.
pub struct ResponseBody {
    pub(super) conn: Option<Conn>,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
    pub(super) idle: Arc<IdleConns>,
}

impl ResponseBody {
    pub(super) fn finish_if_done(&mut self) {
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
