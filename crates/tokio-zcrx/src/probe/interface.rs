//! Per-interface checks and the verdict.
//!
//! Facts come from sysfs (driver, parent device, rx queues) and netlink (tcp-data-split,
//! hds-thresh, XDP). From them the probe decides whether a trial registration is harmless
//! (it cannot succeed, so the kernel refuses before restarting the queue), runs it if so,
//! and maps the outcome to a [`Verdict`] with a reason and a fix.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::Path;

use super::kernel::{trial_outcome, KernelFacts, CAP_NET_ADMIN_FIX};
use super::trial::{self, Target};
use super::{Errno, InterfaceReport, ProbeOptions, Support, TcpDataSplit, TrialOutcome, Verdict};
use crate::sys::netlink::{
    EthtoolNetlink, RingsInfo, RouteNetlink, TCP_DATA_SPLIT_DISABLED, TCP_DATA_SPLIT_ENABLED,
    TCP_DATA_SPLIT_UNKNOWN,
};

const SYS_CLASS_NET: &str = "/sys/class/net";

/// Drivers that can do zcrx as of Linux 7.3, for messages.
const CAPABLE_DRIVERS: &str = "mlx5, gve, fbnic, bnxt as of Linux 7.3";

/// What the verdict logic needs from the kernel-wide checks.
#[derive(Debug, Clone)]
pub(crate) struct KernelContext {
    pub(crate) release: String,
    pub(crate) recv_zc: Support,
    pub(crate) io_uring_usable: bool,
    pub(crate) io_uring_summary: String,
    pub(crate) nodev: Support,
    pub(crate) cap_net_admin: Option<bool>,
}

impl KernelContext {
    fn from_facts(facts: &KernelFacts) -> Self {
        Self {
            release: facts.release.clone(),
            recv_zc: facts.recv_zc.support,
            io_uring_usable: facts.io_uring.usable,
            io_uring_summary: facts.io_uring.summary.clone(),
            nodev: facts.features.nodev.support,
            cap_net_admin: facts.cap_net_admin.effective,
        }
    }
}

pub(crate) fn probe_interfaces(
    options: &ProbeOptions,
    kernel: &KernelFacts,
) -> Vec<InterfaceReport> {
    let context = KernelContext::from_facts(kernel);
    let names = match &options.interface {
        Some(name) => vec![name.clone()],
        None => list_interfaces(),
    };
    let mut ethtool = EthtoolNetlink::open();
    let mut route = RouteNetlink::open().ok();
    names
        .into_iter()
        .map(|name| {
            let mut report = gather(&name, options.queue, &mut ethtool, route.as_mut());
            finish(
                &mut report,
                &context,
                options.try_register,
                trial::register_once,
            );
            report
        })
        .collect()
}

fn list_interfaces() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(SYS_CLASS_NET)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A name that can be used as one path component under /sys/class/net.
fn is_plausible_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

