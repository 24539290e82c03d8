//! From an interface's facts and the host's to a verdict: whether a trial registration is
//! harmless, the trial (through a function tests replace), and the verdict with its reason,
//! fix and hints.

use std::io;

use super::super::host::{trial_outcome, HostFacts, CAP_NET_ADMIN_FIX};
use super::super::trial::TrialError;
use super::super::{Errno, InterfaceReport, Support, TcpDataSplit, TrialOutcome, Verdict};
use crate::sys::registration::QueueBinding;
use crate::sys::steering::{RuleTarget, SteeringRule};

/// Drivers that can do zcrx as of Linux 7.3, for messages.
const CAPABLE_DRIVERS: &str = "mlx5, gve, fbnic, bnxt as of Linux 7.3";

/// What the verdict logic needs from the kernel-wide checks.
#[derive(Debug, Clone)]
pub(super) struct KernelContext {
    pub(super) release: String,
    pub(super) recv_zc: Support,
    pub(super) io_uring_usable: bool,
    pub(super) io_uring_summary: String,
    pub(super) nodev: Support,
    pub(super) cap_net_admin: Option<bool>,
}

impl KernelContext {
    pub(super) fn from_facts(facts: &HostFacts) -> Self {
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
) -> Result<QueueBinding, String> {
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
    let binding = QueueBinding::Interface {
        ifindex,
        rx_queue: report.queue.unwrap_or(0),
    };
    if obstacle(report).is_some() || try_register {
        return Ok(binding);
    }
    // Nothing visible stops the registration, so it may succeed and restart the queue.
    Err(format!(
        "it could succeed, which briefly restarts rx queue {} of {}; not without try_register",
        report.queue.unwrap_or(0),
        report.name
    ))
}

/// Runs the trial (through `register`, replaceable in tests) and fills in the verdict.
pub(super) fn finish(
    report: &mut InterfaceReport,
    context: &KernelContext,
    try_register: bool,
    register: impl FnOnce(QueueBinding) -> Result<(), TrialError>,
) {
    report.registration = match plan_trial(report, context, try_register) {
        Ok(binding) => trial_outcome(register(binding)),
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
    // Only a threshold above 0 needs setting: hds-thresh only exists where the driver reports
    // it (asking for it elsewhere fails), and ethtool 6.14 and older do not know the option
    // at all (`unknown parameter 'hds-thresh'`), so it is not asked for when already 0.
    let threshold = if report.hds_thresh.is_some_and(|threshold| threshold != 0) {
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
            Some(format!(
                "detach it: `ip link set dev {name} xdp off` (`xdpgeneric off` for a generic \
                 one; one attached through a BPF link, as libxdp does, goes when its owner \
                 closes it: `bpftool net show dev {name}` names it)"
            )),
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
pub(super) fn steering_hints(report: &InterfaceReport) -> Vec<String> {
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
    hints.push(format!(
        "every packet steered to queue {queue}, by RSS or by any rule, is written into the zcrx process's memory whatever socket it is for: check that `ethtool -x {name}` leaves queue {queue} out and that no rule in `ethtool -n {name}` sends more than the service's port there (docs/nic-setup.md, Security)"
    ));
    hints
}

/// What else reaches `queue` of `name`, from its RSS indirection table and n-tuple rules (or
/// why that cannot be told).
pub(super) fn describe_exposure(
    name: &str,
    queue: u32,
    rx_queues: Option<u32>,
    rss: io::Result<Vec<u32>>,
    rules: io::Result<Vec<SteeringRule>>,
) -> Vec<String> {
    let mut words = Vec::new();
    match rss {
        _ if rx_queues == Some(1) => words.push(format!(
            "{name} has a single rx queue: every packet it receives, for any socket, would land in the zcrx area"
        )),
        Ok(table) if table.is_empty() => {}
        Ok(table) => {
            let hits = table.iter().filter(|&&entry| entry == queue).count();
            words.push(if hits == 0 {
                format!("RSS leaves queue {queue} out (none of {} indirection entries)", table.len())
            } else {
                format!(
                    "RSS hashes flows of every service to queue {queue} ({hits} of {} indirection entries): their packets would land in the zcrx area; take the queue out of the default RSS context (hints)",
                    table.len()
                )
            });
        }
        Err(error) => words.push(format!(
            "cannot tell whether RSS hashes other flows to queue {queue}: the RSS indirection table is unreadable ({}; `ethtool -x {name}`)",
            Errno::from_io_error(&error)
        )),
    }
    match rules {
        Ok(rules) => {
            let mut to_queue = 0;
            for rule in rules {
                let SteeringRule {
                    location,
                    target,
                    tcp_dst_port,
                } = rule;
                match (target, tcp_dst_port) {
                    (RuleTarget::Queue(q), Some(port)) if q == queue => {
                        to_queue += 1;
                        words.push(format!(
                            "n-tuple rule {location} sends TCP destination port {port} to queue {queue}"
                        ));
                    }
                    (RuleTarget::Queue(q), None) if q == queue => {
                        to_queue += 1;
                        words.push(format!(
                            "n-tuple rule {location} sends more than one TCP port to queue {queue} (it matches no single TCP destination port): other traffic would land in the zcrx area"
                        ));
                    }
                    (RuleTarget::RssContext { context, offset }, _) => words.push(format!(
                        "n-tuple rule {location} spreads what it matches over RSS context {context} from queue offset {offset}: if that context reaches queue {queue}, all of it lands in the zcrx area (`ethtool -x {name} context {context}`)"
                    )),
                    _ => {}
                }
            }
            if to_queue == 0 {
                words.push(format!("no n-tuple rule sends anything to queue {queue}"));
            }
        }
        Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => words.push(
            "the driver has no n-tuple rules (EOPNOTSUPP): only RSS steers flows to queues"
                .to_owned(),
        ),
        Err(error) => words.push(format!(
            "the n-tuple rules are unreadable ({}; `ethtool -n {name}`)",
            Errno::from_io_error(&error)
        )),
    }
    words
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
