//! Live streams (docs/logs.md): `GET /v1/services/NAME/logs` and the
//! `GET /v1/services/NAME/exec` WebSocket for the admin; for agents, the
//! `GET /v1/agent/streams/next` long-poll and the `GET /v1/agent/streams/ID`
//! WebSocket they answer a job with. The control plane only relays.

use super::{AdminRoutes, Path, Routes, MAX_WAIT_SECS};
use crate::auth::require_node;
use crate::error::{ApiErr, ApiResult};
use crate::state::SharedState;
use crate::store::nodes::NodeRow;
use crate::store::services::ReplicaRow;
use crate::streams::{Refusal, Ticket};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{rejection::WebSocketUpgradeRejection, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_protocol::event::EventKind;
use berth_protocol::stream::{
    ExecControl, ExecRequest, LogLine, LogsRequest, StreamJobs, StreamKind, MAX_EXEC_CMD_BYTES,
};
use berth_protocol::ErrorCode;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use utoipa_axum::routes;

/// Log messages held for a slow reader, over all replicas of one request
/// (each at most an agent's batch, 64 KiB).
const LOG_BUFFER: usize = 64;
/// Most lines `tail` may ask for.
const MAX_TAIL: u32 = 1_000_000;

pub fn agent_routes() -> Routes {
    Routes::default().routes(routes!(next)).routes(routes!(connect))
}

pub fn admin_routes() -> AdminRoutes {
    vec![routes!(logs), routes!(exec), routes!(node_logs)]
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct NextQuery {
    wait: Option<u64>,
}

/// Long-poll for stream jobs (logs, exec) this node is to answer.
#[utoipa::path(get, path = "/v1/agent/streams/next", operation_id = "next_stream_jobs", tag = "agent", params(NextQuery),
    responses(
        (status = 200, description = "Jobs to answer", body = StreamJobs),
        (status = 204, description = "None within `wait` seconds"),
    ))]
async fn next(
    State(s): State<SharedState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    q: Result<Query<NextQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let node = require_node(&s, &method, &uri, &headers, &[]).await?;
    let q = super::query(q)?;
    let wait = Duration::from_secs(q.wait.unwrap_or(25).min(MAX_WAIT_SECS));
    let jobs = s.streams.next_jobs(&node.id, wait).await;
    if jobs.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(Json(StreamJobs { jobs }).into_response())
}

fn not_websocket(e: WebSocketUpgradeRejection) -> ApiErr {
    ApiErr::invalid(
        "upgrade",
        format!("upgrade: this endpoint takes a WebSocket ({})", e.body_text()),
    )
}

/// The agent's socket for job `id`, handed to the request waiting for it.
///
/// WebSocket upgrade (`GET` with `Upgrade: websocket`): the agent's side
/// of stream job `id`, relayed to the admin who asked for it.
#[utoipa::path(get, path = "/v1/agent/streams/{id}", tag = "agent",
    params(("id" = String, Path, description = "Stream job id")),
    responses((status = 101, description = "Switching Protocols: a WebSocket carrying the job's stream")))]
async fn connect(
    State(s): State<SharedState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let node = require_node(&s, &method, &uri, &headers, &[]).await?;
    let ws = ws.map_err(not_websocket)?;
    let tx = s
        .streams
        .claim(&node.id, &id)
        .ok_or_else(|| ApiErr::not_found("id", format!("id: no stream {id:?} waits for this node")))?;
    Ok(ws.on_upgrade(move |socket| async move {
        // The admin may have left meanwhile; the socket then just closes.
        let _ = tx.send(socket);
    }))
}

fn refused(r: Refusal, node: &str) -> ApiErr {
    let message = match r {
        Refusal::NodeFull { limit } => {
            format!("streams: node {node} already carries {limit} streams (--max-streams-per-node)")
        }
        Refusal::AdminFull { limit } => {
            format!("streams: the admin already holds {limit} streams (--max-streams-per-admin)")
        }
    };
    ApiErr::new(StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyStreams, message).on("streams")
}

