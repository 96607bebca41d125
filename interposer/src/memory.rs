//! VRAM: every allocation door charges the container's usage file before the real driver runs,
//! so concurrent allocations in any process of the container can never pass the limit together;
//! frees return the charge to the device the memory came from. Past the limit (or when the
//! driver itself is out of memory) every door falls back to host memory mapped into the device
//! address space, up to the spill quota: `cuMemAlloc_v2`, `cuMemAllocPitch_v2`,
//! `cuMemAllocManaged`, `cuMemAllocAsync` and `cuMemAllocFromPoolAsync` to pinned host memory
//! (the stream-ordered doors not while their stream is being captured into a graph), and
//! `cuMemCreate` to a handle in host memory that the program maps as it would device memory.
//! Prefetches and advice on a spilled managed block succeed without reaching the driver. A
//! spilled block freed with `cuMemFreeAsync` is handed back to the host only once its stream
//! has reached the free: a host function queued behind the free sets a flag (it may not call
//! CUDA itself), and the next allocation, free or memory query of any thread frees the flagged
//! blocks.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tensor_fusion_interposer_core::shm::{MemoryKind, UsageError, UsageFile};

use crate::cuda::{
    CAPTURE_STATUS_NONE, CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_INVALID_VALUE,
    CUDA_ERROR_OUT_OF_MEMORY, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, CUDA_SUCCESS, CUdevice,
    CUdeviceptr, CUmemAllocationProp, CUmemLocation, CUresult, CUstream,
    DEVICE_ATTRIBUTE_HOST_NUMA_ID, HOST_ALLOC_PORTABLE_MAPPED, MEM_LOCATION_DEVICE,
    MEM_LOCATION_HOST, MEM_LOCATION_HOST_NUMA, call_real, read_out, write_out,
};
use crate::log::{EveryMinute, log};
use crate::runtime::{Active, Allocation, PendingHostFree, Placement, lock};

/// Row alignment assumed when charging `cuMemAllocPitch_v2` before the driver says the pitch.
const PITCH_ALIGN_GUESS: usize = 512;

/// Whether a door may fall back to host memory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Spill {
    Allowed,
    /// `cuMemAllocManaged`: allowed, and the block is remembered so that prefetches and advice
    /// on it succeed.
    Managed,
}

/// When an allocation or free takes effect: at the call, or in the order of a stream (the
/// `*Async` doors; the `_ptsz` hooks pass `CU_STREAM_PER_THREAD` for a NULL stream).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Immediate,
    Stream(CUstream),
}

/// Whether `stream` is being captured into a graph (an error from the driver counts as yes).
pub fn capturing(stream: CUstream) -> Result<bool, CUresult> {
    let mut status = CAPTURE_STATUS_NONE;
    match call_real!(cuStreamIsCapturing(stream, &mut status)) {
        CUDA_SUCCESS => Ok(status != CAPTURE_STATUS_NONE),
        error => Err(error),
    }
}

fn refuse(error: &UsageError, door: &str) -> CUresult {
    // A program may probe for out-of-memory in a loop: one line a minute at info.
    static REFUSALS: EveryMinute = EveryMinute::new();
    match REFUSALS.admit() {
        Some(left_out) => log!(
            Info,
            "door={door} reason=\"{error}\" refusals_left_out={left_out} allocation refused \
             (more within a minute log at debug)"
        ),
        None => log!(Debug, "door={door} reason=\"{error}\" allocation refused"),
    }
    CUDA_ERROR_OUT_OF_MEMORY
}

