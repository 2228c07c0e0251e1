//! `berth domain add|list|remove` and `berth route tcp add|list|remove`:
//! what the proxy nodes serve.

use crate::args::{DomainCmd, TcpCmd};
use crate::output::{json_or, print_domains};
use berth_client::AdminClient;
use berth_protocol::routes::{CertState, DomainInfo, DomainSpec, TcpRouteSpec};
use std::time::{Duration, Instant};

pub async fn run(api: &AdminClient, cmd: DomainCmd) -> anyhow::Result<()> {
    match cmd {
        DomainCmd::Add {
            domain,
            service,
            port,
            passthrough,
            wait,
            timeout,
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
            if wait {
                let info = wait_served(api, &info.spec.domain, Duration::from_secs(timeout)).await?;
                println!("{}: {}", info.spec.domain, status_line(&info));
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

/// How far a domain is: its certificate and the proxies serving it.
fn status_line(d: &DomainInfo) -> String {
    let cert = match (d.cert_state, &d.last_error) {
        (CertState::Valid, _) => match &d.cert_not_after {
            Some(t) => format!("certificate valid until {t}"),
            None => "certificate valid".into(),
        },
        (CertState::Passthrough, _) => "passthrough (no certificate)".into(),
        (CertState::Failed, Some(e)) => format!("certificate failed ({e}; retried)"),
        (state, _) => format!("certificate {state}"),
    };
    let proxies = match d.proxies_online {
        0 => "no proxy node is online (join one: berth token create --proxy)".to_string(),
        n => format!("served by {}/{n} online proxies", d.proxies_serving),
    };
    format!("{cert}, {proxies}")
}

/// Waits until `domain`'s certificate is issued and every online proxy
/// serves it ([`DomainInfo::served_everywhere`]), printing each change to
/// stderr; an error after `within`.
async fn wait_served(api: &AdminClient, domain: &str, within: Duration) -> anyhow::Result<DomainInfo> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    loop {
        let info = api.get_domain(domain).await?;
        if info.served_everywhere() {
            return Ok(info);
        }
        let line = status_line(&info);
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{domain} is not served by every proxy after {} s: {line}",
                within.as_secs()
            );
        }
        if line != last {
            eprintln!("{domain}: {line}");
            last = line;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(cert_state: CertState, serving: u32, online: u32, last_error: Option<&str>) -> DomainInfo {
        DomainInfo {
            spec: DomainSpec {
                domain: "app.example.com".into(),
                service: "web".into(),
                port: 8080,
                passthrough: cert_state == CertState::Passthrough,
            },
            cert_state,
            cert_not_after: (cert_state == CertState::Valid).then(|| "2030-01-01T00:00:00Z".into()),
            last_error: last_error.map(String::from),
            proxies_serving: serving,
            proxies_online: online,
        }
    }

    #[test]
    fn status_lines_say_what_is_missing() {
        assert_eq!(
            status_line(&info(CertState::Pending, 0, 2, None)),
            "certificate pending, served by 0/2 online proxies"
        );
        assert_eq!(
            status_line(&info(CertState::Failed, 0, 1, Some("CA said no"))),
            "certificate failed (CA said no; retried), served by 0/1 online proxies"
        );
        assert_eq!(
            status_line(&info(CertState::Valid, 1, 2, None)),
            "certificate valid until 2030-01-01T00:00:00Z, served by 1/2 online proxies"
        );
        assert_eq!(
            status_line(&info(CertState::Passthrough, 0, 0, None)),
            "passthrough (no certificate), no proxy node is online (join one: berth token create --proxy)"
        );
    }
}
