//! `berth nodes list|remove|upgrade`.

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
    Ok(())
}
