//! Exact canary slots shared by every webhook replica, kept in Leases.
//!
//! An owner (e.g. a ReplicaSet) with `enabled-replicas: N` has N slots. Slot `k` is the Lease
//! `tf-canary-<owner-uid>-<k>` in the pod's namespace; its `holderIdentity` is a random claim id
//! that the admitted pod carries in its `tensor-fusion.ai/canary-claim` annotation. Creating a
//! Lease and replacing one at a known `resourceVersion` are atomic in the API server, so two
//! replicas can never hold the same slot: at most N pods hold slots.
//!
//! A slot is free when its Lease is missing, or when its holder is gone: the pod carrying the
//! claim was deleted, is terminating or finished (seen by the [`ClaimCache`] watch or by a
//! fresh LIST), or never appeared within the grace period (the pod was rejected after this
//! webhook admitted it). Leases carry an owner reference to the pod's controller, so the garbage
//! collector removes them with it. No finalizers, no writes to user objects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::canary::{SlotError, SlotOutcome, SlotStore};
use crate::fresh::{FreshRead, PerKey};
use crate::keys;

/// How long a claim that no pod carries yet still holds its slot.
pub const DEFAULT_CLAIM_GRACE: Duration = Duration::from_secs(10);

/// What this replica knows about claims from watching shared canary pods.
#[derive(Default)]
pub struct ClaimCache {
    claims: Mutex<HashMap<String, ClaimSeen>>,
    pruned_at: Mutex<Option<Instant>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClaimSeen {
    live: bool,
    at: Instant,
    /// The pod's `resourceVersion` when this was seen (an etcd revision; `None` if it was
    /// missing or not a number).
    revision: Option<u64>,
}

/// The owner's shared pods from one LIST: claim id -> live, and the LIST's `resourceVersion`.
#[derive(Debug, Default)]
pub struct ListedPods {
    claims: HashMap<String, bool>,
    revision: Option<u64>,
}

fn revision_of(resource_version: Option<&String>) -> Option<u64> {
    resource_version?.parse().ok()
}

/// Whether the holder of a claim is live, from a fresh LIST and this replica's watch cache.
///
/// The LIST is the truth for the claims it contains. A claim it lacks is either a pod not
/// persisted yet (`None`: pending until the grace period ends), or a pod that is gone, or a pod
/// the watch saw *after* the LIST's snapshot was taken (the API server saves an admitted pod
/// only after the webhook answered, so this happens in bursts). Only when the LIST is at least
/// as new as the cache's sighting is a missing pod taken as gone; otherwise the cache decides.
/// Unknown revisions count as "the LIST may be older": the slot stays held (never more than N
/// shared pods), and frees when the watch delivers the deletion.
fn holder_live(listed: &ListedPods, cached: Option<ClaimSeen>, holder: &str) -> Option<bool> {
    if let Some(live) = listed.claims.get(holder) {
        return Some(*live);
    }
    let seen = cached?;
    if !seen.live {
        return Some(false);
    }
    let list_is_newer = matches!(
        (listed.revision, seen.revision),
        (Some(list), Some(sighting)) if list >= sighting
    );
    Some(!list_is_newer)
}

/// How long to remember a claim whose pod is gone.
const GONE_MEMORY: Duration = Duration::from_secs(600);

impl ClaimCache {
    /// `Some(true)` if a live pod carries `claim_id`, `Some(false)` if its pod is gone,
    /// `None` if no pod with it has been seen.
    pub fn is_live(&self, claim_id: &str) -> Option<bool> {
        self.lock().get(claim_id).map(|seen| seen.live)
    }

    fn seen(&self, claim_id: &str) -> Option<ClaimSeen> {
        self.lock().get(claim_id).copied()
    }

