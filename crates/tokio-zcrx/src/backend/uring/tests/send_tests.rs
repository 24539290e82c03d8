//! Zero-copy forwarding over the synthetic kernel: received buffers sent on with
//! `ZcWriteHalf::send_buf` / `send_batch`, every byte checked at the far end.
//!
//! The synthetic kernel answers sends as `io_uring/net.c` does (a result with `F_MORE`, the
//! notification a reap later, `-ECANCELED` for the rest of a chain after a short or failed
//! link), and reads a zero-copy send's bytes only at its notification, after overwriting
//! every free chunk (returned ones included) with 0xEE: a buffer given back before its
//! notification would put 0xEE on the wire, and the receiver's pattern check fails.

use std::io;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::synthetic::faults::FaultConfig;
use super::super::synthetic::pattern;
use super::super::synthetic::personality::Registration;
use super::super::synthetic::ring::{KernelReport, Lengths, StreamPlan};
use super::super::synthetic::SyntheticConfig;
use super::runtime;
use super::scenarios::{Harness, KERNELS};
use crate::{Stats, ZcBatch, ZcStream, ZcWriteHalf};

/// Bytes each forwarded connection carries.
const FORWARDED: u64 = 3 << 20;

/// How the forwarder sends what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forward {
    OneByOne,
    Batches,
    /// As `Bytes` made from the buffers (`ZcBuf::into_bytes`).
    Bytes,
}

/// Reads `upstream` to its end and checks every byte against stream `seed`'s pattern;
/// returns the byte count (a mismatch panics with its position).
async fn verify_upstream(mut upstream: tokio::net::TcpStream, seed: u64) -> io::Result<u64> {
    let mut position = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = upstream.read(&mut buf).await?;
        if n == 0 {
            return Ok(position);
        }
        if let Err(at) = pattern::verify(seed, position, &buf[..n]) {
            panic!("upstream byte {at} of stream {seed} is wrong (0x{:02x})", {
                buf[(at - position) as usize]
            });
        }
        position += n as u64;
    }
}

/// Forwards `source` to `sink` until the source ends, then flushes and drops the sink.
async fn forward(mut source: ZcStream, mut sink: ZcWriteHalf, how: Forward) -> io::Result<()> {
    match how {
        Forward::OneByOne => {
            while let Some(buf) = source.next().await {
                sink.send_buf(buf?).await?;
            }
        }
        Forward::Batches => {
            let mut batch = ZcBatch::with_capacity(32);
            while source.recv_many(&mut batch, 32).await? > 0 {
                sink.send_batch(&mut batch).await?;
                assert!(batch.is_empty());
            }
        }
        Forward::Bytes => {
            while let Some(buf) = source.next().await {
                sink.send_bytes(buf?.into_bytes()).await?;
            }
        }
    }
    sink.flush().await
}

/// One forwarded connection through `harness`: source plan `plan` (seed `seed`) to an
/// upstream socket; returns the bytes the upstream received and checked.
async fn forward_one(harness: &Harness, plan: StreamPlan, how: Forward) -> io::Result<u64> {
    let seed = plan.seed;
    let (source, _source_writer, _client) = harness.connect(plan).await;
    // The destination: a connection the runtime has, receiving nothing itself.
    let (_replies, sink, upstream) = harness.connect(StreamPlan::new(0, 0)).await;
    let verifier = tokio::spawn(verify_upstream(upstream, seed));
    forward(source, sink, how).await?;
    verifier.await.unwrap()
}

/// The area is free and no send holds a buffer.
async fn assert_all_back(stats_of: impl Fn() -> Stats) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = stats_of();
        if stats.buffers_outstanding == 0 && stats.sends_in_flight == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "buffers still held: {stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn synthetic(
    personality_registration: (
        super::super::synthetic::personality::Personality,
        Registration,
    ),
) -> SyntheticConfig {
    let (personality, registration) = personality_registration;
    SyntheticConfig {
        area_chunks: 128,
        ..SyntheticConfig::new(personality, registration)
    }
}

