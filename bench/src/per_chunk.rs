//! The runtime's own cost per chunk, without a kernel.
//!
//! ```text
//! cargo run --release -p tokio-zcrx-bench --bin per-chunk [-- --chunks N --reps R]
//! ```
//!
//! A synthetic completion source stands in for the kernel (`tokio_zcrx::__bench::start`,
//! over the library's `backend/uring/synthetic/`): it posts 4 KiB data completions for free chunks of a
//! real area at full speed and takes chunks back from the real refill ring. Everything else
//! is the runtime's own path: completion decoding and validation, routing to the stream,
//! waking its task, the task taking and dropping each buffer, and the refill publication.
//! It reports wall-clock and CPU nanoseconds per chunk and the receive rate that implies at
//! 4 KiB chunks, for 1 and 64 streams. The issue's target: at most 100 ns per chunk, i.e.
//! at least 2.5 times the 6.1 million chunks per second a 200 Gbit/s NIC needs.
//!
//! Each case runs with per-stream budgets on (the default: byte-limited requests, holdings
//! counted per stream) and off (`StreamOptions::budget(u64::MAX)`), alternating run by run,
//! and prints the ratio of the medians. A chunk here is 4 KiB of data: a budgeted request
//! that ends inside a chunk delivers the rest in a second buffer, counted once.

use std::io;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;

