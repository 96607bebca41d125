//! The agent's NVML bindings against the mock `libnvidia-ml.so.1` through the real FFI path
//! (libloading, the C structs, the two-call size protocol of `nvmlDeviceGetProcessUtilization`).
//! One test function: the mock reads its configuration from this process's environment.

use std::path::{Path, PathBuf};
use std::process::Command;

use tensor_fusion_node_agent::discovery::Nvml;

/// Builds the mock NVML into this test's own target directory and returns the library.
fn mock_nvml() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvml-fixture");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "tensor-fusion-mock-nvml",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(workspace)
        .env_remove("RUSTFLAGS")
        .status()
        .expect("running cargo build for the mock NVML");
    assert!(status.success(), "building the mock NVML failed: {status}");
    target.join("debug/libtensor_fusion_mock_nvml.so")
}

#[test]
fn discovery_and_per_process_utilisation_through_the_ffi() {
    let library = mock_nvml();
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("utilisation");
    // SAFETY: set before the library is loaded, in the only test of this binary.
    unsafe {
        std::env::set_var("TF_MOCK_GPU_COUNT", "2");
        std::env::set_var("TF_MOCK_VRAM_BYTES", "85899345920");
        std::env::set_var("TF_MOCK_NVML_UTILISATION", &samples);
    }
    let nvml = Nvml::load(&library).unwrap();

    let gpus = nvml.gpus().unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[1].index, 1);
    assert_eq!(gpus[0].vram_bytes, 85899345920);
    assert_eq!(gpus[0].model, "NVIDIA H100 80GB HBM3");
    assert_ne!(gpus[0].uuid, gpus[1].uuid);

    // No samples yet: NVML answers NOT_FOUND, which is an empty list, not an error.
    assert!(nvml.process_utilisation(0, 0).unwrap().is_empty());

    std::fs::write(&samples, "0 41 30\n0 977 20\n1 5 50\n").unwrap();
    let on_first: Vec<(u32, u32)> = nvml
        .process_utilisation(0, 0)
        .unwrap()
        .iter()
        .map(|sample| (sample.pid, sample.sm_percent))
        .collect();
    assert_eq!(on_first, [(41, 30), (977, 20)]);
    let on_second = nvml.process_utilisation(1, 0).unwrap();
    assert_eq!((on_second.len(), on_second[0].pid), (1, 5));

    // A GPU index NVML does not have is an error that names the call.
    let error = nvml.process_utilisation(7, 0).unwrap_err().to_string();
    assert!(error.contains("nvmlDeviceGetHandleByIndex"), "{error}");
}
