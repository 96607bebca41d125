//! CUDA graphs in the mock: built node by node (`cuGraphCreate`, `cuGraphAddKernelNode_v2`,
//! `cuGraphAddEmptyNode`, `cuGraphAddChildGraphNode`) or recorded by stream capture (a launch on
//! a capturing stream becomes a kernel node and does not run), read back (`cuGraphGetNodes`,
//! `cuGraphNodeGetType`, `cuGraphKernelNodeGetParams_v2`, `cuGraphChildGraphNodeGetGraph`),
//! instantiated (`cuGraphInstantiateWithFlags`, `cuGraphInstantiateWithParams(_ptsz)`), updated
//! (`cuGraphExecUpdate_v2`) and launched: a graph launch runs its kernels, child graphs included,
//! one after another on the simulated clock.
//!
//! Handles are leaked boxes checked against a registry, so a stale or made-up handle is
//! `CUDA_ERROR_INVALID_VALUE`, never a dangling read. A child graph node holds a copy of the
//! graph it was given, as the driver's does.

use std::collections::HashSet;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::Mutex;

use tensor_fusion_mock_gpu_sim::{kernel_duration_ns, kernel_threads};

use super::{CUDA_ERROR_INVALID_VALUE, CUDA_SUCCESS, CUresult, guarded, lock, mock, status, write};

/// `CUgraphNodeType` values the mock builds.
const NODE_KERNEL: c_int = 0;
const NODE_CHILD_GRAPH: c_int = 4;
const NODE_EMPTY: c_int = 5;

#[derive(Clone)]
enum NodeKind {
    Kernel {
        function: usize,
        grid: [c_uint; 3],
        block: [c_uint; 3],
    },
    Child(&'static Graph),
    Empty,
}

pub struct Node {
    kind: NodeKind,
}

#[derive(Default)]
pub struct Graph {
    nodes: Mutex<Vec<&'static Node>>,
}

/// An instantiated graph: the kernels it runs per launch, flattened.
struct Exec {
    kernels: Mutex<Vec<([c_uint; 3], [c_uint; 3])>>,
}

#[derive(Default)]
struct Registry {
    graphs: HashSet<usize>,
    nodes: HashSet<usize>,
    execs: HashSet<usize>,
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static REGISTRY: std::sync::OnceLock<Mutex<Registry>> = std::sync::OnceLock::new();
    lock(REGISTRY.get_or_init(Mutex::default))
}

/// A new, registered, empty graph.
pub fn new_graph() -> &'static Graph {
    let graph: &'static Graph = Box::leak(Box::default());
    registry().graphs.insert(graph as *const Graph as usize);
    graph
}

fn graph(handle: *mut c_void) -> Result<&'static Graph, CUresult> {
    if !registry().graphs.contains(&(handle as usize)) {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: registered graph handles are leaked `Graph` boxes.
    Ok(unsafe { &*(handle as *const Graph) })
}

fn node(handle: *mut c_void) -> Result<&'static Node, CUresult> {
    if !registry().nodes.contains(&(handle as usize)) {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: registered node handles are leaked `Node` boxes.
    Ok(unsafe { &*(handle as *const Node) })
}

fn exec(handle: *mut c_void) -> Result<&'static Exec, CUresult> {
    if !registry().execs.contains(&(handle as usize)) {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: registered exec handles are leaked `Exec` boxes.
    Ok(unsafe { &*(handle as *const Exec) })
}

fn add_node(graph: &'static Graph, kind: NodeKind) -> &'static Node {
    let node: &'static Node = Box::leak(Box::new(Node { kind }));
    registry().nodes.insert(node as *const Node as usize);
    lock(&graph.nodes).push(node);
    node
}

/// Records a kernel launched on a capturing stream into its capture graph.
pub fn capture_kernel(
    graph: &'static Graph,
    function: usize,
    grid: [c_uint; 3],
    block: [c_uint; 3],
) {
    add_node(
        graph,
        NodeKind::Kernel {
            function,
            grid,
            block,
        },
    );
}

/// A deep copy of `graph` (what a child graph node holds).
fn clone_graph(graph: &Graph) -> &'static Graph {
    let copy = new_graph();
    for node in lock(&graph.nodes).iter() {
        let kind = match &node.kind {
            NodeKind::Child(child) => NodeKind::Child(clone_graph(child)),
            other => other.clone(),
        };
        add_node(copy, kind);
    }
    copy
}

