//! Host tests of the driver over the synthetic ring ([`super::synthetic`]): the tests that
//! predate the kernel personalities here, and scenarios per personality, seeded faults,
//! lifecycle regressions and idle CPU in files of their own.

mod budget_tests;
mod fault_tests;
mod growth_tests;
mod idle_tests;
mod lifecycle_tests;
mod scenarios;
mod send_tests;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::area::Area;
use super::synthetic::start;
use super::DriverShared;
use crate::Zcrx;

/// The driver on the host, end to end: every chunk of every stream arrives once and
/// goes back through the refill ring, with nothing left outstanding, whether the readers
/// take buffers one by one or in batches. (The per-chunk benchmark, bench/src/per_chunk.rs,
/// runs the same path and times it.)
#[test]
fn every_chunk_arrives_and_returns() {
    const STREAMS: usize = 8;
    const CHUNKS_PER_STREAM: u64 = 5000;
    let runtime = runtime();
    for batch in [None, Some(64)] {
        runtime.block_on(async {
            let zcrx = start(4096, CHUNKS_PER_STREAM).unwrap();
            let mut attached = Vec::new();
            for _ in 0..STREAMS {
                attached.push(attach_one(&zcrx).await);
            }
            let readers: Vec<_> = attached
                .into_iter()
                .map(|(mut stream, writer, client)| {
                    tokio::spawn(async move {
                        let _keep = (writer, client);
                        let (mut chunks, mut bytes) = (0u64, 0u64);
                        let mut checksum = 0u8;
                        match batch {
                            None => {
                                while let Some(buf) = stream.next().await {
                                    let buf = buf.unwrap();
                                    checksum ^= buf[0] ^ buf[buf.len() - 1];
                                    chunks += 1;
                                    bytes += buf.len() as u64;
                                }
                            }
                            Some(max) => {
                                while let Some(batch) = stream.next_batch(max).await {
                                    for buf in batch.unwrap().iter() {
                                        checksum ^= buf[0] ^ buf[buf.len() - 1];
                                        chunks += 1;
                                        bytes += buf.len() as u64;
                                    }
                                }
                            }
                        }
                        std::hint::black_box(checksum);
                        (chunks, bytes)
                    })
                })
                .collect();
            let (mut chunks, mut bytes) = (0, 0);
            for reader in readers {
                let (c, b) = reader.await.unwrap();
                chunks += c;
                bytes += b;
            }
            let sent = STREAMS as u64 * CHUNKS_PER_STREAM;
            assert_eq!(bytes, sent * 4096);
            // A budgeted request that ends at its byte limit inside a chunk leaves the rest
            // of that chunk to the next request: one more buffer, never one fewer.
            assert!(
                (sent..sent + sent / 100).contains(&chunks),
                "{chunks} buffers"
            );
            assert_eq!(zcrx.stats().buffers_outstanding, 0);
            zcrx.shutdown().await;
        });
    }
}

/// A two-worker Tokio runtime, as the synthetic tests run their consumers on.
pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub(super) fn driver_shared(zcrx: &Zcrx) -> Arc<DriverShared> {
    match zcrx.backend() {
        crate::backend::Backend::Uring(handle) => Arc::clone(&handle.shared),
        crate::backend::Backend::Copy(_) | crate::backend::Backend::Queues(_) => {
            unreachable!("a synthetic runtime of one queue")
        }
    }
}

/// A loopback connection whose server side is attached: stream, write half, client.
pub(super) async fn attach_one(
    zcrx: &Zcrx,
) -> (crate::ZcStream, crate::ZcWriteHalf, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (socket, _) = listener.accept().await.unwrap();
    let (stream, writer) = zcrx.attach(socket).unwrap();
    (stream, writer, client)
}

pub(super) fn area_of(shared: &DriverShared) -> std::sync::Weak<Area> {
    super::lock(&shared.area)
        .clone()
        .expect("the driver set it")
}

