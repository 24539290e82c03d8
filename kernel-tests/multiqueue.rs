//! Multi-queue foundations on the guest's 4-queue netdevsim pair: what the kernel's `netdev`
//! family says about each queue (NAPI id, io_uring provider), which queue a connection lands on
//! (`SO_INCOMING_NAPI_ID`), proven against zcrx itself (a connection on the bound queue is
//! received with no copy, one on another queue is copied), and restart safety (a killed
//! process's binding is waited out by the next `build`), and several queues bound with one
//! builder (`interface_queues`), each connection dispatched to its queue's driver by NAPI id
//! and those on unbound queues received in copy mode.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_zcrx::probe::{self, QueueReport};
use tokio_zcrx::{QueueSet, Zcrx};
use tokio_zcrx_kernel_tests::support::{
    build, nic, peer_tcp_timeouts, read_verified, runtime, SpreadFlows,
};
use tokio_zcrx_kernel_tests::{first_mismatch, spawn_sender, GuestNet};

const QUEUES: u32 = 4;
const CHILD: &str = "TZX_MULTIQUEUE_CHILD";

fn queues(net: &GuestNet) -> Vec<QueueReport> {
    probe::rx_queues(&net.nic).expect("QUEUE_GET on the guest's NIC")
}

/// Polls QUEUE_GET until `queue` reports `bound` as its io_uring provider state, for at most
/// `limit`; returns how long it took.
fn wait_provider(net: &GuestNet, queue: u32, bound: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let state = queues(net)[queue as usize].io_uring_provider;
        if state == bound {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "queue {queue}: io_uring provider still {state} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn queue_get_reports_every_queue_its_napi_id_and_the_bound_provider() {
    let net = GuestNet::from_env();
    let before = queues(&net);
    println!("{before:?}");
    assert_eq!(before.len(), QUEUES as usize, "{before:?}");
    let ids: Vec<u32> = before.iter().map(|q| q.id).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
    let napis: BTreeSet<u32> = before
        .iter()
        .map(|q| {
            q.napi_id
                .expect("netdevsim links each rx queue to its own NAPI")
        })
        .collect();
    assert_eq!(
        napis.len(),
        QUEUES as usize,
        "distinct NAPI ids: {before:?}"
    );
    assert!(before
        .iter()
        .all(|q| !q.io_uring_provider && !q.xsk && !q.dmabuf));

    let zcrx = build(
        Zcrx::builder()
            .mode(tokio_zcrx::Mode::Nic)
            .interface(&net.nic, 2),
    );
    let bound = queues(&net);
    let providers: Vec<bool> = bound.iter().map(|q| q.io_uring_provider).collect();
    assert_eq!(providers, [false, false, true, false], "{bound:?}");
    // Binding does not renumber NAPI instances... or if the queue restart does, the probe
    // still reports one per queue.
    assert!(bound.iter().all(|q| q.napi_id.is_some()));

    // The probe shows the same.
    let report = probe::run(&probe::ProbeOptions::new().interface(&net.nic).queue(2));
    let interface = &report.interfaces[0];
    assert_eq!(interface.queues, bound);
    println!("{report}");

    runtime().block_on(zcrx.shutdown());
    drop(zcrx);
    let gone = wait_provider(&net, 2, false, Duration::from_secs(10));
    println!("provider gone {gone:?} after the runtime was dropped");
}

/// Accepts one connection, waits for its first data, and returns the socket with the NAPI
/// id its packets arrived through.
async fn accept_with_napi(listener: &TcpListener) -> (tokio::net::TcpStream, Option<u32>) {
    let (socket, _) = listener.accept().await.unwrap();
    socket.readable().await.unwrap();
    let napi = probe::incoming_napi_id(&socket).unwrap();
    (socket, napi)
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn by_default_every_flow_lands_on_queue_0() {
    let net = GuestNet::from_env();
    let napi_of_0 = queues(&net)[0].napi_id;
    runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        for _ in 0..8 {
            let sender = spawn_sender(addr, 4096, Some(net.peer_netns.clone()));
            let (mut socket, napi) = accept_with_napi(&listener).await;
            assert_eq!(
                napi, napi_of_0,
                "the guest's XPS sends every flow to rx queue 0"
            );
            // Read it all: closing with unread data would reset the sender's connection.
            let mut received = Vec::new();
            socket.read_to_end(&mut received).await.unwrap();
            assert_eq!(received.len(), 4096);
            assert_eq!(first_mismatch(0, &received), None);
            assert_eq!(sender.join().unwrap(), 4096);
        }
    });
}

