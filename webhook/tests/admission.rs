//! Admission decisions end to end in one process: AdmissionReview JSON in, response out.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tensor_fusion_webhook::admission::{Admitter, Decision};
use tensor_fusion_webhook::slots::MemorySlots;

const FIXTURE: &str = include_str!("fixtures/canary-pod-review.json");

fn review(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut review: Value = serde_json::from_str(FIXTURE).unwrap();
    edit(&mut review["request"]);
    serde_json::to_vec(&review).unwrap()
}

fn annotate(pairs: &[(&str, Option<&str>)]) -> impl FnOnce(&mut Value) {
    let pairs: Vec<(String, Option<String>)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
        .collect();
    move |request: &mut Value| {
        let annotations = request["object"]["metadata"]["annotations"]
            .as_object_mut()
            .unwrap();
        for (key, value) in pairs {
            match value {
                Some(value) => annotations.insert(key, json!(value)),
                None => annotations.remove(&key),
            };
        }
    }
}

/// Sends one review and returns (decision, response, the pod with the patch applied).
async fn admit(admitter: &Admitter<MemorySlots>, body: &[u8]) -> (Decision, Value, Value) {
    let (response, decision) = admitter.review(body).await.unwrap();
    let response: Value = serde_json::from_slice(&response).unwrap();
    let sent: Value = serde_json::from_slice(body).unwrap();
    let mut pod = sent["request"]["object"].clone();
    if let Some(patch) = response["response"]["patch"].as_str() {
        use base64_decode::decode;
        let patch: json_patch::Patch = serde_json::from_slice(&decode(patch)).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    (decision, response, pod)
}

/// A tiny standard base64 decoder, so the test reads the patch exactly as the API server does.
mod base64_decode {
    pub fn decode(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        };
        let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
        bytes
            .chunks(4)
            .flat_map(|chunk| {
                let mut n = 0u32;
                for (i, &b) in chunk.iter().enumerate() {
                    n |= u32::from(b) << (18 - 6 * i);
                }
                let out = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
                out.into_iter().take(chunk.len() - 1).collect::<Vec<_>>()
            })
            .collect()
    }
}

fn annotations(pod: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(pod["metadata"]["annotations"].clone()).unwrap()
}

#[tokio::test]
async fn the_guide_example_is_shared_up_to_the_quota_then_native() {
    let admitter = Admitter::new(MemorySlots::default());
    let body = review(|_| {});

    let (decision, response, pod) = admit(&admitter, &body).await;
    assert_eq!(decision, Decision::Shared);
    assert_eq!(response["response"]["allowed"], true);
    assert_eq!(
        response["response"]["uid"],
        "7f0b2cfa-3c59-4a3e-9a51-1f5d0b0c7e11"
    );
    let notes = annotations(&pod);
    assert_eq!(notes["tensor-fusion.ai/injected"], "true");
    assert_eq!(
        notes["tensor-fusion.ai/injection"],
        "containers python; tflops request 100 limit 200; vram request 3Gi limit 3Gi; \
         1 GPU per container; nvidia.com/gpu removed"
    );
    assert!(notes["tensor-fusion.ai/canary"].ends_with("/3"));
    assert_eq!(
        pod["metadata"]["labels"]["tensor-fusion.ai/canary-owner"],
        "0c1f6a64-8a47-4a3b-b7f9-5bb9c6a0d2e4"
    );
    let python = &pod["spec"]["containers"][0];
    assert_eq!(
        python["resources"],
        json!({
            "limits": { "tensor-fusion.ai/tflops": "100", "tensor-fusion.ai/vram": "3221225472" },
            "requests": { "tensor-fusion.ai/tflops": "100", "tensor-fusion.ai/vram": "3221225472" }
        })
    );
    assert_eq!(python["volumeMounts"].as_array().unwrap().len(), 4);
    assert_eq!(pod["spec"]["volumes"].as_array().unwrap().len(), 4);

    let mut positions = vec![notes["tensor-fusion.ai/canary"].clone()];
    for _ in 0..2 {
        let (decision, _, pod) = admit(&admitter, &body).await;
        assert_eq!(decision, Decision::Shared);
        positions.push(annotations(&pod)["tensor-fusion.ai/canary"].clone());
    }
    positions.sort();
    assert_eq!(positions, ["1/3", "2/3", "3/3"]);

    let (decision, _, pod) = admit(&admitter, &body).await;
    assert_eq!(decision, Decision::Native);
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        pod["spec"], sent["request"]["object"]["spec"],
        "native pods keep their spec"
    );
    assert_eq!(
        annotations(&pod)["tensor-fusion.ai/native"],
        "canary quota 3/3 in use"
    );
}

