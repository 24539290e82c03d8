//! The public API on the host, in copy mode: the Tokio and `bytes` traits (`AsyncBufRead`
//! without a copy, `Buf` over buffers and batches), batches that reuse their allocation,
//! vectored write-back, the combined connection, `incoming()`, which runtime a stream needs,
//! and the auto traits of every public type. (The io_uring side of the same API is tested
//! over the synthetic kernel in `src/api_tests.rs`.)

mod common;

use common::{attached, copy_runtime, pattern, Rng};

use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::Buf;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_zcrx::{
    ActiveMode, Builder, Error, ErrorKind, Event, EventKind, EventsPolicy, Incoming,
    IntoTcpStreamError, Mode, ModeSelection, ParseModeError, ReuniteError, Stats, StreamOptions,
    ZcBatch, ZcBuf, ZcConnection, ZcListener, ZcReader, ZcStream, ZcWriteHalf, Zcrx,
};

fn send_sync_unpin<T: Send + Sync + Unpin + 'static>() {}
fn send_unpin<T: Send + Unpin>() {}
fn shared_handle<T: Clone + Send + Sync + Unpin + 'static>() {}
fn plain_value<T: Copy + Send + Sync + Unpin + std::fmt::Debug + PartialEq + 'static>() {}
fn error_type<T: std::error::Error + Send + Sync + 'static>() {}
fn send<T: Send>(_: T) {}

/// Every public type can go where Tokio code puts it: into `tokio::spawn` (Send), behind an
/// `Arc` shared by tasks (Sync), polled without pinning (Unpin), into `io::Error` (errors).
#[test]
fn every_public_type_has_its_auto_traits() {
    send_sync_unpin::<ZcBuf>();
    send_sync_unpin::<ZcBatch>();
    send_sync_unpin::<ZcStream>();
    send_sync_unpin::<ZcReader>();
    send_sync_unpin::<ZcWriteHalf>();
    send_sync_unpin::<ZcConnection>();
    send_sync_unpin::<ZcListener>();
    send_unpin::<Incoming<'static>>();
    shared_handle::<Zcrx>();
    shared_handle::<Builder>();
    shared_handle::<ModeSelection>();
    plain_value::<Event>();
    plain_value::<EventKind>();
    plain_value::<Stats>();
    plain_value::<Mode>();
    plain_value::<ActiveMode>();
    plain_value::<StreamOptions>();
    plain_value::<EventsPolicy>();
    plain_value::<ErrorKind>();
    error_type::<Error>();
    error_type::<ParseModeError>();
    error_type::<ReuniteError>();
    error_type::<IntoTcpStreamError>();
}

/// The futures of the async methods are `Send`, so a task that awaits them can be spawned.
/// (Compiled, not run.)
#[allow(dead_code, clippy::too_many_arguments)]
fn futures_are_send(
    zcrx: &Zcrx,
    listener: &ZcListener,
    stream: &mut ZcStream,
    writer: &mut ZcWriteHalf,
    batch: &mut ZcBatch,
    buffers: &[ZcBuf],
    incoming: Incoming<'static>,
    connection: &mut ZcConnection,
) {
    send(ZcListener::bind(zcrx, "127.0.0.1:0"));
    send(listener.accept());
    send(incoming);
    send(stream.next());
    send(stream.next_batch(64));
    send(stream.recv_many(batch, 64));
    send(writer.write_all_buffers(buffers));
    send(writer.send_batch(batch));
    send(writer.send_bytes(bytes::Bytes::new()));
    send(connection.read_u8());
    send(zcrx.shutdown());
}

