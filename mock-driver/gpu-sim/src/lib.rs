//! The simulated GPU behind the mock `libcuda.so.1` and `libnvidia-ml.so.1` (test only).
//!
//! It owns what both mocks must agree on (how many GPUs there are, their UUIDs and memory size,
//! read from `TF_MOCK_*` variables) and the clock model: a kernel takes time in proportion to
//! its threads (grid x block), and a [`SimGpu`] runs submitted kernels one after another, so
//! the time each tenant had the GPU can be read back exactly. The interposer's deterministic
//! limiter simulation drives a [`SimGpu`] directly; the mock driver advances one per device.

/// GPUs the mock reports when `TF_MOCK_GPU_COUNT` is not set.
pub const DEFAULT_GPU_COUNT: u32 = 2;

/// Memory per mock GPU when `TF_MOCK_VRAM_BYTES` is not set (16 GiB; host memory backs only
/// what is actually allocated).
pub const DEFAULT_VRAM_BYTES: u64 = 16 << 30;

/// Simulated nanoseconds per 1024 threads of a kernel when `TF_MOCK_NS_PER_KILOTHREAD` is not
/// set.
pub const DEFAULT_NS_PER_KILOTHREAD: u64 = 10;

/// What the mock GPUs look like, shared by the CUDA and NVML mocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockGpus {
    pub gpu_count: u32,
    pub vram_bytes: u64,
    pub ns_per_kilothread: u64,
}

impl MockGpus {
    /// Reads `TF_MOCK_GPU_COUNT`, `TF_MOCK_VRAM_BYTES` and `TF_MOCK_NS_PER_KILOTHREAD`,
    /// falling back to the defaults for anything absent or unparsable.
    pub fn from_env() -> Self {
        fn read(name: &str, default: u64) -> u64 {
            std::env::var(name)
                .ok()
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(default)
        }
        Self {
            gpu_count: u32::try_from(read("TF_MOCK_GPU_COUNT", DEFAULT_GPU_COUNT.into()))
                .unwrap_or(DEFAULT_GPU_COUNT),
            vram_bytes: read("TF_MOCK_VRAM_BYTES", DEFAULT_VRAM_BYTES),
            ns_per_kilothread: read("TF_MOCK_NS_PER_KILOTHREAD", DEFAULT_NS_PER_KILOTHREAD),
        }
    }
}

/// The 16 UUID bytes of mock GPU `index`: fixed, distinct per index.
pub fn uuid_bytes(index: u32) -> [u8; 16] {
    let mut bytes = [0x7f_u8; 16];
    bytes[0..4].copy_from_slice(b"TFmk");
    bytes[12..16].copy_from_slice(&index.to_be_bytes());
    bytes
}

/// The UUID as NVML and `nvidia-smi` print it: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn uuid_string(index: u32) -> String {
    let hex: String = uuid_bytes(index)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Threads in a launch: grid x block, saturating instead of overflowing.
pub fn kernel_threads(grid: [u32; 3], block: [u32; 3]) -> u64 {
    grid.iter()
        .chain(block.iter())
        .fold(1_u64, |threads, &dim| {
            threads.saturating_mul(u64::from(dim))
        })
}

/// Simulated run time of a kernel with this many threads.
pub fn kernel_duration_ns(threads: u64, ns_per_kilothread: u64) -> u64 {
    threads.saturating_mul(ns_per_kilothread).div_ceil(1024)
}

/// One kernel's stay on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execution {
    pub tenant: usize,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// A GPU that runs kernels one at a time in submission order on a simulated clock.
#[derive(Debug, Default)]
pub struct SimGpu {
    free_at_ns: u64,
    executions: Vec<Execution>,
}

impl SimGpu {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a kernel of `tenant` submitted at `submit_ns`; returns when it completes.
    pub fn submit(&mut self, tenant: usize, submit_ns: u64, duration_ns: u64) -> u64 {
        let start_ns = self.free_at_ns.max(submit_ns);
        let end_ns = start_ns + duration_ns;
        self.free_at_ns = end_ns;
        self.executions.push(Execution {
            tenant,
            start_ns,
            end_ns,
        });
        end_ns
    }

    /// Nanoseconds within `[from_ns, to_ns)` during which the GPU ran `tenant`'s kernels.
    pub fn busy_ns(&self, tenant: usize, from_ns: u64, to_ns: u64) -> u64 {
        let first = self
            .executions
            .partition_point(|execution| execution.end_ns <= from_ns);
        self.executions[first..]
            .iter()
            .take_while(|execution| execution.start_ns < to_ns)
            .filter(|execution| execution.tenant == tenant)
            .map(|execution| execution.end_ns.min(to_ns) - execution.start_ns.max(from_ns))
            .sum()
    }

    /// Nanoseconds within `[from_ns, to_ns)` during which the GPU ran anything.
    pub fn total_busy_ns(&self, from_ns: u64, to_ns: u64) -> u64 {
        let first = self
            .executions
            .partition_point(|execution| execution.end_ns <= from_ns);
        self.executions[first..]
            .iter()
            .take_while(|execution| execution.start_ns < to_ns)
            .map(|execution| execution.end_ns.min(to_ns) - execution.start_ns.max(from_ns))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_string_has_the_nvml_shape() {
        assert_eq!(uuid_string(1), "GPU-54466d6b-7f7f-7f7f-7f7f-7f7f00000001");
    }

    #[test]
    fn kernels_queue_behind_each_other_and_busy_time_is_split_at_window_edges() {
        let mut gpu = SimGpu::new();
        assert_eq!(gpu.submit(0, 0, 100), 100);
        assert_eq!(gpu.submit(1, 50, 100), 200);
        assert_eq!(gpu.submit(0, 500, 10), 510);
        assert_eq!(gpu.busy_ns(0, 0, 1000), 110);
        assert_eq!(gpu.busy_ns(1, 150, 1000), 50);
        assert_eq!(gpu.total_busy_ns(90, 505), 115);
    }

    #[test]
    fn kernel_time_follows_grid_times_block() {
        let threads = kernel_threads([4, 2, 1], [256, 1, 1]);
        assert_eq!(threads, 2048);
        assert_eq!(kernel_duration_ns(threads, 10), 20);
    }
}
