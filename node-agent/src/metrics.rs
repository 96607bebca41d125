//! The agent's Prometheus metrics, derived from its state at each scrape.
//!
//! Everything the agent exports is a view of state it holds anyway (the allocator's GPUs, the
//! workers and their usage files, two decision counters), so nothing is recorded ahead of time:
//! [`MetricsSnapshot::take`] copies what a scrape needs while the state lock is held, reads the
//! workers' usage files after it is released, and `prometheus-client` encodes the snapshot
//! through its [`Collector`] interface. A worker that ended is no longer in the state, so its
//! series are gone from the next scrape; no series outlives what it describes.

use std::path::{Path, PathBuf};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tensor_fusion_interposer_core::config::usage_file_path;
use tensor_fusion_interposer_core::shm::{MemoryKind, UsageFile};

use crate::agent::AgentState;
use crate::worker::pod_dir;

/// `Content-Type` of the rendered text (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One GPU's row.
#[derive(Debug, Clone, PartialEq)]
struct GpuRow {
    uuid: String,
    tflops_capacity: f64,
    tflops_virtual_capacity: f64,
    vram_capacity_bytes: u64,
    vram_virtual_capacity_bytes: u64,
    tflops_allocated: f64,
    vram_allocated_bytes: u64,
    workers: u64,
    native: bool,
}

/// What an injected container's usage file says.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Usage {
    vram_used_bytes: u64,
    vram_spilled_bytes: u64,
    throttled_seconds: f64,
}

/// One injected container's row.
#[derive(Debug, Clone, PartialEq)]
struct WorkerRow {
    namespace: String,
    pod: String,
    container: String,
    vram_granted_bytes: u64,
    usage_path: PathBuf,
    gpu_count: usize,
    /// `None` until a process of the container opened its usage file.
    usage: Option<Usage>,
}

impl WorkerRow {
    fn labels(&self) -> [(&'static str, &str); 3] {
        [
            ("namespace", self.namespace.as_str()),
            ("pod", self.pod.as_str()),
            ("container", self.container.as_str()),
        ]
    }
}

/// The values of one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    gpus: Vec<GpuRow>,
    workers: Vec<WorkerRow>,
    allocations_total: u64,
    allocation_failures_total: u64,
}

impl MetricsSnapshot {
    /// Copies the state's numbers (cheap: call it under the state lock), then [`Self::read_usage`]
    /// outside it.
    pub fn take(host_root: &Path, state: &AgentState) -> Self {
        let gpus = state
            .allocator
            .gpus()
            .iter()
            .map(|gpu| GpuRow {
                uuid: gpu.capacity.uuid.clone(),
                tflops_capacity: gpu.capacity.physical.tflops,
                tflops_virtual_capacity: gpu.capacity.virtual_.tflops,
                vram_capacity_bytes: gpu.capacity.physical.vram_bytes,
                vram_virtual_capacity_bytes: gpu.capacity.virtual_.vram_bytes,
                tflops_allocated: gpu.requested.tflops,
                vram_allocated_bytes: gpu.requested.vram_bytes,
                workers: gpu.workers as u64,
                native: gpu.capacity.native,
            })
            .collect();
        let workers = state
            .workers
            .values()
            .flat_map(|record| {
                let dir = pod_dir(host_root, &record.spec.uid);
                record
                    .spec
                    .containers
                    .iter()
                    .map(move |container| WorkerRow {
                        namespace: record.spec.namespace.clone(),
                        pod: record.spec.name.clone(),
                        container: container.name.clone(),
                        // Over all its GPUs, like the usage series.
                        vram_granted_bytes: container
                            .vram_request
                            .unwrap_or(0)
                            .saturating_mul(u64::from(container.gpu_count)),
                        usage_path: usage_file_path(&dir, &container.name),
                        gpu_count: container.gpu_count as usize,
                        usage: None,
                    })
            })
            .collect();
        Self {
            gpus,
            workers,
            allocations_total: state.allocations_total,
            allocation_failures_total: state.allocation_failures_total,
        }
    }