/// Connections spread over the four queues by flow hash; each socket's
/// `SO_INCOMING_NAPI_ID` names the queue its flow lands on, and zcrx proves it: with queue
/// `BOUND` bound, a connection whose NAPI id is that queue's is received with no copy, every
/// other one is copied by the kernel (counted, though not always every byte: see below). The flow hash is random, so connections are made
/// until every queue has been seen (at least 16, at most 64: the chance that 64 random flows
/// miss one of four queues is below 1e-7).
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn spread_flows_land_on_the_queue_their_napi_id_names() {
    const BOUND: u32 = 1;
    const PER_CONNECTION: u64 = 256 << 10;
    let net = GuestNet::from_env();
    let spread = SpreadFlows::new(&net);
    let zcrx = build(nic(&net).interface(&net.nic, BOUND).area_size(8 << 20));
    let queue_of_napi: BTreeMap<u32, u32> = queues(&net)
        .iter()
        .map(|q| (q.napi_id.expect("NAPI id"), q.id))
        .collect();
    assert_eq!(queue_of_napi.len(), QUEUES as usize);
    let mut per_queue: BTreeMap<u32, u32> = BTreeMap::new();
    let mut connections = 0;
    let mut events = zcrx.subscribe();
    runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        while connections < 16 || (per_queue.len() < QUEUES as usize && connections < 64) {
            let sender = spawn_sender(addr, PER_CONNECTION, Some(net.peer_netns.clone()));
            let (socket, napi) = accept_with_napi(&listener).await;
            let napi = napi.expect("a socket that received through netdevsim has a NAPI id");
            let queue = *queue_of_napi
                .get(&napi)
                .unwrap_or_else(|| panic!("NAPI id {napi} is no queue's: {queue_of_napi:?}"));
            let copied_before = zcrx.stats().copy_bytes.unwrap();
            let (stream, _) = zcrx.attach(socket).unwrap();
            assert_eq!(read_verified(stream).await, PER_CONNECTION);
            assert_eq!(sender.join().unwrap(), PER_CONNECTION);
            let copied = zcrx.stats().copy_bytes.unwrap() - copied_before;
            if queue == BOUND {
                assert_eq!(
                    copied, 0,
                    "connection {connections} on the bound queue {queue}"
                );
            } else {
                // Every byte is copied, but the kernel counts only fragment copies: payload
                // in an skb's linear part is copied uncounted (io_zcrx_recv_skb), so the
                // count may fall short of the bytes (one run: 238,976 of 262,144 counted).
                assert!(
                    copied > 0 && copied <= PER_CONNECTION,
                    "connection {connections} on queue {queue} is not the bound queue's: \
                     the kernel copies it ({copied} of {PER_CONNECTION} bytes counted)"
                );
            }
            *per_queue.entry(queue).or_default() += 1;
            connections += 1;
        }
        zcrx.shutdown().await;
    });
    drop(spread);
    println!("{connections} connections per queue: {per_queue:?}");
    // The kernel's copy events come from the one driver, and name its queue.
    let mut copy_events = 0;
    while let Ok(event) = events.try_recv() {
        assert_eq!(event.queue, Some(BOUND), "{event:?}");
        copy_events += u32::from(event.kind == tokio_zcrx::EventKind::CopyFallback);
    }
    println!("{copy_events} copy fallback events, each naming queue {BOUND}");
    assert!(
        copy_events > 0,
        "other queues' connections were copied: an event at least"
    );
    assert_eq!(
        per_queue.len(),
        QUEUES as usize,
        "all four queues used: {per_queue:?}"
    );
}