fn ifindex(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

fn count_rx_queues(dir: &Path) -> Option<u32> {
    let entries = fs::read_dir(dir.join("queues")).ok()?;
    let count = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    u32::try_from(count).ok()
}

fn driver_name(dir: &Path) -> Option<String> {
    let target = fs::read_link(dir.join("device/driver")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Collects the facts; the trial, verdict, reason and fix are filled in by [`finish`].
fn gather(
    name: &str,
    queue: Option<u32>,
    ethtool: &mut io::Result<EthtoolNetlink>,
    route: Option<&mut RouteNetlink>,
) -> InterfaceReport {
    let mut report = InterfaceReport {
        name: name.to_owned(),
        ifindex: None,
        driver: None,
        virtual_device: false,
        rx_queues: None,
        queue,
        tcp_data_split: TcpDataSplit::Unknown,
        hds_thresh: None,
        xdp_attached: None,
        registration: TrialOutcome::NotAttempted {
            reason: String::new(),
        },
        verdict: Verdict::Unknown,
        reason: String::new(),
        fix: None,
        hints: Vec::new(),
        notes: Vec::new(),
    };
    let dir = Path::new(SYS_CLASS_NET).join(name);
    if !is_plausible_name(name) || !dir.exists() {
        return report;
    }
    report.ifindex = ifindex(name);
    // The kernel wants a parent device to DMA into; /sys/class/net/IF/device is that link.
    report.virtual_device = !dir.join("device").exists();
    report.driver = driver_name(&dir);
    report.rx_queues = count_rx_queues(&dir);
    if report.queue.is_none() {
        // The last queue: deployments keep RSS off it and steer the zcrx flow there.
        report.queue = Some(report.rx_queues.unwrap_or(1).saturating_sub(1));
    }

    match ethtool {
        Ok(session) => match session.rings(name) {
            Ok(rings) => apply_rings(&mut report, rings),
            // No ring parameters at all (virtual devices): nothing to split.
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                report.tcp_data_split = TcpDataSplit::Unsupported;
            }
            Err(error) => report.notes.push(format!(
                "could not read ring parameters through ethtool netlink: {}",
                Errno::from_io_error(&error)
            )),
        },
        Err(error) => report.notes.push(format!(
            "ethtool netlink is unavailable, tcp-data-split unknown: {}",
            Errno::from_io_error(error)
        )),
    }

    if let (Some(route), Some(index)) = (route, report.ifindex) {
        match route.xdp_attached(index) {
            Ok(mode) => report.xdp_attached = Some(mode != 0),
            Err(error) => report.notes.push(format!(
                "could not check for XDP programs: {}",
                Errno::from_io_error(&error)
            )),
        }
    }
    report
}

fn apply_rings(report: &mut InterfaceReport, rings: RingsInfo) {
    report.tcp_data_split = match rings.tcp_data_split {
        TCP_DATA_SPLIT_ENABLED => TcpDataSplit::On,
        TCP_DATA_SPLIT_DISABLED => TcpDataSplit::Off,
        TCP_DATA_SPLIT_UNKNOWN => TcpDataSplit::Unsupported,
        other => {
            report
                .notes
                .push(format!("unexpected tcp-data-split value {other}"));
            TcpDataSplit::Unknown
        }
    };
    report.hds_thresh = rings.hds_thresh;
}

/// A visible reason why registration must fail before the kernel touches the queue. Listed
/// in the order the kernel checks them, so the expected errno is the first that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Obstacle {
    /// No parent device: EOPNOTSUPP.
    Virtual,
    /// Queue index at or past the queue count: ERANGE.
    QueueOutOfRange,
    /// Header/data split off, or not supported by the driver: EINVAL.
    SplitNotOn,
    /// A non-zero header/data split threshold: EINVAL.
    HdsThreshold,
    /// An XDP program is attached: EEXIST.
    Xdp,
}

impl Obstacle {
    fn expected_errno(self) -> Errno {
        Errno::new(match self {
            Obstacle::Virtual => libc::EOPNOTSUPP,
            Obstacle::QueueOutOfRange => libc::ERANGE,
            Obstacle::SplitNotOn | Obstacle::HdsThreshold => libc::EINVAL,
            Obstacle::Xdp => libc::EEXIST,
        })
    }
}

fn obstacle(report: &InterfaceReport) -> Option<Obstacle> {
    if report.virtual_device {
        return Some(Obstacle::Virtual);
    }
    if let (Some(queue), Some(count)) = (report.queue, report.rx_queues) {
        if queue >= count {
            return Some(Obstacle::QueueOutOfRange);
        }
    }
    if matches!(
        report.tcp_data_split,
        TcpDataSplit::Off | TcpDataSplit::Unsupported
    ) {
        return Some(Obstacle::SplitNotOn);
    }
    if report.hds_thresh.is_some_and(|threshold| threshold > 0) {
        return Some(Obstacle::HdsThreshold);
    }
    if report.xdp_attached == Some(true) {
        return Some(Obstacle::Xdp);
    }
    None
}

/// A trial the probe will make, or why it won't.
fn plan_trial(
    report: &InterfaceReport,
    context: &KernelContext,
    try_register: bool,
) -> Result<Target, String> {
    let Some(ifindex) = report.ifindex else {
        return Err("the interface does not exist".to_owned());
    };
    match context.recv_zc {
        Support::Supported => {}
        Support::Unsupported => return Err("the kernel has no zcrx".to_owned()),
        Support::Unknown => return Err(
            "cannot tell whether the kernel has zcrx (io_uring unusable or opcode probe failed)"
                .to_owned(),
        ),
    }
    let target = Target::Interface {
        ifindex,
        rx_queue: report.queue.unwrap_or(0),
    };
    if obstacle(report).is_some() || try_register {
        return Ok(target);
    }
    // Nothing visible stops the registration, so it may succeed and restart the queue.
    Err(format!(
        "it could succeed, which briefly restarts rx queue {} of {}; not without try_register",
        report.queue.unwrap_or(0),
        report.name
    ))
}

/// Runs the trial (through `register`, replaceable in tests) and fills in the verdict.
fn finish(
    report: &mut InterfaceReport,
    context: &KernelContext,
    try_register: bool,
    register: impl FnOnce(Target) -> Result<(), trial::TrialError>,
) {
    report.registration = match plan_trial(report, context, try_register) {
        Ok(target) => trial_outcome(register(target)),
        Err(reason) => TrialOutcome::NotAttempted { reason },
    };
    let assessment = assess(report, context);
    report.verdict = assessment.verdict;
    report.reason = assessment.reason;
    report.fix = assessment.fix;
    report.hints.extend(assessment.hints);
}

/// A verdict with its explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Assessment {
    verdict: Verdict,
    reason: String,
    fix: Option<String>,
    hints: Vec<String>,
}

