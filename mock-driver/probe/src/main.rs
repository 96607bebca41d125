//! `tf-cuda-probe`: a CUDA client for the interposer's integration tests. It drives
//! `libcuda.so.1` the ways real programs do (through exported symbols, `dlopen` + `dlsym`, or
//! `cuGetProcAddress` as the CUDA runtime does) and prints one `op key=value ...` line per
//! step, so a test can assert on what a workload would see.
//!
//! Usage: `tf-cuda-probe VIA OP...` with VIA one of `exports`, `dlsym`,
//! `procaddr:VERSION:FLAGS` (`cuGetProcAddress_v2`) or `procaddr1:VERSION:FLAGS` (the 4-argument
//! `cuGetProcAddress`). OPs are listed in `run_op`.

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::io::Read;
use std::sync::{Arc, Barrier};

type CUresult = c_uint;
type GetProcV2 =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CUresult;
type GetProcV1 = unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> CUresult;

const RTLD_DEFAULT: *mut c_void = std::ptr::null_mut();

#[derive(Clone, Copy)]
enum Via {
    Exports,
    Dlsym,
    ProcAddress {
        version: c_int,
        flags: u64,
        v1: bool,
    },
}

/// How this probe finds driver functions.
#[derive(Clone, Copy)]
struct Api {
    via: Via,
    handle: usize,
    get_proc: usize,
}

fn dlsym(handle: *mut c_void, name: &str) -> *mut c_void {
    let name = CString::new(name).expect("symbol names have no NUL");
    // SAFETY: dlsym with a valid handle (or RTLD_DEFAULT) and a NUL-terminated name.
    unsafe { libc::dlsym(handle, name.as_ptr()) }
}

/// The base name the CUDA runtime would ask `cuGetProcAddress` for.
fn base_name(name: &str) -> &str {
    ["_v2", "_ptsz"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

impl Api {
    fn open(via: Via) -> Self {
        let flags = libc::RTLD_NOW
            | if matches!(via, Via::Exports) {
                libc::RTLD_GLOBAL
            } else {
                libc::RTLD_LOCAL
            };
        // SAFETY: dlopen with a constant NUL-terminated name.
        let handle = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), flags) };
        assert!(!handle.is_null(), "dlopen(libcuda.so.1) failed");
        let get_proc = match via {
            Via::ProcAddress { v1: true, .. } => dlsym(handle, "cuGetProcAddress"),
            Via::ProcAddress { .. } => dlsym(handle, "cuGetProcAddress_v2"),
            _ => std::ptr::null_mut(),
        };
        Self {
            via,
            handle: handle as usize,
            get_proc: get_proc as usize,
        }
    }

    /// The function `name` (its exported, versioned name) as the chosen path resolves it.
    fn function(&self, name: &str) -> *mut c_void {
        match self.via {
            Via::Exports => dlsym(RTLD_DEFAULT, name),
            Via::Dlsym => dlsym(self.handle as *mut c_void, name),
            Via::ProcAddress { version, flags, v1 } => {
                let base = CString::new(base_name(name)).expect("no NUL");
                let mut pointer = std::ptr::null_mut();
                let mut status: c_int = -1;
                let result = if v1 {
                    // SAFETY: get_proc is the driver's cuGetProcAddress.
                    unsafe {
                        std::mem::transmute::<usize, GetProcV1>(self.get_proc)(
                            base.as_ptr(),
                            &mut pointer,
                            version,
                            flags,
                        )
                    }
                } else {
                    // SAFETY: get_proc is the driver's cuGetProcAddress_v2.
                    unsafe {
                        std::mem::transmute::<usize, GetProcV2>(self.get_proc)(
                            base.as_ptr(),
                            &mut pointer,
                            version,
                            flags,
                            &mut status,
                        )
                    }
                };
                assert_eq!(
                    result, 0,
                    "cuGetProcAddress({name}) failed, status {status}"
                );
                pointer
            }
        }
    }

    /// A mock-only introspection function.
    fn mock(&self, name: &str) -> *mut c_void {
        dlsym(self.handle as *mut c_void, name)
    }
}

