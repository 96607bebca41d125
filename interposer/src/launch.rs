//! Compute: every launch door draws its cost from the container's token bucket for the device
//! (a launch that a stream capture only records draws nothing; see `graph`) and, when the
//! bucket is in debt, waits until the refill has paid for it, sleeping in slices of
//! at most `WAIT_SLICE_NS` (2 ms) and re-reading the refill rate after each, so a rate the node
//! agent raises while a launch waits applies within one slice. Nothing is locked while it
//! sleeps; a launch under the limit costs a coarse clock read and a few atomic operations.

use std::time::Duration;

use tensor_fusion_interposer_core::limiter::{monotonic_coarse_ns, monotonic_ns};

use crate::cuda::CUstream;
use crate::graph::recording;
use crate::log::log;
use crate::runtime::Active;

/// Takes `cost` tokens for a launch on `stream` of the current device, waiting if the bucket
/// says so.
pub fn throttle(active: &Active, cost: u64, stream: CUstream) {
    if recording(stream) {
        return;
    }
    let device = active.launch_device();
    let bucket = active.runtime.usage.bucket(device);
    let Some(debt) = bucket.take(cost, monotonic_coarse_ns()) else {
        return;
    };
    log!(
        Trace,
        "device={device} cost={cost} debt_tokens={} launch throttled",
        debt.tokens()
    );
    // The precise clock while waiting: its system call is nothing next to a sleep, and slices
    // shorter than the coarse clock's tick need it to see their own length.
    bucket.wait_out(debt, monotonic_ns, |slice_ns| {
        std::thread::sleep(Duration::from_nanos(slice_ns));
    });
}
