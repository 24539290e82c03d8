//! The per-chunk benchmark harness (`bench-internals`): the whole runtime path fed by a
//! synthetic kernel at full speed.

use std::io;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::start;

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
    unsafe { crate::sys::syscall!(getrusage(libc::RUSAGE_SELF, &mut usage)) }
        .expect("getrusage(RUSAGE_SELF) cannot fail with a valid pointer");
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