macro_rules! call {
    ($api:expr, $name:literal, fn($($ty:ty),* $(,)?), $($arg:expr),* $(,)?) => {{
        let pointer = $api.function($name);
        assert!(!pointer.is_null(), concat!($name, " not found"));
        // SAFETY: the pointer is the driver function of that name, whose C signature is spelled
        // out here.
        unsafe {
            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ty),*) -> CUresult>(pointer)(
                $($arg),*
            )
        }
    }};
}

fn mock_counter(api: &Api, name: &str, argument: c_int) -> u64 {
    let pointer = api.mock(name);
    if pointer.is_null() {
        return 0;
    }
    // SAFETY: tfMock* counters take an int and return an unsigned 64-bit value.
    unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int) -> u64>(pointer)(argument)
    }
}

struct State {
    api: Api,
    pointers: Vec<u64>,
    /// Stream-ordered allocations, freed with `cuMemFreeAsync` by `asyncfreeall`.
    async_pointers: Vec<u64>,
    handles: Vec<u64>,
    device: c_int,
    /// The stream made by `stream` (NULL until then).
    stream: usize,
}

fn device_of(api: &Api, ordinal: c_int) -> (CUresult, c_int) {
    let mut device: c_int = -1;
    let result = call!(
        api,
        "cuDeviceGet",
        fn(*mut c_int, c_int),
        &mut device,
        ordinal
    );
    (result, device)
}

fn alloc(api: &Api, bytes: usize) -> (CUresult, u64) {
    let mut pointer = 0_u64;
    let result = call!(
        api,
        "cuMemAlloc_v2",
        fn(*mut u64, usize),
        &mut pointer,
        bytes
    );
    (result, pointer)
}

fn free(api: &Api, pointer: u64) -> CUresult {
    call!(api, "cuMemFree_v2", fn(u64), pointer)
}

fn set_context(api: &Api, ordinal: c_int) -> (CUresult, c_int) {
    let (result, device) = device_of(api, ordinal);
    if result != 0 {
        return (result, device);
    }
    let mut context: *mut c_void = std::ptr::null_mut();
    let result = call!(
        api,
        "cuDevicePrimaryCtxRetain",
        fn(*mut *mut c_void, c_int),
        &mut context,
        device
    );
    if result != 0 {
        return (result, device);
    }
    (
        call!(api, "cuCtxSetCurrent", fn(*mut c_void), context),
        device,
    )
}

#[repr(C)]
struct LaunchConfig {
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared_bytes: c_uint,
    stream: *mut c_void,
    attributes: *mut c_void,
    attribute_count: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MemLocation {
    location_type: c_int,
    id: c_int,
}

#[repr(C)]
struct AllocationProp {
    allocation_type: c_int,
    requested_handle_types: c_int,
    location_type: c_int,
    location_id: c_int,
    win32_metadata: *mut c_void,
    alloc_flags: [u8; 8],
}

/// `CUDA_KERNEL_NODE_PARAMS_v2`.
#[repr(C)]
struct KernelNodeParams {
    function: *mut c_void,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared_bytes: c_uint,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
    kernel: *mut c_void,
    context: *mut c_void,
}

/// `CUDA_GRAPH_INSTANTIATE_PARAMS`.
#[repr(C)]
struct InstantiateParams {
    flags: u64,
    upload_stream: *mut c_void,
    error_node: *mut c_void,
    result: c_int,
}

/// `CUgraphExecUpdateResultInfo`.
#[repr(C)]
struct ExecUpdateResultInfo {
    result: c_int,
    error_node: *mut c_void,
    error_from_node: *mut c_void,
}

/// Steps of building and running a graph; the first failing step's result is kept.
struct GraphSteps<'a> {
    api: &'a Api,
    results: Vec<String>,
}

