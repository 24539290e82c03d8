//! Idle CPU on the host: the driver thread's CPU time over an idle second after traffic.
//!
//! The synthetic kernel runs on the driver thread and blocks like `io_uring_enter` when it
//! has nothing to deliver, so what is measured is the driver's own loop. Each state must
//! cost under 10 ms of CPU per idle second.

use std::time::Duration;

use futures::StreamExt;

use super::super::synthetic::personality::{Personality, Registration};
use super::super::synthetic::ring::{Path, StreamPlan};
use super::super::synthetic::SyntheticConfig;
use super::runtime;
use super::scenarios::{check, Harness};

const IDLE: Duration = Duration::from_secs(1);
const LIMIT: Duration = Duration::from_millis(10);
const CHUNK: u64 = 4096;

/// The id of this process's thread named `name` (names are unique per test). A new thread
/// names itself once it runs, which on a loaded machine can take a while: look for 5 s.
fn thread_id(name: &str) -> libc::pid_t {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                return entry.file_name().to_string_lossy().parse().unwrap();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no thread named {name}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// CPU time (user + system) of thread `tid` of this process, in nanoseconds: the kernel's
/// per-thread CPU clock (`MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`), exact to the
/// nanosecond where /proc's utime and stime count 10 ms ticks.
fn thread_cpu(tid: libc::pid_t) -> Duration {
    let clock = ((!tid) << 3) | 6;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec to a live local; the clock id names a thread of ours.
    unsafe { crate::sys::syscall!(clock_gettime(clock as libc::clockid_t, &mut ts)) }
        .expect("clock_gettime of a thread of ours");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The driver thread's CPU over one idle second.
async fn idle_cpu(name: &str) -> Duration {
    // Let the last traffic settle (back-offs, timers) before measuring.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tid = thread_id(name);
    let before = thread_cpu(tid);
    tokio::time::sleep(IDLE).await;
    thread_cpu(tid) - before
}

/// The kernels the idle tests run on: the oldest and the newest (a subset of
/// `scenarios::KERNELS`), each with the suffix of the driver thread's name.
const IDLE_KERNELS: [(Personality, Registration, &str); 2] = [
    (Personality::Linux6_18, Registration::Nic, "618"),
    (Personality::Linux7_3, Registration::NoDevice, "73"),
];

/// After traffic, with every buffer still held by the application.
#[test]
fn idle_with_buffers_held() {
    for (personality, registration, short) in IDLE_KERNELS {
        let name = format!("tzx-held-{short}");
        let cpu = runtime().block_on(async {
            let h = Harness::start(SyntheticConfig {
                thread_name: name.clone(),
                // Holds more than a stream's budget on purpose: budgets off.
                stream_budget: Some(u64::MAX),
                ..SyntheticConfig::new(personality, registration)
            })
            .await;
            let (mut stream, _writer, _client) = h.connect(StreamPlan::new(1, 32 * CHUNK)).await;
            let (mut held, mut position) = (Vec::new(), 0);
            while let Some(buf) = stream.next().await {
                let buf = buf.unwrap();
                check(1, &mut position, &buf);
                held.push(buf);
            }
            assert_eq!(h.zcrx.stats().buffers_outstanding, 32);
            let cpu = idle_cpu(&name).await;
            drop(held);
            h.zcrx.shutdown().await;
            cpu
        });
        eprintln!("idle CPU, buffers held, {personality} {registration:?}: {cpu:?}");
        assert!(
            cpu < LIMIT,
            "{personality}: {cpu:?} of CPU in an idle second"
        );
    }
}

/// Returns waiting in the overflow list: a refill ring of 4 entries, 64 chunks dropped at
/// once, on a kernel that consumes the ring only when its page pool needs buffers
/// (6.15-6.18 NIC: no FLUSH_RQ), so they stay there.
#[test]
fn idle_with_overflow_pending() {
    let name = "tzx-overflow";
    let cpu = runtime().block_on(async {
        let h = Harness::start(SyntheticConfig {
            refill_entries: Some(4),
            thread_name: name.into(),
            // Holds more than a stream's budget on purpose: budgets off.
            stream_budget: Some(u64::MAX),
            ..SyntheticConfig::new(Personality::Linux6_18, Registration::Nic)
        })
        .await;
        let (mut stream, _writer, _client) = h.connect(StreamPlan::new(2, 64 * CHUNK)).await;
        let (mut held, mut position) = (Vec::new(), 0);
        while let Some(buf) = stream.next().await {
            let buf = buf.unwrap();
            check(2, &mut position, &buf);
            held.push(buf);
        }
        assert_eq!(position, 64 * CHUNK);
        std::thread::spawn(move || drop(held)).join().unwrap();
        // The page pool takes what the ring holds once (it has no free chunk), the driver
        // moves that many in from the overflow list, and then nothing moves: wait for that.
        let mut pending = h.area().refill.stats().overflow_pending;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = h.area().refill.stats().overflow_pending;
            if now == pending {
                break;
            }
            pending = now;
        }
        assert!(pending > 0, "nothing overflowed");
        let cpu = idle_cpu(name).await;
        assert_eq!(
            h.area().refill.stats().overflow_pending,
            pending,
            "the overflow list changed while idle"
        );
        h.zcrx.shutdown().await;
        cpu
    });
    eprintln!("idle CPU, overflow pending, 6.15-6.18 Nic: {cpu:?}");
    assert!(cpu < LIMIT, "{cpu:?} of CPU in an idle second");
}

/// A stream whose receive waited for buffers (copy path, area exhausted) was closed while
/// the buffers are still held (defect E: the driver kept polling with a zero timeout).
#[test]
fn idle_after_closing_a_stream_that_waited_for_buffers() {
    for (personality, registration, short) in IDLE_KERNELS {
        let name = format!("tzx-closed-{short}");
        let cpu = runtime().block_on(async {
            let h = Harness::start(SyntheticConfig {
                area_chunks: 16,
                thread_name: name.clone(),
                // Holds more than a stream's budget on purpose: budgets off.
                stream_budget: Some(u64::MAX),
                ..SyntheticConfig::new(personality, registration)
            })
            .await;
            let plan = StreamPlan {
                path: Path::Copy,
                ..StreamPlan::new(3, 64 * CHUNK)
            };
            let (mut stream, _writer, _client) = h.connect(plan).await;
            let (mut held, mut position) = (Vec::new(), 0);
            while held.len() < 16 {
                let buf = stream.next().await.unwrap().unwrap();
                check(3, &mut position, &buf);
                held.push(buf);
            }
            h.until("the receive ran out of area", |h| {
                h.control.report().enomem_answers > 0
            })
            .await;
            drop(stream);
            h.until("the closed stream's slot is free", |h| h.live_slots() == 0)
                .await;
            let cpu = idle_cpu(&name).await;
            drop(held);
            h.zcrx.shutdown().await;
            cpu
        });
        eprintln!(
            "idle CPU, closed while waiting for buffers, {personality} {registration:?}: {cpu:?}"
        );
        assert!(
            cpu < LIMIT,
            "{personality}: {cpu:?} of CPU in an idle second"
        );
    }
}

/// The measurement measures: a thread that spins shows its CPU.
#[test]
fn the_thread_clock_sees_a_busy_thread() {
    let (tx, rx) = std::sync::mpsc::channel();
    let spinner = std::thread::Builder::new()
        .name("tzx-spinner".into())
        .spawn(move || {
            let start = std::time::Instant::now();
            while rx.try_recv().is_err() && start.elapsed() < Duration::from_secs(5) {
                std::hint::spin_loop();
            }
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let tid = thread_id("tzx-spinner");
    let before = thread_cpu(tid);
    std::thread::sleep(Duration::from_millis(300));
    let busy = thread_cpu(tid) - before;
    tx.send(()).unwrap();
    spinner.join().unwrap();
    // Even on a loaded machine a spinning thread gets far more than the idle limit.
    assert!(busy > 2 * LIMIT, "{busy:?}");
}

/// Streams paused by their budget (their readers hold what they got, the peers have more
/// to send), with the area under pressure: the driver sleeps until a reader drops buffers.
#[test]
fn idle_with_paused_streams() {
    for (personality, registration, short) in IDLE_KERNELS {
        let name = format!("tzx-paused-{short}");
        let cpu = runtime().block_on(async {
            let h = Harness::start(SyntheticConfig {
                area_chunks: 64,
                thread_name: name.clone(),
                ..SyntheticConfig::new(personality, registration)
            })
            .await;
            let mut streams = Vec::new();
            let mut held = Vec::new();
            for seed in 0..8 {
                let (mut stream, writer, client) =
                    h.connect(StreamPlan::new(seed, 64 * CHUNK)).await;
                let mut position = 0;
                while let Ok(Some(buf)) =
                    tokio::time::timeout(Duration::from_millis(20), stream.next()).await
                {
                    let buf = buf.unwrap();
                    check(seed, &mut position, &buf);
                    held.push(buf);
                }
                assert!(position < 64 * CHUNK, "stream {seed} was not paused");
                streams.push((stream, writer, client));
            }
            h.until("every stream is paused", |h| {
                h.zcrx.stats().streams_paused == 8
            })
            .await;
            let cpu = idle_cpu(&name).await;
            assert_eq!(h.zcrx.stats().streams_paused, 8);
            drop(held);
            drop(streams);
            h.zcrx.shutdown().await;
            cpu
        });
        eprintln!("idle CPU, streams paused, {personality} {registration:?}: {cpu:?}");
        assert!(
            cpu < LIMIT,
            "{personality}: {cpu:?} of CPU in an idle second"
        );
    }
}