/// Charges `bytes` on the device the memory comes from (the current context's, or the stream's),
/// runs `real` (which writes the pointer to `out`), records the result, and spills if allowed.
pub fn charged_alloc(
    active: &Active,
    door: &str,
    out: *mut CUdeviceptr,
    bytes: usize,
    order: Order,
    spill: Spill,
    real: impl FnOnce() -> CUresult,
) -> CUresult {
    if out.is_null() || bytes == 0 {
        return real();
    }
    let device = match order {
        Order::Immediate => active.current_device(),
        Order::Stream(stream) => active.stream_device(stream),
    };
    let device = match device {
        Ok(device) => device,
        Err(code) => return code,
    };
    reclaim_host_frees(active);
    let spill = match (spill, order) {
        (Spill::Allowed, Order::Stream(stream)) => SpillTo::UnlessCapturing(stream),
        (Spill::Allowed, Order::Immediate) => SpillTo::Host,
        (Spill::Managed, _) => SpillTo::HostManaged,
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
            if result == CUDA_ERROR_OUT_OF_MEMORY {
                return spill_alloc(active, door, device, out, bytes, spill).unwrap_or(result);
            }
            result
        }
        Err(error @ UsageError::OverLimit { .. }) => {
            spill_alloc(active, door, device, out, bytes, spill)
                .unwrap_or_else(|| refuse(&error, door))
        }
        Err(error) => refuse(&error, door),
    }
}

/// Where an allocation past the limit may go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SpillTo {
    Host,
    /// Host memory standing in for managed memory (remembered for prefetches and advice).
    HostManaged,
    /// Host memory, unless the stream is being captured: a captured allocation must be a graph
    /// allocation, which the graph's own free node will free.
    UnlessCapturing(CUstream),
}