fn main() -> ExitCode {
    let mut chunks: u64 = 2_000_000;
    let mut reps = 5;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        let parsed = value.as_deref().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), parsed) {
            ("--chunks", Some(n)) if n > 0 => chunks = n,
            ("--reps", Some(n)) if n > 0 => reps = n,
            _ => {
                eprintln!("usage: per-chunk [--chunks N (total per run)] [--reps R]");
                return ExitCode::from(2);
            }
        }
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "per-chunk runtime cost, synthetic completion source, 4 KiB chunks, {chunks} chunks \
         per run, {reps} runs, {workers} Tokio workers plus the driver thread"
    );
    println!(
        "{:>7}  {:<22}  {:<8}  {:>20}  {:>13}  {:>14}",
        "streams", "consumer", "budgets", "wall ns/chunk", "CPU ns/chunk", "implied Gbit/s"
    );
    let cases = [
        (1usize, Consume::EachBuffer),
        (64, Consume::EachBuffer),
        (1, Consume::Batches(64)),
        (64, Consume::Batches(64)),
    ];
    for (streams, consume) in cases {
        let consumer = match consume {
            Consume::EachBuffer => "next(), each dropped".to_string(),
            Consume::Batches(n) => format!("next_batch({n})"),
        };
        // A and B alternate, so that the machine's drift hits both.
        let mut runs = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (budgets, runs) in [true, false].into_iter().zip(runs.iter_mut()) {
                match per_chunk(streams, chunks / streams as u64, workers, consume, budgets) {
                    Ok(report) => runs.push(report),
                    Err(e) => {
                        eprintln!("per-chunk: {streams} streams: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
        let mut medians = Vec::new();
        for (label, runs) in ["on", "off"].into_iter().zip(runs.iter_mut()) {
            runs.sort_by(|a, b| a.ns_per_chunk().total_cmp(&b.ns_per_chunk()));
            let median = runs[runs.len() / 2];
            let (best, worst) = (runs[0], runs[runs.len() - 1]);
            println!(
                "{:>7}  {consumer:<22}  {label:<8}  {:>6.1} [{:>5.1}-{:>5.1}]  {:>13.1}  {:>14.1}",
                median.streams,
                median.ns_per_chunk(),
                best.ns_per_chunk(),
                worst.ns_per_chunk(),
                median.cpu_ns_per_chunk(),
                median.implied_gbps()
            );
            medians.push(median);
        }
        println!(
            "{:>7}  {consumer:<22}  on/off    {:>6.3}x wall  {:>11.3}x CPU",
            streams,
            medians[0].ns_per_chunk() / medians[1].ns_per_chunk(),
            medians[0].cpu_ns_per_chunk() / medians[1].cpu_ns_per_chunk()
        );
    }
    ExitCode::SUCCESS
}

/// How the [`per_chunk`] consumers take their buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consume {
    /// `ZcStream::next`, each buffer dropped on its own.
    EachBuffer,
    /// `ZcStream::next_batch(n)`, each batch returned whole.
    Batches(usize),
}

/// What [`per_chunk`] measured.
#[derive(Debug, Clone, Copy)]
struct PerChunkReport {
    /// Streams that received concurrently.
    streams: usize,
    /// 4 KiB chunks of data delivered, consumed and returned in all.
    chunks: u64,
    /// Wall-clock time.
    elapsed: Duration,
    /// Process CPU time (user + system) over the same interval.
    cpu: Duration,
}

impl PerChunkReport {
    /// Wall-clock nanoseconds per chunk.
    fn ns_per_chunk(&self) -> f64 {
        self.elapsed.as_nanos() as f64 / self.chunks as f64
    }

    /// CPU nanoseconds per chunk (all threads).
    fn cpu_ns_per_chunk(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.chunks as f64
    }

    /// The receive rate this runtime path sustains with 4 KiB chunks, in Gbit/s.
    fn implied_gbps(&self) -> f64 {
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
/// `budgets`: the default per-stream budgets, or none.
fn per_chunk(
    streams: usize,
    chunks_per_stream: u64,
    workers: usize,
    consume: Consume,
    budgets: bool,
) -> io::Result<PerChunkReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let zcrx = tokio_zcrx::__bench::start(4096, chunks_per_stream)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut clients = Vec::new();
        let mut attached = Vec::new();
        for _ in 0..streams {
            clients.push(tokio::net::TcpStream::connect(addr).await?);
            let (socket, _) = listener.accept().await?;
            let options = if budgets {
                tokio_zcrx::StreamOptions::new()
            } else {
                tokio_zcrx::StreamOptions::new().budget(u64::MAX)
            };
            attached.push(zcrx.attach_with(socket, options)?);
        }
        let started = Instant::now();
        let cpu_before = process_cpu();
        let tasks: Vec<_> = attached
            .into_iter()
            .map(|(mut stream, writer)| {
                tokio::spawn(async move {
                    let _writer = writer;
                    let mut bytes = 0u64;
                    let mut checksum = 0u8;
                    match consume {
                        Consume::EachBuffer => {
                            while let Some(buf) = stream.next().await {
                                let buf = buf?;
                                // Touch the data, as a consumer would.
                                checksum ^= buf[0] ^ buf[buf.len() - 1];
                                bytes += buf.len() as u64;
                            }
                        }
                        Consume::Batches(max) => {
                            while let Some(batch) = stream.next_batch(max).await {
                                for buf in batch?.iter() {
                                    checksum ^= buf[0] ^ buf[buf.len() - 1];
                                    bytes += buf.len() as u64;
                                }
                            }
                        }
                    }
                    std::hint::black_box(checksum);
                    Ok::<u64, io::Error>(bytes / 4096)
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

    /// The harness counts every chunk and reports finite, positive figures (the library's
    /// `every_chunk_arrives_and_returns` host test checks the same path without timing it).
    #[test]
    fn the_report_counts_every_chunk() {
        for consume in [Consume::EachBuffer, Consume::Batches(64)] {
            for budgets in [true, false] {
                let report = per_chunk(8, 5000, 2, consume, budgets).unwrap();
                assert_eq!((report.streams, report.chunks), (8, 40_000));
                assert!(report.elapsed > Duration::ZERO && report.cpu > Duration::ZERO);
                assert!(report.ns_per_chunk() > 0.0 && report.cpu_ns_per_chunk() > 0.0);
                assert!(report.implied_gbps().is_finite());
            }
        }
    }
}
