//! VRAM: every allocation door charges the container's usage file before the real driver runs,
//! so concurrent allocations in any process of the container can never pass the limit together;
//! frees return the charge to the device the memory came from. Past the limit (or when the
//! driver itself is out of memory) `cuMemAlloc_v2`/`cuMemAllocPitch_v2` fall back to pinned host
//! memory mapped into the device address space, up to the spill quota.

use std::ffi::{c_int, c_uint, c_void};

use tensor_fusion_interposer_core::shm::{MemoryKind, UsageError, UsageFile};

use crate::cuda::{
    CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS, CUdeviceptr,
    CUmemAllocationProp, CUresult, HOST_ALLOC_PORTABLE_MAPPED, MEM_LOCATION_DEVICE, call_real,
    read_out, write_out,
};
use crate::log::log;
use crate::runtime::{Active, Allocation, Placement, lock};

/// Row alignment assumed when charging `cuMemAllocPitch_v2` before the driver says the pitch.
const PITCH_ALIGN_GUESS: usize = 512;

/// Whether a door may fall back to host memory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Spill {
    Allowed,
    Never,
}

fn refuse(error: &UsageError, door: &str) -> CUresult {
    log!(Info, "door={door} reason=\"{error}\" allocation refused");
    CUDA_ERROR_OUT_OF_MEMORY
}

/// Charges `bytes` on the current device, runs `real` (which writes the pointer to `out`),
/// records the result, and spills if allowed.
pub fn charged_alloc(
    active: &Active,
    door: &str,
    out: *mut CUdeviceptr,
    bytes: usize,
    spill: Spill,
    real: impl FnOnce() -> CUresult,
) -> CUresult {
    if out.is_null() || bytes == 0 {
        return real();
    }
    let device = match active.current_device() {
        Ok(device) => device,
        Err(code) => return code,
    };
    let usage = &active.runtime.usage;
    match usage.reserve(device, bytes as u64, MemoryKind::Device) {
        Ok(()) => {
            let result = real();
            if result == CUDA_SUCCESS {
                if let Some(address) = read_out(out) {
                    record(active, address, device, bytes as u64, Placement::Device);
                }
                return result;
            }
            usage.release(device, bytes as u64, MemoryKind::Device);
            if result == CUDA_ERROR_OUT_OF_MEMORY && spill == Spill::Allowed {
                return spill_alloc(active, door, device, out, bytes).unwrap_or(result);
            }
            result
        }
        Err(error @ UsageError::OverLimit { .. }) if spill == Spill::Allowed => {
            spill_alloc(active, door, device, out, bytes).unwrap_or_else(|| refuse(&error, door))
        }
        Err(error) => refuse(&error, door),
    }
}

/// Serves an allocation from mapped pinned host memory; `None` if spill is off or its quota
/// is used up (the caller then reports out of memory).
fn spill_alloc(
    active: &Active,
    door: &str,
    device: usize,
    out: *mut CUdeviceptr,
    bytes: usize,
) -> Option<CUresult> {
    let usage = &active.runtime.usage;
    if usage.spill_quota(device) == 0 {
        return None;
    }
    if let Err(error) = usage.reserve(device, bytes as u64, MemoryKind::Spill) {
        log!(Info, "door={door} reason=\"{error}\" spill refused");
        return None;
    }
    let mut host: *mut c_void = std::ptr::null_mut();
    let result = call_real!(cuMemHostAlloc(&mut host, bytes, HOST_ALLOC_PORTABLE_MAPPED));
    if result != CUDA_SUCCESS {
        usage.release(device, bytes as u64, MemoryKind::Spill);
        log!(
            Warn,
            "door={door} bytes={bytes} result={result} pinned host allocation failed"
        );
        return None;
    }
    let mut address: CUdeviceptr = 0;
    let result = call_real!(cuMemHostGetDevicePointer_v2(&mut address, host, 0));
    if result != CUDA_SUCCESS {
        call_real!(cuMemFreeHost(host));
        usage.release(device, bytes as u64, MemoryKind::Spill);
        log!(
            Warn,
            "door={door} bytes={bytes} result={result} mapping host memory failed"
        );
        return None;
    }
    record(
        active,
        address,
        device,
        bytes as u64,
        Placement::Spilled {
            host: host as usize,
        },
    );
    write_out(out, address);
    log!(
        Debug,
        "door={door} device={device} bytes={bytes} allocation spilled to host memory"
    );
    Some(CUDA_SUCCESS)
}

fn record(active: &Active, address: CUdeviceptr, device: usize, bytes: u64, placement: Placement) {
    lock(&active.allocations).insert(
        address,
        Allocation {
            device,
            bytes,
            placement,
        },
    );
}

/// Frees an allocation: the interposer's own are released and uncharged (from the device they
/// came from), anything else goes to `real` untouched.
pub fn charged_free(
    active: &Active,
    address: CUdeviceptr,
    real: impl FnOnce() -> CUresult,
) -> CUresult {
    let Some(allocation) = lock(&active.allocations).remove(&address) else {
        return real();
    };
    let usage = &active.runtime.usage;
    match allocation.placement {
        Placement::Device => {
            let result = real();
            if result == CUDA_SUCCESS {
                usage.release(allocation.device, allocation.bytes, MemoryKind::Device);
            } else {
                lock(&active.allocations).insert(address, allocation);
            }
            result
        }
        Placement::Spilled { host } => {
            let result = call_real!(cuMemFreeHost(host as *mut c_void));
            if result == CUDA_SUCCESS {
                usage.release(allocation.device, allocation.bytes, MemoryKind::Spill);
            } else {
                lock(&active.allocations).insert(address, allocation);
            }
            result
        }
    }
}

