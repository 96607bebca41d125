//! The node agent against the real local control plane: two kwok GPU nodes, one agent process
//! each on the mock NVML. Shared pods are created the way the webhook leaves them (annotation
//! `tensor-fusion.ai/injected`, the `TF_*` environment and the extended resources), without the
//! enabled label, so they do not depend on a webhook registration.
//!
//! The agents resync every second (`RESYNC_SECONDS`); the mock NVML's GPU list can change
//! under a running agent (`AgentProcess::set_gpus`).
//!
//! Run by `make test` (which starts the cluster); skipped without `TF_E2E_KUBECONFIG`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tensor_fusion_e2e::agent::{AgentProcess, MockGpus, RESYNC_SECONDS};
use tensor_fusion_e2e::{Cluster, annotation, wait_for};

const GIB: u64 = 1 << 30;
const NODES: [&str; 2] = ["gpu-node-1", "gpu-node-2"];
const ASSIGNMENT: &str = "tensor-fusion.ai/assignment";

/// Tests start agents on the same nodes, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Puts the capacity and labels of `cluster.sh`'s node manifest back when a test ends, so the
/// webhook tests that run later see the nodes as they were.
struct RestoreNodes {
    client: kube::Client,
}

impl RestoreNodes {
    async fn restore(&self) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let resources =
            json!({ "tensor-fusion.ai/tflops": "8000", "tensor-fusion.ai/vram": "1140Gi" });
        let status = json!({ "status": { "capacity": resources, "allocatable": resources } });
        let labels = json!({ "metadata": { "labels": {
            "tensor-fusion.ai/gpu-model": null,
            "tensor-fusion.ai/gpu-count": null,
            "tensor-fusion.ai/hosts-shared-workers": null,
        }}});
        for node in NODES {
            let _ = nodes
                .patch_status(node, &PatchParams::default(), &Patch::Merge(&status))
                .await;
            let _ = nodes
                .patch(node, &PatchParams::default(), &Patch::Merge(&labels))
                .await;
        }
    }
}

/// A shared pod template as the webhook would leave it, pinned to the two agent nodes.
fn shared_template(app: &str, vram: u64) -> Value {
    tensor_fusion_e2e::agent::shared_template(app, vram, &NODES)
}

fn deployment(app: &str, replicas: i32, vram: u64) -> Deployment {
    serde_json::from_value(json!({
        "metadata": { "name": app },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": app } },
            "template": shared_template(app, vram)
        }
    }))
    .expect("a valid Deployment")
}

