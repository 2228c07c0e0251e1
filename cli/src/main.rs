use berth_cli::client::{parse_duration, AdminClient, Target};
use berth_cli::lab::{self, Lab};
use berth_protocol::service::{parse_size, ServiceInfo, ServiceSpec, Volume};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// berth: manage a Berth fleet (tokens, nodes) and run a local lab cluster.
///
/// The CLI talks to the control plane's API with the admin token that the
/// control plane wrote on first start (DATA_DIR/admin.token, mode 0600) and
/// trusts only its CA (DATA_DIR/ca.pem).
#[derive(Parser)]
#[command(name = "berth", version)]
struct Cli {
    /// Control plane URL.
    #[arg(long, global = true, env = "BERTH_URL", default_value = "https://127.0.0.1:7443")]
    url: String,
    /// File holding the admin token.
    #[arg(
        long,
        global = true,
        env = "BERTH_ADMIN_TOKEN_FILE",
        default_value = "/var/lib/berth/admin.token"
    )]
    admin_token_file: PathBuf,
    /// The control plane's CA certificate (PEM).
    #[arg(long, global = true, env = "BERTH_CA_FILE", default_value = "/var/lib/berth/ca.pem")]
    ca_file: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join tokens for new nodes.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The nodes of the fleet.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Services: containers placed on the fleet, found by NAME.internal.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Public domains served by the proxy nodes (HTTPS with automatic certificates).
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Other routes through the proxy nodes.
    #[command(subcommand)]
    Route(RouteCmd),
    /// Deploy (create or update) the services described in a TOML file.
    Apply {
        /// A file with one service, or several under [[service]].
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// A local cluster in network namespaces on this machine (needs root).
    #[command(subcommand)]
    Lab(LabCmd),
    /// Signed agent builds that nodes install and upgrade to (offline; no control plane needed).
    #[command(subcommand)]
    Release(ReleaseCmd),
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Make a release key: OUT (private, keep it off the control plane) and OUT.pub.
    Keygen {
        #[arg(long, default_value = "release.key")]
        out: PathBuf,
    },
    /// Sign builds into a releases directory the control plane serves
    /// (its --releases-dir, default DATA_DIR/releases).
    Sign {
        /// The release key from `berth release keygen`.
        #[arg(long)]
        key: PathBuf,
        /// The releases directory.
        #[arg(long)]
        dir: PathBuf,
        /// Version name of this build; must be what `berth-agent --version` prints.
        #[arg(long)]
        version: String,
        /// Architecture of the binaries.
        #[arg(long, default_value = "amd64", value_parser = ["amd64", "arm64"])]
        arch: String,
        /// Do not make this the version setup.sh and update.sh install by default.
        #[arg(long)]
        no_latest: bool,
        /// Files to sign: berth-agent and berth-proxy.
        #[arg(required = true)]
        binaries: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a single-use join token and print the agent command that uses it.
    Create {
        /// The token registers a proxy node.
        #[arg(long)]
        proxy: bool,
        /// How long the token stays valid: 30m, 24h, 7d (1 minute to 30 days).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: u64,
        /// Print only the token.
        #[arg(long)]
        quiet: bool,
    },
    /// List tokens and their state (valid, used, expired, revoked).
    List,
    /// Revoke an unused token by its id.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum NodesCmd {
    /// Every node: mesh IP, subnet, role, state, last seen, revisions, peer handshakes.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node; every other node drops it from its peers.
    Remove { name: String },
    /// Upgrade the agents to a signed release: the canary first, every other
    /// node once the canary reports the new version. A node whose upgrade
    /// fails puts its previous binary back and reports why.
    Upgrade {
        /// Version to run (published with `berth release sign`).
        #[arg(long)]
        version: String,
        /// Node upgraded first (default: the first node by name).
        #[arg(long)]
        canary: Option<String>,
    },
}

#[derive(Subcommand)]
enum DomainCmd {
    /// Route DOMAIN to a service's port on every proxy node. Point the
    /// domain's DNS (A/AAAA records) at the proxies' public addresses; a
    /// certificate is then ordered with ACME unless --passthrough.
    Add {
        /// Fully qualified host name, e.g. app.example.com.
        domain: String,
        /// The service that answers.
        #[arg(long)]
        service: String,
        /// The service's port inside its containers.
        #[arg(long)]
        port: u16,
        /// Pass TLS through by SNI: the service terminates TLS itself, no certificate is ordered.
        #[arg(long)]
        passthrough: bool,
    },
    /// Every domain: service, port, certificate state and expiry, last error.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop routing a domain; its certificate is forgotten.
    Remove { domain: String },
}

#[derive(Subcommand)]
enum RouteCmd {
    /// TCP ports on every proxy node forwarded to a service.
    #[command(subcommand)]
    Tcp(TcpCmd),
}

#[derive(Subcommand)]
enum TcpCmd {
    /// Forward TCP port --listen on every proxy to a service's port.
    Add {
        /// Port the proxies listen on (not 80 or 443).
        #[arg(long)]
        listen: u16,
        #[arg(long)]
        service: String,
        /// The service's port inside its containers.
        #[arg(long)]
        port: u16,
    },
    /// Every TCP route.
    List,
    /// Remove the TCP route on port LISTEN.
    Remove { listen: u16 },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn volume(s: &str) -> Result<Volume, String> {
    s.split_once(':')
        .map(|(name, path)| Volume {
            name: name.into(),
            path: path.into(),
        })
        .ok_or_else(|| format!("{s:?} is not NAME:/PATH"))
}

#[derive(Args)]
struct DeployArgs {
    /// Service name (a DNS label): reachable as NAME.internal.
    name: String,
    /// Image reference, e.g. localhost/demo/web:1.
    #[arg(long)]
    image: String,
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Port the service listens on inside its containers.
    #[arg(long)]
    port: Option<u16>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = key_value)]
    env: Vec<(String, String)>,
    /// Secret KEY=VALUE (repeatable): stored encrypted, sealed to each node, never shown again.
    #[arg(long = "secret", value_parser = key_value)]
    secrets: Vec<(String, String)>,
    /// Volume NAME:/path (repeatable); a service with a volume stays on its node.
    #[arg(long = "volume", value_parser = volume)]
    volumes: Vec<Volume>,
    /// CPU limit in cores, e.g. 0.5.
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory limit, e.g. 256M or 1G.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Health check: a shell command run in the container.
    #[arg(long, conflicts_with = "health_http")]
    health_cmd: Option<String>,
    /// Health check: an HTTP path fetched on --port.
    #[arg(long)]
    health_http: Option<String>,
    /// Command to run instead of the image's (shell form).
    #[arg(long)]
    command: Option<String>,
    /// Pin replicas to this node (repeatable).
    #[arg(long = "node")]
    nodes: Vec<String>,
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Create or update a service.
    Deploy(Box<DeployArgs>),
    /// Every service and its replica count.
    List,
    /// A service's spec and each replica: node, IP, state, health, restarts, last error.
    Show { name: String },
    /// Change the number of replicas.
    Scale { name: String, replicas: u32 },
    /// Remove a service and all its containers.
    Remove { name: String },
}

