//! The interposer's process-wide state: the container's limits and shared usage file (read on
//! first need), the device view (built by the first successful `cuInit`), and the table of
//! allocations it handed out, so frees are charged to the device the memory came from and
//! pointers it did not hand out are forwarded untouched.

use std::collections::{BTreeMap, HashMap};
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tensor_fusion_interposer_core::config::ContainerLimits;
use tensor_fusion_interposer_core::shm::{DeviceSettings, MAX_DEVICES, UsageFile};

use crate::cuda::{
    CU_STREAM_PER_THREAD, CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_NO_DEVICE,
    CUDA_ERROR_NOT_PERMITTED, CUDA_SUCCESS, CUcontext, CUdevice, CUresult, CUstream, CUuuid,
    call_real, format_uuid,
};
use crate::log::log;

/// Burst size of the launch bucket when the limits file gives none: 100 ms of refill.
pub const DEFAULT_BURST_NS: u64 = 100_000_000;

/// Limits and accounting of this container.
pub struct Runtime {
    pub limits: ContainerLimits,
    pub usage: UsageFile,
}

/// One device this container sees, in the order it sees them.
#[derive(Debug, Clone)]
pub struct Visible {
    /// The driver's device ordinal (what the real `cuDeviceGet` takes).
    pub real_ordinal: c_int,
    /// The real `CUdevice` handle, which is what applications get and pass back.
    pub device: CUdevice,
    pub uuid: String,
}

/// Where an allocation the interposer handed out lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Device,
    /// Pinned host memory mapped into the device address space; freed with `cuMemFreeHost`.
    Spilled {
        host: usize,
    },
    /// A `cuMemCreate` handle the interposer created in host memory instead of on the device;
    /// the program maps it like device memory, and `cuMemRelease` frees it.
    SpilledHandle,
}

#[derive(Debug, Clone, Copy)]
pub struct Allocation {
    pub device: usize,
    pub bytes: u64,
    pub placement: Placement,
}

/// A spilled block freed with `cuMemFreeAsync`: kernels queued before the free may still read
/// it, so its host memory goes back (and its spill charge is released) only after the stream
/// reached the free, which a host function queued behind the free reports through `reached`.
pub struct PendingHostFree {
    pub host: usize,
    pub device: usize,
    pub bytes: u64,
    pub reached: Arc<AtomicBool>,
}

/// Everything hooks need once `cuInit` succeeded.
pub struct Active {
    pub runtime: &'static Runtime,
    pub devices: Vec<Visible>,
    pub allocations: Mutex<HashMap<u64, Allocation>>,
    pub vmm_handles: Mutex<HashMap<u64, Allocation>>,
    pub pending_host_frees: Mutex<Vec<PendingHostFree>>,
    /// Length of `pending_host_frees`, read without the lock on every allocation and free.
    pub pending_host_free_count: AtomicUsize,
    /// Managed allocations served from pinned host memory, start -> end: prefetches and advice
    /// on them succeed without reaching the driver (which refuses them on non-managed memory).
    pub spilled_managed: Mutex<BTreeMap<u64, u64>>,
    /// Length of `spilled_managed`, read without the lock on every prefetch and advice.
    pub spilled_managed_count: AtomicUsize,
    /// Tokens a launch of each executable graph costs, by `CUgraphExec` (see `graph`).
    pub graph_costs: Mutex<HashMap<usize, u64>>,
}

static RUNTIME: OnceLock<Result<Runtime, CUresult>> = OnceLock::new();
static ACTIVE: OnceLock<Active> = OnceLock::new();
/// The code `cuInit` refused CUDA with (`CUDA_SUCCESS`: not refused). Once set it stays: every
/// later `cuInit` returns it and every other hook `CUDA_ERROR_NOT_INITIALIZED`.
static REFUSAL: AtomicU32 = AtomicU32::new(CUDA_SUCCESS);

/// The code `cuInit` refused CUDA with, if it did.
pub fn refusal() -> Option<CUresult> {
    let code = REFUSAL.load(Ordering::Acquire);
    (code != CUDA_SUCCESS).then_some(code)
}

fn refuse(code: CUresult) -> CUresult {
    // The first refusal wins; a later one (another thread's cuInit) has the same cause.
    let _ = REFUSAL.compare_exchange(CUDA_SUCCESS, code, Ordering::AcqRel, Ordering::Acquire);
    refusal().unwrap_or(code)
}

