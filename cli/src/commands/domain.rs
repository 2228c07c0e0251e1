//! `berth domain add|list|remove` and `berth route tcp add|list|remove`:
//! what the proxy nodes serve.

use crate::args::{DomainCmd, TcpCmd};
use crate::output::{json_or, print_domains};
use berth_client::AdminClient;
use berth_protocol::routes::{DomainSpec, TcpRouteSpec};

pub async fn run(api: &AdminClient, cmd: DomainCmd) -> anyhow::Result<()> {
    match cmd {
        DomainCmd::Add {
            domain,
            service,
            port,
            passthrough,
        } => {
            let spec = DomainSpec {
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
        DomainCmd::List { json } => json_or(json, &api.list_domains().await?, |d| print_domains(d))?,
        DomainCmd::Remove { domain } => {
            api.remove_domain(&domain).await?;
            println!("removed domain {domain}");
        }
    }
    Ok(())
}

pub async fn run_tcp(api: &AdminClient, cmd: TcpCmd) -> anyhow::Result<()> {
    match cmd {
        TcpCmd::Add { listen, service, port } => {
            let spec = TcpRouteSpec { listen, service, port };
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
