//! The same runtime scenarios against every kernel personality (personality x scenario).
//!
//! Each scenario runs once per supported (personality, registration) pair, each in a fresh
//! runtime; a failure names the kernel and the scenario. Every byte delivered is checked
//! against the stream's pattern and position.

use std::io;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::AsyncReadExt;

use super::super::area::Area;
use super::super::synthetic::faults::FaultConfig;
use super::super::synthetic::pattern;
use super::super::synthetic::personality::{Personality, Registration};
use super::super::synthetic::ring::{Control, Lengths, Path, StreamPlan};
use super::super::synthetic::{start_with, SyntheticConfig, CHUNK_SIZE};
use super::super::{lock, DriverShared};
use super::{area_of, driver_shared};
use crate::{EventKind, ZcStream, ZcWriteHalf, Zcrx};

/// Every kernel the scenarios run against.
pub(super) const KERNELS: [(Personality, Registration); 7] = [
    (Personality::Linux6_18, Registration::Nic),
    (Personality::Linux7_1, Registration::Nic),
    (Personality::Linux7_1, Registration::NoDevice),
    (Personality::Linux7_2, Registration::Nic),
    (Personality::Linux7_2, Registration::NoDevice),
    (Personality::Linux7_3, Registration::Nic),
    (Personality::Linux7_3, Registration::NoDevice),
];

/// No scenario may take longer than this on any kernel.
const SCENARIO_BOUND: Duration = Duration::from_secs(20);

const CHUNK: u64 = CHUNK_SIZE as u64;

/// A synthetic runtime with what the checks need.
pub(super) struct Harness {
    pub(super) zcrx: Zcrx,
    pub(super) control: Arc<Control>,
    pub(super) shared: Arc<DriverShared>,
    listener: tokio::net::TcpListener,
}

impl Harness {
    pub(super) async fn start(config: SyntheticConfig) -> Harness {
        let (zcrx, control) = start_with(config).unwrap();
        let shared = driver_shared(&zcrx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Harness {
            zcrx,
            control,
            shared,
            listener,
        }
    }

    /// A loopback connection, attached with `plan`: stream, write half, client.
    pub(super) async fn connect(
        &self,
        plan: StreamPlan,
    ) -> (ZcStream, ZcWriteHalf, tokio::net::TcpStream) {
        let client = tokio::net::TcpStream::connect(self.listener.local_addr().unwrap())
            .await
            .unwrap();
        let (socket, _) = self.listener.accept().await.unwrap();
        self.control.plan(socket.as_raw_fd(), plan);
        let (stream, writer) = self.zcrx.attach(socket).unwrap();
        (stream, writer, client)
    }

    /// The listener's address, for connections attached by hand.
    pub(super) fn listener_addr(&self) -> std::net::SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// Accepts the next connection without attaching it.
    pub(super) async fn accept(&self) -> tokio::net::TcpStream {
        self.listener.accept().await.unwrap().0
    }

    /// Waits until every buffer is dropped and checks that the kernel saw no chunk twice.
    pub(super) async fn every_chunk_back(&self) {
        self.until("every chunk is back", |h| {
            h.zcrx.stats().buffers_outstanding == 0
        })
        .await;
        assert_eq!(self.control.report().double_returns, 0);
    }

    pub(super) fn area(&self) -> Arc<Area> {
        area_of(&self.shared).upgrade().expect("the area is alive")
    }

    pub(super) fn live_slots(&self) -> usize {
        lock(&self.shared.slots).live()
    }

    /// Waits (bounded) until `done` holds.
    pub(super) async fn until(&self, what: &str, mut done: impl FnMut(&Harness) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Checks a buffer against stream `seed` at `*position` and advances it.
pub(super) fn check(seed: u64, position: &mut u64, buf: &[u8]) {
    if let Err(at) = pattern::verify(seed, *position, buf) {
        panic!("stream {seed}: wrong byte at position {at} (buffer from {position})");
    }
    *position += buf.len() as u64;
}

/// Reads a stream to its end, checking every byte: (bytes, the error it ended with).
pub(super) async fn read_checked(stream: &mut ZcStream, seed: u64) -> (u64, Option<io::Error>) {
    let mut position = 0;
    while let Some(item) = stream.next().await {
        match item {
            Ok(buf) => check(seed, &mut position, &buf),
            Err(e) => return (position, Some(e)),
        }
    }
    (position, None)
}

fn config(personality: Personality, registration: Registration) -> SyntheticConfig {
    SyntheticConfig::new(personality, registration)
}

/// Runs `scenario` against every kernel, each in a fresh Tokio runtime within the bound;
/// fails naming every kernel it failed on.
pub(super) fn on_every_kernel<F, Fut>(name: &str, scenario: F)
where
    F: Fn(Personality, Registration) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut failures = Vec::new();
    for (personality, registration) in KERNELS {
        let runtime = super::runtime();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            runtime.block_on(async {
                tokio::time::timeout(SCENARIO_BOUND, scenario(personality, registration))
                    .await
                    .expect("the scenario hung")
            })
        }));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{personality} {registration:?}: {message}"));
        }
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
    assert!(
        failures.is_empty(),
        "{name} failed on {} of {} kernels:\n{}",
        failures.len(),
        KERNELS.len(),
        failures.join("\n")
    );
}

