//! The node agent's steering loop, closed over a simulated GPU: the agent's own code
//! ([`steering::tenants`] from the grants in its state, [`SteeringLoop::step`] reading the usage
//! files and writing refill rates) against tenants that launch kernels through the interposer's
//! real token bucket in real usage files, on the mock driver's simulated GPU clock, waiting out
//! throttled launches in slices as the interposer does. The utilisation source plays NVML: per-process percent of GPU time since its last sample, in whole
//! percent, reported on its own sampling period. Every tenant's process is pid 1 in its own
//! container (told apart by start time, as in a real node). No threads and no wall clock.
//!
//! What is shown: each tenant's share of GPU time settles on what it was granted (its request on
//! a contended GPU, its limit when it may borrow) within a stated tolerance, stays there (every
//! one-second block, not just the average), also when the initial refill rates are 100 times too
//! high or 1000 times too low, from the interposer's default first rate, and when NVML samples
//! less often than the agent steers.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use tensor_fusion_interposer_core::config::usage_file_path;
use tensor_fusion_interposer_core::limiter::Debt;
use tensor_fusion_interposer_core::shm::{DeviceSettings, UsageFile};
use tensor_fusion_mock_gpu_sim::{SimGpu, kernel_duration_ns};
use tensor_fusion_node_agent::agent::{AgentState, WorkerRecord};
use tensor_fusion_node_agent::allocator::Allocator;
use tensor_fusion_node_agent::capacity::{HostSizes, gpu_capacities};
use tensor_fusion_node_agent::config::AgentConfig;
use tensor_fusion_node_agent::discovery::{DiscoveredGpu, NvmlError};
use tensor_fusion_node_agent::steering::{
    self, ProcessIdentity, ProcessSample, SteeringLoop, UtilisationSource,
};
use tensor_fusion_node_agent::worker::{
    Assignment, ContainerSpec, WorkerSpec, container_limits, pod_dir,
};

const SECOND: u64 = 1_000_000_000;
/// The agent's steering window (`steeringWindowSeconds` 0.1).
const WINDOW: u64 = 100_000_000;
/// CPU time between two launches of one tenant.
const LAUNCH_GAP_NS: u64 = 2_000;
/// Kernels a tenant may have queued on the GPU before it blocks (a synchronising loop).
const QUEUE_DEPTH: usize = 2;
/// Physical TFLOPS of the simulated GPU (an H100 by the agent's table).
const GPU_TFLOPS: f64 = 989.0;
/// Byte offset of the first process slot in a usage file (`docs/interposer.md`).
const FIRST_SLOT_AT: u64 = 1088;

/// One shared pod with one container, greedy: it launches as fast as its bucket lets it.
#[derive(Clone, Copy)]
struct Workload {
    request_share: f64,
    limit_share: f64,
    threads_per_kernel: u64,
    ns_per_kilothread: u64,
    first_rate: FirstRate,
}

/// Where a tenant's first refill rate comes from.
#[derive(Clone, Copy)]
enum FirstRate {
    /// A multiple of the right rate for its request.
    Times(f64),
    /// The interposer's own guess from the limits file the agent writes (which has no
    /// `refill_rate`): the TFLOPS limit times `DEFAULT_TOKENS_PER_TFLOPS_SECOND`.
    InterposerDefault,
}

impl Workload {
    fn new(request_share: f64, limit_share: f64, threads: u64, ns_per_kilothread: u64) -> Self {
        Self {
            request_share,
            limit_share,
            threads_per_kernel: threads,
            ns_per_kilothread,
            first_rate: FirstRate::Times(1.0),
        }
    }

    fn initial_rate(mut self, factor: f64) -> Self {
        self.first_rate = FirstRate::Times(factor);
        self
    }

    fn interposer_default_rate(mut self) -> Self {
        self.first_rate = FirstRate::InterposerDefault;
        self
    }

    fn kernel_ns(&self) -> u64 {
        kernel_duration_ns(self.threads_per_kernel, self.ns_per_kilothread)
    }

