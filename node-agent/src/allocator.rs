//! Which GPU(s) of this node a shared-GPU worker gets, and how much of them: a plain data
//! structure with no Kubernetes or NVML in it.
//!
//! The agent feeds it the node's GPUs ([`GpuCapacity`]: physical and virtual capacity, and
//! whether the NVIDIA device plugin gave the GPU to a native pod), restores the grants recorded
//! on pods, and then asks [`Allocator::allocate`] for each new worker. A worker's request must
//! fit the GPU's physical capacity and its limit the virtual (oversold) capacity; among the GPUs
//! that fit, the fullest one wins (compact first, scored by `vram_weight` and `tflops_weight`),
//! so whole GPUs stay free for large workers. [`Allocator::release`] gives a grant back.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// A small tolerance for TFLOPS sums (decimal requests such as `0.1` add up inexactly).
const TFLOPS_EPSILON: f64 = 1e-6;

/// TFLOPS and VRAM bytes: a capacity, a sum of requests or a sum of limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    pub tflops: f64,
    pub vram_bytes: u64,
}

impl Resources {
    fn plus(self, other: Resources) -> Resources {
        Resources {
            tflops: self.tflops + other.tflops,
            vram_bytes: self.vram_bytes.saturating_add(other.vram_bytes),
        }
    }

    fn minus(self, other: Resources) -> Resources {
        Resources {
            tflops: (self.tflops - other.tflops).max(0.0),
            vram_bytes: self.vram_bytes.saturating_sub(other.vram_bytes),
        }
    }

    fn fits_in(self, capacity: Resources) -> bool {
        self.tflops <= capacity.tflops + TFLOPS_EPSILON && self.vram_bytes <= capacity.vram_bytes
    }
}

/// One GPU as the allocator sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuCapacity {
    pub uuid: String,
    pub model: String,
    /// What the GPU really has: requests must fit here.
    pub physical: Resources,
    /// What may be promised in limits (oversold TFLOPS, VRAM expanded to host memory and disk).
    #[serde(rename = "virtual")]
    pub virtual_: Resources,
    /// The NVIDIA device plugin gave this GPU to a native pod: no shared worker may get it.
    pub native: bool,
}

/// What a worker asks for, per GPU.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareRequest {
    pub gpu_count: u32,
    pub request: Resources,
    pub limit: Resources,
}

/// What a worker was given: the GPUs (in the order the worker sees them) and the share of each.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    pub gpu_uuids: Vec<String>,
    pub request: Resources,
    pub limit: Resources,
}

/// Scheduling knobs of the pool (`vramWeight`, `tflopsWeight`, `maxWorkerPerNode`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub vram_weight: f64,
    pub tflops_weight: f64,
    pub max_workers_per_node: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            vram_weight: 0.7,
            tflops_weight: 0.3,
            max_workers_per_node: 256,
        }
    }
}

/// Why a worker got nothing. The text goes into the pod's annotation and Event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AllocationError {
    #[error("node already runs {max} shared workers (maxWorkerPerNode)")]
    TooManyWorkers { max: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("worker wants {wanted} GPUs but the node has {usable} not held by native pods")]
    NotEnoughGpus { wanted: u32, usable: usize },
    #[error("no GPU fits: {0}")]
    NoFit(NoFitReason),
}

/// The detail of a [`AllocationError::NoFit`]: the closest GPU and what it lacked, and whether
/// the node as a whole had the room (fragmentation).
#[derive(Debug, Clone, PartialEq)]
pub struct NoFitReason {
    /// GPUs that fit (fewer than wanted).
    pub fitting: usize,
    pub wanted: u32,
    /// Largest free physical VRAM / TFLOPS on one usable GPU.
    pub best_free: Resources,
    /// Free physical VRAM / TFLOPS summed over the usable GPUs.
    pub node_free: Resources,
    pub request: Resources,
    pub limit: Resources,
    /// Every usable GPU had the physical room, but the limit passed virtual capacity.
    pub limit_exceeds_virtual: bool,
}

