//! Zero-copy forwarding on a real zcrx kernel (issue 13): verified senders -> a forwarding
//! server (zero-copy receive, `ZcWriteHalf::send_buf` / `send_batch` to an upstream) -> an
//! upstream receiver that checks every byte.
//!
//! In NIC mode the senders and the upstream receiver live in the peer namespace, across the
//! netdevsim pair: the server receives zero-copy on the netdevsim queue (`copy_bytes == 0`)
//! and sends back out through netdevsim with `IORING_OP_SEND_ZC` from the registered area. In
//! NODEV mode everything runs over loopback. Several connections run at once: plain ones,
//! one whose sender resets mid-stream (the server forwards what came before the reset and
//! closes the upstream), and one that half-closes and then reads the server's reply.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_zcrx::{Stats, ZcBatch, Zcrx};
use tokio_zcrx_kernel_tests::support::{build, nic, nodev, runtime};
use tokio_zcrx_kernel_tests::{enter_netns, first_mismatch, pattern_byte, GuestNet};

/// Connections that run to their end.
const PLAIN: u64 = 3;
/// Bytes each plain (and the half-closing) connection carries.
const BYTES: u64 = 16 << 20;
/// Bytes the resetting sender sends before its reset.
const BEFORE_RESET: u64 = 2 << 20;
/// No forwarding run may take longer.
const BOUND: Duration = Duration::from_secs(120);

/// How a sender ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Shuts its sending direction down and reads until the server closes.
    Close,
    /// Sends part, then closes with `SO_LINGER` 0: a reset mid-stream.
    Reset,
    /// Shuts its sending direction down, then reads the server's reply ("N\n": bytes
    /// forwarded) on the still open direction.
    HalfClose,
}

/// Runs `during` in the namespace `netns` (if any), on a thread of its own.
fn in_netns<T: Send + 'static>(
    netns: Option<String>,
    during: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            enter_netns(&ns);
        }
        during()
    })
}

/// Sends `total` pattern bytes to `addr`, then ends as `ending` says. Returns the bytes it
/// sent and the server's reply (half-close only).
fn sender(addr: SocketAddr, total: u64, ending: Ending) -> (u64, String) {
    let mut stream = StdStream::connect(addr).expect("sender: connect");
    let mut buf = vec![0u8; 256 << 10];
    let mut sent = 0u64;
    let total = if ending == Ending::Reset {
        BEFORE_RESET
    } else {
        total
    };
    while sent < total {
        let n = (total - sent).min(buf.len() as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern_byte(sent + i as u64);
        }
        stream.write_all(&buf[..n]).expect("sender: write");
        sent += n as u64;
    }
    let mut reply = String::new();
    match ending {
        Ending::Reset => {
            // Let the bytes arrive, then reset while the server is still forwarding.
            std::thread::sleep(Duration::from_millis(200));
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: SO_LINGER reads one live `linger` of the size given.
            let set = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&stream),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(set, 0);
            drop(stream);
        }
        Ending::Close | Ending::HalfClose => {
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            stream
                .read_to_string(&mut reply)
                .expect("sender: read reply");
        }
    }
    (sent, reply)
}

/// The upstream receiver: accepts `connections`, reads each one's 8-byte id (written by the
/// server with a plain write before its sends) and then checks every byte to its end.
/// Reports (id, bytes) per connection.
fn upstream_receiver(listener: StdListener, connections: u64) -> Vec<(u64, u64)> {
    let (done, results) = mpsc::channel();
    for _ in 0..connections {
        let (mut socket, _) = listener.accept().expect("upstream: accept");
        let done = done.clone();
        std::thread::spawn(move || {
            let mut id = [0u8; 8];
            socket.read_exact(&mut id).expect("upstream: id");
            let id = u64::from_le_bytes(id);
            let mut buf = vec![0u8; 256 << 10];
            let mut position = 0u64;
            loop {
                let n = socket.read(&mut buf).expect("upstream: read");
                if n == 0 {
                    break;
                }
                if let Some(i) = first_mismatch(position, &buf[..n]) {
                    panic!(
                        "upstream: byte {} of connection {id} is wrong",
                        position + i as u64
                    );
                }
                position += n as u64;
            }
            done.send((id, position)).unwrap();
        });
    }
    drop(done);
    let mut all: Vec<(u64, u64)> = results.iter().collect();
    all.sort();
    all
}