    /// Reads each worker's usage file (summed over its GPUs); a file that does not exist yet
    /// leaves the worker without usage series.
    pub fn read_usage(&mut self) {
        for worker in &mut self.workers {
            let Ok(file) = UsageFile::attach(&worker.usage_path) else {
                continue;
            };
            let mut usage = Usage::default();
            for device in 0..worker.gpu_count {
                usage.vram_used_bytes += file.used(device, MemoryKind::Device);
                usage.vram_spilled_bytes += file.used(device, MemoryKind::Spill);
                usage.throttled_seconds += file.launch_stats(device).throttled_ns as f64 / 1e9;
            }
            worker.usage = Some(usage);
        }
    }

    /// The Prometheus text of this snapshot.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// One metric family: its descriptor, then a sample per row that has a value.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
    metric_type: MetricType,
}

impl Family<'_> {
    fn encode<'r, Row: 'r, Labels, Metric>(
        &self,
        encoder: &mut DescriptorEncoder,
        rows: impl IntoIterator<Item = &'r Row>,
        labels: impl Fn(&'r Row) -> Labels,
        value: impl Fn(&'r Row) -> Option<Metric>,
    ) -> Result<(), std::fmt::Error>
    where
        Labels: EncodeLabelSet,
        Metric: EncodeMetric,
    {
        let mut metric_encoder = encoder.encode_descriptor(
            self.name,
            self.help,
            self.unit.as_ref(),
            self.metric_type,
        )?;
        for row in rows {
            if let Some(metric) = value(row) {
                let labels = labels(row);
                metric.encode(metric_encoder.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    /// A family with one unlabelled sample.
    fn encode_one(
        &self,
        encoder: &mut DescriptorEncoder,
        metric: impl EncodeMetric,
    ) -> Result<(), std::fmt::Error> {
        let metric_encoder = encoder.encode_descriptor(
            self.name,
            self.help,
            self.unit.as_ref(),
            self.metric_type,
        )?;
        metric.encode(metric_encoder)
    }
}

fn gauge_family<'a>(name: &'a str, help: &'a str, unit: Option<Unit>) -> Family<'a> {
    Family {
        name,
        help,
        unit,
        metric_type: MetricType::Gauge,
    }
}

fn gauge<T>(value: T) -> Option<ConstGauge<T>> {
    Some(ConstGauge::new(value))
}

impl Collector for MetricsSnapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let encoder = &mut encoder;
        let gpus = &self.gpus;
        let by_gpu = |gpu: &GpuRow| [("gpu", gpu.uuid.clone())];
        gauge_family(
            "tensor_fusion_agent_gpu_tflops_capacity",
            "Physical TFLOPS of the GPU.",
            None,
        )
        .encode(encoder, gpus, by_gpu, |gpu| gauge(gpu.tflops_capacity))?;
        gauge_family(
            "tensor_fusion_agent_gpu_tflops_virtual_capacity",
            "TFLOPS limits may add up to (oversold).",
            None,
        )
        .encode(encoder, gpus, by_gpu, |gpu| {
            gauge(gpu.tflops_virtual_capacity)
        })?;
        gauge_family(
            "tensor_fusion_agent_gpu_vram_capacity",
            "Physical VRAM of the GPU.",
            Some(Unit::Bytes),
        )
        .encode(encoder, gpus, by_gpu, |gpu| gauge(gpu.vram_capacity_bytes))?;
        gauge_family(
            "tensor_fusion_agent_gpu_vram_virtual_capacity",
            "VRAM limits may add up to (expanded to host memory and disk).",
            Some(Unit::Bytes),
        )
        .encode(encoder, gpus, by_gpu, |gpu| {
            gauge(gpu.vram_virtual_capacity_bytes)
        })?;
        gauge_family(
            "tensor_fusion_agent_gpu_tflops_allocated",
            "Sum of the TFLOPS requests granted on the GPU.",
            None,
        )
        .encode(encoder, gpus, by_gpu, |gpu| gauge(gpu.tflops_allocated))?;
        gauge_family(
            "tensor_fusion_agent_gpu_vram_allocated",
            "Sum of the VRAM requests granted on the GPU.",
            Some(Unit::Bytes),
        )
        .encode(encoder, gpus, by_gpu, |gpu| gauge(gpu.vram_allocated_bytes))?;
        gauge_family(
            "tensor_fusion_agent_gpu_workers",
            "Shared workers on the GPU.",
            None,
        )
        .encode(encoder, gpus, by_gpu, |gpu| gauge(gpu.workers))?;
        gauge_family(
            "tensor_fusion_agent_gpu_native",
            "1 when the NVIDIA device plugin gave the GPU to a native pod.",
            None,
        )
        .encode(encoder, gpus, by_gpu, |gpu| gauge(u64::from(gpu.native)))?;

        let workers = &self.workers;
        gauge_family(
            "tensor_fusion_agent_worker_vram_granted",
            "VRAM request granted to the container, over all its GPUs.",
            Some(Unit::Bytes),
        )
        .encode(encoder, workers, WorkerRow::labels, |worker| {
            gauge(worker.vram_granted_bytes)
        })?;
        gauge_family(
            "tensor_fusion_agent_worker_vram_used",
            "Device memory the container holds (usage file).",
            Some(Unit::Bytes),
        )
        .encode(encoder, workers, WorkerRow::labels, |worker| {
            worker
                .usage
                .map(|usage| ConstGauge::new(usage.vram_used_bytes))
        })?;
        gauge_family(
            "tensor_fusion_agent_worker_vram_spilled",
            "Host memory backing the container's device allocations.",
            Some(Unit::Bytes),
        )
        .encode(encoder, workers, WorkerRow::labels, |worker| {
            worker
                .usage
                .map(|usage| ConstGauge::new(usage.vram_spilled_bytes))
        })?;
        Family {
            name: "tensor_fusion_agent_worker_throttled",
            help: "Time the container's kernel launches waited for the compute limit.",
            unit: Some(Unit::Seconds),
            metric_type: MetricType::Counter,
        }
        .encode(encoder, workers, WorkerRow::labels, |worker| {
            worker
                .usage
                .map(|usage| ConstCounter::new(usage.throttled_seconds))
        })?;

        Family {
            name: "tensor_fusion_agent_allocations",
            help: "Shared pods given a GPU share.",
            unit: None,
            metric_type: MetricType::Counter,
        }
        .encode_one(encoder, ConstCounter::new(self.allocations_total))?;
        Family {
            name: "tensor_fusion_agent_allocation_failures",
            help: "Allocation attempts that found no fitting GPU.",
            unit: None,
            metric_type: MetricType::Counter,
        }
        .encode_one(encoder, ConstCounter::new(self.allocation_failures_total))
    }
}

#[cfg(test)]
mod tests {
    use tensor_fusion_interposer_core::shm::DeviceSettings;

    use super::*;
    use crate::agent::WorkerRecord;
    use crate::allocator::{Allocator, GpuCapacity, Policy, Resources};
    use crate::worker::{Assignment, ContainerSpec, WorkerSpec};

    const GIB: u64 = 1 << 30;

    fn state_with_one_worker() -> AgentState {
        let capacity = GpuCapacity {
            uuid: "GPU-a".to_owned(),
            model: "NVIDIA H100 80GB HBM3".to_owned(),
            physical: Resources {
                tflops: 989.0,
                vram_bytes: 80 * GIB,
            },
            virtual_: Resources {
                tflops: 2967.0,
                vram_bytes: 120 * GIB,
            },
            native: false,
        };
        let mut allocator = Allocator::new(vec![capacity], Policy::default());
        let spec = WorkerSpec {
            namespace: "ml".to_owned(),
            name: "inference-1".to_owned(),
            uid: "0c4e-uid".to_owned(),
            containers: vec![ContainerSpec {
                name: "python".to_owned(),
                gpu_count: 1,
                tflops_request: Some(100.0),
                tflops_limit: Some(200.0),
                vram_request: Some(3 * GIB),
                vram_limit: Some(4 * GIB),
            }],
        };
        let grant = allocator
            .allocate(&spec.uid, &spec.share_request())
            .expect("an empty H100 fits the worker");
        let mut state = AgentState {
            allocator,
            allocations_total: 1,
            allocation_failures_total: 2,
            ..AgentState::default()
        };
        state.workers.insert(
            spec.uid.clone(),
            WorkerRecord {
                spec,
                assignment: Assignment {
                    node: "gpu-node-1".to_owned(),
                    pod_uid: None,
                    grant,
                },
            },
        );
        state
    }

    fn scrape(host_root: &Path, state: &AgentState) -> String {
        let mut snapshot = MetricsSnapshot::take(host_root, state);
        snapshot.read_usage();
        snapshot.render()
    }

    #[test]
    fn a_multi_gpu_containers_grant_is_its_total_like_its_usage() {
        let root = tempfile::tempdir().unwrap();
        let mut state = state_with_one_worker();
        for record in state.workers.values_mut() {
            record.spec.containers[0].gpu_count = 2;
        }
        let text = scrape(root.path(), &state);
        assert!(text.contains("tensor_fusion_agent_worker_vram_granted_bytes{namespace=\"ml\",pod=\"inference-1\",container=\"python\"} 6442450944\n"), "{text}");
    }

    #[test]
    fn gpu_and_worker_series_follow_the_state_and_ended_workers_disappear() {
        let root = tempfile::tempdir().unwrap();
        let mut state = state_with_one_worker();

        // Before the container starts CUDA only its grant is known.
        let text = scrape(root.path(), &state);
        assert!(text.contains("tensor_fusion_agent_worker_vram_granted_bytes{namespace=\"ml\",pod=\"inference-1\",container=\"python\"} 3221225472\n"), "{text}");
        assert!(
            !text.contains("tensor_fusion_agent_worker_vram_used_bytes{"),
            "{text}"
        );

        // The interposer opened the usage file, holds memory, spilled some and was throttled.
        let dir = pod_dir(root.path(), "0c4e-uid");
        std::fs::create_dir_all(&dir).unwrap();
        let usage = UsageFile::open(
            &usage_file_path(&dir, "python"),
            &[DeviceSettings {
                vram_limit: 3 * GIB,
                spill_quota: GIB,
                refill_rate: 1000.0,
                burst_ns: 100_000_000,
            }],
        )
        .unwrap();
        usage.reserve(0, 2 * GIB, MemoryKind::Device).unwrap();
        usage.reserve(0, 512 << 20, MemoryKind::Spill).unwrap();
        let bucket = usage.bucket(0);
        assert_eq!(bucket.acquire(100, 1_000), 0);
        // 1500 tokens past an empty bucket at 1000 per second: 1.5 s of waiting.
        assert_eq!(bucket.acquire(1_500, 1_000), 1_500_000_000);

        let text = scrape(root.path(), &state);
        let worker = "{namespace=\"ml\",pod=\"inference-1\",container=\"python\"}";
        for line in [
            "# TYPE tensor_fusion_agent_gpu_tflops_capacity gauge".to_owned(),
            "tensor_fusion_agent_gpu_tflops_capacity{gpu=\"GPU-a\"} 989.0".to_owned(),
            "tensor_fusion_agent_gpu_tflops_virtual_capacity{gpu=\"GPU-a\"} 2967.0".to_owned(),
            "tensor_fusion_agent_gpu_vram_capacity_bytes{gpu=\"GPU-a\"} 85899345920".to_owned(),
            "tensor_fusion_agent_gpu_vram_virtual_capacity_bytes{gpu=\"GPU-a\"} 128849018880"
                .to_owned(),
            "tensor_fusion_agent_gpu_tflops_allocated{gpu=\"GPU-a\"} 100.0".to_owned(),
            "tensor_fusion_agent_gpu_vram_allocated_bytes{gpu=\"GPU-a\"} 3221225472".to_owned(),
            "tensor_fusion_agent_gpu_workers{gpu=\"GPU-a\"} 1".to_owned(),
            "tensor_fusion_agent_gpu_native{gpu=\"GPU-a\"} 0".to_owned(),
            format!("tensor_fusion_agent_worker_vram_used_bytes{worker} 2147483648"),
            format!("tensor_fusion_agent_worker_vram_spilled_bytes{worker} 536870912"),
            "# TYPE tensor_fusion_agent_worker_throttled_seconds_total counter".to_owned(),
            format!("tensor_fusion_agent_worker_throttled_seconds_total{worker} 1.5"),
            "tensor_fusion_agent_allocations_total 1".to_owned(),
            "tensor_fusion_agent_allocation_failures_total 2".to_owned(),
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing in\n{text}"
            );
        }

        // The pod ends: its grant goes back and none of its series is left.
        state.workers.clear();
        state.allocator.release("0c4e-uid");
        let text = scrape(root.path(), &state);
        assert!(!text.contains("inference-1"), "{text}");
        assert!(
            text.contains("tensor_fusion_agent_gpu_workers{gpu=\"GPU-a\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("tensor_fusion_agent_gpu_vram_allocated_bytes{gpu=\"GPU-a\"} 0\n"),
            "{text}"
        );
    }
}
