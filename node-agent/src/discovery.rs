//! The node's GPUs as NVML reports them: UUID, model name and memory, loaded at run time from
//! `libnvidia-ml.so.1` (or the path in the configuration; tests use the mock from
//! `mock-driver/nvml`) with `libloading`, and per-process utilisation for the steering loop.
//!
//! This is the FFI edge of the agent; everything past [`Nvml::gpus`] is plain data.

use std::ffi::{CStr, c_char, c_uint, c_void};
use std::path::Path;

type NvmlReturn = c_uint;
type Device = *mut c_void;

const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
const NVML_ERROR_GPU_IS_LOST: NvmlReturn = 15;
const UUID_BUFFER: usize = 96;
const NAME_BUFFER: usize = 96;

/// One GPU as NVML describes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveredGpu {
    pub index: u32,
    pub uuid: String,
    /// The model name, e.g. `NVIDIA H100 80GB HBM3` (`unknown` when NVML has no name call).
    pub model: String,
    pub vram_bytes: u64,
}

/// One process's share of a GPU's time over a recent window, as NVML samples it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessUtilisation {
    pub pid: u32,
    /// Percent of the sampled period the GPU spent on this process's kernels.
    pub sm_percent: u32,
    /// When NVML took the sample, in microseconds (pass the newest as `since_us` next time).
    pub timestamp_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NvmlError {
    #[error("failed to load NVML from {path}: {source}")]
    Load {
        path: String,
        source: libloading::Error,
    },
    #[error("NVML has no {symbol}: {source}")]
    Symbol {
        symbol: &'static str,
        source: libloading::Error,
    },
    #[error("NVML {call} failed with code {code}")]
    Call {
        call: &'static str,
        code: NvmlReturn,
    },
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ProcessUtilizationSample {
    pid: c_uint,
    time_stamp: u64,
    sm_util: c_uint,
    mem_util: c_uint,
    enc_util: c_uint,
    dec_util: c_uint,
}

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Default)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

type GetCount = unsafe extern "C" fn(*mut c_uint) -> NvmlReturn;
type GetHandle = unsafe extern "C" fn(c_uint, *mut Device) -> NvmlReturn;
type GetString = unsafe extern "C" fn(Device, *mut c_char, c_uint) -> NvmlReturn;
type GetMemory = unsafe extern "C" fn(Device, *mut Memory) -> NvmlReturn;
type GetProcessUtilisation =
    unsafe extern "C" fn(Device, *mut ProcessUtilizationSample, *mut c_uint, u64) -> NvmlReturn;

/// A loaded and initialised NVML.
pub struct Nvml {
    library: libloading::Library,
}

impl Nvml {
    /// Loads NVML from `path` (a file name such as `libnvidia-ml.so.1` goes through the loader's
    /// search path) and calls `nvmlInit_v2`.
    pub fn load(path: &Path) -> Result<Self, NvmlError> {
        // SAFETY: loading NVML runs its initialisers, which have no preconditions.
        let library =
            unsafe { libloading::Library::new(path) }.map_err(|source| NvmlError::Load {
                path: path.display().to_string(),
                source,
            })?;
        let nvml = Self { library };
        let init: libloading::Symbol<'_, unsafe extern "C" fn() -> NvmlReturn> =
            nvml.symbol(b"nvmlInit_v2\0", "nvmlInit_v2")?;
        // SAFETY: nvmlInit_v2 takes no arguments and may be called at any time.
        check("nvmlInit_v2", unsafe { init() })?;
        Ok(nvml)
    }

