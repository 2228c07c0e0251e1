//! The stream hub: jobs queued for nodes, and the agents' sockets handed to
//! the admin requests that asked for them (docs/logs.md).
//!
//! An admin request takes a [`Ticket`]: it counts against the node's and
//! the admin's limits, queues a [`StreamJob`] and waits for the agent's
//! WebSocket. Dropping the ticket, however the request ends, frees its
//! place and forgets the job. Nothing here touches the store: streams are
//! live only, and belong to this control-plane process.

use axum::extract::ws::WebSocket;
use berth_protocol::stream::{StreamJob, StreamKind};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Live streams one node may carry at once.
    pub per_node: usize,
    /// Live streams the admin may hold at once.
    pub per_admin: usize,
    /// How long a node has to open the socket it was asked for.
    pub connect_timeout: Duration,
    /// A log stream whose reader takes nothing for this long is cut.
    pub stall_timeout: Duration,
    /// An exec with no byte either way for this long is ended.
    pub exec_idle_timeout: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            per_node: 16,
            per_admin: 64,
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            exec_idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// Why a ticket was refused.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    NodeFull { limit: usize },
    AdminFull { limit: usize },
}

#[derive(Default)]
struct Inner {
    queued: HashMap<String, VecDeque<StreamJob>>,
    waiting: HashMap<String, (String, oneshot::Sender<WebSocket>)>,
    per_node: HashMap<String, usize>,
    admin: usize,
    wake: HashMap<String, Arc<Notify>>,
}

pub struct Streams {
    pub limits: StreamLimits,
    inner: Mutex<Inner>,
}

/// A stream the admin asked for; see the module's doc.
pub struct Ticket {
    pub id: String,
    node_id: String,
    socket: Option<oneshot::Receiver<WebSocket>>,
    hub: Arc<Streams>,
}

impl Streams {
    pub fn new(limits: StreamLimits) -> Arc<Streams> {
        Arc::new(Streams {
            limits,
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job for `node_id`, within the limits.
    pub fn open(self: &Arc<Self>, node_id: &str, replica: &str, kind: StreamKind) -> Result<Ticket, Refusal> {
        let id = hex::encode(rand::random::<[u8; 16]>());
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if inner.admin >= self.limits.per_admin {
            return Err(Refusal::AdminFull {
                limit: self.limits.per_admin,
            });
        }
        let on_node = inner.per_node.get(node_id).copied().unwrap_or(0);
        if on_node >= self.limits.per_node {
            return Err(Refusal::NodeFull {
                limit: self.limits.per_node,
            });
        }
        inner.admin += 1;
        inner.per_node.insert(node_id.to_string(), on_node + 1);
        inner.waiting.insert(id.clone(), (node_id.to_string(), tx));
        inner
            .queued
            .entry(node_id.to_string())
            .or_default()
            .push_back(StreamJob {
                id: id.clone(),
                replica: replica.to_string(),
                kind,
            });
        let wake = inner.wake.entry(node_id.to_string()).or_default().clone();
        drop(inner);
        wake.notify_one();
        Ok(Ticket {
            id,
            node_id: node_id.to_string(),
            socket: Some(rx),
            hub: self.clone(),
        })
    }

    /// The jobs queued for `node_id`, waiting up to `wait` for one.
    pub async fn next_jobs(&self, node_id: &str, wait: Duration) -> Vec<StreamJob> {
        let wake = self.lock().wake.entry(node_id.to_string()).or_default().clone();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let jobs: Vec<StreamJob> = self
                .lock()
                .queued
                .get_mut(node_id)
                .map(|q| q.drain(..).collect())
                .unwrap_or_default();
            if !jobs.is_empty() {
                return jobs;
            }
            if tokio::time::timeout_at(deadline, wake.notified()).await.is_err() {
                return vec![];
            }
        }
    }

    /// The waiting ticket `id` of `node_id`, to hand its socket to; None
    /// when there is none (already connected, ended, or another node's).
    pub fn claim(&self, node_id: &str, id: &str) -> Option<oneshot::Sender<WebSocket>> {
        let mut inner = self.lock();
        match inner.waiting.get(id) {
            Some((owner, _)) if owner == node_id => inner.waiting.remove(id).map(|(_, tx)| tx),
            _ => None,
        }
    }

    /// Live tickets: the admin's, and `node_id`'s.
    pub fn counts(&self, node_id: &str) -> (usize, usize) {
        let inner = self.lock();
        (inner.admin, inner.per_node.get(node_id).copied().unwrap_or(0))
    }

    /// Live tickets over every node.
    pub fn open_count(&self) -> usize {
        self.lock().admin
    }

    /// Forgets a node's queue (it was removed).
    pub fn forget(&self, node_id: &str) {
        let mut inner = self.lock();
        inner.queued.remove(node_id);
        inner.waiting.retain(|_, (n, _)| n != node_id);
    }
}

impl Ticket {
    /// The agent's socket, once it connects; None when it did not in time.
    pub async fn connected(&mut self) -> Option<WebSocket> {
        let rx = self.socket.take()?;
        let timeout = self.hub.limits.connect_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(ws)) => Some(ws),
            _ => None,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        inner.admin = inner.admin.saturating_sub(1);
        if let Some(n) = inner.per_node.get_mut(&self.node_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.per_node.remove(&self.node_id);
            }
        }
        inner.waiting.remove(&self.id);
        if let Some(q) = inner.queued.get_mut(&self.node_id) {
            q.retain(|j| j.id != self.id);
            if q.is_empty() {
                inner.queued.remove(&self.node_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::stream::LogsRequest;

    fn logs() -> StreamKind {
        StreamKind::Logs(LogsRequest::default())
    }

    #[tokio::test]
    async fn tickets_count_against_the_limits_until_dropped() {
        let hub = Streams::new(StreamLimits {
            per_node: 2,
            per_admin: 3,
            ..Default::default()
        });
        let a = hub.open("n1", "web-1", logs()).unwrap();
        let b = hub.open("n1", "web-2", logs()).unwrap();
        assert_eq!(
            hub.open("n1", "web-3", logs()).err(),
            Some(Refusal::NodeFull { limit: 2 })
        );
        let c = hub.open("n2", "web-4", logs()).unwrap();
        assert_eq!(
            hub.open("n3", "web-5", logs()).err(),
            Some(Refusal::AdminFull { limit: 3 })
        );
        assert_eq!(hub.counts("n1"), (3, 2));
        drop(a);
        assert_eq!(hub.counts("n1"), (2, 1));
        // The dropped ticket's job is no longer handed out.
        let jobs = hub.next_jobs("n1", Duration::ZERO).await;
        assert_eq!(jobs.iter().map(|j| j.replica.as_str()).collect::<Vec<_>>(), ["web-2"]);
        assert_eq!(jobs[0].id, b.id);
        drop((b, c));
        assert_eq!(hub.counts("n1"), (0, 0));
        assert!(hub.lock().waiting.is_empty() && hub.lock().queued.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_node_is_woken_and_only_its_own_ticket_is_claimed() {
        let hub = Streams::new(StreamLimits::default());
        let waiter = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.next_jobs("n1", Duration::from_secs(20)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = hub.open("n1", "web-1", logs()).unwrap();
        let jobs = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(jobs.len(), 1);
        assert!(hub.claim("n2", &t.id).is_none(), "another node's ticket");
        assert!(hub.claim("n1", &t.id).is_some());
        assert!(hub.claim("n1", &t.id).is_none(), "claimed once");
        // Nothing queued: the poll ends empty at its deadline.
        assert!(hub.next_jobs("n1", Duration::from_millis(10)).await.is_empty());
    }
}