fn unreachable(node: &str, why: &str) -> ApiErr {
    ApiErr::new(
        StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::NodeUnreachable,
        format!("node: {node} {why}"),
    )
    .on("node")
}

/// Parses `since`: a duration back from now (`90s`, `10m`, `2h`, `1d`) or
/// Unix seconds.
fn parse_since(v: &str, now: i64) -> ApiResult<i64> {
    let bad = || {
        ApiErr::invalid(
            "since",
            format!("since: {v:?} is neither a duration (90s, 10m, 2h, 1d) nor Unix seconds"),
        )
    };
    if let Ok(t) = v.parse::<i64>() {
        return if t >= 0 { Ok(t) } else { Err(bad()) };
    }
    // The unit is the last character, which may be more than one byte.
    let (num, unit) = v.split_at(v.char_indices().last().map_or(0, |(i, _)| i));
    let n: i64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    if n < 0 {
        return Err(bad());
    }
    Ok(now - n.saturating_mul(secs))
}

/// The log window of `?follow&since&tail`, checked.
fn logs_request(follow: bool, since: Option<&str>, tail: Option<u32>) -> ApiResult<LogsRequest> {
    let since = since.map(|v| parse_since(v, crate::store::now())).transpose()?;
    if tail.is_some_and(|t| t > MAX_TAIL) {
        return Err(ApiErr::invalid("tail", format!("tail: at most {MAX_TAIL}")));
    }
    Ok(LogsRequest { follow, since, tail })
}

/// The service's replicas (only `replica` when named), by name; 404 when
/// the service or the named replica does not exist.
async fn replicas_of(s: &SharedState, service: &str, replica: Option<&str>) -> ApiResult<Vec<ReplicaRow>> {
    if s.store.get_service(service).await?.is_none() {
        return Err(ApiErr::not_found("name", format!("name: no service named {service:?}")));
    }
    let mut rows: Vec<ReplicaRow> = s
        .store
        .list_replicas()
        .await?
        .into_iter()
        .filter(|r| r.service == service && replica.is_none_or(|want| r.name == want))
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    if let (Some(want), true) = (replica, rows.is_empty()) {
        return Err(ApiErr::not_found(
            "replica",
            format!("replica: service {service:?} has no replica {want:?}"),
        ));
    }
    Ok(rows)
}

async fn nodes_by_id(s: &SharedState) -> ApiResult<HashMap<String, NodeRow>> {
    Ok(s.store
        .list_nodes()
        .await?
        .into_iter()
        .map(|n| (n.id.clone(), n))
        .collect())
}

fn online(s: &SharedState, n: &NodeRow) -> bool {
    n.online(crate::store::now(), s.offline_after_secs)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
    since: Option<String>,
    tail: Option<u32>,
    replica: Option<String>,
}

/// A service's log: every replica's lines as NDJSON ([`LogLine`]), merged
/// as they come; with `follow`, open until the admin leaves, taking in the
/// replicas that start meanwhile.
#[utoipa::path(get, path = "/v1/services/{name}/logs", operation_id = "service_logs", tag = "streams",
    params(("name" = String, Path, description = "Service name"), LogsQuery),
    responses((status = 200, description = "Log lines, one JSON object per line", content_type = "application/x-ndjson", body = LogLine)))]