/// What the server did with one connection.
#[derive(Debug)]
struct Forwarded {
    id: u64,
    bytes: u64,
    /// The source's end: `None` for EOF, else the error's kind.
    error: Option<std::io::ErrorKind>,
}

/// Forwards one accepted connection to a fresh upstream connection, alternating
/// `send_batch` and `send_buf`; replies "N\n" to the client after its EOF.
async fn forward(
    zcrx: Zcrx,
    socket: TcpStream,
    upstream: SocketAddr,
    id: u64,
) -> std::io::Result<Forwarded> {
    let (mut from_client, mut to_client) = zcrx.attach(socket)?;
    let upstream = TcpStream::connect(upstream).await?;
    let (_upstream_replies, mut to_upstream) = zcrx.attach(upstream)?;
    // A plain write, then sends: they stay in order.
    to_upstream.write_all(&id.to_le_bytes()).await?;
    let mut batch = ZcBatch::with_capacity(64);
    let (mut bytes, mut turn) = (0u64, 0u64);
    let error = loop {
        match from_client.recv_many(&mut batch, 64).await {
            Ok(0) => break None,
            Ok(_) => {
                bytes += batch.len_bytes() as u64;
                turn += 1;
                if turn % 2 == 0 {
                    to_upstream.send_batch(&mut batch).await?;
                } else {
                    for buf in std::mem::take(&mut batch).into_vec() {
                        to_upstream.send_buf(buf).await?;
                    }
                }
            }
            Err(e) => break Some(e.kind()),
        }
    };
    // Every send done (notifications included), then the upstream's EOF.
    to_upstream.shutdown().await?;
    if error.is_none() {
        to_client.write_all(format!("{bytes}\n").as_bytes()).await?;
        to_client.shutdown().await?;
    }
    Ok(Forwarded { id, bytes, error })
}