/// The assignment recorded on a pod: (node, GPU UUIDs, VRAM request).
fn assignment(pod: &Pod) -> Option<(String, Vec<String>, u64)> {
    let value: Value = serde_json::from_str(annotation(pod, ASSIGNMENT)?).ok()?;
    let gpus = value["gpuUuids"]
        .as_array()?
        .iter()
        .filter_map(|uuid| uuid.as_str().map(str::to_owned))
        .collect();
    Some((
        value["node"].as_str()?.to_owned(),
        gpus,
        value["request"]["vramBytes"].as_u64()?,
    ))
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// VRAM requested per (node, GPU) according to the pod annotations.
fn vram_by_gpu(pods: &[Pod]) -> BTreeMap<(String, String), u64> {
    let mut sums = BTreeMap::new();
    for pod in pods {
        if let Some((node, gpus, vram)) = assignment(pod) {
            for gpu in gpus {
                *sums.entry((node.clone(), gpu)).or_default() += vram;
            }
        }
    }
    sums
}

async fn start_agents(
    cluster: &Cluster,
    dir: &std::path::Path,
    gpus: MockGpus,
) -> anyhow::Result<Vec<AgentProcess>> {
    let mut agents = Vec::new();
    for node in NODES {
        agents.push(AgentProcess::start(cluster, dir, node, gpus).await?);
    }
    wait_advertised_vram(cluster, gpus).await?;
    Ok(agents)
}

/// Waits until both nodes advertise the agents' VRAM: the scheduler must see the agents'
/// capacity before the pods arrive.
async fn wait_advertised_vram(cluster: &Cluster, gpus: MockGpus) -> anyhow::Result<()> {
    tensor_fusion_e2e::agent::wait_advertised_vram(cluster, &NODES, gpus).await
}

async fn scheduled_pods(cluster: &Cluster, namespace: &str, app: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(cluster
        .live_pods(namespace, &format!("app={app}"))
        .await?
        .into_iter()
        .filter(|pod| node_of(pod).is_some())
        .collect())
}

#[tokio::test]
async fn shared_pods_get_gpus_within_capacity_and_a_misfit_gets_an_event() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cluster) = Cluster::from_env().await? else {
        return Ok(());
    };
    let restore = RestoreNodes {
        client: cluster.client.clone(),
    };
    let dir = tempfile::tempdir()?;
    // Two mock H100s of 16 GiB per node: the scheduler sees 32 GiB per node.
    let gpus = MockGpus {
        count: 2,
        vram_bytes: 16 * GIB,
    };
    let agents = start_agents(&cluster, dir.path(), gpus).await?;
    let namespace = cluster.namespace("tf-agent").await?;
    let ns = namespace.name.as_str();

    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let labels = nodes
        .get(NODES[0])
        .await?
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels.get("tensor-fusion.ai/gpu-model").map(String::as_str),
        Some("NVIDIA-H100-80GB-HBM3")
    );
    assert_eq!(
        labels.get("tensor-fusion.ai/gpu-count").map(String::as_str),
        Some("2")
    );

    // 10 GiB workers: the scheduler fits 3 per node (30 of 32 GiB), but one GPU holds only one.
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    deployments
        .create(&PostParams::default(), &deployment("big", 6, 10 * GIB))
        .await?;
    wait_for(
        "6 scheduled pods with an outcome",
        Duration::from_secs(90),
        || async {
            let pods = scheduled_pods(&cluster, ns, "big").await?;
            Ok(pods.len() == 6
                && pods.iter().all(|pod| {
                    annotation(pod, ASSIGNMENT).is_some()
                        || annotation(pod, "tensor-fusion.ai/allocation-failed").is_some()
                }))
        },
    )
    .await?;
    let pods = scheduled_pods(&cluster, ns, "big").await?;
    let assigned: Vec<&Pod> = pods
        .iter()
        .filter(|pod| assignment(pod).is_some())
        .collect();
    let refused: Vec<&Pod> = pods
        .iter()
        .filter(|pod| assignment(pod).is_none())
        .collect();
    assert_eq!(assigned.len(), 4, "one 10 GiB worker per 16 GiB GPU");
    assert_eq!(refused.len(), 2);
    for ((node, gpu), vram) in vram_by_gpu(&pods) {
        assert_eq!(vram, 10 * GIB, "{node} {gpu} holds exactly one worker");
    }
    for pod in &assigned {
        let (node, gpus, _) = assignment(pod).unwrap_or_default();
        assert_eq!(
            Some(node.as_str()),
            node_of(pod),
            "assigned by its own node's agent"
        );
        // The interposer's file is in the pod's directory under that node's host root.
        let agent = agents
            .iter()
            .find(|agent| agent.node == node)
            .expect("an agent per node");
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let limits = std::fs::read_to_string(
            agent
                .host_root
                .join("pods")
                .join(&uid)
                .join("python.limits"),
        )?;
        assert!(
            limits.contains(&format!("gpu_uuids={}\n", gpus.join(","))),
            "{limits}"
        );
        assert!(
            limits.contains("tflops_limit=200\ngpu_tflops=989\n"),
            "{limits}"
        );
        // No host-backed VRAM on these nodes: the limit is the device ceiling, nothing spills.
        assert!(
            limits.contains(&format!("vram_limit={}\nspill_quota=0\n", 10 * GIB)),
            "{limits}"
        );
        assert_eq!(
            annotation(pod, "tensor-fusion.ai/assigned-gpus"),
            Some(gpus.join(",").as_str())
        );
    }
    // The misfits say why, on the pod and as an Event.
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), ns);
    for pod in &refused {
        let reason = annotation(pod, "tensor-fusion.ai/allocation-failed").unwrap_or_default();
        assert!(
            reason.starts_with("no GPU fits: 0 of 1 wanted GPUs fit request 100 TFLOPS"),
            "{reason}"
        );
        assert!(reason.contains("fragmented: the node has"), "{reason}");
        let name = pod.metadata.name.clone().unwrap_or_default();
        wait_for(
            "the GPUAllocationFailed event",
            Duration::from_secs(30),
            || async {
                let list = events
                    .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
                    .await?;
                Ok(list.items.iter().any(|event| {
                    event.reason.as_deref() == Some("GPUAllocationFailed")
                        && event
                            .message
                            .as_deref()
                            .is_some_and(|message| message.contains("fragmented"))
                }))
            },
        )
        .await?;
    }
    let described = cluster.kubectl(&[
        "describe",
        "pod",
        "-n",
        ns,
        refused[0].metadata.name.as_deref().unwrap_or_default(),
    ])?;
    assert!(described.contains("GPUAllocationFailed"), "{described}");

    // Deleting an assigned pod frees its GPU; the agent gives it to a waiting pod.
    let pod_api: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let victim = assigned[0].metadata.name.clone().unwrap_or_default();
    let victim_uid = assigned[0].metadata.uid.clone().unwrap_or_default();
    let victim_node = node_of(assigned[0]).unwrap_or_default().to_owned();
    pod_api.delete(&victim, &DeleteParams::default()).await?;
    wait_for(
        "a waiting pod to get the freed GPU",
        Duration::from_secs(60),
        || async {
            let pods = scheduled_pods(&cluster, ns, "big").await?;
            let on_node = pods.iter().filter(|pod| node_of(pod) == Some(&victim_node));
            Ok(on_node.filter(|pod| assignment(pod).is_some()).count() == 2)
        },
    )
    .await?;
    let agent = agents
        .iter()
        .find(|agent| agent.node == victim_node)
        .expect("an agent per node");
    assert!(
        !agent.host_root.join("pods").join(&victim_uid).exists(),
        "the deleted pod's directory is gone"
    );

    let allocation = agent.allocation().await?;
    assert_eq!(allocation["gpus"].as_array().map(Vec::len), Some(2));
    assert_eq!(allocation["gpus"][0]["physical"]["tflops"], 989.0);
    let (_, metrics) = agent.get("/metrics").await?;
    assert!(
        metrics.contains(&format!(
            "tensor_fusion_agent_gpu_vram_capacity_bytes{{gpu=\"{}\"}} {}",
            allocation["gpus"][0]["uuid"].as_str().unwrap_or_default(),
            16 * GIB
        )),
        "{metrics}"
    );
    // Every worker of the node has its grant series; the deleted pod has none left.
    for worker in allocation["workers"].as_array().into_iter().flatten() {
        let line = format!(
            "tensor_fusion_agent_worker_vram_granted_bytes{{namespace=\"{ns}\",pod=\"{}\",container=\"python\"}} {}\n",
            worker["spec"]["name"].as_str().unwrap_or_default(),
            10 * GIB
        );
        assert!(metrics.contains(&line), "{line} missing in {metrics}");
    }
    assert!(!metrics.contains(&format!("pod=\"{victim}\"")), "{metrics}");

    deployments.delete("big", &DeleteParams::default()).await?;
    drop(agents);
    restore.restore().await;
    Ok(())
}

