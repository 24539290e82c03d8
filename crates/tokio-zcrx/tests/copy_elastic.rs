//! The elastic copy pool and per-stream budgets (issue 10): no connection stalls the others.
//!
//! Stalled write-back peers (the echo example's pattern with peers that never read their
//! replies) do not stop a fresh client from being served; a stream paused by its budget
//! resumes without losing a byte; the memory cap holds under 10,000 slow peers; counters and
//! events report it; shutdown wakes streams waiting at the cap. Every wait is bounded.

mod common;

use common::{attached, pattern};

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio_zcrx::{
    ActiveMode, EventKind, Mode, StreamOptions, ZcBatch, ZcBuf, ZcListener, ZcStream, ZcWriteHalf,
    Zcrx,
};

/// Awaits `future` for at most `secs` seconds; panics with `what` if it takes longer.
async fn within<T>(secs: f64, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs_f64(secs), future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// Polls `check` every 5 ms until it holds, for at most `secs` seconds.
async fn until(secs: f64, what: &str, mut check: impl FnMut() -> bool) {
    within(secs, what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

fn payload(seed: u64, from: u64, to: u64) -> Vec<u8> {
    (from..to).map(|pos| pattern(seed, pos)).collect()
}

fn copy_mode(builder: tokio_zcrx::Builder) -> Zcrx {
    let zcrx = builder.mode(Mode::Copy).build().unwrap();
    assert_eq!(zcrx.mode(), ActiveMode::Copy);
    zcrx
}

/// The echo example's handler: receive what is there, write it all back, then let it go.
/// The buffers are held across the write, which waits while the peer does not read.
async fn echo(mut stream: ZcStream, mut writer: ZcWriteHalf) {
    let mut batch = ZcBatch::with_capacity(64);
    while let Ok(n) = stream.recv_many(&mut batch, 64).await {
        if n == 0 || writer.write_all_buffers(&batch).await.is_err() {
            return;
        }
        batch.clear();
    }
}

/// Before issue 10, 64 such peers (the pool's 64 buffers) stopped every connection: a fresh
/// client got no reply within 5 s. Now the pool grows past its recycled set, so 200 stalled
/// peers leave it served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_client_is_served_past_200_stalled_write_back_peers() {
    const STALLED: usize = 200;
    let zcrx = copy_mode(Zcrx::builder());
    let listener = ZcListener::bind(&zcrx, "127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, writer, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(echo(stream, writer));
        }
    });
    // Peers that send and never read their replies, with small socket buffers so that each
    // handler is stuck in its write after a little data.
    let mut peers = Vec::new();
    for _ in 0..STALLED {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let peer = socket.connect(addr).await.unwrap();
        peers.push(tokio::spawn(async move {
            let mut peer = peer;
            let block = vec![0x5A; 64 << 10];
            while peer.write_all(&block).await.is_ok() {}
        }));
    }
    // Every handler holds a buffer across a write that cannot finish.
    until(30.0, "every stalled handler holds a buffer", || {
        zcrx.stats().buffers_outstanding >= STALLED as u64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = zcrx.stats();
    println!("with {STALLED} stalled peers: {stats:?}");
    assert!(stats.memory_held <= stats.memory_capacity, "{stats:?}");

    let started = Instant::now();
    let sent = payload(7, 0, 100_000);
    let mut client = within(1.0, "connecting", TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut read_half, mut write_half) = client.split();
    let ((), echoed) = within(1.0, "a fresh client past stalled peers", async {
        let write = async {
            write_half.write_all(&sent).await.unwrap();
        };
        let read = async {
            let mut echoed = vec![0; sent.len()];
            read_half.read_exact(&mut echoed).await.unwrap();
            echoed
        };
        tokio::join!(write, read)
    })
    .await;
    println!("served in {:?}", started.elapsed());
    assert!(echoed == sent, "the echo differs from what was sent");
    drop(client);
    for peer in peers {
        peer.abort();
    }
    server.abort();
}

/// Drains `events` into the kinds seen.
fn kinds(events: &mut broadcast::Receiver<tokio_zcrx::Event>) -> Vec<EventKind> {
    let mut kinds = Vec::new();
    while let Ok(event) = events.try_recv() {
        kinds.push(event.kind);
    }
    kinds
}

/// A stream that holds its budget stops reading (its data waits in the socket), is counted
/// and announced, and once its reader drops buffers it resumes and delivers every byte in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_stream_resumes_and_loses_nothing() {
    const BUDGET: u64 = 64 << 10;
    const TOTAL: u64 = 4 << 20;
    let zcrx = copy_mode(Zcrx::builder().stream_budget(BUDGET));
    let mut events = zcrx.subscribe();
    let (mut stream, _writer, client) = attached(&zcrx, StreamOptions::new()).await;
    let sender = tokio::spawn(async move {
        let mut client = client;
        client.write_all(&payload(11, 0, TOTAL)).await.unwrap();
        client
    });
    // Hold everything received until the stream stops. The pause is read from the
    // statistics: a quiet spell alone is no proof (on a loaded machine the sender may not
    // even have started within it; a 300 ms quiet spell was taken for the pause, and the
    // test failed with nothing received).
    let mut held: Vec<ZcBuf> = Vec::new();
    let mut got = 0u64;
    within(30.0, "the stream pausing at its budget", async {
        loop {
            match tokio::time::timeout(Duration::from_millis(20), stream.next()).await {
                Ok(Some(buf)) => {
                    let buf = buf.unwrap();
                    got += buf.len() as u64;
                    held.push(buf);
                    assert!(got < TOTAL, "the budget never stopped the stream");
                }
                Ok(None) => panic!("EOF before the pause"),
                Err(_) if zcrx.stats().streams_paused == 1 => break,
                Err(_) => {}
            }
        }
    })
    .await;
    // Paused, it stays so while the buffers are held: its data waits in the socket.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err(),
        "a paused stream delivered data"
    );
    let stats = zcrx.stats();
    println!(
        "paused holding {got} bytes in {} buffers: {stats:?}",
        held.len()
    );
    assert!(got >= BUDGET, "paused before its budget: {got}");
    // One read past the high mark at most (the largest buffer).
    assert!(got < BUDGET + (64 << 10), "held {got}, budget {BUDGET}");
    assert_eq!(stats.streams_paused, 1, "{stats:?}");
    assert!(stats.stream_pauses >= 1, "{stats:?}");
    assert_eq!(stats.largest_stream_held, got, "{stats:?}");
    assert!(stats.memory_held >= got, "{stats:?}");
    assert!(
        kinds(&mut events).contains(&EventKind::StreamPaused),
        "no StreamPaused event"
    );

    // Drop the buffers, verifying them; then read the rest, dropping as we go.
    let mut position = 0u64;
    for buf in held.drain(..) {
        assert!(buf[..] == payload(11, position, position + buf.len() as u64)[..]);
        position += buf.len() as u64;
    }
    while position < TOTAL {
        let buf = within(10.0, "the resumed stream", stream.next())
            .await
            .expect("data, not EOF")
            .unwrap();
        assert!(
            buf[..] == payload(11, position, position + buf.len() as u64)[..],
            "bytes differ at {position}"
        );
        position += buf.len() as u64;
    }
    assert_eq!(position, TOTAL);
    let client = within(10.0, "the sender", sender).await.unwrap();
    drop(client);
    assert!(within(5.0, "EOF", stream.next()).await.is_none());
    let stats = zcrx.stats();
    assert_eq!(stats.streams_paused, 0, "{stats:?}");
    assert_eq!((stats.memory_held, stats.buffers_outstanding), (0, 0));
}

