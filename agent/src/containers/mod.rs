//! The container reconciler: runs this node's replicas on Podman.
//!
//! It owns the containers labelled `io.berth.owner=berth` and nothing else.
//! [`Runtime::apply`] takes a new list of replicas; [`Runtime::tick`] (every
//! second) restarts what stopped, recreates what vanished and runs the health
//! checks that are due. Both are idempotent: with Podman in the wanted state
//! they change nothing. Containers are adopted by label after an agent
//! restart, so a restart never recreates or restarts a healthy replica.

pub mod create_spec;
pub mod diff;
pub mod health;

use crate::podman::{ContainerSummary, HealthStatus, NetworkSpec, Podman};
use anyhow::Context;
use berth_protocol::service::{ContainerDesired, ContainerStatus};
use create_spec::{container_spec, NodeNet, OWNER, STOP_TIMEOUT};
use diff::{Action, Actual, LABEL_OWNER, LABEL_REPLICA, LABEL_SPEC};
use health::{Check, Outcome, Tracker};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::task::JoinSet;
use x25519_dalek::StaticSecret;

/// Where and how this node runs containers.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub socket: PathBuf,
    /// Podman network name (unique on the host).
    pub network: String,
    /// Linux bridge of that network (at most 15 characters).
    pub bridge: String,
    /// The cluster DNS zone, given to containers as their search domain.
    pub zone: String,
    pub volumes_dir: PathBuf,
}

/// What the agent knows about one wanted replica.
#[derive(Debug, Clone, Default)]
struct Replica {
    container_id: Option<String>,
    state: String,
    running: bool,
    check: Option<Check>,
    health: Tracker,
    /// Restarts seen: a new start of the same container (restart policy or
    /// the agent), or a vanished container made anew.
    restarts: u32,
    started_at: i64,
    error: Option<String>,
}

pub struct Runtime {
    cfg: RuntimeConfig,
    podman: Podman,
    sealing: StaticSecret,
    /// This node's container subnet, from the last apply.
    subnet: Option<Ipv4Net>,
    /// The subnet the Podman network was last checked for.
    network_for: Option<Ipv4Net>,
    net: Option<NodeNet>,
    desired: Vec<ContainerDesired>,
    replicas: BTreeMap<String, Replica>,
    /// Containers being stopped and removed in the background.
    removing: Arc<Mutex<BTreeSet<String>>>,
    podman_error_logged: bool,
}

impl Runtime {
    pub fn new(cfg: RuntimeConfig, sealing: StaticSecret) -> Runtime {
        Runtime {
            podman: Podman::new(&cfg.socket),
            cfg,
            sealing,
            subnet: None,
            network_for: None,
            net: None,
            desired: vec![],
            replicas: BTreeMap::new(),
            removing: Arc::default(),
            podman_error_logged: false,
        }
    }

    /// Makes Podman run exactly `desired` on this node's `subnet`.
    pub async fn apply(&mut self, subnet: Ipv4Net, desired: &[ContainerDesired]) -> anyhow::Result<()> {
        self.subnet = Some(subnet);
        self.desired = desired.to_vec();
        self.replicas
            .retain(|name, _| desired.iter().any(|c| &c.replica == name));
        for c in desired {
            let r = self.replicas.entry(c.replica.clone()).or_default();
            let check = match (&c.health_cmd, &c.health_http, c.port) {
                (Some(_), _, _) => Check::Command,
                (None, Some(path), Some(port)) => Check::Http {
                    ip: c.ip,
                    port,
                    path: path.clone(),
                },
                _ => Check::None,
            };
            if r.check.as_ref() != Some(&check) {
                r.check = Some(check);
                r.health = Tracker::default();
            }
        }
        self.sync(subnet).await
    }

    /// The replicas' states, for the status report.
    pub fn statuses(&self) -> Vec<ContainerStatus> {
        self.replicas
            .iter()
            .map(|(name, r)| ContainerStatus {
                replica: name.clone(),
                container_id: r.container_id.clone(),
                state: if r.state.is_empty() {
                    "pending".into()
                } else {
                    r.state.clone()
                },
                healthy: r.health.healthy && r.running,
                restarts: r.restarts,
                error: r.error.clone(),
            })
            .collect()
    }

    /// Replica → healthy, for this node's DNS answers.
    pub fn local_health(&self) -> BTreeMap<String, bool> {
        self.replicas
            .iter()
            .map(|(name, r)| (name.clone(), r.health.healthy && r.running))
            .collect()
    }

