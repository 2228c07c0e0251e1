//! Client-side stream wrappers: one replays bytes read ahead (the
//! ClientHello peeked for SNI) and counts reads and writes, for the idle
//! timeout; one closes the connection without losing an early answer.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds since the process's first call; monotonic.
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// How many reads and writes moved bytes on a connection. A counter, not a
/// timestamp: bumping it costs no clock read on the hot path.
#[derive(Debug, Default)]
pub struct Activity(AtomicU64);

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }
    pub fn touch(&self) {
        // One task drives a connection: a plain store, no read-modify-write.
        self.0
            .store(self.0.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Runs `conn` until it finishes or the connection moved no bytes for
/// `idle`. Activity is sampled every `idle / 4`, so the connection closes
/// between `idle` and `1.25 × idle` after its last byte.
pub async fn with_idle_timeout<F: std::future::Future>(conn: F, activity: &Activity, idle: Duration) {
    tokio::pin!(conn);
    let tick = (idle / 4).max(Duration::from_millis(1));
    let sleep = tokio::time::sleep(tick);
    tokio::pin!(sleep);
    let mut seen = activity.count();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = &mut conn => return,
            _ = &mut sleep => {
                let now = tokio::time::Instant::now();
                let count = activity.count();
                if count != seen {
                    seen = count;
                    quiet_since = now;
                } else if now - quiet_since >= idle {
                    tracing::debug!("closing connection idle for {:?}", now - quiet_since);
                    return;
                }
                sleep.as_mut().reset(now + tick);
            }
        }
    }
}

/// A stream that first yields `prefix`, then reads from `inner`.
pub struct ConnIo<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
    activity: Arc<Activity>,
}

impl<S> ConnIo<S> {
    pub fn new(inner: S, prefix: Vec<u8>, activity: Arc<Activity>) -> Self {
        ConnIo {
            prefix,
            pos: 0,
            inner,
            activity,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                // Free the read-ahead buffer: idle connections stay small.
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long a closed client connection is still read and thrown away.
pub const LINGER: Duration = Duration::from_secs(5);

/// A client connection that closes the way nginx's `lingering_close` does.
///
/// hyper closes a connection right after an answer sent before the request
/// body was read to its end: the upstream's 413 to a large upload, a 400
/// for a malformed head. Closing a socket with unread bytes makes the
/// kernel send a reset, which can overtake the answer: the client then sees
/// a broken pipe instead of the 413. So on drop the connection is closed
/// for writing, and what the client still sends is read and thrown away,
/// for at most [`LINGER`].
pub struct Lingering(Option<TcpStream>);

impl Lingering {
    pub fn new(stream: TcpStream) -> Self {
        Lingering(Some(stream))
    }
    fn stream(&mut self) -> &mut TcpStream {
        self.0.as_mut().expect("a Lingering stream is only taken on drop")
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(mut tcp), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(async move {
            let _ = tokio::time::timeout(LINGER, async {
                // FIN after whatever was written (TLS's close_notify included).
                let _ = tcp.shutdown().await;
                let mut sink = [0u8; 16 * 1024];
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

impl AsyncRead for Lingering {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()).poll_write(cx, data)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_is_replayed_before_the_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        let act = Activity::new();
        let mut io = ConnIo::new(a, b"hello ".to_vec(), act.clone());
        b.write_all(b"world").await.unwrap();
        drop(b);
        let mut s = String::new();
        io.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
        assert!(io.prefix.capacity() == 0, "read-ahead buffer freed");
    }
}
