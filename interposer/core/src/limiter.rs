//! The compute limiter: a token bucket per container and device that every kernel launch draws
//! from, and the steering rule that sets each bucket's refill rate from measured utilisation.
//!
//! A launch costs its thread count (grid x block) in tokens; a CUDA graph launch costs a fixed
//! estimate. [`Bucket::acquire`] is lock-free: a refill (one compare-and-swap on the refill
//! time, then an add capped at the burst size) and a subtraction. Tokens may go negative: a
//! launch that overdraws waits until the refill has paid its debt, and the caller sleeps that
//! long holding no lock. The bucket only turns tokens into time; what a token is worth on a
//! given GPU is learnt by [`Steering`], run by the node agent every window over all tenants of
//! a GPU: it gives each tenant its request, lends what others leave unused to tenants that were
//! throttled (up to their limit), and converts each target share into tokens per second from how
//! many tokens per second that tenant's kernels needed for each percent of GPU time.

use std::sync::atomic::Ordering;

use crate::shm::{
    D_BURST_NS, D_LAST_REFILL_NS, D_LAUNCHED_UNITS, D_LAUNCHES, D_REFILL_RATE,
    D_THROTTLED_LAUNCHES, D_THROTTLED_NS, D_TOKENS, UsageFile,
};

/// Tokens charged for a `cuGraphLaunch`, whose kernels the interposer does not inspect.
pub const GRAPH_LAUNCH_COST: u64 = 1 << 20;

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock all processes of the node share.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Nanoseconds on `CLOCK_MONOTONIC_COARSE`: the same clock at tick resolution (1-4 ms), read
/// without a syscall even where the precise clock needs one. The launch path uses it; refills
/// credit exactly the time they account for, so the coarse steps cost no accuracy over time.
pub fn monotonic_coarse_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe {
        libc::clock_gettime(clock, &mut now);
    }
    u64::try_from(now.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(now.tv_nsec).unwrap_or(0))
}

/// Tokens a kernel launch costs: its threads, grid x block.
pub fn launch_cost(grid: [u32; 3], block: [u32; 3]) -> u64 {
    grid.iter()
        .chain(block.iter())
        .fold(1_u64, |cost, &dim| cost.saturating_mul(u64::from(dim)))
}

/// One device's token bucket inside a usage file.
pub struct Bucket<'a> {
    usage: &'a UsageFile,
    device: usize,
}

impl<'a> Bucket<'a> {
    pub(crate) fn new(usage: &'a UsageFile, device: usize) -> Self {
        Self { usage, device }
    }

    fn word(&self, word: usize) -> &std::sync::atomic::AtomicU64 {
        self.usage.device(self.device, word)
    }

    /// Takes `cost` tokens at time `now_ns`; returns how many nanoseconds the caller must wait
    /// before launching (0: launch now). The tokens are taken either way.
    pub fn acquire(&self, cost: u64, now_ns: u64) -> u64 {
        let cost = cost.min(i64::MAX as u64);
        self.word(D_LAUNCHES).fetch_add(1, Ordering::Relaxed);
        // Counted with or without a limit, so the agent can calibrate before it limits.
        self.word(D_LAUNCHED_UNITS)
            .fetch_add(cost, Ordering::Relaxed);
        let rate = f64::from_bits(self.word(D_REFILL_RATE).load(Ordering::Relaxed));
        if rate.is_nan() || rate <= 0.0 {
            return 0;
        }
        self.refill(rate, now_ns);

        let before = self.word(D_TOKENS).fetch_sub(cost, Ordering::AcqRel) as i64;
        let after = before.saturating_sub(cost as i64);
        if after >= 0 {
            return 0;
        }

        let wait_ns = ((-after) as f64 / rate * 1e9).ceil() as u64;
        self.word(D_THROTTLED_LAUNCHES)
            .fetch_add(1, Ordering::Relaxed);
        self.word(D_THROTTLED_NS)
            .fetch_add(wait_ns, Ordering::Relaxed);
        wait_ns
    }

