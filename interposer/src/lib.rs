//! TensorFusion's CUDA-driver interposer, loaded into a workload with `LD_PRELOAD`.
//!
//! It sits between the CUDA runtime (and PyTorch, NCCL, cuDNN) and the real `libcuda.so.1`,
//! reached through its exported symbols ([`hooks`]), through `cuGetProcAddress(_v2)` (same
//! module) and through `dlsym` on the driver's handle ([`dlsym`]). At `cuInit` it reads the
//! container's limits ([`runtime`]); then every allocation door charges the container's shared
//! usage file and may spill to host memory ([`memory`]), every launch door draws from the
//! container's token bucket ([`launch`]), and memory queries (CUDA and NVML, [`nvml`]) report
//! the container's slice. The limits file, usage file and limiter themselves live in
//! `tensor-fusion-interposer-core`; `docs/interposer.md` describes the whole.

mod cuda;
mod dlsym;
mod graph;
mod guard;
mod hooks;
mod launch;
mod log;
mod memory;
mod nvml;
mod runtime;
