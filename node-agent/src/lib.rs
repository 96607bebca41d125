//! The TensorFusion node agent: one per GPU node. It discovers the GPUs through NVML, advertises
//! the node's capacity, gives each shared-GPU pod bound to the node a GPU and a share (recorded
//! on the pod, handed to the interposer in the pod's directory), keeps off GPUs the NVIDIA device
//! plugin gave to native pods, and serves its state over HTTP.
//!
//! `main.rs` only parses flags and sets up logging; [`run`] wires the parts together.

pub mod agent;
pub mod allocator;
pub mod capacity;
pub mod config;
pub mod discovery;
pub mod metrics;
pub mod native;
pub mod resync;
pub mod server;
pub mod steering;
pub mod tflops;
pub mod worker;

use std::path::PathBuf;

use anyhow::Context;

pub use crate::agent::Agent;
pub use crate::config::AgentConfig;

/// Command-line flags; each one overrides the configuration file.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "tensor-fusion-node-agent", version, about)]
pub struct Options {
    /// JSON configuration file (keys as in docs/node-agent.md).
    #[arg(long, env = "TF_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The node this agent runs on.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Host directory shared with the pods (`pods/<uid>/` under it).
    #[arg(long)]
    pub host_root: Option<PathBuf>,
    /// NVML library to load.
    #[arg(long)]
    pub nvml_path: Option<PathBuf>,
    /// Address of the HTTP endpoint (allocation, metrics, health).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// kubelet's PodResources socket.
    #[arg(long)]
    pub pod_resources_socket: Option<PathBuf>,
    /// The device plugin checkpoint file.
    #[arg(long)]
    pub device_plugin_checkpoint: Option<PathBuf>,
    /// Percent of physical TFLOPS limits may add up to.
    #[arg(long)]
    pub tflops_oversell_ratio: Option<f64>,
    /// Most shared workers on this node.
    #[arg(long)]
    pub max_worker_per_node: Option<usize>,
    /// Seconds between re-reads of the GPUs and host sizes (0 turns it off).
    #[arg(long)]
    pub resync_seconds: Option<f64>,
}

impl Options {
    /// The configuration file (or defaults) with the flags applied.
    pub fn config(&self) -> anyhow::Result<AgentConfig> {
        let mut config = match &self.config {
            Some(path) => AgentConfig::from_file(path)?,
            None => AgentConfig::default(),
        };
        if let Some(value) = &self.node_name {
            config.node_name = value.clone();
        }
        if let Some(value) = &self.host_root {
            config.host_root = value.clone();
        }
        if let Some(value) = &self.nvml_path {
            config.nvml_path = value.clone();
        }
        if let Some(value) = self.listen {
            config.listen = value;
        }
        if let Some(value) = &self.pod_resources_socket {
            config.pod_resources_socket = value.clone();
        }
        if let Some(value) = &self.device_plugin_checkpoint {
            config.device_plugin_checkpoint = value.clone();
        }
        if let Some(value) = self.tflops_oversell_ratio {
            config.tflops_oversell_ratio = value;
        }
        if let Some(value) = self.max_worker_per_node {
            config.max_worker_per_node = value;
        }
        if let Some(value) = self.resync_seconds {
            config.resync_seconds = value;
        }
        config.validate()?;
        Ok(config)
    }
}

