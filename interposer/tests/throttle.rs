//! A throttled launch in a real process under `LD_PRELOAD` follows the refill rate the node
//! agent writes while it waits: the interposer sleeps in bounded slices and re-reads the rate
//! after each, instead of sleeping the whole wait its first rate implied.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::Pod;
use tensor_fusion_interposer_core::shm::UsageFile;

#[test]
fn a_rate_raised_while_a_launch_waits_lets_it_go() {
    // 1000 tokens per second and no burst: one launch of 100 blocks of 200 threads owes 20 s.
    let pod = Pod::with_limits("tflops_limit=10\nrefill_rate=1000\nburst_seconds=0\n");
    let probe = pod
        .probe("exports", &["init", "ctx:0", "launch:1:100:200"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the probe process");

    // The agent's part: once the launch is waiting, raise the rate.
    let deadline = Instant::now() + Duration::from_secs(10);
    let usage = loop {
        if let Ok(usage) = UsageFile::attach(&pod.usage_path())
            && usage.launch_stats(0).throttled_launches == 1
        {
            break usage;
        }
        assert!(Instant::now() < deadline, "the launch was never throttled");
        std::thread::sleep(Duration::from_millis(5));
    };
    usage.set_refill_rate(0, 1e12);

    let output = probe.wait_with_output().expect("waiting for the probe");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("launch:1:100:200 result=0"),
        "probe failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // The throttled time the agent exports is the time the launch really waited: until the
    // raise (the probe starting up and the poll above) plus at most a slice, not 20 s.
    let throttled_seconds = usage.launch_stats(0).throttled_ns as f64 / 1e9;
    assert!(
        throttled_seconds < 10.0,
        "the launch waited {throttled_seconds:.3} s of the 20 s its first rate implied"
    );
}
