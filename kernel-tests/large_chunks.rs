//! Large chunks (`rx_buf_len` > page, Linux 7.0+) on the netdevsim pair, whose test-only
//! patch advertises rx page sizes (`QCFG_RX_PAGE_SIZE`) and splits each packet's payload at
//! the chunk size, like a NIC with rx-buf-len set.
//!
//! The area of large chunks is backed by 2 MiB huge pages: reserved ones (the tests set
//! `vm.nr_hugepages` themselves) or transparent ones. Each test checks every byte, that the
//! kernel copied none, and that every buffer came back.

use std::net::SocketAddr;
use std::time::Instant;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_zcrx::{ErrorKind, HugePages, Stats, ZcStream, Zcrx};
use tokio_zcrx_kernel_tests::support::{
    build, build_error, nic, reserve_huge_pages, runtime, KernelSetting,
};
use tokio_zcrx_kernel_tests::{first_mismatch, spawn_sender, GuestNet};

/// Connections per run, each with its own pattern stream.
const CONNECTIONS: u64 = 4;
/// Bytes per connection.
const PER_CONNECTION: u64 = 8 << 20;
/// The receive area: 8 huge pages.
const AREA: usize = 16 << 20;
/// The netdevsim module parameter that turns the rx page size advertisement off.
const RX_PAGE_SIZE_PARAM: &str = "/sys/module/netdevsim/parameters/rx_page_size";
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// Reads a stream to its end, checking every byte; returns the bytes and the largest buffer.
async fn read_verified_sizes(mut stream: ZcStream) -> (u64, usize) {
    let (mut position, mut largest) = (0u64, 0usize);
    while let Some(buf) = stream.next().await {
        let buf = buf.expect("stream error");
        if let Some(i) = first_mismatch(position, &buf) {
            panic!("byte {} of the stream is wrong", position + i as u64);
        }
        largest = largest.max(buf.len());
        position += buf.len() as u64;
    }
    (position, largest)
}

/// What one run moved.
struct Run {
    stats: Stats,
    largest_buffer: usize,
}

impl Run {
    fn buffers_per_mib(&self) -> f64 {
        self.stats.chunks as f64 / (self.stats.bytes as f64 / f64::from(1 << 20))
    }
}

/// Receives `CONNECTIONS` streams of `PER_CONNECTION` pattern bytes at once from the peer
/// namespace through a runtime built from `builder`, checks every byte, zero copy and that
/// every buffer came back; returns the statistics.
fn receive_all(net: &GuestNet, chunk: u32, builder: tokio_zcrx::Builder) -> Run {
    runtime().block_on(async {
        let zcrx = build(builder);
        let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let started = Instant::now();
        let senders: Vec<_> = (0..CONNECTIONS)
            .map(|_| spawn_sender(addr, PER_CONNECTION, Some(net.peer_netns.clone())))
            .collect();
        let mut readers = Vec::new();
        for _ in 0..CONNECTIONS {
            let (socket, _) = listener.accept().await.unwrap();
            let (stream, _writer) = zcrx.attach(socket).unwrap();
            readers.push(tokio::spawn(read_verified_sizes(stream)));
        }
        let mut largest_buffer = 0;
        for reader in readers {
            let (bytes, largest) = reader.await.unwrap();
            assert_eq!(bytes, PER_CONNECTION);
            largest_buffer = largest_buffer.max(largest);
        }
        for sender in senders {
            assert_eq!(sender.join().unwrap(), PER_CONNECTION);
        }
        let stats = zcrx.stats();
        println!(
            "\n{chunk}-byte chunks: {} bytes in {} buffers ({:.1} per MiB, largest \
             {largest_buffer} bytes) in {:?}: {stats}",
            stats.bytes,
            stats.chunks,
            stats.chunks as f64 / (stats.bytes as f64 / f64::from(1 << 20)),
            started.elapsed()
        );
        assert_eq!(stats.bytes, CONNECTIONS * PER_CONNECTION, "{stats}");
        assert_eq!(stats.copy_bytes, Some(0), "zero copy expected: {stats}");
        assert_eq!(stats.copy_count, Some(0), "{stats}");
        assert_eq!(stats.buffers_outstanding, 0, "{stats}");
        assert_eq!(stats.memory_held, 0, "{stats}");
        zcrx.shutdown().await;
        Run {
            stats,
            largest_buffer,
        }
    })
}