/// `seed`'s pattern bytes from `from` to `to`.
fn bytes_of(seed: u64, from: u64, to: u64) -> Vec<u8> {
    (from..to).map(|p| pattern(seed, p)).collect()
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `fill_buf` hands out the buffer's own bytes (no copy), `consume` moves its cursor, and a
/// used-up buffer goes back to the pool at once, before more data comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_buf_hands_out_the_buffer_in_place_and_consume_returns_it() {
    let zcrx = copy_runtime(4, 4096);
    let (stream, _writer, mut client) = attached(&zcrx, StreamOptions::new()).await;
    client.write_all(&bytes_of(1, 0, 3000)).await.unwrap();
    let mut reader = stream.into_async_read();
    let (start, len) = {
        let bytes = reader.fill_buf().await.unwrap();
        assert_eq!(bytes, &bytes_of(1, 0, bytes.len() as u64)[..]);
        (bytes.as_ptr(), bytes.len())
    };
    assert!(len > 10, "{len}");
    assert_eq!(zcrx.stats().buffers_outstanding, 1);
    reader.consume(10);
    let again = reader.fill_buf().await.unwrap();
    assert_eq!(
        again.as_ptr(),
        start.wrapping_add(10),
        "the same buffer, moved on"
    );
    assert_eq!(again.len(), len - 10);
    reader.consume(len - 10);
    // Used up: back in the pool now, although the reader waits for nothing yet.
    assert_eq!(zcrx.stats().buffers_outstanding, 0);

    // The bytes left in the buffer being read come back with the stream, in place.
    let mut position = len as u64;
    while position < 3000 {
        let bytes = reader.fill_buf().await.unwrap();
        assert_eq!(
            bytes,
            &bytes_of(1, position, position + bytes.len() as u64)[..]
        );
        let n = bytes.len();
        position += n as u64;
        reader.consume(n);
    }
    client.write_all(&bytes_of(1, 3000, 3100)).await.unwrap();
    let at = reader.fill_buf().await.unwrap().as_ptr();
    reader.consume(4);
    let (mut stream, unread) = reader.into_parts();
    let unread = unread.expect("96 bytes left in the buffer");
    assert_eq!(unread.as_ptr(), at.wrapping_add(4));
    let unread_len = unread.len();
    assert_eq!(
        &unread[..],
        &bytes_of(1, 3004, 3004 + unread_len as u64)[..]
    );
    drop(unread);
    drop(client);
    let mut position = 3004 + unread_len as u64;
    while let Some(buf) = stream.next().await {
        let buf = buf.unwrap();
        assert_eq!(
            &buf[..],
            &bytes_of(1, position, position + buf.len() as u64)[..]
        );
        position += buf.len() as u64;
    }
    assert_eq!(position, 3100);
}

/// `poll_read` copies, across buffers, and ends at EOF; the reset of a connection is an
/// error once, then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_read_copies_across_buffers_and_reports_a_reset_once() {
    let zcrx = copy_runtime(4, 4096);
    let options = StreamOptions::new().read_limit(1000);
    let (stream, _writer, mut client) = attached(&zcrx, options).await;
    client.write_all(&bytes_of(2, 0, 10_000)).await.unwrap();
    let mut reader = stream.into_async_read();
    let mut got = vec![0u8; 10_000];
    reader.read_exact(&mut got).await.unwrap();
    assert_eq!(got, bytes_of(2, 0, 10_000));
    // SO_LINGER 0: the close is a reset.
    #[allow(deprecated)]
    client.set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    let mut rest = Vec::new();
    let err = reader.read_to_end(&mut rest).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(reader.read(&mut [0u8; 16]).await.unwrap(), 0);
}

