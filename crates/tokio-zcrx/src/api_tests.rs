//! The public API over the io_uring backend, on the host: the synthetic kernel
//! (`backend/uring/synthetic`) delivers patterned bytes into the area as a NIC queue would,
//! and the write halves are real loopback sockets. The copy-mode side of the same API is
//! tested in `tests/api.rs`.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Buf;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::backend::uring::synthetic::personality::{Personality, Registration};
use crate::backend::uring::synthetic::ring::{Control, Lengths, Path, StreamPlan};
use crate::backend::uring::synthetic::{pattern, start_with, SyntheticConfig};
use crate::{ReuniteError, ZcBatch, ZcConnection, ZcStream, ZcWriteHalf, Zcrx};

const CHUNK: u64 = 4096;

/// A synthetic NIC-mode runtime (Linux 7.3) and a listener for its connections.
struct Synthetic {
    zcrx: Zcrx,
    control: Arc<Control>,
    listener: TcpListener,
}

impl Synthetic {
    async fn start(area_chunks: u32) -> Synthetic {
        let config = SyntheticConfig {
            area_chunks,
            // These tests hold whole streams to read them as one: budgets off.
            stream_budget: Some(u64::MAX),
            ..SyntheticConfig::new(Personality::Linux7_3, Registration::Nic)
        };
        let (zcrx, control) = start_with(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Synthetic {
            zcrx,
            control,
            listener,
        }
    }

    /// A loopback connection attached with `plan`: stream, write half, client. With
    /// `small_send_buffer`, the server side sends through a 4 KiB buffer, so large writes
    /// are taken in parts.
    async fn connect(
        &self,
        plan: StreamPlan,
        small_send_buffer: bool,
    ) -> (ZcStream, ZcWriteHalf, TcpStream) {
        let client = TcpStream::connect(self.listener.local_addr().unwrap())
            .await
            .unwrap();
        let (socket, _) = self.listener.accept().await.unwrap();
        if small_send_buffer {
            set_send_buffer(&socket, 4096);
        }
        self.control.plan(socket.as_raw_fd(), plan);
        let (stream, writer) = self.zcrx.attach(socket).unwrap();
        (stream, writer, client)
    }

    /// Waits (bounded) until every buffer is back.
    async fn every_buffer_back(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.zcrx.stats().buffers_outstanding > 0 {
            assert!(Instant::now() < deadline, "buffers still out");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn set_send_buffer(socket: &impl AsRawFd, bytes: libc::c_int) {
    // SAFETY: a live descriptor; `bytes` outlives the call and its length is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// Checks `data` against stream `seed` at `*position` and moves the position on.
fn check(seed: u64, position: &mut u64, data: &[u8]) {
    if let Err(at) = pattern::verify(seed, *position, data) {
        panic!("stream {seed}: wrong byte at {at} (data from {position})");
    }
    *position += data.len() as u64;
}

/// `recv_many` takes what one reap delivered (many buffers at once), at most `limit`, into
/// the caller's batch, whose allocation `clear` keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_many_takes_what_has_arrived_into_one_allocation() {
    let h = Synthetic::start(256).await;
    let (mut stream, _writer, _client) = h.connect(StreamPlan::new(1, 400 * CHUNK), false).await;
    let mut batch = ZcBatch::with_capacity(64);
    let capacity = batch.capacity();
    let (mut position, mut calls, mut most) = (0, 0, 0);
    loop {
        let limit = if calls % 3 == 2 { 5 } else { 64 };
        let n = stream.recv_many(&mut batch, limit).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(n <= limit, "{n} > {limit}");
        assert_eq!(n, batch.len());
        most = most.max(n);
        calls += 1;
        for buf in &batch {
            check(1, &mut position, buf);
        }
        batch.clear();
        assert_eq!(batch.capacity(), capacity, "no reallocation");
    }
    assert_eq!(position, 400 * CHUNK);
    assert!(most > 1, "every call took a single buffer");
    assert!(calls < 400, "{calls} calls for 400 buffers");
    h.every_buffer_back().await;
    h.zcrx.shutdown().await;
}

/// A batch of buffers of varied lengths reads as one `Buf`, across every boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reads_as_one_buf_across_varied_buffers() {
    let h = Synthetic::start(128).await;
    let plan = StreamPlan {
        lengths: Lengths::Varied,
        ..StreamPlan::new(2, 60 * CHUNK)
    };
    let (mut stream, _writer, _client) = h.connect(plan, false).await;
    let mut batch = ZcBatch::new();
    while stream.recv_many(&mut batch, 64).await.unwrap() > 0 {}
    let total = batch.len_bytes();
    assert_eq!(
        total as u64,
        batch.iter().map(|b| b.len() as u64).sum::<u64>()
    );
    let mut slices = [std::io::IoSlice::new(&[]); 1024];
    assert_eq!(batch.chunks_vectored(&mut slices), batch.len());
    let mut position = 0;
    let mut step = 1;
    let mut scratch = vec![0u8; 3 * CHUNK as usize];
    while batch.has_remaining() {
        // Reads of 1 byte to 3 chunks, most across a buffer boundary.
        let n = step.min(batch.remaining());
        batch.copy_to_slice(&mut scratch[..n]);
        check(2, &mut position, &scratch[..n]);
        assert_eq!(batch.len_bytes(), total - position as usize);
        step = (step * 7 + 13) % (3 * CHUNK as usize) + 1;
    }
    assert_eq!(position as usize, total);
    assert!(batch.is_empty() && batch.chunk().is_empty());
    assert!(batch.into_vec().is_empty());
    h.every_buffer_back().await;
    h.zcrx.shutdown().await;
}

/// `fill_buf` hands out the bytes where the kernel put them: the area chunk of the buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_buf_hands_out_the_area_chunk_in_place() {
    let h = Synthetic::start(64).await;
    let (stream, _writer, _client) = h.connect(StreamPlan::new(3, 8 * CHUNK), false).await;
    let mut reader = stream.into_async_read();
    let mut position = 0;
    let bytes = reader.fill_buf().await.unwrap();
    let at = bytes.as_ptr();
    check(3, &mut position, &bytes[..100]);
    reader.consume(100);
    let (mut stream, unread) = reader.into_parts();
    let unread = unread.expect("the rest of the chunk");
    assert_eq!(
        unread.as_ptr(),
        at.wrapping_add(100),
        "the same chunk, moved on"
    );
    check(3, &mut position, &unread);
    drop(unread);
    while let Some(buf) = stream.next().await {
        check(3, &mut position, &buf.unwrap());
    }
    assert_eq!(position, 8 * CHUNK);
    h.zcrx.shutdown().await;
}

/// Batches echoed back with `write_all_buffers` over many connections (varied buffer
/// lengths, both kernel paths, a 4 KiB send buffer: most writes are partial): every byte
/// comes back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_echo_back_with_vectored_writes_over_many_connections() {
    const CONNS: u64 = 16;
    let h = Synthetic::start(512).await;
    let mut tasks = Vec::new();
    for i in 0..CONNS {
        let seed = 100 + i;
        let plan = StreamPlan {
            lengths: Lengths::Varied,
            path: if i % 2 == 0 {
                Path::ZeroCopy
            } else {
                Path::Copy
            },
            ..StreamPlan::new(seed, (40 + i) * CHUNK)
        };
        let bytes = plan.bytes;
        let (mut stream, mut writer, mut client) = h.connect(plan, true).await;
        tasks.push(tokio::spawn(async move {
            let mut batch = ZcBatch::with_capacity(32);
            let mut batches = 0u64;
            while stream.recv_many(&mut batch, 32).await.unwrap() > 0 {
                batches += 1;
                if batches % 2 == 0 {
                    // Start the vectored write inside the first buffer.
                    let head = batch.chunk().len().min(5);
                    writer.write_all(&batch.chunk()[..head]).await.unwrap();
                    batch.advance(head);
                }
                if i % 4 == 3 {
                    // Tokio's own vectored write of a Buf: chunks_vectored, then advance.
                    writer.write_all_buf(&mut batch).await.unwrap();
                    assert_eq!(batch.len_bytes(), 0);
                } else {
                    writer.write_all_buffers(&batch).await.unwrap();
                }
                batch.clear();
            }
            writer.shutdown().await.unwrap();
        }));
        tasks.push(tokio::spawn(async move {
            let mut echoed = Vec::new();
            client.read_to_end(&mut echoed).await.unwrap();
            assert_eq!(echoed.len() as u64, bytes, "stream {seed}");
            check(seed, &mut 0, &echoed);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    h.every_buffer_back().await;
    h.zcrx.shutdown().await;
}

/// In the io_uring modes the socket cannot be handed back: a typed error returns the
/// connection, which reads and writes on as before. Addresses and the reunite check work as
/// in copy mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_uring_connection_refuses_to_give_its_socket_back() {
    let h = Synthetic::start(64).await;
    let (stream, writer, mut client) = h.connect(StreamPlan::new(4, 10 * CHUNK), false).await;
    let (other_stream, other_writer, _other) = h.connect(StreamPlan::new(5, CHUNK), false).await;
    assert_eq!(stream.peer_addr().unwrap(), client.local_addr().unwrap());
    assert_eq!(stream.local_addr().unwrap(), client.peer_addr().unwrap());
    let ReuniteError(other_reader, writer) = ZcConnection::new(other_stream, writer).unwrap_err();
    let connection = ZcConnection::new(stream, writer).unwrap();
    let _other = ZcConnection::reunite(other_reader, other_writer).unwrap();

    let err = connection.into_tcp_stream().unwrap_err();
    assert!(err.to_string().contains("io_uring"), "{err}");
    let mut connection = err.into_connection();
    connection.write_all(b"still writes").await.unwrap();
    let mut reply = [0u8; 12];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"still writes");
    let mut received = Vec::new();
    connection.read_to_end(&mut received).await.unwrap();
    assert_eq!(received.len() as u64, 10 * CHUNK);
    check(4, &mut 0, &received);
    h.zcrx.shutdown().await;
}

/// What the stream's documentation promises for the io_uring modes: the stream needs no
/// Tokio runtime (the driver thread wakes it), so it reads on after the runtime it was
/// attached in is gone, polled by another executor.
#[test]
fn an_io_uring_stream_needs_no_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h = runtime.block_on(Synthetic::start(64));
    let (mut stream, writer, client) =
        runtime.block_on(h.connect(StreamPlan::new(6, 12 * CHUNK), false));
    drop(runtime);
    let mut position = 0;
    futures::executor::block_on(async {
        while let Some(buf) = stream.next().await {
            check(6, &mut position, &buf.unwrap());
        }
    });
    assert_eq!(position, 12 * CHUNK);
    drop((stream, writer, client));
    futures::executor::block_on(h.zcrx.shutdown());
}
