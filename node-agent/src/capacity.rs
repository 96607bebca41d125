//! Physical and virtual capacity of each GPU, and what the node advertises.
//!
//! Physical: the model's TFLOPS (table or configuration) and NVML's memory size. Virtual, the
//! ceiling for limits: TFLOPS times `tflopsOversellRatio` percent, and VRAM plus an equal part per
//! GPU of `vramExpandToHostMem` percent of host RAM and `vramExpandToHostDisk` percent of the
//! disk under the state directory. The node advertises the physical sums as the extended
//! resources `tensor-fusion.ai/tflops` and `tensor-fusion.ai/vram`, because the scheduler
//! compares them with requests.

use crate::allocator::{GpuCapacity, Resources};
use crate::config::AgentConfig;
use crate::discovery::DiscoveredGpu;
use crate::tflops::tflops_of;

/// Host memory and disk that may back VRAM, before the configured percentages.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostSizes {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

impl HostSizes {
    /// `MemTotal` of `/proc/meminfo` and the size of the file system holding `state_dir` (0 for
    /// what cannot be read).
    pub fn read(state_dir: &std::path::Path) -> Self {
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))
                    .and_then(|rest| {
                        rest.trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
            })
            .map_or(0, |kib| kib * 1024);
        Self {
            memory_bytes,
            disk_bytes: disk_size(state_dir).unwrap_or(0),
        }
    }
}

/// The size of the file system holding `path` (`statvfs`: blocks × fragment size).
pub fn disk_size(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stats` is a writable statvfs.
    let result = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled the struct.
    let stats = unsafe { stats.assume_init() };
    #[allow(
        clippy::useless_conversion,
        reason = "the field types differ between targets"
    )]
    Ok(u64::from(stats.f_blocks).saturating_mul(u64::from(stats.f_frsize)))
}

/// The capacity of each discovered GPU under `config`. Models missing from the table get 0
/// TFLOPS (logged): only workers without a TFLOPS request fit them.
pub fn gpu_capacities(
    gpus: &[DiscoveredGpu],
    config: &AgentConfig,
    host: HostSizes,
) -> Vec<GpuCapacity> {
    let expand_total = host.memory_bytes as f64 * config.vram_expand_to_host_mem / 100.0
        + host.disk_bytes as f64 * config.vram_expand_to_host_disk / 100.0;
    let expand_per_gpu = if gpus.is_empty() {
        0
    } else {
        (expand_total / gpus.len() as f64) as u64
    };
    gpus.iter()
        .map(|gpu| {
            let tflops = tflops_of(&gpu.model, &config.gpu_tflops).unwrap_or_else(|| {
                tracing::warn!(
                    model = %gpu.model,
                    uuid = %gpu.uuid,
                    "GPU model has no TFLOPS entry; add it under gpuTflops"
                );
                0.0
            });
            GpuCapacity {
                uuid: gpu.uuid.clone(),
                model: gpu.model.clone(),
                physical: Resources {
                    tflops,
                    vram_bytes: gpu.vram_bytes,
                },
                virtual_: Resources {
                    tflops: tflops * config.tflops_oversell_ratio / 100.0,
                    vram_bytes: gpu.vram_bytes.saturating_add(expand_per_gpu),
                },
                native: false,
            }
        })
        .collect()
}

/// What the node advertises: whole TFLOPS and bytes of the GPUs not held by native pods.
pub fn advertised(gpus: &[GpuCapacity]) -> (u64, u64) {
    let usable = gpus.iter().filter(|gpu| !gpu.native);
    usable.fold((0, 0), |(tflops, vram), gpu| {
        (
            tflops + gpu.physical.tflops.floor() as u64,
            vram + gpu.physical.vram_bytes,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_disk_under_the_state_dir_is_measured_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(disk_size(dir.path()).unwrap() > 0);
        assert_eq!(
            HostSizes::read(dir.path()).disk_bytes,
            disk_size(dir.path()).unwrap()
        );
        let missing = dir.path().join("missing");
        assert_eq!(
            disk_size(&missing).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        assert_eq!(HostSizes::read(&missing).disk_bytes, 0);
    }

    #[test]
    fn oversubscription_as_the_guide_sets_it() {
        let config = AgentConfig {
            tflops_oversell_ratio: 300.0,
            vram_expand_to_host_mem: 40.0,
            vram_expand_to_host_disk: 20.0,
            ..AgentConfig::default()
        };
        let gpus: Vec<DiscoveredGpu> = (0..2)
            .map(|index| DiscoveredGpu {
                index,
                uuid: format!("GPU-{index}"),
                model: "NVIDIA H100 80GB HBM3".to_owned(),
                vram_bytes: 80 * GIB,
            })
            .collect();
        let host = HostSizes {
            memory_bytes: 100 * GIB,
            disk_bytes: 200 * GIB,
        };
        let capacity = gpu_capacities(&gpus, &config, host);
        // 40% of 100 GiB + 20% of 200 GiB = 80 GiB, 40 GiB per GPU.
        assert_eq!(capacity[0].physical.tflops, 989.0);
        assert_eq!(capacity[0].virtual_.tflops, 2967.0);
        assert_eq!(capacity[0].physical.vram_bytes, 80 * GIB);
        assert_eq!(capacity[0].virtual_.vram_bytes, 120 * GIB);
        assert_eq!(advertised(&capacity), (1978, 160 * GIB));
    }
}
