//! Many threads returning buffers at once while a fake kernel consumes and a driver flushes
//! overflow: every entry must reach the kernel exactly once, fully written.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use zcrx_core::refill::{FakeRefillRegion, RefillRing};
use zcrx_sys::zcrx::io_uring_zcrx_rqe;

/// Upper bound for one scenario; a lost entry shows up as this timeout, not as a hang.
const DEADLINE: Duration = Duration::from_secs(60);

/// Entry `id` of producer `producer`: unique and never zero or `POISON`.
fn entry(producer: u64, id: u64) -> io_uring_zcrx_rqe {
    io_uring_zcrx_rqe {
        off: (producer << 32) | (id + 1),
        len: producer as u32,
        __pad: 0,
    }
}

#[derive(Clone, Copy)]
enum Style {
    /// One `push` per entry.
    Single,
    /// `push_batch` of varying sizes, mixed with single pushes.
    Batches,
}

struct Scenario {
    ring_entries: u32,
    start: u32,
    producers: u64,
    per_producer: u64,
    style: Style,
    /// Whether the kernel pauses now and then, so that the ring fills and overflows.
    slow_kernel: bool,
}

struct Outcome {
    consumed: Vec<io_uring_zcrx_rqe>,
    ring: Arc<RefillRing>,
}

fn run(scenario: Scenario) -> Outcome {
    let (ring, mut kernel) =
        FakeRefillRegion::create_at(scenario.ring_entries, scenario.start).unwrap();
    let ring = Arc::new(ring);
    let total = (scenario.producers * scenario.per_producer) as usize;
    let producers_done = Arc::new(AtomicBool::new(false));

    let producers: Vec<_> = (0..scenario.producers)
        .map(|producer| {
            let ring = Arc::clone(&ring);
            let per_producer = scenario.per_producer;
            let style = scenario.style;
            thread::spawn(move || {
                let mut id = 0;
                let mut batch = Vec::with_capacity(16);
                while id < per_producer {
                    match style {
                        Style::Single => {
                            let _ = ring.push(entry(producer, id));
                            id += 1;
                        }
                        Style::Batches => {
                            let size = 1 + (id * 7 + producer) % 13;
                            batch.clear();
                            while batch.len() < size as usize && id < per_producer {
                                batch.push(entry(producer, id));
                                id += 1;
                            }
                            if batch.len() == 1 {
                                let _ = ring.push(batch[0]);
                            } else {
                                let _ = ring.push_batch(&batch);
                            }
                        }
                    }
                }
            })
        })
        .collect();

    // The driver: flushes overflow whenever there is some, until the producers are done and
    // everything is flushed.
    let driver = {
        let ring = Arc::clone(&ring);
        let producers_done = Arc::clone(&producers_done);
        thread::spawn(move || {
            let start = Instant::now();
            loop {
                let done = producers_done.load(Ordering::Acquire);
                ring.flush_overflow();
                if done && !ring.has_overflow() {
                    break;
                }
                assert!(start.elapsed() < DEADLINE, "driver: overflow never drained");
                thread::yield_now();
            }
        })
    };

    let consumer = thread::spawn(move || {
        let start = Instant::now();
        let mut consumed = Vec::with_capacity(total);
        let mut round = 0u64;
        while consumed.len() < total {
            round += 1;
            if scenario.slow_kernel && round % 64 == 0 {
                thread::sleep(Duration::from_micros(200));
            }
            if kernel.consume_into(&mut consumed, 1 + (round as usize % 48)) == 0 {
                thread::yield_now();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "kernel: {} of {total} entries arrived",
                consumed.len()
            );
        }
        assert_eq!(kernel.available(), 0, "more entries than were pushed");
        consumed
    });

    for producer in producers {
        producer.join().unwrap();
    }
    producers_done.store(true, Ordering::Release);
    driver.join().unwrap();
    let consumed = consumer.join().unwrap();
    Outcome { consumed, ring }
}

/// Every pushed entry exactly once, none poisoned or torn.
fn check_exactly_once(scenario_producers: u64, per_producer: u64, outcome: &Outcome) {
    let mut seen = vec![vec![false; per_producer as usize]; scenario_producers as usize];
    for e in &outcome.consumed {
        assert_ne!(
            *e,
            FakeRefillRegion::POISON,
            "kernel read an unwritten slot"
        );
        let producer = e.off >> 32;
        let id = (e.off & 0xffff_ffff) - 1;
        assert_eq!(u64::from(e.len), producer, "torn entry {e:?}");
        assert_eq!(e.__pad, 0);
        let slot = &mut seen[producer as usize][id as usize];
        assert!(!*slot, "entry {e:?} consumed twice");
        *slot = true;
    }
    assert!(seen.iter().flatten().all(|&s| s), "an entry was lost");
    let stats = outcome.ring.stats();
    let total = scenario_producers * per_producer;
    assert_eq!(stats.pushed, total);
    assert_eq!(stats.published, total);
    assert_eq!(stats.overflow_pending, 0);
    assert_eq!(stats.unconsumed, 0);
}

#[test]
fn single_pushes_with_overflow_lose_nothing() {
    let (producers, per_producer) = (4, 50_000);
    let outcome = run(Scenario {
        ring_entries: 64,
        start: 0,
        producers,
        per_producer,
        style: Style::Single,
        slow_kernel: true,
    });
    check_exactly_once(producers, per_producer, &outcome);
    assert!(
        outcome.ring.stats().overflowed > 0,
        "the scenario should exercise the overflow path"
    );
}

#[test]
fn batches_with_overflow_lose_nothing() {
    let (producers, per_producer) = (4, 50_000);
    let outcome = run(Scenario {
        ring_entries: 32,
        start: 0,
        producers,
        per_producer,
        style: Style::Batches,
        slow_kernel: true,
    });
    check_exactly_once(producers, per_producer, &outcome);
}

#[test]
fn index_wrap_around_under_contention() {
    let (producers, per_producer) = (3, 30_000);
    let outcome = run(Scenario {
        ring_entries: 16,
        start: u32::MAX - 1000,
        producers,
        per_producer,
        style: Style::Batches,
        slow_kernel: false,
    });
    check_exactly_once(producers, per_producer, &outcome);
}

#[test]
fn without_overflow_each_producer_is_consumed_in_its_order() {
    let (producers, per_producer) = (4, 20_000);
    let outcome = run(Scenario {
        ring_entries: 1 << 17, // more slots than entries in total: never full
        start: 0,
        producers,
        per_producer,
        style: Style::Single,
        slow_kernel: false,
    });
    check_exactly_once(producers, per_producer, &outcome);
    assert_eq!(outcome.ring.stats().overflowed, 0);
    // Slots are claimed in each producer's program order and published in slot order.
    let mut last = vec![0u64; producers as usize];
    for e in &outcome.consumed {
        let producer = (e.off >> 32) as usize;
        let id = e.off & 0xffff_ffff;
        assert!(id > last[producer], "producer {producer} reordered");
        last[producer] = id;
    }
}
