//! Multi-queue foundations on the guest's 4-queue netdevsim pair: what the kernel's `netdev`
//! family says about each queue (NAPI id, io_uring provider), which queue a connection lands on
//! (`SO_INCOMING_NAPI_ID`), proven against zcrx itself (a connection on the bound queue is
//! received with no copy, one on another queue is copied), and restart safety (a killed
//! process's binding is waited out by the next `build`), and several queues bound with one
//! builder (`interface_queues`), each connection dispatched to its queue's driver by NAPI id
//! and those on unbound queues received in copy mode.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_zcrx::probe::{self, QueueReport};
use tokio_zcrx::{HugePages, QueueSet, ZcBuf, ZcStream, Zcrx};
use tokio_zcrx_kernel_tests::procfs::{self, Pid};
use tokio_zcrx_kernel_tests::support::{
    build, nic, peer_tcp_timeouts, read_verified, read_verified_holding_last, reserve_huge_pages,
    runtime, SpreadFlows,
};
use tokio_zcrx_kernel_tests::{first_mismatch, spawn_resetter, spawn_sender, GuestNet};

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

/// How long the kernel may take to release a queue after its runtime is gone: io_uring tears
/// a ring down in a worker (`io_ring_exit_work`) after its last reference is dropped, so the
/// memory provider outlives `shutdown` and the drop by milliseconds to seconds under TCG.
/// Also how long `build` may wait for a killed holder's queues: far more than the kernel's
/// own selftest allows (5 s), for TCG on a loaded host.
const RELEASE_WAIT: Duration = Duration::from_secs(20);

/// Waits until the kernel reports no io_uring memory provider on any queue; returns how long
/// that took. A test that asserts what a free queue looks like starts with this, since the
/// test before it may have just dropped a runtime whose bindings the kernel is still
/// releasing.
fn wait_all_released(net: &GuestNet) -> Duration {
    let start = Instant::now();
    for queue in 0..QUEUES {
        wait_provider(
            net,
            queue,
            false,
            RELEASE_WAIT.saturating_sub(start.elapsed()),
        );
    }
    start.elapsed()
}

/// Shuts `zcrx` down, drops it, and asserts that the kernel then releases every queue (within
/// [`RELEASE_WAIT`]): a runtime's end leaves the NIC as it found it.
fn shut_down_and_released(net: &GuestNet, zcrx: Zcrx) {
    runtime().block_on(zcrx.shutdown());
    drop(zcrx);
    let released = wait_all_released(net);
    println!("every queue released {released:?} after the runtime was dropped");
}

/// Whether the kernel reports an io_uring memory provider on each queue, in queue order.
fn providers(net: &GuestNet) -> Vec<bool> {
    queues(net).iter().map(|q| q.io_uring_provider).collect()
}

/// A builder for all four queues of the guest's NIC, an 8 MiB area each.
fn all_queues(net: &GuestNet) -> tokio_zcrx::Builder {
    nic(net)
        .interface_queues(&net.nic, QueueSet::All)
        .area_size(8 << 20)
}

/// The guest's network with the peer's flows spread over the four queues (while the guard
/// lives), and a runtime on all four queues.
fn spread_on_all_queues() -> (GuestNet, SpreadFlows, Zcrx) {
    let net = GuestNet::from_env();
    let spread = SpreadFlows::new(&net);
    let zcrx = build(all_queues(&net));
    (net, spread, zcrx)
}

/// Sends `per_connection` pattern bytes on each of `connections` connections from the peer,
/// all at once.
fn spawn_senders(
    net: &GuestNet,
    addr: SocketAddr,
    connections: usize,
    per_connection: u64,
) -> Vec<JoinHandle<u64>> {
    (0..connections)
        .map(|_| spawn_sender(addr, per_connection, Some(net.peer_netns.clone())))
        .collect()
}

