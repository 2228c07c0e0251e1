//! `berth service deploy|list|show|status|scale|history|rollback|remove`
//! and `berth apply -f`.

use super::rollout;
use crate::args::{BuildArgs, DeployArgs, ServiceCmd, WaitArgs};
use crate::output::{print_service, print_services};
use berth_client::AdminClient;
use berth_protocol::release::{ReleaseInfo, RollbackRequest, RolloutPolicy};
use berth_protocol::service::ServiceInfo;
use berth_protocol::service::ServiceSpec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
        ServiceCmd::Restart { name, wait } => {
            let info = api.restart_service(&name, wait.force).await?;
            return started(api, &info, wait).await;
        }
        ServiceCmd::Link {
            name,
            git,
            branch,
            context,
            dockerfile,
            auth,
        } => {
            let (credential, known_hosts) = super::build::read_git_auth(&auth)?;
            let link = berth_protocol::build::GitLink {
                url: git,
                branch,
                context,
                dockerfile,
                credential,
                known_hosts,
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
    let entries = parse_service_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    // A build's dir is relative to the file.
    let base = file.parent().unwrap_or(Path::new("."));
    for (spec, build) in entries {
        let code = match build {
            Some(b) => super::build::deploy(api, b.into_args(base), spec, wait).await?,
            None => {
                let info = api.deploy_service_forced(&spec, wait.force).await?;
                started(api, &info, wait).await?
            }
        };
        if code != 0 {
            return Ok(code);
        }
    }
    Ok(0)
}

/// A service file's `[build]` table (`[service.build]` under `[[service]]`):
/// the image is built, as `deploy --build DIR` or `--git URL` builds it.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildTable {
    /// The context directory, relative to the file.
    pub dir: Option<PathBuf>,
    pub git: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// With `git`: the context's directory in the repository.
    pub context: Option<String>,
    pub dockerfile: Option<PathBuf>,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub timeout: Option<u32>,
    /// With `git`: files (relative to the service file) holding the
    /// builder's credential and the ssh host's known_hosts lines.
    pub credential_file: Option<PathBuf>,
    pub known_hosts_file: Option<PathBuf>,
    /// `["linux/amd64", "linux/arm64"]`: one manifest list.
    #[serde(default)]
    pub platforms: Vec<String>,
}

impl BuildTable {
    fn into_args(self, base: &Path) -> BuildArgs {
        // A Dockerfile beside a directory build is relative to the file too;
        // in a git build it is a path in the repository.
        let from_file = self.git.is_none();
        BuildArgs {
            build: self.dir.map(|d| base.join(d)),
            git: self.git,
            git_ref: self.git_ref,
            context: self.context,
            dockerfile: self.dockerfile.map(|d| if from_file { base.join(d) } else { d }),
            build_args: self.args.into_iter().collect(),
            target: self.target,
            build_timeout: self.timeout,
            platforms: self.platforms,
            auth: crate::args::GitAuthArgs {
                git_credential: self.credential_file.map(|f| base.join(f)),
                git_known_hosts: self.known_hosts_file.map(|f| base.join(f)),
            },
        }
    }
}

