//! Upgrades. The agent never replaces its own binary: `update.sh` (installed
//! by setup.sh) does, from outside the agent's process and cgroup, and puts
//! the previous binary back when the new one does not report in time.
//!
//! Two things live here:
//! * the status file `DATA_DIR/agent.status`, written after every status
//!   report the control plane accepted; update.sh waits for the new version
//!   to appear in it (with the unit's current pid);
//! * starting update.sh when the desired state asks for another version
//!   (`berth nodes upgrade`), once per version, and never again for a
//!   version update.sh already reverted.

use std::path::{Path, PathBuf};
use std::process::Stdio;

pub const STATUS_FILE: &str = "agent.status";
/// Written by update.sh when it put the previous binary back after trying `VERSION`.
pub const FAILED_PREFIX: &str = "upgrade-failed-";

/// Records that this process, of this version, just reported to the control plane.
pub fn write_status(data_dir: &Path) -> std::io::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let body = format!(
        "version={}\npid={}\nreported_at={now}\n",
        crate::VERSION,
        std::process::id()
    );
    let tmp = data_dir.join(format!("{STATUS_FILE}.tmp"));
    std::fs::write(&tmp, body)?;
    std::fs::rename(tmp, data_dir.join(STATUS_FILE))
}

pub struct Upgrader {
    data_dir: PathBuf,
    script: PathBuf,
    started: Option<String>,
    error: Option<String>,
}

impl Upgrader {
    pub fn new(data_dir: PathBuf, script: PathBuf) -> Upgrader {
        Upgrader {
            data_dir,
            script,
            started: None,
            error: None,
        }
    }

    /// Why the last requested upgrade did not happen, for status reports.
    pub fn error(&self) -> Option<String> {
        self.error.clone()
    }

    /// Called with each desired state's `upgrade_to`.
    pub fn want(&mut self, target: Option<&str>) {
        let Some(v) = target.filter(|v| *v != crate::VERSION) else {
            self.error = None;
            return;
        };
        if self.started.as_deref() == Some(v) {
            return;
        }
        self.started = Some(v.to_string());
        self.error = self.start(v).err();
        if let Some(e) = &self.error {
            tracing::warn!(version = v, error = %e, "upgrade not started");
        }
    }

    fn start(&self, v: &str) -> Result<(), String> {
        if !berth_protocol::names::valid_version(v) {
            return Err(format!("upgrade to {v:?}: not a valid version name"));
        }
        let failed = self.data_dir.join(format!("{FAILED_PREFIX}{v}"));
        if failed.exists() {
            let why = std::fs::read_to_string(&failed).unwrap_or_default();
            return Err(format!("upgrade to {v} failed before and was reverted: {}", why.trim()));
        }
        if !self.script.exists() {
            return Err(format!(
                "upgrade to {v}: {} is missing (run setup.sh again)",
                self.script.display()
            ));
        }
        tracing::info!(version = v, "starting update.sh");
        // A transient unit of its own: update.sh restarts this agent and must
        // outlive it (KillMode=process would spare it, a new cgroup is clearer).
        let unit = format!("berth-update-{}", v.replace(['+', '_'], "-"));
        let out = std::process::Command::new("systemd-run")
            .args(["--unit", &unit, "--collect", "--quiet"])
            .arg(&self.script)
            .args(["--version", v])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("upgrade to {v}: systemd-run: {e} (upgrades need systemd)"))?;
        if !out.status.success() {
            return Err(format!(
                "upgrade to {v}: systemd-run: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_file_names_this_build_and_process() {
        let dir = tempfile::tempdir().unwrap();
        write_status(dir.path()).unwrap();
        let s = std::fs::read_to_string(dir.path().join(STATUS_FILE)).unwrap();
        assert!(s.contains(&format!("version={}\n", crate::VERSION)), "{s}");
        assert!(s.contains(&format!("pid={}\n", std::process::id())), "{s}");
    }

    #[test]
    fn same_version_or_reverted_version_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = Upgrader::new(dir.path().into(), dir.path().join("update.sh"));
        u.want(Some(crate::VERSION));
        assert_eq!(u.error(), None);
        std::fs::write(dir.path().join("upgrade-failed-9.9.9"), "did not report within 60 s\n").unwrap();
        u.want(Some("9.9.9"));
        let e = u.error().unwrap();
        assert!(e.contains("reverted") && e.contains("did not report"), "{e}");
        u.want(Some("9.9.10"));
        assert!(u.error().unwrap().contains("update.sh is missing"));
        u.want(None);
        assert_eq!(u.error(), None);
    }
}
