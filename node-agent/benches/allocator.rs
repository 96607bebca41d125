//! Allocation decisions per second on a node with 8 GPUs and 256 workers (`maxWorkerPerNode`),
//! and the memory one worker's grant costs the allocator. Results in docs/benchmarks.md.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tensor_fusion_node_agent::allocator::{
    Allocator, GpuCapacity, Policy, Resources, ShareRequest,
};

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

    // Memory per worker: heap bytes the grants of 256 workers hold, estimated from their parts.
    let grants = full_node();
    let per_worker: usize = grants
        .grants()
        .iter()
        .map(|(worker, grant)| {
            worker.capacity()
                + std::mem::size_of_val(grant)
                + grant.gpu_uuids.capacity() * std::mem::size_of::<String>()
                + grant.gpu_uuids.iter().map(String::capacity).sum::<usize>()
                + std::mem::size_of::<(String, u64)>()
        })
        .sum::<usize>()
        / grants.grants().len();
    println!("allocator memory per worker: ~{per_worker} bytes (grant, key and map entry)");
}

criterion_group!(benches, allocation);
criterion_main!(benches);
