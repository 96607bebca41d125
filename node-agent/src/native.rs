//! GPUs the NVIDIA device plugin gave to native pods, so shared workers never get them.
//!
//! The source is kubelet's PodResources API (`v1.PodResourcesLister/List` over the unix socket
//! `/var/lib/kubelet/pod-resources/kubelet.sock`); when the socket does not answer, the device
//! plugin checkpoint file (`kubelet_internal_checkpoint`) that kubelet writes on every
//! allocation. The agent polls it while it runs, so a native pod started after the agent is
//! seen within one poll interval. The messages are written by hand from
//! `k8s.io/kubelet/pkg/apis/podresources/v1/api.proto` (only the fields read here; prost skips
//! the others), so no protoc is needed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The extended resource the NVIDIA device plugin advertises.
pub const NVIDIA_GPU: &str = "nvidia.com/gpu";
/// gRPC path of `List` in kubelet's PodResources v1 service.
pub const LIST_PATH: &str = "/v1.PodResourcesLister/List";

/// `ListPodResourcesRequest` (empty).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesRequest {}

/// `ListPodResourcesResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesResponse {
    #[prost(message, repeated, tag = "1")]
    pub pod_resources: Vec<PodResources>,
}

/// `PodResources`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodResources {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(message, repeated, tag = "3")]
    pub containers: Vec<ContainerResources>,
}

/// `ContainerResources` (devices only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerResources {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub devices: Vec<ContainerDevices>,
}

/// `ContainerDevices` (without topology).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerDevices {
    #[prost(string, tag = "1")]
    pub resource_name: String,
    #[prost(string, repeated, tag = "2")]
    pub device_ids: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("failed to connect to kubelet PodResources at {path}: {source}")]
    Connect {
        path: String,
        source: tonic::transport::Error,
    },
    #[error("kubelet PodResources List failed: {0}")]
    List(tonic::Status),
    #[error("failed to read device plugin checkpoint {path}: {source}")]
    ReadCheckpoint {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid device plugin checkpoint {path}: {reason}")]
    InvalidCheckpoint { path: String, reason: String },
}

/// GPU device ids (UUIDs for the NVIDIA device plugin) held by native pods, from a `List`
/// answer.
pub fn gpus_in_response(response: &ListPodResourcesResponse) -> BTreeSet<String> {
    response
        .pod_resources
        .iter()
        .flat_map(|pod| &pod.containers)
        .flat_map(|container| &container.devices)
        .filter(|devices| devices.resource_name == NVIDIA_GPU)
        .flat_map(|devices| devices.device_ids.iter().cloned())
        .collect()
}

/// Calls `List` on kubelet's PodResources socket.
pub async fn list_pod_resources(socket: &Path) -> Result<ListPodResourcesResponse, NativeError> {
    let path = socket.to_path_buf();
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://kubelet.local")
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|source| NativeError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| NativeError::List(tonic::Status::unavailable(error.to_string())))?;
    let response = grpc
        .unary(
            tonic::Request::new(ListPodResourcesRequest {}),
            http::uri::PathAndQuery::from_static(LIST_PATH),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map_err(NativeError::List)?;
    Ok(response.into_inner())
}

/// GPU device ids in the device plugin checkpoint file. Handles both shapes kubelet has written:
/// `DeviceIDs` as a list (before 1.20) and as a map from NUMA node to list.
pub fn gpus_in_checkpoint(path: &Path, text: &str) -> Result<BTreeSet<String>, NativeError> {
    let invalid = |reason: String| NativeError::InvalidCheckpoint {
        path: path.display().to_string(),
        reason,
    };
    let document: serde_json::Value =
        serde_json::from_str(text).map_err(|error| invalid(error.to_string()))?;
    let entries = document
        .pointer("/Data/PodDeviceEntries")
        .ok_or_else(|| invalid("no Data.PodDeviceEntries".to_owned()))?;
    let mut gpus = BTreeSet::new();
    for entry in entries.as_array().into_iter().flatten() {
        if entry.get("ResourceName").and_then(|name| name.as_str()) != Some(NVIDIA_GPU) {
            continue;
        }
        let ids = entry.get("DeviceIDs");
        let lists: Vec<&serde_json::Value> = match ids {
            Some(serde_json::Value::Array(_)) => ids.into_iter().collect(),
            Some(serde_json::Value::Object(by_numa)) => by_numa.values().collect(),
            _ => Vec::new(),
        };
        for id in lists
            .into_iter()
            .filter_map(|list| list.as_array())
            .flatten()
        {
            if let Some(id) = id.as_str() {
                gpus.insert(id.to_owned());
            }
        }
    }
    Ok(gpus)
}

/// The GPU UUID a device plugin device id names. The NVIDIA device plugin names a GPU by its
/// UUID (`GPU-…`, the default `deviceIDStrategy: uuid`), by its NVML index
/// (`deviceIDStrategy: index`), and a time-sliced or MPS replica of it with a `::<n>` suffix
/// (`GPU-…::3`, `2::0`). Ids that name no known GPU (a MIG device's `MIG-…` UUID, an index past
/// the GPU list) are kept as they are, so they never match a shared GPU by accident.
pub fn gpu_uuid_of(id: &str, gpus: &[crate::discovery::DiscoveredGpu]) -> String {
    let base = id.split_once("::").map_or(id, |(base, _replica)| base);
    let by_index = base
        .bytes()
        .all(|byte| byte.is_ascii_digit())
        .then(|| base.parse::<u32>().ok())
        .flatten()
        .and_then(|index| gpus.iter().find(|gpu| gpu.index == index));
    if let Some(gpu) = by_index {
        return gpu.uuid.clone();
    }
    base.to_owned()
}

