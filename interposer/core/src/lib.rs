//! The parts of TensorFusion's GPU sharing that are plain data and arithmetic, shared by the
//! `LD_PRELOAD` interposer and the node agent: the per-container limits file ([`config`]), the
//! shared usage file with VRAM accounting and the launch token bucket ([`shm`]), the compute
//! limiter and its steering rule ([`limiter`]), and the `cuGetProcAddress` variant table
//! ([`variants`]). Nothing here hooks or calls CUDA.

pub mod config;
pub mod limiter;
pub mod shm;
pub mod variants;
