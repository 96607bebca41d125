//! Node agent processes for the e2e tests: one `tensor-fusion-node-agent` per kwok node, each on
//! the mock NVML (`libtensor_fusion_mock_nvml.so`, GPU count and memory from `TF_MOCK_*`, or
//! from its GPU list file once a test writes one) with its own host root (the
//! `/run/tensor-fusion` of that node) and device plugin checkpoint path. The agents resync
//! every [`RESYNC_SECONDS`], so tests see GPU changes and node status repairs quickly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Cluster, balancer, free_port, wait_for};

/// A binary or library next to this test executable (`cargo build` puts them in the same
/// target directory).
fn built_artifact(name: &str, build_hint: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target directory")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!("{} not found: run `{build_hint}` first", path.display());
    }
    Ok(path)
}

/// The agents' `--resync-seconds`.
pub const RESYNC_SECONDS: u64 = 1;

/// The mock GPUs one agent sees.
#[derive(Debug, Clone, Copy)]
pub struct MockGpus {
    pub count: u32,
    pub vram_bytes: u64,
}

/// A node agent process, killed when dropped. Its host root and checkpoint directory outlive a
/// [`AgentProcess::kill`], so a restart finds what the killed process left.
pub struct AgentProcess {
    child: Option<Child>,
    pub node: String,
    pub port: u16,
    pub host_root: PathBuf,
    pub checkpoint: PathBuf,
    /// The mock NVML's GPU list file (`TF_MOCK_NVML_GPUS`); absent until a test writes it.
    pub gpu_list: PathBuf,
    gpus: MockGpus,
    kubeconfig: PathBuf,
    log: PathBuf,
    /// Environment for the next spawn only (fault injection), then cleared.
    next_env: Vec<(String, String)>,
}

impl AgentProcess {
    /// Starts an agent for `node` in a fresh temporary host root under `dir`.
    pub async fn start(
        cluster: &Cluster,
        dir: &Path,
        node: &str,
        gpus: MockGpus,
    ) -> anyhow::Result<Self> {
        Self::start_with_env(cluster, dir, node, gpus, &[]).await
    }

