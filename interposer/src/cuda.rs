//! The slice of the CUDA driver API the interposer touches (types, result codes, the structs it
//! reads) and the real driver: loaded once from `TF_CUDA_DRIVER_PATH` or `libcuda.so.1`, its
//! functions resolved with the real `dlsym` so the interposer never calls its own exports.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

use crate::dlsym::{lookup_real, open_library};
use crate::guard::Inside;
use crate::log::log;

pub type CUresult = c_uint;
pub type CUdevice = c_int;
pub type CUdeviceptr = u64;
pub type CUstream = *mut c_void;
pub type CUfunction = *mut c_void;
pub type CUcontext = *mut c_void;
pub type CUgraph = *mut c_void;
pub type CUgraphNode = *mut c_void;
pub type CUgraphExec = *mut c_void;
/// `CUhostFn`.
pub type CUhostFn = unsafe extern "C" fn(*mut c_void);

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_NOT_PERMITTED: CUresult = 800;
pub const CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: CUresult = 900;
/// The last of the `CUDA_ERROR_STREAM_CAPTURE_*` codes (900-908), which `cuStreamEndCapture`
/// returns for a capture it ended but could not turn into a graph.
pub const CUDA_ERROR_STREAM_CAPTURE_LAST: CUresult = 908;
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

/// `CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP`.
pub const HOST_ALLOC_PORTABLE_MAPPED: c_uint = 0x01 | 0x02;
/// `CU_STREAM_PER_THREAD`: what a NULL stream means to the `_ptsz` variants. Handles up to this
/// one (NULL, `CU_STREAM_LEGACY` = 1) are the current context's special streams.
pub const CU_STREAM_PER_THREAD: usize = 0x2;
/// `CU_STREAM_CAPTURE_STATUS_NONE`.
pub const CAPTURE_STATUS_NONE: c_int = 0;
/// `CU_MEM_LOCATION_TYPE_DEVICE`, `_HOST` and `_HOST_NUMA`.
pub const MEM_LOCATION_DEVICE: c_int = 1;
pub const MEM_LOCATION_HOST: c_int = 2;
pub const MEM_LOCATION_HOST_NUMA: c_int = 3;
/// `CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID`: the host NUMA node closest to a device (-1: none).
pub const DEVICE_ATTRIBUTE_HOST_NUMA_ID: c_int = 134;

/// `CUuuid`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct CUuuid {
    pub bytes: [u8; 16],
}

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CUmemLocation {
    pub location_type: c_int,
    pub id: c_int,
}

/// `CUmemAllocationProp` (64-bit Linux layout, 32 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CUmemAllocationProp {
    pub allocation_type: c_int,
    pub requested_handle_types: c_int,
    pub location: CUmemLocation,
    pub win32_handle_metadata: *mut c_void,
    /// `allocFlags`: compressionType, gpuDirectRDMACapable, usage (2 bytes), reserved.
    pub alloc_flags: [u8; 8],
}

/// `CUgraphNodeType` values the interposer reads.
pub const GRAPH_NODE_KERNEL: c_int = 0;
pub const GRAPH_NODE_CHILD_GRAPH: c_int = 4;

/// `CUDA_KERNEL_NODE_PARAMS_v2` (72 bytes); the v1 struct the older
/// `cuGraphKernelNodeGetParams` writes is its first 56 bytes.
#[repr(C)]
pub struct CudaKernelNodeParams {
    pub function: CUfunction,
    pub grid: [c_uint; 3],
    pub block: [c_uint; 3],
    pub shared_bytes: c_uint,
    pub kernel_params: *mut *mut c_void,
    pub extra: *mut *mut c_void,
    pub kernel: *mut c_void,
    pub context: CUcontext,
}

impl Default for CudaKernelNodeParams {
    fn default() -> Self {
        Self {
            function: std::ptr::null_mut(),
            grid: [0; 3],
            block: [0; 3],
            shared_bytes: 0,
            kernel_params: std::ptr::null_mut(),
            extra: std::ptr::null_mut(),
            kernel: std::ptr::null_mut(),
            context: std::ptr::null_mut(),
        }
    }
}

/// `CUlaunchConfig`.
#[repr(C)]
pub struct CUlaunchConfig {
    pub grid: [c_uint; 3],
    pub block: [c_uint; 3],
    pub shared_bytes: c_uint,
    pub stream: CUstream,
    pub attributes: *mut c_void,
    pub attribute_count: c_uint,
}

/// Formats UUID bytes as `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML prints them.
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