#[tokio::test]
async fn agent_killed_mid_burst_restarts_without_over_commit_or_leaks() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cluster) = Cluster::from_env().await? else {
        return Ok(());
    };
    let restore = RestoreNodes {
        client: cluster.client.clone(),
    };
    let dir = tempfile::tempdir()?;
    // 4 GPUs of 16 GiB per node, 4 GiB workers: 16 per node, 32 in all, for 30 pods.
    let gpus = MockGpus {
        count: 4,
        vram_bytes: 16 * GIB,
    };
    // The first agent SIGKILLs itself right after recording its 4th assignment on the pod and
    // before writing that pod's limits files: mid-burst, mid-operation.
    let mut agents = vec![
        AgentProcess::start_with_env(
            &cluster,
            dir.path(),
            NODES[0],
            gpus,
            &[("TF_AGENT_CRASH_AFTER_ASSIGNMENTS", "4")],
        )
        .await?,
        AgentProcess::start(&cluster, dir.path(), NODES[1], gpus).await?,
    ];
    wait_advertised_vram(&cluster, gpus).await?;
    let namespace = cluster.namespace("tf-agent-crash").await?;
    let ns = namespace.name.as_str();
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    deployments
        .create(&PostParams::default(), &deployment("burst", 30, 4 * GIB))
        .await?;

    let status = agents[0].wait_exit(Duration::from_secs(60)).await?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the agent died by SIGKILL (9): {status:?}"
    );
    let on_first: Vec<Pod> = scheduled_pods(&cluster, ns, "burst")
        .await?
        .into_iter()
        .filter(|pod| node_of(pod) == Some(NODES[0]))
        .collect();
    let recorded: Vec<&Pod> = on_first
        .iter()
        .filter(|pod| assignment(pod).is_some())
        .collect();
    // Assignments are recorded concurrently: patches in flight when it died may have landed.
    assert!(recorded.len() >= 4, "the agent died after its 4th record");
    let with_files = recorded
        .iter()
        .filter(|pod| {
            let uid = pod.metadata.uid.as_deref().unwrap_or_default();
            let dir = agents[0].host_root.join("pods").join(uid);
            dir.join("python.limits").exists()
        })
        .count();
    assert_eq!(
        with_files, 3,
        "only the 3 assignments finished before the crash have files"
    );
    agents[0].restart().await?;

    wait_for("30 assigned pods", Duration::from_secs(90), || async {
        let pods = scheduled_pods(&cluster, ns, "burst").await?;
        Ok(pods.len() == 30 && pods.iter().all(|pod| assignment(pod).is_some()))
    })
    .await?;
    let pods = scheduled_pods(&cluster, ns, "burst").await?;
    let first_node_pods = pods
        .iter()
        .filter(|pod| node_of(pod) == Some(NODES[0]))
        .count();
    assert!(
        first_node_pods > 4,
        "the burst went on past the crash: {first_node_pods} pods on {}",
        NODES[0]
    );
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let hosts_shared = |node: Node| {
        node.metadata
            .labels
            .unwrap_or_default()
            .get("tensor-fusion.ai/hosts-shared-workers")
            .cloned()
    };
    for node in NODES {
        assert_eq!(
            hosts_shared(nodes.get(node).await?).as_deref(),
            Some("true"),
            "{node} hosts shared workers"
        );
    }

    // No GPU over-committed: at most 16 GiB of requests on each.
    let sums = vram_by_gpu(&pods);
    for ((node, gpu), vram) in &sums {
        assert!(
            *vram <= 16 * GIB,
            "{node} {gpu} has {vram} bytes of requests"
        );
    }
    assert_eq!(sums.values().sum::<u64>(), 30 * 4 * GIB);
    // Each pod once, on its own node, in the agent's state exactly as annotated.
    for agent in &agents {
        let allocation = agent.allocation().await?;
        let workers = allocation["workers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let on_node: Vec<&Pod> = pods
            .iter()
            .filter(|pod| node_of(pod) == Some(&agent.node))
            .collect();
        assert_eq!(workers.len(), on_node.len(), "{} workers", agent.node);
        let uids: BTreeSet<&str> = workers
            .iter()
            .filter_map(|worker| worker["spec"]["uid"].as_str())
            .collect();
        assert_eq!(uids.len(), workers.len(), "no pod twice");
        for pod in on_node {
            let (node, gpus, _) = assignment(pod).unwrap_or_default();
            assert_eq!(node, agent.node);
            let uid = pod.metadata.uid.as_deref().unwrap_or_default();
            let worker = workers
                .iter()
                .find(|worker| worker["spec"]["uid"] == uid)
                .expect("the pod is a worker");
            assert_eq!(worker["assignment"]["gpuUuids"], json!(gpus));
            assert!(
                agent
                    .host_root
                    .join("pods")
                    .join(uid)
                    .join("python.limits")
                    .exists()
            );
        }
        let allocated: u64 = allocation["gpus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|gpu| gpu["requested"]["vramBytes"].as_u64())
            .sum();
        let annotated: u64 = sums
            .iter()
            .filter(|((node, _), _)| node == &agent.node)
            .map(|(_, vram)| vram)
            .sum();
        assert_eq!(
            allocated, annotated,
            "{}: the agent holds exactly what the pods record",
            agent.node
        );
    }

    // Everything goes back when the pods go: no leaked share, no leftover directory.
    deployments
        .delete("burst", &DeleteParams::default())
        .await?;
    let pod_api: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let _ = pod_api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app=burst"),
        )
        .await;
    for agent in &agents {
        wait_for(
            "the agent to free every share",
            Duration::from_secs(60),
            || async {
                let allocation = agent.allocation().await?;
                let requested: u64 = allocation["gpus"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|gpu| gpu["requested"]["vramBytes"].as_u64())
                    .sum();
                Ok(requested == 0 && allocation["workers"].as_array().is_some_and(Vec::is_empty))
            },
        )
        .await?;
        assert_eq!(std::fs::read_dir(agent.host_root.join("pods"))?.count(), 0);
        // The last worker left: native GPU pods may use the node again.
        wait_for(
            "the hosts-shared-workers label to go",
            Duration::from_secs(30),
            || async { Ok(hosts_shared(nodes.get(&agent.node).await?).is_none()) },
        )
        .await?;
    }
    drop(agents);
    restore.restore().await;
    Ok(())
}