    fn observe(&self, pod: &Pod, deleted: bool) {
        let Some(claim) = claim_of(pod) else { return };
        let live = !deleted && pod_is_live(pod);
        let now = Instant::now();
        let revision = revision_of(pod.metadata.resource_version.as_ref());
        let mut claims = self.lock();
        claims.insert(
            claim.to_owned(),
            ClaimSeen {
                live,
                at: now,
                revision,
            },
        );
        let mut pruned_at = self
            .pruned_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if pruned_at.is_none_or(|at| now.duration_since(at) > GONE_MEMORY / 10) {
            claims.retain(|_, seen| seen.live || now.duration_since(seen.at) < GONE_MEMORY);
            *pruned_at = Some(now);
        }
    }

    /// After a re-list: claims the list did not contain are gone.
    fn relisted(&self, listed: &HashMap<String, (bool, Option<u64>)>) {
        let now = Instant::now();
        let mut claims = self.lock();
        for (claim, seen) in claims.iter_mut() {
            if !listed.contains_key(claim) && seen.live {
                *seen = ClaimSeen {
                    live: false,
                    at: now,
                    revision: seen.revision,
                };
            }
        }
        for (claim, &(live, revision)) in listed {
            claims.insert(
                claim.clone(),
                ClaimSeen {
                    live,
                    at: now,
                    revision,
                },
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ClaimSeen>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts).
        self.claims
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Watches shared canary pods in all namespaces and keeps the cache current. Sends `true` on
    /// `synced` after the first complete list. Runs until the stream ends (never, normally).
    pub async fn run(self: Arc<Self>, client: Client, synced: watch::Sender<bool>) {
        let pods: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().labels(keys::CANARY_OWNER_LABEL);
        let mut listing: HashMap<String, (bool, Option<u64>)> = HashMap::new();
        let mut stream = watcher(pods, config).boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(pod)) => self.observe(&pod, false),
                Ok(watcher::Event::Delete(pod)) => self.observe(&pod, true),
                Ok(watcher::Event::Init) => listing.clear(),
                Ok(watcher::Event::InitApply(pod)) => {
                    if let Some(claim) = claim_of(&pod) {
                        let revision = revision_of(pod.metadata.resource_version.as_ref());
                        listing.insert(claim.to_owned(), (pod_is_live(&pod), revision));
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    self.relisted(&listing);
                    listing.clear();
                    synced.send_replace(true);
                    debug!(claims = self.lock().len(), "Canary pod cache synced");
                }
                Err(error) => warn!(%error, "Canary pod watch failed; retrying"),
            }
        }
    }
}

fn claim_of(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(keys::CANARY_CLAIM)
        .map(String::as_str)
}

/// A pod holds its slot until it is terminating or finished.
fn pod_is_live(pod: &Pod) -> bool {
    let phase = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The state of one slot as seen at claim time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// No Lease: free.
    Empty,
    /// Held by a pod known to be live.
    Held,
    /// Held by a claim no pod carries yet, acquired less than the grace period ago.
    Pending,
    /// Its holder is gone or never appeared in time: free to take over.
    Stale,
}

/// Classifies a slot from its holder's liveness (`None`: never seen) and the claim's age.
pub fn classify(holder_live: Option<bool>, claim_age: Duration, grace: Duration) -> SlotState {
    match holder_live {
        Some(true) => SlotState::Held,
        Some(false) => SlotState::Stale,
        None if claim_age >= grace => SlotState::Stale,
        None => SlotState::Pending,
    }
}

/// [`SlotStore`] on Leases in the API server.
pub struct LeaseSlots {
    client: Client,
    claims: Arc<ClaimCache>,
    grace: Duration,
    /// Serializes claims for one owner inside this replica, so local requests do not race each
    /// other for the same Lease; other replicas are kept apart by the API server.
    owner_locks: PerKey<tokio::sync::Mutex<()>>,
    /// Fresh LISTs of each owner's Leases and shared pods, shared by concurrent reviews.
    lease_reads: PerKey<FreshRead<HashMap<String, Lease>>>,
    pod_reads: PerKey<FreshRead<ListedPods>>,
}

impl LeaseSlots {
    pub fn new(client: Client, claims: Arc<ClaimCache>, grace: Duration) -> Self {
        Self {
            client,
            claims,
            grace,
            owner_locks: PerKey::default(),
            lease_reads: PerKey::default(),
            pod_reads: PerKey::default(),
        }
    }

