//! `berth`: the admin CLI of a Berth control plane. Arguments are in
//! `args.rs`, one handler module per command group in `commands/`, the
//! tables in `output.rs`; the API calls go through the `berth-client` crate.

use clap::Parser;

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = berth_cli::args::Cli::parse();
    match berth_cli::commands::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("berth: {e:#}");
            std::process::exit(1);
        }
    }
}