impl GraphSteps<'_> {
    fn step(&mut self, name: &str, result: CUresult) -> bool {
        self.results.push(format!("{name}={result}"));
        result == 0
    }

    fn create(&mut self) -> *mut c_void {
        let mut graph = std::ptr::null_mut();
        let result = call!(
            self.api,
            "cuGraphCreate",
            fn(*mut *mut c_void, c_uint),
            &mut graph,
            0
        );
        self.step("create", result);
        graph
    }

    fn kernel(&mut self, graph: *mut c_void, grid: c_uint, block: c_uint) {
        let params = KernelNodeParams {
            function: 0x1000 as *mut c_void,
            grid: [grid, 1, 1],
            block: [block, 1, 1],
            shared_bytes: 0,
            kernel_params: std::ptr::null_mut(),
            extra: std::ptr::null_mut(),
            kernel: std::ptr::null_mut(),
            context: std::ptr::null_mut(),
        };
        let mut node = std::ptr::null_mut();
        let result = call!(
            self.api,
            "cuGraphAddKernelNode_v2",
            fn(*mut *mut c_void, *mut c_void, *const *mut c_void, usize, *const KernelNodeParams),
            &mut node,
            graph,
            std::ptr::null(),
            0,
            &params
        );
        self.step("kernel", result);
    }

    fn instantiate(&mut self, graph: *mut c_void) -> *mut c_void {
        let mut exec = std::ptr::null_mut();
        let result = call!(
            self.api,
            "cuGraphInstantiateWithFlags",
            fn(*mut *mut c_void, *mut c_void, u64),
            &mut exec,
            graph,
            0
        );
        self.step("instantiate", result);
        exec
    }

    fn launch(&mut self, exec: *mut c_void, stream: *mut c_void, count: u64) {
        for _ in 0..count {
            let result = call!(
                self.api,
                "cuGraphLaunch",
                fn(*mut c_void, *mut c_void),
                exec,
                stream
            );
            if !self.step("launch", result) {
                break;
            }
        }
        self.results.dedup();
    }
}