    /// The owner's Leases, from a LIST issued after this call (shared with concurrent callers).
    async fn fresh_leases(
        &self,
        namespace: &str,
        selector: &str,
        owner_uid: &str,
    ) -> Result<Arc<HashMap<String, Lease>>, kube::Error> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let params = ListParams::default().labels(selector);
        self.lease_reads
            .get(owner_uid)
            .read(|| async move {
                let listed = api.list(&params).await?;
                Ok(listed
                    .items
                    .into_iter()
                    .filter_map(|lease| Some((lease.metadata.name.clone()?, lease)))
                    .collect())
            })
            .await
    }

    /// The owner's shared pods, from a LIST issued after this call.
    async fn fresh_pods(
        &self,
        namespace: &str,
        selector: &str,
        owner_uid: &str,
    ) -> Result<Arc<ListedPods>, kube::Error> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let params = ListParams::default().labels(selector);
        self.pod_reads
            .get(owner_uid)
            .read(|| async move {
                let listed = api.list(&params).await?;
                Ok(ListedPods {
                    claims: listed
                        .items
                        .iter()
                        .filter_map(|pod| Some((claim_of(pod)?.to_owned(), pod_is_live(pod))))
                        .collect(),
                    revision: revision_of(listed.metadata.resource_version.as_ref()),
                })
            })
            .await
    }

    fn state_of(&self, lease: &Lease, live_pods: Option<&ListedPods>) -> SlotState {
        let spec = lease.spec.as_ref();
        let Some(holder) = spec.and_then(|spec| spec.holder_identity.as_deref()) else {
            return SlotState::Stale;
        };
        let acquired = spec.and_then(|spec| spec.acquire_time.as_ref());
        let age = acquired
            .map(|time| Timestamp::now().duration_since(time.0).unsigned_abs())
            .unwrap_or(Duration::MAX);
        let live = match live_pods {
            Some(listed) => holder_live(listed, self.claims.seen(holder), holder),
            None => self.claims.is_live(holder),
        };
        classify(live, age, self.grace)
    }

    async fn try_take(
        &self,
        api: &Api<Lease>,
        name: &str,
        existing: Option<&Lease>,
        owner: &OwnerReference,
        claim_id: &str,
    ) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some([(keys::CANARY_OWNER_LABEL.to_owned(), owner.uid.clone())].into()),
                owner_references: Some(vec![OwnerReference {
                    controller: Some(false),
                    block_owner_deletion: Some(false),
                    ..owner.clone()
                }]),
                resource_version: existing
                    .and_then(|lease| lease.metadata.resource_version.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(claim_id.to_owned()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                ..LeaseSpec::default()
            }),
        };
        let result = match existing {
            None => api.create(&PostParams::default(), &lease).await.map(drop),
            Some(_) => api
                .replace(name, &PostParams::default(), &lease)
                .await
                .map(drop),
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }
}

fn lease_name(owner_uid: &str, slot: u32) -> String {
    format!("tf-canary-{owner_uid}-{slot}")
}

fn new_claim_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl SlotStore for LeaseSlots {
    async fn claim(
        &self,
        namespace: &str,
        owner: &OwnerReference,
        limit: u32,
        dry_run: bool,
    ) -> Result<SlotOutcome, SlotError> {
        // A read-only look first: past the quota (most of a burst) the answer is "full" without
        // waiting for other requests of the same owner, and a dry run never writes.
        let outcome = self.look(namespace, owner, limit, false).await?;
        if dry_run || matches!(outcome, SlotOutcome::Full { .. }) {
            return Ok(outcome);
        }
        let lock = self.owner_locks.get(&owner.uid);
        let _guard = lock.lock().await;
        self.look(namespace, owner, limit, true).await
    }
}

