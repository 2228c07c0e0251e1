//! The container reconciler: runs this node's replicas on Podman.
//!
//! It owns the containers labelled `io.berth.owner=berth` and nothing else.
//! [`Runtime::apply`] takes a new list of replicas; [`Runtime::tick`] (every
//! second) restarts what stopped, recreates what vanished, runs the health
//! checks that are due and autoheals replicas that stopped passing theirs
//! ([`autoheal`]). Both are idempotent: with Podman in the wanted state
//! they change nothing. Containers are adopted by label after an agent
//! restart, so a restart never recreates or restarts a healthy replica.
//!
//! A replica that is not healthy is reported with why: its exit code, what
//! its health check said and the last lines of its log (fetched only while
//! it is in trouble, at most every [`LOG_TAIL_EVERY`]).

pub mod autoheal;
pub mod bridge;
pub mod create_spec;
pub mod diff;
pub mod health;

use crate::podman::{ContainerDetails, ContainerState, ContainerSummary, HealthStatus, NetworkSpec, Podman};
use anyhow::Context;
use berth_protocol::service::{ContainerDesired, ContainerStatus};
use create_spec::{container_spec, NodeNet, OWNER, STOP_TIMEOUT};
use diff::{Action, Actual, LABEL_OWNER, LABEL_REPLICA, LABEL_SPEC};
use health::{Check, Outcome, Tracker};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use x25519_dalek::StaticSecret;

/// Log lines reported for a replica in trouble, and the bytes kept of each.
pub const LOG_TAIL_LINES: usize = 20;
pub const LOG_LINE_MAX: usize = 300;
/// A replica's log tail is read again at most this often.
pub const LOG_TAIL_EVERY: Duration = Duration::from_secs(5);
/// Bytes kept of a health check's output.
pub const HEALTH_OUTPUT_MAX: usize = 300;

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
    /// When and how replicas that stop passing their health check are
    /// restarted and recreated (`--autoheal-after`).
    pub autoheal: autoheal::Policy,
}

/// What the agent knows about one wanted replica.
#[derive(Debug, Clone, Default)]
struct Replica {
    container_id: Option<String>,
    image_id: Option<String>,
    state: String,
    running: bool,
    check: Option<Check>,
    health: Tracker,
    /// Restarts seen: a new start of the same container (restart policy or
    /// the agent), or a vanished container made anew.
    restarts: u32,
    started_at: i64,
    error: Option<String>,
    /// Seconds its container is given between the stop signal and SIGKILL
    /// (set by every apply).
    stop_timeout: Option<u32>,
    /// Exit code of the container's last exit, since it was created.
    exit_code: Option<i32>,
    /// What the last failing health check said.
    health_output: Option<String>,
    log_tail: Vec<String>,
    log_tail_at: Option<Instant>,
    /// Podman's restart count of the current container when last inspected
    /// (restarts by its restart policy), and the restarts `observe` counted
    /// since: a crash loop restarts faster than the agent looks.
    podman_restarts: Option<(String, u32)>,
    counted_since_inspect: u32,
    autoheal: autoheal::State,
    /// Why autoheal gave up, fixed when it did (so reports do not change
    /// with every tick).
    gave_up_reason: Option<String>,
}

/// What `look_into_trouble` read about one replica's container.
struct Look {
    replica: String,
    id: String,
    details: Option<ContainerDetails>,
    tail: Option<Vec<String>>,
}

/// The work of an autoheal attempt: the new container when it made one.
type HealJob = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<String>, String>> + Send>>;

