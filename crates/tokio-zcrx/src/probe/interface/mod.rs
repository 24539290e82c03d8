//! Per-interface checks and the verdict.
//!
//! Facts come from sysfs (driver, parent device, rx queues) and netlink (tcp-data-split,
//! hds-thresh, XDP): [`facts`]. From them the probe decides whether a trial registration is
//! harmless (it cannot succeed, so the kernel refuses before restarting the queue), runs it
//! if so, and maps the outcome to a [`Verdict`](super::Verdict) with a reason and a fix:
//! [`verdict`]. The two meet only here.

mod facts;
mod verdict;

#[cfg(test)]
mod tests;

use super::host::HostFacts;
use super::trial;
use super::{InterfaceReport, ProbeOptions};
use crate::sys::netlink::{EthtoolNetlink, RouteNetlink};
use verdict::KernelContext;

pub(crate) fn probe_interfaces(options: &ProbeOptions, host: &HostFacts) -> Vec<InterfaceReport> {
    let context = KernelContext::from_facts(host);
    let names = match &options.interface {
        Some(name) => vec![name.clone()],
        None => facts::list_interfaces(),
    };
    let mut ethtool = EthtoolNetlink::open();
    let mut route = RouteNetlink::open().ok();
    names
        .into_iter()
        .map(|name| {
            let mut report = facts::gather(&name, options.queue, &mut ethtool, route.as_mut());
            verdict::finish(
                &mut report,
                &context,
                options.try_register,
                trial::register_once,
            );
            report
        })
        .collect()
}
