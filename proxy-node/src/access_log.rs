//! Access log: one JSON line per request, written by a dedicated thread so
//! the request path never blocks on stdout.
//!
//! Line: `{"time":"2025-01-02T03:04:05.678Z","client":"203.0.113.9","host":"app.example.com",
//! "method":"GET","path":"/x","status":200,"bytes":1234,"duration_ms":1.234,"upstream":"10.0.0.5:8080"}`
//! (`upstream` is null when the proxy answered itself; `path` has no query string).

use serde::Serialize;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

/// Lines buffered before new ones are dropped (and counted).
const QUEUE: usize = 16 * 1024;

enum Msg {
    Line(String),
    Flush(SyncSender<()>),
}

pub struct AccessLog {
    tx: Option<SyncSender<Msg>>,
    pub dropped: AtomicU64,
}

/// One finished request.
#[derive(Serialize)]
pub struct Entry<'a> {
    pub time: String,
    pub client: IpAddr,
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: f64,
    pub upstream: Option<SocketAddr>,
}

impl AccessLog {
    pub fn new(writer: Option<Box<dyn Write + Send>>) -> std::io::Result<Self> {
        let Some(w) = writer else {
            return Ok(AccessLog {
                tx: None,
                dropped: AtomicU64::new(0),
            });
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer_thread(rx, w))?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped: AtomicU64::new(0),
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, e: &Entry<'_>) {
        let Some(tx) = &self.tx else { return };
        let line = match serde_json::to_string(e) {
            Ok(l) => l,
            Err(_) => return,
        };
        if let Err(TrySendError::Full(_)) = tx.try_send(Msg::Line(line)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits (at most `max`) until every line logged so far is written.
    pub fn flush(&self, max: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = sync_channel(1);
        if tx.send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(max);
        }
    }
}

fn writer_thread(rx: Receiver<Msg>, w: Box<dyn Write + Send>) {
    let mut w = std::io::BufWriter::with_capacity(64 * 1024, w);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Write everything queued, then flush once.
        while let Some(m) = next {
            match m {
                Msg::Line(l) => {
                    let _ = w.write_all(l.as_bytes());
                    let _ = w.write_all(b"\n");
                }
                Msg::Flush(done) => {
                    let _ = w.flush();
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = w.flush();
    }
}

/// RFC 3339 UTC time with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    berth_protocol::time::Utc::from_system(t).rfc3339_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::UNIX_EPOCH;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn time_format() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123); // 2024-02-29T23:59:59.123Z
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123Z");
    }

    #[test]
    fn writes_json_lines() {
        let buf = Buf::default();
        let log = AccessLog::new(Some(Box::new(buf.clone()))).unwrap();
        log.log(&Entry {
            time: rfc3339(UNIX_EPOCH),
            client: "203.0.113.9".parse().unwrap(),
            host: "a.example.com",
            method: "GET",
            path: "/\"x\"",
            status: 200,
            bytes: 5,
            duration_ms: 1.5,
            upstream: Some("10.0.0.1:80".parse().unwrap()),
        });
        log.flush(Duration::from_secs(5));
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["path"], "/\"x\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream"], "10.0.0.1:80");
        assert!(out.ends_with('\n'));
    }
}
