//! `GET /v1/events`: the event stream as NDJSON, one [`Event`] per line;
//! with `follow`, open until the admin leaves.

use super::AdminRoutes;
use crate::error::{ApiErr, ApiResult};
use crate::state::SharedState;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use berth_protocol::event::Event;
use serde::Deserialize;
use std::time::Duration;
use utoipa_axum::routes;

/// Most events one read takes from the store.
const PAGE: u32 = 500;
/// How often a followed stream looks for new events without a wake-up.
const FOLLOW_TICK: Duration = Duration::from_millis(500);

pub fn routes() -> AdminRoutes {
    vec![routes!(events)]
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Go on after this event's id.
    after: Option<i64>,
    /// Without `after`: the last N events [default: 50].
    tail: Option<u32>,
    service: Option<String>,
    #[serde(default)]
    follow: bool,
}

fn ndjson(events: &[Event]) -> Bytes {
    let mut out = Vec::new();
    for e in events {
        if serde_json::to_writer(&mut out, e).is_ok() {
            out.push(b'\n');
        }
    }
    Bytes::from(out)
}

/// The event stream: NDJSON, one `Event` per line; with `follow`, the
/// response stays open and new events come as they happen.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, description = "Events, one JSON object per line", content_type = "application/x-ndjson", body = Event)))]
async fn events(State(s): State<SharedState>, q: Result<Query<EventsQuery>, QueryRejection>) -> ApiResult<Response> {
    let q = super::query(q)?;
    if q.tail.is_some_and(|t| t > 10_000) {
        return Err(ApiErr::invalid("tail", "tail: at most 10000"));
    }
    if let Some(svc) = &q.service {
        if s.store.get_service(svc).await?.is_none() {
            // Events outlive services: an unknown name is fine if it had events.
            if s.store.events_tail(1, Some(svc)).await?.is_empty() {
                return Err(ApiErr::not_found(
                    "service",
                    format!("service: no service named {svc:?}"),
                ));
            }
        }
    }
    let first = match q.after {
        Some(after) => s.store.events_after(after, q.service.as_deref(), PAGE).await?,
        None => s.store.events_tail(q.tail.unwrap_or(50), q.service.as_deref()).await?,
    };
    let mut last = match (first.last(), q.after) {
        (Some(e), _) => e.id,
        (None, Some(a)) => a,
        (None, None) => s.store.last_event_id().await?,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let _ = tx.try_send(ndjson(&first));
    if q.follow {
        tokio::spawn(async move {
            let mut revision = s.subscribe();
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::timeout(FOLLOW_TICK, revision.changed()) => {}
                }
                let Ok(batch) = s.store.events_after(last, q.service.as_deref(), PAGE).await else {
                    continue;
                };
                if let Some(e) = batch.last() {
                    last = e.id;
                    if tx.send(ndjson(&batch)).await.is_err() {
                        return;
                    }
                }
            }
        });
    } else {
        drop(tx);
    }
    Ok(super::ndjson_response(rx))
}