/// A stream paused at its budget whose buffers are held by another task, which drops only
/// some of them (down to 3/4 of the budget: above the low mark of 1/2) and waits for more,
/// as a decoder holding the start of a message does: the stream resumes, every time. Its
/// reader always waits when paused (a copy stream reads when asked), so it resumes below
/// its high mark; at the low mark both would wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_stream_whose_buffers_are_held_below_its_budget_resumes() {
    const BUDGET: u64 = 256 << 10;
    const TOTAL: u64 = 8 << 20;
    let zcrx = copy_mode(Zcrx::builder().stream_budget(BUDGET));
    let (mut stream, _writer, client) = attached(&zcrx, StreamOptions::new()).await;
    let sender = tokio::spawn(async move {
        let mut client = client;
        client.write_all(&payload(12, 0, TOTAL)).await.unwrap();
        client
    });
    let (to_holder, mut from_reader) = tokio::sync::mpsc::unbounded_channel::<ZcBuf>();
    let reader = tokio::spawn(async move {
        while let Some(buf) = stream.next().await {
            to_holder.send(buf.unwrap()).unwrap();
        }
    });
    let (mut position, mut held, mut held_bytes, mut cycles) = (0u64, Vec::new(), 0u64, 0);
    within(60.0, "every byte, through pauses below the budget", async {
        while position < TOTAL {
            let buf = from_reader.recv().await.expect("data, not EOF");
            assert!(
                buf[..] == payload(12, position, position + buf.len() as u64)[..],
                "bytes differ at {position}"
            );
            position += buf.len() as u64;
            held_bytes += buf.len() as u64;
            held.push(buf);
            if held_bytes < BUDGET {
                continue;
            }
            // At its budget: the reader's next poll pauses the stream.
            until(10.0, "the stream pausing at its budget", || {
                zcrx.stats().streams_paused == 1
            })
            .await;
            let keep = held.len()
                - held
                    .iter()
                    .rev()
                    .scan(0, |sum, buf| {
                        *sum += buf.len() as u64;
                        Some(*sum)
                    })
                    .take_while(|&sum| sum <= BUDGET / 4 * 3)
                    .count();
            held_bytes -= held.drain(..keep).map(|buf| buf.len() as u64).sum::<u64>();
            assert!(
                held_bytes > BUDGET / 2,
                "still above the low mark: {held_bytes}"
            );
            cycles += 1;
        }
    })
    .await;
    drop(within(10.0, "the sender", sender).await.unwrap());
    within(10.0, "EOF", reader).await.unwrap();
    assert!(
        from_reader.recv().await.is_none(),
        "nothing after the last byte"
    );
    let stats = zcrx.stats();
    println!("{cycles} pauses resumed with 3/4 of the budget held: {stats:?}");
    assert!(cycles >= 8, "{cycles} pauses");
    assert!(stats.stream_pauses >= cycles, "{stats:?}");
    drop(held);
    assert_eq!(
        (stats.streams_paused, zcrx.stats().buffers_outstanding),
        (0, 0)
    );
}

