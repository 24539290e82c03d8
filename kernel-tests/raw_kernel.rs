//! Real-kernel tests of the zcrx ABI through the kernel-interface crate alone.
//!
//! They need a zcrx kernel (7.2+) and the guest's patched netdevsim pair, so they are
//! `#[ignore]`d on the host; `cargo xtask vm-test` runs them inside QEMU with
//! `--include-ignored`, one at a time (some change interface settings).
//!
//! They do not use `tokio-zcrx` (nor `zcrx-core`) on purpose: they are the oracle the
//! library's registration is checked against, and an oracle must not share the code it checks.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use tokio_zcrx_kernel_tests::{
    ethtool, ifindex, listen, receive_all, spawn_sender, Config, GuestKernel, GuestNet, RawZcrx,
    Target,
};
use zcrx_sys::ctrl::zcrx_add_area;
use zcrx_sys::query::query_zcrx;
use zcrx_sys::zcrx::io_uring_zcrx_area_reg;
use zcrx_sys::zcrx::{ZCRX_FEATURE_EVENT, ZCRX_FEATURE_RX_PAGE_SIZE, ZCRX_REG_NODEV};

fn nic_config(ifindex: u32, area_bytes: usize) -> Config {
    Config {
        target: Target::Nic { ifindex, rxq: 0 },
        area_bytes,
        rq_entries: 4096,
        cq_entries: 4096,
        events: true,
    }
}

fn register_errno(config: Config) -> Option<i32> {
    match RawZcrx::register(config) {
        Ok(_) => None,
        Err(e) => e.raw_os_error(),
    }
}

fn errno_name(errno: Option<i32>) -> String {
    match errno {
        None => "success".into(),
        Some(e) => format!("{} ({})", io::Error::from_raw_os_error(e), e),
    }
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn query_reports_nodev_and_events() {
    let zcrx = query_zcrx().expect("the 7.2+ guest kernel answers the zcrx query");
    assert_ne!(
        zcrx.register_flags & u64::from(ZCRX_REG_NODEV),
        0,
        "{zcrx:?}"
    );
    assert_ne!(zcrx.features & ZCRX_FEATURE_EVENT, 0, "{zcrx:?}");
    assert_ne!(zcrx.features & ZCRX_FEATURE_RX_PAGE_SIZE, 0, "{zcrx:?}");
    assert!(zcrx.nr_ctrl_opcodes >= 3, "ARM_EVENT must exist: {zcrx:?}");
}

/// What differs between the tier's kernels, asserted on each: the query's control-op count
/// and refill header size, the refill ring's offsets, and ADD_AREA (7.3 grows the area;
/// 7.2 answers EOPNOTSUPP). Events exist on both (the test above).
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn kernel_generation_differences_are_as_expected() {
    let kernel = GuestKernel::running();
    let header = kernel.refill_header();
    let zcrx = query_zcrx().expect("the 7.2+ guest kernel answers the zcrx query");
    println!("kernel {:?}: query {zcrx:?}", kernel.series);
    assert_eq!(zcrx.nr_ctrl_opcodes, kernel.nr_ctrl_opcodes(), "{zcrx:?}");
    assert_eq!(zcrx.rq_hdr_size, header.rq_hdr_size, "{zcrx:?}");
    assert_eq!(zcrx.rq_hdr_alignment, 64, "{zcrx:?}");

    let mut raw = RawZcrx::register(Config {
        target: Target::Nodev,
        area_bytes: 1 << 20,
        rq_entries: 64,
        cq_entries: 256,
        events: true,
    })
    .expect("NODEV registration");
    let offsets = raw.offsets;
    assert_eq!(
        (offsets.head, offsets.tail, offsets.rqes),
        (header.head, header.tail, header.rqes),
        "refill ring offsets on {:?}",
        kernel.series
    );

    let extra = tokio_zcrx_kernel_tests::Mmap::new(1 << 20).unwrap();
    let mut area = io_uring_zcrx_area_reg {
        addr: extra.as_ptr() as u64,
        len: extra.len() as u64,
        ..Default::default()
    };
    // SAFETY: `extra` is a fresh mapping nothing else refers to, unmapped only after the
    // ring (the explicit drops below).
    let added = unsafe { zcrx_add_area(raw.ring.as_fd(), raw.zcrx_id, &mut area) };
    if kernel.has_add_area() {
        added.expect("ZCRX_CTRL_ADD_AREA on 7.3");
        assert_eq!(
            area.rq_area_token,
            1 << 48,
            "the second area's token is area id 1"
        );
    } else {
        let errno = added
            .expect_err("7.2 has no ZCRX_CTRL_ADD_AREA")
            .raw_os_error();
        assert_eq!(
            errno,
            Some(libc::EOPNOTSUPP),
            "ADD_AREA on {:?}",
            kernel.series
        );
        assert_eq!(area.rq_area_token, 0, "a refused area gets no token");
    }
    // The instance still works after either answer: flush returns nothing and succeeds.
    raw.flush().expect("FLUSH_RQ after ADD_AREA");
    drop(raw);
    drop(extra);
}

/// NODEV over loopback: every byte goes through the kernel's copy path, the COPY event
/// fires, can be re-armed and fires again, and `copy_bytes` equals the payload.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nodev_loopback_copies_every_byte_and_reports_it() {
    const TOTAL: u64 = 32 << 20;
    let mut zcrx = RawZcrx::register(Config {
        target: Target::Nodev,
        area_bytes: 4 << 20,
        rq_entries: 1024,
        cq_entries: 4096,
        events: true,
    })
    .expect("NODEV registration");
    assert_eq!(zcrx.stats(), (0, 0), "the kernel zeroes the stats");
    let (listener, addr) = listen("127.0.0.1");
    let sender = spawn_sender(addr, TOTAL, None);
    let (conn, _) = listener.accept().unwrap();
    let report = receive_all(&mut zcrx, conn.as_raw_fd(), TOTAL);
    assert_eq!(sender.join().unwrap(), TOTAL);
    let (copy_count, copy_bytes) = zcrx.stats();
    println!("{report:?} copy_count={copy_count} copy_bytes={copy_bytes}");
    assert_eq!(copy_bytes, TOTAL, "NODEV copies every byte: {report:?}");
    assert!(copy_count > 0);
    assert!(report.copy_events >= 1, "no COPY event: {report:?}");
    assert_eq!(report.rearms, 1);
    assert!(
        report.copy_events >= 2,
        "COPY did not fire again after re-arming: {report:?}"
    );
    assert_eq!(report.alloc_fail_events, 0, "NODEV has no page pool");
}

