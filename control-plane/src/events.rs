//! The event stream's background work: noticing nodes that go offline, come
//! back or run a new agent version, keeping the stream to its retention,
//! and posting new events to the admin's webhook, signed.

use crate::state::SharedState;
use berth_protocol::event::{Event, EventKind};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// Events kept; older ones are deleted.
    pub retention: u64,
    /// Where new events are posted, if anywhere.
    pub webhook: Option<String>,
    /// The webhook's HMAC-SHA256 key.
    pub webhook_secret: Vec<u8>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retention: 10_000,
            webhook: None,
            webhook_secret: vec![],
        }
    }
}

/// The header carrying the webhook body's signature: `sha256=HEX`.
pub const SIGNATURE_HEADER: &str = "x-berth-signature-256";

/// `sha256=HEX` of HMAC-SHA256(`key`, `body`).
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    format!("sha256={}", hex::encode(ring::hmac::sign(&key, body).as_ref()))
}

/// Starts the tasks.
pub fn spawn(state: SharedState, cfg: EventsConfig) {
    tokio::spawn(watch_nodes(state.clone()));
    tokio::spawn(prune(state.clone(), cfg.retention));
    if let Some(url) = cfg.webhook.clone() {
        tokio::spawn(post_to_webhook(state, url, cfg.webhook_secret));
    }
}

/// A node's facts the stream tells changes of.
#[derive(PartialEq)]
struct Seen {
    online: bool,
    version: Option<String>,
}

/// Every few seconds: which nodes went offline, came back, or run another
/// agent version. The first look only learns how things are.
async fn watch_nodes(state: SharedState) {
    let mut known: Option<HashMap<String, Seen>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let Ok(nodes) = state.store.list_nodes().await else {
            continue;
        };
        let now = crate::store::now();
        let mut next = HashMap::new();
        for n in nodes {
            let seen = Seen {
                online: n.online(now, state.offline_after_secs),
                version: n.agent_version.clone(),
            };
            if let Some(before) = known.as_ref().and_then(|k| k.get(&n.id)) {
                let mut say = vec![];
                match (before.online, seen.online) {
                    (true, false) => say.push((
                        EventKind::Node,
                        format!("{} offline: no report for {} s", n.name, state.offline_after_secs),
                    )),
                    (false, true) => say.push((EventKind::Node, format!("{} back online", n.name))),
                    _ => {}
                }
                if let (Some(old), Some(new)) = (&before.version, &seen.version) {
                    if old != new {
                        say.push((EventKind::Upgrade, format!("{} runs agent {new} (was {old})", n.name)));
                    }
                }
                for (kind, message) in say {
                    if let Err(e) = state.store.record_event(kind, None, Some(&n.name), &message).await {
                        tracing::warn!(error = %e, "recording an event failed");
                    }
                }
            }
            next.insert(n.id, seen);
        }
        known = Some(next);
    }
}

async fn prune(state: SharedState, keep: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if let Err(e) = state.store.prune_events(keep).await {
            tracing::warn!(error = %e, "pruning events failed");
        }
    }
}

/// Posts every event recorded after the start, in batches (a JSON array),
/// in order; a failed post is retried with backoff, so none is skipped
/// unless retention deleted it meanwhile.
async fn post_to_webhook(state: SharedState, url: String, key: Vec<u8>) {
    let http = match reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "--events-webhook: no HTTP client; events are not posted");
            return;
        }
    };
    let mut last = loop {
        match state.store.last_event_id().await {
            Ok(id) => break id,
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let batch: Vec<Event> = match state.store.events_after(last, None, 100).await {
            Ok(b) if !b.is_empty() => b,
            _ => continue,
        };
        let body = serde_json::to_vec(&batch).unwrap_or_default();
        let res = http
            .post(&url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, sign(&key, &body))
            .body(body)
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => {
                last = batch.last().map_or(last, |e| e.id);
                backoff = Duration::from_secs(1);
            }
            other => {
                let why = match other {
                    Ok(r) => format!("HTTP {}", r.status()),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(%url, error = %why, "posting events failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signatures_are_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
