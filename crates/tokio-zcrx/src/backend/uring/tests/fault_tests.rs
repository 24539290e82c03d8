//! Seeded fault injection against the real driver: every errno each kernel call can return
//! and malformed completions, at random points, then the invariants.
//!
//! `cargo test` runs [`QUICK_SEEDS`] seeds; `TZX_FAULT_SEEDS=N` runs N, `TZX_FAULT_SEED=S`
//! replays one (`cargo xtask faults [--seeds N]` sets the former). A failure prints its seed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::super::synthetic::faults::{self, FaultConfig, Injected, Malformed, Rng};
use super::super::synthetic::ring::{Lengths, Path, StreamPlan};
use super::super::synthetic::{SyntheticConfig, CHUNK_SIZE};
use super::super::{FAILED, RUNNING};
use super::scenarios::{check, Harness, KERNELS};
use crate::ZcBuf;

/// Seeds a plain `cargo test` runs.
const QUICK_SEEDS: u64 = 200;

/// Every stream of a run must end within this.
const RUN_BOUND: Duration = Duration::from_secs(10);

/// What one run saw, for the totals.
#[derive(Debug, Default, Clone, Copy)]
struct RunSummary {
    injected: Injected,
    streams: u64,
    ended_early: u64,
    bytes_verified: u64,
    leaked: u64,
}

/// How a consumer treats its stream.
#[derive(Debug, Clone, Copy)]
enum Consumer {
    ReadAll,
    /// Holds up to n buffers, then drops them at once on another thread.
    HoldThenDrop(usize),
    /// Drops the stream after n buffers.
    DropAfter(usize),
    Batches(usize),
}

