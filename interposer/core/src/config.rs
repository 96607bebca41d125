//! What one container may use: the pod limits file the node agent writes, merged with the
//! environment the webhook injects.
//!
//! The node agent writes `<pod dir>/<container>.limits` (on the host
//! `/run/tensor-fusion/pods/<pod-uid>/<container>.limits`), one `key=value` per line, `#`
//! starts a comment, unknown keys are ignored so the agent can add fields first; a missing
//! `version`, a line without `=` or a key given twice make the file invalid. A value in
//! the file wins over the environment (the agent knows the assignment; the webhook only knew the
//! annotations); a missing request falls back to the limit. `docs/interposer.md` is the
//! reference for the format.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::limiter::DEFAULT_TOKENS_PER_TFLOPS_SECOND;

/// Environment variable naming the pod directory (set by the webhook).
pub const ENV_POD_DIR: &str = "TF_POD_DIR";
/// Environment variable naming the container (set by the webhook).
pub const ENV_CONTAINER_NAME: &str = "TF_CONTAINER_NAME";
/// Turns the "no limits, no start" rule off: with it set to `1`, a process with no limits runs
/// unlimited instead of failing `cuInit`.
pub const ENV_ALLOW_UNLIMITED: &str = "TF_INTERPOSER_ALLOW_UNLIMITED";
/// How long, in seconds, a process in a pod (`TF_POD_DIR` set) waits at `cuInit` for the node
/// agent's limits file before it refuses CUDA (the agent writes it within a second of binding;
/// a container can start before that).
pub const ENV_LIMITS_WAIT: &str = "TF_LIMITS_WAIT_SECONDS";
/// The default of [`ENV_LIMITS_WAIT`].
pub const DEFAULT_LIMITS_WAIT_SECONDS: f64 = 30.0;
/// How often the limits file is looked for while waiting.
const LIMITS_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Version of the limits file format this crate writes and reads.
pub const LIMITS_FORMAT_VERSION: u32 = 1;

/// Errors reading the limits of a container.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("invalid value in {source_name}: {key} = {value:?} ({expected})")]
    InvalidValue {
        source_name: String,
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("unsupported limits file version in {path}: {version:?} (this interposer reads 1)")]
    UnsupportedVersion { path: String, version: String },
    #[error("failed to read limits file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("missing version line in limits file {path} (expected version=1)")]
    MissingVersion { path: String },
    #[error("malformed line {line} in limits file {path}: {text:?} (expected key=value)")]
    MalformedLine {
        path: String,
        line: usize,
        text: String,
    },
    #[error("duplicate key in limits file {path} line {line}: {key} (first set on line {first})")]
    DuplicateKey {
        path: String,
        line: usize,
        key: String,
        first: usize,
    },
    #[error("invalid value in {source_name}: gpu_uuids = {value:?} ({uuid} is listed twice)")]
    DuplicateGpu {
        source_name: String,
        value: String,
        uuid: String,
    },
}

/// The largest byte count a limit may name: 1 PiB, far above any GPU, and far below `u64::MAX`,
/// which the usage file reads as "no limit".
pub const MAX_BYTES: u64 = 1 << 50;

/// Everything the interposer enforces for one container; per GPU where it says so.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerLimits {
    /// GPUs assigned by the node agent, in the order the container sees them. Empty: the agent
    /// said nothing, and the first `gpu_count` devices are visible.
    pub gpu_uuids: Vec<String>,
    /// GPUs this container shares (`TF_GPU_COUNT`); `None` means all.
    pub gpu_count: Option<u32>,
    /// Guaranteed TFLOPS per GPU.
    pub tflops_request: Option<f64>,
    /// Burst ceiling in TFLOPS per GPU.
    pub tflops_limit: Option<f64>,
    /// Physical TFLOPS of the assigned GPU model, to turn TFLOPS into a share of the GPU.
    pub gpu_tflops: Option<f64>,
    /// Guaranteed VRAM bytes per GPU.
    pub vram_request: Option<u64>,
    /// VRAM bytes per GPU beyond which allocations fail (or spill).
    pub vram_limit: Option<u64>,
    /// Host bytes per GPU that may back device allocations past the VRAM limit; 0 turns spill off.
    pub spill_quota: u64,
    /// Initial refill rate of the launch token bucket, in tokens (kernel threads) per second.
    pub refill_rate: Option<f64>,
    /// Tokens the bucket holds at most, as seconds of refill.
    pub burst_seconds: Option<f64>,
    /// Where the limits file was (or would have been) read from.
    pub limits_path: Option<PathBuf>,
    /// Where the container's shared usage file lives.
    pub usage_path: Option<PathBuf>,
    /// `TF_INTERPOSER_ALLOW_UNLIMITED=1`.
    pub allow_unlimited: bool,
    /// `TF_LIMITS_WAIT_SECONDS`: how long [`ContainerLimits::load`] waited (at most) for the
    /// limits file to appear.
    pub limits_wait_seconds: f64,
}

