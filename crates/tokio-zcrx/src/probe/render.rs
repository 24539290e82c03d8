//! The human summary: a short header block, then one block per interface.

use std::fmt;

use super::host::describe_nodev_trial;
use super::{
    FeatureReport, InterfaceReport, ProbeReport, QueueReport, Support, TcpDataSplit, TrialOutcome,
    Verdict,
};

impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Support::Supported => "supported",
            Support::Unsupported => "unsupported",
            Support::Unknown => "unknown",
        })
    }
}

impl fmt::Display for TcpDataSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcpDataSplit::On => "on",
            TcpDataSplit::Off => "off",
            TcpDataSplit::Unsupported => "unsupported",
            TcpDataSplit::Unknown => "unknown",
        })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Ready => "ready",
            Verdict::PreconditionsMet => "preconditions met",
            Verdict::NeedsConfiguration => "needs configuration",
            Verdict::Unsupported => "unsupported",
            Verdict::NotFound => "not found",
            Verdict::Unknown => "unknown",
        })
    }
}

impl fmt::Display for TrialOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrialOutcome::NotAttempted { reason } => write!(f, "not attempted: {reason}"),
            TrialOutcome::Registered => f.write_str("registered and torn down"),
            TrialOutcome::Refused { errno } => write!(f, "refused with {}", errno.name()),
            TrialOutcome::Failed { step, errno } => write!(f, "could not {step}: {errno}"),
        }
    }
}

/// A queue's NAPI id and what is bound to it, in words.
fn describe_queue(queue: &QueueReport) -> String {
    let napi = queue
        .napi_id
        .map_or_else(|| "no NAPI id".to_owned(), |id| format!("NAPI id {id}"));
    let irq = queue
        .irq
        .map_or_else(String::new, |irq| format!(", irq {irq}"));
    let mut bound = Vec::new();
    if queue.io_uring_provider {
        bound.push("io_uring (zcrx) provider bound");
    }
    if queue.dmabuf {
        bound.push("devmem dma-buf bound");
    }
    if queue.xsk {
        bound.push("AF_XDP socket bound");
    }
    let bound = if bound.is_empty() {
        "nothing bound".to_owned()
    } else {
        bound.join(", ")
    };
    format!("{napi}{irq}, {bound}")
}

/// Width of the label column, so values line up.
const LABEL: usize = 15;

fn line(f: &mut fmt::Formatter<'_>, label: &str, value: impl fmt::Display) -> fmt::Result {
    writeln!(f, "  {label:<LABEL$} {value}")
}

fn feature_word(name: &str, feature: &FeatureReport) -> String {
    match feature.support {
        Support::Supported => format!("{name} yes"),
        Support::Unsupported => format!("{name} no (needs {}+)", feature.min_kernel),
        Support::Unknown => format!("{name} unknown (needs {}+)", feature.min_kernel),
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "zcrx probe, kernel {}", self.kernel_release)?;
        line(f, "io_uring", &self.io_uring.summary)?;
        line(f, "RECV_ZC", &self.recv_zc.summary)?;
        line(f, "zcrx query", &self.zcrx_query.summary)?;
        let features = [
            feature_word("import", &self.features.import),
            feature_word("rx_buf_len", &self.features.rx_buf_len),
            feature_word("nodev", &self.features.nodev),
            feature_word("events", &self.features.events),
        ];
        line(f, "features", features.join(", "))?;
        line(f, "generation", &self.generation.summary)?;
        for entry in &self.generation.steps {
            if self.generation.missing.contains(&entry.step) {
                line(
                    f,
                    "missing",
                    format!(
                        "{} (Linux {}+): {}",
                        entry.name, entry.min_kernel, entry.gives
                    ),
                )?;
            }
        }
        line(f, "NODEV trial", describe_nodev_trial(&self.nodev_trial))?;
        line(f, "CAP_NET_ADMIN", &self.cap_net_admin.summary)?;
        line(f, "needed for", &self.cap_net_admin.needed_for)?;
        if self.interfaces.is_empty() {
            writeln!(f, "\nno network interfaces found in /sys/class/net")?;
        }
        for interface in &self.interfaces {
            writeln!(f)?;
            render_interface(f, interface)?;
        }
        Ok(())
    }
}

fn render_interface(f: &mut fmt::Formatter<'_>, interface: &InterfaceReport) -> fmt::Result {
    writeln!(f, "{}: {}", interface.name, interface.verdict)?;
    if interface.verdict != Verdict::NotFound {
        let device = match (&interface.driver, interface.virtual_device) {
            (_, true) => "virtual device (no parent device)".to_owned(),
            (Some(driver), false) => format!("driver {driver}"),
            (None, false) => "no driver bound".to_owned(),
        };
        let queues = match interface.rx_queues {
            Some(1) => "1 rx queue".to_owned(),
            Some(count) => format!("{count} rx queues"),
            None => "rx queues unknown".to_owned(),
        };
        let queue = interface
            .queue
            .map_or_else(String::new, |queue| format!(", probing queue {queue}"));
        let xdp = if interface.xdp_attached == Some(true) {
            ", XDP program attached"
        } else {
            ""
        };
        line(f, "device", format!("{device}, {queues}{queue}{xdp}"))?;
        let threshold = interface
            .hds_thresh
            .map_or_else(String::new, |threshold| format!(", hds-thresh {threshold}"));
        line(
            f,
            "tcp-data-split",
            format!("{}{threshold}", interface.tcp_data_split),
        )?;
    }
    line(f, "reason", &interface.reason)?;
    if let Some(fix) = &interface.fix {
        line(f, "fix", fix)?;
    }
    for hint in &interface.hints {
        line(f, "hint", hint)?;
    }
    for exposure in &interface.exposure {
        line(f, "exposure", exposure)?;
    }
    for queue in &interface.queues {
        line(f, &format!("rx queue {}", queue.id), describe_queue(queue))?;
    }
    if let Some(steering) = &interface.steering {
        let group = match steering.queues {
            1 => format!("queue {}", steering.first_queue),
            count => format!(
                "queues {}-{}",
                steering.first_queue,
                steering.first_queue + count - 1
            ),
        };
        line(
            f,
            "steering",
            format!(
                "to steer port PORT to {group}: n-tuple rules {}, RSS {}",
                steering.ntuple, steering.rss
            ),
        )?;
        for command in &steering.commands {
            line(f, "", command)?;
        }
    }
    for note in &interface.notes {
        line(f, "note", note)?;
    }
    Ok(())
}