#[derive(Args, Clone)]
struct LabSel {
    /// Lab number (0-255); its underlay is 198.18.ID.0/24.
    #[arg(long, default_value_t = 0)]
    id: u8,
    /// Lab directory (state, logs, node data). Default: /var/lib/berth-lab/ID.
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl LabSel {
    fn dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| lab::default_dir(self.id))
    }

    /// The options that select this lab again, for printed command lines.
    fn args(&self) -> String {
        match &self.dir {
            Some(d) => format!("--id {} --dir {}", self.id, d.display()),
            None => format!("--id {}", self.id),
        }
    }
}

/// How long `lab up` waits for the demo service to be running and healthy.
const DEMO_WAIT: Duration = Duration::from_secs(30);

/// Deploys the `demo` service (the test image's web server on port 8080) on a
/// fresh lab with `workers` worker nodes and waits for its replicas. Problems
/// are warnings: the lab stays up either way.
/// Puts the demo behind `demo.example.com` on the lab's proxy nodes, with a
/// certificate from a Pebble ACME server the lab starts, and prints the curl
/// command that reaches it. A failure is a warning: the lab stays up.
async fn lab_public_demo(l: &mut Lab, proxy: &str) {
    const DOMAIN: &str = "demo.example.com";
    eprintln!(
        "lab {}: starting Pebble (ACME) and ordering a certificate for {DOMAIN}...",
        l.state.id
    );
    let res = async {
        l.start_pebble(proxy).await?;
        l.wait_converged(Duration::from_secs(60)).await?;
        let admin = l.admin()?;
        admin
            .add_domain(&berth_protocol::proxy::DomainSpec {
                domain: DOMAIN.into(),
                service: "demo".into(),
                port: 8080,
                passthrough: false,
            })
            .await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let d = admin.list_domains().await?;
            let state = d.iter().find(|d| d.spec.domain == DOMAIN);
            if state.is_some_and(|d| d.cert_state == "valid") {
                break;
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "no certificate after 90 s: {:?}",
                    state.and_then(|d| d.last_error.clone())
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let pebble = l.state.pebble.clone().ok_or_else(|| anyhow::anyhow!("no Pebble"))?;
        let root = l.state.dir.join("pebble-root.pem");
        std::fs::write(&root, pebble.issuing_root().await?)?;
        let index = l.node(proxy)?.index;
        Ok::<_, anyhow::Error>((root, l.net.node_ip(index)))
    }
    .await;
    match res {
        Ok((root, ip)) => {
            println!("HTTPS through the proxy node {proxy}, certificate from the lab's Pebble:");
            println!(
                "  curl --cacert {} --resolve {DOMAIN}:443:{ip} https://{DOMAIN}/",
                root.display()
            );
        }
        Err(e) => eprintln!(
            "warning: the public demo is not ready: {e:#}\n  see `berth domain list` and {}",
            l.state.dir.display()
        ),
    }
}

async fn lab_demo(l: &Lab, sel: &LabSel, workers: u16) {
    let spec = ServiceSpec {
        name: "demo".into(),
        image: lab::podman::TEST_IMAGE.into(),
        replicas: u32::from(workers.min(2)),
        port: Some(8080),
        env: Default::default(),
        secrets: Default::default(),
        volumes: vec![],
        cpu: None,
        memory: None,
        health_cmd: None,
        health_http: Some("/".into()),
        command: None,
        nodes: vec![],
    };
    let logs = format!("{}/n*.log", sel.dir().display());
    let admin = match l.admin() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("warning: demo not deployed: {e:#}");
            return;
        }
    };
    eprintln!(
        "lab {}: deploying the demo service ({} replicas of {})...",
        sel.id, spec.replicas, spec.image
    );
    if let Err(e) = admin.deploy_service(&spec).await {
        eprintln!("warning: deploying the demo service failed: {e:#}");
        return;
    }
    let want = spec.replicas as usize;
    let deadline = std::time::Instant::now() + DEMO_WAIT;
    let mut last = String::new();
    let mut ready = false;
    while std::time::Instant::now() < deadline {
        let progress = match admin.show_service("demo").await {
            Ok(info) => {
                let running = info.replicas.iter().filter(|r| r.state == "running").count();
                let healthy = info
                    .replicas
                    .iter()
                    .filter(|r| r.state == "running" && r.healthy)
                    .count();
                ready = info.replicas.len() == want && healthy == want;
                let errors: Vec<String> = info
                    .replicas
                    .iter()
                    .filter_map(|r| r.error.as_ref().map(|e| format!("{}: {e}", r.replica)))
                    .collect();
                format!(
                    "demo: {running}/{want} running, {healthy}/{want} healthy{}",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", errors.join("; "))
                    }
                )
            }
            Err(e) => format!("demo: {e:#}"),
        };
        if progress != last {
            eprintln!("lab {}: {progress}", sel.id);
            last = progress;
        }
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if !ready {
        eprintln!(
            "warning: the demo service is not running and healthy after {} s; the lab stays up. \
             Look at `berth service show demo` (after the exports below) and the node logs {logs}",
            DEMO_WAIT.as_secs()
        );
    }
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build a lab: a control plane and N nodes, each in its own namespace, in a WireGuard mesh.
    Up {
        #[command(flatten)]
        sel: LabSel,
        /// Worker nodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=200))]
        nodes: u16,
        /// Proxy nodes (in addition to the workers).
        #[arg(long, default_value_t = 0)]
        proxies: u16,
        /// Where berth-agent and berth-control-plane are. Default: beside this binary.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Do not deploy the `demo` service (2 replicas of the test image's web server).
        #[arg(long)]
        no_demo: bool,
    },
    /// Show the lab's nodes as the control plane sees them.
    Status {
        #[command(flatten)]
        sel: LabSel,
    },
    /// Print shell exports that point `berth` at the lab's control plane.
    Env {
        #[command(flatten)]
        sel: LabSel,
    },
    /// Run a command inside a node's namespace: berth lab exec n1 -- ping 10.100.0.2
    Exec {
        #[command(flatten)]
        sel: LabSel,
        node: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run a command in a throwaway container of the test image on a node's
    /// Podman network: berth lab run n1 -- wget -qO- http://demo.internal:8080/
    Run {
        #[command(flatten)]
        sel: LabSel,
        node: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Stop every lab process and remove every namespace, link, container, mount and file it made.
    Down {
        #[command(flatten)]
        sel: LabSel,
        /// Keep the lab directory (logs).
        #[arg(long)]
        keep_logs: bool,
    },
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("berth: {e:#}");
            std::process::exit(1);
        }
    }
}