async fn logs(
    State(s): State<SharedState>,
    Path(name): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = super::query(q)?;
    let req = logs_request(q.follow, q.since.as_deref(), q.tail)?;
    let replicas = replicas_of(&s, &name, q.replica.as_deref()).await?;
    let nodes = nodes_by_id(&s).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(LOG_BUFFER);
    let cut = CancellationToken::new();
    let mut notices = vec![];
    let mut tickets = vec![];
    for r in &replicas {
        let node = match nodes.get(&r.node_id) {
            Some(n) if online(&s, n) => n,
            other => {
                let name = other.map_or(r.node_id.as_str(), |n| n.name.as_str());
                if q.replica.is_some() {
                    return Err(unreachable(name, "is offline"));
                }
                notices.push(LogLine::notice(&r.name, format!("node {name} is offline; no log")));
                continue;
            }
        };
        // A refusal before anything streams is the request's answer.
        let ticket = s
            .streams
            .open(&node.id, &r.name, StreamKind::Logs(req.clone()))
            .map_err(|e| refused(e, &node.name))?;
        tickets.push((ticket, r.name.clone(), node.name.clone()));
    }
    for n in notices {
        let _ = tx.try_send(ndjson(&n));
    }
    let seen: HashSet<String> = replicas.iter().map(|r| r.name.clone()).collect();
    for (ticket, replica, node) in tickets {
        tokio::spawn(relay_logs(s.clone(), ticket, replica, node, tx.clone(), cut.clone()));
    }
    if q.follow && q.replica.is_none() {
        tokio::spawn(follow_new_replicas(s.clone(), name, seen, tx, cut));
    }
    Ok(super::ndjson_response(rx))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct NodeLogsQuery {
    #[serde(default)]
    follow: bool,
    since: Option<String>,
    tail: Option<u32>,
}

/// The agent's own log of node `name` (`berth nodes logs`), as NDJSON.
#[utoipa::path(get, path = "/v1/nodes/{name}/logs", tag = "streams",
    params(("name" = String, Path, description = "Node name"), NodeLogsQuery),
    responses((status = 200, description = "Log lines, one JSON object per line", content_type = "application/x-ndjson", body = LogLine)))]
async fn node_logs(
    State(s): State<SharedState>,
    Path(name): Path<String>,
    q: Result<Query<NodeLogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = super::query(q)?;
    let req = logs_request(q.follow, q.since.as_deref(), q.tail)?;
    let nodes = nodes_by_id(&s).await?;
    let node = nodes
        .values()
        .find(|n| n.name == name)
        .ok_or_else(|| ApiErr::not_found("name", format!("name: no node named {name:?}")))?;
    if !online(&s, node) {
        return Err(unreachable(&node.name, "is offline"));
    }
    let ticket = s
        .streams
        .open(&node.id, &node.name, StreamKind::AgentLog(req))
        .map_err(|e| refused(e, &node.name))?;
    let (tx, rx) = mpsc::channel::<Bytes>(LOG_BUFFER);
    tokio::spawn(relay_logs(
        s.clone(),
        ticket,
        node.name.clone(),
        node.name.clone(),
        tx,
        CancellationToken::new(),
    ));
    Ok(super::ndjson_response(rx))
}

fn ndjson(line: &LogLine) -> Bytes {
    let mut v = serde_json::to_vec(line).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Carries one replica's log from its agent to the admin's response.
async fn relay_logs(
    s: SharedState,
    mut ticket: Ticket,
    replica: String,
    node: String,
    tx: mpsc::Sender<Bytes>,
    cut: CancellationToken,
) {
    let stall = s.streams.limits.stall_timeout;
    let Some(mut ws) = ticket.connected().await else {
        let _ = tx
            .send(ndjson(&LogLine::notice(
                &replica,
                format!("node {node} did not open the stream in time"),
            )))
            .await;
        return;
    };
    loop {
        let msg = tokio::select! {
            _ = tx.closed() => break,
            _ = cut.cancelled() => break,
            m = ws.recv() => m,
        };
        let data = match msg {
            Some(Ok(Message::Text(t))) => Bytes::from(t),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                let _ = tokio::time::timeout(stall, tx.send(ndjson(&LogLine::notice(&replica, "ended")))).await;
                break;
            }
        };
        match tokio::time::timeout(stall, tx.send(data)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                // The reader took nothing for `stall`: end every replica's
                // stream rather than buffer for it.
                tracing::info!(%replica, "log reader stalled; stream cut");
                cut.cancel();
                break;
            }
        }
    }
    let _ = ws.send(Message::Close(None)).await;
}