/// Many streams at once, zero-copy and copy path mixed (NIC mode), lengths varied: every
/// byte arrives in order, every chunk comes back, every slot is released.
#[test]
fn many_streams() {
    on_every_kernel("many_streams", |personality, registration| async move {
        let h = Harness::start(config(personality, registration)).await;
        let mut readers = Vec::new();
        for i in 0..24u64 {
            let plan = StreamPlan {
                lengths: Lengths::Varied,
                path: if i % 2 == 0 {
                    Path::ZeroCopy
                } else {
                    Path::Copy
                },
                ..StreamPlan::new(1000 + i, (20 + i) * CHUNK)
            };
            let bytes = plan.bytes;
            let (mut stream, writer, client) = h.connect(plan).await;
            readers.push(tokio::spawn(async move {
                let (received, error) = read_checked(&mut stream, 1000 + i).await;
                assert!(error.is_none(), "stream {i}: {error:?}");
                assert_eq!(received, bytes, "stream {i}");
                drop((stream, writer, client));
            }));
        }
        for reader in readers {
            reader.await.unwrap();
        }
        h.every_chunk_back().await;
        h.zcrx.shutdown().await;
    });
}

/// The area runs out while a reader holds every chunk; the stream stalls (zero-copy: the
/// NIC drops; copy path: `-ENOMEM`) and recovers, losing nothing, once they are dropped.
/// On 6.15-6.18 in NIC mode the copy path's `-ENOMEM` must not end the driver (defect A:
/// it called FLUSH_RQ, which those kernels refuse with EINVAL).
#[test]
fn area_exhaustion_and_recovery() {
    on_every_kernel(
        "area_exhaustion_and_recovery",
        |personality, registration| async move {
            for path in [Path::ZeroCopy, Path::Copy] {
                let h = Harness::start(SyntheticConfig {
                    area_chunks: 16,
                    // Exhausts the area with one stream on purpose: budgets off.
                    stream_budget: Some(u64::MAX),
                    ..config(personality, registration)
                })
                .await;
                let (mut stream, _writer, _client) = h
                    .connect(StreamPlan {
                        path,
                        ..StreamPlan::new(7, 64 * CHUNK)
                    })
                    .await;
                let mut position = 0;
                let mut held = Vec::new();
                while held.len() < 16 {
                    let buf = stream.next().await.unwrap().unwrap();
                    check(7, &mut position, &buf);
                    held.push(buf);
                }
                // Exhausted: nothing more can arrive while every chunk is held.
                let stalled = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
                assert!(
                    stalled.is_err(),
                    "{path:?}: data arrived with the area exhausted"
                );
                let report = h.control.report();
                let copy = path == Path::Copy || registration == Registration::NoDevice;
                if copy {
                    assert!(report.enomem_answers > 0, "{path:?}: no -ENOMEM");
                } else if personality.has_events() {
                    assert!(report.events[0] > 0, "no ALLOC_FAIL event");
                }
                drop(held);
                let (received, error) = read_checked_from(&mut stream, 7, position).await;
                assert!(error.is_none(), "{path:?}: the stream failed: {error:?}");
                assert_eq!(received, 64 * CHUNK, "{path:?}");
                if copy {
                    assert!(h.zcrx.stats().resubmits_area_exhausted > 0);
                }
                h.every_chunk_back().await;
                h.zcrx.shutdown().await;
            }
        },
    );
}