    /// Repairs what drifted and runs due health checks. Returns whether any
    /// replica's state or health changed (time to report and update DNS).
    pub async fn tick(&mut self) -> bool {
        let Some(subnet) = self.subnet else {
            return false;
        };
        if self.network_for.is_none() {
            // Podman was not reachable yet: try again.
            let before = self.statuses();
            if let Err(e) = self.sync(subnet).await {
                tracing::debug!(error = %format!("{e:#}"), "containers not ready");
            }
            return before != self.statuses();
        }
        if self.desired.is_empty() {
            return false;
        }
        let before = self.statuses();
        match self.list_owned().await {
            Ok(list) => {
                // Back after Podman was unreachable: a full pass, which also
                // clears the replicas' "unreachable" errors.
                let drifted = self.podman_error_logged
                    || self.desired.iter().any(|c| {
                        let want = self.replicas.get(&c.replica).and_then(|r| r.container_id.as_deref());
                        match list.iter().find(|s| s.labels.get(LABEL_REPLICA) == Some(&c.replica)) {
                            Some(s) => !s.state.is_running() || want != Some(s.id.as_str()),
                            None => true,
                        }
                    });
                if drifted {
                    if let Err(e) = self.sync(subnet).await {
                        tracing::warn!(error = %format!("{e:#}"), "repairing containers failed");
                    }
                } else {
                    self.observe(&list);
                }
            }
            Err(e) => self.podman_unreachable(&e),
        }
        self.run_health_checks().await;
        before != self.statuses()
    }

    async fn list_owned(&self) -> Result<Vec<ContainerSummary>, crate::podman::Error> {
        let list = self.podman.list(&[(LABEL_OWNER, OWNER)]).await?;
        let removing = self.removing.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(list.into_iter().filter(|s| !removing.contains(&s.id)).collect())
    }

    fn podman_unreachable(&mut self, e: &crate::podman::Error) {
        let msg = format!("{e}");
        if !self.podman_error_logged {
            tracing::warn!(error = %msg, "Podman is unreachable; containers keep their last state");
            self.podman_error_logged = true;
        }
        for r in self.replicas.values_mut() {
            r.error = Some(msg.clone());
        }
    }

    /// Reads states from a container list into `replicas`.
    fn observe(&mut self, list: &[ContainerSummary]) {
        for (name, r) in self.replicas.iter_mut() {
            match list.iter().find(|s| s.labels.get(LABEL_REPLICA) == Some(name)) {
                Some(s) => {
                    let same = r.container_id.as_deref() == Some(s.id.as_str());
                    if same && r.started_at != 0 && s.started_at != r.started_at {
                        r.restarts += 1;
                    }
                    r.started_at = s.started_at;
                    r.container_id = Some(s.id.clone());
                    r.state = s.state.to_string();
                    r.running = s.state.is_running();
                }
                None => {
                    r.container_id = None;
                    r.state = "missing".into();
                    r.running = false;
                }
            }
        }
    }

    async fn ensure_network(&mut self, subnet: Ipv4Net) -> anyhow::Result<()> {
        if self.network_for == Some(subnet) {
            return Ok(());
        }
        let gateway = subnet
            .hosts()
            .next()
            .with_context(|| format!("node.subnet {subnet} has no room for a gateway"))?;
        self.podman
            .network_ensure(&NetworkSpec {
                name: self.cfg.network.clone(),
                subnet,
                gateway,
                interface_name: Some(self.cfg.bridge.clone()),
                options: BTreeMap::new(),
                labels: BTreeMap::from([(LABEL_OWNER.to_string(), OWNER.to_string())]),
            })
            .await
            .with_context(|| format!("Podman network {}", self.cfg.network))?;
        self.network_for = Some(subnet);
        self.net = Some(NodeNet {
            network: self.cfg.network.clone(),
            gateway,
            zone: self.cfg.zone.clone(),
            volumes_dir: self.cfg.volumes_dir.clone(),
        });
        tracing::info!(network = %self.cfg.network, %subnet, %gateway, "Podman network ready");
        Ok(())
    }

