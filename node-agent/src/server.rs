//! The agent's HTTP endpoint: `GET /api/allocation` (this node's GPUs, capacity and workers as
//! JSON), `GET /metrics` (Prometheus text, derived from the state at each scrape: `metrics`) and
//! `GET /healthz` (200 once the first pod list was processed).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::agent::{Agent, AgentState};
use crate::metrics::{CONTENT_TYPE, MetricsSnapshot};

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/api/allocation", get(allocation))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(agent)
}

/// The JSON document of `GET /api/allocation`.
pub fn allocation_document(agent: &Agent, state: &AgentState) -> serde_json::Value {
    serde_json::json!({
        "node": agent.config.node_name,
        "synced": state.synced,
        "gpus": state.allocator.gpus(),
        "nativeGpus": state.native_gpus,
        "nativeSource": state.native_origin,
        "fragmentation": state.allocator.fragmentation(),
        "workers": state.workers.values().collect::<Vec<_>>(),
        "pending": state.pending.values().collect::<Vec<_>>(),
    })
}

async fn allocation(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let state = agent.state.lock().await;
    Json(allocation_document(&agent, &state))
}

async fn healthz(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    if agent.state.lock().await.synced {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "pods not listed yet")
    }
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let mut snapshot = {
        let state = agent.state.lock().await;
        MetricsSnapshot::take(&agent.config.host_root, &state)
    };
    snapshot.read_usage();
    ([("content-type", CONTENT_TYPE)], snapshot.render())
}
