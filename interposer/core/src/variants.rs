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
/// last) and its per-thread-default-stream variants, likewise by version (empty: none).
struct Entry {
    base: &'static str,
    versions: &'static [(i32, &'static str)],
    per_thread: &'static [(i32, &'static str)],
}

const TABLE: &[Entry] = &[
    Entry {
        base: "cuInit",
        versions: &[(2000, "cuInit")],
        per_thread: &[],
    },
    Entry {
        base: "cuDeviceGetCount",
        versions: &[(2000, "cuDeviceGetCount")],
        per_thread: &[],
    },
    Entry {
        base: "cuDeviceGet",
        versions: &[(2000, "cuDeviceGet")],
        per_thread: &[],
    },
    Entry {
        base: "cuDeviceGetByPCIBusId",
        versions: &[(4010, "cuDeviceGetByPCIBusId")],
        per_thread: &[],
    },
    Entry {
        base: "cuDeviceGetUuid",
        versions: &[(9020, "cuDeviceGetUuid"), (11040, "cuDeviceGetUuid_v2")],
        per_thread: &[],
    },
    Entry {
        base: "cuDeviceTotalMem",
        versions: &[(3020, "cuDeviceTotalMem_v2")],
        per_thread: &[],
    },
    Entry {
        base: "cuMemGetInfo",
        versions: &[(3020, "cuMemGetInfo_v2")],
        per_thread: &[],
    },
    Entry {
        base: "cuMemAlloc",
        versions: &[(3020, "cuMemAlloc_v2")],
        per_thread: &[],
    },
    Entry {
        base: "cuMemAllocPitch",
        versions: &[(3020, "cuMemAllocPitch_v2")],
        per_thread: &[],
    },
    Entry {
        base: "cuMemFree",
        versions: &[(3020, "cuMemFree_v2")],
        per_thread: &[],
    },
    Entry {
        base: "cuMemAllocManaged",
        versions: &[(6000, "cuMemAllocManaged")],
        per_thread: &[],
    },
    Entry {
        base: "cuMemAllocAsync",
        versions: &[(11020, "cuMemAllocAsync")],
        per_thread: &[(11020, "cuMemAllocAsync_ptsz")],
    },
    Entry {
        base: "cuMemAllocFromPoolAsync",
        versions: &[(11020, "cuMemAllocFromPoolAsync")],
        per_thread: &[(11020, "cuMemAllocFromPoolAsync_ptsz")],
    },
    Entry {
        base: "cuMemFreeAsync",
        versions: &[(11020, "cuMemFreeAsync")],
        per_thread: &[(11020, "cuMemFreeAsync_ptsz")],
    },
    Entry {
        base: "cuMemCreate",
        versions: &[(10020, "cuMemCreate")],
        per_thread: &[],
    },
    Entry {
        base: "cuMemRelease",
        versions: &[(10020, "cuMemRelease")],
        per_thread: &[],
    },
    Entry {
        base: "cuMemPrefetchAsync",
        versions: &[
            (8000, "cuMemPrefetchAsync"),
            (12020, "cuMemPrefetchAsync_v2"),
        ],
        per_thread: &[
            (8000, "cuMemPrefetchAsync_ptsz"),
            (12020, "cuMemPrefetchAsync_v2_ptsz"),
        ],
    },
    Entry {
        base: "cuMemAdvise",
        versions: &[(8000, "cuMemAdvise"), (12020, "cuMemAdvise_v2")],
        per_thread: &[],
    },
    Entry {
        base: "cuLaunchKernel",
        versions: &[(4000, "cuLaunchKernel")],
        per_thread: &[(4000, "cuLaunchKernel_ptsz")],
    },
    Entry {
        base: "cuLaunchKernelEx",
        versions: &[(11060, "cuLaunchKernelEx")],
        per_thread: &[(11060, "cuLaunchKernelEx_ptsz")],
    },
    Entry {
        base: "cuLaunchCooperativeKernel",
        versions: &[(9000, "cuLaunchCooperativeKernel")],
        per_thread: &[(9000, "cuLaunchCooperativeKernel_ptsz")],
    },
    Entry {
        base: "cuGraphLaunch",
        versions: &[(10000, "cuGraphLaunch")],
        per_thread: &[(10000, "cuGraphLaunch_ptsz")],
    },
    Entry {
        base: "cuGraphInstantiate",
        versions: &[
            (10000, "cuGraphInstantiate"),
            (11000, "cuGraphInstantiate_v2"),
            (12000, "cuGraphInstantiateWithFlags"),
        ],
        per_thread: &[],
    },
    Entry {
        base: "cuGraphInstantiateWithFlags",
        versions: &[(11040, "cuGraphInstantiateWithFlags")],
        per_thread: &[],
    },
    Entry {
        base: "cuGraphInstantiateWithParams",
        versions: &[(12000, "cuGraphInstantiateWithParams")],
        per_thread: &[(12000, "cuGraphInstantiateWithParams_ptsz")],
    },
    Entry {
        base: "cuGraphExecUpdate",
        versions: &[
            (10020, "cuGraphExecUpdate"),
            (12000, "cuGraphExecUpdate_v2"),
        ],
        per_thread: &[],
    },
    Entry {
        base: "cuGraphExecDestroy",
        versions: &[(10000, "cuGraphExecDestroy")],
        per_thread: &[],
    },
    Entry {
        base: "cuStreamBeginCapture",
        versions: &[
            (10000, "cuStreamBeginCapture"),
            (10010, "cuStreamBeginCapture_v2"),
        ],
        per_thread: &[
            (10000, "cuStreamBeginCapture_ptsz"),
            (10010, "cuStreamBeginCapture_v2_ptsz"),
        ],
    },
    Entry {
        base: "cuStreamBeginCaptureToGraph",
        versions: &[(12030, "cuStreamBeginCaptureToGraph")],
        per_thread: &[(12030, "cuStreamBeginCaptureToGraph_ptsz")],
    },
    Entry {
        base: "cuStreamEndCapture",
        versions: &[(10000, "cuStreamEndCapture")],
        per_thread: &[(10000, "cuStreamEndCapture_ptsz")],
    },
    Entry {
        base: "cuGetProcAddress",
        versions: &[(11030, "cuGetProcAddress"), (12000, "cuGetProcAddress_v2")],
        per_thread: &[],
    },
];