fn ago(t: Option<i64>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match t {
        Some(t) => format!("{}s ago", (now - t).max(0)),
        None => "never".into(),
    }
}

fn print_nodes(nodes: &[berth_protocol::NodeInfo]) {
    println!(
        "{:<16} {:<8} {:<13} {:<16} {:<8} {:<10} {:<9} {:<12} PEERS (handshake age)",
        "NAME", "ROLE", "MESH IP", "SUBNET", "STATE", "LAST SEEN", "REVISION", "VERSION"
    );
    for n in nodes {
        let peers: Vec<String> = n
            .peers
            .iter()
            .map(|p| {
                format!(
                    "{}:{}",
                    p.name,
                    p.handshake_age_secs
                        .map(|s| format!("{s}s"))
                        .unwrap_or_else(|| "-".into())
                )
            })
            .collect();
        println!(
            "{:<16} {:<8} {:<13} {:<16} {:<8} {:<10} {:<9} {:<12} {}",
            n.name,
            n.role.as_str(),
            n.mesh_ip,
            n.subnet,
            if n.online { "online" } else { "offline" },
            ago(n.last_seen),
            format!("{}/{}", n.applied_revision, n.revision),
            n.agent_version.as_deref().unwrap_or("-"),
            peers.join(" ")
        );
        if let Some(e) = &n.error {
            println!("  last error: {e}");
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let target = Target {
        url: cli.url.clone(),
        admin_token_file: cli.admin_token_file.clone(),
        ca_file: cli.ca_file.clone(),
    };
    match cli.command {
        Command::Token(t) => {
            let api = AdminClient::new(&target)?;
            match t {
                TokenCmd::Create { proxy, ttl, quiet } => {
                    let t = api.create_token(proxy, ttl).await?;
                    if quiet {
                        println!("{}", t["token"].as_str().unwrap_or_default());
                    } else {
                        println!(
                            "token {} ({}, expires in {})",
                            t["id"].as_str().unwrap_or_default(),
                            t["role"].as_str().unwrap_or_default(),
                            humantime(ttl)
                        );
                        println!("{}", t["token"].as_str().unwrap_or_default());
                        println!(
                            "\nOn the new server, run:\n  {}",
                            t["agent_command"].as_str().unwrap_or_default()
                        );
                    }
                }
                TokenCmd::List => {
                    println!("{:<10} {:<7} {:<8} {:<12} USED BY", "ID", "ROLE", "STATE", "EXPIRES");
                    for t in api.list_tokens().await? {
                        let left = t.expires_at
                            - std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)?
                                .as_secs() as i64;
                        println!(
                            "{:<10} {:<7} {:<8} {:<12} {}",
                            t.id,
                            t.role.as_str(),
                            t.state,
                            if left > 0 { humantime(left as u64) } else { "-".into() },
                            t.used_by.unwrap_or_default()
                        );
                    }
                }
                TokenCmd::Revoke { id } => {
                    api.revoke_token(&id).await?;
                    println!("revoked token {id}");
                }
            }
        }
        Command::Nodes(n) => {
            let api = AdminClient::new(&target)?;
            match n {
                NodesCmd::List { json } => {
                    let nodes = api.list_nodes().await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&nodes)?);
                    } else {
                        print_nodes(&nodes);
                    }
                }
                NodesCmd::Remove { name } => {
                    let rev = api.remove_node(&name).await?;
                    println!("removed node {name} (revision {rev})");
                }
                NodesCmd::Upgrade { version, canary } => {
                    let r = api.upgrade_nodes(&version, canary.as_deref()).await?;
                    let waiting: Vec<&str> = r["waiting"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                        .unwrap_or_default();
                    println!("upgrading {} to {version} first", r["canary"].as_str().unwrap_or("?"));
                    if !waiting.is_empty() {
                        println!("then, once it reports {version}: {}", waiting.join(", "));
                    }
                    println!("follow with `berth nodes list` (VERSION and ERROR columns)");
                }
            }
        }
        Command::Service(s) => service_cmd(&AdminClient::new(&target)?, s).await?,
        Command::Domain(d) => domain_cmd(&AdminClient::new(&target)?, d).await?,
        Command::Route(RouteCmd::Tcp(t)) => tcp_cmd(&AdminClient::new(&target)?, t).await?,
        Command::Apply { file } => {
            let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for spec in parse_service_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))? {
                let info = AdminClient::new(&target)?.deploy_service(&spec).await?;
                println!("deployed {} ({} replicas)", info.spec.name, info.replicas.len());
            }
        }
        Command::Lab(l) => return lab_cmd(l).await,
        Command::Release(r) => release_cmd(r)?,
    }
    Ok(0)
}

