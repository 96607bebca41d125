//! The compute steering loop: every window (100 ms by default) it measures each tenant (an
//! injected container on a GPU) and writes the refill rate the interposer's token bucket uses,
//! through the usage file `<pod dir>/<container>.shm`.
//!
//! Per GPU and window, [`SteeringLoop::step`] takes the tenants ([`tenants`], from the grants),
//! reads from each usage file the launched tokens and throttled launches (differences of its
//! counters) and the processes in its slots, and asks a [`UtilisationSource`] for the share of
//! GPU time each process used (NVML per-process utilisation in production, [`NvmlUtilisation`]).
//! NVML names host pids while the slots hold the container's pids, so both sides are compared
//! as [`ProcessIdentity`]: the pid inside the container (`NSpid` in `/proc/<pid>/status`) and the
//! process start time, which tells apart the pid 1 of every container. The rule itself,
//! [`tensor_fusion_interposer_core::limiter::Steering`], is shared with the interposer's
//! simulation tests; `tests/steering_closed_loop.rs` runs this loop against a simulated GPU.
//!
//! A window in which NVML reported nothing for a GPU although its tenants launched work is not
//! a measurement (NVML samples on its own period, which can be longer than the window): the
//! loop leaves the rates alone and measures the next window over the whole span.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tensor_fusion_interposer_core::config::usage_file_path;
use tensor_fusion_interposer_core::limiter::{Steering, TenantWindow};
use tensor_fusion_interposer_core::shm::{SLOT_COUNT, UsageFile};

use crate::agent::{Agent, AgentState};
use crate::discovery::{Nvml, NvmlError};
use crate::worker::pod_dir;

/// Byte offset of the first process slot in the usage file (header 8 words, 8 device blocks of
/// 16 words; `docs/interposer.md`).
const SLOTS_AT_BYTES: usize = 1088;
/// Bytes per process slot (20 words: pid, start time, then per-device counters).
const SLOT_BYTES: usize = 160;
/// Per window, a throttled tenant that NVML has never seen busy gets this many times its refill
/// rate. A first guess far too low leaves it under NVML's 1 % resolution, where the rule has
/// nothing to learn from; this climbs out of it in a few windows, then the rule takes over.
const UNMEASURED_RAMP: f64 = 4.0;

/// One container on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub usage_path: PathBuf,
    /// The GPU's position in the container's device list.
    pub ordinal: usize,
    pub request_share: f64,
    pub limit_share: f64,
}

/// A process as a usage file's slot names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    /// The pid inside the container's PID namespace.
    pub pid: u32,
    /// Clock ticks after boot at which the process started (`/proc/<pid>/stat` field 22); 0 when
    /// unknown, which matches any start time.
    pub start_time: u64,
}

impl ProcessIdentity {
    fn matches(&self, other: &ProcessIdentity) -> bool {
        self.pid == other.pid
            && (self.start_time == 0
                || other.start_time == 0
                || self.start_time == other.start_time)
    }
}

/// One utilisation sample of one process, translated to the container's view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    pub process: ProcessIdentity,
    /// Percent of the sampled period the GPU spent on this process's kernels.
    pub sm_percent: u32,
    /// NVML's timestamp of the sample, in microseconds (0 when the source has none).
    pub timestamp_us: u64,
}

/// Where per-process GPU utilisation comes from.
pub trait UtilisationSource {
    /// Samples of GPU `gpu_index` newer than `since_us` (0: everything the source holds).
    fn samples(&mut self, gpu_index: u32, since_us: u64) -> Result<Vec<ProcessSample>, NvmlError>;
}

/// NVML's `nvmlDeviceGetProcessUtilization`, with host pids mapped to the containers' pids
/// through `/proc` (the agent needs `hostPID`; without it the pid is kept as NVML gave it).
pub struct NvmlUtilisation<'a>(pub &'a Nvml);