/// An autoheal attempt running in the background.
#[derive(Debug)]
struct Heal {
    decision: autoheal::Decision,
    /// Set by the task when it is over: the new container, or why it failed.
    result: Option<Result<Option<String>, String>>,
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
    /// Replicas being restarted or recreated by autoheal: left out of the
    /// diff, drift repair and health checks until the attempt is over.
    heals: Arc<Mutex<BTreeMap<String, Heal>>>,
    podman_error_logged: bool,
    /// The bridge's MAC was found pinned (see `bridge`) since it last
    /// may have been made anew.
    bridge_pinned: bool,
    /// The fleet registry and this node's credentials (desired state).
    registry: Option<berth_protocol::api::RegistryAccess>,
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
            heals: Arc::default(),
            podman_error_logged: false,
            bridge_pinned: false,
            registry: None,
        }
    }

    /// The fleet registry's host and this node's credentials for it.
    pub fn set_registry(&mut self, access: Option<berth_protocol::api::RegistryAccess>) {
        self.registry = access;
    }

    /// Makes Podman run exactly `desired` on this node's `subnet`.
    pub async fn apply(&mut self, subnet: Ipv4Net, desired: &[ContainerDesired]) -> anyhow::Result<()> {
        self.subnet = Some(subnet);
        self.desired = desired.to_vec();
        self.replicas
            .retain(|name, _| desired.iter().any(|c| &c.replica == name));
        for c in desired {
            let r = self.replicas.entry(c.replica.clone()).or_default();
            r.stop_timeout = Some(create_spec::stop_timeout(c));
            let check = Check::for_replica(c);
            if r.check.as_ref() != Some(&check) {
                r.check = Some(check);
                r.health = Tracker::default();
                r.health_output = None;
            }
        }
        self.sync(subnet).await
    }

    /// The replicas' states, for the status report. Why a replica is not
    /// healthy (health output, log tail) is sent only while it is not.
    pub fn statuses(&self) -> Vec<ContainerStatus> {
        self.replicas
            .iter()
            .map(|(name, r)| {
                let healthy = r.health.healthy && r.running;
                let gave_up = r.autoheal.gave_up();
                ContainerStatus {
                    replica: name.clone(),
                    cpu_millicores: None,
                    memory_bytes: None,
                    container_id: r.container_id.clone(),
                    image_id: r.image_id.clone(),
                    state: if r.state.is_empty() {
                        "pending".into()
                    } else {
                        r.state.clone()
                    },
                    healthy,
                    restarts: r.restarts,
                    error: r
                        .error
                        .clone()
                        .or_else(|| gave_up.then(|| r.gave_up_reason.clone()).flatten()),
                    exit_code: r.exit_code,
                    health_output: if healthy { None } else { r.health_output.clone() },
                    log_tail: if healthy { vec![] } else { r.log_tail.clone() },
                    recreates: r.autoheal.total_recreates,
                    gave_up,
                }
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

    /// Repairs what drifted, runs due health checks, looks into replicas in
    /// trouble and starts autoheal attempts (in the background). Returns
    /// whether any replica's status changed (time to report and update DNS).
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
        // An autoheal attempt that is over: a full pass, for what the diff
        // left alone meanwhile (a spec change, a replica no longer wanted).
        let healed = self.finish_heals();
        if self.desired.is_empty() {
            if healed {
                if let Err(e) = self.sync(subnet).await {
                    tracing::warn!(error = %format!("{e:#}"), "repairing containers failed");
                }
            }
            return false;
        }
        let before = self.statuses();
        match self.list_owned().await {
            Ok(list) => {
                let healing = self.healing();
                // Back after Podman was unreachable: a full pass, which also
                // clears the replicas' "unreachable" errors.
                let drifted = healed
                    || self.podman_error_logged
                    || self.desired.iter().filter(|c| !healing.contains(&c.replica)).any(|c| {
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
        if !self.bridge_pinned && self.replicas.values().any(|r| r.running) {
            self.pin_bridge_mac().await;
        }
        self.run_health_checks().await;
        self.look_into_trouble().await;
        self.autoheal();
        before != self.statuses()
    }

    /// How soon [`Runtime::tick`] should run again: often while a new
    /// replica waits for its first passing check (a rollout waits on it),
    /// else once a second.
    pub fn tick_interval(&self) -> Duration {
        let now = Instant::now();
        if self
            .replicas
            .values()
            .any(|r| r.container_id.is_some() && r.health.awaiting_first_pass(now))
        {
            health::FIRST_PASS_INTERVAL
        } else {
            Duration::from_secs(1)
        }
    }

    /// Replicas autoheal is working on.
    fn healing(&self) -> BTreeSet<String> {
        self.heals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
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
        let healing = self.healing();
        for (name, r) in self.replicas.iter_mut() {
            if healing.contains(name) {
                continue;
            }
            match list.iter().find(|s| s.labels.get(LABEL_REPLICA) == Some(name)) {
                Some(s) => {
                    let same = r.container_id.as_deref() == Some(s.id.as_str());
                    if same && r.started_at != 0 && s.started_at != r.started_at {
                        r.restarts += 1;
                        r.counted_since_inspect += 1;
                    }
                    if !same {
                        // A new container: what was known of the old one's
                        // trouble is not its own.
                        r.exit_code = None;
                        r.health_output = None;
                        r.log_tail.clear();
                        r.log_tail_at = None;
                        r.podman_restarts = None;
                        r.counted_since_inspect = 0;
                    }
                    if exited(&s.state) {
                        r.exit_code = i32::try_from(s.exit_code).ok();
                    }
                    r.started_at = s.started_at;
                    r.container_id = Some(s.id.clone());
                    r.image_id = (!s.image_id.is_empty()).then(|| s.image_id.clone());
                    r.state = s.state.to_string();
                    r.running = s.state.is_running();
                }
                None => {
                    r.container_id = None;
                    r.image_id = None;
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

    async fn pin_bridge_mac(&mut self) {
        let Some(gateway) = self.net.as_ref().map(|n| n.gateway) else {
            return;
        };
        match bridge::pin_mac(&self.cfg.bridge, gateway).await {
            Ok(pinned) => self.bridge_pinned = pinned,
            Err(e) => {
                tracing::warn!(bridge = %self.cfg.bridge, error = %format!("{e:#}"), "cannot pin the bridge's MAC address");
                self.bridge_pinned = false;
            }
        }
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
        // Replicas autoheal is working on are left to it.
        let healing = self.healing();
        let list: Vec<ContainerSummary> = list
            .into_iter()
            .filter(|s| s.labels.get(LABEL_REPLICA).is_none_or(|r| !healing.contains(r)))
            .collect();
        // Errors are this pass's: set again below for what still fails.
        for r in self.replicas.values_mut() {
            r.error = None;
        }
        // Made even with nothing to run: operators (and `berth lab run`) may
        // attach their own containers to it.
        self.ensure_network(subnet).await?;
        let net = self.net.clone().context("network not ready")?;
        // Before anything is removed: a removed port may be where the
        // bridge's address came from.
        self.pin_bridge_mac().await;

        // Replicas that cannot run as wanted, with why.
        let mut failed = vec![];
        // Wanted replica → (spec hash, spec). A replica whose secrets cannot
        // be opened keeps whatever container it has.
        let mut specs = BTreeMap::new();
        let mut hashes = BTreeMap::new();
        for c in self.desired.iter().filter(|c| !healing.contains(&c.replica)) {
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
                Action::Remove { id } => {
                    // A duplicate of a wanted replica gets that replica's
                    // timeout; a container no longer wanted its own.
                    let timeout = list
                        .iter()
                        .find(|s| s.id == id)
                        .and_then(|s| s.labels.get(LABEL_REPLICA))
                        .and_then(|r| self.replicas.get(r))
                        .and_then(|r| r.stop_timeout);
                    self.remove_in_background(id, timeout)
                }
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
                    let stop_timeout = self.replicas.get(&replica).and_then(|r| r.stop_timeout);
                    if old.is_some() {
                        tracing::info!(%replica, "replacing a container whose spec changed");
                        if let Some(r) = self.replicas.get_mut(&replica) {
                            // A new container of another spec: autoheal
                            // waits for it to be healthy once.
                            r.autoheal.reset();
                            r.gave_up_reason = None;
                        }
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
                                stop_and_remove(&podman, &id, stop_timeout).await?;
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
        // A first container made the bridge anew, with a random address.
        self.pin_bridge_mac().await;
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
        open_secrets(&self.sealing, c)
    }

    async fn ensure_image(&self, image: &str) -> anyhow::Result<()> {
        if self.podman.image_exists(image).await? {
            return Ok(());
        }
        let auth = crate::registry::credentials_for(self.registry.as_ref(), image).map(crate::registry::auth_header);
        tracing::info!(%image, with_credentials = auth.is_some(), "pulling");
        self.podman.pull(image, true, auth).await?;
        Ok(())
    }

    /// Stops and removes a container without holding up the reconciler
    /// (a stop may take its stop timeout); it is hidden from the diff
    /// meanwhile. `timeout`: see [`stop_and_remove`].
    fn remove_in_background(&self, id: String, timeout: Option<u32>) {
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
            if let Err(e) = stop_and_remove(&podman, &id, timeout).await {
                tracing::warn!(container = %id, error = %e, "removing a container failed");
            }
            removing.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        });
    }

    /// Runs every health check that is due, concurrently.
    async fn run_health_checks(&mut self) {
        let now = Instant::now();
        let healing = self.healing();
        // Replica → outcome, and what a failing check said (`None`: keep
        // what is known, e.g. Podman's output read by `look_into_trouble`).
        let mut tasks: JoinSet<(String, Outcome, Option<String>)> = JoinSet::new();
        for (name, r) in self.replicas.iter_mut() {
            if healing.contains(name) {
                continue;
            }
            if !r.running {
                r.health.healthy = false;
                continue;
            }
            if !r.health.due(now) {
                continue;
            }
            let name = name.clone();
            let verdict = |res: Result<(), String>| match res {
                Ok(()) => (Outcome::Pass, None),
                Err(e) => (Outcome::Fail, Some(e)),
            };
            match (r.check.clone().unwrap_or(Check::None), r.container_id.clone()) {
                (Check::None, _) => {
                    r.health.record(Outcome::Pass, now);
                }
                (Check::Http { ip, port, path }, _) => {
                    tasks.spawn(async move {
                        let (o, out) = verdict(health::http_check(ip, port, &path).await);
                        (name, o, out)
                    });
                }
                (Check::Tcp { ip, port }, _) => {
                    tasks.spawn(async move {
                        let (o, out) = verdict(health::tcp_check(ip, port).await);
                        (name, o, out)
                    });
                }
                (Check::Command, Some(id)) => {
                    let podman = self.podman.clone();
                    tasks.spawn(async move {
                        let (healthy, output) = match podman.healthcheck(&id).await {
                            Ok(run) => (run.status == HealthStatus::Healthy, run.output),
                            Err(e) => (false, Some(e.to_string())),
                        };
                        (name, Outcome::Verdict { healthy }, output.filter(|_| !healthy))
                    });
                }
                (Check::Command, None) => {}
            }
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok((name, outcome, output)) = joined else { continue };
            if let Some(r) = self.replicas.get_mut(&name) {
                if r.health.record(outcome, Instant::now()) {
                    tracing::info!(replica = %name, healthy = r.health.healthy, "health changed");
                }
                if r.health.healthy {
                    r.health_output = None;
                } else if let Some(out) = output.filter(|o| !o.is_empty()) {
                    r.health_output = Some(crate::podman::logs::truncate(out, HEALTH_OUTPUT_MAX));
                }
            }
        }
    }

    /// For replicas that are not healthy: their exit code, restarts Podman
    /// made on its own, Podman's health check output, and (while they fail,
    /// exited or restart) their log tail. Healthy replicas cost nothing here.
    async fn look_into_trouble(&mut self) {
        let now = Instant::now();
        let healing = self.healing();
        let mut tasks: JoinSet<Look> = JoinSet::new();
        for (name, r) in self.replicas.iter_mut() {
            if r.running && r.health.healthy {
                r.log_tail.clear();
                r.log_tail_at = None;
                continue;
            }
            let Some(id) = r.container_id.clone() else { continue };
            if healing.contains(name) {
                continue;
            }
            let in_trouble = r.health.failing() || !r.running || r.exit_code.is_some();
            let tail_due = in_trouble && r.log_tail_at.is_none_or(|t| now.duration_since(t) >= LOG_TAIL_EVERY);
            if tail_due {
                r.log_tail_at = Some(now);
            }
            let podman = self.podman.clone();
            let name = name.clone();
            tasks.spawn(async move {
                let details = podman.inspect(&id).await.ok();
                let tail = if tail_due {
                    match podman.logs_tail(&id, LOG_TAIL_LINES, LOG_LINE_MAX).await {
                        Ok(t) => Some(t),
                        Err(e) => {
                            tracing::debug!(replica = %name, error = %e, "reading the log tail failed");
                            None
                        }
                    }
                } else {
                    None
                };
                Look {
                    replica: name,
                    id,
                    details,
                    tail,
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok(Look {
                replica: name,
                id,
                details,
                tail,
            }) = joined
            else {
                continue;
            };
            let Some(r) = self.replicas.get_mut(&name) else {
                continue;
            };
            // Meanwhile replaced: what was read is the old container's.
            if r.container_id.as_deref() != Some(id.as_str()) {
                continue;
            }
            if let Some(tail) = tail {
                r.log_tail = tail;
            }
            let Some(d) = details else { continue };
            if exited(&d.state) {
                r.exit_code = i32::try_from(d.exit_code).ok();
            }
            // Restarts by the restart policy that `observe` did not see.
            if let Some((id, seen)) = &r.podman_restarts {
                if *id == d.id {
                    let extra = d
                        .restart_count
                        .saturating_sub(*seen)
                        .saturating_sub(r.counted_since_inspect);
                    r.restarts += extra;
                }
            }
            r.podman_restarts = Some((d.id.clone(), d.restart_count));
            r.counted_since_inspect = 0;
            if r.check == Some(Check::Command) && r.health.failing() {
                if let Some(out) = d.health.and_then(|h| h.last_output).filter(|o| !o.is_empty()) {
                    r.health_output = Some(crate::podman::logs::truncate(out, HEALTH_OUTPUT_MAX));
                }
            }
        }
    }

    /// Takes in the autoheal attempts that are over; returns whether there
    /// were any.
    fn finish_heals(&mut self) -> bool {
        let done: Vec<(String, Heal)> = {
            let mut heals = self.heals.lock().unwrap_or_else(|e| e.into_inner());
            let names: Vec<String> = heals
                .iter()
                .filter(|(_, h)| h.result.is_some())
                .map(|(n, _)| n.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|n| heals.remove(&n).map(|h| (n, h)))
                .collect()
        };
        let now = Instant::now();
        let any = !done.is_empty();
        for (name, heal) in done {
            let Some(r) = self.replicas.get_mut(&name) else {
                continue;
            };
            r.autoheal.done(&self.cfg.autoheal, now);
            r.health = Tracker::default();
            match heal.result {
                Some(Ok(_)) => {
                    tracing::info!(replica = %name, action = ?heal.decision, "autoheal attempt done");
                    r.error = None;
                }
                Some(Err(e)) => {
                    tracing::warn!(replica = %name, action = ?heal.decision, error = %e, "autoheal attempt failed");
                    r.error = Some(format!("autoheal: {e}"));
                }
                None => {}
            }
        }
        any
    }

    /// Feeds autoheal and starts the attempts it decides on, in the
    /// background (a restart waits for the stop timeout).
    fn autoheal(&mut self) {
        let policy = self.cfg.autoheal;
        // Without Podman nothing can be done, nor is what it reported current.
        if !policy.enabled() || self.podman_error_logged {
            return;
        }
        let now = Instant::now();
        let healing = self.healing();
        for (name, r) in self.replicas.iter_mut() {
            if healing.contains(name) {
                continue;
            }
            let Some(id) = r.container_id.clone() else { continue };
            let healthy = r.running && r.health.healthy;
            let failing_for = r.autoheal.failing_for(now);
            let Some(decision) = r.autoheal.observe(&policy, healthy, now) else {
                continue;
            };
            let (restarts, recreates) = r.autoheal.attempts();
            let failing_for = failing_for.unwrap_or_default().as_secs();
            if decision == autoheal::Decision::GiveUp {
                let why = r
                    .health_output
                    .as_deref()
                    .map(|o| format!("; last check: {o}"))
                    .unwrap_or_default();
                let reason = format!(
                    "autoheal gave up: unhealthy for {failing_for} s after {restarts} restarts and {recreates} recreates{why}"
                );
                tracing::warn!(replica = %name, %reason, "autoheal gave up; the replica is left as it is");
                r.gave_up_reason = Some(reason);
                continue;
            }
            let podman = self.podman.clone();
            let timeout = r.stop_timeout.unwrap_or(STOP_TIMEOUT);
            let job: HealJob = match decision {
                autoheal::Decision::Restart => {
                    tracing::warn!(
                        replica = %name, failing_for, attempt = restarts,
                        "autoheal: restarting an unhealthy replica"
                    );
                    r.state = "restarting".into();
                    Box::pin(async move {
                        podman
                            .restart(&id, timeout)
                            .await
                            .map(|()| None)
                            .map_err(|e| e.to_string())
                    })
                }
                autoheal::Decision::Recreate | autoheal::Decision::GiveUp => {
                    tracing::warn!(
                        replica = %name, failing_for, attempt = recreates,
                        "autoheal: recreating an unhealthy replica"
                    );
                    r.state = "recreating".into();
                    let spec = self
                        .desired
                        .iter()
                        .find(|c| c.replica == *name)
                        .ok_or_else(|| "no longer wanted".to_string())
                        .and_then(|c| {
                            let secrets = open_secrets(&self.sealing, c)?;
                            let net = self.net.as_ref().ok_or("network not ready")?;
                            Ok(container_spec(c, &secrets, net))
                        });
                    Box::pin(async move {
                        let spec = spec?;
                        stop_and_remove(&podman, &id, Some(timeout))
                            .await
                            .map_err(|e| e.to_string())?;
                        let new = podman.create(&spec).await.map_err(|e| e.to_string())?;
                        podman.start(&new).await.map_err(|e| e.to_string())?;
                        Ok(Some(new))
                    })
                }
            };
            r.health = Tracker::default();
            r.running = false;
            self.heals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), Heal { decision, result: None });
            let heals = self.heals.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let res = job.await;
                if let Some(h) = heals.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&name) {
                    h.result = Some(res);
                }
            });
        }
    }
}

/// The container ran and is no longer running (as opposed to not started yet).
fn exited(state: &ContainerState) -> bool {
    matches!(state, ContainerState::Exited | ContainerState::Stopped)
}

/// Stops a container (its stop signal, then SIGKILL after the timeout) and
/// removes it. `timeout`: the wanted replica's, when it is one; otherwise
/// the container's own (as created), else [`STOP_TIMEOUT`].
async fn stop_and_remove(podman: &Podman, id: &str, timeout: Option<u32>) -> Result<(), crate::podman::Error> {
    let timeout = match timeout {
        Some(t) => t,
        None => match podman.inspect(id).await {
            Ok(d) => d.stop_timeout.unwrap_or(STOP_TIMEOUT),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(_) => STOP_TIMEOUT,
        },
    };
    match podman.stop(id, timeout).await {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => tracing::debug!(container = %id, error = %e, "stop failed; removing by force"),
    }
    match podman.remove(id, true).await {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}

fn open_secrets(sealing: &StaticSecret, c: &ContainerDesired) -> Result<BTreeMap<String, String>, String> {
    open_secret_map(sealing, c.sealed_secrets.as_deref()).map_err(|e| format!("secrets: {e}"))
}

/// A service's secrets (a JSON map) sealed to this node; none when absent.
/// Also the builder's, for build secrets.
pub(crate) fn open_secret_map(
    sealing: &StaticSecret,
    sealed: Option<&str>,
) -> Result<BTreeMap<String, String>, String> {
    let Some(sealed) = sealed else {
        return Ok(BTreeMap::new());
    };
    let plain = berth_protocol::seal::open(sealing, sealed)
        .map_err(|e| format!("cannot be opened with this node's key: {e}"))?;
    serde_json::from_slice(&plain).map_err(|e| format!("not a JSON map: {e}"))
}
