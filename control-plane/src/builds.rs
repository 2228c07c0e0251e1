//! Builds on the control plane's side: where contexts and logs are kept,
//! which builder nodes are ready, and the sweep that ends builds past
//! their time. The API is in `api/builds.rs`, the rows in `store/builds.rs`.
//!
//! Builder nodes are known by asking: a worker that builds long-polls
//! `/v1/agent/builds/next` with its architecture, so the nodes seen there in
//! the last minute are the ones a build can go to. A node started with
//! `--no-builds` never asks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a builder counts as ready after it last asked for work.
pub const BUILDER_SEEN: Duration = Duration::from_secs(60);

/// `--build-*` settings.
#[derive(Debug, Clone)]
pub struct BuildsConfig {
    /// Largest context accepted (413 above it).
    pub max_context_bytes: u64,
}

impl Default for BuildsConfig {
    fn default() -> Self {
        BuildsConfig {
            max_context_bytes: berth_protocol::build::DEFAULT_MAX_CONTEXT_MIB << 20,
        }
    }
}

/// A builder node as last seen asking for work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Builder {
    pub arch: String,
    /// Started with `--builder`.
    pub preferred: bool,
    /// Waiting in a long-poll now (not building).
    pub idle: bool,
    pub seen: Instant,
}

pub struct Builds {
    pub dir: PathBuf,
    pub config: BuildsConfig,
    builders: Mutex<HashMap<String, Builder>>,
    /// Held while a build is ended by a cancel, a timeout or its builder's
    /// result: a release is made only for a build still running, and a
    /// cancel cannot land between the release and its record.
    pub ending: tokio::sync::Mutex<()>,
    /// Builds whose context is being received (one upload at a time each).
    uploading: Mutex<std::collections::HashSet<u64>>,
    /// Each platform build's last line so far, not yet in its
    /// multi-platform build's log.
    partial: Mutex<HashMap<u64, PartialLine>>,
    /// Bumped on every change to any build (state, log): long-polls and
    /// log followers wait on it and look again.
    changed: tokio::sync::watch::Sender<u64>,
}

/// A platform build's unended line: (its multi-platform build, the
/// prefix, the bytes so far).
type PartialLine = (u64, String, Vec<u8>);

/// Holds build `id`'s upload slot until dropped.
pub struct UploadSlot<'a> {
    builds: &'a Builds,
    id: u64,
}

impl Drop for UploadSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut u) = self.builds.uploading.lock() {
            u.remove(&self.id);
        }
    }
}

impl Builds {
    /// The right to receive build `id`'s context; None while another
    /// upload of it runs (two would write the same file).
    pub fn upload_slot(&self, id: u64) -> Option<UploadSlot<'_>> {
        let mut u = self.uploading.lock().ok()?;
        u.insert(id).then_some(UploadSlot { builds: self, id })
    }

    pub fn new(data_dir: &Path, config: BuildsConfig) -> std::io::Result<Builds> {
        let dir = data_dir.join("builds");
        std::fs::create_dir_all(&dir)?;
        Ok(Builds {
            dir,
            config,
            builders: Mutex::new(HashMap::new()),
            ending: tokio::sync::Mutex::new(()),
            uploading: Mutex::new(Default::default()),
            partial: Mutex::new(Default::default()),
            changed: tokio::sync::watch::channel(0).0,
        })
    }

    pub fn context_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.tar"))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// Appends platform build `id`'s log chunk to its multi-platform
    /// build `parent`'s log, whole lines only, each after `prefix`: a line
    /// split over two chunks waits for its end, so the platforms' lines
    /// never mix.
    pub fn append_platform_log(&self, id: u64, parent: u64, prefix: &str, chunk: &[u8]) -> std::io::Result<()> {
        let lines = {
            let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
            let held = partial
                .entry(id)
                .or_insert_with(|| (parent, prefix.to_string(), vec![]));
            held.2.extend_from_slice(chunk);
            match held.2.iter().rposition(|&b| b == b'\n') {
                Some(end) => {
                    let rest = held.2.split_off(end + 1);
                    prefix_lines(prefix, &std::mem::replace(&mut held.2, rest))
                }
                None => return Ok(()),
            }
        };
        self.append_log(parent, &lines)
    }

    /// A platform build ended: what is left of its last line goes to its
    /// multi-platform build's log.
    pub fn flush_platform_log(&self, id: u64) {
        let held = self.partial.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        if let Some((parent, prefix, rest)) = held.filter(|h| !h.2.is_empty()) {
            let mut lines = prefix_lines(&prefix, &rest);
            lines.push(b'\n');
            let _ = self.append_log(parent, &lines);
        }
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Records that `node_id` asks for work (`idle`) or stopped waiting.
    pub fn seen(&self, node_id: &str, arch: &str, preferred: bool, idle: bool) {
        let mut b = self.builders.lock().unwrap_or_else(|e| e.into_inner());
        b.insert(
            node_id.to_string(),
            Builder {
                arch: arch.to_string(),
                preferred,
                idle,
                seen: Instant::now(),
            },
        );
    }

    /// Forgets a node (removed from the fleet).
    pub fn forget(&self, node_id: &str) {
        self.builders.lock().unwrap_or_else(|e| e.into_inner()).remove(node_id);
    }

    pub fn builders(&self) -> HashMap<String, Builder> {
        self.builders.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Appends a chunk to a build's log.
    pub fn append_log(&self, id: u64, chunk: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))?;
        f.write_all(chunk)?;
        self.notify();
        Ok(())
    }

    /// The last `n` lines of a build's log.
    pub fn log_tail(&self, id: u64, n: usize) -> Vec<String> {
        let data = std::fs::read(self.log_path(id)).unwrap_or_default();
        let text = String::from_utf8_lossy(&data);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }
}

