//! The compute steering loop: every window (100 ms by default) it measures each tenant (an
//! injected container on a GPU) and writes the refill rate the interposer's token bucket uses,
//! through the usage file `<pod dir>/<container>.shm`.
//!
//! Per tenant and window: launched tokens and throttled launches (differences of the counters in
//! the usage file) and the share of GPU time its processes used (NVML per-process utilisation,
//! matched to the container through the pids in the usage file's process slots; NVML reports
//! host pids, the slots hold the container's pids, and `/proc/<pid>/status` `NSpid` links the
//! two). The rule itself, [`tensor_fusion_interposer_core::limiter::Steering`], is shared with
//! the interposer's simulation tests.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tensor_fusion_interposer_core::config::usage_file_path;
use tensor_fusion_interposer_core::limiter::{Steering, TenantWindow};
use tensor_fusion_interposer_core::shm::{SLOT_COUNT, UsageFile};

use crate::agent::Agent;
use crate::discovery::Nvml;
use crate::worker::pod_dir;

/// Byte offset of the first process slot in the usage file (header 8 words, 8 device blocks of
/// 16 words; `docs/interposer.md`).
const SLOTS_AT_BYTES: usize = 1088;
/// Bytes per process slot (20 words).
const SLOT_BYTES: usize = 160;

/// One container on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub usage_path: PathBuf,
    /// The GPU's position in the container's device list.
    pub ordinal: usize,
    pub request_share: f64,
    pub limit_share: f64,
}

/// Counters of a tenant at the end of the previous window.
#[derive(Debug, Clone, Copy, Default)]
struct Previous {
    launched_units: u64,
    throttled_launches: u64,
}

/// The pids in a usage file's process slots (container PID namespace).
pub fn slot_pids(bytes: &[u8]) -> Vec<u32> {
    (0..SLOT_COUNT)
        .filter_map(|slot| {
            let at = SLOTS_AT_BYTES + slot * SLOT_BYTES;
            let word = bytes.get(at..at + 8)?;
            let pid = u64::from_le_bytes(word.try_into().ok()?);
            (pid != 0).then_some(pid as u32)
        })
        .collect()
}

/// The innermost-namespace pid of host process `pid` (the `NSpid` line's last field).
fn namespace_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// Tenants of every GPU (by NVML index) from the agent's workers.
async fn tenants(agent: &Agent) -> BTreeMap<u32, Vec<Tenant>> {
    let state = agent.state.lock().await;
    let index_of: HashMap<&str, u32> = state
        .gpus
        .iter()
        .map(|gpu| (gpu.uuid.as_str(), gpu.index))
        .collect();
    let tflops_of: HashMap<&str, f64> = state
        .allocator
        .gpus()
        .iter()
        .map(|gpu| (gpu.capacity.uuid.as_str(), gpu.capacity.physical.tflops))
        .collect();
    let mut by_gpu: BTreeMap<u32, Vec<Tenant>> = BTreeMap::new();
    for record in state.workers.values() {
        let dir = pod_dir(&agent.config.host_root, &record.spec.uid);
        for container in &record.spec.containers {
            let Some(limit) = container.tflops_limit else {
                continue;
            };
            let request = container.tflops_request.unwrap_or(limit);
            for (ordinal, uuid) in record
                .assignment
                .grant
                .gpu_uuids
                .iter()
                .take(container.gpu_count as usize)
                .enumerate()
            {
                let (Some(&index), Some(&tflops)) =
                    (index_of.get(uuid.as_str()), tflops_of.get(uuid.as_str()))
                else {
                    continue;
                };
                if tflops <= 0.0 {
                    continue;
                }
                by_gpu.entry(index).or_default().push(Tenant {
                    usage_path: usage_file_path(&dir, &container.name),
                    ordinal,
                    request_share: (request / tflops).min(1.0),
                    limit_share: (limit / tflops).min(1.0),
                });
            }
        }
    }
    by_gpu
}

