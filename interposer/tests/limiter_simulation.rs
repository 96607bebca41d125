//! Deterministic simulation of the compute limiter on the mock driver's simulated GPU clock:
//! greedy tenants launch kernels as fast as their token buckets let them, the simulated GPU runs
//! the kernels one after another, and every 100 ms the steering rule (what the node agent runs)
//! reads each tenant's GPU time, launched tokens and throttling and sets the refill rates. No
//! threads and no wall clock: the same run every time.
//!
//! Tenants' kernels differ in cost per thread, and the initial refill rates come from one
//! deliberately wrong guess, so the test also covers learning what a token is worth per tenant.

use std::collections::VecDeque;

use tensor_fusion_interposer_core::limiter::{Debt, Steering, TenantWindow};
use tensor_fusion_interposer_core::shm::{DeviceSettings, UsageFile};
use tensor_fusion_mock_gpu_sim::{SimGpu, kernel_duration_ns};

const SECOND: u64 = 1_000_000_000;
const WINDOW: u64 = 100_000_000;
/// CPU time between two launches of one tenant.
const LAUNCH_GAP_NS: u64 = 2_000;
/// Kernels a tenant may have queued on the GPU before it blocks (like a synchronising loop).
const QUEUE_DEPTH: usize = 2;
/// The initial guess of tokens per second for a whole GPU, the same for every tenant.
const GUESSED_TOKENS_PER_GPU_SECOND: f64 = 5.0e7;

struct Tenant {
    request_share: f64,
    limit_share: f64,
    threads_per_kernel: u64,
    ns_per_kilothread: u64,
    usage: UsageFile,
    queued: VecDeque<u64>,
    next_ns: u64,
    /// The launch waiting for its bucket, as the interposer waits: in slices.
    debt: Option<Debt>,
}

impl Tenant {
    fn new(request_share: f64, limit_share: f64, threads: u64, ns_per_kilothread: u64) -> Self {
        let usage = UsageFile::private(&[DeviceSettings {
            refill_rate: request_share * GUESSED_TOKENS_PER_GPU_SECOND,
            ..DeviceSettings::default()
        }])
        .expect("anonymous usage mapping");
        Self {
            request_share,
            limit_share,
            threads_per_kernel: threads,
            ns_per_kilothread,
            usage,
            queued: VecDeque::new(),
            next_ns: 1_000,
            debt: None,
        }
    }
}

/// Runs the tenants for `duration` simulated nanoseconds; returns each one's share of GPU time.
fn simulate(tenants: &mut [Tenant], duration: u64) -> Vec<f64> {
    let mut gpu = SimGpu::new();
    let mut steering = Steering::new(tenants.len());
    let mut window_start = 0;
    let mut last_stats: Vec<_> = tenants.iter().map(|t| t.usage.launch_stats(0)).collect();

    loop {
        let (index, now) = tenants
            .iter()
            .enumerate()
            .map(|(index, tenant)| (index, tenant.next_ns))
            .min_by_key(|&(index, next)| (next, index))
            .expect("at least one tenant");

        // Steer at every window boundary that passed.
        while window_start + WINDOW <= now.min(duration) {
            let window_end = window_start + WINDOW;
            let windows: Vec<TenantWindow> = tenants
                .iter()
                .enumerate()
                .map(|(index, tenant)| {
                    let stats = tenant.usage.launch_stats(0);
                    let before = last_stats[index];
                    TenantWindow {
                        request_share: tenant.request_share,
                        limit_share: tenant.limit_share,
                        busy_share: gpu.busy_ns(index, window_start, window_end) as f64
                            / WINDOW as f64,
                        launched_units: stats.launched_units - before.launched_units,
                        throttled: stats.throttled_launches > before.throttled_launches
                            || stats.throttled_ns > before.throttled_ns,
                    }
                })
                .collect();
            last_stats = tenants.iter().map(|t| t.usage.launch_stats(0)).collect();
            let rates: Vec<f64> = tenants.iter().map(|t| t.usage.refill_rate(0)).collect();
            let new_rates = steering.update(&windows, &rates, WINDOW as f64 / SECOND as f64);
            for (tenant, rate) in tenants.iter().zip(new_rates) {
                tenant.usage.set_refill_rate(0, rate);
            }
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
            tenant.next_ns = *tenant.queued.front().expect("queue is full");
            continue;
        }
        let bucket = tenant.usage.bucket(0);
        let debt = match tenant.debt.take() {
            Some(debt) => Some(debt),
            None => bucket.take(tenant.threads_per_kernel, now),
        };
        if let Some(mut debt) = debt
            && let Some(sleep_ns) = bucket.next_sleep(&mut debt, now)
        {
            tenant.debt = Some(debt);
            tenant.next_ns = now + sleep_ns;
            continue;
        }
        let kernel_ns = kernel_duration_ns(tenant.threads_per_kernel, tenant.ns_per_kilothread);
        let done = gpu.submit(index, now, kernel_ns);
        tenant.queued.push_back(done);
        tenant.next_ns = now + LAUNCH_GAP_NS;
    }

    (0..tenants.len())
        .map(|index| gpu.busy_ns(index, 0, duration) as f64 / duration as f64)
        .collect()
}

