//! Areas that grow (`Builder::area_growth`, `ZCRX_CTRL_ADD_AREA`, Linux 7.3+) over the
//! synthetic kernels: growth where the kernel has ADD_AREA, a fixed area reported (auto) or
//! a refusal (nic, nodev) where it has not, the maximum kept, and a refused addition
//! survived. Every byte is checked against its stream's pattern, and every chunk of every
//! area comes back.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast::error::TryRecvError;

use super::super::synthetic::faults::FaultConfig;
use super::super::synthetic::personality::{Personality, Registration};
use super::super::synthetic::ring::{Path, StreamPlan};
use super::super::synthetic::{start_with, SyntheticConfig, CHUNK_SIZE};
use super::scenarios::{check, on_every_kernel, read_checked_from, Harness, KERNELS};
use crate::{AreaGrowth, ErrorKind, EventKind, Mode, ZcBuf, ZcStream};

const CHUNK: usize = CHUNK_SIZE as usize;

/// 16 chunks at first, 16 more at a time, up to 64 (four areas).
fn growth() -> AreaGrowth {
    AreaGrowth {
        initial: 16 * CHUNK,
        step: 16 * CHUNK,
        maximum: 64 * CHUNK,
    }
}

fn config(personality: Personality, registration: Registration) -> SyntheticConfig {
    SyntheticConfig {
        growth: Some(growth()),
        // One stream holds what it receives on purpose: budgets off.
        stream_budget: Some(u64::MAX),
        ..SyntheticConfig::new(personality, registration)
    }
}

/// Reads and keeps buffers until `want` are held or nothing arrives for 200 ms (the area
/// is exhausted); checks every byte.
async fn hold(stream: &mut ZcStream, seed: u64, position: &mut u64, want: usize) -> Vec<ZcBuf> {
    let mut held = Vec::new();
    while held.len() < want {
        match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            Ok(Some(buf)) => {
                let buf = buf.unwrap();
                check(seed, position, &buf);
                held.push(buf);
            }
            Ok(None) => panic!("the stream ended early"),
            Err(_) => break,
        }
    }
    held
}

/// A reader that holds 40 chunks' worth: on 7.3 the area grows (to three areas) and it gets
/// them all without giving one back, from every area; on older kernels in auto mode the area
/// stays at 16 chunks, the mode selection says why, and the stream waits for returns. Either
/// way the stream completes intact once the buffers go, and every chunk comes back.
#[test]
fn areas_grow_where_the_kernel_can_add_them() {
    on_every_kernel(
        "areas_grow_where_the_kernel_can_add_them",
        |personality, registration| async move {
            let grows = personality == Personality::Linux7_3;
            for path in [Path::ZeroCopy, Path::Copy] {
                let h = Harness::start(config(personality, registration)).await;
                let mut events = h.zcrx.subscribe();
                // NIC mode grows at start already (the page pool's reserve is larger than
                // the first area, growth.rs): the events of those growths may be missed.
                let areas_when_subscribed = h.zcrx.stats().areas;
                let unavailable = &h.zcrx.mode_selection().unavailable;
                if grows {
                    assert!(unavailable.is_empty(), "{unavailable:?}");
                } else {
                    assert_eq!(unavailable.len(), 1, "{unavailable:?}");
                    assert!(unavailable[0].contains("7.3"), "{unavailable:?}");
                    assert!(unavailable[0].contains("area_growth"), "{unavailable:?}");
                }
                let total = 200 * CHUNK as u64;
                let (mut stream, _writer, _client) = h
                    .connect(StreamPlan {
                        path,
                        ..StreamPlan::new(31, total)
                    })
                    .await;
                let mut position = 0;
                let held = hold(&mut stream, 31, &mut position, 40).await;
                if grows {
                    // The kernel publishes its report at the driver's next enter, which may
                    // come after the last addition.
                    h.until("the kernel reports every area", |h| {
                        h.control.report().areas == h.zcrx.stats().areas
                    })
                    .await;
                }
                let stats = h.zcrx.stats();
                let report = h.control.report();
                if grows {
                    assert_eq!(held.len(), 40, "{path:?}: the area did not grow: {stats:?}");
                    assert!(stats.areas >= 3, "{path:?}: {} areas", stats.areas);
                    assert_eq!(
                        stats.memory_capacity,
                        u64::from(stats.areas) * 16 * CHUNK as u64
                    );
                    assert_eq!(report.areas, stats.areas);
                    assert_eq!(report.chunks as u64 * CHUNK as u64, stats.memory_capacity);
                    assert_eq!(report.add_area_refused, 0);
                    let mut grown = 0;
                    loop {
                        match events.try_recv() {
                            Ok(event) => grown += usize::from(event.kind == EventKind::AreaGrown),
                            Err(TryRecvError::Lagged(_)) => {}
                            Err(_) => break,
                        }
                    }
                    // One AreaGrown per area added since subscribing (one added between
                    // subscribing and reading the areas counts on both sides).
                    let grown = grown as u32;
                    assert!(
                        (stats.areas - areas_when_subscribed..stats.areas).contains(&grown),
                        "one AreaGrown per area added: {grown} events, {} areas, {} when \
                         subscribed",
                        stats.areas,
                        areas_when_subscribed
                    );
                } else {
                    assert_eq!(held.len(), 16, "{path:?}");
                    assert_eq!((stats.areas, report.areas), (1, 1));
                    assert_eq!(stats.memory_capacity, 16 * CHUNK as u64);
                }
                // Every byte held was checked against the pattern as it arrived; let go.
                drop(held);
                let (received, error) = read_checked_from(&mut stream, 31, position).await;
                assert!(error.is_none(), "{path:?}: {error:?}");
                assert_eq!(received, total, "{path:?}");
                h.every_chunk_back().await;
                assert_eq!(h.control.report().skipped_returns, 0);
                h.zcrx.shutdown().await;
            }
        },
    );
}