/// Buffers outlive their stream, the runtime and its driver; the last one dropped frees
/// the area (the bulk reference count reaches zero on a buffer, not on the driver), and
/// the statistics stay readable afterwards.
#[test]
fn buffers_outlive_the_runtime() {
    let runtime = runtime();
    let (held, shared) = runtime.block_on(async {
        let zcrx = start(64, 10).unwrap();
        let shared = driver_shared(&zcrx);
        let (mut stream, _writer, client) = attach_one(&zcrx).await;
        let mut held = Vec::new();
        while let Some(buf) = stream.next().await {
            held.push(buf.unwrap());
        }
        assert_eq!(held.len(), 10);
        assert_eq!(zcrx.stats().buffers_outstanding, 10);
        drop(stream);
        zcrx.shutdown().await;
        drop((zcrx, client));
        (held, shared)
    });
    let area = area_of(&shared);
    assert!(area.upgrade().is_some(), "held buffers keep the area");
    assert_eq!(shared.stats().buffers_outstanding, 10);
    // Another thread drops them, as a worker would.
    std::thread::spawn(move || {
        for buf in &held {
            assert_eq!(buf.len(), 4096);
            std::hint::black_box(buf[0]);
        }
        drop(held);
    })
    .join()
    .unwrap();
    assert!(area.upgrade().is_none(), "the last buffer frees the area");
    let stats = shared.stats();
    assert_eq!((stats.chunks, stats.buffers_outstanding), (10, 0));
}

/// With no buffer held, the area goes with the runtime: nothing the runtime shares with
/// its driver may keep it (a reference cycle once leaked every area).
#[test]
fn the_area_goes_with_the_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shared = runtime.block_on(async {
        let zcrx = start(64, 10).unwrap();
        let shared = driver_shared(&zcrx);
        let (mut stream, _writer, _client) = attach_one(&zcrx).await;
        let mut chunks = 0;
        while let Some(buf) = stream.next().await {
            buf.unwrap();
            chunks += 1;
        }
        assert_eq!(chunks, 10);
        zcrx.shutdown().await;
        shared
    });
    assert!(area_of(&shared).upgrade().is_none(), "the area leaked");
    assert_eq!(shared.stats().bytes, 10 * 4096);
}

/// In the io_uring modes the write half is registered with Tokio for writability only;
/// it still writes (plain and vectored), shuts down, reports addresses and, dropped,
/// ends the sending direction.
#[test]
fn the_write_half_writes_shuts_down_and_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = runtime();
    runtime.block_on(async {
        let zcrx = start(64, 1).unwrap();
        let (mut stream, mut writer, mut client) = attach_one(&zcrx).await;
        assert_eq!(writer.peer_addr().unwrap(), client.local_addr().unwrap());
        assert_eq!(writer.local_addr().unwrap(), client.peer_addr().unwrap());
        // More than the socket buffers hold, so the writer has to wait for writability.
        let payload: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.unwrap();
            received
        });
        writer.write_all(&payload[..1 << 20]).await.unwrap();
        let rest = &payload[1 << 20..];
        let mut written = 0;
        while written < rest.len() {
            let half = (rest.len() - written) / 2;
            let slices = [
                io::IoSlice::new(&rest[written..written + half]),
                io::IoSlice::new(&rest[written + half..]),
            ];
            written += writer.write_vectored(&slices).await.unwrap();
        }
        writer.flush().await.unwrap();
        writer.set_nodelay(true).unwrap();
        assert!(writer.nodelay().unwrap());
        // The descriptor it lends is the connection's socket.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&writer));
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads one int option of a live socket into a live int.
        unsafe {
            crate::sys::syscall!(getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            ))
        }
        .expect("TCP_NODELAY of a live socket");
        assert_ne!(value, 0);
        writer.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), payload);
        drop(writer);
        // The receive side is the synthetic one: one chunk, then the end.
        assert_eq!(stream.next().await.unwrap().unwrap().len(), 4096);
        assert!(stream.next().await.is_none());
        zcrx.shutdown().await;
    });
}

/// Outside a Tokio runtime, attach says so instead of panicking (the write half needs
/// the runtime's reactor).
#[test]
fn attach_outside_a_runtime_is_an_error() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (zcrx, socket, _client) = runtime.block_on(async {
        let zcrx = start(64, 1).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        (zcrx, socket, client)
    });
    let error = std::thread::spawn(move || zcrx.attach(socket).err().unwrap())
        .join()
        .unwrap();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    assert!(
        error.to_string().contains("within a Tokio runtime"),
        "{error}"
    );
}