/// A buffer is a cursor over its bytes, and a batch one over all its buffers' bytes: chunks,
/// advances within and across buffers, vectored chunks, and what is left for `into_vec`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffers_and_batches_are_cursors_over_their_bytes() {
    let zcrx = copy_runtime(8, 4096);
    // A read limit makes copy mode hand out 1000-byte buffers.
    let options = StreamOptions::new().read_limit(1000);
    let (mut stream, _writer, mut client) = attached(&zcrx, options).await;
    client.write_all(&bytes_of(3, 0, 6000)).await.unwrap();

    let mut buf = stream.next().await.unwrap().unwrap();
    assert_eq!(buf.len(), 1000);
    assert_eq!(buf.remaining(), 1000);
    assert_eq!(buf.get_u8(), pattern(3, 0));
    buf.advance(9);
    assert_eq!((buf.len(), buf.remaining()), (990, 990));
    assert_eq!(buf.chunk(), &bytes_of(3, 10, 1000)[..]);
    assert_eq!(&buf[..], buf.chunk(), "Deref shows the bytes left");
    let over = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| buf.advance(991)));
    assert!(over.is_err(), "advancing past the end panics");
    let bytes = buf.into_bytes();
    assert_eq!(&bytes[..], &bytes_of(3, 10, 1000)[..]);
    drop(bytes);

    // Copy mode appends one buffer per call; five calls make a batch of five.
    let mut batch = ZcBatch::new();
    while batch.len() < 5 {
        assert_eq!(stream.recv_many(&mut batch, 8).await.unwrap(), 1);
    }
    assert_eq!(
        (batch.len(), batch.len_bytes(), batch.remaining()),
        (5, 5000, 5000)
    );
    let mut slices = [std::io::IoSlice::new(&[]); 8];
    assert_eq!(batch.chunks_vectored(&mut slices), 5);
    let joined: Vec<u8> = slices[..5].iter().flat_map(|s| s.iter().copied()).collect();
    assert_eq!(joined, bytes_of(3, 1000, 6000));
    assert_eq!(batch.chunk(), &bytes_of(3, 1000, 2000)[..]);
    batch.advance(999);
    assert_eq!((batch.len(), batch[0].len()), (5, 1));
    batch.advance(2); // across the first boundary
    assert_eq!(batch.len(), 4, "the used-up buffer is no longer shown");
    assert_eq!(batch.chunk(), &bytes_of(3, 2001, 3000)[..]);
    batch.advance(997);
    assert_eq!(
        batch.get_u32(),
        u32::from_be_bytes([2998, 2999, 3000, 3001].map(|p| pattern(3, p)))
    );
    assert_eq!(batch.len_bytes(), 6000 - 3002);
    let mut rest = vec![0u8; 1000];
    batch.copy_to_slice(&mut rest);
    assert_eq!(rest, bytes_of(3, 3002, 4002));
    assert_eq!(
        zcrx.stats().buffers_outstanding,
        5,
        "used-up buffers wait for the batch"
    );
    let left = batch.into_vec();
    assert_eq!(left.len(), 2);
    assert_eq!(&left[0][..], &bytes_of(3, 4002, 5000)[..]);
    assert_eq!(
        zcrx.stats().buffers_outstanding,
        2,
        "into_vec returned the used-up ones"
    );
    drop(left);
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
}

/// `recv_many` appends to the caller's batch and keeps its allocation across `clear`s;
/// `Ok(0)` at EOF and for a limit of 0; a reset is one `Err`, then `Ok(0)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_many_reuses_the_batch_and_ends_like_mpsc() {
    const TOTAL: u64 = 1 << 20;
    let zcrx = copy_runtime(4, 8192);
    let (mut stream, mut writer, mut client) = attached(&zcrx, StreamOptions::new()).await;
    // Nothing to write is written at once (an empty batch, as after a `clear`).
    writer.write_all_buffers(&ZcBatch::new()).await.unwrap();
    writer.write_all_buffers(&[]).await.unwrap();
    let sender = tokio::spawn(async move {
        client.write_all(&bytes_of(4, 0, TOTAL)).await.unwrap();
        client
    });
    let mut batch = ZcBatch::with_capacity(16);
    let capacity = batch.capacity();
    assert!(capacity >= 16);
    assert_eq!(stream.recv_many(&mut batch, 0).await.unwrap(), 0, "limit 0");
    let mut position = 0;
    while position < TOTAL {
        let n = stream.recv_many(&mut batch, 16).await.unwrap();
        assert!(n >= 1);
        for buf in &batch {
            assert_eq!(
                &buf[..],
                &bytes_of(4, position, position + buf.len() as u64)[..]
            );
            position += buf.len() as u64;
        }
        batch.clear();
        assert_eq!((batch.len(), batch.len_bytes()), (0, 0));
        assert_eq!(batch.capacity(), capacity, "clear keeps the allocation");
    }
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
    let client = sender.await.unwrap();
    drop(client);
    assert_eq!(stream.recv_many(&mut batch, 16).await.unwrap(), 0, "EOF");
    assert_eq!(
        stream.recv_many(&mut batch, 16).await.unwrap(),
        0,
        "still EOF"
    );

    let (mut stream, _writer, client) = attached(&zcrx, StreamOptions::new()).await;
    #[allow(deprecated)]
    client.set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    let err = stream.recv_many(&mut batch, 16).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(stream.recv_many(&mut batch, 16).await.unwrap(), 0);
}