/// Every kernel, each way of sending: every byte arrives once, in order, from the fixed
/// buffer (or unregistered, for `Bytes`), and every buffer comes back, only after its
/// notification (the scribbling kernel would put 0xEE on the wire otherwise).
#[test]
fn forwarded_bytes_arrive_intact_on_every_kernel() {
    let runtime = runtime();
    for kernel in KERNELS {
        for how in [Forward::OneByOne, Forward::Batches, Forward::Bytes] {
            runtime.block_on(async {
                let harness = Harness::start(synthetic(kernel)).await;
                let plan = StreamPlan {
                    lengths: Lengths::Varied,
                    ..StreamPlan::new(7, FORWARDED)
                };
                let received = forward_one(&harness, plan, how).await.unwrap();
                assert_eq!(received, FORWARDED, "{kernel:?} {how:?}");
                let zcrx = &harness.zcrx;
                assert_all_back(|| zcrx.stats()).await;
                let stats = zcrx.stats();
                let report: KernelReport = harness.control.report();
                assert!(stats.sends > 0);
                assert_eq!(stats.send_zero_copy_bytes, FORWARDED, "{kernel:?} {how:?}");
                assert_eq!(stats.send_kernel_copied_bytes, 0);
                assert_eq!(stats.send_plain_bytes, 0);
                assert_eq!(report.send_bytes, FORWARDED);
                assert!(report.scribbled_for_sends > 0, "the check must have teeth");
                // `Bytes` from a ZcBuf point into the area too: all from the fixed buffer.
                assert!(report.sends_fixed > 0 && report.sends_unregistered == 0);
                if how == Forward::Batches {
                    // Vectored: a request carries the buffers queued together (up to 64),
                    // not one each. Chunks are at most 4 KiB, so there are at least
                    // FORWARDED / 4096 buffers.
                    let buffers_at_least = FORWARDED / 4096;
                    assert!(
                        report.sends_fixed * 4 < buffers_at_least,
                        "{kernel:?}: {} requests for {buffers_at_least}+ buffers",
                        report.sends_fixed
                    );
                }
                harness.zcrx.shutdown().await;
            });
        }
    }
}

/// Short sends (the kernel's MSG_WAITALL gives up half-way and cancels the rest of the
/// chain), notification-less `-ENOMEM` answers, and chains cancelled from their head because
/// a later SQE failed at prep: resumed where they stopped, no byte lost or sent twice, every
/// buffer back.
#[test]
fn short_and_refused_sends_resume_without_loss() {
    let runtime = runtime();
    for kernel in KERNELS {
        runtime.block_on(async {
            let config = SyntheticConfig {
                faults: Some(FaultConfig {
                    // Per request; a request carries up to 64 buffers.
                    send_short: 300,
                    send_enomem: 200,
                    send_link_prep: 200,
                    ..FaultConfig::none(11)
                }),
                ..synthetic(kernel)
            };
            let harness = Harness::start(config).await;
            let plan = StreamPlan {
                lengths: Lengths::Varied,
                ..StreamPlan::new(21, FORWARDED)
            };
            let received = forward_one(&harness, plan, Forward::Batches).await.unwrap();
            assert_eq!(received, FORWARDED, "{kernel:?}");
            let zcrx = &harness.zcrx;
            assert_all_back(|| zcrx.stats()).await;
            let report = harness.control.report();
            assert!(report.injected.send_short > 10, "{:?}", report.injected);
            assert!(report.injected.send_enomem > 2, "{:?}", report.injected);
            assert!(report.injected.send_link_prep > 2, "{:?}", report.injected);
            assert_eq!(report.send_bytes, FORWARDED);
            assert_eq!(zcrx.stats().send_zero_copy_bytes, FORWARDED);
            harness.zcrx.shutdown().await;
        });
    }
}