#[tokio::test]
async fn native_gpus_in_the_checkpoint_are_avoided_while_the_agent_runs() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cluster) = Cluster::from_env().await? else {
        return Ok(());
    };
    let restore = RestoreNodes {
        client: cluster.client.clone(),
    };
    let dir = tempfile::tempdir()?;
    let gpus = MockGpus {
        count: 2,
        vram_bytes: 16 * GIB,
    };
    let agents = start_agents(&cluster, dir.path(), gpus).await?;
    let agent = &agents[0];
    let first_gpu = agent.allocation().await?["gpus"][0]["uuid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // The device plugin hands the first GPU to a native pod after the agent started.
    let checkpoint = json!({
        "Data": {
            "PodDeviceEntries": [{
                "PodUID": "3f0c9a8e-native", "ContainerName": "cuda", "ResourceName": "nvidia.com/gpu",
                "DeviceIDs": { "0": [first_gpu] }, "AllocResp": "CgQKAA=="
            }],
            "RegisteredDevices": { "nvidia.com/gpu": [first_gpu] }
        },
        "Checksum": 2845392012u64
    });
    std::fs::write(&agent.checkpoint, serde_json::to_vec(&checkpoint)?)?;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    wait_for(
        "the node to advertise one GPU less",
        Duration::from_secs(30),
        || async {
            let node = nodes.get(&agent.node).await?;
            let vram = node
                .status
                .and_then(|status| status.allocatable)
                .and_then(|resources| {
                    resources
                        .get("tensor-fusion.ai/vram")
                        .map(|quantity| quantity.0.clone())
                });
            Ok(vram == Some((16 * GIB).to_string()))
        },
    )
    .await?;
    let allocation = agent.allocation().await?;
    assert_eq!(allocation["nativeGpus"], json!([first_gpu]));
    assert_eq!(allocation["nativeSource"], "checkpoint");

    // A shared pod on that node gets the other GPU.
    let namespace = cluster.namespace("tf-agent-native").await?;
    let ns = namespace.name.as_str();
    let mut template = shared_template("coexist", 4 * GIB);
    template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] = json!([agent.node]);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "coexist", "labels": template["metadata"]["labels"], "annotations": template["metadata"]["annotations"] },
        "spec": template["spec"]
    }))?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    pods.create(&PostParams::default(), &pod).await?;
    wait_for(
        "the shared pod's assignment",
        Duration::from_secs(60),
        || async {
            Ok(pods
                .get("coexist")
                .await
                .ok()
                .as_ref()
                .and_then(assignment)
                .is_some())
        },
    )
    .await?;
    let (_, assigned, _) = assignment(&pods.get("coexist").await?).unwrap_or_default();
    assert_eq!(assigned.len(), 1);
    assert_ne!(
        assigned[0], first_gpu,
        "the native pod's GPU is never shared"
    );

    drop(agents);
    restore.restore().await;
    Ok(())
}

