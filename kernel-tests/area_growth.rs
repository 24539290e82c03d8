//! Areas that grow (`Builder::area_growth`, `ZCRX_CTRL_ADD_AREA`) on the guest's real kernel,
//! in NIC mode (the patched netdevsim queue) and NODEV mode: a reader starts with a 256 KiB
//! area and holds its buffers until the area has grown to three kernel areas and it holds
//! more than two areas' worth, then lets them go; the stream completes intact (every byte
//! checked), the statistics show the areas, NIC mode drops nothing once the area grew, and
//! every buffer is back at the end. (In NIC mode the area grows as soon as the stream
//! receives: its budget, larger than the first area, is what the kernel may take before the
//! driver looks, and the NIC's page pool needs its reserve on top; growing on holdings alone
//! let one reap take more than was free, and the NIC dropped, between growths and after the
//! release.)
//!
//! What differs by kernel is asserted, never skipped: on 7.3+ the area grows; before 7.3
//! (ZCRX_CTRL_ADD_AREA does not exist) modes nic and nodev refuse the policy at build with
//! `KernelTooOld`, and auto keeps a fixed area and says so in the mode selection.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_zcrx::{AreaGrowth, Builder, ErrorKind, EventKind, Mode, Zcrx};
use tokio_zcrx_kernel_tests::support::{build, nic, nodev, runtime, rx_dropped};
use tokio_zcrx_kernel_tests::GuestKernel;
use tokio_zcrx_kernel_tests::{first_mismatch, spawn_sender, GuestNet};

const AREA: usize = 256 << 10;
/// What the sender sends: far more than the largest area the policy allows.
const TOTAL: u64 = 64 << 20;
/// One reader holds more than two areas' worth: a fixed budget above that (a derived one is
/// at most a quarter of the memory, which one stream never outgrows), which also bounds what
/// its socket and its queue take.
const BUDGET: u64 = 1 << 20;
/// No step of the test may take longer.
const BOUND: Duration = Duration::from_secs(30);

fn growth() -> AreaGrowth {
    AreaGrowth {
        initial: AREA,
        step: AREA,
        maximum: 16 * AREA,
    }
}

fn has_add_area() -> bool {
    GuestKernel::running().has_add_area()
}

/// What the run saw.
#[derive(Debug)]
struct Outcome {
    areas: u32,
    /// Areas when the reader let go (it may grow further while the stream's queue fills
    /// up to its budget).
    areas_after_release: u32,
    held_chunks: usize,
    grown_events: usize,
    /// Drops on the NIC from the first growth to the end (NIC mode).
    drops_after_growth: Option<u64>,
    drops_before_growth: Option<u64>,
}