    /// One pass of desired against actual.
    async fn sync(&mut self, subnet: Ipv4Net) -> anyhow::Result<()> {
        let list = match self.list_owned().await {
            Ok(l) => l,
            Err(e) if self.desired.is_empty() => {
                // Nothing to run and no Podman: nothing to do either.
                tracing::debug!(error = %e, "Podman unreachable, no containers wanted");
                return Ok(());
            }
            Err(e) => {
                self.podman_unreachable(&e);
                return Err(e).context("listing containers");
            }
        };
        self.podman_error_logged = false;
        // Errors are this pass's: set again below for what still fails.
        for r in self.replicas.values_mut() {
            r.error = None;
        }
        // Made even with nothing to run: operators (and `berth lab run`) may
        // attach their own containers to it.
        self.ensure_network(subnet).await?;
        let net = self.net.clone().context("network not ready")?;

        // Replicas that cannot run as wanted, with why.
        let mut failed = vec![];
        // Wanted replica → (spec hash, spec). A replica whose secrets cannot
        // be opened keeps whatever container it has.
        let mut specs = BTreeMap::new();
        let mut hashes = BTreeMap::new();
        for c in &self.desired {
            match self.open_secrets(c) {
                Ok(secrets) => {
                    let spec = container_spec(c, &secrets, &net);
                    hashes.insert(c.replica.clone(), spec.labels[LABEL_SPEC].clone());
                    specs.insert(c.replica.clone(), spec);
                }
                Err(e) => {
                    tracing::warn!(replica = %c.replica, error = %e, "cannot open the replica's secrets");
                    let existing = list.iter().find(|s| s.labels.get(LABEL_REPLICA) == Some(&c.replica));
                    if let Some(s) = existing {
                        hashes.insert(c.replica.clone(), s.labels.get(LABEL_SPEC).cloned().unwrap_or_default());
                    }
                    failed.push(format!("{}: {e}", c.replica));
                    if let Some(r) = self.replicas.get_mut(&c.replica) {
                        r.error = Some(e);
                    }
                }
            }
        }
        let actual: Vec<Actual> = list
            .iter()
            .map(|s| Actual {
                id: s.id.clone(),
                replica: s.labels.get(LABEL_REPLICA).cloned().unwrap_or_default(),
                spec_hash: s.labels.get(LABEL_SPEC).cloned().unwrap_or_default(),
                running: s.state.is_running(),
            })
            .collect();
        let actions = diff::diff(&hashes, &actual);

        // Images first, once each: several replicas may share one.
        let mut image_errors: BTreeMap<String, String> = BTreeMap::new();
        let images: BTreeSet<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Create(r) | Action::Replace { replica: r, .. } => specs.get(r).map(|s| s.image.as_str()),
                _ => None,
            })
            .collect();
        for image in images {
            if let Err(e) = self.ensure_image(image).await {
                image_errors.insert(image.to_string(), format!("{e:#}"));
            }
        }

        let mut tasks: JoinSet<(String, Result<Option<String>, String>)> = JoinSet::new();
        for action in actions {
            let podman = self.podman.clone();
            match action {
                Action::Remove { id } => self.remove_in_background(id),
                Action::Start { id, replica } => {
                    tracing::info!(%replica, "starting a stopped container");
                    if let Some(r) = self.replicas.get_mut(&replica) {
                        // Counted here; started_at 0 keeps observe from counting it again.
                        r.restarts += 1;
                        r.started_at = 0;
                    }
                    tasks.spawn(async move {
                        let res = podman.start(&id).await.map(|()| Some(id)).map_err(|e| e.to_string());
                        (replica, res)
                    });
                }
                Action::Create(replica) | Action::Replace { replica, .. } => {
                    let Some(spec) = specs.get(&replica).cloned() else {
                        continue;
                    };
                    if let Some(e) = image_errors.get(&spec.image) {
                        let e = e.clone();
                        tasks.spawn(async move { (replica, Err(e)) });
                        continue;
                    }
                    let old = actual.iter().find(|a| a.replica == replica).map(|a| a.id.clone());
                    if old.is_some() {
                        tracing::info!(%replica, "replacing a container whose spec changed");
                    } else if let Some(r) = self.replicas.get_mut(&replica).filter(|r| r.container_id.is_some()) {
                        tracing::info!(%replica, "recreating a container that vanished");
                        r.restarts += 1;
                        r.started_at = 0;
                    } else {
                        tracing::info!(%replica, image = %spec.image, ip = ?spec.static_ip, "creating a container");
                    }
                    for v in &spec.volumes {
                        if let Err(e) = std::fs::create_dir_all(&v.host_path) {
                            tracing::warn!(path = %v.host_path.display(), error = %e, "creating a volume directory");
                        }
                    }
                    tasks.spawn(async move {
                        let res = async {
                            if let Some(id) = old {
                                stop_and_remove(&podman, &id).await?;
                            }
                            let id = podman.create(&spec).await?;
                            podman.start(&id).await?;
                            Ok::<_, crate::podman::Error>(Some(id))
                        }
                        .await
                        .map_err(|e| e.to_string());
                        (replica, res)
                    });
                }
            }
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok((replica, res)) = joined else { continue };
            let Some(r) = self.replicas.get_mut(&replica) else {
                continue;
            };
            match res {
                Ok(id) => {
                    r.error = None;
                    if id != r.container_id {
                        r.health = Tracker::default();
                    }
                }
                Err(e) => {
                    tracing::warn!(%replica, error = %e, "container action failed");
                    failed.push(format!("{replica}: {e}"));
                    r.error = Some(e);
                }
            }
        }
        match self.list_owned().await {
            Ok(list) => self.observe(&list),
            Err(e) => self.podman_unreachable(&e),
        }
        if failed.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", failed.join("; "))
        }
    }

    fn open_secrets(&self, c: &ContainerDesired) -> Result<BTreeMap<String, String>, String> {
        let Some(sealed) = &c.sealed_secrets else {
            return Ok(BTreeMap::new());
        };
        let plain = berth_protocol::seal::open(&self.sealing, sealed)
            .map_err(|e| format!("secrets: cannot be opened with this node's key: {e}"))?;
        serde_json::from_slice(&plain).map_err(|e| format!("secrets: not a JSON map: {e}"))
    }

    async fn ensure_image(&self, image: &str) -> anyhow::Result<()> {
        if self.podman.image_exists(image).await? {
            return Ok(());
        }
        tracing::info!(%image, "pulling");
        self.podman.pull(image, true).await?;
        Ok(())
    }

    /// Stops and removes a container without holding up the reconciler
    /// (a stop may take [`STOP_TIMEOUT`]); it is hidden from the diff meanwhile.
    fn remove_in_background(&self, id: String) {
        let removing = self.removing.clone();
        {
            let mut set = removing.lock().unwrap_or_else(|e| e.into_inner());
            if !set.insert(id.clone()) {
                return;
            }
        }
        tracing::info!(container = %id, "removing a container no longer wanted");
        let podman = self.podman.clone();
        tokio::spawn(async move {
            if let Err(e) = stop_and_remove(&podman, &id).await {
                tracing::warn!(container = %id, error = %e, "removing a container failed");
            }
            removing.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        });
    }

    /// Runs every health check that is due, concurrently.
    async fn run_health_checks(&mut self) {
        let now = Instant::now();
        let mut tasks: JoinSet<(String, Outcome)> = JoinSet::new();
        for (name, r) in self.replicas.iter_mut() {
            if !r.running {
                r.health.healthy = false;
                continue;
            }
            if !r.health.due(now) {
                continue;
            }
            let name = name.clone();
            match (r.check.clone().unwrap_or(Check::None), r.container_id.clone()) {
                (Check::None, _) => {
                    r.health.record(Outcome::Pass, now);
                }
                (Check::Http { ip, port, path }, _) => {
                    tasks.spawn(async move { (name, health::http_check(ip, port, &path).await) });
                }
                (Check::Command, Some(id)) => {
                    let podman = self.podman.clone();
                    tasks.spawn(async move {
                        let healthy = matches!(
                            podman.healthcheck(&id).await,
                            Ok(run) if run.status == HealthStatus::Healthy
                        );
                        (name, Outcome::Verdict { healthy })
                    });
                }
                (Check::Command, None) => {}
            }
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok((name, outcome)) = joined else { continue };
            if let Some(r) = self.replicas.get_mut(&name) {
                if r.health.record(outcome, Instant::now()) {
                    tracing::info!(replica = %name, healthy = r.health.healthy, "health changed");
                }
            }
        }
    }
}

async fn stop_and_remove(podman: &Podman, id: &str) -> Result<(), crate::podman::Error> {
    match podman.stop(id, STOP_TIMEOUT).await {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => tracing::debug!(container = %id, error = %e, "stop failed; removing by force"),
    }
    match podman.remove(id, true).await {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}
