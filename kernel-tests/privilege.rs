//! Least privilege on a real zcrx kernel, in the QEMU guest: a server registers its nic and
//! nodev instances, gives up CAP_NET_ADMIN (and every other capability) for the whole
//! process, and goes on receiving: zero copy, refills, event re-arming, flushes, new
//! connections. A later registration fails with the typed error; a process that never had the
//! capability is told how to get it. The kernel facts underneath (Linux 7.3: only
//! `io_register_zcrx` checks `capable(CAP_NET_ADMIN)`, importing an exported instance
//! included; ZCRX_CTRL_FLUSH_RQ, ARM_EVENT, EXPORT and ADD_AREA do not) are checked with raw
//! calls too.
//!
//! A drop cannot be undone, so each test runs its body in a child process: the test re-runs
//! this binary with `--exact <its own name>` and `TZX_PRIVILEGE_CHILD` set.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures::StreamExt;
use io_uring::{cqueue, squeue, IoUring};
use tokio::net::TcpListener;
use tokio_zcrx::{ActiveMode, AreaGrowth, DropPrivileges, ErrorKind, EventKind, Zcrx};
use tokio_zcrx_kernel_tests::support::{
    accept, assert_all_copied, build, nic, nodev, read_verified, read_verified_from, runtime,
};
use tokio_zcrx_kernel_tests::{
    enter_netns, first_mismatch, spawn_sender, Config, GuestKernel, GuestNet, Mmap, RawZcrx, Target,
};
use zcrx_sys::ctrl::{zcrx_add_area, zcrx_export};
use zcrx_sys::zcrx::{
    io_uring_zcrx_area_reg, io_uring_zcrx_ifq_reg, register_zcrx_ifq, ZCRX_REG_IMPORT,
};

const CHILD: &str = "TZX_PRIVILEGE_CHILD";
const NET_ADMIN: u64 = 1 << 12;

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs the test `name` of this binary in a child process prepared by `prepare`, and fails
/// unless the child ran exactly that test and it passed.
fn run_in_child(name: &str, prepare: impl FnOnce(&mut Command)) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            name,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1");
    prepare(&mut command);
    let output = command.output().expect("run this test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
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

async fn listen(ip: &str) -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Senders in the peer's network namespace, available after the drop: entering a namespace
/// (setns) needs CAP_SYS_ADMIN, so one thread enters it before, and the threads it starts
/// later share its namespace.
struct PeerSenders {
    requests: mpsc::Sender<(SocketAddr, u64, mpsc::Sender<JoinHandle<u64>>)>,
}

impl PeerSenders {
    fn start(netns: String) -> PeerSenders {
        let (requests, incoming) =
            mpsc::channel::<(SocketAddr, u64, mpsc::Sender<JoinHandle<u64>>)>();
        std::thread::Builder::new()
            .name("peer-senders".into())
            .spawn(move || {
                enter_netns(&netns);
                for (addr, total, reply) in incoming {
                    let _ = reply.send(spawn_sender(addr, total, None));
                }
            })
            .unwrap();
        PeerSenders { requests }
    }

    fn send(&self, addr: SocketAddr, total: u64) -> JoinHandle<u64> {
        let (reply, handle) = mpsc::channel();
        self.requests.send((addr, total, reply)).unwrap();
        handle.recv().unwrap()
    }
}

/// Threads of this process (io_uring's own workers aside, see `Zcrx::drop_privileges`) that
/// hold any capability in their effective, permitted, inheritable or ambient set, as
/// `tid name: set mask`; and how many threads were read.
fn threads_holding_capabilities() -> (Vec<String>, usize) {
    let mut holding = Vec::new();
    let mut read = 0;
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let tid = entry.unwrap().file_name().into_string().unwrap();
        let Ok(name) = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")) else {
            continue;
        };
        let name = name.trim();
        if name.starts_with("iou-") {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        read += 1;
        for field in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
            let mask = status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .map(|value| u64::from_str_radix(value.trim(), 16).unwrap())
                .unwrap();
            if mask != 0 {
                holding.push(format!("{tid} {name}: {field} {mask:x}"));
            }
        }
    }
    (holding, read)
}

