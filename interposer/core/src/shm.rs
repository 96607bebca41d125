//! The container's usage file: VRAM and spill accounting and the launch token bucket, shared by
//! every process of one container through a memory-mapped file in the pod directory.
//!
//! Layout (little-endian, every field a naturally aligned 64-bit word, so each is read and
//! written atomically; `docs/interposer.md` has the table):
//!
//! - header, 64 bytes: magic `TFUSAGE1`, format version, slot count, device count;
//! - [`MAX_DEVICES`] device blocks of 128 bytes: VRAM limit, spill quota, refill rate, burst,
//!   token count, last refill time and launch/throttle counters;
//! - [`SLOT_COUNT`] process slots of 160 bytes: owner pid, its start time, and the bytes of VRAM
//!   and of spill it holds on each device.
//!
//! A process charges its allocations to its own slot. The container's usage is the sum of the
//! slots. Reservations take a process-local mutex and then `flock` on the file, which the kernel
//! drops when a holder dies, so a SIGKILLed process never stalls the others. A slot names its
//! owner by pid and start time, since the file outlives container restarts and a new process
//! often gets the pid of a killed one (pid 1). A slot whose owner is gone (no such pid, a
//! zombie, or a pid now held by a process with another start time, this one included) is
//! cleared by the next reservation that would not fit otherwise and by every memory query, so a dead process's
//! usage is returned at the latest when someone needs it. Releases and the token bucket are
//! lock-free.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::limiter::Bucket;

/// `TFUSAGE1` as a little-endian word.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TFUSAGE1");
/// Layout version written after the magic.
pub const LAYOUT_VERSION: u64 = 1;
/// Devices one container can be given.
pub const MAX_DEVICES: usize = 8;
/// Processes of one container that can hold memory at once.
pub const SLOT_COUNT: usize = 128;

const WORD: usize = 8;
const HEADER_WORDS: usize = 8;
const DEVICE_WORDS: usize = 16;
const SLOT_WORDS: usize = 20;
const DEVICES_AT: usize = HEADER_WORDS;
const SLOTS_AT: usize = DEVICES_AT + MAX_DEVICES * DEVICE_WORDS;
const TOTAL_WORDS: usize = SLOTS_AT + SLOT_COUNT * SLOT_WORDS;
/// Size of the usage file in bytes.
pub const FILE_BYTES: usize = TOTAL_WORDS * WORD;

// Header words.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_SLOTS: usize = 2;
const H_DEVICES: usize = 3;

// Device block words.
const D_VRAM_LIMIT: usize = 0;
const D_SPILL_QUOTA: usize = 1;
pub(crate) const D_REFILL_RATE: usize = 2;
pub(crate) const D_BURST_NS: usize = 3;
pub(crate) const D_TOKENS: usize = 4;
pub(crate) const D_LAST_REFILL_NS: usize = 5;
pub(crate) const D_LAUNCHED_UNITS: usize = 6;
pub(crate) const D_THROTTLED_NS: usize = 7;
pub(crate) const D_THROTTLED_LAUNCHES: usize = 8;
pub(crate) const D_LAUNCHES: usize = 9;

// Slot words.
const S_PID: usize = 0;
const S_START_TIME: usize = 1;
const S_VRAM: usize = 2;
const S_SPILL: usize = S_VRAM + MAX_DEVICES;
/// A random id of the owning process instance (0: written by an interposer that set none).
const S_INSTANCE: usize = S_SPILL + MAX_DEVICES;

/// What a device block is set to when a process opens the file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSettings {
    /// VRAM bytes the container may hold on the device; `u64::MAX` for no limit.
    pub vram_limit: u64,
    /// Host bytes that may back device allocations past the limit; 0 for no spill.
    pub spill_quota: u64,
    /// Initial launch tokens per second; 0 for no compute limit. Only written when the file is
    /// created, so a rate the node agent steered survives new processes.
    pub refill_rate: f64,
    /// Bucket capacity in nanoseconds of refill.
    pub burst_ns: u64,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            vram_limit: u64::MAX,
            spill_quota: 0,
            refill_rate: 0.0,
            burst_ns: 100_000_000,
        }
    }
}

