//! A synthetic completion source: the whole runtime without a kernel.
//!
//! [`SyntheticKernel`] plays the kernel's part at full speed: every active receive gets
//! data completions for free chunks of a real area, and chunks come back through the real
//! refill ring, which it consumes like the kernel does (load-acquire the tail, store-release
//! the head). Everything else (decoding, routing, waking tasks, consuming, dropping,
//! refill publication) is the runtime's own code. It backs the per-chunk benchmark
//! ([`per_chunk`]) and host tests of the driver.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use zcrx_core::completion::{AreaLayout, RawCompletion};
use zcrx_sys::ring::IORING_CQE_F_MORE;
use zcrx_sys::zcrx::{io_uring_zcrx_rqe, IORING_ZCRX_AREA_MASK};

use super::area::Area;
use super::driver::{drive, Driver};
use super::instance::SharedLayout;
use super::kernel::{Capabilities, Kernel};
use super::{DriverShared, Stopper, UringHandle};
use crate::config::Target;
use crate::error::{Error, ErrorKind};
use crate::mem::Mapping;
use crate::mode::{ActiveMode, ModeSelection};
use crate::{Builder, Zcrx};

/// Data completions posted per reap, like a NIC's NAPI budget.
const COMPLETIONS_PER_REAP: usize = 64;

/// Where the refill ring's parts sit in the synthetic region.
const HEAD_OFFSET: usize = 0;
const TAIL_OFFSET: usize = 4;
const RQES_OFFSET: usize = 64;

struct Receive {
    user_data: u64,
    /// Chunks this receive still gets before it sees EOF.
    remaining: u64,
}

pub(crate) struct SyntheticKernel {
    chunk_size: u32,
    token: u64,
    free: Vec<u64>,
    head: *const AtomicU32,
    tail: *const AtomicU32,
    rqes: *const io_uring_zcrx_rqe,
    mask: u32,
    receives: Vec<Receive>,
    /// Round-robin position over `receives`.
    next: usize,
    /// Completions that are not data (ends, cancels, wakes), posted at the next reap.
    pending: Vec<RawCompletion>,
    eventfd: Option<(RawFd, u64)>,
    eventfd_ready: bool,
    chunks_per_receive: u64,
}

// SAFETY: the raw pointers point into the refill region, which the Area (kept alive by the
// driver that owns this kernel) maps; only the driver thread uses the kernel.
unsafe impl Send for SyntheticKernel {}

impl SyntheticKernel {
    /// Returns refilled chunks to the free list, as the kernel's refill path does.
    fn consume_refills(&mut self) {
        // SAFETY: head and tail point into the live region; we are the only consumer.
        let (head, tail) = unsafe {
            (
                (*self.head).load(Ordering::Relaxed),
                (*self.tail).load(Ordering::Acquire),
            )
        };
        let mut position = head;
        while position != tail {
            // SAFETY: entries between head and tail were published (release on tail).
            let rqe = unsafe { self.rqes.add((position & self.mask) as usize).read() };
            self.free.push(rqe.off & !IORING_ZCRX_AREA_MASK);
            position = position.wrapping_add(1);
        }
        // SAFETY: as above; release hands the slots back to the producers.
        unsafe { (*self.head).store(tail, Ordering::Release) };
    }

    fn poll_eventfd(&mut self, timeout_ms: i32) {
        let Some((fd, _)) = self.eventfd else { return };
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pollfd, 1, timeout_ms) } > 0 {
            self.eventfd_ready = true;
        }
    }

    fn can_deliver(&self) -> bool {
        !self.pending.is_empty()
            || self.eventfd_ready
            || (!self.free.is_empty() && !self.receives.is_empty())
    }
}

impl Kernel for SyntheticKernel {
    fn recv(&mut self, _fd: RawFd, _len: u32, user_data: u64) -> io::Result<()> {
        self.receives.push(Receive {
            user_data,
            remaining: self.chunks_per_receive,
        });
        Ok(())
    }

    fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let before = self.receives.len();
        self.receives.retain(|r| r.user_data != target);
        let found = before != self.receives.len();
        if found {
            self.pending.push(RawCompletion {
                user_data: target,
                res: -libc::ECANCELED,
                ..RawCompletion::default()
            });
        }
        self.pending.push(RawCompletion {
            user_data,
            res: if found { 0 } else { -libc::ENOENT },
            ..RawCompletion::default()
        });
        Ok(())
    }

    fn poll_readable(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        self.eventfd = Some((fd, user_data));
        Ok(())
    }

    fn flush_refill(&mut self) -> io::Result<()> {
        self.consume_refills();
        Ok(())
    }

    fn arm_event(&mut self, _event_type: u32) -> io::Result<()> {
        Ok(())
    }

    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.consume_refills();
            if self.can_deliver() {
                return Ok(());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
            if self.receives.is_empty() {
                // Nothing to deliver until a command arrives: sleep on the eventfd.
                self.poll_eventfd(10);
            } else {
                // Receives wait for returned chunks, which arrive without a wake-up, as
                // they would for a NIC refilling from the ring.
                self.poll_eventfd(0);
                std::thread::yield_now();
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<RawCompletion>) {
        if self.eventfd_ready {
            self.eventfd_ready = false;
            if let Some((_, user_data)) = self.eventfd {
                out.push(RawCompletion {
                    user_data,
                    res: 1,
                    flags: IORING_CQE_F_MORE,
                    big_cqe: [0; 2],
                });
            }
        }
        out.append(&mut self.pending);
        let mut budget = COMPLETIONS_PER_REAP;
        while budget > 0 && !self.receives.is_empty() {
            let Some(offset) = self.free.pop() else { break };
            self.next %= self.receives.len();
            let receive = &mut self.receives[self.next];
            out.push(RawCompletion {
                user_data: receive.user_data,
                res: self.chunk_size as i32,
                flags: IORING_CQE_F_MORE,
                big_cqe: [offset | self.token, 0],
            });
            receive.remaining -= 1;
            if receive.remaining == 0 {
                out.push(RawCompletion {
                    user_data: receive.user_data,
                    ..RawCompletion::default()
                });
                self.receives.swap_remove(self.next);
            } else {
                self.next += 1;
            }
            budget -= 1;
        }
    }
}

/// Starts a runtime whose driver runs over a [`SyntheticKernel`]: every attached stream
/// receives `chunks_per_stream` chunks of 4 KiB, then EOF. The sockets are only placeholders.
pub(crate) fn start(area_chunks: u32, chunks_per_stream: u64) -> Result<Zcrx, Error> {
    let builder = Builder::new().area_size(area_chunks as usize * 4096);
    let config = builder.validate_for(Target::NoDevice, 4096)?;
    let internal = |e: io::Error| Error::new(ErrorKind::Kernel, "synthetic runtime").with_source(e);
    let shared = Arc::new(DriverShared::new().map_err(internal)?);
    let memory = Mapping::new(config.area_size, false).map_err(internal)?;
    let rq_entries = config.refill_entries;
    let region = Mapping::new(RQES_OFFSET + rq_entries as usize * 16, false).map_err(internal)?;
    let layout = SharedLayout {
        area_token: 0,
        chunk_size: 4096,
        rq_entries,
        rq_head_offset: HEAD_OFFSET,
        rq_tail_offset: TAIL_OFFSET,
        rqes_offset: RQES_OFFSET,
        stats_offset: None,
    };
    let base = region.as_ptr();
    let chunks = (memory.len() / 4096) as u64;
    // SAFETY: the offsets lie inside the region just mapped, which the Area keeps alive.
    let (head, tail, rqes) = unsafe {
        (
            base.add(HEAD_OFFSET).cast::<AtomicU32>() as *const AtomicU32,
            base.add(TAIL_OFFSET).cast::<AtomicU32>() as *const AtomicU32,
            base.add(RQES_OFFSET).cast::<io_uring_zcrx_rqe>() as *const io_uring_zcrx_rqe,
        )
    };
    let area = Area::new(memory, region, &layout, Arc::clone(&shared)).map_err(internal)?;
    let area_layout = AreaLayout::new(area.len() as u64, 4096, 0)
        .map_err(|e| Error::new(ErrorKind::Kernel, format!("synthetic area: {e}")))?;
    let kernel = SyntheticKernel {
        chunk_size: 4096,
        token: 0,
        free: (0..chunks).rev().map(|c| c * 4096).collect(),
        head,
        tail,
        rqes,
        mask: rq_entries - 1,
        receives: Vec::new(),
        next: 0,
        pending: Vec::new(),
        eventfd: None,
        eventfd_ready: false,
        chunks_per_receive: chunks_per_stream,
    };
    *super::lock(&shared.description) = "synthetic completion source".into();
    let driver = Driver::with_kernel(
        kernel,
        Arc::new(area),
        area_layout,
        false,
        Capabilities {
            ctrl: true,
            events: false,
            teardown_stops_queue_first: true,
        },
        &config,
        Arc::clone(&shared),
    )?;
    let driver_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("tokio-zcrx-synthetic".into())
        .spawn(move || drive(driver, driver_shared))
        .map_err(internal)?;
    Ok(Zcrx::from_parts(
        super::Backend::Uring(UringHandle {
            _stopper: Arc::new(Stopper(Arc::clone(&shared))),
            shared,
        }),
        ModeSelection {
            chosen: ActiveMode::NoDevice,
            refused: Vec::new(),
        },
    ))
}