/// Waits up to 10 s for an event of `kind`.
async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<tokio_zcrx::Event>,
    kind: EventKind,
) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if events.recv().await.unwrap().kind == kind {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} event within 10 s"));
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn registered_queues_keep_receiving_after_the_drop() {
    if !in_child() {
        return run_in_child("registered_queues_keep_receiving_after_the_drop", |_| {});
    }
    const NIC_ROUND: u64 = 16 << 20;
    const NODEV_TOTAL: u64 = 16 << 20;
    let net = GuestNet::from_env();
    let peer = PeerSenders::start(net.peer_netns.clone());
    runtime().block_on(async {
        // Everything that needs CAP_NET_ADMIN happens here, before the drop.
        let nic_zcrx = build(
            nic(&net)
                .area_size(4 << 20)
                .event_rearm_interval(Duration::ZERO),
        );
        let nodev_zcrx = build(
            nodev()
                .area_size(1 << 20)
                .event_rearm_interval(Duration::ZERO),
        );
        // 7.3: an instance whose area grows (ZCRX_CTRL_ADD_AREA) after the drop. 7.2 has no
        // such op and refuses the policy at build (area_growth.rs asserts that).
        let growing = GuestKernel::running().has_add_area().then(|| {
            build(
                nodev()
                    .area_growth(AreaGrowth {
                        initial: 256 << 10,
                        step: 256 << 10,
                        maximum: 2 << 20,
                    })
                    .stream_budget(u64::MAX)
                    .event_rearm_interval(Duration::ZERO),
            )
        });
        let (nic_listener, nic_addr) = listen(&net.nic_addr).await;
        let (copied_listener, copied_addr) = listen("127.0.0.1").await;
        let (nodev_listener, nodev_addr) = listen("127.0.0.1").await;
        let (growing_listener, growing_addr) = listen("127.0.0.1").await;

        Zcrx::drop_privileges(DropPrivileges::all()).expect("drop in every thread");
        let (holding, threads) = threads_holding_capabilities();
        assert!(holding.is_empty(), "still holding: {holding:?}");
        println!("no capability left in any of {threads} threads");
        // The drop's signal interrupts each driver once (io_uring_enter answers EINTR, retried
        // and counted): from here on, nothing may count as a fault.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let faults = (
            nic_zcrx.stats().faults_survived,
            nodev_zcrx.stats().faults_survived,
        );

        // Zero copy over netdevsim, connection after connection (16 MiB each through a 4 MiB
        // area: the refill ring recycles every chunk several times).
        for round in 0..2 {
            let sender = peer.send(nic_addr, NIC_ROUND);
            let stream = accept(&nic_zcrx, &nic_listener).await;
            assert_eq!(read_verified(stream).await, NIC_ROUND, "round {round}");
            assert_eq!(sender.join().unwrap(), NIC_ROUND);
        }
        let stats = nic_zcrx.stats();
        println!("nic after the drop: {stats}");
        assert_eq!(stats.copy_bytes, Some(0), "zero copy expected: {stats}");
        assert_eq!(stats.copy_count, Some(0), "{stats}");
        assert_eq!(stats.bytes, 2 * NIC_ROUND);
        assert_eq!(stats.buffers_outstanding, 0);

        // Events fire and are re-armed (ZCRX_CTRL_ARM_EVENT) without the capability: loopback
        // traffic to the NIC instance is copied, once per connection here.
        let mut nic_events = nic_zcrx.subscribe();
        for _ in 0..2 {
            let sender = spawn_sender(copied_addr, 1 << 20, None);
            let stream = accept(&nic_zcrx, &copied_listener).await;
            assert_eq!(read_verified(stream).await, 1 << 20);
            sender.join().unwrap();
            next_event(&mut nic_events, EventKind::CopyFallback).await;
        }

        // NODEV: 16 MiB through a 1 MiB area, which only ZCRX_CTRL_FLUSH_RQ gives back; copy
        // events re-armed as they fire.
        let mut nodev_events = nodev_zcrx.subscribe();
        let sender = spawn_sender(nodev_addr, NODEV_TOTAL, None);
        let stream = accept(&nodev_zcrx, &nodev_listener).await;
        assert_eq!(read_verified(stream).await, NODEV_TOTAL);
        sender.join().unwrap();
        let stats = nodev_zcrx.stats();
        println!("nodev after the drop: {stats}");
        assert_all_copied(&stats, NODEV_TOTAL);
        let mut copy_events = 0;
        while let Ok(event) = nodev_events.try_recv() {
            copy_events += usize::from(event.kind == EventKind::CopyFallback);
        }
        assert!(copy_events >= 2, "{copy_events} copy events: not re-armed");
        assert_eq!(
            (
                nic_zcrx.stats().faults_survived,
                nodev_zcrx.stats().faults_survived
            ),
            faults,
            "a control call was refused after the drop"
        );

        // The area grows without the capability: a reader holds every buffer until the
        // driver has added two areas, then reads the rest; every byte checked.
        if let Some(growing) = &growing {
            const GROWING_TOTAL: u64 = 4 << 20;
            let sender = spawn_sender(growing_addr, GROWING_TOTAL, None);
            let mut stream = accept(growing, &growing_listener).await;
            let (mut held, mut position) = (Vec::new(), 0u64);
            while growing.stats().areas < 3 {
                let buf = tokio::time::timeout(Duration::from_secs(10), stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("no growth after the drop: {}", growing.stats()))
                    .expect("the stream ended before the area grew")
                    .expect("stream error");
                assert_eq!(first_mismatch(position, &buf), None);
                position += buf.len() as u64;
                held.push(buf);
            }
            let grown = growing.stats();
            println!("grown after the drop: {grown}");
            assert!(grown.memory_capacity >= 3 * (256 << 10), "{grown}");
            drop(held);
            assert_eq!(read_verified_from(stream, position).await, GROWING_TOTAL);
            sender.join().unwrap();
            assert_eq!(growing.stats().faults_survived, 0, "{}", growing.stats());
        }

        // Anything that would register again says the process dropped the capability.
        for builder in [nic(&net), nodev()] {
            let err = builder.build().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::PrivilegesDropped, "{err}");
            assert!(err.to_string().contains("gave up CAP_NET_ADMIN"), "{err}");
        }
        // Shutting down works; restarting a binding is a registration.
        nic_zcrx.shutdown().await;
        nodev_zcrx.shutdown().await;
        if let Some(growing) = growing {
            growing.shutdown().await;
        }
        let err = nic(&net).build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PrivilegesDropped, "{err}");
        println!("restart after the drop: {err}");
        let auto = Zcrx::builder().interface(&net.nic, 0).build().unwrap();
        assert_eq!(auto.mode(), ActiveMode::Copy);
        let selection = auto.mode_selection().to_string();
        let expected = format!(
            "nic: cannot register {} rx queue 0: this process gave up",
            net.nic
        );
        assert!(selection.contains(&expected), "{selection}");
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn the_kernel_checks_the_capability_only_to_register() {
    if !in_child() {
        return run_in_child("the_kernel_checks_the_capability_only_to_register", |_| {});
    }
    let config = Config {
        target: Target::Nodev,
        area_bytes: 1 << 20,
        rq_entries: 64,
        cq_entries: 256,
        events: false,
    };
    let mut raw = RawZcrx::register(config).expect("NODEV registration as root");
    Zcrx::drop_privileges(DropPrivileges::all()).expect("drop");

    // Growing the area (ZCRX_CTRL_ADD_AREA, 7.3) needs no capability; 7.2 has no such op
    // and says so (EOPNOTSUPP, not EPERM) without the capability too.
    let extra = Mmap::new(1 << 20).unwrap();
    let mut area = io_uring_zcrx_area_reg {
        addr: extra.as_ptr() as u64,
        len: extra.len() as u64,
        ..Default::default()
    };
    // SAFETY: `extra` is a fresh mapping nothing else refers to, dropped after the ring.
    let added = unsafe { zcrx_add_area(raw.ring.as_fd(), raw.zcrx_id, &mut area) };
    if GuestKernel::running().has_add_area() {
        added.expect("ZCRX_CTRL_ADD_AREA without CAP_NET_ADMIN");
        assert_ne!(area.rq_area_token, 0, "the second area's token");
    } else {
        let errno = added.expect_err("7.2 has no ZCRX_CTRL_ADD_AREA");
        assert_eq!(errno.raw_os_error(), Some(libc::EOPNOTSUPP), "{errno}");
    }
    // Nor does a flush (nothing to return yet: it still reaches the kernel's handler).
    zcrx_sys::ctrl::zcrx_flush_rq(raw.ring.as_fd(), raw.zcrx_id)
        .expect("ZCRX_CTRL_FLUSH_RQ without CAP_NET_ADMIN");
    raw.flush().unwrap();
    // Nor does exporting the instance...
    let exported =
        zcrx_export(raw.ring.as_fd(), raw.zcrx_id).expect("ZCRX_CTRL_EXPORT without CAP_NET_ADMIN");
    // ...but importing it is checked like a registration: a privileged launcher cannot hand a
    // registered instance to a process without the capability.
    let ring = IoUring::<squeue::Entry, cqueue::Entry32>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
        .unwrap();
    let mut import = io_uring_zcrx_ifq_reg {
        if_idx: exported.as_raw_fd() as u32,
        flags: ZCRX_REG_IMPORT,
        ..Default::default()
    };
    // SAFETY: an import request carries no pointers (area and region are 0).
    let refused = unsafe { register_zcrx_ifq(ring.as_fd(), &mut import) }.unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EPERM), "{refused}");
    // And a new registration is refused by the kernel itself.
    let refused = RawZcrx::register(config).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EPERM), "{refused}");
    drop(raw);
    drop(extra);
}