#[tokio::test]
async fn a_released_slot_is_shared_again() {
    let admitter = Admitter::new(MemorySlots::default());
    let body = review(annotate(&[(
        "tensor-fusion.ai/enabled-replicas",
        Some("1"),
    )]));
    let (_, _, pod) = admit(&admitter, &body).await;
    assert_eq!(admit(&admitter, &body).await.0, Decision::Native);
    admitter
        .slots()
        .release(&annotations(&pod)["tensor-fusion.ai/canary-claim"]);
    assert_eq!(admit(&admitter, &body).await.0, Decision::Shared);
}

#[tokio::test]
async fn a_dry_run_holds_no_slot() {
    let admitter = Admitter::new(MemorySlots::default());
    let quota_one = annotate(&[("tensor-fusion.ai/enabled-replicas", Some("1"))]);
    let dry = review(|request| {
        quota_one(request);
        request["dryRun"] = json!(true);
    });
    for _ in 0..3 {
        assert_eq!(admit(&admitter, &dry).await.0, Decision::Shared);
    }
    let real = review(annotate(&[(
        "tensor-fusion.ai/enabled-replicas",
        Some("1"),
    )]));
    assert_eq!(admit(&admitter, &real).await.0, Decision::Shared);
}

#[tokio::test]
async fn zero_replicas_rolls_back_even_with_broken_annotations() {
    let admitter = Admitter::new(MemorySlots::default());
    let body = review(annotate(&[
        ("tensor-fusion.ai/enabled-replicas", Some("0")),
        ("tensor-fusion.ai/vram-limit", Some("garbage")),
    ]));
    let (decision, _, pod) = admit(&admitter, &body).await;
    assert_eq!(decision, Decision::Native);
    assert_eq!(
        annotations(&pod)["tensor-fusion.ai/native"],
        "tensor-fusion.ai/enabled-replicas is 0 (rolled back to native GPUs)"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
}

#[tokio::test]
async fn bad_annotations_are_denied_with_the_annotation_and_value() {
    let admitter = Admitter::new(MemorySlots::default());
    let cases = [
        (
            annotate(&[("tensor-fusion.ai/vram-limit", Some("3Gx"))]),
            "invalid annotation tensor-fusion.ai/vram-limit: \"3Gx\" is not a Kubernetes quantity",
        ),
        (
            annotate(&[("tensor-fusion.ai/enabled-replicas", Some("-2"))]),
            "invalid annotation tensor-fusion.ai/enabled-replicas: \"-2\" is not a non-negative integer",
        ),
        (
            annotate(&[("tensor-fusion.ai/inject-container", Some("sidecar"))]),
            "invalid annotation tensor-fusion.ai/inject-container: \"sidecar\" is not a container \
             of this pod (containers: python)",
        ),
        (
            annotate(&[("tensor-fusion.ai/gpu-count", Some("0"))]),
            "invalid annotation tensor-fusion.ai/gpu-count: \"0\" must be a positive integer",
        ),
    ];
    for (edit, message) in cases {
        let (decision, response, _) = admit(&admitter, &review(edit)).await;
        assert_eq!(decision, Decision::Denied);
        assert_eq!(response["response"]["allowed"], false);
        assert_eq!(response["response"]["status"]["message"], message);
        assert!(response["response"]["patch"].is_null());
    }
}

#[tokio::test]
async fn a_pod_already_handled_is_not_mutated_again() {
    let admitter = Admitter::new(MemorySlots::default());
    let (_, _, pod) = admit(&admitter, &review(|_| {})).await;
    let again = review(|request| request["object"] = pod.clone());
    let (decision, response, _) = admit(&admitter, &again).await;
    assert_eq!(decision, Decision::Skipped);
    assert!(response["response"]["patch"].is_null());
}

#[tokio::test]
async fn statefulset_pods_share_by_ordinal_and_bare_pods_ignore_the_quota() {
    let admitter = Admitter::new(MemorySlots::default());
    let statefulset = |name: &'static str| {
        review(move |request| {
            let metadata = &mut request["object"]["metadata"];
            metadata["name"] = json!(name);
            metadata["ownerReferences"][0]["kind"] = json!("StatefulSet");
            metadata["ownerReferences"][0]["name"] = json!("db");
        })
    };
    let (decision, _, pod) = admit(&admitter, &statefulset("db-2")).await;
    assert_eq!(decision, Decision::Shared);
    assert_eq!(annotations(&pod)["tensor-fusion.ai/canary"], "3/3");
    let (decision, _, pod) = admit(&admitter, &statefulset("db-3")).await;
    assert_eq!(decision, Decision::Native);
    assert_eq!(
        annotations(&pod)["tensor-fusion.ai/native"],
        "StatefulSet ordinal 3 is not below tensor-fusion.ai/enabled-replicas 3"
    );

    let bare = review(|request| {
        request["object"]["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("ownerReferences");
    });
    for _ in 0..5 {
        let (decision, _, pod) = admit(&admitter, &bare).await;
        assert_eq!(decision, Decision::Shared);
        assert_eq!(
            annotations(&pod)["tensor-fusion.ai/canary"],
            "tensor-fusion.ai/enabled-replicas not applied: the pod has no controller"
        );
    }
}

#[tokio::test]
async fn malformed_bodies_are_errors_not_panics() {
    let admitter = Admitter::new(MemorySlots::default());
    for body in [
        &b""[..],
        b"{",
        b"[]",
        b"{\"kind\":\"AdmissionReview\"}",
        b"\xff\xfe",
    ] {
        assert!(admitter.review(body).await.is_err(), "{body:?}");
    }
}

mod garbage {
    use super::*;
    use proptest::prelude::*;

    fn mutate_json(value: &mut Value, path: &[usize], replacement: &Value) {
        let Some((&step, rest)) = path.split_first() else {
            *value = replacement.clone();
            return;
        };
        match value {
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(step % map.len()).unwrap().clone();
                mutate_json(map.get_mut(&key).unwrap(), rest, replacement);
            }
            Value::Array(items) if !items.is_empty() => {
                let len = items.len();
                mutate_json(&mut items[step % len], rest, replacement);
            }
            _ => *value = replacement.clone(),
        }
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any part of a real review replaced by any JSON: an answer or a 400, never a panic.
        #[test]
        fn corrupted_reviews_never_panic(path in prop::collection::vec(any::<usize>(), 0..8), replacement in any_json()) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut review: Value = serde_json::from_str(FIXTURE).unwrap();
            mutate_json(&mut review, &path, &replacement);
            let body = serde_json::to_vec(&review).unwrap();
            let admitter = Admitter::new(MemorySlots::default());
            let _ = runtime.block_on(admitter.review(&body));
        }

        #[test]
        fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let admitter = Admitter::new(MemorySlots::default());
            prop_assert!(runtime.block_on(admitter.review(&body)).is_err());
        }
    }
}

