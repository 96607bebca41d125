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

/// Byte offset of process slot 0 and the size of a slot in the usage file
/// (`docs/interposer.md`, "the usage file").
const SLOTS_AT_BYTES: u64 = 1088;
const SLOT_BYTES: u64 = 160;

/// Reads a probe's stdout until it says it holds; returns the lines and the rest of stdout.
fn wait_for_hold(
    child: &mut std::process::Child,
) -> (Vec<String>, std::io::BufReader<std::process::ChildStdout>) {
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut seen = Vec::new();
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut stdout, &mut line).expect("reading probe output") > 0 {
        let done = line.starts_with("hold ");
        seen.push(line.trim_end().to_owned());
        line.clear();
        if done {
            break;
        }
    }
    (seen, stdout)
}

#[test]
fn a_slot_left_by_a_killed_process_with_this_pid_is_reaped() {
    // What a container restart leaves in the pod directory: a slot with the new process's pid
    // (the killed main process was pid 1, so is the new one) but another start time.
    let pod = Pod::with_limits("vram_limit=1048576\n");
    let mut probe = pod
        .probe(
            "exports",
            &["hold", "init", "ctx:0", "meminfo", "alloc:1048576"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the probe");
    let (_, mut rest) = wait_for_hold(&mut probe);

    let settings = [tensor_fusion_interposer_core::shm::DeviceSettings {
        vram_limit: 1_048_576,
        ..Default::default()
    }];
    drop(
        tensor_fusion_interposer_core::shm::UsageFile::open(&pod.usage_path(), &settings).unwrap(),
    );
    let mut slot = [0_u8; SLOT_BYTES as usize];
    slot[0..8].copy_from_slice(&u64::from(probe.id()).to_le_bytes());
    // Start time 1 tick after boot: not the probe's.
    slot[8..16].copy_from_slice(&1_u64.to_le_bytes());
    slot[16..24].copy_from_slice(&800_000_u64.to_le_bytes());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(pod.usage_path())
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &slot, SLOTS_AT_BYTES + 3 * SLOT_BYTES)
        .unwrap();

    drop(probe.stdin.take());
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut rest, &mut stdout).unwrap();
    let output = probe.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("meminfo result=0 free=1048576 total=1048576"),
        "the predecessor's 800000 bytes are gone: {stdout}"
    );
    assert!(stdout.contains("alloc:1048576 result=0"), "{stdout}");
}

/// `command` run as pid 1 of a new PID namespace (with its own /proc), through `unshare` in a
/// user namespace; `None` where this machine does not allow that.
fn as_pid_one(command: &std::process::Command) -> Option<std::process::Command> {
    let prefix = [
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
    ];
    let works = std::process::Command::new("unshare")
        .args(prefix)
        .arg("true")
        .output()
        .is_ok_and(|output| output.status.success());
    if !works {
        return None;
    }
    let mut wrapped = std::process::Command::new("unshare");
    wrapped
        .args(prefix)
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    Some(wrapped)
}

#[test]
fn a_restarted_pid_one_does_not_inherit_the_killed_pid_ones_memory() {
    let pod = Pod::with_limits("vram_limit=1048576\n");
    let Some(mut first) =
        as_pid_one(&pod.probe("exports", &["init", "ctx:0", "alloc:800000", "hold"]))
    else {
        eprintln!("skipped: unshare of user and PID namespaces is not allowed here");
        return;
    };
    let mut first = first
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the first pid-1 probe");
    let (lines, _) = wait_for_hold(&mut first);
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("alloc:800000 result=0 ")),
        "{lines:?}"
    );
    // SIGKILL to unshare; --kill-child sends the probe (pid 1 inside) SIGKILL too.
    first.kill().expect("SIGKILL");
    let first_output = first.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&first_output.stderr).contains(" pid=1 "),
        "the holder ran as pid 1"
    );

    let second = as_pid_one(&pod.probe("exports", &["init", "ctx:0", "meminfo", "alloc:1048576"]))
        .expect("unshare worked a moment ago")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&second.stdout);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(" pid=1 "),
        "the new process is pid 1 too: {stderr}"
    );
    assert!(
        stdout.contains("meminfo result=0 free=1048576 total=1048576"),
        "{stdout}"
    );
    assert!(stdout.contains("alloc:1048576 result=0"), "{stdout}");
}
