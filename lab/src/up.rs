//! Bringing a lab up: the one sequence `berth lab up`, the end-to-end tests
//! and the benchmarks share (network, control plane, nodes, convergence), and
//! the one guard that removes what it made.

use crate::{default_bin_dir, destroy_by_id, net::LabNet, Lab};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::Duration;

/// Lab `id` is already there (`berth lab down --id ID` removes it).
#[derive(Debug, thiserror::Error)]
#[error("lab {id} already exists; remove it with `berth lab down --id {id}`")]
pub struct LabExists {
    pub id: u8,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Lab number: its underlay is 198.18.ID.0/24.
    pub id: u8,
    /// State, logs and node data.
    pub dir: PathBuf,
    /// Where `berth-agent`, `berth-control-plane` and `berth-ws-echo` are.
    pub bin_dir: PathBuf,
    pub workers: u16,
    /// Proxy nodes, added after the workers.
    pub proxies: u16,
    /// How long the nodes may take to register and apply the mesh.
    pub converge_within: Duration,
    /// Remove a lab with the same id first (tests and benchmarks: one left by
    /// a killed run). Without it, an existing lab network is a [`LabExists`]
    /// error (a lab dir without one is cleared, as `Lab::create` does).
    pub replace: bool,
    /// When dropped, or on a failure, keep the lab directory (logs).
    pub keep_logs: bool,
    /// A failure once the control plane runs leaves the lab as it is, for a
    /// look at it (`berth lab up`); otherwise it is removed.
    pub leave_on_failure: bool,
}

impl LabSpec {
    /// Lab `id` in `dir` with `workers` workers, the binaries beside this one.
    pub fn new(id: u8, dir: impl Into<PathBuf>, workers: u16) -> LabSpec {
        LabSpec {
            id,
            dir: dir.into(),
            bin_dir: default_bin_dir(),
            workers,
            proxies: 0,
            converge_within: Duration::from_secs(60),
            replace: true,
            keep_logs: false,
            leave_on_failure: false,
        }
    }
}

/// A lab that is removed when dropped: on success, error, panic or
/// interruption. Logs stay when it was asked to keep them, or when the
/// thread is panicking (a failed test). [`LabGuard::into_lab`] disarms it.
pub struct LabGuard {
    id: u8,
    dir: PathBuf,
    keep_logs: bool,
    lab: Option<Lab>,
    /// False when the lab is not the guard's to remove: handed out by
    /// [`LabGuard::into_lab`], left for a look, or one that was there before.
    armed: bool,
}

impl LabGuard {
    /// Builds the lab of `spec` and waits until every node has applied the
    /// mesh. On a failure everything it made is removed again (logs kept with
    /// `keep_logs`), except a lab that was there before.
    pub async fn up(spec: &LabSpec) -> anyhow::Result<LabGuard> {
        if spec.replace && (LabNet { id: spec.id }.exists() || spec.dir.join("lab.json").exists()) {
            eprintln!("removing a leftover lab {} at {}", spec.id, spec.dir.display());
            if let Err(e) = destroy_by_id(spec.id, &spec.dir, false) {
                eprintln!("  warning: {e:#}");
            }
        }
        // Armed before the lab exists, so a half-made lab is removed too.
        let mut guard = LabGuard {
            id: spec.id,
            dir: spec.dir.clone(),
            keep_logs: spec.keep_logs,
            lab: None,
            armed: true,
        };
        eprintln!(
            "lab {}: building the network and starting the control plane...",
            spec.id
        );
        match Lab::create(spec.id, &spec.dir, &spec.bin_dir).await {
            Ok(lab) => guard.lab = Some(lab),
            Err(e) => {
                // A lab that was there before is not ours to remove.
                guard.armed = !e.is::<LabExists>();
                return Err(e);
            }
        }
        match guard.add_nodes(spec).await {
            Ok(()) => Ok(guard),
            Err(e) if spec.leave_on_failure => {
                guard.armed = false;
                Err(e.context(format!(
                    "lab {} is left as it is (logs in {}); remove it with `berth lab down --id {} --dir {}`",
                    spec.id,
                    spec.dir.display(),
                    spec.id,
                    spec.dir.display()
                )))
            }
            Err(e) => Err(e),
        }
    }

    async fn add_nodes(&mut self, spec: &LabSpec) -> anyhow::Result<()> {
        for i in 0..spec.workers + spec.proxies {
            let name = self.add_node(i >= spec.workers).await?;
            eprintln!("lab {}: started node {name} (agent and Podman)", spec.id);
        }
        eprintln!(
            "lab {}: waiting for every node to register and apply the mesh...",
            spec.id
        );
        self.wait_converged(spec.converge_within).await?;
        Ok(())
    }

    /// The lab, no longer removed on drop.
    pub fn into_lab(mut self) -> Lab {
        self.armed = false;
        self.lab.take().expect("a guard holds a lab once up")
    }
}

impl Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab.as_ref().expect("a guard holds a lab once up")
    }
}

impl DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut Lab {
        self.lab.as_mut().expect("a guard holds a lab once up")
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let keep = self.keep_logs || std::thread::panicking();
        let res = match self.lab.take() {
            Some(l) => l.destroy(keep),
            None => destroy_by_id(self.id, &self.dir, keep),
        };
        if let Err(e) = res {
            eprintln!(
                "warning: cleaning up lab {}: {e:#}\n  finish with: berth lab down --id {} --dir {}",
                self.id,
                self.id,
                self.dir.display()
            );
        }
        if keep {
            eprintln!("lab logs kept in {}", self.dir.display());
        }
    }
}
