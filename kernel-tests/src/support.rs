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

/// Sets the guest's reserved 2 MiB huge pages (`vm.nr_hugepages`) to `pages` and waits (up
/// to 20 s) until the pool holds exactly that many, all free: the pages of a runtime that has
/// just shut down stay pinned until the kernel has torn its zcrx instance down, which is
/// asynchronous. Returns the pool's size then (fewer if memory is short, more if pages stayed
/// pinned).
pub fn reserve_huge_pages(pages: u64) -> u64 {
    let pool = |name: &str| -> u64 {
        let path = format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}"))
            .trim()
            .parse()
            .expect("a number of huge pages")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Written again each time: pages that were in use when it shrank are freed later.
        std::fs::write("/proc/sys/vm/nr_hugepages", format!("{pages}\n"))
            .expect("writing /proc/sys/vm/nr_hugepages");
        let (total, free) = (pool("nr_hugepages"), pool("free_hugepages"));
        if (total == pages && free == pages) || std::time::Instant::now() > deadline {
            return total;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `value` to a sysfs or procfs file and writes the old value back when dropped, so a
/// test that changes a kernel setting restores it even when it fails.
#[derive(Debug)]
pub struct KernelSetting {
    path: &'static str,
    old: String,
}

impl KernelSetting {
    pub fn set(path: &'static str, value: &str) -> KernelSetting {
        let old = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {value} to {path}: {e}"));
        KernelSetting { path, old }
    }
}

impl Drop for KernelSetting {
    fn drop(&mut self) {
        // The THP policy file reads `always [madvise] never`: write back the chosen word.
        let old = match self
            .old
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        {
            Some(chosen) => chosen.to_string(),
            None => self.old.trim().to_string(),
        };
        if let Err(e) = std::fs::write(self.path, &old) {
            eprintln!("could not restore {} to {old}: {e}", self.path);
        }
    }
}

/// Builds a runtime that is expected to fail, retrying for up to 5 s while the previous
/// test's instance is still being torn down; returns the error.
pub fn build_error(builder: tokio_zcrx::Builder) -> tokio_zcrx::Error {
    for _ in 0..50 {
        match builder.clone().build() {
            Ok(zcrx) => panic!("built in {} mode, expected an error", zcrx.mode()),
            Err(e) if e.kind() == tokio_zcrx::ErrorKind::QueueBusy => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return e,
        }
    }
    panic!("queue still busy after 5 s")
}
