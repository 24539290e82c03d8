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

/// The peer's port in its namespace (vm/guest/init: nsim1 in nsb).
const PEER_NIC: &str = "nsim1";

/// Runs `script` with `sh -c` in the peer's network namespace (where its sysfs shows nsim1)
/// and returns its standard output, or what went wrong.
fn in_peer_namespace(net: &crate::GuestNet, script: &str) -> Result<String, String> {
    let netns = std::path::Path::new(&net.peer_netns)
        .file_name()
        .and_then(|name| name.to_str())
        .expect("TZX_PEER_NETNS names a namespace under /run/netns");
    let output = std::process::Command::new("/usr/sbin/ip")
        .args(["netns", "exec", netns, "sh", "-c", script])
        .output()
        .map_err(|e| format!("run ip netns exec: {e}"))?;
    if !output.status.success() {
        return Err(format!("`{script}` in {netns} failed: {output:?}"));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// While alive, the peer chooses each connection's tx queue by its flow hash, so flows
/// spread over all of nsim0's receive queues (netdevsim delivers to the rx queue numbered like
/// the sender's tx queue). The guest's default (vm/guest/init) sends every flow through tx
/// queue 0, so onto rx queue 0; dropping this restores it. A flow keeps its hash, and so its
/// queue, for its life (TCP rehashes only after timeouts).
#[derive(Debug)]
#[must_use = "flows spread only while the guard lives"]
pub struct SpreadFlows {
    net: crate::GuestNet,
    saved_mask: String,
}

impl SpreadFlows {
    /// Clears the peer's XPS map (`xps_cpus` of every tx queue to 0).
    pub fn new(net: &crate::GuestNet) -> SpreadFlows {
        let queues = format!("/sys/class/net/{PEER_NIC}/queues");
        let saved_mask = in_peer_namespace(net, &format!("cat {queues}/tx-0/xps_cpus")).unwrap();
        in_peer_namespace(
            net,
            &format!("for q in {queues}/tx-*; do echo 0 > $q/xps_cpus || exit 1; done"),
        )
        .unwrap();
        SpreadFlows {
            net: net.clone(),
            saved_mask,
        }
    }
}

impl Drop for SpreadFlows {
    fn drop(&mut self) {
        let queues = format!("/sys/class/net/{PEER_NIC}/queues");
        let restored = in_peer_namespace(
            &self.net,
            &format!("echo {} > {queues}/tx-0/xps_cpus", self.saved_mask),
        );
        // A panic here, while a failed test unwinds, would abort the whole binary.
        if let Err(e) = restored {
            eprintln!("could not restore the peer's XPS map (later tests may see flows on other queues): {e}");
        }
    }
}