/// Checks that `buf` holds the payload of `seed` from `position` on; returns its end.
fn verify(seed: u64, position: u64, buf: &ZcBuf) -> u64 {
    let end = position + buf.len() as u64;
    assert!(
        buf[..] == payload(seed, position, end)[..],
        "bytes differ in {position}..{end}"
    );
    end
}

/// A bulk stream read with `recv_many` fills several buffers with one system call once its
/// reads fill the largest buffers (the sender is ahead: the reader checks every byte), at
/// most four, and delivers every byte in order; every buffer is back at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_fills_several_buffers_per_read_and_keeps_the_order() {
    const TOTAL: u64 = 16 << 20;
    let zcrx = copy_mode(Zcrx::builder());
    let (mut stream, _writer, client) = attached(&zcrx, StreamOptions::new()).await;
    let sender = tokio::spawn(async move {
        let mut client = client;
        for start in (0..TOTAL).step_by(1 << 20) {
            client
                .write_all(&payload(21, start, start + (1 << 20)))
                .await
                .unwrap();
        }
        client
    });
    let mut batch = ZcBatch::with_capacity(64);
    let (mut position, mut calls, mut largest, mut several) = (0u64, 0u64, 0usize, 0u64);
    while position < TOTAL {
        let n = within(30.0, "bulk data", stream.recv_many(&mut batch, 64))
            .await
            .unwrap();
        assert!(n > 0, "EOF at {position}");
        assert_eq!(n, batch.len());
        calls += 1;
        largest = largest.max(n);
        several += u64::from(n > 1);
        for buf in batch.iter() {
            position = verify(21, position, buf);
        }
        batch.clear();
    }
    assert_eq!(position, TOTAL);
    sender_done_then_eof(sender, &mut stream, &mut batch).await;
    let stats = zcrx.stats();
    println!("{calls} calls, {several} with several buffers, at most {largest}: {stats:?}");
    assert!(
        largest >= 2,
        "no read filled several buffers ({calls} calls)"
    );
    assert!(largest <= 4, "{largest} buffers from one read");
    assert_eq!(stats.bytes, TOTAL);
    assert_eq!((stats.memory_held, stats.buffers_outstanding), (0, 0));
}