fn release_cmd(cmd: ReleaseCmd) -> anyhow::Result<()> {
    match cmd {
        ReleaseCmd::Keygen { out } => {
            let public = berth_cli::release::keygen(&out)?;
            println!(
                "release key: {} (keep it secret and off the control plane)",
                out.display()
            );
            println!("public key:  {}", public.display());
        }
        ReleaseCmd::Sign {
            key,
            dir,
            version,
            arch,
            no_latest,
            binaries,
        } => {
            let key = berth_cli::release::load_key(&key)?;
            let signed = berth_cli::release::sign(&key, &dir, &version, &arch, &binaries, !no_latest)?;
            for f in &signed.files {
                println!("signed {}", signed.dir.join(f).display());
            }
            if !no_latest {
                println!("{version} is now the latest release");
            }
        }
    }
    Ok(())
}

fn humantime(secs: u64) -> String {
    match secs {
        s if s >= 86400 && s % 86400 == 0 => format!("{}d", s / 86400),
        s if s >= 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

async fn lab_cmd(cmd: LabCmd) -> anyhow::Result<i32> {
    match cmd {
        LabCmd::Up {
            sel,
            nodes,
            proxies,
            bin_dir,
            no_demo,
        } => {
            let dir = sel.dir();
            let bin_dir = bin_dir.unwrap_or_else(lab::default_bin_dir);
            eprintln!("lab {}: building the network and starting the control plane...", sel.id);
            let mut l = match Lab::create(sel.id, &dir, &bin_dir).await {
                Ok(l) => l,
                Err(e) => {
                    // Leave nothing half-made behind, unless the lab was already there.
                    if !e.to_string().contains("already exists") {
                        let _ = lab::destroy_by_id(sel.id, &dir, true);
                    }
                    return Err(e);
                }
            };
            // On failure the lab stays as it is, for its logs.
            let left = |e: anyhow::Error| {
                e.context(format!(
                    "lab {} is left as it is (logs in {}); remove it with `berth lab down {}`",
                    sel.id,
                    dir.display(),
                    sel.args()
                ))
            };
            for i in 0..nodes + proxies {
                let name = l.add_node(i >= nodes).await.map_err(left)?;
                eprintln!("lab {}: started node {name} (agent and Podman)", sel.id);
            }
            eprintln!(
                "lab {}: waiting for every node to register and apply the mesh...",
                sel.id
            );
            let list = l.wait_converged(Duration::from_secs(60)).await.map_err(left)?;
            let list = if no_demo {
                list
            } else {
                lab_demo(&l, &sel, nodes).await;
                if let Some(proxy) = l.state.nodes.iter().find(|n| n.proxy).map(|n| n.name.clone()) {
                    lab_public_demo(&mut l, &proxy).await;
                }
                // Fresh revisions and last-seen times after the deploy.
                l.admin()?.list_nodes().await.unwrap_or(list)
            };
            print_nodes(&list);
            let t = l.target();
            println!("\nThe lab is up. Point the CLI at it:");
            println!(
                "  export BERTH_URL={} BERTH_ADMIN_TOKEN_FILE={} BERTH_CA_FILE={}",
                t.url,
                t.admin_token_file.display(),
                t.ca_file.display()
            );
            if let (Some(a), Some(b)) = (list.first(), list.get(1)) {
                println!(
                    "Ping across the mesh:\n  berth lab exec {} {} -- ping -c 3 {}",
                    sel.args(),
                    a.name,
                    b.mesh_ip
                );
            }
            let workers: Vec<&str> = l
                .state
                .nodes
                .iter()
                .filter(|n| !n.proxy)
                .map(|n| n.name.as_str())
                .collect();
            if let (false, Some(first), Some(last)) = (no_demo, workers.first(), workers.last()) {
                println!("Reach the demo service by name from a container on any node:");
                println!(
                    "  berth lab run {} {last} -- wget -qO- http://demo.internal:8080/",
                    sel.args()
                );
                println!("  berth lab run {} {first} -- nslookup demo.internal", sel.args());
                println!("  berth service show demo");
            }
            println!("Logs: {}   Remove it all: berth lab down {}", dir.display(), sel.args());
        }
        LabCmd::Status { sel } => {
            let l = Lab::load(&sel.dir())?;
            println!("lab {} at {} (control plane {})", sel.id, sel.dir().display(), l.url());
            print_nodes(&l.admin()?.list_nodes().await?);
        }
        LabCmd::Env { sel } => {
            let t = Lab::load(&sel.dir())?.target();
            println!(
                "export BERTH_URL={} BERTH_ADMIN_TOKEN_FILE={} BERTH_CA_FILE={}",
                t.url,
                t.admin_token_file.display(),
                t.ca_file.display()
            );
        }
        LabCmd::Exec { sel, node, cmd } => {
            let l = Lab::load(&sel.dir())?;
            let n = l.node(&node)?;
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &l.net.node_ns(n.index)])
                .args(&cmd)
                .status()?;
            return Ok(status.code().unwrap_or(1));
        }
        LabCmd::Run { sel, node, cmd } => {
            let l = Lab::load(&sel.dir())?;
            let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let status = l
                .container_command(&node, &cmd)?
                .status()
                .map_err(|e| anyhow::anyhow!("running podman on {node}: {e}"))?;
            return Ok(status.code().unwrap_or(1));
        }
        LabCmd::Down { sel, keep_logs } => {
            lab::destroy_by_id(sel.id, &sel.dir(), keep_logs)?;
            println!("lab {} removed", sel.id);
        }
    }
    Ok(0)
}

