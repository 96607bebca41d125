//! The FFI edge: every export runs its body through [`hooked`], which keeps the interposer's own
//! calls (and a driver that calls its own exports) out of the hooks with a thread-local flag, and
//! turns a panic into an error code instead of unwinding into C.

use std::cell::Cell;

use crate::log::log;

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is already inside a hook.
pub fn inside() -> bool {
    INSIDE.with(Cell::get)
}

/// Marks this thread as inside the interposer until dropped.
pub struct Inside {
    was_inside: bool,
}

impl Inside {
    pub fn enter() -> Self {
        Self {
            was_inside: INSIDE.with(|inside| inside.replace(true)),
        }
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|inside| inside.set(self.was_inside));
    }
}

/// Runs `hook` unless this thread is already inside the interposer, in which case it runs
/// `passthrough` (the real function). A panic in `hook` is logged and becomes `on_panic`.
pub fn hooked<R: Copy>(
    name: &str,
    on_panic: R,
    hook: impl FnOnce() -> R,
    passthrough: impl FnOnce() -> R,
) -> R {
    // One thread-local access checks and sets the flag (an export is called for every launch).
    if INSIDE.with(|inside| inside.replace(true)) {
        return passthrough();
    }
    let _inside = Inside { was_inside: false };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook)) {
        Ok(result) => result,
        Err(_) => {
            log!(
                Error,
                "function={name} internal error in hook; returning an error"
            );
            on_panic
        }
    }
}
