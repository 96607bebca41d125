//! One admission review, start to finish: decode, decide shared or native, build the patch.
//!
//! [`Admitter::review`] takes the raw HTTP body and returns the response body; everything in
//! between is plain data: [`ShareSpec`] from the annotations, [`Plan`] for the containers,
//! [`CanaryPlan`] and the [`SlotStore`] for the quota. The body is parsed once: the envelope into
//! [`AdmissionRequest`], the pod into a JSON value. A shared pod's patch replaces each injected
//! container with its edited copy, appends the volumes and adds the annotations; a native pod's
//! patch is the one annotation. Nothing else in the pod is touched.

use std::collections::BTreeMap;
use std::time::Instant;

use base64::Engine;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::canary::{CanaryPlan, SlotOutcome, SlotStore};
use crate::inject::Plan;
use crate::keys;
use crate::native;
use crate::share::{ShareSpec, read_enabled_replicas};

/// What happened to a pod, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Shared,
    Native,
    /// A native GPU pod (not labelled) kept off nodes with shared workers.
    NativeGuarded,
    Denied,
    /// Not a pod create, or a pod this webhook already handled.
    Skipped,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Native => "native",
            Self::NativeGuarded => "native-guarded",
            Self::Denied => "denied",
            Self::Skipped => "skipped",
        }
    }
}

/// The body is not an AdmissionReview this webhook can answer (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("malformed AdmissionReview: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("malformed AdmissionReview: it has no request")]
    NoRequest,
}

/// The parts of an `admission.k8s.io/v1` AdmissionReview this webhook reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: String,
    request: Option<AdmissionRequest>,
}

/// One admission request; the object stays raw JSON so nothing in it is lost.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    pub kind: Kind,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: String,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(default)]
    pub object: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct Kind {
    #[serde(default)]
    pub group: String,
    pub kind: String,
}

/// The webhook's answer for one pod: allowed with an optional JSON patch, or denied.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    /// JSON patch operations (RFC 6902), as an array.
    pub patch: Option<Value>,
    pub denial: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
}

#[derive(Serialize)]
struct StatusOut<'a> {
    code: u16,
    message: &'a str,
}

/// Decides and patches pods.
pub struct Admitter<S> {
    slots: S,
    /// Labelled pods left native get the node anti-affinity too (progressive migration).
    guard_native: bool,
}

impl<S: SlotStore> Admitter<S> {
    pub fn new(slots: S) -> Self {
        Self {
            slots,
            guard_native: false,
        }
    }

    /// With `on`, a labelled pod left native that asks for `nvidia.com/gpu` is kept off nodes
    /// hosting shared workers (`--progressive-migration`), like an unlabelled native GPU pod.
    pub fn keeping_native_gpu_pods_off_shared_nodes(mut self, on: bool) -> Self {
        self.guard_native = on;
        self
    }

    pub fn slots(&self) -> &S {
        &self.slots
    }

