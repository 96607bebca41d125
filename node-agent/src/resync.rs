//! Re-discovery while the agent runs. Every `resyncSeconds` the agent asks NVML for the GPUs
//! again and re-reads the host sizes; [`apply`] folds the answer into the state: when the GPUs
//! (by UUID, index or memory) or the host sizes changed it recomputes each GPU's capacity and
//! rebuilds the allocator around the grants it holds, so every worker keeps its assignment. A
//! worker whose grant names a GPU the node no longer reports keeps its record (the pod still
//! runs with it) and is reported once as stranded; the vanished GPU is out of the allocator, so
//! nothing new is placed on it. An NVML error, or NVML suddenly reporting no GPUs at all, keeps
//! the last known GPUs: a transient failure never takes the node's capacity to zero.
//!
//! Plain data in, plain data out: the agent does the NVML call, the logging, the Events and the
//! node status write around it.

use std::collections::BTreeSet;

use crate::agent::AgentState;
use crate::capacity::{HostSizes, gpu_capacities};
use crate::config::AgentConfig;
use crate::discovery::{DiscoveredGpu, NvmlError};
use crate::worker::WorkerSpec;

/// How the GPU list differs from the last one, by UUID.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub resized: Vec<Resized>,
}

/// A GPU whose memory size changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Resized {
    pub uuid: String,
    pub old_vram_bytes: u64,
    pub new_vram_bytes: u64,
}

impl GpuChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.resized.is_empty()
    }
}

/// What GPUs were added, removed or resized going from `old` to `new`.
pub fn gpu_changes(old: &[DiscoveredGpu], new: &[DiscoveredGpu]) -> GpuChanges {
    let find = |gpus: &[DiscoveredGpu], uuid: &str| -> Option<u64> {
        gpus.iter()
            .find(|gpu| gpu.uuid == uuid)
            .map(|gpu| gpu.vram_bytes)
    };
    let mut changes = GpuChanges::default();
    for gpu in new {
        match find(old, &gpu.uuid) {
            None => changes.added.push(gpu.uuid.clone()),
            Some(old_vram_bytes) if old_vram_bytes != gpu.vram_bytes => {
                changes.resized.push(Resized {
                    uuid: gpu.uuid.clone(),
                    old_vram_bytes,
                    new_vram_bytes: gpu.vram_bytes,
                })
            }
            Some(_) => {}
        }
    }
    for gpu in old {
        if find(new, &gpu.uuid).is_none() {
            changes.removed.push(gpu.uuid.clone());
        }
    }
    changes
}

/// A worker whose grant names GPUs the node no longer reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Stranded {
    pub spec: WorkerSpec,
    pub gpu_uuids: Vec<String>,
}

/// What one resync found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResyncOutcome {
    pub changes: GpuChanges,
    /// The host sizes before and after, when they changed.
    pub host_changed: Option<(HostSizes, HostSizes)>,
    /// Capacities were recomputed and the allocator rebuilt around the existing grants.
    pub rebuilt: bool,
    /// Why the discovered GPUs were not taken (NVML failed or reported none); the last known
    /// GPUs stay.
    pub kept_last_known: Option<String>,
    /// Workers stranded on a vanished GPU, reported for the first time.
    pub newly_stranded: Vec<Stranded>,
    /// Workers that were stranded and whose GPUs are back.
    pub recovered: Vec<WorkerSpec>,
}

/// Sets the GPUs and host sizes the state runs on: capacities, the TFLOPS per GPU for limits
/// files, whether VRAM is host-backed, and the allocator rebuilt around the grants it holds,
/// with the native marks applied again.
pub fn install(
    state: &mut AgentState,
    gpus: Vec<DiscoveredGpu>,
    host: HostSizes,
    config: &AgentConfig,
) {
    let capacities = gpu_capacities(&gpus, config, host);
    // Entries of vanished GPUs stay: workers still on them keep their `gpu_tflops`.
    for gpu in &capacities {
        state
            .gpu_tflops
            .insert(gpu.uuid.clone(), gpu.physical.tflops);
    }
    state.host_backed_vram = capacities
        .iter()
        .any(|gpu| gpu.virtual_.vram_bytes > gpu.physical.vram_bytes);
    state.allocator.set_capacity(capacities.clone());
    state.allocator.set_native(&state.native_gpus);
    state.capacities = capacities;
    state.gpus = gpus;
    state.host = host;
}

