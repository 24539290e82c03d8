//! Copy mode on the host: the same API with no io_uring, tested over loopback.

mod common;

use common::{copy_runtime, pattern, Rng};

use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_zcrx::{EventKind, StreamOptions, ZcBuf, ZcStream};

/// Sends `total` pattern bytes in random-sized writes, then closes the write side.
async fn send(addr: std::net::SocketAddr, seed: u64, total: u64) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let mut rng = Rng(seed);
    let mut sent = 0u64;
    let mut buf = Vec::new();
    while sent < total {
        let n = (rng.next() % 70_000 + 1).min(total - sent);
        buf.clear();
        buf.extend((sent..sent + n).map(|p| pattern(seed, p)));
        socket.write_all(&buf).await.unwrap();
        sent += n;
    }
    socket.shutdown().await.unwrap();
    socket
}

/// A connection from a task sending `total` pattern bytes (`seed`) to a fresh listener,
/// accepted: the server's socket and the sender's task.
async fn connection_from_sender(
    seed: u64,
    total: u64,
) -> (TcpStream, tokio::task::JoinHandle<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sender = tokio::spawn(async move { send(addr, seed, total).await });
    let (socket, _) = listener.accept().await.unwrap();
    (socket, sender)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_with_random_writes_arrive_intact() {
    const CONNS: u64 = 32;
    const EACH: u64 = 3 << 20;
    let zcrx = copy_runtime(16, 64 << 10);
    let mut events = zcrx.subscribe();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let senders: Vec<_> = (0..CONNS)
        .map(|seed| tokio::spawn(async move { send(addr, seed, EACH).await }))
        .collect();
    let mut readers = Vec::new();
    for _ in 0..CONNS {
        let (socket, _) = listener.accept().await.unwrap();
        let (stream, _writer) = zcrx.attach(socket).unwrap();
        // Accept order is not connect order: recognise the sender by its first bytes.
        readers.push(tokio::spawn(async move {
            let mut stream = stream;
            // Two bytes name the sender; a read may return fewer (reads are sized to what has
            // arrived), so the first buffers are joined until there are two.
            let mut first = Vec::new();
            while first.len() < 2 {
                first.extend_from_slice(&stream.next().await.unwrap().unwrap());
            }
            let seed = (0..CONNS).find(|&s| pattern(s, 0) == first[0] && pattern(s, 1) == first[1]);
            let seed = seed.expect("a known sender");
            for (i, &b) in first.iter().enumerate() {
                assert_eq!(b, pattern(seed, i as u64));
            }
            read_verified_offset(stream, seed, first.len() as u64).await
        }));
    }
    let mut total = 0;
    for reader in readers {
        total += reader.await.unwrap();
    }
    for sender in senders {
        sender.await.unwrap();
    }
    assert_eq!(total, CONNS * EACH);
    let stats = zcrx.stats();
    assert_eq!(stats.bytes, CONNS * EACH);
    assert_eq!(
        stats.copy_bytes,
        Some(CONNS * EACH),
        "copy mode copies every byte"
    );
    assert_eq!(stats.buffers_outstanding, 0);
    assert_eq!(events.try_recv().unwrap().kind, EventKind::CopyFallback);
}

/// Reads a stream to its end, checking every byte from `position` on; returns the end.
async fn read_verified_offset(mut stream: ZcStream, seed: u64, mut position: u64) -> u64 {
    while let Some(buf) = stream.next().await {
        let buf = buf.unwrap();
        for (i, &b) in buf.iter().enumerate() {
            assert_eq!(
                b,
                pattern(seed, position + i as u64),
                "byte {}",
                position + i as u64
            );
        }
        position += buf.len() as u64;
    }
    position
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_then_reply_on_the_write_half() {
    let zcrx = copy_runtime(4, 4096);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::spawn(async move {
        let mut socket = send(addr, 7, 100_000).await;
        let mut reply = String::new();
        socket.read_to_string(&mut reply).await.unwrap();
        reply
    });
    let (socket, _) = listener.accept().await.unwrap();
    let (stream, mut writer) = zcrx.attach(socket).unwrap();
    let received = read_verified_offset(stream, 7, 0).await;
    assert_eq!(received, 100_000);
    writer
        .write_all(format!("got {received}").as_bytes())
        .await
        .unwrap();
    drop(writer);
    assert_eq!(client.await.unwrap(), "got 100000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_fails_only_its_own_stream() {
    let zcrx = copy_runtime(8, 16 << 10);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let good = tokio::spawn(async move { send(addr, 1, 1 << 20).await });
    let (good_socket, _) = listener.accept().await.unwrap();
    let bad = TcpStream::connect(addr).await.unwrap();
    let (bad_socket, _) = listener.accept().await.unwrap();
    let (good_stream, _w1) = zcrx.attach(good_socket).unwrap();
    let (mut bad_stream, _w2) = zcrx.attach(bad_socket).unwrap();
    // SO_LINGER 0 makes the close a reset (and never blocks, which is why tokio deprecates
    // the general setter).
    #[allow(deprecated)]
    bad.set_linger(Some(Duration::ZERO)).unwrap();
    drop(bad);
    let err = loop {
        match bad_stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("a reset must be an error, not EOF"),
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(bad_stream.next().await.is_none());
    assert_eq!(read_verified_offset(good_stream, 1, 0).await, 1 << 20);
    good.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_buffers_block_the_pool_until_released_elsewhere() {
    const TOTAL: u64 = 1 << 20;
    let zcrx = copy_runtime(4, 8192);
    let (socket, sender) = connection_from_sender(3, TOTAL).await;
    let (mut stream, _writer) = zcrx.attach(socket).unwrap();
    // Take all four buffers and give them to another task that holds them.
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<ZcBuf>>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        let held = rx.await.unwrap();
        release_rx.await.unwrap();
        drop(held); // on this task's thread
    });
    let mut held = Vec::new();
    let mut position = 0u64;
    while held.len() < 4 {
        let buf = stream.next().await.unwrap().unwrap();
        for (i, &b) in buf.iter().enumerate() {
            assert_eq!(b, pattern(3, position + i as u64));
        }
        position += buf.len() as u64;
        held.push(buf);
    }
    tx.send(held).unwrap();
    assert_eq!(zcrx.stats().buffers_outstanding, 4);
    // The pool is empty: the stream waits instead of allocating.
    let waited = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(waited.is_err(), "a stream read with an empty pool");
    release_tx.send(()).unwrap();
    holder.await.unwrap();
    assert_eq!(read_verified_offset(stream, 3, position).await, TOTAL);
    sender.await.unwrap();
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_limit_caps_each_buffer_and_bytes_convert_without_copy() {
    let zcrx = copy_runtime(4, 64 << 10);
    let (socket, sender) = connection_from_sender(9, 200_000).await;
    let options = StreamOptions::new().read_limit(1000);
    let (mut stream, _writer) = zcrx.attach_with(socket, options).unwrap();
    let mut position = 0u64;
    let mut kept = Vec::new();
    while let Some(buf) = stream.next().await {
        let buf = buf.unwrap();
        assert!(buf.len() <= 1000);
        for (i, &b) in buf.iter().enumerate() {
            assert_eq!(b, pattern(9, position + i as u64));
        }
        position += buf.len() as u64;
        let bytes = buf.into_bytes();
        if kept.len() < 2 {
            kept.push(bytes); // still counted as outstanding while a Bytes holds it
        }
    }
    assert_eq!(position, 200_000);
    assert_eq!(zcrx.stats().buffers_outstanding, 2);
    drop(kept);
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
    sender.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_read_adapter_and_shutdown() {
    let zcrx = copy_runtime(4, 4096);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sender = tokio::spawn(async move { send(addr, 5, 50_000).await });
    let (socket, _) = listener.accept().await.unwrap();
    let (stream, _writer) = zcrx.attach(socket).unwrap();
    let mut reader = stream.into_async_read();
    let mut all = Vec::new();
    reader.read_to_end(&mut all).await.unwrap();
    assert_eq!(all.len(), 50_000);
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(5, i as u64)));
    sender.await.unwrap();
    zcrx.shutdown().await;
    let client = TcpStream::connect(addr).await;
    drop(client);
    let socket = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let err = zcrx.attach(socket).unwrap_err();
    assert!(err.to_string().contains("shut down"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_waiting_stream_with_an_error() {
    let zcrx = copy_runtime(4, 4096);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (socket, _) = listener.accept().await.unwrap();
    let (mut stream, _writer) = zcrx.attach(socket).unwrap();
    // The stream waits for data that never comes, until the runtime shuts down.
    let waiting = tokio::spawn(async move { stream.next().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    zcrx.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("shutdown did not wake the stream")
        .unwrap();
    let err = end.expect("an error, not EOF").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
}

/// A stream that queued for a buffer takes the one handed to its queue, and the buffer that
/// is free besides goes to the next stream: none stays reserved for a request nobody uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_stream_takes_its_own_buffer_and_leaves_the_free_one() {
    let zcrx = copy_runtime(2, 4096);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&[7u8; 100]).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        clients.push(client);
        streams.push(zcrx.attach(socket).unwrap());
    }
    async fn next(stream: &mut ZcStream) -> ZcBuf {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        next.expect("a buffer within 5 s").unwrap().unwrap()
    }
    // A and B hold both buffers.
    let a = next(&mut streams[0].0).await;
    let b = next(&mut streams[1].0).await;
    // C has data but no buffer: it queues (its readiness is there well within this time).
    assert!(
        tokio::time::timeout(Duration::from_millis(300), streams[2].0.next())
            .await
            .is_err(),
        "C read with an empty pool"
    );
    // A's buffer goes to C's queued request; B's is free besides.
    drop(a);
    drop(b);
    let c = next(&mut streams[2].0).await;
    let d = next(&mut streams[3].0).await;
    assert_eq!((c.len(), d.len()), (100, 100));
    assert_eq!(zcrx.stats().buffers_outstanding, 2);
}

/// Batches work in copy mode too (one buffer each), in order, and give the pool back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_copy_mode_hold_one_buffer_in_order() {
    const TOTAL: u64 = 1 << 20;
    let zcrx = copy_runtime(2, 8192);
    let (socket, sender) = connection_from_sender(9, TOTAL).await;
    let (mut stream, _writer) = zcrx.attach(socket).unwrap();
    let mut position = 0u64;
    while let Some(batch) = stream.next_batch(8).await {
        let batch = batch.unwrap();
        assert_eq!(batch.len(), 1);
        for (i, &b) in batch[0].iter().enumerate() {
            assert_eq!(b, pattern(9, position + i as u64));
        }
        position += batch.len_bytes() as u64;
    }
    assert_eq!(position, TOTAL);
    sender.await.unwrap();
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
}
