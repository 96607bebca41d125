//! The webhook against the real local control plane: canary counting through scale, deletion,
//! bursts with two webhook processes, rollback, bad input and certificate rotation.
//!
//! Run by `make test` (which starts the cluster); skipped without `TF_E2E_KUBECONFIG`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use tensor_fusion_e2e::{
    Cluster, TestCerts, WebhookProcess, annotation, balancer, free_port, is_shared,
    native_gpu_limit, wait_for,
};

/// Tests share one webhook registration, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const GUIDE_ANNOTATIONS: [(&str, &str); 4] = [
    ("tensor-fusion.ai/tflops-request", "100"),
    ("tensor-fusion.ai/tflops-limit", "200"),
    ("tensor-fusion.ai/vram-request", "3Gi"),
    ("tensor-fusion.ai/vram-limit", "3Gi"),
];

fn pod_template(app: &str, enabled: &str, extra: &[(&str, &str)]) -> Value {
    let mut annotations: serde_json::Map<String, Value> = GUIDE_ANNOTATIONS
        .iter()
        .chain(extra)
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    annotations.retain(|_, v| v != "");
    json!({
        "metadata": {
            "labels": { "app": app, "tensor-fusion.ai/enabled": enabled },
            "annotations": annotations
        },
        "spec": {
            "containers": [{
                "name": "python",
                "image": "registry.local/inference:1.4",
                "resources": { "limits": { "nvidia.com/gpu": 1 } }
            }]
        }
    })
}

fn deployment(app: &str, replicas: i32, template: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": { "name": app },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": app } },
            "template": template
        }
    }))
    .expect("a valid Deployment")
}

/// One test's world: the cluster, a registered webhook process and its certificates, and the
/// lock that keeps the other tests out until this one is done.
struct Setup {
    cluster: Cluster,
    certs: TestCerts,
    webhook: WebhookProcess,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

async fn setup() -> anyhow::Result<Option<Setup>> {
    let serial = SERIAL.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cluster) = Cluster::from_env().await? else {
        return Ok(None);
    };
    let certs = TestCerts::generate()?;
    // As the chart runs it with nvidiaOperatorProgressiveMigration (the production values).
    let webhook = WebhookProcess::start_with(
        &cluster,
        certs.dir.path(),
        free_port(),
        &["--progressive-migration"],
    )
    .await?;
    cluster
        .register_webhook(webhook.port, certs.ca_pem())
        .await?;
    Ok(Some(Setup {
        cluster,
        certs,
        webhook,
        _serial: serial,
    }))
}

async fn wait_for_pods(
    cluster: &Cluster,
    namespace: &str,
    selector: &str,
    count: usize,
) -> anyhow::Result<Vec<Pod>> {
    wait_for(
        &format!("{count} pods {selector}"),
        Duration::from_secs(90),
        || async { Ok(cluster.live_pods(namespace, selector).await?.len() == count) },
    )
    .await?;
    // A moment more: a surplus pod would show up now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pods = cluster.live_pods(namespace, selector).await?;
    anyhow::ensure!(pods.len() == count, "{} pods, expected {count}", pods.len());
    Ok(pods)
}

fn shared_names(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter()
        .filter(|pod| is_shared(pod))
        .filter_map(|pod| pod.metadata.name.clone())
        .collect()
}