    fn refill(&self, rate: f64, now_ns: u64) {
        let last_word = self.word(D_LAST_REFILL_NS);
        let last = last_word.load(Ordering::Acquire);
        let capacity = (rate * self.word(D_BURST_NS).load(Ordering::Relaxed) as f64 / 1e9) as i64;
        if last == 0 {
            // First launch on this bucket: start full.
            if last_word
                .compare_exchange(0, now_ns, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.word(D_TOKENS)
                    .store(capacity.max(0) as u64, Ordering::Release);
            }
            return;
        }
        let elapsed_ns = now_ns.saturating_sub(last);
        let tokens = (rate * elapsed_ns as f64 / 1e9).floor();
        if tokens < 1.0 {
            return;
        }
        // Credit only the time the whole tokens stand for, so slow rates lose no fractions.
        let credited_ns = ((tokens / rate * 1e9) as u64).min(elapsed_ns);
        if last_word
            .compare_exchange(
                last,
                last + credited_ns,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return;
        }
        let add = tokens as i64;
        // The closure always returns Some, so fetch_update cannot fail.
        let _ = self
            .word(D_TOKENS)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                let held = held as i64;
                Some(held.saturating_add(add).min(capacity.max(held)) as u64)
            });
    }
}

/// What the node agent measured for one tenant (container) of a GPU over one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TenantWindow {
    /// Guaranteed share of the GPU, 0..=1 (`tflops_request / gpu_tflops`).
    pub request_share: f64,
    /// Burst ceiling, 0..=1 (`tflops_limit / gpu_tflops`).
    pub limit_share: f64,
    /// Share of the window the GPU spent on this tenant's kernels (NVML process utilisation).
    pub busy_share: f64,
    /// Tokens the tenant launched in the window (difference of `launched_units`).
    pub launched_units: u64,
    /// Whether any launch waited in the window (difference of `throttled_launches` > 0).
    pub throttled: bool,
}

/// GPU busy share (sum over tenants) from which the GPU counts as saturated: tenants below
/// their request are then being crowded out rather than idle.
pub const SATURATED_SHARE: f64 = 0.95;

/// Target shares for one window: requests first, then what is left over to tenants that want
/// more (throttled, or crowded out of a saturated GPU) in proportion to their requests, never
/// past a tenant's limit.
pub fn target_shares(tenants: &[TenantWindow]) -> Vec<f64> {
    let saturated = tenants.iter().map(|tenant| tenant.busy_share).sum::<f64>() >= SATURATED_SHARE;
    let wants_more: Vec<bool> = tenants
        .iter()
        .map(|tenant| tenant.throttled || (saturated && tenant.busy_share < tenant.request_share))
        .collect();
    let mut targets: Vec<f64> = tenants
        .iter()
        .zip(&wants_more)
        .map(|(tenant, &wants_more)| {
            let demand = if wants_more {
                tenant.limit_share
            } else {
                tenant.busy_share.min(tenant.limit_share)
            };
            tenant.request_share.min(demand)
        })
        .collect();
    let mut left = (1.0 - targets.iter().sum::<f64>()).max(0.0);
    let mut hungry: Vec<usize> = (0..tenants.len())
        .filter(|&index| wants_more[index] && targets[index] < tenants[index].limit_share)
        .collect();
    while left > 1e-9 && !hungry.is_empty() {
        let weight_sum: f64 = hungry
            .iter()
            .map(|&index| tenants[index].request_share)
            .sum();
        let mut given = 0.0;
        for &index in &hungry {
            let weight = if weight_sum > 0.0 {
                tenants[index].request_share / weight_sum
            } else {
                1.0 / hungry.len() as f64
            };
            let room = tenants[index].limit_share - targets[index];
            let give = (left * weight).min(room);
            targets[index] += give;
            given += give;
        }
        left -= given;
        hungry.retain(|&index| tenants[index].limit_share - targets[index] > 1e-9);
        if given <= 1e-12 {
            break;
        }
    }
    for ((target, tenant), &wants_more) in targets.iter_mut().zip(tenants).zip(&wants_more) {
        if !wants_more {
            // Not bound by its bucket. On a saturated GPU it keeps its guarantee (and is held
            // to it, so the ones crowded out get theirs); otherwise it keeps what it uses.
            *target = if saturated {
                tenant.request_share
            } else {
                tenant.request_share.max(tenant.busy_share)
            }
            .min(tenant.limit_share.max(tenant.request_share));
        }
    }
    targets
}

/// Refill-rate steering for the tenants of one GPU; keeps a per-tenant estimate of how many
/// tokens per second fill the whole GPU with that tenant's kernels.
#[derive(Debug, Clone)]
pub struct Steering {
    tokens_per_gpu_second: Vec<Option<f64>>,
}

impl Steering {
    pub fn new(tenants: usize) -> Self {
        Self {
            tokens_per_gpu_second: vec![None; tenants],
        }
    }