/// A process holding a binding is killed (SIGKILL, no cleanup of its own); the next `build`
/// of the same queue, at once and with no retry loop of the caller's, succeeds: it waits out
/// the kernel's asynchronous teardown (EEXIST) by polling QUEUE_GET.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn a_killed_holders_queue_is_bound_again_at_once() {
    const QUEUE: u32 = 0;
    let net = GuestNet::from_env();
    if std::env::var_os(CHILD).is_some() {
        let zcrx = build(nic(&net).interface(&net.nic, QUEUE));
        println!("bound {}", zcrx.description());
        std::thread::sleep(Duration::from_secs(120));
        unreachable!("the parent kills this process");
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_holders_queue_is_bound_again_at_once",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("run this test binary again");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let bound = stdout
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains("bound "))
        .expect("the child binds the queue and says so");
    println!("child: {bound}");
    assert!(queues(&net)[QUEUE as usize].io_uring_provider);

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = Instant::now();
    let held_after_kill = queues(&net)[QUEUE as usize].io_uring_provider;
    let zcrx = nic(&net)
        .interface(&net.nic, QUEUE)
        .queue_release_wait(Duration::from_secs(10))
        .build()
        .expect("build waits out the killed process's binding");
    println!(
        "bound again {:?} after the kill (provider still reported right after it: \
         {held_after_kill})",
        killed.elapsed()
    );
    // And it receives: a transfer on queue 0, every byte in place.
    runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = spawn_sender(addr, 4 << 20, Some(net.peer_netns.clone()));
        let (socket, _) = listener.accept().await.unwrap();
        let (stream, _) = zcrx.attach(socket).unwrap();
        assert_eq!(read_verified(stream).await, 4 << 20);
        sender.join().unwrap();
        assert_eq!(zcrx.stats().copy_bytes, Some(0));
        zcrx.shutdown().await;
    });
}

/// With no wait allowed and the queue held by a live runtime, `build` fails at once with
/// QueueBusy and says what holds the queue and how to see it.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn a_live_holder_is_named_when_the_wait_runs_out() {
    let net = GuestNet::from_env();
    let holder = build(nic(&net).interface(&net.nic, 3));
    let start = Instant::now();
    let error = nic(&net)
        .interface(&net.nic, 3)
        .queue_release_wait(Duration::from_millis(300))
        .build()
        .map(drop)
        .expect_err("the queue is held by a live runtime");
    let waited = start.elapsed();
    println!("{error} ({waited:?})");
    assert_eq!(error.kind(), tokio_zcrx::ErrorKind::QueueBusy);
    let message = error.to_string();
    assert!(
        message.contains("still held by an io_uring memory provider"),
        "{message}"
    );
    assert!(message.contains("queue-get"), "{message}");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    runtime().block_on(holder.shutdown());
}

/// The wait-and-retry path itself, deterministically: the queue is held by a live runtime
/// when `build` starts (the kernel answers EEXIST), the holder shuts down 300 ms later, and
/// the same `build` then registers; no retry loop of the caller's.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn a_queue_released_during_the_wait_is_bound() {
    const QUEUE: u32 = 2;
    let net = GuestNet::from_env();
    let holder = build(nic(&net).interface(&net.nic, QUEUE));
    assert!(queues(&net)[QUEUE as usize].io_uring_provider);
    let start = Instant::now();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        runtime().block_on(holder.shutdown());
        drop(holder);
        start.elapsed()
    });
    let zcrx = nic(&net)
        .interface(&net.nic, QUEUE)
        .queue_release_wait(Duration::from_secs(10))
        .build()
        .expect("build waits until the holder is gone, then registers");
    let bound_after = start.elapsed();
    let released_after = releaser.join().unwrap();
    println!("holder shut down after {released_after:?}, bound again after {bound_after:?}");
    assert!(
        bound_after >= Duration::from_millis(300),
        "registered while the holder was alive? {bound_after:?}"
    );
    assert!(bound_after < Duration::from_secs(10), "{bound_after:?}");
    assert!(queues(&net)[QUEUE as usize].io_uring_provider);
    runtime().block_on(zcrx.shutdown());
}

/// Which queue each NAPI id belongs to, as the kernel says now.
fn queue_of_napi(net: &GuestNet) -> BTreeMap<u32, u32> {
    queues(net)
        .iter()
        .map(|q| (q.napi_id.expect("netdevsim: a NAPI id per queue"), q.id))
        .collect()
}

