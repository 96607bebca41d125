//! Test tooling: builds the interposer, the mock driver libraries and the probe (once per test
//! binary, with a nested `cargo build` into its own target directory under
//! `CARGO_TARGET_TMPDIR`, so it works from `cargo test --workspace` and `-p` alike without
//! waiting on the outer build's lock), lays the mocks out under their real sonames, and runs
//! probe processes with `LD_PRELOAD` in a fresh pod directory.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the tooling"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// UUID of mock GPU `index` (see tensor-fusion-mock-gpu-sim).
pub fn mock_uuid(index: u32) -> String {
    tensor_fusion_mock_gpu_sim::uuid_string(index)
}

pub struct Fixtures {
    pub interposer: PathBuf,
    pub probe: PathBuf,
    /// Holds `libcuda.so.1` and `libnvidia-ml.so.1` (the mocks).
    pub driver_dir: PathBuf,
    pub mock_cuda: PathBuf,
}

fn build(release: bool) -> anyhow::Result<Fixtures> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("interposer crate has a parent directory")?;
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interposer-fixtures");
    let mut command = Command::new(env!("CARGO"));
    command.args(["build", "--quiet"]);
    if release {
        command.arg("--release");
    }
    let status = command
        .current_dir(workspace)
        .args([
            "-p",
            "tensor-fusion-interposer",
            "-p",
            "tensor-fusion-mock-cuda",
            "-p",
            "tensor-fusion-mock-nvml",
            "-p",
            "tensor-fusion-mock-probe",
            "--target-dir",
        ])
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .status()
        .context("running cargo build for the test fixtures")?;
    if !status.success() {
        bail!("cargo build of the interposer test fixtures failed: {status}");
    }
    let built = target.join(if release { "release" } else { "debug" });
    let driver_dir = built.join("driver");
    std::fs::create_dir_all(&driver_dir)?;
    for (library, soname) in [
        ("libtensor_fusion_mock_cuda.so", "libcuda.so.1"),
        ("libtensor_fusion_mock_nvml.so", "libnvidia-ml.so.1"),
    ] {
        let staged = driver_dir.join(soname);
        let temporary = driver_dir.join(format!("{soname}.tmp{}", std::process::id()));
        std::fs::copy(built.join(library), &temporary)
            .with_context(|| format!("copying {library}"))?;
        std::fs::rename(&temporary, &staged)?;
    }
    Ok(Fixtures {
        interposer: built.join("libtensor_fusion_interposer.so"),
        probe: built.join("tf-cuda-probe"),
        mock_cuda: driver_dir.join("libcuda.so.1"),
        driver_dir,
    })
}

pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| build(false).expect("building the interposer test fixtures"))
}

/// The fixtures built with `--release`, for benchmarks.
pub fn release_fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| build(true).expect("building the interposer bench fixtures"))
}

/// A pod directory with one container's limits file, and probes run inside it.
pub struct Pod {
    pub dir: tempfile::TempDir,
    pub container: String,
    pub env: Vec<(String, String)>,
}

impl Pod {
    /// A pod whose container `main` gets `limits` (lines of the limits file, without version).
    pub fn with_limits(limits: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary pod directory");
        std::fs::write(
            dir.path().join("main.limits"),
            format!("version=1\n{limits}\n"),
        )
        .expect("writing the limits file");
        Self {
            env: vec![
                ("TF_POD_DIR".into(), dir.path().display().to_string()),
                ("TF_CONTAINER_NAME".into(), "main".into()),
            ],
            dir,
            container: "main".into(),
        }
    }

    /// A pod whose container `main` has exactly `text` as its limits file.
    pub fn with_file(text: &str) -> Self {
        let pod = Self::unlimited();
        std::fs::write(pod.dir.path().join("main.limits"), text).expect("writing the limits file");
        pod
    }

    /// A pod directory with no limits file and no limit variables; the interposer does not wait
    /// for the node agent's file (`TF_LIMITS_WAIT_SECONDS=0`).
    pub fn unlimited() -> Self {
        let dir = tempfile::tempdir().expect("temporary pod directory");
        Self {
            env: vec![
                ("TF_POD_DIR".into(), dir.path().display().to_string()),
                ("TF_CONTAINER_NAME".into(), "main".into()),
                ("TF_LIMITS_WAIT_SECONDS".into(), "0".into()),
            ],
            dir,
            container: "main".into(),
        }
    }