impl LeaseSlots {
    /// Finds a free slot of `owner`; with `take`, claims it (or the next one, if another
    /// replica was faster). Without `take`, nothing is written.
    async fn look(
        &self,
        namespace: &str,
        owner: &OwnerReference,
        limit: u32,
        take: bool,
    ) -> Result<SlotOutcome, SlotError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let selector = format!("{}={}", keys::CANARY_OWNER_LABEL, owner.uid);
        let mut leases: HashMap<String, Lease> = self
            .fresh_leases(namespace, &selector, &owner.uid)
            .await?
            .as_ref()
            .clone();

        let claim_id = new_claim_id();
        let start = rand::random_range(0..limit);
        let order: Vec<u32> = (0..limit).map(|i| (start + i) % limit).collect();
        let mut live_pods: Option<Arc<ListedPods>> = None;
        // Two passes: the first trusts the watch cache; if every slot looks held, the second
        // lists the owner's pods afresh, so a pod deleted a moment ago frees its slot at once.
        for pass in 0..2 {
            if pass == 1 {
                live_pods = Some(self.fresh_pods(namespace, &selector, &owner.uid).await?);
            }
            for &slot in &order {
                let name = lease_name(&owner.uid, slot);
                let existing = leases.get(&name);
                let state = existing.map_or(SlotState::Empty, |lease| {
                    self.state_of(lease, live_pods.as_deref())
                });
                if !matches!(state, SlotState::Empty | SlotState::Stale) {
                    continue;
                }
                if !take {
                    return Ok(SlotOutcome::Claimed { slot, claim_id });
                }
                if self
                    .try_take(&api, &name, existing, owner, &claim_id)
                    .await?
                {
                    info!(owner = %owner.name, slot, claim = %claim_id, "Canary slot claimed");
                    return Ok(SlotOutcome::Claimed { slot, claim_id });
                }
                // Another replica got there first: remember what it wrote.
                if let Some(current) = api.get_opt(&name).await? {
                    leases.insert(name, current);
                }
            }
        }

        let in_use = order
            .iter()
            .filter(|&&slot| {
                leases
                    .get(&lease_name(&owner.uid, slot))
                    .is_some_and(|lease| {
                        self.state_of(lease, live_pods.as_deref()) != SlotState::Stale
                    })
            })
            .count();
        Ok(SlotOutcome::Full {
            in_use: u32::try_from(in_use).unwrap_or(limit),
        })
    }
}

/// [`SlotStore`] in memory, for tests and benchmarks of one process.
#[derive(Default)]
pub struct MemorySlots {
    slots: Mutex<HashMap<String, Vec<Option<String>>>>,
}

impl MemorySlots {
    /// Frees the slot held by `claim_id`, as a pod deletion would.
    pub fn release(&self, claim_id: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for holder in slots.values_mut().flatten() {
            if holder.as_deref() == Some(claim_id) {
                *holder = None;
            }
        }
    }
}

