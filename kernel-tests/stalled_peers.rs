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
/// Stalled peers that read again at the end, every byte checked.
const RESUMED: usize = 16;
/// The fresh client must be served within this.
const FRESH_BOUND: Duration = Duration::from_secs(10);
/// A resumed peer may wait this long for its next bytes: longer than TCP's longest
/// retransmission interval (`TCP_RTO_MAX`, 120 s). While its stream was paused, its
/// segments and the server's echoes met closed windows and full receive buffers for tens
/// of seconds (TCP drops in-window segments a full buffer cannot take: `TCPRcvQDrop`,
/// `RcvPruned`), so the sender that has to retransmit may have backed off its timer to
/// tens of seconds, and a window opening again does not make it retransmit sooner. In
/// the guest under host load (round trips of 0.05 to 0.6 s under TCG) waits of 17 to 35 s
/// were seen, the sender's `rto` at 25 to 63 s, every one ending with the timer. Only a
/// connection that stays stuck beyond every TCP timer is a failure of the runtime.
const RESUME_PROGRESS_BOUND: Duration = Duration::from_secs(130);
/// A resumed peer that waits longer than this for its next bytes logs where they are.
const RESUME_SLOW: Duration = Duration::from_secs(10);

/// A stalled peer: its socket and the pattern bytes it sent (from `base`).
struct Peer {
    socket: TcpStream,
    base: u64,
    sent: u64,
}

/// Where peer `index`'s pattern starts: far from every other peer's.
fn peer_base(index: usize) -> u64 {
    (index as u64 + 1) << 40
}

/// Connects `STALLED` peers (from `netns` if given), each sending its own pattern until its
/// socket takes no more, none ever reading. Returns them (kept open) once every peer is
/// blocked.
fn stall_peers(addr: SocketAddr, netns: Option<String>) -> Vec<Peer> {
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            enter_netns(&ns);
        }
        let mut payload = vec![0u8; 64 << 10];
        let mut peers: Vec<Peer> = (0..STALLED)
            .map(|_| {
                let socket = TcpStream::connect(addr).expect("stalled peer: connect");
                socket.set_nonblocking(true).unwrap();
                limit_buffer(&socket, libc::SO_RCVBUF);
                limit_buffer(&socket, libc::SO_SNDBUF);
                socket
            })
            .enumerate()
            .map(|(index, socket)| Peer {
                socket,
                base: peer_base(index),
                sent: 0,
            })
            .collect();
        // Send until every socket has been full for several rounds in a row: the server
        // reads no more from any of them (its handler is stuck in the echo's write_all).
        let mut quiet_rounds = 0;
        while quiet_rounds < 20 {
            let mut sent = 0usize;
            for peer in &mut peers {
                loop {
                    for (i, byte) in payload.iter_mut().enumerate() {
                        *byte = pattern_byte(peer.base + peer.sent + i as u64);
                    }
                    match peer.socket.write(&payload) {
                        Ok(n) => {
                            sent += n;
                            peer.sent += n as u64;
                        }
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

/// Keeps a socket buffer small (`SO_RCVBUF` or `SO_SNDBUF`): a stalled peer's receive and
/// send buffers, the server's send buffer to one. The peers never read: with autotuning each
/// would take up to `tcp_rmem`'s maximum of the server's echoes (and the server's send
/// buffers as much again), and hundreds of those reach the guest's TCP memory limit
/// (`net.ipv4.tcp_mem`), which slows every connection on the machine, the fresh client's
/// too, whatever the server does: plain Tokio would suffer the same.
fn limit_buffer(socket: &impl std::os::fd::AsRawFd, option: libc::c_int) {
    let bytes: libc::c_int = 64 << 10;
    // SAFETY: `bytes` lives through the call and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({option}): {}",
        std::io::Error::last_os_error()
    );
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

/// The receive queues of the TCP sockets on local `port` in this network namespace, as
/// `/proc/net/tcp` has them: how many, the bytes queued in all, the most in one. In NIC
/// mode those bytes sit in the area's chunks (about one per segment).
fn receive_queues(port: u16) -> (usize, u64, u64) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut found = (0, 0, 0);
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields[1].rsplit(':').next().unwrap();
        if u16::from_str_radix(local_port, 16) != Ok(port) || fields[3] != "01" {
            continue; // another port, or not ESTABLISHED (the listener)
        }
        let rx_queue = u64::from_str_radix(fields[4].rsplit(':').next().unwrap(), 16).unwrap();
        found = (found.0 + 1, found.1 + rx_queue, found.2.max(rx_queue));
    }
    found
}

/// The zcrx NIC's `rx_dropped` (netdevsim counts a packet the zcrx page pool had no buffer
/// for there), for the log.
fn nic_rx_dropped() -> String {
    let nic = GuestNet::from_env().nic;
    std::fs::read_to_string(format!("/sys/class/net/{nic}/statistics/rx_dropped"))
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|error| format!("unreadable ({error})"))
}

/// Peers that read again get every byte they sent back, in order: their paused streams
/// resumed (in NIC mode with the receive buffer a stall took given back) and lost nothing.
/// Each must make progress within [`RESUME_PROGRESS_BOUND`] (TCP's own timers); a wait
/// beyond [`RESUME_SLOW`] is logged with both ends' TCP state.
fn resume_and_verify(peers: Vec<Peer>, netns: Option<String>) {
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            enter_netns(&ns);
        }
        for Peer { socket, base, sent } in peers {
            let started = Instant::now();
            let mut socket = socket;
            socket.set_nonblocking(false).unwrap();
            socket.set_read_timeout(Some(RESUME_SLOW)).unwrap();
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0u64;
            let mut progress = Instant::now();
            while got < sent {
                let want = buf.len().min((sent - got) as usize);
                let n = match socket.read(&mut buf[..want]) {
                    Ok(0) => panic!("resumed peer: EOF after {got} of {sent} bytes"),
                    Ok(n) => n,
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                            && progress.elapsed() < RESUME_PROGRESS_BOUND =>
                    {
                        eprintln!(
                            "resumed peer: {got} of {sent} bytes back, nothing for {:?}; \
                             {}",
                            progress.elapsed(),
                            tcp_state(&socket)
                        );
                        continue;
                    }
                    Err(e) => panic!(
                        "resumed peer: {got} of {sent} bytes back, nothing for {:?}: {e}; {}",
                        progress.elapsed(),
                        tcp_state(&socket)
                    ),
                };
                progress = Instant::now();
                assert_eq!(
                    first_mismatch(base + got, &buf[..n]),
                    None,
                    "resumed peer at {got}"
                );
                got += n as u64;
            }
            eprintln!("resumed peer: {sent} bytes back in {:?}", started.elapsed());
        }
    })
    .join()
    .unwrap();
}