    /// A process outside any pod: no `TF_POD_DIR`, so no limits file and per-process accounting.
    pub fn outside_a_pod(mut self) -> Self {
        self.env.retain(|(key, _)| key != "TF_POD_DIR");
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn usage_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.shm", self.container))
    }

    /// The probe command with `LD_PRELOAD` of the interposer and the mock driver on the path.
    pub fn probe(&self, via: &str, ops: &[&str]) -> Command {
        let fixtures = fixtures();
        let mut command = Command::new(&fixtures.probe);
        command
            .arg(via)
            .args(ops)
            .env("LD_PRELOAD", &fixtures.interposer)
            .env("LD_LIBRARY_PATH", &fixtures.driver_dir)
            .env("TF_LOG_LEVEL", "info")
            .envs(self.env.iter().map(|(key, value)| (key, value)));
        command
    }

    /// Runs a probe to completion; panics with its output if it failed.
    pub fn run(&self, via: &str, ops: &[&str]) -> Report {
        let output = self
            .probe(via, ops)
            .output()
            .expect("starting the probe process");
        Report::from_output(&output)
    }

    /// Runs a probe against the mock driver alone, without the interposer.
    pub fn run_without_interposer(&self, via: &str, ops: &[&str]) -> Report {
        let output = self
            .probe(via, ops)
            .env_remove("LD_PRELOAD")
            .output()
            .expect("starting the probe process");
        Report::from_output(&output)
    }

    /// Starts a probe that holds its state after `ops` until its stdin closes.
    pub fn spawn_holding(&self, via: &str, ops: &[&str]) -> Holding {
        let mut ops = ops.to_vec();
        ops.push("hold");
        let mut child = self
            .probe(via, &ops)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the probe process");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("reading probe output");
            let done = line.starts_with("hold ");
            seen.push(line);
            if done {
                break;
            }
        }
        Holding {
            child,
            report: Report::from_lines(seen.join("\n"), String::new()),
        }
    }
}

/// A probe process that holds its allocations until released or killed.
pub struct Holding {
    pub child: Child,
    pub report: Report,
}

impl Holding {
    pub fn release(mut self) {
        drop(self.child.stdin.take());
        self.child.wait().expect("waiting for the probe");
    }

    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL the probe");
        self.child.wait().expect("reaping the probe");
    }
}

/// The lines a probe printed, looked up by op.
#[derive(Debug)]
pub struct Report {
    pub stdout: String,
    pub stderr: String,
}

impl Report {
    pub fn from_output(output: &Output) -> Self {
        let report = Self::from_lines(
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        assert!(
            output.status.success(),
            "probe failed: {}\n{report:?}",
            output.status
        );
        report
    }

    fn from_lines(stdout: String, stderr: String) -> Self {
        Self { stdout, stderr }
    }

    /// The `key=value` fields of the line printed for `op`.
    pub fn fields(&self, op: &str) -> HashMap<String, String> {
        let line = self
            .stdout
            .lines()
            .find(|line| line.split(' ').next() == Some(op))
            .unwrap_or_else(|| panic!("no line for {op:?} in probe output:\n{self:?}"));
        line.split(' ')
            .skip(1)
            .filter_map(|field| field.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect()
    }

    pub fn get(&self, op: &str, key: &str) -> String {
        self.fields(op)
            .remove(key)
            .unwrap_or_else(|| panic!("no {key} for {op:?} in probe output:\n{self:?}"))
    }

    /// The value of `key` on every line printed for `op`, in order.
    pub fn all(&self, op: &str, key: &str) -> Vec<String> {
        self.stdout
            .lines()
            .filter(|line| line.split(' ').next() == Some(op))
            .filter_map(|line| {
                line.split(' ')
                    .skip(1)
                    .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))
                    .map(str::to_owned)
            })
            .collect()
    }

    pub fn number(&self, op: &str, key: &str) -> u64 {
        let value = self.get(op, key);
        value
            .parse()
            .unwrap_or_else(|_| panic!("{op} {key}={value} is not a number"))
    }
}