impl Assessment {
    fn new(verdict: Verdict, reason: impl Into<String>, fix: Option<String>) -> Self {
        Self {
            verdict,
            reason: reason.into(),
            fix,
            hints: Vec::new(),
        }
    }
}

/// The verdict from the trial's outcome, or from the facts where there was no usable trial.
fn assess(report: &InterfaceReport, context: &KernelContext) -> Assessment {
    if report.ifindex.is_none() {
        return Assessment::new(
            Verdict::NotFound,
            format!("no interface named {:?} (see `ip link`)", report.name),
            None,
        );
    }
    match &report.registration {
        TrialOutcome::Registered => ready(report),
        TrialOutcome::Refused { errno } if errno.code() == libc::EPERM => {
            without_cap_net_admin(report, context, *errno)
        }
        TrialOutcome::Refused { errno } => explain_errno(report, context, *errno, Evidence::Kernel),
        TrialOutcome::Failed { step, errno } => infer(
            report,
            context,
            Some(&format!(
                "a trial registration was not possible: could not {step}: {errno}"
            )),
        ),
        TrialOutcome::NotAttempted { .. } => infer(report, context, None),
    }
}

/// Where an errno came from: the kernel refusing a trial, or the probe's own reading of the
/// facts (the errno the kernel would give), possibly with a word on why no trial decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evidence<'a> {
    Kernel,
    Facts { trial_note: Option<&'a str> },
}

fn evidence_words(evidence: Evidence<'_>, errno: Errno) -> String {
    match evidence {
        Evidence::Kernel => format!("trial registration: {}", errno.name()),
        Evidence::Facts { trial_note: None } => {
            format!("registration would fail with {}", errno.name())
        }
        Evidence::Facts {
            trial_note: Some(note),
        } => format!("registration would fail with {}; {note}", errno.name()),
    }
}

