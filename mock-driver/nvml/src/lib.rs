//! A mock `libnvidia-ml.so.1` for tests: the NVML calls the interposer hooks (device count,
//! handles by index and UUID, UUIDs, memory info), for the same GPUs as the mock `libcuda.so.1`.
//!
//! It reports every GPU's full memory as free; the interposer replaces total, used and free
//! with the container's slice, which is what the tests check. Calls before `nvmlInit` return
//! `NVML_ERROR_UNINITIALIZED`, as NVML does.
//!
//! For the node agent it also answers the model name (`TF_MOCK_GPU_NAME`, default
//! `NVIDIA H100 80GB HBM3`) and per-process utilisation, read at each call from the file named by
//! `TF_MOCK_NVML_UTILISATION` (lines `<gpu index> <pid> <sm percent>`; no file, no samples).
//!
//! The GPU list can change while a process runs: when `TF_MOCK_NVML_GPUS` names a file, each
//! `nvmlInit` and device count re-reads it: `<count> [<vram bytes>]` lists GPUs `0..count` (at
//! most 64), `fail` makes the device count fail with `NVML_ERROR_UNKNOWN`; no file or an
//! unreadable one means the `TF_MOCK_*` values. Handles of GPUs no longer listed answer
//! `NVML_ERROR_GPU_IS_LOST`, as NVML does for a GPU that fell off the bus.

#![allow(non_snake_case, reason = "exported names are NVML's")]

use std::ffi::{CStr, c_char, c_uint, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use tensor_fusion_mock_gpu_sim::{MockGpus, uuid_string};

type NvmlReturn = c_uint;

const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
const NVML_ERROR_GPU_IS_LOST: NvmlReturn = 15;
const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

/// `nvmlMemory_v2` version word: struct size | 2 << 24.
const MEMORY_V2_VERSION: c_uint = (std::mem::size_of::<MemoryV2>() as c_uint) | (2 << 24);

/// `nvmlMemory_t`.
#[repr(C)]
pub struct Memory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct MemoryV2 {
    pub version: c_uint,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

/// What an `nvmlDevice_t` points at in the mock.
pub struct Device {
    index: u32,
    uuid: String,
}

/// Most GPUs a `TF_MOCK_NVML_GPUS` file may list (their handles exist from the start).
const MAX_LISTED_GPUS: u32 = 64;

struct Nvml {
    gpus: MockGpus,
    /// A device for every index that may be listed; only the first `listed_count` are reported.
    devices: Vec<Device>,
    listed_count: AtomicU32,
    listed_vram_bytes: AtomicU64,
    /// The `TF_MOCK_NVML_GPUS` file says `fail`.
    failing: AtomicBool,
    initialised: AtomicBool,
}

fn nvml() -> &'static Nvml {
    static NVML: OnceLock<Nvml> = OnceLock::new();
    NVML.get_or_init(|| {
        let gpus = MockGpus::from_env();
        Nvml {
            gpus,
            devices: (0..gpus.gpu_count.max(MAX_LISTED_GPUS))
                .map(|index| Device {
                    index,
                    uuid: uuid_string(index),
                })
                .collect(),
            listed_count: AtomicU32::new(gpus.gpu_count),
            listed_vram_bytes: AtomicU64::new(gpus.vram_bytes),
            failing: AtomicBool::new(false),
            initialised: AtomicBool::new(false),
        }
    })
}

impl Nvml {
    /// Re-reads the `TF_MOCK_NVML_GPUS` file, if one is named.
    fn reread_gpu_list(&self) {
        let Some(path) = std::env::var_os("TF_MOCK_NVML_GPUS") else {
            return;
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut fields = text.split_whitespace();
        let (count, vram_bytes, failing) = match fields.next() {
            Some("fail") => (self.gpus.gpu_count, self.gpus.vram_bytes, true),
            Some(count) => (
                count.parse().unwrap_or(self.gpus.gpu_count),
                fields
                    .next()
                    .and_then(|bytes| bytes.parse().ok())
                    .unwrap_or(self.gpus.vram_bytes),
                false,
            ),
            None => (self.gpus.gpu_count, self.gpus.vram_bytes, false),
        };
        let count = count.min(self.devices.len() as u32);
        self.listed_count.store(count, Ordering::Release);
        self.listed_vram_bytes.store(vram_bytes, Ordering::Release);
        self.failing.store(failing, Ordering::Release);
    }

    /// The devices reported now.
    fn listed(&self) -> &[Device] {
        &self.devices[..self.listed_count.load(Ordering::Acquire) as usize]
    }
}

fn guarded(body: impl FnOnce() -> Result<(), NvmlReturn>) -> NvmlReturn {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
        .unwrap_or(Err(NVML_ERROR_UNKNOWN))
        .err()
        .unwrap_or(NVML_SUCCESS)
}

fn ready() -> Result<&'static Nvml, NvmlReturn> {
    let nvml = nvml();
    if nvml.initialised.load(Ordering::Acquire) {
        Ok(nvml)
    } else {
        Err(NVML_ERROR_UNINITIALIZED)
    }
}

fn write<T>(out: *mut T, value: T) -> Result<(), NvmlReturn> {
    if out.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    // SAFETY: non-null out-pointers point at a T, as the API requires.
    unsafe { out.write(value) };
    Ok(())
}

fn device_of(handle: *mut c_void) -> Result<&'static Device, NvmlReturn> {
    let nvml = ready()?;
    nvml.devices
        .iter()
        .find(|device| std::ptr::eq(*device as *const Device, handle as *const Device))
        .ok_or(NVML_ERROR_INVALID_ARGUMENT)
        .and_then(|device| {
            if device.index < nvml.listed_count.load(Ordering::Acquire) {
                Ok(device)
            } else {
                Err(NVML_ERROR_GPU_IS_LOST)
            }
        })
}