impl UtilisationSource for NvmlUtilisation<'_> {
    fn samples(&mut self, gpu_index: u32, since_us: u64) -> Result<Vec<ProcessSample>, NvmlError> {
        Ok(self
            .0
            .process_utilisation(gpu_index, since_us)?
            .into_iter()
            .map(|sample| ProcessSample {
                process: host_process_identity(sample.pid),
                sm_percent: sample.sm_percent,
                timestamp_us: sample.timestamp_us,
            })
            .collect())
    }
}

/// The processes in a usage file's slots.
pub fn slot_processes(bytes: &[u8]) -> Vec<ProcessIdentity> {
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    (0..SLOT_COUNT)
        .filter_map(|slot| {
            let at = SLOTS_AT_BYTES + slot * SLOT_BYTES;
            let pid = word(at)?;
            (pid != 0).then_some(ProcessIdentity {
                pid: pid as u32,
                start_time: word(at + 8).unwrap_or(0),
            })
        })
        .collect()
}

/// The identity of host process `pid` as its own container sees it.
pub fn host_process_identity(pid: u32) -> ProcessIdentity {
    let namespace_pid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("NSpid:"))?
                .split_whitespace()
                .last()?
                .parse()
                .ok()
        });
    // Field 22; the command name (field 2) may hold spaces, so count after its `)`.
    let start_time = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(19)?.parse().ok()
        });
    ProcessIdentity {
        pid: namespace_pid.unwrap_or(pid),
        start_time: start_time.unwrap_or(0),
    }
}