    /// Tokens per second that fill the whole GPU with this workload's kernels.
    fn tokens_per_gpu_second(&self) -> f64 {
        self.threads_per_kernel as f64 / self.kernel_ns() as f64 * SECOND as f64
    }
}

/// A running tenant: its usage file (opened as the interposer opens it) and launch state.
struct Tenant {
    workload: Workload,
    process: ProcessIdentity,
    usage: UsageFile,
    queued: VecDeque<u64>,
    next_ns: u64,
    /// The launch waiting for its bucket, as the interposer waits: in slices.
    debt: Option<Debt>,
}

/// The agent's state with one H100 and the workloads granted on it, and the tenants.
fn node(host_root: &Path, workloads: &[Workload]) -> (AgentState, Vec<Tenant>) {
    let gpu = DiscoveredGpu {
        index: 0,
        uuid: "GPU-5e7c0d1a-0000-0000-0000-000000000000".to_owned(),
        model: "NVIDIA H100 80GB HBM3".to_owned(),
        vram_bytes: 80 << 30,
    };
    let config = AgentConfig {
        node_name: "gpu-node-1".to_owned(),
        tflops_oversell_ratio: 300.0,
        ..AgentConfig::default()
    };
    let capacities = gpu_capacities(std::slice::from_ref(&gpu), &config, HostSizes::default());
    assert_eq!(capacities[0].physical.tflops, GPU_TFLOPS);
    let mut state = AgentState {
        gpus: vec![gpu],
        allocator: Allocator::new(capacities, config.policy()),
        ..AgentState::default()
    };
    let mut tenants = Vec::new();
    for (index, workload) in workloads.iter().enumerate() {
        let spec = WorkerSpec {
            namespace: "ml".to_owned(),
            name: format!("tenant-{index}"),
            uid: format!("pod-{index}"),
            containers: vec![ContainerSpec {
                name: "main".to_owned(),
                gpu_count: 1,
                tflops_request: Some(workload.request_share * GPU_TFLOPS),
                tflops_limit: Some(workload.limit_share * GPU_TFLOPS),
                vram_request: Some(1 << 30),
                vram_limit: Some(1 << 30),
            }],
        };
        let grant = state
            .allocator
            .allocate(&spec.uid, &spec.share_request())
            .expect("the workloads fit the GPU");
        let dir = pod_dir(host_root, &spec.uid);
        std::fs::create_dir_all(&dir).unwrap();
        let path = usage_file_path(&dir, "main");
        let refill_rate = match workload.first_rate {
            FirstRate::Times(factor) => {
                workload.request_share * workload.tokens_per_gpu_second() * factor
            }
            FirstRate::InterposerDefault => {
                container_limits(&spec.containers[0], &grant, Some(GPU_TFLOPS), false)
                    .first_refill_rate()
            }
        };
        let usage = UsageFile::open(
            &path,
            &[DeviceSettings {
                refill_rate,
                ..DeviceSettings::default()
            }],
        )
        .unwrap();
        // The container's process registers in slot 0 as the interposer does: its own pid (1,
        // like every container's first process) and its start time.
        let process = ProcessIdentity {
            pid: 1,
            start_time: 4_000 + index as u64 * 17,
        };
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&u64::from(process.pid).to_le_bytes(), FIRST_SLOT_AT)
            .unwrap();
        file.write_all_at(&process.start_time.to_le_bytes(), FIRST_SLOT_AT + 8)
            .unwrap();
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
        tenants.push(Tenant {
            workload: *workload,
            process,
            usage,
            queued: VecDeque::new(),
            next_ns: 1_000,
            debt: None,
        });
    }
    (state, tenants)
}

/// NVML on the simulated GPU: every `period_windows` windows, each process's whole percent of
/// GPU time since the previous sample.
struct SimulatedNvml<'a> {
    gpu: &'a SimGpu,
    processes: Vec<ProcessIdentity>,
    period_windows: u64,
    windows_seen: u64,
    sampled_until_ns: u64,
    now_ns: u64,
}

