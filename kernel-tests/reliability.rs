//! Real-kernel regression tests of the reliability fixes, in the QEMU guest: resources of
//! finished connections are released at once (defect L), and streams end with the errno the
//! kernel gave (defect R). `cargo xtask soak` drives the long-running version.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_zcrx::{EventsPolicy, Mode, ZcStream, Zcrx};
use tokio_zcrx_kernel_tests::support::{build, runtime};
use tokio_zcrx_kernel_tests::{
    enter_netns, first_mismatch, pattern_byte, reset_on_close, GuestNet,
};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Connects `count` times to `addr` one after the other (from `netns` if given), sends
/// `size` pattern bytes on each and closes it, with a reset (SO_LINGER 0) every `reset_every`th.
fn spawn_clients(
    addr: SocketAddr,
    count: usize,
    size: usize,
    reset_every: usize,
    netns: Option<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            enter_netns(&ns);
        }
        let payload: Vec<u8> = (0..size as u64).map(pattern_byte).collect();
        for i in 0..count {
            let mut socket = std::net::TcpStream::connect(addr).expect("client: connect");
            socket.write_all(&payload).expect("client: write");
            if reset_every > 0 && i % reset_every == reset_every - 1 {
                reset_on_close(&socket);
            }
            drop(socket);
        }
    })
}

/// Serves `count` connections: each stream is read to its end (verified) or, for every
/// fifth, dropped after its first buffer; everything is dropped before the next accept.
async fn serve(zcrx: &Zcrx, listener: &TcpListener, count: usize, size: usize) -> (u64, u64) {
    let (mut verified, mut errors) = (0u64, 0u64);
    for i in 0..count {
        let (socket, _) = listener.accept().await.unwrap();
        let (mut stream, writer) = zcrx.attach(socket).unwrap();
        let mut position = 0u64;
        while let Some(item) = stream.next().await {
            match item {
                Ok(buf) => {
                    assert_eq!(first_mismatch(position, &buf), None, "connection {i}");
                    position += buf.len() as u64;
                    if i % 5 == 4 {
                        break; // dropped mid-flight
                    }
                }
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
        }
        assert!(position <= size as u64);
        verified += position;
        drop(stream);
        drop(writer);
    }
    (verified, errors)
}

/// Waits (bounded) until the open fd count is back to `expected`, which the driver reaches
/// once it has handled the streams' close commands.
async fn settle_fds(expected: usize) -> usize {
    let mut now = open_fds();
    for _ in 0..100 {
        if now <= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = open_fds();
    }
    now
}

fn churn(zcrx: Zcrx, listen_ip: &str, netns: Option<String>) {
    const CONNECTIONS: usize = 300;
    const SIZE: usize = 20_000;
    runtime().block_on(async {
        let listener = TcpListener::bind((listen_ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Warm up with a few connections, so lazily created descriptors exist already.
        let clients = spawn_clients(addr, 5, SIZE, 0, netns.clone());
        serve(&zcrx, &listener, 5, SIZE).await;
        clients.join().unwrap();
        let before = settle_fds(0).await;
        let clients = spawn_clients(addr, CONNECTIONS, SIZE, 7, netns);
        let (verified, _errors) = serve(&zcrx, &listener, CONNECTIONS, SIZE).await;
        clients.join().unwrap();
        let after = settle_fds(before).await;
        assert!(
            verified > (CONNECTIONS * SIZE / 2) as u64,
            "verified {verified}"
        );
        assert_eq!(
            after, before,
            "open fds grew from {before} to {after} over {CONNECTIONS} finished connections"
        );
        let stats = zcrx.stats();
        zcrx.shutdown().await;
        assert_eq!(stats.buffers_outstanding, 0, "{stats}");
    });
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_finished_connections_release_their_fds() {
    churn(
        build(Zcrx::builder().no_device().events(EventsPolicy::Required)),
        "127.0.0.1",
        None,
    );
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nic_finished_connections_release_their_fds() {
    let net = GuestNet::from_env();
    let zcrx = build(
        Zcrx::builder()
            .mode(Mode::Nic)
            .interface(&net.nic, 0)
            .events(EventsPolicy::Required),
    );
    churn(zcrx, &net.nic_addr, Some(net.peer_netns.clone()));
}

/// Reads until the stream fails, returning the error.
async fn error_of(mut stream: ZcStream) -> std::io::Error {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return e,
            Ok(None) => panic!("the stream ended without the reset"),
            Err(_) => panic!("no error 10 s after the reset"),
        }
    }
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_reset_keeps_the_kernels_errno() {
    runtime().block_on(async {
        let zcrx = build(Zcrx::builder().no_device().events(EventsPolicy::Required));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut socket = std::net::TcpStream::connect(addr).unwrap();
            socket.write_all(&[1; 1000]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            reset_on_close(&socket);
        });
        let (socket, _) = listener.accept().await.unwrap();
        let (stream, _writer) = zcrx.attach(socket).unwrap();
        client.join().unwrap();
        let error = error_of(stream).await;
        assert_eq!(
            error.raw_os_error(),
            Some(libc::ECONNRESET),
            "the stream's error lost the kernel's errno: {error:?}"
        );
        zcrx.shutdown().await;
    });
}

/// A child made by fork() that never execs must not keep the queue bound: the ring's
/// descriptor is closed in the child and its memory (rings, area) is not inherited.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn a_forked_child_does_not_keep_the_queue_bound() {
    let net = GuestNet::from_env();
    let builder = Zcrx::builder()
        .mode(Mode::Nic)
        .interface(&net.nic, 0)
        .events(EventsPolicy::Required);
    let zcrx = build(builder.clone());
    // SAFETY: the child only sleeps and exits; it touches no state of the parent's threads.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        // SAFETY: sleep and _exit are async-signal-safe.
        unsafe {
            libc::sleep(60);
            libc::_exit(0);
        }
    }
    runtime().block_on(zcrx.shutdown());
    drop(zcrx);
    // With the child alive, the queue must be free again within the kernel's teardown time.
    let mut rebuilt = None;
    for _ in 0..50 {
        match builder.clone().build() {
            Ok(zcrx) => {
                rebuilt = Some(zcrx);
                break;
            }
            Err(e) if e.kind() == tokio_zcrx::ErrorKind::QueueBusy => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("rebuilding: {e}"),
        }
    }
    // SAFETY: ends and reaps our own child.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    let rebuilt = rebuilt.expect("the queue stayed bound while the forked child lived");
    runtime().block_on(rebuilt.shutdown());
}
