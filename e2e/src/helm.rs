//! Helm against the local cluster: the `helm` binary, the chart, the `tensor-fusion-certs`
//! binary, and a stand-in for the kubelet that runs the chart's certificate Jobs.
//!
//! The local cluster has no kubelet: kwok marks pods Running but never runs or completes them, so
//! a Helm hook Job would block `helm install` forever. The chart lets pods of its certificate
//! Jobs carry `kwok.x-k8s.io/status: custom` (kwok then leaves them alone); [`JobRunner`] finds
//! them, runs the Job's `tensor-fusion-certs` command line as a local process under the Job's
//! own ServiceAccount (impersonation), and writes the pod's final status, so the Job controller
//! completes the Job and Helm goes on. The chart's RBAC for the Jobs is thereby tested too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};

use crate::Cluster;

/// Version of helm the scripts build (`HELM_VERSION` in `e2e/scripts/lib.sh`).
pub fn helm_version() -> &'static str {
    include_str!("../scripts/lib.sh")
        .lines()
        .find_map(|line| line.strip_prefix("HELM_VERSION="))
        .unwrap_or("v3.18.6")
}

/// The `helm` binary: `TF_HELM`, else the build cache of `build-binaries.sh helm`, else `PATH`.
pub fn helm_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TF_HELM") {
        return Ok(PathBuf::from(path));
    }
    let cache = std::env::var_os("TF_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/tensor-fusion"))
        })
        .context("neither TF_CACHE_DIR nor HOME is set")?;
    let cached = cache.join(format!("bin/helm-{}/helm", helm_version()));
    if cached.exists() {
        return Ok(cached);
    }
    let on_path = Command::new("helm")
        .arg("version")
        .stdout(Stdio::null())
        .status();
    if on_path.is_ok_and(|status| status.success()) {
        return Ok(PathBuf::from("helm"));
    }
    bail!(
        "helm not found at {} nor on PATH: run `e2e/scripts/build-binaries.sh helm`",
        cached.display()
    )
}

/// The chart directory.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tensor-fusion")
}

/// The `tensor-fusion-certs` binary, brought up to date by the cargo that runs the tests (the
/// e2e script does not build it; a stale binary would lack current subcommands). It is built in
/// its own target directory next to the test's (`<target>/e2e-certs`): a build of one package
/// in the shared one could rebuild dependencies with other features under the running tests.
pub fn certs_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("test executable has no target directory")?
        .join("e2e-certs");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "tensor-fusion-certs",
            "--target-dir",
        ])
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .context("running cargo build -p tensor-fusion-certs")?;
    anyhow::ensure!(
        status.success(),
        "cargo build -p tensor-fusion-certs failed"
    );
    Ok(target_dir.join("debug/tensor-fusion-certs"))
}

/// `helm` with the cluster's kubeconfig.
pub struct Helm {
    binary: PathBuf,
    kubeconfig: PathBuf,
}

/// What a helm command printed.
pub struct HelmOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Helm {
    pub fn new(cluster: &Cluster) -> anyhow::Result<Self> {
        Ok(Self {
            binary: helm_binary()?,
            kubeconfig: cluster.kubeconfig.clone(),
        })
    }

    /// Runs helm; the caller looks at success and output.
    pub fn output(&self, args: &[&str]) -> anyhow::Result<HelmOutput> {
        let output = Command::new(&self.binary)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "HELM_CACHE_HOME",
                std::env::temp_dir().join("tf-e2e-helm/cache"),
            )
            .env(
                "HELM_CONFIG_HOME",
                std::env::temp_dir().join("tf-e2e-helm/config"),
            )
            .env(
                "HELM_DATA_HOME",
                std::env::temp_dir().join("tf-e2e-helm/data"),
            )
            .output()
            .with_context(|| format!("running {}", self.binary.display()))?;
        Ok(HelmOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs helm and returns stdout; fails with stderr if helm fails.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.output(args)?;
        if !output.success {
            bail!("helm {} failed: {}", args.join(" "), output.stderr);
        }
        Ok(output.stdout)
    }
}

