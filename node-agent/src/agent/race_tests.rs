//! Interleavings of the per-pod handlers against a fake API server (a tower service behind
//! `kube::Client`, with pod GET/PATCH and the resourceVersion check, node patches and events),
//! which can hold chosen requests back, so the handlers run for real in the order a test sets.
//! The watch stream is not faked: a test plays the watch loop by calling `dispatch` (and the
//! steps of `InitDone`).

use super::*;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use kube::client::Body;
use serde_json::{Value, json};

const GIB: u64 = 1 << 30;
const NODE: &str = "node-a";

#[derive(Default)]
struct Fake {
    pods: BTreeMap<String, Value>,
    rv: u64,
    /// Pod names whose next PATCH waits for `release` (committed when released).
    gated_patch: BTreeSet<String>,
    /// Pod names whose PATCH commits but answers 500 (a lost response).
    lost_patch: BTreeSet<String>,
    /// Pod names whose GET reads now but answers only once `release` allows.
    gated_get: BTreeSet<String>,
    /// The next node PATCH waits for `release`.
    gated_node: bool,
    node: Value,
}

struct Server {
    fake: StdMutex<Fake>,
    seen: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

impl Server {
    /// Runs `edit` on the fake's state.
    fn with<R>(&self, edit: impl FnOnce(&mut Fake) -> R) -> R {
        edit(&mut self.fake.lock().expect("no test panics while holding it"))
    }
}

fn merge(target: &mut Value, patch: &Value) {
    if let Value::Object(patch) = patch {
        if !target.is_object() {
            *target = json!({});
        }
        let object = target.as_object_mut().unwrap();
        for (key, value) in patch {
            if value.is_null() {
                object.remove(key);
            } else {
                merge(object.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    } else {
        *target = patch.clone();
    }
}

fn reply(code: u16, body: Value) -> http::Response<Body> {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn status(code: u16, reason: &str) -> http::Response<Body> {
    reply(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code}),
    )
}

async fn serve(server: Arc<Server>, request: http::Request<Body>) -> http::Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let body = request.into_body().collect_bytes().await.unwrap();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", _, "pods", name] => {
            let name = name.to_string();
            if method == http::Method::GET {
                let (pod, gated) = {
                    let fake = server.fake.lock().unwrap();
                    (
                        fake.pods.get(&name).cloned(),
                        fake.gated_get.contains(&name),
                    )
                };
                if gated {
                    server.fake.lock().unwrap().gated_get.remove(&name);
                    server.seen.notify_one();
                    server.release.acquire().await.unwrap().forget();
                }
                return match pod {
                    Some(pod) => reply(200, pod),
                    None => status(404, "NotFound"),
                };
            }
            let patch: Value = serde_json::from_slice(&body).unwrap();
            let gated = server.fake.lock().unwrap().gated_patch.remove(&name);
            if gated {
                server.seen.notify_one();
                server.release.acquire().await.unwrap().forget();
            }
            let mut fake = server.fake.lock().unwrap();
            fake.rv += 1;
            let rv = fake.rv.to_string();
            let lost = fake.lost_patch.remove(&name);
            let Some(pod) = fake.pods.get_mut(&name) else {
                return status(404, "NotFound");
            };
            if let Some(wanted) = patch.pointer("/metadata/resourceVersion")
                && !wanted.is_null()
                && wanted != &pod["metadata"]["resourceVersion"]
            {
                return status(409, "Conflict");
            }
            merge(pod, &patch);
            pod["metadata"]["resourceVersion"] = json!(rv);
            let pod = pod.clone();
            if lost {
                return status(500, "InternalError");
            }
            reply(200, pod)
        }
        ["api", "v1", "nodes", node, rest @ ..] => {
            let gated = std::mem::take(&mut server.fake.lock().unwrap().gated_node);
            if gated {
                server.seen.notify_one();
                server.release.acquire().await.unwrap().forget();
            }
            if rest.is_empty() {
                let patch: Value = serde_json::from_slice(&body).unwrap();
                merge(&mut server.fake.lock().unwrap().node, &patch);
            }
            reply(
                200,
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
            )
        }
        _ => {
            // events.k8s.io: echo the event back.
            let value: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
            reply(200, value)
        }
    }
}

