//! Real-kernel tests of the tokio-zcrx runtime through its public API, in the QEMU guest.
//!
//! Each test builds its own runtime and shuts it down before the next one registers the
//! same queue. Payloads follow `pattern_byte`, so every byte's position is checked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_zcrx::{EventKind, StreamOptions, ZcBuf, ZcStream};
use tokio_zcrx_kernel_tests::support::{
    accept, build, nic, nodev, read_verified, read_verified_from, runtime,
};
use tokio_zcrx_kernel_tests::{first_mismatch, spawn_resetter, spawn_sender, support, GuestNet};

async fn listen(ip: &str) -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn zero_copy_256mib_over_netdevsim() {
    const TOTAL: u64 = 256 << 20;
    let net = GuestNet::from_env();
    runtime().block_on(async {
        let zcrx = build(nic(&net).area_size(16 << 20));
        let (listener, addr) = listen(&net.nic_addr).await;
        let sender = spawn_sender(addr, TOTAL, Some(net.peer_netns.clone()));
        let stream = accept(&zcrx, &listener).await;
        assert_eq!(read_verified(stream).await, TOTAL);
        assert_eq!(sender.join().unwrap(), TOTAL);
        let stats = zcrx.stats();
        println!("{stats}");
        assert_eq!(stats.copy_bytes, Some(0), "zero copy expected: {stats}");
        assert_eq!(stats.copy_count, Some(0));
        assert_eq!(stats.bytes, TOTAL);
        assert_eq!(stats.buffers_outstanding, 0);
        zcrx.shutdown().await;
    });
}

/// Reads `stream` to the end by batches of at most 64 buffers, checking every byte.
/// Returns the bytes read and the largest batch.
async fn read_verified_by_batches(mut stream: ZcStream) -> (u64, usize) {
    let (mut position, mut largest) = (0u64, 0);
    while let Some(batch) = stream.next_batch(64).await {
        let batch = batch.unwrap();
        assert!(batch.len() <= 64);
        largest = largest.max(batch.len());
        for buf in &batch {
            assert_eq!(first_mismatch(position, buf), None, "byte at {position}");
            position += buf.len() as u64;
        }
    }
    (position, largest)
}

