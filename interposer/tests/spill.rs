//! VRAM spill to host memory: past the device limit, up to the spill quota, `cuMemAlloc_v2`,
//! `cuMemAllocPitch_v2`, `cuMemAllocManaged` and the stream-ordered
//! `cuMemAllocAsync`/`cuMemAllocFromPoolAsync` are served from pinned host memory mapped into the
//! device address space, and `cuMemCreate` handles are created in host memory; all of it is
//! counted apart from VRAM, and freed through the right call: at once for `cuMemFree_v2` and
//! `cuMemRelease`, and only after the stream reached the free for `cuMemFreeAsync`.

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

#[test]
fn managed_memory_past_the_limit_spills_and_prefetches_and_advice_on_it_succeed() {
    let pod = Pod::with_limits(&format!(
        "vram_limit={}\nspill_quota={}\n",
        4 * MIB,
        8 * MIB
    ));
    let ops = [
        "init",
        "ctx:0",
        "managed:2097152",
        "prefetch:2097152",
        "managed:4194304",
        "prefetch:4194304",
        "advise:4194304",
        "prefetch:8388608",
        "mock",
    ];
    let holder = pod.spawn_holding("exports", &ops);
    let report = &holder.report;
    assert_eq!(report.number("managed:2097152", "result"), 0, "in VRAM");
    assert_eq!(
        report.number("prefetch:2097152", "result"),
        0,
        "a managed block in VRAM: the driver's own prefetch"
    );
    assert_eq!(
        report.number("managed:4194304", "result"),
        0,
        "spilled (2 + 4 > 4)"
    );
    assert_eq!(report.number("prefetch:4194304", "result"), 0);
    assert_eq!(report.number("advise:4194304", "result"), 0);
    assert_eq!(
        report.number("prefetch:8388608", "result"),
        1,
        "a range past the spilled block goes to the driver, which refuses it"
    );
    assert_eq!(
        report.number("mock", "used"),
        2 * MIB,
        "VRAM held by the driver"
    );
    assert_eq!(report.number("mock", "host"), 4 * MIB, "pinned host memory");
    let usage = UsageFile::attach(&pod.usage_path()).unwrap();
    assert_eq!(usage.used(0, MemoryKind::Device), 2 * MIB);
    assert_eq!(usage.used(0, MemoryKind::Spill), 4 * MIB);
    holder.release();

    // The CUDA 12.2 signatures, as the runtime reaches them, and the free.
    let report = pod.run(
        "procaddr:12080:0",
        &[
            "init",
            "ctx:0",
            "managed:6291456",
            "prefetch2:6291456",
            "advise2:6291456",
            "freeall",
            "mock",
        ],
    );
    assert_eq!(report.number("managed:6291456", "result"), 0);
    assert_eq!(report.number("prefetch2:6291456", "result"), 0);
    assert_eq!(report.number("advise2:6291456", "result"), 0);
    assert_eq!(report.get("freeall", "results"), "0");
    assert_eq!(report.number("mock", "host"), 0, "freed on the host");
    assert_eq!(usage.used(0, MemoryKind::Spill), 0);
}

#[test]
fn prefetch_and_advice_on_memory_that_is_not_managed_fail_as_in_the_driver() {
    let pod = Pod::with_limits(&format!("vram_limit={}\nspill_quota={}\n", MIB, 8 * MIB));
    let ops = [
        "init",
        "ctx:0",
        "alloc:4194304",
        "prefetch:4194304",
        "advise:4194304",
    ];
    let alone = pod.run_without_interposer("exports", &ops);
    assert_eq!(
        alone.number("prefetch:4194304", "result"),
        1,
        "device memory, no interposer"
    );
    assert_eq!(alone.number("advise:4194304", "result"), 1);
    // Spilled by cuMemAlloc_v2, not managed: the program would get the same refusal from the
    // driver on pinned memory, so the interposer does not hide it.
    let report = pod.run("exports", &ops);
    assert_eq!(report.number("alloc:4194304", "result"), 0);
    assert_eq!(report.number("prefetch:4194304", "result"), 1);
    assert_eq!(report.number("advise:4194304", "result"), 1);
}