/// A service file: one service at the top level, or several as [[service]].
fn parse_service_file(text: &str) -> Result<Vec<ServiceSpec>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Many {
        service: Vec<ServiceSpec>,
    }
    let specs = match toml::from_str::<Many>(text) {
        Ok(m) => m.service,
        Err(_) => vec![toml::from_str::<ServiceSpec>(text).map_err(|e| e.to_string())?],
    };
    for s in &specs {
        s.validate()?;
    }
    Ok(specs)
}

fn print_service(info: &ServiceInfo) {
    let s = &info.spec;
    println!("service {}  image {}  replicas {}", s.name, s.image, s.replicas);
    if let Some(p) = s.port {
        println!("  port {p}   DNS {}.internal", s.name);
    }
    if !info.secret_names.is_empty() {
        println!("  secrets: {} (values never shown)", info.secret_names.join(", "));
    }
    println!(
        "  {:<14} {:<12} {:<14} {:<10} {:<8} {:<8} LAST ERROR",
        "REPLICA", "NODE", "IP", "STATE", "HEALTH", "RESTARTS"
    );
    for r in &info.replicas {
        println!(
            "  {:<14} {:<12} {:<14} {:<10} {:<8} {:<8} {}",
            r.replica,
            r.node,
            r.ip,
            r.state,
            if r.healthy { "healthy" } else { "-" },
            r.restarts,
            r.error.clone().unwrap_or_default()
        );
    }
}

