//! VRAM spill to host memory: past the device limit, up to the spill quota, `cuMemAlloc_v2` is
//! served from pinned host memory mapped into the device address space, counted apart from
//! VRAM, and freed through the right call.

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