/// Drops CAP_NET_ADMIN from the bounding set of a forked child before it execs, so that the
/// exec (as root) gives it every capability but that one.
fn without_net_admin(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and makes one raw system call
    // (async-signal-safe).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_CAPBSET_DROP, 12 as libc::c_ulong) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn without_the_capability_every_mode_names_it() {
    if !in_child() {
        return run_in_child(
            "without_the_capability_every_mode_names_it",
            without_net_admin,
        );
    }
    let net = GuestNet::from_env();
    let (holding, _) = threads_holding_capabilities();
    assert!(!holding.is_empty(), "root keeps its other capabilities");
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .map(|value| u64::from_str_radix(value.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(effective & NET_ADMIN, 0, "{effective:x}");
    runtime().block_on(async {
        for builder in [nic(&net), nodev()] {
            let err = builder.build().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM));
            let text = err.to_string();
            for needle in [
                "needs CAP_NET_ADMIN",
                "setcap cap_net_admin+ep",
                "AmbientCapabilities=CAP_NET_ADMIN",
                "setpriv",
            ] {
                assert!(text.contains(needle), "{needle:?} missing: {text}");
            }
        }
        let auto = Zcrx::builder().interface(&net.nic, 0).build().unwrap();
        assert_eq!(auto.mode(), ActiveMode::Copy);
        let selection = auto.mode_selection().to_string();
        println!("auto without CAP_NET_ADMIN: {selection}");
        for mode in ["nic", "nodev"] {
            assert!(
                selection.contains(&format!(
                    "{mode}: registering a zcrx queue needs CAP_NET_ADMIN"
                )),
                "{selection}"
            );
        }
    });
    let report = tokio_zcrx::probe::run(&tokio_zcrx::probe::ProbeOptions::new());
    assert_eq!(report.cap_net_admin.effective, Some(false));
}