/// Batches: at most `max` buffers each, every chunk arrives once, and dropped batches
/// (or buffers taken out of them) give every chunk back; a small area would stall
/// otherwise (the timeout turns that into a failure). Batches above 64 buffers are
/// returned in several runs.
#[test]
fn batches_return_every_chunk() {
    let runtime = runtime();
    for (area_chunks, max) in [(64, 16), (1024, 200)] {
        let shared = runtime.block_on(async {
            let zcrx = start(area_chunks, 5000).unwrap();
            let shared = driver_shared(&zcrx);
            let (mut stream, _writer, _client) = attach_one(&zcrx).await;
            let (mut chunks, mut batches, mut largest) = (0usize, 0usize, 0usize);
            if max > 64 {
                // Let the driver deliver ahead of the reader, so that the first batch holds
                // more than one run's 64 buffers: a reader that keeps up may never see one
                // (seen in CI on a loaded machine).
                let deadline = Instant::now() + Duration::from_secs(10);
                while zcrx.stats().buffers_outstanding <= 64 {
                    assert!(Instant::now() < deadline, "{:?}", zcrx.stats());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let reading = async {
                while let Some(batch) = stream.next_batch(max).await {
                    let batch = batch.unwrap();
                    assert!(!batch.is_empty() && batch.len() <= max);
                    assert_eq!(batch.len_bytes(), batch.len() * 4096);
                    largest = largest.max(batch.len());
                    chunks += batch.len();
                    batches += 1;
                    if batches % 3 == 0 {
                        // Taken apart: returned one by one, on another task.
                        let buffers = batch.into_vec();
                        tokio::spawn(async move { drop(buffers) }).await.unwrap();
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(30), reading)
                .await
                .expect("returns stalled");
            assert_eq!(chunks, 5000);
            assert!(largest > 1, "no batch held more than one buffer");
            if max > 64 {
                assert!(largest > 64, "no batch needed two runs: largest {largest}");
            }
            assert_eq!(zcrx.stats().buffers_outstanding, 0);
            zcrx.shutdown().await;
            shared
        });
        assert!(area_of(&shared).upgrade().is_none(), "the area leaked");
        assert_eq!(shared.stats().chunks, 5000);
    }
}

/// The epoll event masks this process has registered for `fd`, read from the epoll
/// instances' fdinfo.
fn epoll_masks(fd: i32) -> Vec<u32> {
    let mut masks = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().contains("eventpoll"));
        if !is_epoll {
            continue;
        }
        let name = entry.file_name();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", name.to_string_lossy()))
            .unwrap_or_default();
        for line in info.lines() {
            // tfd:        9 events: 8000001d data: ...
            let mut words = line.split_whitespace();
            if words.next() != Some("tfd:") {
                continue;
            }
            let target: i32 = words.next().unwrap().parse().unwrap();
            if target == fd && words.next() == Some("events:") {
                masks.push(u32::from_str_radix(words.next().unwrap(), 16).unwrap());
            }
        }
    }
    masks
}

/// In the io_uring modes Tokio's epoll watches an attached socket for writability only:
/// arriving data must not wake a Tokio worker.
#[test]
fn attached_sockets_are_not_watched_for_reads() {
    let runtime = runtime();
    runtime.block_on(async {
        let zcrx = start(64, 1).unwrap();
        let (_stream, writer, _client) = attach_one(&zcrx).await;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&writer);
        // Tokio may hold its epoll instance under two descriptors, so the one
        // registration can show up twice.
        let masks = epoll_masks(fd);
        assert!(!masks.is_empty(), "not registered at all");
        for mask in masks {
            assert_eq!(
                mask & libc::EPOLLIN as u32,
                0,
                "watched for reads: {mask:x}"
            );
            assert_ne!(
                mask & libc::EPOLLOUT as u32,
                0,
                "not watched for writes: {mask:x}"
            );
        }
        zcrx.shutdown().await;
    });
}
