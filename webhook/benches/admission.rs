//! In-process cost of one admission decision: JSON in, decision, JSON patch out.
//!
//! `cargo bench -p tensor-fusion-webhook --bench admission`

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;
use tensor_fusion_webhook::admission::{Admitter, Decision};
use tensor_fusion_webhook::slots::MemorySlots;

const FIXTURE: &str = include_str!("../tests/fixtures/canary-pod-review.json");

fn body(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut review: Value = serde_json::from_str(FIXTURE).expect("the fixture is JSON");
    edit(&mut review["request"]["object"]["metadata"]["annotations"]);
    serde_json::to_vec(&review).expect("JSON serializes")
}

fn admission(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds");
    let mut group = c.benchmark_group("admission");

    // A shared pod without enabled-replicas: no coordination at all.
    let plain = body(|annotations| {
        annotations
            .as_object_mut()
            .map(|map| map.remove("tensor-fusion.ai/enabled-replicas"));
    });
    let admitter = Admitter::new(MemorySlots::default());
    group.bench_function("shared, no canary", |b| {
        b.iter(|| {
            let (_, decision) = runtime.block_on(admitter.review(&plain)).expect("answers");
            assert_eq!(decision, Decision::Shared);
        });
    });

    // A canary pod whose quota is full: the native path with an in-process slot store.
    let canary = body(|_| {});
    let full = Admitter::new(MemorySlots::default());
    for _ in 0..3 {
        runtime.block_on(full.review(&canary)).expect("answers");
    }
    group.bench_function("native, canary quota full (in-process slots)", |b| {
        b.iter(|| {
            let (_, decision) = runtime.block_on(full.review(&canary)).expect("answers");
            assert_eq!(decision, Decision::Native);
        });
    });

    // A denial: the annotation check fails first.
    let bad = body(|annotations| annotations["tensor-fusion.ai/vram-limit"] = "3Gx".into());
    group.bench_function("denied, bad quantity", |b| {
        b.iter(|| {
            let (_, decision) = runtime.block_on(admitter.review(&bad)).expect("answers");
            assert_eq!(decision, Decision::Denied);
        });
    });
    group.finish();
}

criterion_group!(benches, admission);
criterion_main!(benches);
