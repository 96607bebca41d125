//! The running agent: the node's allocation state and the Kubernetes edges around it.
//!
//! One task consumes a watch of the pods bound to this node. At every (re)list it rebuilds the
//! allocator from the assignment annotations of the listed pods before it allocates anything, so
//! a restarted agent starts from exactly what the pods run with. A new shared pod is allocated in
//! memory, the grant is written on the pod with a merge patch that carries the pod's
//! `resourceVersion` (the commit point; a conflict re-reads the pod), then its limits files are
//! written. A pod that ends or goes away gives its grant back and its directory is removed; pods
//! that did not fit are retried whenever something is freed.
//!
//! Each pod's events are handled in a task of their own ([`Agent::dispatch`]), so the patches of
//! a burst are in flight together, while the events of one pod keep their order (a per-pod
//! turn, taken in watch order) and a rebuild never overlaps a handler (the `epoch` lock: shared
//! by handlers, exclusive for a rebuild). Decisions stay serial: they are made under the state
//! lock, which no one holds across an API call.
//! A second task polls the device plugin's native GPUs, a third re-discovers the GPUs and host
//! sizes every `resyncSeconds` (module `resync`) and writes the node's resources and labels
//! again, and a fourth serves HTTP; they only lock the state briefly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use tokio::sync::Mutex;
use tracing::{debug, error, info, warn};

use crate::allocator::{AllocationError, Allocator, GpuCapacity};
use crate::capacity::{HostSizes, advertised};
use crate::config::AgentConfig;
use crate::discovery::{DiscoveredGpu, Nvml, NvmlError};
use crate::native::{NativeOrigin, NativeSource};
use crate::resync::{self, ResyncOutcome};
use crate::tflops::model_label;
use crate::worker::{
    ALLOCATION_FAILED, Assignment, WorkerSpec, has_ended, is_shared, remove_pod_dir,
    write_pod_files,
};

/// Node label: the GPU model, e.g. `NVIDIA-H100-80GB-HBM3`.
pub const MODEL_LABEL: &str = "tensor-fusion.ai/gpu-model";
/// Node label: how many GPUs the agent found.
pub const COUNT_LABEL: &str = "tensor-fusion.ai/gpu-count";
/// Node label, `"true"` while the node hosts shared workers (native pods may keep off it).
pub const SHARED_LABEL: &str = "tensor-fusion.ai/hosts-shared-workers";
pub const TFLOPS_RESOURCE: &str = "tensor-fusion.ai/tflops";
pub const VRAM_RESOURCE: &str = "tensor-fusion.ai/vram";

/// A worker that holds a grant.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerRecord {
    pub spec: WorkerSpec,
    pub assignment: Assignment,
}

/// A shared pod waiting for room.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingWorker {
    pub spec: WorkerSpec,
    pub reason: String,
}

/// Everything the agent knows; one lock, held only for in-memory work.
#[derive(Debug, Default)]
pub struct AgentState {
    pub gpus: Vec<DiscoveredGpu>,
    pub allocator: Allocator,
    pub workers: BTreeMap<String, WorkerRecord>,
    pub pending: BTreeMap<String, PendingWorker>,
    pub native_gpus: BTreeSet<String>,
    pub native_origin: Option<NativeOrigin>,
    /// The first list of pods was processed: the state reflects the cluster.
    pub synced: bool,
    pub allocations_total: u64,
    pub allocation_failures_total: u64,
    /// The `hosts-shared-workers` label as last written on the node (`None`: not yet, or the
    /// write failed).
    pub published_hosts_shared: Option<bool>,
    /// Capacity of each discovered GPU, before native marks: what a rebuild starts from.
    pub capacities: Vec<GpuCapacity>,
    /// Physical TFLOPS per GPU UUID, for the limits files (vanished GPUs stay, for the workers
    /// still on them).
    pub gpu_tflops: BTreeMap<String, f64>,
    /// Whether VRAM past the physical size may be backed by host memory or disk.
    pub host_backed_vram: bool,
    /// The host sizes the virtual capacities were computed from.
    pub host: HostSizes,
    /// Workers whose grant names a GPU the node no longer reports (already warned about).
    pub stranded: BTreeSet<String>,
}