/// Waits for every sender; each must have sent all its bytes.
fn join_senders(senders: Vec<JoinHandle<u64>>, per_connection: u64) {
    for sender in senders {
        assert_eq!(sender.join().unwrap(), per_connection);
    }
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn queue_get_reports_every_queue_its_napi_id_and_the_bound_provider() {
    let net = GuestNet::from_env();
    let waited = wait_all_released(&net);
    println!(
        "queues free {waited:?} after this test started (the test before may have just bound them)"
    );
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
    assert_eq!(providers(&net), [false, false, true, false], "{bound:?}");
    // Binding does not renumber NAPI instances... or if the queue restart does, the probe
    // still reports one per queue.
    assert!(bound.iter().all(|q| q.napi_id.is_some()));

    // The probe shows the same.
    let report = probe::run(&probe::ProbeOptions::new().interface(&net.nic).queue(2));
    let interface = &report.interfaces[0];
    assert_eq!(interface.queues, bound);
    println!("{report}");

    shut_down_and_released(&net, zcrx);
}

/// Accepts one connection, waits for its first data, and returns the socket with the NAPI
/// id its packets arrived through.
async fn accept_with_napi(listener: &TcpListener) -> (tokio::net::TcpStream, Option<u32>) {
    let (socket, _) = listener.accept().await.unwrap();
    socket.readable().await.unwrap();
    let napi = probe::incoming_napi_id(&socket).unwrap();
    (socket, napi)
}

/// Which queue each NAPI id belongs to, as the kernel says now (one distinct id per queue).
fn queue_of_napi(net: &GuestNet) -> BTreeMap<u32, u32> {
    let map: BTreeMap<u32, u32> = queues(net)
        .iter()
        .map(|q| (q.napi_id.expect("netdevsim: a NAPI id per queue"), q.id))
        .collect();
    assert_eq!(map.len(), QUEUES as usize, "distinct NAPI ids: {map:?}");
    map
}

/// Accepts one connection and finds the queue it arrives on: its NAPI id, after its first
/// data.
async fn accept_queue(
    listener: &TcpListener,
    queue_of_napi: &BTreeMap<u32, u32>,
) -> (tokio::net::TcpStream, u32) {
    let (socket, napi) = accept_with_napi(listener).await;
    let napi = napi.expect("a socket that received through netdevsim has a NAPI id");
    let queue = *queue_of_napi
        .get(&napi)
        .unwrap_or_else(|| panic!("NAPI id {napi} is no queue's: {queue_of_napi:?}"));
    (socket, queue)
}

/// Accepts one connection, finds the queue it arrives on, and attaches it to `zcrx`, which
/// dispatches it by the same NAPI id.
async fn accept_on_queue(
    zcrx: &Zcrx,
    listener: &TcpListener,
    queue_of_napi: &BTreeMap<u32, u32>,
) -> (ZcStream, u32) {
    let (socket, queue) = accept_queue(listener, queue_of_napi).await;
    let (stream, _writer) = zcrx.attach(socket).unwrap();
    (stream, queue)
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
    let queue_of_napi = queue_of_napi(&net);
    let mut per_queue: BTreeMap<u32, u32> = BTreeMap::new();
    let mut connections = 0;
    let mut events = zcrx.subscribe();
    runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        while connections < 16 || (per_queue.len() < QUEUES as usize && connections < 64) {
            let sender = spawn_sender(addr, PER_CONNECTION, Some(net.peer_netns.clone()));
            let (socket, queue) = accept_queue(&listener, &queue_of_napi).await;
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
    });
    drop(spread);
    shut_down_and_released(&net, zcrx);
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

/// How long a child may take to bind and say so (TCG on a loaded 2-core host is slow).
const CHILD_LIMIT: Duration = Duration::from_secs(300);

/// A child process holding queues: this test binary again, running test `test` alone with
/// [`CHILD`] set, so that the test's child branch runs. Its standard output comes line by
/// line through a channel. Killed with SIGKILL when dropped (a failing test leaves no
/// process holding queues); it ends by itself, too, if this process dies (see
/// [`wait_for_parent`]).
struct Holder {
    child: Child,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

impl Holder {
    fn spawn(test: &str) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                test,
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run this test binary again");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (send, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Holder {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The child's first line that contains `marker`, within [`CHILD_LIMIT`].
    fn line(&self, marker: &str) -> String {
        let deadline = Instant::now() + CHILD_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the child did not say `{marker}` within {CHILD_LIMIT:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the child ended before saying `{marker}` (its stderr is above)")
                }
            }
        }
    }

    /// Sends it SIGKILL (no cleanup of its own) and returns at once, as a supervisor that
    /// restarts a service does not wait for anything: the process may still be exiting.
    fn kill(&mut self) {
        self.child.kill().unwrap();
    }

    /// Waits for it to end and reaps it; its pipes and the reader thread are gone when this
    /// returns.
    fn reap(mut self) {
        self.child.wait().unwrap();
        self.reader.take().unwrap().join().unwrap();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // After `kill` both are no-ops: the child is reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In a [`Holder`] child: blocks until the parent kills this process, or exits if the
/// parent is gone (its end of standard input closed).
fn wait_for_parent() -> ! {
    let _ = std::io::stdin().read(&mut [0u8]);
    std::process::exit(1)
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
        println!("child: bound {}", zcrx.description());
        wait_for_parent();
    }
    let mut holder = Holder::spawn("a_killed_holders_queue_is_bound_again_at_once");
    println!("{}", holder.line("child: bound"));
    assert!(queues(&net)[QUEUE as usize].io_uring_provider);

    holder.kill();
    let killed = Instant::now();
    let held_after_kill = queues(&net)[QUEUE as usize].io_uring_provider;
    let zcrx = nic(&net)
        .interface(&net.nic, QUEUE)
        .queue_release_wait(Duration::from_secs(10))
        .build()
        .expect("build waits out the killed process's binding");
    holder.reap();
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
    });
    shut_down_and_released(&net, zcrx);
}

