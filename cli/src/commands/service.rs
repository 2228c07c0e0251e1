//! `berth service deploy|list|show|scale|remove` and `berth apply -f`.

use crate::args::{DeployArgs, ServiceCmd};
use crate::output::{print_service, print_services};
use berth_client::AdminClient;
use berth_protocol::service::ServiceSpec;
use std::path::Path;

pub async fn run(api: &AdminClient, cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Deploy(a) => {
            let spec = spec_of(*a);
            spec.validate().map_err(anyhow::Error::msg)?;
            print_service(&api.deploy_service(&spec).await?);
        }
        ServiceCmd::List => print_services(&api.list_services().await?),
        ServiceCmd::Show { name } => print_service(&api.show_service(&name).await?),
        ServiceCmd::Scale { name, replicas } => print_service(&api.scale_service(&name, replicas).await?),
        ServiceCmd::Remove { name } => {
            api.remove_service(&name).await?;
            println!("removed service {name}");
        }
    }
    Ok(())
}

fn spec_of(a: DeployArgs) -> ServiceSpec {
    ServiceSpec {
        name: a.name,
        image: a.image,
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
        ..Default::default()
    }
}

/// `berth apply -f FILE`: deploys every service in the file, in order.
pub async fn apply(api: &AdminClient, file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    for spec in parse_service_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))? {
        let info = api.deploy_service(&spec).await?;
        println!("deployed {} ({} replicas)", info.spec.name, info.replicas.len());
    }
    Ok(())
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
