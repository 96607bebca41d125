//! The agent's configuration: a JSON file (keys as in the Helm values of the production guide:
//! `tflopsOversellRatio`, `vramExpandToHostMem`, ...) overlaid by command-line flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::allocator::Policy;

/// Everything the agent needs to run; defaults are the production values.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The node this agent runs on (`NODE_NAME` from the downward API in the DaemonSet).
    pub node_name: String,
    /// Host directory shared with the pods: `pods/<uid>/` lives under it.
    pub host_root: PathBuf,
    /// NVML library to load.
    pub nvml_path: PathBuf,
    /// Percent of physical TFLOPS that limits may add up to (300 = 3x).
    pub tflops_oversell_ratio: f64,
    /// Percent of the node's host RAM that may back VRAM past the physical size.
    pub vram_expand_to_host_mem: f64,
    /// Percent of the disk under `stateDir` that may back VRAM.
    pub vram_expand_to_host_disk: f64,
    /// Directory whose file system counts for `vramExpandToHostDisk`.
    pub state_dir: PathBuf,
    pub vram_weight: f64,
    pub tflops_weight: f64,
    pub max_worker_per_node: usize,
    /// TFLOPS per model name fragment, over the built-in table.
    pub gpu_tflops: BTreeMap<String, f64>,
    /// `GET /api/allocation`, `/metrics`, `/healthz`.
    pub listen: SocketAddr,
    /// Stay off GPUs the NVIDIA device plugin gave to native pods.
    pub nvidia_operator_progressive_migration: bool,
    /// kubelet's PodResources socket.
    pub pod_resources_socket: PathBuf,
    /// The device plugin checkpoint, read when the socket does not answer.
    pub device_plugin_checkpoint: PathBuf,
    /// How often native GPU use is re-read, in seconds.
    pub native_poll_seconds: f64,
    /// Compute steering window, in seconds (0 turns steering off).
    pub steering_window_seconds: f64,
    /// How often GPUs and host sizes are re-read and the node's resources and labels written
    /// again, in seconds (0 turns it off).
    pub resync_seconds: f64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            host_root: PathBuf::from("/run/tensor-fusion"),
            nvml_path: PathBuf::from("libnvidia-ml.so.1"),
            tflops_oversell_ratio: 100.0,
            vram_expand_to_host_mem: 0.0,
            vram_expand_to_host_disk: 0.0,
            state_dir: PathBuf::from("/var/lib/tensor-fusion"),
            vram_weight: 0.7,
            tflops_weight: 0.3,
            max_worker_per_node: 256,
            gpu_tflops: BTreeMap::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            nvidia_operator_progressive_migration: true,
            pod_resources_socket: PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock"),
            device_plugin_checkpoint: PathBuf::from(
                "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint",
            ),
            native_poll_seconds: 2.0,
            steering_window_seconds: 0.1,
            resync_seconds: 30.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl AgentConfig {
    /// Reads a JSON configuration file; missing keys keep their defaults.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            return Err(ConfigError::Invalid(
                "nodeName is empty (set --node-name or NODE_NAME)".to_owned(),
            ));
        }
        if self.tflops_oversell_ratio < 100.0 {
            return Err(ConfigError::Invalid(format!(
                "tflopsOversellRatio {} is below 100 (percent of physical TFLOPS)",
                self.tflops_oversell_ratio
            )));
        }
        for (name, value) in [
            ("vramExpandToHostMem", self.vram_expand_to_host_mem),
            ("vramExpandToHostDisk", self.vram_expand_to_host_disk),
            ("vramWeight", self.vram_weight),
            ("tflopsWeight", self.tflops_weight),
            ("resyncSeconds", self.resync_seconds),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ConfigError::Invalid(format!("{name} {value} is negative")));
            }
        }
        Ok(())
    }

    pub fn policy(&self) -> Policy {
        Policy {
            vram_weight: self.vram_weight,
            tflops_weight: self.tflops_weight,
            max_workers_per_node: self.max_worker_per_node,
        }
    }

    pub fn native_poll(&self) -> Duration {
        Duration::from_secs_f64(self.native_poll_seconds.max(0.05))
    }

    /// The resync period; `None` when `resyncSeconds` is 0. Capped at a day, so that a huge
    /// value cannot overflow the timer.
    pub fn resync_interval(&self) -> Option<Duration> {
        (self.resync_seconds > 0.0)
            .then(|| Duration::from_secs_f64(self.resync_seconds.clamp(0.05, 86_400.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guide_keys_parse_and_defaults_fill_the_rest() {
        let config: AgentConfig = serde_json::from_str(
            r#"{"nodeName": "gpu-1", "tflopsOversellRatio": 300, "vramExpandToHostMem": 40,
                "vramExpandToHostDisk": 20, "gpuTflops": {"H100": 900}}"#,
        )
        .unwrap();
        assert_eq!(config.tflops_oversell_ratio, 300.0);
        assert_eq!(config.vram_expand_to_host_mem, 40.0);
        assert_eq!(config.vram_expand_to_host_disk, 20.0);
        assert_eq!(config.max_worker_per_node, 256);
        assert_eq!(config.gpu_tflops["H100"], 900.0);
        config.validate().unwrap();
        let typo = serde_json::from_str::<AgentConfig>(r#"{"tflopsOverselRatio": 3}"#);
        assert!(typo.unwrap_err().to_string().contains("unknown field"));
    }
}