/// Both ends of a peer's connection as TCP sees them, for the log: the peer's `TCP_INFO`
/// (called in the peer's namespace) and the server socket's line of `/proc/net/tcp` in the
/// root namespace (`/proc/1/net`: pid 1 never leaves it), whose `tr` 01 is a retransmission
/// timer and 04 a zero-window probe, `rto` in hundredths of a second.
fn tcp_state(socket: &TcpStream) -> String {
    use std::os::fd::AsRawFd;
    let mut raw = [0u8; 104];
    let mut len = raw.len() as libc::socklen_t;
    // SAFETY: `raw` and `len` live through the call, and `len` is `raw`'s size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            raw.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let peer = if rc == 0 && len as usize >= raw.len() {
        // struct tcp_info: u8 state, ca_state, retransmits, probes, backoff at 0..5; u32
        // rto at 8, unacked 24, lost 32, retrans 36, last_data_sent 44, total_retrans 100.
        let at = |offset: usize| u32::from_ne_bytes(raw[offset..offset + 4].try_into().unwrap());
        format!(
            "peer: ca_state {} backoff {} rto {} ms unacked {} lost {} retrans {} \
             last_data_sent {} ms total_retrans {}",
            raw[1],
            raw[4],
            at(8) / 1000,
            at(24),
            at(32),
            at(36),
            at(44),
            at(100)
        )
    } else {
        format!("peer: TCP_INFO: {}", std::io::Error::last_os_error())
    };
    let (local, remote) = (
        socket.local_addr().unwrap().port(),
        socket.peer_addr().unwrap().port(),
    );
    let table = std::fs::read_to_string("/proc/1/net/tcp").unwrap_or_default();
    let server = table
        .lines()
        .skip(1)
        .find(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = |field: &str| {
                u16::from_str_radix(field.rsplit(':').next().unwrap_or(""), 16).unwrap_or(0)
            };
            fields.len() > 2 && port(fields[1]) == remote && port(fields[2]) == local
        })
        .map_or("not found".to_owned(), |line| line.trim().to_owned());
    format!("{peer}; server socket: {server}")
}

