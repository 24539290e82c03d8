//! Copy mode under the conditions a long-lived server meets: shutdown while streams wait for
//! buffers, streams that stop being polled, pools too large for the machine, and churn.
//!
//! Every wait is bounded by a timeout with a message, so a regression fails instead of
//! hanging.

mod common;

use common::copy_runtime;

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_zcrx::{ErrorKind, Mode, ZcBuf, ZcStream, Zcrx};

/// Awaits `future` for at most `secs` seconds; panics with `what` if it takes longer.
async fn within<T>(secs: u64, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// `n` connections to a fresh listener, each with `bytes` bytes sent (and kept open): the
/// attached streams and the clients (which must stay alive).
async fn readable_streams(zcrx: &Zcrx, n: usize, bytes: usize) -> (Vec<ZcStream>, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for i in 0..n {
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&vec![fill(i); bytes]).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let (stream, _writer) = zcrx.attach(socket).unwrap();
        clients.push(client);
        streams.push(stream);
    }
    (streams, clients)
}

/// The byte connection `i` of [`readable_streams`] sends.
fn fill(i: usize) -> u8 {
    i as u8 + 1
}

async fn next_buffer(stream: &mut ZcStream, what: &str) -> ZcBuf {
    within(5, what, stream.next())
        .await
        .expect("a buffer, not the end")
        .expect("a buffer, not an error")
}

/// Polls `stream` for 300 ms and checks that it got nothing: it is waiting (for the pool).
async fn assert_waits(stream: &mut ZcStream, what: &str) {
    let waited = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(waited.is_err(), "{what}: got {:?}", waited.unwrap());
}

/// Defect C: shutdown must end a stream that waits for a pool buffer, even when the buffer's
/// holder waits for that very stream; the held buffer stays valid and returns to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_stream_waiting_for_a_buffer() {
    let zcrx = copy_runtime(1, 4096);
    let (mut streams, _clients) = readable_streams(&zcrx, 2, 100).await;
    let mut waiting = streams.pop().unwrap();
    let mut holding = streams.pop().unwrap();
    let held = next_buffer(&mut holding, "the holder's first buffer").await;
    assert_eq!(zcrx.stats().buffers_outstanding, 1);
    // The second stream is readable but the pool is empty.
    assert_waits(&mut waiting, "a stream read from an empty pool").await;
    // Its task waits for it; the buffer's holder waits for that task (and so never returns
    // the buffer on its own).
    let waiter = tokio::spawn(async move {
        let first = waiting.next().await;
        let later = [
            waiting.next().await.is_none(),
            waiting.next().await.is_none(),
        ];
        (first, later)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    within(5, "shutdown itself", zcrx.shutdown()).await;
    let (first, later) = within(
        5,
        "shutdown did not end a stream waiting for a pool buffer",
        waiter,
    )
    .await
    .unwrap();
    let err = first.expect("an error, not EOF").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
    assert!(err.to_string().contains("shut down"), "{err}");
    assert_eq!(later, [true, true], "polls after the error return None");
    // The holder's stream ends too, and its buffer is still readable and goes back.
    let end = within(5, "the holder's stream after shutdown", holding.next()).await;
    assert!(
        end.unwrap().is_err(),
        "the holder's stream ends with an error"
    );
    assert!(holding.next().await.is_none());
    assert!(
        held.iter().all(|&b| b == fill(0)),
        "held buffer kept its bytes"
    );
    assert_eq!(held.len(), 100);
    drop(held);
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
}

/// Defect F: a stream that waited for a buffer once and is then not polled again must not
/// keep the next free buffer from a readable connection that is being polled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_buffer_does_not_wait_for_a_stream_no_longer_polled() {
    let zcrx = copy_runtime(1, 4096);
    let (mut streams, _clients) = readable_streams(&zcrx, 3, 100).await;
    let held = next_buffer(&mut streams[0], "the first buffer").await;
    // Polled once with an empty pool (a select! whose deadline fired), then left alone.
    assert_waits(&mut streams[1], "a stream read from an empty pool").await;
    drop(held);
    // The returned buffer goes to the connection that is being polled.
    let buf = next_buffer(
        &mut streams[2],
        "a free buffer stayed reserved for a stream nobody polls",
    )
    .await;
    assert_eq!(&buf[..], &[fill(2); 100][..]);
    drop(buf);
    // The stream left alone still gets its data when it is polled again.
    let buf = next_buffer(&mut streams[1], "the stream left alone, polled again").await;
    assert_eq!(&buf[..], &[fill(1); 100][..]);
    drop(buf);
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
}

