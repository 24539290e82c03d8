//! Regression tests of the driver's lifecycle fixes that need no particular kernel: the
//! ends of a runtime reach everything that waits on it, a panicking waker is contained, and
//! a limited stream resubmitted after exhaustion asks for no more than its limit.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use futures::StreamExt;

use super::super::synthetic::personality::{Personality, Registration};
use super::super::synthetic::ring::{Path, StreamPlan};
use super::super::synthetic::{SyntheticConfig, CHUNK_SIZE};
use super::scenarios::{check, read_checked, Harness};
use crate::backend::wake::WAKER_PANICS;
use crate::{StreamOptions, ZcListener};

const CHUNK: u64 = CHUNK_SIZE as u64;

fn config() -> SyntheticConfig {
    SyntheticConfig::new(Personality::Linux7_3, Registration::NoDevice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_subscribers_see_the_channel_close_at_shutdown() {
    let harness = Harness::start(config()).await;
    let mut events = harness.zcrx.subscribe();
    harness.zcrx.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("a subscriber still waits for events 5 s after shutdown");
    assert!(
        matches!(end, Err(tokio::sync::broadcast::error::RecvError::Closed)),
        "{end:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_ends_when_the_runtime_stops_while_it_waits() {
    let harness = Harness::start(config()).await;
    let listener = ZcListener::bind(&harness.zcrx, "127.0.0.1:0")
        .await
        .unwrap();
    let accepting = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    harness.zcrx.shutdown().await;
    let result = tokio::time::timeout(Duration::from_secs(5), accepting)
        .await
        .expect("accept still waits 5 s after shutdown")
        .unwrap();
    let error = result.expect_err("accept after shutdown");
    assert!(error.to_string().contains("shut down"), "{error}");
}

struct PanickingWaker;

impl Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        panic!("a waker that panics (test)");
    }
}

/// The driver wakes a consumer from its own thread: a waker that panics there must cost
/// only that wake-up, not the driver and every other stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_waker_does_not_end_the_driver() {
    let harness = Harness::start(config()).await;
    let before = WAKER_PANICS.load(Ordering::Relaxed);
    // A limited stream starts receiving only when polled, so the first poll leaves the
    // panicking waker registered and the data arrives after it.
    let (client, socket) = tokio::join!(
        tokio::net::TcpStream::connect(harness.listener_addr()),
        harness.accept()
    );
    let _client = client.unwrap();
    harness.control.plan(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        StreamPlan::new(7, 4 * CHUNK),
    );
    let options = StreamOptions::new().read_limit(CHUNK_SIZE);
    let (mut stream, _writer) = harness.zcrx.attach_with(socket, options).unwrap();
    let waker = Waker::from(Arc::new(PanickingWaker));
    let mut cx = Context::from_waker(&waker);
    assert!(
        stream.poll_next_unpin(&mut cx).is_pending(),
        "no data before the request"
    );
    harness
        .until("the panicking waker is woken", |_| {
            WAKER_PANICS.load(Ordering::Relaxed) > before
        })
        .await;
    // The driver carries on: this stream and a new one get every byte.
    let (read, error) = read_checked(&mut stream, 7).await;
    assert_eq!((read, error.map(|e| e.to_string())), (4 * CHUNK, None));
    let (mut other, _w, _c) = harness.connect(StreamPlan::new(8, 16 * CHUNK)).await;
    let (read, error) = read_checked(&mut other, 8).await;
    assert_eq!((read, error.map(|e| e.to_string())), (16 * CHUNK, None));
}

/// A limited stream whose request ran out of area (-ENOMEM) is resubmitted for the rest of
/// its limit only: the consumer asked for `limit` bytes and holds them all, so nothing more
/// may arrive until it asks again (the old driver asked for a whole new limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_stream_resubmitted_after_exhaustion_stays_within_its_limit() {
    let harness = Harness::start(SyntheticConfig {
        area_chunks: 4,
        // Exhausts the area with one stream on purpose: budgets off.
        stream_budget: Some(u64::MAX),
        ..config()
    })
    .await;
    let (client, socket) = tokio::join!(
        tokio::net::TcpStream::connect(harness.listener_addr()),
        harness.accept()
    );
    let _client = client.unwrap();
    let plan = StreamPlan {
        path: Path::Copy,
        ..StreamPlan::new(9, 64 * CHUNK)
    };
    harness
        .control
        .plan(std::os::fd::AsRawFd::as_raw_fd(&socket), plan);
    let limit = 8 * CHUNK;
    let options = StreamOptions::new().read_limit(limit as u32);
    let (mut stream, _writer) = harness.zcrx.attach_with(socket, options).unwrap();
    let mut position = 0;
    let mut held = Vec::new();
    // The first four chunks fill the area: the request ends with -ENOMEM.
    while held.len() < 4 {
        let buf = stream.next().await.unwrap().unwrap();
        check(9, &mut position, &buf);
        held.push(buf);
    }
    harness
        .until("the area is exhausted", |h| {
            h.zcrx.stats().resubmits_area_exhausted > 0 || h.control.report().enomem_answers > 0
        })
        .await;
    held.clear();
    // The rest of the grant: four more chunks, then nothing until the next ask.
    let mut got = 4 * CHUNK;
    while got < limit {
        let buf = stream.next().await.unwrap().unwrap();
        check(9, &mut position, &buf);
        got += buf.len() as u64;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let delivered = harness.zcrx.stats().bytes;
    assert_eq!(
        delivered, limit,
        "the stream received {delivered} bytes on a grant of {limit}"
    );
}