/// What a node advertises: allocatable TFLOPS and VRAM, and the GPU model and count labels.
#[derive(Debug, Clone, PartialEq)]
struct Advertised {
    tflops: Option<String>,
    vram: Option<String>,
    model: Option<String>,
    count: Option<String>,
}

impl Advertised {
    /// What an agent on `count` mock H100s of `vram_bytes` each advertises.
    fn h100s(count: u64, vram_bytes: u64) -> Self {
        Self {
            tflops: Some((989 * count).to_string()),
            vram: Some((count * vram_bytes).to_string()),
            model: Some("NVIDIA-H100-80GB-HBM3".to_owned()),
            count: Some(count.to_string()),
        }
    }
}

async fn advertised(nodes: &Api<Node>, node: &str) -> anyhow::Result<Advertised> {
    let node = nodes.get(node).await?;
    let allocatable = node
        .status
        .and_then(|status| status.allocatable)
        .unwrap_or_default();
    let labels = node.metadata.labels.unwrap_or_default();
    Ok(Advertised {
        tflops: allocatable
            .get("tensor-fusion.ai/tflops")
            .map(|quantity| quantity.0.clone()),
        vram: allocatable
            .get("tensor-fusion.ai/vram")
            .map(|quantity| quantity.0.clone()),
        model: labels.get("tensor-fusion.ai/gpu-model").cloned(),
        count: labels.get("tensor-fusion.ai/gpu-count").cloned(),
    })
}