    /// New refill rates (tokens per second) for the tenants, from one window of measurements.
    /// A tenant with no estimate yet keeps its current rate.
    pub fn update(
        &mut self,
        tenants: &[TenantWindow],
        current_rates: &[f64],
        window_seconds: f64,
    ) -> Vec<f64> {
        let targets = target_shares(tenants);
        tenants
            .iter()
            .enumerate()
            .map(|(index, tenant)| {
                if tenant.busy_share > 0.005 && tenant.launched_units > 0 {
                    let observed =
                        tenant.launched_units as f64 / window_seconds / tenant.busy_share;
                    let estimate = &mut self.tokens_per_gpu_second[index];
                    *estimate = Some(match *estimate {
                        Some(previous) => 0.5 * previous + 0.5 * observed,
                        None => observed,
                    });
                }
                match self.tokens_per_gpu_second[index] {
                    Some(full) => targets[index] * full,
                    None => current_rates[index],
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::DeviceSettings;

    fn bucket_file(rate: f64, burst_ns: u64) -> UsageFile {
        UsageFile::private(&[DeviceSettings {
            refill_rate: rate,
            burst_ns,
            ..DeviceSettings::default()
        }])
        .unwrap()
    }

    #[test]
    fn a_full_bucket_admits_then_makes_the_overdraft_wait_for_refill() {
        // 1000 tokens per second, 100 ms of burst = 100 tokens.
        let usage = bucket_file(1000.0, 100_000_000);
        let bucket = usage.bucket(0);
        assert_eq!(bucket.acquire(60, 1_000), 0);
        assert_eq!(bucket.acquire(40, 1_000), 0);
        // Empty now: 50 more tokens take 50 ms.
        assert_eq!(bucket.acquire(50, 1_000), 50_000_000);
        // 50 ms later the debt is paid; another 10 tokens wait 10 ms.
        assert_eq!(bucket.acquire(10, 50_001_000), 10_000_000);
        let stats = usage.launch_stats(0);
        assert_eq!(stats.launches, 4);
        assert_eq!(stats.launched_units, 160);
        assert_eq!(stats.throttled_launches, 2);
        assert_eq!(stats.throttled_ns, 60_000_000);
    }

    #[test]
    fn slow_rates_lose_no_fractional_tokens() {
        let usage = bucket_file(10.0, 1_000_000_000);
        let bucket = usage.bucket(0);
        assert_eq!(bucket.acquire(10, 1), 0);
        // Refill attempts every 30 ms each see 0.3 tokens; over one second 10 tokens arrive.
        let mut now = 1;
        for _ in 0..34 {
            now += 30_000_000;
            bucket.refill(10.0, now);
        }
        assert_eq!(bucket.acquire(10, now), 0);
    }

    #[test]
    fn no_rate_means_no_limit() {
        let usage = bucket_file(0.0, 100_000_000);
        assert_eq!(usage.bucket(0).acquire(u64::MAX, 5), 0);
    }

    fn tenant(request: f64, limit: f64, busy: f64, throttled: bool) -> TenantWindow {
        TenantWindow {
            request_share: request,
            limit_share: limit,
            busy_share: busy,
            launched_units: 1,
            throttled,
        }
    }

    #[test]
    fn contended_tenants_get_their_requests() {
        let targets = target_shares(&[
            tenant(0.2, 1.0, 0.3, true),
            tenant(0.3, 1.0, 0.3, true),
            tenant(0.5, 1.0, 0.4, true),
        ]);
        assert_eq!(targets, vec![0.2, 0.3, 0.5]);
    }

    #[test]
    fn a_lone_throttled_tenant_bursts_to_its_limit() {
        let targets = target_shares(&[tenant(0.3, 0.6, 0.3, true)]);
        assert!((targets[0] - 0.6).abs() < 1e-9, "{targets:?}");
    }

    #[test]
    fn unused_requests_are_lent_in_proportion_to_requests() {
        let targets = target_shares(&[
            tenant(0.5, 0.5, 0.1, false),
            tenant(0.1, 1.0, 0.1, true),
            tenant(0.3, 1.0, 0.3, true),
        ]);
        // 0.5 left after 0.1 + 0.1 + 0.3; split 1:3 between the throttled ones.
        assert!((targets[1] - 0.225).abs() < 1e-9, "{targets:?}");
        assert!((targets[2] - 0.675).abs() < 1e-9, "{targets:?}");
        assert!((targets[0] - 0.5).abs() < 1e-9, "{targets:?}");
    }
}
