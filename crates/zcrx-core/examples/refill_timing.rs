//! Quick timing of the refill producer's hot path (not a benchmark suite): ns per `push`
//! and per entry of `push_batch`, on one thread and with two threads pushing at once.
//!
//! ```text
//! cargo run -p zcrx-core --release --example refill_timing
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use zcrx_core::refill::{refill_entry, FakeRefillRegion, RefillRing};
use zcrx_sys::zcrx::io_uring_zcrx_rqe;

const RING: u32 = 4096;
const ROUNDS: usize = 2000;

fn entries(n: usize) -> Vec<io_uring_zcrx_rqe> {
    (0..n as u64)
        .map(|i| refill_entry(i * 4096, 4096, 0))
        .collect()
}

/// ns per entry for `threads` threads each doing `ROUNDS` rounds of `RING / threads / 2`
/// entries (pushed singly or as one batch), with the kernel draining between rounds.
fn run(threads: usize, batch: bool) -> f64 {
    let (ring, mut kernel) = FakeRefillRegion::create(RING).unwrap();
    let ring = Arc::new(ring);
    let per_round = RING as usize / threads / 2;
    let work = entries(per_round);
    let mut total = std::time::Duration::ZERO;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads.saturating_sub(1) {
                s.spawn(|| push_round(&ring, &work, batch));
            }
            push_round(&ring, &work, batch);
        });
        total += start.elapsed();
        black_box(kernel.consume(usize::MAX));
    }
    total.as_nanos() as f64 / (ROUNDS * per_round * threads) as f64
}

fn push_round(ring: &RefillRing, work: &[io_uring_zcrx_rqe], batch: bool) {
    if batch {
        for chunk in work.chunks(32) {
            let _ = ring.push_batch(black_box(chunk));
        }
    } else {
        for &entry in work {
            let _ = ring.push(black_box(entry));
        }
    }
}

fn main() {
    // The single-thread figures exclude thread start-up: scope with one thread spawns none.
    println!(
        "push 1 thread: {:.1} ns, push_batch(32) 1 thread: {:.2} ns/entry, push 2 threads: \
         {:.1} ns/entry, push_batch(32) 2 threads: {:.2} ns/entry",
        run(1, false),
        run(1, true),
        run(2, false),
        run(2, true)
    );
}
