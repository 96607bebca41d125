//! The injection plan: which containers go on shared GPUs and what changes in the pod.
//!
//! [`Plan::new`] picks the containers (from `tensor-fusion.ai/inject-container`, else those
//! that ask for `nvidia.com/gpu`, else the only container) and their GPU counts; the plan
//! takes `nvidia.com/gpu` out, puts, the `tensor-fusion.ai/tflops` and
//! `tensor-fusion.ai/vram` extended resources in, the interposer's environment and mounts
//! (names in `docs/interfaces.md`), expressed as JSON patch operations by [`Plan::patch`]. Each
//! container is edited as raw JSON, so fields this crate does not model pass through untouched.

use serde_json::{Map, Value, json};

use crate::keys;
use crate::quantity::{format_bytes, format_milli};
use crate::share::ShareSpec;

pub const INTERPOSER_LIBRARY: &str = "/opt/tensor-fusion/lib/libtensor_fusion_interposer.so";
pub const LIBRARY_HOST_DIR: &str = "/opt/tensor-fusion/lib";
pub const POD_HOST_DIR: &str = "/run/tensor-fusion/pods";
pub const POD_MOUNT_DIR: &str = "/run/tensor-fusion/pod";
pub const AGENT_DIR: &str = "/run/tensor-fusion/agent";
pub const AGENT_SOCKET: &str = "/run/tensor-fusion/agent/agent.sock";

const VOLUME_LIB: &str = "tensor-fusion-lib";
const VOLUME_POD: &str = "tensor-fusion-pod";
const VOLUME_AGENT: &str = "tensor-fusion-agent";

/// Why a pod cannot be injected as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error(
        "invalid annotation {annotation}: {name:?} is not a container of this pod (containers: {containers})",
        annotation = keys::INJECT_CONTAINER
    )]
    UnknownContainer { name: String, containers: String },
    #[error(
        "cannot choose containers to inject: the pod has {count} containers and none limits {gpu}; \
         set the annotation {annotation}",
        gpu = keys::NVIDIA_GPU,
        annotation = keys::INJECT_CONTAINER
    )]
    Ambiguous { count: usize },
    #[error("the pod has no containers")]
    NoContainers,
    #[error(
        "container {container:?} sets LD_PRELOAD from a reference; the interposer can only be \
         added to a literal LD_PRELOAD"
    )]
    PreloadReference { container: String },
}

/// One container to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub index: usize,
    pub name: String,
    pub gpu_count: u32,
}

/// The containers to inject, chosen from the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub targets: Vec<Target>,
    /// Whether any target container asked for `nvidia.com/gpu` (the patch removes it).
    pub removes_native_gpus: bool,
    /// Containers left out of the injection that still ask for whole GPUs (`name (count)`):
    /// the pod then holds native GPUs too, and the summary says so.
    pub keeps_native: Vec<String>,
}

