//! `Zcrx::drop_privileges` on the host: every thread loses its capabilities, threads started
//! later inherit the loss, copy mode keeps working, and a later registration gets the typed
//! error; a process without CAP_NET_ADMIN gets an error that names it and the ways to grant it.
//!
//! A drop cannot be undone, so each test runs its body in a child process: the test re-runs
//! this binary with `--exact <its own name>` and `TZX_PRIVILEGE_CHILD` set, and checks that the
//! child's run of it passed.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_zcrx::{Capability, DropPrivileges, ErrorKind, Mode, StreamOptions, Zcrx};

const CHILD: &str = "TZX_PRIVILEGE_CHILD";
const NET_ADMIN: u64 = 1 << 12;
const NET_BIND_SERVICE: u64 = 1 << 10;
const SETPCAP: u64 = 1 << 8;

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs the test `name` of this binary in a child process prepared by `prepare`, and fails
/// unless the child ran it and it passed.
fn run_in_child(name: &str, prepare: impl FnOnce(&mut Command)) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1");
    prepare(&mut command);
    let output = command.output().expect("run this test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Exactly this test ran, in the child, and passed.
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed; 0 failed"),
        "the child's run of {name} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    println!("{}", child_lines(&stdout, name));
}

/// The child's own lines, without libtest's (`running 1 test`, `test NAME ... ok`, the
/// result line), which would read as results of this process's run.
fn child_lines(stdout: &str, name: &str) -> String {
    let prefix = format!("test {name} ... ");
    stdout
        .lines()
        .filter_map(|line| {
            let line = line.strip_prefix(&prefix).unwrap_or(line);
            let libtest = line.is_empty()
                || line == "ok"
                || line.starts_with("running ")
                || line.starts_with("test result:");
            (!libtest).then_some(line)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One thread's capability sets, from /proc/self/task/TID/status.
#[derive(Debug, Clone)]
struct ThreadCaps {
    name: String,
    sets: HashMap<&'static str, u64>,
}

impl ThreadCaps {
    fn all_sets(&self) -> u64 {
        self.sets.values().fold(0, |all, set| all | set)
    }
}

fn mask(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

fn caps_of(status: &str, name: String) -> ThreadCaps {
    let sets = ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
        .into_iter()
        .map(|field| (field, mask(status, field)))
        .collect();
    ThreadCaps { name, sets }
}

/// Every thread of this process.
fn every_thread() -> HashMap<i32, ThreadCaps> {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|entry| {
            let tid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let status = fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
            let name = fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            Some((tid, caps_of(&status, name.trim().to_owned())))
        })
        .collect()
}

/// The calling thread's sets.
fn this_thread() -> ThreadCaps {
    caps_of(
        &fs::read_to_string("/proc/thread-self/status").unwrap(),
        "this thread".into(),
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Sends `len` patterned bytes through a copy-mode connection and checks each one.
async fn copy_mode_moves(zcrx: &Zcrx, seed: u64, len: u64) {
    let (mut stream, _writer, mut client) = common::attached(zcrx, StreamOptions::default()).await;
    let payload: Vec<u8> = (0..len).map(|pos| common::pattern(seed, pos)).collect();
    let sender = tokio::spawn(async move {
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
    });
    let mut received = 0u64;
    while let Some(buf) = futures::StreamExt::next(&mut stream).await {
        for &byte in buf.unwrap().iter() {
            assert_eq!(byte, common::pattern(seed, received), "byte {received}");
            received += 1;
        }
    }
    sender.await.unwrap();
    assert_eq!(received, len);
}

#[test]
fn drop_reaches_every_thread_and_copy_mode_keeps_working() {
    if !in_child() {
        return run_in_child(
            "drop_reaches_every_thread_and_copy_mode_keeps_working",
            |_| {},
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    // Threads that exist during the drop: parked std threads and busy blocking-pool threads.
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Arc::new(std::sync::Mutex::new(release_rx));
    let mut parked = Vec::new();
    for i in 0..3 {
        let release = std::sync::Arc::clone(&release_rx);
        parked.push(
            std::thread::Builder::new()
                .name(format!("parked-{i}"))
                .spawn(move || {
                    let _ = release.lock().unwrap().recv();
                })
                .unwrap(),
        );
    }
    let (blocking_tx, blocking_rx) = mpsc::sync_channel::<()>(0);
    let blocking_rx = std::sync::Arc::new(std::sync::Mutex::new(blocking_rx));
    let mut blocking = Vec::new();
    for _ in 0..3 {
        let rx = std::sync::Arc::clone(&blocking_rx);
        blocking.push(runtime.spawn_blocking(move || {
            // Each holds a blocking thread: waits in recv (a futex) through the drop.
            let _ = rx.lock().map(|rx| rx.recv_timeout(Duration::from_secs(30)));
        }));
    }
    runtime.block_on(async {
        let zcrx = common::copy_runtime(16, 16 * 1024);
        copy_mode_moves(&zcrx, 1, 200_000).await;

        let before = every_thread();
        assert!(before.len() >= 9, "{} threads: {before:?}", before.len());
        if is_root() {
            for (tid, caps) in &before {
                assert_ne!(caps.sets["CapEff:"] & NET_ADMIN, 0, "{tid} {caps:?}");
            }
        }

        Zcrx::drop_privileges(DropPrivileges::all().keep(Capability::NET_BIND_SERVICE))
            .expect("drop in every thread");

        let after = every_thread();
        for (tid, caps) in &after {
            assert_eq!(
                caps.all_sets() & !NET_BIND_SERVICE,
                0,
                "thread {tid} ({}) kept more than CAP_NET_BIND_SERVICE: {caps:?}",
                caps.name
            );
            assert_eq!(caps.sets["CapAmb:"], 0, "{tid} {caps:?}");
            if is_root() {
                // Kept where it was held.
                assert_ne!(caps.sets["CapEff:"] & NET_BIND_SERVICE, 0, "{tid} {caps:?}");
            }
        }
        for tid in before.keys() {
            assert!(
                after.contains_key(tid),
                "thread {tid} is gone after the drop"
            );
        }
        println!(
            "dropped in {} threads ({}); each now holds only CAP_NET_BIND_SERVICE",
            after.len(),
            after
                .values()
                .map(|caps| caps.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );

        // Threads started after the drop inherit it: a std thread, a new blocking-pool
        // thread (the three above are busy), a task on the workers.
        let spawned = std::thread::spawn(this_thread).join().unwrap();
        let pooled = tokio::task::spawn_blocking(this_thread).await.unwrap();
        let worker = tokio::spawn(async { this_thread() }).await.unwrap();
        for caps in [spawned, pooled, worker] {
            assert_eq!(caps.all_sets() & !NET_BIND_SERVICE, 0, "{caps:?}");
        }

        // Copy mode needs no privilege: the runtime built before and one built after work.
        copy_mode_moves(&zcrx, 2, 300_000).await;
        let later = common::copy_runtime(16, 16 * 1024);
        copy_mode_moves(&later, 3, 100_000).await;

        // Anything that needs CAP_NET_ADMIN says the process dropped it.
        for builder in [
            Zcrx::builder().mode(Mode::NoDevice),
            Zcrx::builder().mode(Mode::Nic).interface("lo", 0),
        ] {
            let err = builder.build().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::PrivilegesDropped, "{err}");
            let text = err.to_string();
            for needle in ["gave up CAP_NET_ADMIN", "drop_privileges", "s ago", "UTC"] {
                assert!(text.contains(needle), "{needle:?} missing: {text}");
            }
            let io: io::Error = err.into();
            assert_eq!(io.kind(), io::ErrorKind::PermissionDenied);
        }
        let auto = Zcrx::builder().interface("lo", 0).build().unwrap();
        assert_eq!(auto.mode(), tokio_zcrx::ActiveMode::Copy);
        let selection = auto.mode_selection().to_string();
        assert!(selection.contains("gave up CAP_NET_ADMIN"), "{selection}");
        println!("auto mode after the drop: {selection}");

        // Dropping again, keeping nothing, takes CAP_NET_BIND_SERVICE too, except from the
        // bounding set: CAP_SETPCAP went with the first drop.
        Zcrx::drop_privileges(DropPrivileges::all()).expect("a second drop");
        for (tid, caps) in every_thread() {
            assert_eq!(caps.all_sets(), caps.sets["CapBnd:"], "{tid} {caps:?}");
            assert_eq!(
                caps.sets["CapBnd:"] & !NET_BIND_SERVICE,
                0,
                "{tid} {caps:?}"
            );
        }
    });
    drop(blocking_tx);
    drop(release_tx);
    for thread in parked {
        thread.join().unwrap();
    }
    for task in blocking {
        runtime.block_on(task).unwrap();
    }
}

#[test]
fn a_handler_on_the_drop_signal_is_refused_and_nothing_is_dropped() {
    if !in_child() {
        return run_in_child(
            "a_handler_on_the_drop_signal_is_refused_and_nothing_is_dropped",
            |_| {},
        );
    }
    extern "C" fn applications_handler(_: libc::c_int) {}
    let signal = libc::SIGRTMIN() + 7;
    // SAFETY: installs a handler that does nothing, for a signal nobody sends.
    let previous = unsafe {
        libc::signal(
            signal,
            applications_handler as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    assert_eq!(previous, libc::SIG_DFL);
    let before = this_thread();
    let err = Zcrx::drop_privileges(DropPrivileges::all()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PrivilegeDropFailed, "{err}");
    let text = err.to_string();
    assert!(text.contains("SIGRTMIN+7"), "{text}");
    assert!(text.contains("Nothing was dropped"), "{text}");
    assert_eq!(this_thread().sets, before.sets);
    // The application's handler is still in place.
    // SAFETY: restores the handler just read back.
    let current = unsafe { libc::signal(signal, libc::SIG_DFL) };
    assert_eq!(
        current,
        applications_handler as extern "C" fn(libc::c_int) as libc::sighandler_t
    );
    // And a registration is not blamed on a drop that did not happen.
    let err = Zcrx::builder()
        .mode(Mode::Nic)
        .interface("lo", 0)
        .build()
        .unwrap_err();
    assert_ne!(err.kind(), ErrorKind::PrivilegesDropped, "{err}");
}

/// Drops CAP_NET_ADMIN from the bounding and inheritable sets of a forked child before it
/// execs, so that the exec (as root) gives it every capability but that one.
fn without_net_admin(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and calls only raw system
    // calls (async-signal-safe).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_CAPBSET_DROP, 12 as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn without_cap_net_admin_the_error_names_it_and_the_ways_to_grant_it() {
    if !in_child() {
        return run_in_child(
            "without_cap_net_admin_the_error_names_it_and_the_ways_to_grant_it",
            |command| {
                if is_root() {
                    without_net_admin(command);
                }
            },
        );
    }
    let caps = this_thread();
    assert_eq!(caps.all_sets() & NET_ADMIN, 0, "{caps:?}");
    let err = Zcrx::builder()
        .mode(Mode::Nic)
        .interface("lo", 0)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    let text = err.to_string();
    for needle in [
        "needs CAP_NET_ADMIN",
        "setcap cap_net_admin+ep",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "setpriv",
        "--ambient-caps +net_admin",
        "drop_privileges",
    ] {
        assert!(text.contains(needle), "{needle:?} missing: {text}");
    }
    println!("nic mode without CAP_NET_ADMIN: {text}");
    // Auto mode says so, and falls back to copy.
    let auto = Zcrx::builder().interface("lo", 0).build().unwrap();
    assert_eq!(auto.mode(), tokio_zcrx::ActiveMode::Copy);
    let selection = auto.mode_selection().to_string();
    assert!(
        selection.contains("nic: registering a zcrx queue needs CAP_NET_ADMIN"),
        "{selection}"
    );
    // So does the probe.
    let report = tokio_zcrx::probe::run(&tokio_zcrx::probe::ProbeOptions::new());
    assert_eq!(report.cap_net_admin.effective, Some(false));
    assert!(
        report.cap_net_admin.summary.contains("setcap"),
        "{}",
        report.cap_net_admin.summary
    );
    // Dropping what it never had does not make the drop the reason.
    Zcrx::drop_privileges(DropPrivileges::all()).unwrap();
    let err = Zcrx::builder()
        .mode(Mode::Nic)
        .interface("lo", 0)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
}

/// Makes a forked child (of a root parent) run as `nobody` with CAP_NET_ADMIN as its only
/// capability, in its ambient set so that it survives the exec: what
/// `setpriv --reuid nobody --inh-caps +net_admin --ambient-caps +net_admin` or a systemd unit
/// with `AmbientCapabilities=CAP_NET_ADMIN` does.
fn as_nobody_with_ambient_net_admin(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and calls only raw system
    // calls (async-signal-safe); the capset arguments live on its stack during the call.
    unsafe {
        command.pre_exec(|| {
            let check = |result: libc::c_long| {
                if result == -1 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            let nobody = 65534 as libc::c_long;
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong).into())?;
            check(libc::syscall(
                libc::SYS_setgroups,
                0,
                std::ptr::null::<u32>(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, nobody, nobody, nobody))?;
            check(libc::syscall(libc::SYS_setresuid, nobody, nobody, nobody))?;
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            let mut header = Header {
                version: 0x2008_0522,
                pid: 0,
            };
            // Effective, permitted, inheritable: CAP_NET_ADMIN only (low word; high word 0).
            let data: [u32; 6] = [
                NET_ADMIN as u32,
                NET_ADMIN as u32,
                NET_ADMIN as u32,
                0,
                0,
                0,
            ];
            check(libc::syscall(
                libc::SYS_capset,
                &mut header as *mut Header,
                data.as_ptr(),
            ))?;
            check(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    12 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
                .into(),
            )?;
            Ok(())
        });
    }
}

#[test]
fn a_non_root_service_with_ambient_cap_net_admin_drops_it() {
    if !in_child() {
        if !is_root() {
            // Only root can start a child as another user with a capability; without root
            // this process lacks CAP_NET_ADMIN itself, which the test above covers.
            println!("not root: the non-root service case needs root to set it up");
            return;
        }
        return run_in_child(
            "a_non_root_service_with_ambient_cap_net_admin_drops_it",
            as_nobody_with_ambient_net_admin,
        );
    }
    assert!(!is_root());
    let caps = this_thread();
    assert_eq!(caps.sets["CapEff:"], NET_ADMIN, "{caps:?}");
    assert_eq!(caps.sets["CapAmb:"], NET_ADMIN, "{caps:?}");
    assert_eq!(caps.sets["CapEff:"] & SETPCAP, 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // The capability gets past the kernel's check: lo is refused for being lo.
        let err = Zcrx::builder()
            .mode(Mode::Nic)
            .interface("lo", 0)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InterfaceUnsupported, "{err}");
        let zcrx = common::copy_runtime(8, 16 * 1024);

        Zcrx::drop_privileges(DropPrivileges::all()).expect("drop without CAP_SETPCAP");
        let threads = every_thread();
        assert!(threads.len() >= 4, "{threads:?}");
        for (tid, caps) in &threads {
            for set in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
                assert_eq!(caps.sets[set], 0, "thread {tid} {set} {caps:?}");
            }
            // Without CAP_SETPCAP the bounding set cannot change; the service manager's
            // CapabilityBoundingSet= is what limits it.
            assert_ne!(caps.sets["CapBnd:"] & NET_ADMIN, 0, "{caps:?}");
        }
        copy_mode_moves(&zcrx, 4, 100_000).await;
        let err = Zcrx::builder()
            .mode(Mode::Nic)
            .interface("lo", 0)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PrivilegesDropped, "{err}");
        println!(
            "uid {}: ambient CAP_NET_ADMIN dropped in {} threads",
            // SAFETY: getuid takes no arguments and cannot fail.
            unsafe { libc::getuid() },
            threads.len()
        );
    });
}

#[test]
fn a_thread_that_blocks_the_signal_is_named() {
    if !in_child() {
        return run_in_child("a_thread_that_blocks_the_signal_is_named", |_| {});
    }
    let (blocked_tx, blocked_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let stubborn = std::thread::Builder::new()
        .name("blocks-rtsig".into())
        .spawn(move || {
            // SAFETY: sigset_t is plain data; the calls only change this thread's mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGRTMIN() + 7);
                assert_eq!(
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                    0
                );
            }
            blocked_tx.send(()).unwrap();
            let _ = release_rx.recv();
        })
        .unwrap();
    blocked_rx.recv().unwrap();
    let started = std::time::Instant::now();
    let err = Zcrx::drop_privileges(DropPrivileges::all()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PrivilegeDropFailed, "{err}");
    let text = err.to_string();
    for needle in [
        "(blocks-rtsig)",
        "blocks signal",
        "SIGRTMIN+7",
        "within 5 s",
    ] {
        assert!(text.contains(needle), "{needle:?} missing: {text}");
    }
    assert!(started.elapsed() >= Duration::from_secs(5));
    println!("{text}");
    drop(release_tx);
    stubborn.join().unwrap();
}