macro_rules! real_driver {
    ($($name:ident: fn($($ty:ty),*);)*) => {
        /// The real driver's entry points (`None` where this driver lacks one).
        #[allow(non_snake_case, reason = "fields are named for the driver functions")]
        pub struct RealDriver {
            /// The `dlopen` handle, compared with handles passed to `dlsym`.
            pub handle: usize,
            $(pub $name: Option<unsafe extern "C" fn($($ty),*) -> CUresult>,)*
        }

        impl RealDriver {
            fn resolve(handle: *mut c_void) -> Self {
                Self {
                    handle: handle as usize,
                    // SAFETY: each symbol is the driver function of that name, whose C
                    // signature the field type spells out.
                    $($name: unsafe { lookup_real(handle, concat!(stringify!($name), "\0")) },)*
                }
            }
        }
    };
}

real_driver! {
    cuInit: fn(c_uint);
    cuDeviceGetCount: fn(*mut c_int);
    cuDeviceGet: fn(*mut CUdevice, c_int);
    cuDeviceGetUuid: fn(*mut CUuuid, CUdevice);
    cuDeviceGetUuid_v2: fn(*mut CUuuid, CUdevice);
    cuDeviceGetByPCIBusId: fn(*mut CUdevice, *const c_char);
    cuDeviceGetAttribute: fn(*mut c_int, c_int, CUdevice);
    cuDeviceTotalMem_v2: fn(*mut usize, CUdevice);
    cuCtxGetDevice: fn(*mut CUdevice);
    cuCtxPushCurrent_v2: fn(CUcontext);
    cuCtxPopCurrent_v2: fn(*mut CUcontext);
    cuStreamGetCtx: fn(CUstream, *mut CUcontext);
    cuStreamIsCapturing: fn(CUstream, *mut c_int);
    cuLaunchHostFunc: fn(CUstream, Option<CUhostFn>, *mut c_void);
    cuMemGetInfo_v2: fn(*mut usize, *mut usize);
    cuMemAlloc_v2: fn(*mut CUdeviceptr, usize);
    cuMemAllocPitch_v2: fn(*mut CUdeviceptr, *mut usize, usize, usize, c_uint);
    cuMemAllocManaged: fn(*mut CUdeviceptr, usize, c_uint);
    cuMemAllocAsync: fn(*mut CUdeviceptr, usize, CUstream);
    cuMemAllocAsync_ptsz: fn(*mut CUdeviceptr, usize, CUstream);
    cuMemAllocFromPoolAsync: fn(*mut CUdeviceptr, usize, *mut c_void, CUstream);
    cuMemAllocFromPoolAsync_ptsz: fn(*mut CUdeviceptr, usize, *mut c_void, CUstream);
    cuMemFree_v2: fn(CUdeviceptr);
    cuMemFreeAsync: fn(CUdeviceptr, CUstream);
    cuMemFreeAsync_ptsz: fn(CUdeviceptr, CUstream);
    cuMemCreate: fn(*mut u64, usize, *const CUmemAllocationProp, u64);
    cuMemRelease: fn(u64);
    cuMemPrefetchAsync: fn(CUdeviceptr, usize, CUdevice, CUstream);
    cuMemPrefetchAsync_ptsz: fn(CUdeviceptr, usize, CUdevice, CUstream);
    cuMemPrefetchAsync_v2: fn(CUdeviceptr, usize, CUmemLocation, c_uint, CUstream);
    cuMemPrefetchAsync_v2_ptsz: fn(CUdeviceptr, usize, CUmemLocation, c_uint, CUstream);
    cuMemAdvise: fn(CUdeviceptr, usize, c_int, CUdevice);
    cuMemAdvise_v2: fn(CUdeviceptr, usize, c_int, CUmemLocation);
    cuMemHostAlloc: fn(*mut *mut c_void, usize, c_uint);
    cuMemHostGetDevicePointer_v2: fn(*mut CUdeviceptr, *mut c_void, c_uint);
    cuMemFreeHost: fn(*mut c_void);
    cuLaunchKernel: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void);
    cuLaunchKernel_ptsz: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void);
    cuLaunchKernelEx: fn(*const CUlaunchConfig, CUfunction, *mut *mut c_void, *mut *mut c_void);
    cuLaunchKernelEx_ptsz: fn(*const CUlaunchConfig, CUfunction, *mut *mut c_void, *mut *mut c_void);
    cuLaunchCooperativeKernel: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void);
    cuLaunchCooperativeKernel_ptsz: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void);
    cuGraphLaunch: fn(*mut c_void, CUstream);
    cuGraphLaunch_ptsz: fn(*mut c_void, CUstream);
    cuGraphGetNodes: fn(CUgraph, *mut CUgraphNode, *mut usize);
    cuGraphNodeGetType: fn(CUgraphNode, *mut c_int);
    cuGraphKernelNodeGetParams: fn(CUgraphNode, *mut CudaKernelNodeParams);
    cuGraphKernelNodeGetParams_v2: fn(CUgraphNode, *mut CudaKernelNodeParams);
    cuGraphChildGraphNodeGetGraph: fn(CUgraphNode, *mut CUgraph);
    cuGraphInstantiate: fn(*mut CUgraphExec, CUgraph, *mut CUgraphNode, *mut c_char, usize);
    cuGraphInstantiate_v2: fn(*mut CUgraphExec, CUgraph, *mut CUgraphNode, *mut c_char, usize);
    cuGraphInstantiateWithFlags: fn(*mut CUgraphExec, CUgraph, u64);
    cuGraphInstantiateWithParams: fn(*mut CUgraphExec, CUgraph, *mut c_void);
    cuGraphInstantiateWithParams_ptsz: fn(*mut CUgraphExec, CUgraph, *mut c_void);
    cuGraphExecDestroy: fn(CUgraphExec);
    cuGraphExecUpdate: fn(CUgraphExec, CUgraph, *mut CUgraphNode, *mut c_int);
    cuGraphExecUpdate_v2: fn(CUgraphExec, CUgraph, *mut c_void);
    cuStreamBeginCapture: fn(CUstream);
    cuStreamBeginCapture_ptsz: fn(CUstream);
    cuStreamBeginCapture_v2: fn(CUstream, c_int);
    cuStreamBeginCapture_v2_ptsz: fn(CUstream, c_int);
    cuStreamBeginCaptureToGraph: fn(CUstream, CUgraph, *const CUgraphNode, *const c_void, usize, c_int);
    cuStreamBeginCaptureToGraph_ptsz: fn(CUstream, CUgraph, *const CUgraphNode, *const c_void, usize, c_int);
    cuStreamEndCapture: fn(CUstream, *mut CUgraph);
    cuStreamEndCapture_ptsz: fn(CUstream, *mut CUgraph);
    cuGetProcAddress: fn(*const c_char, *mut *mut c_void, c_int, u64);
    cuGetProcAddress_v2: fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int);
}