/// What a runtime's life could leave behind in this process: open fds, memory the kernel
/// keeps pinned for it (`VmPin`: each zcrx area is charged until the kernel frees it),
/// threads and resident memory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Footprint {
    /// What each open fd refers to (`socket`, `anon_inode:[io_uring]`, ...).
    fds: Vec<String>,
    pinned: u64,
    /// Thread names, but for the one process-wide timer thread the NAPI wait starts on
    /// first use and keeps.
    threads: Vec<String>,
    rss: u64,
}

impl Footprint {
    fn now() -> Footprint {
        let mut threads = procfs::thread_names(Pid::Current).unwrap();
        threads.retain(|name| name != "tokio-zcrx-timer");
        Footprint {
            fds: procfs::open_fd_kinds(Pid::Current).unwrap(),
            pinned: procfs::pinned_bytes(Pid::Current).unwrap(),
            threads,
            rss: procfs::rss_bytes(Pid::Current).unwrap(),
        }
    }

    /// The footprint once the threads of runtimes dropped before have left /proc (a joined
    /// thread can still be listed for a moment after `join` returns), for at most 5 s.
    fn baseline() -> Footprint {
        let start = Instant::now();
        loop {
            let now = Footprint::now();
            let ended =
                |name: &String| name.starts_with("tokio-rt-") || name.starts_with("tokio-zcrx-d");
            if !now.threads.iter().any(ended) || start.elapsed() > Duration::from_secs(5) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `limit`) until the fds, pinned memory and threads are those of
    /// `before` (the kernel unpins an area when it tears the instance down, asynchronously),
    /// then asserts that nothing is left: the same fds, pinned memory and threads, and
    /// resident memory within `rss_slack` (glibc keeps some freed heap; a leaked area,
    /// touched when pinned, would show in full).
    fn assert_back_to(before: &Footprint, limit: Duration, rss_slack: u64) -> Footprint {
        let start = Instant::now();
        let mut now = Footprint::now();
        let settled = |now: &Footprint| {
            now.fds == before.fds && now.pinned == before.pinned && now.threads == before.threads
        };
        while !settled(&now) && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
            now = Footprint::now();
        }
        println!(
            "footprint before {before:?}, after {now:?} (settled after {:?})",
            start.elapsed()
        );
        assert_eq!(now.fds, before.fds, "open fds");
        assert_eq!(now.pinned, before.pinned, "pinned memory (VmPin)");
        assert_eq!(now.threads, before.threads, "threads");
        assert!(
            now.rss <= before.rss + rss_slack,
            "resident memory grew by {} bytes",
            now.rss.saturating_sub(before.rss)
        );
        now
    }
}

