//! Real processes under `LD_PRELOAD` reaching the (mock) driver every way CUDA programs do:
//! exported symbols, `dlopen` + `dlsym`, and `cuGetProcAddress(_v2)` as the CUDA runtime uses
//! it. Each path must see the container's slice: only the assigned GPU, the limit as total
//! memory, out-of-memory past it.

mod support;

use support::{Pod, Report, mock_uuid};

const MIB: u64 = 1 << 20;

/// A container assigned mock GPU 1 (of 0 and 1) with a 64 MiB limit.
fn pod() -> Pod {
    Pod::with_limits(&format!(
        "gpu_uuids={}\nvram_limit={}\n",
        mock_uuid(1),
        64 * MIB
    ))
}

const SESSION: &[&str] = &[
    "init",
    "count",
    "uuid:0",
    "device:1",
    "ctx:0",
    "meminfo",
    "totalmem:0",
    "alloc:67108865",
    "alloc:50331648",
    "meminfo",
    "alloc:33554432",
    "freeall",
    "meminfo",
    "mock",
];

fn check_session(via: &str) {
    let report = pod().run(via, SESSION);
    assert_eq!(report.number("init", "result"), 0);
    assert_eq!(report.number("count", "value"), 1, "only the assigned GPU");
    assert_eq!(report.get("uuid:0", "value"), mock_uuid(1));
    assert_eq!(
        report.number("device:1", "result"),
        101,
        "CUDA_ERROR_INVALID_DEVICE"
    );
    assert_eq!(
        report.number("ctx:0", "device"),
        1,
        "ordinal 0 is real device 1"
    );
    assert_eq!(report.number("totalmem:0", "value"), 64 * MIB);

    let meminfo: Vec<(u64, u64)> = report
        .stdout
        .lines()
        .filter(|line| line.starts_with("meminfo "))
        .map(|line| {
            let field = |key: &str| {
                line.split(' ')
                    .find_map(|field| field.strip_prefix(key))
                    .and_then(|value| value.parse().ok())
                    .expect("meminfo field")
            };
            (field("free="), field("total="))
        })
        .collect();
    assert_eq!(
        meminfo,
        vec![
            (64 * MIB, 64 * MIB),
            (16 * MIB, 64 * MIB),
            (64 * MIB, 64 * MIB)
        ]
    );
    assert_eq!(
        report.number("alloc:67108865", "result"),
        2,
        "CUDA_ERROR_OUT_OF_MEMORY"
    );
    assert_eq!(
        report.get("alloc:67108865", "ptr"),
        "0x0",
        "nothing allocated"
    );
    assert_eq!(report.number("alloc:50331648", "result"), 0);
    assert_eq!(report.number("alloc:33554432", "result"), 2);
    assert_eq!(report.get("freeall", "results"), "0");
    assert_eq!(report.number("mock", "used"), 0);
    assert_eq!(
        report.number("mock", "peak"),
        48 * MIB,
        "the mock never held more"
    );
    assert!(
        report.stderr.contains("allocation refused"),
        "refusals are logged: {}",
        report.stderr
    );
}

#[test]
fn exported_symbols_see_the_slice() {
    check_session("exports");
}

#[test]
fn dlopen_and_dlsym_see_the_slice() {
    check_session("dlsym");
}

#[test]
fn cuda_runtime_style_get_proc_address_sees_the_slice() {
    check_session("procaddr:12080:0");
}

#[test]
fn legacy_get_proc_address_sees_the_slice() {
    check_session("procaddr1:11040:0");
}

#[test]
fn per_thread_default_stream_lookups_get_the_ptsz_hooks() {
    let pod = Pod::with_limits(&format!("vram_limit={}\ntflops_limit=10\n", 64 * MIB));
    let report = pod.run(
        "procaddr:12080:2",
        &[
            "init",
            "ctx:0",
            "launch:5:8:128",
            "launchex:2:8:128",
            "coop:1:8:128",
            "graph:1:1:1",
            "mock",
        ],
    );
    assert_eq!(report.number("launch:5:8:128", "result"), 0);
    assert_eq!(report.number("mock", "launches"), 9);
    assert_eq!(
        report.number("mock", "ptsz_launches"),
        9,
        "every launch went to a _ptsz variant"
    );
    let usage = tensor_fusion_interposer_core::shm::UsageFile::attach(&pod.usage_path()).unwrap();
    let stats = usage.launch_stats(0);
    assert_eq!(
        stats.launches, 9,
        "every launch door went through the limiter"
    );
    assert_eq!(
        stats.launched_units,
        8 * 8 * 128 + 1,
        "kernels cost grid x block threads, the graph its one 1 x 1 kernel"
    );
}