/// The echo handler: it holds each buffer across the write of its echo, as the echo
/// example does, until the stream ends or the peer goes away.
async fn echo(mut stream: tokio_zcrx::ZcStream, mut writer: tokio_zcrx::ZcWriteHalf) {
    while let Some(Ok(buf)) = stream.next().await {
        if writer.write_all(&buf).await.is_err() {
            break;
        }
    }
}

fn stalled_peers_do_not_stop_a_fresh_client(zcrx: Zcrx, listen_ip: &str, netns: Option<String>) {
    runtime().block_on(async {
        let listener = TcpListener::bind((listen_ip, 0)).await.unwrap();
        zcrx.prepare_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let server_zcrx = zcrx.clone();
        // The echo server: each handler holds its buffer across the write of its echo.
        let server = tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                // A small send buffer, so that a handler stalls after a few echoes: the
                // echoes of 300 peers that never read would otherwise fill the guest's TCP
                // memory (see `limit_buffer`).
                limit_buffer(&socket, libc::SO_SNDBUF);
                let (stream, writer) = server_zcrx.attach(socket).unwrap();
                tokio::spawn(echo(stream, writer));
            }
        });
        let peers = tokio::task::spawn_blocking({
            let netns = netns.clone();
            move || stall_peers(addr, netns)
        })
        .await
        .unwrap();
        let stalled: Stats = zcrx.stats();
        let (sockets, queued, most) = receive_queues(addr.port());
        eprintln!(
            "with {STALLED} stalled peers: {stalled}; {} of {} bytes held; {sockets} sockets \
             have {queued} bytes queued in the kernel (at most {most})",
            stalled.memory_held, stalled.memory_capacity
        );
        let netns_for_resume = netns.clone();
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
        // Most peers go away with data unread (resets for paused streams); the first ones
        // read again and get all they sent back.
        let mut peers = peers;
        let resumed: Vec<Peer> = peers.drain(..RESUMED).collect();
        let total: u64 = resumed.iter().map(|p| p.sent).sum();
        drop(peers);
        let nic_mode = netns_for_resume.is_some();
        let netns_again = netns_for_resume;
        let resume = tokio::task::spawn_blocking(move || resume_and_verify(resumed, netns_again));
        tokio::pin!(resume);
        // While the peers read, the runtime's stats and the NIC's drops every two seconds:
        // if a resumed peer stalls, the log shows where the bytes stopped.
        let mut ticks = tokio::time::interval(Duration::from_secs(2));
        ticks.tick().await;
        let resumed_result = loop {
            tokio::select! {
                joined = &mut resume => break joined,
                _ = ticks.tick() => eprintln!(
                    "resuming: {:?}; NIC rx_dropped {}",
                    zcrx.stats(),
                    if nic_mode { nic_rx_dropped() } else { "n/a".to_owned() }
                ),
            }
        };
        resumed_result.unwrap();
        eprintln!("{RESUMED} resumed peers got all {total} bytes they sent back");
        // Every buffer comes back once the streams end.
        let deadline = Instant::now() + FRESH_BOUND;
        while zcrx.stats().memory_held > 0 {
            assert!(
                Instant::now() < deadline,
                "buffers still held: {}",
                zcrx.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

/// A stream whose budget is two chunks (the smallest a derived budget gets) still echoes at
/// the pace of its pause-and-resume cycle: no cycle waits for a timer.
fn small_budget_echo(zcrx: Zcrx, listen_ip: &str, netns: Option<String>) {
    runtime().block_on(async {
        let listener = TcpListener::bind((listen_ip, 0)).await.unwrap();
        zcrx.prepare_listener(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let server_zcrx = zcrx.clone();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let options = tokio_zcrx::StreamOptions::new().budget(8192);
            let (stream, writer) = server_zcrx.attach_with(socket, options).unwrap();
            echo(stream, writer).await;
        });
        let took = tokio::task::spawn_blocking(move || fresh_client(addr, netns))
            .await
            .unwrap();
        let stats = zcrx.stats();
        eprintln!(
            "1 MiB echoed at a two-chunk budget in {took:?}: {stats}, {} pauses",
            stats.stream_pauses
        );
        server.abort();
        zcrx.shutdown().await;
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_small_budget_echo() {
    small_budget_echo(
        build(
            Zcrx::builder()
                .no_device()
                .events(EventsPolicy::IfSupported),
        ),
        "127.0.0.1",
        None,
    );
}