impl UtilisationSource for SimulatedNvml<'_> {
    fn samples(&mut self, gpu_index: u32, since_us: u64) -> Result<Vec<ProcessSample>, NvmlError> {
        assert_eq!(gpu_index, 0);
        self.windows_seen += 1;
        if !self.windows_seen.is_multiple_of(self.period_windows) || self.now_ns / 1_000 <= since_us
        {
            return Ok(Vec::new());
        }
        let (from, to) = (self.sampled_until_ns, self.now_ns);
        self.sampled_until_ns = to;
        Ok(self
            .processes
            .iter()
            .enumerate()
            .map(|(tenant, process)| ProcessSample {
                process: *process,
                sm_percent: (self.gpu.busy_ns(tenant, from, to) * 100 / (to - from)) as u32,
                timestamp_us: to / 1_000,
            })
            .filter(|sample| sample.sm_percent > 0)
            .collect())
    }
}

/// Runs the tenants for `duration` with the agent steering every window; returns each tenant's
/// share of GPU time per window.
fn simulate(
    host_root: &Path,
    state: &AgentState,
    tenants: &mut [Tenant],
    duration: u64,
    nvml_period_windows: u64,
) -> Vec<Vec<f64>> {
    let mut gpu = SimGpu::new();
    let mut steering = SteeringLoop::new();
    let processes: Vec<ProcessIdentity> = tenants.iter().map(|tenant| tenant.process).collect();
    let mut windows_seen = 0;
    let mut sampled_until_ns = 0;
    let mut window_start = 0;
    let mut shares = Vec::new();
    loop {
        let (index, now) = tenants
            .iter()
            .enumerate()
            .map(|(index, tenant)| (index, tenant.next_ns))
            .min_by_key(|&(index, next)| (next, index))
            .expect("at least one tenant");

        while window_start + WINDOW <= now.min(duration) {
            let window_end = window_start + WINDOW;
            shares.push(
                (0..tenants.len())
                    .map(|tenant| {
                        gpu.busy_ns(tenant, window_start, window_end) as f64 / WINDOW as f64
                    })
                    .collect(),
            );
            let mut nvml = SimulatedNvml {
                gpu: &gpu,
                processes: processes.clone(),
                period_windows: nvml_period_windows,
                windows_seen,
                sampled_until_ns,
                now_ns: window_end,
            };
            let by_gpu = steering::tenants(host_root, state);
            steering.step(window_end as f64 / SECOND as f64, &by_gpu, &mut nvml);
            windows_seen = nvml.windows_seen;
            sampled_until_ns = nvml.sampled_until_ns;
            window_start = window_end;
        }
        if now >= duration {
            break;
        }

        let tenant = &mut tenants[index];
        while tenant.queued.front().is_some_and(|&done| done <= now) {
            tenant.queued.pop_front();
        }
        if tenant.queued.len() >= QUEUE_DEPTH {
            tenant.next_ns = *tenant.queued.front().expect("the queue is full");
            continue;
        }
        let bucket = tenant.usage.bucket(0);
        let debt = match tenant.debt.take() {
            Some(debt) => Some(debt),
            None => bucket.take(tenant.workload.threads_per_kernel, now),
        };
        if let Some(mut debt) = debt
            && let Some(sleep_ns) = bucket.next_sleep(&mut debt, now)
        {
            tenant.debt = Some(debt);
            tenant.next_ns = now + sleep_ns;
            continue;
        }
        let done = gpu.submit(index, now, tenant.workload.kernel_ns());
        tenant.queued.push_back(done);
        tenant.next_ns = now + LAUNCH_GAP_NS;
    }
    shares
}

/// Mean share per tenant over windows `from..to`.
fn mean(shares: &[Vec<f64>], from: usize, to: usize) -> Vec<f64> {
    let tenants = shares[0].len();
    (0..tenants)
        .map(|tenant| {
            shares[from..to]
                .iter()
                .map(|window| window[tenant])
                .sum::<f64>()
                / (to - from) as f64
        })
        .collect()
}

fn percent(shares: &[f64]) -> String {
    shares
        .iter()
        .map(|share| format!("{:5.1}%", share * 100.0))
        .collect::<Vec<_>>()
        .join(" ")
}