fn split_fix(report: &InterfaceReport) -> String {
    // hds-thresh only exists where the driver reports it; asking for it elsewhere fails.
    let threshold = if report.hds_thresh.is_some() {
        " hds-thresh 0"
    } else {
        ""
    };
    format!("`ethtool -G {} tcp-data-split on{threshold}`", report.name)
}

fn explain_errno(
    report: &InterfaceReport,
    context: &KernelContext,
    errno: Errno,
    evidence: Evidence<'_>,
) -> Assessment {
    let name = &report.name;
    let queue = report.queue.unwrap_or(0);
    let because = evidence_words(evidence, errno);
    match errno.code() {
        libc::EOPNOTSUPP if report.virtual_device => {
            let mut assessment = Assessment::new(
                Verdict::Unsupported,
                format!("virtual device: there is no NIC behind {name} to receive into ({because})"),
                Some(format!("use an interface on a zcrx-capable NIC (drivers {CAPABLE_DRIVERS})")),
            );
            assessment.hints.push(nodev_hint(context));
            assessment
        }
        libc::EOPNOTSUPP => Assessment::new(
            Verdict::Unsupported,
            format!(
                "driver {} lacks the queue-management API zcrx needs, or its device cannot DMA ({because})",
                report.driver.as_deref().unwrap_or("(none)")
            ),
            Some(format!("use a NIC with a zcrx-capable driver ({CAPABLE_DRIVERS})")),
        ),
        libc::EINVAL => explain_einval(report, &because),
        libc::ERANGE => Assessment::new(
            Verdict::NeedsConfiguration,
            format!(
                "rx queue {queue} is out of range: {name} has {} ({because})",
                match report.rx_queues {
                    Some(1) => "1 rx queue".to_owned(),
                    Some(count) => format!("{count} rx queues"),
                    None => "fewer rx queues".to_owned(),
                }
            ),
            Some(format!(
                "`ethtool -L {name} combined {}`, or pick a lower queue",
                queue.saturating_add(1)
            )),
        ),
        libc::EEXIST if report.xdp_attached == Some(true) => Assessment::new(
            Verdict::NeedsConfiguration,
            format!("an XDP program is attached to {name}, and zcrx excludes XDP ({because})"),
            Some(format!("detach it: `ip link set dev {name} xdp off`")),
        ),
        libc::EEXIST => Assessment::new(
            Verdict::NeedsConfiguration,
            format!(
                "rx queue {queue} is already bound to a memory provider (another zcrx instance or devmem TCP), or an XDP program is attached ({because})"
            ),
            Some("stop the queue's other user or detach the XDP program, or pick another queue".to_owned()),
        ),
        libc::EBUSY => Assessment::new(
            Verdict::NeedsConfiguration,
            format!("an AF_XDP socket uses rx queue {queue} ({because})"),
            Some("close that AF_XDP socket, or pick another queue".to_owned()),
        ),
        libc::ENODEV => Assessment::new(
            Verdict::NotFound,
            format!("no such interface: {name} disappeared during the probe ({because})"),
            None,
        ),
        libc::ENOMEM => Assessment::new(
            Verdict::Unknown,
            format!(
                "the kernel could not allocate or pin the trial's memory ({because}); since Linux 6.17 the area counts against RLIMIT_MEMLOCK"
            ),
            Some("raise the locked-memory limit (`ulimit -l`, LimitMEMLOCK= for systemd services)".to_owned()),
        ),
        libc::EFAULT => Assessment::new(
            Verdict::Unknown,
            format!("the kernel could not read the registration ({because}); that is a bug in this probe, please report it"),
            None,
        ),
        _ => Assessment::new(
            Verdict::Unknown,
            format!("{because}, which the probe cannot explain ({errno})"),
            None,
        ),
    }
}

