//! What the guest tests of the runtime share: a Tokio runtime, building a zcrx runtime
//! while the previous test's instance is still being torn down, and accepting a stream.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_zcrx::{ZcStream, Zcrx};

/// A two-worker Tokio runtime, like a small server's.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Reads a stream to its end, checking every byte against the pattern from `position`;
/// returns where it ended.
pub async fn read_verified_from(mut stream: ZcStream, mut position: u64) -> u64 {
    use futures::StreamExt;
    while let Some(buf) = stream.next().await {
        let buf = buf.expect("stream error");
        if let Some(i) = crate::first_mismatch(position, &buf) {
            panic!("byte {} of the stream is wrong", position + i as u64);
        }
        position += buf.len() as u64;
    }
    position
}

/// Reads a stream to its end, checking every byte; returns the byte count.
pub async fn read_verified(stream: ZcStream) -> u64 {
    read_verified_from(stream, 0).await
}

/// A builder for the guest's zcrx-capable NIC queue (rx queue 0), events required.
pub fn nic(net: &crate::GuestNet) -> tokio_zcrx::Builder {
    Zcrx::builder()
        .mode(tokio_zcrx::Mode::Nic)
        .interface(&net.nic, 0)
        .events(tokio_zcrx::EventsPolicy::Required)
}

/// A builder for NODEV mode, events required.
pub fn nodev() -> tokio_zcrx::Builder {
    Zcrx::builder()
        .no_device()
        .events(tokio_zcrx::EventsPolicy::Required)
}

/// Builds a runtime, retrying for up to 5 s while the previous test's instance is still
/// being torn down by the kernel (ring teardown is asynchronous).
pub fn build(builder: tokio_zcrx::Builder) -> Zcrx {
    let mut last = None;
    for _ in 0..50 {
        match builder.clone().build() {
            Ok(zcrx) => return zcrx,
            Err(e) if e.kind() == tokio_zcrx::ErrorKind::QueueBusy => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("building the runtime: {e}"),
        }
    }
    panic!("queue still busy after 5 s: {last:?}")
}

/// Accepts one connection on `listener` and returns its stream (the write half dropped).
pub async fn accept(zcrx: &Zcrx, listener: &TcpListener) -> ZcStream {
    let (socket, _) = listener.accept().await.unwrap();
    zcrx.attach(socket).unwrap().0
}

/// The guest kernel's version (major, minor), from /proc/sys/kernel/osrelease: what a test
/// asserts per kernel (a feature present, or refused), never a reason to skip.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("read /proc/sys/kernel/osrelease");
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>());
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
        _ => panic!("cannot read a version from kernel release {release:?}"),
    }
}

/// Packets the interface `name` dropped on receive (`rx_dropped`; the test netdevsim counts
/// a packet it found no free chunk for there, as a NIC with an empty fill ring drops it).
pub fn rx_dropped(name: &str) -> u64 {
    let path = format!("/sys/class/net/{name}/statistics/rx_dropped");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}
