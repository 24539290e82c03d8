//! What the probe reads about one interface: sysfs (driver, parent device, rx queues) and
//! netlink (tcp-data-split, hds-thresh, XDP). No judgement here; see `verdict`.

use std::fs;
use std::io;
use std::path::Path;

use super::super::queues::steering_report;
use super::super::{Errno, InterfaceReport, Support, TcpDataSplit, TrialOutcome, Verdict};
use crate::sys::netlink::{
    EthtoolNetlink, RingsInfo, RouteNetlink, TCP_DATA_SPLIT_DISABLED, TCP_DATA_SPLIT_ENABLED,
    TCP_DATA_SPLIT_UNKNOWN,
};

use super::verdict::describe_exposure;
use crate::sys::steering;

const SYS_CLASS_NET: &str = "/sys/class/net";

pub(super) fn list_interfaces() -> Vec<String> {
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
pub(super) fn is_plausible_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
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

/// A report on `name` that knows nothing yet: what [`gather`] fills in.
pub(super) fn unknown_interface(name: &str, queue: Option<u32>) -> InterfaceReport {
    InterfaceReport {
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
        exposure: Vec::new(),
        queues: Vec::new(),
        steering: None,
        notes: Vec::new(),
    }
}

/// Collects the facts; the trial, verdict, reason and fix are filled in by
/// [`finish`](super::verdict::finish).
pub(super) fn gather(
    name: &str,
    queue: Option<u32>,
    ethtool: &mut io::Result<EthtoolNetlink>,
    route: Option<&mut RouteNetlink>,
) -> InterfaceReport {
    let mut report = unknown_interface(name, queue);
    let dir = Path::new(SYS_CLASS_NET).join(name);
    if !is_plausible_name(name) || !dir.exists() {
        return report;
    }
    report.ifindex = crate::sys::ifindex(name).ok();
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

    if !report.virtual_device {
        if let Some(queue) = report.queue {
            let indirection = steering::rss_indirection(name);
            let rules = steering::ntuple_rules(name);
            let support = |answer: Result<(), &io::Error>| match answer {
                Ok(()) => Support::Supported,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Support::Unsupported,
                Err(_) => Support::Unknown,
            };
            if let Some(rx_queues) = report.rx_queues {
                report.steering = Some(steering_report(
                    name,
                    queue,
                    rx_queues,
                    support(rules.as_ref().map(|_| ())),
                    support(indirection.as_ref().map(|_| ())),
                ));
            }
            report.exposure = describe_exposure(name, queue, report.rx_queues, indirection, rules);
        }
    }

    match crate::probe::rx_queues(name) {
        Ok(queues) => report.queues = queues,
        Err(error) => report.notes.push(format!(
            "could not read the queues' NAPI ids and providers through netdev netlink: {}",
            Errno::from_io_error(&error)
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