/// Runs the loop until the process stops.
pub async fn run(agent: Arc<Agent>, nvml: Nvml) {
    let window = Duration::from_secs_f64(agent.config.steering_window_seconds);
    let mut interval = tokio::time::interval(window);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut steering: HashMap<u32, (Vec<PathBuf>, Steering)> = HashMap::new();
    let mut previous: HashMap<(PathBuf, usize), Previous> = HashMap::new();
    let mut files: HashMap<PathBuf, UsageFile> = HashMap::new();
    let mut utilisation_warned = false;
    loop {
        interval.tick().await;
        let by_gpu = tenants(&agent).await;
        files.retain(|path, _| path.exists());
        for (index, tenants) in by_gpu {
            let samples = match nvml.process_utilisation(index, 0) {
                Ok(samples) => samples,
                Err(error) => {
                    if !utilisation_warned {
                        tracing::warn!(%error, "No per-process utilisation; steering is off");
                        utilisation_warned = true;
                    }
                    continue;
                }
            };
            let busy_by_pid: HashMap<u32, f64> = samples
                .iter()
                .map(|sample| {
                    let pid = namespace_pid(sample.pid).unwrap_or(sample.pid);
                    (pid, f64::from(sample.sm_percent) / 100.0)
                })
                .collect();
            let mut windows = Vec::new();
            let mut rates = Vec::new();
            let mut attached = Vec::new();
            for tenant in &tenants {
                if !files.contains_key(&tenant.usage_path) {
                    match UsageFile::attach(&tenant.usage_path) {
                        Ok(file) => {
                            files.insert(tenant.usage_path.clone(), file);
                        }
                        // No process of the container has started CUDA yet.
                        Err(_) => continue,
                    }
                }
                let Some(file) = files.get(&tenant.usage_path) else {
                    continue;
                };
                let stats = file.launch_stats(tenant.ordinal);
                let key = (tenant.usage_path.clone(), tenant.ordinal);
                let before = previous.insert(
                    key,
                    Previous {
                        launched_units: stats.launched_units,
                        throttled_launches: stats.throttled_launches,
                    },
                );
                let before = before.unwrap_or(Previous {
                    launched_units: stats.launched_units,
                    throttled_launches: stats.throttled_launches,
                });
                let pids = std::fs::read(&tenant.usage_path)
                    .map(|bytes| slot_pids(&bytes))
                    .unwrap_or_default();
                let busy_share: f64 = pids
                    .iter()
                    .filter_map(|pid| busy_by_pid.get(pid))
                    .sum::<f64>()
                    .min(1.0);
                windows.push(TenantWindow {
                    request_share: tenant.request_share,
                    limit_share: tenant.limit_share,
                    busy_share,
                    launched_units: stats.launched_units.saturating_sub(before.launched_units),
                    throttled: stats.throttled_launches > before.throttled_launches,
                });
                rates.push(file.refill_rate(tenant.ordinal));
                attached.push(tenant);
            }
            if windows.is_empty() {
                continue;
            }
            let paths: Vec<PathBuf> = attached.iter().map(|t| t.usage_path.clone()).collect();
            let entry = steering
                .entry(index)
                .or_insert_with(|| (paths.clone(), Steering::new(paths.len())));
            if entry.0 != paths {
                *entry = (paths.clone(), Steering::new(paths.len()));
            }
            let new_rates = entry.1.update(&windows, &rates, window.as_secs_f64());
            for (tenant, rate) in attached.iter().zip(new_rates) {
                if let Some(file) = files.get(&tenant.usage_path)
                    && rate.is_finite()
                    && rate > 0.0
                {
                    file.set_refill_rate(tenant.ordinal, rate);
                }
            }
        }
        previous.retain(|(path, _), _| files.contains_key(path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_pids_reads_the_documented_layout() {
        let mut bytes = vec![0u8; 21_568];
        let put = |bytes: &mut Vec<u8>, slot: usize, pid: u64| {
            let at = SLOTS_AT_BYTES + slot * SLOT_BYTES;
            bytes[at..at + 8].copy_from_slice(&pid.to_le_bytes());
        };
        put(&mut bytes, 0, 41);
        put(&mut bytes, 127, 977);
        assert_eq!(slot_pids(&bytes), [41, 977]);
    }

    #[test]
    fn slot_pids_matches_a_real_usage_file() {
        use tensor_fusion_interposer_core::shm::{DeviceSettings, MemoryKind};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main.shm");
        let file = UsageFile::open(&path, &[DeviceSettings::default()]).unwrap();
        file.reserve(0, 1024, MemoryKind::Device).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(slot_pids(&bytes), [std::process::id()]);
    }
}