/// Whether any builder of `arch` is ready: one asked within [`BUILDER_SEEN`].
pub fn any_ready(builders: &HashMap<String, Builder>, arch: &str, now: Instant) -> bool {
    builders
        .values()
        .any(|b| b.arch == arch && now.duration_since(b.seen) < BUILDER_SEEN)
}

/// Whether node `me` may take a queued build of its architecture now: a
/// `--builder` node always; another only while no `--builder` node of that
/// architecture is ready and waiting for work (it would take it at once).
pub fn may_take(builders: &HashMap<String, Builder>, me: &str, now: Instant) -> bool {
    let Some(mine) = builders.get(me) else {
        return false;
    };
    mine.preferred
        || !builders.iter().any(|(id, b)| {
            id != me && b.preferred && b.idle && b.arch == mine.arch && now.duration_since(b.seen) < BUILDER_SEEN
        })
}

/// `text` with `prefix` before each of its lines.
fn prefix_lines(prefix: &str, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + prefix.len());
    for line in text.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_logs_meet_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let b = Builds::new(dir.path(), BuildsConfig::default()).unwrap();
        b.append_platform_log(2, 1, "[a] ", b"one\ntw").unwrap();
        b.append_platform_log(3, 1, "[b] ", b"other\n").unwrap();
        b.append_platform_log(2, 1, "[a] ", b"").unwrap();
        b.append_platform_log(2, 1, "[a] ", b"o\nthree\nfo").unwrap();
        b.append_platform_log(3, 1, "[b] ", b"unended").unwrap();
        b.flush_platform_log(2);
        b.flush_platform_log(3);
        b.flush_platform_log(3);
        let log = std::fs::read_to_string(b.log_path(1)).unwrap();
        assert_eq!(log, "[a] one\n[b] other\n[a] two\n[a] three\n[a] fo\n[b] unended\n");
    }

    fn builder(arch: &str, preferred: bool, idle: bool, ago: u64, now: Instant) -> Builder {
        Builder {
            arch: arch.into(),
            preferred,
            idle,
            seen: now - Duration::from_secs(ago),
        }
    }

    #[test]
    fn builder_nodes_are_preferred_while_they_wait_for_work() {
        let now = Instant::now() + Duration::from_secs(600);
        let mut b = HashMap::new();
        b.insert("plain".to_string(), builder("amd64", false, true, 0, now));
        // Nobody preferred: the plain worker takes it.
        assert!(may_take(&b, "plain", now));
        b.insert("fast".to_string(), builder("amd64", true, true, 1, now));
        assert!(may_take(&b, "fast", now));
        assert!(!may_take(&b, "plain", now), "a waiting --builder node goes first");
        // The builder node is busy: the plain worker may take the next one.
        b.get_mut("fast").unwrap().idle = false;
        assert!(may_take(&b, "plain", now));
        // A preferred node of another architecture changes nothing.
        b.insert("arm".to_string(), builder("arm64", true, true, 0, now));
        assert!(may_take(&b, "plain", now));
        // One not seen for long is not ready.
        b.insert("stale".to_string(), builder("amd64", true, true, 120, now));
        assert!(may_take(&b, "plain", now));
        assert!(!may_take(&b, "unknown", now), "a node that never asked takes nothing");
    }

    #[test]
    fn readiness_is_per_architecture_and_expires() {
        let now = Instant::now() + Duration::from_secs(600);
        let mut b = HashMap::new();
        assert!(!any_ready(&b, "amd64", now));
        b.insert("a".to_string(), builder("amd64", false, false, 30, now));
        assert!(any_ready(&b, "amd64", now));
        assert!(!any_ready(&b, "arm64", now));
        b.insert("a".to_string(), builder("amd64", false, false, 61, now));
        assert!(!any_ready(&b, "amd64", now));
    }
}