async fn service_cmd(api: &AdminClient, cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Deploy(a) => {
            let spec = ServiceSpec {
                name: a.name,
                image: a.image,
                replicas: a.replicas,
                port: a.port,
                env: a.env.into_iter().collect(),
                secrets: a.secrets.into_iter().collect(),
                volumes: a.volumes,
                cpu: a.cpu,
                memory: a.memory,
                health_cmd: a.health_cmd,
                health_http: a.health_http,
                command: a.command,
                nodes: a.nodes,
            };
            spec.validate().map_err(anyhow::Error::msg)?;
            print_service(&api.deploy_service(&spec).await?);
        }
        ServiceCmd::List => {
            println!("{:<20} {:<40} {:<9} PORT", "NAME", "IMAGE", "REPLICAS");
            for s in api.list_services().await? {
                let healthy = s.replicas.iter().filter(|r| r.healthy).count();
                println!(
                    "{:<20} {:<40} {:<9} {}",
                    s.spec.name,
                    s.spec.image,
                    format!("{healthy}/{}", s.spec.replicas),
                    s.spec.port.map(|p| p.to_string()).unwrap_or_default()
                );
            }
        }
        ServiceCmd::Show { name } => print_service(&api.show_service(&name).await?),
        ServiceCmd::Scale { name, replicas } => print_service(&api.scale_service(&name, replicas).await?),
        ServiceCmd::Remove { name } => {
            api.remove_service(&name).await?;
            println!("removed service {name}");
        }
    }
    Ok(())
}

