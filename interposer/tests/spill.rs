//! VRAM spill to host memory: past the device limit, up to the spill quota, `cuMemAlloc_v2`,
//! `cuMemAllocPitch_v2` and the stream-ordered `cuMemAllocAsync`/`cuMemAllocFromPoolAsync` are
//! served from pinned host memory mapped into the device address space, counted apart from
//! VRAM, and freed through the right call: at once for `cuMemFree_v2`, and only after the stream
//! reached the free for `cuMemFreeAsync`.

mod support;

use support::Pod;
use tensor_fusion_interposer_core::shm::{MemoryKind, UsageFile};

const MIB: u64 = 1 << 20;

#[test]
fn allocations_past_the_limit_spill_up_to_the_quota() {
    let pod = Pod::with_limits(&format!(
        "vram_limit={}\nspill_quota={}\n",
        8 * MIB,
        4 * MIB
    ));
    let holder = pod.spawn_holding(
        "procaddr:12080:0",
        &[
            "init",
            "ctx:0",
            "alloc:6291456",
            "alloc:3145728",
            "alloc:1048576",
            "alloc:1048576",
            "meminfo",
            "mock",
        ],
    );
    let report = &holder.report;
    assert_eq!(report.number("alloc:6291456", "result"), 0, "in VRAM");
    assert_eq!(
        report.number("alloc:3145728", "result"),
        0,
        "spilled (6 + 3 > 8)"
    );
    // 6 MiB VRAM + 3 MiB spill: two more 1 MiB fit in VRAM (6 + 1 + 1 = 8).
    let allocs: Vec<&str> = report
        .stdout
        .lines()
        .filter(|line| line.starts_with("alloc:1048576 "))
        .collect();
    assert!(
        allocs.iter().all(|line| line.contains("result=0")),
        "{allocs:?}"
    );
    assert_eq!(
        report.number("mock", "used"),
        8 * MIB,
        "VRAM held by the driver"
    );
    assert_eq!(report.number("mock", "host"), 3 * MIB, "pinned host memory");
    assert_eq!(report.number("meminfo", "free"), 0);

    let usage = UsageFile::attach(&pod.usage_path()).unwrap();
    assert_eq!(usage.used(0, MemoryKind::Device), 8 * MIB);
    assert_eq!(
        usage.used(0, MemoryKind::Spill),
        3 * MIB,
        "spilled bytes for the agent"
    );

    // Another process of the container: VRAM is full, 1 MiB of spill quota is left.
    let full = pod.run(
        "exports",
        &["init", "ctx:0", "alloc:1048576", "mock", "alloc:2097152"],
    );
    assert_eq!(
        full.number("alloc:1048576", "result"),
        0,
        "last MiB of spill"
    );
    assert_eq!(full.number("mock", "host"), MIB);
    assert_eq!(
        full.number("alloc:2097152", "result"),
        2,
        "VRAM full and spill quota used up"
    );
    holder.release();
}

#[test]
fn spilled_memory_is_freed_on_the_host() {
    let pod = Pod::with_limits(&format!("vram_limit={}\nspill_quota={}\n", MIB, 8 * MIB));
    let report = pod.run(
        "exports",
        &[
            "init",
            "ctx:0",
            "alloc:4194304",
            "mock",
            "freeall",
            "alloc:1048576",
            "freeall",
        ],
    );
    assert_eq!(report.number("alloc:4194304", "result"), 0);
    let mock = report.fields("mock");
    assert_eq!(mock["host"], (4 * MIB).to_string());
    assert_eq!(mock["used"], "0");
    let frees: Vec<&str> = report
        .stdout
        .lines()
        .filter(|line| line.starts_with("freeall "))
        .collect();
    assert_eq!(frees, vec!["freeall results=0", "freeall results=0"]);
    let usage = UsageFile::attach(&pod.usage_path()).unwrap();
    assert_eq!(usage.used(0, MemoryKind::Spill), 0);
}

#[test]
fn without_a_quota_nothing_spills() {
    let pod = Pod::with_limits(&format!("vram_limit={}\n", MIB));
    let report = pod.run("exports", &["init", "ctx:0", "alloc:2097152", "mock"]);
    assert_eq!(report.number("alloc:2097152", "result"), 2);
    assert_eq!(report.number("mock", "host"), 0);
}

