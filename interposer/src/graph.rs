//! CUDA graphs: what a graph launch costs, and which launches only record work.
//!
//! A graph launch runs every kernel node of the graph, child graphs included, so it costs the
//! sum of their threads (grid x block), as the same kernels launched one by one would. The sum
//! is taken once, when the graph is instantiated (`cuGraphInstantiate*`), by walking the graph
//! through the driver (`cuGraphGetNodes`, `cuGraphNodeGetType`, `cuGraphKernelNodeGetParams`,
//! `cuGraphChildGraphNodeGetGraph`), kept per executable graph, taken again when
//! `cuGraphExecUpdate` gives the executable graph another topology's parameters, and dropped by
//! `cuGraphExecDestroy`. An executable graph the interposer did not see instantiated (or whose
//! walk failed) costs the fixed `GRAPH_LAUNCH_COST`.
//!
//! A launch on a stream that is being captured does not run: the driver records it into the
//! graph, which costs its kernels when it is launched. Such launches take no tokens. Captures
//! in progress are counted (`cuStreamBeginCapture*` / `cuStreamEndCapture`), so a launch asks
//! the driver whether its stream is capturing only while some capture is open; otherwise the
//! check is one relaxed atomic load.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};

use tensor_fusion_interposer_core::limiter::{GRAPH_LAUNCH_COST, launch_cost};

use crate::cuda::{
    CUDA_ERROR_NOT_FOUND, CUDA_ERROR_STREAM_CAPTURE_LAST, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
    CUDA_SUCCESS, CUgraph, CUgraphExec, CUgraphNode, CUresult, CUstream, CudaKernelNodeParams,
    GRAPH_NODE_CHILD_GRAPH, GRAPH_NODE_KERNEL, call_real, read_out,
};
use crate::log::log;
use crate::memory::capturing;
use crate::runtime::{Active, lock};

/// Child graphs nest; a deeper walk than this is taken for a broken graph.
const MAX_NESTING: u32 = 16;

/// Stream captures begun and not yet ended, in this process.
static OPEN_CAPTURES: AtomicUsize = AtomicUsize::new(0);

/// After a `cuStreamBeginCapture*` call returned `result`.
pub fn capture_began(result: CUresult) {
    if result == CUDA_SUCCESS {
        OPEN_CAPTURES.fetch_add(1, Ordering::AcqRel);
    }
}

/// After a `cuStreamEndCapture` call returned `result`: success and the capture errors (an
/// invalidated capture is ended too) close a capture; other errors (no capture on the stream, a
/// bad handle) do not.
pub fn capture_ended(result: CUresult) {
    let ended = result == CUDA_SUCCESS
        || (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED..=CUDA_ERROR_STREAM_CAPTURE_LAST)
            .contains(&result);
    if ended {
        let _ = OPEN_CAPTURES.fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
            open.checked_sub(1)
        });
    }
}

/// Whether a launch on `stream` is only being recorded into a graph (and so takes no tokens).
pub fn recording(stream: CUstream) -> bool {
    OPEN_CAPTURES.load(Ordering::Relaxed) > 0 && capturing(stream) == Ok(true)
}

/// Tokens one launch of the executable graph `exec` costs.
pub fn exec_cost(active: &Active, exec: CUgraphExec) -> u64 {
    lock(&active.graph_costs)
        .get(&(exec as usize))
        .copied()
        .unwrap_or(GRAPH_LAUNCH_COST)
}

/// After a `cuGraphInstantiate*` call returned `result` with the new executable graph in `out`.
pub fn instantiated(active: &Active, out: *mut CUgraphExec, graph: CUgraph, result: CUresult) {
    if result != CUDA_SUCCESS {
        return;
    }
    if let Some(exec) = read_out(out) {
        remember(active, exec, graph);
    }
}

/// After `cuGraphExecUpdate(_v2)` returned `result`: the executable graph now runs `graph`'s
/// kernel parameters.
pub fn updated(active: &Active, exec: CUgraphExec, graph: CUgraph, result: CUresult) {
    if result == CUDA_SUCCESS {
        remember(active, exec, graph);
    }
}

/// After `cuGraphExecDestroy` returned `result`.
pub fn destroyed(active: &Active, exec: CUgraphExec, result: CUresult) {
    if result == CUDA_SUCCESS {
        lock(&active.graph_costs).remove(&(exec as usize));
    }
}

fn remember(active: &Active, exec: CUgraphExec, graph: CUgraph) {
    let mut costs = lock(&active.graph_costs);
    match graph_cost(graph, 0) {
        Some(cost) => {
            log!(Debug, "cost={cost} graph instantiated");
            costs.insert(exec as usize, cost);
        }
        None => {
            log!(
                Debug,
                "cost={GRAPH_LAUNCH_COST} graph could not be walked; launches cost the fixed \
                 estimate"
            );
            costs.remove(&(exec as usize));
        }
    }
}

/// Threads of every kernel node of `graph`, child graphs included; `None` if the driver could
/// not answer.
fn graph_cost(graph: CUgraph, depth: u32) -> Option<u64> {
    if depth > MAX_NESTING {
        return None;
    }
    let mut count = 0_usize;
    let result = call_real!(cuGraphGetNodes(graph, std::ptr::null_mut(), &mut count));
    if result != CUDA_SUCCESS {
        return None;
    }
    let mut nodes: Vec<CUgraphNode> = vec![std::ptr::null_mut(); count];
    if count > 0 {
        let result = call_real!(cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut count));
        if result != CUDA_SUCCESS {
            return None;
        }
        nodes.truncate(count);
    }
    let mut total = 0_u64;
    for node in nodes {
        let mut kind: c_int = -1;
        if call_real!(cuGraphNodeGetType(node, &mut kind)) != CUDA_SUCCESS {
            return None;
        }
        let cost = match kind {
            GRAPH_NODE_KERNEL => {
                let mut params = CudaKernelNodeParams::default();
                let mut result = call_real!(cuGraphKernelNodeGetParams_v2(node, &mut params));
                if result == CUDA_ERROR_NOT_FOUND {
                    // A driver before CUDA 12 has only the v1 call, which fills the v1 prefix.
                    result = call_real!(cuGraphKernelNodeGetParams(node, &mut params));
                }
                if result != CUDA_SUCCESS {
                    return None;
                }
                launch_cost(params.grid, params.block)
            }
            GRAPH_NODE_CHILD_GRAPH => {
                let mut child: CUgraph = std::ptr::null_mut();
                if call_real!(cuGraphChildGraphNodeGetGraph(node, &mut child)) != CUDA_SUCCESS {
                    return None;
                }
                graph_cost(child, depth + 1)?
            }
            // Copies, memsets, host, event and memory nodes use no SMs the bucket meters;
            // conditional nodes run their body a data-dependent number of times (not counted).
            _ => 0,
        };
        total = total.saturating_add(cost);
    }
    Some(total)
}