/// The kernels a launch of `graph` runs, child graphs flattened in.
fn kernels(graph: &Graph, into: &mut Vec<([c_uint; 3], [c_uint; 3])>) {
    for node in lock(&graph.nodes).iter() {
        match &node.kind {
            NodeKind::Kernel { grid, block, .. } => into.push((*grid, *block)),
            NodeKind::Child(child) => kernels(child, into),
            NodeKind::Empty => {}
        }
    }
}

/// `CUDA_KERNEL_NODE_PARAMS_v2`.
#[repr(C)]
pub struct KernelNodeParams {
    pub function: *mut c_void,
    pub grid: [c_uint; 3],
    pub block: [c_uint; 3],
    pub shared_bytes: c_uint,
    pub kernel_params: *mut *mut c_void,
    pub extra: *mut *mut c_void,
    pub kernel: *mut c_void,
    pub context: *mut c_void,
}

fn check_dependencies(dependencies: *const *mut c_void, count: usize) -> Result<(), CUresult> {
    if count > 0 && dependencies.is_null() {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    for index in 0..count {
        // SAFETY: a non-null dependency array holds `count` node handles per the API.
        node(unsafe { dependencies.add(index).read() })?;
    }
    Ok(())
}

fn new_node(
    out: *mut *mut c_void,
    graph_handle: *mut c_void,
    dependencies: *const *mut c_void,
    dependency_count: usize,
    kind: impl FnOnce() -> Result<NodeKind, CUresult>,
) -> CUresult {
    guarded(|| {
        status((|| {
            mock().ready()?;
            if out.is_null() {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let graph = graph(graph_handle)?;
            check_dependencies(dependencies, dependency_count)?;
            let node = add_node(graph, kind()?);
            write(out, node as *const Node as *mut c_void)
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphCreate(out: *mut *mut c_void, flags: c_uint) -> CUresult {
    guarded(|| {
        status((|| {
            mock().ready()?;
            if flags != 0 {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            write(out, new_graph() as *const Graph as *mut c_void)
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphDestroy(graph_handle: *mut c_void) -> CUresult {
    guarded(|| {
        status((|| {
            graph(graph_handle)?;
            registry().graphs.remove(&(graph_handle as usize));
            Ok(())
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphAddKernelNode_v2(
    out: *mut *mut c_void,
    graph_handle: *mut c_void,
    dependencies: *const *mut c_void,
    dependency_count: usize,
    params: *const KernelNodeParams,
) -> CUresult {
    new_node(out, graph_handle, dependencies, dependency_count, || {
        if params.is_null() {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: a non-null params points at a CUDA_KERNEL_NODE_PARAMS_v2 per the API.
        let params = unsafe { &*params };
        if params.function.is_null() && params.kernel.is_null() {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        if params.grid.contains(&0) || params.block.contains(&0) {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        Ok(NodeKind::Kernel {
            function: params.function as usize,
            grid: params.grid,
            block: params.block,
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphAddEmptyNode(
    out: *mut *mut c_void,
    graph_handle: *mut c_void,
    dependencies: *const *mut c_void,
    dependency_count: usize,
) -> CUresult {
    new_node(out, graph_handle, dependencies, dependency_count, || {
        Ok(NodeKind::Empty)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphAddChildGraphNode(
    out: *mut *mut c_void,
    graph_handle: *mut c_void,
    dependencies: *const *mut c_void,
    dependency_count: usize,
    child: *mut c_void,
) -> CUresult {
    new_node(out, graph_handle, dependencies, dependency_count, || {
        Ok(NodeKind::Child(clone_graph(graph(child)?)))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphGetNodes(
    graph_handle: *mut c_void,
    nodes: *mut *mut c_void,
    count: *mut usize,
) -> CUresult {
    guarded(|| {
        status((|| {
            let graph = graph(graph_handle)?;
            if count.is_null() {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let all = lock(&graph.nodes);
            if nodes.is_null() {
                return write(count, all.len());
            }
            // SAFETY: count is non-null (checked above) and holds the caller's array length.
            let room = unsafe { count.read() };
            for index in 0..room {
                let handle = all.get(index).map_or(std::ptr::null_mut(), |node| {
                    *node as *const Node as *mut c_void
                });
                // SAFETY: the caller's array holds `room` node handles.
                unsafe { nodes.add(index).write(handle) };
            }
            write(count, room.min(all.len()))
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphNodeGetType(
    node_handle: *mut c_void,
    kind: *mut c_int,
) -> CUresult {
    guarded(|| {
        status((|| {
            let node = node(node_handle)?;
            write(
                kind,
                match node.kind {
                    NodeKind::Kernel { .. } => NODE_KERNEL,
                    NodeKind::Child(_) => NODE_CHILD_GRAPH,
                    NodeKind::Empty => NODE_EMPTY,
                },
            )
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphKernelNodeGetParams_v2(
    node_handle: *mut c_void,
    params: *mut KernelNodeParams,
) -> CUresult {
    guarded(|| {
        status((|| {
            let NodeKind::Kernel {
                function,
                grid,
                block,
            } = node(node_handle)?.kind
            else {
                return Err(CUDA_ERROR_INVALID_VALUE);
            };
            write(
                params,
                KernelNodeParams {
                    function: function as *mut c_void,
                    grid,
                    block,
                    shared_bytes: 0,
                    kernel_params: std::ptr::null_mut(),
                    extra: std::ptr::null_mut(),
                    kernel: std::ptr::null_mut(),
                    context: std::ptr::null_mut(),
                },
            )
        })())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphChildGraphNodeGetGraph(
    node_handle: *mut c_void,
    out: *mut *mut c_void,
) -> CUresult {
    guarded(|| {
        status((|| {
            let NodeKind::Child(child) = node(node_handle)?.kind else {
                return Err(CUDA_ERROR_INVALID_VALUE);
            };
            write(out, child as *const Graph as *mut c_void)
        })())
    })
}

fn instantiate(out: *mut *mut c_void, graph_handle: *mut c_void) -> Result<(), CUresult> {
    mock().current_device()?;
    if out.is_null() {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    let mut flat = Vec::new();
    kernels(graph(graph_handle)?, &mut flat);
    let exec: &'static Exec = Box::leak(Box::new(Exec {
        kernels: Mutex::new(flat),
    }));
    registry().execs.insert(exec as *const Exec as usize);
    write(out, exec as *const Exec as *mut c_void)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    out: *mut *mut c_void,
    graph_handle: *mut c_void,
    flags: u64,
) -> CUresult {
    guarded(|| {
        if flags & !0xf != 0 {
            return CUDA_ERROR_INVALID_VALUE;
        }
        status(instantiate(out, graph_handle))
    })
}

/// `CUDA_GRAPH_INSTANTIATE_PARAMS`.
#[repr(C)]
pub struct InstantiateParams {
    pub flags: u64,
    pub upload_stream: *mut c_void,
    pub error_node: *mut c_void,
    pub result: c_int,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiateWithParams(
    out: *mut *mut c_void,
    graph_handle: *mut c_void,
    params: *mut InstantiateParams,
) -> CUresult {
    guarded(|| {
        if params.is_null() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let result = status(instantiate(out, graph_handle));
        // SAFETY: params is non-null and points at the caller's CUDA_GRAPH_INSTANTIATE_PARAMS.
        unsafe {
            (*params).result = if result == CUDA_SUCCESS { 0 } else { 1 };
            (*params).error_node = std::ptr::null_mut();
        }
        result
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiateWithParams_ptsz(
    out: *mut *mut c_void,
    graph_handle: *mut c_void,
    params: *mut InstantiateParams,
) -> CUresult {
    // SAFETY: the same contract as this export.
    unsafe { cuGraphInstantiateWithParams(out, graph_handle, params) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphExecDestroy(exec_handle: *mut c_void) -> CUresult {
    guarded(|| {
        status((|| {
            exec(exec_handle)?;
            registry().execs.remove(&(exec_handle as usize));
            Ok(())
        })())
    })
}

/// `CUgraphExecUpdateResultInfo`.
#[repr(C)]
pub struct ExecUpdateResultInfo {
    pub result: c_int,
    pub error_node: *mut c_void,
    pub error_from_node: *mut c_void,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphExecUpdate_v2(
    exec_handle: *mut c_void,
    graph_handle: *mut c_void,
    info: *mut ExecUpdateResultInfo,
) -> CUresult {
    guarded(|| {
        status((|| {
            let exec = exec(exec_handle)?;
            let graph = graph(graph_handle)?;
            if info.is_null() {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let mut flat = Vec::new();
            kernels(graph, &mut flat);
            *lock(&exec.kernels) = flat;
            write(
                info,
                ExecUpdateResultInfo {
                    result: 0,
                    error_node: std::ptr::null_mut(),
                    error_from_node: std::ptr::null_mut(),
                },
            )
        })())
    })
}

/// Simulated nanoseconds one launch of `exec_handle` keeps the GPU busy.
pub fn launch_duration_ns(
    exec_handle: *mut c_void,
    ns_per_kilothread: u64,
) -> Result<u64, CUresult> {
    let exec = exec(exec_handle)?;
    Ok(lock(&exec.kernels)
        .iter()
        .map(|(grid, block)| kernel_duration_ns(kernel_threads(*grid, *block), ns_per_kilothread))
        .sum())
}
