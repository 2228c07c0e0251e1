//! Certificates for public domains, ordered with ACME (instant-acme).
//!
//! One background task per control plane. For each non-passthrough domain
//! without a valid certificate (or past two thirds of its lifetime) it
//! claims the domain in the store (a lease, so replicas sharing PostgreSQL
//! never order twice), creates an order, publishes the challenge in every
//! proxy's desired state, waits until the online proxies have applied it,
//! tells the CA to validate, finalizes with a fresh ECDSA P-256 key and
//! stores chain + key (the key sealed to the control plane's secrets key).
//! Every proxy then gets the stored certificate: one order per domain, not
//! per proxy. Failures are recorded on the domain and retried with backoff;
//! the API never waits for any of this.
//!
//! With DNS-01 no proxy is involved: an operator-supplied hook program
//! publishes the TXT record (`HOOK present FQDN VALUE`) and removes it
//! afterwards (`HOOK cleanup FQDN VALUE`), like lego's `exec` provider.

use crate::state::SharedState;
use crate::store::now;
use crate::store::routes::{ChallengeRow, DomainRow};
use anyhow::{anyhow, bail, Context};
use berth_protocol::Role;
use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder,
    Order, OrderStatus, RetryPolicy,
};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// First retry after a failure; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: i64 = 30;
const MAX_BACKOFF: i64 = 3600;
/// How long a claimed domain stays claimed if this process dies mid-order.
const LEASE_SECS: i64 = 600;
/// Longest one order may take (a CA that stops answering must not stall
/// every other domain).
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest pause between passes (new domains also wake the task at once).
const MAX_IDLE: Duration = Duration::from_secs(3600);
/// Longest `--acme-dns-propagation-secs`; the order's timeout and lease grow by it.
pub const MAX_DNS_PROPAGATION: Duration = Duration::from_secs(3600);
/// How much of a failing hook's output is kept in the domain's error.
const HOOK_OUTPUT_MAX: usize = 1000;

/// The ACME challenge a control plane answers (`--acme-challenge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    Http01,
    TlsAlpn01,
    /// A TXT record published by `--acme-dns-hook`; proxies play no part.
    Dns01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Dns01 => "dns-01",
        }
    }

    fn acme_type(self) -> ChallengeType {
        match self {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            ChallengeKind::Dns01 => ChallengeType::Dns01,
        }
    }
}

impl std::str::FromStr for ChallengeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [ChallengeKind::Http01, ChallengeKind::TlsAlpn01, ChallengeKind::Dns01]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("{s:?}: expected http-01, tls-alpn-01 or dns-01"))
    }
}

impl std::fmt::Display for ChallengeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// ACME directory URL.
    pub directory: String,
    /// Account contact, e.g. `mailto:ops@example.com`.
    pub contact: Option<String>,
    /// An extra root (PEM) to trust for the ACME server, besides the system's.
    pub ca_file: Option<PathBuf>,
    pub challenge: ChallengeKind,
    /// How long to wait for online proxies to apply a published challenge.
    pub apply_timeout: Duration,
    /// DNS-01: the program run as `HOOK present|cleanup FQDN VALUE`.
    pub dns_hook: Option<PathBuf>,
    /// DNS-01: wait this long after `present` before asking the CA (for
    /// DNS providers whose changes take time to reach their servers).
    pub dns_propagation: Duration,
    /// DNS-01: a hook run taking longer is killed and counts as failed.
    pub dns_hook_timeout: Duration,
}

impl AcmeConfig {
    pub fn new(directory: impl Into<String>) -> AcmeConfig {
        AcmeConfig {
            directory: directory.into(),
            contact: None,
            ca_file: None,
            challenge: ChallengeKind::Http01,
            apply_timeout: Duration::from_secs(30),
            dns_hook: None,
            dns_propagation: Duration::ZERO,
            dns_hook_timeout: Duration::from_secs(120),
        }
    }

