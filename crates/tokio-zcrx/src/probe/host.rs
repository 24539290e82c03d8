//! Host-wide facts, gathered once before the interfaces: io_uring availability, RECV_ZC, the
//! zcrx query and the features derived from it, CAP_NET_ADMIN, and the NODEV trial.

use std::io;
use std::os::fd::AsFd;

use io_uring::IoUring;
use zcrx_core::query::QueryFeatures;
use zcrx_sys::ctrl::{ZCRX_CTRL_ADD_AREA, ZCRX_CTRL_EXPORT};
use zcrx_sys::opcode_probe::probe_opcode_supported;
use zcrx_sys::query::{io_uring_query_zcrx, query_zcrx};
use zcrx_sys::ring::IORING_OP_RECV_ZC;
use zcrx_sys::zcrx::{
    IORING_ZCRX_AREA_DMABUF, ZCRX_FEATURE_EVENT, ZCRX_FEATURE_RX_PAGE_SIZE, ZCRX_REG_IMPORT,
    ZCRX_REG_NODEV,
};

use super::system;
use super::trial::{self, TrialError};
use super::{
    CapNetAdminReport, Errno, FeatureReport, GenerationEntry, GenerationStep, IoUringReport,
    OpcodeReport, QueryStatus, Support, TrialOutcome, ZcrxFeatures, ZcrxGeneration,
    ZcrxQueryReport, ZcrxQueryResult,
};
use crate::sys::registration::QueueBinding;

/// The fix for a missing CAP_NET_ADMIN, shared by every message that needs it.
pub(crate) use crate::sys::privilege::CAP_NET_ADMIN_FIX;

/// Everything host-wide, gathered once before the interfaces are probed.
#[derive(Debug, Clone)]
pub(crate) struct HostFacts {
    pub(crate) release: String,
    pub(crate) io_uring: IoUringReport,
    pub(crate) recv_zc: OpcodeReport,
    pub(crate) zcrx_query: ZcrxQueryReport,
    pub(crate) features: ZcrxFeatures,
    pub(crate) generation: ZcrxGeneration,
    pub(crate) nodev_trial: TrialOutcome,
    pub(crate) cap_net_admin: CapNetAdminReport,
}

pub(crate) fn probe_host() -> HostFacts {
    let release = crate::sys::kernel_release().unwrap_or_else(|| "unknown".to_owned());
    let disabled_sysctl = system::io_uring_disabled_sysctl();
    let ring = IoUring::new(4);
    let io_uring = io_uring_report(disabled_sysctl, ring.as_ref().err());
    let recv_zc = match &ring {
        Ok(ring) => recv_zc_report(
            &release,
            probe_opcode_supported(ring.as_fd(), IORING_OP_RECV_ZC),
        ),
        Err(_) => OpcodeReport {
            support: Support::Unknown,
            summary: "cannot check IORING_OP_RECV_ZC: io_uring is unusable here".to_owned(),
        },
    };
    drop(ring);
    let zcrx_query = zcrx_query_report(&release, query_zcrx());
    let features = derive_features(&release, &zcrx_query);
    let generation = derive_generation(recv_zc.support, &zcrx_query, &features);
    let nodev_trial = nodev_trial(&features);
    let cap_net_admin = cap_net_admin_report(CapFacts::of_this_thread(), recv_zc.support);
    HostFacts {
        release,
        io_uring,
        recv_zc,
        zcrx_query,
        features,
        generation,
        nodev_trial,
        cap_net_admin,
    }
}

fn io_uring_report(disabled_sysctl: Option<u32>, setup_error: Option<&io::Error>) -> IoUringReport {
    let sysctl_words = match disabled_sysctl {
        Some(0) => "kernel.io_uring_disabled = 0".to_owned(),
        Some(1) => "kernel.io_uring_disabled = 1: restricted to privileged processes and \
                    kernel.io_uring_group"
            .to_owned(),
        Some(value) => format!("kernel.io_uring_disabled = {value}"),
        None => "no kernel.io_uring_disabled sysctl".to_owned(),
    };
    match setup_error {
        None => IoUringReport {
            disabled_sysctl,
            usable: true,
            setup_errno: None,
            summary: format!("usable ({sysctl_words})"),
        },
        Some(error) => {
            let errno = Errno::from_io_error(error);
            IoUringReport {
                disabled_sysctl,
                usable: false,
                setup_errno: Some(errno),
                summary: format!(
                    "unusable ({sysctl_words}): {}",
                    system::explain_setup_failure(errno, disabled_sysctl)
                ),
            }
        }
    }
}