/// # Safety
/// Callable from C at any time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> NvmlReturn {
    guarded(|| {
        let nvml = nvml();
        nvml.reread_gpu_list();
        nvml.initialised.store(true, Ordering::Release);
        Ok(())
    })
}

/// # Safety
/// Callable from C at any time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit() -> NvmlReturn {
    // SAFETY: same contract.
    unsafe { nvmlInit_v2() }
}

/// # Safety
/// Callable from C at any time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> NvmlReturn {
    guarded(|| {
        ready()?;
        Ok(())
    })
}

/// # Safety
/// `count` must be null or point at a writable `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    guarded(|| {
        let nvml = ready()?;
        nvml.reread_gpu_list();
        if nvml.failing.load(Ordering::Acquire) {
            return Err(NVML_ERROR_UNKNOWN);
        }
        write(count, nvml.listed_count.load(Ordering::Acquire))
    })
}

/// # Safety
/// As [`nvmlDeviceGetCount_v2`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> NvmlReturn {
    // SAFETY: same contract.
    unsafe { nvmlDeviceGetCount_v2(count) }
}

/// # Safety
/// `handle` must be null or point at a writable `nvmlDevice_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    handle: *mut *mut c_void,
) -> NvmlReturn {
    guarded(|| {
        let device = ready()?
            .listed()
            .get(index as usize)
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        write(handle, device as *const Device as *mut c_void)
    })
}

/// # Safety
/// As [`nvmlDeviceGetHandleByIndex_v2`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    handle: *mut *mut c_void,
) -> NvmlReturn {
    // SAFETY: same contract.
    unsafe { nvmlDeviceGetHandleByIndex_v2(index, handle) }
}

/// # Safety
/// `uuid` must be null or a NUL-terminated string; `handle` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    handle: *mut *mut c_void,
) -> NvmlReturn {
    guarded(|| {
        if uuid.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: a non-null uuid is NUL-terminated per the contract.
        let wanted = unsafe { CStr::from_ptr(uuid) }.to_string_lossy();
        let device = ready()?
            .listed()
            .iter()
            .find(|device| device.uuid == wanted)
            .ok_or(NVML_ERROR_NOT_FOUND)?;
        write(handle, device as *const Device as *mut c_void)
    })
}

/// # Safety
/// `uuid` must be null or hold `length` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    handle: *mut c_void,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    guarded(|| {
        let device = device_of(handle)?;
        if uuid.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let text = device.uuid.as_bytes();
        if (length as usize) < text.len() + 1 {
            return Err(NVML_ERROR_INSUFFICIENT_SIZE);
        }
        // SAFETY: `uuid` holds `length` bytes, enough for the text and its NUL (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr().cast(), uuid, text.len());
            *uuid.add(text.len()) = 0;
        }
        Ok(())
    })
}