/// Reads that fill several buffers stay within the stream's budget: a bulk stream whose
/// batches are all held pauses with at most one buffer past its high mark (as with one
/// buffer per read), and resumes without losing a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_reading_several_buffers_keeps_its_budget() {
    const BUDGET: u64 = 512 << 10;
    const TOTAL: u64 = 8 << 20;
    let zcrx = copy_mode(Zcrx::builder().stream_budget(BUDGET));
    let (mut stream, _writer, client) = attached(&zcrx, StreamOptions::new()).await;
    let sender = tokio::spawn(async move {
        let mut client = client;
        client.write_all(&payload(23, 0, TOTAL)).await.unwrap();
        client
    });
    let mut held: Vec<ZcBatch> = Vec::new();
    let (mut got, mut largest) = (0u64, 0usize);
    within(30.0, "the stream pausing at its budget", async {
        loop {
            let mut batch = ZcBatch::with_capacity(64);
            let wait = Duration::from_millis(20);
            match tokio::time::timeout(wait, stream.recv_many(&mut batch, 64)).await {
                Ok(n) => {
                    let n = n.unwrap();
                    assert!(n > 0, "EOF before the pause");
                    largest = largest.max(n);
                    got += batch.len_bytes() as u64;
                    held.push(batch);
                    assert!(got < TOTAL, "the budget never stopped the stream");
                }
                Err(_) if zcrx.stats().streams_paused == 1 => break,
                Err(_) => {}
            }
        }
    })
    .await;
    let stats = zcrx.stats();
    println!("paused holding {got} bytes, at most {largest} buffers per read: {stats:?}");
    assert!(got >= BUDGET, "paused before its budget: {got}");
    assert!(got < BUDGET + (64 << 10), "held {got}, budget {BUDGET}");
    assert_eq!(stats.largest_stream_held, got, "{stats:?}");
    let mut position = 0u64;
    for batch in held.drain(..) {
        for buf in batch.iter() {
            position = verify(23, position, buf);
        }
    }
    let mut batch = ZcBatch::with_capacity(64);
    while position < TOTAL {
        let n = within(10.0, "the resumed stream", stream.recv_many(&mut batch, 64))
            .await
            .unwrap();
        assert!(n > 0, "EOF at {position}");
        for buf in batch.iter() {
            position = verify(23, position, buf);
        }
        batch.clear();
    }
    assert_eq!(position, TOTAL);
    sender_done_then_eof(sender, &mut stream, &mut batch).await;
    let stats = zcrx.stats();
    assert_eq!((stats.memory_held, stats.buffers_outstanding), (0, 0));
}

/// `ZcBuf::detach` copies the bytes out and gives the buffer back at once.
#[tokio::test]
async fn a_detached_buffer_is_owned_and_returned_at_once() {
    let zcrx = copy_mode(Zcrx::builder());
    let (mut stream, _writer, mut client) = attached(&zcrx, StreamOptions::new()).await;
    client.write_all(&payload(3, 0, 3000)).await.unwrap();
    let mut buf = stream.next().await.unwrap().unwrap();
    assert_eq!(zcrx.stats().buffers_outstanding, 1);
    bytes::Buf::advance(&mut buf, 10);
    let len = buf.len() as u64;
    let owned = buf.detach();
    let stats = zcrx.stats();
    assert_eq!((stats.buffers_outstanding, stats.memory_held), (0, 0));
    assert!(owned[..] == payload(3, 10, 10 + len)[..]);
}