fn recv_zc_report(release: &str, probed: io::Result<bool>) -> OpcodeReport {
    match probed {
        Ok(true) => OpcodeReport {
            support: Support::Supported,
            summary: "IORING_OP_RECV_ZC (opcode 58) is supported".to_owned(),
        },
        Ok(false) => OpcodeReport {
            support: Support::Unsupported,
            summary: format!(
                "kernel {release} has no IORING_OP_RECV_ZC, so no zcrx (needs Linux 6.15+)"
            ),
        },
        Err(error) => OpcodeReport {
            support: Support::Unknown,
            summary: format!(
                "IORING_REGISTER_PROBE failed with {}",
                Errno::from_io_error(&error)
            ),
        },
    }
}

/// Errors meaning "this kernel has no zcrx query": EBADF before 6.13 (no ring-less register),
/// EINVAL on 6.13-6.17 (no IORING_REGISTER_QUERY), EOPNOTSUPP on 6.18 (query without zcrx).
fn predates_query(errno: Errno) -> bool {
    matches!(errno.code(), libc::EINVAL | libc::EOPNOTSUPP | libc::EBADF)
}

fn zcrx_query_report(release: &str, answer: io::Result<io_uring_query_zcrx>) -> ZcrxQueryReport {
    match answer {
        Ok(raw) => {
            let result = decode_query(&raw);
            ZcrxQueryReport {
                status: QueryStatus::Answered,
                errno: None,
                summary: describe_query(&result),
                result: Some(result),
            }
        }
        Err(error) => {
            let errno = Errno::from_io_error(&error);
            if predates_query(errno) {
                ZcrxQueryReport {
                    status: QueryStatus::PredatesQuery,
                    errno: Some(errno),
                    summary: format!(
                        "kernel {release} predates the zcrx query (needs 6.19+; answered {})",
                        errno.name()
                    ),
                    result: None,
                }
            } else {
                ZcrxQueryReport {
                    status: QueryStatus::Failed,
                    errno: Some(errno),
                    summary: format!("the zcrx query failed with {errno}"),
                    result: None,
                }
            }
        }
    }
}

/// The query answer in words: flag names instead of bits.
fn describe_query(result: &ZcrxQueryResult) -> String {
    let register = flag_names(
        result.register_flags,
        &[
            (ZCRX_REG_IMPORT.into(), "IMPORT"),
            (ZCRX_REG_NODEV.into(), "NODEV"),
        ],
    );
    let area = flag_names(
        result.area_flags,
        &[(IORING_ZCRX_AREA_DMABUF.into(), "DMABUF")],
    );
    let features = flag_names(
        result.features.into(),
        &[
            (ZCRX_FEATURE_RX_PAGE_SIZE.into(), "RX_PAGE_SIZE"),
            (ZCRX_FEATURE_EVENT.into(), "EVENT"),
        ],
    );
    let arm_event = if result.ctrl_arm_event {
        ", ARM_EVENT present"
    } else {
        ""
    };
    format!(
        "register flags {register}, area flags {area}, features {features}, \
         nr_ctrl_opcodes {}{arm_event}, refill header {} bytes aligned to {}",
        result.nr_ctrl_opcodes, result.rq_hdr_size, result.rq_hdr_alignment
    )
}

/// `"IMPORT|NODEV"` for the known bits of `value`, unknown bits in hex, `"none"` for 0.
fn flag_names(value: u64, known: &[(u64, &str)]) -> String {
    let mut names: Vec<String> = known
        .iter()
        .filter(|(bit, _)| value & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect();
    let unknown = known.iter().fold(value, |rest, (bit, _)| rest & !bit);
    if unknown != 0 {
        names.push(format!("{unknown:#x}"));
    }
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join("|")
    }
}