/// While a followed log is read, streams the service's new replicas too.
async fn follow_new_replicas(
    s: SharedState,
    service: String,
    mut seen: HashSet<String>,
    tx: mpsc::Sender<Bytes>,
    cut: CancellationToken,
) {
    let mut revision = s.subscribe();
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            _ = cut.cancelled() => return,
            // Other control-plane replicas move no local signal: look now and then.
            _ = tokio::time::timeout(Duration::from_secs(2), revision.changed()) => {}
        }
        let Ok(replicas) = replicas_of(&s, &service, None).await else {
            let _ = tx
                .send(ndjson(&LogLine::notice("-", format!("service {service} is gone"))))
                .await;
            return;
        };
        let Ok(nodes) = nodes_by_id(&s).await else { continue };
        for r in replicas {
            if seen.contains(&r.name) {
                continue;
            }
            let Some(node) = nodes.get(&r.node_id) else { continue };
            seen.insert(r.name.clone());
            let req = LogsRequest {
                follow: true,
                since: None,
                tail: None,
            };
            match s.streams.open(&node.id, &r.name, StreamKind::Logs(req)) {
                Ok(ticket) => {
                    let _ = tx
                        .send(ndjson(&LogLine::notice(
                            &r.name,
                            format!("new replica on {}", node.name),
                        )))
                        .await;
                    tokio::spawn(relay_logs(
                        s.clone(),
                        ticket,
                        r.name.clone(),
                        node.name.clone(),
                        tx.clone(),
                        cut.clone(),
                    ));
                }
                Err(e) => {
                    let _ = tx
                        .send(ndjson(&LogLine::notice(&r.name, refused(e, &node.name).message)))
                        .await;
                }
            }
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ExecQuery {
    replica: Option<String>,
    /// The command as a JSON array of strings.
    cmd: String,
    #[serde(default)]
    tty: bool,
    #[serde(default)]
    interactive: bool,
    #[serde(default)]
    rows: u16,
    #[serde(default)]
    cols: u16,
}

fn parse_cmd(v: &str) -> ApiResult<Vec<String>> {
    let cmd: Vec<String> = serde_json::from_str(v)
        .map_err(|e| ApiErr::invalid("cmd", format!("cmd: not a JSON array of strings: {e}")))?;
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err(ApiErr::invalid("cmd", "cmd: names no program"));
    }
    if cmd.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_EXEC_CMD_BYTES {
        return Err(ApiErr::invalid(
            "cmd",
            format!("cmd: longer than {MAX_EXEC_CMD_BYTES} bytes"),
        ));
    }
    if cmd.iter().any(|a| a.contains('\0')) {
        return Err(ApiErr::invalid("cmd", "cmd: holds a NUL byte"));
    }
    Ok(cmd)
}

/// Runs a command in a replica (the named one, or the first running one)
/// and relays its terminal or pipes over the admin's WebSocket.
///
/// WebSocket upgrade (`GET` with `Upgrade: websocket`): runs `cmd` in a
/// replica. Binary messages carry stdin (to the replica) and output (from
/// it); text messages carry `ExecControl` (resize, exit code).
#[utoipa::path(get, path = "/v1/services/{name}/exec", tag = "streams",
    params(("name" = String, Path, description = "Service name"), ExecQuery),
    responses((status = 101, description = "Switching Protocols: a WebSocket to the command")))]
