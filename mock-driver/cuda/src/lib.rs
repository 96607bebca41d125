//! A mock `libcuda.so.1` for tests: the CUDA driver calls the interposer hooks, implemented on
//! host memory with the driver's error codes and pointer semantics.
//!
//! Devices, UUIDs and memory size come from the `TF_MOCK_*` variables (see
//! `tensor_fusion_mock_gpu_sim::MockGpus`). Device memory is host memory: a device pointer is
//! a real host address, freeing an unknown pointer is `CUDA_ERROR_INVALID_VALUE`, allocating past
//! the device's memory is `CUDA_ERROR_OUT_OF_MEMORY`. Kernels do not run; each launch advances
//! its device's simulated clock by the kernel's simulated time (grid x block threads). Calls
//! other than `cuInit`/`cuDriverGetVersion`/`cuGetProcAddress*` need `cuInit` first, and memory
//! and launch calls need a current context, as with the real driver. `tfMock*` functions expose
//! what the tests check: bytes in use and their peak, simulated busy time, launch counts.
//!
//! Managed memory: `cuMemAllocManaged` blocks are marked managed; `cuMemPrefetchAsync(_v2)` and
//! `cuMemAdvise(_v2)` accept ranges inside one managed block and refuse everything else with
//! `CUDA_ERROR_INVALID_VALUE`, as the driver does on systems without pageable memory access.
//! `cuMemCreate` takes device, host and host-NUMA locations with the driver's rules (a host
//! location is not shareable, so it takes no handle types; host NUMA needs the node the GPUs are
//! near, `TF_MOCK_HOST_NUMA_ID`, default 0, `-1`: the machine has no NUMA nodes), which
//! `cuDeviceGetAttribute(CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID)` reports.
//!
//! Streams: the special handles (NULL, `CU_STREAM_LEGACY`, `CU_STREAM_PER_THREAD`) stand for the
//! current context; created streams remember their context. Work on a stream finishes at once
//! unless a test holds the stream (`tfMockStreamHold`), standing in for a long kernel: then host
//! functions (`cuLaunchHostFunc`) and stream-ordered frees (`cuMemFreeAsync`) wait in order until
//! the stream is released or synchronised. A capturing stream records kernel launches into its
//! capture graph instead of running them (see `graph`) and holds host functions without running
//! them.

#![allow(non_snake_case, reason = "exported names are the CUDA driver API's")]
#![allow(
    clippy::missing_safety_doc,
    reason = "each export has the pointer contract of the CUDA driver function it mocks"
)]

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tensor_fusion_mock_gpu_sim::{MockGpus, kernel_duration_ns, kernel_threads, uuid_bytes};

pub mod graph;

type CUresult = c_uint;
type CUdevice = c_int;
type CUdeviceptr = u64;

const CUDA_SUCCESS: CUresult = 0;
const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
const CUDA_ERROR_ILLEGAL_STATE: CUresult = 401;
const CUDA_ERROR_NOT_FOUND: CUresult = 500;
const CUDA_ERROR_NOT_READY: CUresult = 600;
const CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: CUresult = 900;
const CUDA_ERROR_UNKNOWN: CUresult = 999;

const SYMBOL_FOUND: c_int = 0;
const SYMBOL_NOT_FOUND: c_int = 1;
const VERSION_NOT_SUFFICIENT: c_int = 2;

const CU_MEMHOSTALLOC_DEVICEMAP: c_uint = 0x02;
const CU_MEM_LOCATION_TYPE_DEVICE: c_int = 1;
const CU_MEM_LOCATION_TYPE_HOST: c_int = 2;
const CU_MEM_LOCATION_TYPE_HOST_NUMA: c_int = 3;
/// `CU_DEVICE_CPU`: the host, as a prefetch or advice target.
const CU_DEVICE_CPU: CUdevice = -1;
const CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID: c_int = 134;
/// `CU_MEM_ADVISE_SET_READ_MOSTLY` .. `CU_MEM_ADVISE_UNSET_ACCESSED_BY`.
const MEM_ADVICE: std::ops::RangeInclusive<c_int> = 1..=6;
const CU_MEM_ALLOCATION_TYPE_PINNED: c_int = 1;
const PER_THREAD_STREAM_FLAG: u64 = 1 << 1;
/// `CU_STREAM_PER_THREAD`, the largest special stream handle (`CU_STREAM_LEGACY` is 1).
const CU_STREAM_PER_THREAD: usize = 0x2;
/// `CU_STREAM_CAPTURE_STATUS_NONE` / `_ACTIVE`.
const CAPTURE_STATUS_NONE: c_int = 0;
const CAPTURE_STATUS_ACTIVE: c_int = 1;

/// Alignment of every mock allocation, like the driver's 256-byte minimum.
const ALIGN: usize = 256;
/// Row alignment of `cuMemAllocPitch_v2`.
const PITCH_ALIGN: usize = 512;

/// Runs an export body, turning a panic into `CUDA_ERROR_UNKNOWN`: nothing unwinds into C.
fn guarded(body: impl FnOnce() -> CUresult) -> CUresult {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(CUDA_ERROR_UNKNOWN)
}

#[derive(Debug)]
struct Context {
    device: CUdevice,
}

struct Block {
    device: Option<CUdevice>,
    bytes: usize,
    managed: bool,
}

/// `CUhostFn`.
type HostFn = unsafe extern "C" fn(*mut c_void);

/// Work waiting on a held stream, done in order when the stream moves on.
enum Queued {
    HostFunc(HostFn, usize),
    Free(u64),
}

#[derive(Default)]
struct StreamState {
    held: bool,
    capturing: bool,
    /// The graph a capture records into, from `cuStreamBeginCapture_v2` to `cuStreamEndCapture`.
    capture_graph: Option<&'static graph::Graph>,
    queued: Vec<Queued>,
}

/// A created stream (leaked, so a stale handle never points at freed memory).
struct Stream {
    context: usize,
    device: CUdevice,
    state: Mutex<StreamState>,
}

/// What a stream handle names.
enum StreamRef {
    /// NULL, `CU_STREAM_LEGACY` or `CU_STREAM_PER_THREAD`: the current context's stream.
    Special {
        context: usize,
        device: CUdevice,
    },
    Created(&'static Stream),
}

impl StreamRef {
    fn device(&self) -> CUdevice {
        match self {
            StreamRef::Special { device, .. } => *device,
            StreamRef::Created(stream) => stream.device,
        }
    }
}

struct Mock {
    gpus: MockGpus,
    streams: Mutex<HashSet<usize>>,
    initialised: AtomicBool,
    primary: Vec<usize>,
    blocks: Mutex<HashMap<u64, Block>>,
    handles: Mutex<HashMap<u64, u64>>,
    used: Vec<AtomicU64>,
    peak: Vec<AtomicU64>,
    busy_ns: Vec<AtomicU64>,
    host_mapped: AtomicU64,
    launches: AtomicU64,
    per_thread_launches: AtomicU64,
    next_handle: AtomicU64,
}

fn mock() -> &'static Mock {
    static MOCK: OnceLock<Mock> = OnceLock::new();
    MOCK.get_or_init(|| {
        let gpus = MockGpus::from_env();
        let count = gpus.gpu_count as usize;
        let counters = || (0..count).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Mock {
            gpus,
            streams: Mutex::new(HashSet::new()),
            initialised: AtomicBool::new(false),
            primary: (0..count)
                .map(|device| {
                    Box::into_raw(Box::new(Context {
                        device: device as CUdevice,
                    })) as usize
                })
                .collect(),
            blocks: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            used: counters(),
            peak: counters(),
            busy_ns: counters(),
            host_mapped: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            per_thread_launches: AtomicU64::new(0),
            next_handle: AtomicU64::new(1),
        }
    })
}

