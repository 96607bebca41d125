//! What a pod asks for, read from its annotations: the GPU share and the canary quota.
//!
//! [`ShareSpec::from_annotations`] validates every `tensor-fusion.ai/` annotation at once and
//! returns either a complete spec or the first problem, named by annotation and value, so a
//! denied pod tells its owner exactly what to fix. Container selection happens in `inject`,
//! which knows the pod's containers.

use std::collections::BTreeMap;

use crate::keys;
use crate::quantity::{self, QuantityError};

/// The most GPUs one container may ask for (the largest nodes have 8-16; 64 leaves room).
pub const MAX_GPU_COUNT: u32 = 64;

/// A request/limit pair in one unit (milli-TFLOPS or bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub request: u64,
    pub limit: u64,
}

/// The validated annotations of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// Milli-TFLOPS per GPU; `None` when neither tflops annotation is set.
    pub tflops: Option<Bounds>,
    /// Bytes per GPU; `None` when neither vram annotation is set.
    pub vram: Option<Bounds>,
    /// `tensor-fusion.ai/gpu-count`; `None` means "from the container's nvidia.com/gpu".
    pub gpu_count: Option<u32>,
    /// `tensor-fusion.ai/inject-container`, split on commas.
    pub inject_containers: Option<Vec<String>>,
    /// `tensor-fusion.ai/enabled-replicas`.
    pub enabled_replicas: Option<u32>,
}

/// A problem with the annotations; the message names the annotation and its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid annotation {annotation}: {value:?} {problem}")]
    Invalid {
        annotation: &'static str,
        value: String,
        problem: String,
    },
    #[error(
        "invalid annotation {limit_key}: {limit:?} is below {request_key} {request:?}; \
         a limit must be at least the request"
    )]
    LimitBelowRequest {
        request_key: &'static str,
        request: String,
        limit_key: &'static str,
        limit: String,
    },
    #[error(
        "missing annotations: a shared-GPU pod needs at least one of {}, {}, {} or {}",
        keys::TFLOPS_REQUEST,
        keys::TFLOPS_LIMIT,
        keys::VRAM_REQUEST,
        keys::VRAM_LIMIT
    )]
    NoShare,
}

impl SpecError {
    fn invalid(annotation: &'static str, value: &str, problem: impl ToString) -> Self {
        Self::Invalid {
            annotation,
            value: shown(value),
            problem: problem.to_string(),
        }
    }
}

/// Longest annotation value quoted back in a message; longer ones are cut, so a huge value
/// does not end up whole in events and logs.
const SHOWN_VALUE_CHARS: usize = 64;

/// `value` as quoted in an error message: cut after [`SHOWN_VALUE_CHARS`] characters.
pub fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_VALUE_CHARS) {
        Some((cut, _)) => format!("{}...", &value[..cut]),
        None => value.to_owned(),
    }
}

impl ShareSpec {
    /// Reads and validates the share annotations.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Self, SpecError> {
        let get = |key: &str| annotations.get(key).map(String::as_str);

        let enabled_replicas = read_enabled_replicas(annotations)?;
        let tflops = bounds(
            (keys::TFLOPS_REQUEST, get(keys::TFLOPS_REQUEST)),
            (keys::TFLOPS_LIMIT, get(keys::TFLOPS_LIMIT)),
            quantity::parse_milli,
        )?;
        let vram = bounds(
            (keys::VRAM_REQUEST, get(keys::VRAM_REQUEST)),
            (keys::VRAM_LIMIT, get(keys::VRAM_LIMIT)),
            quantity::parse_bytes,
        )?;
        if tflops.is_none() && vram.is_none() {
            return Err(SpecError::NoShare);
        }

