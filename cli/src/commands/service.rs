//! `berth service deploy|list|show|status|scale|history|rollback|remove`
//! and `berth apply -f`.

use super::rollout;
use crate::args::{DeployArgs, ServiceCmd, WaitArgs};
use crate::output::{print_service, print_services};
use berth_client::AdminClient;
use berth_protocol::release::{ReleaseInfo, RollbackRequest, RolloutPolicy};
use berth_protocol::service::ServiceInfo;
use berth_protocol::service::ServiceSpec;
use std::path::Path;

pub async fn run(api: &AdminClient, cmd: ServiceCmd) -> anyhow::Result<i32> {
    match cmd {
        ServiceCmd::Deploy(a) => {
            let wait = a.wait;
            let build = a.build.clone();
            let spec = spec_of(*a);
            if build.is_build() {
                return super::build::deploy(api, build, spec, wait).await;
            }
            spec.validate().map_err(anyhow::Error::msg)?;
            let info = api.deploy_service_forced(&spec, wait.force).await?;
            return started(api, &info, wait).await;
        }
        ServiceCmd::List => print_services(&api.list_services().await?),
        ServiceCmd::Show { name } => print_service(&api.show_service(&name).await?),
        ServiceCmd::Status { name } => rollout::print_status(&api.show_service(&name).await?),
        ServiceCmd::Scale { name, replicas, wait } => {
            let info = api.scale_service(&name, replicas).await?;
            return started(api, &info, wait).await;
        }
        ServiceCmd::History { name } => print_history(&api.list_releases(&name).await?),
        ServiceCmd::Rollback { name, to, wait } => {
            let req = RollbackRequest { to, force: wait.force };
            let info = api.rollback_service(&name, &req).await?;
            return started(api, &info, wait).await;
        }
        ServiceCmd::Link {
            name,
            git,
            branch,
            context,
            dockerfile,
        } => {
            let link = berth_protocol::build::GitLink {
                url: git,
                branch,
                context,
                dockerfile,
            };
            let info = api.link_service(&name, &link).await?;
            println!(
                "{name} builds and deploys every push to {} of {}",
                info.link.branch, info.link.url
            );
            println!("Add a webhook to the repository (push events, content type application/json):");
            println!("  URL:    {}{}", api.base_url(), info.hook_path);
            println!("  secret: {}", info.secret.unwrap_or_default());
            println!("The secret is shown only now; `berth service link` again makes a new one.");
        }
        ServiceCmd::Unlink { name } => {
            api.unlink_service(&name).await?;
            println!("{name} no longer builds on pushes");
        }
        ServiceCmd::Remove { name } => {
            api.remove_service(&name).await?;
            println!("removed service {name}");
        }
    }
    Ok(0)
}

/// After a change: the plan, then (unless detached) the rollout's progress.
pub(super) async fn started(api: &AdminClient, info: &ServiceInfo, wait: WaitArgs) -> anyhow::Result<i32> {
    rollout::print_plan(info);
    let Some(r) = &info.rollout else {
        print_service(info);
        return Ok(0);
    };
    if wait.detach {
        println!("detached; follow it with `berth service status {}`", info.spec.name);
        return Ok(0);
    }
    rollout::follow(api, &info.spec.name, r.release).await
}

fn spec_of(a: DeployArgs) -> ServiceSpec {
    ServiceSpec {
        name: a.name,
        image: a.image.unwrap_or_default(),
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
        stop_signal: a.stop_signal,
        stop_timeout: a.stop_timeout,
        rollout: RolloutPolicy {
            max_surge: a.rollout.max_surge,
            max_unavailable: a.rollout.max_unavailable,
            min_ready_secs: a.rollout.min_ready,
            drain_secs: a.rollout.drain,
            timeout_secs: a.rollout.rollout_timeout,
        },
    }
}

/// Seconds since unix time `t`.
fn age(t: i64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    (now - t).max(0) as u64
}

/// `IMAGE (0123456789ab)`: the image and the short ID (12 hex digits, as
/// `podman images` shows it) of what the release's replicas ran, once a
/// node reported it.
fn image_with_digest(image: &str, digest: Option<&str>) -> String {
    match digest.and_then(|d| d.split_once(':')) {
        Some((_, hex)) => format!("{image} ({})", &hex[..hex.len().min(12)]),
        None => image.to_string(),
    }
}

fn print_history(list: &[ReleaseInfo]) {
    println!(
        "{:<8} {:<12} {:<20} {:<8} {:<9} {:<56} REASON",
        "RELEASE", "STATE", "CREATED", "BY", "REPLICAS", "IMAGE"
    );
    for r in list {
        println!(
            "{:<8} {:<12} {:<20} {:<8} {:<9} {:<56} {}",
            r.number,
            r.state,
            format!("{} ago", crate::output::humantime(age(r.created_at))),
            r.created_by,
            r.spec.replicas,
            image_with_digest(&r.spec.image, r.image_digest.as_deref()),
            r.reason.as_deref().unwrap_or("").replace('\n', " | ")
        );
    }
}

/// `berth apply -f FILE`: deploys every service in the file, in order,
/// each rollout followed to its end before the next (unless detached).
pub async fn apply(api: &AdminClient, file: &Path, wait: WaitArgs) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    for spec in parse_service_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))? {
        let info = api.deploy_service_forced(&spec, wait.force).await?;
        let code = started(api, &info, wait).await?;
        if code != 0 {
            return Ok(code);
        }
    }
    Ok(0)
}

/// A service file: one service at the top level, or several as [[service]].
pub fn parse_service_file(text: &str) -> Result<Vec<ServiceSpec>, String> {
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

#[cfg(test)]
mod tests {
    use super::parse_service_file;

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
