//! A shared-GPU pod as the agent sees it: what its containers ask for (read from the environment
//! the webhook injected), the assignment annotation that is the durable record of its grant, and
//! the files in its pod directory that hand the grant to the interposer.
//!
//! Flow: [`WorkerSpec::from_pod`] -> allocator -> [`Assignment`] written on the pod (the commit
//! point) -> [`write_pod_files`]. After a restart the agent reads [`Assignment::from_pod`] back
//! and rewrites the files, so a crash between the two steps loses nothing.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use tensor_fusion_interposer_core::config::{ContainerLimits, limits_file_path};

use crate::allocator::{Grant, Resources, ShareRequest};

/// Written by the webhook on shared pods.
pub const INJECTED: &str = "tensor-fusion.ai/injected";
/// The grant, as JSON ([`Assignment`]): the durable truth of this node's allocations.
pub const ASSIGNMENT: &str = "tensor-fusion.ai/assignment";
/// The assigned GPU UUIDs, comma-separated, for people reading `kubectl describe`.
pub const ASSIGNED_GPUS: &str = "tensor-fusion.ai/assigned-gpus";
/// Why the pod got no GPU (removed once it gets one).
pub const ALLOCATION_FAILED: &str = "tensor-fusion.ai/allocation-failed";

/// One injected container's ask, per GPU. `None`: the dimension is not limited.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    pub name: String,
    pub gpu_count: u32,
    pub tflops_request: Option<f64>,
    pub tflops_limit: Option<f64>,
    pub vram_request: Option<u64>,
    pub vram_limit: Option<u64>,
}

/// What a shared pod asks for.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub containers: Vec<ContainerSpec>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid value in container {container}: {key} = {value:?}")]
    InvalidEnv {
        container: String,
        key: &'static str,
        value: String,
    },
    #[error("invalid annotation {ASSIGNMENT}: {0}")]
    InvalidAssignment(String),
}

/// Whether the webhook put this pod on shared GPUs.
pub fn is_shared(pod: &Pod) -> bool {
    annotation(pod, INJECTED) == Some("true")
}

pub fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Whether the pod's containers are done for good (its share can go back).
pub fn has_ended(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
}

fn env_value<'a>(container: &'a Container, key: &str) -> Option<&'a str> {
    container
        .env
        .as_ref()?
        .iter()
        .find(|var| var.name == key)?
        .value
        .as_deref()
        .filter(|value| !value.trim().is_empty())
}

fn parse<T: std::str::FromStr>(
    container: &Container,
    key: &'static str,
) -> Result<Option<T>, WorkerError> {
    env_value(container, key)
        .map(|value| {
            value
                .trim()
                .parse::<T>()
                .map_err(|_| WorkerError::InvalidEnv {
                    container: container.name.clone(),
                    key,
                    value: value.to_owned(),
                })
        })
        .transpose()
}