/// Continues [`read_checked`] from `position`.
pub(super) async fn read_checked_from(
    stream: &mut ZcStream,
    seed: u64,
    mut position: u64,
) -> (u64, Option<io::Error>) {
    while let Some(item) = stream.next().await {
        match item {
            Ok(buf) => check(seed, &mut position, &buf),
            Err(e) => return (position, Some(e)),
        }
    }
    (position, None)
}

/// A refill ring smaller than the area: a reader holds every chunk, then another thread
/// drops them all at once, so most returns land in the overflow list; they reach the
/// kernel as it consumes (page pool or FLUSH_RQ), and the stream completes.
#[test]
fn refill_overflow() {
    on_every_kernel("refill_overflow", |personality, registration| async move {
        let h = Harness::start(SyntheticConfig {
            area_chunks: 64,
            refill_entries: Some(4),
            // Holds more than a stream's budget on purpose: budgets off.
            stream_budget: Some(u64::MAX),
            ..config(personality, registration)
        })
        .await;
        let total = 300 * CHUNK;
        let (mut stream, _writer, _client) = h.connect(StreamPlan::new(11, total)).await;
        let mut position = 0;
        let mut overflowed = 0;
        while position < total {
            let mut held = Vec::new();
            while held.len() < 64 && position < total {
                let buf = stream.next().await.unwrap().unwrap();
                check(11, &mut position, &buf);
                held.push(buf);
            }
            std::thread::spawn(move || drop(held)).join().unwrap();
            overflowed = h.area().refill.stats().overflowed;
        }
        assert!(stream.next().await.is_none());
        assert!(overflowed > 0, "no return ever overflowed");
        h.until("every chunk is back", |h| {
            h.zcrx.stats().buffers_outstanding == 0
        })
        .await;
        if personality.has_ctrl() {
            // FLUSH_RQ empties the overflow list. Without it (6.15-6.18) the returns wait
            // there until the page pool needs buffers again, which an idle queue never does.
            h.until("the overflow list is empty", |h| {
                h.area().refill.stats().overflow_pending == 0
            })
            .await;
        }
        assert_eq!(h.control.report().double_returns, 0);
        h.zcrx.shutdown().await;
    });
}

/// Events: 7.2 and 7.3 post COPY once per arm for copy-path traffic and count it in the
/// shared stats (every byte, in NODEV mode); older kernels have neither, and the driver
/// never asks them to arm.
#[test]
fn events() {
    on_every_kernel("events", |personality, registration| async move {
        let h = Harness::start(SyntheticConfig {
            default_path: Path::Copy,
            ..config(personality, registration)
        })
        .await;
        let mut events = h.zcrx.subscribe();
        let (mut stream, _writer, _client) = h
            .connect(StreamPlan {
                path: Path::Copy,
                ..StreamPlan::new(3, 40 * CHUNK)
            })
            .await;
        let (received, error) = read_checked(&mut stream, 3).await;
        assert!(error.is_none() && received == 40 * CHUNK, "{error:?}");
        // Every copy-path chunk has been read, so the ring posts no more events; but the
        // driver may not have reaped the last event CQE yet (it can come after the data it
        // reports): wait, bounded, until the subscriber has what the ring posted.
        let report = h.control.report();
        let mut copy_events = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while (copy_events as u64) < report.events[1] {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Ok(event)) => copy_events += usize::from(event.kind == EventKind::CopyFallback),
                Ok(Err(e)) => panic!("event channel: {e}"),
                Err(_) => break, // the assertion below says what is missing
            }
        }
        while let Ok(event) = events.try_recv() {
            copy_events += usize::from(event.kind == EventKind::CopyFallback);
        }
        let stats = h.zcrx.stats();
        if personality.has_events() {
            assert_eq!(stats.copy_bytes, Some(40 * CHUNK));
            assert_eq!(stats.copy_count, Some(40));
            // Once, and once more per re-arm (the driver re-arms at most every 100 ms).
            assert!(report.events[1] >= 1, "no COPY event");
            assert!(
                report.events[1] <= 1 + report.arms,
                "COPY fired {} times for {} arms",
                report.events[1],
                report.arms
            );
            assert_eq!(copy_events as u64, report.events[1]);
            assert_eq!(stats.kernel_events, report.events[0] + report.events[1]);
        } else {
            assert_eq!((stats.copy_bytes, stats.copy_count), (None, None));
            assert_eq!(report.events, [0, 0]);
            assert_eq!(copy_events, 0);
            assert_eq!(
                report.arms_refused, 0,
                "the driver armed an event that cannot exist"
            );
        }
        h.zcrx.shutdown().await;
    });
}