/// Test 7c with every queue: a child process binds all four queues, receives on each
/// (every byte checked, no copy), keeps a buffer of each connection (chunks outstanding,
/// as a server killed mid-work has) and is killed with SIGKILL. At once, this process binds
/// the same four queues with one `build` (which waits, bounded, for the kernel to tear the
/// dead process's bindings down: EEXIST until then), every queue then reports an io_uring
/// provider, and that provider is this runtime's: each queue receives with no byte copied,
/// and the providers go when this runtime does. Then nothing is left behind in this
/// process: fds, pinned memory (VmPin), threads, resident memory.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn a_killed_holder_of_four_queues_is_replaced_on_all_at_once() {
    const TEST: &str = "a_killed_holder_of_four_queues_is_replaced_on_all_at_once";
    let net = GuestNet::from_env();
    if std::env::var_os(CHILD).is_some() {
        // The parent spreads the flows and keeps them spread.
        let zcrx = build(all_queues(&net));
        assert_all_four_bound(&zcrx, &net);
        println!("child: bound {}", zcrx.description());
        let (per_queue, held) = receive_on_every_queue_anew(&zcrx, &net, true);
        assert_each_queue_received(&zcrx, &per_queue, true);
        println!(
            "child: holding {} buffers, received per queue {per_queue:?}",
            held.len()
        );
        wait_for_parent();
    }

    let spread = SpreadFlows::new(&net);
    // Tokio's signal driver makes a unix socket pair for the whole process with the first
    // runtime and keeps it: make it before the baseline, it is no runtime's.
    drop(runtime());
    let before = Footprint::baseline();
    let mut holder = Holder::spawn(TEST);
    println!("{}", holder.line("child: bound"));
    println!("{}", holder.line("child: holding"));
    assert_eq!(providers(&net), [true; 4], "the child's bindings");
    holder.kill();
    let killed = Instant::now();
    let held_after_kill = providers(&net);
    let zcrx = all_queues(&net)
        .queue_release_wait(RELEASE_WAIT)
        .build()
        .unwrap_or_else(|e| panic!("build waits out the killed process's bindings: {e}"));
    let waited = killed.elapsed();
    holder.reap();
    println!(
        "all four queues bound again {waited:?} after the SIGKILL (right after it the kernel \
         still reported a provider on queues {:?})",
        (0..QUEUES)
            .filter(|&q| held_after_kill[q as usize])
            .collect::<Vec<_>>()
    );
    assert_all_four_bound(&zcrx, &net);
    // This process's footprint check below sees the runtime: its four areas are pinned.
    let during = Footprint::now();
    assert!(
        during.pinned >= before.pinned + 4 * (8 << 20),
        "four 8 MiB areas pinned: {during:?}"
    );

    println!("footprint with the runtime built: {during:?}");
    let (per_queue, _) = receive_on_every_queue_anew(&zcrx, &net, false);
    drop(spread);
    assert_each_queue_received(&zcrx, &per_queue, false);

    shut_down_and_released(&net, zcrx);
    Footprint::assert_back_to(&before, RELEASE_WAIT, 6 << 20);
}

