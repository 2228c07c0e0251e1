//! `berth token create|list|revoke`: single-use join tokens.

use crate::args::TokenCmd;
use crate::output::{humantime, now};
use berth_client::AdminClient;

pub async fn run(api: &AdminClient, cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { proxy, ttl, quiet } => {
            let t = api.create_token(proxy, ttl).await?;
            if quiet {
                println!("{}", t.token);
            } else {
                println!("token {} ({}, expires in {})", t.id, t.role.as_str(), humantime(ttl));
                println!("{}", t.token);
                println!("\nOn the new server, run:\n  {}", t.agent_command);
            }
        }
        TokenCmd::List => {
            println!("{:<10} {:<7} {:<8} {:<12} USED BY", "ID", "ROLE", "STATE", "EXPIRES");
            for t in api.list_tokens().await? {
                let left = t.expires_at - now();
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
    Ok(())
}