/// Receives `TOTAL` bytes from a sender (in `netns`, to `listen_ip`), holding every buffer
/// until the area has three kernel areas and more than two areas' chunks are held, then
/// reads the rest, checking every byte. `nic`: the interface whose drops are counted.
fn grow_hold_release(
    zcrx: Zcrx,
    listen_ip: &str,
    netns: Option<String>,
    nic: Option<&str>,
) -> Outcome {
    let area_chunks = AREA / 4096;
    runtime().block_on(async {
        let mut events = zcrx.subscribe();
        let listener = TcpListener::bind((listen_ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drops_at_start = nic.map(rx_dropped);
        let sender = spawn_sender(addr, TOTAL, netns);
        let (socket, _) = listener.accept().await.unwrap();
        let (mut stream, _writer) = zcrx.attach(socket).unwrap();
        let started = Instant::now();
        let (mut held, mut position) = (Vec::new(), 0u64);
        let mut drops_at_growth = None;
        while zcrx.stats().areas < 3 || held.len() <= 2 * area_chunks {
            assert!(
                started.elapsed() < BOUND,
                "the area did not grow: {} chunks held, {:?}",
                held.len(),
                zcrx.stats()
            );
            let buf = tokio::time::timeout(BOUND, stream.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("no data with {} chunks held: {:?}", held.len(), zcrx.stats())
                })
                .expect("the stream ended early")
                .expect("stream error");
            if let Some(i) = first_mismatch(position, &buf) {
                panic!("byte {} of the stream is wrong", position + i as u64);
            }
            position += buf.len() as u64;
            held.push(buf);
            if drops_at_growth.is_none() && zcrx.stats().areas >= 2 {
                drops_at_growth = nic.map(rx_dropped);
            }
        }
        let stats = zcrx.stats();
        eprintln!(
            "grown: {} areas, {} bytes, {} chunks held ({} bytes of data) after {:?}",
            stats.areas,
            stats.memory_capacity,
            held.len(),
            position,
            started.elapsed()
        );
        assert_eq!(stats.memory_capacity, u64::from(stats.areas) * AREA as u64);
        assert!(stats.buffers_outstanding >= held.len() as u64);
        let held_chunks = held.len();
        drop(held);
        let areas_after_release = zcrx.stats().areas;
        while let Some(buf) = tokio::time::timeout(BOUND, stream.next())
            .await
            .expect("the stream stalled after the release")
        {
            let buf = buf.expect("stream error");
            if let Some(i) = first_mismatch(position, &buf) {
                panic!("byte {} of the stream is wrong", position + i as u64);
            }
            position += buf.len() as u64;
        }
        assert_eq!(position, TOTAL, "the stream is not intact");
        assert_eq!(sender.join().unwrap(), TOTAL);
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        while zcrx.stats().buffers_outstanding != 0 {
            assert!(Instant::now() < deadline, "buffers not back: {:?}", zcrx.stats());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut grown_events = 0;
        while let Ok(event) = events.try_recv() {
            grown_events += usize::from(event.kind == EventKind::AreaGrown);
        }
        let drops_at_end = nic.map(rx_dropped);
        let stats = zcrx.stats();
        eprintln!("end: {stats:?}, drops at start/growth/end {drops_at_start:?}/{drops_at_growth:?}/{drops_at_end:?}");
        zcrx.shutdown().await;
        Outcome {
            areas: stats.areas,
            areas_after_release,
            held_chunks,
            grown_events,
            drops_after_growth: drops_at_end.zip(drops_at_growth).map(|(end, at)| end - at),
            drops_before_growth: drops_at_growth.zip(drops_at_start).map(|(at, start)| at - start),
        }
    })
}

fn check_grown(outcome: &Outcome) {
    // Three areas while the reader held, never fewer later (areas are never removed).
    assert!(outcome.areas_after_release >= 3, "{outcome:?}");
    assert!(outcome.areas >= outcome.areas_after_release, "{outcome:?}");
    assert!(outcome.held_chunks > 2 * AREA / 4096, "{outcome:?}");
    assert_eq!(
        outcome.grown_events as u32,
        outcome.areas - 1,
        "{outcome:?}"
    );
}

/// Before 7.3: an explicit mode refuses the policy, naming the kernel it needs.
fn assert_refused(builder: Builder) {
    let error = builder
        .area_growth(growth())
        .build()
        .expect_err("growth before 7.3");
    assert_eq!(error.kind(), ErrorKind::KernelTooOld, "{error}");
    assert!(error.to_string().contains("7.3"), "{error}");
    assert!(error.to_string().contains("area_growth"), "{error}");
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nic_area_grows_without_drops() {
    let net = GuestNet::from_env();
    if !has_add_area() {
        return assert_refused(nic(&net));
    }
    let zcrx = build(nic(&net).area_growth(growth()).stream_budget(BUDGET));
    assert_eq!(zcrx.stats().areas, 1);
    let outcome = grow_hold_release(
        zcrx,
        &net.nic_addr,
        Some(net.peer_netns.clone()),
        Some(&net.nic),
    );
    eprintln!(
        "nic: {outcome:?}; {} drops before the first growth",
        outcome.drops_before_growth.unwrap_or(0)
    );
    check_grown(&outcome);
    assert_eq!(outcome.drops_after_growth, Some(0), "{outcome:?}");
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_area_grows() {
    if !has_add_area() {
        return assert_refused(nodev());
    }
    let zcrx = build(nodev().area_growth(growth()).stream_budget(BUDGET));
    let outcome = grow_hold_release(zcrx, "127.0.0.1", None, None);
    eprintln!("nodev: {outcome:?}");
    check_grown(&outcome);
}

/// Auto mode: on 7.3 the policy is in force (nothing reported missing); before 7.3 the
/// area stays at its initial size and the mode selection says why.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn auto_mode_reports_growth_where_it_is_missing() {
    let zcrx = build(Zcrx::builder().mode(Mode::Auto).area_growth(growth()));
    let selection = zcrx.mode_selection().clone();
    let stats = zcrx.stats();
    assert_eq!(
        (stats.areas, stats.memory_capacity),
        (1, AREA as u64),
        "{selection}"
    );
    if has_add_area() {
        assert!(selection.unavailable.is_empty(), "{selection}");
    } else {
        assert_eq!(selection.unavailable.len(), 1, "{selection}");
        assert!(selection.unavailable[0].contains("7.3"), "{selection}");
        assert!(selection.to_string().contains("without"), "{selection}");
    }
}