fn assert_within_points(shares: &[f64], expected: &[f64], points: f64) {
    eprintln!("shares of GPU time: {shares:?}, expected {expected:?}");
    for (index, (share, want)) in shares.iter().zip(expected).enumerate() {
        assert!(
            (share - want).abs() * 100.0 <= points,
            "tenant {index} got {:.2}% of the GPU, expected {:.0}% +- {points} points (all: {:?})",
            share * 100.0,
            want * 100.0,
            shares
                .iter()
                .map(|s| format!("{:.2}%", s * 100.0))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn three_tenants_get_their_shares_within_three_points_over_ten_seconds() {
    // Requests 20/30/50, limits at the whole GPU: contended, so each gets its request.
    let mut tenants = vec![
        Tenant::new(0.2, 1.0, 65_536, 10_000),
        Tenant::new(0.3, 1.0, 131_072, 25_000),
        Tenant::new(0.5, 1.0, 262_144, 5_000),
    ];
    let shares = simulate(&mut tenants, 10 * SECOND);
    assert_within_points(&shares, &[0.2, 0.3, 0.5], 3.0);
}

#[test]
fn a_lone_tenant_bursts_to_its_limit() {
    let mut tenants = vec![Tenant::new(0.3, 0.6, 131_072, 10_000)];
    let shares = simulate(&mut tenants, 10 * SECOND);
    assert_within_points(&shares, &[0.6], 3.0);
}

#[test]
fn without_throttling_the_gpu_is_shared_by_kernel_size_not_by_request() {
    // The same tenants with limits off: the FIFO GPU favours big kernels. This is what the
    // limiter corrects, and shows the simulation can tell the difference.
    let mut tenants = vec![
        Tenant::new(0.2, 1.0, 65_536, 10_000),
        Tenant::new(0.3, 1.0, 131_072, 25_000),
        Tenant::new(0.5, 1.0, 262_144, 5_000),
    ];
    for tenant in &tenants {
        tenant.usage.set_refill_rate(0, 0.0);
    }
    // Steering would turn the limiter back on; run the GPU alone.
    let mut gpu = SimGpu::new();
    let mut now = 0;
    while now < SECOND {
        let mut done = now;
        for (index, tenant) in tenants.iter_mut().enumerate() {
            let kernel_ns = kernel_duration_ns(tenant.threads_per_kernel, tenant.ns_per_kilothread);
            done = gpu.submit(index, now, kernel_ns);
        }
        now = (now + LAUNCH_GAP_NS).max(done);
    }
    let shares: Vec<f64> = (0..3)
        .map(|index| gpu.busy_ns(index, 0, SECOND) as f64 / SECOND as f64)
        .collect();
    assert!(
        (shares[0] - 0.2).abs() > 0.03 || (shares[1] - 0.3).abs() > 0.03,
        "unlimited tenants happened to match the requests: {shares:?}"
    );
}
