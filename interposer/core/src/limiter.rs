//! The compute limiter: a token bucket per container and device that every kernel launch draws
//! from, and the steering rule that sets each bucket's refill rate from measured utilisation.
//!
//! A launch costs its thread count (grid x block) in tokens; a CUDA graph launch costs a fixed
//! estimate. [`Bucket::take`] is lock-free: a refill (one compare-and-swap on the refill time,
//! then an add capped at the burst size) and a subtraction. The burst size is always the current
//! rate times `burst_ns`, so when steering lowers the rate, tokens credited at the old rate past
//! the new burst are taken back at the next launch. Tokens may go negative: a launch that
//! overdraws gets a [`Debt`] and waits until the refill has paid it, sleeping in slices of at
//! most [`WAIT_SLICE_NS`] and re-reading the rate and tokens after each, so a rate the node agent
//! raises (or a limit it turns off) reaches a waiting launch within one slice. Nothing is locked
//! while it sleeps. The bucket only turns tokens into time; what a token is worth on a given GPU
//! is learnt by [`Steering`], run by the node agent every window over all tenants of a GPU: it
//! gives each tenant its request, lends what others leave unused to tenants that were throttled
//! (up to their limit), and converts each target share into tokens per second from how many
//! tokens per second that tenant's kernels needed for each percent of GPU time.

use std::sync::atomic::Ordering;

use crate::shm::{
    D_BURST_NS, D_LAST_REFILL_NS, D_LAUNCHED_UNITS, D_LAUNCHES, D_REFILL_RATE,
    D_THROTTLED_LAUNCHES, D_THROTTLED_NS, D_TOKENS, UsageFile,
};

/// Tokens charged for a `cuGraphLaunch`, whose kernels the interposer does not inspect.
pub const GRAPH_LAUNCH_COST: u64 = 1 << 20;

/// First refill rate, in tokens per second per TFLOPS of the container's limit, when neither the
/// limits file nor the node agent gave one (the agent's steering replaces it within a few
/// windows).
///
/// A token is a thread, so a GPU busy with one kernel mix runs `resident threads / thread
/// lifetime` tokens per second. Resident threads per dense TFLOPS are a few hundred on current
/// GPUs (H100 SXM: 132 SMs x 2048 threads over 989 TFLOPS = 273; A100: 709; L4: 736). Thread
/// lifetimes range from about a microsecond (elementwise kernels at memory bandwidth) to about a
/// millisecond (large GEMM tiles looping over K), which puts real workloads between ~3e5 (pure
/// large GEMMs) and ~7e8 (one element per thread at full bandwidth) tokens per TFLOPS-second;
/// since tokens per second add up over GPU time, a mix that spends even a third of its time in
/// elementwise kernels lands at 1e7 to 1e8. This guess sits at the upper end of typical mixes:
/// the steering rule corrects a rate that is too high in the first window it measures, while a
/// rate far too low can starve a tenant below NVML's 1 % resolution, from which the agent climbs
/// only 4x per window. `docs/interposer.md` has the reasoning at length.
pub const DEFAULT_TOKENS_PER_TFLOPS_SECOND: f64 = 1.0e8;

/// Longest sleep of a throttled launch before it re-reads the refill rate and tokens: 2 ms, a
/// fiftieth of the agent's steering window. A waiting thread wakes at most 500 times a second; a
/// wait shorter than a slice is one sleep.
pub const WAIT_SLICE_NS: u64 = 2_000_000;

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

/// A launch that overdrew its bucket: the part of the bucket's debt that is this launch's, which
/// the refill pays off before the launch may go. Launches that overdraw later queue behind it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Debt {
    /// Tokens of this launch's debt the refill has not paid yet.
    tokens: f64,
    /// Refill rate read at the last check, tokens per second.
    rate: f64,
    /// When `tokens` was last brought up to date, on the waiter's clock.
    settled_ns: u64,
}

impl Debt {
    /// Tokens still owed.
    pub fn tokens(&self) -> f64 {
        self.tokens
    }
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

