//! TCP routes (a port forwarded to upstreams) and the byte splice they share
//! with TLS passthrough. Listeners follow the config: added and removed on
//! reload; a port that cannot be bound is retried every few seconds.

use crate::config::Shared;
use crate::metrics::ConnKind;
use crate::upstream::{connect_tcp, Pool};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

const BIND_RETRY: Duration = Duration::from_secs(5);

/// Connects to an upstream of `pool`, writes `prefix` (bytes already read
/// from the client) and copies both ways until either side closes.
pub async fn splice(
    shared: &Shared,
    mut client: TcpStream,
    prefix: Vec<u8>,
    pool: &Pool,
    peer: SocketAddr,
    what: &str,
) {
    let t = &shared.timeouts;
    let (mut up, addr) = match connect_tcp(
        pool,
        shared.retries,
        t.upstream_connect,
        shared.ejection,
        &shared.metrics,
    )
    .await
    {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("{what}: client {peer}: {e}");
            return;
        }
    };
    if !prefix.is_empty() {
        if let Err(e) = up.write_all(&prefix).await {
            tracing::debug!("{what}: writing to {addr}: {e}");
            return;
        }
    }
    drop(prefix);
    match tokio::io::copy_bidirectional(&mut client, &mut up).await {
        Ok((to_up, to_client)) => {
            tracing::debug!("{what}: {peer} <-> {addr} closed ({to_up} bytes up, {to_client} bytes down)")
        }
        Err(e) => tracing::debug!("{what}: {peer} <-> {addr}: {e}"),
    }
}

/// Aborts the accept loop when dropped (the spliced connections stay).
struct Listening(AbortHandle);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, port: u16) {
    loop {
        let (stream, peer) = crate::server::accept(&listener, "TCP route").await;
        let shared = shared.clone();
        tokio::spawn(async move {
            // The current config's upstreams for this port.
            let Some(pool) = shared.config().tcp_routes.get(&port).cloned() else {
                return;
            };
            let _g = shared.metrics.connection(ConnKind::Tcp);
            splice(&shared, stream, Vec::new(), &pool, peer, &format!("tcp route {port}")).await;
        });
    }
}

/// Keeps one listener per configured TCP route.
pub async fn manage(shared: Arc<Shared>) {
    let mut rx = shared.subscribe();
    let mut open: HashMap<u16, Listening> = HashMap::new();
    loop {
        let want: HashSet<u16> = rx.borrow_and_update().tcp_routes.keys().copied().collect();
        open.retain(|port, _| {
            let keep = want.contains(port);
            if !keep {
                tracing::info!("tcp route {port}: removed, closing its listener");
            }
            keep
        });
        let mut failed = false;
        for port in want {
            if open.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(shared.tcp_bind, port);
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!("tcp route {port}: listening on {addr}");
                    let h = tokio::spawn(accept_loop(shared.clone(), l, port));
                    open.insert(port, Listening(h.abort_handle()));
                }
                Err(e) => {
                    failed = true;
                    tracing::error!("tcp route {port}: binding {addr}: {e}; retrying in {BIND_RETRY:?}");
                }
            }
        }
        let retry = async {
            if failed {
                tokio::time::sleep(BIND_RETRY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = retry => {}
        }
    }
}
