//! The runtime's own cost per chunk, without a kernel.
//!
//! ```text
//! cargo run --release -p tokio-zcrx-bench --bin per-chunk [-- --chunks N --reps R]
//! ```
//!
//! A synthetic completion source stands in for the kernel (see
//! `tokio_zcrx::runtime::synthetic`): it posts 4 KiB data completions for free chunks of a
//! real area at full speed and takes chunks back from the real refill ring. Everything else
//! is the runtime's own path: completion decoding and validation, routing to the stream,
//! waking its task, the task taking and dropping each buffer, and the refill publication.
//! It reports wall-clock and CPU nanoseconds per chunk and the receive rate that implies at
//! 4 KiB chunks, for 1 and 64 streams. The issue's target: at most 100 ns per chunk, i.e.
//! at least 2.5 times the 6.1 million chunks per second a 200 Gbit/s NIC needs.

use std::process::ExitCode;

use tokio_zcrx::__bench::{per_chunk, Consume};

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
        "{:>7}  {:<22}  {:>14}  {:>14}  {:>16}",
        "streams", "consumer", "wall ns/chunk", "CPU ns/chunk", "implied Gbit/s"
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
        let mut runs = Vec::new();
        for _ in 0..reps {
            match per_chunk(streams, chunks / streams as u64, workers, consume) {
                Ok(report) => runs.push(report),
                Err(e) => {
                    eprintln!("per-chunk: {streams} streams: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        runs.sort_by(|a, b| a.ns_per_chunk().total_cmp(&b.ns_per_chunk()));
        let median = runs[runs.len() / 2];
        let (best, worst) = (runs[0], runs[runs.len() - 1]);
        println!(
            "{:>7}  {consumer:<22}  {:>6.1} [{:.1}-{:.1}]  {:>14.1}  {:>16.1}",
            streams,
            median.ns_per_chunk(),
            best.ns_per_chunk(),
            worst.ns_per_chunk(),
            median.cpu_ns_per_chunk(),
            median.implied_gbps()
        );
    }
    ExitCode::SUCCESS
}
