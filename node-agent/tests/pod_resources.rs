//! Coexistence sources against real shapes: a fake kubelet serving the PodResources v1 gRPC
//! service on a unix socket (tonic server, the same wire format as kubelet), and the device
//! plugin checkpoint file as kubelet writes it. The fake's answer changes while the source is
//! polled, as when a native pod starts after the agent.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tensor_fusion_node_agent::native::{
    ContainerDevices, ContainerResources, ListPodResourcesRequest, ListPodResourcesResponse,
    NativeOrigin, NativeSource, PodResources,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A kubelet's `v1.PodResourcesLister` with a settable answer.
#[derive(Clone, Default)]
struct FakeKubelet {
    pods: Arc<Mutex<Vec<PodResources>>>,
}

impl tonic::server::NamedService for FakeKubelet {
    const NAME: &'static str = "v1.PodResourcesLister";
}

struct List(FakeKubelet);

impl tonic::server::UnaryService<ListPodResourcesRequest> for List {
    type Response = ListPodResourcesResponse;
    type Future = BoxFuture<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<ListPodResourcesRequest>) -> Self::Future {
        let pods = self.0.pods.lock().expect("no test thread panicked").clone();
        Box::pin(async move {
            Ok(tonic::Response::new(ListPodResourcesResponse {
                pod_resources: pods,
            }))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for FakeKubelet {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let kubelet = self.clone();
        Box::pin(async move {
            if request.uri().path() == "/v1.PodResourcesLister/List" {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(List(kubelet), request).await)
            } else {
                Ok(tonic::Status::unimplemented("not a PodResources v1 List").into_http())
            }
        })
    }
}

fn gpu_pod(name: &str, gpus: &[&str]) -> PodResources {
    PodResources {
        name: name.to_owned(),
        namespace: "training".to_owned(),
        containers: vec![ContainerResources {
            name: "cuda".to_owned(),
            devices: vec![
                ContainerDevices {
                    resource_name: "nvidia.com/gpu".to_owned(),
                    device_ids: gpus.iter().map(|gpu| (*gpu).to_owned()).collect(),
                },
                ContainerDevices {
                    resource_name: "rdma/hca".to_owned(),
                    device_ids: vec!["mlx5_0".to_owned()],
                },
            ],
        }],
    }
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|id| (*id).to_owned()).collect()
}

#[tokio::test]
async fn pod_resources_over_a_unix_socket_and_live_changes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kubelet.sock");
    let kubelet = FakeKubelet::default();
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(kubelet.clone())
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener));
    tokio::spawn(server);

    let source = NativeSource {
        socket: socket.clone(),
        checkpoint: dir.path().join("kubelet_internal_checkpoint"),
    };
    assert_eq!(
        source.native_gpus().await.unwrap(),
        (BTreeSet::new(), NativeOrigin::PodResources)
    );
    // A native pod starts while the agent runs.
    kubelet
        .pods
        .lock()
        .unwrap()
        .push(gpu_pod("trainer-0", &["GPU-aaa", "GPU-bbb"]));
    assert_eq!(
        source.native_gpus().await.unwrap(),
        (set(&["GPU-aaa", "GPU-bbb"]), NativeOrigin::PodResources)
    );
    kubelet.pods.lock().unwrap().clear();
    assert_eq!(source.native_gpus().await.unwrap().0, BTreeSet::new());
}

#[tokio::test]
async fn checkpoint_when_the_socket_is_absent_and_nothing_when_neither_exists() {
    let dir = tempfile::tempdir().unwrap();
    let source = NativeSource {
        socket: dir.path().join("kubelet.sock"),
        checkpoint: dir.path().join("kubelet_internal_checkpoint"),
    };
    assert_eq!(
        source.native_gpus().await.unwrap(),
        (BTreeSet::new(), NativeOrigin::None)
    );
    std::fs::write(
        &source.checkpoint,
        r#"{"Data":{"PodDeviceEntries":[{"PodUID":"b2f1","ContainerName":"cuda",
        "ResourceName":"nvidia.com/gpu","DeviceIDs":{"0":["GPU-ccc"]},"AllocResp":"CgQKAA=="}],
        "RegisteredDevices":{"nvidia.com/gpu":["GPU-ccc","GPU-ddd"]}},"Checksum":3183467582}"#,
    )
    .unwrap();
    assert_eq!(
        source.native_gpus().await.unwrap(),
        (set(&["GPU-ccc"]), NativeOrigin::Checkpoint)
    );
}
