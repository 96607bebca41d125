//! The exported CUDA driver functions and the table that maps names and real addresses to them.
//!
//! Each export runs through [`guard::hooked`]: re-entrant calls and calls before `cuInit`
//! reached the interposer go straight to the real driver. `cuInit` decides first whether the
//! container may use CUDA ([`admit`]) and initialises the real driver only then; once it refused,
//! it repeats its refusal and every other hook returns `CUDA_ERROR_NOT_INITIALIZED`, what the
//! driver answers after a failed `cuInit`. `cuGetProcAddress(_v2)` forwards the
//! request, then swaps the returned pointer for the hook of the same variant: first by matching
//! it against the real addresses of the hooked exports, else by the variant table
//! (name, cudaVersion, flags); names the interposer does not hook are never touched.

#![allow(non_snake_case, reason = "exported names are the CUDA driver API's")]
#![allow(
    clippy::missing_safety_doc,
    reason = "each export has the pointer contract of the CUDA driver function it stands for"
)]
#![allow(
    clippy::too_many_arguments,
    reason = "launch signatures are the CUDA driver API's"
)]

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

use tensor_fusion_interposer_core::limiter::launch_cost;
use tensor_fusion_interposer_core::variants;

use crate::cuda::{
    CU_STREAM_PER_THREAD, CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_INVALID_VALUE,
    CUDA_ERROR_NOT_INITIALIZED, CUDA_ERROR_UNKNOWN, CUDA_SUCCESS, CUdevice, CUdeviceptr,
    CUfunction, CUgraph, CUgraphExec, CUgraphNode, CUlaunchConfig, CUmemAllocationProp,
    CUmemLocation, CUresult, CUstream, CUuuid, c_name, call_real, read_out, write_out,
};
use crate::dlsym::lookup_real;
use crate::graph;
use crate::guard::hooked;
use crate::launch::throttle;
use crate::memory::{self, Order, Spill};
use crate::runtime::{activate, active, admit, refusal};

/// Defines an export: `$real` is the real call with the same arguments, `$active` the state
/// once `cuInit` went through the interposer; without it the call goes to the driver as is.
macro_rules! export {
    ($name:ident($($arg:ident: $ty:ty),* $(,)?) => |$active:ident, $real:ident| $body:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
            let $real = || call_real!($name($($arg),*));
            hooked(
                stringify!($name),
                CUDA_ERROR_UNKNOWN,
                || match active() {
                    Some($active) => $body,
                    None if refusal().is_some() => CUDA_ERROR_NOT_INITIALIZED,
                    None => $real(),
                },
                $real,
            )
        }
    };
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    let real = || call_real!(cuInit(flags));
    hooked(
        "cuInit",
        CUDA_ERROR_UNKNOWN,
        || {
            // Decide first: a refused process never initialises the real driver.
            if let Err(code) = admit() {
                return code;
            }
            let result = real();
            if result != CUDA_SUCCESS {
                return result;
            }
            activate()
        },
        real,
    )
}

export!(cuDeviceGetCount(count: *mut c_int) => |active, real| {
    let result = real();
    if result == CUDA_SUCCESS {
        write_out(count, active.devices.len() as c_int);
    }
    result
});

export!(cuDeviceGet(device: *mut CUdevice, ordinal: c_int) => |active, _real| {
    match usize::try_from(ordinal).ok().and_then(|index| active.devices.get(index)) {
        Some(visible) => call_real!(cuDeviceGet(device, visible.real_ordinal)),
        None => CUDA_ERROR_INVALID_DEVICE,
    }
});

export!(cuDeviceGetByPCIBusId(device: *mut CUdevice, bus_id: *const c_char) => |active, real| {
    let result = real();
    match read_out(device) {
        Some(found) if result == CUDA_SUCCESS && active.index_of(found).is_none() => {
            CUDA_ERROR_INVALID_DEVICE
        }
        _ => result,
    }
});