fn print_domains(list: &[berth_protocol::proxy::DomainInfo]) {
    println!(
        "{:<32} {:<16} {:<6} {:<12} {:<21} LAST ERROR",
        "DOMAIN", "SERVICE", "PORT", "CERT", "EXPIRES"
    );
    for d in list {
        println!(
            "{:<32} {:<16} {:<6} {:<12} {:<21} {}",
            d.spec.domain,
            d.spec.service,
            d.spec.port,
            d.cert_state,
            d.cert_not_after.as_deref().unwrap_or("-"),
            d.last_error.as_deref().unwrap_or("")
        );
    }
}

async fn domain_cmd(api: &AdminClient, cmd: DomainCmd) -> anyhow::Result<()> {
    match cmd {
        DomainCmd::Add {
            domain,
            service,
            port,
            passthrough,
        } => {
            let spec = berth_protocol::proxy::DomainSpec {
                // Host names are case-insensitive; the API takes them lowercase.
                domain: domain.trim_end_matches('.').to_ascii_lowercase(),
                service,
                port,
                passthrough,
            };
            spec.validate().map_err(anyhow::Error::msg)?;
            let info = api.add_domain(&spec).await?;
            print_domains(std::slice::from_ref(&info));
            if !passthrough {
                println!(
                    "\nPoint {} (A/AAAA records) at the proxy nodes; a certificate is ordered automatically.",
                    info.spec.domain
                );
            }
        }
        DomainCmd::List { json } => {
            let list = api.list_domains().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_domains(&list);
            }
        }
        DomainCmd::Remove { domain } => {
            api.remove_domain(&domain).await?;
            println!("removed domain {domain}");
        }
    }
    Ok(())
}