/// One seeded run: a random kernel, area, refill ring, streams and consumers, with faults.
async fn fault_run(seed: u64, malformed_kinds: &[Malformed]) -> Result<RunSummary, String> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let (personality, registration) = rng.pick(&KERNELS);
    let area_chunks = rng.pick(&[8u32, 16, 64]);
    let refill_entries = rng.pick(&[Some(2u32), Some(4), None]);
    let mut faults = FaultConfig::all(seed);
    faults.malformed_kinds = malformed_kinds.to_vec();
    let h = Harness::start(SyntheticConfig {
        area_chunks,
        refill_entries,
        faults: Some(faults),
        // Consumers hold up to the whole area: a budget larger than it keeps them from
        // pausing (a reader that waits for more while it holds its budget would wait
        // forever) while every request still runs byte-limited, through the faults.
        stream_budget: Some(2 * u64::from(area_chunks) * CHUNK_SIZE as u64),
        ..SyntheticConfig::new(personality, registration)
    })
    .await;
    let area = h.area();
    let mut tasks = Vec::new();
    let streams = 1 + rng.below(4);
    for i in 0..streams {
        let plan = StreamPlan {
            seed: seed * 100 + i,
            bytes: 1 + rng.below(40 * u64::from(CHUNK_SIZE)),
            start: 0,
            path: rng.pick(&[Path::ZeroCopy, Path::Copy]),
            lengths: rng.pick(&[Lengths::Full, Lengths::Varied]),
            end: rng.pick(&[0, 0, -libc::ECONNRESET]),
            cq_overflow_at: rng
                .chance(200)
                .then(|| rng.below(40 * u64::from(CHUNK_SIZE))),
        };
        let consumer = match rng.below(4) {
            0 => Consumer::ReadAll,
            1 => Consumer::HoldThenDrop(1 + rng.below(2 * u64::from(area_chunks)) as usize),
            2 => Consumer::DropAfter(rng.below(20) as usize),
            _ => Consumer::Batches(1 + rng.below(70) as usize),
        };
        if std::env::var_os("TZX_FAULT_VERBOSE").is_some() {
            eprintln!(
                "seed {seed}: {personality} {registration:?}, {area_chunks} chunks, refill \
                 {refill_entries:?}, stream {i}: {plan:?}, {consumer:?}"
            );
        }
        let (mut stream, writer, client) = h.connect(plan.clone()).await;
        tasks.push(tokio::spawn(async move {
            let _keep = (writer, client);
            let mut position = 0u64;
            let mut held: Vec<ZcBuf> = Vec::new();
            let mut buffers = 0usize;
            // Some(true): ended with an error; Some(false): EOF; None: dropped early.
            let outcome = loop {
                if let Consumer::DropAfter(n) = consumer {
                    if buffers >= n {
                        break None;
                    }
                }
                if let Consumer::Batches(max) = consumer {
                    match stream.next_batch(max).await {
                        Some(Ok(batch)) => {
                            for buf in batch.iter() {
                                check(plan.seed, &mut position, buf);
                                buffers += 1;
                            }
                        }
                        Some(Err(_)) => break Some(true),
                        None => break Some(false),
                    }
                    continue;
                }
                let next = if held.is_empty() {
                    stream.next().await
                } else {
                    // Holding buffers while waiting for more can wait forever when they are
                    // the whole area (backpressure): a consumer that holds also lets go.
                    match tokio::time::timeout(Duration::from_millis(2), stream.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            let batch = std::mem::take(&mut held);
                            std::thread::spawn(move || drop(batch)).join().unwrap();
                            continue;
                        }
                    }
                };
                match next {
                    Some(Ok(buf)) => {
                        check(plan.seed, &mut position, &buf);
                        buffers += 1;
                        if let Consumer::HoldThenDrop(n) = consumer {
                            held.push(buf);
                            if held.len() >= n {
                                let batch = std::mem::take(&mut held);
                                std::thread::spawn(move || drop(batch)).join().unwrap();
                            }
                        }
                    }
                    Some(Err(_)) => break Some(true),
                    None => break Some(false),
                }
            };
            drop(held);
            drop(stream);
            if outcome == Some(false) {
                // EOF only after every byte, and only if the plan ends with it.
                assert_eq!(position, plan.bytes, "EOF before the end of the data");
                assert_eq!(plan.end, 0, "EOF on a stream that ends with an error");
            }
            (position, outcome != Some(false))
        }));
    }
    let mut summary = RunSummary {
        streams,
        ..RunSummary::default()
    };
    let joined = tokio::time::timeout(RUN_BOUND, async {
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await);
        }
        results
    })
    .await
    .map_err(|_| {
        format!(
            "a stream did not end within {RUN_BOUND:?} (hang): {:?}, {:?}, {} slots live",
            h.zcrx.stats(),
            h.control.report(),
            h.live_slots()
        )
    })?;
    for result in joined {
        let (bytes, early) = result.map_err(|e| format!("a consumer failed: {e}"))?;
        summary.bytes_verified += bytes;
        summary.ended_early += u64::from(early);
    }
    // Every buffer is dropped: every return reaches the refill ring or its overflow list.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.zcrx.stats().buffers_outstanding != 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "{} buffers outstanding after every buffer was dropped ({:?}, {:?}, {} slots \
                 live)",
                h.zcrx.stats().buffers_outstanding,
                h.zcrx.stats(),
                h.control.report(),
                h.live_slots(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The driver survived and is idle: a few enters over 10 ms at most (timers).
    let state = h.shared.state.load(Ordering::Acquire);
    if state != RUNNING {
        let failure = super::super::lock(&h.shared.failure).clone();
        return Err(format!("the driver ended (state {state}): {failure:?}"));
    }
    let enters_before = h.control.report().enters;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let enters = h.control.report().enters - enters_before;
    if enters > 20 {
        return Err(format!("the driver is not idle: {enters} enters in 10 ms"));
    }
    h.zcrx.shutdown().await;
    if h.shared.state.load(Ordering::Acquire) == FAILED {
        return Err("the driver failed at shutdown".into());
    }
    // After shutdown: a receive cancelled late may have had a malformed CQE in flight.
    let chunks_leaked = h.zcrx.stats().chunks_leaked;
    let report = h.control.report();
    if !report.torn_down {
        return Err("the kernel was not torn down at shutdown".into());
    }
    if report.double_returns != 0 {
        return Err(format!("{} chunks returned twice", report.double_returns));
    }
    if report.free + report.lent != report.chunks {
        return Err(format!("kernel accounting: {report:?}"));
    }
    // Chunks still lent: returns stuck in the overflow list (the kernel never saw them),
    // plus malformed completions whose reference was not given back (the driver leaks
    // those it cannot return safely, and returns for a foreign token or an offset outside
    // the area are skipped by the kernel).
    let overflow = area.refill.stats().overflow_pending as u64;
    let rejected = report.injected.malformed - report.injected.without_more;
    let valid_rejected_returns = area
        .counters
        .rejected_returns
        .load(Ordering::Relaxed)
        .saturating_sub(report.skipped_returns);
    let leaked = rejected.saturating_sub(valid_rejected_returns);
    if u64::from(report.lent) != overflow + leaked {
        return Err(format!(
            "chunks lost: {} still lent, {overflow} in the overflow list, {leaked} leaked for \
             malformed completions ({report:?})",
            report.lent
        ));
    }
    if leaked != chunks_leaked {
        return Err(format!(
            "{leaked} chunks left lent for malformed completions, the driver counted \
             {chunks_leaked}"
        ));
    }
    summary.injected = report.injected;
    summary.leaked = leaked;
    drop(area);
    Ok(summary)
}