/// The raw answer and its decoding (the one the runtime uses too, `zcrx_core::query`).
fn decode_query(raw: &io_uring_query_zcrx) -> ZcrxQueryResult {
    let decoded = QueryFeatures::decode(raw);
    ZcrxQueryResult {
        register_flags: raw.register_flags,
        area_flags: raw.area_flags,
        nr_ctrl_opcodes: raw.nr_ctrl_opcodes,
        features: raw.features,
        rq_hdr_size: raw.rq_hdr_size,
        rq_hdr_alignment: raw.rq_hdr_alignment,
        register_import: decoded.register_import,
        register_nodev: decoded.register_nodev,
        area_dmabuf: decoded.area_dmabuf,
        ctrl_arm_event: decoded.ctrl_arm_event,
        ctrl_add_area: raw.nr_ctrl_opcodes > ZCRX_CTRL_ADD_AREA,
        feature_rx_page_size: decoded.rx_page_size,
        feature_event: decoded.event,
    }
}

/// Every derived feature is newer than the query itself, so a kernel that predates the query
/// has none of them; only a failed query leaves them unknown.
pub(crate) fn derive_features(release: &str, query: &ZcrxQueryReport) -> ZcrxFeatures {
    let feature = |min_kernel: &'static str, what: &str, present: fn(&ZcrxQueryResult) -> bool| {
        let (support, summary) = match (&query.result, query.status) {
            (Some(result), _) if present(result) => {
                (Support::Supported, format!("{what}: supported"))
            }
            (Some(_), _) => (
                Support::Unsupported,
                format!("{what}: not in this kernel (needs Linux {min_kernel}+)"),
            ),
            (None, QueryStatus::PredatesQuery) => (
                Support::Unsupported,
                format!(
                    "{what}: not in this kernel ({release} predates the zcrx query; \
                     needs Linux {min_kernel}+)"
                ),
            ),
            (None, _) => (
                Support::Unknown,
                format!("{what}: unknown, the zcrx query failed (needs Linux {min_kernel}+)"),
            ),
        };
        FeatureReport {
            support,
            min_kernel,
            summary,
        }
    };
    ZcrxFeatures {
        import: feature("6.19", "export/import (ZCRX_REG_IMPORT)", |r| {
            r.register_import
        }),
        rx_buf_len: feature("7.0", "chunks larger than a page (rx_buf_len)", |r| {
            r.feature_rx_page_size
        }),
        nodev: feature("7.1", "NODEV mode (ZCRX_REG_NODEV)", |r| r.register_nodev),
        events: feature(
            "7.2",
            "events and stats (ZCRX_FEATURE_EVENT, ZCRX_CTRL_ARM_EVENT)",
            |r| r.feature_event && r.ctrl_arm_event,
        ),
    }
}

/// The kernel's zcrx generation, from what the probe already found: RECV_ZC for the first
/// step, the query for the rest (each later step is newer than the query, so a kernel that
/// predates it has none of them; a failed query leaves them unknown).
pub(crate) fn derive_generation(
    recv_zc: Support,
    query: &ZcrxQueryReport,
    features: &ZcrxFeatures,
) -> ZcrxGeneration {
    let from_query = |present: fn(&ZcrxQueryResult) -> bool| match (&query.result, query.status) {
        (Some(result), _) if present(result) => Support::Supported,
        (Some(_), _) | (None, QueryStatus::PredatesQuery) => Support::Unsupported,
        (None, _) => Support::Unknown,
    };
    let support = |step: GenerationStep| match step {
        GenerationStep::Nic => recv_zc,
        GenerationStep::CtrlOps => from_query(|r| r.nr_ctrl_opcodes > ZCRX_CTRL_EXPORT),
        GenerationStep::Query => match query.status {
            QueryStatus::Answered => Support::Supported,
            QueryStatus::PredatesQuery => Support::Unsupported,
            _ => Support::Unknown,
        },
        GenerationStep::RxBufLen => features.rx_buf_len.support,
        GenerationStep::Nodev => features.nodev.support,
        GenerationStep::Events => features.events.support,
        GenerationStep::AddArea => from_query(|r| r.ctrl_add_area),
    };
    let steps: Vec<GenerationEntry> = GenerationStep::ALL
        .iter()
        .map(|&step| GenerationEntry {
            step,
            name: step.name(),
            min_kernel: step.min_kernel(),
            support: support(step),
            gives: step.gives(),
        })
        .collect();
    let kernel = steps
        .iter()
        .take_while(|entry| entry.support == Support::Supported)
        .last()
        .map(|entry| entry.min_kernel);
    let missing: Vec<GenerationStep> = steps
        .iter()
        .filter(|entry| entry.support == Support::Unsupported)
        .map(|entry| entry.step)
        .collect();
    let has: Vec<String> = steps
        .iter()
        .map(|entry| {
            let word = match entry.support {
                Support::Supported => "yes",
                Support::Unsupported => "no",
                Support::Unknown => "unknown",
            };
            format!("{} ({}) {word}", entry.name, entry.min_kernel)
        })
        .collect();
    let level = match kernel {
        Some(release)
            if missing.is_empty() && steps.iter().all(|e| e.support == Support::Supported) =>
        {
            format!("Linux {release} level, every zcrx step this probe knows")
        }
        Some(release) => format!("Linux {release} level"),
        None if recv_zc == Support::Unsupported => "no zcrx (needs Linux 6.15+)".to_owned(),
        None => "unknown".to_owned(),
    };
    ZcrxGeneration {
        kernel,
        summary: format!("{level}: {}", has.join(", ")),
        steps,
        missing,
    }
}