/// Graph ops (the mock records launches on a capturing stream and runs a graph's kernels):
/// - `graph:COUNT:GRID:BLOCK`: a graph of one kernel, built node by node, launched COUNT times;
/// - `capturegraph:COUNT:GRID:BLOCK:KERNELS`: KERNELS launches captured on the `stream` stream,
///   instantiated with `cuGraphInstantiateWithParams`, launched COUNT times on that stream;
/// - `nestedgraph:COUNT`: kernels of 4x64 and 8x32 threads, an empty node and a child graph of
///   one 2x32 kernel, launched COUNT times;
/// - `updategraph:GRID_A:GRID_B`: a one-kernel graph (GRID_A x 1), its exec updated to a graph
///   of GRID_B x 1 with `cuGraphExecUpdate_v2`, launched once, then destroyed.
fn graph_op(state: &mut State, op: &str, name: &str, args: &[u64]) {
    let arg = |index: usize| args.get(index).copied().unwrap_or(0);
    let mut steps = GraphSteps {
        api: &state.api,
        results: Vec::new(),
    };
    match name {
        "graph" => {
            let graph = steps.create();
            steps.kernel(graph, arg(1) as c_uint, arg(2) as c_uint);
            let exec = steps.instantiate(graph);
            steps.launch(exec, std::ptr::null_mut(), arg(0));
        }
        "capturegraph" => {
            let stream = state.stream as *mut c_void;
            let api = &state.api;
            let begun = call!(
                api,
                "cuStreamBeginCapture_v2",
                fn(*mut c_void, c_int),
                stream,
                0
            );
            steps.step("begin", begun);
            for _ in 0..arg(3) {
                let result = call!(
                    api,
                    "cuLaunchKernel",
                    fn(
                        *mut c_void,
                        c_uint,
                        c_uint,
                        c_uint,
                        c_uint,
                        c_uint,
                        c_uint,
                        c_uint,
                        *mut c_void,
                        *mut *mut c_void,
                        *mut *mut c_void,
                    ),
                    0x1000 as *mut c_void,
                    arg(1) as c_uint,
                    1,
                    1,
                    arg(2) as c_uint,
                    1,
                    1,
                    0,
                    stream,
                    std::ptr::null_mut(),
                    std::ptr::null_mut()
                );
                steps.step("captured", result);
            }
            steps.results.dedup();
            let mut graph = std::ptr::null_mut();
            let ended = call!(
                api,
                "cuStreamEndCapture",
                fn(*mut c_void, *mut *mut c_void),
                stream,
                &mut graph
            );
            steps.step("end", ended);
            let mut params = InstantiateParams {
                flags: 0,
                upload_stream: std::ptr::null_mut(),
                error_node: std::ptr::null_mut(),
                result: -1,
            };
            let mut exec = std::ptr::null_mut();
            let result = call!(
                api,
                "cuGraphInstantiateWithParams",
                fn(*mut *mut c_void, *mut c_void, *mut InstantiateParams),
                &mut exec,
                graph,
                &mut params
            );
            steps.step("instantiate", result);
            steps.launch(exec, stream, arg(0));
        }
        "nestedgraph" => {
            let child = steps.create();
            steps.kernel(child, 2, 32);
            let graph = steps.create();
            steps.kernel(graph, 4, 64);
            steps.kernel(graph, 8, 32);
            let mut node = std::ptr::null_mut();
            let result = call!(
                steps.api,
                "cuGraphAddEmptyNode",
                fn(*mut *mut c_void, *mut c_void, *const *mut c_void, usize),
                &mut node,
                graph,
                std::ptr::null(),
                0
            );
            steps.step("empty", result);
            let result = call!(
                steps.api,
                "cuGraphAddChildGraphNode",
                fn(*mut *mut c_void, *mut c_void, *const *mut c_void, usize, *mut c_void),
                &mut node,
                graph,
                std::ptr::null(),
                0,
                child
            );
            steps.step("child", result);
            let exec = steps.instantiate(graph);
            steps.launch(exec, std::ptr::null_mut(), arg(0));
        }
        _ => {
            let first = steps.create();
            steps.kernel(first, arg(0) as c_uint, 1);
            let exec = steps.instantiate(first);
            let second = steps.create();
            steps.kernel(second, arg(1) as c_uint, 1);
            let mut info = ExecUpdateResultInfo {
                result: -1,
                error_node: std::ptr::null_mut(),
                error_from_node: std::ptr::null_mut(),
            };
            let result = call!(
                steps.api,
                "cuGraphExecUpdate_v2",
                fn(*mut c_void, *mut c_void, *mut ExecUpdateResultInfo),
                exec,
                second,
                &mut info
            );
            steps.step("update", result);
            steps.launch(exec, std::ptr::null_mut(), 1);
            let result = call!(steps.api, "cuGraphExecDestroy", fn(*mut c_void), exec);
            steps.step("destroy", result);
        }
    }
    let failed = steps
        .results
        .iter()
        .find(|step| !step.ends_with("=0"))
        .map_or("0", |step| step.rsplit('=').next().unwrap_or("?"));
    println!("{op} result={failed} steps={}", steps.results.join(","));
}

fn numbers(op: &str) -> Vec<u64> {
    op.split(':')
        .skip(1)
        .filter_map(|part| part.parse().ok())
        .collect()
}