/// Modes nic and nodev refuse a growth policy on a kernel without ZCRX_CTRL_ADD_AREA,
/// saying which kernel it needs; 7.3 starts.
#[test]
fn growth_is_refused_before_7_3_outside_auto() {
    for (personality, registration) in KERNELS {
        let mode = match registration {
            Registration::Nic => Mode::Nic,
            Registration::NoDevice => Mode::NoDevice,
        };
        let started = start_with(SyntheticConfig {
            mode,
            ..config(personality, registration)
        });
        match (personality, started) {
            (Personality::Linux7_3, Ok((zcrx, _))) => {
                // NIC mode may have grown already: a 16-chunk area is below the page pool's
                // reserve (growth.rs). NODEV has no page pool.
                let areas = zcrx.stats().areas;
                match registration {
                    Registration::NoDevice => assert_eq!(areas, 1),
                    Registration::Nic => assert!((1..=4).contains(&areas), "{areas}"),
                }
                drop(zcrx);
            }
            (Personality::Linux7_3, Err(e)) => panic!("7.3 {registration:?}: {e}"),
            (_, Ok(_)) => panic!("{personality} {registration:?} started with growth"),
            (_, Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::KernelTooOld, "{e}");
                let text = e.to_string();
                assert!(
                    text.contains("7.3") && text.contains("area_growth"),
                    "{text}"
                );
            }
        }
    }
}

/// A reader that holds everything: the areas grow to the maximum (the last step smaller,
/// 16 + 16 + 8 chunks) and no further; releasing them completes the stream.
#[test]
fn growth_stops_at_the_maximum() {
    let runtime = super::runtime();
    runtime.block_on(async {
        for registration in [Registration::Nic, Registration::NoDevice] {
            let h = Harness::start(SyntheticConfig {
                growth: Some(AreaGrowth {
                    maximum: 40 * CHUNK,
                    ..growth()
                }),
                ..config(Personality::Linux7_3, registration)
            })
            .await;
            let total = 100 * CHUNK as u64;
            let (mut stream, _writer, _client) = h
                .connect(StreamPlan {
                    path: Path::Copy,
                    ..StreamPlan::new(5, total)
                })
                .await;
            let mut position = 0;
            let held = hold(&mut stream, 5, &mut position, 100).await;
            assert_eq!(held.len(), 40, "{registration:?}");
            let stats = h.zcrx.stats();
            assert_eq!((stats.areas, stats.memory_capacity), (3, 40 * CHUNK as u64));
            assert_eq!(h.control.report().areas, 3);
            drop(held);
            let (received, error) = read_checked_from(&mut stream, 5, position).await;
            assert!(error.is_none(), "{error:?}");
            assert_eq!(received, total);
            h.every_chunk_back().await;
            h.zcrx.shutdown().await;
        }
    });
}