/// How the [`per_chunk`] consumers take their buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consume {
    /// `ZcStream::next`, each buffer dropped on its own.
    EachBuffer,
    /// `ZcStream::next_batch(n)`, each batch returned whole.
    Batches(usize),
}

/// What [`per_chunk`] measured.
#[derive(Debug, Clone, Copy)]
pub struct PerChunkReport {
    /// Streams that received concurrently.
    pub streams: usize,
    /// Chunks delivered, consumed and returned in all.
    pub chunks: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// Process CPU time (user + system) over the same interval.
    pub cpu: Duration,
}

impl PerChunkReport {
    /// Wall-clock nanoseconds per chunk.
    pub fn ns_per_chunk(&self) -> f64 {
        self.elapsed.as_nanos() as f64 / self.chunks as f64
    }

    /// CPU nanoseconds per chunk (all threads).
    pub fn cpu_ns_per_chunk(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.chunks as f64
    }

    /// The receive rate this runtime path sustains with 4 KiB chunks, in Gbit/s.
    pub fn implied_gbps(&self) -> f64 {
        4096.0 * 8.0 / self.ns_per_chunk()
    }
}

fn process_cpu() -> Duration {
    // SAFETY: getrusage writes one rusage struct to a live local.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Runs the whole runtime path for `streams` streams of `chunks_per_stream` 4 KiB chunks
/// each, fed by the synthetic completion source at full speed, on a multi-threaded Tokio
/// runtime with `workers` worker threads; each stream's task reads and drops its buffers.
pub fn per_chunk(
    streams: usize,
    chunks_per_stream: u64,
    workers: usize,
    consume: Consume,
) -> io::Result<PerChunkReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let zcrx = start(4096, chunks_per_stream)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut clients = Vec::new();
        let mut attached = Vec::new();
        for _ in 0..streams {
            clients.push(tokio::net::TcpStream::connect(addr).await?);
            let (socket, _) = listener.accept().await?;
            attached.push(zcrx.attach(socket)?);
        }
        let started = Instant::now();
        let cpu_before = process_cpu();
        let tasks: Vec<_> = attached
            .into_iter()
            .map(|(mut stream, writer)| {
                tokio::spawn(async move {
                    let _writer = writer;
                    let mut chunks = 0u64;
                    let mut checksum = 0u8;
                    match consume {
                        Consume::EachBuffer => {
                            while let Some(buf) = stream.next().await {
                                let buf = buf?;
                                // Touch the data, as a consumer would.
                                checksum ^= buf[0] ^ buf[buf.len() - 1];
                                chunks += 1;
                            }
                        }
                        Consume::Batches(max) => {
                            while let Some(batch) = stream.next_batch(max).await {
                                for buf in batch?.iter() {
                                    checksum ^= buf[0] ^ buf[buf.len() - 1];
                                    chunks += 1;
                                }
                            }
                        }
                    }
                    std::hint::black_box(checksum);
                    Ok::<u64, io::Error>(chunks)
                })
            })
            .collect();
        let mut chunks = 0;
        for task in tasks {
            chunks += task.await.map_err(io::Error::other)??;
        }
        let elapsed = started.elapsed();
        let cpu = process_cpu() - cpu_before;
        zcrx.shutdown().await;
        drop(clients);
        if chunks != streams as u64 * chunks_per_stream {
            return Err(io::Error::other(format!(
                "{chunks} chunks arrived, {} were sent",
                streams as u64 * chunks_per_stream
            )));
        }
        Ok(PerChunkReport {
            streams,
            chunks,
            elapsed,
            cpu,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver on the host, end to end: every chunk of every stream arrives once and
    /// goes back through the refill ring, with nothing left outstanding.
    #[test]
    fn every_chunk_arrives_and_returns() {
        for consume in [Consume::EachBuffer, Consume::Batches(64)] {
            let report = per_chunk(8, 5000, 2, consume).unwrap();
            assert_eq!((report.streams, report.chunks), (8, 40_000));
            assert!(report.elapsed > Duration::ZERO && report.cpu > Duration::ZERO);
            assert!(report.ns_per_chunk() > 0.0 && report.cpu_ns_per_chunk() > 0.0);
            assert!(report.implied_gbps().is_finite());
        }
    }

    fn driver_shared(zcrx: &Zcrx) -> Arc<DriverShared> {
        match &zcrx.backend {
            super::super::Backend::Uring(handle) => Arc::clone(&handle.shared),
            super::super::Backend::Copy(_) => unreachable!("a synthetic runtime"),
        }
    }

    /// A loopback connection whose server side is attached: stream, write half, client.
    async fn attach_one(
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

    fn area_of(shared: &DriverShared) -> std::sync::Weak<Area> {
        super::super::lock(&shared.area)
            .clone()
            .expect("the driver set it")
    }

    /// Buffers outlive their stream, the runtime and its driver; the last one dropped frees
    /// the area (the bulk reference count reaches zero on a buffer, not on the driver), and
    /// the statistics stay readable afterwards.
    #[test]
    fn buffers_outlive_the_runtime() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
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
                    std::io::IoSlice::new(&rest[written..written + half]),
                    std::io::IoSlice::new(&rest[written + half..]),
                ];
                written += writer.write_vectored(&slices).await.unwrap();
            }
            writer.flush().await.unwrap();
            writer.set_nodelay(true).unwrap();
            assert!(writer.nodelay().unwrap());
            // The descriptor it lends is the connection's socket.
            let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&writer));
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: reads one int option of a live socket into a live int.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!((rc, value != 0), (0, true));
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for (area_chunks, max) in [(64, 16), (1024, 200)] {
            let shared = runtime.block_on(async {
                let zcrx = start(area_chunks, 5000).unwrap();
                let shared = driver_shared(&zcrx);
                let (mut stream, _writer, _client) = attach_one(&zcrx).await;
                let (mut chunks, mut batches, mut largest) = (0usize, 0usize, 0usize);
                let reading = async {
                    while let Some(batch) = stream.next_batch(max).await {
                        let batch = batch.unwrap();
                        assert!(!batch.is_empty() && batch.len() <= max);
                        assert_eq!(batch.bytes(), batch.len() * 4096);
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
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{}", name.to_string_lossy()))
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
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
}
