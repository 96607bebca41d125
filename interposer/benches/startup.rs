//! What the interposer adds to a process's start: a probe process that loads `libcuda.so.1`
//! (the mock), calls `cuInit` and `cuDeviceGetCount`, and exits, run alternately with and
//! without `LD_PRELOAD` of the interposer. The difference of the medians is the interposer's
//! start-up cost (loading the library, reading the limits file, mapping the usage file,
//! loading the real driver), measured in the same run as the bare process.
//!
//! `cargo bench -p tensor-fusion-interposer --bench startup`

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

const ROUNDS: usize = 300;

fn run(command: &mut Command) -> Duration {
    let start = Instant::now();
    let output = command.output().expect("starting the probe");
    let elapsed = start.elapsed();
    assert!(
        output.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("init result=0"),
        "cuInit did not succeed: {stdout}"
    );
    elapsed
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn main() {
    let fixtures = support::release_fixtures();
    let pod = tempfile::tempdir().expect("pod directory");
    std::fs::write(
        pod.path().join("bench.limits"),
        format!(
            "version=1\ngpu_uuids={}\nvram_limit=4294967296\ntflops_limit=100\n",
            support::mock_uuid(0)
        ),
    )
    .expect("limits file");
    let probe = |preload: bool| {
        let mut command = Command::new(&fixtures.probe);
        command
            .args(["exports", "init", "count"])
            .env("LD_LIBRARY_PATH", &fixtures.driver_dir)
            .env("TF_POD_DIR", pod.path())
            .env("TF_CONTAINER_NAME", "bench")
            .env("TF_LOG_LEVEL", "warn");
        if preload {
            command.env("LD_PRELOAD", &fixtures.interposer);
        }
        command
    };
    // Warm the page cache and the dynamic loader's paths.
    for _ in 0..10 {
        run(&mut probe(false));
        run(&mut probe(true));
    }
    let mut bare = Vec::with_capacity(ROUNDS);
    let mut interposed = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        bare.push(run(&mut probe(false)));
        interposed.push(run(&mut probe(true)));
    }
    let bare = median(&mut bare);
    let interposed = median(&mut interposed);
    println!(
        "startup: process without the interposer {:.0} µs, with it {:.0} µs (medians of {ROUNDS} \
         alternating runs); added {:.0} µs, ratio {:.2}",
        bare.as_secs_f64() * 1e6,
        interposed.as_secs_f64() * 1e6,
        (interposed.as_secs_f64() - bare.as_secs_f64()) * 1e6,
        interposed.as_secs_f64() / bare.as_secs_f64(),
    );
}