        let gpu_count = get(keys::GPU_COUNT)
            .map(|value| match value.trim().parse::<u32>() {
                Ok(count) if (1..=MAX_GPU_COUNT).contains(&count) => Ok(count),
                Ok(0) => Err(SpecError::invalid(
                    keys::GPU_COUNT,
                    value,
                    "must be a positive integer",
                )),
                Err(error) if *error.kind() != std::num::IntErrorKind::PosOverflow => Err(
                    SpecError::invalid(keys::GPU_COUNT, value, "must be a positive integer"),
                ),
                _ => Err(SpecError::invalid(
                    keys::GPU_COUNT,
                    value,
                    "is too large (at most 64 GPUs per container)",
                )),
            })
            .transpose()?;

        let inject_containers = get(keys::INJECT_CONTAINER)
            .map(|value| {
                let names: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|name| !name.is_empty())
                    .map(str::to_owned)
                    .collect();
                if names.is_empty() {
                    Err(SpecError::invalid(
                        keys::INJECT_CONTAINER,
                        value,
                        "names no container",
                    ))
                } else {
                    Ok(names)
                }
            })
            .transpose()?;

        Ok(Self {
            tflops,
            vram,
            gpu_count,
            inject_containers,
            enabled_replicas,
        })
    }
}

/// Reads `tensor-fusion.ai/enabled-replicas` alone: rollback (`"0"`) must work even when the
/// other annotations are broken.
pub fn read_enabled_replicas(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<u32>, SpecError> {
    annotations
        .get(keys::ENABLED_REPLICAS)
        .map(|value| {
            value.trim().parse::<u32>().map_err(|_| {
                SpecError::invalid(
                    keys::ENABLED_REPLICAS,
                    value,
                    "is not a non-negative integer",
                )
            })
        })
        .transpose()
}

/// Reads one request/limit pair: a missing side takes the other's value.
fn bounds(
    request: (&'static str, Option<&str>),
    limit: (&'static str, Option<&str>),
    parse: fn(&str) -> Result<u64, QuantityError>,
) -> Result<Option<Bounds>, SpecError> {
    let read = |(key, value): (&'static str, Option<&str>)| {
        value
            .map(|text| parse(text).map_err(|problem| SpecError::invalid(key, text, problem)))
            .transpose()
    };
    let (request_value, limit_value) = (read(request)?, read(limit)?);
    // A limit of zero leaves nothing to share; name the annotation that set it.
    let (zero_key, zero_value) = match (limit.1, request.1) {
        (Some(value), _) => (limit.0, value),
        (None, Some(value)) => (request.0, value),
        (None, None) => return Ok(None),
    };
    if limit_value.or(request_value) == Some(0) {
        return Err(SpecError::invalid(
            zero_key,
            zero_value,
            "must be greater than zero",
        ));
    }
    let bounds = match (request_value, limit_value) {
        (None, None) => return Ok(None),
        (Some(request), None) => Bounds {
            request,
            limit: request,
        },
        (None, Some(limit)) => Bounds {
            request: limit,
            limit,
        },
        (Some(request_value), Some(limit_value)) => {
            if limit_value < request_value {
                return Err(SpecError::LimitBelowRequest {
                    request_key: request.0,
                    request: shown(request.1.unwrap_or_default()),
                    limit_key: limit.0,
                    limit: shown(limit.1.unwrap_or_default()),
                });
            }
            Bounds {
                request: request_value,
                limit: limit_value,
            }
        }
    };
    Ok(Some(bounds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pairs: &[(&str, &str)]) -> Result<ShareSpec, SpecError> {
        let annotations = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ShareSpec::from_annotations(&annotations)
    }

    #[test]
    fn reads_the_guide_example() {
        let spec = spec(&[
            (keys::TFLOPS_REQUEST, "100"),
            (keys::TFLOPS_LIMIT, "200"),
            (keys::VRAM_REQUEST, "3Gi"),
            (keys::VRAM_LIMIT, "3Gi"),
            (keys::ENABLED_REPLICAS, "3"),
        ])
        .unwrap();
        assert_eq!(
            spec.tflops,
            Some(Bounds {
                request: 100_000,
                limit: 200_000
            })
        );
        assert_eq!(
            spec.vram,
            Some(Bounds {
                request: 3 << 30,
                limit: 3 << 30
            })
        );
        assert_eq!(spec.enabled_replicas, Some(3));
        assert_eq!(spec.gpu_count, None);
    }

    #[test]
    fn a_missing_side_takes_the_other() {
        let spec = spec(&[(keys::TFLOPS_LIMIT, "50"), (keys::VRAM_REQUEST, "1Gi")]).unwrap();
        assert_eq!(spec.tflops.unwrap().request, 50_000);
        assert_eq!(spec.vram.unwrap().limit, 1 << 30);
    }

    #[test]
    fn errors_name_the_annotation_and_value() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[(keys::VRAM_LIMIT, "3Gx")],
                "invalid annotation tensor-fusion.ai/vram-limit: \"3Gx\" is not a Kubernetes quantity",
            ),
            (
                &[(keys::TFLOPS_REQUEST, "100"), (keys::TFLOPS_LIMIT, "50")],
                "invalid annotation tensor-fusion.ai/tflops-limit: \"50\" is below \
                 tensor-fusion.ai/tflops-request \"100\"; a limit must be at least the request",
            ),
            (
                &[(keys::VRAM_LIMIT, "1Gi"), (keys::ENABLED_REPLICAS, "-1")],
                "invalid annotation tensor-fusion.ai/enabled-replicas: \"-1\" is not a non-negative integer",
            ),
            (
                &[(keys::VRAM_LIMIT, "1Gi"), (keys::ENABLED_REPLICAS, "three")],
                "invalid annotation tensor-fusion.ai/enabled-replicas: \"three\" is not a non-negative integer",
            ),
            (
                &[(keys::VRAM_LIMIT, "1Gi"), (keys::GPU_COUNT, "0")],
                "invalid annotation tensor-fusion.ai/gpu-count: \"0\" must be a positive integer",
            ),
            (
                &[
                    (keys::VRAM_LIMIT, "1Gi"),
                    (keys::GPU_COUNT, "99999999999999"),
                ],
                "invalid annotation tensor-fusion.ai/gpu-count: \"99999999999999\" is too large \
                 (at most 64 GPUs per container)",
            ),
            (
                &[(keys::VRAM_LIMIT, "1Gi"), (keys::GPU_COUNT, "65")],
                "invalid annotation tensor-fusion.ai/gpu-count: \"65\" is too large \
                 (at most 64 GPUs per container)",
            ),
            (
                &[(keys::VRAM_LIMIT, "1m")],
                "invalid annotation tensor-fusion.ai/vram-limit: \"1m\" is not a whole number \
                 of bytes (did you mean Mi or Gi?)",
            ),
            (
                &[(keys::VRAM_LIMIT, "-1Gi")],
                "invalid annotation tensor-fusion.ai/vram-limit: \"-1Gi\" must not be negative",
            ),
            (
                &[(keys::VRAM_LIMIT, "1Gi"), (keys::INJECT_CONTAINER, " , ")],
                "invalid annotation tensor-fusion.ai/inject-container: \" , \" names no container",
            ),
            (
                &[(keys::TFLOPS_REQUEST, "0")],
                "invalid annotation tensor-fusion.ai/tflops-request: \"0\" must be greater than zero",
            ),
            (
                &[(keys::VRAM_REQUEST, "0"), (keys::VRAM_LIMIT, "0Gi")],
                "invalid annotation tensor-fusion.ai/vram-limit: \"0Gi\" must be greater than zero",
            ),
            (
                &[(keys::VRAM_LIMIT, &"9".repeat(100))],
                "invalid annotation tensor-fusion.ai/vram-limit: \"9999999999999999999999999999999999999999999999999999999999999999...\" is too large",
            ),
            (
                &[(keys::ENABLED_REPLICAS, "2")],
                "missing annotations: a shared-GPU pod needs at least one of \
                 tensor-fusion.ai/tflops-request, tensor-fusion.ai/tflops-limit, \
                 tensor-fusion.ai/vram-request or tensor-fusion.ai/vram-limit",
            ),
        ];
        for (pairs, message) in cases {
            assert_eq!(spec(pairs).unwrap_err().to_string(), *message);
        }
    }
}