/// Which counter an allocation is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Device memory, bounded by the VRAM limit.
    Device,
    /// Pinned host memory standing in for device memory, bounded by the spill quota.
    Spill,
}

/// Launch counters of one device, as the node agent exports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchStats {
    pub launches: u64,
    pub launched_units: u64,
    pub throttled_launches: u64,
    pub throttled_ns: u64,
}

/// Errors opening the usage file or charging it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UsageError {
    #[error("failed to open usage file {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("usage file {path} has layout version {found}, this build reads {LAYOUT_VERSION}")]
    Version { path: String, found: u64 },
    #[error("device index {0} is past the {MAX_DEVICES} devices a container can have")]
    DeviceIndex(usize),
    #[error("all {SLOT_COUNT} process slots of the usage file are held by live processes")]
    SlotsFull,
    #[error(
        "{kind} limit reached on device {device}: {used} bytes used + {requested} requested > {limit}"
    )]
    OverLimit {
        kind: &'static str,
        device: usize,
        used: u64,
        requested: u64,
        limit: u64,
    },
}

/// A mapped usage file (or a private anonymous mapping with the same layout).
pub struct UsageFile {
    words: NonNull<AtomicU64>,
    file: Option<File>,
    process_lock: Mutex<()>,
    slot: AtomicUsize,
    slot_pid: AtomicU64,
    /// This process's identity as slots record it: `own_pid` and its start time, read once per
    /// pid (a forked child reads its own), so a slot written and a slot compared agree.
    own_pid: AtomicU64,
    own_start_time: AtomicU64,
}

// SAFETY: the mapping is only accessed through atomics, and it lives as long as the value.
unsafe impl Send for UsageFile {}
// SAFETY: as above; all mutation goes through atomics or under `process_lock` + flock.
unsafe impl Sync for UsageFile {}

const NO_SLOT: usize = usize::MAX;

