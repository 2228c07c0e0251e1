//! The command line: every subcommand and flag of `berth`, with the value
//! parsers they need. The handlers are in [`crate::commands`].

use berth_protocol::service::{parse_size, Volume};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "berth", version)]
pub struct Cli {
    /// Control plane URL.
    #[arg(long, global = true, env = "BERTH_URL", default_value = "https://127.0.0.1:7443")]
    pub url: String,
    /// File holding the admin token.
    #[arg(
        long,
        global = true,
        env = "BERTH_ADMIN_TOKEN_FILE",
        default_value = "/var/lib/berth/admin.token"
    )]
    pub admin_token_file: PathBuf,
    /// The control plane's CA certificate (PEM).
    #[arg(long, global = true, env = "BERTH_CA_FILE", default_value = "/var/lib/berth/ca.pem")]
    pub ca_file: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// A local cluster in network namespaces on this machine (needs root):
    /// runs `berth-lab` (from the berth-lab crate, beside this binary or on
    /// PATH) with the same arguments; `berth lab --help` lists them.
    #[command(disable_help_flag = true)]
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Signed agent builds that nodes install and upgrade to (offline; no control plane needed).
    #[command(subcommand)]
    Release(ReleaseCmd),
    /// The fleet registry the control plane runs.
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// Images in the fleet registry.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Image builds (`berth service deploy NAME --build DIR` starts one).
    #[command(subcommand)]
    Build(BuildCmd),
    /// A service's log: every replica's stdout and stderr, merged as they
    /// come, each line after its replica's name.
    Logs(LogsArgs),
    /// Run a command in a replica: `berth exec web -- ls /`, or `berth exec
    /// -it web/web-3 -- sh` for a shell. Exits with the command's code.
    Exec(ExecArgs),
    /// What happened, in order: deploys, rollout steps, releases, health
    /// changes, restarts, nodes, certificates, builds, execs, upgrades.
    Events(EventsArgs),
    /// Dashboard users: who may sign in to the web dashboard with a password
    /// (the admin token signs in too). See docs/dashboard.md.
    #[command(subcommand)]
    Users(UsersCmd),
}