fn seeds() -> std::ops::Range<u64> {
    if let Some(seed) = std::env::var("TZX_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return seed..seed + 1;
    }
    let count = std::env::var("TZX_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(QUICK_SEEDS);
    0..count
}

fn run_seeds(name: &str, malformed_kinds: &[Malformed]) {
    let runtime = super::runtime();
    let started = Instant::now();
    let mut total = RunSummary::default();
    let mut runs = 0;
    let mut failures = Vec::new();
    for seed in seeds() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(fault_run(seed, malformed_kinds))
        }));
        let error = match outcome {
            Ok(Ok(summary)) => {
                total.streams += summary.streams;
                total.ended_early += summary.ended_early;
                total.bytes_verified += summary.bytes_verified;
                total.leaked += summary.leaked;
                let (t, s) = (&mut total.injected, summary.injected);
                t.enter_errors += s.enter_errors;
                t.ctrl_errors += s.ctrl_errors;
                t.recv_errors += s.recv_errors;
                t.malformed += s.malformed;
                t.malformed_unreturnable += s.malformed_unreturnable;
                t.without_more += s.without_more;
                runs += 1;
                continue;
            }
            Ok(Err(error)) => error,
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        };
        eprintln!("{name}: seed {seed} FAILED: {error}\n  replay: TZX_FAULT_SEED={seed} cargo test -p tokio-zcrx --lib {name}");
        failures.push(seed);
        if failures.len() >= 5 {
            break;
        }
    }
    eprintln!(
        "{name}: {runs} seeds passed in {:.1} s: {} streams ({} ended early by a fault), {} \
         bytes verified, {}; {} chunks leaked for malformed completions, all accounted",
        started.elapsed().as_secs_f64(),
        total.streams,
        total.ended_early,
        total.bytes_verified,
        total.injected,
        total.leaked,
    );
    assert!(failures.is_empty(), "{name}: failing seeds {failures:?}");
}

/// Every fault class, malformed completions of every kind included (data without F_MORE
/// needs defect H fixed: such data ends the request).
#[test]
fn faults_keep_every_invariant() {
    run_seeds("faults_keep_every_invariant", &Malformed::ALL);
}

/// The fault classes and the run invariants are exercised: a handful of seeds inject
/// every kind somewhere.
#[test]
fn the_injector_injects_every_class() {
    let mut injector = faults::FaultInjector::new(FaultConfig::all(1));
    let mut enter = std::collections::HashSet::new();
    let mut recv = std::collections::HashSet::new();
    let mut ctrl = std::collections::HashSet::new();
    let mut malformed = std::collections::HashSet::new();
    for _ in 0..100_000 {
        enter.extend(injector.enter());
        ctrl.extend(injector.ctrl());
        recv.extend(injector.recv_error());
        if let Some(kind) = injector.malformed() {
            malformed.insert(format!("{kind:?}"));
        }
    }
    assert_eq!(enter.len(), faults::ENTER_ERRORS.len());
    assert_eq!(ctrl.len(), faults::CTRL_ERRORS.len());
    assert_eq!(recv.len(), faults::RECV_ERRORS.len());
    assert_eq!(malformed.len(), Malformed::ALL.len());
}