impl UsageFile {
    /// Opens (creating and initialising if needed) the shared usage file at `path`, and writes
    /// this container's limits into its device blocks.
    pub fn open(path: &Path, settings: &[DeviceSettings]) -> Result<Self, UsageError> {
        let open_error = |reason: String| UsageError::Open {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(path)
            .map_err(|error| open_error(error.to_string()))?;
        let _file_lock = FileLock::exclusive(&file).map_err(|e| open_error(e.to_string()))?;
        let length = file
            .metadata()
            .map_err(|error| open_error(error.to_string()))?
            .len();
        if length < FILE_BYTES as u64 {
            file.set_len(FILE_BYTES as u64)
                .map_err(|error| open_error(error.to_string()))?;
        }
        let words = map(Some(&file)).map_err(|error| open_error(error.to_string()))?;
        let usage = Self::from_parts(words, Some(file));
        let magic = usage.header(H_MAGIC).load(Ordering::Acquire);
        if magic == MAGIC {
            let found = usage.header(H_VERSION).load(Ordering::Acquire);
            if found != LAYOUT_VERSION {
                return Err(UsageError::Version {
                    path: path.display().to_string(),
                    found,
                });
            }
        } else {
            usage.initialise(settings);
        }
        usage.apply_limits(settings);
        Ok(usage)
    }

    /// Opens an existing usage file without changing it (what the node agent does).
    pub fn attach(path: &Path) -> Result<Self, UsageError> {
        let open_error = |reason: String| UsageError::Open {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|error| open_error(error.to_string()))?;
        let length = file
            .metadata()
            .map_err(|error| open_error(error.to_string()))?
            .len();
        if length < FILE_BYTES as u64 {
            return Err(open_error(format!("{length} bytes, expected {FILE_BYTES}")));
        }
        let words = map(Some(&file)).map_err(|error| open_error(error.to_string()))?;
        let usage = Self::from_parts(words, Some(file));
        let found = usage.header(H_VERSION).load(Ordering::Acquire);
        if usage.header(H_MAGIC).load(Ordering::Acquire) != MAGIC || found != LAYOUT_VERSION {
            return Err(UsageError::Version {
                path: path.display().to_string(),
                found,
            });
        }
        Ok(usage)
    }

    /// Process-private accounting with the same layout, for a process with no pod directory.
    pub fn private(settings: &[DeviceSettings]) -> Result<Self, UsageError> {
        let words = map(None).map_err(|error| UsageError::Open {
            path: "(anonymous)".to_owned(),
            reason: error.to_string(),
        })?;
        let usage = Self::from_parts(words, None);
        usage.initialise(settings);
        usage.apply_limits(settings);
        Ok(usage)
    }

    fn from_parts(words: NonNull<AtomicU64>, file: Option<File>) -> Self {
        Self {
            words,
            file,
            process_lock: Mutex::new(()),
            slot: AtomicUsize::new(NO_SLOT),
            slot_pid: AtomicU64::new(0),
            own_pid: AtomicU64::new(0),
            own_start_time: AtomicU64::new(0),
        }
    }

    fn initialise(&self, settings: &[DeviceSettings]) {
        self.header(H_VERSION)
            .store(LAYOUT_VERSION, Ordering::Release);
        self.header(H_SLOTS)
            .store(SLOT_COUNT as u64, Ordering::Release);
        self.header(H_DEVICES)
            .store(MAX_DEVICES as u64, Ordering::Release);
        for device in 0..MAX_DEVICES {
            let setting = settings.get(device).copied().unwrap_or_default();
            self.device(device, D_REFILL_RATE)
                .store(setting.refill_rate.to_bits(), Ordering::Release);
            self.device(device, D_BURST_NS)
                .store(setting.burst_ns, Ordering::Release);
        }
        self.header(H_MAGIC).store(MAGIC, Ordering::Release);
    }

    fn apply_limits(&self, settings: &[DeviceSettings]) {
        for (device, setting) in settings.iter().enumerate().take(MAX_DEVICES) {
            self.device(device, D_VRAM_LIMIT)
                .store(setting.vram_limit, Ordering::Release);
            self.device(device, D_SPILL_QUOTA)
                .store(setting.spill_quota, Ordering::Release);
        }
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(index < TOTAL_WORDS, "usage file word {index} out of range");
        // SAFETY: `words` maps TOTAL_WORDS aligned words for the life of `self`; index checked.
        unsafe { &*self.words.as_ptr().add(index) }
    }

    fn header(&self, word: usize) -> &AtomicU64 {
        self.word(word)
    }

    pub(crate) fn device(&self, device: usize, word: usize) -> &AtomicU64 {
        self.word(DEVICES_AT + device * DEVICE_WORDS + word)
    }

    fn slot_word(&self, slot: usize, word: usize) -> &AtomicU64 {
        self.word(SLOTS_AT + slot * SLOT_WORDS + word)
    }

    fn counter_word(kind: MemoryKind, device: usize) -> usize {
        match kind {
            MemoryKind::Device => S_VRAM + device,
            MemoryKind::Spill => S_SPILL + device,
        }
    }

    /// The VRAM limit of `device` in bytes (`u64::MAX`: none).
    pub fn vram_limit(&self, device: usize) -> u64 {
        self.device(device.min(MAX_DEVICES - 1), D_VRAM_LIMIT)
            .load(Ordering::Acquire)
    }

    /// The spill quota of `device` in bytes.
    pub fn spill_quota(&self, device: usize) -> u64 {
        self.device(device.min(MAX_DEVICES - 1), D_SPILL_QUOTA)
            .load(Ordering::Acquire)
    }

    /// Bytes of `kind` the container holds on `device`, summed over live-looking slots.
    pub fn used(&self, device: usize, kind: MemoryKind) -> u64 {
        if device >= MAX_DEVICES {
            return 0;
        }
        (0..SLOT_COUNT)
            .filter(|&slot| self.slot_word(slot, S_PID).load(Ordering::Acquire) != 0)
            .map(|slot| {
                self.slot_word(slot, Self::counter_word(kind, device))
                    .load(Ordering::Acquire)
            })
            .fold(0_u64, u64::saturating_add)
    }

    /// Charges `bytes` of `kind` on `device` to this process, unless that would pass the limit
    /// (VRAM) or quota (spill) of the container.
    pub fn reserve(&self, device: usize, bytes: u64, kind: MemoryKind) -> Result<(), UsageError> {
        if device >= MAX_DEVICES {
            return Err(UsageError::DeviceIndex(device));
        }
        let _process = self
            .process_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _file = self.lock_file()?;
        let slot = self.claim_slot_locked()?;
        let limit = match kind {
            MemoryKind::Device => self.vram_limit(device),
            MemoryKind::Spill => self.spill_quota(device),
        };
        let mut used = self.used(device, kind);
        if used.saturating_add(bytes) > limit && self.reap_dead_locked() > 0 {
            used = self.used(device, kind);
        }
        if used.saturating_add(bytes) > limit {
            return Err(UsageError::OverLimit {
                kind: kind_name(kind),
                device,
                used,
                requested: bytes,
                limit,
            });
        }
        // Checked: with no limit the sum above saturates, and a wrapped counter would hand the
        // container its memory back. Releases update the word concurrently, hence fetch_update.
        self.slot_word(slot, Self::counter_word(kind, device))
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes)
            })
            .map_err(|held| UsageError::OverLimit {
                kind: kind_name(kind),
                device,
                used: held,
                requested: bytes,
                limit,
            })?;
        Ok(())
    }

    /// Returns `bytes` of `kind` on `device` that this process reserved.
    pub fn release(&self, device: usize, bytes: u64, kind: MemoryKind) {
        let slot = self.slot.load(Ordering::Acquire);
        if device >= MAX_DEVICES
            || slot == NO_SLOT
            || self.slot_pid.load(Ordering::Acquire) != u64::from(std::process::id())
        {
            return;
        }
        let counter = self.slot_word(slot, Self::counter_word(kind, device));
        // The closure always returns Some, so fetch_update cannot fail.
        let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            Some(held.saturating_sub(bytes))
        });
    }

    /// Clears the slots of processes that are gone; returns how many it cleared.
    pub fn reap_dead(&self) -> Result<usize, UsageError> {
        let _process = self
            .process_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _file = self.lock_file()?;
        Ok(self.reap_dead_locked())
    }

    fn reap_dead_locked(&self) -> usize {
        let (own_pid, own_start_time) = self.own_identity();
        let mut cleared = 0;
        for slot in 0..SLOT_COUNT {
            let pid = self.slot_word(slot, S_PID).load(Ordering::Acquire);
            if pid == 0 {
                continue;
            }
            let start_time = self.slot_word(slot, S_START_TIME).load(Ordering::Acquire);
            // A slot with this pid is this process's only if its instance id is this process's:
            // the usage file outlives container restarts, and the new main process is often the
            // same pid (1) as the one that was killed, sometimes started within the same clock
            // tick, so the start time alone cannot tell them apart. A slot without an instance
            // id falls back to the start time (when /proc cannot tell it, a slot of this pid is
            // taken for this process's).
            let alive = if pid == own_pid {
                match self.slot_word(slot, S_INSTANCE).load(Ordering::Acquire) {
                    0 => own_start_time == 0 || start_time == own_start_time,
                    instance => instance == process_instance(),
                }
            } else {
                process_alive(pid, start_time)
            };
            if !alive {
                self.clear_slot(slot);
                cleared += 1;
            }
        }
        cleared
    }

    fn clear_slot(&self, slot: usize) {
        for word in S_START_TIME..SLOT_WORDS {
            self.slot_word(slot, word).store(0, Ordering::Release);
        }
        self.slot_word(slot, S_PID).store(0, Ordering::Release);
    }

    /// `(pid, start time)` of this process (start time 0 when `/proc` cannot tell); read once
    /// per pid. Called under `process_lock`.
    fn own_identity(&self) -> (u64, u64) {
        let pid = u64::from(std::process::id());
        if self.own_pid.load(Ordering::Acquire) != pid {
            let start_time = process_start_time(pid).unwrap_or(0);
            self.own_start_time.store(start_time, Ordering::Release);
            self.own_pid.store(pid, Ordering::Release);
        }
        (pid, self.own_start_time.load(Ordering::Acquire))
    }

    fn claim_slot_locked(&self) -> Result<usize, UsageError> {
        let (pid, start_time) = self.own_identity();
        let slot = self.slot.load(Ordering::Acquire);
        if slot != NO_SLOT && self.slot_pid.load(Ordering::Acquire) == pid {
            return Ok(slot);
        }
        let free = |usage: &Self| {
            (0..SLOT_COUNT).find(|&slot| usage.slot_word(slot, S_PID).load(Ordering::Acquire) == 0)
        };
        let slot = match free(self) {
            Some(slot) => slot,
            None => {
                self.reap_dead_locked();
                free(self).ok_or(UsageError::SlotsFull)?
            }
        };
        // A free slot starts from zero: a new process never takes over a predecessor's charges.
        self.clear_slot(slot);
        self.slot_word(slot, S_START_TIME)
            .store(start_time, Ordering::Release);
        self.slot_word(slot, S_INSTANCE)
            .store(process_instance(), Ordering::Release);
        self.slot_word(slot, S_PID).store(pid, Ordering::Release);
        self.slot.store(slot, Ordering::Release);
        self.slot_pid.store(pid, Ordering::Release);
        Ok(slot)
    }

    fn lock_file(&self) -> Result<Option<FileLock>, UsageError> {
        self.file
            .as_ref()
            .map(FileLock::exclusive)
            .transpose()
            .map_err(|error| UsageError::Open {
                path: "(usage file)".to_owned(),
                reason: format!("flock failed: {error}"),
            })
    }

    /// The launch token bucket of `device`.
    pub fn bucket(&self, device: usize) -> Bucket<'_> {
        Bucket::new(self, device.min(MAX_DEVICES - 1))
    }

    /// Sets the refill rate of `device` (tokens per second; 0 turns the limit off). The node
    /// agent calls this to steer the container's compute share.
    pub fn set_refill_rate(&self, device: usize, tokens_per_second: f64) {
        self.device(device.min(MAX_DEVICES - 1), D_REFILL_RATE)
            .store(tokens_per_second.to_bits(), Ordering::Release);
    }

    /// The refill rate of `device` in tokens per second.
    pub fn refill_rate(&self, device: usize) -> f64 {
        f64::from_bits(
            self.device(device.min(MAX_DEVICES - 1), D_REFILL_RATE)
                .load(Ordering::Acquire),
        )
    }

    /// Launch counters of `device` since the file was created.
    pub fn launch_stats(&self, device: usize) -> LaunchStats {
        let device = device.min(MAX_DEVICES - 1);
        let read = |word| self.device(device, word).load(Ordering::Acquire);
        LaunchStats {
            launches: read(D_LAUNCHES),
            launched_units: read(D_LAUNCHED_UNITS),
            throttled_launches: read(D_THROTTLED_LAUNCHES),
            throttled_ns: read(D_THROTTLED_NS),
        }
    }
}