    /// Answers one AdmissionReview body with the response body and the decision.
    pub async fn review(&self, body: &[u8]) -> Result<(Vec<u8>, Decision), ReviewError> {
        let review: ReviewIn = serde_json::from_slice(body)?;
        let request = review.request.ok_or(ReviewError::NoRequest)?;
        let started = Instant::now();
        let verdict = self.admit(&request).await;
        metrics::histogram!("tensor_fusion_webhook_admission_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(
            "tensor_fusion_webhook_admissions_total",
            "decision" => verdict.decision.as_str()
        )
        .increment(1);
        let patch = match &verdict.patch {
            Some(patch) => Some(serde_json::to_vec(patch)?),
            None => None,
        };
        let out = ReviewOut {
            api_version: review.api_version.as_str(),
            kind: "AdmissionReview",
            response: ResponseOut {
                uid: &request.uid,
                allowed: verdict.denial.is_none(),
                status: verdict
                    .denial
                    .as_deref()
                    .map(|message| StatusOut { code: 403, message }),
                patch: patch.map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes)),
                patch_type: verdict.patch.as_ref().map(|_| "JSONPatch"),
            },
        };
        Ok((serde_json::to_vec(&out)?, verdict.decision))
    }

    /// Decides for one request.
    pub async fn admit(&self, request: &AdmissionRequest) -> Verdict {
        let Some(pod) = request.object.as_ref().filter(|_| {
            request.operation == "CREATE"
                && request.kind.kind == "Pod"
                && request.kind.group.is_empty()
        }) else {
            return Verdict::skipped();
        };
        let metadata = match pod.get("metadata").map(ObjectMeta::deserialize).transpose() {
            Ok(metadata) => metadata.unwrap_or_default(),
            Err(error) => return deny("?", &format!("unreadable pod metadata: {error}")),
        };
        let empty = BTreeMap::new();
        let annotations = metadata.annotations.as_ref().unwrap_or(&empty);
        if annotations.contains_key(keys::INJECTED) || annotations.contains_key(keys::NATIVE) {
            return Verdict::skipped();
        }
        let pod_key = pod_key(request, &metadata);
        let labelled = metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(keys::ENABLED_LABEL))
            .is_some_and(|value| value == "true");
        if !labelled {
            return guard_native(&pod_key, pod);
        }

        // Rollback must work even when the other annotations are broken, so `0` is read first.
        match read_enabled_replicas(annotations) {
            Ok(Some(0)) => return self.native(&pod_key, pod, &metadata, rolled_back_reason()),
            Ok(_) => {}
            Err(error) => return deny(&pod_key, &error.to_string()),
        }
        let spec = match ShareSpec::from_annotations(annotations) {
            Ok(spec) => spec,
            Err(error) => return deny(&pod_key, &error.to_string()),
        };
        let plan = match Plan::new(pod, &spec) {
            Ok(plan) => plan,
            Err(error) => return deny(&pod_key, &error.to_string()),
        };

        let namespace = request
            .namespace
            .clone()
            .or_else(|| metadata.namespace.clone())
            .unwrap_or_else(|| "default".to_owned());
        let mut annotations_out = vec![(keys::INJECTED, "true".to_owned())];
        let mut labels_out = Vec::new();
        match CanaryPlan::for_pod(&metadata, spec.enabled_replicas) {
            CanaryPlan::Unlimited => {}
            CanaryPlan::RolledBack => {
                return self.native(&pod_key, pod, &metadata, rolled_back_reason());
            }
            CanaryPlan::NoController => annotations_out.push((
                keys::CANARY,
                format!(
                    "{} not applied: the pod has no controller",
                    keys::ENABLED_REPLICAS
                ),
            )),
            CanaryPlan::Ordinal { ordinal, limit } if ordinal < limit => {
                annotations_out.push((keys::CANARY, format!("{}/{limit}", ordinal + 1)));
            }
            CanaryPlan::Ordinal { ordinal, limit } => {
                let reason = format!(
                    "StatefulSet ordinal {ordinal} is not below {} {limit}",
                    keys::ENABLED_REPLICAS
                );
                return self.native(&pod_key, pod, &metadata, reason);
            }
            CanaryPlan::Slot { owner, limit } => {
                let dry_run = request.dry_run.unwrap_or(false);
                match self.slots.claim(&namespace, &owner, limit, dry_run).await {
                    Ok(SlotOutcome::Claimed { slot, claim_id }) => {
                        annotations_out.push((keys::CANARY, format!("{}/{limit}", slot + 1)));
                        annotations_out.push((keys::CANARY_CLAIM, claim_id));
                        labels_out.push((keys::CANARY_OWNER_LABEL, owner.uid.clone()));
                    }
                    Ok(SlotOutcome::Full { in_use }) => {
                        let reason = format!("canary quota {in_use}/{limit} in use");
                        return self.native(&pod_key, pod, &metadata, reason);
                    }
                    Err(error) => {
                        warn!(pod = %pod_key, %error, "Canary slot undecided; leaving pod native");
                        let reason = format!("canary slot could not be checked: {error}");
                        return self.native(&pod_key, pod, &metadata, reason);
                    }
                }
            }
        }

        let (mut operations, summary) = plan.patch(pod, &spec);
        info!(pod = %pod_key, decision = "shared", injection = %summary, "Pod admitted");
        annotations_out.insert(1, (keys::INJECTION, summary));
        metadata_operations(
            &mut operations,
            metadata.annotations.is_some(),
            "annotations",
            annotations_out,
        );
        metadata_operations(
            &mut operations,
            metadata.labels.is_some(),
            "labels",
            labels_out,
        );
        Verdict::patched(Decision::Shared, operations)
    }

    /// Leaves the pod native: the patch adds the one annotation that says why (and, under
    /// progressive migration, the node anti-affinity of a native GPU pod).
    fn native(&self, pod_key: &str, pod: &Value, metadata: &ObjectMeta, reason: String) -> Verdict {
        let guarded = self.guard_native && native::asks_for_native_gpus(pod);
        info!(pod = %pod_key, decision = "native", reason = %reason, kept_off_shared_nodes = guarded, "Pod admitted");
        let mut operations = if guarded {
            keep_off_shared_nodes_operations(pod)
        } else {
            Vec::with_capacity(1)
        };
        let note = vec![(keys::NATIVE, reason)];
        metadata_operations(
            &mut operations,
            metadata.annotations.is_some(),
            "annotations",
            note,
        );
        Verdict::patched(Decision::Native, operations)
    }
}