/// Folds a fresh discovery into the state (see the module documentation).
pub fn apply(
    state: &mut AgentState,
    discovered: Result<Vec<DiscoveredGpu>, NvmlError>,
    host: HostSizes,
    config: &AgentConfig,
) -> ResyncOutcome {
    let mut outcome = ResyncOutcome::default();
    let gpus = match discovered {
        Ok(gpus) if gpus.is_empty() && !state.gpus.is_empty() => {
            outcome.kept_last_known = Some("NVML reports no GPUs".to_owned());
            state.gpus.clone()
        }
        Ok(gpus) => gpus,
        Err(error) => {
            outcome.kept_last_known = Some(error.to_string());
            state.gpus.clone()
        }
    };
    // `HostSizes::read` gives 0 for what it could not read; keep the last size then.
    let host = HostSizes {
        memory_bytes: nonzero_or(host.memory_bytes, state.host.memory_bytes),
        disk_bytes: nonzero_or(host.disk_bytes, state.host.disk_bytes),
    };
    outcome.changes = gpu_changes(&state.gpus, &gpus);
    if host != state.host {
        outcome.host_changed = Some((state.host, host));
    }
    if gpus != state.gpus || host != state.host {
        install(state, gpus, host, config);
        outcome.rebuilt = true;
    }

    let present: BTreeSet<&str> = state.gpus.iter().map(|gpu| gpu.uuid.as_str()).collect();
    let mut stranded = BTreeSet::new();
    for (uid, record) in &state.workers {
        let missing: Vec<String> = record
            .assignment
            .grant
            .gpu_uuids
            .iter()
            .filter(|uuid| !present.contains(uuid.as_str()))
            .cloned()
            .collect();
        if missing.is_empty() {
            if state.stranded.contains(uid) {
                outcome.recovered.push(record.spec.clone());
            }
            continue;
        }
        if !state.stranded.contains(uid) {
            outcome.newly_stranded.push(Stranded {
                spec: record.spec.clone(),
                gpu_uuids: missing,
            });
        }
        stranded.insert(uid.clone());
    }
    state.stranded = stranded;
    outcome
}