/// Sets a socket's send buffer small, so that large vectored writes are taken in parts.
fn small_send_buffer(socket: &impl AsRawFd) {
    let size: libc::c_int = 4096;
    // SAFETY: a live descriptor; `size` outlives the call and its length is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// An echo server that sends each batch back with `write_all_buffers` (vectored writes into
/// a small send buffer, so most are partial), over many connections: every byte comes back
/// in order. Every other batch is advanced a little first, so writes start inside a buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_echo_back_with_vectored_writes_every_byte_intact() {
    const CONNS: u64 = 12;
    const EACH: u64 = 1 << 20;
    let zcrx = copy_runtime(32, 16 << 10);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let clients: Vec<_> = (0..CONNS)
        .map(|seed| {
            tokio::spawn(async move {
                let socket = TcpStream::connect(addr).await.unwrap();
                let (mut read, mut write) = socket.into_split();
                let sending = tokio::spawn(async move {
                    let mut rng = Rng(seed);
                    write.write_all(&seed.to_le_bytes()).await.unwrap();
                    let mut sent = 0;
                    while sent < EACH {
                        let n = (rng.next() % 50_000 + 1).min(EACH - sent);
                        write
                            .write_all(&bytes_of(seed, sent, sent + n))
                            .await
                            .unwrap();
                        sent += n;
                    }
                    write.shutdown().await.unwrap();
                });
                let mut echoed = Vec::new();
                read.read_to_end(&mut echoed).await.unwrap();
                sending.await.unwrap();
                assert_eq!(echoed.len() as u64, 8 + EACH, "connection {seed}");
                assert_eq!(echoed[..8], seed.to_le_bytes());
                assert!(echoed[8..] == bytes_of(seed, 0, EACH), "connection {seed}");
            })
        })
        .collect();
    let mut servers = Vec::new();
    for _ in 0..CONNS {
        let (socket, _) = listener.accept().await.unwrap();
        small_send_buffer(&socket);
        let (mut stream, mut writer) = zcrx.attach(socket).unwrap();
        servers.push(tokio::spawn(async move {
            let mut batch = ZcBatch::with_capacity(16);
            let mut batches = 0u64;
            while stream.recv_many(&mut batch, 16).await.unwrap() > 0 {
                // Gather what else has arrived, without waiting (copy mode reads one
                // buffer per call).
                while batch.len() < 16 {
                    match stream.recv_many(&mut batch, 16).now_or_never() {
                        Some(Ok(n)) if n > 0 => {}
                        Some(Err(e)) => panic!("{e}"),
                        _ => break,
                    }
                }
                batches += 1;
                if batches % 2 == 0 {
                    let head = batch.chunk().len().min(7);
                    writer.write_all(&batch.chunk()[..head]).await.unwrap();
                    batch.advance(head);
                }
                writer.write_all_buffers(&batch).await.unwrap();
                batch.clear();
            }
            writer.shutdown().await.unwrap();
        }));
    }
    for server in servers {
        server.await.unwrap();
    }
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(zcrx.stats().bytes, CONNS * (EACH + 8));
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
}

/// One value reads and writes (lines in, lines out), tells its addresses, splits and
/// reunites, refuses the halves of two connections, and feeds a `FramedRead`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_one_io_object_that_splits_and_reunites() {
    let zcrx = copy_runtime(4, 4096);
    let (stream, writer, mut client) = attached(&zcrx, StreamOptions::new()).await;
    assert_eq!(stream.peer_addr().unwrap(), client.local_addr().unwrap());
    assert_eq!(stream.local_addr().unwrap(), client.peer_addr().unwrap());
    let mut connection = ZcConnection::new(stream, writer).unwrap();
    assert_eq!(
        connection.peer_addr().unwrap(),
        client.local_addr().unwrap()
    );
    assert_eq!(
        connection.local_addr().unwrap(),
        client.peer_addr().unwrap()
    );
    assert_eq!(
        connection.stream().peer_addr().unwrap(),
        client.local_addr().unwrap()
    );

    client.write_all(b"ping\n").await.unwrap();
    let mut line = String::new();
    connection.read_line(&mut line).await.unwrap();
    assert_eq!(line, "ping\n");
    connection.write_all(b"pong\n").await.unwrap();
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"pong\n");

    // Split, used by two tasks' worth of code, and joined again.
    let (reader, writer) = connection.into_split();
    let mut connection = ZcConnection::reunite(reader, writer).unwrap();
    {
        let (reader, writer) = connection.halves_mut();
        client.write_all(b"echo me\n").await.unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        writer.write_all(line.as_bytes()).await.unwrap();
    }
    let mut echoed = [0u8; 8];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"echo me\n");

    // Halves of two connections are refused and given back.
    let (other_stream, other_writer, _other_client) = attached(&zcrx, StreamOptions::new()).await;
    let (reader, writer) = connection.into_split();
    let ReuniteError(reader, other_writer) =
        ZcConnection::reunite(reader, other_writer).unwrap_err();
    let ReuniteError(other_reader, writer) =
        ZcConnection::reunite(other_stream.into_async_read(), writer).unwrap_err();
    let connection = ZcConnection::reunite(reader, writer).unwrap();
    let _other = ZcConnection::reunite(other_reader, other_writer).unwrap();

    // A codec over the connection.
    let mut lines = FramedRead::new(connection, LinesCodec::new());
    client.write_all(b"one\ntwo\n").await.unwrap();
    assert_eq!(lines.next().await.unwrap().unwrap(), "one");
    assert_eq!(lines.next().await.unwrap().unwrap(), "two");
    drop(client);
    assert!(lines.next().await.is_none());
}