/// The same in a server's shape: many streams stuck behind backpressure (each polled once,
/// then its task waits on something else) and one connection that keeps reading. It must
/// get every returned buffer, not wait for the stuck ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_under_backpressure_do_not_starve_a_reading_one() {
    const STUCK: usize = 8;
    let zcrx = copy_runtime(2, 4096);
    let (mut streams, mut clients) = readable_streams(&zcrx, STUCK + 2, 100).await;
    let first = next_buffer(&mut streams[0], "buffer one").await;
    let second = next_buffer(&mut streams[1], "buffer two").await;
    for stream in &mut streams[2..STUCK + 2] {
        assert_waits(stream, "a stream read from an empty pool").await;
    }
    drop(first);
    drop(second);
    // Stream 0 reads on; its peer sends more in small pieces, 50 rounds of read + drop.
    let mut reader = streams.swap_remove(0);
    let peer = &mut clients[0];
    for round in 0..50u8 {
        peer.write_all(&[round; 10]).await.unwrap();
        let buf = next_buffer(&mut reader, "the reading stream starved").await;
        assert!(!buf.is_empty());
    }
    drop(reader);
    drop(streams);
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
}

/// Cancel safety: a stream dropped while it waits for a buffer, and a pending `next()`
/// dropped mid-wait, leave no buffer behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_waiting_streams_strands_no_buffer() {
    let zcrx = copy_runtime(1, 4096);
    let (mut streams, _clients) = readable_streams(&zcrx, 4, 100).await;
    let held = next_buffer(&mut streams[0], "the first buffer").await;
    assert_waits(&mut streams[1], "stream 1 read from an empty pool").await;
    assert_waits(&mut streams[2], "stream 2 read from an empty pool").await;
    let dropped = streams.remove(1);
    drop(dropped);
    drop(held);
    // Streams 2 (its pending next() was dropped) and 3 can each take the one buffer in turn.
    for i in [1, 2] {
        let buf = next_buffer(&mut streams[i], "a buffer after waiters went away").await;
        assert_eq!(buf.len(), 100);
    }
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
}

/// Fairness among polled streams: `streams` connections that always have data share a pool
/// of `buffers` buffers for 1.5 s; each reads and drops in a loop on its own task. Without
/// care the stream that returns a buffer and polls again at once, or the waiter woken last
/// (which Tokio runs first), would take it every time. Returns the buffers each stream got.
async fn busy_streams_sharing_a_pool(streams: usize, buffers: u32) -> Vec<u64> {
    const CHUNK: usize = 512;
    let zcrx = copy_runtime(buffers, CHUNK);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (start, started) = tokio::sync::watch::channel(false);
    let mut counters = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..streams {
        senders.push(tokio::spawn(async move {
            // Sends until the reader stops (the task is aborted then).
            let mut client = TcpStream::connect(addr).await.unwrap();
            let block = vec![0xA5u8; 64 << 10];
            while client.write_all(&block).await.is_ok() {}
        }));
        let (socket, _) = listener.accept().await.unwrap();
        let (mut stream, _writer) = zcrx.attach(socket).unwrap();
        let mut started = started.clone();
        counters.push(tokio::spawn(async move {
            let _writer = _writer;
            started.wait_for(|&s| s).await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
            let mut buffers = 0u64;
            // timeout_at returns a ready item even past the deadline: check it as well.
            while tokio::time::Instant::now() < deadline {
                let next = tokio::time::timeout_at(deadline, stream.next()).await;
                let Ok(Some(buf)) = next else { break };
                let buf = buf.unwrap();
                assert!(buf.iter().all(|&b| b == 0xA5));
                buffers += 1;
            }
            buffers
        }));
    }
    start.send(true).unwrap();
    let mut counts = Vec::new();
    for counter in counters {
        counts.push(within(10, "a busy reader", counter).await.unwrap());
    }
    for sender in senders {
        sender.abort();
    }
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
    counts
}