/// Waits, at most a few resync periods, until `node` advertises `expected`.
async fn wait_advertised(
    nodes: &Api<Node>,
    node: &str,
    expected: &Advertised,
    what: &str,
) -> anyhow::Result<()> {
    let result = wait_for(
        what,
        Duration::from_secs(5 * RESYNC_SECONDS + 5),
        || async { Ok(&advertised(nodes, node).await? == expected) },
    )
    .await;
    if result.is_err() {
        eprintln!("{node} advertises {:?}", advertised(nodes, node).await?);
    }
    result
}

/// A shared pod (as in [`shared_template`]) pinned to `node`.
fn shared_pod(name: &str, node: &str, vram: u64) -> anyhow::Result<Pod> {
    let mut template = shared_template(name, vram);
    template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] = json!([node]);
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"]
        },
        "spec": template["spec"]
    }))?)
}

async fn wait_assigned(pods: &Api<Pod>, name: &str) -> anyhow::Result<Vec<String>> {
    wait_for(
        &format!("the assignment of {name}"),
        Duration::from_secs(60),
        || async {
            Ok(pods
                .get(name)
                .await
                .ok()
                .as_ref()
                .and_then(assignment)
                .is_some())
        },
    )
    .await?;
    let (_, gpus, _) = assignment(&pods.get(name).await?).unwrap_or_default();
    Ok(gpus)
}

#[tokio::test]
async fn node_resources_changed_by_hand_are_restored_by_the_resync() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cluster) = Cluster::from_env().await? else {
        return Ok(());
    };
    let restore = RestoreNodes {
        client: cluster.client.clone(),
    };
    let dir = tempfile::tempdir()?;
    let gpus = MockGpus {
        count: 2,
        vram_bytes: 16 * GIB,
    };
    let agents = start_agents(&cluster, dir.path(), gpus).await?;
    let agent = &agents[0];
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let expected = Advertised::h100s(2, 16 * GIB);
    wait_advertised(&nodes, &agent.node, &expected, "the agent's resources").await?;

    // Someone drops the VRAM resource, overwrites the TFLOPS and the labels.
    let tampered = json!({ "tensor-fusion.ai/tflops": "1", "tensor-fusion.ai/vram": null });
    let status = json!({ "status": { "capacity": tampered, "allocatable": tampered } });
    let labels = json!({ "metadata": { "labels": {
        "tensor-fusion.ai/gpu-model": null,
        "tensor-fusion.ai/gpu-count": "7",
    }}});
    let tamper = || async {
        nodes
            .patch_status(&agent.node, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        nodes
            .patch(&agent.node, &PatchParams::default(), &Patch::Merge(&labels))
            .await?;
        anyhow::Ok(advertised(&nodes, &agent.node).await?)
    };
    let seen = tamper().await?;
    assert_eq!(seen.vram, None, "{seen:?}");
    wait_advertised(
        &nodes,
        &agent.node,
        &expected,
        "the resync to restore the node's resources and labels",
    )
    .await?;

    // NVML starts failing: the resync still repairs the node, with the last known GPUs.
    agent.fail_nvml()?;
    // Past a resync that may have read the list before the change.
    tokio::time::sleep(Duration::from_secs(RESYNC_SECONDS + 1)).await;
    tamper().await?;
    wait_advertised(
        &nodes,
        &agent.node,
        &expected,
        "the resync to restore the node while NVML fails",
    )
    .await?;
    let allocation = agent.allocation().await?;
    assert_eq!(allocation["gpus"].as_array().map(Vec::len), Some(2));

    drop(agents);
    restore.restore().await;
    Ok(())
}