async fn tcp_cmd(api: &AdminClient, cmd: TcpCmd) -> anyhow::Result<()> {
    match cmd {
        TcpCmd::Add { listen, service, port } => {
            let spec = berth_protocol::proxy::TcpRouteSpec { listen, service, port };
            spec.validate().map_err(anyhow::Error::msg)?;
            let r = api.add_tcp_route(&spec).await?;
            println!("proxies forward TCP port {} to {}:{}", r.listen, r.service, r.port);
        }
        TcpCmd::List => {
            println!("{:<7} {:<20} PORT", "LISTEN", "SERVICE");
            for r in api.list_tcp_routes().await? {
                println!("{:<7} {:<20} {}", r.listen, r.service, r.port);
            }
        }
        TcpCmd::Remove { listen } => {
            api.remove_tcp_route(listen).await?;
            println!("removed the TCP route on port {listen}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_service_file;

    #[test]
    fn route_commands_parse() {
        use super::{Cli, Command, DomainCmd, RouteCmd, TcpCmd};
        use clap::Parser;
        let c = Cli::try_parse_from([
            "berth",
            "domain",
            "add",
            "app.example.com",
            "--service",
            "web",
            "--port",
            "8080",
        ])
        .unwrap();
        assert!(matches!(
            c.command,
            Command::Domain(DomainCmd::Add {
                port: 8080,
                passthrough: false,
                ..
            })
        ));
        let c = Cli::try_parse_from([
            "berth",
            "route",
            "tcp",
            "add",
            "--listen",
            "5432",
            "--service",
            "db",
            "--port",
            "5432",
        ])
        .unwrap();
        assert!(matches!(
            c.command,
            Command::Route(RouteCmd::Tcp(TcpCmd::Add { listen: 5432, .. }))
        ));
        assert!(Cli::try_parse_from(["berth", "route", "tcp", "remove", "70000"]).is_err());
        assert!(Cli::try_parse_from(["berth", "domain", "add", "a.b", "--service", "web"]).is_err());
    }

    #[test]
    fn service_files() {
        let one = parse_service_file(
            "name = \"web\"\nimage = \"localhost/web:1\"\nreplicas = 2\nport = 8080\n[env]\nMODE = \"x\"\n",
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].replicas, 2);
        assert_eq!(one[0].env["MODE"], "x");
        let many =
            parse_service_file("[[service]]\nname = \"a\"\nimage = \"x\"\n[[service]]\nname = \"b\"\nimage = \"y\"\n")
                .unwrap();
        assert_eq!(many.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let err = parse_service_file("name = \"Web\"\nimage = \"x\"\n").unwrap_err();
        assert!(err.starts_with("name:"), "{err}");
        assert!(parse_service_file("name = \"web\"\nimage = \"x\"\nreplica = 2\n").is_err());
    }
}