const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";

/// Puts `kernel.io_uring_disabled` back to what it was, even when the test fails.
struct RestoreIoUringDisabled(String);

impl Drop for RestoreIoUringDisabled {
    fn drop(&mut self) {
        std::fs::write(IO_URING_DISABLED, &self.0).expect("restore kernel.io_uring_disabled");
    }
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn io_uring_disabled_and_auto_mode() {
    if !in_child() {
        // The sysctl is the guest's, not the child's: the parent restores it.
        let _restore = RestoreIoUringDisabled(std::fs::read_to_string(IO_URING_DISABLED).unwrap());
        return run_in_child("io_uring_disabled_and_auto_mode", |_| {});
    }
    const TOTAL: u64 = 4 << 20;
    let net = GuestNet::from_env();
    let peer = PeerSenders::start(net.peer_netns.clone());
    runtime().block_on(async {
        // 2: nobody may create a ring; auto says so and receives in copy mode.
        std::fs::write(IO_URING_DISABLED, "2").unwrap();
        let auto = Zcrx::builder().interface(&net.nic, 0).build().unwrap();
        assert_eq!(auto.mode(), ActiveMode::Copy);
        let selection = auto.mode_selection().to_string();
        println!("io_uring_disabled = 2, auto: {selection}");
        assert!(
            selection.contains("disabled system-wide (kernel.io_uring_disabled = 2)"),
            "{selection}"
        );
        let err = nic(&net).build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::IoUringUnavailable, "{err}");

        // 1: only CAP_SYS_ADMIN or kernel.io_uring_group may create a ring. Root registers;
        // after the drop that ring keeps receiving, while a new ring is refused.
        std::fs::write(IO_URING_DISABLED, "1").unwrap();
        let zcrx = build(nic(&net).area_size(4 << 20));
        let (listener, addr) = listen(&net.nic_addr).await;
        Zcrx::drop_privileges(DropPrivileges::all()).expect("drop");
        let sender = peer.send(addr, TOTAL);
        let stream = accept(&zcrx, &listener).await;
        assert_eq!(read_verified(stream).await, TOTAL);
        assert_eq!(sender.join().unwrap(), TOTAL);
        assert_eq!(zcrx.stats().copy_bytes, Some(0), "{}", zcrx.stats());
        let refused = match IoUring::<squeue::Entry, cqueue::Entry>::new(4) {
            Ok(_) => panic!("a new ring was created under io_uring_disabled = 1 after the drop"),
            Err(refused) => refused,
        };
        assert_eq!(refused.raw_os_error(), Some(libc::EPERM), "{refused}");
        // The runtime's own error for a new registration names the drop first.
        let auto = Zcrx::builder().interface(&net.nic, 0).build().unwrap();
        assert_eq!(auto.mode(), ActiveMode::Copy);
        let selection = auto.mode_selection().to_string();
        println!("io_uring_disabled = 1 after the drop, auto: {selection}");
        assert!(selection.contains("gave up CAP_NET_ADMIN"), "{selection}");
        zcrx.shutdown().await;
    });
}