fn explain_einval(report: &InterfaceReport, because: &str) -> Assessment {
    let fix = Some(split_fix(report));
    match (report.tcp_data_split, report.hds_thresh) {
        (TcpDataSplit::Off, _) => Assessment::new(
            Verdict::NeedsConfiguration,
            format!("tcp-data-split (header/data split) is off ({because})"),
            fix,
        ),
        (TcpDataSplit::Unsupported, _) => Assessment::new(
            Verdict::NeedsConfiguration,
            format!(
                "the driver reports no tcp-data-split (header/data split), which zcrx needs ({because}); if the driver refuses to enable it, this NIC cannot do zcrx"
            ),
            fix,
        ),
        (_, Some(threshold)) if threshold > 0 => Assessment::new(
            Verdict::NeedsConfiguration,
            format!("hds-thresh is {threshold}, zcrx needs 0 ({because})"),
            Some(format!("`ethtool -G {} hds-thresh 0`", report.name)),
        ),
        (TcpDataSplit::On, _) => Assessment::new(
            Verdict::NeedsConfiguration,
            format!(
                "tcp-data-split reads on but was not set explicitly, or hds-thresh is not 0 ({because}); a driver default that reads on is not enough"
            ),
            fix,
        ),
        (TcpDataSplit::Unknown, _) => Assessment::new(
            Verdict::NeedsConfiguration,
            format!("most likely tcp-data-split is not explicitly on or hds-thresh is not 0 ({because})"),
            fix,
        ),
    }
}

/// EPERM says nothing about the NIC: keep what the facts say, and name the missing privilege.
fn without_cap_net_admin(
    report: &InterfaceReport,
    context: &KernelContext,
    errno: Errno,
) -> Assessment {
    let refused = format!(
        "the trial registration was refused with {}: zcrx needs CAP_NET_ADMIN in the initial user namespace",
        errno.name()
    );
    let mut assessment = infer(report, context, Some(&refused));
    if assessment.verdict == Verdict::PreconditionsMet {
        assessment.verdict = Verdict::NeedsConfiguration;
        assessment.reason = format!("preconditions met, but {refused}");
        assessment.fix = Some(CAP_NET_ADMIN_FIX.to_owned());
    } else if assessment.fix.is_none() {
        assessment.fix = Some(CAP_NET_ADMIN_FIX.to_owned());
    }
    assessment
}

/// The verdict from the facts alone; `trial_note` says why no trial registration decided.
fn infer(
    report: &InterfaceReport,
    context: &KernelContext,
    trial_note: Option<&str>,
) -> Assessment {
    if let Some(obstacle) = obstacle(report).filter(|_| context.recv_zc != Support::Unsupported) {
        let evidence = Evidence::Facts { trial_note };
        return explain_errno(report, context, obstacle.expected_errno(), evidence);
    }
    let mut assessment = infer_without_obstacle(report, context);
    if let Some(note) = trial_note {
        if assessment.verdict != Verdict::PreconditionsMet {
            assessment.reason = format!("{} ({note})", assessment.reason);
        }
    }
    assessment
}

fn infer_without_obstacle(report: &InterfaceReport, context: &KernelContext) -> Assessment {
    let queue = report.queue.unwrap_or(0);
    if context.recv_zc == Support::Unsupported {
        return Assessment::new(
            Verdict::Unsupported,
            format!(
                "kernel {} has no zcrx (IORING_OP_RECV_ZC needs Linux 6.15+)",
                context.release
            ),
            Some("upgrade the kernel (6.15+; 7.1+ for NODEV mode, 7.2+ for events)".to_owned()),
        );
    }
    if !context.io_uring_usable || context.recv_zc == Support::Unknown {
        return Assessment::new(
            Verdict::Unknown,
            format!(
                "cannot try a registration: io_uring is {}",
                context.io_uring_summary
            ),
            None,
        );
    }
    match report.tcp_data_split {
        TcpDataSplit::On => {
            let mut assessment = Assessment::new(
                Verdict::PreconditionsMet,
                format!(
                    "preconditions met; run with --try-register to confirm (briefly restarts rx queue {queue} of {})",
                    report.name
                ),
                None,
            );
            assessment.hints.push(format!(
                "zcrx needs tcp-data-split set explicitly ({}): a driver default that merely reads on is refused with EINVAL",
                split_fix(report)
            ));
            assessment.hints.extend(steering_hints(report));
            if context.cap_net_admin == Some(false) {
                assessment
                    .hints
                    .push(format!("registration needs CAP_NET_ADMIN: {CAP_NET_ADMIN_FIX}"));
            }
            assessment
        }
        _ => Assessment::new(
            Verdict::Unknown,
            format!(
                "tcp-data-split could not be read; run with --try-register to find out (if registration succeeds it briefly restarts rx queue {queue} of {})",
                report.name
            ),
            None,
        ),
    }
}