impl SlotStore for MemorySlots {
    async fn claim(
        &self,
        _namespace: &str,
        owner: &OwnerReference,
        limit: u32,
        dry_run: bool,
    ) -> Result<SlotOutcome, SlotError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let holders = slots.entry(owner.uid.clone()).or_default();
        holders.resize(holders.len().max(limit as usize), None);
        let claim_id = new_claim_id();
        match holders[..limit as usize].iter().position(Option::is_none) {
            Some(slot) => {
                if !dry_run {
                    holders[slot] = Some(claim_id.clone());
                }
                Ok(SlotOutcome::Claimed {
                    slot: slot as u32,
                    claim_id,
                })
            }
            None => Ok(SlotOutcome::Full { in_use: limit }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    #[test]
    fn a_slot_frees_when_its_pod_is_gone_or_never_came() {
        assert_eq!(classify(Some(true), Duration::ZERO, GRACE), SlotState::Held);
        assert_eq!(classify(Some(true), GRACE * 100, GRACE), SlotState::Held);
        assert_eq!(
            classify(Some(false), Duration::ZERO, GRACE),
            SlotState::Stale
        );
        assert_eq!(classify(None, GRACE / 2, GRACE), SlotState::Pending);
        assert_eq!(classify(None, GRACE, GRACE), SlotState::Stale);
    }

    #[test]
    fn the_claim_cache_follows_pod_lifecycle() {
        let cache = ClaimCache::default();
        let mut pod = Pod::default();
        pod.metadata.annotations = Some([(keys::CANARY_CLAIM.to_owned(), "c1".to_owned())].into());
        assert_eq!(cache.is_live("c1"), None);
        cache.observe(&pod, false);
        assert_eq!(cache.is_live("c1"), Some(true));
        pod.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        cache.observe(&pod, false);
        assert_eq!(
            cache.is_live("c1"),
            Some(false),
            "terminating pods free their slot"
        );
        cache.relisted(&[("c2".to_owned(), (true, Some(7)))].into());
        assert_eq!(cache.is_live("c2"), Some(true));
        assert_eq!(cache.is_live("c1"), Some(false));
    }

    fn seen(live: bool, revision: Option<u64>) -> Option<ClaimSeen> {
        Some(ClaimSeen {
            live,
            at: Instant::now(),
            revision,
        })
    }

    #[test]
    fn a_list_older_than_the_watch_never_frees_a_live_slot() {
        // The race a burst produced: the webhook admitted pod P (claim c1); the fresh LIST's
        // snapshot was taken before P was saved, the watch delivered P afterwards. P is live:
        // its slot must stay held, or a second pod takes it.
        let listed = ListedPods {
            claims: HashMap::new(),
            revision: Some(90),
        };
        assert_eq!(
            holder_live(&listed, seen(true, Some(100)), "c1"),
            Some(true)
        );
        // A LIST at or after the sighting that lacks the pod: the pod is gone.
        let newer = ListedPods {
            claims: HashMap::new(),
            revision: Some(100),
        };
        assert_eq!(
            holder_live(&newer, seen(true, Some(100)), "c1"),
            Some(false)
        );
        // Revisions unknown: keep the slot held (exactness first).
        let unknown = ListedPods::default();
        assert_eq!(holder_live(&unknown, seen(true, None), "c1"), Some(true));
        assert_eq!(holder_live(&newer, seen(true, None), "c1"), Some(true));
        // The watch saw it go; never seen; the LIST has it.
        assert_eq!(
            holder_live(&listed, seen(false, Some(95)), "c1"),
            Some(false)
        );
        assert_eq!(holder_live(&listed, None, "c1"), None);
        let has = ListedPods {
            claims: [("c1".to_owned(), false)].into(),
            revision: Some(90),
        };
        assert_eq!(holder_live(&has, seen(true, Some(80)), "c1"), Some(false));
    }

    #[tokio::test]
    async fn memory_slots_cap_and_release() {
        let store = MemorySlots::default();
        let owner = OwnerReference {
            uid: "rs-1".to_owned(),
            ..OwnerReference::default()
        };
        let mut claims = Vec::new();
        for _ in 0..3 {
            match store.claim("ns", &owner, 3, false).await.unwrap() {
                SlotOutcome::Claimed { claim_id, .. } => claims.push(claim_id),
                full => panic!("expected a slot, got {full:?}"),
            }
        }
        assert_eq!(
            store.claim("ns", &owner, 3, false).await.unwrap(),
            SlotOutcome::Full { in_use: 3 }
        );
        store.release(&claims[1]);
        assert!(matches!(
            store.claim("ns", &owner, 3, false).await.unwrap(),
            SlotOutcome::Claimed { slot: 1, .. }
        ));
    }
}