#[test]
fn pitched_allocations_spill_with_the_pitch_they_were_charged() {
    let pod = Pod::with_limits(&format!(
        "vram_limit={}\nspill_quota={}\n",
        MIB / 2,
        4 * MIB
    ));
    let report = pod.run(
        "exports",
        &[
            "init",
            "ctx:0",
            "pitch:1000:1024",
            "mock",
            "freeall",
            "meminfo",
        ],
    );
    assert_eq!(report.number("pitch:1000:1024", "result"), 0);
    assert_eq!(report.number("pitch:1000:1024", "pitch"), 1024);
    assert_eq!(
        report.number("mock", "host"),
        MIB,
        "1024 rows of 1024 bytes"
    );
    assert_eq!(report.number("mock", "used"), 0);
    assert_eq!(report.get("freeall", "results"), "0");
    let usage = UsageFile::attach(&pod.usage_path()).unwrap();
    assert_eq!(usage.used(0, MemoryKind::Spill), 0);
}

#[test]
fn stream_ordered_allocations_spill_and_host_memory_waits_for_the_stream() {
    let pod = Pod::with_limits(&format!(
        "vram_limit={}\nspill_quota={}\n",
        4 * MIB,
        8 * MIB
    ));
    let report = pod.run(
        "procaddr:12080:0",
        &[
            "init",
            "ctx:0",
            "stream",
            "asyncalloc:3145728",
            "asyncalloc:3145728",
            "poolalloc:2097152",
            "mock",
            // The stream is busy with a long kernel that may still read the spilled blocks.
            "busy:1",
            "asyncfreeall",
            "meminfo",
            "mock",
            // The stream passes the frees; the next call into the interposer returns the host
            // memory.
            "busy:0",
            "meminfo",
            "mock",
        ],
    );
    assert_eq!(
        report.all("asyncalloc:3145728", "result"),
        ["0", "0"],
        "the second one spilled (3 + 3 > 4)"
    );
    assert_eq!(report.number("poolalloc:2097152", "result"), 0, "spilled");
    assert_eq!(report.get("asyncfreeall", "results"), "0,0,0");
    assert_eq!(
        report.all("mock", "used"),
        [(3 * MIB).to_string(), (3 * MIB).to_string(), "0".into()],
        "the driver keeps the device block until the stream reaches its free"
    );
    assert_eq!(
        report.all("mock", "host"),
        [(5 * MIB).to_string(), (5 * MIB).to_string(), "0".into()],
        "spilled host memory is not freed under a kernel still queued before the free"
    );
    assert_eq!(
        report.all("meminfo", "free"),
        [(4 * MIB).to_string(), (4 * MIB).to_string()],
        "device memory is uncharged when its free is enqueued"
    );
    let usage = UsageFile::attach(&pod.usage_path()).unwrap();
    assert_eq!(usage.used(0, MemoryKind::Spill), 0, "spill charge released");
    assert_eq!(usage.used(0, MemoryKind::Device), 0);
}

#[test]
fn the_per_thread_default_stream_frees_spilled_memory_in_order_too() {
    let pod = Pod::with_limits(&format!("vram_limit={}\nspill_quota={}\n", MIB, 8 * MIB));
    // cuGetProcAddress with the per-thread flag: the _ptsz hooks, NULL stream.
    let report = pod.run(
        "procaddr:12080:2",
        &[
            "init",
            "ctx:0",
            "asyncalloc:2097152",
            "mock",
            "asyncfreeall",
            "meminfo",
            "mock",
        ],
    );
    assert_eq!(report.number("asyncalloc:2097152", "result"), 0);
    assert_eq!(
        report.all("mock", "host"),
        [(2 * MIB).to_string(), "0".into()]
    );
    assert_eq!(report.get("asyncfreeall", "results"), "0");
}

#[test]
fn nothing_spills_into_a_stream_capture_and_spilled_memory_outlives_one() {
    let pod = Pod::with_limits(&format!("vram_limit={}\nspill_quota={}\n", MIB, 8 * MIB));
    let report = pod.run(
        "exports",
        &[
            "init",
            "ctx:0",
            "stream",
            "asyncalloc:2097152",
            "capture:1",
            "asyncalloc:2097153",
            "asyncfreeall",
            "capture:0",
            "mock",
            "asyncfreeall",
            "meminfo",
            "mock",
        ],
    );
    assert_eq!(report.number("asyncalloc:2097152", "result"), 0, "spilled");
    assert_eq!(
        report.number("asyncalloc:2097153", "result"),
        2,
        "a captured allocation must be a graph allocation: no spill"
    );
    assert_eq!(
        report.all("asyncfreeall", "results"),
        ["900", "0"],
        "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED inside the capture, freed after it"
    );
    assert_eq!(
        report.all("mock", "host"),
        [(2 * MIB).to_string(), "0".into()]
    );
}
