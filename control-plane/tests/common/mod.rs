//! Shared helpers of the control plane's integration tests: a fresh store
//! per test (a SQLite file in a temp dir, or a PostgreSQL database of its
//! own), a control plane started on it, and agents that sign their requests.
//!
//! PostgreSQL tests read the server's URL from `BERTH_TEST_POSTGRES`
//! (`bash scripts/test-postgres.sh` prints one). Without it they fail under
//! CI and are skipped, loudly, elsewhere.

#![allow(dead_code)]

pub mod podman;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use berth_control_plane::store::nodes::{NewNode, Pools};
use berth_control_plane::{start, ServeConfig, Started};
use berth_protocol::release::ReleaseInfo;
use berth_protocol::service::{ContainerStatus, ServiceInfo};
use berth_protocol::signing::{self, HEADER_NODE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use berth_protocol::token::JoinToken;
use berth_protocol::{
    ApiError, CreatedToken, DesiredState, ErrorCode, NodeInfo, RegisterRequest, StatusReport, TokenInfo, TokenState,
};
use ed25519_dalek::SigningKey;
use reqwest::{Method, StatusCode};
use sqlx::Connection;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Runs one test body (an `async fn(&Db)` of the same name) once against
/// SQLite and once against PostgreSQL: `name::sqlite` and `name::postgres`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    let db = crate::common::Db::sqlite().await;
                    super::$name(&db).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    let Some(db) = crate::common::Db::postgres().await else { return };
                    super::$name(&db).await;
                }
            }
        )*
    };
}

pub const POSTGRES_ENV: &str = "BERTH_TEST_POSTGRES";

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn now() -> i64 {
    berth_control_plane::store::now()
}

/// Installs the process-wide rustls provider reqwest needs (once).
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn default_pools() -> Pools {
    Pools {
        mesh: "10.100.0.0/16".parse().unwrap(),
        subnets: "10.200.0.0/13".parse().unwrap(),
        subnet_prefix: 24,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A store of its own for one test; removed when dropped.
pub struct Db {
    pub url: String,
    pub kind: Kind,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<PgDatabase>,
}

impl Db {
    pub async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cp.db").display());
        Db {
            url,
            kind: Kind::Sqlite,
            _dir: Some(dir),
            _pg: None,
        }
    }

    /// A fresh database on the server named by `BERTH_TEST_POSTGRES`, or None
    /// (test skipped) when that is unset outside CI.
    pub async fn postgres() -> Option<Db> {
        let admin_url = postgres_url()?;
        let pg = PgDatabase::create(&admin_url).await;
        Some(Db {
            url: pg.url.clone(),
            kind: Kind::Postgres,
            _dir: None,
            _pg: Some(pg),
        })
    }

    pub async fn store(&self) -> berth_control_plane::store::Store {
        berth_control_plane::store::Store::connect(&self.url).await.unwrap()
    }
}

/// The PostgreSQL URL the tests may use. Unset: a failure under CI (so CI
/// never skips these tests silently), otherwise a loud skip.
pub fn postgres_url() -> Option<String> {
    match std::env::var(POSTGRES_ENV) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_string()),
        _ => {
            if std::env::var_os("CI").is_some() {
                panic!("{POSTGRES_ENV} is not set but CI is: run `export {POSTGRES_ENV}=$(bash scripts/test-postgres.sh)` first");
            }
            // Straight to stderr: the test harness would swallow eprintln! output.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\n*** skipped: {POSTGRES_ENV} not set (run `export {POSTGRES_ENV}=$(bash scripts/test-postgres.sh)`) ***"
            );
            None
        }
    }
}

/// A database `berth_t_<random>` made through the admin URL and dropped
/// (with its connections) when this is dropped, even after a failed test.
pub struct PgDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let rest = &base[base.find("://").map(|i| i + 3).unwrap_or(0)..];
    let host_end = rest
        .find('/')
        .map(|i| base.len() - rest.len() + i)
        .unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..host_end])
}