/// In copy mode the Tokio socket comes back, with the unread rest of the buffer being read,
/// and works as before; the socket can be attached again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_mode_connection_gives_its_tcp_stream_back() {
    let zcrx = copy_runtime(4, 4096);
    let (stream, writer, mut client) = attached(&zcrx, StreamOptions::new()).await;
    let mut connection = ZcConnection::new(stream, writer).unwrap();
    client.write_all(b"hello world").await.unwrap();
    let mut head = [0u8; 6];
    connection.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"hello ");
    let (mut socket, unread) = connection.into_tcp_stream().unwrap();
    let unread = unread.expect("the rest of the buffer");
    assert_eq!(&unread[..], b"world");
    drop(unread);
    assert_eq!(zcrx.stats().buffers_outstanding, 0);
    client.write_all(b"!").await.unwrap();
    let mut rest = [0u8; 1];
    socket.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"!");
    socket.write_all(b"back").await.unwrap();
    let mut back = [0u8; 4];
    client.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"back");
    // Nothing holds it any more: it can be attached again.
    let (mut stream, _writer) = zcrx.attach(socket).unwrap();
    client.write_all(b"again").await.unwrap();
    assert_eq!(&stream.next().await.unwrap().unwrap()[..], b"again");
}

/// `incoming()` yields every connection (each read through `AsyncBufRead` and answered),
/// then, after shutdown, one `RuntimeGone` error and the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_yields_every_connection_then_ends_at_shutdown() {
    const CONNS: u64 = 8;
    const EACH: u64 = 200_000;
    let zcrx = copy_runtime(16, 16 << 10);
    let listener = ZcListener::bind(&zcrx, "127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let clients: Vec<_> = (0..CONNS)
        .map(|seed| {
            tokio::spawn(async move {
                let mut socket = TcpStream::connect(addr).await.unwrap();
                socket.write_all(&seed.to_le_bytes()).await.unwrap();
                socket.write_all(&bytes_of(seed, 0, EACH)).await.unwrap();
                socket.shutdown().await.unwrap();
                let mut reply = String::new();
                socket.read_to_string(&mut reply).await.unwrap();
                assert_eq!(reply, format!("{seed}: {EACH}"));
            })
        })
        .collect();
    let mut incoming = listener.incoming();
    let mut servers = Vec::new();
    for _ in 0..CONNS {
        let mut connection = incoming.next().await.unwrap().unwrap();
        assert_eq!(connection.local_addr().unwrap(), addr);
        servers.push(tokio::spawn(async move {
            let seed = connection.read_u64_le().await.unwrap();
            let mut position = 0;
            loop {
                let bytes = connection.fill_buf().await.unwrap();
                if bytes.is_empty() {
                    break;
                }
                assert!(bytes == &bytes_of(seed, position, position + bytes.len() as u64)[..]);
                let n = bytes.len();
                position += n as u64;
                connection.consume(n);
            }
            connection
                .write_all(format!("{seed}: {position}").as_bytes())
                .await
                .unwrap();
            connection.shutdown().await.unwrap();
        }));
    }
    for task in servers.into_iter().chain(clients) {
        task.await.unwrap();
    }
    zcrx.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(5), incoming.next())
        .await
        .expect("incoming() ends after shutdown");
    let err = end.expect("one error first").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
    let inner = err.into_inner().expect("a tokio_zcrx::Error inside");
    let kind = inner
        .downcast::<Error>()
        .expect("a tokio_zcrx::Error")
        .kind();
    assert_eq!(kind, ErrorKind::RuntimeGone);
    assert!(incoming.next().await.is_none());
}