/// Batches returned whole, through an area an eighth of the payload: zero copy on the NIC
/// queue and every byte copied in nodev mode, nothing outstanding at the end.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn batches_return_their_chunks_in_nic_and_nodev_modes() {
    const TOTAL: u64 = 64 << 20;
    let net = GuestNet::from_env();
    runtime().block_on(async {
        for (builder, ip, netns) in [
            (
                nic(&net),
                net.nic_addr.clone(),
                Some(net.peer_netns.clone()),
            ),
            (nodev(), "127.0.0.1".to_string(), None),
        ] {
            let zcrx = build(builder.area_size(8 << 20));
            let (listener, addr) = listen(&ip).await;
            let sender = spawn_sender(addr, TOTAL, netns);
            let stream = accept(&zcrx, &listener).await;
            let (bytes, largest) = read_verified_by_batches(stream).await;
            assert_eq!(bytes, TOTAL);
            assert!(largest > 1, "no batch held more than one buffer");
            assert_eq!(sender.join().unwrap(), TOTAL);
            let stats = zcrx.stats();
            println!("{}: {stats}", zcrx.mode());
            assert_eq!((stats.bytes, stats.buffers_outstanding), (TOTAL, 0));
            if zcrx.mode() == tokio_zcrx::ActiveMode::Nic {
                assert_eq!(stats.copy_bytes, Some(0), "{stats}");
            } else {
                support::assert_all_copied(&stats, TOTAL);
            }
            zcrx.shutdown().await;
        }
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn reads_with_a_byte_limit_complete_the_payload() {
    const TOTAL: u64 = 8 << 20;
    const LIMIT: u32 = 100_000;
    let net = GuestNet::from_env();
    runtime().block_on(async {
        let zcrx = build(nic(&net).area_size(4 << 20));
        let (listener, addr) = listen(&net.nic_addr).await;
        let sender = spawn_sender(addr, TOTAL, Some(net.peer_netns.clone()));
        let (socket, _) = listener.accept().await.unwrap();
        let options = StreamOptions::new().read_limit(LIMIT);
        let (stream, _writer) = zcrx.attach_with(socket, options).unwrap();
        assert_eq!(read_verified(stream).await, TOTAL);
        sender.join().unwrap();
        zcrx.shutdown().await;
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_copies_and_reports_it() {
    const TOTAL: u64 = 32 << 20;
    runtime().block_on(async {
        let zcrx = build(
            nodev()
                .area_size(8 << 20)
                .event_rearm_interval(Duration::ZERO),
        );
        let mut events = zcrx.subscribe();
        let (listener, addr) = listen("127.0.0.1").await;
        let sender = spawn_sender(addr, TOTAL, None);
        let stream = accept(&zcrx, &listener).await;
        assert_eq!(read_verified(stream).await, TOTAL);
        sender.join().unwrap();
        let stats = zcrx.stats();
        support::assert_all_copied(&stats, TOTAL);
        assert!(stats.copy_count.unwrap() > 0);
        let event = events.try_recv().expect("a copy fallback event");
        assert_eq!(event.kind, EventKind::CopyFallback);
        // Re-armed at once (interval zero): more than one event for 32 MiB.
        assert!(events.try_recv().is_ok(), "the event was not re-armed");
        zcrx.shutdown().await;
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nic_queue_copies_loopback_traffic_and_reports_it() {
    const TOTAL: u64 = 4 << 20;
    let net = GuestNet::from_env();
    runtime().block_on(async {
        let zcrx = build(nic(&net).area_size(4 << 20));
        let mut events = zcrx.subscribe();
        let (listener, addr) = listen("127.0.0.1").await;
        let sender = spawn_sender(addr, TOTAL, None);
        let stream = accept(&zcrx, &listener).await;
        assert_eq!(read_verified(stream).await, TOTAL);
        sender.join().unwrap();
        let stats = zcrx.stats();
        assert!(stats.copy_bytes.unwrap() > 0, "{stats}");
        assert!(stats.copy_count.unwrap() > 0, "{stats}");
        assert_eq!(
            events.try_recv().expect("a copy fallback event").kind,
            EventKind::CopyFallback
        );
        zcrx.shutdown().await;
    });
}

/// Holds every buffer the stream delivers (checking it) until the runtime reports `kind`;
/// returns the held buffers and the stream position reached.
async fn withhold_until(
    stream: &mut ZcStream,
    events: &mut tokio::sync::broadcast::Receiver<tokio_zcrx::Event>,
    kind: EventKind,
) -> (Vec<ZcBuf>, u64) {
    let mut held = Vec::new();
    let mut position = 0u64;
    loop {
        tokio::select! {
            buf = stream.next() => {
                let buf = buf.expect("stream ended early").unwrap();
                assert_eq!(first_mismatch(position, &buf), None);
                position += buf.len() as u64;
                held.push(buf);
            }
            event = events.recv() => {
                if event.unwrap().kind == kind {
                    return (held, position);
                }
            }
        }
    }
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_area_exhaustion_recovers_without_loss() {
    const TOTAL: u64 = 4 << 20;
    runtime().block_on(async {
        // 64 chunks: the sender fills them long before it is done.
        // Holds more than a stream's budget on purpose (the area's own limits are under
        // test): budgets off.
        let zcrx = build(nodev().area_size(256 << 10).stream_budget(u64::MAX));
        let mut events = zcrx.subscribe();
        let (listener, addr) = listen("127.0.0.1").await;
        let sender = spawn_sender(addr, TOTAL, None);
        let mut stream = accept(&zcrx, &listener).await;
        let (held, position) =
            withhold_until(&mut stream, &mut events, EventKind::AreaExhausted).await;
        assert!(zcrx.stats().buffers_outstanding > 0);
        drop(held);
        let total = read_verified_from(stream, position).await;
        assert_eq!(total, TOTAL);
        sender.join().unwrap();
        let stats = zcrx.stats();
        assert!(stats.resubmits_area_exhausted >= 1, "{stats}");
        assert_eq!(stats.buffers_outstanding, 0);
        zcrx.shutdown().await;
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nic_allocation_failure_is_reported_and_recovers() {
    const TOTAL: u64 = 8 << 20;
    let net = GuestNet::from_env();
    runtime().block_on(async {
        // Holds more than a stream's budget on purpose (the area's own limits are under
        // test): budgets off.
        let zcrx = build(
            nic(&net)
                .area_size(512 << 10)
                .refill_entries(128)
                .stream_budget(u64::MAX),
        );
        let mut events = zcrx.subscribe();
        let (listener, addr) = listen(&net.nic_addr).await;
        let sender = spawn_sender(addr, TOTAL, Some(net.peer_netns.clone()));
        let mut stream = accept(&zcrx, &listener).await;
        let (held, position) =
            withhold_until(&mut stream, &mut events, EventKind::AllocationFailure).await;
        drop(held);
        assert_eq!(read_verified_from(stream, position).await, TOTAL);
        sender.join().unwrap();
        zcrx.shutdown().await;
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn tiny_cq_overflows_and_the_stream_completes() {
    const TOTAL: u64 = 16 << 20;
    runtime().block_on(async {
        let zcrx = build(nodev().area_size(16 << 20).cq_entries(64));
        let (listener, addr) = listen("127.0.0.1").await;
        let sender = spawn_sender(addr, TOTAL, None);
        let (socket, _) = listener.accept().await.unwrap();
        // Let a megabyte queue up in the socket first: the first receive then completes
        // hundreds of chunks at once into a 64-entry CQ, which must overflow.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt on a live socket with a correctly sized int (root may force
        // a receive buffer above rmem_max).
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut queued: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int to a live local.
            unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) };
            if queued >= 1 << 20 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {queued} bytes queued"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (stream, _writer) = zcrx.attach(socket).unwrap();
        assert_eq!(read_verified(stream).await, TOTAL);
        sender.join().unwrap();
        let stats = zcrx.stats();
        println!("{stats}");
        assert!(
            stats.resubmits_cq_overflow >= 1,
            "the CQ never overflowed: {stats}"
        );
        zcrx.shutdown().await;
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn many_streams_with_buffers_dropped_elsewhere_and_one_reset() {
    const STREAMS: usize = 64;
    const EACH: u64 = 1 << 20;
    let net = GuestNet::from_env();
    runtime().block_on(async {
        let zcrx = build(nic(&net).area_size(16 << 20));
        let (listener, addr) = listen(&net.nic_addr).await;
        let mut senders = Vec::new();
        for _ in 0..STREAMS {
            senders.push(spawn_sender(addr, EACH, Some(net.peer_netns.clone())));
        }
        // One more connection that the peer resets mid-stream.
        let resetter = spawn_resetter(&net.peer_netns, addr, 65536, Duration::from_millis(200));
        let (drop_tx, mut drop_rx) = tokio::sync::mpsc::unbounded_channel::<ZcBuf>();
        // Buffers are dropped on another task (and so, often, another thread).
        let dropper = tokio::spawn(async move { while drop_rx.recv().await.is_some() {} });
        let verified = Arc::new(AtomicU64::new(0));
        let mut readers = Vec::new();
        let mut resets = 0;
        for _ in 0..=STREAMS {
            let (socket, _): (TcpStream, _) = listener.accept().await.unwrap();
            let (mut stream, writer) = zcrx.attach(socket).unwrap();
            let drop_tx = drop_tx.clone();
            let verified = Arc::clone(&verified);
            readers.push(tokio::spawn(async move {
                let _writer = writer;
                let mut position = 0u64;
                let mut from_resetter = false;
                while let Some(buf) = stream.next().await {
                    let buf = buf?;
                    from_resetter |= position == 0 && buf[0] == 0xFF;
                    if !from_resetter {
                        assert_eq!(first_mismatch(position, &buf), None);
                    }
                    position += buf.len() as u64;
                    drop_tx.send(buf).unwrap();
                }
                verified.fetch_add(position, Ordering::Relaxed);
                Ok::<u64, std::io::Error>(position)
            }));
        }
        drop(drop_tx);
        for reader in readers {
            match reader.await.unwrap() {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                    resets += 1;
                }
            }
        }
        for sender in senders {
            assert_eq!(sender.join().unwrap(), EACH);
        }
        resetter.join().unwrap();
        dropper.await.unwrap();
        assert_eq!(resets, 1, "exactly the reset stream fails");
        assert!(verified.load(Ordering::Relaxed) >= STREAMS as u64 * EACH);
        assert_eq!(zcrx.stats().buffers_outstanding, 0);
        zcrx.shutdown().await;
    });
}

/// Readers that hold part of their budget while they wait for more are never left waiting
/// (a defect until 2026-12: a paused stream resumed only at half its budget). 32 connections
/// under a budget of 16 chunks each (resume mark 8): every stream's reader hands each buffer
/// to its own holder task, which keeps the last 12 (a decoder holding the start of a
/// message) and drops the older ones, on another task than the reader's. Each time a stream
/// reaches 16 it pauses, its holder drops to 12, above the low mark, and its reader waits:
/// the stream must go on. Every byte is checked in order, the senders half-close, one more
/// connection is reset mid-stream, and every chunk comes back.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn decoders_holding_part_of_their_budget_are_never_left_waiting() {
    const STREAMS: usize = 32;
    const EACH: u64 = 1 << 20;
    const KEEP: usize = 12;
    const STALL: Duration = Duration::from_secs(30);
    let net = GuestNet::from_env();
    runtime().block_on(async {
        let zcrx = build(nic(&net).area_size(16 << 20).stream_budget(16 * 4096));
        let (listener, addr) = listen(&net.nic_addr).await;
        zcrx.prepare_listener(&listener).unwrap();
        let mut senders = Vec::new();
        for _ in 0..STREAMS {
            senders.push(spawn_sender(addr, EACH, Some(net.peer_netns.clone())));
        }
        let resetter = spawn_resetter(&net.peer_netns, addr, 256 << 10, Duration::from_millis(300));
        let mut readers = Vec::new();
        for _ in 0..=STREAMS {
            let (socket, _): (TcpStream, _) = listener.accept().await.unwrap();
            let (mut stream, writer) = zcrx.attach(socket).unwrap();
            let (to_holder, mut from_reader) = tokio::sync::mpsc::unbounded_channel::<ZcBuf>();
            let holder = tokio::spawn(async move {
                let (mut position, mut held) = (0u64, std::collections::VecDeque::new());
                let mut from_resetter = false;
                while let Some(buf) = from_reader.recv().await {
                    from_resetter |= position == 0 && buf[0] == 0xFF;
                    if !from_resetter {
                        assert_eq!(first_mismatch(position, &buf), None, "at {position}");
                    }
                    position += buf.len() as u64;
                    held.push_back(buf);
                    if held.len() > KEEP {
                        held.pop_front();
                    }
                }
                (position, from_resetter)
            });
            readers.push(tokio::spawn(async move {
                let _writer = writer;
                loop {
                    match tokio::time::timeout(STALL, stream.next()).await {
                        Err(_) => panic!("no buffer for {STALL:?} while its holder keeps {KEEP}"),
                        Ok(None) => break,
                        Ok(Some(Ok(buf))) => to_holder.send(buf).unwrap(),
                        Ok(Some(Err(error))) => {
                            drop(to_holder);
                            return (holder.await.unwrap(), Some(error));
                        }
                    }
                }
                drop(to_holder);
                (holder.await.unwrap(), None)
            }));
        }
        let (mut complete, mut resets) = (0, 0);
        for reader in readers {
            let ((position, from_resetter), error) = reader.await.unwrap();
            match error {
                None => {
                    assert!(!from_resetter, "the reset stream ended without its reset");
                    assert_eq!(position, EACH);
                    complete += 1;
                }
                Some(error) => {
                    assert!(from_resetter, "a pattern stream failed: {error}");
                    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
                    resets += 1;
                }
            }
        }
        for sender in senders {
            assert_eq!(sender.join().unwrap(), EACH);
        }
        resetter.join().unwrap();
        assert_eq!((complete, resets), (STREAMS, 1));
        let stats = zcrx.stats();
        println!(
            "{} pauses over {STREAMS} streams, each resumed with {KEEP} of 16 chunks held",
            stats.stream_pauses
        );
        assert!(
            stats.stream_pauses >= STREAMS as u64,
            "every stream paused at least once: {stats}"
        );
        assert_eq!(stats.buffers_outstanding, 0);
        zcrx.shutdown().await;
    });
}

/// Whether `address` lies in one of this process's mappings.
fn is_mapped(address: usize) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|line| {
        let range = line.split(' ').next().unwrap();
        let (start, end) = range.split_once('-').unwrap();
        let start = usize::from_str_radix(start, 16).unwrap();
        let end = usize::from_str_radix(end, 16).unwrap();
        (start..end).contains(&address)
    })
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn buffers_outlive_stream_and_runtime() {
    const TOTAL: u64 = 1 << 20;
    let net = GuestNet::from_env();
    let held = runtime().block_on(async {
        // Holds more than a stream's budget on purpose (the area's own limits are under
        // test): budgets off.
        let zcrx = build(nic(&net).area_size(4 << 20).stream_budget(u64::MAX));
        let (listener, addr) = listen(&net.nic_addr).await;
        let sender = spawn_sender(addr, TOTAL, Some(net.peer_netns.clone()));
        let mut stream = accept(&zcrx, &listener).await;
        let mut held = Vec::new();
        let mut position = 0;
        while let Some(buf) = stream.next().await {
            let buf = buf.unwrap();
            position += buf.len() as u64;
            held.push(buf);
        }
        assert_eq!(position, TOTAL);
        sender.join().unwrap();
        drop(stream);
        assert_eq!(zcrx.stats().buffers_outstanding, held.len() as u64);
        zcrx.shutdown().await;
        held
    });
    // The runtime, its driver thread and the kernel's instance are gone; the data is not.
    let mut position = 0u64;
    for buf in &held {
        assert_eq!(first_mismatch(position, buf), None, "held data changed");
        position += buf.len() as u64;
    }
    assert_eq!(position, TOTAL);
    let area = held[0].as_ptr() as usize;
    assert!(is_mapped(area));
    drop(held);
    // The last buffer unmapped the area: nothing else kept it.
    assert!(!is_mapped(area), "the area outlived its last buffer");
    // The queue is free again: a new runtime can register it.
    let zcrx = build(nic(&net));
    runtime().block_on(zcrx.shutdown());
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn a_driver_panic_ends_every_stream_with_an_error() {
    let net = GuestNet::from_env();
    runtime().block_on(async {
        let zcrx = build(nic(&net).area_size(4 << 20));
        let (listener, addr) = listen(&net.nic_addr).await;
        // Two connections that stay open (the senders block until the test ends).
        let peers: Vec<_> = (0..2)
            .map(|_| {
                let netns = net.peer_netns.clone();
                std::thread::spawn(move || {
                    tokio_zcrx_kernel_tests::enter_netns(&netns);
                    let socket = std::net::TcpStream::connect(addr).unwrap();
                    std::io::Write::write_all(&mut &socket, &[0u8; 4096]).unwrap();
                    std::thread::sleep(Duration::from_secs(3));
                })
            })
            .collect();
        let mut streams = Vec::new();
        for _ in 0..2 {
            streams.push(accept(&zcrx, &listener).await);
        }
        for stream in &mut streams {
            let first = stream.next().await.unwrap().unwrap();
            assert_eq!(first[0], 0);
        }
        zcrx.inject_driver_panic();
        for mut stream in streams {
            // Whatever was delivered comes first; then an error, never a hang.
            let end = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match stream.next().await {
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => break e,
                        None => panic!("the stream ended cleanly after a driver panic"),
                    }
                }
            })
            .await
            .expect("the stream hung after the driver panicked");
            assert_eq!(end.kind(), std::io::ErrorKind::BrokenPipe);
            assert!(end.to_string().contains("injected driver panic"), "{end}");
            assert!(stream.next().await.is_none());
        }
        // The runtime refuses new work, saying why.
        let (local, local_addr) = listen("127.0.0.1").await;
        let client = TcpStream::connect(local_addr).await.unwrap();
        drop(local);
        let err = zcrx.attach(client).unwrap_err();
        assert!(err.to_string().contains("driver thread failed"), "{err}");
        for peer in peers {
            peer.join().unwrap();
        }
    });
}
