//! Compute: every launch door draws its cost from the container's token bucket for the device
//! and, when the bucket is in debt, sleeps until the refill has paid for it. Nothing is locked
//! while it sleeps; a launch under the limit costs a coarse clock read and a few atomic operations.

use std::time::Duration;

use tensor_fusion_interposer_core::limiter::monotonic_coarse_ns;

use crate::log::log;
use crate::runtime::Active;

/// Takes `cost` tokens for a launch on the current device, waiting if the bucket says so.
pub fn throttle(active: &Active, cost: u64) {
    let device = active.launch_device();
    let wait_ns = active
        .runtime
        .usage
        .bucket(device)
        .acquire(cost, monotonic_coarse_ns());
    if wait_ns > 0 {
        log!(
            Trace,
            "device={device} cost={cost} wait_ns={wait_ns} launch throttled"
        );
        std::thread::sleep(Duration::from_nanos(wait_ns));
    }
}