    /// Checks what can be checked before serving: the contact's form, the
    /// CA file and the DNS-01 flags.
    pub fn validate(&self) -> anyhow::Result<()> {
        let dns = self.challenge == ChallengeKind::Dns01;
        match &self.dns_hook {
            None if dns => bail!(
                "--acme-dns-hook: required with --acme-challenge dns-01 (the program that publishes the TXT record)"
            ),
            Some(h) if !dns => bail!(
                "--acme-dns-hook {}: only used with --acme-challenge dns-01 (the challenge is {})",
                h.display(),
                self.challenge.as_str()
            ),
            Some(h) => check_hook(h)?,
            None => {}
        }
        if !self.dns_propagation.is_zero() && !dns {
            bail!("--acme-dns-propagation-secs: only used with --acme-challenge dns-01");
        }
        if self.dns_propagation > MAX_DNS_PROPAGATION {
            bail!(
                "--acme-dns-propagation-secs: {} is more than {}",
                self.dns_propagation.as_secs(),
                MAX_DNS_PROPAGATION.as_secs()
            );
        }
        if let Some(c) = &self.contact {
            if !c.starts_with("mailto:") || c.len() < 10 || !c.contains('@') {
                bail!("--acme-contact: {c:?} is not a mailto: URL like mailto:ops@example.com");
            }
        }
        if !(self.directory.starts_with("https://") || self.directory.starts_with("http://")) {
            bail!("--acme-directory: {:?} is not an http(s) URL", self.directory);
        }
        self.builder().map(|_| ())
    }

    /// An account builder whose HTTP client trusts the system roots plus
    /// `ca_file` (Pebble's HTTPS certificate is signed by its own CA).
    fn builder(&self) -> anyhow::Result<AccountBuilder> {
        let Some(file) = &self.ca_file else {
            return Account::builder().context("ACME HTTP client");
        };
        let mut roots = rustls::RootCertStore::empty();
        if let Ok(pem) = std::fs::read("/etc/ssl/certs/ca-certificates.crt") {
            roots.add_parsable_certificates(rustls_pemfile::certs(&mut &pem[..]).flatten());
        }
        let pem = std::fs::read(file).with_context(|| format!("--acme-ca-file {}", file.display()))?;
        let extra: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .with_context(|| format!("--acme-ca-file {}: not PEM", file.display()))?;
        if extra.is_empty() {
            bail!("--acme-ca-file {}: no certificate in it", file.display());
        }
        for c in extra {
            roots
                .add(c)
                .with_context(|| format!("--acme-ca-file {}: unusable certificate", file.display()))?;
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, instant_acme::BodyWrapper<bytes::Bytes>>(https);
        Ok(Account::builder_with_http(Box::new(client)))
    }
}

/// Starts the certificate task; it runs for the life of the process.
pub fn spawn(state: SharedState, cfg: AcmeConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut acme = Acme {
            state,
            cfg,
            account: None,
            dns_records: vec![],
        };
        loop {
            let idle = acme.pass().await;
            tokio::select! {
                _ = acme.state.acme_wake.notified() => {}
                _ = tokio::time::sleep(idle) => {}
            }
        }
    })
}

struct Acme {
    state: SharedState,
    cfg: AcmeConfig,
    account: Option<Account>,
    /// DNS-01 records (FQDN, value) `present` was run for in the current
    /// order; kept here so they are cleaned up even when the order times out.
    dns_records: Vec<(String, String)>,
}

/// Seconds to wait after the `failures`-th failure in a row.
pub fn backoff(failures: i64) -> i64 {
    let doublings = (failures - 1).clamp(0, 20) as u32;
    (FIRST_BACKOFF << doublings).min(MAX_BACKOFF)
}