/// After `settle_seconds`, the mean over the rest of the run is within `mean_points` of
/// `expected`, and so is every one-second block within `block_points`.
fn assert_converges(
    shares: &[Vec<f64>],
    expected: &[f64],
    settle_seconds: usize,
    mean_points: f64,
    block_points: f64,
) {
    let per_second = (SECOND / WINDOW) as usize;
    let seconds = shares.len() / per_second;
    for second in 0..seconds {
        let block = mean(shares, second * per_second, (second + 1) * per_second);
        eprintln!("second {second:2}: {}", percent(&block));
    }
    let settled = mean(shares, settle_seconds * per_second, shares.len());
    eprintln!(
        "after {settle_seconds} s: {} (granted {})",
        percent(&settled),
        percent(expected)
    );
    for (tenant, (share, want)) in settled.iter().zip(expected).enumerate() {
        assert!(
            (share - want).abs() * 100.0 <= mean_points,
            "tenant {tenant} settled at {:.2}%, granted {:.0}% +- {mean_points} points",
            share * 100.0,
            want * 100.0
        );
    }
    for second in settle_seconds..seconds {
        let block = mean(shares, second * per_second, (second + 1) * per_second);
        for (tenant, (share, want)) in block.iter().zip(expected).enumerate() {
            assert!(
                (share - want).abs() * 100.0 <= block_points,
                "tenant {tenant} had {:.2}% in second {second}, granted {:.0}% +- {block_points} \
                 points: it does not stay there",
                share * 100.0,
                want * 100.0
            );
        }
    }
}

/// Requests 20/30/50 % with limits at the whole GPU, kernels of different cost per thread:
/// contended, so each tenant's share is its request.
fn contended_three() -> [Workload; 3] {
    [
        Workload::new(0.2, 1.0, 65_536, 10_000),
        Workload::new(0.3, 1.0, 131_072, 25_000),
        Workload::new(0.5, 1.0, 262_144, 5_000),
    ]
}

#[test]
fn three_contending_tenants_converge_to_their_requests() {
    let root = tempfile::tempdir().unwrap();
    let (state, mut tenants) = node(root.path(), &contended_three());
    let shares = simulate(root.path(), &state, &mut tenants, 15 * SECOND, 1);
    assert_converges(&shares, &[0.2, 0.3, 0.5], 3, 2.0, 4.0);
}

#[test]
fn initial_refill_rates_a_hundred_times_off_still_converge() {
    // The tenant that starts 100x too high began with a full bucket at that rate (100 ms of it:
    // 10 s of tokens at its right rate). The bucket's burst follows the rate, so the first lower
    // rate the loop writes takes those tokens back at the tenant's next launch.
    let root = tempfile::tempdir().unwrap();
    let [first, second, third] = contended_three();
    let workloads = [
        first.initial_rate(100.0),
        second.initial_rate(0.01),
        third.initial_rate(0.01),
    ];
    let (state, mut tenants) = node(root.path(), &workloads);
    let shares = simulate(root.path(), &state, &mut tenants, 15 * SECOND, 1);
    assert_converges(&shares, &[0.2, 0.3, 0.5], 2, 2.0, 4.0);
}

#[test]
fn initial_refill_rates_a_thousand_times_too_low_still_converge() {
    // Each tenant starts with well under 1 % of the GPU, which NVML reports as 0 %, so the rule
    // has nothing to learn from; the loop raises the rate of such a throttled tenant 4x per
    // window until NVML sees it. Without that, these tenants stay near 0 % for good. The first
    // launch of the 30 % tenant owes 11 s at its first rate; it waits in 2 ms slices, so each
    // raise reaches it within a slice, and the agent sees it as throttled in every window it
    // waits (its throttled time grows) although it overdrew only once.
    let root = tempfile::tempdir().unwrap();
    let workloads = contended_three().map(|workload| workload.initial_rate(0.001));
    let (state, mut tenants) = node(root.path(), &workloads);
    let shares = simulate(root.path(), &state, &mut tenants, 15 * SECOND, 1);
    assert_converges(&shares, &[0.2, 0.3, 0.5], 2, 2.0, 4.0);
}

