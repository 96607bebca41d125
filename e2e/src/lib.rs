//! Test harness for the end-to-end tests: the local cluster, webhook processes, their
//! registration, and a round-robin balancer that puts two webhook processes behind one URL.
//!
//! The cluster itself is started by `e2e/scripts/cluster.sh up` (the Makefile does it); tests
//! find it through `TF_E2E_KUBECONFIG`. Without that variable the tests print that they were
//! skipped and pass, so `cargo test --workspace` works on a machine without the cluster.

pub mod agent;
pub mod balancer;
pub mod helm;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tensor_fusion_certs::CertificateAuthority;

/// The running local cluster.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub client: Client,
}

impl Cluster {
    /// The cluster named by `TF_E2E_KUBECONFIG`, or `None` (the caller skips) without it.
    pub async fn from_env() -> anyhow::Result<Option<Self>> {
        let Some(kubeconfig) = std::env::var_os("TF_E2E_KUBECONFIG").map(PathBuf::from) else {
            eprintln!("skipped: TF_E2E_KUBECONFIG is not set (run `make test` for the e2e suite)");
            return Ok(None);
        };
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig)?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        let client = Client::try_from(config)?;
        Ok(Some(Self { kubeconfig, client }))
    }

    /// Runs `kubectl` against the cluster and returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.run_kubectl(args)?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Runs kubectl and returns its standard output whatever its exit status (`kubectl auth
    /// can-i` answers "no" with status 1).
    pub fn kubectl_output(&self, args: &[&str]) -> anyhow::Result<String> {
        Ok(String::from_utf8(self.run_kubectl(args)?.stdout)?)
    }

    fn run_kubectl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .context("running kubectl")
    }

    /// Applies a YAML document through `kubectl apply`.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(yaml.as_bytes())?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "kubectl apply failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Creates a fresh namespace for one test; it is deleted when the guard drops.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace> {
        let name = format!("{prefix}-{:x}", std::process::id() ^ nanos());
        let api: Api<Namespace> = Api::all(self.client.clone());
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name }
        }))?;
        api.create(&PostParams::default(), &namespace).await?;
        // Pods need the namespace's default service account.
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &name);
        wait_for(
            "the default service account",
            Duration::from_secs(30),
            || async { Ok(accounts.get_opt("default").await?.is_some()) },
        )
        .await?;
        Ok(TestNamespace {
            name,
            kubeconfig: self.kubeconfig.clone(),
        })
    }

    /// Registers the webhook at `https://127.0.0.1:<port>/mutate-v1-pod` and waits until the API
    /// server calls it (a dry-run pod comes back mutated).
    pub async fn register_webhook(&self, port: u16, ca_pem: &str) -> anyhow::Result<()> {
        let template = include_str!("../manifests/webhook-configuration.yaml");
        let yaml = template
            .replace(
                "${WEBHOOK_URL}",
                &format!("https://127.0.0.1:{port}/mutate-v1-pod"),
            )
            .replace(
                "${CA_BUNDLE}",
                &base64::engine::general_purpose::STANDARD.encode(ca_pem),
            );
        self.apply(&yaml)?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "default");
        let probe: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "generateName": "webhook-probe-",
                "labels": { "tensor-fusion.ai/enabled": "true" },
                "annotations": { "tensor-fusion.ai/vram-limit": "1Gi" }
            },
            "spec": { "containers": [{ "name": "probe", "image": "probe" }] }
        }))?;
        let dry_run = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        wait_for(
            "the API server to call the webhook",
            Duration::from_secs(60),
            || async {
                match pods.create(&dry_run, &probe).await {
                    Ok(pod) => Ok(annotation(&pod, "tensor-fusion.ai/injected") == Some("true")),
                    Err(_) => Ok(false),
                }
            },
        )
        .await
    }

    /// Pods of a namespace that are not terminating.
    pub async fn live_pods(&self, namespace: &str, selector: &str) -> anyhow::Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let list = api.list(&ListParams::default().labels(selector)).await?;
        Ok(list
            .items
            .into_iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .collect())
    }

    /// Merge-patches a Deployment.
    pub async fn patch_deployment(
        &self,
        namespace: &str,
        name: &str,
        patch: serde_json::Value,
    ) -> anyhow::Result<()> {
        let api: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(self.client.clone(), namespace);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

/// A namespace that is deleted when dropped (the API server finishes the deletion in the
/// background), so a failed test leaves no controllers retrying against a stopped webhook.
pub struct TestNamespace {
    pub name: String,
    kubeconfig: PathBuf,
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Whether the webhook put this pod on shared GPUs.
pub fn is_shared(pod: &Pod) -> bool {
    annotation(pod, "tensor-fusion.ai/injected") == Some("true")
}

/// The container's `nvidia.com/gpu` limit, as written.
pub fn native_gpu_limit(pod: &Pod, container: usize) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let limits = spec
        .containers
        .get(container)?
        .resources
        .as_ref()?
        .limits
        .as_ref()?;
    limits
        .get("nvidia.com/gpu")
        .map(|quantity| quantity.0.clone())
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos())
}

