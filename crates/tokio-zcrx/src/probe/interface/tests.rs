//! The verdicts for every case the probe knows, with a fake kernel in place of the trial.

use std::io;

use super::super::trial::TrialError;
use super::super::{Errno, InterfaceReport, Support, TcpDataSplit, TrialOutcome, Verdict};
use super::facts::{gather, is_plausible_name, unknown_interface};
use super::verdict::{describe_exposure, finish, steering_hints, KernelContext};

fn context() -> KernelContext {
    KernelContext {
        release: "7.3.4".to_owned(),
        recv_zc: Support::Supported,
        io_uring_usable: true,
        io_uring_summary: "usable".to_owned(),
        nodev: Support::Supported,
        cap_net_admin: Some(true),
    }
}

/// A mlx5 port, rx queue 3 of 4, set up for zcrx, before the trial and the verdict.
fn nic(name: &str) -> InterfaceReport {
    InterfaceReport {
        ifindex: Some(3),
        driver: Some("mlx5_core".to_owned()),
        rx_queues: Some(4),
        tcp_data_split: TcpDataSplit::On,
        hds_thresh: Some(0),
        xdp_attached: Some(false),
        ..unknown_interface(name, Some(3))
    }
}

fn refused(errno: i32) -> Result<(), TrialError> {
    Err(TrialError::Refused(io::Error::from_raw_os_error(errno)))
}

/// Runs `finish` with a fake kernel and returns the report and whether it registered.
fn finish_with(
    mut report: InterfaceReport,
    try_register: bool,
    answer: Result<(), TrialError>,
) -> (InterfaceReport, bool) {
    let mut tried = false;
    finish(&mut report, &context(), try_register, |_| {
        tried = true;
        answer
    });
    (report, tried)
}

#[test]
fn preconditions_met_does_not_register_by_default() {
    let (report, tried) = finish_with(nic("eth1"), false, Ok(()));
    assert!(
        !tried,
        "a registration that can succeed must not run by default"
    );
    assert_eq!(report.verdict, Verdict::PreconditionsMet);
    assert!(
        report.reason.contains("--try-register"),
        "{}",
        report.reason
    );
    assert!(
        report.reason.contains("rx queue 3 of eth1"),
        "{}",
        report.reason
    );
    assert!(report
        .hints
        .iter()
        .any(|hint| hint.contains("ethtool -X eth1 equal 3")));
}

#[test]
fn try_register_success_is_ready_with_steering_hints() {
    let (report, tried) = finish_with(nic("eth1"), true, Ok(()));
    assert!(tried);
    assert_eq!(report.registration, TrialOutcome::Registered);
    assert_eq!(report.verdict, Verdict::Ready);
    assert!(report
        .hints
        .iter()
        .any(|hint| hint.contains("ethtool -N eth1 flow-type tcp6 dst-port PORT action 3")));
}

#[test]
fn virtual_device_is_tried_and_unsupported() {
    let mut lo = nic("lo");
    lo.virtual_device = true;
    lo.driver = None;
    lo.tcp_data_split = TcpDataSplit::Unsupported;
    lo.hds_thresh = None;
    let (report, tried) = finish_with(lo, false, refused(libc::EOPNOTSUPP));
    assert!(
        tried,
        "a virtual device cannot register, so trying is harmless"
    );
    assert_eq!(report.verdict, Verdict::Unsupported);
    assert_eq!(
        report.registration,
        TrialOutcome::Refused {
            errno: Errno::new(libc::EOPNOTSUPP)
        }
    );
    assert!(
        report.reason.contains("virtual device"),
        "{}",
        report.reason
    );
    assert!(report.hints.iter().any(|hint| hint.contains("NODEV")));
}

#[test]
fn physical_eopnotsupp_blames_the_driver() {
    let mut eth = nic("eth0");
    eth.driver = Some("virtio_net".to_owned());
    eth.tcp_data_split = TcpDataSplit::Unsupported;
    let (report, tried) = finish_with(eth, false, refused(libc::EOPNOTSUPP));
    assert!(tried);
    assert_eq!(report.verdict, Verdict::Unsupported);
    assert!(
        report
            .reason
            .contains("virtio_net lacks the queue-management API"),
        "{}",
        report.reason
    );
    assert!(report.fix.unwrap().contains("mlx5"));
}

#[test]
fn split_off_needs_configuration() {
    let mut eth = nic("eth2");
    eth.tcp_data_split = TcpDataSplit::Off;
    let (report, tried) = finish_with(eth, false, refused(libc::EINVAL));
    assert!(tried);
    assert_eq!(report.verdict, Verdict::NeedsConfiguration);
    // hds-thresh reads 0 already: not asked for (ethtool 6.14 does not know the option).
    assert_eq!(
        report.fix.as_deref(),
        Some("`ethtool -G eth2 tcp-data-split on`")
    );
}

