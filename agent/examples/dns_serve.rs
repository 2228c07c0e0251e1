//! Serves a fixed cluster zone with the agent's DNS server, for bench/dns/run.sh:
//! `svc0..svc{N-1}.<zone>`, each with two A records (10.200.X.1 local, 10.200.X.2 remote).
//!
//! cargo run --release -p berth-agent --example dns_serve -- --listen 127.0.0.1:5353

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use berth_agent::dns::{DnsConfig, DnsServer, Records, ServiceAddr};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Listen address (UDP and TCP); repeatable.
    #[arg(long, default_value = "127.0.0.1:5353")]
    listen: Vec<SocketAddr>,
    #[arg(long, default_value = "internal")]
    zone: String,
    /// Number of services (svc0..).
    #[arg(long, default_value_t = 50)]
    names: u16,
    /// Tokio worker threads; 0 runs everything on the current thread.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Upstream resolver for names outside the zone; repeatable.
    #[arg(long)]
    upstream: Vec<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = if args.threads == 0 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let mut services = BTreeMap::new();
    for i in 0..args.names {
        let (hi, lo) = ((i >> 8) as u8, i as u8);
        services.insert(
            format!("svc{i}"),
            vec![
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 200 + hi, lo, 1),
                    local: true,
                    healthy: true,
                },
                ServiceAddr {
                    ip: Ipv4Addr::new(10, 200 + hi, lo, 2),
                    local: false,
                    healthy: true,
                },
            ],
        );
    }
    let records = Records {
        services,
        ..Records::default()
    };
    let cfg = DnsConfig {
        listen: args.listen,
        zone: args.zone,
        upstreams: args.upstream,
    };
    let server = DnsServer::start(cfg, records).await?;
    for addr in server.local_addrs() {
        println!("listening {addr}");
    }
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}