fn ready(report: &InterfaceReport) -> Assessment {
    let mut assessment = Assessment::new(
        Verdict::Ready,
        format!(
            "registered zcrx on rx queue {} of {} and tore it down again (the queue restarted briefly)",
            report.queue.unwrap_or(0),
            report.name
        ),
        None,
    );
    assessment.hints.extend(steering_hints(report));
    assessment
}

/// How to get the wanted flow, and only it, onto the zcrx queue.
fn steering_hints(report: &InterfaceReport) -> Vec<String> {
    let name = &report.name;
    let queue = report.queue.unwrap_or(0);
    let mut hints = Vec::new();
    match report.rx_queues {
        Some(1) => hints.push(format!(
            "{name} has a single rx queue, so all of its traffic would land in the zcrx area, which ordinary sockets cannot read: `ethtool -L {name} combined 2` (or more), then keep RSS off the zcrx queue"
        )),
        Some(count) if queue + 1 == count => hints.push(format!(
            "keep RSS off queue {queue}: `ethtool -X {name} equal {queue}`"
        )),
        Some(count) if queue < count => {
            let weights: Vec<&str> = (0..count)
                .map(|index| if index == queue { "0" } else { "1" })
                .collect();
            hints.push(format!(
                "keep RSS off queue {queue}: `ethtool -X {name} weight {}`",
                weights.join(" ")
            ));
        }
        _ => {}
    }
    hints.push(format!(
        "steer the flow to queue {queue}: `ethtool -N {name} flow-type tcp6 dst-port PORT action {queue}` (tcp4 for IPv4); traffic on other queues still arrives through the copy fallback"
    ));
    hints
}

fn nodev_hint(context: &KernelContext) -> String {
    let availability = match context.nodev {
        Support::Supported => "this kernel has it",
        Support::Unsupported => "not in this kernel",
        Support::Unknown => "unknown here",
    };
    format!(
        "NODEV mode (Linux 7.1+, {availability}) gives zcrx's copy path on any TCP socket, loopback included"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn nic(name: &str) -> InterfaceReport {
        InterfaceReport {
            name: name.to_owned(),
            ifindex: Some(3),
            driver: Some("mlx5_core".to_owned()),
            virtual_device: false,
            rx_queues: Some(4),
            queue: Some(3),
            tcp_data_split: TcpDataSplit::On,
            hds_thresh: Some(0),
            xdp_attached: Some(false),
            registration: TrialOutcome::NotAttempted {
                reason: String::new(),
            },
            verdict: Verdict::Unknown,
            reason: String::new(),
            fix: None,
            hints: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn refused(errno: i32) -> Result<(), trial::TrialError> {
        Err(trial::TrialError::Refused(io::Error::from_raw_os_error(
            errno,
        )))
    }

    /// Runs `finish` with a fake kernel and returns the report and whether it registered.
    fn finish_with(
        mut report: InterfaceReport,
        try_register: bool,
        answer: Result<(), trial::TrialError>,
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
        let setup = Err(trial::TrialError::Setup {
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
        eth.rx_queues = Some(1);
        eth.queue = Some(0);
        assert!(steering_hints(&eth)[0].contains("single rx queue"));
    }
}