/// Runs the certificate Jobs' pods of one namespace until dropped; see the module docs.
pub struct JobRunner {
    stop: Arc<AtomicBool>,
    runs: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JobRunner {
    /// Starts runner for the Job pods of `namespace`, running them with the `certs` binary.
    pub fn start(cluster: &Cluster, namespace: &str, certs: &Path) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let context = RunnerContext {
            client: cluster.client.clone(),
            kubeconfig: cluster.kubeconfig.clone(),
            namespace: namespace.to_owned(),
            certs: certs.to_owned(),
            dir: tempfile::tempdir()?,
        };
        let task = tokio::spawn(context.run(stop.clone(), runs.clone(), failures.clone()));
        Ok(Self {
            stop,
            runs,
            failures,
            task,
        })
    }

    /// Job pods run so far, and how many of them failed.
    pub fn runs(&self) -> (usize, usize) {
        (
            self.runs.load(Ordering::SeqCst),
            self.failures.load(Ordering::SeqCst),
        )
    }
}

impl Drop for JobRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

struct RunnerContext {
    client: Client,
    kubeconfig: PathBuf,
    namespace: String,
    certs: PathBuf,
    dir: tempfile::TempDir,
}

impl RunnerContext {
    async fn run(self, stop: Arc<AtomicBool>, runs: Arc<AtomicUsize>, failures: Arc<AtomicUsize>) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut done = HashSet::new();
        while !stop.load(Ordering::SeqCst) {
            let listed = pods
                .list(&ListParams::default().labels("batch.kubernetes.io/job-name"))
                .await;
            for pod in listed.map(|list| list.items).unwrap_or_default() {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let phase = pod
                    .status
                    .as_ref()
                    .and_then(|status| status.phase.as_deref());
                if done.contains(&uid) || matches!(phase, Some("Succeeded" | "Failed")) {
                    continue;
                }
                match self.run_pod(&pods, &pod).await {
                    Ok(success) => {
                        runs.fetch_add(1, Ordering::SeqCst);
                        if !success {
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                        done.insert(uid);
                    }
                    Err(error) => eprintln!("job runner: {error:#}"),
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Runs the pod's only container as a local process; returns whether it exited with 0.
    async fn run_pod(&self, pods: &Api<Pod>, pod: &Pod) -> anyhow::Result<bool> {
        let name = pod.metadata.name.clone().context("pod without a name")?;
        let spec = pod.spec.as_ref().context("pod without a spec")?;
        let container = spec.containers.first().context("pod without containers")?;
        let account = spec.service_account_name.as_deref().unwrap_or("default");
        let kubeconfig = self.impersonating_kubeconfig(account)?;
        let args = container.args.clone().unwrap_or_default();
        let log = std::fs::File::create(std::env::temp_dir().join(format!("tf-certs-{name}.log")))?;
        let certs = self.certs.clone();
        let status = tokio::task::spawn_blocking(move || {
            Command::new(certs)
                .args(&args)
                .env("KUBECONFIG", kubeconfig)
                .env("TF_LOG_LEVEL", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .status()
        })
        .await??;
        let (phase, exit_code, reason) = if status.success() {
            ("Succeeded", 0, "Completed")
        } else {
            ("Failed", status.code().unwrap_or(1), "Error")
        };
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = serde_json::json!({
            "status": {
                "phase": phase,
                "containerStatuses": [{
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": false,
                    "restartCount": 0,
                    "state": { "terminated": {
                        "exitCode": exit_code, "reason": reason,
                        "startedAt": now, "finishedAt": now
                    } }
                }]
            }
        });
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("writing the status of pod {name}"))?;
        Ok(status.success())
    }

    /// A copy of the cluster's kubeconfig that acts as `account` (JSON, which is YAML).
    fn impersonating_kubeconfig(&self, account: &str) -> anyhow::Result<PathBuf> {
        let mut config = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let user = format!("system:serviceaccount:{}:{account}", self.namespace);
        for named in &mut config.auth_infos {
            if let Some(auth) = named.auth_info.as_mut() {
                auth.impersonate = Some(user.clone());
            }
        }
        let path = self.dir.path().join(format!("{account}.kubeconfig"));
        std::fs::write(&path, serde_json::to_vec(&config)?)?;
        Ok(path)
    }
}
