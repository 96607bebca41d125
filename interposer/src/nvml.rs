//! NVML hooks, so `nvidia-smi` and NVML-based tools in the container see the same slice as
//! CUDA: only the assigned GPUs (count, by index, by UUID), and the container's limit, usage and
//! what is left of it as memory info. The real `libnvidia-ml.so.1` (or `TF_NVML_PATH`) is
//! loaded on first use. NVML needs no `cuInit`, so these read the limits directly; when the
//! container has no limits NVML is passed through.

#![allow(non_snake_case, reason = "exported names are NVML's")]
#![allow(
    clippy::missing_safety_doc,
    reason = "each export has the pointer contract of the NVML function it stands for"
)]

use std::ffi::{CStr, CString, c_char, c_uint, c_void};
use std::sync::OnceLock;

use tensor_fusion_interposer_core::shm::MemoryKind;

use crate::cuda::{read_out, write_out};
use crate::dlsym::{lookup_real, open_library};
use crate::guard::{Inside, hooked};
use crate::log::log;
use crate::memory::slice;
use crate::runtime::{Runtime, runtime};

type NvmlReturn = c_uint;
type Device = *mut c_void;

const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
const NVML_ERROR_FUNCTION_NOT_FOUND: NvmlReturn = 13;
const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Memory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemoryV2 {
    pub version: c_uint,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

macro_rules! real_nvml {
    ($($name:ident: fn($($ty:ty),*);)*) => {
        /// The real NVML's entry points.
        #[allow(non_snake_case, reason = "fields are named for the NVML functions")]
        pub struct RealNvml {
            pub handle: usize,
            $(pub $name: Option<unsafe extern "C" fn($($ty),*) -> NvmlReturn>,)*
        }

        impl RealNvml {
            fn resolve(handle: *mut c_void) -> Self {
                Self {
                    handle: handle as usize,
                    // SAFETY: each symbol is the NVML function of that name, whose C signature
                    // the field type spells out.
                    $($name: unsafe { lookup_real(handle, concat!(stringify!($name), "\0")) },)*
                }
            }
        }
    };
}

real_nvml! {
    nvmlDeviceGetCount: fn(*mut c_uint);
    nvmlDeviceGetCount_v2: fn(*mut c_uint);
    nvmlDeviceGetHandleByIndex: fn(c_uint, *mut Device);
    nvmlDeviceGetHandleByIndex_v2: fn(c_uint, *mut Device);
    nvmlDeviceGetHandleByUUID: fn(*const c_char, *mut Device);
    nvmlDeviceGetUUID: fn(Device, *mut c_char, c_uint);
    nvmlDeviceGetIndex: fn(Device, *mut c_uint);
    nvmlDeviceGetMemoryInfo: fn(Device, *mut Memory);
    nvmlDeviceGetMemoryInfo_v2: fn(Device, *mut MemoryV2);
}

/// The real NVML, loaded on first use.
pub fn real() -> Option<&'static RealNvml> {
    static REAL: OnceLock<Option<RealNvml>> = OnceLock::new();
    REAL.get_or_init(|| {
        let _inside = Inside::enter();
        let path = std::env::var("TF_NVML_PATH").unwrap_or_else(|_| "libnvidia-ml.so.1".into());
        let c_path = CString::new(path.clone()).ok()?;
        match open_library(&c_path) {
            Ok(handle) => Some(RealNvml::resolve(handle)),
            Err(reason) => {
                log!(Warn, "path={path:?} reason={reason:?} failed to load NVML");
                None
            }
        }
    })
    .as_ref()
}

macro_rules! call_nvml {
    ($name:ident($($arg:expr),* $(,)?)) => {
        match real().and_then(|nvml| nvml.$name) {
            // SAFETY: the caller's arguments (or ones built here of the same types) passed to
            // the real NVML function of the same name and signature.
            Some(function) => unsafe { function($($arg),*) },
            None if real().is_none() => NVML_ERROR_UNINITIALIZED,
            None => NVML_ERROR_FUNCTION_NOT_FOUND,
        }
    };
}

