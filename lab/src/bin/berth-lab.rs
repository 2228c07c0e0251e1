//! `berth-lab` (also run as `berth lab`): builds, inspects and removes a
//! local Berth cluster in network namespaces. Needs root.

use berth_cli::output::print_nodes;
use berth_lab::{demo, Lab, LabGuard, LabSpec};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// berth lab: a whole Berth cluster on this machine (needs root): a control
/// plane, nodes in network namespaces in a WireGuard mesh, a Podman per node,
/// and with --proxies a proxy node and an ACME server (Pebble).
#[derive(Parser)]
#[command(name = "berth lab", bin_name = "berth lab", version)]
struct Cli {
    #[command(subcommand)]
    command: LabCmd,
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
        self.dir.clone().unwrap_or_else(|| berth_lab::default_dir(self.id))
    }

    /// The options that select this lab again, for printed command lines.
    fn args(&self) -> String {
        match &self.dir {
            Some(d) => format!("--id {} --dir {}", self.id, d.display()),
            None => format!("--id {}", self.id),
        }
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
    match run(Cli::parse().command).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("berth lab: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(cmd: LabCmd) -> anyhow::Result<i32> {
    match cmd {
        LabCmd::Up {
            sel,
            nodes,
            proxies,
            bin_dir,
            no_demo,
        } => {
            let dir = sel.dir();
            let spec = LabSpec {
                bin_dir: bin_dir.unwrap_or_else(berth_lab::default_bin_dir),
                proxies,
                replace: false,
                keep_logs: true,
                leave_on_failure: true,
                ..LabSpec::new(sel.id, &dir, nodes)
            };
            let mut l = LabGuard::up(&spec).await?.into_lab();
            println!(
                "lab {}: the test image is {} in the fleet registry; every node pulled it from there",
                sel.id,
                l.test_image()
            );
            if !no_demo {
                demo::deploy(&l, nodes).await;
                if let Some(proxy) = l.state.nodes.iter().find(|n| n.proxy).map(|n| n.name.clone()) {
                    demo::publish(&mut l, &proxy).await;
                }
            }
            let list = l.admin()?.list_nodes().await?;
            print_nodes(&list);
            println!("\nThe lab is up. Point the CLI at it:");
            println!("  {}", exports(&l));
            println!(
                "The dashboard: {}/ (the lab's CA is {}); sign in with a user \
                 (`berth users add NAME`) or the admin token as the password.",
                l.url(),
                l.client_config().ca_file.display()
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
        LabCmd::Env { sel } => println!("{}", exports(&Lab::load(&sel.dir())?)),
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
            berth_lab::destroy_by_id(sel.id, &sel.dir(), keep_logs)?;
            println!("lab {} removed", sel.id);
        }
    }
    Ok(0)
}

/// The shell line that points `berth` at the lab's control plane and
/// names the fleet registry (for `FROM` lines).
fn exports(lab: &Lab) -> String {
    let t = lab.client_config();
    let registry = format!(" BERTH_REGISTRY={}", lab.registry_host());
    format!(
        "export BERTH_URL={} BERTH_ADMIN_TOKEN_FILE={} BERTH_CA_FILE={}{registry}",
        t.url,
        t.admin_token_file.display(),
        t.ca_file.display()
    )
}