/// A pod that is not labelled for sharing arrives only through the progressive-migration entry:
/// a native GPU pod gets the node anti-affinity, anything else passes unchanged.
fn guard_native(pod_key: &str, pod: &Value) -> Verdict {
    if !native::asks_for_native_gpus(pod) {
        return Verdict::skipped();
    }
    info!(pod = %pod_key, decision = "native-guarded", "Native GPU pod kept off nodes with shared workers");
    Verdict::patched(
        Decision::NativeGuarded,
        keep_off_shared_nodes_operations(pod),
    )
}

/// The JSON patch operations that add the node anti-affinity of a native GPU pod.
fn keep_off_shared_nodes_operations(pod: &Value) -> Vec<Value> {
    let mut edited = pod.clone();
    native::keep_off_shared_nodes(&mut edited);
    match serde_json::to_value(json_patch::diff(pod, &edited)) {
        Ok(Value::Array(operations)) => operations,
        _ => unreachable!("a JSON patch serializes to a JSON array"),
    }
}

fn rolled_back_reason() -> String {
    format!(
        "{} is 0 (rolled back to native GPUs)",
        keys::ENABLED_REPLICAS
    )
}

fn pod_key(request: &AdmissionRequest, metadata: &ObjectMeta) -> String {
    let namespace = request.namespace.as_deref().unwrap_or("default");
    match (&metadata.name, &metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => format!("{namespace}/{name}"),
        (_, Some(prefix)) => format!("{namespace}/{prefix}*"),
        _ => format!("{namespace}/?"),
    }
}

impl Verdict {
    /// Allowed with the JSON patch `operations`.
    fn patched(decision: Decision, operations: Vec<Value>) -> Self {
        Self {
            decision,
            patch: Some(Value::Array(operations)),
            denial: None,
        }
    }

    fn skipped() -> Self {
        Self {
            decision: Decision::Skipped,
            patch: None,
            denial: None,
        }
    }
}

fn deny(pod_key: &str, message: &str) -> Verdict {
    info!(pod = %pod_key, decision = "denied", reason = %message, "Pod denied");
    Verdict {
        decision: Decision::Denied,
        patch: None,
        denial: Some(message.to_owned()),
    }
}

/// Operations that set `metadata.<field>.<key>` for each pair: one `add` per key when the map
/// exists, else one `add` of the whole map.
fn metadata_operations(
    operations: &mut Vec<Value>,
    map_exists: bool,
    field: &str,
    pairs: Vec<(&str, String)>,
) {
    if pairs.is_empty() {
        return;
    }
    if map_exists {
        for (key, value) in pairs {
            let path = format!(
                "/metadata/{field}/{}",
                key.replace('~', "~0").replace('/', "~1")
            );
            operations.push(json!({ "op": "add", "path": path, "value": value }));
        }
    } else {
        let map: serde_json::Map<String, Value> = pairs
            .into_iter()
            .map(|(key, value)| (key.to_owned(), Value::String(value)))
            .collect();
        operations.push(json!({ "op": "add", "path": format!("/metadata/{field}"), "value": map }));
    }
}