/// Tenants of every GPU (by NVML index): each injected container with a TFLOPS limit, on each
/// GPU of its grant, with its request and limit as shares of that GPU.
pub fn tenants(host_root: &Path, state: &AgentState) -> BTreeMap<u32, Vec<Tenant>> {
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
        let dir = pod_dir(host_root, &record.spec.uid);
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

/// Counters of a tenant at the start of the window being measured.
#[derive(Debug, Clone, Copy)]
struct Counters {
    launched_units: u64,
    throttled_launches: u64,
    throttled_ns: u64,
}

/// The loop's memory for one GPU.
struct GpuSteering {
    /// The tenants the rule's estimates belong to, in order.
    tenants: Vec<(PathBuf, usize)>,
    rule: Steering,
    /// Per tenant: NVML has seen it busy while it launched, so the rule knows its token rate.
    measured: Vec<bool>,
    /// When the window being measured started (seconds on the caller's clock).
    window_start: f64,
    /// Newest NVML timestamp seen, so the next query only returns newer samples.
    last_sample_us: u64,
}

/// The steering state carried from one window to the next.
#[derive(Default)]
pub struct SteeringLoop {
    gpus: HashMap<u32, GpuSteering>,
    counters: HashMap<(PathBuf, usize), Counters>,
    files: HashMap<PathBuf, UsageFile>,
    utilisation_warned: bool,
}

impl SteeringLoop {
    pub fn new() -> Self {
        Self::default()
    }

    /// One round at `now_seconds` (any monotonic clock, seconds): measures every GPU's tenants
    /// since the previous round and writes their new refill rates.
    pub fn step(
        &mut self,
        now_seconds: f64,
        by_gpu: &BTreeMap<u32, Vec<Tenant>>,
        source: &mut dyn UtilisationSource,
    ) {
        self.files
            .retain(|path, _| by_gpu.values().flatten().any(|t| &t.usage_path == path));
        self.gpus.retain(|index, _| by_gpu.contains_key(index));
        for (&index, tenants) in by_gpu {
            self.step_gpu(now_seconds, index, tenants, source);
        }
        let files = &self.files;
        self.counters
            .retain(|(path, _), _| files.contains_key(path));
    }

    fn step_gpu(
        &mut self,
        now_seconds: f64,
        index: u32,
        tenants: &[Tenant],
        source: &mut dyn UtilisationSource,
    ) {
        let mut attached = Vec::new();
        for tenant in tenants {
            if !self.files.contains_key(&tenant.usage_path) {
                match UsageFile::attach(&tenant.usage_path) {
                    Ok(file) => {
                        self.files.insert(tenant.usage_path.clone(), file);
                    }
                    // No process of the container has started CUDA yet.
                    Err(_) => continue,
                }
            }
            attached.push(tenant);
        }
        let keys: Vec<(PathBuf, usize)> = attached
            .iter()
            .map(|tenant| (tenant.usage_path.clone(), tenant.ordinal))
            .collect();
        let gpu = self.gpus.entry(index).or_insert_with(|| GpuSteering {
            tenants: Vec::new(),
            rule: Steering::new(0),
            measured: Vec::new(),
            window_start: now_seconds,
            last_sample_us: 0,
        });
        let changed =
            gpu.tenants != keys || keys.iter().any(|key| !self.counters.contains_key(key));
        if changed {
            // A tenant came or went: the rule's estimates are per position, so start over, and
            // every tenant's window starts now.
            gpu.tenants = keys.clone();
            gpu.rule = Steering::new(keys.len());
            gpu.measured = vec![false; keys.len()];
            gpu.window_start = now_seconds;
            for (key, tenant) in keys.into_iter().zip(&attached) {
                let stats = self.files[&tenant.usage_path].launch_stats(tenant.ordinal);
                self.counters.insert(
                    key,
                    Counters {
                        launched_units: stats.launched_units,
                        throttled_launches: stats.throttled_launches,
                        throttled_ns: stats.throttled_ns,
                    },
                );
            }
            return;
        }
        if attached.is_empty() {
            return;
        }
        let window_seconds = now_seconds - gpu.window_start;
        if window_seconds <= 0.0 {
            return;
        }

        let samples = match source.samples(index, gpu.last_sample_us) {
            Ok(samples) => samples,
            Err(error) => {
                if !self.utilisation_warned {
                    tracing::warn!(gpu = index, %error, "No per-process utilisation; steering is off");
                    self.utilisation_warned = true;
                }
                return;
            }
        };
        // Each process's mean over the samples it got since the last query.
        let mut sums: Vec<(ProcessIdentity, u64, u64)> = Vec::new();
        for sample in &samples {
            gpu.last_sample_us = gpu.last_sample_us.max(sample.timestamp_us);
            match sums
                .iter_mut()
                .find(|(process, _, _)| *process == sample.process)
            {
                Some((_, total, count)) => {
                    *total += u64::from(sample.sm_percent);
                    *count += 1;
                }
                None => sums.push((sample.process, u64::from(sample.sm_percent), 1)),
            }
        }

        let mut windows = Vec::with_capacity(attached.len());
        let mut rates = Vec::with_capacity(attached.len());
        let mut now_counters = Vec::with_capacity(attached.len());
        let mut attributed = vec![false; sums.len()];
        for (key, tenant) in keys.iter().zip(&attached) {
            let file = &self.files[&tenant.usage_path];
            let stats = file.launch_stats(tenant.ordinal);
            let before = self.counters[key];
            let processes = std::fs::read(&tenant.usage_path)
                .map(|bytes| slot_processes(&bytes))
                .unwrap_or_default();
            let mut busy_percent = 0;
            for (index, (sampled, total, count)) in sums.iter().enumerate() {
                if processes.iter().any(|process| process.matches(sampled)) {
                    busy_percent += total / count;
                    attributed[index] = true;
                }
            }
            windows.push(TenantWindow {
                request_share: tenant.request_share,
                limit_share: tenant.limit_share,
                busy_share: (busy_percent as f64 / 100.0).min(1.0),
                launched_units: stats.launched_units.saturating_sub(before.launched_units),
                // A launch that waits across windows is counted once, when it overdrew; the
                // time it waits grows in every window it spends waiting.
                throttled: stats.throttled_launches > before.throttled_launches
                    || stats.throttled_ns > before.throttled_ns,
            });
            rates.push(file.refill_rate(tenant.ordinal));
            now_counters.push(Counters {
                launched_units: stats.launched_units,
                throttled_launches: stats.throttled_launches,
                throttled_ns: stats.throttled_ns,
            });
        }
        // GPU time of processes that are no tenant's (other workloads, or pids not mapped).
        let unattributed_share = sums
            .iter()
            .zip(&attributed)
            .filter(|(_, attributed)| !**attributed)
            .map(|((_, total, count), _)| (total / count) as f64 / 100.0)
            .sum::<f64>();
        if samples.is_empty() && windows.iter().any(|window| window.launched_units > 0) {
            // NVML has not sampled this span yet: measure it together with the next one.
            return;
        }

        let mut new_rates = gpu.rule.update(&windows, &rates, window_seconds);
        for (index, window) in windows.iter().enumerate() {
            if window.busy_share > 0.0 && window.launched_units > 0 {
                gpu.measured[index] = true;
            } else if !gpu.measured[index]
                && window.throttled
                && unattributed_share < window.limit_share
            {
                // Bounded: were the unattributed time all this tenant's, it stays under its limit.
                new_rates[index] = rates[index] * UNMEASURED_RAMP;
            }
        }
        for ((tenant, rate), (key, counters)) in attached
            .iter()
            .zip(new_rates)
            .zip(keys.into_iter().zip(now_counters))
        {
            if rate.is_finite() && rate > 0.0 {
                self.files[&tenant.usage_path].set_refill_rate(tenant.ordinal, rate);
            }
            self.counters.insert(key, counters);
        }
        gpu.window_start = now_seconds;
    }
}

/// Runs the loop, one step per `window`, until the process stops. Blocking: NVML calls, `/proc`
/// reads and usage-file maps, so it runs on a thread of its own (`spawn_blocking`), where a slow
/// or hung NVML never stalls the pod watch or the HTTP server.
pub fn run_blocking(agent: Arc<Agent>, nvml: Nvml, window: Duration) {
    let started = std::time::Instant::now();
    let mut next = started + window;
    let mut steering = SteeringLoop::new();
    let mut source = NvmlUtilisation(&nvml);
    loop {
        let now = std::time::Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        // A late step is not made up for: the next one is a window after this one.
        next = std::time::Instant::now().max(next) + window;
        let by_gpu = {
            let state = agent.state.blocking_lock();
            tenants(&agent.config.host_root, &state)
        };
        steering.step(started.elapsed().as_secs_f64(), &by_gpu, &mut source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_processes_reads_the_documented_layout() {
        let mut bytes = vec![0u8; 21_568];
        let put = |bytes: &mut Vec<u8>, slot: usize, pid: u64, start_time: u64| {
            let at = SLOTS_AT_BYTES + slot * SLOT_BYTES;
            bytes[at..at + 8].copy_from_slice(&pid.to_le_bytes());
            bytes[at + 8..at + 16].copy_from_slice(&start_time.to_le_bytes());
        };
        put(&mut bytes, 0, 41, 7_000);
        put(&mut bytes, 127, 977, 0);
        assert_eq!(
            slot_processes(&bytes),
            [
                ProcessIdentity {
                    pid: 41,
                    start_time: 7_000
                },
                ProcessIdentity {
                    pid: 977,
                    start_time: 0
                }
            ]
        );
    }

    #[test]
    fn a_real_usage_file_names_this_process_as_proc_does() {
        use tensor_fusion_interposer_core::shm::{DeviceSettings, MemoryKind};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main.shm");
        let file = UsageFile::open(&path, &[DeviceSettings::default()]).unwrap();
        file.reserve(0, 1024, MemoryKind::Device).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let from_slots = slot_processes(&bytes);
        let from_proc = host_process_identity(std::process::id());
        assert_eq!(from_slots, [from_proc]);
        assert_eq!(from_proc.pid, std::process::id());
        assert_ne!(from_proc.start_time, 0);
    }

    #[test]
    fn the_same_pid_in_two_containers_is_told_apart_by_start_time() {
        let first = ProcessIdentity {
            pid: 1,
            start_time: 500,
        };
        let second = ProcessIdentity {
            pid: 1,
            start_time: 900,
        };
        assert!(!first.matches(&second));
        assert!(first.matches(&ProcessIdentity {
            pid: 1,
            start_time: 0
        }));
    }
}