#[test]
fn split_off_with_a_threshold_needs_both() {
    let mut eth = nic("eth2");
    eth.tcp_data_split = TcpDataSplit::Off;
    eth.hds_thresh = Some(256);
    let (report, _) = finish_with(eth, false, refused(libc::EINVAL));
    assert_eq!(report.verdict, Verdict::NeedsConfiguration);
    assert_eq!(
        report.fix.as_deref(),
        Some("`ethtool -G eth2 tcp-data-split on hds-thresh 0`")
    );
}

#[test]
fn hds_threshold_needs_configuration() {
    let mut eth = nic("eth2");
    eth.hds_thresh = Some(256);
    let (report, tried) = finish_with(eth, false, refused(libc::EINVAL));
    assert!(tried);
    assert_eq!(report.verdict, Verdict::NeedsConfiguration);
    assert_eq!(
        report.fix.as_deref(),
        Some("`ethtool -G eth2 hds-thresh 0`")
    );
}

#[test]
fn einval_with_split_on_means_not_set_explicitly() {
    let (report, _) = finish_with(nic("eth1"), true, refused(libc::EINVAL));
    assert_eq!(report.verdict, Verdict::NeedsConfiguration);
    assert!(
        report.reason.contains("not set explicitly"),
        "{}",
        report.reason
    );
}

#[test]
fn queue_out_of_range() {
    let mut eth = nic("eth1");
    eth.queue = Some(9);
    let (report, tried) = finish_with(eth, false, refused(libc::ERANGE));
    assert!(tried);
    assert_eq!(report.verdict, Verdict::NeedsConfiguration);
    assert!(
        report
            .reason
            .contains("rx queue 9 is out of range: eth1 has 4"),
        "{}",
        report.reason
    );
    assert!(report.fix.unwrap().contains("ethtool -L eth1 combined 10"));
}

#[test]
fn xdp_and_busy_queues() {
    let mut eth = nic("eth1");
    eth.xdp_attached = Some(true);
    let (report, tried) = finish_with(eth, false, refused(libc::EEXIST));
    assert!(tried);
    assert!(report.fix.unwrap().contains("xdp off"));
    let (report, _) = finish_with(nic("eth1"), true, refused(libc::EEXIST));
    assert!(report.reason.contains("already bound"), "{}", report.reason);
    let (report, _) = finish_with(nic("eth1"), true, refused(libc::EBUSY));
    assert!(report.reason.contains("AF_XDP"), "{}", report.reason);
    assert_eq!(report.verdict, Verdict::NeedsConfiguration);
}

#[test]
fn eperm_keeps_the_facts_and_names_the_capability() {
    let (report, _) = finish_with(nic("eth1"), true, refused(libc::EPERM));
    assert_eq!(report.verdict, Verdict::NeedsConfiguration);
    assert!(report.reason.contains("CAP_NET_ADMIN"), "{}", report.reason);
    assert!(report.fix.unwrap().contains("setcap cap_net_admin+ep"));

    let mut eth = nic("eth2");
    eth.tcp_data_split = TcpDataSplit::Off;
    let (report, _) = finish_with(eth, false, refused(libc::EPERM));
    assert_eq!(report.verdict, Verdict::NeedsConfiguration);
    assert!(
        report.reason.contains("tcp-data-split"),
        "{}",
        report.reason
    );
    assert!(report.reason.contains("CAP_NET_ADMIN"), "{}", report.reason);
}

#[test]
fn other_errnos_are_explained() {
    for (errno, verdict, words) in [
        (libc::ENODEV, Verdict::NotFound, "no such interface"),
        (libc::ENOMEM, Verdict::Unknown, "RLIMIT_MEMLOCK"),
        (libc::EFAULT, Verdict::Unknown, "bug in this probe"),
        (libc::ENOSPC, Verdict::Unknown, "ENOSPC"),
    ] {
        let (report, _) = finish_with(nic("eth1"), true, refused(errno));
        assert_eq!(report.verdict, verdict, "{errno}");
        assert!(report.reason.contains(words), "{}", report.reason);
    }
}

#[test]
fn setup_failure_falls_back_to_the_facts() {
    let setup = Err(TrialError::Setup {
        step: "map the receive area",
        error: io::Error::from_raw_os_error(libc::ENOMEM),
    });
    let mut lo = nic("lo");
    lo.virtual_device = true;
    let (report, _) = finish_with(lo, false, setup);
    assert_eq!(report.verdict, Verdict::Unsupported);
    assert!(
        report
            .reason
            .contains("registration would fail with EOPNOTSUPP"),
        "{}",
        report.reason
    );
    assert!(
        report.reason.contains("could not map the receive area"),
        "{}",
        report.reason
    );
}