async fn exec(
    State(s): State<SharedState>,
    crate::auth::Actor(actor): crate::auth::Actor,
    Path(name): Path<String>,
    q: Result<Query<ExecQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let q = super::query(q)?;
    let cmd = parse_cmd(&q.cmd)?;
    let ws = ws.map_err(not_websocket)?;
    let replicas = replicas_of(&s, &name, q.replica.as_deref()).await?;
    let replica = match &q.replica {
        Some(_) => replicas.into_iter().next(),
        None => replicas
            .into_iter()
            .find(|r| r.state.as_deref() == Some("running") && r.phase == crate::store::services::Phase::Active),
    }
    .ok_or_else(|| {
        ApiErr::conflict(
            ErrorCode::Conflict,
            format!("name: service {name:?} has no running replica"),
        )
        .on("name")
    })?;
    let nodes = nodes_by_id(&s).await?;
    let node = nodes
        .get(&replica.node_id)
        .filter(|n| online(&s, n))
        .ok_or_else(|| unreachable(&replica.node_id, "is offline"))?;
    let req = ExecRequest {
        cmd,
        tty: q.tty,
        interactive: q.interactive,
        rows: q.rows,
        cols: q.cols,
    };
    // Who, when, where and what; never the output.
    tracing::info!(target: "berth::audit", service = %name, replica = %replica.name, node = %node.name,
        cmd = ?req.cmd, tty = req.tty, "exec");
    let message = format!(
        "exec in {} by {actor}{}: {}",
        replica.name,
        if req.tty { " (terminal)" } else { "" },
        serde_json::to_string(&req.cmd).unwrap_or_default()
    );
    s.store
        .record_event(EventKind::Exec, Some(&name), Some(&node.name), &message)
        .await?;
    let mut ticket = s
        .streams
        .open(&node.id, &replica.name, StreamKind::Exec(req))
        .map_err(|e| refused(e, &node.name))?;
    let agent = ticket
        .connected()
        .await
        .ok_or_else(|| unreachable(&node.name, "did not open the stream in time"))?;
    let idle = s.streams.limits.exec_idle_timeout;
    Ok(ws.on_upgrade(move |admin| relay_exec(admin, agent, ticket, idle)))
}

/// Relays messages both ways until either side closes or nothing moves
/// for `idle`.
async fn relay_exec(mut admin: WebSocket, mut agent: WebSocket, _ticket: Ticket, idle: Duration) {
    loop {
        let step = tokio::time::timeout(idle, async {
            tokio::select! {
                m = admin.recv() => (true, m),
                m = agent.recv() => (false, m),
            }
        })
        .await;
        let (from_admin, msg) = match step {
            Ok(x) => x,
            Err(_) => {
                let e = ExecControl::Error {
                    message: format!("nothing moved for {} s; exec ended", idle.as_secs()),
                };
                let _ = admin
                    .send(Message::Text(serde_json::to_string(&e).unwrap_or_default().into()))
                    .await;
                break;
            }
        };
        let msg = match msg {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => m,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => break,
        };
        let to = if from_admin { &mut agent } else { &mut admin };
        if to.send(msg).await.is_err() {
            break;
        }
    }
    let _ = admin.send(Message::Close(None)).await;
    let _ = agent.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_unix_seconds() {
        let now = 1_000_000;
        assert_eq!(parse_since("90s", now).unwrap(), now - 90);
        assert_eq!(parse_since("10m", now).unwrap(), now - 600);
        assert_eq!(parse_since("2h", now).unwrap(), now - 7200);
        assert_eq!(parse_since("1d", now).unwrap(), now - 86400);
        assert_eq!(parse_since("1700000000", now).unwrap(), 1_700_000_000);
        for bad in ["", "m", "10x", "-5m", "-1", "ten", "1\u{80}", "\u{ea}"] {
            let e = parse_since(bad, now).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("since"), "{bad}");
        }
    }

    #[test]
    fn cmd_is_a_json_array_naming_a_program() {
        assert_eq!(parse_cmd(r#"["sh","-c","exit 3"]"#).unwrap(), ["sh", "-c", "exit 3"]);
        for bad in ["sh", "[]", r#"[""]"#, r#"[1]"#, r#"["a\u0000b"]"#] {
            assert_eq!(parse_cmd(bad).unwrap_err().field.as_deref(), Some("cmd"), "{bad}");
        }
        let long = serde_json::to_string(&vec!["x".repeat(MAX_EXEC_CMD_BYTES)]).unwrap();
        assert!(parse_cmd(&long).is_err());
    }
}
