//! Keep-alive connections to upstreams: a [`Conn`] and its read buffer, the
//! idle list of one upstream address ([`IdleConns`]) with its reuse check, and
//! the pruning of connections idle too long.

use super::Error;
use bytes::{Bytes, BytesMut};
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Read buffer growth step.
pub(super) const READ_CHUNK: usize = 16 * 1024;
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

/// One keep-alive connection to an upstream.
pub struct Conn {
    /// Shared only while a request body is still being sent after the
    /// upstream has started its response (see [`send_body`](super::body::send_body)).
    pub(super) stream: Arc<TcpStream>,
    /// Bytes read from the upstream and not used yet.
    pub(super) buf: BytesMut,
    /// The request head being written; kept to reuse its allocation.
    pub(super) wbuf: Vec<u8>,
}

impl Conn {
    pub(super) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, Error> {
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
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
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

    pub(super) async fn fill(&mut self) -> io::Result<usize> {
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
    pub(super) fn checkout(&self) -> Option<Conn> {
        loop {
            let (c, _) = self.list().pop()?;
            if c.still_open() {
                return Some(c);
            }
        }
    }

    pub(super) fn checkin(&self, c: Conn) {
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