impl ContainerLimits {
    /// Reads the environment through `env` and the limits file it points at (if present).
    pub fn load(env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut limits = Self::from_env(&env)?;
        if let Some(path) = limits.limits_path.clone() {
            if !limits.allow_unlimited {
                wait_for_file(&path, limits.limits_wait_seconds);
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => limits.apply_file(&path, &text)?,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(ConfigError::Unreadable {
                        path: path.display().to_string(),
                        reason: error.to_string(),
                    });
                }
            }
        }
        limits.fill_requests_from_limits();
        Ok(limits)
    }

    /// The part of [`ContainerLimits::load`] that reads only the environment.
    pub fn from_env(env: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let source = "the environment";
        let get = |key: &str| env(key).filter(|value| !value.trim().is_empty());
        let mut limits = Self {
            gpu_count: get("TF_GPU_COUNT")
                .map(|value| parse_u32(source, "TF_GPU_COUNT", &value))
                .transpose()?,
            tflops_request: get("TF_TFLOPS_REQUEST")
                .map(|value| parse_f64(source, "TF_TFLOPS_REQUEST", &value))
                .transpose()?,
            tflops_limit: get("TF_TFLOPS_LIMIT")
                .map(|value| parse_positive_f64(source, "TF_TFLOPS_LIMIT", &value))
                .transpose()?,
            vram_request: get("TF_VRAM_REQUEST")
                .map(|value| parse_bytes(source, "TF_VRAM_REQUEST", &value))
                .transpose()?,
            vram_limit: get("TF_VRAM_LIMIT")
                .map(|value| parse_bytes(source, "TF_VRAM_LIMIT", &value))
                .transpose()?,
            allow_unlimited: get(ENV_ALLOW_UNLIMITED).is_some_and(|value| value.trim() == "1"),
            limits_wait_seconds: get(ENV_LIMITS_WAIT)
                .map(|value| parse_f64(source, ENV_LIMITS_WAIT, &value))
                .transpose()?
                .unwrap_or(DEFAULT_LIMITS_WAIT_SECONDS),
            ..Self::default()
        };
        if let Some(pod_dir) = get(ENV_POD_DIR) {
            let container = get(ENV_CONTAINER_NAME).unwrap_or_else(|| "main".to_owned());
            let pod_dir = PathBuf::from(pod_dir);
            limits.limits_path = Some(limits_file_path(&pod_dir, &container));
            limits.usage_path = Some(usage_file_path(&pod_dir, &container));
        }
        Ok(limits)
    }

    /// Overlays the contents of a limits file.
    pub fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let source = path.display().to_string();
        let entries = parse_entries(&source, text)?;
        match entries.get("version") {
            None => return Err(ConfigError::MissingVersion { path: source }),
            Some((version, _)) if *version != LIMITS_FORMAT_VERSION.to_string() => {
                return Err(ConfigError::UnsupportedVersion {
                    path: source,
                    version: version.clone(),
                });
            }
            Some(_) => {}
        }
        for (key, (value, _)) in &entries {
            match key.as_str() {
                "gpu_uuids" => self.gpu_uuids = parse_gpu_uuids(&source, value)?,
                "tflops_request" => self.tflops_request = Some(parse_f64(&source, key, value)?),
                "tflops_limit" => {
                    self.tflops_limit = Some(parse_positive_f64(&source, key, value)?);
                }
                "gpu_tflops" => self.gpu_tflops = Some(parse_f64(&source, key, value)?),
                "vram_request" => self.vram_request = Some(parse_bytes(&source, key, value)?),
                "vram_limit" => self.vram_limit = Some(parse_bytes(&source, key, value)?),
                "spill_quota" => self.spill_quota = parse_bytes(&source, key, value)?,
                "refill_rate" => {
                    self.refill_rate = Some(parse_positive_f64(&source, key, value)?);
                }
                "burst_seconds" => self.burst_seconds = Some(parse_f64(&source, key, value)?),
                _ => {}
            }
        }
        Ok(())
    }

    fn fill_requests_from_limits(&mut self) {
        if self.tflops_request.is_none() {
            self.tflops_request = self.tflops_limit;
        }
        if self.vram_request.is_none() {
            self.vram_request = self.vram_limit;
        }
    }

    /// The launch bucket's refill rate until the node agent steers it, in tokens per second:
    /// the limits file's `refill_rate`, else the TFLOPS limit times
    /// [`DEFAULT_TOKENS_PER_TFLOPS_SECOND`]; 0 (no compute limit) when neither is given.
    pub fn first_refill_rate(&self) -> f64 {
        self.refill_rate
            .or_else(|| {
                self.tflops_limit
                    .map(|tflops| tflops * DEFAULT_TOKENS_PER_TFLOPS_SECOND)
            })
            .unwrap_or(0.0)
    }

    /// Whether anything says what this container may use.
    pub fn is_limited(&self) -> bool {
        self.vram_limit.is_some() || self.tflops_limit.is_some()
    }

    /// The limits file the node agent writes for these values (the inverse of
    /// [`ContainerLimits::apply_file`]).
    pub fn render_file(&self) -> String {
        let mut text = format!(
            "# tensor-fusion container limits, read by the interposer at cuInit\nversion={LIMITS_FORMAT_VERSION}\n"
        );
        let mut line = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                // Writing to a String cannot fail.
                let _ = writeln!(text, "{key}={value}");
            }
        };
        line(
            "gpu_uuids",
            (!self.gpu_uuids.is_empty()).then(|| self.gpu_uuids.join(",")),
        );
        line("tflops_request", self.tflops_request.map(|v| v.to_string()));
        line("tflops_limit", self.tflops_limit.map(|v| v.to_string()));
        line("gpu_tflops", self.gpu_tflops.map(|v| v.to_string()));
        line("vram_request", self.vram_request.map(|v| v.to_string()));
        line("vram_limit", self.vram_limit.map(|v| v.to_string()));
        line("spill_quota", Some(self.spill_quota.to_string()));
        line("refill_rate", self.refill_rate.map(|v| v.to_string()));
        line("burst_seconds", self.burst_seconds.map(|v| v.to_string()));
        text
    }
}