/// The agent: configuration, client and state.
pub struct Agent {
    pub config: AgentConfig,
    client: Client,
    recorder: Recorder,
    pub state: Mutex<AgentState>,
    /// [`CRASH_ENV`], read at start.
    crash_after: Option<u64>,
    /// Per pod uid: whose turn it is to handle that pod (see [`Agent::dispatch`]).
    pod_turns: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Shared by pod handlers, exclusive for a rebuild.
    epoch: tokio::sync::RwLock<()>,
    /// Node writes one at a time, each from a state read inside it.
    publishing: Mutex<()>,
    /// This agent, for the tasks it spawns.
    me: Weak<Agent>,
}

/// See [`Agent::crash_point`].
pub const CRASH_ENV: &str = "TF_AGENT_CRASH_AFTER_ASSIGNMENTS";

impl Agent {
    pub fn new(
        config: AgentConfig,
        client: Client,
        gpus: Vec<DiscoveredGpu>,
        host: HostSizes,
    ) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "tensor-fusion-node-agent".to_owned(),
                instance: Some(config.node_name.clone()),
            },
        );
        let mut state = AgentState {
            allocator: Allocator::new(Vec::new(), config.policy()),
            ..AgentState::default()
        };
        resync::install(&mut state, gpus, host, &config);
        Arc::new_cyclic(|me| Self {
            config,
            client,
            recorder,
            state: Mutex::new(state),
            crash_after: std::env::var(CRASH_ENV).ok().and_then(|value| {
                let parsed = value.trim().parse().ok();
                if parsed.is_none() {
                    warn!(value = %value, "{CRASH_ENV} is not a whole number; ignored");
                }
                parsed
            }),
            pod_turns: std::sync::Mutex::default(),
            epoch: tokio::sync::RwLock::new(()),
            publishing: Mutex::new(()),
            me: me.clone(),
        })
    }

    /// Whether the pod holds a grant or waits for one.
    async fn knows(&self, pod: &Pod) -> bool {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let state = self.state.lock().await;
        state.workers.contains_key(uid) || state.pending.contains_key(uid)
    }

    /// Handles one event of a shared pod (`deleted`: it went away) in a task of its own, after
    /// every earlier handler of the same pod and outside rebuilds. Returns once the pod's turn
    /// is taken, so the caller's order is the order the pod's events are handled in.
    async fn dispatch(&self, pod: Pod, deleted: bool) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.in_turn(uid, move |agent| async move {
            if deleted {
                agent.forget(&pod).await;
            } else {
                agent.reconcile(pod).await;
            }
        })
        .await;
    }

    async fn in_turn<F, Fut>(&self, uid: String, handle: F)
    where
        F: FnOnce(Arc<Agent>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(agent) = self.me.upgrade() else {
            return;
        };
        let turn = {
            let mut turns = self.pod_turns.lock().expect("no panic while held");
            turns.entry(uid.clone()).or_default().clone()
        };
        let turn = turn.lock_owned().await;
        tokio::spawn(async move {
            {
                let _epoch = agent.epoch.read().await;
                handle(agent.clone()).await;
            }
            drop(turn);
            // Nobody waits for this pod any more: forget its turn (a gone pod has no later
            // events; a live one gets a new entry when it has).
            let mut turns = agent.pod_turns.lock().expect("no panic while held");
            if turns
                .get(&uid)
                .is_some_and(|turn| Arc::strong_count(turn) == 1)
            {
                turns.remove(&uid);
            }
        });
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Watches the pods bound to this node until the stream ends (it does not, short of a
    /// panic: the watcher retries with backoff).
    pub async fn run_pod_watch(self: Arc<Self>) {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let selector = format!("spec.nodeName={}", self.config.node_name);
        let stream = watcher::watcher(pods, watcher::Config::default().fields(&selector));
        let mut stream = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(stream));
        let mut listed = Vec::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => listed.clear(),
                Ok(watcher::Event::InitApply(pod)) => listed.push(pod),
                Ok(watcher::Event::InitDone) => {
                    {
                        let _epoch = self.epoch.write().await;
                        self.rebuild(&listed).await;
                    }
                    for pod in std::mem::take(&mut listed) {
                        if is_shared(&pod) {
                            self.dispatch(pod, false).await;
                        }
                    }
                    self.retry_pending();
                }
                Ok(watcher::Event::Apply(pod)) if is_shared(&pod) => {
                    self.dispatch(pod, false).await;
                }
                // Also a pod that holds a grant although its annotations were edited since.
                Ok(watcher::Event::Delete(pod)) if is_shared(&pod) || self.knows(&pod).await => {
                    self.dispatch(pod, true).await;
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {}
                Err(error) => warn!(%error, "pod watch failed; retrying"),
            }
        }
    }

    /// Replaces the state with the grants recorded on `pods`, rewrites their limits files and
    /// removes pod directories nothing owns any more.
    async fn rebuild(&self, pods: &[Pod]) {
        let mut state = self.state.lock().await;
        let mut allocator = Allocator::new(state.capacities.clone(), self.config.policy());
        allocator.set_native(&state.native_gpus);
        let mut workers = BTreeMap::new();
        for pod in pods.iter().filter(|pod| is_shared(pod) && !has_ended(pod)) {
            let committed_since_list = || {
                // The list can predate an assignment a handler recorded since (the rebuild only
                // waits for handlers, not the list): keep what was committed.
                matches!(Assignment::from_pod(pod), Ok(None))
                    .then(|| pod.metadata.uid.as_deref())
                    .flatten()
                    .and_then(|uid| state.workers.get(uid))
                    .map(|record| (record.spec.clone(), record.assignment.clone()))
            };
            let Some((spec, assignment)) = self.recorded(pod).or_else(committed_since_list) else {
                continue;
            };
            allocator.restore(&spec.uid, assignment.grant.clone());
            self.write_files(&state, &spec, &assignment);
            workers.insert(spec.uid.clone(), WorkerRecord { spec, assignment });
        }
        let restored = workers.len();
        state.allocator = allocator;
        state.workers = workers;
        state.pending.clear();
        state.synced = true;
        // A listed pod without a grant yet (its container may already run and hold its usage
        // file) keeps its directory; only pods that are gone or ended lose theirs.
        let live: BTreeSet<&str> = pods
            .iter()
            .filter(|pod| !has_ended(pod))
            .filter_map(|pod| pod.metadata.uid.as_deref())
            .collect();
        self.remove_orphan_dirs(&live);
        info!(node = %self.config.node_name, workers = restored, "Rebuilt allocations from pod annotations");
        drop(state);
        self.publish_node_status().await;
    }

    /// The worker and its grant, if the pod records one for this node.
    fn recorded(&self, pod: &Pod) -> Option<(WorkerSpec, Assignment)> {
        let spec = match WorkerSpec::from_pod(pod) {
            Ok(spec) => spec,
            Err(error) => {
                warn!(pod = %pod_key(pod), %error, "Shared pod has an invalid environment");
                return None;
            }
        };
        match Assignment::from_pod(pod) {
            Ok(Some(assignment)) if assignment.node == self.config.node_name => {
                Some((spec, assignment))
            }
            Ok(_) => None,
            Err(error) => {
                warn!(pod = %spec.key(), %error, "Ignoring an unreadable assignment");
                None
            }
        }
    }

    fn write_files(&self, state: &AgentState, spec: &WorkerSpec, assignment: &Assignment) {
        if let Err(error) = write_pod_files(
            &self.config.host_root,
            spec,
            &assignment.grant,
            &state.gpu_tflops,
            state.host_backed_vram,
        ) {
            warn!(pod = %spec.key(), %error, "Failed to write the pod's limits files");
        }
    }

    /// Removes the directories of pods not in `live` (pods of this node that have not ended).
    fn remove_orphan_dirs(&self, live: &BTreeSet<&str>) {
        let Ok(entries) = std::fs::read_dir(self.config.host_root.join("pods")) else {
            return;
        };
        for entry in entries.flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(uid.as_str()) {
                info!(uid = %uid, "Removing the directory of a pod that is gone");
                if let Err(error) = remove_pod_dir(&self.config.host_root, &uid) {
                    warn!(uid = %uid, %error, "Failed to remove a pod directory");
                }
            }
        }
    }

    /// Brings one pod's grant in line with the pod.
    async fn reconcile(&self, pod: Pod) {
        if !is_shared(&pod) {
            return;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if has_ended(&pod) {
            Box::pin(self.release(&uid, &pod_key(&pod), "pod ended")).await;
            return;
        }
        if let Some((spec, assignment)) = self.recorded(&pod) {
            let mut state = self.state.lock().await;
            if state.allocator.restore(&uid, assignment.grant.clone()) {
                self.write_files(&state, &spec, &assignment);
            }
            state.pending.remove(&uid);
            state.workers.insert(uid, WorkerRecord { spec, assignment });
            drop(state);
            self.sync_shared_label().await;
            return;
        }
        self.allocate(pod).await;
    }

    /// Allocates a pod that has no grant yet and records it on the pod.
    async fn allocate(&self, mut pod: Pod) {
        for _attempt in 0..3 {
            let spec = match WorkerSpec::from_pod(&pod) {
                Ok(spec) => spec,
                Err(error) => {
                    self.refuse(&pod, None, error.to_string()).await;
                    return;
                }
            };
            let uid = spec.uid.clone();
            let decision = {
                let mut state = self.state.lock().await;
                if state.allocator.grant(&uid).is_some() {
                    // Granted already; this event predates our own patch.
                    return;
                }
                state.allocator.allocate(&uid, &spec.share_request())
            };
            let grant = match decision {
                Ok(grant) => grant,
                Err(error) => {
                    self.refuse(&pod, Some(spec), reason_text(&error)).await;
                    return;
                }
            };
            let assignment = Assignment {
                node: self.config.node_name.clone(),
                pod_uid: Some(uid.clone()),
                grant,
            };
            let patch = serde_json::json!({
                "metadata": {
                    "resourceVersion": pod.metadata.resource_version,
                    "annotations": assignment.annotations(),
                }
            });
            let api = self.pods(&spec.namespace);
            match api
                .patch(&spec.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    let mut state = self.state.lock().await;
                    self.crash_point(state.allocations_total + 1);
                    self.write_files(&state, &spec, &assignment);
                    info!(
                        pod = %spec.key(),
                        gpus = %assignment.grant.gpu_uuids.join(","),
                        tflops_request = assignment.grant.request.tflops,
                        vram_request = assignment.grant.request.vram_bytes,
                        "Assigned GPU share"
                    );
                    state.allocations_total += 1;
                    state.pending.remove(&uid);
                    state.workers.insert(uid, WorkerRecord { spec, assignment });
                    drop(state);
                    self.sync_shared_label().await;
                    return;
                }
                Err(error) => {
                    self.state.lock().await.allocator.release(&uid);
                    match &error {
                        kube::Error::Api(status) if status.code == 409 => {
                            debug!(pod = %spec.key(), "Pod changed under the assignment; re-reading it");
                            match api.get_opt(&spec.name).await {
                                Ok(Some(fresh)) if fresh.metadata.uid.as_deref() == Some(&uid) => {
                                    if Assignment::from_pod(&fresh).ok().flatten().is_some() {
                                        Box::pin(self.reconcile(fresh)).await;
                                        return;
                                    }
                                    pod = fresh;
                                }
                                _ => return,
                            }
                        }
                        kube::Error::Api(status) if status.code == 404 => return,
                        _ => {
                            warn!(pod = %spec.key(), %error, "Failed to record the assignment; will retry");
                            self.state.lock().await.pending.insert(
                                uid,
                                PendingWorker {
                                    spec,
                                    reason: format!("recording the assignment failed: {error}"),
                                },
                            );
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Fault injection for the restart tests: with `TF_AGENT_CRASH_AFTER_ASSIGNMENTS=N` the
    /// agent SIGKILLs itself once its Nth assignment is recorded on the pod and before the pod's
    /// limits files are written, the worst moment to die.
    fn crash_point(&self, assignments: u64) {
        if self.crash_after == Some(assignments) {
            error!(
                assignments,
                "{CRASH_ENV} reached: killing this process with SIGKILL"
            );
            // SAFETY: kill(2) on our own pid has no memory effects.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }

    /// Records why a pod got nothing: annotation and Event (once per distinct reason).
    async fn refuse(&self, pod: &Pod, spec: Option<WorkerSpec>, reason: String) {
        let key = pod_key(pod);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        {
            let mut state = self.state.lock().await;
            state.allocation_failures_total += 1;
            let unchanged = state
                .pending
                .get(&uid)
                .is_some_and(|pending| pending.reason == reason);
            if let Some(spec) = spec {
                state.pending.insert(
                    uid.clone(),
                    PendingWorker {
                        spec,
                        reason: reason.clone(),
                    },
                );
            }
            if unchanged {
                return;
            }
        }
        warn!(pod = %key, reason = %reason, "No GPU for shared pod");
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let patch =
            serde_json::json!({ "metadata": { "annotations": { ALLOCATION_FAILED: reason } } });
        if let Err(error) = self
            .pods(&namespace)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(pod = %key, %error, "Failed to annotate the allocation failure");
        }
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "GPUAllocationFailed".to_owned(),
            note: Some(truncate(&reason, 1000)),
            action: "AllocateGPU".to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &pod.object_ref(&())).await {
            warn!(pod = %key, %error, "Failed to publish the allocation failure event");
        }
    }

    async fn release(&self, uid: &str, key: &str, why: &str) {
        let released = {
            let mut state = self.state.lock().await;
            state.pending.remove(uid);
            state.workers.remove(uid);
            state.allocator.release(uid)
        };
        if let Err(error) = remove_pod_dir(&self.config.host_root, uid) {
            warn!(pod = %key, %error, "Failed to remove the pod directory");
        }
        if let Some(grant) = released {
            info!(pod = %key, gpus = %grant.gpu_uuids.join(","), why, "Released GPU share");
            self.retry_pending();
            self.sync_shared_label().await;
        }
    }

    async fn forget(&self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.release(&uid, &pod_key(pod), "pod deleted").await;
    }

    /// Tries the waiting pods again (after something was freed or the native set changed), in
    /// a task of its own: each pod is re-read and handled like a watch event of it.
    pub fn retry_pending(&self) {
        let Some(agent) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let waiting: Vec<PendingWorker> =
                agent.state.lock().await.pending.values().cloned().collect();
            for pending in waiting {
                // Re-read in the pod's turn, so the copy is no older than its handled events.
                let uid = pending.spec.uid.clone();
                agent
                    .in_turn(uid, move |agent| async move {
                        match agent
                            .pods(&pending.spec.namespace)
                            .get_opt(&pending.spec.name)
                            .await
                        {
                            Ok(Some(pod))
                                if pod.metadata.uid.as_deref() == Some(&pending.spec.uid) =>
                            {
                                agent.reconcile(pod).await;
                            }
                            Ok(_) => {
                                agent.state.lock().await.pending.remove(&pending.spec.uid);
                            }
                            Err(error) => {
                                warn!(pod = %pending.spec.key(), %error, "Failed to re-read a waiting pod")
                            }
                        }
                    })
                    .await;
            }
        });
    }

    /// Rewrites the node's labels when whether it hosts shared workers changed (first worker
    /// arrived, last one left), so native GPU pods are kept off exactly while shared ones run.
    async fn sync_shared_label(&self) {
        let _publishing = self.publishing.lock().await;
        let stale = {
            let state = self.state.lock().await;
            state.published_hosts_shared != Some(!state.workers.is_empty())
        };
        if stale {
            self.write_node_status().await;
        }
    }

    /// Writes the node's extended resources and labels.
    pub async fn publish_node_status(&self) {
        let _publishing = self.publishing.lock().await;
        self.write_node_status().await;
    }

    async fn write_node_status(&self) {
        let (tflops, vram, count, model, hosts_shared) = {
            let state = self.state.lock().await;
            let gpus: Vec<GpuCapacity> = state
                .allocator
                .gpus()
                .iter()
                .map(|gpu| gpu.capacity.clone())
                .collect();
            let (tflops, vram) = advertised(&gpus);
            let model = state.gpus.first().map(|gpu| model_label(&gpu.model));
            (
                tflops,
                vram,
                state.gpus.len(),
                model,
                !state.workers.is_empty(),
            )
        };
        let nodes: Api<Node> = Api::all(self.client.clone());
        let resources = serde_json::json!({
            TFLOPS_RESOURCE: tflops.to_string(),
            VRAM_RESOURCE: vram.to_string(),
        });
        let status = serde_json::json!({
            "status": { "capacity": resources, "allocatable": resources }
        });
        if let Err(error) = nodes
            .patch_status(
                &self.config.node_name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
        {
            warn!(node = %self.config.node_name, %error, "Failed to update node capacity");
        }
        let labels = serde_json::json!({ "metadata": { "labels": {
            MODEL_LABEL: model,
            COUNT_LABEL: count.to_string(),
            SHARED_LABEL: hosts_shared.then_some("true"),
        }}});
        let written = match nodes
            .patch(
                &self.config.node_name,
                &PatchParams::default(),
                &Patch::Merge(&labels),
            )
            .await
        {
            Ok(_) => Some(hosts_shared),
            Err(error) => {
                warn!(node = %self.config.node_name, %error, "Failed to update node labels");
                None
            }
        };
        self.state.lock().await.published_hosts_shared = written;
    }

    /// Polls the device plugin's native GPUs and applies changes while the agent runs.
    pub async fn run_native_poll(self: Arc<Self>) {
        let source = NativeSource {
            socket: self.config.pod_resources_socket.clone(),
            checkpoint: self.config.device_plugin_checkpoint.clone(),
        };
        let mut interval = tokio::time::interval(self.config.native_poll());
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            match source.native_gpus().await {
                Ok((native, origin)) => {
                    self.apply_native(native, origin).await;
                }
                Err(error) => warn!(%error, "Failed to read GPUs held by native pods"),
            }
        }
    }

    /// Marks the GPUs held by native pods; returns whether anything changed.
    pub async fn apply_native(&self, native: BTreeSet<String>, origin: NativeOrigin) -> bool {
        let changed = {
            let mut state = self.state.lock().await;
            let native: BTreeSet<String> = native
                .iter()
                .map(|id| crate::native::gpu_uuid_of(id, &state.gpus))
                .collect();
            state.native_origin = Some(origin);
            if state.native_gpus == native {
                false
            } else {
                state.allocator.set_native(&native);
                for record in state.workers.values() {
                    for uuid in record
                        .assignment
                        .grant
                        .gpu_uuids
                        .iter()
                        .filter(|uuid| native.contains(*uuid))
                    {
                        warn!(pod = %record.spec.key(), gpu = %uuid, "Device plugin gave a GPU with shared workers to a native pod");
                    }
                }
                info!(native = ?native, source = ?origin, "GPUs held by native pods changed");
                state.native_gpus = native;
                true
            }
        };
        if changed {
            self.publish_node_status().await;
            self.retry_pending();
        }
        changed
    }

    /// Every `period`: re-discovers the GPUs and host sizes, applies changes and writes the
    /// node's resources and labels again (whether or not anything changed, so a node object
    /// that was re-created or had its status reset is repaired).
    pub async fn run_resync(self: Arc<Self>, nvml: Arc<Nvml>, period: std::time::Duration) {
        let start = tokio::time::Instant::now() + period;
        let mut interval = tokio::time::interval_at(start, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let nvml = nvml.clone();
            let state_dir = self.config.state_dir.clone();
            let found =
                tokio::task::spawn_blocking(move || (nvml.gpus(), HostSizes::read(&state_dir)))
                    .await;
            match found {
                Ok((discovered, host)) => {
                    self.resync(discovered, host).await;
                }
                Err(error) => warn!(%error, "GPU re-discovery did not finish"),
            }
        }
    }

    /// Applies one re-discovery (see module `resync`), reports it and republishes the node.
    pub async fn resync(
        &self,
        discovered: Result<Vec<DiscoveredGpu>, NvmlError>,
        host: HostSizes,
    ) -> ResyncOutcome {
        let (outcome, gpu_count) = {
            let mut state = self.state.lock().await;
            let outcome = resync::apply(&mut state, discovered, host, &self.config);
            if outcome.rebuilt {
                // TFLOPS per GPU or host-backed VRAM may have changed.
                for record in state.workers.values() {
                    self.write_files(&state, &record.spec, &record.assignment);
                }
            }
            (outcome, state.gpus.len())
        };
        let node = &self.config.node_name;
        if let Some(error) = &outcome.kept_last_known {
            warn!(node = %node, %error, gpus = gpu_count, "GPU re-discovery failed; keeping the last known GPUs");
        }
        if !outcome.changes.is_empty() {
            let resized: Vec<String> = outcome
                .changes
                .resized
                .iter()
                .map(|gpu| {
                    format!(
                        "{} {} -> {} bytes",
                        gpu.uuid, gpu.old_vram_bytes, gpu.new_vram_bytes
                    )
                })
                .collect();
            info!(
                node = %node,
                added = ?outcome.changes.added,
                removed = ?outcome.changes.removed,
                resized = ?resized,
                gpus = gpu_count,
                "GPUs changed"
            );
        }
        if let Some((before, after)) = outcome.host_changed {
            info!(
                node = %node,
                memory_bytes = after.memory_bytes,
                disk_bytes = after.disk_bytes,
                previous_memory_bytes = before.memory_bytes,
                previous_disk_bytes = before.disk_bytes,
                "Host sizes changed"
            );
        }
        for stranded in &outcome.newly_stranded {
            let gpus = stranded.gpu_uuids.join(",");
            warn!(pod = %stranded.spec.key(), gpus = %gpus, "GPU of a worker is gone; the worker keeps its assignment");
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: "AssignedGPUGone".to_owned(),
                note: Some(format!(
                    "GPU {gpus} assigned to this pod is no longer reported by NVML on node {node}; \
                     the pod keeps its assignment and no new worker is placed on that GPU"
                )),
                action: "ResyncGPUs".to_owned(),
                secondary: None,
            };
            let reference = ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                namespace: Some(stranded.spec.namespace.clone()),
                name: Some(stranded.spec.name.clone()),
                uid: Some(stranded.spec.uid.clone()),
                ..ObjectReference::default()
            };
            if let Err(error) = self.recorder.publish(&event, &reference).await {
                warn!(pod = %stranded.spec.key(), %error, "Failed to publish the GPU-gone event");
            }
        }
        for spec in &outcome.recovered {
            info!(pod = %spec.key(), "GPUs of a worker are back");
        }
        debug!(node = %node, gpus = gpu_count, rebuilt = outcome.rebuilt, "Resynced GPUs and node status");
        self.publish_node_status().await;
        // Also the safety net for pods whose assignment could not be recorded (an API error):
        // nothing else may happen to them before the next resync.
        let waiting = !self.state.lock().await.pending.is_empty();
        if outcome.rebuilt || waiting {
            self.retry_pending();
        }
        outcome
    }
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn reason_text(error: &AllocationError) -> String {
    error.to_string()
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod race_tests;