/// True zero copy: 64 MiB from the peer namespace through a 16 MiB area (the refill ring
/// must recycle every chunk several times), every byte verified, nothing copied.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nic_receives_64mib_zero_copy_through_a_smaller_area() {
    const TOTAL: u64 = 64 << 20;
    let net = GuestNet::from_env();
    let mut zcrx = RawZcrx::register(nic_config(net.nic_ifindex(), 16 << 20))
        .expect("registration on the netdevsim queue");
    let (listener, addr) = listen(&net.nic_addr);
    let sender = spawn_sender(addr, TOTAL, Some(net.peer_netns.clone()));
    let (conn, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), net.peer_addr);
    let report = receive_all(&mut zcrx, conn.as_raw_fd(), TOTAL);
    assert_eq!(sender.join().unwrap(), TOTAL);
    let (copy_count, copy_bytes) = zcrx.stats();
    println!("{report:?} copy_count={copy_count} copy_bytes={copy_bytes}");
    assert_eq!(
        (copy_count, copy_bytes),
        (0, 0),
        "zero copy expected: {report:?}"
    );
    assert_eq!(report.copy_events, 0);
    assert!(
        report.data_cqes > (16 << 20) / 4096,
        "the area must have been recycled: {report:?}"
    );
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn loopback_interface_is_refused_with_eopnotsupp() {
    let lo = ifindex("lo").unwrap();
    let errno = register_errno(nic_config(lo, 1 << 20));
    assert_eq!(errno, Some(libc::EOPNOTSUPP), "got {}", errno_name(errno));
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn unknown_ifindex_is_refused_with_enodev() {
    let errno = register_errno(nic_config(999_999, 1 << 20));
    assert_eq!(errno, Some(libc::ENODEV), "got {}", errno_name(errno));
}

/// Restores `tcp-data-split on` even if the test fails, so later tests see a sane NIC.
struct DataSplitGuard<'a>(&'a str);

impl Drop for DataSplitGuard<'_> {
    fn drop(&mut self) {
        ethtool(&["-G", self.0, "tcp-data-split", "on"]);
    }
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn nic_without_tcp_data_split_is_refused_with_einval() {
    let net = GuestNet::from_env();
    let _restore = DataSplitGuard(&net.nic);
    ethtool(&["-G", &net.nic, "tcp-data-split", "off"]);
    let errno = register_errno(nic_config(net.nic_ifindex(), 1 << 20));
    assert_eq!(errno, Some(libc::EINVAL), "got {}", errno_name(errno));
    ethtool(&["-G", &net.nic, "tcp-data-split", "on"]);
    let errno = register_errno(nic_config(net.nic_ifindex(), 1 << 20));
    assert_eq!(errno, None, "with tcp-data-split on: {}", errno_name(errno));
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn queue_out_of_range_is_refused_with_erange() {
    let net = GuestNet::from_env();
    let mut config = nic_config(net.nic_ifindex(), 1 << 20);
    config.target = Target::Nic {
        ifindex: net.nic_ifindex(),
        rxq: 7,
    };
    let errno = register_errno(config);
    assert_eq!(errno, Some(libc::ERANGE), "got {}", errno_name(errno));
}
