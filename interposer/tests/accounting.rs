//! The VRAM limit holds per container, across threads and processes, and survives processes
//! that die: 64 threads allocating at once never pass it, processes of one container share it
//! through the usage file in the pod directory, and a SIGKILLed process (even one holding the
//! usage file's lock) neither stalls the others nor keeps its memory.

mod support;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::Pod;

const MIB: u64 = 1 << 20;

#[test]
fn sixty_four_threads_allocating_at_once_never_pass_the_limit() {
    // 100 MiB limit, 3 MiB chunks: 33 chunks fit (99 MiB); a 34th never does.
    let pod = Pod::with_limits(&format!("vram_limit={}\n", 100 * MIB));
    let report = pod.run(
        "exports",
        &["init", "ctx:0", "threads:64:3145728:0", "freeall"],
    );
    assert_eq!(report.number("threads:64:3145728:0", "bytes"), 99 * MIB);
    assert_eq!(
        report.number("threads:64:3145728:0", "mock_peak"),
        99 * MIB,
        "the driver never held more than the limit"
    );
    assert_eq!(report.get("threads:64:3145728:0", "errors"), "[2]");
}

#[test]
fn processes_of_one_container_share_one_limit() {
    let pod = Pod::with_limits(&format!("vram_limit={}\n", 40 * MIB));
    let first = pod.spawn_holding("exports", &["init", "ctx:0", "alloc:16777216"]);
    let second = pod.spawn_holding("dlsym", &["init", "ctx:0", "alloc:16777216"]);
    assert_eq!(first.report.number("alloc:16777216", "result"), 0);
    assert_eq!(second.report.number("alloc:16777216", "result"), 0);

    let third = pod.run(
        "procaddr:12080:0",
        &["init", "ctx:0", "meminfo", "fill:1048576", "freeall"],
    );
    assert_eq!(third.number("meminfo", "free"), 8 * MIB);
    assert_eq!(third.number("fill:1048576", "bytes"), 8 * MIB);
    assert_eq!(third.number("fill:1048576", "result"), 2);

    first.release();
    let fourth = pod.run("exports", &["init", "ctx:0", "fill:1048576"]);
    assert_eq!(
        fourth.number("fill:1048576", "bytes"),
        24 * MIB,
        "memory returns when a process exits"
    );
    second.release();
}

#[test]
fn a_sigkilled_process_gives_its_memory_back() {
    let pod = Pod::with_limits(&format!("vram_limit={}\n", 32 * MIB));
    let victim = pod.spawn_holding("exports", &["init", "ctx:0", "alloc:33554432"]);
    assert_eq!(victim.report.number("alloc:33554432", "result"), 0);
    let blocked = pod.run("exports", &["init", "ctx:0", "alloc:1048576"]);
    assert_eq!(blocked.number("alloc:1048576", "result"), 2);

    victim.kill();
    let after = pod.run("exports", &["init", "ctx:0", "meminfo", "alloc:33554432"]);
    assert_eq!(after.number("meminfo", "free"), 32 * MIB);
    assert_eq!(after.number("alloc:33554432", "result"), 0);
}

/// Holds an exclusive flock on `path` in a child process, like an interposer killed inside a
/// reservation, until SIGKILLed.
fn lock_holder(path: &std::path::Path) -> std::process::Child {
    let mut child = std::process::Command::new("flock")
        .arg(path)
        .args(["-c", "echo locked; exec sleep 600"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("flock(1) from util-linux");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("piped")),
        &mut line,
    )
    .expect("reading flock output");
    assert_eq!(line.trim(), "locked");
    child
}

#[test]
fn a_sigkilled_lock_holder_does_not_stall_the_others() {
    let pod = Pod::with_limits(&format!("vram_limit={}\n", 32 * MIB));
    // Create the usage file.
    pod.run("exports", &["init", "ctx:0", "alloc:1048576"]);
    let usage = pod.usage_path();
    {
        // Sanity: the lock is the usage file's flock.
        let file = File::open(&usage).unwrap();
        // SAFETY: flock on an open descriptor, non-blocking probe.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(locked, 0);
        // SAFETY: unlock the descriptor locked above.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    }

    let mut holder = lock_holder(&usage);
    let mut waiting = pod
        .probe("exports", &["init", "ctx:0", "alloc:1048576"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // The allocation cannot finish while the lock is held...
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "allocation finished while another process held the usage file lock"
    );
    // ...and goes through once the holder is SIGKILLed (the sleep holding the lock is the
    // process that owns the lock's open file description; kill the whole group).
    // SAFETY: kill of our own child's process group.
    unsafe { libc::kill(holder.id() as i32, libc::SIGKILL) };
    holder.wait().unwrap();
    kill_lingering_sleep(&usage);

    // Guard against hanging forever if the lock were never released (not a speed assertion).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = waiting.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "allocation stalled behind a dead lock holder"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let output = waiting.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("alloc:1048576 result=0"), "{stdout}");
}

/// `flock -c` runs the command in a child that inherits the locked descriptor; SIGKILL that
/// one too, found by its open usage file.
fn kill_lingering_sleep(usage: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline != b"sleep\x00600\x00" {
            continue;
        }
        let holds_usage = std::fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == usage));
        if holds_usage {
            // SAFETY: SIGKILL to the sleep this test started (it holds our usage file).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