#[test]
fn vmm_handles_past_the_limit_are_created_in_host_memory() {
    let pod = Pod::with_limits(&format!(
        "vram_limit={}\nspill_quota={}\n",
        4 * MIB,
        8 * MIB
    ));
    // PyTorch's expandable segments ask for shareable (file descriptor) handles.
    let ops = ["init", "ctx:0", "vmm:2097152:1", "vmm:4194304:1", "mock"];
    let holder = pod.spawn_holding("procaddr:12080:0", &ops);
    let report = &holder.report;
    assert_eq!(report.number("vmm:2097152:1", "result"), 0, "on the device");
    assert_eq!(
        report.number("vmm:4194304:1", "result"),
        0,
        "in host memory (2 + 4 > 4), on the GPU's NUMA node, still shareable"
    );
    assert_eq!(report.number("mock", "used"), 2 * MIB);
    assert_eq!(report.number("mock", "host"), 4 * MIB);
    let usage = UsageFile::attach(&pod.usage_path()).unwrap();
    assert_eq!(usage.used(0, MemoryKind::Device), 2 * MIB);
    assert_eq!(usage.used(0, MemoryKind::Spill), 4 * MIB);
    holder.release();

    let report = pod.run(
        "exports",
        &["init", "ctx:0", "vmm:6291456:1", "mock", "release", "mock"],
    );
    assert_eq!(report.number("vmm:6291456:1", "result"), 0);
    assert_eq!(
        report.all("mock", "host"),
        vec![(6 * MIB).to_string(), "0".into()]
    );
    assert_eq!(report.get("release", "results"), "0");
    assert_eq!(usage.used(0, MemoryKind::Spill), 0);
    assert_eq!(usage.used(0, MemoryKind::Device), 0);
}

#[test]
fn vmm_spill_without_a_numa_node_uses_plain_host_memory() {
    // A machine whose driver names no NUMA node for the GPU: a plain host location, which
    // cannot carry shareable handle types, so the interposer drops them.
    let pod = Pod::with_limits(&format!("vram_limit={}\nspill_quota={}\n", MIB, 8 * MIB))
        .env("TF_MOCK_HOST_NUMA_ID", "-1");
    let report = pod.run(
        "exports",
        &[
            "init",
            "ctx:0",
            "vmm:4194304:1",
            "mock",
            "vmm:8388608:0",
            "release",
        ],
    );
    assert_eq!(report.number("vmm:4194304:1", "result"), 0);
    assert_eq!(report.number("mock", "host"), 4 * MIB);
    assert_eq!(
        report.number("vmm:8388608:0", "result"),
        2,
        "past the spill quota (4 + 8 > 8): out of memory"
    );
    assert_eq!(report.get("release", "results"), "0");

    let without_spill = Pod::with_limits(&format!("vram_limit={}\n", MIB));
    let report = without_spill.run("exports", &["init", "ctx:0", "vmm:4194304:1", "mock"]);
    assert_eq!(report.number("vmm:4194304:1", "result"), 2);
    assert_eq!(report.number("mock", "host"), 0);
}

#[test]
fn prefetches_of_spilled_managed_memory_succeed_on_every_path() {
    let pod = Pod::with_limits(&format!("vram_limit={}\nspill_quota={}\n", MIB, 8 * MIB));
    // Through procaddr a CUDA 12.1 runtime asks for the CUDA 8 signature, a 12.8 one for the
    // 12.2 signature; flag 2 is the per-thread default stream (the `_ptsz` variants).
    for (via, prefetch, advise) in [
        ("dlsym", "prefetch:2097152", "advise:2097152"),
        ("procaddr:12010:0", "prefetch:2097152", "advise:2097152"),
        ("procaddr:12010:2", "prefetch:2097152", "advise:2097152"),
        ("procaddr:12080:2", "prefetch2:2097152", "advise2:2097152"),
    ] {
        let report = pod.run(
            via,
            &["init", "ctx:0", "managed:2097152", prefetch, advise, "mock"],
        );
        assert_eq!(report.number("managed:2097152", "result"), 0, "{via}");
        assert_eq!(report.number(prefetch, "result"), 0, "{via}");
        assert_eq!(report.number(advise, "result"), 0, "{via}");
        assert_eq!(report.number("mock", "host"), 2 * MIB, "{via}: spilled");
    }
}