/// Serves an allocation from mapped pinned host memory; `None` if spill is off, its quota is
/// used up, or the stream is being captured (the caller then reports out of memory).
fn spill_alloc(
    active: &Active,
    door: &str,
    device: usize,
    out: *mut CUdeviceptr,
    bytes: usize,
    spill: SpillTo,
) -> Option<CUresult> {
    let usage = &active.runtime.usage;
    if usage.spill_quota(device) == 0 {
        return None;
    }
    if let SpillTo::UnlessCapturing(stream) = spill
        && capturing(stream).unwrap_or(true)
    {
        log!(
            Info,
            "door={door} bytes={bytes} no spill while the stream is captured into a graph"
        );
        return None;
    }
    if !reserve_spill(usage, device, bytes, door) {
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
    if spill == SpillTo::HostManaged {
        let mut ranges = lock(&active.spilled_managed);
        ranges.insert(address, address + bytes as u64);
        active
            .spilled_managed_count
            .store(ranges.len(), Ordering::Release);
    }
    write_out(out, address);
    log!(
        Debug,
        "door={door} device={device} bytes={bytes} allocation spilled to host memory"
    );
    Some(CUDA_SUCCESS)
}

/// Charges `bytes` of spill on `device`; false (logged, at most once a minute at info) when the
/// spill quota has no room.
fn reserve_spill(usage: &UsageFile, device: usize, bytes: usize, door: &str) -> bool {
    let Err(error) = usage.reserve(device, bytes as u64, MemoryKind::Spill) else {
        return true;
    };
    static SPILL_REFUSALS: EveryMinute = EveryMinute::new();
    match SPILL_REFUSALS.admit() {
        Some(left_out) => log!(
            Info,
            "door={door} reason=\"{error}\" refusals_left_out={left_out} spill refused \
             (more within a minute log at debug)"
        ),
        None => log!(Debug, "door={door} reason=\"{error}\" spill refused"),
    }
    false
}

/// Whether `[address, address + bytes)` lies inside one managed allocation that was spilled to
/// pinned host memory. One atomic load when there are none.
pub fn in_spilled_managed(active: &Active, address: CUdeviceptr, bytes: usize) -> bool {
    if active.spilled_managed_count.load(Ordering::Acquire) == 0 {
        return false;
    }
    let Some(end) = address.checked_add(bytes as u64) else {
        return false;
    };
    lock(&active.spilled_managed)
        .range(..=address)
        .next_back()
        .is_some_and(|(_, &block_end)| end <= block_end)
}

fn forget_spilled_managed(active: &Active, address: CUdeviceptr) {
    if active.spilled_managed_count.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut ranges = lock(&active.spilled_managed);
    ranges.remove(&address);
    active
        .spilled_managed_count
        .store(ranges.len(), Ordering::Release);
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
///
/// A stream-ordered free of device memory is uncharged when it is enqueued: from then on the
/// driver's pool may hand the same memory to allocations ordered after the free, so keeping the
/// charge until the stream gets there would refuse the usual free-then-allocate on one stream.
/// A stream-ordered free of spilled memory is deferred until the stream reaches it.
pub fn charged_free(
    active: &Active,
    address: CUdeviceptr,
    order: Order,
    real: impl FnOnce() -> CUresult,
) -> CUresult {
    reclaim_host_frees(active);
    let Some(allocation) = lock(&active.allocations).remove(&address) else {
        return real();
    };
    let usage = &active.runtime.usage;
    let result = match (allocation.placement, order) {
        (Placement::Device, _) => {
            let result = real();
            if result == CUDA_SUCCESS {
                usage.release(allocation.device, allocation.bytes, MemoryKind::Device);
            }
            result
        }
        (Placement::Spilled { host }, Order::Immediate) => {
            let result = call_real!(cuMemFreeHost(host as *mut c_void));
            if result == CUDA_SUCCESS {
                usage.release(allocation.device, allocation.bytes, MemoryKind::Spill);
            }
            result
        }
        (Placement::Spilled { host }, Order::Stream(stream)) => {
            defer_host_free(active, host, &allocation, stream)
        }
        // Handles are released with cuMemRelease, never recorded as pointers.
        (Placement::SpilledHandle, _) => real(),
    };
    if result != CUDA_SUCCESS {
        lock(&active.allocations).insert(address, allocation);
    } else if matches!(allocation.placement, Placement::Spilled { .. }) {
        forget_spilled_managed(active, address);
    }
    result
}

/// Called by the driver on its own thread when a stream reaches a deferred host free. It must
/// not call CUDA, so it only sets the flag; it runs exactly once per `cuLaunchHostFunc`.
unsafe extern "C" fn mark_reached(token: *mut c_void) {
    // SAFETY: `token` is the `Arc<AtomicBool>` reference that `defer_host_free` leaked for
    // exactly this one call; it is taken back here once.
    let reached = unsafe { Arc::from_raw(token.cast_const().cast::<AtomicBool>()) };
    reached.store(true, Ordering::Release);
}

/// Queues the host free of a spilled block behind the work already on `stream`.
fn defer_host_free(
    active: &Active,
    host: usize,
    allocation: &Allocation,
    stream: CUstream,
) -> CUresult {
    match capturing(stream) {
        Ok(false) => {}
        Ok(true) => {
            log!(
                Info,
                "bytes={} spilled memory cannot be freed inside a stream capture",
                allocation.bytes
            );
            return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        }
        Err(error) => return error,
    }
    let reached = Arc::new(AtomicBool::new(false));
    let token = Arc::into_raw(Arc::clone(&reached));
    let result = call_real!(cuLaunchHostFunc(
        stream,
        Some(mark_reached),
        token.cast_mut().cast()
    ));
    if result != CUDA_SUCCESS {
        // SAFETY: the driver refused the host function, so `token` was not handed over; this
        // takes back the reference leaked above.
        drop(unsafe { Arc::from_raw(token) });
        return result;
    }
    let mut pending = lock(&active.pending_host_frees);
    pending.push(PendingHostFree {
        host,
        device: allocation.device,
        bytes: allocation.bytes,
        reached,
    });
    active
        .pending_host_free_count
        .store(pending.len(), Ordering::Release);
    CUDA_SUCCESS
}

/// Frees the host memory of deferred spilled blocks whose streams reached their free, and
/// releases their spill charge. One atomic load when there are none.
pub fn reclaim_host_frees(active: &Active) {
    if active.pending_host_free_count.load(Ordering::Acquire) == 0 {
        return;
    }
    let reached: Vec<PendingHostFree> = {
        let mut pending = lock(&active.pending_host_frees);
        let (reached, waiting) = std::mem::take(&mut *pending)
            .into_iter()
            .partition(|free| free.reached.load(Ordering::Acquire));
        *pending = waiting;
        active
            .pending_host_free_count
            .store(pending.len(), Ordering::Release);
        reached
    };
    let mut failed = Vec::new();
    for free in reached {
        let result = call_real!(cuMemFreeHost(free.host as *mut c_void));
        if result == CUDA_SUCCESS {
            active
                .runtime
                .usage
                .release(free.device, free.bytes, MemoryKind::Spill);
        } else {
            log!(
                Warn,
                "bytes={} result={result} freeing spilled host memory failed; retrying later",
                free.bytes
            );
            failed.push(free);
        }
    }
    if !failed.is_empty() {
        let mut pending = lock(&active.pending_host_frees);
        pending.extend(failed);
        active
            .pending_host_free_count
            .store(pending.len(), Ordering::Release);
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
    if pitch.is_null() || width == 0 || height == 0 || ![4, 8, 16].contains(&element_bytes) {
        // The driver's own answer (CUDA_ERROR_INVALID_VALUE) for what it would refuse anyway.
        return real();
    }
    let Some(row_guess) = width.checked_next_multiple_of(PITCH_ALIGN_GUESS) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    let Some(guess) = row_guess.checked_mul(height) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    let result = charged_alloc(
        active,
        "cuMemAllocPitch_v2",
        out,
        guess,
        Order::Immediate,
        Spill::Allowed,
        real,
    );
    if result != CUDA_SUCCESS {
        return result;
    }
    let Some(address) = read_out(out) else {
        return result;
    };
    let usage = &active.runtime.usage;
    let mut allocations = lock(&active.allocations);
    let Some(allocation) = allocations.get_mut(&address) else {
        return result;
    };
    if matches!(allocation.placement, Placement::Spilled { .. }) {
        // Served from host memory in rows of the guessed pitch.
        write_out(pitch, row_guess);
        return result;
    }
    let actual = read_out(pitch).unwrap_or(0).saturating_mul(height) as u64;
    let guess = guess as u64;
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
/// Past the limit (or when the driver is out of device memory) the handle is created in host
/// memory instead, up to the spill quota (see [`spill_handle`]).
pub fn vmm_create(
    active: &Active,
    handle: *mut u64,
    bytes: usize,
    prop: *const CUmemAllocationProp,
    flags: u64,
) -> CUresult {
    let real = || call_real!(cuMemCreate(handle, bytes, prop, flags));
    let Some(asked) = read_out(prop) else {
        return real();
    };
    if asked.location.location_type != MEM_LOCATION_DEVICE || handle.is_null() || bytes == 0 {
        return real();
    }
    let Some(device) = active.index_of(asked.location.id) else {
        return CUDA_ERROR_INVALID_DEVICE;
    };
    reclaim_host_frees(active);
    let usage = &active.runtime.usage;
    match usage.reserve(device, bytes as u64, MemoryKind::Device) {
        Ok(()) => {
            let result = real();
            match (result, read_out(handle)) {
                (CUDA_SUCCESS, Some(created)) => {
                    record_handle(active, created, device, bytes, Placement::Device);
                    return result;
                }
                _ => usage.release(device, bytes as u64, MemoryKind::Device),
            }
            if result == CUDA_ERROR_OUT_OF_MEMORY {
                return spill_handle(active, handle, bytes, &asked, flags, device)
                    .unwrap_or(result);
            }
            result
        }
        Err(error @ UsageError::OverLimit { .. }) => {
            spill_handle(active, handle, bytes, &asked, flags, device)
                .unwrap_or_else(|| refuse(&error, "cuMemCreate"))
        }
        Err(error) => refuse(&error, "cuMemCreate"),
    }
}

fn record_handle(active: &Active, handle: u64, device: usize, bytes: usize, placement: Placement) {
    lock(&active.vmm_handles).insert(
        handle,
        Allocation {
            device,
            bytes: bytes as u64,
            placement,
        },
    );
}

/// Creates a `cuMemCreate` handle of `bytes` in host memory in place of one on the device the
/// program asked for, charged to the spill quota of that device; `None` if spill is off, its
/// quota is used up or the driver cannot create host handles (drivers before CUDA 12.2).
///
/// The host memory is the NUMA node closest to the GPU (`CU_MEM_LOCATION_TYPE_HOST_NUMA`, which
/// keeps the requested shareable handle types), or, where the driver names no such node, plain
/// `CU_MEM_LOCATION_TYPE_HOST`, which cannot be shared between processes, so its handle types
/// are cleared. Compression and GPUDirect RDMA are device-memory properties and are cleared.
/// The program maps the handle with `cuMemMap` and makes it accessible to the GPU with
/// `cuMemSetAccess` as it would a device handle; kernels then read it over PCIe.
fn spill_handle(
    active: &Active,
    handle: *mut u64,
    bytes: usize,
    asked: &CUmemAllocationProp,
    flags: u64,
    device: usize,
) -> Option<CUresult> {
    let usage = &active.runtime.usage;
    if usage.spill_quota(device) == 0 || !reserve_spill(usage, device, bytes, "cuMemCreate") {
        return None;
    }
    let mut host = *asked;
    host.alloc_flags[0] = 0;
    host.alloc_flags[1] = 0;
    let mut result = CUDA_ERROR_INVALID_VALUE;
    if let Some(numa_node) = host_numa_node(asked.location.id) {
        host.location = CUmemLocation {
            location_type: MEM_LOCATION_HOST_NUMA,
            id: numa_node,
        };
        result = call_real!(cuMemCreate(handle, bytes, &host, flags));
    }
    if result != CUDA_SUCCESS && result != CUDA_ERROR_OUT_OF_MEMORY {
        host.location = CUmemLocation {
            location_type: MEM_LOCATION_HOST,
            id: 0,
        };
        host.requested_handle_types = 0;
        result = call_real!(cuMemCreate(handle, bytes, &host, flags));
    }
    let created = read_out(handle).filter(|_| result == CUDA_SUCCESS);
    let Some(created) = created else {
        usage.release(device, bytes as u64, MemoryKind::Spill);
        log!(
            Warn,
            "door=cuMemCreate bytes={bytes} result={result} host memory handle could not be \
             created"
        );
        return None;
    };
    record_handle(active, created, device, bytes, Placement::SpilledHandle);
    log!(
        Debug,
        "door=cuMemCreate device={device} bytes={bytes} location={:?} handle spilled to host \
         memory",
        host.location
    );
    Some(CUDA_SUCCESS)
}

/// The host NUMA node closest to `device`, if the driver names one.
fn host_numa_node(device: CUdevice) -> Option<c_int> {
    let mut node: c_int = -1;
    let result = call_real!(cuDeviceGetAttribute(
        &mut node,
        DEVICE_ATTRIBUTE_HOST_NUMA_ID,
        device
    ));
    (result == CUDA_SUCCESS && node >= 0).then_some(node)
}

/// `cuMemRelease`.
pub fn vmm_release(active: &Active, handle: u64) -> CUresult {
    let Some(allocation) = lock(&active.vmm_handles).remove(&handle) else {
        return call_real!(cuMemRelease(handle));
    };
    let result = call_real!(cuMemRelease(handle));
    if result == CUDA_SUCCESS {
        let kind = match allocation.placement {
            Placement::SpilledHandle => MemoryKind::Spill,
            Placement::Device | Placement::Spilled { .. } => MemoryKind::Device,
        };
        active
            .runtime
            .usage
            .release(allocation.device, allocation.bytes, kind);
    } else {
        lock(&active.vmm_handles).insert(handle, allocation);
    }
    result
}

/// `cuMemGetInfo_v2`: total is the limit, free is what is left of it (never below 0, never above
/// what the GPU really has free). Errors only when the driver does.
pub fn memory_info(active: &Active, free: *mut usize, total: *mut usize) -> CUresult {
    reclaim_host_frees(active);
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