fn containers(pod: &Value) -> &[Value] {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn container_name(container: &Value) -> &str {
    container.get("name").and_then(Value::as_str).unwrap_or("")
}

/// The container's `nvidia.com/gpu` limit (or request), if it has one.
fn native_gpus(container: &Value) -> Option<u32> {
    ["limits", "requests"].iter().find_map(|side| {
        let value = container
            .get("resources")?
            .get(side)?
            .get(keys::NVIDIA_GPU)?;
        match value {
            Value::String(text) => text.trim().parse().ok(),
            Value::Number(number) => number.as_u64().and_then(|n| u32::try_from(n).ok()),
            _ => None,
        }
    })
}

impl Plan {
    pub fn new(pod: &Value, spec: &ShareSpec) -> Result<Self, InjectError> {
        let all = containers(pod);
        if all.is_empty() {
            return Err(InjectError::NoContainers);
        }
        let indices: Vec<usize> = match &spec.inject_containers {
            Some(names) => names
                .iter()
                .map(|name| {
                    all.iter()
                        .position(|container| container_name(container) == name)
                        .ok_or_else(|| InjectError::UnknownContainer {
                            name: crate::share::shown(name),
                            containers: all
                                .iter()
                                .map(container_name)
                                .collect::<Vec<_>>()
                                .join(", "),
                        })
                })
                .collect::<Result<_, _>>()?,
            None => {
                let asking: Vec<usize> = (0..all.len())
                    .filter(|&index| native_gpus(&all[index]).is_some_and(|gpus| gpus > 0))
                    .collect();
                match (asking.is_empty(), all.len()) {
                    (false, _) => asking,
                    (true, 1) => vec![0],
                    (true, count) => return Err(InjectError::Ambiguous { count }),
                }
            }
        };
        let mut targets = Vec::with_capacity(indices.len());
        for index in indices {
            if targets.iter().any(|target: &Target| target.index == index) {
                continue;
            }
            let container = &all[index];
            if env_entry(container, "LD_PRELOAD")
                .is_some_and(|entry| entry.get("valueFrom").is_some())
            {
                return Err(InjectError::PreloadReference {
                    container: container_name(container).to_owned(),
                });
            }
            let gpu_count = spec
                .gpu_count
                .or_else(|| native_gpus(container).filter(|&gpus| gpus > 0))
                .unwrap_or(1);
            targets.push(Target {
                index,
                name: container_name(container).to_owned(),
                gpu_count,
            });
        }
        let removes_native_gpus = targets
            .iter()
            .any(|target| native_gpus(&all[target.index]).is_some());
        let keeps_native = all
            .iter()
            .enumerate()
            .filter(|(index, _)| !targets.iter().any(|target| target.index == *index))
            .filter_map(|(_, container)| {
                let gpus = native_gpus(container).filter(|&gpus| gpus > 0)?;
                Some(format!("{} ({gpus})", container_name(container)))
            })
            .collect();
        Ok(Self {
            targets,
            removes_native_gpus,
            keeps_native,
        })
    }

    /// The JSON patch operations that put the plan into `pod`, and the one-line summary for
    /// people. Each injected container is replaced whole by its edited copy (fields this crate
    /// does not model are copied as they are); the volumes are appended.
    pub fn patch(&self, pod: &Value, spec: &ShareSpec) -> (Vec<Value>, String) {
        let mut operations = Vec::with_capacity(self.targets.len() + 3);
        for target in &self.targets {
            let path = format!("/spec/containers/{}", target.index);
            if let Some(container) = pod.pointer(&path) {
                let mut edited = container.clone();
                inject_container(&mut edited, target, spec);
                operations.push(json!({ "op": "replace", "path": path, "value": edited }));
            }
        }
        let volumes = [
            host_volume(VOLUME_LIB, LIBRARY_HOST_DIR, "Directory"),
            host_volume(VOLUME_POD, POD_HOST_DIR, "DirectoryOrCreate"),
            host_volume(VOLUME_AGENT, AGENT_DIR, "DirectoryOrCreate"),
        ];
        if pod.pointer("/spec/volumes").is_some_and(Value::is_array) {
            operations.extend(
                volumes.into_iter().map(
                    |volume| json!({ "op": "add", "path": "/spec/volumes/-", "value": volume }),
                ),
            );
        } else {
            operations.push(json!({ "op": "add", "path": "/spec/volumes", "value": volumes }));
        }
        (operations, self.summary(spec))
    }

    /// Applies [`Plan::patch`] to `pod` in place (for tests and tools that want the result).
    pub fn apply(
        &self,
        pod: &mut Value,
        spec: &ShareSpec,
    ) -> Result<String, json_patch::PatchError> {
        let (operations, summary) = self.patch(pod, spec);
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(operations))
            .expect("the operations built above are well-formed JSON patch operations");
        json_patch::patch(pod, &patch)?;
        Ok(summary)
    }

    fn summary(&self, spec: &ShareSpec) -> String {
        let names: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
        let mut parts = vec![format!("containers {}", names.join(","))];
        if let Some(tflops) = spec.tflops {
            parts.push(format!(
                "tflops request {} limit {}",
                format_milli(tflops.request),
                format_milli(tflops.limit)
            ));
        }
        if let Some(vram) = spec.vram {
            parts.push(format!(
                "vram request {} limit {}",
                format_bytes(vram.request),
                format_bytes(vram.limit)
            ));
        }
        let mut counts: Vec<u32> = self.targets.iter().map(|t| t.gpu_count).collect();
        counts.dedup();
        let gpus = match counts.as_slice() {
            [one] => format!(
                "{one} GPU{} per container",
                if *one == 1 { "" } else { "s" }
            ),
            many => format!(
                "GPUs per container {}",
                many.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        parts.push(gpus);
        if self.removes_native_gpus {
            parts.push(format!("{} removed", keys::NVIDIA_GPU));
        }
        if !self.keeps_native.is_empty() {
            parts.push(format!(
                "not injected, still on whole GPUs ({}): {}",
                keys::NVIDIA_GPU,
                self.keeps_native.join(", ")
            ));
        }
        parts.join("; ")
    }
}

fn env_entry<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container
        .get("env")?
        .as_array()?
        .iter()
        .find(|entry| entry.get("name").and_then(Value::as_str) == Some(name))
}

fn inject_container(container: &mut Value, target: &Target, spec: &ShareSpec) {
    let Some(container) = container.as_object_mut() else {
        return;
    };
    let gpus = u64::from(target.gpu_count);

    let resources = object_entry(container, "resources");
    for side in ["limits", "requests"] {
        let amounts = object_entry(resources, side);
        amounts.remove(keys::NVIDIA_GPU);
        if let Some(tflops) = spec.tflops.filter(|t| t.request > 0) {
            let whole = tflops.request.div_ceil(1000).saturating_mul(gpus);
            amounts.insert(keys::TFLOPS_RESOURCE.to_owned(), json!(whole.to_string()));
        }
        if let Some(vram) = spec.vram.filter(|v| v.request > 0) {
            let bytes = vram.request.saturating_mul(gpus);
            amounts.insert(keys::VRAM_RESOURCE.to_owned(), json!(bytes.to_string()));
        }
    }
    for side in ["limits", "requests"] {
        if resources
            .get(side)
            .and_then(Value::as_object)
            .is_some_and(Map::is_empty)
        {
            resources.remove(side);
        }
    }

    let field = |path: &str| json!({ "valueFrom": { "fieldRef": { "fieldPath": path } } });
    let mut env: Vec<(&str, Value)> = vec![
        ("TF_POD_NAMESPACE", field("metadata.namespace")),
        ("TF_POD_NAME", field("metadata.name")),
        ("TF_POD_UID", field("metadata.uid")),
        ("TF_CONTAINER_NAME", json!({ "value": target.name })),
        (
            "TF_GPU_COUNT",
            json!({ "value": target.gpu_count.to_string() }),
        ),
    ];
    if let Some(tflops) = spec.tflops {
        env.push((
            "TF_TFLOPS_REQUEST",
            json!({ "value": format_milli(tflops.request) }),
        ));
        env.push((
            "TF_TFLOPS_LIMIT",
            json!({ "value": format_milli(tflops.limit) }),
        ));
    }
    if let Some(vram) = spec.vram {
        env.push((
            "TF_VRAM_REQUEST",
            json!({ "value": vram.request.to_string() }),
        ));
        env.push(("TF_VRAM_LIMIT", json!({ "value": vram.limit.to_string() })));
    }
    env.push(("TF_POD_DIR", json!({ "value": POD_MOUNT_DIR })));
    env.push(("TF_AGENT_SOCKET", json!({ "value": AGENT_SOCKET })));

    let entries = array_entry(container, "env");
    let user_preload = entries
        .iter()
        .position(|entry| entry.get("name").and_then(Value::as_str) == Some("LD_PRELOAD"))
        .map(|index| entries.remove(index))
        .and_then(|entry| {
            entry
                .get("value")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|value| !value.is_empty());
    // The user's own entries follow ours; a copy of ours among them is dropped.
    let user_preload = user_preload.map(|user| {
        user.split([':', ' '])
            .filter(|entry| !entry.is_empty() && *entry != INTERPOSER_LIBRARY)
            .collect::<Vec<_>>()
            .join(":")
    });
    let preload = match user_preload.filter(|user| !user.is_empty()) {
        Some(user) => format!("{INTERPOSER_LIBRARY}:{user}"),
        None => INTERPOSER_LIBRARY.to_owned(),
    };
    env.push(("LD_PRELOAD", json!({ "value": preload })));
    entries.retain(|entry| {
        let name = entry.get("name").and_then(Value::as_str).unwrap_or("");
        !env.iter().any(|(ours, _)| *ours == name)
    });
    for (name, mut value) in env {
        if let Some(object) = value.as_object_mut() {
            object.insert("name".to_owned(), json!(name));
        }
        entries.push(value);
    }

    let mounts = array_entry(container, "volumeMounts");
    mounts.extend([
        json!({ "name": VOLUME_LIB, "mountPath": LIBRARY_HOST_DIR, "readOnly": true }),
        json!({ "name": VOLUME_POD, "mountPath": POD_MOUNT_DIR, "subPathExpr": "$(TF_POD_UID)" }),
        json!({ "name": VOLUME_AGENT, "mountPath": AGENT_DIR, "readOnly": true }),
    ]);
}

fn host_volume(name: &str, path: &str, kind: &str) -> Value {
    json!({ "name": name, "hostPath": { "path": path, "type": kind } })
}

/// The object at `key`, created (or replaced, if it was not an object) when needed.
fn object_entry<'a>(parent: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let slot = parent.entry(key).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    match slot {
        Value::Object(map) => map,
        _ => unreachable!("replaced by an object just above"),
    }
}

