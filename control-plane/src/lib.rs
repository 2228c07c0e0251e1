//! Berth control plane: the HTTPS API ([`api`], grouped by who may call it),
//! the store ([`store`], SQLite or PostgreSQL) and what each node is told to
//! run ([`desired`]). Start at [`start`], then [`api::router`].

pub mod acme;
pub mod alloc;
pub mod api;
pub mod auth;
pub mod builds;
pub mod dashboard;
pub mod desired;
pub mod error;
pub mod events;
pub mod heartbeats;
pub mod metrics;
pub mod node_sessions;
pub mod placement;
pub mod registry;
pub mod replay;
pub mod rollout;
pub mod server;
pub mod sessions;
pub mod state;
pub mod store;
pub mod streams;
pub mod tls;

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;

pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub database: String,
    pub listen: SocketAddr,
    pub sans: Vec<String>,
    pub own_cert: Option<tls::OwnCert>,
    pub advertise_url: Option<String>,
    pub pools: store::nodes::Pools,
    pub offline_after_secs: i64,
    /// Order certificates for domains with ACME; None: never order.
    pub acme: Option<acme::AcmeConfig>,
    /// Signed agent builds served to nodes (default: DATA_DIR/releases).
    pub releases_dir: Option<PathBuf>,
    /// Run the fleet registry; None: no registry.
    pub registry: Option<registry::RegistryConfig>,
    pub builds: builds::BuildsConfig,
    /// Limits on `berth logs` and `berth exec` streams.
    pub streams: streams::StreamLimits,
    /// The event stream's retention and webhook.
    pub events: events::EventsConfig,
    /// A token `GET /metrics` takes besides the admin token.
    pub metrics_token: Option<String>,
    /// Dashboard sessions (`--session-ttl`).
    pub sessions: sessions::SessionConfig,
}

/// A started control plane: its state and the address it listens on.
pub struct Started {
    pub state: state::SharedState,
    pub addr: SocketAddr,
    pub admin_token_file: PathBuf,
    pub ca_file: PathBuf,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Opens the store, prepares TLS and the admin credential, and starts serving.
pub async fn start(cfg: ServeConfig) -> anyhow::Result<Started> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("--data-dir {}", cfg.data_dir.display()))?;
    let cap = alloc::capacity(cfg.pools.mesh, cfg.pools.subnets, cfg.pools.subnet_prefix);
    if cap == 0 {
        anyhow::bail!(
            "--subnet-prefix: /{} does not fit in --subnet-pool {}",
            cfg.pools.subnet_prefix,
            cfg.pools.subnets
        );
    }
    if let Some(a) = &cfg.acme {
        a.validate()?;
    }
    let store = store::Store::connect(&cfg.database).await?;
    let tls = match &cfg.own_cert {
        Some(own) => tls::own(own)?,
        None => tls::generated(&cfg.data_dir, &cfg.sans)?,
    };
    let ca_file = cfg.data_dir.join("ca.pem");
    if cfg.own_cert.is_some() {
        std::fs::write(&ca_file, &tls.ca_pem)?;
    }
    let admin_token_file = cfg.data_dir.join("admin.token");
    let admin_hash = admin_credential(&store, &admin_token_file).await?;
    let secrets_key = secrets_key(&cfg.data_dir.join("secrets.key"))?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("--listen {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let advertise_url = cfg.advertise_url.clone().unwrap_or_else(|| {
        let host = cfg.sans.first().cloned().unwrap_or_else(|| addr.ip().to_string());
        format!("https://{host}:{}", addr.port())
    });
    let registry = match &cfg.registry {
        Some(r) => Some(start_registry(r, &cfg, &store, &tls, &advertise_url).await?),
        None => None,
    };
    let state = state::AppState::new(
        store.clone(),
        state::StateParts {
            pools: cfg.pools,
            ca_hash: tls.ca_hash.clone(),
            ca_pem: tls.ca_pem.clone(),
            admin_token_hash: admin_hash,
            secrets_key,
            advertise_url,
            offline_after_secs: cfg.offline_after_secs,
            releases_dir: cfg
                .releases_dir
                .clone()
                .unwrap_or_else(|| cfg.data_dir.join("releases")),
            registry,
            builds: builds::Builds::new(&cfg.data_dir, cfg.builds.clone())?,
            streams: streams::Streams::new(cfg.streams.clone()),
            metrics_token_hash: cfg.metrics_token.as_deref().map(auth::hash_admin_token),
            sessions: cfg.sessions.clone(),
        },
    )
    .await?;
    if store.database == store::Database::Postgres {
        tokio::spawn(state::follow_other_replicas(state.clone(), cfg.database.clone()));
    }
    tokio::spawn(prune_nonces(store.clone()));
    tokio::spawn(replay::write_behind(state.clone()));
    tokio::spawn(heartbeats::write_behind(state.clone()));
    // Made now, so the first failed sign-in takes no longer than the others.
    let warm = state.clone();
    tokio::spawn(async move {
        warm.sessions.dummy_hash().await;
    });
    events::spawn(state.clone(), cfg.events.clone());
    tokio::spawn(rollout::drive(state.clone()));
    tokio::spawn(api::builds::sweep(state.clone()));
    if let Some(every) = state.registry.as_ref().and_then(|r| r.prune_every) {
        tokio::spawn(prune_registry(state.clone(), every));
    }
    if let Some(a) = cfg.acme.clone() {
        tracing::info!(directory = %a.directory, challenge = a.challenge.as_str(), "ACME enabled");
        acme::spawn(state.clone(), a);
    }
    let app = api::router(state.clone());
    let task = tokio::spawn(server::serve_tls(listener, tls.server_config.clone(), app));
    tracing::info!(%addr, nodes_capacity = cap, ca_hash = %tls.ca_hash, "control plane listening");
    Ok(Started {
        state,
        addr,
        admin_token_file,
        ca_file,
        task,
    })
}

