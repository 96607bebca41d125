//! The agent's HTTP endpoint: `GET /api/allocation` (this node's GPUs, capacity and workers as
//! JSON), `GET /metrics` (Prometheus text, rendered from the state at each scrape) and
//! `GET /healthz` (200 once the first pod list was processed).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tensor_fusion_interposer_core::config::usage_file_path;
use tensor_fusion_interposer_core::shm::{MemoryKind, UsageFile};

use crate::agent::{Agent, AgentState};
use crate::worker::pod_dir;

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
    let state = agent.state.lock().await;
    let text = render_metrics(&agent, &state);
    ([("content-type", "text/plain; version=0.0.4")], text)
}

/// Prometheus text for the state: per GPU capacity and allocation, per worker grant and use.
pub fn render_metrics(agent: &Agent, state: &AgentState) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    };
    let gpu_rows = |value: &dyn Fn(&crate::allocator::GpuState) -> f64| {
        state
            .allocator
            .gpus()
            .iter()
            .map(|gpu| (format!("gpu=\"{}\"", gpu.capacity.uuid), value(gpu)))
            .collect::<Vec<_>>()
    };
    family(
        "tensor_fusion_agent_gpu_tflops_capacity",
        "gauge",
        "Physical TFLOPS of the GPU.",
        gpu_rows(&|gpu| gpu.capacity.physical.tflops),
    );
    family(
        "tensor_fusion_agent_gpu_tflops_virtual_capacity",
        "gauge",
        "TFLOPS limits may add up to (oversold).",
        gpu_rows(&|gpu| gpu.capacity.virtual_.tflops),
    );
    family(
        "tensor_fusion_agent_gpu_vram_capacity_bytes",
        "gauge",
        "Physical VRAM of the GPU.",
        gpu_rows(&|gpu| gpu.capacity.physical.vram_bytes as f64),
    );
    family(
        "tensor_fusion_agent_gpu_vram_virtual_capacity_bytes",
        "gauge",
        "VRAM limits may add up to (expanded to host memory and disk).",
        gpu_rows(&|gpu| gpu.capacity.virtual_.vram_bytes as f64),
    );
    family(
        "tensor_fusion_agent_gpu_tflops_allocated",
        "gauge",
        "Sum of the TFLOPS requests granted on the GPU.",
        gpu_rows(&|gpu| gpu.requested.tflops),
    );
    family(
        "tensor_fusion_agent_gpu_vram_allocated_bytes",
        "gauge",
        "Sum of the VRAM requests granted on the GPU.",
        gpu_rows(&|gpu| gpu.requested.vram_bytes as f64),
    );
    family(
        "tensor_fusion_agent_gpu_workers",
        "gauge",
        "Shared workers on the GPU.",
        gpu_rows(&|gpu| gpu.workers as f64),
    );
    family(
        "tensor_fusion_agent_gpu_native",
        "gauge",
        "1 when the NVIDIA device plugin gave the GPU to a native pod.",
        gpu_rows(&|gpu| f64::from(u8::from(gpu.capacity.native))),
    );
    let mut granted = Vec::new();
    let mut used = Vec::new();
    let mut spilled = Vec::new();
    let mut throttled = Vec::new();
    for record in state.workers.values() {
        let dir = pod_dir(&agent.config.host_root, &record.spec.uid);
        for container in &record.spec.containers {
            let labels = format!(
                "namespace=\"{}\",pod=\"{}\",container=\"{}\"",
                record.spec.namespace, record.spec.name, container.name
            );
            granted.push((labels.clone(), container.vram_request.unwrap_or(0) as f64));
            let Ok(usage) = UsageFile::attach(&usage_file_path(&dir, &container.name)) else {
                continue;
            };
            let devices = 0..container.gpu_count as usize;
            let sum = |read: &dyn Fn(usize) -> u64| devices.clone().map(read).sum::<u64>() as f64;
            used.push((labels.clone(), sum(&|d| usage.used(d, MemoryKind::Device))));
            spilled.push((labels.clone(), sum(&|d| usage.used(d, MemoryKind::Spill))));
            throttled.push((labels, sum(&|d| usage.launch_stats(d).throttled_ns) / 1e9));
        }
    }
    family(
        "tensor_fusion_agent_worker_vram_granted_bytes",
        "gauge",
        "VRAM request granted to the container, per GPU.",
        granted,
    );
    family(
        "tensor_fusion_agent_worker_vram_used_bytes",
        "gauge",
        "Device memory the container holds (usage file).",
        used,
    );
    family(
        "tensor_fusion_agent_worker_vram_spilled_bytes",
        "gauge",
        "Host memory backing the container's device allocations.",
        spilled,
    );
    family(
        "tensor_fusion_agent_worker_throttled_seconds_total",
        "counter",
        "Time the container's kernel launches waited for the compute limit.",
        throttled,
    );
    family(
        "tensor_fusion_agent_allocations_total",
        "counter",
        "Shared pods given a GPU share.",
        vec![(String::new(), state.allocations_total as f64)],
    );
    family(
        "tensor_fusion_agent_allocation_failures_total",
        "counter",
        "Allocation attempts that found no fitting GPU.",
        vec![(String::new(), state.allocation_failures_total as f64)],
    );
    out
}