/// What `cuInit` decides before the real driver is initialised: whether the limits allow CUDA
/// at all. A refusal here leaves the real driver uninitialised, so calls the interposer
/// forwards unchanged get `CUDA_ERROR_NOT_INITIALIZED` from the driver itself.
pub fn admit() -> Result<(), CUresult> {
    if let Some(code) = refusal() {
        return Err(code);
    }
    let runtime = runtime().map_err(refuse)?;
    if runtime.limits.gpu_uuids.is_empty() && runtime.limits.gpu_count == Some(0) {
        log!(
            Error,
            "gpu_count=0 refusing CUDA: TF_GPU_COUNT=0 gives this container no GPU"
        );
        return Err(refuse(CUDA_ERROR_NO_DEVICE));
    }
    Ok(())
}

/// The container's limits and usage file, loaded once; an error code if this process may not
/// use the GPU (logged once, at error level).
pub fn runtime() -> Result<&'static Runtime, CUresult> {
    RUNTIME
        .get_or_init(load_runtime)
        .as_ref()
        .map_err(|code| *code)
}

fn load_runtime() -> Result<Runtime, CUresult> {
    let limits = ContainerLimits::load(|key| std::env::var(key).ok()).map_err(|error| {
        log!(
            Error,
            "error={error} refusing CUDA: the container limits cannot be read"
        );
        CUDA_ERROR_NOT_PERMITTED
    })?;
    if let Some(path) = limits
        .limits_path
        .as_ref()
        .filter(|path| !limits.allow_unlimited && !path.exists())
    {
        log!(
            Error,
            "limits_file={} waited_seconds={} refusing CUDA: the node agent has not assigned this \
             container a GPU (no limits file after the wait; TF_LIMITS_WAIT_SECONDS sets it); set \
             TF_INTERPOSER_ALLOW_UNLIMITED=1 to run without one",
            path.display(),
            limits.limits_wait_seconds
        );
        return Err(CUDA_ERROR_NOT_PERMITTED);
    }
    if !limits.is_limited() && !limits.allow_unlimited {
        let file = match &limits.limits_path {
            Some(path) => format!(
                "the limits file {} sets neither vram_limit nor tflops_limit",
                path.display()
            ),
            None => "TF_POD_DIR is not set, so there is no limits file".to_owned(),
        };
        log!(
            Error,
            "limits_file={:?} refusing CUDA: nothing says what this process may use ({file}, \
             and neither TF_VRAM_LIMIT nor TF_TFLOPS_LIMIT is set); set \
             TF_INTERPOSER_ALLOW_UNLIMITED=1 to run unlimited",
            limits.limits_path
        );
        return Err(CUDA_ERROR_NOT_PERMITTED);
    }

    let setting = DeviceSettings {
        vram_limit: limits.vram_limit.unwrap_or(u64::MAX),
        spill_quota: limits.spill_quota,
        refill_rate: limits.first_refill_rate(),
        burst_ns: limits
            .burst_seconds
            .map_or(DEFAULT_BURST_NS, |seconds| (seconds * 1e9) as u64),
    };
    let settings = vec![setting; MAX_DEVICES];
    let usage = match &limits.usage_path {
        Some(path) => UsageFile::open(path, &settings),
        None => {
            log!(
                Warn,
                "accounting is per process: TF_POD_DIR is not set, so processes of this \
                 container do not share one limit"
            );
            UsageFile::private(&settings)
        }
    }
    .map_err(|error| {
        log!(Error, "error={error} refusing CUDA: no usage accounting");
        CUDA_ERROR_NOT_PERMITTED
    })?;
    log!(
        Info,
        "vram_limit={:?} tflops_request={:?} tflops_limit={:?} spill_quota={} gpus={:?} \
         usage_file={:?} interposer active",
        limits.vram_limit,
        limits.tflops_request,
        limits.tflops_limit,
        limits.spill_quota,
        limits.gpu_uuids,
        limits.usage_path
    );
    Ok(Runtime { limits, usage })
}

/// The state hooks use, once `cuInit` went through the interposer successfully.
pub fn active() -> Option<&'static Active> {
    ACTIVE.get()
}