#[tokio::test]
async fn canary_holds_exactly_n_through_scale_and_replacement() -> anyhow::Result<()> {
    let Some(setup) = setup().await? else {
        return Ok(());
    };
    let cluster = &setup.cluster;
    let namespace = cluster.namespace("tf-canary").await?;
    let ns = namespace.name.as_str();
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let template = pod_template(
        "inference",
        "true",
        &[("tensor-fusion.ai/enabled-replicas", "3")],
    );
    deployments
        .create(
            &PostParams::default(),
            &deployment("inference", 10, template),
        )
        .await?;

    let pods = wait_for_pods(cluster, ns, "app=inference", 10).await?;
    assert_eq!(shared_names(&pods).len(), 3, "exactly 3 of 10 shared");
    for pod in pods.iter().filter(|pod| !is_shared(pod)) {
        assert_eq!(
            native_gpu_limit(pod, 0).as_deref(),
            Some("1"),
            "native keeps nvidia.com/gpu"
        );
        assert_eq!(
            annotation(pod, "tensor-fusion.ai/native"),
            Some("canary quota 3/3 in use")
        );
    }
    let shared: Vec<&Pod> = pods.iter().filter(|pod| is_shared(pod)).collect();
    let mut positions: Vec<&str> = shared
        .iter()
        .filter_map(|pod| annotation(pod, "tensor-fusion.ai/canary"))
        .collect();
    positions.sort_unstable();
    assert_eq!(positions, ["1/3", "2/3", "3/3"]);
    for pod in &shared {
        assert_eq!(
            native_gpu_limit(pod, 0),
            None,
            "shared pods lose nvidia.com/gpu"
        );
    }

    // `kubectl describe pod` explains a shared pod.
    let name = shared[0].metadata.name.as_deref().unwrap_or_default();
    let described = cluster.kubectl(&["describe", "pod", "-n", ns, name])?;
    // kubectl prints a long annotation value on the line after its key.
    assert!(
        described.contains("tensor-fusion.ai/injection:"),
        "{described}"
    );
    assert!(
        described.contains(
            "containers python; tflops request 100 limit 200; vram request 3Gi limit 3Gi; \
             1 GPU per container; nvidia.com/gpu removed"
        ),
        "{described}"
    );
    assert!(
        described.contains("tensor-fusion.ai/injected: true"),
        "{described}"
    );

    // Scale to 20: still 3.
    cluster
        .patch_deployment(ns, "inference", json!({ "spec": { "replicas": 20 } }))
        .await?;
    let pods = wait_for_pods(cluster, ns, "app=inference", 20).await?;
    let before = shared_names(&pods);
    assert_eq!(before.len(), 3, "scaling to 20 keeps 3 shared");

    // Delete a shared pod: its replacement is shared.
    let victim = before.iter().next().cloned().unwrap_or_default();
    let pod_api: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    pod_api.delete(&victim, &DeleteParams::default()).await?;
    wait_for(
        "the replacement to be shared",
        Duration::from_secs(60),
        || async {
            let pods = cluster.live_pods(ns, "app=inference").await?;
            let shared = shared_names(&pods);
            Ok(pods.len() == 20 && shared.len() == 3 && !shared.contains(&victim))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pods = cluster.live_pods(ns, "app=inference").await?;
    assert_eq!(pods.len(), 20);
    assert_eq!(shared_names(&pods).len(), 3);
    Ok(())
}

#[tokio::test]
async fn rollback_by_label_false_and_by_zero_replicas() -> anyhow::Result<()> {
    let Some(setup) = setup().await? else {
        return Ok(());
    };
    let cluster = &setup.cluster;
    let namespace = cluster.namespace("tf-rollback").await?;
    let ns = namespace.name.as_str();
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let canary = pod_template("web", "true", &[("tensor-fusion.ai/enabled-replicas", "2")]);
    deployments
        .create(&PostParams::default(), &deployment("web", 4, canary))
        .await?;
    let pods = wait_for_pods(cluster, ns, "app=web", 4).await?;
    assert_eq!(shared_names(&pods).len(), 2);

    // Label "false": the webhook never sees the pods; they are untouched.
    cluster
        .patch_deployment(
            ns,
            "web",
            json!({ "spec": { "template": { "metadata": { "labels": { "tensor-fusion.ai/enabled": "false" } } } } }),
        )
        .await?;
    all_native_from_new_revision(cluster, &deployments, ns, None).await?;

    // Back to canary, then enabled-replicas "0": native, and the pod says why.
    cluster
        .patch_deployment(
            ns,
            "web",
            json!({ "spec": { "template": { "metadata": {
                "labels": { "tensor-fusion.ai/enabled": "true" },
                "annotations": { "tensor-fusion.ai/enabled-replicas": "0" }
            } } } }),
        )
        .await?;
    let note = "tensor-fusion.ai/enabled-replicas is 0 (rolled back to native GPUs)";
    all_native_from_new_revision(cluster, &deployments, ns, Some(note)).await?;
    Ok(())
}

/// Waits until the Deployment "web" has rolled out a new revision of 4 pods, then checks that
/// all are native, keep `nvidia.com/gpu`, and carry `note` (or no note at all).
async fn all_native_from_new_revision(
    cluster: &Cluster,
    deployments: &Api<Deployment>,
    ns: &str,
    note: Option<&str>,
) -> anyhow::Result<()> {
    wait_for(
        "the new revision to roll out",
        Duration::from_secs(120),
        || async {
            let deployment = deployments.get("web").await?;
            let status = deployment.status.unwrap_or_default();
            let generation = deployment.metadata.generation.unwrap_or_default();
            Ok(status.observed_generation == Some(generation)
                && status.updated_replicas == Some(4)
                && status.replicas == Some(4)
                && cluster.live_pods(ns, "app=web").await?.len() == 4)
        },
    )
    .await?;
    for pod in cluster.live_pods(ns, "app=web").await? {
        assert!(!is_shared(&pod), "rolled back pods are native");
        assert_eq!(native_gpu_limit(&pod, 0).as_deref(), Some("1"));
        assert_eq!(annotation(&pod, "tensor-fusion.ai/native"), note);
    }
    Ok(())
}

#[tokio::test]
async fn burst_of_fifty_with_two_webhooks_shares_exactly_seven() -> anyhow::Result<()> {
    let Some(setup) = setup().await? else {
        return Ok(());
    };
    let cluster = &setup.cluster;
    let certs = &setup.certs;
    let first = &setup.webhook;
    // A second process and a balancer that alternates requests between the two.
    let second = WebhookProcess::start(cluster, certs.dir.path(), free_port()).await?;
    let port = free_port();
    let _balancer = balancer::run(
        port,
        certs.dir.path(),
        certs.ca_pem(),
        vec![first.port, second.port],
    )
    .await?;
    cluster.register_webhook(port, certs.ca_pem()).await?;
    let shared_before = first.admissions("shared").await? + second.admissions("shared").await?;
    let native_before = (
        first.admissions("native").await?,
        second.admissions("native").await?,
    );

    let namespace = cluster.namespace("tf-burst").await?;
    let ns = namespace.name.as_str();
    let replica_sets: Api<ReplicaSet> = Api::namespaced(cluster.client.clone(), ns);
    let replica_set: ReplicaSet = serde_json::from_value(json!({
        "metadata": { "name": "burst" },
        "spec": {
            "replicas": 50,
            "selector": { "matchLabels": { "app": "burst" } },
            "template": pod_template("burst", "true", &[("tensor-fusion.ai/enabled-replicas", "7")])
        }
    }))?;
    replica_sets
        .create(&PostParams::default(), &replica_set)
        .await?;
    let pods = wait_for_pods(cluster, ns, "app=burst", 50).await?;
    assert_eq!(shared_names(&pods).len(), 7, "exactly 7 of 50 shared");

    let shared_after = first.admissions("shared").await? + second.admissions("shared").await?;
    assert_eq!(shared_after - shared_before, 7);
    let native_after = (
        first.admissions("native").await?,
        second.admissions("native").await?,
    );
    assert!(
        native_after.0 > native_before.0 && native_after.1 > native_before.1,
        "both webhook processes served the burst: {native_before:?} -> {native_after:?}"
    );

    // A bigger burst while every shared pod is deleted at once: the replacements and the new
    // pods race for the 7 freed slots through both processes (a fresh LIST can then be older
    // than what the watch has seen); still exactly 7.
    let pod_api: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let scale = cluster.kubectl(&["scale", "replicaset", "-n", ns, "burst", "--replicas=200"]);
    for name in shared_names(&pods) {
        pod_api.delete(&name, &DeleteParams::default()).await?;
    }
    scale?;
    let pods = wait_for_pods(cluster, ns, "app=burst", 200).await?;
    let shared = shared_names(&pods);
    assert_eq!(shared.len(), 7, "exactly 7 of 200 shared: {shared:?}");
    let mut positions: Vec<&str> = pods
        .iter()
        .filter(|pod| is_shared(pod))
        .filter_map(|pod| annotation(pod, "tensor-fusion.ai/canary"))
        .collect();
    positions.sort_unstable();
    positions.dedup();
    assert_eq!(positions.len(), 7, "no slot held twice: {positions:?}");
    Ok(())
}

#[tokio::test]
async fn a_bad_annotation_is_a_failed_create_event_with_the_exact_message() -> anyhow::Result<()> {
    let Some(setup) = setup().await? else {
        return Ok(());
    };
    let cluster = &setup.cluster;
    let namespace = cluster.namespace("tf-bad").await?;
    let ns = namespace.name.as_str();
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let template = pod_template("bad", "true", &[("tensor-fusion.ai/vram-limit", "3Gx")]);
    deployments
        .create(&PostParams::default(), &deployment("bad", 1, template))
        .await?;
    let expected = "admission webhook \"pods.webhook.tensor-fusion.ai\" denied the request: \
                    invalid annotation tensor-fusion.ai/vram-limit: \"3Gx\" is not a Kubernetes quantity";
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), ns);
    wait_for(
        "the FailedCreate event",
        Duration::from_secs(60),
        || async {
            let list = events
                .list(&ListParams::default().fields("reason=FailedCreate"))
                .await?;
            Ok(list.items.iter().any(|event| {
                event.involved_object.kind.as_deref() == Some("ReplicaSet")
                    && event.message.as_deref() == Some(&format!("Error creating: {expected}"))
            }))
        },
    )
    .await?;
    assert!(cluster.live_pods(ns, "app=bad").await?.is_empty());
    let described = cluster.kubectl(&["describe", "replicaset", "-n", ns])?;
    assert!(described.contains("FailedCreate"), "{described}");
    assert!(described.contains(expected), "{described}");
    Ok(())
}