/// `cuMemAllocPitch_v2`: charges a conservative guess first, then corrects it to pitch x height.
pub fn pitch_alloc(
    active: &Active,
    out: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_bytes: c_uint,
) -> CUresult {
    let real = || call_real!(cuMemAllocPitch_v2(out, pitch, width, height, element_bytes));
    let Some(guess) = width
        .checked_next_multiple_of(PITCH_ALIGN_GUESS)
        .and_then(|row| row.checked_mul(height))
    else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    if pitch.is_null() {
        return real();
    }
    let result = charged_alloc(active, "cuMemAllocPitch_v2", out, guess, Spill::Never, real);
    if result != CUDA_SUCCESS {
        return result;
    }
    let Some(address) = read_out(out) else {
        return result;
    };
    let actual = read_out(pitch).unwrap_or(0).saturating_mul(height) as u64;
    let guess = guess as u64;
    let usage = &active.runtime.usage;
    let mut allocations = lock(&active.allocations);
    let Some(allocation) = allocations.get_mut(&address) else {
        return result;
    };
    if actual < guess {
        usage.release(allocation.device, guess - actual, MemoryKind::Device);
        allocation.bytes = actual;
    } else if actual > guess {
        if let Err(error) = usage.reserve(allocation.device, actual - guess, MemoryKind::Device) {
            let device = allocation.device;
            allocations.remove(&address);
            drop(allocations);
            call_real!(cuMemFree_v2(address));
            usage.release(device, guess, MemoryKind::Device);
            return refuse(&error, "cuMemAllocPitch_v2");
        }
        allocation.bytes = actual;
    }
    result
}

/// `cuMemCreate`: device locations are charged to that device; host locations pass through.
pub fn vmm_create(
    active: &Active,
    handle: *mut u64,
    bytes: usize,
    prop: *const CUmemAllocationProp,
    flags: u64,
) -> CUresult {
    let real = || call_real!(cuMemCreate(handle, bytes, prop, flags));
    let Some(prop_value) = (!prop.is_null()).then(|| {
        // SAFETY: a non-null prop points at a CUmemAllocationProp, whose leading fields these are.
        unsafe { (prop.cast::<[c_int; 4]>()).read() }
    }) else {
        return real();
    };
    let [_, _, location_type, location_id] = prop_value;
    if location_type != MEM_LOCATION_DEVICE || handle.is_null() {
        return real();
    }
    let Some(device) = active.index_of(location_id) else {
        return crate::cuda::CUDA_ERROR_INVALID_DEVICE;
    };
    let usage = &active.runtime.usage;
    if let Err(error) = usage.reserve(device, bytes as u64, MemoryKind::Device) {
        return refuse(&error, "cuMemCreate");
    }
    let result = real();
    match (result, read_out(handle)) {
        (CUDA_SUCCESS, Some(created)) => {
            lock(&active.vmm_handles).insert(
                created,
                Allocation {
                    device,
                    bytes: bytes as u64,
                    placement: Placement::Device,
                },
            );
        }
        _ => usage.release(device, bytes as u64, MemoryKind::Device),
    }
    result
}

/// `cuMemRelease`.
pub fn vmm_release(active: &Active, handle: u64) -> CUresult {
    let Some(allocation) = lock(&active.vmm_handles).remove(&handle) else {
        return call_real!(cuMemRelease(handle));
    };
    let result = call_real!(cuMemRelease(handle));
    if result == CUDA_SUCCESS {
        active
            .runtime
            .usage
            .release(allocation.device, allocation.bytes, MemoryKind::Device);
    } else {
        lock(&active.vmm_handles).insert(handle, allocation);
    }
    result
}

/// `cuMemGetInfo_v2`: total is the limit, free is what is left of it (never below 0, never above
/// what the GPU really has free). Errors only when the driver does.
pub fn memory_info(active: &Active, free: *mut usize, total: *mut usize) -> CUresult {
    let mut real_free = 0_usize;
    let mut real_total = 0_usize;
    let result = call_real!(cuMemGetInfo_v2(&mut real_free, &mut real_total));
    if result != CUDA_SUCCESS {
        return result;
    }
    let (slice_free, slice_total) = match active.current_device() {
        Ok(device) => slice(
            &active.runtime.usage,
            device,
            real_free as u64,
            real_total as u64,
        ),
        Err(_) => (real_free as u64, real_total as u64),
    };
    write_out(free, slice_free as usize);
    write_out(total, slice_total as usize);
    CUDA_SUCCESS
}

/// `(free, total)` of the container's slice of `device`.
pub fn slice(usage: &UsageFile, device: usize, real_free: u64, real_total: u64) -> (u64, u64) {
    // A dead process's usage is returned here at the latest; a failure only means stale sums.
    let _ = usage.reap_dead();
    let total = usage.vram_limit(device).min(real_total);
    let used = usage.used(device, MemoryKind::Device);
    (total.saturating_sub(used).min(real_free), total)
}
