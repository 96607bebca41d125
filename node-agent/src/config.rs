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

    /// Checks every value the agent would otherwise act on blindly; an error names the key and
    /// the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            return Err(ConfigError::Invalid(
                "nodeName is empty (set --node-name or NODE_NAME)".to_owned(),
            ));
        }
        finite("tflopsOversellRatio", self.tflops_oversell_ratio)?;
        if self.tflops_oversell_ratio < 100.0 {
            return Err(ConfigError::Invalid(format!(
                "tflopsOversellRatio {} is below 100 (percent of physical TFLOPS)",
                number(self.tflops_oversell_ratio)
            )));
        }
        for (name, value) in [
            ("vramExpandToHostMem", self.vram_expand_to_host_mem),
            ("vramExpandToHostDisk", self.vram_expand_to_host_disk),
            ("vramWeight", self.vram_weight),
            ("tflopsWeight", self.tflops_weight),
        ] {
            finite(name, value)?;
            if value < 0.0 {
                return Err(ConfigError::Invalid(format!(
                    "{name} {} is negative",
                    number(value)
                )));
            }
        }
        if self.max_worker_per_node == 0 {
            return Err(ConfigError::Invalid(
                "maxWorkerPerNode 0 is below 1 (no shared worker could run)".to_owned(),
            ));
        }
        for (model, &tflops) in &self.gpu_tflops {
            let name = format!("gpuTflops[{model:?}]");
            finite(&name, tflops)?;
            if tflops <= 0.0 {
                return Err(ConfigError::Invalid(format!(
                    "{name} {} is not positive (TFLOPS of the model)",
                    number(tflops)
                )));
            }
        }
        period("nativePollSeconds", self.native_poll_seconds, false)?;
        period("steeringWindowSeconds", self.steering_window_seconds, true)?;
        period("resyncSeconds", self.resync_seconds, true)?;
        Ok(())
    }

    pub fn policy(&self) -> Policy {
        Policy {
            vram_weight: self.vram_weight,
            tflops_weight: self.tflops_weight,
            max_workers_per_node: self.max_worker_per_node,
        }
    }

    /// How often native GPU use is re-read.
    pub fn native_poll(&self) -> Duration {
        seconds(self.native_poll_seconds)
    }

    /// The steering window; `None` when `steeringWindowSeconds` is 0.
    pub fn steering_window(&self) -> Option<Duration> {
        (self.steering_window_seconds > 0.0).then(|| seconds(self.steering_window_seconds))
    }

    /// The resync period; `None` when `resyncSeconds` is 0.
    pub fn resync_interval(&self) -> Option<Duration> {
        (self.resync_seconds > 0.0).then(|| seconds(self.resync_seconds))
    }
}

/// The shortest and longest period a `...Seconds` key may set.
pub const MIN_PERIOD_SECONDS: f64 = 0.1;
pub const MAX_PERIOD_SECONDS: f64 = 86_400.0;

/// A period in seconds as a timer duration, kept within the range [`AgentConfig::validate`]
/// allows (a configuration built in code skips validation; a timer must never get 0 or an
/// overflowing value).
fn seconds(value: f64) -> Duration {
    let value = if value.is_finite() {
        value
    } else {
        MIN_PERIOD_SECONDS
    };
    Duration::from_secs_f64(value.clamp(MIN_PERIOD_SECONDS, MAX_PERIOD_SECONDS))
}

/// A number as a person would write it: `50`, `0.1`, `1e30`, `1e-12`, `NaN`.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if value == 0.0 || !value.is_finite() || (1e-4..1e15).contains(&magnitude) {
        value.to_string()
    } else {
        format!("{value:e}")
    }
}

fn finite(name: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{name} {} is not a finite number",
            number(value)
        )))
    }
}