/// Runs `hook` with the container's limits, or `passthrough` when there are none.
fn with_runtime(
    name: &str,
    hook: impl FnOnce(&'static Runtime) -> NvmlReturn,
    passthrough: impl Fn() -> NvmlReturn + Copy,
) -> NvmlReturn {
    hooked(
        name,
        NVML_ERROR_UNKNOWN,
        || match runtime() {
            Ok(runtime) => hook(runtime),
            Err(_) => passthrough(),
        },
        passthrough,
    )
}

/// How many GPUs the container sees through NVML.
fn visible_count(runtime: &Runtime, real_count: c_uint) -> c_uint {
    let limits = &runtime.limits;
    if !limits.gpu_uuids.is_empty() {
        return limits.gpu_uuids.len() as c_uint;
    }
    limits
        .gpu_count
        .map_or(real_count, |count| count.min(real_count))
}

/// The real handle of the container's `index`-th GPU.
fn visible_handle(runtime: &Runtime, index: c_uint, handle: *mut Device) -> NvmlReturn {
    let limits = &runtime.limits;
    if let Some(uuid) = limits.gpu_uuids.get(index as usize) {
        let Ok(uuid) = CString::new(uuid.as_str()) else {
            return NVML_ERROR_NOT_FOUND;
        };
        return call_nvml!(nvmlDeviceGetHandleByUUID(uuid.as_ptr(), handle));
    }
    if !limits.gpu_uuids.is_empty() || limits.gpu_count.is_some_and(|count| index >= count) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    call_nvml!(nvmlDeviceGetHandleByIndex_v2(index, handle))
}

/// The container's index of a real NVML device handle, if the container sees it.
fn index_of(runtime: &Runtime, device: Device) -> Option<usize> {
    let limits = &runtime.limits;
    if limits.gpu_uuids.is_empty() {
        let mut index: c_uint = 0;
        if call_nvml!(nvmlDeviceGetIndex(device, &mut index)) != NVML_SUCCESS {
            return None;
        }
        return (limits.gpu_count.is_none_or(|count| index < count)).then_some(index as usize);
    }
    let mut buffer = [0 as c_char; 96];
    if call_nvml!(nvmlDeviceGetUUID(
        device,
        buffer.as_mut_ptr(),
        buffer.len() as c_uint
    )) != NVML_SUCCESS
    {
        return None;
    }
    // SAFETY: on success NVML wrote a NUL-terminated UUID into the buffer.
    let uuid = unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy();
    limits
        .gpu_uuids
        .iter()
        .position(|assigned| assigned.eq_ignore_ascii_case(&uuid))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    let real = || call_nvml!(nvmlDeviceGetCount_v2(count));
    with_runtime(
        "nvmlDeviceGetCount_v2",
        |runtime| {
            let result = real();
            if let (NVML_SUCCESS, Some(real_count)) = (result, read_out(count)) {
                write_out(count, visible_count(runtime, real_count));
            }
            result
        },
        real,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> NvmlReturn {
    let real = || call_nvml!(nvmlDeviceGetCount(count));
    with_runtime(
        "nvmlDeviceGetCount",
        |runtime| {
            let result = real();
            if let (NVML_SUCCESS, Some(real_count)) = (result, read_out(count)) {
                write_out(count, visible_count(runtime, real_count));
            }
            result
        },
        real,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    handle: *mut Device,
) -> NvmlReturn {
    let real = || call_nvml!(nvmlDeviceGetHandleByIndex_v2(index, handle));
    with_runtime(
        "nvmlDeviceGetHandleByIndex_v2",
        |runtime| visible_handle(runtime, index, handle),
        real,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    handle: *mut Device,
) -> NvmlReturn {
    let real = || call_nvml!(nvmlDeviceGetHandleByIndex(index, handle));
    with_runtime(
        "nvmlDeviceGetHandleByIndex",
        |runtime| visible_handle(runtime, index, handle),
        real,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    handle: *mut Device,
) -> NvmlReturn {
    let real = || call_nvml!(nvmlDeviceGetHandleByUUID(uuid, handle));
    with_runtime(
        "nvmlDeviceGetHandleByUUID",
        |runtime| {
            let assigned = &runtime.limits.gpu_uuids;
            let wanted = crate::cuda::c_name(uuid).unwrap_or_default();
            if !assigned.is_empty() && !assigned.iter().any(|id| id.eq_ignore_ascii_case(wanted)) {
                return NVML_ERROR_NOT_FOUND;
            }
            real()
        },
        real,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: Device,
    memory: *mut Memory,
) -> NvmlReturn {
    let real = || call_nvml!(nvmlDeviceGetMemoryInfo(device, memory));
    with_runtime(
        "nvmlDeviceGetMemoryInfo",
        |runtime| {
            let result = real();
            if let (NVML_SUCCESS, Some(info), Some(index)) =
                (result, read_out(memory), index_of(runtime, device))
            {
                let (free, total) = slice(&runtime.usage, index, info.free, info.total);
                let used = runtime.usage.used(index, MemoryKind::Device).min(total);
                write_out(memory, Memory { total, free, used });
            }
            result
        },
        real,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: Device,
    memory: *mut MemoryV2,
) -> NvmlReturn {
    let real = || call_nvml!(nvmlDeviceGetMemoryInfo_v2(device, memory));
    with_runtime(
        "nvmlDeviceGetMemoryInfo_v2",
        |runtime| {
            let result = real();
            if let (NVML_SUCCESS, Some(info), Some(index)) =
                (result, read_out(memory), index_of(runtime, device))
            {
                let (free, total) = slice(&runtime.usage, index, info.free, info.total);
                let used = runtime.usage.used(index, MemoryKind::Device).min(total);
                write_out(
                    memory,
                    MemoryV2 {
                        total,
                        free,
                        used,
                        reserved: 0,
                        ..info
                    },
                );
            }
            result
        },
        real,
    )
}

/// Address of the NVML hook exported under exactly `name`.
pub fn hook_address(name: &[u8]) -> Option<usize> {
    let address = match name {
        b"nvmlDeviceGetCount" => nvmlDeviceGetCount as *const (),
        b"nvmlDeviceGetCount_v2" => nvmlDeviceGetCount_v2 as *const (),
        b"nvmlDeviceGetHandleByIndex" => nvmlDeviceGetHandleByIndex as *const (),
        b"nvmlDeviceGetHandleByIndex_v2" => nvmlDeviceGetHandleByIndex_v2 as *const (),
        b"nvmlDeviceGetHandleByUUID" => nvmlDeviceGetHandleByUUID as *const (),
        b"nvmlDeviceGetMemoryInfo" => nvmlDeviceGetMemoryInfo as *const (),
        b"nvmlDeviceGetMemoryInfo_v2" => nvmlDeviceGetMemoryInfo_v2 as *const (),
        _ => return None,
    };
    Some(address as usize)
}
