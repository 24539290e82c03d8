//! The stalled-peer scenario on a real zcrx kernel (issue 10), in NIC and NODEV modes:
//! many write-back peers that send and never read their replies, served by an echo handler
//! that holds each buffer across the `write_all` of its echo (as the echo example does),
//! must not stop a fresh client from being served. Per-stream budgets (on by default) pause
//! the stalled streams, whose backlog waits in their sockets, so the area never runs out.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_zcrx::{EventsPolicy, Mode, Stats, Zcrx};
use tokio_zcrx_kernel_tests::support::{build, runtime};
use tokio_zcrx_kernel_tests::{enter_netns, first_mismatch, pattern_byte, GuestNet};

/// Stalled peers: more than any default gives room for (a derived budget never drops below
/// two chunks, and 300 streams at their ceiling would need far more than any default area).
const STALLED: usize = 300;
/// The fresh client's bytes, echoed back and verified.
const FRESH_BYTES: usize = 1 << 20;
/// The fresh client must be served within this.
const FRESH_BOUND: Duration = Duration::from_secs(10);

/// Connects `STALLED` peers (from `netns` if given), each sending until its socket takes no
/// more, none ever reading. Returns the sockets (kept open) once every peer is blocked.
fn stall_peers(addr: SocketAddr, netns: Option<String>) -> Vec<TcpStream> {
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            enter_netns(&ns);
        }
        let payload = vec![0x5au8; 64 << 10];
        let mut peers: Vec<TcpStream> = (0..STALLED)
            .map(|_| {
                let socket = TcpStream::connect(addr).expect("stalled peer: connect");
                socket.set_nonblocking(true).unwrap();
                socket
            })
            .collect();
        // Send until every socket has been full for several rounds in a row: the server
        // reads no more from any of them (its handler is stuck in the echo's write_all).
        let mut quiet_rounds = 0;
        while quiet_rounds < 20 {
            let mut sent = 0usize;
            for peer in &mut peers {
                loop {
                    match peer.write(&payload) {
                        Ok(n) => sent += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("stalled peer: write: {e}"),
                    }
                }
            }
            quiet_rounds = if sent == 0 { quiet_rounds + 1 } else { 0 };
            std::thread::sleep(Duration::from_millis(50));
        }
        peers
    })
    .join()
    .unwrap()
}

/// A client that sends `FRESH_BYTES` pattern bytes and reads its echo, verifying every
/// byte; returns how long it took.
fn fresh_client(addr: SocketAddr, netns: Option<String>) -> Duration {
    std::thread::spawn(move || {
        if let Some(ns) = netns.clone() {
            enter_netns(&ns);
        }
        let started = Instant::now();
        let mut socket = TcpStream::connect(addr).expect("fresh client: connect");
        socket.set_read_timeout(Some(FRESH_BOUND)).unwrap();
        let mut writer = socket.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let payload: Vec<u8> = (0..FRESH_BYTES as u64).map(pattern_byte).collect();
            writer.write_all(&payload).expect("fresh client: write");
        });
        let mut echoed = vec![0u8; FRESH_BYTES];
        let mut position = 0;
        while position < FRESH_BYTES {
            match socket.read(&mut echoed[position..]) {
                Ok(0) => panic!("fresh client: EOF after {position} bytes"),
                Ok(n) => position += n,
                Err(e) => panic!(
                    "fresh client: no echo within {FRESH_BOUND:?} ({position} of \
                     {FRESH_BYTES} bytes back): {e}"
                ),
            }
        }
        sender.join().unwrap();
        assert_eq!(first_mismatch(0, &echoed), None, "fresh client: wrong echo");
        started.elapsed()
    })
    .join()
    .unwrap()
}

fn stalled_peers_do_not_stop_a_fresh_client(zcrx: Zcrx, listen_ip: &str, netns: Option<String>) {
    runtime().block_on(async {
        let listener = TcpListener::bind((listen_ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_zcrx = zcrx.clone();
        // The echo server: each handler holds its buffer across the write of its echo.
        let server = tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let (mut stream, mut writer) = server_zcrx.attach(socket).unwrap();
                tokio::spawn(async move {
                    while let Some(Ok(buf)) = stream.next().await {
                        if writer.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let peers = tokio::task::spawn_blocking({
            let netns = netns.clone();
            move || stall_peers(addr, netns)
        })
        .await
        .unwrap();
        let stalled: Stats = zcrx.stats();
        eprintln!("with {STALLED} stalled peers: {stalled}");
        let took = tokio::task::spawn_blocking(move || fresh_client(addr, netns))
            .await
            .unwrap();
        let stats = zcrx.stats();
        eprintln!("fresh client served in {took:?}; {stats}");
        assert!(took < FRESH_BOUND);
        assert!(stalled.streams_paused > 0, "{stalled}");
        assert!(stats.streams_paused > 0, "{stats}");
        assert!(stalled.memory_held < stalled.memory_capacity, "{stalled}");
        assert!(stats.memory_held < stats.memory_capacity, "{stats}");
        drop(peers);
        server.abort();
        zcrx.shutdown().await;
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_stalled_peers_do_not_stop_a_fresh_client() {
    stalled_peers_do_not_stop_a_fresh_client(
        build(
            Zcrx::builder()
                .no_device()
                .events(EventsPolicy::IfSupported),
        ),
        "127.0.0.1",
        None,
    );
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nic_stalled_peers_do_not_stop_a_fresh_client() {
    let net = GuestNet::from_env();
    let zcrx = build(
        Zcrx::builder()
            .mode(Mode::Nic)
            .interface(&net.nic, 0)
            .events(EventsPolicy::IfSupported),
    );
    stalled_peers_do_not_stop_a_fresh_client(zcrx, &net.nic_addr, Some(net.peer_netns.clone()));
}