#[derive(Subcommand)]
pub enum UsersCmd {
    /// Add a user. Asks for the password twice on the terminal (not shown),
    /// or reads it once from stdin with --password-stdin. At least 10 characters.
    Add {
        /// The user's name: lowercase letters, digits and '-' (not "admin").
        name: String,
        /// Read the password from stdin (one line; a trailing newline is dropped).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Every user and when it was added (never the passwords).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a user; every session it is signed in with ends at once.
    Remove { name: String },
}

#[derive(Args)]
pub struct EventsArgs {
    /// Keep following (Ctrl-C ends).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only this service's events.
    #[arg(long)]
    pub service: Option<String>,
    /// Start with the last N events.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub tail: u32,
    /// One JSON object per event: id, at_ms, kind, service, node, message.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct LogsArgs {
    /// The service.
    pub service: String,
    /// Keep following, taking in the replicas a rollout starts (Ctrl-C ends).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only lines newer than this: a duration back from now (90s, 10m, 2h, 1d) or Unix seconds.
    #[arg(long)]
    pub since: Option<String>,
    /// Only the last N lines of each replica, before following.
    #[arg(long, value_name = "N")]
    pub tail: Option<u32>,
    /// Only this replica (e.g. web-3).
    #[arg(long)]
    pub replica: Option<String>,
    /// Show when each line was written.
    #[arg(long)]
    pub timestamps: bool,
    /// One JSON object per line: replica, stream, ts, line (or notice).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ExecArgs {
    /// Keep stdin open and send it to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the command a terminal (stdin must be one): raw mode, window
    /// size, Ctrl-C to the remote process.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// SERVICE, or SERVICE/REPLICA; without a replica, the first running one.
    pub target: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    pub cmd: Vec<String>,
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Every tag: repository, tag, digest, size, and the releases using it.
    List {
        /// Only the images SERVICE's releases use.
        service: Option<String>,
    },
    /// Deletes the images no service needs any more, then runs the
    /// registry's garbage collection (the registry stops for it, briefly).
    /// Kept: the images of each service's last N releases and of every
    /// release a replica runs; images pushed but never deployed are left
    /// alone. The control plane also does this on a schedule.
    Prune {
        /// Releases kept per service (default: the control plane's
        /// --image-retention, 10).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        keep: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum RegistryCmd {
    /// Prints the registry's HOST:PORT (images are HOST:PORT/NAME:TAG).
    Show,
    /// Lets this machine's Podman (or Docker) push and pull as the admin:
    /// trusts the control plane's CA for the registry's host and logs in
    /// with the admin token.
    Login {
        /// Configure Docker instead of Podman.
        #[arg(long)]
        docker: bool,
    },
}

#[derive(Subcommand)]
pub enum ReleaseCmd {
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
pub enum TokenCmd {
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
pub enum NodesCmd {
    /// Every node: mesh IP, subnet, role, state, last seen, revisions, peers up and down.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node; every other node drops it from its peers.
    Remove { name: String },
    /// A node's agent log: its journal under systemd, else its --log-file.
    Logs {
        /// The node.
        name: String,
        /// Keep following (Ctrl-C ends).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only lines newer than this: a duration back from now (90s, 10m, 2h, 1d) or Unix seconds.
        #[arg(long)]
        since: Option<String>,
        /// Only the last N lines, before following.
        #[arg(long, value_name = "N")]
        tail: Option<u32>,
        /// Show when each line was written.
        #[arg(long)]
        timestamps: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
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
pub enum DomainCmd {
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
        /// Wait until the certificate is issued and every online proxy
        /// serves the domain, printing progress; exit 1 if that takes
        /// longer than --timeout.
        #[arg(long)]
        wait: bool,
        /// With --wait: how long to wait, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 300, requires = "wait")]
        timeout: u64,
    },
    /// Every domain: service, port, certificate state, how many of the
    /// online proxies serve it (PROXIES 2/2), expiry, last error.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop routing a domain; its certificate is forgotten.
    Remove { domain: String },
}

#[derive(Subcommand)]
pub enum RouteCmd {
    /// TCP ports on every proxy node forwarded to a service.
    #[command(subcommand)]
    Tcp(TcpCmd),
}

#[derive(Subcommand)]
pub enum TcpCmd {
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

pub use berth_protocol::time::parse_duration;

pub fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub fn volume(s: &str) -> Result<Volume, String> {
    s.split_once(':')
        .map(|(name, path)| Volume {
            name: name.into(),
            path: path.into(),
        })
        .ok_or_else(|| format!("{s:?} is not NAME:/PATH"))
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").args(["build", "git"])))]
pub struct DeployArgs {
    /// Service name (a DNS label): reachable as NAME.internal.
    pub name: String,
    /// Image reference, e.g. localhost/demo/web:1.
    #[arg(long, required_unless_present = "source", conflicts_with = "source")]
    pub image: Option<String>,
    #[command(flatten)]
    pub build: BuildArgs,
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Port the service listens on inside its containers.
    #[arg(long)]
    pub port: Option<u16>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// Secret KEY=VALUE (repeatable): stored encrypted, sealed to each node, never shown again.
    #[arg(long = "secret", value_parser = key_value)]
    pub secrets: Vec<(String, String)>,
    /// Volume NAME:/path (repeatable); a service with a volume stays on its node.
    #[arg(long = "volume", value_parser = volume)]
    pub volumes: Vec<Volume>,
    /// CPU limit in cores, e.g. 0.5.
    #[arg(long)]
    pub cpu: Option<f64>,
    /// Memory limit, e.g. 256M or 1G.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Health check: a shell command run in the container.
    #[arg(long, conflicts_with = "health_http")]
    pub health_cmd: Option<String>,
    /// Health check: an HTTP path fetched on --port.
    #[arg(long)]
    pub health_http: Option<String>,
    /// Command to run instead of the image's (shell form).
    #[arg(long)]
    pub command: Option<String>,
    /// Pin replicas to this node (repeatable).
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// Signal that asks a replica to stop [default: SIGTERM].
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Seconds between the stop signal and SIGKILL [default: 10].
    #[arg(long)]
    pub stop_timeout: Option<u32>,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// How the builder signs in to a private repository (docs/builds.md).
#[derive(Args, Clone, Default)]
#[group(skip)]
pub struct GitAuthArgs {
    /// With --git: a file holding the builder's credential for a private
    /// repository: for https:// a token (TOKEN, or USER:TOKEN where the
    /// host wants a user), for ssh a deploy key (OpenSSH private key). The
    /// control plane keeps it sealed and never shows it.
    #[arg(long, value_name = "FILE", requires = "git")]
    pub git_credential: Option<PathBuf>,
    /// With an ssh --git URL: a file of the host's keys as known_hosts
    /// lines (`ssh-keyscan HOST`). Without it the builder's
    /// /etc/ssh/ssh_known_hosts must know the host.
    #[arg(long, value_name = "FILE", requires = "git")]
    pub git_known_hosts: Option<PathBuf>,
}

/// `deploy --build` / `--git`: the image is built on the fleet from a local
/// directory or a git repository (docs/builds.md).
#[derive(Args, Clone, Default)]
#[group(skip)]
pub struct BuildArgs {
    /// Build the image from this directory (the build context; honours
    /// .containerignore / .dockerignore), push it to the fleet registry and
    /// deploy it by digest.
    #[arg(long, value_name = "DIR")]
    pub build: Option<PathBuf>,
    /// Build the image from this git repository (https://, git://, ssh://
    /// or file:// URL, or USER@HOST:PATH), cloned by the builder node.
    #[arg(long, value_name = "URL", conflicts_with = "build")]
    pub git: Option<String>,
    /// With --git: the branch, tag or commit [default: the default branch].
    #[arg(long = "ref", value_name = "REF", requires = "git")]
    pub git_ref: Option<String>,
    /// With --git: the build context's directory in the repository [default: its root].
    #[arg(long, value_name = "SUBDIR", requires = "git")]
    pub context: Option<String>,
    #[command(flatten)]
    pub auth: GitAuthArgs,
    /// The Dockerfile [default: Containerfile, else Dockerfile, in the context].
    #[arg(long, value_name = "PATH", requires = "source")]
    pub dockerfile: Option<PathBuf>,
    /// Build argument KEY=VALUE (repeatable; ARG in the Dockerfile). Not
    /// for secrets: build arguments stay in the image's history. A
    /// service's --secret is mounted in `RUN --mount=type=secret,id=KEY`.
    #[arg(long = "build-arg", value_parser = key_value, requires = "source")]
    pub build_args: Vec<(String, String)>,
    /// The stage of a multi-stage Dockerfile to build.
    #[arg(long, requires = "source")]
    pub target: Option<String>,
    /// Seconds the build may take [default: 1800].
    #[arg(long, value_name = "SECS", requires = "source")]
    pub build_timeout: Option<u32>,
    /// Build for these platforms (comma-separated: linux/amd64,linux/arm64),
    /// each on a builder node of its architecture, and deploy them as one
    /// manifest list [default: the builder's own].
    #[arg(
        long = "platform",
        value_name = "OS/ARCH",
        value_delimiter = ',',
        requires = "source"
    )]
    pub platforms: Vec<String>,
}

impl BuildArgs {
    pub fn is_build(&self) -> bool {
        self.build.is_some() || self.git.is_some()
    }
}

#[derive(Subcommand)]
pub enum BuildCmd {
    /// Builds, newest first: service, state, builder node, image.
    List {
        /// Only SERVICE's builds.
        service: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One build: state, times, builder, image, release, error.
    Show { id: u64 },
    /// A build's log.
    Logs {
        id: u64,
        /// Keep following until the build ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Stops a build (Podman stops once its running step ends).
    Cancel { id: u64 },
}

/// How a new release replaces the old replicas (docs/services.md).
#[derive(Args, Clone, Copy)]
pub struct RolloutArgs {
    /// New replicas started beyond the wanted count at one time.
    #[arg(long, default_value_t = 1)]
    pub max_surge: u32,
    /// Serving replicas that may be missing at one time.
    #[arg(long, default_value_t = 0)]
    pub max_unavailable: u32,
    /// Seconds a new replica must be healthy before the next step.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub min_ready: u32,
    /// Seconds an old replica keeps running, out of every route, before it is stopped.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub drain: u32,
    /// Seconds a new replica has to become healthy before the rollout fails and rolls back.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub rollout_timeout: u32,
}

/// Whether to wait for the rollout a change starts.
#[derive(Args, Clone, Copy, Default)]
pub struct WaitArgs {
    /// Return once the release is made; `berth service status` follows it.
    #[arg(long)]
    pub detach: bool,
    /// Replace a rollout in progress instead of queueing behind it.
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Create or update a service.
    Deploy(Box<DeployArgs>),
    /// Every service and its replica count.
    List,
    /// A service's spec and each replica: node, IP, state, health, restarts, last error.
    Show { name: String },
    /// Change the number of replicas (a release without a rollout).
    Scale {
        name: String,
        replicas: u32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// The service's releases, newest first: spec, state, who made it, why it failed.
    History { name: String },
    /// Roll out an earlier release's spec again, as a new release.
    Rollback {
        name: String,
        /// The release to go back to [default: the complete one before the current].
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Replace every replica with a fresh one of the same release spec, by
    /// the service's rollout policy (a rolling restart; secrets kept).
    Restart {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// A service's current release and its rollout's progress.
    Status { name: String },
    /// Remove a service and all its containers.
    Remove { name: String },
    /// Build and deploy the service on every push to a branch of a git
    /// repository: prints the webhook URL and secret to give the
    /// repository's host (GitHub, Gitea, Forgejo). Linking again makes a
    /// new secret.
    Link {
        name: String,
        /// The repository, as the builder clones it (https://, git://, ssh://, USER@HOST:PATH).
        #[arg(long, value_name = "URL")]
        git: String,
        #[arg(long, default_value = "main")]
        branch: String,
        /// The build context's directory in the repository [default: its root].
        #[arg(long, value_name = "SUBDIR")]
        context: Option<String>,
        /// The Dockerfile in the context [default: Containerfile, else Dockerfile].
        #[arg(long, value_name = "PATH")]
        dockerfile: Option<String>,
        #[command(flatten)]
        auth: GitAuthArgs,
    },
    /// Stop building the service on pushes.
    Unlink { name: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn route_commands_parse() {
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
                wait: false,
                ..
            })
        ));
        let add = [
            "berth",
            "domain",
            "add",
            "app.example.com",
            "--service",
            "web",
            "--port",
            "80",
        ];
        let c = Cli::try_parse_from(add.iter().chain(&["--wait", "--timeout", "30"])).unwrap();
        assert!(matches!(
            c.command,
            Command::Domain(DomainCmd::Add {
                wait: true,
                timeout: 30,
                ..
            })
        ));
        let c = Cli::try_parse_from(add.iter().chain(&["--wait"])).unwrap();
        assert!(matches!(
            c.command,
            Command::Domain(DomainCmd::Add { timeout: 300, .. })
        ));
        assert!(
            Cli::try_parse_from(add.iter().chain(&["--timeout", "30"])).is_err(),
            "--timeout needs --wait"
        );
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
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(86400));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn lab_arguments_pass_through() {
        let c = Cli::try_parse_from(["berth", "lab", "up", "--nodes", "2", "--help"]).unwrap();
        assert!(matches!(c.command, Command::Lab { ref args } if args == &["up", "--nodes", "2", "--help"]));
    }
}
