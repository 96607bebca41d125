//! How long a shared pod waits for its GPU: from the pod's create request to the moment a watch
//! sees the node agent's `tensor-fusion.ai/assignment` on it, against the real local control
//! plane with one release-built agent on the mock NVML (8 H100s of 80 GiB, TFLOPS oversold 3x).
//!
//! Three phases of 20 pods (60 in all: 9 fit each of the 8 GPUs by TFLOPS request): created already bound to the agent's node (`spec.nodeName`), one
//! every 100 ms (the agent's own path: watch event, decision, the annotation patch, the watch
//! event back); the same as a burst, all created at once; and a burst that kube-scheduler places
//! (the path a Deployment takes). `TF_E2E_AGENT_BINARY` runs another build of the agent, for
//! an A/B. Results in docs/benchmarks.md.
//!
//! Needs a cluster: run `e2e/scripts/bench-agent.sh` (it starts one, builds the agent and runs
//! this); without `TF_E2E_KUBECONFIG` it says so and exits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::watcher;
use tensor_fusion_e2e::agent::{AgentProcess, MockGpus, shared_template, wait_advertised_vram};
use tensor_fusion_e2e::{Cluster, wait_for};

const GIB: u64 = 1 << 30;
const NODE: &str = "gpu-node-1";
const PODS: usize = 20;

/// When each pod (by name) was first seen with an assignment.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

fn pod(name: &str, bound: bool) -> anyhow::Result<Pod> {
    let mut pod = shared_template(name, GIB, &[NODE]);
    pod["metadata"]["name"] = name.into();
    if bound {
        pod["spec"]["nodeName"] = NODE.into();
    }
    Ok(serde_json::from_value(pod)?)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn report(what: &str, created: &HashMap<String, Instant>, seen: &Seen) {
    let seen = seen.lock().expect("the watch task does not panic");
    let mut latencies: Vec<Duration> = created
        .iter()
        .filter_map(|(name, at)| Some(seen.get(name)?.duration_since(*at)))
        .collect();
    latencies.sort();
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    println!(
        "{what}: {} pods, create -> assignment seen: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(*latencies.last().expect("every pod was assigned")),
    );
}

async fn wait_assigned(seen: &Seen, names: &HashMap<String, Instant>) -> anyhow::Result<()> {
    wait_for(
        "every pod to be assigned",
        Duration::from_secs(60),
        || async {
            let seen = seen.lock().expect("the watch task does not panic");
            Ok(names.keys().all(|name| seen.contains_key(name)))
        },
    )
    .await
}

/// Creates `PODS` pods at once; their create times and when the first create was sent.
async fn create_burst(
    pods: &Api<Pod>,
    prefix: &str,
    bound: bool,
) -> anyhow::Result<(HashMap<String, Instant>, Instant)> {
    let mut created = HashMap::new();
    let mut creates = Vec::new();
    let started = Instant::now();
    for index in 0..PODS {
        let name = format!("{prefix}-{index:02}");
        let spec = pod(&name, bound)?;
        created.insert(name, Instant::now());
        let pods = pods.clone();
        creates.push(tokio::spawn(async move {
            pods.create(&PostParams::default(), &spec).await
        }));
    }
    for create in creates {
        create.await??;
    }
    Ok((created, started))
}

/// How long after the first create the last pod of a burst was seen assigned.
fn report_all((created, started): &(HashMap<String, Instant>, Instant), seen: &Seen) {
    let seen = seen.lock().expect("the watch task does not panic");
    let last = created
        .keys()
        .filter_map(|name| seen.get(name).copied())
        .max()
        .expect("every pod was assigned");
    println!(
        "  all {} assigned {:.1} ms after the first create",
        created.len(),
        last.duration_since(*started).as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cluster) = Cluster::from_env().await? else {
        eprintln!("the assignment benchmark needs a cluster: run e2e/scripts/bench-agent.sh");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let gpus = MockGpus {
        count: 8,
        vram_bytes: 80 * GIB,
    };
    // TFLOPS oversold 3x, as in the production values: 60 workers' limits (200 each) fit.
    let config = dir.path().join("agent.json");
    std::fs::write(&config, r#"{"tflopsOversellRatio": 300}"#)?;
    let config = config.display().to_string();
    let _agent = AgentProcess::start_with_env(
        &cluster,
        dir.path(),
        NODE,
        gpus,
        &[("TF_AGENT_CONFIG", config.as_str())],
    )
    .await?;
    let namespace = cluster.namespace("tf-bench-assign").await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &namespace.name);

    let seen: Seen = Arc::default();
    let watch = {
        let seen = seen.clone();
        let pods = pods.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(watcher::watcher(pods, watcher::Config::default()));
            while let Some(event) = stream.next().await {
                if let Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) = event {
                    let assigned = pod
                        .metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|notes| notes.contains_key("tensor-fusion.ai/assignment"));
                    if assigned {
                        let name = pod.metadata.name.unwrap_or_default();
                        seen.lock()
                            .expect("only this task writes")
                            .entry(name)
                            .or_insert_with(Instant::now);
                    }
                }
            }
        })
    };

    // Phase 1: bound at creation, one pod every 100 ms.
    let mut created = HashMap::new();
    for index in 0..PODS {
        let name = format!("bound-{index:02}");
        let spec = pod(&name, true)?;
        created.insert(name, Instant::now());
        pods.create(&PostParams::default(), &spec).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_assigned(&seen, &created).await?;
    report("bound at creation, one every 100 ms", &created, &seen);

    // Phase 2: a burst, bound at creation.
    let bound_burst = create_burst(&pods, "bound-burst", true).await?;
    wait_assigned(&seen, &bound_burst.0).await?;
    report("burst bound at creation", &bound_burst.0, &seen);
    report_all(&bound_burst, &seen);

    // Phase 3: a burst the scheduler places, once it sees the agent's capacity.
    wait_advertised_vram(&cluster, &[NODE], gpus).await?;
    let burst = create_burst(&pods, "burst", false).await?;
    wait_assigned(&seen, &burst.0).await?;
    report("burst through kube-scheduler", &burst.0, &seen);
    report_all(&burst, &seen);
    watch.abort();
    Ok(())
}