export!(cuDeviceGetUuid(uuid: *mut CUuuid, device: CUdevice) => |active, real| {
    if active.index_of(device).is_none() {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    real()
});

export!(cuDeviceGetUuid_v2(uuid: *mut CUuuid, device: CUdevice) => |active, real| {
    if active.index_of(device).is_none() {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    real()
});

export!(cuDeviceTotalMem_v2(bytes: *mut usize, device: CUdevice) => |active, real| {
    let result = real();
    if result == CUDA_SUCCESS
        && let (Some(index), Some(total)) = (active.index_of(device), read_out(bytes))
    {
        let limit = active.runtime.usage.vram_limit(index);
        write_out(bytes, (total as u64).min(limit) as usize);
    }
    result
});

export!(cuMemGetInfo_v2(free: *mut usize, total: *mut usize) => |active, _real| {
    memory::memory_info(active, free, total)
});

/// The stream a `_ptsz` variant means: NULL is the per-thread default stream there.
fn per_thread(stream: CUstream) -> CUstream {
    if stream.is_null() {
        CU_STREAM_PER_THREAD as CUstream
    } else {
        stream
    }
}

export!(cuMemAlloc_v2(out: *mut CUdeviceptr, bytes: usize) => |active, real| {
    let order = Order::Immediate;
    memory::charged_alloc(active, "cuMemAlloc_v2", out, bytes, order, Spill::Allowed, real)
});

export!(cuMemAllocPitch_v2(
    out: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_bytes: c_uint,
) => |active, _real| {
    memory::pitch_alloc(active, out, pitch, width, height, element_bytes)
});

export!(cuMemAllocManaged(out: *mut CUdeviceptr, bytes: usize, flags: c_uint) => |active, real| {
    let order = Order::Immediate;
    memory::charged_alloc(active, "cuMemAllocManaged", out, bytes, order, Spill::Managed, real)
});

// Prefetches and advice: a managed block the interposer served from pinned host memory stays
// where it is (the GPU reads it through its mapping), so they succeed without the driver, which
// refuses them on memory that is not managed. Everything else goes to the driver as is.

export!(cuMemPrefetchAsync(
    address: CUdeviceptr,
    bytes: usize,
    device: CUdevice,
    stream: CUstream,
) => |active, real| {
    if memory::in_spilled_managed(active, address, bytes) {
        return CUDA_SUCCESS;
    }
    real()
});

export!(cuMemPrefetchAsync_ptsz(
    address: CUdeviceptr,
    bytes: usize,
    device: CUdevice,
    stream: CUstream,
) => |active, real| {
    if memory::in_spilled_managed(active, address, bytes) {
        return CUDA_SUCCESS;
    }
    real()
});

export!(cuMemPrefetchAsync_v2(
    address: CUdeviceptr,
    bytes: usize,
    location: CUmemLocation,
    flags: c_uint,
    stream: CUstream,
) => |active, real| {
    if memory::in_spilled_managed(active, address, bytes) {
        return CUDA_SUCCESS;
    }
    real()
});

export!(cuMemPrefetchAsync_v2_ptsz(
    address: CUdeviceptr,
    bytes: usize,
    location: CUmemLocation,
    flags: c_uint,
    stream: CUstream,
) => |active, real| {
    if memory::in_spilled_managed(active, address, bytes) {
        return CUDA_SUCCESS;
    }
    real()
});

export!(cuMemAdvise(
    address: CUdeviceptr,
    bytes: usize,
    advice: c_int,
    device: CUdevice,
) => |active, real| {
    if memory::in_spilled_managed(active, address, bytes) {
        return CUDA_SUCCESS;
    }
    real()
});

export!(cuMemAdvise_v2(
    address: CUdeviceptr,
    bytes: usize,
    advice: c_int,
    location: CUmemLocation,
) => |active, real| {
    if memory::in_spilled_managed(active, address, bytes) {
        return CUDA_SUCCESS;
    }
    real()
});

export!(cuMemAllocAsync(out: *mut CUdeviceptr, bytes: usize, stream: CUstream) => |active, real| {
    let order = Order::Stream(stream);
    memory::charged_alloc(active, "cuMemAllocAsync", out, bytes, order, Spill::Allowed, real)
});

export!(cuMemAllocAsync_ptsz(
    out: *mut CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) => |active, real| {
    let order = Order::Stream(per_thread(stream));
    memory::charged_alloc(active, "cuMemAllocAsync_ptsz", out, bytes, order, Spill::Allowed, real)
});

export!(cuMemAllocFromPoolAsync(
    out: *mut CUdeviceptr,
    bytes: usize,
    pool: *mut c_void,
    stream: CUstream,
) => |active, real| {
    let order = Order::Stream(stream);
    let door = "cuMemAllocFromPoolAsync";
    memory::charged_alloc(active, door, out, bytes, order, Spill::Allowed, real)
});

export!(cuMemAllocFromPoolAsync_ptsz(
    out: *mut CUdeviceptr,
    bytes: usize,
    pool: *mut c_void,
    stream: CUstream,
) => |active, real| {
    let order = Order::Stream(per_thread(stream));
    let door = "cuMemAllocFromPoolAsync_ptsz";
    memory::charged_alloc(active, door, out, bytes, order, Spill::Allowed, real)
});

export!(cuMemFree_v2(address: CUdeviceptr) => |active, real| {
    memory::charged_free(active, address, Order::Immediate, real)
});

export!(cuMemFreeAsync(address: CUdeviceptr, stream: CUstream) => |active, real| {
    memory::charged_free(active, address, Order::Stream(stream), real)
});

export!(cuMemFreeAsync_ptsz(address: CUdeviceptr, stream: CUstream) => |active, real| {
    memory::charged_free(active, address, Order::Stream(per_thread(stream)), real)
});

export!(cuMemCreate(
    handle: *mut u64,
    bytes: usize,
    prop: *const CUmemAllocationProp,
    flags: u64,
) => |active, _real| {
    memory::vmm_create(active, handle, bytes, prop, flags)
});

export!(cuMemRelease(handle: u64) => |active, _real| {
    memory::vmm_release(active, handle)
});

export!(cuLaunchKernel(
    function: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) => |active, real| {
    let cost = launch_cost([grid_x, grid_y, grid_z], [block_x, block_y, block_z]);
    throttle(active, cost, stream);
    real()
});

export!(cuLaunchKernel_ptsz(
    function: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) => |active, real| {
    let cost = launch_cost([grid_x, grid_y, grid_z], [block_x, block_y, block_z]);
    throttle(active, cost, per_thread(stream));
    real()
});

/// A `cuLaunchKernelEx` launch's cost and stream.
fn config_cost(config: *const CUlaunchConfig) -> Option<(u64, CUstream)> {
    if config.is_null() {
        return None;
    }
    // SAFETY: a non-null config points at a CUlaunchConfig, per the API.
    let config = unsafe { &*config };
    Some((launch_cost(config.grid, config.block), config.stream))
}

export!(cuLaunchKernelEx(
    config: *const CUlaunchConfig,
    function: CUfunction,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) => |active, real| {
    let Some((cost, stream)) = config_cost(config) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    throttle(active, cost, stream);
    real()
});

export!(cuLaunchKernelEx_ptsz(
    config: *const CUlaunchConfig,
    function: CUfunction,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) => |active, real| {
    let Some((cost, stream)) = config_cost(config) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    throttle(active, cost, per_thread(stream));
    real()
});

export!(cuLaunchCooperativeKernel(
    function: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
) => |active, real| {
    let cost = launch_cost([grid_x, grid_y, grid_z], [block_x, block_y, block_z]);
    throttle(active, cost, stream);
    real()
});

export!(cuLaunchCooperativeKernel_ptsz(
    function: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
) => |active, real| {
    let cost = launch_cost([grid_x, grid_y, grid_z], [block_x, block_y, block_z]);
    throttle(active, cost, per_thread(stream));
    real()
});

export!(cuGraphLaunch(exec: CUgraphExec, stream: CUstream) => |active, real| {
    throttle(active, graph::exec_cost(active, exec), stream);
    real()
});

export!(cuGraphLaunch_ptsz(exec: CUgraphExec, stream: CUstream) => |active, real| {
    throttle(active, graph::exec_cost(active, exec), per_thread(stream));
    real()
});

// Graphs: each instantiation walks the graph for its launch cost; captures are counted so that
// launches they only record take no tokens (see `graph`).

export!(cuGraphInstantiate(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    error_node: *mut CUgraphNode,
    log: *mut c_char,
    log_size: usize,
) => |active, real| {
    let result = real();
    graph::instantiated(active, exec, graph, result);
    result
});

export!(cuGraphInstantiate_v2(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    error_node: *mut CUgraphNode,
    log: *mut c_char,
    log_size: usize,
) => |active, real| {
    let result = real();
    graph::instantiated(active, exec, graph, result);
    result
});

export!(cuGraphInstantiateWithFlags(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    flags: u64,
) => |active, real| {
    let result = real();
    graph::instantiated(active, exec, graph, result);
    result
});

export!(cuGraphInstantiateWithParams(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    params: *mut c_void,
) => |active, real| {
    let result = real();
    graph::instantiated(active, exec, graph, result);
    result
});

export!(cuGraphInstantiateWithParams_ptsz(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    params: *mut c_void,
) => |active, real| {
    let result = real();
    graph::instantiated(active, exec, graph, result);
    result
});

export!(cuGraphExecUpdate(
    exec: CUgraphExec,
    graph: CUgraph,
    error_node: *mut CUgraphNode,
    update_result: *mut c_int,
) => |active, real| {
    let result = real();
    graph::updated(active, exec, graph, result);
    result
});

export!(cuGraphExecUpdate_v2(
    exec: CUgraphExec,
    graph: CUgraph,
    result_info: *mut c_void,
) => |active, real| {
    let result = real();
    graph::updated(active, exec, graph, result);
    result
});

export!(cuGraphExecDestroy(exec: CUgraphExec) => |active, real| {
    let result = real();
    graph::destroyed(active, exec, result);
    result
});

export!(cuStreamBeginCapture(stream: CUstream) => |_active, real| {
    let result = real();
    graph::capture_began(result);
    result
});

export!(cuStreamBeginCapture_ptsz(stream: CUstream) => |_active, real| {
    let result = real();
    graph::capture_began(result);
    result
});

export!(cuStreamBeginCapture_v2(stream: CUstream, mode: c_int) => |_active, real| {
    let result = real();
    graph::capture_began(result);
    result
});

export!(cuStreamBeginCapture_v2_ptsz(stream: CUstream, mode: c_int) => |_active, real| {
    let result = real();
    graph::capture_began(result);
    result
});

export!(cuStreamBeginCaptureToGraph(
    stream: CUstream,
    graph: CUgraph,
    dependencies: *const CUgraphNode,
    edge_data: *const c_void,
    dependency_count: usize,
    mode: c_int,
) => |_active, real| {
    let result = real();
    graph::capture_began(result);
    result
});

export!(cuStreamBeginCaptureToGraph_ptsz(
    stream: CUstream,
    graph: CUgraph,
    dependencies: *const CUgraphNode,
    edge_data: *const c_void,
    dependency_count: usize,
    mode: c_int,
) => |_active, real| {
    let result = real();
    graph::capture_began(result);
    result
});

export!(cuStreamEndCapture(stream: CUstream, graph: *mut CUgraph) => |_active, real| {
    let result = real();
    graph::capture_ended(result);
    result
});

export!(cuStreamEndCapture_ptsz(stream: CUstream, graph: *mut CUgraph) => |_active, real| {
    let result = real();
    graph::capture_ended(result);
    result
});

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    out: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
) -> CUresult {
    let real = || call_real!(cuGetProcAddress(symbol, out, cuda_version, flags));
    hooked(
        "cuGetProcAddress",
        CUDA_ERROR_UNKNOWN,
        || {
            let result = real();
            if result == CUDA_SUCCESS {
                substitute(symbol, out, cuda_version, flags);
            }
            result
        },
        real,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    out: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    symbol_status: *mut c_int,
) -> CUresult {
    let real = || {
        call_real!(cuGetProcAddress_v2(
            symbol,
            out,
            cuda_version,
            flags,
            symbol_status
        ))
    };
    hooked(
        "cuGetProcAddress_v2",
        CUDA_ERROR_UNKNOWN,
        || {
            let result = real();
            if result == CUDA_SUCCESS {
                substitute(symbol, out, cuda_version, flags);
            }
            result
        },
        real,
    )
}

/// Replaces the real function pointer the driver wrote to `out` with the hook of the same
/// variant, if the interposer hooks it.
fn substitute(symbol: *const c_char, out: *mut *mut c_void, cuda_version: c_int, flags: u64) {
    let Some(returned) = read_out(out).filter(|pointer| !pointer.is_null()) else {
        return;
    };
    let by_address = real_to_hook()
        .iter()
        .find(|(real, _)| *real == returned as usize)
        .map(|(_, hook)| *hook);
    let hook = by_address.or_else(|| {
        let name = c_name(symbol)?;
        let variant = variants::resolve(name, cuda_version, flags)?;
        hook_address(variant.as_bytes())
    });
    if let Some(hook) = hook {
        write_out(out, hook as *mut c_void);
    }
}

/// `(real address, hook address)` for every hooked export the real driver has.
fn real_to_hook() -> &'static [(usize, usize)] {
    static TABLE: OnceLock<Vec<(usize, usize)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let Some(driver) = crate::cuda::real() else {
            return Vec::new();
        };
        HOOKED
            .iter()
            .filter_map(|name| {
                let symbol = format!("{name}\0");
                // SAFETY: the name ends in NUL and the result is read as a plain address.
                let real: Option<unsafe extern "C" fn()> =
                    unsafe { lookup_real(driver.handle as *mut c_void, &symbol) };
                let real = real? as *const () as usize;
                Some((real, hook_address(name.as_bytes())?))
            })
            .collect()
    })
}