fn nonzero_or(value: u64, fallback: u64) -> u64 {
    if value == 0 { fallback } else { value }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::WorkerRecord;
    use crate::allocator::{Allocator, Resources, ShareRequest};
    use crate::capacity::advertised;
    use crate::worker::{Assignment, ContainerSpec};

    const GIB: u64 = 1 << 30;

    fn h100(index: u32, vram_gib: u64) -> DiscoveredGpu {
        DiscoveredGpu {
            index,
            uuid: format!("GPU-{index}"),
            model: "NVIDIA H100 80GB HBM3".to_owned(),
            vram_bytes: vram_gib * GIB,
        }
    }

    fn config() -> AgentConfig {
        AgentConfig {
            node_name: "gpu-node-1".to_owned(),
            tflops_oversell_ratio: 200.0,
            vram_expand_to_host_mem: 50.0,
            ..AgentConfig::default()
        }
    }

    const HOST: HostSizes = HostSizes {
        memory_bytes: 64 * GIB,
        disk_bytes: 500 * GIB,
    };

    fn node(gpus: Vec<DiscoveredGpu>) -> AgentState {
        let config = config();
        let mut state = AgentState {
            allocator: Allocator::new(Vec::new(), config.policy()),
            ..AgentState::default()
        };
        install(&mut state, gpus, HOST, &config);
        state
    }

    fn ask(vram_gib: u64) -> ShareRequest {
        let share = Resources {
            tflops: 100.0,
            vram_bytes: vram_gib * GIB,
        };
        ShareRequest {
            gpu_count: 1,
            request: share,
            limit: share,
        }
    }

    /// Allocates like the agent does and records the worker; returns its GPU.
    fn add_worker(state: &mut AgentState, name: &str, vram_gib: u64) -> String {
        let grant = state.allocator.allocate(name, &ask(vram_gib)).unwrap();
        let spec = WorkerSpec {
            namespace: "ml".to_owned(),
            name: name.to_owned(),
            uid: name.to_owned(),
            containers: vec![ContainerSpec {
                name: "main".to_owned(),
                gpu_count: 1,
                tflops_request: Some(100.0),
                tflops_limit: Some(100.0),
                vram_request: Some(vram_gib * GIB),
                vram_limit: Some(vram_gib * GIB),
            }],
        };
        let uuid = grant.gpu_uuids[0].clone();
        let assignment = Assignment {
            node: "gpu-node-1".to_owned(),
            pod_uid: None,
            grant,
        };
        state
            .workers
            .insert(name.to_owned(), WorkerRecord { spec, assignment });
        uuid
    }

    fn requested_vram(state: &AgentState, uuid: &str) -> Option<u64> {
        state
            .allocator
            .requested_by_gpu()
            .get(uuid)
            .map(|requested| requested.vram_bytes)
    }

    #[test]
    fn an_added_gpu_grows_capacity_and_every_grant_stays() {
        let mut state = node(vec![h100(0, 80)]);
        assert_eq!(add_worker(&mut state, "a", 60), "GPU-0");
        state.native_gpus = ["GPU-0".to_owned()].into();
        state.allocator.set_native(&state.native_gpus);

        let outcome = apply(
            &mut state,
            Ok(vec![h100(0, 80), h100(1, 80)]),
            HOST,
            &config(),
        );
        assert_eq!(outcome.changes.added, ["GPU-1"]);
        assert!(outcome.changes.removed.is_empty() && outcome.changes.resized.is_empty());
        assert!(outcome.rebuilt);
        assert_eq!(outcome.kept_last_known, None);
        assert_eq!(state.gpus.len(), 2);
        assert_eq!(requested_vram(&state, "GPU-0"), Some(60 * GIB));
        assert_eq!(requested_vram(&state, "GPU-1"), Some(0));
        assert_eq!(state.allocator.grant("a").unwrap().gpu_uuids, ["GPU-0"]);
        // The native mark survives the rebuild; only the new GPU counts.
        assert!(state.allocator.gpus()[0].capacity.native);
        let capacities: Vec<_> = state
            .allocator
            .gpus()
            .iter()
            .map(|gpu| gpu.capacity.clone())
            .collect();
        assert_eq!(advertised(&capacities), (989, 80 * GIB));
        // Host-backed VRAM is split over the GPUs again: 50 % of 64 GiB, 16 GiB each.
        assert_eq!(state.capacities[1].virtual_.vram_bytes, 96 * GIB);
        assert_eq!(state.gpu_tflops["GPU-1"], 989.0);
        assert_eq!(
            state.allocator.allocate("b", &ask(70)).unwrap().gpu_uuids,
            ["GPU-1"]
        );

        // Nothing changed: nothing rebuilt, nothing reported.
        let again = apply(
            &mut state,
            Ok(vec![h100(0, 80), h100(1, 80)]),
            HOST,
            &config(),
        );
        assert_eq!(again, ResyncOutcome::default());
    }

    #[test]
    fn a_removed_gpu_strands_its_worker_once_and_gets_no_new_worker() {
        let mut state = node(vec![h100(0, 80), h100(1, 80)]);
        assert_eq!(add_worker(&mut state, "a", 60), "GPU-0");
        assert_eq!(add_worker(&mut state, "b", 60), "GPU-1");

        let outcome = apply(&mut state, Ok(vec![h100(0, 80)]), HOST, &config());
        assert_eq!(outcome.changes.removed, ["GPU-1"]);
        assert!(outcome.rebuilt);
        assert_eq!(outcome.newly_stranded.len(), 1);
        assert_eq!(outcome.newly_stranded[0].spec.name, "b");
        assert_eq!(outcome.newly_stranded[0].gpu_uuids, ["GPU-1"]);
        // The worker keeps its record and its grant; the GPU is gone from the allocator.
        assert!(state.workers.contains_key("b"));
        assert_eq!(state.allocator.grant("b").unwrap().gpu_uuids, ["GPU-1"]);
        assert_eq!(requested_vram(&state, "GPU-1"), None);
        assert_eq!(requested_vram(&state, "GPU-0"), Some(60 * GIB));
        // Its limits files still get the vanished GPU's TFLOPS.
        assert_eq!(state.gpu_tflops["GPU-1"], 989.0);
        // 60 GiB fit nowhere now: not on GPU-0 (20 free), and GPU-1 is not offered.
        let refused = state.allocator.allocate("c", &ask(60)).unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("no GPU fits: 0 of 1 wanted GPUs fit"),
            "{refused}"
        );
        assert_eq!(
            state.allocator.allocate("d", &ask(10)).unwrap().gpu_uuids,
            ["GPU-0"]
        );

        // Reported once, not at every resync.
        let again = apply(&mut state, Ok(vec![h100(0, 80)]), HOST, &config());
        assert!(again.newly_stranded.is_empty() && !again.rebuilt);
        assert!(state.stranded.contains("b"));

        // The GPU comes back: the worker's share is charged on it again.
        let back = apply(
            &mut state,
            Ok(vec![h100(0, 80), h100(1, 80)]),
            HOST,
            &config(),
        );
        assert_eq!(back.changes.added, ["GPU-1"]);
        assert_eq!(back.recovered.len(), 1);
        assert_eq!(back.recovered[0].name, "b");
        assert_eq!(requested_vram(&state, "GPU-1"), Some(60 * GIB));
        assert!(state.stranded.is_empty());
    }

    #[test]
    fn a_memory_change_resizes_capacity_and_keeps_grants() {
        let mut state = node(vec![h100(0, 80)]);
        add_worker(&mut state, "a", 30);
        let outcome = apply(&mut state, Ok(vec![h100(0, 40)]), HOST, &config());
        assert_eq!(
            outcome.changes.resized,
            [Resized {
                uuid: "GPU-0".to_owned(),
                old_vram_bytes: 80 * GIB,
                new_vram_bytes: 40 * GIB,
            }]
        );
        assert!(outcome.rebuilt);
        let gpu = &state.allocator.gpus()[0];
        assert_eq!(gpu.capacity.physical.vram_bytes, 40 * GIB);
        assert_eq!(gpu.capacity.virtual_.vram_bytes, 72 * GIB);
        assert_eq!(gpu.requested.vram_bytes, 30 * GIB);
        assert!(state.allocator.allocate("b", &ask(20)).is_err());

        // Host memory grew: virtual VRAM follows; an unreadable size (0) keeps the last one.
        let bigger = HostSizes {
            memory_bytes: 128 * GIB,
            disk_bytes: 0,
        };
        let outcome = apply(&mut state, Ok(vec![h100(0, 40)]), bigger, &config());
        assert!(outcome.changes.is_empty() && outcome.rebuilt);
        let (before, after) = outcome.host_changed.unwrap();
        assert_eq!(before, HOST);
        assert_eq!(after.memory_bytes, 128 * GIB);
        assert_eq!(after.disk_bytes, HOST.disk_bytes);
        assert_eq!(
            state.allocator.gpus()[0].capacity.virtual_.vram_bytes,
            104 * GIB
        );
    }

    #[test]
    fn an_nvml_error_or_an_empty_list_keeps_the_last_known_gpus() {
        let mut state = node(vec![h100(0, 80), h100(1, 80)]);
        add_worker(&mut state, "a", 10);
        let capacities_before = state.capacities.clone();
        let requested_before = state.allocator.requested_by_gpu();

        let failed = apply(
            &mut state,
            Err(NvmlError::Call {
                call: "nvmlDeviceGetCount_v2",
                code: 999,
            }),
            HOST,
            &config(),
        );
        assert_eq!(
            failed.kept_last_known.as_deref(),
            Some("NVML nvmlDeviceGetCount_v2 failed with code 999")
        );
        assert!(!failed.rebuilt && failed.changes.is_empty() && failed.newly_stranded.is_empty());

        let empty = apply(&mut state, Ok(Vec::new()), HOST, &config());
        assert_eq!(
            empty.kept_last_known.as_deref(),
            Some("NVML reports no GPUs")
        );
        assert!(!empty.rebuilt && empty.newly_stranded.is_empty());

        assert_eq!(state.gpus, [h100(0, 80), h100(1, 80)]);
        assert_eq!(state.capacities, capacities_before);
        assert_eq!(state.allocator.requested_by_gpu(), requested_before);
        assert!(state.stranded.is_empty());
    }
}
