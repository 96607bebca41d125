//! The `dlsym` hook: how the CUDA runtime, PyTorch and NCCL reach the driver without going
//! through exported symbols (`dlopen("libcuda.so.1")` + `dlsym(handle, "cuGetProcAddress_v2")`).
//!
//! The export `dlsym` is a small trampoline. It asks [`dlsym_lookup`] whether the call names a
//! hooked function on the handle of the real CUDA driver or NVML (exact names only); if so it
//! returns the hook, otherwise it jumps to the real `dlsym` with the caller's return address
//! still on the stack, so `RTLD_NEXT` lookups by other libraries resolve relative to *them*, as
//! if the interposer were not there. The real `dlsym` is found with `dlvsym(RTLD_NEXT, ..)`.

use std::ffi::{CStr, c_char, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::guard;

const RTLD_NEXT: *mut c_void = -1_isize as *mut c_void;

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

/// Address of the real `dlsym`; the trampoline jumps through it.
static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn no_dlsym(_handle: *mut c_void, _symbol: *const c_char) -> *mut c_void {
    std::ptr::null_mut()
}

fn real_dlsym() -> DlsymFn {
    let mut address = REAL_DLSYM.load(Ordering::Acquire);
    if address == 0 {
        address = resolve_real_dlsym();
        REAL_DLSYM.store(address, Ordering::Release);
    }
    // SAFETY: REAL_DLSYM only ever holds the address of a function with dlsym's signature
    // (glibc's dlsym or `no_dlsym`).
    unsafe { std::mem::transmute::<usize, DlsymFn>(address) }
}

/// Base address of the loaded object containing `address`.
fn object_base(address: usize) -> Option<usize> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads the loader's tables and writes `info`.
    let found = unsafe { libc::dladdr(address as *const c_void, &mut info) };
    (found != 0).then_some(info.dli_fbase as usize)
}

fn resolve_real_dlsym() -> usize {
    // The interposer's own base, through a function that is not exported (an exported name
    // could be bound to another object's definition).
    let own = object_base(resolve_real_dlsym as *const () as usize);
    // RTLD_NEXT when preloaded; RTLD_DEFAULT when loaded with dlopen (benchmarks), where the
    // global dlsym is libc's.
    for scope in [RTLD_NEXT, std::ptr::null_mut()] {
        for version in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"] {
            // SAFETY: dlvsym with constant NUL-terminated strings; it is not hooked.
            let found = unsafe { libc::dlvsym(scope, c"dlsym".as_ptr(), version.as_ptr()) };
            if !found.is_null() && object_base(found as usize) != own {
                return found as usize;
            }
        }
    }
    no_dlsym as *const () as usize
}

/// Looks `symbol` up in `handle` with the real `dlsym`, as a typed function pointer.
///
/// # Safety
/// `symbol` must end in NUL and `F` must be an `Option` of the function pointer type of the
/// symbol's C definition.
pub unsafe fn lookup_real<F: Copy>(handle: *mut c_void, symbol: &str) -> F {
    assert_eq!(
        std::mem::size_of::<F>(),
        std::mem::size_of::<*mut c_void>(),
        "lookup_real returns pointer-sized Option<fn>"
    );
    // SAFETY: handle comes from dlopen and the name ends in NUL (caller's contract).
    let address = unsafe { real_dlsym()(handle, symbol.as_ptr().cast()) };
    // SAFETY: a nullable pointer becomes Option<fn> (null = None), per the caller's contract.
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&address) }
}

/// `dlopen`s a library for the interposer's own use (lazy binding, local symbols).
pub fn open_library(path: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: dlopen with a NUL-terminated path.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns null or a NUL-terminated message owned by libc.
        let message = unsafe { libc::dlerror() };
        let reason = if message.is_null() {
            "unknown dlopen error".to_owned()
        } else {
            // SAFETY: non-null dlerror messages are NUL-terminated.
            unsafe { CStr::from_ptr(message) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(reason);
    }
    Ok(handle)
}

/// Decides what the `dlsym` trampoline does: a non-null result is returned to the caller as
/// the symbol, null means "jump to the real dlsym". Never unwinds.
extern "C" fn dlsym_lookup(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    // Resolve the real dlsym before the trampoline needs it.
    let _ = real_dlsym();
    if guard::inside() || handle.is_null() || handle == RTLD_NEXT || symbol.is_null() {
        return std::ptr::null_mut();
    }
    std::panic::catch_unwind(|| {
        // SAFETY: non-null names given to dlsym are NUL-terminated.
        let name = unsafe { CStr::from_ptr(symbol) }.to_bytes();
        let hook = if name.starts_with(b"cu") {
            crate::hooks::hook_address(name).filter(|_| {
                crate::cuda::real().is_some_and(|driver| driver.handle == handle as usize)
            })
        } else if name.starts_with(b"nvml") {
            crate::nvml::hook_address(name)
                .filter(|_| crate::nvml::real().is_some_and(|nvml| nvml.handle == handle as usize))
        } else {
            None
        };
        hook.map_or(std::ptr::null_mut(), |address| address as *mut c_void)
    })
    .unwrap_or(std::ptr::null_mut())
}

/// The exported `dlsym` (see the module docs). x86-64 System V: arguments in rdi/rsi, the
/// return address at [rsp]; the stack is realigned to 16 bytes around the call.
#[cfg(target_arch = "x86_64")]
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    core::arch::naked_asm!(
        "push rdi",
        "push rsi",
        "sub rsp, 8",
        "call {lookup}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "test rax, rax",
        "jz 2f",
        "ret",
        "2:",
        "jmp qword ptr [rip + {real}]",
        lookup = sym dlsym_lookup,
        real = sym REAL_DLSYM,
    )
}

/// The exported `dlsym` on other architectures: the same decision, but the real `dlsym` is
/// called from here, so an `RTLD_NEXT` lookup by another library resolves relative to the
/// interposer (a documented limitation).
#[cfg(not(target_arch = "x86_64"))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    let hook = dlsym_lookup(handle, symbol);
    if !hook.is_null() {
        return hook;
    }
    // SAFETY: forwarding the caller's arguments to the real dlsym.
    unsafe { real_dlsym()(handle, symbol) }
}