/// # Safety
/// `index` must be null or point at a writable `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(handle: *mut c_void, index: *mut c_uint) -> NvmlReturn {
    guarded(|| write(index, device_of(handle)?.index))
}

/// # Safety
/// `memory` must be null or point at a writable `nvmlMemory_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    handle: *mut c_void,
    memory: *mut Memory,
) -> NvmlReturn {
    guarded(|| {
        device_of(handle)?;
        let total = nvml().listed_vram_bytes.load(Ordering::Acquire);
        write(
            memory,
            Memory {
                total,
                free: total,
                used: 0,
            },
        )
    })
}

/// # Safety
/// `memory` must be null or point at a writable `nvmlMemory_v2_t` with its version set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    handle: *mut c_void,
    memory: *mut MemoryV2,
) -> NvmlReturn {
    guarded(|| {
        device_of(handle)?;
        if memory.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: non-null, points at an nvmlMemory_v2_t per the contract.
        if unsafe { (*memory).version } != MEMORY_V2_VERSION {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let total = nvml().listed_vram_bytes.load(Ordering::Acquire);
        write(
            memory,
            MemoryV2 {
                version: MEMORY_V2_VERSION,
                total,
                reserved: 0,
                free: total,
                used: 0,
            },
        )
    })
}

/// Model name when `TF_MOCK_GPU_NAME` is not set.
const DEFAULT_GPU_NAME: &str = "NVIDIA H100 80GB HBM3";

/// # Safety
/// `name` must be null or hold `length` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    handle: *mut c_void,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    guarded(|| {
        device_of(handle)?;
        if name.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let model = std::env::var("TF_MOCK_GPU_NAME").unwrap_or_else(|_| DEFAULT_GPU_NAME.into());
        let text = model.as_bytes();
        if (length as usize) < text.len() + 1 {
            return Err(NVML_ERROR_INSUFFICIENT_SIZE);
        }
        // SAFETY: `name` holds `length` bytes, enough for the text and its NUL (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr().cast(), name, text.len());
            *name.add(text.len()) = 0;
        }
        Ok(())
    })
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
pub struct ProcessUtilizationSample {
    pub pid: c_uint,
    pub time_stamp: u64,
    pub sm_util: c_uint,
    pub mem_util: c_uint,
    pub enc_util: c_uint,
    pub dec_util: c_uint,
}

/// The samples for GPU `index` in the file named by `TF_MOCK_NVML_UTILISATION`.
fn utilisation_samples(index: u32) -> Vec<(u32, u32)> {
    let Some(path) = std::env::var_os("TF_MOCK_NVML_UTILISATION") else {
        return Vec::new();
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().map(str::parse::<u32>);
            match (fields.next(), fields.next(), fields.next()) {
                (Some(Ok(gpu)), Some(Ok(pid)), Some(Ok(percent))) if gpu == index => {
                    Some((pid, percent))
                }
                _ => None,
            }
        })
        .collect()
}

/// # Safety
/// `count` must be null or point at a writable `unsigned int`; `samples` must be null or hold
/// `*count` writable samples.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    handle: *mut c_void,
    samples: *mut ProcessUtilizationSample,
    count: *mut c_uint,
    _last_seen_timestamp: u64,
) -> NvmlReturn {
    guarded(|| {
        let device = device_of(handle)?;
        if count.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let found = utilisation_samples(device.index);
        if found.is_empty() {
            return Err(NVML_ERROR_NOT_FOUND);
        }
        // SAFETY: `count` is non-null and writable per the contract.
        let room = unsafe { *count } as usize;
        if samples.is_null() || room < found.len() {
            write(count, found.len() as c_uint)?;
            return Err(NVML_ERROR_INSUFFICIENT_SIZE);
        }
        for (slot, (pid, percent)) in found.iter().enumerate() {
            // SAFETY: `samples` holds `room` >= found.len() samples.
            unsafe {
                samples.add(slot).write(ProcessUtilizationSample {
                    pid: *pid,
                    time_stamp: 0,
                    sm_util: *percent,
                    mem_util: 0,
                    enc_util: 0,
                    dec_util: 0,
                });
            }
        }
        write(count, found.len() as c_uint)
    })
}

/// # Safety
/// Callable from C at any time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    let text: &'static CStr = match result {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_FOUND => c"Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}