/// Accepts one connection, finds the queue it arrives on (its NAPI id, after its first
/// data), and attaches it to `zcrx`, which dispatches it by the same id.
async fn accept_on_queue(
    zcrx: &Zcrx,
    listener: &TcpListener,
    queue_of_napi: &BTreeMap<u32, u32>,
) -> (tokio_zcrx::ZcStream, u32) {
    let (socket, napi) = accept_with_napi(listener).await;
    let napi = napi.expect("a socket that received through netdevsim has a NAPI id");
    let queue = *queue_of_napi
        .get(&napi)
        .unwrap_or_else(|| panic!("NAPI id {napi} is no queue's: {queue_of_napi:?}"));
    let (stream, _writer) = zcrx.attach(socket).unwrap();
    (stream, queue)
}

/// All four queues bound with one builder (`interface_queues(IF, all)`): 32 connections
/// spread over the queues by flow hash, each handed to the driver of the queue its NAPI id
/// names. Every byte is checked, each queue's statistics count exactly the bytes of its
/// connections, no queue copies a byte (a connection given to another queue's driver would
/// be copied, or fail with EFAULT), and nothing is unmatched.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn four_queues_each_connection_on_its_queues_driver() {
    const CONNECTIONS: usize = 32;
    const PER_CONNECTION: u64 = 1 << 20;
    let net = GuestNet::from_env();
    let spread = SpreadFlows::new(&net);
    let zcrx = build(
        nic(&net)
            .interface_queues(&net.nic, QueueSet::All)
            .area_size(8 << 20),
    );
    println!("{} / {}", zcrx.mode_selection(), zcrx.description());
    assert_eq!(zcrx.mode_selection().queues_bound, [0, 1, 2, 3]);
    assert!(zcrx.mode_selection().queues_refused.is_empty());
    let queue_of_napi = queue_of_napi(&net);
    let reported: BTreeMap<u32, u32> = zcrx
        .queue_stats()
        .iter()
        .map(|q| {
            (
                q.napi_id.expect("the runtime knows each queue's NAPI id"),
                q.queue,
            )
        })
        .collect();
    assert_eq!(
        reported, queue_of_napi,
        "the runtime's NAPI ids are the kernel's"
    );
    let providers: Vec<bool> = queues(&net).iter().map(|q| q.io_uring_provider).collect();
    assert_eq!(providers, [true; 4]);
    let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
    let timeouts_before = peer_tcp_timeouts(&net);
    runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        zcrx.prepare_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let senders: Vec<_> = (0..CONNECTIONS)
            .map(|_| spawn_sender(addr, PER_CONNECTION, Some(net.peer_netns.clone())))
            .collect();
        let mut readers = Vec::new();
        for _ in 0..CONNECTIONS {
            let (stream, queue) = accept_on_queue(&zcrx, &listener, &queue_of_napi).await;
            *expected.entry(queue).or_default() += PER_CONNECTION;
            readers.push(tokio::spawn(read_verified(stream)));
        }
        // 32 random flows miss one of four queues with a chance of 4e-4: top up, one at a
        // time, until every queue has had a connection.
        let mut extra = 0;
        while expected.len() < QUEUES as usize && extra < 32 {
            let sender = spawn_sender(addr, PER_CONNECTION, Some(net.peer_netns.clone()));
            let (stream, queue) = accept_on_queue(&zcrx, &listener, &queue_of_napi).await;
            *expected.entry(queue).or_default() += PER_CONNECTION;
            assert_eq!(read_verified(stream).await, PER_CONNECTION);
            assert_eq!(sender.join().unwrap(), PER_CONNECTION);
            extra += 1;
        }
        for reader in readers {
            assert_eq!(reader.await.unwrap(), PER_CONNECTION);
        }
        for sender in senders {
            assert_eq!(sender.join().unwrap(), PER_CONNECTION);
        }
    });
    println!(
        "the peer's retransmission timeouts meanwhile: {} (flows stay on their queue: \
         rehashing is off)",
        peer_tcp_timeouts(&net) - timeouts_before
    );
    drop(spread);
    let per_queue = zcrx.queue_stats();
    println!("expected per queue {expected:?}");
    for queue in &per_queue {
        println!(
            "queue {} napi {:?}: {}",
            queue.queue, queue.napi_id, queue.stats
        );
        assert_eq!(
            queue.stats.bytes,
            expected.get(&queue.queue).copied().unwrap_or(0),
            "queue {}: its driver received other queues' connections, or missed its own",
            queue.queue
        );
        assert_eq!(
            queue.stats.copy_bytes,
            Some(0),
            "queue {} copied",
            queue.queue
        );
        assert_eq!(queue.stats.buffers_outstanding, 0);
    }
    assert_eq!(
        expected.len(),
        QUEUES as usize,
        "all four queues used: {expected:?}"
    );
    let total = zcrx.stats();
    assert_eq!(total.unmatched_connections, 0);
    assert_eq!(total.bytes, expected.values().sum::<u64>());
    runtime().block_on(zcrx.shutdown());
}

