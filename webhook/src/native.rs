//! Native GPU pods under progressive migration: keep them off nodes that host shared workers.
//!
//! With `nvidiaOperatorProgressiveMigration` on, a second, fail-open webhook entry sends pods
//! *without* the `tensor-fusion.ai/enabled: "true"` label here. A pod that asks for
//! `nvidia.com/gpu` gets a required node-affinity term that excludes nodes the node agent
//! labelled `tensor-fusion.ai/hosts-shared-workers: "true"`, so the NVIDIA device plugin and
//! TensorFusion never hand out the same GPU. Every other pod passes unchanged.

use serde_json::{Value, json};

use crate::keys;

/// The node label the node agent sets while a node hosts shared workers.
pub const HOSTS_SHARED_LABEL: &str = "tensor-fusion.ai/hosts-shared-workers";

/// Whether any container (or init container) asks for `nvidia.com/gpu`.
pub fn asks_for_native_gpus(pod: &Value) -> bool {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|list| pod.pointer(&format!("/spec/{list}"))?.as_array())
        .flatten()
        .any(|container| {
            ["limits", "requests"].iter().any(|side| {
                let amount = container
                    .pointer(&format!("/resources/{side}"))
                    .and_then(|amounts| amounts.get(keys::NVIDIA_GPU));
                match amount {
                    Some(Value::String(text)) => text.trim().parse::<u64>().is_ok_and(|n| n > 0),
                    Some(Value::Number(number)) => number.as_u64().is_some_and(|n| n > 0),
                    _ => false,
                }
            })
        })
}

/// Adds `tensor-fusion.ai/hosts-shared-workers NotIn ["true"]` to every required node
/// selector term (terms are ORed, so each one needs it), or one term with it alone.
pub fn keep_off_shared_nodes(pod: &mut Value) {
    let requirement = json!({ "key": HOSTS_SHARED_LABEL, "operator": "NotIn", "values": ["true"] });
    let spec = &mut pod["spec"];
    let required =
        &mut spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    let terms = &mut required["nodeSelectorTerms"];
    match terms.as_array_mut().filter(|terms| !terms.is_empty()) {
        Some(terms) => {
            for term in terms {
                let expressions = &mut term["matchExpressions"];
                match expressions.as_array_mut() {
                    Some(list) => {
                        if !list.contains(&requirement) {
                            list.push(requirement.clone());
                        }
                    }
                    None => *expressions = json!([requirement]),
                }
            }
        }
        None => *terms = json!([{ "matchExpressions": [requirement] }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gpu_pods_are_guarded() {
        let gpu = json!({ "spec": { "containers": [{ "resources": { "limits": { "nvidia.com/gpu": "1" } } }] } });
        let cpu =
            json!({ "spec": { "containers": [{ "resources": { "limits": { "cpu": "1" } } }] } });
        let zero = json!({ "spec": { "containers": [{ "resources": { "limits": { "nvidia.com/gpu": 0 } } }] } });
        assert!(asks_for_native_gpus(&gpu));
        assert!(!asks_for_native_gpus(&cpu));
        assert!(!asks_for_native_gpus(&zero));
    }

    #[test]
    fn the_requirement_joins_every_existing_term() {
        let mut pod = json!({ "spec": { "affinity": { "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
                { "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["a"] }] },
                { "matchFields": [{ "key": "metadata.name", "operator": "In", "values": ["n1"] }] }
            ] } } } } });
        keep_off_shared_nodes(&mut pod);
        keep_off_shared_nodes(&mut pod);
        let terms = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"];
        assert_eq!(terms[0]["matchExpressions"].as_array().unwrap().len(), 2);
        assert_eq!(
            terms[1]["matchExpressions"],
            json!([{ "key": HOSTS_SHARED_LABEL, "operator": "NotIn", "values": ["true"] }])
        );
        assert_eq!(terms[1]["matchFields"][0]["key"], "metadata.name");
    }

    #[test]
    fn a_pod_without_affinity_gets_one_term() {
        let mut pod = json!({ "spec": { "containers": [] } });
        keep_off_shared_nodes(&mut pod);
        assert_eq!(
            pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"],
            json!({ "nodeSelectorTerms": [{ "matchExpressions": [
                { "key": HOSTS_SHARED_LABEL, "operator": "NotIn", "values": ["true"] }
            ] }] })
        );
    }
}
