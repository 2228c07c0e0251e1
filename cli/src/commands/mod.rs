//! One module per command group; [`run`] dispatches a parsed command line.

mod build;
mod domain;
mod events;
mod lab;
mod logs;
mod nodes;
mod registry;
mod release;
mod rollout;
mod service;
mod token;
mod users;

pub use service::parse_service_file;

use crate::args::{Cli, Command, RouteCmd};
use berth_client::{AdminClient, ClientConfig};

/// Runs a command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let cfg = ClientConfig {
        url: cli.url,
        admin_token_file: cli.admin_token_file,
        ca_file: cli.ca_file,
    };
    let api = || AdminClient::new(&cfg);
    match cli.command {
        Command::Token(t) => token::run(&api()?, t).await?,
        Command::Nodes(n) => nodes::run(&api()?, n).await?,
        Command::Service(s) => return service::run(&api()?, s).await,
        Command::Apply { file, wait } => return service::apply(&api()?, &file, wait).await,
        Command::Domain(d) => domain::run(&api()?, d).await?,
        Command::Route(RouteCmd::Tcp(t)) => domain::run_tcp(&api()?, t).await?,
        Command::Release(r) => release::run(r)?,
        Command::Registry(r) => registry::run(&api()?, &cfg.ca_file, r).await?,
        Command::Image(i) => registry::run_image(&api()?, i).await?,
        Command::Build(b) => return build::run(&api()?, b).await,
        Command::Lab { args } => return lab::run(&args),
        Command::Logs(l) => logs::logs(&api()?, l).await?,
        Command::Exec(e) => return logs::exec(&api()?, e).await,
        Command::Events(e) => events::run(&api()?, e).await?,
        Command::Users(u) => users::run(&api()?, u).await?,
    }
    Ok(0)
}
