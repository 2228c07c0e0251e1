//! Pebble, the ACME test server (Debian package `pebble`), for labs with
//! proxy nodes. It listens on the lab's host address (so concurrent labs do
//! not collide) and resolves every name through `pebble-challtestsrv`'s DNS,
//! which answers with the first proxy node's underlay address: Pebble then
//! validates HTTP-01 on port 80 and TLS-ALPN-01 on port 443 of that node.

use super::process;
use anyhow::{bail, Context};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const ACME_PORT: u16 = 14000;
pub const MANAGEMENT_PORT: u16 = 15000;
pub const DNS_PORT: u16 = 8053;
pub const CHALLTESTSRV_MANAGEMENT_PORT: u16 = 8055;

/// A running Pebble, saved in lab.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PebbleState {
    pub dir: PathBuf,
    pub host_ip: Ipv4Addr,
    pub pebble_pid: u32,
    pub challtestsrv_pid: u32,
    /// `http-01` or `tls-alpn-01`: what the control plane asks proxies to answer.
    #[serde(default = "http01")]
    pub challenge: String,
}

fn http01() -> String {
    "http-01".into()
}

impl PebbleState {
    /// The ACME directory URL the control plane is given.
    pub fn directory_url(&self) -> String {
        format!("https://{}:{ACME_PORT}/dir", self.host_ip)
    }

    /// The CA of Pebble's own HTTPS certificate (not the ACME root).
    pub fn https_ca(&self) -> PathBuf {
        self.dir.join("https-ca.pem")
    }

    /// The root Pebble issues certificates under (new at every Pebble start).
    pub async fn issuing_root(&self) -> anyhow::Result<String> {
        let ca = std::fs::read(self.https_ca())?;
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .tls_built_in_root_certs(false)
            .use_rustls_tls()
            .timeout(Duration::from_secs(10))
            .build()?;
        let url = format!("https://{}:{MANAGEMENT_PORT}/roots/0", self.host_ip);
        let resp = client.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        if !resp.status().is_success() {
            bail!("GET {url}: HTTP {}", resp.status());
        }
        Ok(resp.text().await?)
    }

    /// How many orders Pebble has received (from its log).
    pub fn orders(&self) -> usize {
        let log = self.dir.parent().map(|d| d.join("pebble.log")).unwrap_or_default();
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("POST /order-plz"))
            .count()
    }

    pub fn stop(&self) -> anyhow::Result<()> {
        process::stop_all(&[self.pebble_pid, self.challtestsrv_pid], Duration::from_secs(3))
    }
}

/// Writes Pebble's HTTPS certificate (signed by a CA made here, so a client
/// can trust it) and config, and starts challtestsrv and Pebble.
pub async fn start(lab_dir: &Path, host_ip: Ipv4Addr, proxy_ip: Ipv4Addr) -> anyhow::Result<PebbleState> {
    for bin in ["pebble", "pebble-challtestsrv"] {
        if which(bin).is_none() {
            bail!("{bin} is not installed: `apt-get install pebble` (scripts/install-deps.sh does it)");
        }
    }
    let dir = lab_dir.join("pebble");
    std::fs::create_dir_all(&dir)?;
    write_https_cert(&dir, host_ip)?;
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": format!("{host_ip}:{ACME_PORT}"),
            "managementListenAddress": format!("{host_ip}:{MANAGEMENT_PORT}"),
            "certificate": dir.join("https.pem"),
            "privateKey": dir.join("https.key"),
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }
    });
    std::fs::write(dir.join("pebble.json"), serde_json::to_vec_pretty(&config)?)?;

    let s = |v: &str| v.to_string();
    let chall = process::spawn_daemon(
        None,
        Path::new("pebble-challtestsrv"),
        &[
            s("-dns01"),
            format!("{host_ip}:{DNS_PORT}"),
            s("-management"),
            format!("{host_ip}:{CHALLTESTSRV_MANAGEMENT_PORT}"),
            s("-defaultIPv4"),
            proxy_ip.to_string(),
            s("-defaultIPv6"),
            s(""),
            s("-http01"),
            s(""),
            s("-https01"),
            s(""),
            s("-tlsalpn01"),
            s(""),
        ],
        &[],
        &lab_dir.join("pebble-challtestsrv.log"),
    )?;
    let pebble = process::spawn_daemon(
        None,
        Path::new("pebble"),
        &[
            s("-config"),
            dir.join("pebble.json").display().to_string(),
            s("-dnsserver"),
            format!("{host_ip}:{DNS_PORT}"),
        ],
        &[
            // Validate at once, and never reject a nonce at random (both
            // only slow tests down).
            (s("PEBBLE_VA_NOSLEEP"), s("1")),
            (s("PEBBLE_WFE_NONCEREJECT"), s("0")),
        ],
        &lab_dir.join("pebble.log"),
    );
    let pebble = match pebble {
        Ok(p) => p,
        Err(e) => {
            let _ = process::stop(chall, Duration::from_secs(2));
            return Err(e);
        }
    };
    let state = PebbleState {
        dir,
        host_ip,
        pebble_pid: pebble,
        challtestsrv_pid: chall,
        challenge: http01(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if state.issuing_root().await.is_ok() {
            return Ok(state);
        }
        if !process::is_alive(pebble) || !process::is_alive(chall) || Instant::now() > deadline {
            let _ = state.stop();
            bail!("Pebble did not come up; see {}", lab_dir.join("pebble.log").display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

fn write_https_cert(dir: &Path, host_ip: Ipv4Addr) -> anyhow::Result<()> {
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "Berth lab Pebble HTTPS CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut leaf = CertificateParams::new(vec![host_ip.to_string(), "localhost".into()])?;
    leaf.distinguished_name.push(DnType::CommonName, "pebble");
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key)?;
    std::fs::write(dir.join("https-ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("https.pem"), leaf_cert.pem())?;
    berth_protocol::keyfile::write_private(&dir.join("https.key"), leaf_key.serialize_pem().as_bytes())?;
    Ok(())
}