impl Drop for UsageFile {
    fn drop(&mut self) {
        // SAFETY: `words` came from mmap of FILE_BYTES in `map` and is unmapped only here.
        unsafe {
            libc::munmap(self.words.as_ptr().cast(), FILE_BYTES);
        }
    }
}

fn kind_name(kind: MemoryKind) -> &'static str {
    match kind {
        MemoryKind::Device => "vram",
        MemoryKind::Spill => "spill",
    }
}

fn map(file: Option<&File>) -> std::io::Result<NonNull<AtomicU64>> {
    let (flags, fd) = match file {
        Some(file) => (libc::MAP_SHARED, file.as_raw_fd()),
        None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a fresh mapping of FILE_BYTES; the file (when given) is at least that long.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            FILE_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(address.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))
}

/// An exclusive `flock` on the usage file, released on drop (or by the kernel on death). It
/// holds the raw descriptor; the `File` it came from outlives it in every use.
struct FileLock(std::os::fd::RawFd);

impl FileLock {
    fn exclusive(file: &File) -> std::io::Result<Self> {
        loop {
            // SAFETY: flock on a descriptor the File owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self(file.as_raw_fd()));
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor locked in `exclusive`, still open (see the type).
        unsafe {
            libc::flock(self.0, libc::LOCK_UN);
        }
    }
}

/// A random, non-zero id of this process instance, drawn once per pid (a forked child draws
/// its own): what tells this process's slot from a predecessor's with the same pid and start
/// tick.
fn process_instance() -> u64 {
    static INSTANCE: std::sync::Mutex<(u64, u64)> = std::sync::Mutex::new((0, 0));
    let pid = u64::from(std::process::id());
    let mut instance = INSTANCE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if instance.0 != pid || instance.1 == 0 {
        *instance = (pid, random_nonzero());
    }
    instance.1
}

fn random_nonzero() -> u64 {
    let mut bytes = [0_u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let mut value = u64::from_ne_bytes(bytes);
    if filled != bytes.len() as isize {
        // No entropy source: the monotonic clock's nanoseconds and the pid differ between a
        // killed process and its successor.
        value = crate::limiter::monotonic_ns() ^ (u64::from(std::process::id()) << 40);
    }
    value.max(1)
}

/// Start time of `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`), and whether
/// it is a zombie.
fn process_stat(pid: u64) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((start_time, state == "Z" || state == "X"))
}

fn process_start_time(pid: u64) -> Option<u64> {
    process_stat(pid).map(|(start_time, _)| start_time)
}

fn process_alive(pid: u64, start_time: u64) -> bool {
    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only asks whether the process exists.
    let exists = unsafe { libc::kill(raw_pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    match process_stat(pid) {
        Some((_, true)) => false,
        Some((now_start, false)) => start_time == 0 || now_start == start_time,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(vram_limit: u64, spill_quota: u64) -> Vec<DeviceSettings> {
        vec![
            DeviceSettings {
                vram_limit,
                spill_quota,
                ..DeviceSettings::default()
            };
            2
        ]
    }

    #[test]
    fn reservations_stop_at_the_limit_and_release_frees_room() {
        let usage = UsageFile::private(&limited(1000, 0)).unwrap();
        usage.reserve(0, 600, MemoryKind::Device).unwrap();
        assert_eq!(
            usage.reserve(0, 401, MemoryKind::Device).unwrap_err(),
            UsageError::OverLimit {
                kind: "vram",
                device: 0,
                used: 600,
                requested: 401,
                limit: 1000
            }
        );
        usage.reserve(0, 400, MemoryKind::Device).unwrap();
        usage.reserve(1, 1000, MemoryKind::Device).unwrap();
        usage.release(0, 600, MemoryKind::Device);
        assert_eq!(usage.used(0, MemoryKind::Device), 400);
        assert_eq!(usage.used(1, MemoryKind::Device), 1000);
        assert!(usage.reserve(0, 1, MemoryKind::Spill).is_err(), "spill off");
    }

    #[test]
    fn processes_sharing_a_file_share_the_limit_and_dead_slots_are_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main.shm");
        let first = UsageFile::open(&path, &limited(1000, 0)).unwrap();
        first.reserve(0, 700, MemoryKind::Device).unwrap();

        let second = UsageFile::attach(&path).unwrap();
        assert_eq!(second.used(0, MemoryKind::Device), 700);

        // A slot left by a process that no longer exists (pid far above pid_max).
        second
            .slot_word(5, S_PID)
            .store(4_000_000_000, Ordering::Release);
        second.slot_word(5, S_VRAM).store(300, Ordering::Release);
        assert_eq!(first.used(0, MemoryKind::Device), 1000);
        first.reserve(0, 300, MemoryKind::Device).unwrap();
        assert_eq!(first.used(0, MemoryKind::Device), 1000);
        assert_eq!(second.slot_word(5, S_PID).load(Ordering::Acquire), 0);
    }

    /// What a container restart leaves behind: the killed main process was pid 1, and so is
    /// the new one. Its slot carries this process's pid with another start time.
    fn plant_predecessor(usage: &UsageFile, slot: usize, vram: u64) {
        let (pid, start_time) = usage.own_identity();
        assert_ne!(start_time, 0, "/proc tells this process's start time");
        usage
            .slot_word(slot, S_START_TIME)
            .store(start_time - 1, Ordering::Release);
        usage.slot_word(slot, S_VRAM).store(vram, Ordering::Release);
        usage.slot_word(slot, S_PID).store(pid, Ordering::Release);
    }

    #[test]
    fn a_predecessor_with_this_pid_and_start_tick_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main.shm");
        let usage = UsageFile::open(&path, &limited(1_048_576, 0)).unwrap();
        usage.reserve(0, 100, MemoryKind::Device).unwrap();
        let own_slot = usage.slot.load(Ordering::Acquire);
        // Restarted within the same clock tick: pid and start time match, the instance id not.
        let (pid, start_time) = usage.own_identity();
        let slot = (own_slot + 1) % SLOT_COUNT;
        usage
            .slot_word(slot, S_START_TIME)
            .store(start_time, Ordering::Release);
        usage
            .slot_word(slot, S_INSTANCE)
            .store(process_instance().wrapping_add(1).max(1), Ordering::Release);
        usage
            .slot_word(slot, S_VRAM)
            .store(800_000, Ordering::Release);
        usage.slot_word(slot, S_PID).store(pid, Ordering::Release);
        assert_eq!(usage.used(0, MemoryKind::Device), 800_100);

        assert_eq!(usage.reap_dead().unwrap(), 1);
        assert_eq!(
            usage.used(0, MemoryKind::Device),
            100,
            "this process's slot stays"
        );
    }

    #[test]
    fn a_dead_predecessor_with_this_pid_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main.shm");
        let usage = UsageFile::open(&path, &limited(1_048_576, 0)).unwrap();
        plant_predecessor(&usage, 0, 800_000);
        assert_eq!(usage.used(0, MemoryKind::Device), 800_000);

        assert_eq!(usage.reap_dead().unwrap(), 1);
        assert_eq!(usage.used(0, MemoryKind::Device), 0);
        assert_eq!(usage.slot_word(0, S_PID).load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_reservation_that_meets_a_dead_predecessor_reaps_it_and_starts_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main.shm");
        let usage = UsageFile::open(&path, &limited(1_048_576, 0)).unwrap();
        plant_predecessor(&usage, 0, 800_000);

        usage.reserve(0, 300_000, MemoryKind::Device).unwrap();
        assert_eq!(usage.used(0, MemoryKind::Device), 300_000);
        let own_slot = usage.slot.load(Ordering::Acquire);
        assert_eq!(
            usage.slot_word(own_slot, S_VRAM).load(Ordering::Acquire),
            300_000,
            "the predecessor's charge is not adopted"
        );
    }

    #[test]
    fn this_processs_own_slot_survives_reaping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main.shm");
        let usage = UsageFile::open(&path, &limited(1000, 0)).unwrap();
        usage.reserve(0, 100, MemoryKind::Device).unwrap();
        let other_handle = UsageFile::attach(&path).unwrap();
        assert_eq!(other_handle.reap_dead().unwrap(), 0);
        assert_eq!(usage.reap_dead().unwrap(), 0);
        assert_eq!(usage.used(0, MemoryKind::Device), 100);
    }

    #[test]
    fn a_huge_request_without_a_limit_does_not_wrap_the_counter() {
        let usage = UsageFile::private(&[DeviceSettings::default()]).unwrap();
        usage.reserve(0, u64::MAX - 10, MemoryKind::Device).unwrap();
        assert_eq!(
            usage.reserve(0, 11, MemoryKind::Device).unwrap_err(),
            UsageError::OverLimit {
                kind: "vram",
                device: 0,
                used: u64::MAX - 10,
                requested: 11,
                limit: u64::MAX
            }
        );
        assert_eq!(usage.used(0, MemoryKind::Device), u64::MAX - 10);
    }

    #[test]
    fn reopening_keeps_a_steered_refill_rate_but_takes_new_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main.shm");
        let settings = [DeviceSettings {
            vram_limit: 10,
            refill_rate: 5.0,
            ..DeviceSettings::default()
        }];
        let first = UsageFile::open(&path, &settings).unwrap();
        first.set_refill_rate(0, 42.0);
        let reopened = UsageFile::open(
            &path,
            &[DeviceSettings {
                vram_limit: 20,
                ..settings[0]
            }],
        )
        .unwrap();
        assert_eq!(reopened.refill_rate(0), 42.0);
        assert_eq!(reopened.vram_limit(0), 20);
    }
}
