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
//!
//! Then the same total work on one synthetic NIC queue and on two (`Builder::interface_queues`'
//! runtime: a driver thread, area and refill ring per queue, streams dealt over the queues in
//! turn), alternating run by run: median \[range\] of each, the ratio two/one of the medians
//! and the range of the ratios of each pair of runs, for wall and CPU time per chunk, and the
//! CPU split between the driver threads and the rest (Tokio workers). Both have the same
//! total area (each of two queues half of it, so every stream has the same budget) and the
//! same Tokio workers. The drivers' CPU includes the synthetic kernels' idle polling for
//! returned chunks (a real NIC's driver would sleep), shown apart.
//!
//! `--section budgets|queues` runs one section only; `--queues 1,2` (the default) the queue
//! counts compared, the first the baseline; `--streams N` and `--consumer next|batches` one
//! case (with `--queues 2`, a single configuration to profile).

use std::io;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;

fn main() -> ExitCode {
    let mut chunks: u64 = 2_000_000;
    let mut reps: u64 = 5;
    let mut sections = (true, true);
    let mut counts = vec![1u32, 2];
    let mut only = Only::default();
    let mut queue_budgets = true;
    let mut linger = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        let parsed = value.as_deref().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), parsed, value.as_deref()) {
            ("--chunks", Some(n), _) if n > 0 => chunks = n,
            ("--reps", Some(n), _) if n > 0 => reps = n,
            ("--section", _, Some("budgets")) => sections = (true, false),
            ("--section", _, Some("queues")) => sections = (false, true),
            ("--streams", Some(n), _) => only.streams = Some(n as usize),
            ("--budgets", _, Some("on")) => queue_budgets = true,
            ("--budgets", _, Some("off")) => queue_budgets = false,
            ("--linger-us", Some(n), _) if n <= 1000 => linger = Some(Duration::from_micros(n)),
            ("--consumer", _, Some("next")) => only.consume = Some(Consume::EachBuffer),
            ("--consumer", _, Some("batches")) => only.consume = Some(Consume::Batches(64)),
            ("--queues", _, Some(list)) => {
                match list
                    .split(',')
                    .map(str::parse::<u32>)
                    .collect::<Result<Vec<_>, _>>()
                {
                    Ok(list) if !list.is_empty() && list.iter().all(|&n| (1..=64).contains(&n)) => {
                        counts = list
                    }
                    _ => {
                        eprintln!("per-chunk: --queues takes counts from 1 to 64, e.g. 1,2");
                        return ExitCode::from(2);
                    }
                }
            }
            _ => {
                eprintln!(
                    "usage: per-chunk [--chunks N (total per run)] [--reps R] \
                     [--section budgets|queues] [--queues 1,2] \
                     [--streams N] [--consumer next|batches] [--budgets on|off] \
                     [--linger-us N (0-1000; the drivers' linger, default the runtime's)]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    if sections.0 {
        if let Err(e) = budgets_section(chunks, reps, workers, only) {
            eprintln!("per-chunk: {e}");
            return ExitCode::FAILURE;
        }
    }
    if sections.1 {
        if let Err(e) = queues_section(chunks, reps, workers, &counts, only, queue_budgets, linger)
        {
            eprintln!("per-chunk: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// The area of the single-queue runtime, and the total of every multi-queue one: 16 MiB.
const AREA_CHUNKS: u32 = 4096;

/// Every case with per-stream budgets on and off.
fn budgets_section(chunks: u64, reps: u64, workers: usize, only: Only) -> io::Result<()> {
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
    for (streams, consume) in only.filter(&cases) {
        let consumer = consume.to_string();
        // A and B alternate, so that the machine's drift hits both.
        let mut runs = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (budgets, runs) in [true, false].into_iter().zip(runs.iter_mut()) {
                let report = per_chunk(
                    Queues::Single,
                    streams,
                    chunks / streams as u64,
                    workers,
                    consume,
                    budgets,
                    None,
                )
                .map_err(|e| io::Error::other(format!("{streams} streams: {e}")))?;
                runs.push(report);
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
    Ok(())
}

/// The same total work on `counts[0]` synthetic queues and on each other count, alternating
/// run by run; each other count's ratio to the first.
fn queues_section(
    chunks: u64,
    reps: u64,
    workers: usize,
    counts: &[u32],
    only: Only,
    budgets: bool,
    linger: Option<Duration>,
) -> io::Result<()> {
    let names: Vec<String> = counts.iter().map(u32::to_string).collect();
    println!();
    println!(
        "synthetic NIC queues {} (a driver thread, area and refill ring each, {AREA_CHUNKS} \
         chunks of area in all), {chunks} chunks per run, {reps} runs each alternated, \
         {workers} Tokio workers, budgets {}, driver linger {}",
        names.join(" against "),
        if budgets { "on (the default)" } else { "off" },
        linger.map_or("the default (50 µs)".to_string(), |l| format!("{l:?}"))
    );
    println!(
        "{:>7}  {:<22}  {:<6}  {:>20}  {:>20}  {:>30}  {:>17}",
        "streams",
        "consumer",
        "queues",
        "wall ns/chunk",
        "CPU ns/chunk",
        "drivers (idle poll) + rest CPU",
        "per 1k: enters pauses"
    );
    let cases = [
        (2usize, Consume::EachBuffer),
        (64, Consume::EachBuffer),
        (2, Consume::Batches(64)),
        (64, Consume::Batches(64)),
    ];
    type Figure = fn(&PerChunkReport) -> f64;
    let figures: [(&str, Figure); 3] = [
        ("wall", PerChunkReport::ns_per_chunk),
        ("CPU", PerChunkReport::cpu_ns_per_chunk),
        ("CPU less idle poll", PerChunkReport::busy_cpu_ns_per_chunk),
    ];
    for (streams, consume) in only.filter(&cases) {
        let consumer = consume.to_string();
        // Every count in turn, so that the machine's drift hits all.
        let mut runs = vec![Vec::new(); counts.len()];
        for _ in 0..reps {
            for (&queues, runs) in counts.iter().zip(runs.iter_mut()) {
                let report = per_chunk(
                    Queues::Group(queues),
                    streams,
                    chunks / streams as u64,
                    workers,
                    consume,
                    budgets,
                    linger,
                )
                .map_err(|e| {
                    io::Error::other(format!("{queues} queues, {streams} streams: {e}"))
                })?;
                runs.push(report);
            }
        }
        for (queues, runs) in counts.iter().zip(&runs) {
            let [wall, cpu, _] = figures.map(|(_, figure)| Spread::of(runs.iter().map(figure)));
            let drivers = Spread::of(runs.iter().map(PerChunkReport::driver_ns_per_chunk));
            let idle = Spread::of(runs.iter().map(PerChunkReport::idle_poll_ns_per_chunk));
            let rest = Spread::of(runs.iter().map(PerChunkReport::rest_ns_per_chunk));
            let enters = Spread::of(runs.iter().map(PerChunkReport::enters_per_k));
            let pauses = Spread::of(runs.iter().map(PerChunkReport::pauses_per_k));
            println!(
                "{streams:>7}  {consumer:<22}  {queues:<6}  {wall:>20}  {cpu:>20}  \
                 {:>7.1} ({:>5.1}) + {:>7.1}  {:>8.1} {:>8.1}",
                drivers.median, idle.median, rest.median, enters.median, pauses.median
            );
        }
        for (index, queues) in counts.iter().enumerate().skip(1) {
            let mut line = format!(
                "{streams:>7}  {consumer:<22}  {:<6}",
                format!("{queues}/{}", counts[0])
            );
            for (name, figure) in figures {
                let median = |runs: &[PerChunkReport]| Spread::of(runs.iter().map(figure)).median;
                // The ratio of each pair of runs made one after the other.
                let pairs = Spread::of(
                    runs[0]
                        .iter()
                        .zip(&runs[index])
                        .map(|(base, other)| figure(other) / figure(base)),
                );
                line += &format!(
                    "  {:.3}x [{:.3}-{:.3}] {name}",
                    median(&runs[index]) / median(&runs[0]),
                    pairs.min,
                    pairs.max
                );
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// The cases to run (`--streams`, `--consumer`; `None`: all).
#[derive(Debug, Clone, Copy, Default)]
struct Only {
    streams: Option<usize>,
    consume: Option<Consume>,
}

impl Only {
    fn filter(self, cases: &[(usize, Consume)]) -> Vec<(usize, Consume)> {
        cases
            .iter()
            .copied()
            .filter(|&(streams, consume)| {
                self.streams.is_none_or(|n| n == streams)
                    && self.consume.is_none_or(|c| c == consume)
            })
            .collect()
    }
}

/// Median, least and most of some figures.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(figures: impl Iterator<Item = f64>) -> Spread {
        let mut sorted: Vec<f64> = figures.collect();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: sorted[sorted.len() / 2],
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = format!("{:.1} [{:.1}-{:.1}]", self.median, self.min, self.max);
        f.pad(&text)
    }
}

/// How the [`per_chunk`] consumers take their buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consume {
    /// `ZcStream::next`, each buffer dropped on its own.
    EachBuffer,
    /// `ZcStream::next_batch(n)`, each batch returned whole.
    Batches(usize),
}

impl std::fmt::Display for Consume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Consume::EachBuffer => f.write_str("next(), each dropped"),
            Consume::Batches(n) => write!(f, "next_batch({n})"),
        }
    }
}

/// Which runtime [`per_chunk`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queues {
    /// One queue, started as a single-queue runtime (`Builder::interface`): an area of
    /// [`AREA_CHUNKS`].
    Single,
    /// This many queues, started as `Builder::interface_queues` does: each its own area of
    /// [`AREA_CHUNKS`] / N chunks, driver thread and refill ring; streams dealt in turn.
    Group(u32),
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
    /// Of which the driver threads' (`Queues::Group` only: the single queue's thread is not
    /// told apart), from each thread's scheduler statistics.
    drivers: Duration,
    /// Of which every other thread's (the Tokio workers', the harness').
    rest: Duration,
    /// Of the drivers' time, what the synthetic kernels spent polling for returned chunks
    /// with nothing to deliver, which a real NIC's driver sleeps through (`Queues::Group`
    /// only).
    idle_poll: Duration,
    /// Turns of the driver loops that entered the (synthetic) kernel (`Queues::Group` only).
    enters: u64,
    /// Times a stream reached its budget and paused until its reader returned buffers.
    pauses: u64,
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

    /// The driver threads' CPU nanoseconds per chunk.
    fn driver_ns_per_chunk(&self) -> f64 {
        self.drivers.as_nanos() as f64 / self.chunks as f64
    }

    /// The synthetic kernels' idle polling, in CPU nanoseconds per chunk.
    fn idle_poll_ns_per_chunk(&self) -> f64 {
        self.idle_poll.as_nanos() as f64 / self.chunks as f64
    }

    /// Driver turns that entered the kernel, per thousand chunks.
    fn enters_per_k(&self) -> f64 {
        self.enters as f64 * 1000.0 / self.chunks as f64
    }

    /// Stream pauses at the budget, per thousand chunks.
    fn pauses_per_k(&self) -> f64 {
        self.pauses as f64 * 1000.0 / self.chunks as f64
    }

    /// CPU nanoseconds per chunk, less the synthetic kernels' idle polling.
    fn busy_cpu_ns_per_chunk(&self) -> f64 {
        self.cpu.saturating_sub(self.idle_poll).as_nanos() as f64 / self.chunks as f64
    }

    /// Every other thread's CPU nanoseconds per chunk.
    fn rest_ns_per_chunk(&self) -> f64 {
        self.rest.as_nanos() as f64 / self.chunks as f64
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

/// Each live thread of this process: whether it is one of the benchmark's driver threads
/// (`tzx-bench-q*`), and its CPU time so far, by thread id.
fn thread_cpu() -> std::collections::HashMap<u64, (bool, Duration)> {
    let mut threads = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return threads;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        let path = task.path();
        // The first field of schedstat: nanoseconds on a CPU.
        let Some(on_cpu) = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        else {
            continue;
        };
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        threads.insert(
            tid,
            (
                name.starts_with("tzx-bench-q"),
                Duration::from_nanos(on_cpu),
            ),
        );
    }
    threads
}

/// The CPU time the driver threads and all others used between two [`thread_cpu`]
/// snapshots: each thread's difference, so that a thread that ended meanwhile (a previous
/// run's driver going away) takes only its own share with it, not what it used before.
fn thread_cpu_between(
    before: &std::collections::HashMap<u64, (bool, Duration)>,
    after: &std::collections::HashMap<u64, (bool, Duration)>,
) -> (Duration, Duration) {
    let (mut drivers, mut rest) = (Duration::ZERO, Duration::ZERO);
    for (tid, &(driver, cpu)) in after {
        let used = cpu.saturating_sub(before.get(tid).map_or(Duration::ZERO, |b| b.1));
        if driver {
            drivers += used;
        } else {
            rest += used;
        }
    }
    (drivers, rest)
}

/// Runs the whole runtime path for `streams` streams of `chunks_per_stream` 4 KiB chunks
/// each, fed by the synthetic completion source at full speed, on a multi-threaded Tokio
/// runtime with `workers` worker threads; each stream's task reads and drops its buffers.
/// `budgets`: the default per-stream budgets, or none; `queues`: the runtime.
fn per_chunk(
    queues: Queues,
    streams: usize,
    chunks_per_stream: u64,
    workers: usize,
    consume: Consume,
    budgets: bool,
    linger: Option<Duration>,
) -> io::Result<PerChunkReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (zcrx, kernels) = match queues {
            Queues::Single => (
                tokio_zcrx::__bench::start(AREA_CHUNKS, chunks_per_stream)?,
                None,
            ),
            Queues::Group(n) => {
                let (zcrx, kernels) = tokio_zcrx::__bench::start_queues(
                    n,
                    AREA_CHUNKS / n,
                    chunks_per_stream,
                    linger,
                )?;
                (zcrx, Some(kernels))
            }
        };
        let idle_poll = || {
            kernels
                .as_ref()
                .map_or(Duration::ZERO, |k| k.idle_poll_cpu())
        };
        let enters = || kernels.as_ref().map_or(0, |k| k.enters());
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
        let threads_before = thread_cpu();
        let idle_before = idle_poll();
        let enters_before = enters();
        let pauses_before = zcrx.stats().stream_pauses;
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
        let thread_split = thread_cpu_between(&threads_before, &thread_cpu());
        let idle_after = idle_poll();
        let enters = enters() - enters_before;
        let pauses = zcrx.stats().stream_pauses - pauses_before;
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
            drivers: thread_split.0,
            rest: thread_split.1,
            idle_poll: idle_after.saturating_sub(idle_before),
            enters,
            pauses,
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
                let report = per_chunk(Queues::Single, 8, 5000, 2, consume, budgets, None).unwrap();
                assert_eq!((report.streams, report.chunks), (8, 40_000));
                assert!(report.elapsed > Duration::ZERO && report.cpu > Duration::ZERO);
                assert!(report.ns_per_chunk() > 0.0 && report.cpu_ns_per_chunk() > 0.0);
                assert!(report.implied_gbps().is_finite());
            }
        }
    }

    /// With several queues every chunk is counted too, and the driver threads' CPU is told
    /// apart from the rest (the library's `bench_queues_deal_streams_over_every_queue` checks
    /// that each queue's driver carries its share).
    #[test]
    fn the_report_counts_every_chunk_of_every_queue() {
        for queues in [1, 2] {
            for consume in [Consume::EachBuffer, Consume::Batches(64)] {
                let report =
                    per_chunk(Queues::Group(queues), 8, 5000, 2, consume, true, None).unwrap();
                assert_eq!((report.streams, report.chunks), (8, 40_000));
                assert!(report.drivers > Duration::ZERO, "{report:?}");
                assert!(report.rest > Duration::ZERO, "{report:?}");
                assert!(report.driver_ns_per_chunk() > 0.0 && report.rest_ns_per_chunk() > 0.0);
            }
        }
    }
}