#[test]
fn every_allocation_door_is_counted_and_frees_return_it() {
    let pod = Pod::with_limits(&format!("vram_limit={}\n", 4 * MIB));
    let report = pod.run(
        "procaddr:12080:0",
        &[
            "init",
            "ctx:0",
            "pitch:1000:1024",
            "meminfo",
            "managed:3145728",
            "async:3145728",
            "vmm:3145728",
            "vmmhost:8388608",
            "meminfo",
            "release",
            "freeforeign",
            "freeall",
            "meminfo",
            "mock",
        ],
    );
    // 1000 bytes rounded to a 1024-byte pitch x 1024 rows: 1 MiB charged, 3 MiB left.
    assert_eq!(report.number("pitch:1000:1024", "pitch"), 1024);
    let fields = report.fields("meminfo");
    assert_eq!(fields["free"], (3 * MIB).to_string());
    assert_eq!(report.number("managed:3145728", "result"), 0);
    assert_eq!(
        report.number("async:3145728", "result"),
        2,
        "over the limit"
    );
    assert_eq!(report.number("vmm:3145728", "result"), 2, "over the limit");
    assert_eq!(
        report.number("vmmhost:8388608", "result"),
        0,
        "host locations are not device memory"
    );
    assert_eq!(report.get("release", "results"), "0");
    assert_eq!(
        report.number("freeforeign", "result"),
        1,
        "a pointer the interposer did not hand out gets the driver's own answer"
    );
    assert_eq!(report.get("freeall", "results"), "0,0");
    assert_eq!(report.number("mock", "used"), 0);
    let last_meminfo = report
        .stdout
        .lines()
        .rfind(|line| line.starts_with("meminfo "))
        .unwrap()
        .to_owned();
    assert!(
        last_meminfo.contains(&format!("free={}", 4 * MIB)),
        "{last_meminfo}"
    );
}

#[test]
fn async_and_vmm_allocations_inside_the_limit_are_charged_and_returned() {
    let pod = Pod::with_limits(&format!("vram_limit={}\n", 4 * MIB));
    let report = pod.run(
        "dlsym",
        &[
            "init",
            "ctx:0",
            "async:3145728",
            "vmm:3145728",
            "meminfo",
            "release",
            "meminfo",
        ],
    );
    assert_eq!(report.get("async:3145728", "freed"), "0");
    assert_eq!(report.number("vmm:3145728", "result"), 0);
    let frees: Vec<&str> = report
        .stdout
        .lines()
        .filter(|line| line.starts_with("meminfo "))
        .collect();
    assert!(frees[0].contains(&format!("free={}", MIB)), "{frees:?}");
    assert!(frees[1].contains(&format!("free={}", 4 * MIB)), "{frees:?}");
}

#[test]
fn nvml_shows_the_slice_like_nvidia_smi_would() {
    let pod = pod();
    let holder = pod.spawn_holding("exports", &["init", "ctx:0", "alloc:16777216"]);
    let report = pod.run("exports", &["nvml"]);
    holder.release();
    let fields = report.fields("nvml");
    assert_eq!(fields["count"], "1");
    assert_eq!(fields["mem0_result"], "0");
    assert_eq!(fields["total0"], (64 * MIB).to_string());
    assert_eq!(
        fields["used0"],
        (16 * MIB).to_string(),
        "usage of the other process"
    );
    assert_eq!(fields["free0"], (48 * MIB).to_string());
}