/// A NODEV registration touches no NIC, so it is always safe to try where the kernel has it.
fn nodev_trial(features: &ZcrxFeatures) -> TrialOutcome {
    match features.nodev.support {
        Support::Supported => trial_outcome(trial::register_once(QueueBinding::NoDevice)),
        Support::Unsupported => TrialOutcome::NotAttempted {
            reason: "the kernel has no NODEV mode (needs Linux 7.1+)".to_owned(),
        },
        Support::Unknown => TrialOutcome::NotAttempted {
            reason: "NODEV support is unknown because the zcrx query failed".to_owned(),
        },
    }
}

/// Turns the internal trial result into the reported outcome.
pub(crate) fn trial_outcome(result: Result<(), TrialError>) -> TrialOutcome {
    match result {
        Ok(()) => TrialOutcome::Registered,
        Err(TrialError::Refused(error)) => TrialOutcome::Refused {
            errno: Errno::from_io_error(&error),
        },
        Err(TrialError::Setup { step, error }) => TrialOutcome::Failed {
            step: step.to_owned(),
            errno: Errno::from_io_error(&error),
        },
    }
}

/// Plain words for a NODEV trial outcome.
pub(crate) fn describe_nodev_trial(outcome: &TrialOutcome) -> String {
    match outcome {
        TrialOutcome::NotAttempted { reason } => format!("not attempted: {reason}"),
        TrialOutcome::Registered => {
            "registered and torn down: NODEV mode works (copy mode on any TCP socket)".to_owned()
        }
        TrialOutcome::Refused { errno } => match errno.code() {
            libc::EPERM => format!(
                "refused ({}): needs CAP_NET_ADMIN; {CAP_NET_ADMIN_FIX}",
                errno.name()
            ),
            libc::ENOMEM => format!(
                "refused ({}): could not pin the area; raise the locked-memory limit (`ulimit -l`)",
                errno.name()
            ),
            _ => format!("refused with {errno}"),
        },
        TrialOutcome::Failed { step, errno } => format!("could not {step}: {errno}"),
    }
}

/// This thread's CAP_NET_ADMIN, as read.
#[derive(Debug)]
pub(crate) struct CapFacts {
    pub(crate) effective: io::Result<bool>,
    pub(crate) permitted: Option<bool>,
    pub(crate) bounding: Option<bool>,
    /// When this process dropped it (`Zcrx::drop_privileges`), in words.
    pub(crate) dropped: Option<String>,
}

impl CapFacts {
    fn of_this_thread() -> CapFacts {
        CapFacts {
            effective: system::has_cap_net_admin(),
            permitted: system::cap_net_admin_permitted(),
            bounding: system::cap_net_admin_in_bounding_set(),
            dropped: crate::sys::privilege::dropped_net_admin_at(),
        }
    }
}