/// The whole scenario; returns the runtime's statistics at the end.
fn forwarding(zcrx: Zcrx, listen_ip: &str, upstream_ip: &str, netns: Option<String>) -> Stats {
    let endings: Vec<Ending> = (0..PLAIN)
        .map(|_| Ending::Close)
        .chain([Ending::Reset, Ending::HalfClose])
        .collect();
    let connections = endings.len() as u64;
    // The upstream receiver's listener, in the peer namespace if there is one.
    let upstream_ip = upstream_ip.to_string();
    let listener = in_netns(netns.clone(), move || {
        StdListener::bind((upstream_ip.as_str(), 0)).expect("upstream: bind")
    })
    .join()
    .unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let receiver = std::thread::spawn(move || upstream_receiver(listener, connections));
    let started = Instant::now();
    let stats = runtime().block_on(async {
        let listener = TcpListener::bind((listen_ip, 0)).await.unwrap();
        zcrx.prepare_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let server_zcrx = zcrx.clone();
        let server = tokio::spawn(async move {
            let mut handlers = Vec::new();
            for id in 0..connections {
                let (socket, _) = listener.accept().await.unwrap();
                handlers.push(tokio::spawn(forward(
                    server_zcrx.clone(),
                    socket,
                    upstream_addr,
                    id,
                )));
            }
            let mut forwarded = Vec::new();
            for handler in handlers {
                forwarded.push(handler.await.unwrap().expect("forwarding"));
            }
            forwarded
        });
        let senders: Vec<_> = endings
            .iter()
            .map(|&ending| in_netns(netns.clone(), move || (ending, sender(addr, BYTES, ending))))
            .collect();
        let forwarded = tokio::time::timeout(BOUND, server)
            .await
            .expect("forwarding took too long")
            .unwrap();
        let sent: Vec<(Ending, (u64, String))> = tokio::task::spawn_blocking(move || {
            senders.into_iter().map(|s| s.join().unwrap()).collect()
        })
        .await
        .unwrap();
        let upstream = tokio::task::spawn_blocking(move || receiver.join().unwrap())
            .await
            .unwrap();
        eprintln!("forwarded: {forwarded:?}\nupstream received: {upstream:?}");
        // Each connection: what the upstream checked is what the server forwarded.
        for f in &forwarded {
            let (_, received) = upstream[f.id as usize];
            assert_eq!(received, f.bytes, "connection {}", f.id);
        }
        let resets = forwarded.iter().filter(|f| f.error.is_some()).count();
        assert_eq!(resets, 1, "one sender reset: {forwarded:?}");
        for f in forwarded.iter().filter(|f| f.error.is_some()) {
            assert_eq!(f.error, Some(std::io::ErrorKind::ConnectionReset));
            assert!(f.bytes <= BEFORE_RESET);
        }
        let complete: u64 = forwarded
            .iter()
            .filter(|f| f.error.is_none())
            .map(|f| f.bytes)
            .sum();
        assert_eq!(
            complete,
            (connections - 1) * BYTES,
            "every complete byte forwarded"
        );
        for (ending, (bytes, reply)) in &sent {
            match ending {
                Ending::HalfClose => assert_eq!(reply, &format!("{bytes}\n")),
                Ending::Close => assert_eq!(reply, &format!("{bytes}\n")),
                Ending::Reset => {}
            }
        }
        // Every buffer back: no stream holds any, no send does.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = zcrx.stats();
            if stats.memory_held == 0 && stats.sends_in_flight == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "buffers still held: {stats:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stats = zcrx.stats();
        let forwarded_bytes: u64 = forwarded.iter().map(|f| f.bytes).sum();
        // Every forwarded byte went through a send: zero-copy, copied by the kernel, or
        // plain after a fallback.
        assert_eq!(
            stats.send_zero_copy_bytes + stats.send_kernel_copied_bytes + stats.send_plain_bytes,
            forwarded_bytes,
            "{stats:?}"
        );
        zcrx.shutdown().await;
        stats
    });
    eprintln!(
        "{} connections in {:?}: receive {stats}; sends: {} queued, {} bytes zero-copy, {} \
         bytes copied by the kernel, {} plain, {} fallbacks",
        connections,
        started.elapsed(),
        stats.sends,
        stats.send_zero_copy_bytes,
        stats.send_kernel_copied_bytes,
        stats.send_plain_bytes,
        stats.send_fallbacks
    );
    stats
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nic_forwarding_sends_received_buffers_without_copying() {
    let net = GuestNet::from_env();
    let stats = forwarding(
        build(nic(&net)),
        &net.nic_addr,
        &net.peer_addr,
        Some(net.peer_netns.clone()),
    );
    // The receive side: every byte zero-copy into the area.
    assert_eq!(
        stats.copy_bytes,
        Some(0),
        "zero-copy receive expected: {stats}"
    );
    // The send side: SEND_ZC from the registered area (no fallback: the registration and
    // every send were accepted). The notifications report every byte as copied: netdevsim
    // hands the skb to its peer in the same kernel, whose receive path copies zero-copy
    // frags before delivering to a socket (`skb_orphan_frags_rx` in
    // `__netif_receive_skb_core`, which marks the notification copied), as loopback does. A
    // NIC that transmits would read the area in place.
    assert_eq!(stats.send_fallbacks, 0, "{stats:?}");
    assert_eq!(stats.send_plain_bytes, 0, "{stats:?}");
    assert_eq!(stats.send_zero_copy_bytes, 0, "{stats:?}");
    assert_eq!(stats.send_kernel_copied_bytes, stats.bytes, "{stats:?}");
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_forwarding_over_loopback() {
    let stats = forwarding(build(nodev()), "127.0.0.1", "127.0.0.1", None);
    // NODEV copies every received byte; loopback makes the kernel copy every sent one
    // (the notification reports it).
    tokio_zcrx_kernel_tests::support::assert_all_copied(&stats, stats.bytes);
    assert_eq!(stats.send_fallbacks, 0, "{stats:?}");
    assert_eq!(stats.send_zero_copy_bytes, 0, "{stats:?}");
    assert_eq!(stats.send_plain_bytes, 0, "{stats:?}");
    assert_eq!(stats.send_kernel_copied_bytes, stats.bytes, "{stats:?}");
}