    fn rate(&self) -> Option<f64> {
        let rate = f64::from_bits(self.word(D_REFILL_RATE).load(Ordering::Relaxed));
        (rate > 0.0).then_some(rate)
    }

    /// Takes `cost` tokens at time `now_ns`. `None`: launch now. `Some`: the launch overdrew the
    /// bucket and must wait its [`Debt`] out ([`Bucket::wait_out`], or [`Bucket::next_sleep`]
    /// step by step). The tokens are taken either way.
    pub fn take(&self, cost: u64, now_ns: u64) -> Option<Debt> {
        let cost = cost.min(i64::MAX as u64) as i64;
        self.word(D_LAUNCHES).fetch_add(1, Ordering::Relaxed);
        // Counted with or without a limit, so the agent can calibrate before it limits.
        self.word(D_LAUNCHED_UNITS)
            .fetch_add(cost as u64, Ordering::Relaxed);
        let rate = self.rate()?;
        let capacity = self.refill(rate, now_ns);

        let tokens = self.word(D_TOKENS);
        let before = tokens.fetch_sub(cost as u64, Ordering::AcqRel) as i64;
        let mut after = before.saturating_sub(cost);
        if before > capacity {
            // Tokens credited at an earlier, higher rate (no refill ran since it dropped): the
            // burst follows the current rate, so cap them before this launch takes its share.
            let ceiling = capacity.saturating_sub(cost);
            // The closure always returns Some, so fetch_update cannot fail.
            let _ = tokens.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some((held as i64).min(ceiling) as u64)
            });
            after = after.min(ceiling);
        }
        if after >= 0 {
            return None;
        }

        self.word(D_THROTTLED_LAUNCHES)
            .fetch_add(1, Ordering::Relaxed);
        Some(Debt {
            tokens: -(after as f64),
            rate,
            settled_ns: now_ns,
        })
    }

    /// [`Bucket::take`] for a caller that sleeps the whole wait the current rate implies:
    /// returns that wait in nanoseconds (0: launch now) and counts it as throttled time. The
    /// interposer waits in slices instead ([`Bucket::wait_out`]).
    pub fn acquire(&self, cost: u64, now_ns: u64) -> u64 {
        let Some(debt) = self.take(cost, now_ns) else {
            return 0;
        };
        let wait_ns = wait_ns(debt.tokens, debt.rate);
        self.word(D_THROTTLED_NS)
            .fetch_add(wait_ns, Ordering::Relaxed);
        wait_ns
    }

    /// One check of a waiting launch at `now_ns`: pays its debt for the time since the last
    /// check (at the lower of the rate then and now, so a raise never pays for time before it
    /// was read), adds that time to the throttled counter, and returns how long to sleep before
    /// the next check: the time the current rate needs for the rest, at most [`WAIT_SLICE_NS`].
    /// `None`: the launch may go (debt paid, the bucket out of debt, or the limit turned off).
    pub fn next_sleep(&self, debt: &mut Debt, now_ns: u64) -> Option<u64> {
        let elapsed_ns = now_ns.saturating_sub(debt.settled_ns);
        self.word(D_THROTTLED_NS)
            .fetch_add(elapsed_ns, Ordering::Relaxed);
        let rate = self.rate()?;
        debt.tokens -= debt.rate.min(rate) * elapsed_ns as f64 / 1e9;
        debt.rate = rate;
        debt.settled_ns = now_ns;

        // The bucket's debt is this launch's and that of launches queued behind it, so it is
        // never less than this one's unless something else paid it (another process refilled
        // at a higher rate); a bucket out of debt owes nothing at all.
        let bucket_debt =
            (self.word(D_TOKENS).load(Ordering::Acquire) as i64).saturating_neg() as f64;
        debt.tokens = debt.tokens.min(bucket_debt);
        if debt.tokens <= 0.0 {
            return None;
        }
        Some(wait_ns(debt.tokens, rate).clamp(1, WAIT_SLICE_NS))
    }

    /// Waits `debt` out: sleeps with `sleep` in slices of at most [`WAIT_SLICE_NS`], reading
    /// `clock` after each, holding no lock. The wait starts on `clock` when this is called (the
    /// debt may have been taken on another clock, such as the coarse one).
    pub fn wait_out(
        &self,
        mut debt: Debt,
        mut clock: impl FnMut() -> u64,
        mut sleep: impl FnMut(u64),
    ) {
        let mut now_ns = clock();
        debt.settled_ns = now_ns;
        while let Some(slice_ns) = self.next_sleep(&mut debt, now_ns) {
            sleep(slice_ns);
            now_ns = clock();
        }
    }

    /// Credits the time since the last refill at `rate` and returns the bucket's capacity at
    /// that rate (tokens). Holdings past the capacity are cut to it.
    fn refill(&self, rate: f64, now_ns: u64) -> i64 {
        let last_word = self.word(D_LAST_REFILL_NS);
        let last = last_word.load(Ordering::Acquire);
        let capacity =
            (rate * self.word(D_BURST_NS).load(Ordering::Relaxed) as f64 / 1e9).max(0.0) as i64;
        if last == 0 {
            // First launch on this bucket: start full.
            if last_word
                .compare_exchange(0, now_ns, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.word(D_TOKENS)
                    .store(capacity as u64, Ordering::Release);
            }
            return capacity;
        }
        let elapsed_ns = now_ns.saturating_sub(last);
        let tokens = (rate * elapsed_ns as f64 / 1e9).floor();
        if tokens < 1.0 {
            return capacity;
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
            return capacity;
        }
        let add = tokens as i64;
        // The closure always returns Some, so fetch_update cannot fail.
        let _ = self
            .word(D_TOKENS)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some((held as i64).saturating_add(add).min(capacity) as u64)
            });
        capacity
    }
}