/// With no wait allowed and the queue held by a live runtime, `build` fails at once with
/// QueueBusy and says what holds the queue and how to see it.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn a_live_holder_is_named_when_the_wait_runs_out() {
    let net = GuestNet::from_env();
    let holder = build(nic(&net).interface(&net.nic, 3));
    let (error, waited) = refused(
        nic(&net)
            .interface(&net.nic, 3)
            .queue_release_wait(Duration::from_millis(300)),
        "the queue is held by a live runtime",
    );
    assert_eq!(error.kind(), tokio_zcrx::ErrorKind::QueueBusy);
    let message = error.to_string();
    assert!(
        message.contains("still held by an io_uring memory provider"),
        "{message}"
    );
    assert!(message.contains("queue-get"), "{message}");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    shut_down_and_released(&net, holder);
}

/// Builds `builder`, which must fail (`why` it should); returns the error and how long
/// `build` took to give it.
fn refused(builder: tokio_zcrx::Builder, why: &str) -> (tokio_zcrx::Error, Duration) {
    let start = Instant::now();
    let error = builder.build().map(drop).expect_err(why);
    let took = start.elapsed();
    println!("{error} ({took:?})");
    (error, took)
}

/// An XDP program on the device: the kernel refuses the queue with the EEXIST a bound queue
/// gets, and no wait ends it. `build` says so at once (not after its release wait) with a
/// configuration error naming XDP and the command that detaches it; the probe reports it;
/// once the program is detached the same queue binds.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn an_xdp_program_is_named_at_once_not_waited_for() {
    const QUEUE: u32 = 1;
    let net = GuestNet::from_env();
    let xdp = tokio_zcrx_kernel_tests::support::PassingXdp::attach(&net.nic)
        .expect("attach an XDP program (generic mode) to the guest's NIC");
    let (error, refused_after) = refused(
        nic(&net)
            .interface(&net.nic, QUEUE)
            .queue_release_wait(Duration::from_secs(20)),
        "an XDP program excludes zcrx",
    );
    assert_eq!(error.kind(), tokio_zcrx::ErrorKind::InterfaceNotConfigured);
    assert_eq!(error.raw_os_error(), Some(libc::EEXIST));
    let message = error.to_string();
    assert!(message.contains("XDP program is attached"), "{message}");
    assert!(
        message.contains(&format!("ip link set dev {} xdp off", net.nic)),
        "{message}"
    );
    assert!(message.contains("bpftool net show"), "{message}");
    // The 20 s wait for a release is not used (under TCG the probe takes about a second).
    assert!(refused_after < Duration::from_secs(10), "{refused_after:?}");
    assert!(!queues(&net)[QUEUE as usize].io_uring_provider);
    let report = probe::run(&probe::ProbeOptions::new().interface(&net.nic).queue(QUEUE));
    assert_eq!(report.interfaces[0].xdp_attached, Some(true), "{report}");

    drop(xdp);
    let zcrx = build(nic(&net).interface(&net.nic, QUEUE));
    assert!(queues(&net)[QUEUE as usize].io_uring_provider);
    shut_down_and_released(&net, zcrx);
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
    shut_down_and_released(&net, zcrx);
}

/// Connections from the peer, one at a time, each accepted, attached to `zcrx` (which
/// dispatches it by its NAPI id) and read to its end with every byte checked: at least
/// `at_least`, and on until each of the four queues has had one (at most 64 in all: 64
/// random flows miss one of four queues with a chance below 1e-7). Needs flows spread (a
/// [`SpreadFlows`] guard). Adds each connection's bytes to its queue in `per_queue`; if
/// `hold_last`, returns the last buffer of each connection, still held (its chunk
/// outstanding), else none.
async fn receive_on_every_queue(
    zcrx: &Zcrx,
    net: &GuestNet,
    listener: &TcpListener,
    per_connection: u64,
    at_least: usize,
    per_queue: &mut BTreeMap<u32, u64>,
    hold_last: bool,
) -> Vec<ZcBuf> {
    let queue_of_napi = queue_of_napi(net);
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    let mut connections = 0;
    while connections < at_least || (per_queue.len() < QUEUES as usize && connections < 64) {
        let sender = spawn_sender(addr, per_connection, Some(net.peer_netns.clone()));
        let (stream, queue) = accept_on_queue(zcrx, listener, &queue_of_napi).await;
        let (received, last) = if hold_last {
            read_verified_holding_last(stream).await
        } else {
            (read_verified(stream).await, None)
        };
        assert_eq!(received, per_connection);
        join_senders(vec![sender], per_connection);
        *per_queue.entry(queue).or_default() += per_connection;
        held.extend(last);
        connections += 1;
    }
    held
}