impl PgDatabase {
    pub async fn create(admin_url: &str) -> PgDatabase {
        let name = format!("berth_t_{}", hex::encode(rand::random::<[u8; 8]>()));
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .unwrap_or_else(|e| panic!("{POSTGRES_ENV}: cannot connect: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} (the role needs CREATEDB): {e}"));
        let _ = conn.close().await;
        PgDatabase {
            admin_url: admin_url.to_string(),
            url: with_database(admin_url, &name),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop may run inside the test's runtime: do the work on a thread of its own.
        let res = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut conn = sqlx::PgConnection::connect(&admin_url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(res, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}: {res:?}", self.name);
        }
    }
}

/// A node-to-be: its own Ed25519 and WireGuard keys.
pub struct Agent {
    pub name: String,
    pub key: SigningKey,
    pub wg_public: String,
    pub node_id: String,
}

impl Agent {
    pub fn new(name: &str) -> Agent {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let wg = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
        let wg_public = B64.encode(x25519_dalek::PublicKey::from(&wg).as_bytes());
        Agent {
            name: name.into(),
            key,
            wg_public,
            node_id: String::new(),
        }
    }

    pub fn signing_key_b64(&self) -> String {
        B64.encode(self.key.verifying_key().as_bytes())
    }

    pub fn register_request(&self, token: &str) -> RegisterRequest {
        RegisterRequest {
            token: token.into(),
            name: self.name.clone(),
            signing_key: self.signing_key_b64(),
            wg_public_key: self.wg_public.clone(),
            wg_port: 51820,
            private_addr: Some("198.18.0.10/24".into()),
            public_ip: None,
            proxy: false,
            sealing_key: None,
        }
    }

    /// What the store's `register_node` takes for this agent and `token`.
    pub fn new_node(&self, token: &str) -> NewNode {
        let t = JoinToken::parse(token).unwrap();
        NewNode {
            token_id: t.id.clone(),
            token_secret_hash: t.secret_hash(),
            name: self.name.clone(),
            proxy: false,
            signing_key: self.signing_key_b64(),
            wg_public_key: self.wg_public.clone(),
            wg_port: 51820,
            private_addr: Some("198.18.0.10/24".parse().unwrap()),
            public_ip: Some("203.0.113.7".parse().unwrap()),
            sealing_key: None,
        }
    }
}

/// Outcome of an HTTP call: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: String,
}