#[tokio::test]
async fn certificate_rotation_while_admissions_flow_fails_nothing() -> anyhow::Result<()> {
    let Some(setup) = setup().await? else {
        return Ok(());
    };
    let cluster = &setup.cluster;
    let certs = &setup.certs;
    let namespace = cluster.namespace("tf-rotate").await?;
    let ns = namespace.name.clone();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let running = Arc::new(AtomicBool::new(true));
    let (created, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut writers = Vec::new();
    for writer in 0..2 {
        let (pods, running, created, failed) = (
            pods.clone(),
            running.clone(),
            created.clone(),
            failed.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut index = 0;
            while running.load(Ordering::Relaxed) {
                index += 1;
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {
                        "name": format!("rotate-{writer}-{index}"),
                        "labels": { "app": "rotate", "tensor-fusion.ai/enabled": "true" },
                        "annotations": { "tensor-fusion.ai/vram-limit": "1Gi" }
                    },
                    "spec": { "containers": [{ "name": "main", "image": "app" }] }
                }))
                .expect("a valid Pod");
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(pod) if is_shared(&pod) => created.fetch_add(1, Ordering::Relaxed),
                    Ok(_) | Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        certs.rotate()?;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.store(false, Ordering::Relaxed);
    for writer in writers {
        writer.await?;
    }
    let (created, failed) = (
        created.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert_eq!(
        failed, 0,
        "no admission failed across 3 rotations ({created} succeeded)"
    );
    assert!(created > 10, "admissions kept flowing: {created}");
    Ok(())
}

#[tokio::test]
async fn a_pod_rejected_after_admission_or_a_dry_run_holds_its_slot_only_briefly()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cluster) = Cluster::from_env().await? else {
        return Ok(());
    };
    let certs = TestCerts::generate()?;
    let grace = Duration::from_secs(3);
    let _webhook = WebhookProcess::start_with(
        &cluster,
        certs.dir.path(),
        free_port(),
        &["--claim-grace-seconds", "3"],
    )
    .await?;
    cluster
        .register_webhook(_webhook.port, certs.ca_pem())
        .await?;
    let namespace = cluster.namespace("tf-leak").await?;
    let ns = namespace.name.as_str();

    // An owner with no replicas of its own: the test creates its pods by hand.
    let replica_sets: Api<ReplicaSet> = Api::namespaced(cluster.client.clone(), ns);
    let owner = replica_sets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "owner" },
                "spec": {
                    "replicas": 0,
                    "selector": { "matchLabels": { "app": "owner" } },
                    "template": pod_template("owner", "true", &[])
                }
            }))?,
        )
        .await?;
    let pod = |name: &str| -> Pod {
        let mut pod = pod_template(
            "manual",
            "true",
            &[("tensor-fusion.ai/enabled-replicas", "2")],
        );
        pod["metadata"]["name"] = json!(name);
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "owner",
            "uid": owner.metadata.uid.clone().unwrap_or_default(), "controller": true
        }]);
        serde_json::from_value(pod).expect("a valid Pod")
    };
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);

    // Dry runs never take a slot.
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    for _ in 0..3 {
        assert!(is_shared(&pods.create(&dry_run, &pod("dry")).await?));
    }
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(cluster.client.clone(), ns);
    assert!(leases.list(&ListParams::default()).await?.items.is_empty());

    // A create that the webhook admits and the API server then rejects (the name is taken):
    // its claim holds the second slot until the grace period ends, then the slot is free.
    let blocker = pods.create(&PostParams::default(), &pod("blocker")).await?;
    assert!(is_shared(&blocker));
    let started = std::time::Instant::now();
    let duplicate = pods.create(&PostParams::default(), &pod("blocker")).await;
    assert!(
        duplicate.is_err(),
        "the second create with the same name is rejected"
    );
    let during = pods
        .create(&PostParams::default(), &pod("during-grace"))
        .await?;
    if started.elapsed() < grace - Duration::from_millis(500) {
        assert!(
            !is_shared(&during),
            "the rejected pod's claim still holds its slot"
        );
        assert_eq!(
            annotation(&during, "tensor-fusion.ai/native"),
            Some("canary quota 2/2 in use")
        );
    }
    tokio::time::sleep(grace).await;
    let after = pods
        .create(&PostParams::default(), &pod("after-grace"))
        .await?;
    assert!(
        is_shared(&after),
        "after the grace period the slot is free again"
    );
    Ok(())
}