#[test]
fn the_interposers_default_first_rate_converges() {
    // No refill_rate in the limits file: each tenant starts at its TFLOPS limit times the
    // interposer's default (1e8 tokens per TFLOPS-second), 1000 to 8000 times what these
    // simulated kernels need for their requests (5 to 25 ns of whole-GPU time per thread, thicker
    // threads than a large GEMM's on a real H100). The first measured window brings the rates
    // down, and the burst follows the rate at once.
    let root = tempfile::tempdir().unwrap();
    let workloads = contended_three().map(Workload::interposer_default_rate);
    let (state, mut tenants) = node(root.path(), &workloads);
    let shares = simulate(root.path(), &state, &mut tenants, 15 * SECOND, 1);
    assert_converges(&shares, &[0.2, 0.3, 0.5], 2, 2.0, 4.0);
}

#[test]
fn nvml_sampling_slower_than_the_steering_window_still_converges() {
    // NVML refreshes per-process utilisation every 300 ms here; the agent steers every 100 ms.
    let root = tempfile::tempdir().unwrap();
    let [first, second, third] = contended_three();
    let workloads = [first.initial_rate(10.0), second, third.initial_rate(0.1)];
    let (state, mut tenants) = node(root.path(), &workloads);
    let shares = simulate(root.path(), &state, &mut tenants, 15 * SECOND, 3);
    assert_converges(&shares, &[0.2, 0.3, 0.5], 4, 2.0, 4.0);
}

#[test]
fn hard_limits_hold_on_a_gpu_with_room_to_spare() {
    // Request = limit: 25 % and 40 %, the GPU 35 % idle; neither may take the idle time. The
    // first starts 100x too high with a full bucket at that rate, which the first lower rate
    // cuts down (see above).
    let root = tempfile::tempdir().unwrap();
    let workloads = [
        Workload::new(0.25, 0.25, 65_536, 10_000).initial_rate(100.0),
        Workload::new(0.4, 0.4, 262_144, 5_000).initial_rate(0.01),
    ];
    let (state, mut tenants) = node(root.path(), &workloads);
    let shares = simulate(root.path(), &state, &mut tenants, 15 * SECOND, 1);
    assert_converges(&shares, &[0.25, 0.4], 2, 2.0, 4.0);
}

#[test]
fn a_lone_tenant_borrows_up_to_its_limit_and_no_further() {
    let root = tempfile::tempdir().unwrap();
    let workloads = [Workload::new(0.3, 0.6, 131_072, 10_000).initial_rate(0.01)];
    let (state, mut tenants) = node(root.path(), &workloads);
    let shares = simulate(root.path(), &state, &mut tenants, 10 * SECOND, 1);
    assert_converges(&shares, &[0.6], 3, 2.0, 4.0);
}

/// The tenants the loop steers are the agent's grants, as shares of the GPU.
#[test]
fn tenants_come_from_the_grants() {
    let root = tempfile::tempdir().unwrap();
    let (state, _tenants) = node(root.path(), &contended_three());
    let by_gpu = steering::tenants(root.path(), &state);
    let shares: BTreeMap<u32, Vec<(f64, f64)>> = by_gpu
        .iter()
        .map(|(index, tenants)| {
            (
                *index,
                tenants
                    .iter()
                    .map(|tenant| (tenant.request_share, tenant.limit_share))
                    .collect(),
            )
        })
        .collect();
    let rounded = |value: f64| (value * 1e9).round() / 1e9;
    assert_eq!(
        shares[&0]
            .iter()
            .map(|(request, limit)| (rounded(*request), rounded(*limit)))
            .collect::<Vec<_>>(),
        [(0.2, 1.0), (0.3, 1.0), (0.5, 1.0)]
    );
    assert_eq!(
        by_gpu[&0][1].usage_path,
        root.path().join("pods/pod-1/main.shm")
    );
}
