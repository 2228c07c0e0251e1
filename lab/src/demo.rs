//! The test image's web server as a service: the `demo` that `berth lab up`
//! deploys (and puts behind `demo.example.com` on a proxy node), the spec the
//! tests and benchmarks start from, and waiting for replicas to be healthy
//! and for domains to be served.

use crate::Lab;
use anyhow::{bail, Context};
use berth_client::AdminClient;
use berth_protocol::routes::{CertState, DomainInfo, DomainSpec};
use berth_protocol::service::{ServiceInfo, ServiceSpec};
use std::time::{Duration, Instant};

/// The public name of the demo on the lab's proxy nodes.
pub const DEMO_DOMAIN: &str = "demo.example.com";
/// The port the test image's web server (busybox httpd) listens on.
pub const WEB_PORT: u16 = 8080;
/// How long `lab up` waits for the demo service to be running and healthy.
const DEMO_WAIT: Duration = Duration::from_secs(30);

/// `replicas` of the test image's web server on port 8080 (the image from
/// the lab's fleet registry), health-checked over HTTP on `/`, placed anywhere.
pub fn web_service(lab: &Lab, name: &str, replicas: u32) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        image: lab.test_image(),
        replicas,
        port: Some(WEB_PORT),
        health_http: Some("/".into()),
        ..Default::default()
    }
}

/// Counts of a service's replicas: (running, running and healthy).
pub fn running_healthy(info: &ServiceInfo) -> (usize, usize) {
    let running = info.replicas.iter().filter(|r| r.state == "running");
    (running.clone().count(), running.filter(|r| r.healthy).count())
}

/// Waits until `name` has exactly `n` replicas, all running and healthy;
/// `progress` sees every answer on the way.
pub async fn wait_healthy(
    admin: &AdminClient,
    name: &str,
    n: usize,
    within: Duration,
    mut progress: impl FnMut(&ServiceInfo),
) -> anyhow::Result<ServiceInfo> {
    let deadline = Instant::now() + within;
    loop {
        let info = admin.show_service(name).await?;
        progress(&info);
        if info.replicas.len() == n && running_healthy(&info).1 == n {
            return Ok(info);
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not get {n} healthy replicas within {within:?}: {:?}",
                info.replicas
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deploys the `demo` service (2 replicas, or 1 on a one-worker lab) and
/// waits for its replicas, printing progress. Problems are warnings: the lab
/// stays up either way.
pub async fn deploy(lab: &Lab, workers: u16) {
    let id = lab.state.id;
    let spec = web_service(lab, "demo", u32::from(workers.min(2)));
    let admin = match lab.admin() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("warning: demo not deployed: {e:#}");
            return;
        }
    };
    eprintln!(
        "lab {id}: deploying the demo service ({} replicas of {})...",
        spec.replicas, spec.image
    );
    if let Err(e) = admin.deploy_service(&spec).await {
        eprintln!("warning: deploying the demo service failed: {e:#}");
        return;
    }
    let want = spec.replicas as usize;
    let mut last = String::new();
    let progress = |info: &ServiceInfo| {
        let (running, healthy) = running_healthy(info);
        let errors: Vec<String> = info
            .replicas
            .iter()
            .filter_map(|r| r.error.as_ref().map(|e| format!("{}: {e}", r.replica)))
            .collect();
        let line = format!(
            "demo: {running}/{want} running, {healthy}/{want} healthy{}",
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join("; "))
            }
        );
        if line != last {
            eprintln!("lab {id}: {line}");
            last = line;
        }
    };
    if wait_healthy(&admin, "demo", want, DEMO_WAIT, progress).await.is_err() {
        eprintln!(
            "warning: the demo service is not running and healthy after {} s; the lab stays up. \
             Look at `berth service show demo` (after the exports below) and the node logs {}/n*.log",
            DEMO_WAIT.as_secs(),
            lab.state.dir.display()
        );
    }
}

/// Puts the demo behind [`DEMO_DOMAIN`] on the lab's proxy nodes, with a
/// certificate from a Pebble ACME server the lab starts, waits until every
/// proxy serves it (so the first request does not meet a proxy without the
/// certificate) and prints the curl command that reaches it. A failure is a
/// warning: the lab stays up.
pub async fn publish(lab: &mut Lab, proxy: &str) {
    eprintln!(
        "lab {}: starting Pebble (ACME) and ordering a certificate for {DEMO_DOMAIN}...",
        lab.state.id
    );
    match try_publish(lab, proxy).await {
        Ok((root, ip)) => {
            println!("HTTPS through the proxy node {proxy}, certificate from the lab's Pebble:");
            println!(
                "  curl --cacert {} --resolve {DEMO_DOMAIN}:443:{ip} https://{DEMO_DOMAIN}/",
                root.display()
            );
        }
        Err(e) => eprintln!(
            "warning: the public demo is not ready: {e:#}\n  see `berth domain list` and {}",
            lab.state.dir.display()
        ),
    }
}

/// Returns Pebble's root (written to the lab dir) and the proxy's address.
async fn try_publish(lab: &mut Lab, proxy: &str) -> anyhow::Result<(std::path::PathBuf, std::net::Ipv4Addr)> {
    lab.start_pebble(proxy).await?;
    lab.wait_converged(Duration::from_secs(60)).await?;
    let admin = lab.admin()?;
    admin
        .add_domain(&DomainSpec {
            domain: DEMO_DOMAIN.into(),
            service: "demo".into(),
            port: WEB_PORT,
            passthrough: false,
        })
        .await?;
    let id = lab.state.id;
    let mut last = String::new();
    let progress = |d: &DomainInfo| {
        let line = format!(
            "{DEMO_DOMAIN}: certificate {}, served by {} proxies{}",
            d.cert_state,
            d.proxies(),
            d.last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
        );
        if line != last {
            eprintln!("lab {id}: {line}");
            last = line;
        }
    };
    wait_served(&admin, DEMO_DOMAIN, Duration::from_secs(90), progress).await?;
    let pebble = lab.state.pebble.clone().context("no Pebble")?;
    let root = lab.state.dir.join("pebble-root.pem");
    std::fs::write(&root, pebble.issuing_root().await?)?;
    let index = lab.node(proxy)?.index;
    Ok((root, lab.net.node_ip(index)))
}

/// Waits until `domain`'s certificate is issued and every online proxy
/// serves it ([`DomainInfo::served_everywhere`]: `berth domain list` shows
/// `valid` and `N/N`); `progress` sees every answer on the way.
pub async fn wait_served(
    admin: &AdminClient,
    domain: &str,
    within: Duration,
    mut progress: impl FnMut(&DomainInfo),
) -> anyhow::Result<DomainInfo> {
    let deadline = Instant::now() + within;
    loop {
        let d = admin.get_domain(domain).await?;
        progress(&d);
        if d.served_everywhere() {
            return Ok(d);
        }
        if Instant::now() > deadline {
            bail!(
                "{domain} is not served by every proxy after {} s: certificate {}, served by {} online proxies{}",
                within.as_secs(),
                d.cert_state,
                d.proxies(),
                d.last_error.map(|e| format!(", last error: {e}")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `domain`'s certificate is valid (whether the proxies serve
/// it yet or not: see [`wait_served`]).
pub async fn wait_cert(admin: &AdminClient, domain: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let list = admin.list_domains().await?;
        let d = list.iter().find(|d| d.spec.domain == domain);
        if d.is_some_and(|d| d.cert_state == CertState::Valid) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no certificate for {domain} after {} s: {:?}",
                within.as_secs(),
                d.and_then(|d| d.last_error.clone())
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