/// Shutdown with buffers held: they stay valid and readable afterwards (on 6.15-6.18 NIC
/// queues only if the ring outlives them), and the last drop frees the area.
#[test]
fn shutdown_with_buffers_held() {
    on_every_kernel(
        "shutdown_with_buffers_held",
        |personality, registration| async move {
            let h = Harness::start(SyntheticConfig {
                // Holds the whole stream (a budget's worth) to its EOF: budgets off.
                stream_budget: Some(u64::MAX),
                ..config(personality, registration)
            })
            .await;
            let (mut stream, _writer, _client) = h.connect(StreamPlan::new(5, 16 * CHUNK)).await;
            let mut held = Vec::new();
            while let Some(buf) = stream.next().await {
                held.push(buf.unwrap());
            }
            drop(stream);
            let area = area_of(&h.shared);
            h.zcrx.shutdown().await;
            let Harness { zcrx, control, .. } = h;
            drop(zcrx);
            // Read after shutdown, on another thread.
            let held = std::thread::spawn(move || {
                let mut position = 0;
                for buf in &held {
                    check(5, &mut position, buf);
                }
                assert_eq!(position, 16 * CHUNK);
                held
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            assert!(area.upgrade().is_some(), "held buffers keep the area");
            drop(held);
            assert!(area.upgrade().is_none(), "the last buffer frees the area");
            let report = control.report();
            assert_eq!(report.scribbled_at_teardown, 0);
            assert_eq!(report.double_returns, 0);
        },
    );
}

/// A connection reset: the stream delivers what came before, then ends with the kernel's
/// error, errno intact.
#[test]
fn resets() {
    on_every_kernel("resets", |personality, registration| async move {
        let h = Harness::start(config(personality, registration)).await;
        let (mut stream, _writer, _client) = h
            .connect(StreamPlan {
                end: -libc::ECONNRESET,
                lengths: Lengths::Varied,
                ..StreamPlan::new(9, 5 * CHUNK)
            })
            .await;
        let (received, error) = read_checked(&mut stream, 9).await;
        assert_eq!(received, 5 * CHUNK);
        let error = error.expect("the stream ended without its error");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        assert_eq!(error.raw_os_error(), Some(libc::ECONNRESET), "{error:?}");
        assert!(stream.next().await.is_none());
        h.zcrx.shutdown().await;
    });
}

/// CQ overflow: the request ends with `-ENOSPC`; the driver resubmits and nothing is lost.
#[test]
fn cq_overflow() {
    on_every_kernel("cq_overflow", |personality, registration| async move {
        let h = Harness::start(config(personality, registration)).await;
        let (mut stream, _writer, _client) = h
            .connect(StreamPlan {
                cq_overflow_at: Some(10 * CHUNK),
                ..StreamPlan::new(13, 30 * CHUNK)
            })
            .await;
        let (received, error) = read_checked(&mut stream, 13).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(received, 30 * CHUNK);
        assert_eq!(h.control.report().enospc_answers, 1);
        assert_eq!(h.zcrx.stats().resubmits_cq_overflow, 1);
        h.zcrx.shutdown().await;
    });
}

/// Streams dropped while their receive runs: the receive is cancelled, the slot released,
/// every chunk returned, and the other streams are unaffected.
#[test]
fn streams_dropped_mid_flight() {
    on_every_kernel(
        "streams_dropped_mid_flight",
        |personality, registration| async move {
            let h = Harness::start(config(personality, registration)).await;
            let mut readers = Vec::new();
            for i in 0..8u64 {
                let seed = 100 + i;
                let (mut stream, writer, client) =
                    h.connect(StreamPlan::new(seed, 200 * CHUNK)).await;
                readers.push(tokio::spawn(async move {
                    if i % 2 == 0 {
                        // Dropped after a few buffers, its receive still running.
                        let mut position = 0;
                        for _ in 0..3 {
                            let buf = stream.next().await.unwrap().unwrap();
                            check(seed, &mut position, &buf);
                        }
                    } else {
                        let (received, error) = read_checked(&mut stream, seed).await;
                        assert!(error.is_none(), "stream {i}: {error:?}");
                        assert_eq!(received, 200 * CHUNK);
                    }
                    drop((stream, writer, client));
                }));
            }
            for reader in readers {
                reader.await.unwrap();
            }
            h.until("every chunk is back", |h| {
                h.zcrx.stats().buffers_outstanding == 0
            })
            .await;
            // The dropped ones at least (the finished ones need defect L fixed).
            h.until("the dropped streams' slots are free", |h| {
                h.live_slots() <= 4
            })
            .await;
            assert_eq!(h.control.report().double_returns, 0);
            h.zcrx.shutdown().await;
        },
    );
}

/// Streams read to their end (EOF or an error) and dropped release their socket, driver
/// entry and slot at once (defect L): the slot table is empty and the peer sees the
/// socket closed, while the runtime keeps running.
#[test]
fn finished_streams_dropped() {
    on_every_kernel(
        "finished_streams_dropped",
        |personality, registration| async move {
            let h = Harness::start(config(personality, registration)).await;
            for i in 0..20u64 {
                let end = if i % 2 == 0 { 0 } else { -libc::ECONNRESET };
                let (mut stream, writer, mut client) = h
                    .connect(StreamPlan {
                        end,
                        ..StreamPlan::new(200 + i, 3 * CHUNK)
                    })
                    .await;
                let (received, error) = read_checked(&mut stream, 200 + i).await;
                assert_eq!(received, 3 * CHUNK);
                assert_eq!(error.is_some(), end != 0);
                drop((stream, writer));
                h.until("the finished stream's slot is free", |h| {
                    h.live_slots() == 0
                })
                .await;
                // The server side is closed: the client reads EOF (or a reset).
                let mut byte = [0u8; 1];
                let read = tokio::time::timeout(Duration::from_secs(2), client.read(&mut byte))
                    .await
                    .expect("the socket stayed open");
                assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
            }
            h.zcrx.shutdown().await;
        },
    );
}

/// A flush the kernel refuses once (EINVAL, ENXIO or EFAULT from `ZCRX_CTRL_FLUSH_RQ` on a
/// kernel whose query reported control ops) is not the end of flushing, and the returns it
/// did not flush are flushed later: in NODEV mode FLUSH_RQ is the only way chunks go back.
/// The reader holds the whole area and drops it at once, so the refused flush is the one
/// that should have returned every chunk.
#[test]
fn a_refused_flush_is_not_the_end_of_flushing() {
    on_every_kernel(
        "a_refused_flush_is_not_the_end_of_flushing",
        |personality, registration| async move {
            if !personality.has_ctrl() {
                return;
            }
            let mut stalls = Vec::new();
            for errno in [libc::EINVAL, libc::ENXIO, libc::EFAULT] {
                let h = Harness::start(SyntheticConfig {
                    area_chunks: 16,
                    faults: Some(FaultConfig {
                        ctrl: 1000,
                        ctrl_errno: Some(errno),
                        ctrl_limit: 1,
                        ..FaultConfig::none(0)
                    }),
                    // Holds the whole area with one stream on purpose: budgets off.
                    stream_budget: Some(u64::MAX),
                    ..config(personality, registration)
                })
                .await;
                let plan = StreamPlan {
                    path: Path::Copy,
                    ..StreamPlan::new(17, 200 * CHUNK)
                };
                let (mut stream, _writer, _client) = h.connect(plan).await;
                let (mut held, mut position) = (Vec::new(), 0);
                while held.len() < 16 {
                    let buf = stream.next().await.unwrap().unwrap();
                    check(17, &mut position, &buf);
                    held.push(buf);
                }
                std::thread::spawn(move || drop(held)).join().unwrap();
                let reading = read_checked_from(&mut stream, 17, position);
                match tokio::time::timeout(Duration::from_secs(3), reading).await {
                    Ok((received, error)) => {
                        assert!(error.is_none(), "{error:?}");
                        assert_eq!(received, 200 * CHUNK);
                    }
                    Err(_) => stalls.push(io::Error::from_raw_os_error(errno).to_string()),
                }
                h.zcrx.shutdown().await;
            }
            assert!(
                stalls.is_empty(),
                "stalled after a refused flush: {stalls:?}"
            );
        },
    );
}