/// Every exported CUDA function the interposer hooks.
pub const HOOKED: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetByPCIBusId",
    "cuDeviceGetUuid",
    "cuDeviceGetUuid_v2",
    "cuDeviceTotalMem_v2",
    "cuMemGetInfo_v2",
    "cuMemAlloc_v2",
    "cuMemAllocPitch_v2",
    "cuMemAllocManaged",
    "cuMemAllocAsync",
    "cuMemAllocAsync_ptsz",
    "cuMemAllocFromPoolAsync",
    "cuMemAllocFromPoolAsync_ptsz",
    "cuMemFree_v2",
    "cuMemFreeAsync",
    "cuMemFreeAsync_ptsz",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemPrefetchAsync",
    "cuMemPrefetchAsync_ptsz",
    "cuMemPrefetchAsync_v2",
    "cuMemPrefetchAsync_v2_ptsz",
    "cuMemAdvise",
    "cuMemAdvise_v2",
    "cuLaunchKernel",
    "cuLaunchKernel_ptsz",
    "cuLaunchKernelEx",
    "cuLaunchKernelEx_ptsz",
    "cuLaunchCooperativeKernel",
    "cuLaunchCooperativeKernel_ptsz",
    "cuGraphLaunch",
    "cuGraphLaunch_ptsz",
    "cuGraphInstantiate",
    "cuGraphInstantiate_v2",
    "cuGraphInstantiateWithFlags",
    "cuGraphInstantiateWithParams",
    "cuGraphInstantiateWithParams_ptsz",
    "cuGraphExecUpdate",
    "cuGraphExecUpdate_v2",
    "cuGraphExecDestroy",
    "cuStreamBeginCapture",
    "cuStreamBeginCapture_ptsz",
    "cuStreamBeginCapture_v2",
    "cuStreamBeginCapture_v2_ptsz",
    "cuStreamBeginCaptureToGraph",
    "cuStreamBeginCaptureToGraph_ptsz",
    "cuStreamEndCapture",
    "cuStreamEndCapture_ptsz",
    "cuGetProcAddress",
    "cuGetProcAddress_v2",
];