/// Which operations need CAP_NET_ADMIN, given whether the kernel has zcrx at all.
fn needed_for(recv_zc: Support) -> String {
    // In the kernel source (io_uring/zcrx.c, 6.15 to 7.3) the one `capable(CAP_NET_ADMIN)`
    // check of zcrx is at the top of the registration (io_register_zcrx_ifq, later
    // io_register_zcrx), "it can observe data destined for sockets of other tasks"; importing
    // an exported instance (ZCRX_REG_IMPORT) goes through it too. RECV_ZC, the refill ring and
    // every ZCRX_CTRL operation (FLUSH_RQ, EXPORT, ARM_EVENT, ADD_AREA) check nothing.
    let operations = "registering a zcrx instance (IORING_REGISTER_ZCRX_IFQ, importing an \
                      exported one included); receiving, refills, flushes, event re-arming, \
                      area growth and exports do not, so a server can give it up once its \
                      queues are registered (Zcrx::drop_privileges)";
    match recv_zc {
        Support::Unsupported => {
            format!(
                "nothing on this kernel, which has no zcrx (Linux 6.15+); from 6.15: {operations}"
            )
        }
        _ => operations.to_owned(),
    }
}

pub(crate) fn cap_net_admin_report(facts: CapFacts, recv_zc: Support) -> CapNetAdminReport {
    let yes_no = |value: Option<bool>| match value {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    let sets = format!(
        "permitted: {}, bounding set: {}",
        yes_no(facts.permitted),
        yes_no(facts.bounding)
    );
    let (effective, summary) = match (&facts.effective, &facts.dropped) {
        (Ok(true), _) => (Some(true), format!("effective ({sets})")),
        (Ok(false), Some(when)) => (
            Some(false),
            format!(
                "dropped by this process {when} (Zcrx::drop_privileges): the runtimes built \
                 before keep receiving; building another nic or nodev runtime fails ({sets})"
            ),
        ),
        (Ok(false), None) => (
            Some(false),
            format!("missing ({sets}): zcrx registration needs it; {CAP_NET_ADMIN_FIX}"),
        ),
        (Err(error), _) => (
            None,
            format!(
                "could not read the capability sets: {}",
                Errno::from_io_error(error)
            ),
        ),
    };
    CapNetAdminReport {
        effective,
        permitted: facts.permitted,
        bounding: facts.bounding,
        dropped: facts.dropped,
        needed_for: needed_for(recv_zc),
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_with(register_flags: u64, nr_ctrl_opcodes: u32, features: u32) -> io_uring_query_zcrx {
        io_uring_query_zcrx {
            register_flags,
            area_flags: u64::from(IORING_ZCRX_AREA_DMABUF),
            nr_ctrl_opcodes,
            features,
            rq_hdr_size: 64,
            rq_hdr_alignment: 64,
            ..Default::default()
        }
    }

    #[test]
    fn query_on_7_2_derives_every_feature() {
        let raw = query_with(
            u64::from(ZCRX_REG_IMPORT | ZCRX_REG_NODEV),
            3,
            ZCRX_FEATURE_RX_PAGE_SIZE | ZCRX_FEATURE_EVENT,
        );
        let report = zcrx_query_report("7.3.4", Ok(raw));
        assert_eq!(report.status, QueryStatus::Answered);
        assert_eq!(
            report.summary,
            "register flags IMPORT|NODEV, area flags DMABUF, features RX_PAGE_SIZE|EVENT, \
             nr_ctrl_opcodes 3, ARM_EVENT present, refill header 64 bytes aligned to 64"
        );
        let result = report.result.unwrap();
        assert!(result.register_nodev && result.ctrl_arm_event && result.area_dmabuf);
        let features = derive_features("7.3.4", &report);
        for feature in [
            &features.import,
            &features.rx_buf_len,
            &features.nodev,
            &features.events,
        ] {
            assert_eq!(feature.support, Support::Supported, "{}", feature.summary);
        }
    }

    #[test]
    fn query_on_7_0_lacks_nodev_and_events() {
        let raw = query_with(u64::from(ZCRX_REG_IMPORT), 2, ZCRX_FEATURE_RX_PAGE_SIZE);
        let report = zcrx_query_report("7.0.1", Ok(raw));
        let features = derive_features("7.0.1", &report);
        assert_eq!(features.rx_buf_len.support, Support::Supported);
        assert_eq!(features.nodev.support, Support::Unsupported);
        assert_eq!(features.events.support, Support::Unsupported);
        assert!(
            features.nodev.summary.contains("7.1+"),
            "{}",
            features.nodev.summary
        );
        // The event feature bit without the ARM_EVENT control op is not usable.
        let half = query_with(0, 2, ZCRX_FEATURE_EVENT);
        let features = derive_features("x", &zcrx_query_report("x", Ok(half)));
        assert_eq!(features.events.support, Support::Unsupported);
    }

    #[test]
    fn kernel_without_query_has_no_features() {
        for errno in [libc::EOPNOTSUPP, libc::EINVAL, libc::EBADF] {
            let report = zcrx_query_report("6.18.44", Err(io::Error::from_raw_os_error(errno)));
            assert_eq!(report.status, QueryStatus::PredatesQuery);
            assert!(
                report
                    .summary
                    .contains("kernel 6.18.44 predates the zcrx query (needs 6.19+"),
                "{}",
                report.summary
            );
            let features = derive_features("6.18.44", &report);
            assert_eq!(features.nodev.support, Support::Unsupported);
            assert!(features.nodev.summary.contains("predates"));
        }
        let blocked = zcrx_query_report("6.18", Err(io::Error::from_raw_os_error(libc::EPERM)));
        assert_eq!(blocked.status, QueryStatus::Failed);
        let features = derive_features("6.18", &blocked);
        assert_eq!(features.events.support, Support::Unknown);
        assert!(matches!(
            nodev_trial(&features),
            TrialOutcome::NotAttempted { .. }
        ));
    }

    /// The generation the probe reports for each synthetic kernel personality, fed the query
    /// answer that personality gives (the same answers the runtime's host tests run on).
    #[test]
    fn generation_of_each_kernel_personality() {
        use crate::backend::uring::synthetic::personality::Personality;
        use GenerationStep::{AddArea, CtrlOps, Events, Nodev, Query, RxBufLen};

        let expected = [
            (
                Personality::Linux6_18,
                Some("6.15"),
                vec![CtrlOps, Query, RxBufLen, Nodev, Events, AddArea],
            ),
            (Personality::Linux7_1, Some("7.1"), vec![Events, AddArea]),
            (Personality::Linux7_2, Some("7.2"), vec![AddArea]),
            (Personality::Linux7_3, Some("7.3"), vec![]),
        ];
        for (personality, kernel, missing) in expected {
            let answer = match personality.query() {
                Some(q) => Ok(io_uring_query_zcrx {
                    register_flags: q.register_flags,
                    area_flags: u64::from(IORING_ZCRX_AREA_DMABUF),
                    nr_ctrl_opcodes: q.nr_ctrl_opcodes,
                    features: q.features,
                    rq_hdr_size: q.rq_hdr_size,
                    rq_hdr_alignment: 64,
                    ..Default::default()
                }),
                None => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
            };
            let query = zcrx_query_report(personality.name(), answer);
            let features = derive_features(personality.name(), &query);
            let generation = derive_generation(Support::Supported, &query, &features);
            assert_eq!(
                generation.kernel, kernel,
                "{personality}: {}",
                generation.summary
            );
            assert_eq!(generation.missing, missing, "{personality}");
            // The ADD_AREA step follows the control ops the personality knows.
            assert_eq!(
                generation.missing.contains(&AddArea),
                !personality.ctrl_ops().contains(&"ADD_AREA"),
                "{personality}"
            );
        }
    }

    #[test]
    fn generation_summary_names_every_step_with_its_kernel() {
        let raw = query_with(
            u64::from(ZCRX_REG_IMPORT | ZCRX_REG_NODEV),
            3,
            ZCRX_FEATURE_RX_PAGE_SIZE | ZCRX_FEATURE_EVENT,
        );
        let query = zcrx_query_report("7.2.12", Ok(raw));
        let features = derive_features("7.2.12", &query);
        let generation = derive_generation(Support::Supported, &query, &features);
        assert_eq!(
            generation.summary,
            "Linux 7.2 level: NIC only (6.15) yes, ctrl ops (6.19) yes, query (6.19) yes, \
             rx_buf_len (7.0) yes, NODEV (7.1) yes, events (7.2) yes, ADD_AREA (7.3) no"
        );
        let with_add_area = query_with(
            u64::from(ZCRX_REG_IMPORT | ZCRX_REG_NODEV),
            4,
            ZCRX_FEATURE_RX_PAGE_SIZE | ZCRX_FEATURE_EVENT,
        );
        let query = zcrx_query_report("7.3.4", Ok(with_add_area));
        assert!(query.result.unwrap().ctrl_add_area);
        let generation = derive_generation(
            Support::Supported,
            &query,
            &derive_features("7.3.4", &query),
        );
        assert_eq!(generation.kernel, Some("7.3"));
        assert!(generation
            .summary
            .starts_with("Linux 7.3 level, every zcrx step"));

        // No RECV_ZC: nothing at all; a failed query: only the first step is known.
        let old = zcrx_query_report("6.12", Err(io::Error::from_raw_os_error(libc::EINVAL)));
        let generation =
            derive_generation(Support::Unsupported, &old, &derive_features("6.12", &old));
        assert_eq!(generation.kernel, None);
        assert!(generation
            .summary
            .starts_with("no zcrx (needs Linux 6.15+)"));
        assert_eq!(generation.missing.len(), 7);
        let blocked = zcrx_query_report("7.2", Err(io::Error::from_raw_os_error(libc::EPERM)));
        let generation = derive_generation(
            Support::Supported,
            &blocked,
            &derive_features("7.2", &blocked),
        );
        assert_eq!(generation.kernel, Some("6.15"));
        assert!(generation.missing.is_empty(), "{:?}", generation.missing);
        assert!(
            generation.summary.contains("query (6.19) unknown"),
            "{}",
            generation.summary
        );
    }

    #[test]
    fn flag_names_keep_unknown_bits() {
        let known = [(1, "IMPORT"), (2, "NODEV")];
        assert_eq!(flag_names(0, &known), "none");
        assert_eq!(flag_names(2, &known), "NODEV");
        assert_eq!(flag_names(0x13, &known), "IMPORT|NODEV|0x10");
    }

    #[test]
    fn io_uring_report_explains_seccomp() {
        let error = io::Error::from_raw_os_error(libc::EPERM);
        let report = io_uring_report(Some(0), Some(&error));
        assert!(!report.usable);
        assert_eq!(report.setup_errno, Some(Errno::new(libc::EPERM)));
        assert!(report.summary.contains("seccomp"), "{}", report.summary);
        let fine = io_uring_report(Some(0), None);
        assert!(fine.usable && fine.summary.starts_with("usable"));
    }

    #[test]
    fn cap_net_admin_report_says_what_needs_it_and_how_to_get_it() {
        let facts = |effective: bool, dropped: Option<&str>| CapFacts {
            effective: Ok(effective),
            permitted: Some(effective),
            bounding: Some(true),
            dropped: dropped.map(str::to_owned),
        };
        let held = cap_net_admin_report(facts(true, None), Support::Supported);
        assert_eq!(held.effective, Some(true));
        assert_eq!(
            held.summary,
            "effective (permitted: yes, bounding set: yes)"
        );
        assert!(held.needed_for.starts_with("registering a zcrx instance"));
        assert!(held
            .needed_for
            .contains("flushes, event re-arming, area growth"));

        let missing = cap_net_admin_report(facts(false, None), Support::Supported);
        assert!(
            missing.summary.starts_with("missing (permitted: no"),
            "{}",
            missing.summary
        );
        for way in ["setcap", "AmbientCapabilities=", "setpriv"] {
            assert!(missing.summary.contains(way), "{way}: {}", missing.summary);
        }

        let dropped = cap_net_admin_report(
            facts(false, Some("3.0 s ago (at 2026-11-30 21:03:04 UTC)")),
            Support::Supported,
        );
        assert!(
            dropped
                .summary
                .starts_with("dropped by this process 3.0 s ago"),
            "{}",
            dropped.summary
        );
        assert!(!dropped.summary.contains("setcap"), "{}", dropped.summary);

        let old = cap_net_admin_report(facts(true, None), Support::Unsupported);
        assert!(
            old.needed_for.starts_with("nothing on this kernel"),
            "{}",
            old.needed_for
        );
    }
}