#[test]
fn unknown_split_is_not_registered_by_default() {
    let mut eth = nic("eth1");
    eth.tcp_data_split = TcpDataSplit::Unknown;
    let (report, tried) = finish_with(eth, false, Ok(()));
    assert!(!tried);
    assert_eq!(report.verdict, Verdict::Unknown);
}

#[test]
fn kernel_without_zcrx_is_unsupported_without_trial() {
    let mut report = nic("eth1");
    let mut old = context();
    old.recv_zc = Support::Unsupported;
    old.release = "6.1.0".to_owned();
    let mut tried = false;
    finish(&mut report, &old, true, |_| {
        tried = true;
        Ok(())
    });
    assert!(!tried);
    assert_eq!(report.verdict, Verdict::Unsupported);
    assert!(
        report.reason.contains("kernel 6.1.0 has no zcrx"),
        "{}",
        report.reason
    );
}

#[test]
fn missing_interface_is_not_found() {
    let mut ethtool = Err(io::Error::from_raw_os_error(libc::ENOENT));
    let mut report = gather("nosuch0", None, &mut ethtool, None);
    finish(&mut report, &context(), true, |_| {
        panic!("must not register")
    });
    assert_eq!(report.verdict, Verdict::NotFound);
    assert!(!is_plausible_name("../etc"));
}

#[test]
fn rss_weights_exclude_a_middle_queue() {
    let mut eth = nic("eth1");
    eth.queue = Some(1);
    let hints = steering_hints(&eth);
    assert!(
        hints[0].contains("ethtool -X eth1 weight 1 0 1 1"),
        "{}",
        hints[0]
    );
    let exposure = hints.last().unwrap();
    assert!(exposure.contains("whatever socket it is for"), "{exposure}");
    assert!(
        exposure.contains("`ethtool -x eth1` leaves queue 1 out"),
        "{exposure}"
    );
    eth.rx_queues = Some(1);
    eth.queue = Some(0);
    assert!(steering_hints(&eth)[0].contains("single rx queue"));
}

#[test]
fn exposure_names_what_else_reaches_the_queue() {
    use crate::sys::steering::{RuleTarget, SteeringRule};
    use std::io;

    let rule = |location, target, tcp_dst_port| SteeringRule {
        location,
        target,
        tcp_dst_port,
    };
    // RSS over queues 0-6 only, one rule for the service's port: nothing else.
    let contained = describe_exposure(
        "eth0",
        7,
        Some(8),
        Ok(vec![0, 1, 2, 3, 4, 5, 6, 0]),
        Ok(vec![rule(0, RuleTarget::Queue(7), Some(9000))]),
    );
    assert_eq!(
        contained,
        [
            "RSS leaves queue 7 out (none of 8 indirection entries)",
            "n-tuple rule 0 sends TCP destination port 9000 to queue 7",
        ]
    );
    // RSS still on the queue, a broad rule, a rule to an RSS context, one elsewhere.
    let exposed = describe_exposure(
        "eth0",
        7,
        Some(8),
        Ok(vec![6, 7, 6, 7]),
        Ok(vec![
            rule(1, RuleTarget::Queue(7), None),
            rule(
                2,
                RuleTarget::RssContext {
                    context: 1,
                    offset: 0,
                },
                Some(9000),
            ),
            rule(3, RuleTarget::Queue(2), None),
        ]),
    );
    assert!(
        exposed[0].starts_with("RSS hashes flows of every service to queue 7 (2 of 4"),
        "{exposed:?}"
    );
    assert!(
        exposed[1].contains("rule 1 sends more than one TCP port"),
        "{exposed:?}"
    );
    assert!(exposed[2].contains("RSS context 1"), "{exposed:?}");
    assert_eq!(exposed.len(), 3, "{exposed:?}");
    // Drivers that cannot tell.
    let unknown = describe_exposure(
        "eth0",
        0,
        Some(4),
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
    );
    assert!(
        unknown[0].starts_with("cannot tell whether RSS"),
        "{unknown:?}"
    );
    assert!(unknown[1].contains("no n-tuple rules"), "{unknown:?}");
    let no_rules = describe_exposure("eth0", 3, Some(4), Ok(vec![0, 1, 2]), Ok(Vec::new()));
    assert_eq!(no_rules[1], "no n-tuple rule sends anything to queue 3");
    let single = describe_exposure("eth0", 0, Some(1), Ok(vec![0; 4]), Ok(Vec::new()));
    assert!(
        single[0].contains("single rx queue: every packet"),
        "{single:?}"
    );
}