/// The array at `key`, created (or replaced, if it was not an array) when needed.
fn array_entry<'a>(parent: &'a mut Map<String, Value>, key: &str) -> &'a mut Vec<Value> {
    let slot = parent.entry(key).or_insert_with(|| json!([]));
    if !slot.is_array() {
        *slot = json!([]);
    }
    match slot {
        Value::Array(items) => items,
        _ => unreachable!("replaced by an array just above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn guide_spec() -> ShareSpec {
        let annotations: BTreeMap<String, String> = [
            (keys::TFLOPS_REQUEST, "100"),
            (keys::TFLOPS_LIMIT, "200"),
            (keys::VRAM_REQUEST, "3Gi"),
            (keys::VRAM_LIMIT, "3Gi"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        ShareSpec::from_annotations(&annotations).unwrap()
    }

    fn pod(containers: Value) -> Value {
        json!({ "metadata": {}, "spec": { "containers": containers } })
    }

    #[test]
    fn gpu_containers_are_chosen_and_rewritten() {
        let mut pod = pod(json!([
            { "name": "sidecar", "image": "envoy" },
            { "name": "python", "image": "app", "env": [{ "name": "LD_PRELOAD", "value": "/x.so" }],
              "resources": { "limits": { "nvidia.com/gpu": "1", "cpu": "2" } } }
        ]));
        let spec = guide_spec();
        let plan = Plan::new(&pod, &spec).unwrap();
        assert_eq!(
            plan.targets,
            vec![Target {
                index: 1,
                name: "python".to_owned(),
                gpu_count: 1
            }]
        );
        let summary = plan.apply(&mut pod, &spec).unwrap();
        assert_eq!(
            summary,
            "containers python; tflops request 100 limit 200; vram request 3Gi limit 3Gi; \
             1 GPU per container; nvidia.com/gpu removed"
        );
        let python = &pod["spec"]["containers"][1];
        assert_eq!(
            python["resources"],
            json!({
                "limits": { "cpu": "2", "tensor-fusion.ai/tflops": "100", "tensor-fusion.ai/vram": "3221225472" },
                "requests": { "tensor-fusion.ai/tflops": "100", "tensor-fusion.ai/vram": "3221225472" }
            })
        );
        let preload = env_entry(python, "LD_PRELOAD").unwrap();
        assert_eq!(
            preload["value"],
            "/opt/tensor-fusion/lib/libtensor_fusion_interposer.so:/x.so"
        );
        assert_eq!(
            env_entry(python, "TF_VRAM_LIMIT").unwrap()["value"],
            "3221225472"
        );
        assert_eq!(
            env_entry(python, "TF_TFLOPS_LIMIT").unwrap()["value"],
            "200"
        );
        assert_eq!(
            env_entry(python, "TF_POD_UID").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.uid"
        );
        assert_eq!(python["volumeMounts"][1]["subPathExpr"], "$(TF_POD_UID)");
        assert_eq!(pod["spec"]["volumes"].as_array().unwrap().len(), 3);
        assert_eq!(
            pod["spec"]["containers"][0],
            json!({ "name": "sidecar", "image": "envoy" })
        );
    }

    #[test]
    fn the_summary_names_containers_left_on_whole_gpus() {
        let mut pod = pod(json!([
            { "name": "a", "resources": { "limits": { "nvidia.com/gpu": "2" } } },
            { "name": "b" }
        ]));
        let mut spec = guide_spec();
        spec.inject_containers = Some(vec!["b".to_owned()]);
        let plan = Plan::new(&pod, &spec).unwrap();
        let summary = plan.apply(&mut pod, &spec).unwrap();
        assert!(
            summary.ends_with("not injected, still on whole GPUs (nvidia.com/gpu): a (2)"),
            "{summary}"
        );
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
            "2"
        );
    }

    #[test]
    fn the_interposer_is_preloaded_once_and_the_summary_tells_the_truth() {
        let mut pod = pod(json!([{ "name": "main", "env": [{ "name": "LD_PRELOAD",
            "value": "/opt/tensor-fusion/lib/libtensor_fusion_interposer.so:/x.so" }] }]));
        let spec = guide_spec();
        let plan = Plan::new(&pod, &spec).unwrap();
        let summary = plan.apply(&mut pod, &spec).unwrap();
        assert!(!summary.contains("nvidia.com/gpu removed"), "{summary}");
        assert_eq!(
            env_entry(&pod["spec"]["containers"][0], "LD_PRELOAD").unwrap()["value"],
            "/opt/tensor-fusion/lib/libtensor_fusion_interposer.so:/x.so"
        );
    }

    #[test]
    fn gpu_count_multiplies_the_scheduler_resources() {
        let mut pod =
            pod(json!([{ "name": "main", "resources": { "limits": { "nvidia.com/gpu": 2 } } }]));
        let spec = guide_spec();
        let plan = Plan::new(&pod, &spec).unwrap();
        assert_eq!(plan.targets[0].gpu_count, 2);
        plan.apply(&mut pod, &spec).unwrap();
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["requests"]["tensor-fusion.ai/tflops"],
            "200"
        );
    }

    #[test]
    fn container_choice_errors_are_specific() {
        let two = pod(json!([{ "name": "a" }, { "name": "b" }]));
        assert_eq!(
            Plan::new(&two, &guide_spec()).unwrap_err().to_string(),
            "cannot choose containers to inject: the pod has 2 containers and none limits \
             nvidia.com/gpu; set the annotation tensor-fusion.ai/inject-container"
        );
        let spec = ShareSpec {
            inject_containers: Some(vec!["c".to_owned()]),
            ..guide_spec()
        };
        assert_eq!(
            Plan::new(&two, &spec).unwrap_err().to_string(),
            "invalid annotation tensor-fusion.ai/inject-container: \"c\" is not a container of \
             this pod (containers: a, b)"
        );
        let only = pod(json!([{ "name": "solo" }]));
        assert_eq!(
            Plan::new(&only, &guide_spec()).unwrap().targets[0].name,
            "solo"
        );
    }
}
