//! Prometheus's text exposition format, the few pieces the control plane's
//! and the agent's `/metrics` both write: label escaping, a family's
//! header and a lock-free histogram.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A label value, escaped (`\`, `"` and newlines).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A metric family's `# HELP` and `# TYPE` lines.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Most finite buckets a [`Histogram`] takes.
const MAX_BUCKETS: usize = 15;

/// A histogram of seconds over fixed buckets; usable as a `static`.
pub struct Histogram {
    /// Upper bounds, ascending, at most [`MAX_BUCKETS`].
    bounds: &'static [f64],
    /// Per bucket of `bounds`, then +Inf.
    counts: [AtomicU64; MAX_BUCKETS + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// # Panics
    /// At compile time (in a `static`/`const`) when `bounds` has more than
    /// [`MAX_BUCKETS`] entries.
    pub const fn new(bounds: &'static [f64]) -> Histogram {
        assert!(bounds.len() <= MAX_BUCKETS, "too many histogram buckets");
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; MAX_BUCKETS + 1],
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name` (its family header
    /// is the caller's).
    pub fn write(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_lines_are_cumulative() {
        static H: Histogram = Histogram::new(&[0.1, 1.0]);
        H.observe(0.05);
        H.observe(0.5);
        H.observe(7.0);
        let mut out = String::new();
        H.write(&mut out, "x_seconds");
        assert_eq!(
            out,
            "x_seconds_bucket{le=\"0.1\"} 1\nx_seconds_bucket{le=\"1\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 7.55\nx_seconds_count 3\n"
        );
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