#[test]
fn no_limits_means_no_cuda_unless_switched_off() {
    let report = Pod::unlimited().run("exports", &["init"]);
    assert_eq!(
        report.number("init", "result"),
        800,
        "CUDA_ERROR_NOT_PERMITTED"
    );
    assert!(
        report.stderr.contains(
            "refusing CUDA: the node agent has not assigned this container a GPU (no limits file"
        ),
        "{}",
        report.stderr
    );
    let report = Pod::unlimited().outside_a_pod().run("exports", &["init"]);
    assert_eq!(report.number("init", "result"), 800);
    assert!(
        report.stderr.contains(
            "refusing CUDA: nothing says what this process may use (TF_POD_DIR is not set"
        ),
        "{}",
        report.stderr
    );

    let report = Pod::unlimited()
        .env("TF_INTERPOSER_ALLOW_UNLIMITED", "1")
        .run("exports", &["init", "count", "ctx:0", "meminfo"]);
    assert_eq!(report.number("init", "result"), 0);
    assert_eq!(report.number("count", "value"), 2);
    assert_eq!(report.number("meminfo", "total"), 16 << 30);
}

#[test]
fn limits_from_the_environment_alone_apply_outside_a_pod() {
    let report = Pod::unlimited()
        .outside_a_pod()
        .env("TF_VRAM_LIMIT", "1048576")
        .env("TF_GPU_COUNT", "1")
        .run(
            "exports",
            &["init", "count", "ctx:0", "meminfo", "alloc:1048577"],
        );
    assert_eq!(report.number("count", "value"), 1);
    assert_eq!(report.number("meminfo", "total"), MIB);
    assert_eq!(report.number("alloc:1048577", "result"), 2);
}

#[test]
fn an_assigned_gpu_missing_from_the_node_fails_init() {
    let pod =
        Pod::with_limits("gpu_uuids=GPU-00000000-0000-0000-0000-000000000000\nvram_limit=1\n");
    let report = pod.run("exports", &["init"]);
    assert_eq!(report.number("init", "result"), 100, "CUDA_ERROR_NO_DEVICE");
    assert!(
        report
            .stderr
            .contains("an assigned GPU is not on this node")
    );
}

#[test]
fn other_libraries_lookups_pass_through_untouched() {
    // The interposer's dlsym must not answer for names it does not hook, nor for handles that
    // are not the driver's: the probe's own lookups of tfMock* counters and NVML go through.
    let report = pod().run("dlsym", &["init", "ctx:0", "mock", "nvml"]);
    assert_eq!(report.number("mock", "launches"), 0);
    assert_eq!(report.get("nvml", "init"), "0");
}

#[test]
fn stream_ordered_allocations_are_charged_to_the_streams_device() {
    let pod = Pod::with_limits(&format!(
        "gpu_uuids={},{}\nvram_limit={}\n",
        mock_uuid(0),
        mock_uuid(1),
        4 * MIB
    ));
    let report = pod.run(
        "exports",
        &[
            "init",
            "ctx:1",
            "stream",
            // Another device's context is current; the stream belongs to device 1.
            "ctx:0",
            "asyncalloc:3145728",
            "meminfo",
            "ctx:1",
            "meminfo",
            "mock",
            "ctx:0",
            "asyncfreeall",
            "ctx:1",
            "meminfo",
        ],
    );
    assert_eq!(report.number("asyncalloc:3145728", "result"), 0);
    assert_eq!(
        report.all("meminfo", "free"),
        [
            (4 * MIB).to_string(),
            MIB.to_string(),
            (4 * MIB).to_string()
        ],
        "device 0 untouched, device 1 charged, then returned"
    );
    assert_eq!(report.number("mock", "used"), 3 * MIB, "on device 1");
    assert_eq!(report.get("asyncfreeall", "results"), "0");
}

/// What a program sees before `cuInit`, without a context and with bad arguments: the mock's
/// answers are the driver's, and the interposer passes them through unchanged.
const ERROR_SESSION: &[&str] = &[
    "count",
    "init",
    "meminfo",
    "alloc:1024",
    "ctx:0",
    "alloc:0",
    "freeforeign",
    "freenull",
];