/// Starts the fleet registry with the server's own certificate; its token
/// endpoint is this control plane's `/v1/registry/token`. The secret node
/// passwords derive from is kept in the store, so every replica agrees.
async fn start_registry(
    r: &registry::RegistryConfig,
    cfg: &ServeConfig,
    store: &store::Store,
    tls: &tls::Tls,
    advertise_url: &str,
) -> anyhow::Result<registry::Registry> {
    let made = hex::encode(rand::random::<[u8; 32]>());
    let secret = store.setting_insert_if_absent("registry_secret", &made).await?;
    let secret: [u8; 32] = hex::decode(secret.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("the stored registry_secret is not 32 bytes of hex")?;
    let host = advertise_url
        .split_once("://")
        .map_or(advertise_url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    // Without the port: an IPv6 literal keeps its brackets.
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let registry = registry::start(
        r,
        registry::Setup {
            data_dir: &cfg.data_dir,
            chain_pem: &tls.chain_pem,
            key_pem: &tls.key_pem,
            advertise_host: host,
            realm: format!("{}/v1/registry/token", advertise_url.trim_end_matches('/')),
            ca_pem: &tls.ca_pem,
            secret,
        },
    )?;
    // Serve the API once the registry listens: a deploy right after a
    // restart resolves its tags there (and got "connection refused" before).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while tokio::net::TcpStream::connect(r.listen).await.is_err() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(listen = %r.listen, "the fleet registry does not listen yet; serving without it");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(registry)
}

/// The admin bearer token: made on first start and written 0600 to
/// `admin.token`; only its hash is kept in the store, so replicas sharing
/// a PostgreSQL store accept the same token.
async fn admin_credential(store: &store::Store, file: &std::path::Path) -> anyhow::Result<String> {
    if let Some(hash) = store.setting("admin_token_sha256").await? {
        if !file.exists() {
            tracing::warn!(path = %file.display(), "the store has an admin token but this data dir does not; copy admin.token from the first replica");
        }
        return Ok(hash);
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let stored = store
        .setting_insert_if_absent("admin_token_sha256", &auth::hash_admin_token(&token))
        .await?;
    if stored == auth::hash_admin_token(&token) {
        tls::write_private(file, format!("{token}\n").as_bytes())?;
        tracing::info!(path = %file.display(), "created the admin token");
    }
    Ok(stored)
}

/// The key service secrets are sealed to at rest: made on first start,
/// kept 0600 in the data dir (replicas sharing PostgreSQL need the same file).
fn secrets_key(path: &std::path::Path) -> anyhow::Result<x25519_dalek::StaticSecret> {
    Ok(x25519_dalek::StaticSecret::from(
        berth_protocol::keyfile::load_or_create_key(path)?,
    ))
}

/// Drops spent nonces and expired dashboard sessions (an expired session
/// is refused on lookup anyway; this keeps the tables small).
async fn prune_nonces(store: store::Store) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        if let Err(e) = store.prune_nonces(store::now()).await {
            tracing::warn!(error = %e, "pruning nonces failed");
        }
        if let Err(e) = store.prune_sessions(store::now()).await {
            tracing::warn!(error = %e, "pruning expired sessions failed");
        }
    }
}

/// Retention and garbage collection of the fleet registry, every `every`.
async fn prune_registry(state: state::SharedState, every: std::time::Duration) {
    let Some(registry) = state.registry.clone() else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        match registry::prune::run(&registry, &state.store, registry.retention).await {
            Ok(r) => tracing::info!(deleted = r.deleted.len(), gc = %r.garbage_collection, "registry pruned"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "registry prune failed; trying again next time"),
        }
    }
}