/// The exported name the driver means by `(name, cuda_version, flags)`, if the interposer
/// hooks it; `None` for any name it does not hook or a version before the function existed.
pub fn resolve(name: &str, cuda_version: i32, flags: u64) -> Option<&'static str> {
    let entry = TABLE.iter().find(|entry| entry.base == name)?;
    let newest_since = |variants: &'static [(i32, &'static str)]| {
        variants
            .iter()
            .rev()
            .find(|(since, _)| cuda_version >= *since)
            .map(|(_, variant)| *variant)
    };
    let versioned = newest_since(entry.versions)?;
    if flags & PER_THREAD_DEFAULT_STREAM != 0
        && let Some(per_thread) = newest_since(entry.per_thread)
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
        assert_eq!(
            resolve("cuMemPrefetchAsync", 12010, PER_THREAD_DEFAULT_STREAM),
            Some("cuMemPrefetchAsync_ptsz")
        );
        assert_eq!(
            resolve("cuMemPrefetchAsync", 12020, PER_THREAD_DEFAULT_STREAM),
            Some("cuMemPrefetchAsync_v2_ptsz")
        );
        assert_eq!(resolve("cuMemAdvise", 12080, 0), Some("cuMemAdvise_v2"));
        assert_eq!(
            resolve("cuGraphInstantiate", 11080, 0),
            Some("cuGraphInstantiate_v2")
        );
        assert_eq!(
            resolve("cuGraphInstantiate", 12040, 0),
            Some("cuGraphInstantiateWithFlags")
        );
        assert_eq!(
            resolve("cuStreamBeginCapture", 12040, PER_THREAD_DEFAULT_STREAM),
            Some("cuStreamBeginCapture_v2_ptsz")
        );
        assert_eq!(
            resolve("cuMemAdvise", 12080, PER_THREAD_DEFAULT_STREAM),
            Some("cuMemAdvise_v2")
        );
    }

    #[test]
    fn names_match_exactly() {
        assert_eq!(resolve("cuMemAlloc_v2", 12000, 0), None);
        assert_eq!(resolve("cuMemAllocX", 12000, 0), None);
        assert_eq!(resolve("cudnnCreate", 12000, 0), None);
        assert_eq!(resolve("cuCtxCreate", 12000, 0), None);
    }
}
