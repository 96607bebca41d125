//! Allocation decisions per second on a node with 8 GPUs and 256 workers (`maxWorkerPerNode`),
//! and the heap memory one worker costs (the allocator's grant and the agent's record, measured
//! with a counting global allocator). Results in docs/benchmarks.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use tensor_fusion_node_agent::agent::WorkerRecord;
use tensor_fusion_node_agent::allocator::{
    Allocator, GpuCapacity, Policy, Resources, ShareRequest,
};
use tensor_fusion_node_agent::worker::{Assignment, ContainerSpec, WorkerSpec};

const GIB: u64 = 1 << 30;

fn node() -> Allocator {
    Allocator::new(
        (0..8)
            .map(|index| GpuCapacity {
                uuid: format!("GPU-5c3b2a1e-0d4f-4e7a-9b8c-1a2b3c4d5e{index:02x}"),
                model: "NVIDIA H100 80GB HBM3".to_owned(),
                physical: Resources {
                    tflops: 989.0,
                    vram_bytes: 80 * GIB,
                },
                virtual_: Resources {
                    tflops: 2967.0,
                    vram_bytes: 120 * GIB,
                },
                native: false,
            })
            .collect(),
        Policy {
            max_workers_per_node: 257,
            ..Policy::default()
        },
    )
}

fn share(vram_gib: u64) -> ShareRequest {
    ShareRequest {
        gpu_count: 1,
        request: Resources {
            tflops: 10.0,
            vram_bytes: vram_gib * GIB / 4,
        },
        limit: Resources {
            tflops: 30.0,
            vram_bytes: vram_gib * GIB / 4,
        },
    }
}

/// A node holding 255 workers of mixed sizes.
fn full_node() -> Allocator {
    let mut allocator = node();
    for worker in 0..255 {
        allocator
            .allocate(&format!("pod-{worker:08x}-uid"), &share(1 + worker % 3))
            .expect("255 small workers fit 8 GPUs");
    }
    allocator
}

fn allocation(c: &mut Criterion) {
    let mut group = c.benchmark_group("allocator_8_gpus_256_workers");
    let allocator = full_node();
    group.bench_function("choose", |b| {
        b.iter(|| black_box(allocator.choose(black_box(&share(2)))))
    });
    let mut churn = full_node();
    group.bench_function("allocate_and_release_256th", |b| {
        b.iter(|| {
            churn.allocate("pod-new", &share(2)).expect("fits");
            black_box(churn.release("pod-new"))
        })
    });
    group.finish();

    // Memory per worker, measured: live heap bytes (counted by the global allocator below) of
    // the allocator's grants plus the agent's per-worker records, for 256 workers.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut allocator = node();
    let mut records = std::collections::BTreeMap::new();
    for worker in 0..256u64 {
        let uid = format!("3f0c{worker:04x}-6b1e-4c2a-9d7e-0a1b2c3d4e5f");
        let grant = allocator
            .allocate(&uid, &share(1 + worker % 3))
            .expect("256 small workers fit 8 GPUs");
        let spec = WorkerSpec {
            namespace: "inference".to_owned(),
            name: format!("llm-serving-7d9f8b6c5d-{worker:05x}"),
            uid: uid.clone(),
            containers: vec![ContainerSpec {
                name: "python".to_owned(),
                gpu_count: 1,
                tflops_request: Some(10.0),
                tflops_limit: Some(30.0),
                vram_request: Some(GIB),
                vram_limit: Some(GIB),
            }],
        };
        let assignment = Assignment {
            node: "gpu-node-1".to_owned(),
            pod_uid: Some(uid.clone()),
            grant,
        };
        records.insert(uid, WorkerRecord { spec, assignment });
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let empty = {
        let start = LIVE_BYTES.load(Ordering::Relaxed);
        let node = node();
        let bytes = LIVE_BYTES.load(Ordering::Relaxed) - start;
        drop(node);
        bytes
    };
    println!(
        "memory per worker (measured): {} bytes of heap for the grant and the agent's record \
         ({} workers, {} bytes in all, {} bytes of it the empty 8-GPU allocator)",
        (after - before - empty) / records.len(),
        records.len(),
        after - before,
        empty
    );
    black_box((allocator, records));
}

/// Counts live heap bytes, for the memory measurement.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only adds counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

criterion_group!(benches, allocation);
criterion_main!(benches);