/// What the stream's documentation promises: polled from another runtime, a copy-mode
/// stream and a write half work while the runtime they were attached in runs, and fail
/// with an error (not a hang) once it is gone.
#[test]
fn copy_mode_streams_need_the_runtime_they_were_attached_in() {
    let attached_in = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let other = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let zcrx = copy_runtime(4, 4096);
    let (mut stream, mut writer, mut client) =
        attached_in.block_on(attached(&zcrx, StreamOptions::new()));
    attached_in.block_on(client.write_all(b"one")).unwrap();
    let buf = other.block_on(stream.next()).unwrap().unwrap();
    assert_eq!(&buf[..], b"one");
    other.block_on(writer.write_all(b"reply")).unwrap();
    drop(attached_in);
    let next =
        other.block_on(async { tokio::time::timeout(Duration::from_secs(5), stream.next()).await });
    let err = next.expect("an error, not a hang").unwrap().unwrap_err();
    assert!(err.to_string().contains("shutdown"), "{err}");
    assert!(other.block_on(writer.write_all(b"more")).is_err());
}

/// `description()` names the copy pool as configured (the mapping is rounded up to whole
/// pages and used to be reported as more buffers).
#[test]
fn description_reports_the_copy_pool_as_configured() {
    let zcrx = copy_runtime(3, 100);
    assert_eq!(zcrx.description(), "copy mode (3 buffers of 100 bytes)");
    let zcrx = copy_runtime(64, 65536);
    assert_eq!(zcrx.description(), "copy mode (64 buffers of 65536 bytes)");
}

/// A `Stream` used with `futures` combinators needs nothing but `futures-core`'s trait.
#[tokio::test]
async fn streams_work_with_futures_combinators() {
    let zcrx = copy_runtime(4, 4096);
    let (stream, _writer, mut client) = attached(&zcrx, StreamOptions::new()).await;
    client.write_all(&bytes_of(5, 0, 20_000)).await.unwrap();
    drop(client);
    let total = stream
        .map(|buf| buf.unwrap().len())
        .fold(0, |sum, n| async move { sum + n })
        .await;
    assert_eq!(total, 20_000);
    until("every buffer is back", || {
        zcrx.stats().buffers_outstanding == 0
    })
    .await;
}

/// Copy mode: `send_buf` and `send_batch` write the bytes before they return, in order with
/// plain writes, and the statistics say they were plain writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_mode_sends_write_plainly_and_say_so() {
    const TOTAL: u64 = 4 << 20;
    let zcrx = copy_runtime(16, 16 << 10);
    let (mut from, _replies, mut client) = attached(&zcrx, StreamOptions::new()).await;
    let (_upstream_replies, mut to, mut upstream) = attached(&zcrx, StreamOptions::new()).await;
    let sender = tokio::spawn(async move {
        client.write_all(&bytes_of(5, 0, TOTAL)).await.unwrap();
        client.shutdown().await.unwrap();
        client
    });
    let receiver = tokio::spawn(async move {
        let mut all = Vec::new();
        upstream.read_to_end(&mut all).await.unwrap();
        all
    });
    to.write_all(b"header").await.unwrap();
    let mut batch = ZcBatch::with_capacity(8);
    let mut turn = 0;
    while from.recv_many(&mut batch, 8).await.unwrap() > 0 {
        turn += 1;
        if turn % 2 == 0 {
            to.send_batch(&mut batch).await.unwrap();
            assert!(batch.is_empty());
        } else {
            for buf in std::mem::take(&mut batch).into_vec() {
                to.send_buf(buf).await.unwrap();
            }
        }
    }
    to.shutdown().await.unwrap();
    drop(to);
    let received = receiver.await.unwrap();
    let _client = sender.await.unwrap();
    assert_eq!(&received[..6], b"header");
    assert!(
        received[6..] == bytes_of(5, 0, TOTAL)[..],
        "bytes lost or out of order"
    );
    let stats = zcrx.stats();
    assert_eq!(stats.send_plain_bytes, TOTAL, "{stats:?}");
    assert_eq!(
        stats.send_zero_copy_bytes + stats.send_kernel_copied_bytes,
        0
    );
    assert!(stats.sends > 0);
    assert_eq!(stats.sends_in_flight, 0);
    until("every buffer is back", || {
        zcrx.stats().buffers_outstanding == 0
    })
    .await;
}