#[tokio::test]
async fn gpus_added_or_removed_while_the_agent_runs_change_the_advertised_capacity()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cluster) = Cluster::from_env().await? else {
        return Ok(());
    };
    let restore = RestoreNodes {
        client: cluster.client.clone(),
    };
    let dir = tempfile::tempdir()?;
    let one_gpu = MockGpus {
        count: 1,
        vram_bytes: 16 * GIB,
    };
    let agent = AgentProcess::start(&cluster, dir.path(), NODES[0], one_gpu).await?;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    wait_advertised(
        &nodes,
        &agent.node,
        &Advertised::h100s(1, 16 * GIB),
        "one GPU advertised",
    )
    .await?;
    let namespace = cluster.namespace("tf-agent-resync").await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace.name.as_str());
    pods.create(
        &PostParams::default(),
        &shared_pod("first", &agent.node, 10 * GIB)?,
    )
    .await?;
    let first_gpus = wait_assigned(&pods, "first").await?;

    // A second GPU appears: the node advertises it, and the next 10 GiB worker gets it.
    agent.set_gpus(MockGpus {
        count: 2,
        vram_bytes: 16 * GIB,
    })?;
    wait_advertised(
        &nodes,
        &agent.node,
        &Advertised::h100s(2, 16 * GIB),
        "the added GPU advertised",
    )
    .await?;
    assert_eq!(
        agent.allocation().await?["gpus"].as_array().map(Vec::len),
        Some(2)
    );
    pods.create(
        &PostParams::default(),
        &shared_pod("second", &agent.node, 10 * GIB)?,
    )
    .await?;
    let second_gpus = wait_assigned(&pods, "second").await?;
    assert_ne!(second_gpus, first_gpus, "6 GiB left on the first GPU");

    // The second GPU vanishes: capacity shrinks, its worker keeps its assignment and gets a
    // Warning Event.
    agent.set_gpus(one_gpu)?;
    wait_advertised(
        &nodes,
        &agent.node,
        &Advertised::h100s(1, 16 * GIB),
        "the vanished GPU no longer advertised",
    )
    .await?;
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), namespace.name.as_str());
    wait_for(
        "the AssignedGPUGone event on the second pod",
        Duration::from_secs(30),
        || async {
            let list = events
                .list(&ListParams::default().fields("involvedObject.name=second"))
                .await?;
            Ok(list.items.iter().any(|event| {
                event.type_.as_deref() == Some("Warning")
                    && event.reason.as_deref() == Some("AssignedGPUGone")
                    && event.message.as_deref().is_some_and(|message| {
                        message.starts_with(&format!(
                            "GPU {} assigned to this pod is no longer reported by NVML on node {}",
                            second_gpus.join(","),
                            agent.node
                        ))
                    })
            }))
        },
    )
    .await?;
    assert_eq!(
        assignment(&pods.get("second").await?).map(|(_, gpus, _)| gpus),
        Some(second_gpus.clone())
    );
    let allocation = agent.allocation().await?;
    assert_eq!(allocation["gpus"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        allocation["gpus"][0]["requested"]["vramBytes"].as_u64(),
        Some(10 * GIB)
    );
    let workers = allocation["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let second = workers
        .iter()
        .find(|worker| worker["spec"]["name"] == "second")
        .expect("the stranded worker keeps its record");
    assert_eq!(second["assignment"]["gpuUuids"], json!(second_gpus));

    for name in ["first", "second"] {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    drop(agent);
    restore.restore().await;
    Ok(())
}
