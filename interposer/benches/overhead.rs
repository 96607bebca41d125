//! Added cost of the interposer per intercepted call, against calling the mock driver directly:
//! `cuLaunchKernel` under the limit (the token bucket admits every launch) and
//! `cuMemAlloc_v2` + `cuMemFree_v2` (reservation in the shared usage file, allocation table).
//!
//! Both libraries are loaded with `dlopen` into this process; the interposer forwards to the
//! same mock instance (`TF_CUDA_DRIVER_PATH`), so "direct" and "interposed" do identical work in
//! the mock. After the criterion groups a fixed-count loop prints the ratios from one run.

#[path = "../tests/support/mod.rs"]
mod support;

use std::ffi::{CString, c_int, c_uint, c_void};
use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};

type Launch = unsafe extern "C" fn(
    *mut c_void,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut c_void,
    *mut *mut c_void,
    *mut *mut c_void,
) -> c_uint;
type Alloc = unsafe extern "C" fn(*mut u64, usize) -> c_uint;
type Free = unsafe extern "C" fn(u64) -> c_uint;
type Init = unsafe extern "C" fn(c_uint) -> c_uint;

#[derive(Clone, Copy)]
struct Driver {
    launch: Launch,
    alloc: Alloc,
    free: Free,
}

fn open(path: &std::path::Path) -> *mut c_void {
    let path = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in path");
    // SAFETY: dlopen with a NUL-terminated path.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen {path:?} failed");
    handle
}

fn symbol<F: Copy>(handle: *mut c_void, name: &str) -> F {
    let name = CString::new(name).expect("no NUL in name");
    // SAFETY: dlsym on a live handle with a NUL-terminated name.
    let pointer = unsafe { libc::dlsym(handle, name.as_ptr()) };
    assert!(!pointer.is_null(), "{name:?} not found");
    // SAFETY: the caller names F as the C signature of the symbol.
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&pointer) }
}

fn driver(handle: *mut c_void) -> Driver {
    Driver {
        launch: symbol(handle, "cuLaunchKernel"),
        alloc: symbol(handle, "cuMemAlloc_v2"),
        free: symbol(handle, "cuMemFree_v2"),
    }
}

fn launch(driver: Driver) {
    // SAFETY: the mock accepts any non-null function handle; the other arguments are valid.
    let result = unsafe {
        (driver.launch)(
            0x1000 as *mut c_void,
            black_box(64),
            1,
            1,
            black_box(128),
            1,
            1,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(result, 0);
}

fn alloc_free(driver: Driver) {
    let mut pointer = 0_u64;
    // SAFETY: valid out-pointer; the pointer is freed right after.
    unsafe {
        assert_eq!((driver.alloc)(&mut pointer, black_box(1 << 20)), 0);
        assert_eq!((driver.free)(pointer), 0);
    }
}

struct Setup {
    direct: Driver,
    interposed: Driver,
    _pod: tempfile::TempDir,
}

fn setup() -> Setup {
    let fixtures = support::release_fixtures();
    let pod = tempfile::tempdir().expect("pod directory");
    // A one-GPU container (the common case: the launch path then needs no device lookup),
    // with a refill rate no launch loop can exhaust: every launch is under the limit.
    std::fs::write(
        pod.path().join("bench.limits"),
        format!(
            "version=1\ngpu_uuids={}\nvram_limit=1099511627776\ntflops_limit=1000\nrefill_rate=1e18\n",
            support::mock_uuid(0)
        ),
    )
    .expect("limits file");
    for (key, value) in [
        (
            "TF_CUDA_DRIVER_PATH",
            fixtures.mock_cuda.display().to_string(),
        ),
        ("TF_POD_DIR", pod.path().display().to_string()),
        ("TF_CONTAINER_NAME", "bench".to_owned()),
        ("TF_LOG_LEVEL", "warn".to_owned()),
    ] {
        // SAFETY: set before any thread that reads the environment exists.
        unsafe { std::env::set_var(key, value) };
    }

    let mock = open(&fixtures.mock_cuda);
    let interposer = open(&fixtures.interposer);
    let init: Init = symbol(interposer, "cuInit");
    // SAFETY: cuInit(0) through the interposer (it initialises the mock too).
    assert_eq!(unsafe { init(0) }, 0);
    let retain: unsafe extern "C" fn(*mut *mut c_void, c_int) -> c_uint =
        symbol(mock, "cuDevicePrimaryCtxRetain");
    let set_current: unsafe extern "C" fn(*mut c_void) -> c_uint = symbol(mock, "cuCtxSetCurrent");
    let mut context = std::ptr::null_mut();
    // SAFETY: valid out-pointer and device 0 of the mock.
    unsafe {
        assert_eq!(retain(&mut context, 0), 0);
        assert_eq!(set_current(context), 0);
    }
    Setup {
        direct: driver(mock),
        interposed: driver(interposer),
        _pod: pod,
    }
}

fn per_call_ns(iterations: u32, mut call: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iterations {
        call();
    }
    start.elapsed().as_nanos() as f64 / f64::from(iterations)
}

fn overhead(criterion: &mut Criterion) {
    let setup = setup();
    let mut group = criterion.benchmark_group("cuLaunchKernel");
    group.bench_function("direct", |bench| bench.iter(|| launch(setup.direct)));
    group.bench_function("interposed", |bench| {
        bench.iter(|| launch(setup.interposed))
    });
    group.finish();

    let mut group = criterion.benchmark_group("cuMemAlloc_v2+cuMemFree_v2");
    group.bench_function("direct", |bench| bench.iter(|| alloc_free(setup.direct)));
    group.bench_function("interposed", |bench| {
        bench.iter(|| alloc_free(setup.interposed))
    });
    group.finish();

    // One run, same process, interleaved: the numbers docs/benchmarks.md quotes.
    let (mut launch_direct, mut launch_interposed) = (f64::MAX, f64::MAX);
    let (mut alloc_direct, mut alloc_interposed) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        launch_direct = launch_direct.min(per_call_ns(1_000_000, || launch(setup.direct)));
        launch_interposed =
            launch_interposed.min(per_call_ns(1_000_000, || launch(setup.interposed)));
        alloc_direct = alloc_direct.min(per_call_ns(100_000, || alloc_free(setup.direct)));
        alloc_interposed =
            alloc_interposed.min(per_call_ns(100_000, || alloc_free(setup.interposed)));
    }
    println!(
        "summary cuLaunchKernel: direct {launch_direct:.1} ns, interposed {launch_interposed:.1} ns, \
         added {:.1} ns, ratio {:.2}",
        launch_interposed - launch_direct,
        launch_interposed / launch_direct
    );
    println!(
        "summary cuMemAlloc_v2+cuMemFree_v2: direct {alloc_direct:.1} ns, interposed \
         {alloc_interposed:.1} ns, added {:.1} ns, ratio {:.2}",
        alloc_interposed - alloc_direct,
        alloc_interposed / alloc_direct
    );
}

criterion_group!(benches, overhead);
criterion_main!(benches);
