//! CUDA graphs: a graph launch costs the threads of all its kernels (child graphs included), as
//! taken when it was instantiated or updated, on every path to the driver; launches that a
//! stream capture only records take no tokens and do not run.

mod support;

use support::Pod;
use tensor_fusion_interposer_core::shm::UsageFile;

/// Simulated nanoseconds of a kernel of `threads` threads at the mock's default speed.
fn kernel_ns(threads: u64) -> u64 {
    tensor_fusion_mock_gpu_sim::kernel_duration_ns(
        threads,
        tensor_fusion_mock_gpu_sim::DEFAULT_NS_PER_KILOTHREAD,
    )
}

/// A container whose bucket no test here can empty: launch costs are counted, never waited for.
fn pod() -> Pod {
    Pod::with_limits("tflops_limit=1000\nrefill_rate=1e15\n")
}

#[test]
fn a_graph_launch_costs_its_kernels_on_every_path() {
    for via in ["exports", "dlsym", "procaddr:12080:0", "procaddr:12080:2"] {
        let pod = pod();
        let report = pod.run(via, &["init", "ctx:0", "graph:5:8:128", "mock"]);
        assert_eq!(
            report.number("graph:5:8:128", "result"),
            0,
            "{via}: {report:?}"
        );
        let stats = UsageFile::attach(&pod.usage_path())
            .unwrap()
            .launch_stats(0);
        assert_eq!(stats.launches, 5, "{via}");
        assert_eq!(
            stats.launched_units,
            5 * 8 * 128,
            "{via}: grid x block per launch"
        );
        assert_eq!(report.number("mock", "launches"), 5, "{via}");
        assert_eq!(
            report.number("mock", "busy_ns"),
            5 * kernel_ns(8 * 128),
            "{via}"
        );
    }
}

#[test]
fn captured_launches_take_no_tokens_and_their_graph_costs_them_all() {
    let pod = pod();
    let report = pod.run(
        "procaddr:12080:0",
        &[
            "init",
            "ctx:0",
            "stream",
            "capturegraph:4:16:64:3",
            "launch:2:1:32",
            "mock",
        ],
    );
    assert_eq!(
        report.get("capturegraph:4:16:64:3", "steps"),
        "begin=0,captured=0,end=0,instantiate=0,launch=0"
    );
    let stats = UsageFile::attach(&pod.usage_path())
        .unwrap()
        .launch_stats(0);
    assert_eq!(
        stats.launches, 6,
        "four graph launches and two plain launches; the three captured ones only recorded"
    );
    assert_eq!(stats.launched_units, 4 * 3 * 16 * 64 + 2 * 32);
    assert_eq!(report.number("mock", "launches"), 6);
    assert_eq!(
        report.number("mock", "busy_ns"),
        4 * 3 * kernel_ns(16 * 64) + 2 * kernel_ns(32),
        "the captured kernels ran only inside the graph"
    );
}

#[test]
fn child_graphs_count_and_other_nodes_cost_nothing() {
    let pod = pod();
    let report = pod.run("exports", &["init", "ctx:0", "nestedgraph:3"]);
    assert_eq!(report.number("nestedgraph:3", "result"), 0, "{report:?}");
    let stats = UsageFile::attach(&pod.usage_path())
        .unwrap()
        .launch_stats(0);
    assert_eq!(stats.launched_units, 3 * (4 * 64 + 8 * 32 + 2 * 32));
}

#[test]
fn an_updated_graph_costs_its_new_kernels() {
    let pod = pod();
    let report = pod.run("procaddr:12080:0", &["init", "ctx:0", "updategraph:10:20"]);
    assert_eq!(
        report.get("updategraph:10:20", "steps"),
        "create=0,kernel=0,instantiate=0,create=0,kernel=0,update=0,launch=0,destroy=0"
    );
    let stats = UsageFile::attach(&pod.usage_path())
        .unwrap()
        .launch_stats(0);
    assert_eq!(stats.launched_units, 20, "the graph after the update");
}
