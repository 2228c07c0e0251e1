//! `berth nodes list|remove|logs|upgrade`.

use crate::args::NodesCmd;
use crate::output::{json_or, print_nodes};
use berth_client::AdminClient;

pub async fn run(api: &AdminClient, cmd: NodesCmd) -> anyhow::Result<()> {
    match cmd {
        NodesCmd::List { json } => json_or(json, &api.list_nodes().await?, |n| print_nodes(n))?,
        NodesCmd::Remove { name } => {
            let rev = api.remove_node(&name).await?;
            println!("removed node {name} (revision {rev})");
        }
        NodesCmd::Logs {
            name,
            follow,
            since,
            tail,
            timestamps,
            json,
        } => {
            let q = berth_client::LogsQuery {
                follow,
                since,
                tail,
                replica: None,
            };
            super::logs::print_lines(json, timestamps, |each| api.node_logs(&name, &q, each)).await?;
        }
        NodesCmd::Upgrade { version, canary } => {
            let r = api.upgrade_nodes(&version, canary.as_deref()).await?;
            println!("upgrading {} to {version} first", r.canary);
            if !r.waiting.is_empty() {
                println!("then, once it reports {version}: {}", r.waiting.join(", "));
            }
            println!("follow with `berth nodes list` (VERSION and ERROR columns)");
        }
    }
    Ok(())
}