impl fmt::Display for NoFitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} wanted GPUs fit request {} TFLOPS / {} bytes VRAM (limit {} / {})",
            self.fitting,
            self.wanted,
            self.request.tflops,
            self.request.vram_bytes,
            self.limit.tflops,
            self.limit.vram_bytes
        )?;
        write!(
            f,
            "; most free on one GPU {} TFLOPS / {} bytes",
            round2(self.best_free.tflops),
            self.best_free.vram_bytes
        )?;
        let node_would_fit = self
            .request
            .vram_bytes
            .saturating_mul(u64::from(self.wanted))
            <= self.node_free.vram_bytes
            && self.request.tflops * f64::from(self.wanted)
                <= self.node_free.tflops + TFLOPS_EPSILON;
        if node_would_fit && !self.limit_exceeds_virtual {
            write!(
                f,
                "; fragmented: the node has {} TFLOPS / {} bytes free in total",
                round2(self.node_free.tflops),
                self.node_free.vram_bytes
            )?;
        }
        if self.limit_exceeds_virtual {
            write!(f, "; the limit exceeds the GPU's virtual capacity")?;
        }
        Ok(())
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// One GPU with what has been promised on it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuState {
    #[serde(flatten)]
    pub capacity: GpuCapacity,
    /// Sum of the requests granted on this GPU.
    pub requested: Resources,
    /// Sum of the limits granted on this GPU.
    pub limited: Resources,
    pub workers: usize,
}

impl GpuState {
    fn usable(&self) -> bool {
        !self.capacity.native
    }

    fn fits_physical(&self, request: Resources) -> bool {
        self.requested.plus(request).fits_in(self.capacity.physical)
    }

    fn fits_virtual(&self, limit: Resources) -> bool {
        self.limited.plus(limit).fits_in(self.capacity.virtual_)
    }

    /// Compact-first score after placing `request` here: the weighted fullness, higher is better.
    fn score(&self, request: Resources, policy: &Policy) -> f64 {
        let after = self.requested.plus(request);
        let vram = ratio(
            after.vram_bytes as f64,
            self.capacity.physical.vram_bytes as f64,
        );
        let tflops = ratio(after.tflops, self.capacity.physical.tflops);
        policy.vram_weight * vram + policy.tflops_weight * tflops
    }
}

fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 1.0 }
}

/// The node's GPUs and every grant on them, keyed by worker id (the pod UID in the agent).
#[derive(Debug, Clone, Default)]
pub struct Allocator {
    gpus: Vec<GpuState>,
    grants: HashMap<String, Grant>,
    policy: Policy,
}

impl Allocator {
    pub fn new(gpus: Vec<GpuCapacity>, policy: Policy) -> Self {
        Self {
            gpus: gpus
                .into_iter()
                .map(|capacity| GpuState {
                    capacity,
                    requested: Resources::default(),
                    limited: Resources::default(),
                    workers: 0,
                })
                .collect(),
            grants: HashMap::new(),
            policy,
        }
    }