/// 4 KiB, 16 KiB and 64 KiB chunks over reserved huge pages: zero copy, and fewer buffers
/// (completions) per MiB as the chunks grow.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn large_chunks_receive_zero_copy_in_fewer_buffers() {
    let net = GuestNet::from_env();
    let pages = (AREA >> 21) as u64;
    assert_eq!(
        reserve_huge_pages(pages),
        pages,
        "the guest could not reserve huge pages"
    );
    let small = receive_all(&net, 4096, nic(&net).area_size(AREA));
    assert!(small.largest_buffer <= 4096);
    let mut previous = small.buffers_per_mib();
    for chunk in [16u32 << 10, 64 << 10] {
        // The previous area's pages come back once the kernel has torn its instance down.
        assert_eq!(reserve_huge_pages(pages), pages, "huge pages still in use");
        let run = receive_all(
            &net,
            chunk,
            nic(&net)
                .area_size(AREA)
                .chunk_size(chunk)
                .huge_pages(HugePages::Reserved),
        );
        assert!(
            run.largest_buffer > 4096 && run.largest_buffer <= chunk as usize,
            "{chunk}-byte chunks delivered buffers of at most {} bytes",
            run.largest_buffer
        );
        assert!(
            run.buffers_per_mib() < previous,
            "{chunk}-byte chunks took {:.1} buffers per MiB, no fewer than {previous:.1}",
            run.buffers_per_mib()
        );
        previous = run.buffers_per_mib();
    }
    // A 64 KiB chunk holds a whole 64 KiB TSO packet's payload: at least four times fewer
    // completions than one-page chunks.
    assert!(
        previous * 4.0 <= small.buffers_per_mib(),
        "64 KiB chunks: {previous:.1} buffers per MiB, 4 KiB: {:.1}",
        small.buffers_per_mib()
    );
    reserve_huge_pages(0);
}

/// With no reserved huge pages, `HugePages::Auto` backs the area with transparent huge pages
/// (checked in smaps by the runtime) and receives zero copy in 64 KiB chunks.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn transparent_huge_pages_back_large_chunks() {
    let net = GuestNet::from_env();
    assert_eq!(reserve_huge_pages(0), 0);
    let thp = std::fs::read_to_string(THP_ENABLED).expect("the guest kernel has THP");
    assert!(
        !thp.contains("[never]"),
        "transparent huge pages are disabled in the guest: {thp}"
    );
    for policy in [HugePages::Auto, HugePages::Transparent] {
        let run = receive_all(
            &net,
            64 << 10,
            nic(&net)
                .area_size(AREA)
                .chunk_size(64 << 10)
                .huge_pages(policy),
        );
        assert!(
            run.largest_buffer > 4096,
            "{policy:?}: {}",
            run.largest_buffer
        );
    }
}

/// Too few reserved pages (and, for `Auto`, THP off) fail before anything is registered,
/// with the page count, what is free and the command.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn missing_huge_pages_are_explained_before_registering() {
    let net = GuestNet::from_env();
    assert_eq!(reserve_huge_pages(2), 2);
    let large = || nic(&net).area_size(AREA).chunk_size(64 << 10);
    let err = build_error(large().huge_pages(HugePages::Reserved));
    println!("\nreserved: {err}");
    assert_eq!(err.kind(), ErrorKind::HugePagesUnavailable, "{err}");
    let text = err.to_string();
    assert!(text.contains("needs 8 of them"), "{text}");
    assert!(text.contains("2 are free now"), "{text}");
    assert!(
        text.contains("`echo 8 > /proc/sys/vm/nr_hugepages`"),
        "{text}"
    );
    {
        let _thp_off = KernelSetting::set(THP_ENABLED, "never");
        let err = build_error(large());
        println!("auto, THP never: {err}");
        assert_eq!(err.kind(), ErrorKind::HugePagesUnavailable, "{err}");
        assert!(err.to_string().contains("enabled is never"), "{err}");
    }
    reserve_huge_pages(0);
}

/// A driver without rx page size support (netdevsim with `rx_page_size=0`: the core's own
/// refusal, EOPNOTSUPP) is named as such, with what to do; one-page chunks still work
/// there, and large chunks again once support is back.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn a_driver_without_rx_page_sizes_is_named() {
    let net = GuestNet::from_env();
    assert_eq!(reserve_huge_pages(8), 8);
    let large = || {
        nic(&net)
            .area_size(AREA)
            .chunk_size(64 << 10)
            .huge_pages(HugePages::Reserved)
    };
    {
        let _unsupported = KernelSetting::set(RX_PAGE_SIZE_PARAM, "0");
        let err = build_error(large());
        println!("\nwithout rx page sizes: {err}");
        assert_eq!(err.kind(), ErrorKind::ChunkSizeUnsupported, "{err}");
        assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
        let text = err.to_string();
        assert!(
            text.contains("netdevsim does not support chunks larger than a page"),
            "{text}"
        );
        assert!(text.contains("omit .chunk_size"), "{text}");
        // The refused registration left the queue usable.
        receive_all(&net, 4096, nic(&net).area_size(AREA));
    }
    assert_eq!(reserve_huge_pages(8), 8, "huge pages still in use");
    let run = receive_all(&net, 64 << 10, large());
    assert!(run.largest_buffer > 4096);
    reserve_huge_pages(0);
}

/// The device-less mode takes one-page chunks only: said before any huge page is asked for.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_refuses_large_chunks_up_front() {
    let err = build_error(
        Zcrx::builder()
            .no_device()
            .area_size(AREA)
            .chunk_size(64 << 10),
    );
    assert_eq!(err.kind(), ErrorKind::ChunkSizeUnsupported, "{err}");
    assert!(err.to_string().contains("one-page chunks"), "{err}");
}