/// Two of four queues bound: connections arriving on the other two are received in copy
/// mode (never by a bound queue's driver: no stream fails with EFAULT, and the bound queues
/// copy nothing), counted as unmatched, and each reported with its queue; through
/// `ZcListener`, which waits for a NAPI id where there is none yet. The bound queues'
/// statistics and the copy path add up to every byte sent.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn two_of_four_queues_bound_the_others_are_copied_and_counted() {
    const CONNECTIONS: u64 = 32;
    const PER_CONNECTION: u64 = 512 << 10;
    let net = GuestNet::from_env();
    let spread = SpreadFlows::new(&net);
    let zcrx = build(
        nic(&net)
            .interface_queues(&net.nic, [1, 3])
            .area_size(8 << 20),
    );
    println!("{} / {}", zcrx.mode_selection(), zcrx.description());
    assert_eq!(zcrx.mode_selection().queues_bound, [1, 3]);
    let mut events = zcrx.subscribe();
    runtime().block_on(async {
        let listener = tokio_zcrx::ZcListener::bind(&zcrx, (net.nic_addr.as_str(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let senders: Vec<_> = (0..CONNECTIONS)
            .map(|_| spawn_sender(addr, PER_CONNECTION, Some(net.peer_netns.clone())))
            .collect();
        let mut readers = Vec::new();
        for _ in 0..CONNECTIONS {
            let (stream, _writer, _peer) = listener.accept().await.unwrap();
            // Any stream error (EFAULT from a foreign net_iov) fails here.
            readers.push(tokio::spawn(read_verified(stream)));
        }
        for reader in readers {
            assert_eq!(reader.await.unwrap(), PER_CONNECTION);
        }
        for sender in senders {
            assert_eq!(sender.join().unwrap(), PER_CONNECTION);
        }
    });
    drop(spread);
    let total = zcrx.stats();
    let per_queue = zcrx.queue_stats();
    let mut zero_copied = 0;
    for queue in &per_queue {
        println!(
            "queue {} napi {:?}: {}",
            queue.queue, queue.napi_id, queue.stats
        );
        assert_eq!(
            queue.stats.copy_bytes,
            Some(0),
            "queue {} copied",
            queue.queue
        );
        assert_eq!(
            queue.stats.bytes % PER_CONNECTION,
            0,
            "queue {}",
            queue.queue
        );
        zero_copied += queue.stats.bytes / PER_CONNECTION;
    }
    println!(
        "{zero_copied} connections zero-copy, {} unmatched",
        total.unmatched_connections
    );
    assert_eq!(zero_copied + total.unmatched_connections, CONNECTIONS);
    assert_eq!(total.bytes, CONNECTIONS * PER_CONNECTION);
    // 32 flows over 4 queues: both kinds, with a chance of 2 * 2^-32 of missing one.
    assert!(zero_copied > 0 && total.unmatched_connections > 0);
    // One event per unmatched connection, naming an unbound queue.
    let mut unmatched_events = 0;
    while let Ok(event) = events.try_recv() {
        if event.kind == tokio_zcrx::EventKind::UnmatchedConnection {
            let queue = event
                .queue
                .expect("netdevsim: every connection has a NAPI id");
            assert!(queue == 0 || queue == 2, "unmatched on bound queue {queue}");
            unmatched_events += 1;
        }
    }
    assert_eq!(unmatched_events, total.unmatched_connections);
    runtime().block_on(zcrx.shutdown());
}

/// Flows that move to another queue mid-connection, as on a NIC whose RSS table is changed
/// under live connections: with all four queues bound and flows spread, each connection
/// sends half its bytes, pauses, and the peer's XPS map is put back so that every flow's
/// next packet leaves through tx queue 0 (so lands on rx queue 0); then the rest. The rings
/// of queues 1-3 meet queue 0's buffers (`EFAULT`) and hand their streams to queue 0's
/// driver, which goes on from the same byte: every byte arrives once, in order, no stream
/// fails, and `streams_moved` counts at least every connection that did not start on
/// queue 0.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn streams_follow_their_flow_to_another_queue() {
    const CONNECTIONS: usize = 12;
    const HALF: u64 = 512 << 10;
    let net = GuestNet::from_env();
    let spread = SpreadFlows::new(&net);
    let zcrx = build(
        nic(&net)
            .interface_queues(&net.nic, QueueSet::All)
            .area_size(8 << 20),
    );
    let queue_of_napi = queue_of_napi(&net);
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let wait = std::sync::Arc::new(std::sync::Mutex::new(wait));
    let mut first_queues = BTreeMap::<u32, u32>::new();
    let mut spread = Some(spread);
    runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        zcrx.prepare_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let (halfway, halves) = std::sync::mpsc::channel::<()>();
        let senders: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let (netns, wait, halfway) =
                    (net.peer_netns.clone(), wait.clone(), halfway.clone());
                std::thread::spawn(move || {
                    use std::io::Write;
                    tokio_zcrx_kernel_tests::enter_netns(&netns);
                    let mut stream = std::net::TcpStream::connect(addr).unwrap();
                    let data: Vec<u8> = (0..2 * HALF)
                        .map(tokio_zcrx_kernel_tests::pattern_byte)
                        .collect();
                    stream.write_all(&data[..HALF as usize]).unwrap();
                    halfway.send(()).unwrap();
                    // Every sender waits for the one signal: the first takes it, and
                    // dropping the sender ends every later wait.
                    let _ = wait.lock().unwrap().recv();
                    stream.write_all(&data[HALF as usize..]).unwrap();
                    stream.shutdown(std::net::Shutdown::Write).unwrap();
                })
            })
            .collect();
        drop(halfway);
        let mut readers = Vec::new();
        for _ in 0..CONNECTIONS {
            let (stream, queue) = accept_on_queue(&zcrx, &listener, &queue_of_napi).await;
            *first_queues.entry(queue).or_default() += 1;
            readers.push(tokio::spawn(read_verified(stream)));
        }
        for _ in 0..CONNECTIONS {
            halves.recv().unwrap();
        }
        // Let the first halves be received and acknowledged, so that each flow is idle
        // (nothing in flight) when it sends again: the sender then picks its tx queue anew.
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(spread.take()); // every CPU sends through tx-0 again
        drop(go);
        for reader in readers {
            assert_eq!(reader.await.unwrap(), 2 * HALF, "a stream ended early");
        }
        for sender in senders {
            sender.join().unwrap();
        }
    });
    let total = zcrx.stats();
    let away_from_0 = first_queues
        .iter()
        .filter(|(queue, _)| **queue != 0)
        .map(|(_, n)| *n as u64)
        .sum::<u64>();
    println!(
        "first queues {first_queues:?}; {} streams moved; per queue: {:?}",
        total.streams_moved,
        zcrx.queue_stats()
            .iter()
            .map(|q| (q.queue, q.stats.bytes, q.stats.copy_bytes))
            .collect::<Vec<_>>()
    );
    assert!(
        total.streams_moved >= away_from_0,
        "{} moved, {away_from_0} started away from queue 0",
        total.streams_moved
    );
    assert_eq!(total.bytes, CONNECTIONS as u64 * 2 * HALF);
    for queue in zcrx.queue_stats() {
        assert_eq!(queue.stats.copy_bytes, Some(0), "queue {}", queue.queue);
    }
    runtime().block_on(zcrx.shutdown());
}
