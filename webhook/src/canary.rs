//! The canary decision: does this pod go on shared GPUs, given `enabled-replicas`?
//!
//! [`CanaryPlan::for_pod`] reads the pod's controller and the quota and says what must be
//! checked: nothing (no quota, or no controller), the StatefulSet ordinal (deterministic), or a
//! slot of the owner's quota (claimed through a [`SlotStore`]). [`SlotStore`] is the one place
//! that coordinates between webhook replicas; `slots` implements it with Leases.

use std::future::Future;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// What the quota means for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum CanaryPlan {
    /// No `enabled-replicas`: every replica is shared.
    Unlimited,
    /// `enabled-replicas: "0"`: rolled back, native.
    RolledBack,
    /// The quota is set but the pod has no controller to count replicas of.
    NoController,
    /// A StatefulSet pod: shared when `ordinal < limit`.
    Ordinal { ordinal: u32, limit: u32 },
    /// Any other controller: claim one of `limit` slots of `owner`.
    Slot { owner: OwnerReference, limit: u32 },
}

impl CanaryPlan {
    pub fn for_pod(metadata: &ObjectMeta, enabled_replicas: Option<u32>) -> Self {
        let Some(limit) = enabled_replicas else {
            return Self::Unlimited;
        };
        if limit == 0 {
            return Self::RolledBack;
        }
        let Some(owner) = metadata
            .owner_references
            .iter()
            .flatten()
            .find(|owner| owner.controller == Some(true))
        else {
            return Self::NoController;
        };
        if owner.kind == "StatefulSet"
            && let Some(ordinal) = statefulset_ordinal(metadata, &owner.name)
        {
            return Self::Ordinal { ordinal, limit };
        }
        Self::Slot {
            owner: owner.clone(),
            limit,
        }
    }
}

/// A StatefulSet pod's ordinal: the `apps.kubernetes.io/pod-index` label, else the name suffix.
fn statefulset_ordinal(metadata: &ObjectMeta, set_name: &str) -> Option<u32> {
    let from_label = metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get("apps.kubernetes.io/pod-index"))
        .and_then(|index| index.parse().ok());
    from_label.or_else(|| {
        metadata
            .name
            .as_deref()?
            .strip_prefix(set_name)?
            .strip_prefix('-')?
            .parse()
            .ok()
    })
}

/// The result of asking for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotOutcome {
    /// Slot `slot` (0-based) now belongs to `claim_id`.
    Claimed { slot: u32, claim_id: String },
    /// Every slot is held by a live pod.
    Full { in_use: u32 },
}

/// Why a slot could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("canary coordination through the API server failed: {0}")]
    Api(#[from] kube::Error),
}

/// Coordinates canary slots between all webhook replicas.
pub trait SlotStore: Send + Sync + 'static {
    /// Claims a free slot of `owner` (at most `limit` are held at once). With `dry_run` nothing
    /// is written: the outcome says what a real request would get.
    fn claim(
        &self,
        namespace: &str,
        owner: &OwnerReference,
        limit: u32,
        dry_run: bool,
    ) -> impl Future<Output = Result<SlotOutcome, SlotError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned_by(kind: &str, name: &str, pod_name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(pod_name.to_owned()),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".to_owned(),
                kind: kind.to_owned(),
                name: name.to_owned(),
                uid: "uid-1".to_owned(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn statefulset_pods_share_by_ordinal() {
        let pod = owned_by("StatefulSet", "db", "db-4");
        assert_eq!(
            CanaryPlan::for_pod(&pod, Some(3)),
            CanaryPlan::Ordinal {
                ordinal: 4,
                limit: 3
            }
        );
    }

    #[test]
    fn replicaset_pods_claim_slots() {
        let pod = owned_by("ReplicaSet", "web-5d8f", "");
        assert!(matches!(
            CanaryPlan::for_pod(&pod, Some(3)),
            CanaryPlan::Slot { limit: 3, .. }
        ));
    }

    #[test]
    fn zero_rolls_back_and_absence_means_all() {
        let pod = owned_by("ReplicaSet", "web", "");
        assert_eq!(CanaryPlan::for_pod(&pod, Some(0)), CanaryPlan::RolledBack);
        assert_eq!(CanaryPlan::for_pod(&pod, None), CanaryPlan::Unlimited);
        assert_eq!(
            CanaryPlan::for_pod(&ObjectMeta::default(), Some(2)),
            CanaryPlan::NoController
        );
    }
}