impl Reply {
    pub async fn from(resp: reqwest::Response) -> Reply {
        let status = resp.status();
        Reply {
            status,
            body: resp.text().await.unwrap(),
        }
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        assert!(
            self.status.is_success(),
            "expected success, got {} {}",
            self.status,
            self.body
        );
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Asserts a JSON error with `status` whose message starts with `prefix`;
    /// returns the message. The error must carry a code, and when the
    /// prefix names a field (`"name: "`, `"listen:"`) the error's `field`
    /// must be that field.
    #[track_caller]
    pub fn error(&self, status: StatusCode, prefix: &str) -> String {
        let err = self.api_error(status);
        assert!(
            err.error.starts_with(prefix),
            "expected an error starting with {prefix:?}, got {:?}",
            err.error
        );
        assert_ne!(err.code, ErrorCode::Unknown, "no code: {}", self.body);
        if let Some((field, _)) = prefix.split_once(':') {
            assert_eq!(err.field.as_deref(), Some(field), "field of {}", self.body);
        }
        err.error
    }

    /// Asserts a JSON error with `status`, `code` and `field`; returns it.
    #[track_caller]
    pub fn coded(&self, status: StatusCode, code: ErrorCode, field: Option<&str>) -> ApiError {
        let err = self.api_error(status);
        assert_eq!(err.code, code, "{}", self.body);
        assert_eq!(err.field.as_deref(), field, "{}", self.body);
        err
    }

    #[track_caller]
    fn api_error(&self, status: StatusCode) -> ApiError {
        assert_eq!(self.status, status, "body: {}", self.body);
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {}", self.body))
    }
}

/// Everything an API mistake must leave as it was.
#[derive(Debug, PartialEq, Eq)]
pub struct Fleet {
    pub tokens: Vec<(String, TokenState, Option<String>)>,
    pub nodes: Vec<(String, String, u64)>,
    pub revision: i64,
}

/// A control plane started for a test, with an HTTPS client that trusts its CA.
pub struct Cp {
    pub started: Started,
    pub url: String,
    pub http: reqwest::Client,
    pub admin_token: String,
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

pub fn client(ca_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
        .tls_built_in_root_certs(false)
        .use_rustls_tls()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

impl Cp {
    pub async fn start(db: &Db) -> Cp {
        let dir = tempfile::tempdir().unwrap();
        let mut cp = Cp::start_in(dir.path(), &db.url, None).await;
        cp._dir = Some(dir);
        cp
    }

    /// Starts on `data_dir`; `admin_token` for a replica whose data dir has
    /// no admin.token of its own.
    pub async fn start_in(data_dir: &Path, database: &str, admin_token: Option<&str>) -> Cp {
        Cp::start_with(data_dir, database, admin_token, None).await
    }

    /// Starts on `data_dir` with ACME configured (or not).
    pub async fn start_with(
        data_dir: &Path,
        database: &str,
        admin_token: Option<&str>,
        acme: Option<berth_control_plane::acme::AcmeConfig>,
    ) -> Cp {
        Cp::start_full(data_dir, database, admin_token, acme, None).await
    }

    /// Starts on `db` with the fleet registry (the real docker-registry).
    pub async fn start_with_registry(db: &Db, registry: berth_control_plane::registry::RegistryConfig) -> Cp {
        let dir = tempfile::tempdir().unwrap();
        let mut cp = Cp::start_full(dir.path(), &db.url, None, None, Some(registry)).await;
        cp._dir = Some(dir);
        cp
    }

    /// Starts on `db` with the fleet registry and these build settings.
    pub async fn start_with_builds(
        db: &Db,
        registry: berth_control_plane::registry::RegistryConfig,
        builds: berth_control_plane::builds::BuildsConfig,
    ) -> Cp {
        let dir = tempfile::tempdir().unwrap();
        let mut cp = Cp::start_all(
            dir.path(),
            &db.url,
            None,
            None,
            Some(registry),
            builds,
            Default::default(),
        )
        .await;
        cp._dir = Some(dir);
        cp
    }

    pub async fn start_full(
        data_dir: &Path,
        database: &str,
        admin_token: Option<&str>,
        acme: Option<berth_control_plane::acme::AcmeConfig>,
        registry: Option<berth_control_plane::registry::RegistryConfig>,
    ) -> Cp {
        Cp::start_all(
            data_dir,
            database,
            admin_token,
            acme,
            registry,
            Default::default(),
            Default::default(),
        )
        .await
    }

    /// Starts on `db` with these event-stream settings.
    pub async fn start_with_events(db: &Db, events: berth_control_plane::events::EventsConfig) -> Cp {
        let dir = tempfile::tempdir().unwrap();
        let mut cp = Cp::start_all(dir.path(), &db.url, None, None, None, Default::default(), events).await;
        cp._dir = Some(dir);
        cp
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_all(
        data_dir: &Path,
        database: &str,
        admin_token: Option<&str>,
        acme: Option<berth_control_plane::acme::AcmeConfig>,
        registry: Option<berth_control_plane::registry::RegistryConfig>,
        builds: berth_control_plane::builds::BuildsConfig,
        events: berth_control_plane::events::EventsConfig,
    ) -> Cp {
        init();
        let started = start(ServeConfig {
            data_dir: data_dir.to_path_buf(),
            database: database.to_string(),
            listen: "127.0.0.1:0".parse().unwrap(),
            sans: vec![],
            own_cert: None,
            advertise_url: None,
            pools: default_pools(),
            offline_after_secs: 30,
            acme,
            releases_dir: None,
            registry,
            builds,
            streams: Default::default(),
            events,
            metrics_token: Some("metrics-token".into()),
            sessions: Default::default(),
        })
        .await
        .unwrap();
        let admin_token = match admin_token {
            Some(t) => t.to_string(),
            None => std::fs::read_to_string(&started.admin_token_file)
                .unwrap()
                .trim()
                .to_string(),
        };
        let http = client(&std::fs::read(&started.ca_file).unwrap());
        let url = format!("https://localhost:{}", started.addr.port());
        Cp {
            started,
            url,
            http,
            admin_token,
            data_dir: data_dir.to_path_buf(),
            _dir: None,
        }
    }

    pub fn store(&self) -> &berth_control_plane::store::Store {
        &self.started.state.store
    }

    pub fn ca_hash(&self) -> &str {
        &self.started.state.ca_hash
    }

    pub fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token)
    }

    pub async fn create_token(&self, proxy: bool) -> CreatedToken {
        let r = Reply::from(
            self.admin(Method::POST, "/v1/tokens")
                .json(&serde_json::json!({ "proxy": proxy, "ttl_secs": 3600 }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        r.json()
    }

    pub async fn tokens(&self) -> Vec<TokenInfo> {
        Reply::from(self.admin(Method::GET, "/v1/tokens").send().await.unwrap())
            .await
            .json()
    }

    pub async fn token_state(&self, id: &str) -> TokenState {
        self.tokens()
            .await
            .into_iter()
            .find(|t| t.id == id)
            .expect("token listed")
            .state
    }

    pub async fn nodes(&self) -> Vec<NodeInfo> {
        Reply::from(self.admin(Method::GET, "/v1/nodes").send().await.unwrap())
            .await
            .json()
    }

    pub async fn revision(&self) -> i64 {
        let v: serde_json::Value = Reply::from(self.admin(Method::GET, "/v1/revision").send().await.unwrap())
            .await
            .json();
        v["revision"].as_i64().unwrap()
    }

    pub async fn fleet(&self) -> Fleet {
        Fleet {
            tokens: self
                .tokens()
                .await
                .into_iter()
                .map(|t| (t.id, t.state, t.used_by))
                .collect(),
            nodes: self
                .nodes()
                .await
                .into_iter()
                .map(|n| (n.name, n.mesh_ip.to_string(), n.revision))
                .collect(),
            revision: self.revision().await,
        }
    }

    /// Sends a registration body, signed with `key` (the agent's own key
    /// for a genuine registration).
    pub async fn register_raw(&self, key: &SigningKey, body: Vec<u8>) -> Reply {
        let h = signing::sign(key, "POST", "/v1/register", &body, now());
        let resp = self
            .http
            .post(format!("{}/v1/register", self.url))
            .header("content-type", "application/json")
            .header(HEADER_TIMESTAMP, h.timestamp)
            .header(HEADER_NONCE, h.nonce)
            .header(HEADER_SIGNATURE, h.signature)
            .body(body)
            .send()
            .await
            .unwrap();
        Reply::from(resp).await
    }

    pub async fn register_req(&self, agent: &Agent, req: &RegisterRequest) -> Reply {
        self.register_raw(&agent.key, serde_json::to_vec(req).unwrap()).await
    }

    /// Registers a node (a proxy when `proxy`) that also has a sealing key,
    /// as services and certificates need.
    pub async fn join_sealed(&self, name: &str, proxy: bool) -> SealedNode {
        let mut agent = Agent::new(name);
        let seal = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
        let token = self.create_token(proxy).await;
        let mut req = agent.register_request(&token.token);
        req.proxy = proxy;
        req.sealing_key = Some(B64.encode(x25519_dalek::PublicKey::from(&seal).as_bytes()));
        let resp: berth_protocol::RegisterResponse = self.register_req(&agent, &req).await.json();
        agent.node_id = resp.node_id;
        SealedNode { agent, seal }
    }

    /// Posts a status report as `agent`; it must be accepted.
    pub async fn report(&self, agent: &Agent, report: &berth_protocol::StatusReport) {
        let body = serde_json::to_vec(report).unwrap();
        let r = Reply::from(
            self.signed(agent, Method::POST, "/v1/agent/status", body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    /// Registers `agent` with a fresh worker token; sets its node id.
    pub async fn join(&self, agent: &mut Agent) -> berth_protocol::RegisterResponse {
        let token = self.create_token(false).await;
        let r = self.register_req(agent, &agent.register_request(&token.token)).await;
        let resp: berth_protocol::RegisterResponse = r.json();
        agent.node_id = resp.node_id.clone();
        resp
    }

    /// A request signed as `agent` would sign it, at `timestamp`.
    pub fn signed_at(
        &self,
        agent: &Agent,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        timestamp: i64,
    ) -> reqwest::RequestBuilder {
        let h = signing::sign(&agent.key, method.as_str(), path_and_query, &body, timestamp);
        self.http
            .request(method, format!("{}{path_and_query}", self.url))
            .header(HEADER_NODE, &agent.node_id)
            .header(HEADER_TIMESTAMP, h.timestamp)
            .header(HEADER_NONCE, h.nonce)
            .header(HEADER_SIGNATURE, h.signature)
            .body(body)
    }

    pub fn signed(
        &self,
        agent: &Agent,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        self.signed_at(agent, method, path_and_query, body, now())
    }

    /// One long-poll for `agent`'s desired state.
    pub async fn desired(&self, agent: &Agent, after: u64, wait: u64) -> Reply {
        let pq = format!("/v1/agent/desired?after={after}&wait={wait}");
        Reply::from(self.signed(agent, Method::GET, &pq, vec![]).send().await.unwrap()).await
    }
}

/// A registered node and the private half of its sealing key.
pub struct SealedNode {
    pub agent: Agent,
    pub seal: x25519_dalek::StaticSecret,
}

/// The image ID [`play_agents`] reports for every container (Podman's form:
/// 64 hex digits, no algorithm).
pub const FAKE_IMAGE_ID: &str = "0123abcd0123abcd0123abcd0123abcd0123abcd0123abcd0123abcd0123abcd";

/// Plays the agents: every node reports what it was told to run, healthy
/// when `healthy(replica)` says so, with the revision it was given applied.
pub async fn play_agents(cp: &Cp, nodes: &[&SealedNode], healthy: &dyn Fn(&str) -> bool) {
    for n in nodes {
        let d: DesiredState = cp.desired(&n.agent, 0, 1).await.json();
        let st = d
            .containers
            .iter()
            .map(|c| ContainerStatus {
                replica: c.replica.clone(),
                container_id: Some(format!("id-{}", c.replica)),
                image_id: Some(FAKE_IMAGE_ID.to_string()),
                state: "running".into(),
                healthy: healthy(&c.replica),
                health_output: (!healthy(&c.replica)).then(|| "GET /nope: HTTP 404".to_string()),
                ..Default::default()
            })
            .collect();
        let report = StatusReport {
            applied_revision: d.revision,
            containers: st,
            ..Default::default()
        };
        cp.report(&n.agent, &report).await;
    }
}

pub async fn show_service(cp: &Cp, name: &str) -> ServiceInfo {
    Reply::from(
        cp.admin(Method::GET, &format!("/v1/services/{name}"))
            .send()
            .await
            .unwrap(),
    )
    .await
    .json()
}

pub async fn releases_of(cp: &Cp, name: &str) -> Vec<ReleaseInfo> {
    Reply::from(
        cp.admin(Method::GET, &format!("/v1/services/{name}/releases"))
            .send()
            .await
            .unwrap(),
    )
    .await
    .json()
}

/// Plays the agents until release `number` of `name` is in a final state
/// and nothing is rolling back; returns the service then. Checks on every
/// round that no fewer than `floor` replicas were serving (healthy, active).
pub async fn settle(
    cp: &Cp,
    nodes: &[&SealedNode],
    name: &str,
    number: u64,
    healthy: &dyn Fn(&str) -> bool,
    floor: usize,
) -> ServiceInfo {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        play_agents(cp, nodes, healthy).await;
        // The release first: a service read after it is at least as new.
        let rel = releases_of(cp, name)
            .await
            .into_iter()
            .find(|r| r.number == number)
            .unwrap();
        let info = show_service(cp, name).await;
        let serving = info
            .replicas
            .iter()
            .filter(|r| r.phase == "active" && r.healthy)
            .count();
        assert!(
            serving >= floor,
            "{serving} serving, below {floor}: {:?}",
            info.replicas
        );
        let rolling_back = info.rollout.as_ref().is_some_and(|r| r.rolling_back);
        if rel.state.is_final() && !rolling_back && info.replicas.iter().all(|r| r.phase == "active") {
            return info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "release {number} never settled: {rel:?} {info:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A WebSocket to the control plane (tests/streams.rs, tests/sessions.rs).
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `path` with `headers`; the HTTP status on refusal.
pub async fn ws(cp: &Cp, path: &str, headers: &[(&'static str, String)]) -> Result<Ws, (u16, String)> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cp.started.ca_file).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let addr = cp.started.addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from(addr.ip().to_string()).unwrap(), tcp)
        .await
        .unwrap();
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut req = format!("wss://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, HeaderValue::from_str(v).unwrap());
    }
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("{path}: {e}"),
    }
}