fn run_op(state: &mut State, op: &str) {
    let api = state.api;
    let args = numbers(op);
    let arg = |index: usize| args.get(index).copied().unwrap_or(0);
    let function = 0x1000 as *mut c_void;
    let name = op.split(':').next().unwrap_or_default();
    match name {
        "init" => println!("{op} result={}", call!(api, "cuInit", fn(c_uint), 0)),
        "count" => {
            let mut count: c_int = -1;
            let result = call!(api, "cuDeviceGetCount", fn(*mut c_int), &mut count);
            println!("{op} result={result} value={count}");
        }
        "device" => {
            let (result, device) = device_of(&api, arg(0) as c_int);
            println!("{op} result={result} value={device}");
        }
        "uuid" => {
            let (result, device) = device_of(&api, arg(0) as c_int);
            let mut uuid = [0_u8; 16];
            let result = if result == 0 {
                call!(
                    api,
                    "cuDeviceGetUuid_v2",
                    fn(*mut [u8; 16], c_int),
                    &mut uuid,
                    device
                )
            } else {
                result
            };
            let hex: String = uuid.iter().map(|byte| format!("{byte:02x}")).collect();
            println!(
                "{op} result={result} value=GPU-{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            );
        }
        "ctx" => {
            let (result, device) = set_context(&api, arg(0) as c_int);
            state.device = device;
            println!("{op} result={result} device={device}");
        }
        "meminfo" => {
            let (mut free_bytes, mut total) = (0_usize, 0_usize);
            let result = call!(
                api,
                "cuMemGetInfo_v2",
                fn(*mut usize, *mut usize),
                &mut free_bytes,
                &mut total
            );
            println!("{op} result={result} free={free_bytes} total={total}");
        }
        "totalmem" => {
            let (result, device) = device_of(&api, arg(0) as c_int);
            let mut total = 0_usize;
            let result = if result == 0 {
                call!(
                    api,
                    "cuDeviceTotalMem_v2",
                    fn(*mut usize, c_int),
                    &mut total,
                    device
                )
            } else {
                result
            };
            println!("{op} result={result} value={total}");
        }
        "alloc" => {
            let (result, pointer) = alloc(&api, arg(0) as usize);
            if result == 0 {
                state.pointers.push(pointer);
            }
            println!("{op} result={result} ptr={pointer:#x}");
        }
        "pitch" => {
            let (mut pointer, mut pitch) = (0_u64, 0_usize);
            let result = call!(
                api,
                "cuMemAllocPitch_v2",
                fn(*mut u64, *mut usize, usize, usize, c_uint),
                &mut pointer,
                &mut pitch,
                arg(0) as usize,
                arg(1) as usize,
                4
            );
            if result == 0 {
                state.pointers.push(pointer);
            }
            println!("{op} result={result} pitch={pitch}");
        }
        "managed" => {
            let mut pointer = 0_u64;
            let result = call!(
                api,
                "cuMemAllocManaged",
                fn(*mut u64, usize, c_uint),
                &mut pointer,
                arg(0) as usize,
                1
            );
            if result == 0 {
                state.pointers.push(pointer);
            }
            println!("{op} result={result}");
        }
        "async" => {
            let mut pointer = 0_u64;
            let result = call!(
                api,
                "cuMemAllocAsync",
                fn(*mut u64, usize, *mut c_void),
                &mut pointer,
                arg(0) as usize,
                std::ptr::null_mut()
            );
            if result == 0 {
                let freed = call!(
                    api,
                    "cuMemFreeAsync",
                    fn(u64, *mut c_void),
                    pointer,
                    std::ptr::null_mut()
                );
                println!("{op} result={result} freed={freed}");
            } else {
                println!("{op} result={result}");
            }
        }
        "stream" => {
            let mut stream: *mut c_void = std::ptr::null_mut();
            let result = call!(
                api,
                "cuStreamCreate",
                fn(*mut *mut c_void, c_uint),
                &mut stream,
                0
            );
            state.stream = stream as usize;
            println!("{op} result={result}");
        }
        "busy" => {
            // Mock control: 1 keeps the stream busy (its queued work waits), 0 lets it finish.
            let pointer = api.mock("tfMockStreamHold");
            assert!(!pointer.is_null(), "tfMockStreamHold not found");
            // SAFETY: tfMockStreamHold(CUstream, int) -> CUresult.
            let result = unsafe {
                std::mem::transmute::<*mut c_void, unsafe extern "C" fn(usize, c_int) -> CUresult>(
                    pointer,
                )(state.stream, arg(0) as c_int)
            };
            println!("{op} result={result}");
        }
        "sync" => {
            let stream = state.stream as *mut c_void;
            let result = call!(api, "cuStreamSynchronize", fn(*mut c_void), stream);
            println!("{op} result={result}");
        }
        "capture" => {
            let stream = state.stream as *mut c_void;
            let result = if arg(0) != 0 {
                call!(
                    api,
                    "cuStreamBeginCapture_v2",
                    fn(*mut c_void, c_int),
                    stream,
                    0
                )
            } else {
                let mut graph: *mut c_void = std::ptr::null_mut();
                call!(
                    api,
                    "cuStreamEndCapture",
                    fn(*mut c_void, *mut *mut c_void),
                    stream,
                    &mut graph
                )
            };
            println!("{op} result={result}");
        }
        "asyncalloc" | "poolalloc" => {
            let mut pointer = 0_u64;
            let stream = state.stream as *mut c_void;
            let result = if name == "asyncalloc" {
                call!(
                    api,
                    "cuMemAllocAsync",
                    fn(*mut u64, usize, *mut c_void),
                    &mut pointer,
                    arg(0) as usize,
                    stream
                )
            } else {
                // The mock takes any non-null pool as the device's default pool.
                let pool = 0x9001 as *mut c_void;
                call!(
                    api,
                    "cuMemAllocFromPoolAsync",
                    fn(*mut u64, usize, *mut c_void, *mut c_void),
                    &mut pointer,
                    arg(0) as usize,
                    pool,
                    stream
                )
            };
            if result == 0 {
                state.async_pointers.push(pointer);
            }
            println!("{op} result={result} ptr={pointer:#x}");
        }
        "asyncfreeall" => {
            let stream = state.stream as *mut c_void;
            let mut results = Vec::new();
            // Pointers whose free failed stay held, to be freed again later.
            state.async_pointers.retain(|&pointer| {
                let result = call!(api, "cuMemFreeAsync", fn(u64, *mut c_void), pointer, stream);
                results.push(result.to_string());
                result != 0
            });
            println!("{op} results={}", results.join(","));
        }
        "prefetch" | "prefetch2" | "advise" | "advise2" => {
            // On the last pointer `alloc`/`managed` made, whole: prefetch to the current device
            // (`prefetch` is the CUDA 8 signature, `prefetch2` the 12.2 one with a location;
            // through procaddr, ask for `prefetch` below 12020 and `prefetch2` from it), or
            // advise it to prefer the current device (CU_MEM_ADVISE_SET_PREFERRED_LOCATION).
            let pointer = state.pointers.last().copied().unwrap_or(0);
            let bytes = arg(0) as usize;
            let location = MemLocation {
                location_type: 1,
                id: state.device,
            };
            let stream = std::ptr::null_mut::<c_void>();
            let result = match name {
                "prefetch" => call!(
                    api,
                    "cuMemPrefetchAsync",
                    fn(u64, usize, c_int, *mut c_void),
                    pointer,
                    bytes,
                    state.device,
                    stream
                ),
                "prefetch2" => call!(
                    api,
                    "cuMemPrefetchAsync_v2",
                    fn(u64, usize, MemLocation, c_uint, *mut c_void),
                    pointer,
                    bytes,
                    location,
                    0,
                    stream
                ),
                "advise" => call!(
                    api,
                    "cuMemAdvise",
                    fn(u64, usize, c_int, c_int),
                    pointer,
                    bytes,
                    3,
                    state.device
                ),
                _ => call!(
                    api,
                    "cuMemAdvise_v2",
                    fn(u64, usize, c_int, MemLocation),
                    pointer,
                    bytes,
                    3,
                    location
                ),
            };
            println!("{op} result={result}");
        }
        "vmm" | "vmmhost" => {
            // vmm:BYTES[:HANDLE_TYPES] (1: POSIX file descriptor, as PyTorch asks for).
            let prop = AllocationProp {
                allocation_type: 1,
                requested_handle_types: arg(1) as c_int,
                location_type: if name == "vmm" { 1 } else { 2 },
                location_id: state.device,
                win32_metadata: std::ptr::null_mut(),
                alloc_flags: [0; 8],
            };
            let mut handle = 0_u64;
            let result = call!(
                api,
                "cuMemCreate",
                fn(*mut u64, usize, *const AllocationProp, u64),
                &mut handle,
                arg(0) as usize,
                &prop,
                0
            );
            if result == 0 {
                state.handles.push(handle);
            }
            println!("{op} result={result}");
        }
        "release" => {
            let results: Vec<String> = std::mem::take(&mut state.handles)
                .into_iter()
                .map(|handle| call!(api, "cuMemRelease", fn(u64), handle).to_string())
                .collect();
            println!("{op} results={}", results.join(","));
        }
        "freeall" => {
            let results: Vec<String> = std::mem::take(&mut state.pointers)
                .into_iter()
                .map(|pointer| free(&api, pointer).to_string())
                .collect();
            println!("{op} results={}", results.join(","));
        }
        "freenull" => println!("{op} result={}", free(&api, 0)),
        "freeforeign" => {
            // A pointer the interposer never handed out: the driver's own answer must come back.
            println!("{op} result={}", free(&api, 0xdead_0000));
        }
        "fill" => {
            let chunk = arg(0) as usize;
            let mut bytes = 0_u64;
            let last = loop {
                let (result, pointer) = alloc(&api, chunk);
                if result != 0 {
                    break result;
                }
                state.pointers.push(pointer);
                bytes += chunk as u64;
            };
            println!("{op} result={last} bytes={bytes}");
        }
        "threads" => {
            let (threads, chunk) = (arg(0) as usize, arg(1) as usize);
            let barrier = Arc::new(Barrier::new(threads));
            let device = arg(2) as c_int;
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let barrier = Arc::clone(&barrier);
                    std::thread::spawn(move || {
                        set_context(&api, device);
                        barrier.wait();
                        let mut held = Vec::new();
                        loop {
                            let (result, pointer) = alloc(&api, chunk);
                            if result != 0 {
                                return (held, result);
                            }
                            held.push(pointer);
                        }
                    })
                })
                .collect();
            let mut held = Vec::new();
            let mut errors = Vec::new();
            for worker in workers {
                let (pointers, error) = worker.join().expect("allocating thread panicked");
                held.extend(pointers);
                errors.push(error);
            }
            errors.sort_unstable();
            errors.dedup();
            let bytes = held.len() as u64 * chunk as u64;
            let peak = mock_counter(&api, "tfMockDevicePeakBytes", state.device);
            println!("{op} bytes={bytes} mock_peak={peak} errors={errors:?}");
            state.pointers.extend(held);
        }
        "graph" | "capturegraph" | "nestedgraph" | "updategraph" => {
            graph_op(state, op, name, &args)
        }
        "launch" | "launchex" | "coop" => {
            let (count, grid, block) = (arg(0), arg(1) as c_uint, arg(2) as c_uint);
            let mut last = 0;
            for _ in 0..count {
                last = match name {
                    "launch" => call!(
                        api,
                        "cuLaunchKernel",
                        fn(
                            *mut c_void,
                            c_uint,
                            c_uint,
                            c_uint,
                            c_uint,
                            c_uint,
                            c_uint,
                            c_uint,
                            *mut c_void,
                            *mut *mut c_void,
                            *mut *mut c_void,
                        ),
                        function,
                        grid,
                        1,
                        1,
                        block,
                        1,
                        1,
                        0,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut()
                    ),
                    "coop" => call!(
                        api,
                        "cuLaunchCooperativeKernel",
                        fn(
                            *mut c_void,
                            c_uint,
                            c_uint,
                            c_uint,
                            c_uint,
                            c_uint,
                            c_uint,
                            c_uint,
                            *mut c_void,
                            *mut *mut c_void,
                        ),
                        function,
                        grid,
                        1,
                        1,
                        block,
                        1,
                        1,
                        0,
                        std::ptr::null_mut(),
                        std::ptr::null_mut()
                    ),
                    "launchex" => {
                        let config = LaunchConfig {
                            grid: [grid, 1, 1],
                            block: [block, 1, 1],
                            shared_bytes: 0,
                            stream: std::ptr::null_mut(),
                            attributes: std::ptr::null_mut(),
                            attribute_count: 0,
                        };
                        call!(
                            api,
                            "cuLaunchKernelEx",
                            fn(
                                *const LaunchConfig,
                                *mut c_void,
                                *mut *mut c_void,
                                *mut *mut c_void,
                            ),
                            &config,
                            function,
                            std::ptr::null_mut(),
                            std::ptr::null_mut()
                        )
                    }
                    _ => unreachable!("the arm matches only launch, launchex and coop"),
                };
                if last != 0 {
                    break;
                }
            }
            println!("{op} result={last}");
        }
        "mock" => {
            let device = state.device;
            println!(
                "{op} used={} peak={} host={} launches={} ptsz_launches={} busy_ns={}",
                mock_counter(&api, "tfMockDeviceUsedBytes", device),
                mock_counter(&api, "tfMockDevicePeakBytes", device),
                mock_counter(&api, "tfMockHostMappedBytes", 0),
                mock_counter(&api, "tfMockLaunches", 0),
                mock_counter(&api, "tfMockLaunches", 1),
                mock_counter(&api, "tfMockGpuBusyNs", device),
            );
        }
        "nvml" => nvml(op),
        "hold" => {
            println!("{op} holding");
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        }
        _ => panic!("unknown probe op {op:?}"),
    }
}