/// Called after [`admit`] and the real `cuInit` succeeded: builds the device view. A refusal
/// (an assigned GPU not on the node) sticks, like one from [`admit`].
pub fn activate() -> CUresult {
    if ACTIVE.get().is_some() {
        return CUDA_SUCCESS;
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return refuse(code),
    };
    let devices = match device_view(&runtime.limits) {
        Ok(devices) => devices,
        Err(code) => return refuse(code),
    };
    // Losing a race to another thread's cuInit leaves that thread's identical view in place.
    let _ = ACTIVE.set(Active {
        runtime,
        devices,
        allocations: Mutex::new(HashMap::new()),
        vmm_handles: Mutex::new(HashMap::new()),
        pending_host_frees: Mutex::new(Vec::new()),
        pending_host_free_count: AtomicUsize::new(0),
        spilled_managed: Mutex::new(BTreeMap::new()),
        spilled_managed_count: AtomicUsize::new(0),
        graph_costs: Mutex::new(HashMap::new()),
    });
    CUDA_SUCCESS
}

fn device_view(limits: &ContainerLimits) -> Result<Vec<Visible>, CUresult> {
    let mut count: c_int = 0;
    let result = call_real!(cuDeviceGetCount(&mut count));
    if result != CUDA_SUCCESS {
        return Err(result);
    }
    let mut all = Vec::new();
    for ordinal in 0..count {
        let mut device: CUdevice = 0;
        let result = call_real!(cuDeviceGet(&mut device, ordinal));
        if result != CUDA_SUCCESS {
            return Err(result);
        }
        let mut uuid = CUuuid::default();
        let mut result = call_real!(cuDeviceGetUuid_v2(&mut uuid, device));
        if result != CUDA_SUCCESS {
            result = call_real!(cuDeviceGetUuid(&mut uuid, device));
        }
        if result != CUDA_SUCCESS {
            return Err(result);
        }
        all.push(Visible {
            real_ordinal: ordinal,
            device,
            uuid: format_uuid(&uuid.bytes),
        });
    }

    let visible: Vec<Visible> = if limits.gpu_uuids.is_empty() {
        let count = limits.gpu_count.map_or(all.len(), |count| count as usize);
        all.into_iter().take(count).collect()
    } else {
        let mut visible = Vec::new();
        for uuid in &limits.gpu_uuids {
            match all
                .iter()
                .find(|device| device.uuid.eq_ignore_ascii_case(uuid))
            {
                Some(device) => visible.push(device.clone()),
                None => {
                    log!(
                        Error,
                        "gpu_uuid={uuid} refusing CUDA: an assigned GPU is not on this node"
                    );
                    return Err(CUDA_ERROR_NO_DEVICE);
                }
            }
        }
        visible
    };
    if visible.len() > MAX_DEVICES {
        log!(
            Warn,
            "gpus={} only the first {MAX_DEVICES} are visible",
            visible.len()
        );
    }
    Ok(visible.into_iter().take(MAX_DEVICES).collect())
}

impl Active {
    /// Position of a real `CUdevice` in this container's view.
    pub fn index_of(&self, device: CUdevice) -> Option<usize> {
        self.devices
            .iter()
            .position(|visible| visible.device == device)
    }

    /// Index of the current context's device; the driver's error if there is no context, and
    /// `CUDA_ERROR_INVALID_DEVICE` for a device outside the view.
    pub fn current_device(&self) -> Result<usize, CUresult> {
        let mut device: CUdevice = 0;
        let result = call_real!(cuCtxGetDevice(&mut device));
        if result != CUDA_SUCCESS {
            return Err(result);
        }
        self.index_of(device).ok_or(CUDA_ERROR_INVALID_DEVICE)
    }

    /// Index of the device a stream-ordered allocation on `stream` comes from: the device of the
    /// stream's context (the special streams are the current context's), whatever context is
    /// current. With one visible device, a created stream can only be on that one.
    pub fn stream_device(&self, stream: CUstream) -> Result<usize, CUresult> {
        if stream as usize <= CU_STREAM_PER_THREAD {
            return self.current_device();
        }
        if self.devices.len() == 1 {
            return Ok(0);
        }
        let mut context: CUcontext = std::ptr::null_mut();
        let result = call_real!(cuStreamGetCtx(stream, &mut context));
        if result != CUDA_SUCCESS {
            return Err(result);
        }
        let result = call_real!(cuCtxPushCurrent_v2(context));
        if result != CUDA_SUCCESS {
            return Err(result);
        }
        let device = self.current_device();
        let mut popped: CUcontext = std::ptr::null_mut();
        call_real!(cuCtxPopCurrent_v2(&mut popped));
        device
    }

    /// Like [`Active::current_device`], but skips the driver call when only one device is
    /// visible (the launch path).
    pub fn launch_device(&self) -> usize {
        if self.devices.len() == 1 {
            return 0;
        }
        self.current_device().unwrap_or(0)
    }
}

/// Locks a mutex, ignoring poisoning (the data is a plain table).
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