impl WorkerSpec {
    /// The ask of a shared pod: every container the webhook injected (it carries
    /// `TF_CONTAINER_NAME`). A missing request falls back to the limit.
    pub fn from_pod(pod: &Pod) -> Result<Self, WorkerError> {
        let containers = pod
            .spec
            .as_ref()
            .map(|spec| spec.containers.as_slice())
            .unwrap_or_default();
        let mut specs = Vec::new();
        for container in containers {
            if env_value(container, "TF_CONTAINER_NAME").is_none() {
                continue;
            }
            let tflops_limit = parse::<f64>(container, "TF_TFLOPS_LIMIT")?;
            let vram_limit = parse::<u64>(container, "TF_VRAM_LIMIT")?;
            specs.push(ContainerSpec {
                name: container.name.clone(),
                gpu_count: parse::<u32>(container, "TF_GPU_COUNT")?.unwrap_or(1).max(1),
                tflops_request: parse::<f64>(container, "TF_TFLOPS_REQUEST")?.or(tflops_limit),
                tflops_limit,
                vram_request: parse::<u64>(container, "TF_VRAM_REQUEST")?.or(vram_limit),
                vram_limit,
            });
        }
        Ok(Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            containers: specs,
        })
    }

    /// The pod's ask as one share per GPU: as many GPUs as its widest container, and the sum of
    /// the containers' requests and limits (an unlimited dimension counts its request).
    pub fn share_request(&self) -> ShareRequest {
        let mut request = Resources::default();
        let mut limit = Resources::default();
        for container in &self.containers {
            let tflops_request = container.tflops_request.unwrap_or(0.0);
            let vram_request = container.vram_request.unwrap_or(0);
            request.tflops += tflops_request;
            request.vram_bytes += vram_request;
            limit.tflops += container.tflops_limit.unwrap_or(tflops_request);
            limit.vram_bytes += container.vram_limit.unwrap_or(vram_request);
        }
        ShareRequest {
            gpu_count: self
                .containers
                .iter()
                .map(|container| container.gpu_count)
                .max()
                .unwrap_or(1),
            request,
            limit,
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The grant recorded on the pod.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub node: String,
    /// The pod the grant was made for. A pod created from another pod's manifest (a copied
    /// `kubectl get -o yaml`) carries that pod's annotation; its own uid tells it apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(flatten)]
    pub grant: Grant,
}

impl Assignment {
    /// The grant recorded on `pod`; an error if it cannot be read or was made for another pod.
    pub fn from_pod(pod: &Pod) -> Result<Option<Self>, WorkerError> {
        let Some(text) = annotation(pod, ASSIGNMENT) else {
            return Ok(None);
        };
        let assignment: Self = serde_json::from_str(text)
            .map_err(|error| WorkerError::InvalidAssignment(error.to_string()))?;
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        match &assignment.pod_uid {
            Some(made_for) if made_for != uid => Err(WorkerError::InvalidAssignment(format!(
                "made for pod uid {made_for}, not this pod ({uid}); copied from another pod?"
            ))),
            _ => Ok(Some(assignment)),
        }
    }

    /// The annotations that record this grant (and clear an earlier failure).
    pub fn annotations(&self) -> serde_json::Value {
        serde_json::json!({
            ASSIGNMENT: serde_json::to_string(self).expect("an assignment is plain data"),
            ASSIGNED_GPUS: self.grant.gpu_uuids.join(","),
            ALLOCATION_FAILED: null,
        })
    }
}

/// `<host root>/pods/<pod uid>`.
pub fn pod_dir(host_root: &Path, uid: &str) -> PathBuf {
    host_root.join("pods").join(uid)
}

/// What the limits file of one container says, given the pod's grant.
///
/// The interposer reads `vram_limit` as the ceiling on the device and `spill_quota` as host
/// memory it may add past that ceiling. So on a node with host-backed VRAM the device ceiling is
/// the request (the part backed by physical VRAM) and the spill quota the rest up to the limit:
/// device plus host never exceed the limit. Without host backing the limit is the device ceiling
/// and nothing spills.
pub fn container_limits(
    container: &ContainerSpec,
    grant: &Grant,
    gpu_tflops: Option<f64>,
    host_backed_vram: bool,
) -> ContainerLimits {
    let (vram_limit, spill_quota) = match (
        host_backed_vram,
        container.vram_limit,
        container.vram_request,
    ) {
        (true, Some(limit), Some(request)) => {
            let on_device = request.min(limit);
            (Some(on_device), limit - on_device)
        }
        (_, limit, _) => (limit, 0),
    };
    ContainerLimits {
        gpu_uuids: grant
            .gpu_uuids
            .iter()
            .take(container.gpu_count as usize)
            .cloned()
            .collect(),
        gpu_count: Some(container.gpu_count),
        tflops_request: container.tflops_request,
        tflops_limit: container.tflops_limit,
        gpu_tflops: gpu_tflops.filter(|tflops| *tflops > 0.0),
        vram_request: container.vram_request,
        vram_limit,
        spill_quota,
        ..ContainerLimits::default()
    }
}

/// Writes `<pod dir>/<container>.limits` for every container, each atomically (a temporary file
/// in the same directory, then rename). Returns the pod directory.
pub fn write_pod_files(
    host_root: &Path,
    worker: &WorkerSpec,
    grant: &Grant,
    gpu_tflops: &BTreeMap<String, f64>,
    host_backed_vram: bool,
) -> std::io::Result<PathBuf> {
    let dir = pod_dir(host_root, &worker.uid);
    std::fs::create_dir_all(&dir)?;
    let tflops = grant
        .gpu_uuids
        .first()
        .and_then(|uuid| gpu_tflops.get(uuid))
        .copied();
    for container in &worker.containers {
        let limits = container_limits(container, grant, tflops, host_backed_vram);
        let path = limits_file_path(&dir, &container.name);
        let tmp = dir.join(format!(".{}.limits.tmp", container.name));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(limits.render_file().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(dir)
}

/// Removes a pod's directory (nothing to do when it is gone already).
pub fn remove_pod_dir(host_root: &Path, uid: &str) -> std::io::Result<()> {
    match std::fs::remove_dir_all(pod_dir(host_root, uid)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as the webhook leaves it (the env block of `webhook/src/inject.rs`).
    fn injected_pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "inference-1", "namespace": "ml", "uid": "0c4e-uid",
                "annotations": { "tensor-fusion.ai/injected": "true" }
            },
            "spec": { "containers": [
                { "name": "python", "image": "x", "env": [
                    { "name": "TF_POD_UID", "valueFrom": { "fieldRef": { "fieldPath": "metadata.uid" } } },
                    { "name": "TF_CONTAINER_NAME", "value": "python" },
                    { "name": "TF_GPU_COUNT", "value": "1" },
                    { "name": "TF_TFLOPS_REQUEST", "value": "100" },
                    { "name": "TF_TFLOPS_LIMIT", "value": "200" },
                    { "name": "TF_VRAM_REQUEST", "value": "3221225472" },
                    { "name": "TF_VRAM_LIMIT", "value": "4294967296" },
                    { "name": "TF_POD_DIR", "value": "/run/tensor-fusion/pod" }
                ]},
                { "name": "sidecar", "image": "y" }
            ]}
        }))
        .unwrap()
    }

    #[test]
    fn reads_the_injected_environment() {
        let worker = WorkerSpec::from_pod(&injected_pod()).unwrap();
        assert_eq!(worker.containers.len(), 1, "the sidecar was not injected");
        let share = worker.share_request();
        assert_eq!(share.gpu_count, 1);
        assert_eq!(share.request.tflops, 100.0);
        assert_eq!(share.limit.tflops, 200.0);
        assert_eq!(share.request.vram_bytes, 3 << 30);
        assert_eq!(share.limit.vram_bytes, 4 << 30);
    }

    #[test]
    fn writes_the_limits_file_the_interposer_reads() {
        let root = tempfile::tempdir().unwrap();
        let worker = WorkerSpec::from_pod(&injected_pod()).unwrap();
        let grant = Grant {
            gpu_uuids: vec!["GPU-a".into()],
            request: worker.share_request().request,
            limit: worker.share_request().limit,
        };
        let tflops = BTreeMap::from([("GPU-a".to_owned(), 989.0)]);
        let dir = write_pod_files(root.path(), &worker, &grant, &tflops, true).unwrap();
        assert_eq!(dir, root.path().join("pods/0c4e-uid"));
        let text = std::fs::read_to_string(dir.join("python.limits")).unwrap();
        assert_eq!(
            text,
            "# tensor-fusion container limits, read by the interposer at cuInit\nversion=1\n\
             gpu_uuids=GPU-a\ntflops_request=100\ntflops_limit=200\ngpu_tflops=989\n\
             vram_request=3221225472\nvram_limit=3221225472\nspill_quota=1073741824\n"
        );
        // The interposer's own parser reads it back.
        let mut limits = ContainerLimits::default();
        limits
            .apply_file(&dir.join("python.limits"), &text)
            .unwrap();
        assert_eq!(limits.gpu_uuids, ["GPU-a"]);
        assert_eq!(limits.vram_limit, Some(3 << 30));
        assert_eq!(limits.spill_quota, 1 << 30);
        remove_pod_dir(root.path(), "0c4e-uid").unwrap();
        assert!(!dir.exists());
        remove_pod_dir(root.path(), "0c4e-uid").unwrap();
    }

    /// The interposer lets a container hold `vram_limit` on the device plus `spill_quota` on
    /// the host; together they must stay within the pod's VRAM limit.
    #[test]
    fn device_and_spill_together_stay_within_the_vram_limit() {
        const MB: u64 = 1 << 20;
        let container = ContainerSpec {
            name: "python".into(),
            gpu_count: 1,
            tflops_request: None,
            tflops_limit: None,
            vram_request: Some(2 * MB),
            vram_limit: Some(10 * MB),
        };
        let grant = Grant {
            gpu_uuids: vec!["GPU-a".into()],
            request: Resources::default(),
            limit: Resources::default(),
        };
        let read_back = |host_backed_vram| {
            let text = container_limits(&container, &grant, None, host_backed_vram).render_file();
            let mut limits = ContainerLimits::default();
            limits
                .apply_file(Path::new("python.limits"), &text)
                .unwrap();
            (limits.vram_limit, limits.spill_quota)
        };

        // Host-backed: the request on the device, the burst above it on the host.
        assert_eq!(read_back(true), (Some(2 * MB), 8 * MB));
        // No host backing: the limit on the device, nothing spills.
        assert_eq!(read_back(false), (Some(10 * MB), 0));

        // A request above the limit never raises the device ceiling past the limit.
        let inverted = ContainerSpec {
            vram_request: Some(12 * MB),
            ..container.clone()
        };
        let limits = container_limits(&inverted, &grant, None, true);
        assert_eq!((limits.vram_limit, limits.spill_quota), (Some(10 * MB), 0));
        // No VRAM limit: nothing to split.
        let unlimited = ContainerSpec {
            vram_limit: None,
            ..container
        };
        let limits = container_limits(&unlimited, &grant, None, true);
        assert_eq!((limits.vram_limit, limits.spill_quota), (None, 0));
    }

    #[test]
    fn assignment_round_trips_through_the_annotation() {
        let assignment = Assignment {
            node: "gpu-node-1".into(),
            pod_uid: None,
            grant: Grant {
                gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
                request: Resources {
                    tflops: 100.0,
                    vram_bytes: 1,
                },
                limit: Resources {
                    tflops: 200.0,
                    vram_bytes: 2,
                },
            },
        };
        let mut pod = injected_pod();
        let annotations = assignment.annotations();
        pod.metadata.annotations.get_or_insert_default().insert(
            ASSIGNMENT.into(),
            annotations[ASSIGNMENT].as_str().unwrap().into(),
        );
        assert_eq!(annotations[ASSIGNED_GPUS], "GPU-a,GPU-b");
        assert_eq!(
            annotations[ASSIGNMENT],
            r#"{"node":"gpu-node-1","gpuUuids":["GPU-a","GPU-b"],"request":{"tflops":100.0,"vramBytes":1},"limit":{"tflops":200.0,"vramBytes":2}}"#
        );
        assert_eq!(Assignment::from_pod(&pod).unwrap(), Some(assignment));
    }

    #[test]
    fn an_assignment_copied_from_another_pod_is_not_this_pods() {
        let mut pod = injected_pod();
        pod.metadata.uid = Some("uid-new".into());
        let recorded = |made_for: &str| {
            format!(
                r#"{{"node":"gpu-node-1","podUid":"{made_for}","gpuUuids":["GPU-a"],"request":{{"tflops":1.0,"vramBytes":1}},"limit":{{"tflops":1.0,"vramBytes":1}}}}"#
            )
        };
        let annotations = pod.metadata.annotations.get_or_insert_default();
        annotations.insert(ASSIGNMENT.into(), recorded("uid-old"));
        let error = Assignment::from_pod(&pod).unwrap_err().to_string();
        assert_eq!(
            error,
            "invalid annotation tensor-fusion.ai/assignment: made for pod uid uid-old, not this \
             pod (uid-new); copied from another pod?"
        );
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert(ASSIGNMENT.into(), recorded("uid-new"));
        let own = Assignment::from_pod(&pod).unwrap().unwrap();
        assert_eq!(own.pod_uid.as_deref(), Some("uid-new"));
    }
}