    /// Like [`Self::start`], with `env` set for this first process only (not for restarts).
    pub async fn start_with_env(
        cluster: &Cluster,
        dir: &Path,
        node: &str,
        gpus: MockGpus,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let host_root = dir.join(node).join("run");
        std::fs::create_dir_all(&host_root)?;
        let mut agent = Self {
            child: None,
            node: node.to_owned(),
            port: free_port(),
            host_root,
            checkpoint: dir.join(node).join("kubelet_internal_checkpoint"),
            gpu_list: dir.join(node).join("nvml-gpus"),
            gpus,
            kubeconfig: cluster.kubeconfig.clone(),
            log: std::env::temp_dir().join(format!("tf-agent-{node}.log")),
            next_env: env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
        };
        agent.spawn().await?;
        Ok(agent)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        // TF_E2E_AGENT_BINARY: another build of the agent (a benchmark's A/B).
        let binary = match std::env::var_os("TF_E2E_AGENT_BINARY") {
            Some(path) => PathBuf::from(path),
            None => built_artifact(
                "tensor-fusion-node-agent",
                "cargo build -p tensor-fusion-node-agent",
            )?,
        };
        let nvml = built_artifact(
            "libtensor_fusion_mock_nvml.so",
            "cargo build -p tensor-fusion-mock-nvml",
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(binary)
            .args(["--node-name", &self.node])
            .arg("--host-root")
            .arg(&self.host_root)
            .arg("--nvml-path")
            .arg(nvml)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--pod-resources-socket")
            .arg(self.host_root.join("no-kubelet.sock"))
            .arg("--device-plugin-checkpoint")
            .arg(&self.checkpoint)
            .args(["--resync-seconds", &RESYNC_SECONDS.to_string()])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("TF_MOCK_NVML_GPUS", &self.gpu_list)
            .env("TF_MOCK_GPU_COUNT", self.gpus.count.to_string())
            .env("TF_MOCK_VRAM_BYTES", self.gpus.vram_bytes.to_string())
            .env("TF_LOG_LEVEL", "info")
            .envs(std::mem::take(&mut self.next_env))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tensor-fusion-node-agent")?;
        self.child = Some(child);
        wait_for(
            "the node agent to list its pods",
            Duration::from_secs(30),
            || async {
                Ok(self
                    .get("/healthz")
                    .await
                    .is_ok_and(|(status, _)| status == 200))
            },
        )
        .await
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself (a crash the test injected) and returns how.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let started = std::time::Instant::now();
        loop {
            let child = self.child.as_mut().context("the agent is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if started.elapsed() > timeout {
                bail!("the agent on {} still runs after {timeout:?}", self.node);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the agent again with the same node, host root and checkpoint path.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Makes the mock NVML report `gpus` from now on (the agent sees it at its next resync).
    pub fn set_gpus(&self, gpus: MockGpus) -> anyhow::Result<()> {
        self.write_gpu_list(&format!("{} {}\n", gpus.count, gpus.vram_bytes))
    }

    /// Makes the mock NVML's device count fail until [`Self::set_gpus`].
    pub fn fail_nvml(&self) -> anyhow::Result<()> {
        self.write_gpu_list("fail\n")
    }

    fn write_gpu_list(&self, text: &str) -> anyhow::Result<()> {
        let tmp = self.gpu_list.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.gpu_list)?;
        Ok(())
    }

    /// GET on the agent's HTTP endpoint: (status, body).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        balancer::plain_get(self.port, path).await
    }

    /// `GET /api/allocation` as JSON.
    pub async fn allocation(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get("/api/allocation").await?;
        anyhow::ensure!(status == 200, "GET /api/allocation: {status} {body}");
        Ok(serde_json::from_str(&body)?)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A shared pod template as the webhook would leave it (annotation `tensor-fusion.ai/injected`,
/// the `TF_*` environment and the extended resources; per-GPU TFLOPS 100/200 and `vram` bytes),
/// without the enabled label, so it needs no webhook registration; required onto `nodes`.
pub fn shared_template(app: &str, vram: u64, nodes: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "labels": { "app": app },
            "annotations": { "tensor-fusion.ai/injected": "true" }
        },
        "spec": {
            "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{ "matchExpressions": [{
                    "key": "kubernetes.io/hostname", "operator": "In", "values": nodes
                }]}]
            }}},
            "containers": [{
                "name": "python",
                "image": "registry.local/inference:1.4",
                "env": [
                    { "name": "TF_POD_UID", "valueFrom": { "fieldRef": { "fieldPath": "metadata.uid" } } },
                    { "name": "TF_CONTAINER_NAME", "value": "python" },
                    { "name": "TF_GPU_COUNT", "value": "1" },
                    { "name": "TF_TFLOPS_REQUEST", "value": "100" },
                    { "name": "TF_TFLOPS_LIMIT", "value": "200" },
                    { "name": "TF_VRAM_REQUEST", "value": vram.to_string() },
                    { "name": "TF_VRAM_LIMIT", "value": vram.to_string() },
                    { "name": "TF_POD_DIR", "value": "/run/tensor-fusion/pod" }
                ],
                "resources": {
                    "requests": { "tensor-fusion.ai/tflops": "100", "tensor-fusion.ai/vram": vram.to_string() },
                    "limits": { "tensor-fusion.ai/tflops": "100", "tensor-fusion.ai/vram": vram.to_string() }
                }
            }]
        }
    })
}

/// Waits until each of `nodes` advertises the VRAM of `gpus` (what its agent publishes), so the
/// scheduler sees the agents' capacity before pods arrive.
pub async fn wait_advertised_vram(
    cluster: &Cluster,
    nodes: &[&str],
    gpus: MockGpus,
) -> anyhow::Result<()> {
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(cluster.client.clone());
    let expected = (u64::from(gpus.count) * gpus.vram_bytes).to_string();
    wait_for(
        "the nodes to advertise the agents' VRAM",
        Duration::from_secs(30),
        || async {
            for node in nodes {
                let node = api.get(node).await?;
                let allocatable = node.status.and_then(|status| status.allocatable);
                let vram = allocatable
                    .as_ref()
                    .and_then(|resources| resources.get("tensor-fusion.ai/vram"))
                    .map(|quantity| quantity.0.clone());
                if vram.as_deref() != Some(expected.as_str()) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await
}