    pub fn gpus(&self) -> &[GpuState] {
        &self.gpus
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn grants(&self) -> &HashMap<String, Grant> {
        &self.grants
    }

    pub fn grant(&self, worker: &str) -> Option<&Grant> {
        self.grants.get(worker)
    }

    /// Marks GPUs as taken (or no longer taken) by native pods of the device plugin. Grants
    /// already on such a GPU stay: they predate the native pod, and only the device plugin can
    /// be wrong about it.
    pub fn set_native(&mut self, native_uuids: &std::collections::BTreeSet<String>) -> bool {
        let mut changed = false;
        for gpu in &mut self.gpus {
            let native = native_uuids.contains(&gpu.capacity.uuid);
            changed |= gpu.capacity.native != native;
            gpu.capacity.native = native;
        }
        changed
    }

    /// Replaces the capacity of the GPUs (discovery or configuration changed), keeping grants.
    pub fn set_capacity(&mut self, gpus: Vec<GpuCapacity>) {
        let grants = std::mem::take(&mut self.grants);
        *self = Self::new(gpus, self.policy);
        for (worker, grant) in grants {
            self.restore(&worker, grant);
        }
    }

    /// Which GPUs would `request` get, without changing anything: indices into [`Self::gpus`],
    /// best first.
    pub fn choose(&self, request: &ShareRequest) -> Result<Vec<usize>, AllocationError> {
        validate(request)?;
        if self.grants.len() >= self.policy.max_workers_per_node {
            return Err(AllocationError::TooManyWorkers {
                max: self.policy.max_workers_per_node,
            });
        }
        let usable = self.gpus.iter().filter(|gpu| gpu.usable()).count();
        if request.gpu_count as usize > usable {
            return Err(AllocationError::NotEnoughGpus {
                wanted: request.gpu_count,
                usable,
            });
        }
        let mut fitting: Vec<(usize, f64)> = self
            .gpus
            .iter()
            .enumerate()
            .filter(|(_, gpu)| {
                gpu.usable()
                    && gpu.fits_physical(request.request)
                    && gpu.fits_virtual(request.limit)
            })
            .map(|(index, gpu)| (index, gpu.score(request.request, &self.policy)))
            .collect();
        if fitting.len() < request.gpu_count as usize {
            return Err(AllocationError::NoFit(
                self.no_fit_reason(request, fitting.len()),
            ));
        }
        // Fullest first; the lower index on a tie, so decisions are reproducible.
        fitting.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        fitting.truncate(request.gpu_count as usize);
        Ok(fitting.into_iter().map(|(index, _)| index).collect())
    }

    fn no_fit_reason(&self, request: &ShareRequest, fitting: usize) -> NoFitReason {
        let usable = self.gpus.iter().filter(|gpu| gpu.usable());
        let mut best_free = Resources::default();
        let mut node_free = Resources::default();
        let mut physical_fits = 0;
        for gpu in usable {
            let free = gpu.capacity.physical.minus(gpu.requested);
            if (free.vram_bytes, free.tflops) > (best_free.vram_bytes, best_free.tflops) {
                best_free = free;
            }
            node_free = node_free.plus(free);
            physical_fits += usize::from(gpu.fits_physical(request.request));
        }
        NoFitReason {
            fitting,
            wanted: request.gpu_count,
            best_free,
            node_free,
            request: request.request,
            limit: request.limit,
            limit_exceeds_virtual: physical_fits >= request.gpu_count as usize,
        }
    }

    /// Grants `request` to `worker` (replacing nothing: a worker that already has a grant keeps
    /// it and gets it back).
    pub fn allocate(
        &mut self,
        worker: &str,
        request: &ShareRequest,
    ) -> Result<Grant, AllocationError> {
        if let Some(grant) = self.grants.get(worker) {
            return Ok(grant.clone());
        }
        let chosen = self.choose(request)?;
        let grant = Grant {
            gpu_uuids: chosen
                .iter()
                .map(|&index| self.gpus[index].capacity.uuid.clone())
                .collect(),
            request: request.request,
            limit: request.limit,
        };
        self.charge(&grant);
        self.grants.insert(worker.to_owned(), grant.clone());
        Ok(grant)
    }

    /// Records a grant made earlier (read back from the pod), even if it no longer fits: it is
    /// what the worker runs with. GPUs the node no longer has are skipped. Returns whether the
    /// worker was new.
    pub fn restore(&mut self, worker: &str, grant: Grant) -> bool {
        if self.grants.contains_key(worker) {
            return false;
        }
        self.charge(&grant);
        self.grants.insert(worker.to_owned(), grant);
        true
    }

    /// Gives a worker's grant back.
    pub fn release(&mut self, worker: &str) -> Option<Grant> {
        let grant = self.grants.remove(worker)?;
        for uuid in &grant.gpu_uuids {
            if let Some(gpu) = self.gpus.iter_mut().find(|gpu| &gpu.capacity.uuid == uuid) {
                gpu.requested = gpu.requested.minus(grant.request);
                gpu.limited = gpu.limited.minus(grant.limit);
                gpu.workers = gpu.workers.saturating_sub(1);
            }
        }
        Some(grant)
    }

    fn charge(&mut self, grant: &Grant) {
        for uuid in &grant.gpu_uuids {
            if let Some(gpu) = self.gpus.iter_mut().find(|gpu| &gpu.capacity.uuid == uuid) {
                gpu.requested = gpu.requested.plus(grant.request);
                gpu.limited = gpu.limited.plus(grant.limit);
                gpu.workers += 1;
            }
        }
    }

    /// Free physical capacity over the usable GPUs.
    pub fn free(&self) -> Resources {
        self.gpus
            .iter()
            .filter(|gpu| gpu.usable())
            .fold(Resources::default(), |sum, gpu| {
                sum.plus(gpu.capacity.physical.minus(gpu.requested))
            })
    }

    /// VRAM fragmentation of the node, 0..=1: the share of the free physical VRAM that is not on
    /// the GPU with the most free VRAM (0 = all free VRAM on one GPU, or none free).
    pub fn fragmentation(&self) -> f64 {
        let free: Vec<u64> = self
            .gpus
            .iter()
            .filter(|gpu| gpu.usable())
            .map(|gpu| {
                gpu.capacity
                    .physical
                    .vram_bytes
                    .saturating_sub(gpu.requested.vram_bytes)
            })
            .collect();
        let total: u64 = free.iter().sum();
        let largest = free.iter().copied().max().unwrap_or(0);
        if total == 0 {
            0.0
        } else {
            1.0 - largest as f64 / total as f64
        }
    }

    /// Sum of the requests per GPU UUID, for checks that nothing is over-committed.
    pub fn requested_by_gpu(&self) -> BTreeMap<String, Resources> {
        self.gpus
            .iter()
            .map(|gpu| (gpu.capacity.uuid.clone(), gpu.requested))
            .collect()
    }
}

fn validate(request: &ShareRequest) -> Result<(), AllocationError> {
    if request.gpu_count == 0 {
        return Err(AllocationError::InvalidRequest(
            "gpu count must be at least 1".to_owned(),
        ));
    }
    let valid = |value: f64| value.is_finite() && value >= 0.0;
    if !valid(request.request.tflops) || !valid(request.limit.tflops) {
        return Err(AllocationError::InvalidRequest(format!(
            "tflops request {} / limit {} must be finite and not negative",
            request.request.tflops, request.limit.tflops
        )));
    }
    if request.request.tflops > request.limit.tflops + TFLOPS_EPSILON
        || request.request.vram_bytes > request.limit.vram_bytes
    {
        return Err(AllocationError::InvalidRequest(format!(
            "request {} TFLOPS / {} bytes exceeds limit {} TFLOPS / {} bytes",
            request.request.tflops,
            request.request.vram_bytes,
            request.limit.tflops,
            request.limit.vram_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn gpu(
        index: usize,
        tflops: f64,
        vram_gib: u64,
        oversell: f64,
        expand_gib: u64,
    ) -> GpuCapacity {
        GpuCapacity {
            uuid: format!("GPU-{index}"),
            model: "NVIDIA H100 80GB HBM3".to_owned(),
            physical: Resources {
                tflops,
                vram_bytes: vram_gib * GIB,
            },
            virtual_: Resources {
                tflops: tflops * oversell,
                vram_bytes: (vram_gib + expand_gib) * GIB,
            },
            native: false,
        }
    }

    fn share(tflops: (f64, f64), vram_gib: (u64, u64)) -> ShareRequest {
        ShareRequest {
            gpu_count: 1,
            request: Resources {
                tflops: tflops.0,
                vram_bytes: vram_gib.0 * GIB,
            },
            limit: Resources {
                tflops: tflops.1,
                vram_bytes: vram_gib.1 * GIB,
            },
        }
    }

    fn node(gpus: usize) -> Allocator {
        Allocator::new(
            (0..gpus)
                .map(|index| gpu(index, 989.0, 80, 3.0, 0))
                .collect(),
            Policy::default(),
        )
    }

    #[test]
    fn requests_fit_physical_capacity_exactly() {
        let mut allocator = node(1);
        for worker in 0..8 {
            let grant = allocator
                .allocate(&format!("w{worker}"), &share((100.0, 100.0), (10, 10)))
                .unwrap();
            assert_eq!(grant.gpu_uuids, ["GPU-0"]);
        }
        // 80 GiB physical are promised; the 9th worker's 10 GiB request does not fit.
        let error = allocator
            .allocate("w8", &share((1.0, 1.0), (10, 10)))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "no GPU fits: 0 of 1 wanted GPUs fit request 1 TFLOPS / 10737418240 bytes VRAM \
             (limit 1 / 10737418240); most free on one GPU 189 TFLOPS / 0 bytes"
        );
    }

    #[test]
    fn limits_fit_virtual_capacity_and_oversell_lets_limits_pass_physical() {
        // 989 physical TFLOPS, oversold 3x: limits may add up to 2967.
        let mut allocator = node(1);
        for worker in 0..9 {
            allocator
                .allocate(&format!("w{worker}"), &share((100.0, 300.0), (1, 1)))
                .unwrap();
        }
        // Requests 900 <= 989, limits 2700 + 300 = 3000 > 2967.
        let error = allocator
            .allocate("w9", &share((50.0, 300.0), (1, 1)))
            .unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("the limit exceeds the GPU's virtual capacity"),
            "{error}"
        );
        // A smaller limit still fits.
        allocator
            .allocate("w9", &share((50.0, 260.0), (1, 1)))
            .unwrap();
    }

    #[test]
    fn vram_expanded_to_host_lets_limits_pass_physical_vram() {
        let mut allocator = Allocator::new(vec![gpu(0, 989.0, 80, 1.0, 40)], Policy::default());
        allocator
            .allocate("a", &share((10.0, 10.0), (40, 100)))
            .unwrap();
        allocator
            .allocate("b", &share((10.0, 10.0), (20, 20)))
            .unwrap();
        // Limits 120 GiB = virtual capacity; one more GiB of limit does not fit.
        assert!(allocator.allocate("c", &share((1.0, 1.0), (0, 1))).is_err());
    }

    #[test]
    fn compact_first_fills_the_fullest_gpu() {
        let mut allocator = node(4);
        let first = allocator
            .allocate("a", &share((100.0, 100.0), (10, 10)))
            .unwrap();
        let second = allocator
            .allocate("b", &share((100.0, 100.0), (10, 10)))
            .unwrap();
        assert_eq!(first.gpu_uuids, second.gpu_uuids, "packed on one GPU");
        // A worker that needs a whole GPU still finds one.
        let whole = allocator
            .allocate("c", &share((989.0, 989.0), (80, 80)))
            .unwrap();
        assert_ne!(whole.gpu_uuids, first.gpu_uuids);
    }

    #[test]
    fn weights_decide_between_a_vram_heavy_and_a_tflops_heavy_gpu() {
        let gpus = vec![gpu(0, 1000.0, 100, 1.0, 0), gpu(1, 1000.0, 100, 1.0, 0)];
        let mut vram_first = Allocator::new(gpus.clone(), Policy::default());
        vram_first.restore(
            "vram-heavy",
            Grant {
                gpu_uuids: vec!["GPU-0".into()],
                request: Resources {
                    tflops: 100.0,
                    vram_bytes: 60 * GIB,
                },
                limit: Resources {
                    tflops: 100.0,
                    vram_bytes: 60 * GIB,
                },
            },
        );
        vram_first.restore(
            "tflops-heavy",
            Grant {
                gpu_uuids: vec!["GPU-1".into()],
                request: Resources {
                    tflops: 600.0,
                    vram_bytes: 10 * GIB,
                },
                limit: Resources {
                    tflops: 600.0,
                    vram_bytes: 10 * GIB,
                },
            },
        );
        let mut tflops_first = vram_first.clone();
        tflops_first.policy = Policy {
            vram_weight: 0.1,
            tflops_weight: 0.9,
            ..Policy::default()
        };
        let request = share((10.0, 10.0), (1, 1));
        assert_eq!(
            vram_first.allocate("new", &request).unwrap().gpu_uuids,
            ["GPU-0"]
        );
        assert_eq!(
            tflops_first.allocate("new", &request).unwrap().gpu_uuids,
            ["GPU-1"]
        );
    }

    #[test]
    fn max_workers_per_node_caps_the_worker_count() {
        let mut allocator = Allocator::new(
            vec![gpu(0, 989.0, 80, 1.0, 0)],
            Policy {
                max_workers_per_node: 2,
                ..Policy::default()
            },
        );
        allocator.allocate("a", &share((1.0, 1.0), (1, 1))).unwrap();
        allocator.allocate("b", &share((1.0, 1.0), (1, 1))).unwrap();
        assert_eq!(
            allocator.allocate("c", &share((1.0, 1.0), (1, 1))),
            Err(AllocationError::TooManyWorkers { max: 2 })
        );
        allocator.release("a");
        allocator.allocate("c", &share((1.0, 1.0), (1, 1))).unwrap();
    }

    #[test]
    fn fragmented_node_says_so_when_no_single_gpu_fits() {
        let mut allocator = node(2);
        allocator
            .allocate("a", &share((100.0, 100.0), (50, 50)))
            .unwrap();
        allocator
            .allocate("b", &share((100.0, 100.0), (50, 50)))
            .unwrap();
        // 30 GiB free on each GPU, 60 in total; a 40 GiB worker fits the node but no GPU.
        assert!((allocator.fragmentation() - 0.5).abs() < 1e-9);
        let error = allocator
            .allocate("c", &share((10.0, 10.0), (40, 40)))
            .unwrap_err()
            .to_string();
        assert!(
            error
                .contains("fragmented: the node has 1778 TFLOPS / 64424509440 bytes free in total"),
            "{error}"
        );
    }

    #[test]
    fn multi_gpu_workers_get_distinct_gpus_and_native_gpus_are_skipped() {
        let mut allocator = node(4);
        allocator.set_native(&["GPU-1".to_owned()].into());
        let mut request = share((100.0, 100.0), (10, 10));
        request.gpu_count = 3;
        let grant = allocator.allocate("a", &request).unwrap();
        assert_eq!(grant.gpu_uuids, ["GPU-0", "GPU-2", "GPU-3"]);
        request.gpu_count = 4;
        assert_eq!(
            allocator.allocate("b", &request),
            Err(AllocationError::NotEnoughGpus {
                wanted: 4,
                usable: 3
            })
        );
    }

    #[test]
    fn release_and_restore_round_trip() {
        let mut allocator = node(2);
        let grant = allocator
            .allocate("a", &share((100.0, 200.0), (10, 10)))
            .unwrap();
        let mut rebuilt = node(2);
        assert!(rebuilt.restore("a", grant.clone()));
        assert!(
            !rebuilt.restore("a", grant.clone()),
            "restoring twice counts once"
        );
        assert_eq!(rebuilt.requested_by_gpu(), allocator.requested_by_gpu());
        assert_eq!(rebuilt.release("a"), Some(grant));
        assert_eq!(rebuilt.free(), node(2).free());
    }

    #[test]
    fn invalid_requests_are_refused() {
        let mut allocator = node(1);
        let error = allocator
            .allocate("a", &share((200.0, 100.0), (1, 1)))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid request: request 200 TFLOPS / 1073741824 bytes exceeds limit 100 TFLOPS / 1073741824 bytes"
        );
    }

    proptest! {
        /// Whatever arrives and leaves, no GPU's requests pass its physical capacity, no GPU's
        /// limits pass its virtual capacity, and releasing everything leaves the node empty.
        #[test]
        fn never_over_commits(
            operations in prop::collection::vec(
                (0u8..4, 0usize..40, 1u32..3, 0u32..600, 0u32..3, 0u64..50, 0u64..3),
                1..200,
            )
        ) {
            let mut allocator = Allocator::new(
                (0..4).map(|index| gpu(index, 989.0, 80, 2.0, 20)).collect(),
                Policy { max_workers_per_node: 32, ..Policy::default() },
            );
            for (kind, worker, gpus, tflops, burst, vram, vram_burst) in operations {
                let worker = format!("w{worker}");
                if kind == 0 {
                    allocator.release(&worker);
                    continue;
                }
                let request = ShareRequest {
                    gpu_count: gpus,
                    request: Resources { tflops: f64::from(tflops), vram_bytes: vram * GIB },
                    limit: Resources {
                        tflops: f64::from(tflops * (burst + 1)),
                        vram_bytes: (vram + vram_burst * 10) * GIB,
                    },
                };
                if let Ok(grant) = allocator.allocate(&worker, &request) {
                    let mut unique = grant.gpu_uuids.clone();
                    unique.dedup();
                    prop_assert_eq!(unique.len(), grant.gpu_uuids.len());
                }
                prop_assert!(allocator.grants().len() <= 32);
                for state in allocator.gpus() {
                    prop_assert!(state.requested.fits_in(state.capacity.physical));
                    prop_assert!(state.limited.fits_in(state.capacity.virtual_));
                }
            }
            let workers: Vec<String> = allocator.grants().keys().cloned().collect();
            for worker in workers {
                allocator.release(&worker);
            }
            for state in allocator.gpus() {
                prop_assert_eq!(state.workers, 0);
                prop_assert_eq!(state.requested.vram_bytes, 0);
                prop_assert!(state.requested.tflops.abs() < 1e-6);
            }
        }
    }
}