/// A send that fails (the kernel answers ECONNRESET, EPIPE or ETIMEDOUT) ends the
/// connection's sends: the error reaches the forwarder, later sends fail too, and every
/// buffer comes back.
#[test]
fn a_failed_send_surfaces_and_returns_every_buffer() {
    let runtime = runtime();
    for kernel in KERNELS {
        runtime.block_on(async {
            let config = SyntheticConfig {
                faults: Some(FaultConfig {
                    // Per request. A request carries up to 64 buffers, so 3 MiB may take
                    // as few as 12 requests: at one in two, a run without a failure has
                    // odds of 1 in 4096.
                    send_error: 500,
                    ..FaultConfig::none(5)
                }),
                ..synthetic(kernel)
            };
            let harness = Harness::start(config).await;
            let plan = StreamPlan::new(3, FORWARDED);
            let (source, _w, _client) = harness.connect(plan).await;
            let (_replies, mut sink, upstream) = harness.connect(StreamPlan::new(0, 0)).await;
            let reader = tokio::spawn(async move {
                let mut upstream = upstream;
                let mut sink = Vec::new();
                let _ = upstream.read_to_end(&mut sink).await;
                sink.len()
            });
            let mut source = source;
            let mut error = None;
            while let Some(buf) = source.next().await {
                if let Err(e) = sink.send_buf(buf.unwrap()).await {
                    error = Some(e);
                    break;
                }
            }
            let error = match error {
                Some(e) => e,
                None => sink.flush().await.expect_err("a send failed"),
            };
            assert!(
                matches!(
                    error.raw_os_error(),
                    Some(libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT)
                ),
                "{error:?}"
            );
            // Later calls fail too: the byte stream has a gap.
            assert!(sink.flush().await.is_err());
            assert!(sink.write_all(b"after the gap").await.is_err());
            drop((source, sink));
            let zcrx = &harness.zcrx;
            assert_all_back(|| zcrx.stats()).await;
            assert!(harness.control.report().injected.send_errors >= 1);
            // The peer sees EOF: the dropped write half's deferred shutdown happens even
            // when a send queued before the failure is handled after it.
            let delivered = tokio::time::timeout(Duration::from_secs(10), reader)
                .await
                .expect("the destination was never shut down after the failure")
                .unwrap() as u64;
            assert!(delivered < FORWARDED);
            harness.zcrx.shutdown().await;
        });
    }
}

/// The destination's peer goes away mid-stream (it closes with unread data and
/// `SO_LINGER` 0: a reset): the sends fail, the forwarder hears of it, and the area is
/// entirely free afterwards.
#[test]
fn a_destination_reset_mid_send_returns_every_buffer() {
    let runtime = runtime();
    for kernel in KERNELS {
        runtime.block_on(async {
            let harness = Harness::start(synthetic(kernel)).await;
            let (mut source, _w, _client) = harness.connect(StreamPlan::new(9, 64 << 20)).await;
            let (_replies, mut sink, upstream) = harness.connect(StreamPlan::new(0, 0)).await;
            let mut upstream = Some(upstream);
            let mut forwarded = 0u64;
            let mut error = None;
            while let Some(buf) = source.next().await {
                let buf = buf.unwrap();
                forwarded += buf.len() as u64;
                if forwarded > 1 << 20 {
                    if let Some(upstream) = upstream.take() {
                        reset_on_close(&upstream);
                        drop(upstream);
                    }
                }
                if let Err(e) = sink.send_buf(buf).await {
                    error = Some(e);
                    break;
                }
            }
            let error = match error {
                Some(e) => e,
                None => sink.flush().await.expect_err("sends to a reset peer fail"),
            };
            assert!(
                matches!(error.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)),
                "{kernel:?}: {error:?}"
            );
            drop((source, sink));
            let zcrx = &harness.zcrx;
            assert_all_back(|| zcrx.stats()).await;
            // The dropped source's receive may still deliver a chunk or two before its
            // cancellation completes; the driver gives those back at once. The area ends
            // entirely free.
            let deadline = Instant::now() + Duration::from_secs(5);
            while zcrx.stats().memory_held != 0 {
                assert!(Instant::now() < deadline, "{:?}", zcrx.stats());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            harness.zcrx.shutdown().await;
        });
    }
}