/// Polls `check` every 200 ms until it returns true or `timeout` passes.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(error) => bail!("timed out after {timeout:?} waiting for {what}: {error:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding an ephemeral loopback port")
}

/// A CA and a serving certificate for 127.0.0.1 in a temporary directory (tls.crt, tls.key).
pub struct TestCerts {
    pub ca: CertificateAuthority,
    pub dir: tempfile::TempDir,
}

impl TestCerts {
    pub fn generate() -> anyhow::Result<Self> {
        let ca =
            CertificateAuthority::generate("tensor-fusion-e2e-ca", Duration::from_secs(86_400))?;
        let dir = tempfile::tempdir()?;
        let certs = Self { ca, dir };
        certs.rotate()?;
        Ok(certs)
    }

    /// Issues a new serving certificate and replaces the files atomically (key first).
    pub fn rotate(&self) -> anyhow::Result<()> {
        let pair = self.ca.issue_serving(
            &["localhost".to_owned()],
            &["127.0.0.1".parse()?],
            Duration::from_secs(86_400),
        )?;
        for (name, text) in [("tls.key", &pair.key_pem), ("tls.crt", &pair.cert_pem)] {
            let tmp = self.dir.path().join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, self.dir.path().join(name))?;
        }
        Ok(())
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca.pem().cert_pem
    }
}

/// The `tensor-fusion-webhook` binary next to this test executable (`cargo build` puts both in
/// the same target directory).
pub fn webhook_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target directory")?;
    let binary = profile_dir.join("tensor-fusion-webhook");
    if !binary.exists() {
        bail!(
            "{} not found: run `cargo build -p tensor-fusion-webhook` first",
            binary.display()
        );
    }
    Ok(binary)
}

/// A webhook process, killed when dropped.
pub struct WebhookProcess {
    child: Child,
    pub port: u16,
    pub ops_port: u16,
}

impl WebhookProcess {
    /// Starts the webhook on `port` with the certificates in `certs` and waits until it is ready.
    pub async fn start(cluster: &Cluster, certs: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with(cluster, certs, port, &[]).await
    }

    /// Like [`WebhookProcess::start`], with extra command-line arguments.
    pub async fn start_with(
        cluster: &Cluster,
        certs: &Path,
        port: u16,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let ops_port = free_port();
        let log =
            std::fs::File::create(std::env::temp_dir().join(format!("tf-webhook-{port}.log")))?;
        let child = Command::new(webhook_binary()?)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--ops-listen", &format!("127.0.0.1:{ops_port}")])
            .arg("--tls-cert")
            .arg(certs.join("tls.crt"))
            .arg("--tls-key")
            .arg(certs.join("tls.key"))
            .args(["--cert-reload-seconds", "0.2"])
            .args(extra_args)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("TF_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tensor-fusion-webhook")?;
        let process = Self {
            child,
            port,
            ops_port,
        };
        wait_for(
            "the webhook to be ready",
            Duration::from_secs(30),
            || async {
                Ok(process
                    .ops_get("/readyz")
                    .await
                    .is_ok_and(|(status, _)| status == 200))
            },
        )
        .await?;
        Ok(process)
    }

    /// GET on the ops endpoint: (status, body).
    pub async fn ops_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        balancer::plain_get(self.ops_port, path).await
    }

    /// Admissions this process answered with `decision` (from its /metrics).
    pub async fn admissions(&self, decision: &str) -> anyhow::Result<u64> {
        let (_, metrics) = self.ops_get("/metrics").await?;
        let prefix = format!("tensor_fusion_webhook_admissions_total{{decision=\"{decision}\"}} ");
        Ok(metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .map_or(0, |value| value as u64))
    }
}

impl Drop for WebhookProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
