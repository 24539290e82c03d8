//! Runs the real probe on the machine the tests run on and checks what it must say there.
//!
//! Expectations are conditioned on what the running kernel reports, so the same tests hold on
//! the development machines (6.18: no zcrx query, no NODEV, no capable NIC) and in the QEMU
//! guest (7.3: NODEV and events, netdevsim with tcp-data-split on).

use tokio_zcrx::probe::{
    self, Errno, GenerationStep, ProbeOptions, ProbeReport, QueryStatus, Support, TrialOutcome,
    Verdict,
};

fn probe_interface(name: &str) -> ProbeReport {
    probe::run(&ProbeOptions::new().interface(name))
}

/// Whether this process can make trial registrations at all.
fn can_register(report: &ProbeReport) -> bool {
    report.io_uring.usable && report.recv_zc.support == Support::Supported
}

#[test]
fn nodev_support_follows_the_zcrx_query() {
    let report = probe_interface("lo");
    let nodev = &report.features.nodev;
    assert_eq!(nodev.min_kernel, "7.1");
    match report.zcrx_query.status {
        QueryStatus::PredatesQuery => {
            assert_eq!(nodev.support, Support::Unsupported);
            assert!(
                nodev.summary.contains("predates the zcrx query"),
                "{}",
                nodev.summary
            );
            assert!(
                report
                    .zcrx_query
                    .summary
                    .contains("predates the zcrx query (needs 6.19+"),
                "{}",
                report.zcrx_query.summary
            );
        }
        QueryStatus::Answered => {
            let answer = report
                .zcrx_query
                .result
                .expect("an answered query has a result");
            if answer.register_nodev {
                assert_eq!(nodev.support, Support::Supported);
            } else {
                assert_eq!(nodev.support, Support::Unsupported);
                assert!(
                    nodev.summary.contains("needs Linux 7.1+"),
                    "{}",
                    nodev.summary
                );
            }
        }
        QueryStatus::Failed => assert_eq!(nodev.support, Support::Unknown),
        other => panic!("a query status this test does not know: {other:?}"),
    }

    match (nodev.support, report.cap_net_admin.effective) {
        (Support::Supported, Some(true)) => assert_eq!(
            report.nodev_trial,
            TrialOutcome::Registered,
            "NODEV is supported and we have CAP_NET_ADMIN, so registration must work"
        ),
        (Support::Supported, _) => {
            assert!(matches!(report.nodev_trial, TrialOutcome::Refused { .. }))
        }
        (Support::Unsupported, _) => match &report.nodev_trial {
            TrialOutcome::NotAttempted { reason } => {
                assert!(
                    reason.contains("no NODEV mode (needs Linux 7.1+)"),
                    "{reason}"
                )
            }
            other => panic!("no NODEV trial expected without NODEV support, got {other:?}"),
        },
        (Support::Unknown, _) => {
            assert!(matches!(
                report.nodev_trial,
                TrialOutcome::NotAttempted { .. }
            ))
        }
    }
}

#[test]
fn loopback_is_unsupported_according_to_a_real_trial() {
    let report = probe_interface("lo");
    let [lo] = report.interfaces.as_slice() else {
        panic!("expected exactly lo, got {:?}", report.interfaces)
    };
    assert_eq!(lo.name, "lo");
    assert!(lo.virtual_device);
    assert_eq!(lo.driver, None);
    assert_eq!(lo.verdict, Verdict::Unsupported, "{}", lo.reason);
    assert!(lo.reason.contains("virtual device"), "{}", lo.reason);

    if !can_register(&report) {
        eprintln!("no trial possible here: {}", report.io_uring.summary);
        assert!(matches!(lo.registration, TrialOutcome::NotAttempted { .. }));
        return;
    }
    let expected = match report.cap_net_admin.effective {
        // Registration checks the capability before anything else.
        Some(false) => libc::EPERM,
        _ => libc::EOPNOTSUPP,
    };
    assert_eq!(
        lo.registration,
        TrialOutcome::Refused {
            errno: Errno::new(expected)
        },
        "{}",
        lo.reason
    );
}

#[test]
fn missing_interface_is_not_found_and_not_registered() {
    let report = probe_interface("nosuch0");
    let [missing] = report.interfaces.as_slice() else {
        panic!("expected one interface, got {:?}", report.interfaces)
    };
    assert_eq!(missing.verdict, Verdict::NotFound);
    assert!(matches!(
        missing.registration,
        TrialOutcome::NotAttempted { .. }
    ));
    assert!(missing.reason.contains("nosuch0"), "{}", missing.reason);
}

#[test]
fn default_probe_explains_every_interface_and_disturbs_none() {
    let report = probe::run(&ProbeOptions::new());
    let text = report.to_string();
    assert!(text.contains(&report.kernel_release));
    assert!(!report.interfaces.is_empty(), "lo at least exists");
    for interface in &report.interfaces {
        assert!(
            !interface.reason.is_empty(),
            "{} has no reason",
            interface.name
        );
        assert!(text.contains(&format!("{}: {}", interface.name, interface.verdict)));
        // A successful registration restarts the NIC queue: never without try_register.
        assert_ne!(
            interface.registration,
            TrialOutcome::Registered,
            "{} was registered although the probe is non-disruptive by default",
            interface.name
        );
        assert_ne!(interface.verdict, Verdict::Ready, "{}", interface.name);
    }
}

#[test]
fn generation_follows_recv_zc_and_the_query() {
    let report = probe_interface("lo");
    let generation = &report.generation;
    let steps: Vec<GenerationStep> = generation.steps.iter().map(|e| e.step).collect();
    assert_eq!(steps, GenerationStep::ALL);
    match (report.recv_zc.support, report.zcrx_query.status) {
        // 6.15-6.18 (the development machines): RECV_ZC and nothing newer.
        (Support::Supported, QueryStatus::PredatesQuery) => {
            assert_eq!(generation.kernel, Some("6.15"), "{}", generation.summary);
            assert_eq!(generation.missing, &GenerationStep::ALL[1..]);
        }
        (Support::Supported, QueryStatus::Answered) => {
            assert!(
                !generation.missing.contains(&GenerationStep::Query),
                "{}",
                generation.summary
            );
            assert_ne!(generation.kernel, Some("6.15"), "{}", generation.summary);
        }
        (Support::Unsupported, _) => {
            assert_eq!(generation.kernel, None);
            assert!(generation
                .summary
                .starts_with("no zcrx (needs Linux 6.15+)"));
        }
        _ => assert!(
            generation.steps[0].support != Support::Supported || generation.kernel.is_some()
        ),
    }
    let text = report.to_string();
    assert!(
        text.contains(&format!("  generation      {}", generation.summary)),
        "{text}"
    );
    for step in &generation.missing {
        let line = format!(
            "  missing         {} (Linux {}+): {}",
            step.name(),
            step.min_kernel(),
            step.gives()
        );
        assert!(text.contains(&line), "{line} not in:\n{text}");
    }
}