#[tokio::test]
async fn progressive_migration_keeps_native_gpu_pods_off_shared_nodes() -> anyhow::Result<()> {
    let Some(setup) = setup().await? else {
        return Ok(());
    };
    let cluster = &setup.cluster;
    let certs = &setup.certs;
    let webhook = &setup.webhook;
    // The fail-open second entry that `nvidiaOperatorProgressiveMigration` adds.
    let native_entry = format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: tensor-fusion-native-webhook
webhooks:
  - name: native-pods.webhook.tensor-fusion.ai
    admissionReviewVersions: ["v1"]
    clientConfig:
      url: https://127.0.0.1:{port}/mutate-v1-pod
      caBundle: {ca}
    rules:
      - {{ apiGroups: [""], apiVersions: ["v1"], operations: ["CREATE"], resources: ["pods"] }}
    objectSelector:
      matchExpressions:
        - {{ key: tensor-fusion.ai/enabled, operator: NotIn, values: ["true"] }}
    namespaceSelector:
      matchExpressions:
        - {{ key: kubernetes.io/metadata.name, operator: NotIn, values: ["kube-system"] }}
    matchConditions:
      - name: asks-for-nvidia-gpus
        expression: >-
          [object.spec.containers, has(object.spec.initContainers) ? object.spec.initContainers : []].exists(list,
          list.exists(c, has(c.resources) &&
          ((has(c.resources.limits) && 'nvidia.com/gpu' in c.resources.limits) ||
          (has(c.resources.requests) && 'nvidia.com/gpu' in c.resources.requests))))
    sideEffects: None
    failurePolicy: Ignore
    timeoutSeconds: 2
"#,
        port = webhook.port,
        ca = base64_encode(certs.ca_pem()),
    );
    cluster.apply(&native_entry)?;
    let shared_nodes = ["gpu-node-1", "gpu-node-2"];
    for node in shared_nodes {
        cluster.kubectl(&[
            "label",
            "node",
            node,
            "tensor-fusion.ai/hosts-shared-workers=true",
            "--overwrite",
        ])?;
    }
    let result = native_pods_land_elsewhere(cluster, webhook).await;
    for node in shared_nodes {
        let _ = cluster.kubectl(&[
            "label",
            "node",
            node,
            "tensor-fusion.ai/hosts-shared-workers-",
        ]);
    }
    let _ = cluster.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "tensor-fusion-native-webhook",
    ]);
    result
}