/// Logs to stderr, filtered by `TF_LOG_LEVEL` (default `info`), JSON with `TF_LOG_FORMAT=json`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TF_LOG_LEVEL")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("TF_LOG_FORMAT").is_ok_and(|format| format == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Runs the agent until the process is stopped.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let nvml = discovery::Nvml::load(&config.nvml_path)?;
    let gpus = nvml.gpus()?;
    tracing::info!(
        node = %config.node_name,
        gpus = gpus.len(),
        model = gpus.first().map_or("none", |gpu| gpu.model.as_str()),
        "Discovered GPUs"
    );
    std::fs::create_dir_all(config.host_root.join("pods"))
        .with_context(|| format!("creating {}", config.host_root.join("pods").display()))?;
    let host = capacity::HostSizes::read(&config.state_dir);
    if config.vram_expand_to_host_disk > 0.0 && host.disk_bytes == 0 {
        // Measure again for the reason (`read` turns a failure into 0).
        capacity::disk_size(&config.state_dir).with_context(|| {
            format!(
                "stateDir {}: its disk backs vramExpandToHostDisk = {} but cannot be measured",
                config.state_dir.display(),
                config.vram_expand_to_host_disk
            )
        })?;
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let agent = Agent::new(config.clone(), client, gpus, host);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(agent.clone().run_pod_watch());
    if config.nvidia_operator_progressive_migration {
        tasks.spawn(agent.clone().run_native_poll());
    }
    if let Some(period) = config.resync_interval() {
        // A second handle on the same library (NVML counts initialisations), so the steering
        // loop keeps its own.
        let resync_nvml = discovery::Nvml::load(&config.nvml_path)?;
        tasks.spawn(
            agent
                .clone()
                .run_resync(std::sync::Arc::new(resync_nvml), period),
        );
    }
    if let Some(window) = config.steering_window() {
        // Its own thread (not `spawn_blocking`, which would hold the runtime's shutdown); the
        // channel closes when the thread ends, even by a panic, and that ends the agent.
        let steering_agent = agent.clone();
        let (alive, ended) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("steering".to_owned())
            .spawn(move || {
                let _alive = alive;
                steering::run_blocking(steering_agent, nvml, window);
            })
            .context("starting the steering thread")?;
        tasks.spawn(async move {
            let _ = ended.await;
            tracing::error!("the steering loop stopped");
        });
    }
    let app = server::router(agent);
    tasks.spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "HTTP server failed");
        }
    });
    tracing::info!(listen = %config.listen, "Node agent running");
    // Nothing to flush on the way out: the pods' annotations and the limits files are the state.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    tokio::select! {
        _ = tasks.join_next() => anyhow::bail!("an agent task stopped"),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => {
            tracing::info!("SIGTERM: stopping");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn flags_override_the_configuration_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json");
        std::fs::write(
            &path,
            r#"{"nodeName": "from-file", "tflopsOversellRatio": 300, "maxWorkerPerNode": 64,
                "vramExpandToHostMem": 40, "listen": "127.0.0.1:9400", "resyncSeconds": 60}"#,
        )
        .unwrap();
        let options = Options::try_parse_from([
            "tensor-fusion-node-agent",
            "--config",
            path.to_str().unwrap(),
            "--node-name",
            "gpu-node-7",
            "--tflops-oversell-ratio",
            "200",
            "--resync-seconds",
            "5",
        ])
        .unwrap();
        let config = options.config().unwrap();
        assert_eq!(config.node_name, "gpu-node-7");
        assert_eq!(config.tflops_oversell_ratio, 200.0);
        assert_eq!(
            config.resync_interval(),
            Some(std::time::Duration::from_secs(5))
        );
        // Keys no flag names keep the file's values.
        assert_eq!(config.max_worker_per_node, 64);
        assert_eq!(config.vram_expand_to_host_mem, 40.0);
        assert_eq!(config.listen, "127.0.0.1:9400".parse().unwrap());

        let invalid = Options::try_parse_from([
            "tensor-fusion-node-agent",
            "--config",
            path.to_str().unwrap(),
            "--tflops-oversell-ratio",
            "50",
        ])
        .unwrap();
        assert_eq!(
            invalid.config().unwrap_err().to_string(),
            "invalid configuration: tflopsOversellRatio 50 is below 100 (percent of physical TFLOPS)"
        );

        for (flag, value, error) in [
            (
                "--resync-seconds",
                "NaN",
                "resyncSeconds NaN is not a finite number",
            ),
            (
                "--resync-seconds",
                "inf",
                "resyncSeconds inf is not a finite number",
            ),
            (
                "--tflops-oversell-ratio",
                "NaN",
                "tflopsOversellRatio NaN is not a finite number",
            ),
            (
                "--max-worker-per-node",
                "0",
                "maxWorkerPerNode 0 is below 1 (no shared worker could run)",
            ),
        ] {
            let options = Options::try_parse_from([
                "tensor-fusion-node-agent",
                "--config",
                path.to_str().unwrap(),
                flag,
                value,
            ])
            .unwrap();
            assert_eq!(
                options.config().unwrap_err().to_string(),
                format!("invalid configuration: {error}"),
                "{flag} {value}"
            );
        }
    }
}