impl Acme {
    /// Orders what is due; returns how long to sleep until something is.
    async fn pass(&mut self) -> Duration {
        let domains = match self.state.store.list_domains().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "ACME: cannot list domains");
                return Duration::from_secs(FIRST_BACKOFF as u64);
            }
        };
        let mut idle = MAX_IDLE;
        for d in domains.iter().filter(|d| !d.spec.passthrough) {
            let now = now();
            let due = due_at(d, now).max(d.next_attempt_at);
            if due > now {
                idle = idle.min(Duration::from_secs((due - now) as u64));
                continue;
            }
            let propagation = self.cfg.dns_propagation;
            match self
                .state
                .store
                .claim_domain(&d.spec.domain, now, now + LEASE_SECS + propagation.as_secs() as i64)
                .await
            {
                Ok(true) => {}
                // Not due after all, or another replica is on it.
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "ACME: cannot claim a domain");
                    continue;
                }
            }
            let domain = d.spec.domain.as_str();
            tracing::info!(%domain, challenge = self.cfg.challenge.as_str(), "ACME: ordering a certificate");
            let limit = ORDER_TIMEOUT + propagation;
            let res = match tokio::time::timeout(limit, self.issue(domain)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!("the order took longer than {} s", limit.as_secs())),
            };
            self.dns_cleanup(domain).await;
            // Withdraw the challenge whatever happened.
            match self.state.store.clear_challenges(domain).await {
                Ok(Some(rev)) => self.state.revision_moved(rev).await,
                Ok(None) => {}
                Err(e) => tracing::warn!(%domain, error = %e, "ACME: cannot withdraw the challenge"),
            }
            match res {
                Ok(rev) => {
                    tracing::info!(%domain, "ACME: certificate stored");
                    if let Some(rev) = rev {
                        self.state.revision_moved(rev).await;
                    }
                }
                Err(e) => {
                    let failures = d.failures + 1;
                    let wait = backoff(failures);
                    let msg = format!("{e:#}");
                    tracing::warn!(%domain, error = %msg, retry_in_secs = wait, "ACME: certificate order failed");
                    if let Err(e) = self
                        .state
                        .store
                        .record_cert_failure(domain, &msg, failures, crate::store::now() + wait)
                        .await
                    {
                        tracing::warn!(%domain, error = %e, "ACME: cannot record the failure");
                    }
                    idle = idle.min(Duration::from_secs(wait as u64));
                }
            }
        }
        idle.max(Duration::from_secs(1))
    }

    /// The ACME account: made once, its credentials kept in the store
    /// sealed to the control plane's key.
    async fn account(&mut self) -> anyhow::Result<Account> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let setting = account_setting(&self.cfg.directory);
        let account = match self.state.store.setting(&setting).await? {
            Some(sealed) => self.restore(&sealed).await?,
            None => {
                let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
                let (account, creds) = self
                    .cfg
                    .builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.cfg.directory.clone(),
                        None,
                    )
                    .await
                    .with_context(|| format!("creating an ACME account at {}", self.cfg.directory))?;
                let sealed = self.state.seal_for_store(&serde_json::to_vec(&creds)?);
                let stored = self.state.store.setting_insert_if_absent(&setting, &sealed).await?;
                if stored == sealed {
                    tracing::info!(directory = %self.cfg.directory, id = %account.id(), "ACME: account created");
                    account
                } else {
                    // Another replica made one first: use the stored account.
                    self.restore(&stored).await?
                }
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    async fn restore(&self, sealed: &str) -> anyhow::Result<Account> {
        let plain = berth_protocol::seal::open(&self.state.secrets_key, sealed)
            .map_err(|e| anyhow!("stored ACME account: {e} (was secrets.key replaced?)"))?;
        let creds: AccountCredentials = serde_json::from_slice(&plain).context("stored ACME account")?;
        self.cfg
            .builder()?
            .from_credentials(creds)
            .await
            .context("restoring the ACME account")
    }

    /// One order for `domain`, start to finish. Returns the revision the
    /// certificate was stored at (None: the domain was removed meanwhile).
    async fn issue(&mut self, domain: &str) -> anyhow::Result<Option<i64>> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(domain.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .context("creating the order")?;
        self.state.acme_orders.fetch_add(1, Ordering::Relaxed);
        self.authorize(&mut order, domain).await?;
        let status = order
            .poll_ready(&poll_policy())
            .await
            .context("waiting for the CA to validate")?;
        if status != OrderStatus::Ready {
            bail!("validation failed: {}", why_invalid(&mut order).await);
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        order.finalize_csr(csr.der()).await.context("finalizing the order")?;
        let chain = order
            .poll_certificate(&poll_policy())
            .await
            .context("downloading the certificate")?;
        let (not_before, not_after) = validity(&chain)?;
        let sealed = self.state.seal_for_store(key.serialize_pem().as_bytes());
        Ok(self
            .state
            .store
            .store_cert(domain, &chain, &sealed, not_before, not_after)
            .await?)
    }

    /// Publishes each pending authorization's challenge to the proxies (or
    /// through the DNS hook), waits for it to be served, then asks the CA to
    /// validate.
    async fn authorize(&mut self, order: &mut Order, domain: &str) -> anyhow::Result<()> {
        let kind = self.cfg.challenge;
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.context("fetching the authorization")?;
            match a.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                s => bail!("the authorization is {s:?}"),
            }
            let mut ch = a
                .challenge(kind.acme_type())
                .ok_or_else(|| anyhow!("the CA offers no {} challenge for {domain}", kind.as_str()))?;
            if kind == ChallengeKind::Dns01 {
                let hook = self.cfg.dns_hook.clone().context("--acme-dns-hook is not set")?;
                let fqdn = format!("_acme-challenge.{domain}.");
                let value = ch.key_authorization().dns_value();
                // Recorded first: a `present` that failed half-way may have
                // left something behind for `cleanup` to remove.
                self.dns_records.push((fqdn.clone(), value.clone()));
                run_dns_hook(&hook, "present", &fqdn, &value, self.cfg.dns_hook_timeout).await?;
                if !self.cfg.dns_propagation.is_zero() {
                    tokio::time::sleep(self.cfg.dns_propagation).await;
                }
                ch.set_ready().await.context("setting the challenge ready")?;
                continue;
            }
            let row = ChallengeRow {
                domain: domain.to_string(),
                kind,
                token: ch.token.clone(),
                key_authorization: ch.key_authorization().as_str().to_string(),
            };
            let rev = self.state.store.add_challenge(&row).await?;
            self.state.revision_moved(rev).await;
            self.wait_applied(rev).await;
            ch.set_ready().await.context("setting the challenge ready")?;
        }
        Ok(())
    }

    /// Runs the DNS hook's `cleanup` for every record of the last order,
    /// whatever its outcome. A failure only leaves a stale TXT record
    /// behind, so it is logged, not recorded on the domain.
    async fn dns_cleanup(&mut self, domain: &str) {
        let Some(hook) = self.cfg.dns_hook.clone() else { return };
        for (fqdn, value) in std::mem::take(&mut self.dns_records) {
            if let Err(e) = run_dns_hook(&hook, "cleanup", &fqdn, &value, self.cfg.dns_hook_timeout).await {
                tracing::warn!(%domain, error = %format!("{e:#}"), "ACME: the DNS hook could not remove the TXT record");
            }
        }
    }

    /// Waits until every online proxy has applied revision `rev` (so any of
    /// them can answer the CA), at most `apply_timeout`.
    async fn wait_applied(&self, rev: i64) {
        let deadline = tokio::time::Instant::now() + self.cfg.apply_timeout;
        loop {
            let behind: Vec<String> = match self.state.store.list_nodes().await {
                Ok(nodes) => {
                    let now = now();
                    nodes
                        .into_iter()
                        .filter(|n| n.role == Role::Proxy)
                        .filter(|n| n.online(now, self.state.offline_after_secs))
                        .filter(|n| n.applied_revision < rev)
                        .map(|n| n.name)
                        .collect()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ACME: cannot read node revisions");
                    vec![]
                }
            };
            if behind.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(proxies = ?behind, revision = rev, "ACME: proxies did not apply the challenge in time; asking the CA anyway");
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// `--acme-dns-hook` must name an executable file by an absolute path (a
/// bare name would be looked up in `$PATH`, which differs under systemd).
fn check_hook(hook: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !hook.is_absolute() {
        bail!("--acme-dns-hook {}: must be an absolute path", hook.display());
    }
    let meta = std::fs::metadata(hook).with_context(|| format!("--acme-dns-hook {}", hook.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("--acme-dns-hook {}: not an executable file", hook.display());
    }
    Ok(())
}

/// Runs `hook action fqdn value` directly (no shell, so nothing in the
/// arguments is interpreted), killed after `timeout`. A non-zero exit is an
/// error carrying the end of the hook's stderr (stdout if stderr is empty).
pub async fn run_dns_hook(hook: &Path, action: &str, fqdn: &str, value: &str, timeout: Duration) -> anyhow::Result<()> {
    let what = format!("DNS hook {} {action} {fqdn}", hook.display());
    let child = tokio::process::Command::new(hook)
        .args([action, fqdn, value])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("{what}: cannot run it"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.with_context(|| format!("{what}: waiting for it"))?,
        // Dropping the child kills it (kill_on_drop).
        Err(_) => bail!("{what}: killed after {} s without finishing", timeout.as_secs()),
    };
    if out.status.success() {
        return Ok(());
    }
    let output = if out.stderr.iter().all(u8::is_ascii_whitespace) {
        out.stdout
    } else {
        out.stderr
    };
    let text = String::from_utf8_lossy(&output);
    let text = text.trim();
    // Keep the end: that is where a script's error usually is.
    let start = text.len().saturating_sub(HOOK_OUTPUT_MAX);
    let start = (start..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(0);
    bail!("{what} failed ({}): {}", out.status, &text[start..])
}

fn poll_policy() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(Duration::from_secs(120))
}

/// When `d` next needs an order (now or earlier: due).
fn due_at(d: &DomainRow, now: i64) -> i64 {
    match (d.needs_cert(now), d.not_before, d.not_after) {
        (true, _, _) => now,
        (false, Some(nb), Some(na)) => nb + (na - nb) * 2 / 3,
        (false, _, _) => now,
    }
}

/// The settings key of the account for one directory.
fn account_setting(directory: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(directory.as_bytes());
    format!("acme_account_{}", hex::encode(&h[..8]))
}

/// What the CA said about a failed authorization.
async fn why_invalid(order: &mut Order) -> String {
    let mut reasons = vec![];
    let mut authzs = order.authorizations();
    while let Some(Ok(mut a)) = authzs.next().await {
        if let Ok(st) = a.refresh().await {
            for c in &st.challenges {
                if let Some(e) = &c.error {
                    reasons.push(e.to_string());
                }
            }
        }
    }
    if reasons.is_empty() {
        "the order became invalid".into()
    } else {
        reasons.join("; ")
    }
}

/// The leaf's validity (unix seconds) from a PEM chain.
pub fn validity(chain_pem: &str) -> anyhow::Result<(i64, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).map_err(|e| anyhow!("certificate: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| anyhow!("certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_an_hour() {
        assert_eq!(backoff(1), 30);
        assert_eq!(backoff(2), 60);
        assert_eq!(backoff(3), 120);
        assert_eq!(backoff(8), 3600);
        assert_eq!(backoff(1000), 3600);
    }

    #[test]
    fn challenge_kinds_parse() {
        assert_eq!("http-01".parse::<ChallengeKind>(), Ok(ChallengeKind::Http01));
        assert_eq!("tls-alpn-01".parse::<ChallengeKind>(), Ok(ChallengeKind::TlsAlpn01));
        assert_eq!("dns-01".parse::<ChallengeKind>(), Ok(ChallengeKind::Dns01));
        assert!("dns-02".parse::<ChallengeKind>().is_err());
        assert_eq!(format!("[{:<12}]", ChallengeKind::TlsAlpn01), "[tls-alpn-01 ]");
    }

    #[test]
    fn reads_the_validity_of_a_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["a.example.com".into()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2030, 1, 1);
        p.not_after = rcgen::date_time_ymd(2030, 4, 1);
        let pem = p.self_signed(&key).unwrap().pem();
        assert_eq!(validity(&pem).unwrap(), (1_893_456_000, 1_901_232_000));
        assert!(validity("junk").is_err());
    }

    #[test]
    fn bad_flags_are_refused() {
        let mut c = AcmeConfig::new("https://acme.example/dir");
        c.contact = Some("ops@example.com".into());
        assert!(c.validate().unwrap_err().to_string().starts_with("--acme-contact"));
        c.contact = None;
        c.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(c.validate().unwrap_err().to_string().starts_with("--acme-ca-file"));
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("hook.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn dns_01_needs_an_executable_hook() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = AcmeConfig::new("https://acme.example/dir");
        c.challenge = ChallengeKind::Dns01;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("--acme-dns-hook: required with --acme-challenge dns-01"),
            "{e}"
        );
        c.dns_hook = Some("hook.sh".into());
        assert!(c.validate().unwrap_err().to_string().contains("absolute path"));
        c.dns_hook = Some(dir.path().join("missing"));
        assert!(c.validate().unwrap_err().to_string().starts_with("--acme-dns-hook"));
        let hook = script(dir.path(), "exit 0");
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        c.dns_hook = Some(hook.clone());
        assert!(c.validate().unwrap_err().to_string().contains("not an executable file"));
        let hook = script(dir.path(), "exit 0");
        c.dns_hook = Some(hook.clone());
        c.validate().unwrap();
        c.dns_propagation = MAX_DNS_PROPAGATION + Duration::from_secs(1);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--acme-dns-propagation-secs"));
        // DNS-01 flags with another challenge would be ignored: refused.
        let mut c = AcmeConfig::new("https://acme.example/dir");
        c.dns_hook = Some(hook);
        assert!(c.validate().unwrap_err().to_string().contains("only used with"));
    }

    #[tokio::test]
    async fn dns_hook_gets_its_arguments_verbatim_and_its_errors_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let hook = script(
            dir.path(),
            &format!(
                "printf '%s|' \"$@\" >> {}\n[ \"$1\" = present ] || {{ echo \"no zone for $2\" >&2; exit 3; }}",
                log.display()
            ),
        );
        let t = Duration::from_secs(10);
        // No shell: `$(...)` and spaces reach the hook as they are.
        run_dns_hook(&hook, "present", "_acme-challenge.a.example.", "v $(x) y", t)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "present|_acme-challenge.a.example.|v $(x) y|"
        );
        let e = run_dns_hook(&hook, "cleanup", "_acme-challenge.a.example.", "v", t)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cleanup _acme-challenge.a.example. failed"), "{e}");
        assert!(e.ends_with("no zone for _acme-challenge.a.example."), "{e}");
        assert!(e.contains("exit status: 3"), "{e}");
    }

    #[tokio::test]
    async fn a_hung_dns_hook_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(dir.path(), "exec sleep 30");
        let started = std::time::Instant::now();
        let e = run_dns_hook(
            &hook,
            "present",
            "_acme-challenge.a.example.",
            "v",
            Duration::from_secs(1),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("killed after 1 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