    fn symbol<T>(
        &self,
        name: &[u8],
        symbol: &'static str,
    ) -> Result<libloading::Symbol<'_, T>, NvmlError> {
        // SAFETY: each caller names T as the C signature NVML documents for `symbol`.
        unsafe { self.library.get(name) }.map_err(|source| NvmlError::Symbol { symbol, source })
    }

    fn handle(&self, index: u32) -> Result<Device, NvmlError> {
        let get: libloading::Symbol<'_, GetHandle> = self.symbol(
            b"nvmlDeviceGetHandleByIndex_v2\0",
            "nvmlDeviceGetHandleByIndex_v2",
        )?;
        let mut device: Device = std::ptr::null_mut();
        // SAFETY: `device` is a valid out-pointer for the call.
        check("nvmlDeviceGetHandleByIndex_v2", unsafe {
            get(index, &mut device)
        })?;
        Ok(device)
    }

    fn string(
        &self,
        device: Device,
        name: &[u8],
        call: &'static str,
        capacity: usize,
    ) -> Result<String, NvmlError> {
        let get: libloading::Symbol<'_, GetString> = self.symbol(name, call)?;
        let mut buffer = vec![0 as c_char; capacity];
        // SAFETY: the buffer holds `capacity` chars and NVML writes at most that many, NUL
        // terminated.
        check(call, unsafe {
            get(device, buffer.as_mut_ptr(), capacity as c_uint)
        })?;
        // SAFETY: NVML wrote a NUL-terminated string into the buffer, and the last byte is
        // still the zero it was initialised with if it wrote all `capacity - 1` characters.
        let text = unsafe { CStr::from_ptr(buffer.as_ptr()) };
        Ok(text.to_string_lossy().into_owned())
    }

    /// Every GPU on the node. A GPU NVML reports as lost (fallen off the bus) is left out, with
    /// a warning; any other error fails the whole list.
    pub fn gpus(&self) -> Result<Vec<DiscoveredGpu>, NvmlError> {
        let count: libloading::Symbol<'_, GetCount> =
            self.symbol(b"nvmlDeviceGetCount_v2\0", "nvmlDeviceGetCount_v2")?;
        let memory: libloading::Symbol<'_, GetMemory> =
            self.symbol(b"nvmlDeviceGetMemoryInfo\0", "nvmlDeviceGetMemoryInfo")?;
        let mut gpu_count: c_uint = 0;
        // SAFETY: `gpu_count` is a valid out-pointer.
        check("nvmlDeviceGetCount_v2", unsafe { count(&mut gpu_count) })?;
        let mut gpus = Vec::with_capacity(gpu_count as usize);
        for index in 0..gpu_count {
            let found = self.handle(index).and_then(|device| {
                let uuid = self.string(
                    device,
                    b"nvmlDeviceGetUUID\0",
                    "nvmlDeviceGetUUID",
                    UUID_BUFFER,
                )?;
                Ok((device, uuid))
            });
            let (device, uuid) = match found {
                Ok(found) => found,
                Err(NvmlError::Call {
                    code: NVML_ERROR_GPU_IS_LOST,
                    ..
                }) => {
                    tracing::warn!(index, "NVML reports the GPU as lost; leaving it out");
                    continue;
                }
                Err(error) => return Err(error),
            };
            let model = match self.string(
                device,
                b"nvmlDeviceGetName\0",
                "nvmlDeviceGetName",
                NAME_BUFFER,
            ) {
                Ok(model) => model,
                Err(error) => {
                    tracing::warn!(index, %error, "GPU model unknown");
                    "unknown".to_owned()
                }
            };
            let mut info = Memory::default();
            // SAFETY: `info` is a valid nvmlMemory_t out-pointer.
            check("nvmlDeviceGetMemoryInfo", unsafe {
                memory(device, &mut info)
            })?;
            gpus.push(DiscoveredGpu {
                index,
                uuid,
                model,
                vram_bytes: info.total,
            });
        }
        Ok(gpus)
    }

    /// Per-process utilisation samples of GPU `index` newer than `since_us` (microseconds of
    /// the NVML clock; 0 for everything buffered). No samples is an empty list.
    pub fn process_utilisation(
        &self,
        index: u32,
        since_us: u64,
    ) -> Result<Vec<ProcessUtilisation>, NvmlError> {
        const CALL: &str = "nvmlDeviceGetProcessUtilization";
        let get: libloading::Symbol<'_, GetProcessUtilisation> =
            self.symbol(b"nvmlDeviceGetProcessUtilization\0", CALL)?;
        let device = self.handle(index)?;
        let mut count: c_uint = 0;
        // SAFETY: a null sample buffer with count 0 asks for the needed size, as documented.
        let code = unsafe { get(device, std::ptr::null_mut(), &mut count, since_us) };
        match code {
            NVML_ERROR_NOT_FOUND => return Ok(Vec::new()),
            NVML_SUCCESS | NVML_ERROR_INSUFFICIENT_SIZE => {}
            code => return Err(NvmlError::Call { call: CALL, code }),
        }
        let mut samples = vec![ProcessUtilizationSample::default(); count as usize];
        // SAFETY: the buffer holds `count` samples and NVML writes at most `count`.
        let code = unsafe { get(device, samples.as_mut_ptr(), &mut count, since_us) };
        match code {
            NVML_ERROR_NOT_FOUND => return Ok(Vec::new()),
            code => check(CALL, code)?,
        }
        samples.truncate(count as usize);
        Ok(samples
            .into_iter()
            .map(|sample| ProcessUtilisation {
                pid: sample.pid,
                sm_percent: sample.sm_util,
                timestamp_us: sample.time_stamp,
            })
            .collect())
    }
}

fn check(call: &'static str, code: NvmlReturn) -> Result<(), NvmlError> {
    if code == NVML_SUCCESS {
        Ok(())
    } else {
        Err(NvmlError::Call { call, code })
    }
}