async fn native_pods_land_elsewhere(
    cluster: &Cluster,
    webhook: &WebhookProcess,
) -> anyhow::Result<()> {
    let namespace = cluster.namespace("tf-native").await?;
    let ns = namespace.name.as_str();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let gpu_pod: Pod = serde_json::from_value(json!({
        "metadata": { "generateName": "probe-" },
        "spec": { "containers": [{ "name": "main", "image": "app",
            "resources": { "limits": { "nvidia.com/gpu": 1 } } }] }
    }))?;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    wait_for(
        "the native entry to be called",
        Duration::from_secs(60),
        || async {
            let pod = pods.create(&dry_run, &gpu_pod).await?;
            Ok(pod.spec.and_then(|spec| spec.affinity).is_some())
        },
    )
    .await?;

    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let mut template = pod_template("native", "false", &[]);
    template["metadata"]["labels"]
        .as_object_mut()
        .map(|labels| labels.remove("tensor-fusion.ai/enabled"));
    deployments
        .create(&PostParams::default(), &deployment("native", 3, template))
        .await?;
    for pod in wait_scheduled(cluster, ns, "native", 3).await? {
        let spec = pod.spec.unwrap_or_default();
        assert_eq!(
            spec.node_name.as_deref(),
            Some("gpu-node-3"),
            "kept off shared nodes"
        );
        assert_eq!(
            spec.containers[0]
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("nvidia.com/gpu"))
                .map(|q| q.0.as_str()),
            Some("1")
        );
    }
    // A labelled Deployment rolled back with enabled-replicas "0" is native: kept off too.
    let rolled_back = pod_template(
        "rolled-back",
        "true",
        &[("tensor-fusion.ai/enabled-replicas", "0")],
    );
    deployments
        .create(
            &PostParams::default(),
            &deployment("rolled-back", 2, rolled_back),
        )
        .await?;
    for pod in wait_scheduled(cluster, ns, "rolled-back", 2).await? {
        assert!(annotation(&pod, "tensor-fusion.ai/native").is_some());
        assert_eq!(
            pod.spec.and_then(|spec| spec.node_name).as_deref(),
            Some("gpu-node-3"),
            "a rolled-back pod is kept off shared nodes"
        );
    }

    // A pod that asks for no GPU is not even sent to the native entry (its match condition).
    let skipped_before = skipped_reviews(webhook).await?;
    let cpu_pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "cpu-only" },
        "spec": { "containers": [{ "name": "main", "image": "app" }] }
    }))?;
    let created = pods.create(&PostParams::default(), &cpu_pod).await?;
    assert!(created.spec.and_then(|spec| spec.affinity).is_none());
    assert_eq!(skipped_reviews(webhook).await?, skipped_before);
    Ok(())
}

/// Waits until `count` live pods labelled `app=<app>` are bound to nodes, and returns them.
async fn wait_scheduled(
    cluster: &Cluster,
    namespace: &str,
    app: &str,
    count: usize,
) -> anyhow::Result<Vec<Pod>> {
    let selector = format!("app={app}");
    wait_for(
        &format!("{count} {app} pods to be scheduled"),
        Duration::from_secs(60),
        || async {
            let pods = cluster.live_pods(namespace, &selector).await?;
            Ok(pods.len() == count
                && pods.iter().all(|pod| {
                    pod.spec
                        .as_ref()
                        .and_then(|spec| spec.node_name.as_ref())
                        .is_some()
                }))
        },
    )
    .await?;
    cluster.live_pods(namespace, &selector).await
}

/// `tensor_fusion_webhook_admissions_total{decision="skipped"}` from the webhook's `/metrics`.
async fn skipped_reviews(webhook: &WebhookProcess) -> anyhow::Result<u64> {
    let (_, text) = webhook.ops_get("/metrics").await?;
    Ok(text
        .lines()
        .find(|line| {
            line.starts_with("tensor_fusion_webhook_admissions_total")
                && line.contains("decision=\"skipped\"")
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0))
}

fn base64_encode(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