/// The real driver, loaded on first use; `None` if it cannot be loaded (logged once).
pub fn real() -> Option<&'static RealDriver> {
    static REAL: OnceLock<Option<RealDriver>> = OnceLock::new();
    REAL.get_or_init(|| {
        let _inside = Inside::enter();
        let path = std::env::var("TF_CUDA_DRIVER_PATH").unwrap_or_else(|_| "libcuda.so.1".into());
        let Ok(c_path) = CString::new(path.clone()) else {
            log!(Error, "path={path:?} CUDA driver path contains a NUL byte");
            return None;
        };
        match open_library(&c_path) {
            Ok(handle) => {
                let driver = RealDriver::resolve(handle);
                log!(
                    Debug,
                    "path={path:?} has_cu_init={} CUDA driver loaded",
                    driver.cuInit.is_some()
                );
                Some(driver)
            }
            Err(reason) => {
                log!(
                    Error,
                    "path={path:?} reason={reason:?} failed to load the CUDA driver"
                );
                None
            }
        }
    })
    .as_ref()
}

/// Calls the real driver function `name` with the given arguments, or returns
/// `CUDA_ERROR_NOT_INITIALIZED` (no driver) / `CUDA_ERROR_NOT_FOUND` (no such function).
macro_rules! call_real {
    ($name:ident($($arg:expr),* $(,)?)) => {
        match $crate::cuda::real().and_then(|driver| driver.$name) {
            // SAFETY: the arguments are the caller's, passed unchanged (or checked by the hook)
            // to the real driver function of the same name and signature.
            Some(function) => unsafe { function($($arg),*) },
            None if $crate::cuda::real().is_none() => $crate::cuda::CUDA_ERROR_NOT_INITIALIZED,
            None => $crate::cuda::CUDA_ERROR_NOT_FOUND,
        }
    };
}
pub(crate) use call_real;

/// Reads a C string argument, if non-null.
pub fn c_name<'a>(symbol: *const c_char) -> Option<&'a str> {
    if symbol.is_null() {
        return None;
    }
    // SAFETY: non-null symbol names passed to the driver are NUL-terminated strings.
    unsafe { CStr::from_ptr(symbol) }.to_str().ok()
}

/// Writes `value` through a caller's out-pointer, if non-null.
pub fn write_out<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: the driver API's out-pointers, when non-null, point at a writable T.
        unsafe { out.write(value) };
    }
}

/// Reads a caller's out-pointer after the real driver filled it, or a struct the caller passed
/// in (`CUmemAllocationProp`).
pub fn read_out<T: Copy>(out: *const T) -> Option<T> {
    if out.is_null() {
        return None;
    }
    // SAFETY: non-null out-pointers that the real driver just wrote, and non-null in-pointers
    // the API requires to point at a filled struct, hold an initialised T.
    Some(unsafe { out.read() })
}