/// Prints one queue's statistics and asserts that it copied nothing.
fn assert_no_copy(queue: &tokio_zcrx::QueueStats) {
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
}

/// [`receive_on_every_queue`] on a listener and a Tokio runtime of its own (dropped before
/// it returns): at least 8 connections of 512 KiB. Returns the bytes per queue and, if
/// `hold_last`, the last buffer of each connection, still held.
fn receive_on_every_queue_anew(
    zcrx: &Zcrx,
    net: &GuestNet,
    hold_last: bool,
) -> (BTreeMap<u32, u64>, Vec<ZcBuf>) {
    let mut per_queue = BTreeMap::new();
    let held = runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        zcrx.prepare_listener(&listener).unwrap();
        receive_on_every_queue(
            zcrx,
            net,
            &listener,
            512 << 10,
            8,
            &mut per_queue,
            hold_last,
        )
        .await
    });
    (per_queue, held)
}

/// Asserts that each of the four queues of `zcrx` received exactly its connections' bytes
/// (`per_queue`), at least one, copied none (a connection given to another queue's driver
/// would be copied, or fail with EFAULT) and has chunks outstanding only if `holding`.
fn assert_each_queue_received(zcrx: &Zcrx, per_queue: &BTreeMap<u32, u64>, holding: bool) {
    println!("expected per queue {per_queue:?}");
    for queue in &zcrx.queue_stats() {
        assert_no_copy(queue);
        assert_eq!(
            queue.stats.bytes,
            per_queue.get(&queue.queue).copied().unwrap_or(0),
            "queue {}: its driver received other queues' connections, or missed its own",
            queue.queue
        );
        assert_eq!(
            queue.stats.buffers_outstanding > 0,
            holding,
            "queue {}: chunks outstanding",
            queue.queue
        );
    }
    assert_eq!(
        per_queue.len(),
        QUEUES as usize,
        "all four queues used: {per_queue:?}"
    );
    let total = zcrx.stats();
    assert_eq!(total.unmatched_connections, 0);
    assert_eq!(total.bytes, per_queue.values().sum::<u64>());
}

/// Asserts that `zcrx` bound all four queues, that the kernel reports an io_uring provider
/// on each, and that the runtime's NAPI ids are the kernel's.
fn assert_all_four_bound(zcrx: &Zcrx, net: &GuestNet) {
    println!("{} / {}", zcrx.mode_selection(), zcrx.description());
    assert_eq!(zcrx.mode_selection().queues_bound, [0, 1, 2, 3]);
    assert!(zcrx.mode_selection().queues_refused.is_empty());
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
        reported,
        queue_of_napi(net),
        "the runtime's NAPI ids are the kernel's"
    );
    assert_eq!(providers(net), [true; 4]);
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
    let (net, spread, zcrx) = spread_on_all_queues();
    assert_all_four_bound(&zcrx, &net);
    let queue_of_napi = queue_of_napi(&net);
    let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
    let timeouts_before = peer_tcp_timeouts(&net);
    runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        zcrx.prepare_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let senders = spawn_senders(&net, addr, CONNECTIONS, PER_CONNECTION);
        let mut readers = Vec::new();
        for _ in 0..CONNECTIONS {
            let (stream, queue) = accept_on_queue(&zcrx, &listener, &queue_of_napi).await;
            *expected.entry(queue).or_default() += PER_CONNECTION;
            readers.push(tokio::spawn(read_verified(stream)));
        }
        for reader in readers {
            assert_eq!(reader.await.unwrap(), PER_CONNECTION);
        }
        join_senders(senders, PER_CONNECTION);
        // 32 random flows miss one of four queues with a chance of 4e-4: top up, one at a
        // time, until every queue has had a connection.
        receive_on_every_queue(
            &zcrx,
            &net,
            &listener,
            PER_CONNECTION,
            0,
            &mut expected,
            false,
        )
        .await;
    });
    println!(
        "the peer's retransmission timeouts meanwhile: {} (flows stay on their queue: \
         rehashing is off)",
        peer_tcp_timeouts(&net) - timeouts_before
    );
    drop(spread);
    assert_each_queue_received(&zcrx, &expected, false);
    shut_down_and_released(&net, zcrx);
}