/// Address of the hook exported under exactly `name`.
pub fn hook_address(name: &[u8]) -> Option<usize> {
    let address = match name {
        b"cuInit" => cuInit as *const (),
        b"cuDeviceGetCount" => cuDeviceGetCount as *const (),
        b"cuDeviceGet" => cuDeviceGet as *const (),
        b"cuDeviceGetByPCIBusId" => cuDeviceGetByPCIBusId as *const (),
        b"cuDeviceGetUuid" => cuDeviceGetUuid as *const (),
        b"cuDeviceGetUuid_v2" => cuDeviceGetUuid_v2 as *const (),
        b"cuDeviceTotalMem_v2" => cuDeviceTotalMem_v2 as *const (),
        b"cuMemGetInfo_v2" => cuMemGetInfo_v2 as *const (),
        b"cuMemAlloc_v2" => cuMemAlloc_v2 as *const (),
        b"cuMemAllocPitch_v2" => cuMemAllocPitch_v2 as *const (),
        b"cuMemAllocManaged" => cuMemAllocManaged as *const (),
        b"cuMemAllocAsync" => cuMemAllocAsync as *const (),
        b"cuMemAllocAsync_ptsz" => cuMemAllocAsync_ptsz as *const (),
        b"cuMemAllocFromPoolAsync" => cuMemAllocFromPoolAsync as *const (),
        b"cuMemAllocFromPoolAsync_ptsz" => cuMemAllocFromPoolAsync_ptsz as *const (),
        b"cuMemFree_v2" => cuMemFree_v2 as *const (),
        b"cuMemFreeAsync" => cuMemFreeAsync as *const (),
        b"cuMemFreeAsync_ptsz" => cuMemFreeAsync_ptsz as *const (),
        b"cuMemCreate" => cuMemCreate as *const (),
        b"cuMemRelease" => cuMemRelease as *const (),
        b"cuMemPrefetchAsync" => cuMemPrefetchAsync as *const (),
        b"cuMemPrefetchAsync_ptsz" => cuMemPrefetchAsync_ptsz as *const (),
        b"cuMemPrefetchAsync_v2" => cuMemPrefetchAsync_v2 as *const (),
        b"cuMemPrefetchAsync_v2_ptsz" => cuMemPrefetchAsync_v2_ptsz as *const (),
        b"cuMemAdvise" => cuMemAdvise as *const (),
        b"cuMemAdvise_v2" => cuMemAdvise_v2 as *const (),
        b"cuLaunchKernel" => cuLaunchKernel as *const (),
        b"cuLaunchKernel_ptsz" => cuLaunchKernel_ptsz as *const (),
        b"cuLaunchKernelEx" => cuLaunchKernelEx as *const (),
        b"cuLaunchKernelEx_ptsz" => cuLaunchKernelEx_ptsz as *const (),
        b"cuLaunchCooperativeKernel" => cuLaunchCooperativeKernel as *const (),
        b"cuLaunchCooperativeKernel_ptsz" => cuLaunchCooperativeKernel_ptsz as *const (),
        b"cuGraphLaunch" => cuGraphLaunch as *const (),
        b"cuGraphLaunch_ptsz" => cuGraphLaunch_ptsz as *const (),
        b"cuGraphInstantiate" => cuGraphInstantiate as *const (),
        b"cuGraphInstantiate_v2" => cuGraphInstantiate_v2 as *const (),
        b"cuGraphInstantiateWithFlags" => cuGraphInstantiateWithFlags as *const (),
        b"cuGraphInstantiateWithParams" => cuGraphInstantiateWithParams as *const (),
        b"cuGraphInstantiateWithParams_ptsz" => cuGraphInstantiateWithParams_ptsz as *const (),
        b"cuGraphExecUpdate" => cuGraphExecUpdate as *const (),
        b"cuGraphExecUpdate_v2" => cuGraphExecUpdate_v2 as *const (),
        b"cuGraphExecDestroy" => cuGraphExecDestroy as *const (),
        b"cuStreamBeginCapture" => cuStreamBeginCapture as *const (),
        b"cuStreamBeginCapture_ptsz" => cuStreamBeginCapture_ptsz as *const (),
        b"cuStreamBeginCapture_v2" => cuStreamBeginCapture_v2 as *const (),
        b"cuStreamBeginCapture_v2_ptsz" => cuStreamBeginCapture_v2_ptsz as *const (),
        b"cuStreamBeginCaptureToGraph" => cuStreamBeginCaptureToGraph as *const (),
        b"cuStreamBeginCaptureToGraph_ptsz" => cuStreamBeginCaptureToGraph_ptsz as *const (),
        b"cuStreamEndCapture" => cuStreamEndCapture as *const (),
        b"cuStreamEndCapture_ptsz" => cuStreamEndCapture_ptsz as *const (),
        b"cuGetProcAddress" => cuGetProcAddress as *const (),
        b"cuGetProcAddress_v2" => cuGetProcAddress_v2 as *const (),
        _ => return None,
    };
    Some(address as usize)
}