fn pod(name: &str, uid: &str, vram: u64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": "1",
                     "annotations": {crate::worker::INJECTED: "true"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "x", "env": [
            {"name": "TF_CONTAINER_NAME", "value": "main"},
            {"name": "TF_VRAM_REQUEST", "value": vram.to_string()}]}]},
        "status": {"phase": "Running"}
    })
}

fn setup(pods: &[Value]) -> (Arc<Agent>, Arc<Server>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut fake = Fake {
        rv: 10,
        ..Fake::default()
    };
    for pod in pods {
        fake.pods.insert(
            pod["metadata"]["name"].as_str().unwrap().to_owned(),
            pod.clone(),
        );
    }
    let server = Arc::new(Server {
        fake: StdMutex::new(fake),
        seen: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    });
    let for_service = server.clone();
    let service = tower::service_fn(move |request: http::Request<Body>| {
        let server = for_service.clone();
        async move { Ok::<_, std::convert::Infallible>(serve(server, request).await) }
    });
    let client = Client::new(service, "default");
    let config = AgentConfig {
        node_name: NODE.to_owned(),
        host_root: dir.path().to_owned(),
        state_dir: dir.path().to_owned(),
        ..AgentConfig::default()
    };
    let gpus = vec![DiscoveredGpu {
        index: 0,
        uuid: "GPU-0".to_owned(),
        model: "unknown".to_owned(),
        vram_bytes: 10 * GIB,
    }];
    let agent = Agent::new(config, client, gpus, HostSizes::default());
    (agent, server, dir)
}

fn server_pod(server: &Server, name: &str) -> Pod {
    serde_json::from_value(server.fake.lock().unwrap().pods[name].clone()).unwrap()
}

