//! Logging to stderr, filtered by `TF_LOG_LEVEL` (`error`, `warn`, `info` (default), `debug`,
//! `trace`; in a filter list such as `tensor_fusion=debug,warn` the first bare level or the
//! `tensor_fusion*` directive wins).
//!
//! The interposer runs inside someone else's process and hot loops, so this is a few lines of
//! code with no subscriber and no allocation unless a line is printed. Lines read
//! `tensor-fusion-interposer WARN pid=42 key=value ... message`, fields first.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            "trace" => Some(Level::Trace),
            _ => None,
        }
    }
}

/// 0 until read from the environment; 255 for "off".
static MAX_LEVEL: AtomicU8 = AtomicU8::new(0);
const OFF: u8 = 255;

fn max_level() -> u8 {
    let level = MAX_LEVEL.load(Ordering::Relaxed);
    if level != 0 {
        return level;
    }
    let level = std::env::var("TF_LOG_LEVEL")
        .ok()
        .map_or(Level::Info as u8, |filter| level_from_filter(&filter));
    MAX_LEVEL.store(level, Ordering::Relaxed);
    level
}

fn level_from_filter(filter: &str) -> u8 {
    let mut bare = None;
    for directive in filter.split(',') {
        match directive.split_once('=') {
            Some((target, level)) if target.trim().starts_with("tensor_fusion") => {
                if level.trim() == "off" {
                    return OFF;
                }
                if let Some(level) = Level::parse(level) {
                    return level as u8;
                }
            }
            Some(_) => {}
            None if directive.trim() == "off" => bare = bare.or(Some(OFF)),
            None => bare = bare.or(Level::parse(directive).map(|level| level as u8)),
        }
    }
    bare.unwrap_or(Level::Info as u8)
}

/// Whether a line at `level` would be printed.
pub fn enabled(level: Level) -> bool {
    let max = max_level();
    max != OFF && level as u8 <= max
}

/// Prints one line; use the `log!` macro.
pub fn emit(level: Level, message: std::fmt::Arguments<'_>) {
    eprintln!(
        "tensor-fusion-interposer {} pid={} {}",
        level.name(),
        std::process::id(),
        message
    );
}

macro_rules! log {
    ($level:ident, $($arg:tt)+) => {
        if $crate::log::enabled($crate::log::Level::$level) {
            $crate::log::emit($crate::log::Level::$level, format_args!($($arg)+));
        }
    };
}
pub(crate) use log;

/// At most one line a minute for an event that can repeat in a hot loop (an allocation refused
/// while a program probes for the largest block that fits): the first occurrence and then one a
/// minute log at their level, with how many were left out since; the rest only at debug.
pub struct EveryMinute {
    /// Coarse monotonic time of the last line printed at full level; 0 = none yet.
    last_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl EveryMinute {
    const PERIOD_NS: u64 = 60_000_000_000;

    pub const fn new() -> Self {
        Self {
            last_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(left out since the last line)` when this occurrence gets its full-level line.
    pub fn admit(&self) -> Option<u64> {
        let now = tensor_fusion_interposer_core::limiter::monotonic_coarse_ns().max(1);
        let last = self.last_ns.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= Self::PERIOD_NS;
        if due
            && self
                .last_ns
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}