fn check_error_codes(report: &support::Report) {
    assert_eq!(
        report.number("count", "result"),
        3,
        "CUDA_ERROR_NOT_INITIALIZED"
    );
    assert_eq!(report.number("init", "result"), 0);
    assert_eq!(
        report.number("meminfo", "result"),
        201,
        "CUDA_ERROR_INVALID_CONTEXT"
    );
    assert_eq!(report.number("alloc:1024", "result"), 201);
    assert_eq!(
        report.number("alloc:0", "result"),
        1,
        "CUDA_ERROR_INVALID_VALUE"
    );
    assert_eq!(report.number("freeforeign", "result"), 1);
    assert_eq!(
        report.number("freenull", "result"),
        0,
        "freeing NULL is a no-op"
    );
}

#[test]
fn the_mock_answers_errors_like_the_driver_and_the_interposer_keeps_them() {
    check_error_codes(&pod().run_without_interposer("exports", ERROR_SESSION));
    check_error_codes(&pod().run("procaddr:12080:0", ERROR_SESSION));
}

/// Every kind of call a program makes after `cuInit`, and `cuInit` again.
const AFTER_INIT: &[&str] = &[
    "init",
    "count",
    "device:0",
    "ctx:0",
    "meminfo",
    "totalmem:0",
    "alloc:1024",
    "launch:1:1:1",
    "stream",
    "init",
];

/// After `cuInit` refused with `code`, no path reaches a device: `cuInit` repeats the refusal,
/// every hooked call says `CUDA_ERROR_NOT_INITIALIZED`, and so does the driver itself for calls
/// the interposer forwards (`cuStreamCreate`) unless the refusal came after the driver was
/// initialised (then it has no context: `CUDA_ERROR_INVALID_CONTEXT`).
fn check_refused(pod: &Pod, vias: &[&str], code: u64, driver_initialised: bool, logged: &str) {
    for via in vias {
        let report = pod.run(via, AFTER_INIT);
        assert_eq!(
            report.all("init", "result"),
            [code.to_string(), code.to_string()],
            "{via}: {report:?}"
        );
        for op in [
            "count",
            "device:0",
            "ctx:0",
            "meminfo",
            "totalmem:0",
            "alloc:1024",
            "launch:1:1:1",
        ] {
            assert_eq!(
                report.number(op, "result"),
                3,
                "{via} {op}: CUDA_ERROR_NOT_INITIALIZED\n{report:?}"
            );
        }
        assert_eq!(
            report.get("count", "value"),
            "-1",
            "{via}: the probe's initial value, not written"
        );
        assert_eq!(
            report.number("stream", "result"),
            if driver_initialised { 201 } else { 3 },
            "{via}: a forwarded call"
        );
        assert!(report.stderr.contains(logged), "{via}: {}", report.stderr);
    }
}

const ALL_PATHS: &[&str] = &["exports", "dlsym", "procaddr:12080:0", "procaddr1:11040:0"];

#[test]
fn no_limits_fail_every_later_call_on_every_path() {
    check_refused(
        &Pod::unlimited(),
        ALL_PATHS,
        800,
        false,
        "refusing CUDA: the node agent has not assigned this container a GPU (no limits file",
    );
}

#[test]
fn a_limits_file_with_only_unknown_keys_says_so() {
    check_refused(
        &Pod::with_file("version=1\nfuture_key=1\n"),
        &["exports"],
        800,
        false,
        "main.limits sets neither vram_limit nor tflops_limit, and neither TF_VRAM_LIMIT nor \
         TF_TFLOPS_LIMIT is set",
    );
}

