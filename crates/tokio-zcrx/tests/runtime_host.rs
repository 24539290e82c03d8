//! The runtime on the development host (Linux 6.18: io_uring works, no zcrx-capable NIC, no
//! device-less mode). Every refusal must be a typed error that says what to do. The real
//! data path is tested in the QEMU guest (tests/runtime.rs, `cargo xtask vm-test`).

use tokio_zcrx::{ActiveMode, ErrorKind, EventsPolicy, Mode, Zcrx};

fn kernel_minor() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next().unwrap().parse().unwrap();
    let minor = parts.next().unwrap().parse().unwrap();
    (major, minor)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn device_less_mode_needs_linux_7_1() {
    let result = Zcrx::builder().no_device().build();
    if kernel_minor() >= (7, 1) {
        // A newer host kernel: the mode exists; as root it must work.
        if is_root() {
            let zcrx = result.expect("NODEV registration on a 7.1+ kernel as root");
            assert!(zcrx.description().contains("NODEV"));
        }
        return;
    }
    let err = result.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::KernelTooOld, "{err}");
    assert!(err.to_string().contains("7.1"), "{err}");
    assert!(err.to_string().contains("probe"), "{err}");
}

#[test]
fn loopback_is_not_a_zero_copy_nic() {
    let err = Zcrx::builder()
        .mode(Mode::Nic)
        .interface("lo", 0)
        .build()
        .unwrap_err();
    let expected = if is_root() {
        ErrorKind::InterfaceUnsupported
    } else {
        ErrorKind::PermissionDenied
    };
    assert_eq!(err.kind(), expected, "{err}");
    assert_eq!(
        err.raw_os_error(),
        Some(if is_root() {
            libc::EOPNOTSUPP
        } else {
            libc::EPERM
        })
    );
    if is_root() {
        // The probe's diagnosis is part of the message, with the fix.
        assert!(err.to_string().contains("virtual device"), "{err}");
        assert!(err.to_string().contains("fix:"), "{err}");
    }
}

#[test]
fn unknown_interface_is_named() {
    let err = Zcrx::builder()
        .mode(Mode::Nic)
        .interface("nosuch0", 0)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InterfaceNotFound, "{err}");
    assert!(err.to_string().contains("nosuch0"), "{err}");
    let io: std::io::Error = err.into();
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn required_events_need_linux_7_2() {
    if kernel_minor() >= (7, 2) {
        return; // events exist; the guest tests cover them
    }
    let err = Zcrx::builder()
        .mode(Mode::Nic)
        .interface("lo", 0)
        .events(EventsPolicy::Required)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::KernelTooOld, "{err}");
    assert!(err.to_string().contains("7.2"), "{err}");
}

/// `EventsPolicy::Required` in `Auto` mode, as its documentation says: on a kernel without
/// events neither io_uring mode runs (both are refused with the reason), and copy mode,
/// which reports every copy itself, is chosen.
#[test]
fn required_events_in_auto_mode_skip_the_io_uring_modes_without_events() {
    if kernel_minor() >= (7, 2) {
        return; // events exist; the guest tests cover Required there
    }
    let zcrx = Zcrx::builder()
        .interface("lo", 0)
        .events(EventsPolicy::Required)
        .build()
        .expect("Auto chooses copy mode");
    assert_eq!(zcrx.mode(), ActiveMode::Copy);
    let selection = zcrx.mode_selection();
    let refused: Vec<Mode> = selection.refused.iter().map(|(mode, _)| *mode).collect();
    assert_eq!(refused, [Mode::Nic, Mode::NoDevice], "{selection}");
    // Copy mode reports its copies, as Required asks for.
    assert_eq!(zcrx.stats().copy_bytes, Some(0));
    // With a mode named, Required fails the build instead.
    let err = Zcrx::builder()
        .no_device()
        .events(EventsPolicy::Required)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::KernelTooOld, "{err}");
}

#[test]
fn invalid_settings_are_refused_before_touching_the_kernel() {
    let err = Zcrx::builder()
        .no_device()
        .cq_entries(100)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    let err = Zcrx::builder().mode(Mode::Nic).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains(".interface("), "{err}");
}

#[test]
fn auto_mode_says_why_it_chose_copy() {
    if kernel_minor() >= (7, 1) && is_root() {
        return; // NODEV would be chosen; the guest tests cover that
    }
    let zcrx = Zcrx::builder().interface("lo", 0).build().unwrap();
    assert_eq!(zcrx.mode(), ActiveMode::Copy);
    let selection = zcrx.mode_selection();
    assert_eq!(selection.refused.len(), 2, "{selection}");
    assert_eq!(selection.refused[0].0, Mode::Nic);
    assert!(selection.refused[0].1.contains("lo"), "{selection}");
    assert_eq!(selection.refused[1].0, Mode::NoDevice);
    assert!(selection.refused[1].1.contains("7.1"), "{selection}");
    let text = selection.to_string();
    assert!(text.starts_with("copy (nic: "), "{text}");
    assert!(
        zcrx.description().starts_with("copy mode"),
        "{}",
        zcrx.description()
    );

    let without_interface = Zcrx::builder().build().unwrap();
    assert_eq!(
        without_interface.mode_selection().refused[0],
        (Mode::Nic, "no interface given".to_string())
    );
}