/// `SO_LINGER` 0: closing `socket` resets the connection.
fn reset_on_close(socket: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER reads one live `linger` of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
}

/// Shutdown with sends in flight waits for their notifications (bounded): the kernel holds
/// them back for a while, `shutdown` returns only after they came, every byte queued before
/// it arrives and every buffer is back.
#[test]
fn shutdown_waits_for_sends_in_flight() {
    const HOLD: Duration = Duration::from_millis(300);
    let runtime = runtime();
    for kernel in KERNELS {
        runtime.block_on(async {
            let harness = Harness::start(synthetic(kernel)).await;
            let (mut source, _w, _client) = harness.connect(StreamPlan::new(13, 64 << 10)).await;
            let (_replies, mut sink, upstream) = harness.connect(StreamPlan::new(0, 0)).await;
            sink.set_max_sends_in_flight(1024);
            let verifier = tokio::spawn(verify_upstream(upstream, 13));
            harness
                .control
                .hold_notifications
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let mut queued = 0u64;
            while let Some(buf) = source.next().await {
                let buf = buf.unwrap();
                queued += buf.len() as u64;
                sink.send_buf(buf).await.unwrap();
            }
            drop(source);
            let in_flight = harness.zcrx.stats().sends_in_flight;
            assert!(in_flight > 0, "{kernel:?}");
            let control = std::sync::Arc::clone(&harness.control);
            let shared = std::sync::Arc::clone(&harness.shared);
            std::thread::spawn(move || {
                std::thread::sleep(HOLD);
                control
                    .hold_notifications
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                shared.wake();
            });
            let started = Instant::now();
            harness.zcrx.shutdown().await;
            let took = started.elapsed();
            assert!(
                took >= HOLD / 2 && took < Duration::from_secs(6),
                "{kernel:?}: {took:?}"
            );
            let stats = harness.zcrx.stats();
            assert_eq!(stats.sends_in_flight, 0, "{kernel:?}");
            assert_eq!(stats.buffers_outstanding, 0, "{kernel:?}");
            drop(sink);
            assert_eq!(verifier.await.unwrap().unwrap(), queued, "{kernel:?}");
        });
    }
}

/// Without the fixed buffer (registration refused) the driver sends unregistered, and
/// plain writes after queued sends keep their place in the byte stream.
#[test]
fn unregistered_sends_and_writes_keep_order() {
    let runtime = runtime();
    runtime.block_on(async {
        let config = SyntheticConfig {
            fixed_buffer: false,
            ..synthetic(KERNELS[6])
        };
        let harness = Harness::start(config).await;
        let (mut source, _w, _client) = harness.connect(StreamPlan::new(17, 1 << 20)).await;
        let (_replies, mut sink, mut upstream) = harness.connect(StreamPlan::new(0, 0)).await;
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            upstream.read_to_end(&mut all).await.unwrap();
            all
        });
        let mut expected = Vec::new();
        let mut turn = 0u32;
        while let Some(buf) = source.next().await {
            let buf = buf.unwrap();
            expected.extend_from_slice(&buf);
            sink.send_buf(buf).await.unwrap();
            turn += 1;
            if turn % 7 == 0 {
                let marker = format!("<{turn}>");
                expected.extend_from_slice(marker.as_bytes());
                sink.write_all(marker.as_bytes()).await.unwrap();
            }
        }
        sink.shutdown().await.unwrap();
        drop(sink);
        let received = reader.await.unwrap();
        assert!(received == expected, "bytes out of order or lost");
        let report = harness.control.report();
        assert!(report.sends_unregistered > 0 && report.sends_fixed == 0);
        harness.zcrx.shutdown().await;
    });
}

