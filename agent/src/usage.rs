//! CPU and memory for heartbeats: the node's, from /proc, and each
//! replica's, from Podman's stats. CPU is a rate, so it is measured between
//! two heartbeats; the first heartbeat sends memory only.

use crate::podman::Podman;
use berth_protocol::{NodeUsage, StatusReport};
use std::collections::HashMap;
use std::time::Instant;

#[derive(Default)]
pub struct Sampler {
    /// Per container name: CPU nanoseconds used, when.
    replicas: HashMap<String, (u64, Instant)>,
    /// The node's busy and total jiffies at the last sample.
    node: Option<(u64, u64)>,
}

/// (busy, total) jiffies of all CPUs, from /proc/stat's first line.
fn node_jiffies(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if f.len() < 5 {
        return None;
    }
    let total: u64 = f.iter().take(8).sum();
    let idle = f[3] + f[4]; // idle + iowait
    Some((total - idle, total))
}

/// (used, total) bytes from /proc/meminfo: MemTotal − MemAvailable.
fn memory(meminfo: &str) -> Option<(u64, u64)> {
    let kib = |key: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (total, available) = (kib("MemTotal:")?, kib("MemAvailable:")?);
    Some(((total - available.min(total)) * 1024, total * 1024))
}

impl Sampler {
    /// Adds the node's and its replicas' CPU and memory to `report`.
    pub async fn fill(&mut self, podman: &Podman, report: &mut StatusReport) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let jiffies = std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(node_jiffies);
        let cpu_millicores = match (self.node, jiffies) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                ((b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64 * f64::from(cores) * 1000.0) as u32
            }
            _ => 0,
        };
        self.node = jiffies;
        if let Some((used, total)) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .as_deref()
            .and_then(memory)
        {
            report.usage = Some(NodeUsage {
                cpu_millicores,
                cores,
                memory_used_bytes: used,
                memory_total_bytes: total,
            });
        }
        let Ok(stats) = podman.stats().await else { return };
        let now = Instant::now();
        let mut seen = HashMap::new();
        for s in &stats {
            let Some(name) = s["Name"].as_str() else { continue };
            let cpu_ns = s["CPUNano"].as_u64().unwrap_or(0);
            seen.insert(name.to_string(), (cpu_ns, now, s["MemUsage"].as_u64()));
        }
        for c in &mut report.containers {
            let name = crate::containers::create_spec::container_name(&c.replica);
            let Some((cpu_ns, at, mem)) = seen.get(&name) else {
                continue;
            };
            c.memory_bytes = *mem;
            if let Some((prev_ns, prev_at)) = self.replicas.get(&name) {
                let secs = at.duration_since(*prev_at).as_secs_f64();
                if secs > 0.0 && cpu_ns >= prev_ns {
                    c.cpu_millicores = Some(((cpu_ns - prev_ns) as f64 / 1e9 / secs * 1000.0) as u32);
                }
            }
        }
        self.replicas = seen.into_iter().map(|(k, (ns, at, _))| (k, (ns, at))).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_figures_come_from_proc() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(node_jiffies(stat), Some((150, 1000)));
        assert_eq!(node_jiffies("intr 1 2 3"), None);
        let meminfo = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    400 kB\n";
        assert_eq!(memory(meminfo), Some((600 * 1024, 1000 * 1024)));
        assert_eq!(memory("MemTotal: 5 kB\n"), None);
    }
}
