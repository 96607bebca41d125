//! Every label, annotation and resource name the webhook reads or writes, in one place.

pub const ENABLED_LABEL: &str = "tensor-fusion.ai/enabled";

pub const TFLOPS_REQUEST: &str = "tensor-fusion.ai/tflops-request";
pub const TFLOPS_LIMIT: &str = "tensor-fusion.ai/tflops-limit";
pub const VRAM_REQUEST: &str = "tensor-fusion.ai/vram-request";
pub const VRAM_LIMIT: &str = "tensor-fusion.ai/vram-limit";
pub const ENABLED_REPLICAS: &str = "tensor-fusion.ai/enabled-replicas";
pub const GPU_COUNT: &str = "tensor-fusion.ai/gpu-count";
pub const INJECT_CONTAINER: &str = "tensor-fusion.ai/inject-container";

/// Written on shared pods: `"true"`.
pub const INJECTED: &str = "tensor-fusion.ai/injected";
/// Written on shared pods: one line saying what was injected.
pub const INJECTION: &str = "tensor-fusion.ai/injection";
/// Written on shared pods: the canary position, e.g. `2/3`, or why there is none.
pub const CANARY: &str = "tensor-fusion.ai/canary";
/// Written on native pods: why the pod was left on native GPUs.
pub const NATIVE: &str = "tensor-fusion.ai/native";
/// Written on shared canary pods: the claim id held in the owner's slot lease.
pub const CANARY_CLAIM: &str = "tensor-fusion.ai/canary-claim";
/// Label on shared canary pods and on slot leases: the UID of the owning controller.
pub const CANARY_OWNER_LABEL: &str = "tensor-fusion.ai/canary-owner";

pub const NVIDIA_GPU: &str = "nvidia.com/gpu";
pub const TFLOPS_RESOURCE: &str = "tensor-fusion.ai/tflops";
pub const VRAM_RESOURCE: &str = "tensor-fusion.ai/vram";