#[test]
fn malformed_limits_fail_every_later_call() {
    let cases = [
        (
            "version=2\nvram_limit=1\n",
            "unsupported limits file version",
        ),
        ("vram_limit=1\n", "missing version line in limits file"),
        ("version=1\nvram_limit=1e9\n", "vram_limit = \"1e9\""),
        ("version=1\nvram_limit=-5\n", "vram_limit = \"-5\""),
        (
            "version=1\nvram_limit=99999999999999999999\n",
            "vram_limit = \"99999999999999999999\"",
        ),
        (
            "version=1\nvram_limit=18446744073709551615\n",
            "vram_limit = \"18446744073709551615\" (a whole number of bytes, at most",
        ),
        (
            "version=1\ntflops_limit=0\n",
            "tflops_limit = \"0\" (a positive decimal number)",
        ),
        (
            "version=1\nvram_limit=1\nvram_limit=2\n",
            "line 3: vram_limit (first set on line 2)",
        ),
        (
            "version=1\nvram_limit 1\n",
            "malformed line 2 in limits file",
        ),
    ];
    for (file, logged) in cases {
        let vias: &[&str] = if file.starts_with("version=2") {
            ALL_PATHS
        } else {
            &["exports"]
        };
        check_refused(&Pod::with_file(file), vias, 800, false, logged);
    }
}

#[test]
fn an_assigned_gpu_missing_from_the_node_fails_every_later_call() {
    let pod =
        Pod::with_limits("gpu_uuids=GPU-00000000-0000-0000-0000-000000000000\nvram_limit=1\n");
    check_refused(
        &pod,
        ALL_PATHS,
        100,
        true,
        "an assigned GPU is not on this node",
    );
}

#[test]
fn a_gpu_assigned_twice_is_refused() {
    let uuid = mock_uuid(1);
    let pod = Pod::with_limits(&format!("gpu_uuids={uuid},{uuid}\nvram_limit=1\n"));
    check_refused(
        &pod,
        &["exports"],
        800,
        false,
        &format!("gpu_uuids = \"{uuid},{uuid}\" ({uuid} is listed twice)"),
    );
}

#[test]
fn a_gpu_count_of_zero_is_no_device() {
    let pod = Pod::unlimited()
        .outside_a_pod()
        .env("TF_VRAM_LIMIT", "1048576")
        .env("TF_GPU_COUNT", "0");
    check_refused(
        &pod,
        &["exports", "procaddr:12080:0"],
        100,
        false,
        "gpu_count=0 refusing CUDA: TF_GPU_COUNT=0 gives this container no GPU",
    );
}

#[test]
fn a_program_probing_for_out_of_memory_logs_one_info_line() {
    let pod = Pod::with_limits(&format!("vram_limit={MIB}\n"));
    let mut ops = vec!["init", "ctx:0"];
    ops.extend(std::iter::repeat_n("alloc:2097152", 50));
    let report = pod.run("exports", &ops);
    assert_eq!(report.all("alloc:2097152", "result"), vec!["2"; 50]);
    let info_lines = report
        .stderr
        .lines()
        .filter(|line| line.contains(" INFO ") && line.contains("allocation refused"))
        .count();
    assert_eq!(info_lines, 1, "{}", report.stderr);
}

#[test]
fn a_process_that_starts_before_the_agent_wrote_its_limits_waits_for_them() {
    let pod = Pod::unlimited().env("TF_LIMITS_WAIT_SECONDS", "20");
    let child = pod
        .probe("exports", &["init", "ctx:0", "meminfo"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the probe");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The agent writes the file atomically: a temporary name, then a rename.
    let staged = pod.dir.path().join(".main.limits.tmp");
    std::fs::write(&staged, format!("version=1\nvram_limit={MIB}\n")).unwrap();
    std::fs::rename(&staged, pod.dir.path().join("main.limits")).unwrap();
    let report = Report::from_output(&child.wait_with_output().unwrap());
    assert_eq!(report.number("init", "result"), 0, "{report:?}");
    assert_eq!(report.number("meminfo", "total"), MIB);
}

#[test]
fn a_process_whose_limits_never_come_is_refused_after_the_wait() {
    let pod = Pod::unlimited()
        .env("TF_LIMITS_WAIT_SECONDS", "0.2")
        .env("TF_VRAM_LIMIT", "1048576");
    let started = std::time::Instant::now();
    let report = pod.run("exports", &["init"]);
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    assert_eq!(report.number("init", "result"), 800, "{report:?}");
    assert!(
        report
            .stderr
            .contains("waited_seconds=0.2 refusing CUDA: the node agent has not assigned"),
        "limits in the environment do not stand in for the agent's assignment: {}",
        report.stderr
    );
}