async fn settle(agent: &Agent) {
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if agent.pod_turns.lock().unwrap().is_empty() {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn assigned_vram(server: &Server) -> u64 {
    let fake = server.fake.lock().unwrap();
    fake.pods
        .values()
        .filter_map(|pod| {
            let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
            Assignment::from_pod(&pod).ok().flatten()
        })
        .map(|assignment| assignment.grant.request.vram_bytes)
        .sum()
}

/// The steps `run_pod_watch` takes at `InitDone`.
async fn init_done(agent: &Agent, listed: Vec<Pod>) {
    {
        let _epoch = agent.epoch.write().await;
        agent.rebuild(&listed).await;
    }
    for pod in listed {
        if is_shared(&pod) {
            agent.dispatch(pod, false).await;
        }
    }
    agent.retry_pending();
}

/// A relist whose list is read while a handler's assignment patch is in flight: the patch
/// commits after the list, the rebuild (which waits for the handler) drops that grant, and
/// another listed pod is given the same room. Both pods end up assigned on one GPU beyond
/// its capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relist_during_an_assignment_keeps_the_committed_grant() {
    let (agent, server, _dir) =
        setup(&[pod("b-p", "uid-p", 6 * GIB), pod("a-q", "uid-q", 6 * GIB)]);
    server.with(|fake| fake.gated_patch.insert("b-p".to_owned()));
    // Watch event for P (before the watch breaks with 410 Gone).
    agent.dispatch(server_pod(&server, "b-p"), false).await;
    server.seen.notified().await; // P's grant is in memory, its patch in flight
    // The watcher relists now (it is not blocked by handlers): apiserver order, by name.
    let listed = vec![server_pod(&server, "a-q"), server_pod(&server, "b-p")];
    // P's patch commits after the list.
    server.release.add_permits(1);
    init_done(&agent, listed).await;
    settle(&agent).await;
    // The resumed watch (from the list's resourceVersion) delivers P's own patch.
    agent.dispatch(server_pod(&server, "b-p"), false).await;
    settle(&agent).await;

    let on_pods = assigned_vram(&server);
    let state = agent.state.lock().await;
    let requested = state.allocator.gpus()[0].requested.vram_bytes;
    eprintln!(
        "assigned on pods: {} GiB, allocator requested: {} GiB, workers: {:?}, pending: {:?}",
        on_pods / GIB,
        requested / GIB,
        state.workers.keys().collect::<Vec<_>>(),
        state.pending.keys().collect::<Vec<_>>()
    );
    assert!(
        on_pods <= 10 * GIB,
        "over-commit: {} GiB assigned on a 10 GiB GPU",
        on_pods / GIB
    );
}

/// A retry re-reads a waiting pod, the pod is deleted and its Delete event handled before
/// the retry takes the pod's turn: the retry's stale copy (whose lost-response patch had in
/// fact been recorded) restores a grant for a pod that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_never_handles_a_copy_older_than_the_pods_delete() {
    let (agent, server, _dir) = setup(&[pod("p", "uid-p", 6 * GIB)]);
    server.with(|fake| fake.lost_patch.insert("p".to_owned()));
    agent.dispatch(server_pod(&server, "p"), false).await;
    settle(&agent).await;
    assert!(agent.state.lock().await.pending.contains_key("uid-p"));
    // Something is freed: a retry re-reads P (its copy carries the recorded assignment).
    server.with(|fake| fake.gated_get.insert("p".to_owned()));
    agent.retry_pending();
    server.seen.notified().await;
    // The watch: P's own patch (Apply), then P is deleted (Delete).
    let recorded = server_pod(&server, "p");
    let watch = {
        let agent = agent.clone();
        let server = server.clone();
        tokio::spawn(async move {
            agent.dispatch(recorded.clone(), false).await;
            server.fake.lock().unwrap().pods.remove("p");
            agent.dispatch(recorded, true).await;
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The retry's GET answers now; it dispatches its copy after the Delete.
    server.release.add_permits(1);
    watch.await.unwrap();
    settle(&agent).await;
    let state = agent.state.lock().await;
    assert!(
        state.allocator.grant("uid-p").is_none(),
        "leak: grant kept for a deleted pod: {:?}",
        state.workers.keys().collect::<Vec<_>>()
    );
}

/// The last worker leaves while a new one arrives: the leaver's label write (no shared
/// workers) lands last, and the newcomer skipped its own because the published value was
/// not yet updated. The node says no shared workers while one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_label_writes_leave_the_label_matching_the_workers() {
    let (agent, server, _dir) = setup(&[pod("p", "uid-p", 6 * GIB), pod("q", "uid-q", 2 * GIB)]);
    agent.dispatch(server_pod(&server, "p"), false).await;
    settle(&agent).await;
    assert_eq!(agent.state.lock().await.published_hosts_shared, Some(true));
    // P is deleted; its release publishes the node (first node call held).
    server.with(|fake| fake.gated_node = true);
    let gone = server_pod(&server, "p");
    server.fake.lock().unwrap().pods.remove("p");
    agent.dispatch(gone, true).await;
    server.seen.notified().await;
    // Q arrives meanwhile and is assigned.
    agent.dispatch(server_pod(&server, "q"), false).await;
    settle(&agent).await;
    server.release.add_permits(1);
    settle(&agent).await;
    let label = server
        .fake
        .lock()
        .unwrap()
        .node
        .pointer(&format!(
            "/metadata/labels/{}",
            SHARED_LABEL.replace('/', "~1")
        ))
        .cloned();
    let state = agent.state.lock().await;
    eprintln!(
        "label {label:?}, workers {:?}, published {:?}",
        state.workers.keys().collect::<Vec<_>>(),
        state.published_hosts_shared
    );
    assert!(state.workers.contains_key("uid-q"));
    assert_eq!(
        label,
        Some(json!("true")),
        "node label says no shared workers while Q runs"
    );
}