#[tokio::test]
async fn unlabelled_gpu_pods_are_kept_off_shared_nodes_and_others_pass() {
    let admitter = Admitter::new(MemorySlots::default());
    let unlabelled = |gpu: bool| {
        review(move |request| {
            let metadata = &mut request["object"]["metadata"];
            metadata["labels"]
                .as_object_mut()
                .unwrap()
                .remove("tensor-fusion.ai/enabled");
            metadata["annotations"] = json!({});
            if !gpu {
                request["object"]["spec"]["containers"][0]["resources"] = json!({});
            }
        })
    };
    let (decision, _, pod) = admit(&admitter, &unlabelled(true)).await;
    assert_eq!(decision, Decision::NativeGuarded);
    assert_eq!(
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0],
        json!({ "key": "tensor-fusion.ai/hosts-shared-workers", "operator": "NotIn", "values": ["true"] })
    );
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );

    let (decision, response, _) = admit(&admitter, &unlabelled(false)).await;
    assert_eq!(decision, Decision::Skipped);
    assert!(response["response"]["patch"].is_null());
    assert_eq!(response["response"]["allowed"], true);
}

#[tokio::test]
async fn under_progressive_migration_labelled_pods_left_native_are_kept_off_shared_nodes_too() {
    let admitter =
        Admitter::new(MemorySlots::default()).keeping_native_gpu_pods_off_shared_nodes(true);
    let sent: Value = serde_json::from_slice(&review(|_| {})).unwrap();
    let requirement = json!({
        "key": "tensor-fusion.ai/hosts-shared-workers", "operator": "NotIn", "values": ["true"]
    });
    let terms = |pod: &Value| {
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"]
            .clone()
    };

    // Shared pods go to the shared nodes: no anti-affinity.
    for _ in 0..3 {
        let (decision, _, pod) = admit(&admitter, &review(|_| {})).await;
        assert_eq!(decision, Decision::Shared);
        assert_eq!(terms(&pod), Value::Null);
    }
    // The quota is full: native, and off the shared nodes, the rest of the spec as sent.
    let (decision, _, pod) = admit(&admitter, &review(|_| {})).await;
    assert_eq!(decision, Decision::Native);
    assert_eq!(terms(&pod), json!([{ "matchExpressions": [requirement] }]));
    assert_eq!(
        annotations(&pod)["tensor-fusion.ai/native"],
        "canary quota 3/3 in use"
    );
    let mut without_affinity = pod["spec"].clone();
    without_affinity.as_object_mut().unwrap().remove("affinity");
    assert_eq!(without_affinity, sent["request"]["object"]["spec"]);

    // Rolled back with enabled-replicas "0": the same.
    let body = review(annotate(&[(
        "tensor-fusion.ai/enabled-replicas",
        Some("0"),
    )]));
    let (decision, _, pod) = admit(&admitter, &body).await;
    assert_eq!(decision, Decision::Native);
    assert_eq!(terms(&pod), json!([{ "matchExpressions": [requirement] }]));

    // Without the option a native pod keeps its spec exactly.
    let plain = Admitter::new(MemorySlots::default());
    let (decision, _, pod) = admit(&plain, &body).await;
    assert_eq!(decision, Decision::Native);
    assert_eq!(pod["spec"], sent["request"]["object"]["spec"]);
}