/// Where native GPU use is read from.
#[derive(Debug, Clone)]
pub struct NativeSource {
    pub socket: PathBuf,
    pub checkpoint: PathBuf,
}

/// Which source answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NativeOrigin {
    PodResources,
    Checkpoint,
    /// Neither exists (a node without the device plugin): no native GPUs.
    None,
}

impl NativeSource {
    /// GPUs held by native pods: PodResources if the socket answers, else the checkpoint; an
    /// error only if a source exists and cannot be read.
    pub async fn native_gpus(&self) -> Result<(BTreeSet<String>, NativeOrigin), NativeError> {
        let socket_error = if self.socket.exists() {
            match list_pod_resources(&self.socket).await {
                Ok(response) => {
                    return Ok((gpus_in_response(&response), NativeOrigin::PodResources));
                }
                Err(error) => Some(error),
            }
        } else {
            None
        };
        match std::fs::read_to_string(&self.checkpoint) {
            Ok(text) => Ok((
                gpus_in_checkpoint(&self.checkpoint, &text)?,
                NativeOrigin::Checkpoint,
            )),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => match socket_error {
                Some(error) => Err(error),
                None => Ok((BTreeSet::new(), NativeOrigin::None)),
            },
            Err(source) => Err(NativeError::ReadCheckpoint {
                path: self.checkpoint.display().to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf length-delimited field: key (field number, wire type 2), length, bytes.
    fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2, u8::try_from(bytes.len()).unwrap()];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn a_list_answer_encoded_by_the_official_field_numbers_decodes() {
        // Field numbers of k8s.io/kubelet/pkg/apis/podresources/v1/api.proto, with fields this
        // agent does not read (topology, cpu_ids) present, as kubelet sends them.
        let topology = field(3, &field(1, &[0x08, 0x00])); // TopologyInfo{nodes: [{ID: 0}]}
        let devices = [
            field(1, b"nvidia.com/gpu"),
            field(2, b"GPU-aaa"),
            field(2, b"GPU-bbb::1"),
            topology,
        ]
        .concat();
        let other = [field(1, b"rdma/hca"), field(2, b"mlx5_0")].concat();
        let cpu_ids = field(3, &[4, 6]); // packed int64
        let container = [
            field(1, b"cuda"),
            field(2, &devices),
            field(2, &other),
            cpu_ids,
        ]
        .concat();
        let pod = [
            field(1, b"trainer-0"),
            field(2, b"ml"),
            field(3, &container),
        ]
        .concat();
        let response = field(1, &pod);

        let decoded = <ListPodResourcesResponse as prost::Message>::decode(&response[..]).unwrap();
        assert_eq!(decoded.pod_resources[0].name, "trainer-0");
        assert_eq!(decoded.pod_resources[0].namespace, "ml");
        assert_eq!(decoded.pod_resources[0].containers[0].name, "cuda");
        assert_eq!(
            gpus_in_response(&decoded),
            BTreeSet::from(["GPU-aaa".to_owned(), "GPU-bbb::1".to_owned()])
        );
    }

    #[test]
    fn device_plugin_ids_name_gpus_by_uuid_index_or_replica() {
        let gpu = |index: u32, uuid: &str| crate::discovery::DiscoveredGpu {
            index,
            uuid: uuid.to_owned(),
            model: "NVIDIA H100".to_owned(),
            vram_bytes: 1,
        };
        let gpus = [gpu(0, "GPU-aaa"), gpu(1, "GPU-bbb")];
        for (id, uuid) in [
            ("GPU-aaa", "GPU-aaa"),
            ("GPU-bbb::3", "GPU-bbb"),
            ("1", "GPU-bbb"),
            ("0::2", "GPU-aaa"),
            ("7", "7"),
            ("MIG-1234", "MIG-1234"),
            ("", ""),
        ] {
            assert_eq!(gpu_uuid_of(id, &gpus), uuid, "{id}");
        }
    }

    #[test]
    fn checkpoint_with_numa_map_and_with_list() {
        // The shape kubelet 1.20+ writes (a checksum follows the data).
        let current = r#"{"Data":{"PodDeviceEntries":[
            {"PodUID":"6f1a","ContainerName":"cuda","ResourceName":"nvidia.com/gpu",
             "DeviceIDs":{"0":["GPU-aaa"],"1":["GPU-bbb"]},"AllocResp":"CgQKAA=="},
            {"PodUID":"77aa","ContainerName":"nic","ResourceName":"rdma/hca",
             "DeviceIDs":{"0":["mlx5_0"]},"AllocResp":""}],
            "RegisteredDevices":{"nvidia.com/gpu":["GPU-aaa","GPU-bbb","GPU-ccc"]}},
            "Checksum":1234567890}"#;
        let path = Path::new("kubelet_internal_checkpoint");
        assert_eq!(
            gpus_in_checkpoint(path, current).unwrap(),
            BTreeSet::from(["GPU-aaa".to_owned(), "GPU-bbb".to_owned()])
        );
        let old = r#"{"Data":{"PodDeviceEntries":[{"PodUID":"1","ContainerName":"c",
            "ResourceName":"nvidia.com/gpu","DeviceIDs":["GPU-ccc"],"AllocResp":""}],
            "RegisteredDevices":{}},"Checksum":1}"#;
        assert_eq!(
            gpus_in_checkpoint(path, old).unwrap(),
            BTreeSet::from(["GPU-ccc".to_owned()])
        );
        assert!(
            gpus_in_checkpoint(path, "{}")
                .unwrap_err()
                .to_string()
                .contains("no Data.PodDeviceEntries")
        );
    }
}