/// How one stream of [`four_queues_receive_large_chunks_with_drops_elsewhere_and_resets`]
/// ended: its bytes, its largest buffer, and whether it was the peer's reset one (its
/// bytes are 0xFF, and it ends with `ConnectionReset`).
struct LargeChunkStream {
    bytes: u64,
    largest: usize,
    reset: bool,
}

/// Reads a stream to its end, checking every byte; with `drop_elsewhere`, hands each buffer
/// to a holder task that keeps the last four and drops the older ones, on another task (and
/// often another worker thread) than the reader's.
async fn read_large_chunks(mut stream: ZcStream, drop_elsewhere: bool) -> LargeChunkStream {
    let (to_holder, mut held) = futures::channel::mpsc::unbounded::<ZcBuf>();
    let holder = tokio::spawn(async move {
        let mut kept = VecDeque::new();
        while let Some(buf) = held.next().await {
            kept.push_back(buf);
            if kept.len() > 4 {
                kept.pop_front();
            }
        }
    });
    let mut end = LargeChunkStream {
        bytes: 0,
        largest: 0,
        reset: false,
    };
    while let Some(buf) = stream.next().await {
        let buf = match buf {
            Ok(buf) => buf,
            Err(e) => {
                assert!(end.reset, "a pattern stream failed: {e}");
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                break;
            }
        };
        end.reset |= end.bytes == 0 && buf[0] == 0xFF;
        if end.reset {
            assert!(buf.iter().all(|&b| b == 0xFF), "the reset stream's bytes");
        } else if let Some(i) = first_mismatch(end.bytes, &buf) {
            panic!("byte {} of a stream is wrong", end.bytes + i as u64);
        }
        end.bytes += buf.len() as u64;
        end.largest = end.largest.max(buf.len());
        if drop_elsewhere {
            to_holder.unbounded_send(buf).unwrap();
        }
    }
    drop(to_holder);
    holder.await.unwrap();
    end
}