/// Sockets that refuse zero-copy sends (`-EOPNOTSUPP`, with `F_MORE` and a notification):
/// the driver falls back to plain sends once (logged, counted), resends what the refused
/// requests did not send, and every byte arrives once, in order.
#[test]
fn refused_zero_copy_sends_fall_back_to_plain_sends() {
    let runtime = runtime();
    for kernel in [KERNELS[0], KERNELS[6]] {
        runtime.block_on(async {
            let config = SyntheticConfig {
                refuse_send_zc: true,
                ..synthetic(kernel)
            };
            let harness = Harness::start(config).await;
            let plan = StreamPlan {
                lengths: Lengths::Varied,
                ..StreamPlan::new(29, 1 << 20)
            };
            let received = forward_one(&harness, plan, Forward::Batches).await.unwrap();
            assert_eq!(received, 1 << 20, "{kernel:?}");
            let zcrx = &harness.zcrx;
            assert_all_back(|| zcrx.stats()).await;
            let stats = zcrx.stats();
            assert_eq!(stats.send_fallbacks, 1, "{stats:?}");
            assert_eq!(stats.send_plain_bytes, 1 << 20, "{stats:?}");
            assert_eq!(stats.send_zero_copy_bytes, 0, "{stats:?}");
            let report = harness.control.report();
            assert!(
                report.sends_plain > 0 && report.sends_fixed > 0,
                "{kernel:?}"
            );
            assert_eq!(report.send_bytes, 1 << 20);
            harness.zcrx.shutdown().await;
        });
    }
}

/// Forwarding from an area that grew (7.3, `Builder::area_growth`), in both registrations:
/// buffers of the first kernel area go out from the fixed buffer, those of added areas
/// (other mappings, not registered for sends) unregistered, with no fallback; every byte
/// arrives once, and every buffer of every area comes back only after its notification.
#[test]
fn buffers_of_added_areas_are_sent_unregistered() {
    use super::super::synthetic::personality::Personality;
    use super::super::synthetic::CHUNK_SIZE;
    use crate::AreaGrowth;

    let chunk = CHUNK_SIZE as usize;
    let runtime = runtime();
    for registration in [Registration::Nic, Registration::NoDevice] {
        runtime.block_on(async {
            let config = SyntheticConfig {
                growth: Some(AreaGrowth {
                    initial: 16 * chunk,
                    step: 16 * chunk,
                    maximum: 64 * chunk,
                }),
                // The forwarder holds 40 chunks on purpose before it sends any.
                stream_budget: Some(u64::MAX),
                ..SyntheticConfig::new(Personality::Linux7_3, registration)
            };
            let harness = Harness::start(config).await;
            let (mut source, _source_writer, _client) =
                harness.connect(StreamPlan::new(5, FORWARDED)).await;
            let (_replies, mut sink, upstream) = harness.connect(StreamPlan::new(0, 0)).await;
            let verifier = tokio::spawn(verify_upstream(upstream, 5));
            // 40 buffers held at once need three areas of 16 chunks.
            let mut batch = ZcBatch::with_capacity(40);
            while batch.len() < 40 {
                let want = 40 - batch.len();
                assert!(source.recv_many(&mut batch, want).await.unwrap() > 0);
            }
            let areas = harness.zcrx.stats().areas;
            assert!(
                areas >= 3,
                "{registration:?}: the area did not grow ({areas} areas)"
            );
            sink.send_batch(&mut batch).await.unwrap();
            forward(source, sink, Forward::Batches).await.unwrap();
            assert_eq!(verifier.await.unwrap().unwrap(), FORWARDED);
            let zcrx = &harness.zcrx;
            assert_all_back(|| zcrx.stats()).await;
            let stats = zcrx.stats();
            let report = harness.control.report();
            assert_eq!(stats.send_zero_copy_bytes, FORWARDED, "{stats:?}");
            assert_eq!(stats.send_fallbacks, 0, "{stats:?}");
            assert!(
                report.sends_fixed > 0 && report.sends_unregistered > 0,
                "{registration:?}: {} fixed, {} unregistered",
                report.sends_fixed,
                report.sends_unregistered
            );
            assert!(report.scribbled_for_sends > 0, "the check must have teeth");
            harness.zcrx.shutdown().await;
        });
    }
}