/// A period key: finite, within [`MIN_PERIOD_SECONDS`, `MAX_PERIOD_SECONDS`], or 0 where 0 turns
/// the task off.
fn period(name: &str, value: f64, zero_is_off: bool) -> Result<(), ConfigError> {
    finite(name, value)?;
    if (zero_is_off && value == 0.0) || (MIN_PERIOD_SECONDS..=MAX_PERIOD_SECONDS).contains(&value) {
        return Ok(());
    }
    let range = format!(
        "{} to {} seconds",
        number(MIN_PERIOD_SECONDS),
        number(MAX_PERIOD_SECONDS)
    );
    let allowed = if zero_is_off {
        format!("0 (off) or {range}")
    } else {
        range
    };
    Err(ConfigError::Invalid(format!(
        "{name} {} is out of range ({allowed})",
        number(value)
    )))
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

    fn validate_json(keys: &str) -> Result<AgentConfig, String> {
        let config: AgentConfig =
            serde_json::from_str(&format!(r#"{{"nodeName": "gpu-1", {keys}}}"#)).unwrap();
        config
            .validate()
            .map(|()| config)
            .map_err(|error| error.to_string())
    }

    #[test]
    fn values_that_would_crash_or_mislead_the_agent_are_refused_by_name() {
        for (keys, error) in [
            (
                r#""nativePollSeconds": 1e30"#,
                "nativePollSeconds 1e30 is out of range (0.1 to 86400 seconds)",
            ),
            (
                r#""nativePollSeconds": 0"#,
                "nativePollSeconds 0 is out of range (0.1 to 86400 seconds)",
            ),
            (
                r#""steeringWindowSeconds": 1e30"#,
                "steeringWindowSeconds 1e30 is out of range (0 (off) or 0.1 to 86400 seconds)",
            ),
            (
                r#""steeringWindowSeconds": 1e-12"#,
                "steeringWindowSeconds 1e-12 is out of range (0 (off) or 0.1 to 86400 seconds)",
            ),
            (
                r#""resyncSeconds": 0.01"#,
                "resyncSeconds 0.01 is out of range (0 (off) or 0.1 to 86400 seconds)",
            ),
            (
                r#""resyncSeconds": -1"#,
                "resyncSeconds -1 is out of range (0 (off) or 0.1 to 86400 seconds)",
            ),
            (
                r#""gpuTflops": {"H100": 0}"#,
                r#"gpuTflops["H100"] 0 is not positive (TFLOPS of the model)"#,
            ),
            (
                r#""gpuTflops": {"L4": -121}"#,
                r#"gpuTflops["L4"] -121 is not positive (TFLOPS of the model)"#,
            ),
            (
                r#""maxWorkerPerNode": 0"#,
                "maxWorkerPerNode 0 is below 1 (no shared worker could run)",
            ),
            (r#""vramWeight": -0.5"#, "vramWeight -0.5 is negative"),
        ] {
            assert_eq!(
                validate_json(keys).unwrap_err(),
                format!("invalid configuration: {error}"),
                "{keys}"
            );
        }

        // NaN and infinities cannot be written in JSON, but flags and code can set them.
        for (config, error) in [
            (
                AgentConfig {
                    tflops_oversell_ratio: f64::NAN,
                    ..AgentConfig::default()
                },
                "tflopsOversellRatio NaN is not a finite number",
            ),
            (
                AgentConfig {
                    vram_expand_to_host_mem: f64::INFINITY,
                    ..AgentConfig::default()
                },
                "vramExpandToHostMem inf is not a finite number",
            ),
            (
                AgentConfig {
                    tflops_weight: f64::NAN,
                    ..AgentConfig::default()
                },
                "tflopsWeight NaN is not a finite number",
            ),
            (
                AgentConfig {
                    gpu_tflops: BTreeMap::from([("H100".to_owned(), f64::NAN)]),
                    ..AgentConfig::default()
                },
                r#"gpuTflops["H100"] NaN is not a finite number"#,
            ),
            (
                AgentConfig {
                    native_poll_seconds: f64::NAN,
                    ..AgentConfig::default()
                },
                "nativePollSeconds NaN is not a finite number",
            ),
            (
                AgentConfig {
                    steering_window_seconds: f64::INFINITY,
                    ..AgentConfig::default()
                },
                "steeringWindowSeconds inf is not a finite number",
            ),
        ] {
            let config = AgentConfig {
                node_name: "gpu-1".to_owned(),
                ..config
            };
            assert_eq!(
                config.validate().unwrap_err().to_string(),
                format!("invalid configuration: {error}")
            );
        }
    }

    #[test]
    fn periods_at_the_edges_of_their_range_are_taken() {
        let config = validate_json(
            r#""nativePollSeconds": 0.1, "steeringWindowSeconds": 0, "resyncSeconds": 86400"#,
        )
        .unwrap();
        assert_eq!(config.native_poll(), Duration::from_millis(100));
        assert_eq!(config.steering_window(), None);
        assert_eq!(config.resync_interval(), Some(Duration::from_secs(86_400)));

        let config =
            validate_json(r#""steeringWindowSeconds": 86400, "resyncSeconds": 0"#).unwrap();
        assert_eq!(config.steering_window(), Some(Duration::from_secs(86_400)));
        assert_eq!(config.resync_interval(), None);
        assert_eq!(
            AgentConfig::default().steering_window(),
            Some(Duration::from_millis(100))
        );
    }
}