/// `<pod dir>/<container>.limits`.
pub fn limits_file_path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.limits"))
}

/// `<pod dir>/<container>.shm`.
pub fn usage_file_path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.shm"))
}

/// `key -> (value, line number)`; a line without `=` or a key given twice is an error naming
/// the line.
fn parse_entries(path: &str, text: &str) -> Result<HashMap<String, (String, usize)>, ConfigError> {
    let mut entries: HashMap<String, (String, usize)> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let Some((key, value)) = content.split_once('=') else {
            return Err(ConfigError::MalformedLine {
                path: path.to_owned(),
                line,
                text: raw.to_owned(),
            });
        };
        let key = key.trim().to_owned();
        if let Some((_, first)) = entries.get(&key) {
            return Err(ConfigError::DuplicateKey {
                path: path.to_owned(),
                line,
                key,
                first: *first,
            });
        }
        entries.insert(key, (value.trim().to_owned(), line));
    }
    Ok(entries)
}

/// `GPU-a,GPU-b`: each UUID at most once (compared as the driver's UUIDs are, ignoring case).
fn parse_gpu_uuids(source: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    let mut uuids: Vec<String> = Vec::new();
    for uuid in value
        .split(',')
        .map(str::trim)
        .filter(|uuid| !uuid.is_empty())
    {
        if uuids.iter().any(|seen| seen.eq_ignore_ascii_case(uuid)) {
            return Err(ConfigError::DuplicateGpu {
                source_name: source.to_owned(),
                value: value.to_owned(),
                uuid: uuid.to_owned(),
            });
        }
        uuids.push(uuid.to_owned());
    }
    Ok(uuids)
}

fn invalid(source: &str, key: &str, value: &str, expected: &'static str) -> ConfigError {
    ConfigError::InvalidValue {
        source_name: source.to_owned(),
        key: key.to_owned(),
        value: value.to_owned(),
        expected,
    }
}