/// The memory high-water event goes out once three quarters of the cap are held, and the
/// counters follow the holding.
#[tokio::test]
async fn memory_high_water_is_announced() {
    let zcrx = copy_mode(
        Zcrx::builder()
            .copy_pool(4, 4096)
            .copy_memory_limit(16 << 10)
            .stream_budget(u64::MAX),
    );
    let mut events = zcrx.subscribe();
    let (mut stream, _writer, mut client) = attached(&zcrx, StreamOptions::new()).await;
    let mut held = Vec::new();
    for i in 0..3u64 {
        client.write_all(&payload(5, i, i + 1)).await.unwrap();
        held.push(
            within(5.0, "a buffer", stream.next())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let stats = zcrx.stats();
    assert_eq!(stats.memory_capacity, 16 << 10);
    assert_eq!(
        stats.memory_held,
        12 << 10,
        "three 4 KiB buffers: {stats:?}"
    );
    assert_eq!(
        stats.largest_stream_held, 3,
        "three bytes delivered: {stats:?}"
    );
    assert!(
        kinds(&mut events).contains(&EventKind::MemoryHighWater),
        "no MemoryHighWater event at 3/4 of the cap"
    );
    drop(held);
    assert_eq!(zcrx.stats().memory_held, 0);
}

/// Shutdown ends every stream waiting at the memory cap and every stream paused by its
/// budget, each with an error, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_wakes_every_stream_waiting_at_the_cap() {
    const WAITING: usize = 20;
    let zcrx = copy_mode(
        Zcrx::builder()
            .copy_pool(1, 4096)
            .copy_memory_limit(4096)
            .stream_budget(u64::MAX),
    );
    let mut clients = Vec::new();
    // A stream paused by a one-byte budget, whose one buffer fills the cap.
    let (mut paused, _pw, mut client) =
        attached(&zcrx, StreamOptions::new().budget(1).read_limit(1)).await;
    client.write_all(b"ab").await.unwrap();
    clients.push(client);
    let first = within(5.0, "the paused stream's byte", paused.next())
        .await
        .unwrap()
        .unwrap();
    let mut tasks = vec![tokio::spawn(async move {
        let _first = first;
        paused.next().await.map(|r| r.map(|b| b.len()))
    })];
    // Readable streams that find the cap reached.
    for _ in 0..WAITING {
        let (mut stream, writer, mut client) = attached(&zcrx, StreamOptions::new()).await;
        client.write_all(b"wait").await.unwrap();
        clients.push(client);
        tasks.push(tokio::spawn(async move {
            let _writer = writer;
            stream.next().await.map(|r| r.map(|b| b.len()))
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = zcrx.stats();
    assert_eq!(stats.streams_paused, 1, "{stats:?}");
    assert_eq!(stats.memory_held, 4096, "{stats:?}");
    assert!(tasks.iter().all(|t| !t.is_finished()), "all wait");
    within(5.0, "shutdown", zcrx.shutdown()).await;
    for task in tasks {
        let end = within(5.0, "a waiting stream after shutdown", task)
            .await
            .unwrap();
        let err = end.expect("an error, not EOF").unwrap_err();
        assert!(err.to_string().contains("shut down"), "{err}");
    }
    assert_eq!(
        zcrx.stats().memory_held,
        0,
        "the paused stream's buffer came back"
    );
}

/// Raises the open-file limit as far as allowed; returns the soft limit now.
fn raise_fd_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(got, 0);
    let raised = libc::rlimit {
        rlim_cur: wanted.max(limit.rlim_cur),
        rlim_max: wanted.max(limit.rlim_max),
    };
    // SAFETY: setrlimit reads the struct; raising our own limit affects only this process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return raised.rlim_cur;
    }
    let soft = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above, within the hard limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
    limit.rlim_max
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// 10,000 slow peers, each of whose handlers holds everything it receives: the bytes held
/// never exceed the memory cap (the streams beyond it wait), and everything arrives once
/// they let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_cap_holds_under_10000_slow_peers() {
    const WANTED: usize = 10_000;
    const CAP: u64 = 32 << 20;
    const EACH: u64 = 16 << 10;
    // Two descriptors per peer (both ends live here), and some to spare.
    let fds = raise_fd_limit(2 * WANTED as u64 + 256);
    let peers = WANTED.min((fds.saturating_sub(256) / 2) as usize);
    if peers < WANTED {
        // The machine refuses a higher limit: fewer peers, still far more than the cap holds
        // at EACH bytes apiece.
        println!("RLIMIT_NOFILE is {fds}: {peers} peers instead of {WANTED}");
    }
    let rss_before = rss_kib();
    let zcrx = copy_mode(Zcrx::builder().copy_memory_limit(CAP));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = tokio::sync::watch::channel(false);
    let mut clients = Vec::with_capacity(peers);
    let mut handlers = Vec::with_capacity(peers);
    for i in 0..peers {
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let (mut stream, writer) = zcrx.attach(socket).unwrap();
        let mut released = released.clone();
        handlers.push(tokio::spawn(async move {
            let _writer = writer;
            let mut held = Vec::new();
            let mut got = 0u64;
            let mut ok = true;
            // Hold everything until released (a handler stuck writing to a slow peer).
            loop {
                tokio::select! {
                    _ = released.wait_for(|&r| r) => break,
                    next = stream.next() => {
                        let buf: ZcBuf = next.unwrap().unwrap();
                        ok &= buf[..] == payload(i as u64, got, got + buf.len() as u64)[..];
                        got += buf.len() as u64;
                        held.push(buf);
                    }
                }
            }
            drop(held);
            while got < EACH {
                let buf = stream.next().await.unwrap().unwrap();
                ok &= buf[..] == payload(i as u64, got, got + buf.len() as u64)[..];
                got += buf.len() as u64;
            }
            (got, ok)
        }));
        client.write_all(&payload(i as u64, 0, EACH)).await.unwrap();
        clients.push(client);
        if i % 500 == 0 {
            let stats = zcrx.stats();
            assert!(stats.memory_held <= CAP, "at {i} peers: {stats:?}");
        }
    }
    // Everything sent that fits has been received and is held.
    let mut peak = 0;
    for _ in 0..40 {
        let stats = zcrx.stats();
        assert!(stats.memory_held <= CAP, "{stats:?}");
        peak = peak.max(stats.memory_held);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let stats = zcrx.stats();
    let rss_held = rss_kib();
    println!(
        "{peers} peers x {EACH} bytes against a {CAP}-byte cap: peak held {peak}, {stats:?}; \
         RSS {rss_before} KiB before, {rss_held} KiB while held"
    );
    assert!(
        peak >= CAP - (64 << 10) || stats.bytes == peers as u64 * EACH,
        "the cap was not reached though more was sent: {stats:?}"
    );
    release.send(true).unwrap();
    let mut total = 0;
    for handler in handlers {
        let (got, ok) = within(60.0, "a handler after release", handler)
            .await
            .unwrap();
        assert!(ok, "bytes differ");
        total += got;
    }
    assert_eq!(total, peers as u64 * EACH);
    let stats = zcrx.stats();
    assert!(stats.memory_held <= CAP);
    drop(clients);
    println!("RSS after: {} KiB; {stats:?}", rss_kib());
}

/// The sender finishes (its client is dropped) and the stream then ends: `recv_many` says 0.
async fn sender_done_then_eof<T>(
    sender: tokio::task::JoinHandle<T>,
    stream: &mut ZcStream,
    batch: &mut ZcBatch,
) {
    drop(within(10.0, "the sender", sender).await.unwrap());
    assert_eq!(
        within(5.0, "EOF", stream.recv_many(batch, 64))
            .await
            .unwrap(),
        0
    );
}