/// NIC mode: the area grows ahead of what the kernel may take, not once the reader is seen
/// holding it. A stream with a fixed budget of 48 chunks on a 16-chunk area: right after it
/// is attached, the area grows to cover its budget and the page pool's reserve (48 + 64
/// chunks: 7 areas of 16), and no further; its reader holds its whole budget, and the
/// page pool never runs dry (no ALLOC_FAIL). Growing on holdings alone, the area grew only
/// after the NIC had found no chunk (the guest saw one reap deliver 228 chunks to a
/// 256-chunk area).
#[test]
fn nic_areas_grow_ahead_of_what_the_kernel_may_take() {
    use super::super::driver::PAGE_POOL_RESERVE_CHUNKS;
    let runtime = super::runtime();
    runtime.block_on(async {
        const BUDGET_CHUNKS: u64 = 48;
        let h = Harness::start(SyntheticConfig {
            growth: Some(AreaGrowth {
                maximum: 256 * CHUNK,
                ..growth()
            }),
            stream_budget: Some(BUDGET_CHUNKS * CHUNK as u64),
            ..SyntheticConfig::new(Personality::Linux7_3, Registration::Nic)
        })
        .await;
        let total = 200 * CHUNK as u64;
        let (mut stream, _writer, _client) = h.connect(StreamPlan::new(17, total)).await;
        let areas = (BUDGET_CHUNKS + PAGE_POOL_RESERVE_CHUNKS).div_ceil(16) as u32;
        h.until("the area covers the budget and the reserve", |h| {
            h.zcrx.stats().areas == areas
        })
        .await;
        let mut position = 0;
        let held = hold(&mut stream, 17, &mut position, 100).await;
        assert_eq!(
            held.len() as u64,
            BUDGET_CHUNKS,
            "the stream holds its budget"
        );
        let stats = h.zcrx.stats();
        assert_eq!(stats.areas, areas, "{stats:?}");
        assert_eq!(h.control.report().events[0], 0, "the page pool ran dry");
        drop(held);
        let (received, error) = read_checked_from(&mut stream, 17, position).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(received, total);
        assert_eq!(
            h.control.report().events[0],
            0,
            "the page pool ran dry: {:?} {:?}",
            h.control.report(),
            h.zcrx.stats()
        );
        h.every_chunk_back().await;
        h.zcrx.shutdown().await;
    });
}

/// The kernel refuses the first ZCRX_CTRL_ADD_AREA (ENOMEM: its memory, or the locked-memory
/// limit): the driver carries on with the area it has (the stream waits for returns
/// meanwhile), counts it, and grows on a later try.
#[test]
fn a_refused_addition_leaves_the_area_and_a_later_one_grows_it() {
    let runtime = super::runtime();
    runtime.block_on(async {
        let h = Harness::start(SyntheticConfig {
            faults: Some(FaultConfig {
                ctrl: 1000,
                ctrl_errno: Some(libc::ENOMEM),
                ctrl_limit: 1,
                ..FaultConfig::none(0)
            }),
            ..config(Personality::Linux7_3, Registration::Nic)
        })
        .await;
        let total = 100 * CHUNK as u64;
        let (mut stream, _writer, _client) = h.connect(StreamPlan::new(9, total)).await;
        let mut position = 0;
        let held = hold(&mut stream, 9, &mut position, 16).await;
        assert_eq!(held.len(), 16);
        // The kernel publishes its report at the driver's next enter.
        h.until("the kernel refused an area", |h| {
            h.control.report().add_area_refused > 0
        })
        .await;
        let report = h.control.report();
        assert_eq!(report.add_area_refused, 1, "{report:?}");
        assert_eq!(h.zcrx.stats().areas, 1);
        assert!(h.zcrx.stats().faults_survived >= 1);
        // Still held: the next try (after the back-off) adds an area and data flows again.
        let more = tokio::time::timeout(Duration::from_secs(3), stream.next())
            .await
            .expect("the area never grew after the refusal")
            .unwrap()
            .unwrap();
        check(9, &mut position, &more);
        assert!(h.zcrx.stats().areas >= 2);
        drop((held, more));
        let (received, error) = read_checked_from(&mut stream, 9, position).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(received, total);
        h.every_chunk_back().await;
        h.zcrx.shutdown().await;
    });
}

/// Buffers of every area outlive the runtime: held across shutdown, the bytes of all three
/// areas still read as delivered, and the memory goes with the last buffer.
#[test]
fn buffers_of_every_area_outlive_the_runtime() {
    let runtime = super::runtime();
    runtime.block_on(async {
        let h = Harness::start(config(Personality::Linux7_3, Registration::NoDevice)).await;
        let (mut stream, writer, client) = h
            .connect(StreamPlan {
                path: Path::Copy,
                ..StreamPlan::new(12, 100 * CHUNK as u64)
            })
            .await;
        let mut position = 0;
        let held = hold(&mut stream, 12, &mut position, 40).await;
        assert_eq!(held.len(), 40);
        assert!(h.zcrx.stats().areas >= 3);
        let area = std::sync::Arc::downgrade(&h.area());
        drop((stream, writer, client));
        h.zcrx.shutdown().await;
        let mut again = 0;
        for buf in &held {
            check(12, &mut again, buf);
        }
        assert_eq!(again, position, "every held byte still reads as delivered");
        assert!(area.upgrade().is_some(), "the buffers keep the areas");
        drop(held);
        assert!(area.upgrade().is_none(), "the last buffer frees them");
        assert_eq!(h.zcrx.stats().buffers_outstanding, 0);
        assert!(
            h.zcrx.stats().areas >= 3,
            "the final statistics keep the areas"
        );
    });
}