/// A service file: one service at the top level, or several as
/// [[service]]; each may have a `build` table instead of an `image`.
pub fn parse_service_file(text: &str) -> Result<Vec<(ServiceSpec, Option<BuildTable>)>, String> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let tables: Vec<toml::Table> = match doc.get("service") {
        Some(toml::Value::Array(items)) if doc.len() == 1 => items
            .iter()
            .map(|v| v.as_table().cloned().ok_or("service: each [[service]] must be a table"))
            .collect::<Result<_, _>>()?,
        _ => vec![doc],
    };
    let mut out = vec![];
    for mut t in tables {
        let build = match t.remove("build") {
            None => None,
            Some(b) => {
                let b: BuildTable = b
                    .try_into()
                    .map_err(|e: toml::de::Error| format!("build: {}", e.message()))?;
                if b.dir.is_some() == b.git.is_some() {
                    return Err("build: give exactly one of dir and git".into());
                }
                if b.git.is_none() && (b.credential_file.is_some() || b.known_hosts_file.is_some()) {
                    return Err("build: credential_file and known_hosts_file go with git".into());
                }
                if t.contains_key("image") {
                    return Err("image: a service with a build table gets its image from the build".into());
                }
                t.insert("image".into(), toml::Value::String(String::new()));
                Some(b)
            }
        };
        let spec: ServiceSpec = toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        match &build {
            Some(_) => {
                let mut planned = spec.clone();
                planned.image = format!("registry.invalid/{}:build", spec.name);
                planned.validate()?;
            }
            None => spec.validate()?,
        }
        out.push((spec, build));
    }
    Ok(out)
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
        assert_eq!(one[0].0.replicas, 2);
        assert_eq!(one[0].0.env["MODE"], "x");
        assert_eq!(one[0].1, None);
        let many =
            parse_service_file("[[service]]\nname = \"a\"\nimage = \"x\"\n[[service]]\nname = \"b\"\nimage = \"y\"\n")
                .unwrap();
        assert_eq!(many.iter().map(|s| s.0.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let err = parse_service_file("name = \"Web\"\nimage = \"x\"\n").unwrap_err();
        assert!(err.starts_with("name:"), "{err}");
        assert!(parse_service_file("name = \"web\"\nimage = \"x\"\nreplica = 2\n").is_err());
    }

    #[test]
    fn build_tables() {
        let one = parse_service_file("name = \"site\"\nport = 8080\n[build]\ndir = \"site\"\nargs = { V = \"1\" }\n")
            .unwrap();
        let (spec, build) = &one[0];
        assert_eq!(spec.image, "");
        let b = build.clone().unwrap();
        assert_eq!(b.dir.as_deref(), Some(std::path::Path::new("site")));
        assert_eq!(b.args["V"], "1");
        let args = b.into_args(std::path::Path::new("/srv/app"));
        assert_eq!(args.build.as_deref(), Some(std::path::Path::new("/srv/app/site")));

        let many = parse_service_file(
            "[[service]]\nname = \"a\"\nimage = \"x\"\n[[service]]\nname = \"b\"\n[service.build]\ngit = \"https://x/y.git\"\nref = \"main\"\n",
        )
        .unwrap();
        assert_eq!(many[1].1.as_ref().unwrap().git_ref.as_deref(), Some("main"));
        let private = parse_service_file(
            "name = \"p\"\n[build]\ngit = \"git@h:o/p.git\"\ncredential_file = \"keys/deploy\"\nknown_hosts_file = \"kh\"\n",
        )
        .unwrap();
        let args = private[0]
            .1
            .clone()
            .unwrap()
            .into_args(std::path::Path::new("/srv/app"));
        assert_eq!(
            args.auth.git_credential.as_deref(),
            Some(std::path::Path::new("/srv/app/keys/deploy"))
        );
        assert_eq!(
            args.auth.git_known_hosts.as_deref(),
            Some(std::path::Path::new("/srv/app/kh"))
        );
        assert!(many[0].1.is_none());

        for (bad, starts) in [
            ("name = \"s\"\nimage = \"x\"\n[build]\ndir = \".\"\n", "image:"),
            ("name = \"s\"\n[build]\n", "build:"),
            ("name = \"s\"\n[build]\ndir = \".\"\ngit = \"https://x\"\n", "build:"),
            ("name = \"s\"\n[build]\ndir = \".\"\nflavour = 1\n", "build:"),
            (
                "name = \"s\"\n[build]\ndir = \".\"\ncredential_file = \"t\"\n",
                "build:",
            ),
            ("name = \"S\"\n[build]\ndir = \".\"\n", "name:"),
        ] {
            let err = parse_service_file(bad).unwrap_err();
            assert!(err.starts_with(starts), "{bad:?}: {err}");
        }
    }
}