/// Nanoseconds `rate` tokens per second need to refill `tokens`, rounded up.
fn wait_ns(tokens: f64, rate: f64) -> u64 {
    (tokens * 1e9 / rate).ceil() as u64
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
    /// Whether any launch waited in the window (`throttled_launches` or `throttled_ns` grew:
    /// a launch that overdrew in an earlier window may still be waiting).
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
        assert_eq!(usage.bucket(0).take(u64::MAX, 5), None);
    }

    #[test]
    fn lowering_the_rate_takes_back_tokens_past_the_new_burst() {
        // 1e6 tokens per second, 100 ms of burst: the first launch finds 100 000 tokens.
        let usage = bucket_file(1e6, 100_000_000);
        let bucket = usage.bucket(0);
        assert_eq!(bucket.acquire(1_000, 1_000), 0);
        // Steering lowers the rate 1000x: the burst is now 100 tokens, at once, with no refill
        // in between (same instant).
        usage.set_refill_rate(0, 1_000.0);
        assert_eq!(bucket.acquire(100, 1_000), 0);
        assert_eq!(bucket.acquire(50, 1_000), 50_000_000);
    }

    #[test]
    fn a_refill_after_the_rate_dropped_caps_the_tokens_at_the_new_burst() {
        let usage = bucket_file(1e6, 100_000_000);
        let bucket = usage.bucket(0);
        assert_eq!(bucket.acquire(1_000, 1_000), 0);
        usage.set_refill_rate(0, 1_000.0);
        // 5 ms later the refill at the new rate adds 5 tokens, and the bucket holds its new
        // burst of 100, not the 99 005 credited at the old rate.
        assert_eq!(bucket.acquire(100, 5_001_000), 0);
        assert_eq!(bucket.acquire(20, 5_001_000), 20_000_000);
        assert_eq!(usage.launch_stats(0).throttled_launches, 1);
    }

    /// Runs `wait_out` on a simulated clock; `on_slice` sees each slice and may steer.
    fn wait_on_simulated_clock(
        bucket: &Bucket<'_>,
        debt: Debt,
        start_ns: u64,
        mut on_slice: impl FnMut(usize, u64),
    ) -> Vec<u64> {
        let now = std::cell::Cell::new(start_ns);
        let mut slices = Vec::new();
        bucket.wait_out(
            debt,
            || now.get(),
            |slice_ns| {
                slices.push(slice_ns);
                now.set(now.get() + slice_ns);
                on_slice(slices.len(), slice_ns);
            },
        );
        slices
    }

    #[test]
    fn a_wait_sleeps_in_bounded_slices_that_add_up_to_the_debt() {
        // An empty bucket (no burst) at 1000 tokens per second; a launch of 7 tokens owes 7 ms.
        let usage = bucket_file(1_000.0, 0);
        let bucket = usage.bucket(0);
        let debt = bucket
            .take(7, 1_000)
            .expect("an empty bucket makes the launch wait");
        assert_eq!(debt.tokens(), 7.0);
        let slices = wait_on_simulated_clock(&bucket, debt, 1_000, |_, _| {});
        assert_eq!(slices, [2_000_000, 2_000_000, 2_000_000, 1_000_000]);
        assert_eq!(usage.launch_stats(0).throttled_ns, 7_000_000);
        assert_eq!(usage.launch_stats(0).throttled_launches, 1);
    }

    #[test]
    fn a_rate_raised_during_a_wait_reaches_the_launch_within_one_slice() {
        // 10 000 tokens at 1000 per second: 10 s at the rate the launch started with.
        let usage = bucket_file(1_000.0, 0);
        let bucket = usage.bucket(0);
        let debt = bucket.take(10_000, 1_000).expect("overdrawn");
        let slices = wait_on_simulated_clock(&bucket, debt, 1_000, |slice, _| {
            if slice == 1 {
                // The agent raises the rate a million times during the first slice.
                usage.set_refill_rate(0, 1e9);
            }
        });
        // The first slice paid 2 tokens at the old rate; the rest takes 9998 ns at the new one.
        assert_eq!(slices, [WAIT_SLICE_NS, 9_998]);
        assert_eq!(usage.launch_stats(0).throttled_ns, WAIT_SLICE_NS + 9_998);
    }

    #[test]
    fn a_rate_lowered_during_a_wait_pays_the_rest_at_the_lower_rate() {
        let usage = bucket_file(1_000.0, 0);
        let bucket = usage.bucket(0);
        let debt = bucket.take(4, 1_000).expect("overdrawn");
        let slices = wait_on_simulated_clock(&bucket, debt, 1_000, |slice, _| {
            if slice == 1 {
                usage.set_refill_rate(0, 100.0);
            }
        });
        // The first slice is paid at the lower of the two rates (0.2 tokens: the drop may have
        // come at its start), the other 3.8 tokens at 100 per second: 38 ms more, in slices.
        assert_eq!(slices.iter().sum::<u64>(), 2_000_000 + 38_000_000);
        assert!(
            slices.iter().all(|&slice| slice <= WAIT_SLICE_NS),
            "{slices:?}"
        );
    }

    #[test]
    fn turning_the_limit_off_ends_a_wait_at_the_next_slice() {
        let usage = bucket_file(1_000.0, 0);
        let bucket = usage.bucket(0);
        let debt = bucket.take(1_000_000, 1_000).expect("overdrawn");
        let slices = wait_on_simulated_clock(&bucket, debt, 1_000, |_, _| {
            usage.set_refill_rate(0, 0.0);
        });
        assert_eq!(slices, [WAIT_SLICE_NS]);
    }

    #[test]
    fn launches_in_debt_go_in_the_order_they_overdrew() {
        let usage = bucket_file(1_000.0, 0);
        let bucket = usage.bucket(0);
        let mut first = bucket.take(3, 1_000).expect("overdrawn");
        let mut second = bucket.take(3, 1_000).expect("overdrawn");
        assert_eq!(second.tokens(), 6.0, "the second waits behind the first");
        // 3 ms later the refill (driven by another launch) has paid the first one's debt.
        assert!(bucket.take(0, 3_001_000).is_some());
        assert_eq!(bucket.next_sleep(&mut first, 3_001_000), None);
        assert_eq!(bucket.next_sleep(&mut second, 3_001_000), Some(2_000_000));
        assert_eq!(bucket.next_sleep(&mut second, 5_001_000), Some(1_000_000));
        assert_eq!(bucket.next_sleep(&mut second, 6_001_000), None);
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