thread_local! {
    /// This thread's context stack; the last entry is the current context.
    static CONTEXTS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

fn current_context() -> usize {
    CONTEXTS.with(|stack| stack.borrow().last().copied().unwrap_or(0))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Mock {
    fn ready(&self) -> Result<(), CUresult> {
        if self.initialised.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(CUDA_ERROR_NOT_INITIALIZED)
        }
    }

    fn valid_device(&self, device: CUdevice) -> Result<usize, CUresult> {
        self.ready()?;
        usize::try_from(device)
            .ok()
            .filter(|&index| index < self.gpus.gpu_count as usize)
            .ok_or(CUDA_ERROR_INVALID_DEVICE)
    }

    fn current_device(&self) -> Result<CUdevice, CUresult> {
        self.ready()?;
        let context = current_context();
        if context == 0 {
            return Err(CUDA_ERROR_INVALID_CONTEXT);
        }
        Ok(self.context_device(context))
    }

    /// Whether `context` is one this mock handed out.
    fn valid_context(&self, context: usize) -> Result<usize, CUresult> {
        if self.primary.contains(&context) {
            Ok(context)
        } else {
            Err(CUDA_ERROR_INVALID_CONTEXT)
        }
    }

    fn context_device(&self, context: usize) -> CUdevice {
        // SAFETY: only contexts in `primary` (leaked `Context` boxes) are ever made current.
        unsafe { &*(context as *const Context) }.device
    }

    /// What `handle` names: a special stream of the current context or a live created stream.
    fn stream(&self, handle: *mut c_void) -> Result<StreamRef, CUresult> {
        self.ready()?;
        if (handle as usize) <= CU_STREAM_PER_THREAD {
            let context = current_context();
            if context == 0 {
                return Err(CUDA_ERROR_INVALID_CONTEXT);
            }
            return Ok(StreamRef::Special {
                context,
                device: self.context_device(context),
            });
        }
        if !lock(&self.streams).contains(&(handle as usize)) {
            return Err(CUDA_ERROR_INVALID_HANDLE);
        }
        // SAFETY: live created streams are leaked `Stream` boxes made by `cuStreamCreate`.
        Ok(StreamRef::Created(unsafe { &*(handle as *const Stream) }))
    }

    fn allocate(&self, device: Option<CUdevice>, bytes: usize) -> Result<u64, CUresult> {
        if bytes == 0 {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        if let Some(device) = device {
            let index = self.valid_device(device)?;
            let limit = self.gpus.vram_bytes;
            self.used[index]
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    used.checked_add(bytes as u64)
                        .filter(|&total| total <= limit)
                })
                .map_err(|_| CUDA_ERROR_OUT_OF_MEMORY)?;
            let now = self.used[index].load(Ordering::Acquire);
            self.peak[index].fetch_max(now, Ordering::AcqRel);
        }
        let layout = std::alloc::Layout::from_size_align(bytes, ALIGN)
            .map_err(|_| CUDA_ERROR_INVALID_VALUE)?;
        // SAFETY: the layout has a non-zero size.
        let pointer = unsafe { std::alloc::alloc(layout) };
        if pointer.is_null() {
            if let Some(index) = device.and_then(|device| usize::try_from(device).ok()) {
                self.used[index].fetch_sub(bytes as u64, Ordering::AcqRel);
            }
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        }
        let address = pointer as u64;
        let block = Block {
            device,
            bytes,
            managed: false,
        };
        lock(&self.blocks).insert(address, block);
        Ok(address)
    }

    fn release(&self, address: u64, want_device: bool) -> Result<(), CUresult> {
        self.ready()?;
        let mut blocks = lock(&self.blocks);
        match blocks.get(&address) {
            Some(block) if block.device.is_some() == want_device => {}
            _ => return Err(CUDA_ERROR_INVALID_VALUE),
        }
        let block = blocks.remove(&address).ok_or(CUDA_ERROR_INVALID_VALUE)?;
        drop(blocks);
        if let Some(index) = block.device.and_then(|device| usize::try_from(device).ok()) {
            self.used[index].fetch_sub(block.bytes as u64, Ordering::AcqRel);
        } else {
            self.host_mapped
                .fetch_sub(block.bytes as u64, Ordering::AcqRel);
        }
        let layout = std::alloc::Layout::from_size_align(block.bytes, ALIGN)
            .map_err(|_| CUDA_ERROR_UNKNOWN)?;
        // SAFETY: the address came from `alloc` with this layout and was just removed.
        unsafe { std::alloc::dealloc(address as *mut u8, layout) };
        Ok(())
    }

    /// Runs a kernel on the simulated clock, or records it when `stream` is being captured.
    fn launch(
        &self,
        function: *mut c_void,
        grid: [c_uint; 3],
        block: [c_uint; 3],
        stream: *mut c_void,
        per_thread: bool,
    ) -> Result<(), CUresult> {
        let device = self.current_device()?;
        if function.is_null() {
            return Err(CUDA_ERROR_INVALID_HANDLE);
        }
        if grid.contains(&0) || block.contains(&0) {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        if let StreamRef::Created(created) = self.stream(stream)?
            && let Some(capture) = lock(&created.state).capture_graph
        {
            graph::capture_kernel(capture, function as usize, grid, block);
            return Ok(());
        }
        let duration = kernel_duration_ns(kernel_threads(grid, block), self.gpus.ns_per_kilothread);
        self.busy_ns[device as usize].fetch_add(duration, Ordering::AcqRel);
        self.launches.fetch_add(1, Ordering::AcqRel);
        if per_thread {
            self.per_thread_launches.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }
}

fn status(result: Result<(), CUresult>) -> CUresult {
    result.err().unwrap_or(CUDA_SUCCESS)
}

/// The stream a `_ptsz` variant means: NULL is the per-thread default stream there.
fn per_thread_stream(stream: *mut c_void) -> *mut c_void {
    if stream.is_null() {
        CU_STREAM_PER_THREAD as *mut c_void
    } else {
        stream
    }
}

fn write<T>(out: *mut T, value: T) -> Result<(), CUresult> {
    if out.is_null() {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: the caller passed a non-null out-pointer for a T, as the API requires.
    unsafe { out.write(value) };
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    guarded(|| {
        if flags != 0 {
            return CUDA_ERROR_INVALID_VALUE;
        }
        mock().initialised.store(true, Ordering::Release);
        CUDA_SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    guarded(|| status(write(version, 12080)))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    guarded(|| {
        status(
            mock()
                .ready()
                .and_then(|()| write(count, mock().gpus.gpu_count as c_int)),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    guarded(|| {
        status(
            mock()
                .valid_device(ordinal)
                .and_then(|_| write(device, ordinal)),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], device: CUdevice) -> CUresult {
    guarded(|| {
        status(
            mock()
                .valid_device(device)
                .and_then(|index| write(uuid, uuid_bytes(index as u32))),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], device: CUdevice) -> CUresult {
    // SAFETY: the same contract as this export.
    unsafe { cuDeviceGetUuid(uuid, device) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(
    name: *mut c_char,
    length: c_int,
    device: CUdevice,
) -> CUresult {
    guarded(|| {
        status(mock().valid_device(device).and_then(|_| {
            let text = b"TensorFusion Mock GPU\0";
            let length = usize::try_from(length).map_err(|_| CUDA_ERROR_INVALID_VALUE)?;
            if name.is_null() || length == 0 {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let copied = text.len().min(length);
            // SAFETY: `name` holds `length` bytes; at most that many are written, NUL last.
            unsafe {
                std::ptr::copy_nonoverlapping(text.as_ptr().cast(), name, copied);
                *name.add(copied - 1) = 0;
            }
            Ok(())
        }))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetByPCIBusId(
    device: *mut CUdevice,
    bus_id: *const c_char,
) -> CUresult {
    guarded(|| {
        status(mock().ready().and_then(|()| {
            if bus_id.is_null() {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            // SAFETY: a non-null bus id is a NUL-terminated string per the API.
            let text = unsafe { CStr::from_ptr(bus_id) }.to_string_lossy();
            let index = (0..mock().gpus.gpu_count)
                .find(|index| text.eq_ignore_ascii_case(&mock_bus_id(*index)))
                .ok_or(CUDA_ERROR_INVALID_DEVICE)?;
            write(device, index as CUdevice)
        }))
    })
}

/// The PCI bus id of mock device `index`: `0000:0N:00.0` with N = index + 1 in hex.
fn mock_bus_id(index: u32) -> String {
    format!("0000:{:02x}:00.0", index + 1)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: CUdevice) -> CUresult {
    guarded(|| {
        status(
            mock()
                .valid_device(device)
                .and_then(|_| write(bytes, mock().gpus.vram_bytes as usize)),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(
    context: *mut *mut c_void,
    device: CUdevice,
) -> CUresult {
    guarded(|| {
        status(
            mock()
                .valid_device(device)
                .and_then(|index| write(context, mock().primary[index] as *mut c_void)),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(device: CUdevice) -> CUresult {
    guarded(|| status(mock().valid_device(device).map(|_| ())))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCurrent(context: *mut c_void) -> CUresult {
    guarded(|| {
        status(mock().ready().and_then(|()| {
            if context.is_null() {
                CONTEXTS.with(|stack| stack.borrow_mut().pop());
                return Ok(());
            }
            let context = mock().valid_context(context as usize)?;
            CONTEXTS.with(|stack| {
                let mut stack = stack.borrow_mut();
                stack.pop();
                stack.push(context);
            });
            Ok(())
        }))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(context: *mut *mut c_void) -> CUresult {
    guarded(|| {
        status(
            mock()
                .ready()
                .and_then(|()| write(context, current_context() as *mut c_void)),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(context: *mut c_void) -> CUresult {
    guarded(|| {
        status(mock().ready().and_then(|()| {
            let context = mock().valid_context(context as usize)?;
            CONTEXTS.with(|stack| stack.borrow_mut().push(context));
            Ok(())
        }))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(context: *mut *mut c_void) -> CUresult {
    guarded(|| {
        status(mock().ready().and_then(|()| {
            let popped = CONTEXTS
                .with(|stack| stack.borrow_mut().pop())
                .ok_or(CUDA_ERROR_INVALID_CONTEXT)?;
            if !context.is_null() {
                write(context, popped as *mut c_void)?;
            }
            Ok(())
        }))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    guarded(|| {
        status(
            mock()
                .current_device()
                .and_then(|current| write(device, current)),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    guarded(|| {
        status(mock().current_device().and_then(|device| {
            if free.is_null() || total.is_null() {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let total_bytes = mock().gpus.vram_bytes;
            let used = mock().used[device as usize].load(Ordering::Acquire);
            write(free, total_bytes.saturating_sub(used) as usize)?;
            write(total, total_bytes as usize)
        }))
    })
}

fn device_alloc(out: *mut CUdeviceptr, bytes: usize) -> Result<(), CUresult> {
    let device = mock().current_device()?;
    if out.is_null() {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    let address = mock().allocate(Some(device), bytes)?;
    write(out, address)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(out: *mut CUdeviceptr, bytes: usize) -> CUresult {
    guarded(|| status(device_alloc(out, bytes)))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    out: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_bytes: c_uint,
) -> CUresult {
    guarded(|| {
        if ![4, 8, 16].contains(&element_bytes) || width == 0 || height == 0 || pitch.is_null() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let row = width.div_ceil(PITCH_ALIGN) * PITCH_ALIGN;
        status(device_alloc(out, row * height).and_then(|()| write(pitch, row)))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    out: *mut CUdeviceptr,
    bytes: usize,
    flags: c_uint,
) -> CUresult {
    guarded(|| {
        if flags != 1 && flags != 2 {
            return CUDA_ERROR_INVALID_VALUE;
        }
        status(device_alloc(out, bytes).map(|()| {
            // SAFETY: device_alloc succeeded, so `out` is non-null and holds the new pointer.
            let address = unsafe { out.read() };
            if let Some(block) = lock(&mock().blocks).get_mut(&address) {
                block.managed = true;
            }
        }))
    })
}

/// The NUMA node the mock GPUs are near (`TF_MOCK_HOST_NUMA_ID`), `-1` if none.
fn host_numa_id() -> c_int {
    std::env::var("TF_MOCK_HOST_NUMA_ID")
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether `[address, address + bytes)` lies inside one managed block.
fn managed_range(address: CUdeviceptr, bytes: usize) -> Result<(), CUresult> {
    mock().ready()?;
    let end = address
        .checked_add(bytes as u64)
        .filter(|_| bytes > 0)
        .ok_or(CUDA_ERROR_INVALID_VALUE)?;
    let inside = lock(&mock().blocks).iter().any(|(&start, block)| {
        block.managed && start <= address && end <= start + block.bytes as u64
    });
    if inside {
        Ok(())
    } else {
        Err(CUDA_ERROR_INVALID_VALUE)
    }
}

/// A prefetch or advice target given as a device: a GPU or `CU_DEVICE_CPU`.
fn target_device(device: CUdevice) -> Result<(), CUresult> {
    if device == CU_DEVICE_CPU {
        return mock().ready();
    }
    mock().valid_device(device).map(|_| ())
}

/// The same, given as a `CUmemLocation`.
fn target_location(location: MemLocation) -> Result<(), CUresult> {
    match location.location_type {
        CU_MEM_LOCATION_TYPE_DEVICE => target_device(location.id),
        CU_MEM_LOCATION_TYPE_HOST => mock().ready(),
        CU_MEM_LOCATION_TYPE_HOST_NUMA if location.id == host_numa_id() && location.id >= 0 => {
            mock().ready()
        }
        _ => Err(CUDA_ERROR_INVALID_VALUE),
    }
}

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemLocation {
    pub location_type: c_int,
    pub id: c_int,
}

fn prefetch(
    address: CUdeviceptr,
    bytes: usize,
    target: Result<(), CUresult>,
    stream: *mut c_void,
) -> CUresult {
    guarded(|| {
        status((|| {
            mock().stream(stream)?;
            target?;
            managed_range(address, bytes)
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPrefetchAsync(
    address: CUdeviceptr,
    bytes: usize,
    device: CUdevice,
    stream: *mut c_void,
) -> CUresult {
    prefetch(address, bytes, target_device(device), stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPrefetchAsync_ptsz(
    address: CUdeviceptr,
    bytes: usize,
    device: CUdevice,
    stream: *mut c_void,
) -> CUresult {
    prefetch(address, bytes, target_device(device), stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPrefetchAsync_v2(
    address: CUdeviceptr,
    bytes: usize,
    location: MemLocation,
    flags: c_uint,
    stream: *mut c_void,
) -> CUresult {
    let target = if flags == 0 {
        target_location(location)
    } else {
        Err(CUDA_ERROR_INVALID_VALUE)
    };
    prefetch(address, bytes, target, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPrefetchAsync_v2_ptsz(
    address: CUdeviceptr,
    bytes: usize,
    location: MemLocation,
    flags: c_uint,
    stream: *mut c_void,
) -> CUresult {
    // SAFETY: the same contract as this export.
    unsafe { cuMemPrefetchAsync_v2(address, bytes, location, flags, stream) }
}

fn advise(
    address: CUdeviceptr,
    bytes: usize,
    advice: c_int,
    target: Result<(), CUresult>,
) -> CUresult {
    guarded(|| {
        status((|| {
            mock().ready()?;
            if !MEM_ADVICE.contains(&advice) {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            target?;
            managed_range(address, bytes)
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAdvise(
    address: CUdeviceptr,
    bytes: usize,
    advice: c_int,
    device: CUdevice,
) -> CUresult {
    advise(address, bytes, advice, target_device(device))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAdvise_v2(
    address: CUdeviceptr,
    bytes: usize,
    advice: c_int,
    location: MemLocation,
) -> CUresult {
    advise(address, bytes, advice, target_location(location))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attribute: c_int,
    device: CUdevice,
) -> CUresult {
    guarded(|| {
        status((|| {
            mock().valid_device(device)?;
            match attribute {
                CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID => write(value, host_numa_id()),
                // The mock implements only the attributes the interposer reads.
                _ => Err(CUDA_ERROR_INVALID_VALUE),
            }
        })())
    })
}

/// Allocates on the device of `stream` (its context's, not the caller's current one).
fn stream_alloc(out: *mut CUdeviceptr, bytes: usize, stream: *mut c_void) -> Result<(), CUresult> {
    let device = mock().stream(stream)?.device();
    if out.is_null() {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    let address = mock().allocate(Some(device), bytes)?;
    write(out, address)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    out: *mut CUdeviceptr,
    bytes: usize,
    stream: *mut c_void,
) -> CUresult {
    guarded(|| status(stream_alloc(out, bytes, stream)))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    out: *mut CUdeviceptr,
    bytes: usize,
    stream: *mut c_void,
) -> CUresult {
    // SAFETY: the same contract as this export.
    unsafe { cuMemAllocAsync(out, bytes, stream) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    out: *mut CUdeviceptr,
    bytes: usize,
    pool: *mut c_void,
    stream: *mut c_void,
) -> CUresult {
    guarded(|| {
        if pool.is_null() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        status(stream_alloc(out, bytes, stream))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    out: *mut CUdeviceptr,
    bytes: usize,
    pool: *mut c_void,
    stream: *mut c_void,
) -> CUresult {
    // SAFETY: the same contract as this export.
    unsafe { cuMemAllocFromPoolAsync(out, bytes, pool, stream) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(address: CUdeviceptr) -> CUresult {
    guarded(|| {
        if address == 0 {
            // Freeing NULL is a no-op (programs call cuMemFree(0) to make sure a context exists).
            return status(mock().current_device().map(|_| ()));
        }
        status(mock().release(address, true))
    })
}

/// Runs work a held stream had waiting, in order, outside every mock lock.
fn run_queued(queued: Vec<Queued>) {
    for work in queued {
        match work {
            // SAFETY: the caller of cuLaunchHostFunc gave a function and its argument.
            Queued::HostFunc(function, data) => unsafe { function(data as *mut c_void) },
            Queued::Free(address) => {
                let _ = mock().release(address, true);
            }
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(address: CUdeviceptr, stream: *mut c_void) -> CUresult {
    guarded(|| {
        status((|| {
            let stream = mock().stream(stream)?;
            let on_device = lock(&mock().blocks)
                .get(&address)
                .is_some_and(|block| block.device.is_some());
            if !on_device {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            if let StreamRef::Created(stream) = stream {
                let mut state = lock(&stream.state);
                if state.held {
                    state.queued.push(Queued::Free(address));
                    return Ok(());
                }
            }
            mock().release(address, true)
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(
    address: CUdeviceptr,
    stream: *mut c_void,
) -> CUresult {
    // SAFETY: the same contract as this export.
    unsafe { cuMemFreeAsync(address, stream) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut *mut c_void, _flags: c_uint) -> CUresult {
    guarded(|| {
        status((|| {
            let device = mock().current_device()?;
            if stream.is_null() {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let created = Box::into_raw(Box::new(Stream {
                context: current_context(),
                device,
                state: Mutex::new(StreamState::default()),
            }));
            lock(&mock().streams).insert(created as usize);
            write(stream, created.cast())
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: *mut c_void) -> CUresult {
    guarded(|| {
        status((|| {
            let StreamRef::Created(created) = mock().stream(stream)? else {
                return Err(CUDA_ERROR_INVALID_HANDLE);
            };
            // The driver lets queued work finish; the mock finishes it now.
            let queued = std::mem::take(&mut lock(&created.state).queued);
            run_queued(queued);
            lock(&mock().streams).remove(&(stream as usize));
            Ok(())
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetCtx(
    stream: *mut c_void,
    context: *mut *mut c_void,
) -> CUresult {
    guarded(|| {
        status(mock().stream(stream).and_then(|stream| {
            let owner = match stream {
                StreamRef::Special { context, .. } => context,
                StreamRef::Created(created) => created.context,
            };
            write(context, owner as *mut c_void)
        }))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize(stream: *mut c_void) -> CUresult {
    guarded(|| {
        status(mock().stream(stream).and_then(|stream| {
            let StreamRef::Created(created) = stream else {
                return Ok(());
            };
            let queued = {
                let mut state = lock(&created.state);
                if state.capturing {
                    return Err(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
                }
                state.held = false;
                std::mem::take(&mut state.queued)
            };
            run_queued(queued);
            Ok(())
        }))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamQuery(stream: *mut c_void) -> CUresult {
    guarded(|| {
        status(mock().stream(stream).and_then(|stream| match stream {
            StreamRef::Created(created) if lock(&created.state).held => Err(CUDA_ERROR_NOT_READY),
            _ => Ok(()),
        }))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchHostFunc(
    stream: *mut c_void,
    function: Option<HostFn>,
    data: *mut c_void,
) -> CUresult {
    guarded(|| {
        status((|| {
            let stream = mock().stream(stream)?;
            let function = function.ok_or(CUDA_ERROR_INVALID_VALUE)?;
            if let StreamRef::Created(created) = stream {
                let mut state = lock(&created.state);
                if state.capturing {
                    // Becomes a host node of the graph being captured; not run now.
                    return Ok(());
                }
                if state.held {
                    state.queued.push(Queued::HostFunc(function, data as usize));
                    return Ok(());
                }
            }
            // The stream has nothing pending: the driver would run it right away on its own
            // thread; the mock runs it here, holding no lock.
            // SAFETY: the caller's host function and argument.
            unsafe { function(data) };
            Ok(())
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamIsCapturing(stream: *mut c_void, capture: *mut c_int) -> CUresult {
    guarded(|| {
        status(mock().stream(stream).and_then(|stream| {
            let capturing = match stream {
                StreamRef::Special { .. } => false,
                StreamRef::Created(created) => lock(&created.state).capturing,
            };
            write(
                capture,
                if capturing {
                    CAPTURE_STATUS_ACTIVE
                } else {
                    CAPTURE_STATUS_NONE
                },
            )
        }))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(stream: *mut c_void, _mode: c_int) -> CUresult {
    guarded(|| {
        status(mock().stream(stream).and_then(|stream| match stream {
            StreamRef::Special { .. } => Err(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED),
            StreamRef::Created(created) => {
                let mut state = lock(&created.state);
                if state.capturing {
                    return Err(CUDA_ERROR_ILLEGAL_STATE);
                }
                state.capturing = true;
                state.capture_graph = Some(graph::new_graph());
                Ok(())
            }
        }))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamEndCapture(
    stream: *mut c_void,
    graph: *mut *mut c_void,
) -> CUresult {
    guarded(|| {
        status(mock().stream(stream).and_then(|stream| {
            let StreamRef::Created(created) = stream else {
                return Err(CUDA_ERROR_ILLEGAL_STATE);
            };
            let mut state = lock(&created.state);
            if !state.capturing {
                return Err(CUDA_ERROR_ILLEGAL_STATE);
            }
            state.capturing = false;
            let captured = state.capture_graph.take().ok_or(CUDA_ERROR_ILLEGAL_STATE)?;
            write(graph, captured as *const graph::Graph as *mut c_void)
        }))
    })
}

/// Test control: `hold` non-zero makes `stream` busy (as if running a long kernel), so host
/// functions and stream-ordered frees wait; zero lets it finish them, in order.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tfMockStreamHold(stream: *mut c_void, hold: c_int) -> CUresult {
    guarded(|| {
        status(mock().stream(stream).and_then(|stream| {
            let StreamRef::Created(created) = stream else {
                return Err(CUDA_ERROR_INVALID_HANDLE);
            };
            let queued = {
                let mut state = lock(&created.state);
                state.held = hold != 0;
                if state.held {
                    return Ok(());
                }
                std::mem::take(&mut state.queued)
            };
            run_queued(queued);
            Ok(())
        }))
    })
}

/// The leading fields of `CUmemAllocationProp`, which is all the mock reads.
#[repr(C)]
pub struct MemAllocationProp {
    pub allocation_type: c_int,
    pub requested_handle_types: c_int,
    pub location_type: c_int,
    pub location_id: c_int,
    pub win32_metadata: *mut c_void,
    pub alloc_flags: [u8; 8],
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    bytes: usize,
    prop: *const MemAllocationProp,
    flags: u64,
) -> CUresult {
    guarded(|| {
        status((|| {
            mock().ready()?;
            if prop.is_null() || handle.is_null() || flags != 0 {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            // SAFETY: a non-null prop points at a CUmemAllocationProp per the API.
            let prop = unsafe { &*prop };
            if prop.allocation_type != CU_MEM_ALLOCATION_TYPE_PINNED {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let device = match prop.location_type {
                CU_MEM_LOCATION_TYPE_DEVICE => Some(prop.location_id),
                // Host allocations cannot be shared between processes.
                CU_MEM_LOCATION_TYPE_HOST if prop.requested_handle_types == 0 => None,
                CU_MEM_LOCATION_TYPE_HOST_NUMA
                    if prop.location_id >= 0 && prop.location_id == host_numa_id() =>
                {
                    None
                }
                _ => return Err(CUDA_ERROR_INVALID_VALUE),
            };
            let address = mock().allocate(device, bytes)?;
            if device.is_none() {
                mock().host_mapped.fetch_add(bytes as u64, Ordering::AcqRel);
            }
            let id = mock().next_handle.fetch_add(1, Ordering::AcqRel);
            lock(&mock().handles).insert(id, address);
            write(handle, id)
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemRelease(handle: u64) -> CUresult {
    guarded(|| {
        status((|| {
            mock().ready()?;
            let address = lock(&mock().handles)
                .remove(&handle)
                .ok_or(CUDA_ERROR_INVALID_VALUE)?;
            let on_device = lock(&mock().blocks)
                .get(&address)
                .is_some_and(|block| block.device.is_some());
            mock().release(address, on_device)
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(
    out: *mut *mut c_void,
    bytes: usize,
    flags: c_uint,
) -> CUresult {
    guarded(|| {
        status((|| {
            mock().current_device()?;
            if out.is_null() || flags & !0x07 != 0 {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let address = mock().allocate(None, bytes)?;
            mock().host_mapped.fetch_add(bytes as u64, Ordering::AcqRel);
            if flags & CU_MEMHOSTALLOC_DEVICEMAP == 0 {
                // Still host memory; the mock maps every host allocation (as with UVA).
            }
            write(out, address as *mut c_void)
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostGetDevicePointer_v2(
    out: *mut CUdeviceptr,
    host: *mut c_void,
    flags: c_uint,
) -> CUresult {
    guarded(|| {
        status((|| {
            mock().current_device()?;
            if flags != 0 {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let known = lock(&mock().blocks)
                .get(&(host as u64))
                .is_some_and(|block| block.device.is_none());
            if !known {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            write(out, host as u64)
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeHost(host: *mut c_void) -> CUresult {
    guarded(|| status(mock().release(host as u64, false)))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel(
    function: *mut c_void,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    _shared_bytes: c_uint,
    stream: *mut c_void,
    _params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    guarded(|| {
        status(mock().launch(
            function,
            [grid_x, grid_y, grid_z],
            [block_x, block_y, block_z],
            stream,
            false,
        ))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel_ptsz(
    function: *mut c_void,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    _shared_bytes: c_uint,
    stream: *mut c_void,
    _params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    guarded(|| {
        status(mock().launch(
            function,
            [grid_x, grid_y, grid_z],
            [block_x, block_y, block_z],
            per_thread_stream(stream),
            true,
        ))
    })
}

/// `CUlaunchConfig`.
#[repr(C)]
pub struct LaunchConfig {
    pub grid: [c_uint; 3],
    pub block: [c_uint; 3],
    pub shared_bytes: c_uint,
    pub stream: *mut c_void,
    pub attributes: *mut c_void,
    pub attribute_count: c_uint,
}

fn launch_ex(config: *const LaunchConfig, function: *mut c_void, per_thread: bool) -> CUresult {
    guarded(|| {
        if config.is_null() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        // SAFETY: a non-null config points at a CUlaunchConfig per the API.
        let config = unsafe { &*config };
        let stream = if per_thread {
            per_thread_stream(config.stream)
        } else {
            config.stream
        };
        status(mock().launch(function, config.grid, config.block, stream, per_thread))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const LaunchConfig,
    function: *mut c_void,
    _params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    launch_ex(config, function, false)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    config: *const LaunchConfig,
    function: *mut c_void,
    _params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    launch_ex(config, function, true)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    function: *mut c_void,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    _shared_bytes: c_uint,
    stream: *mut c_void,
    _params: *mut *mut c_void,
) -> CUresult {
    guarded(|| {
        status(mock().launch(
            function,
            [grid_x, grid_y, grid_z],
            [block_x, block_y, block_z],
            stream,
            false,
        ))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchCooperativeKernel_ptsz(
    function: *mut c_void,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    _shared_bytes: c_uint,
    stream: *mut c_void,
    _params: *mut *mut c_void,
) -> CUresult {
    guarded(|| {
        status(mock().launch(
            function,
            [grid_x, grid_y, grid_z],
            [block_x, block_y, block_z],
            per_thread_stream(stream),
            true,
        ))
    })
}

fn graph_launch(exec: *mut c_void, per_thread: bool) -> CUresult {
    guarded(|| {
        status((|| {
            let device = mock().current_device()?;
            let duration = graph::launch_duration_ns(exec, mock().gpus.ns_per_kilothread)?;
            mock().busy_ns[device as usize].fetch_add(duration, Ordering::AcqRel);
            mock().launches.fetch_add(1, Ordering::AcqRel);
            if per_thread {
                mock().per_thread_launches.fetch_add(1, Ordering::AcqRel);
            }
            Ok(())
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphLaunch(exec: *mut c_void, _stream: *mut c_void) -> CUresult {
    graph_launch(exec, false)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphLaunch_ptsz(exec: *mut c_void, _stream: *mut c_void) -> CUresult {
    graph_launch(exec, true)
}

/// The mock's own rule for `cuGetProcAddress`, per base name: `(first CUDA version, exported
/// name)` pairs, oldest first, and the same for the `_ptsz` variants (empty: none).
type Variants = (
    &'static [(c_int, &'static str)],
    &'static [(c_int, &'static str)],
);

fn proc_variants(base: &str) -> Option<Variants> {
    Some(match base {
        "cuInit" => (&[(2000, "cuInit")], &[]),
        "cuDriverGetVersion" => (&[(2020, "cuDriverGetVersion")], &[]),
        "cuDeviceGetCount" => (&[(2000, "cuDeviceGetCount")], &[]),
        "cuDeviceGet" => (&[(2000, "cuDeviceGet")], &[]),
        "cuDeviceGetName" => (&[(2000, "cuDeviceGetName")], &[]),
        "cuDeviceGetByPCIBusId" => (&[(4010, "cuDeviceGetByPCIBusId")], &[]),
        "cuDeviceGetUuid" => (
            &[(9020, "cuDeviceGetUuid"), (11040, "cuDeviceGetUuid_v2")],
            &[],
        ),
        "cuDeviceTotalMem" => (&[(3020, "cuDeviceTotalMem_v2")], &[]),
        "cuDevicePrimaryCtxRetain" => (&[(7000, "cuDevicePrimaryCtxRetain")], &[]),
        "cuDevicePrimaryCtxRelease" => (&[(11000, "cuDevicePrimaryCtxRelease_v2")], &[]),
        "cuCtxSetCurrent" => (&[(4000, "cuCtxSetCurrent")], &[]),
        "cuCtxGetCurrent" => (&[(4000, "cuCtxGetCurrent")], &[]),
        "cuCtxGetDevice" => (&[(2000, "cuCtxGetDevice")], &[]),
        "cuCtxPushCurrent" => (&[(4000, "cuCtxPushCurrent_v2")], &[]),
        "cuCtxPopCurrent" => (&[(4000, "cuCtxPopCurrent_v2")], &[]),
        "cuStreamCreate" => (&[(2000, "cuStreamCreate")], &[]),
        "cuStreamDestroy" => (&[(4000, "cuStreamDestroy_v2")], &[]),
        "cuStreamGetCtx" => (&[(9020, "cuStreamGetCtx")], &[]),
        "cuStreamSynchronize" => (&[(2000, "cuStreamSynchronize")], &[]),
        "cuStreamQuery" => (&[(2000, "cuStreamQuery")], &[]),
        "cuStreamIsCapturing" => (&[(10000, "cuStreamIsCapturing")], &[]),
        "cuStreamBeginCapture" => (&[(10010, "cuStreamBeginCapture_v2")], &[]),
        "cuStreamEndCapture" => (&[(10000, "cuStreamEndCapture")], &[]),
        "cuLaunchHostFunc" => (&[(10000, "cuLaunchHostFunc")], &[]),
        "cuMemGetInfo" => (&[(3020, "cuMemGetInfo_v2")], &[]),
        "cuMemAlloc" => (&[(3020, "cuMemAlloc_v2")], &[]),
        "cuMemAllocPitch" => (&[(3020, "cuMemAllocPitch_v2")], &[]),
        "cuMemAllocManaged" => (&[(6000, "cuMemAllocManaged")], &[]),
        "cuMemAllocAsync" => (
            &[(11020, "cuMemAllocAsync")],
            &[(11020, "cuMemAllocAsync_ptsz")],
        ),
        "cuMemAllocFromPoolAsync" => (
            &[(11020, "cuMemAllocFromPoolAsync")],
            &[(11020, "cuMemAllocFromPoolAsync_ptsz")],
        ),
        "cuMemFree" => (&[(3020, "cuMemFree_v2")], &[]),
        "cuMemFreeAsync" => (
            &[(11020, "cuMemFreeAsync")],
            &[(11020, "cuMemFreeAsync_ptsz")],
        ),
        "cuMemCreate" => (&[(10020, "cuMemCreate")], &[]),
        "cuMemRelease" => (&[(10020, "cuMemRelease")], &[]),
        "cuMemHostAlloc" => (&[(2020, "cuMemHostAlloc")], &[]),
        "cuMemHostGetDevicePointer" => (&[(3020, "cuMemHostGetDevicePointer_v2")], &[]),
        "cuMemFreeHost" => (&[(2000, "cuMemFreeHost")], &[]),
        "cuDeviceGetAttribute" => (&[(2000, "cuDeviceGetAttribute")], &[]),
        "cuMemPrefetchAsync" => (
            &[
                (8000, "cuMemPrefetchAsync"),
                (12020, "cuMemPrefetchAsync_v2"),
            ],
            &[
                (8000, "cuMemPrefetchAsync_ptsz"),
                (12020, "cuMemPrefetchAsync_v2_ptsz"),
            ],
        ),
        "cuMemAdvise" => (&[(8000, "cuMemAdvise"), (12020, "cuMemAdvise_v2")], &[]),
        "cuLaunchKernel" => (
            &[(4000, "cuLaunchKernel")],
            &[(4000, "cuLaunchKernel_ptsz")],
        ),
        "cuLaunchKernelEx" => (
            &[(11060, "cuLaunchKernelEx")],
            &[(11060, "cuLaunchKernelEx_ptsz")],
        ),
        "cuLaunchCooperativeKernel" => (
            &[(9000, "cuLaunchCooperativeKernel")],
            &[(9000, "cuLaunchCooperativeKernel_ptsz")],
        ),
        "cuGraphLaunch" => (
            &[(10000, "cuGraphLaunch")],
            &[(10000, "cuGraphLaunch_ptsz")],
        ),
        "cuGraphCreate" => (&[(10000, "cuGraphCreate")], &[]),
        "cuGraphDestroy" => (&[(10000, "cuGraphDestroy")], &[]),
        "cuGraphAddKernelNode" => (&[(12000, "cuGraphAddKernelNode_v2")], &[]),
        "cuGraphAddEmptyNode" => (&[(10000, "cuGraphAddEmptyNode")], &[]),
        "cuGraphAddChildGraphNode" => (&[(10000, "cuGraphAddChildGraphNode")], &[]),
        "cuGraphGetNodes" => (&[(10000, "cuGraphGetNodes")], &[]),
        "cuGraphNodeGetType" => (&[(10000, "cuGraphNodeGetType")], &[]),
        "cuGraphKernelNodeGetParams" => (&[(12000, "cuGraphKernelNodeGetParams_v2")], &[]),
        "cuGraphChildGraphNodeGetGraph" => (&[(10000, "cuGraphChildGraphNodeGetGraph")], &[]),
        "cuGraphInstantiate" => (&[(12000, "cuGraphInstantiateWithFlags")], &[]),
        "cuGraphInstantiateWithFlags" => (&[(11040, "cuGraphInstantiateWithFlags")], &[]),
        "cuGraphInstantiateWithParams" => (
            &[(12000, "cuGraphInstantiateWithParams")],
            &[(12000, "cuGraphInstantiateWithParams_ptsz")],
        ),
        "cuGraphExecDestroy" => (&[(10000, "cuGraphExecDestroy")], &[]),
        "cuGraphExecUpdate" => (&[(12000, "cuGraphExecUpdate_v2")], &[]),
        "cuGetProcAddress" => (
            &[(11030, "cuGetProcAddress"), (12000, "cuGetProcAddress_v2")],
            &[],
        ),
        _ => return None,
    })
}

/// Addresses of the mock's exports by name, for `cuGetProcAddress`.
fn export_address(name: &str) -> Option<*mut c_void> {
    let address = match name {
        "cuInit" => cuInit as *const () as usize,
        "cuDriverGetVersion" => cuDriverGetVersion as *const () as usize,
        "cuDeviceGetCount" => cuDeviceGetCount as *const () as usize,
        "cuDeviceGet" => cuDeviceGet as *const () as usize,
        "cuDeviceGetName" => cuDeviceGetName as *const () as usize,
        "cuDeviceGetByPCIBusId" => cuDeviceGetByPCIBusId as *const () as usize,
        "cuDeviceGetUuid" => cuDeviceGetUuid as *const () as usize,
        "cuDeviceGetUuid_v2" => cuDeviceGetUuid_v2 as *const () as usize,
        "cuDeviceTotalMem_v2" => cuDeviceTotalMem_v2 as *const () as usize,
        "cuDevicePrimaryCtxRetain" => cuDevicePrimaryCtxRetain as *const () as usize,
        "cuDevicePrimaryCtxRelease_v2" => cuDevicePrimaryCtxRelease_v2 as *const () as usize,
        "cuCtxSetCurrent" => cuCtxSetCurrent as *const () as usize,
        "cuCtxGetCurrent" => cuCtxGetCurrent as *const () as usize,
        "cuCtxGetDevice" => cuCtxGetDevice as *const () as usize,
        "cuCtxPushCurrent_v2" => cuCtxPushCurrent_v2 as *const () as usize,
        "cuCtxPopCurrent_v2" => cuCtxPopCurrent_v2 as *const () as usize,
        "cuStreamCreate" => cuStreamCreate as *const () as usize,
        "cuStreamDestroy_v2" => cuStreamDestroy_v2 as *const () as usize,
        "cuStreamGetCtx" => cuStreamGetCtx as *const () as usize,
        "cuStreamSynchronize" => cuStreamSynchronize as *const () as usize,
        "cuStreamQuery" => cuStreamQuery as *const () as usize,
        "cuStreamIsCapturing" => cuStreamIsCapturing as *const () as usize,
        "cuStreamBeginCapture_v2" => cuStreamBeginCapture_v2 as *const () as usize,
        "cuStreamEndCapture" => cuStreamEndCapture as *const () as usize,
        "cuLaunchHostFunc" => cuLaunchHostFunc as *const () as usize,
        "cuMemGetInfo_v2" => cuMemGetInfo_v2 as *const () as usize,
        "cuMemAlloc_v2" => cuMemAlloc_v2 as *const () as usize,
        "cuMemAllocPitch_v2" => cuMemAllocPitch_v2 as *const () as usize,
        "cuMemAllocManaged" => cuMemAllocManaged as *const () as usize,
        "cuMemAllocAsync" => cuMemAllocAsync as *const () as usize,
        "cuMemAllocAsync_ptsz" => cuMemAllocAsync_ptsz as *const () as usize,
        "cuMemAllocFromPoolAsync" => cuMemAllocFromPoolAsync as *const () as usize,
        "cuMemAllocFromPoolAsync_ptsz" => cuMemAllocFromPoolAsync_ptsz as *const () as usize,
        "cuMemFree_v2" => cuMemFree_v2 as *const () as usize,
        "cuMemFreeAsync" => cuMemFreeAsync as *const () as usize,
        "cuMemFreeAsync_ptsz" => cuMemFreeAsync_ptsz as *const () as usize,
        "cuMemCreate" => cuMemCreate as *const () as usize,
        "cuMemRelease" => cuMemRelease as *const () as usize,
        "cuMemHostAlloc" => cuMemHostAlloc as *const () as usize,
        "cuMemHostGetDevicePointer_v2" => cuMemHostGetDevicePointer_v2 as *const () as usize,
        "cuMemFreeHost" => cuMemFreeHost as *const () as usize,
        "cuDeviceGetAttribute" => cuDeviceGetAttribute as *const () as usize,
        "cuMemPrefetchAsync" => cuMemPrefetchAsync as *const () as usize,
        "cuMemPrefetchAsync_ptsz" => cuMemPrefetchAsync_ptsz as *const () as usize,
        "cuMemPrefetchAsync_v2" => cuMemPrefetchAsync_v2 as *const () as usize,
        "cuMemPrefetchAsync_v2_ptsz" => cuMemPrefetchAsync_v2_ptsz as *const () as usize,
        "cuMemAdvise" => cuMemAdvise as *const () as usize,
        "cuMemAdvise_v2" => cuMemAdvise_v2 as *const () as usize,
        "cuLaunchKernel" => cuLaunchKernel as *const () as usize,
        "cuLaunchKernel_ptsz" => cuLaunchKernel_ptsz as *const () as usize,
        "cuLaunchKernelEx" => cuLaunchKernelEx as *const () as usize,
        "cuLaunchKernelEx_ptsz" => cuLaunchKernelEx_ptsz as *const () as usize,
        "cuLaunchCooperativeKernel" => cuLaunchCooperativeKernel as *const () as usize,
        "cuLaunchCooperativeKernel_ptsz" => cuLaunchCooperativeKernel_ptsz as *const () as usize,
        "cuGraphLaunch" => cuGraphLaunch as *const () as usize,
        "cuGraphLaunch_ptsz" => cuGraphLaunch_ptsz as *const () as usize,
        "cuGraphCreate" => graph::cuGraphCreate as *const () as usize,
        "cuGraphDestroy" => graph::cuGraphDestroy as *const () as usize,
        "cuGraphAddKernelNode_v2" => graph::cuGraphAddKernelNode_v2 as *const () as usize,
        "cuGraphAddEmptyNode" => graph::cuGraphAddEmptyNode as *const () as usize,
        "cuGraphAddChildGraphNode" => graph::cuGraphAddChildGraphNode as *const () as usize,
        "cuGraphGetNodes" => graph::cuGraphGetNodes as *const () as usize,
        "cuGraphNodeGetType" => graph::cuGraphNodeGetType as *const () as usize,
        "cuGraphKernelNodeGetParams_v2" => {
            graph::cuGraphKernelNodeGetParams_v2 as *const () as usize
        }
        "cuGraphChildGraphNodeGetGraph" => {
            graph::cuGraphChildGraphNodeGetGraph as *const () as usize
        }
        "cuGraphInstantiateWithFlags" => graph::cuGraphInstantiateWithFlags as *const () as usize,
        "cuGraphInstantiateWithParams" => graph::cuGraphInstantiateWithParams as *const () as usize,
        "cuGraphInstantiateWithParams_ptsz" => {
            graph::cuGraphInstantiateWithParams_ptsz as *const () as usize
        }
        "cuGraphExecDestroy" => graph::cuGraphExecDestroy as *const () as usize,
        "cuGraphExecUpdate_v2" => graph::cuGraphExecUpdate_v2 as *const () as usize,
        "cuGetProcAddress" => cuGetProcAddress as *const () as usize,
        "cuGetProcAddress_v2" => cuGetProcAddress_v2 as *const () as usize,
        _ => return None,
    };
    Some(address as *mut c_void)
}

fn get_proc_address(
    symbol: *const c_char,
    out: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    symbol_status: *mut c_int,
) -> CUresult {
    guarded(|| {
        let report = |code: c_int| {
            if !symbol_status.is_null() {
                // SAFETY: a non-null status points at a CUdriverProcAddressQueryResult.
                unsafe { symbol_status.write(code) };
            }
        };
        if symbol.is_null() || out.is_null() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        // SAFETY: out is non-null and points at a function pointer slot.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: a non-null symbol is a NUL-terminated name per the API.
        let name = unsafe { CStr::from_ptr(symbol) }.to_string_lossy();
        let Some((versions, per_thread)) = proc_variants(&name) else {
            report(SYMBOL_NOT_FOUND);
            return CUDA_ERROR_NOT_FOUND;
        };
        let newest_since = |variants: &'static [(c_int, &'static str)]| {
            variants
                .iter()
                .rev()
                .find(|(since, _)| cuda_version >= *since)
                .map(|(_, variant)| *variant)
        };
        let Some(versioned) = newest_since(versions) else {
            report(VERSION_NOT_SUFFICIENT);
            return CUDA_ERROR_NOT_FOUND;
        };
        let chosen = match newest_since(per_thread) {
            Some(per_thread) if flags & PER_THREAD_STREAM_FLAG != 0 => per_thread,
            _ => versioned,
        };
        match export_address(chosen) {
            Some(address) => {
                // SAFETY: out is non-null (checked above).
                unsafe { out.write(address) };
                report(SYMBOL_FOUND);
                CUDA_SUCCESS
            }
            None => {
                report(SYMBOL_NOT_FOUND);
                CUDA_ERROR_NOT_FOUND
            }
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    out: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
) -> CUresult {
    get_proc_address(symbol, out, cuda_version, flags, std::ptr::null_mut())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    out: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    symbol_status: *mut c_int,
) -> CUresult {
    get_proc_address(symbol, out, cuda_version, flags, symbol_status)
}

fn device_counter(counters: &[AtomicU64], device: c_int) -> u64 {
    usize::try_from(device)
        .ok()
        .and_then(|index| counters.get(index))
        .map_or(0, |counter| counter.load(Ordering::Acquire))
}

/// Test introspection: device bytes the mock holds on `device` now.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tfMockDeviceUsedBytes(device: c_int) -> u64 {
    std::panic::catch_unwind(|| device_counter(&mock().used, device)).unwrap_or(0)
}

/// Test introspection: the most device bytes the mock ever held on `device` at once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tfMockDevicePeakBytes(device: c_int) -> u64 {
    std::panic::catch_unwind(|| device_counter(&mock().peak, device)).unwrap_or(0)
}

/// Test introspection: simulated nanoseconds `device` spent running kernels.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tfMockGpuBusyNs(device: c_int) -> u64 {
    std::panic::catch_unwind(|| device_counter(&mock().busy_ns, device)).unwrap_or(0)
}

/// Test introspection: host bytes currently allocated through the mock (pinned or VMM host).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tfMockHostMappedBytes() -> u64 {
    std::panic::catch_unwind(|| mock().host_mapped.load(Ordering::Acquire)).unwrap_or(0)
}

/// Test introspection: launches of any kind, and those through `_ptsz` variants.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tfMockLaunches(per_thread_only: c_int) -> u64 {
    std::panic::catch_unwind(|| {
        if per_thread_only != 0 {
            mock().per_thread_launches.load(Ordering::Acquire)
        } else {
            mock().launches.load(Ordering::Acquire)
        }
    })
    .unwrap_or(0)
}