/// All four queues with 16 KiB chunks (`chunk_size`, the areas on reserved huge pages), as
/// a long-lived server gets them: 24 connections at once, every other reader handing its
/// buffers to a holder task that drops them later on another task, and two more connections
/// the peer resets mid-stream. Every byte is checked, buffers are larger than a page (the
/// NIC split payload at 16 KiB), no queue copies a byte, only the reset streams fail (with
/// `ConnectionReset`), and every buffer comes back.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn four_queues_receive_large_chunks_with_drops_elsewhere_and_resets() {
    const CONNECTIONS: usize = 24;
    const RESETS: usize = 2;
    const PER_CONNECTION: u64 = 1 << 20;
    const RESET_BYTES: usize = 256 << 10;
    const CHUNK: u32 = 16 << 10;
    let net = GuestNet::from_env();
    // Four 8 MiB areas (`all_queues`), each of which may grow to three times that.
    let pages = u64::from(QUEUES) * 3 * (8 << 20) / (2 << 20);
    assert_eq!(
        reserve_huge_pages(pages),
        pages,
        "the guest could not reserve huge pages"
    );
    let spread = SpreadFlows::new(&net);
    let zcrx = build(
        all_queues(&net)
            .chunk_size(CHUNK)
            .huge_pages(HugePages::Reserved),
    );
    assert_all_four_bound(&zcrx, &net);
    let queue_of_napi = queue_of_napi(&net);
    let ends = runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        zcrx.prepare_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let senders = spawn_senders(&net, addr, CONNECTIONS, PER_CONNECTION);
        let resetters: Vec<_> = (0..RESETS)
            .map(|_| {
                spawn_resetter(
                    &net.peer_netns,
                    addr,
                    RESET_BYTES,
                    Duration::from_millis(300),
                )
            })
            .collect();
        let mut readers = Vec::new();
        for i in 0..CONNECTIONS + RESETS {
            let (stream, _queue) = accept_on_queue(&zcrx, &listener, &queue_of_napi).await;
            readers.push(tokio::spawn(read_large_chunks(stream, i % 2 == 1)));
        }
        let mut ends = Vec::new();
        for reader in readers {
            ends.push(reader.await.unwrap());
        }
        join_senders(senders, PER_CONNECTION);
        for resetter in resetters {
            resetter.join().unwrap();
        }
        ends
    });
    drop(spread);
    let (reset, pattern): (Vec<_>, Vec<_>) = ends.iter().partition(|end| end.reset);
    assert_eq!(
        reset.len(),
        RESETS,
        "the reset streams, told by their 0xFF bytes"
    );
    assert!(pattern.iter().all(|end| end.bytes == PER_CONNECTION));
    assert!(reset.iter().all(|end| end.bytes <= RESET_BYTES as u64));
    let largest = ends.iter().map(|end| end.largest).max().unwrap();
    assert!(
        largest > 4096 && largest <= CHUNK as usize,
        "16 KiB chunks delivered buffers of at most {largest} bytes"
    );
    let total = zcrx.stats();
    println!("{total}");
    for queue in &zcrx.queue_stats() {
        assert_no_copy(queue);
    }
    assert_eq!(
        total.bytes,
        ends.iter().map(|end| end.bytes).sum::<u64>(),
        "every byte received was counted once"
    );
    assert_eq!(total.unmatched_connections, 0);
    // A 64 KiB TSO packet's payload takes four or five 16 KiB buffers instead of sixteen
    // 4 KiB ones: fewer than half the buffers per MiB of one-page chunks (256).
    let per_mib = total.chunks as f64 / (total.bytes as f64 / f64::from(1 << 20));
    assert!(per_mib < 128.0, "{per_mib:.1} buffers per MiB");
    assert_eq!(total.buffers_outstanding, 0, "{total}");
    assert_eq!(total.memory_held, 0, "{total}");
    shut_down_and_released(&net, zcrx);
    reserve_huge_pages(0);
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
        let senders = spawn_senders(&net, addr, CONNECTIONS as usize, PER_CONNECTION);
        let mut readers = Vec::new();
        for _ in 0..CONNECTIONS {
            let (stream, _writer, _peer) = listener.accept().await.unwrap();
            // Any stream error (EFAULT from a foreign net_iov) fails here.
            readers.push(tokio::spawn(read_verified(stream)));
        }
        for reader in readers {
            assert_eq!(reader.await.unwrap(), PER_CONNECTION);
        }
        join_senders(senders, PER_CONNECTION);
    });
    drop(spread);
    let total = zcrx.stats();
    let per_queue = zcrx.queue_stats();
    let mut zero_copied = 0;
    for queue in &per_queue {
        assert_no_copy(queue);
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
    shut_down_and_released(&net, zcrx);
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
    let (net, spread, zcrx) = spread_on_all_queues();
    let queue_of_napi = queue_of_napi(&net);
    let (go, wait) = mpsc::channel::<()>();
    let wait = std::sync::Arc::new(std::sync::Mutex::new(wait));
    let mut first_queues = BTreeMap::<u32, u32>::new();
    let mut spread = Some(spread);
    runtime().block_on(async {
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        zcrx.prepare_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let (halfway, halves) = mpsc::channel::<()>();
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
    for queue in &zcrx.queue_stats() {
        assert_no_copy(queue);
    }
    shut_down_and_released(&net, zcrx);
}
