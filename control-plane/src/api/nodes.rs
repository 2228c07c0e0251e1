//! The fleet (admin): list nodes with their health, remove one, upgrade
//! them all (a canary first), and read the cluster revision.

use super::{body, AdminRoutes, Path};
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::state::SharedState;
use crate::store::now;
use crate::store::upgrades::UpgradeError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use berth_protocol::event::EventKind;
use berth_protocol::names::{valid_version, validate_dns_label};
use berth_protocol::{ErrorCode, NodeInfo, PeerStatusNamed, Removed, Revision, UpgradeRequest, UpgradeStarted};
use std::collections::HashMap;
use utoipa_axum::routes;

pub fn routes() -> AdminRoutes {
    vec![
        routes!(list_nodes),
        routes!(upgrade_nodes),
        routes!(remove_node),
        routes!(revision),
    ]
}

/// Every node with its health, revisions, peers and resource use.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, description = "The nodes", body = Vec<NodeInfo>)))]
async fn list_nodes(State(s): State<SharedState>) -> ApiResult<Json<Vec<NodeInfo>>> {
    let nodes = s.store.list_nodes().await?;
    let names: HashMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.wg_public_key.as_str(), n.name.as_str()))
        .collect();
    let now = now();
    let usage_board = s.usage.lock().unwrap_or_else(|e| e.into_inner());
    let usage = &usage_board.nodes;
    let list = nodes
        .iter()
        .map(|n| (n, usage_board.peers.of(&n.id, now)))
        .map(|(n, peers)| NodeInfo {
            usage: usage.get(&n.id).copied(),
            target_version: n.target_version.clone(),
            node_id: n.id.clone(),
            name: n.name.clone(),
            role: n.role,
            mesh_ip: n.mesh_ip,
            subnet: n.subnet.to_string(),
            online: n.online(now, s.offline_after_secs),
            last_seen: n.last_seen,
            revision: n.revision as u64,
            applied_revision: n.applied_revision as u64,
            agent_version: n.agent_version.clone(),
            error: n.last_error.clone(),
            peers_up: peers.as_ref().map(|(up, _)| *up),
            peers: {
                // A key that names no node (one just removed) is left out.
                let mut down: Vec<PeerStatusNamed> = peers
                    .into_iter()
                    .flat_map(|(_, down)| down)
                    .filter_map(|(key, age)| {
                        names.get(key).map(|name| PeerStatusNamed {
                            name: name.to_string(),
                            handshake_age_secs: age,
                        })
                    })
                    .collect();
                down.sort_by(|a, b| a.name.cmp(&b.name));
                down
            },
        })
        .collect();
    Ok(Json(list))
}

/// Removes a node from the fleet: its replicas are placed elsewhere and
/// the other nodes drop it from their mesh.
#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "Node name")),
    responses((status = 200, description = "Removed", body = Removed<String>)))]
async fn remove_node(State(s): State<SharedState>, Path(name): Path<String>) -> ApiResult<Json<Removed>> {
    validate_dns_label("name", &name)?;
    let id = s
        .fleet_view()
        .await?
        .nodes
        .iter()
        .find(|n| n.name == name)
        .map(|n| n.id.clone());
    let rev = s
        .store
        .remove_node(&name, s.offline_after_secs)
        .await?
        .ok_or_else(|| ApiErr::not_found("name", format!("name: no node named {name:?}")))?;
    tracing::info!(node = %name, revision = rev, "node removed");
    if let Some(id) = id {
        s.heartbeats.forget(&id);
        if let Ok(mut u) = s.usage.lock() {
            u.nodes.remove(&id);
            u.peers.remove(&id);
        }
    }
    s.revision_moved(rev).await;
    Ok(Json(Removed {
        removed: name,
        revision: rev as u64,
    }))
}

/// Starts a rollout: the canary first, every other node once the canary
/// reports the version.
#[utoipa::path(post, path = "/v1/nodes/upgrade", tag = "nodes", request_body = UpgradeRequest,
    responses((status = 200, description = "The rollout started", body = UpgradeStarted)))]
async fn upgrade_nodes(
    State(s): State<SharedState>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<UpgradeStarted>> {
    let req: UpgradeRequest = parse_json(&body(raw)?)?;
    if !valid_version(&req.version) {
        return Err(ApiErr::invalid(
            "version",
            format!(
                "version: {:?} is not a version name (letters, digits, . + - _)",
                req.version
            ),
        ));
    }
    if !s.releases.exists(&req.version) {
        return Err(ApiErr::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::UnknownRelease,
            format!(
                "version: no signed release {} on this control plane (berth release sign)",
                req.version
            ),
        )
        .on("version"));
    }
    if let Some(c) = &req.canary {
        validate_dns_label("canary", c)?;
    }
    let (rollout, rev) = s
        .store
        .start_rollout(&req.version, req.canary.as_deref())
        .await
        .map_err(|e| match e {
            UpgradeError::UnknownCanary(_) => ApiErr::not_found("canary", e.to_string()),
            UpgradeError::NoNodes => ApiErr::conflict(ErrorCode::Conflict, e.to_string()),
            UpgradeError::Store(e) => ApiErr::internal(e),
        })?;
    tracing::info!(version = %rollout.version, canary = %rollout.canary, "upgrade started");
    let message = format!("upgrade to {} asked, canary {} first", rollout.version, rollout.canary);
    s.store
        .record_event(EventKind::Upgrade, None, Some(&rollout.canary), &message)
        .await?;
    s.revision_moved(rev).await;
    Ok(Json(UpgradeStarted {
        version: rollout.version,
        canary: rollout.canary,
        waiting: rollout.waiting,
        revision: rev as u64,
    }))
}

/// The cluster revision (moves on every change of desired state).
#[utoipa::path(get, path = "/v1/revision", tag = "nodes",
    responses((status = 200, description = "The revision", body = Revision)))]
async fn revision(State(s): State<SharedState>) -> ApiResult<Json<Revision>> {
    Ok(Json(Revision {
        revision: s.store.revision().await? as u64,
    }))
}