/// Checks that every stream got at least a quarter of an even share.
fn assert_fair(counts: &[u64]) {
    let total: u64 = counts.iter().sum();
    assert!(
        total > 20 * counts.len() as u64,
        "too few buffers read: {counts:?}"
    );
    for &count in counts {
        assert!(
            count * 4 * counts.len() as u64 >= total,
            "a stream got less than a quarter of an even share: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_busy_streams_share_a_one_buffer_pool() {
    assert_fair(&busy_streams_sharing_a_pool(2, 1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_busy_streams_share_a_small_pool() {
    assert_fair(&busy_streams_sharing_a_pool(32, 2).await);
}

/// The order in which four streams that wait for the only buffer get it, each on its own
/// task, when its holder returns it (and each returns it at once).
async fn order_of_service(zcrx: &Zcrx) -> Vec<usize> {
    const WAITERS: usize = 4;
    let (mut streams, _clients) = readable_streams(zcrx, WAITERS + 1, 100).await;
    let held = next_buffer(&mut streams[0], "the only buffer").await;
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, mut stream) in streams.drain(..).enumerate().skip(1) {
        let served = std::sync::Arc::clone(&served);
        tasks.push(tokio::spawn(async move {
            let buf = next_buffer(&mut stream, "a waiting stream's turn").await;
            served.lock().unwrap().push(i);
            drop(buf);
        }));
        // Let it start waiting before the next one does.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Returned from a task, as a server would.
    tokio::spawn(async move { drop(held) }).await.unwrap();
    for task in tasks {
        within(5, "a waiting stream", task).await.unwrap();
    }
    let order = served.lock().unwrap().clone();
    order
}

/// Streams waiting for buffers are served about in the order they started waiting, whatever
/// order the scheduler runs their tasks in (Tokio runs the last one woken first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_streams_are_served_in_order() {
    let zcrx = copy_runtime(1, 4096);
    let mut orders = Vec::new();
    for _ in 0..20 {
        orders.push(order_of_service(&zcrx).await);
    }
    // The first to wait is served first: about always (a task stolen by the other worker of
    // a loaded machine may run late), where waking all and letting the scheduler pick serves
    // the last one first most of the time. Later places may swap when re-registrations race.
    let oldest_first = orders.iter().filter(|o| o[0] == 1).count();
    assert!(
        oldest_first >= 12,
        "oldest first in {oldest_first} of 20: {orders:?}"
    );
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
}

/// A pool larger than the machine's memory (or than the builder's limits, 2^20 buffers and
/// 1 GiB, which catch it first) is an error that names the size and the setter, not an
/// abort or the OOM killer.
#[test]
fn a_pool_larger_than_memory_is_an_error() {
    for (buffers, size) in [(u32::MAX, u32::MAX as usize), (1 << 20, 1 << 30)] {
        let err = Zcrx::builder()
            .mode(Mode::Copy)
            .copy_pool(buffers, size)
            .build()
            .expect_err("a pool of petabytes");
        assert!(
            matches!(
                err.kind(),
                ErrorKind::InvalidConfig | ErrorKind::OutOfMemory
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&buffers.to_string()) || text.contains(&size.to_string()),
            "names the size: {text}"
        );
        assert!(text.contains("copy_pool"), "says what to change: {text}");
        println!("{text}");
    }
}

/// A pool whose buffers can be mapped but whose bookkeeping cannot be allocated must be an
/// error too, not an allocation-failure abort; a refused mapping names the limit. Run in a child process (this test binary,
/// filtered to the helper below) whose address space is capped, so the failure is
/// deterministic and harms nothing else.
#[test]
fn a_pool_whose_free_list_cannot_be_allocated_is_an_error() {
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "free_list_allocation_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TOKIO_ZCRX_POOL_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the child failed ({:?}); stdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("child: InvalidConfig") && stdout.contains("child: OutOfMemory"),
        "the child did not report: {stdout}"
    );
}

/// The child of the test above; run alone by it (ignored otherwise, since it lowers the
/// process's address-space limit).
#[test]
#[ignore = "run by a_pool_whose_free_list_cannot_be_allocated_is_an_error in a child process"]
fn free_list_allocation_child() {
    assert_eq!(
        std::env::var("TOKIO_ZCRX_POOL_CHILD").as_deref(),
        Ok("1"),
        "only run as a child"
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    // Room for 256 MiB of buffers and a little more, not for the 1 GiB free list of 2^28
    // one-byte buffers.
    let limit = (vm_kib << 10) + (512 << 20);
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit reads the struct; lowering our own limit has no other effect.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rlimit) }, 0);
    // 2^28 one-byte buffers: beyond the builder's limit of 2^20 buffers, refused before
    // anything is allocated (the old code aborted allocating the free list).
    let err = Zcrx::builder()
        .mode(Mode::Copy)
        .copy_pool(1 << 28, 1)
        .build()
        .expect_err("a free list beyond the address-space limit");
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("copy_pool"), "{err}");
    println!("child: {:?}: {err}", err.kind());
    // Buffers beyond the limit: the mapping fails, and the error says which limit to check.
    let err = Zcrx::builder()
        .mode(Mode::Copy)
        .copy_pool(1024, 1 << 20)
        .build()
        .expect_err("1 GiB of buffers beyond the address-space limit");
    assert_eq!(err.kind(), ErrorKind::OutOfMemory, "{err}");
    assert!(err.to_string().contains("RLIMIT_AS"), "{err}");
    println!("child: {:?}: {err}", err.kind());
}
