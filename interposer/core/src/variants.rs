//! Which exported driver function `cuGetProcAddress(name, cudaVersion, flags)` stands for, for
//! the functions the interposer hooks.
//!
//! The CUDA runtime asks for base names (`cuMemAlloc`, `cuLaunchKernel`) with the CUDA version
//! it was built for and a stream mode; the driver answers with a versioned entry point
//! (`cuMemAlloc_v2`) and, in per-thread default stream mode, the `_ptsz`/`_ptds` variant. The
//! interposer first matches the pointer the real driver returned against the real addresses of
//! its hooked exports; this table is the fallback when the driver hands out an address that is
//! not one of its exports. Names are matched exactly: nothing is inferred from a prefix.

/// `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
pub const PER_THREAD_DEFAULT_STREAM: u64 = 1 << 1;

/// One hooked base name: its versioned variants (first CUDA version each is used from, newest
/// last) and its per-thread-default-stream variant.
struct Entry {
    base: &'static str,
    versions: &'static [(i32, &'static str)],
    per_thread: Option<&'static str>,
}

const TABLE: &[Entry] = &[
    Entry {
        base: "cuInit",
        versions: &[(2000, "cuInit")],
        per_thread: None,
    },
    Entry {
        base: "cuDeviceGetCount",
        versions: &[(2000, "cuDeviceGetCount")],
        per_thread: None,
    },
    Entry {
        base: "cuDeviceGet",
        versions: &[(2000, "cuDeviceGet")],
        per_thread: None,
    },
    Entry {
        base: "cuDeviceGetByPCIBusId",
        versions: &[(4010, "cuDeviceGetByPCIBusId")],
        per_thread: None,
    },
    Entry {
        base: "cuDeviceGetUuid",
        versions: &[(9020, "cuDeviceGetUuid"), (11040, "cuDeviceGetUuid_v2")],
        per_thread: None,
    },
    Entry {
        base: "cuDeviceTotalMem",
        versions: &[(3020, "cuDeviceTotalMem_v2")],
        per_thread: None,
    },
    Entry {
        base: "cuMemGetInfo",
        versions: &[(3020, "cuMemGetInfo_v2")],
        per_thread: None,
    },
    Entry {
        base: "cuMemAlloc",
        versions: &[(3020, "cuMemAlloc_v2")],
        per_thread: None,
    },
    Entry {
        base: "cuMemAllocPitch",
        versions: &[(3020, "cuMemAllocPitch_v2")],
        per_thread: None,
    },
    Entry {
        base: "cuMemFree",
        versions: &[(3020, "cuMemFree_v2")],
        per_thread: None,
    },
    Entry {
        base: "cuMemAllocManaged",
        versions: &[(6000, "cuMemAllocManaged")],
        per_thread: None,
    },
    Entry {
        base: "cuMemAllocAsync",
        versions: &[(11020, "cuMemAllocAsync")],
        per_thread: Some("cuMemAllocAsync_ptsz"),
    },
    Entry {
        base: "cuMemAllocFromPoolAsync",
        versions: &[(11020, "cuMemAllocFromPoolAsync")],
        per_thread: Some("cuMemAllocFromPoolAsync_ptsz"),
    },
    Entry {
        base: "cuMemFreeAsync",
        versions: &[(11020, "cuMemFreeAsync")],
        per_thread: Some("cuMemFreeAsync_ptsz"),
    },
    Entry {
        base: "cuMemCreate",
        versions: &[(10020, "cuMemCreate")],
        per_thread: None,
    },
    Entry {
        base: "cuMemRelease",
        versions: &[(10020, "cuMemRelease")],
        per_thread: None,
    },
    Entry {
        base: "cuLaunchKernel",
        versions: &[(4000, "cuLaunchKernel")],
        per_thread: Some("cuLaunchKernel_ptsz"),
    },
    Entry {
        base: "cuLaunchKernelEx",
        versions: &[(11060, "cuLaunchKernelEx")],
        per_thread: Some("cuLaunchKernelEx_ptsz"),
    },
    Entry {
        base: "cuLaunchCooperativeKernel",
        versions: &[(9000, "cuLaunchCooperativeKernel")],
        per_thread: Some("cuLaunchCooperativeKernel_ptsz"),
    },
    Entry {
        base: "cuGraphLaunch",
        versions: &[(10000, "cuGraphLaunch")],
        per_thread: Some("cuGraphLaunch_ptsz"),
    },
    Entry {
        base: "cuGetProcAddress",
        versions: &[(11030, "cuGetProcAddress"), (12000, "cuGetProcAddress_v2")],
        per_thread: None,
    },
];

/// The exported name the driver means by `(name, cuda_version, flags)`, if the interposer
/// hooks it; `None` for any name it does not hook or a version before the function existed.
pub fn resolve(name: &str, cuda_version: i32, flags: u64) -> Option<&'static str> {
    let entry = TABLE.iter().find(|entry| entry.base == name)?;
    let (_, versioned) = entry
        .versions
        .iter()
        .rev()
        .find(|(since, _)| cuda_version >= *since)?;
    if flags & PER_THREAD_DEFAULT_STREAM != 0
        && let Some(per_thread) = entry.per_thread
    {
        return Some(per_thread);
    }
    Some(versioned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_and_per_thread_variants() {
        assert_eq!(resolve("cuMemAlloc", 12000, 0), Some("cuMemAlloc_v2"));
        assert_eq!(resolve("cuMemAlloc", 3000, 0), None);
        assert_eq!(
            resolve("cuLaunchKernel", 12000, PER_THREAD_DEFAULT_STREAM),
            Some("cuLaunchKernel_ptsz")
        );
        assert_eq!(resolve("cuLaunchKernel", 12000, 1), Some("cuLaunchKernel"));
        assert_eq!(
            resolve("cuDeviceGetUuid", 11030, 0),
            Some("cuDeviceGetUuid")
        );
        assert_eq!(
            resolve("cuDeviceGetUuid", 12000, 0),
            Some("cuDeviceGetUuid_v2")
        );
        assert_eq!(
            resolve("cuGetProcAddress", 12040, 0),
            Some("cuGetProcAddress_v2")
        );
        assert_eq!(resolve("cuMemAllocAsync", 11000, 0), None);
    }

    #[test]
    fn names_match_exactly() {
        assert_eq!(resolve("cuMemAlloc_v2", 12000, 0), None);
        assert_eq!(resolve("cuMemAllocX", 12000, 0), None);
        assert_eq!(resolve("cudnnCreate", 12000, 0), None);
        assert_eq!(resolve("cuCtxCreate", 12000, 0), None);
    }
}