/// `nvml`: what `nvidia-smi` would see: device count and memory info of each device, found by
/// `dlopen("libnvidia-ml.so.1")` + `dlsym`.
fn nvml(op: &str) {
    // SAFETY: dlopen with a constant NUL-terminated name.
    let handle = unsafe { libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW) };
    assert!(!handle.is_null(), "dlopen(libnvidia-ml.so.1) failed");
    let get = |name: &str| {
        let pointer = dlsym(handle, name);
        assert!(!pointer.is_null(), "{name} not found");
        pointer
    };
    // SAFETY: each pointer is the NVML function of that name with the signature given.
    unsafe {
        let init = std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_uint>(get(
            "nvmlInit_v2",
        ));
        let count_fn = std::mem::transmute::<
            *mut c_void,
            unsafe extern "C" fn(*mut c_uint) -> c_uint,
        >(get("nvmlDeviceGetCount_v2"));
        let by_index = std::mem::transmute::<
            *mut c_void,
            unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_uint,
        >(get("nvmlDeviceGetHandleByIndex_v2"));
        let memory = std::mem::transmute::<
            *mut c_void,
            unsafe extern "C" fn(*mut c_void, *mut [u64; 3]) -> c_uint,
        >(get("nvmlDeviceGetMemoryInfo"));
        let result = init();
        let mut count: c_uint = 0;
        let count_result = count_fn(&mut count);
        let mut line = format!("{op} init={result} count_result={count_result} count={count}");
        for index in 0..count {
            let mut device = std::ptr::null_mut();
            let found = by_index(index, &mut device);
            let mut info = [0_u64; 3];
            let result = if found == 0 {
                memory(device, &mut info)
            } else {
                found
            };
            line.push_str(&format!(
                " mem{index}_result={result} total{index}={} free{index}={} used{index}={}",
                info[0], info[1], info[2]
            ));
        }
        println!("{line}");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let via = args.next().expect("usage: tf-cuda-probe VIA OP...");
    let via = match via.as_str() {
        "exports" => Via::Exports,
        "dlsym" => Via::Dlsym,
        other => {
            let parts: Vec<&str> = other.split(':').collect();
            match parts.as_slice() {
                [kind @ ("procaddr" | "procaddr1"), version, flags] => Via::ProcAddress {
                    version: version.parse().expect("cuda version"),
                    flags: flags.parse().expect("flags"),
                    v1: *kind == "procaddr1",
                },
                _ => panic!("unknown VIA {other:?}"),
            }
        }
    };
    let mut state = State {
        api: Api::open(via),
        pointers: Vec::new(),
        async_pointers: Vec::new(),
        handles: Vec::new(),
        device: 0,
        stream: 0,
    };
    for op in args {
        run_op(&mut state, &op);
    }
}