fn parse_bytes(source: &str, key: &str, value: &str) -> Result<u64, ConfigError> {
    value
        .trim()
        .parse()
        .ok()
        .filter(|bytes| *bytes <= MAX_BYTES)
        .ok_or_else(|| {
            invalid(
                source,
                key,
                value,
                "a whole number of bytes, at most 1125899906842624 (1 PiB)",
            )
        })
}

fn parse_u32(source: &str, key: &str, value: &str) -> Result<u32, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(source, key, value, "a positive whole number"))
}

fn parse_positive_f64(source: &str, key: &str, value: &str) -> Result<f64, ConfigError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|number| number.is_finite() && *number > 0.0)
        .ok_or_else(|| invalid(source, key, value, "a positive decimal number"))
}

/// Waits until `path` exists or `seconds` have passed (a missing file is not an error here).
fn wait_for_file(path: &Path, seconds: f64) {
    let wait = std::time::Duration::try_from_secs_f64(seconds).unwrap_or(std::time::Duration::MAX);
    let started = std::time::Instant::now();
    while !path.exists() && started.elapsed() < wait {
        std::thread::sleep(LIMITS_POLL);
    }
}

fn parse_f64(source: &str, key: &str, value: &str) -> Result<f64, ConfigError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|number| number.is_finite() && *number >= 0.0)
        .ok_or_else(|| invalid(source, key, value, "a non-negative decimal number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        move |key| map.get(key).cloned()
    }

    #[test]
    fn environment_alone_gives_limits_and_requests_fall_back_to_limits() {
        let limits = ContainerLimits::load(env_of(&[
            ("TF_VRAM_LIMIT", "3221225472"),
            ("TF_TFLOPS_LIMIT", "200"),
            ("TF_TFLOPS_REQUEST", "100"),
        ]))
        .unwrap();
        assert_eq!(limits.vram_limit, Some(3_221_225_472));
        assert_eq!(limits.vram_request, Some(3_221_225_472));
        assert_eq!(limits.tflops_request, Some(100.0));
        assert_eq!(limits.tflops_limit, Some(200.0));
        assert!(limits.is_limited());
        assert_eq!(limits.usage_path, None);
    }

    #[test]
    fn file_values_win_over_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("trainer.limits"),
            "version=1\n# assigned by the agent\ngpu_uuids=GPU-b, GPU-a\nvram_limit=1024 # bytes\nspill_quota=4096\nrefill_rate=2.5e9\nfuture_key=ignored\n",
        )
        .unwrap();
        let pod_dir = dir.path().display().to_string();
        let limits = ContainerLimits::load(env_of(&[
            ("TF_POD_DIR", &pod_dir),
            ("TF_CONTAINER_NAME", "trainer"),
            ("TF_VRAM_LIMIT", "2048"),
        ]))
        .unwrap();
        assert_eq!(limits.gpu_uuids, vec!["GPU-b", "GPU-a"]);
        assert_eq!(limits.vram_limit, Some(1024));
        assert_eq!(limits.spill_quota, 4096);
        assert_eq!(limits.refill_rate, Some(2.5e9));
        assert_eq!(
            limits.usage_path,
            Some(dir.path().join("trainer.shm")),
            "usage file sits next to the limits file"
        );
    }

    #[test]
    fn the_first_refill_rate_comes_from_the_file_else_from_the_tflops_limit() {
        let from_limit = ContainerLimits {
            tflops_limit: Some(296.7),
            ..ContainerLimits::default()
        };
        // 30 % of an H100: 296.7 TFLOPS x 1e8 tokens per TFLOPS-second.
        assert_eq!(from_limit.first_refill_rate(), 296.7 * 1e8);
        let from_file = ContainerLimits {
            refill_rate: Some(2.5e9),
            ..from_limit
        };
        assert_eq!(from_file.first_refill_rate(), 2.5e9);
        let memory_only = ContainerLimits {
            vram_limit: Some(1 << 30),
            ..ContainerLimits::default()
        };
        assert_eq!(memory_only.first_refill_rate(), 0.0, "no compute limit");
    }

    #[test]
    fn rendered_file_reads_back_to_the_same_limits() {
        let limits = ContainerLimits {
            gpu_uuids: vec!["GPU-1".into(), "GPU-2".into()],
            tflops_request: Some(100.0),
            tflops_limit: Some(200.5),
            gpu_tflops: Some(989.0),
            vram_request: Some(1 << 30),
            vram_limit: Some(3 << 30),
            spill_quota: 1 << 29,
            refill_rate: Some(1e9),
            burst_seconds: Some(0.05),
            ..ContainerLimits::default()
        };
        let mut read_back = ContainerLimits::default();
        read_back
            .apply_file(Path::new("x.limits"), &limits.render_file())
            .unwrap();
        assert_eq!(read_back, limits);
    }

    #[test]
    fn bad_values_name_the_source_key_and_value() {
        let error = ContainerLimits::load(env_of(&[("TF_VRAM_LIMIT", "3Gi")])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid value in the environment: TF_VRAM_LIMIT = \"3Gi\" (a whole number of bytes, at \
             most 1125899906842624 (1 PiB))"
        );
        let mut limits = ContainerLimits::default();
        let error = limits
            .apply_file(Path::new("/p/c.limits"), "version=2\n")
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "unsupported limits file version in /p/c.limits: \"2\" (this interposer reads 1)"
        );
    }

    fn file_error(text: &str) -> String {
        let mut limits = ContainerLimits::default();
        limits
            .apply_file(Path::new("/p/c.limits"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_file_without_version_with_a_bare_line_or_a_repeated_key_is_refused_by_line() {
        assert_eq!(
            file_error("vram_limit=1024\n"),
            "missing version line in limits file /p/c.limits (expected version=1)"
        );
        assert_eq!(
            file_error("version=1\n\nvram_limit 1024\n"),
            "malformed line 3 in limits file /p/c.limits: \"vram_limit 1024\" (expected key=value)"
        );
        assert_eq!(
            file_error("version=1\nvram_limit=1024\n# again\nvram_limit=2048\n"),
            "duplicate key in limits file /p/c.limits line 4: vram_limit (first set on line 2)"
        );
    }

    #[test]
    fn a_gpu_listed_twice_is_refused() {
        assert_eq!(
            file_error("version=1\ngpu_uuids=GPU-a,GPU-b,gpu-A\nvram_limit=1\n"),
            "invalid value in /p/c.limits: gpu_uuids = \"GPU-a,GPU-b,gpu-A\" (gpu-A is listed twice)"
        );
    }

    #[test]
    fn byte_counts_past_one_pib_are_refused_not_read_as_unlimited() {
        for value in ["18446744073709551615", "1125899906842625"] {
            assert_eq!(
                file_error(&format!("version=1\nvram_limit={value}\n")),
                format!(
                    "invalid value in /p/c.limits: vram_limit = \"{value}\" (a whole number of \
                     bytes, at most 1125899906842624 (1 PiB))"
                )
            );
        }
        let error = ContainerLimits::load(env_of(&[("TF_VRAM_LIMIT", "18446744073709551615")]))
            .unwrap_err();
        assert!(matches!(error, ConfigError::InvalidValue { .. }), "{error}");
        let mut limits = ContainerLimits::default();
        limits
            .apply_file(Path::new("x"), "version=1\nvram_limit=1125899906842624\n")
            .unwrap();
        assert_eq!(limits.vram_limit, Some(MAX_BYTES));
    }

    #[test]
    fn a_zero_tflops_limit_or_refill_rate_is_refused() {
        assert_eq!(
            file_error("version=1\ntflops_limit=0\n"),
            "invalid value in /p/c.limits: tflops_limit = \"0\" (a positive decimal number)"
        );
        assert_eq!(
            file_error("version=1\ntflops_limit=10\nrefill_rate=0\n"),
            "invalid value in /p/c.limits: refill_rate = \"0\" (a positive decimal number)"
        );
        let error = ContainerLimits::load(env_of(&[("TF_TFLOPS_LIMIT", "0")])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid value in the environment: TF_TFLOPS_LIMIT = \"0\" (a positive decimal number)"
        );
    }

    #[test]
    fn no_limits_is_reported_as_unlimited() {
        let limits = ContainerLimits::load(env_of(&[])).unwrap();
        assert!(!limits.is_limited());
        assert!(!limits.allow_unlimited);
        let limits =
            ContainerLimits::load(env_of(&[("TF_INTERPOSER_ALLOW_UNLIMITED", "1")])).unwrap();
        assert!(limits.allow_unlimited);
    }
}
