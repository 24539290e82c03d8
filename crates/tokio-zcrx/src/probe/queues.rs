//! Per-queue facts (`netdev` generic netlink) and the steering commands for a queue group.

use std::io;
use std::os::fd::AsFd;

use super::{QueueReport, SteeringReport, Support};
use crate::sys::netdev::{NetdevNetlink, RxQueueInfo};

/// Every receive queue of `interface` as the kernel reports it (`NETDEV_CMD_QUEUE_GET`): its
/// NAPI id and what is bound to it. Needs no privilege. Empty while the interface is down (the
/// kernel lists the queues of running interfaces only).
///
/// Errors: `ENODEV` for no such interface, `ENOENT` on kernels without the `netdev` family
/// (before 6.5).
///
/// ```no_run
/// for queue in tokio_zcrx::probe::rx_queues("eth0")? {
///     println!(
///         "rx queue {}: NAPI id {:?}, zcrx bound: {}",
///         queue.id, queue.napi_id, queue.io_uring_provider
///     );
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn rx_queues(interface: &str) -> io::Result<Vec<QueueReport>> {
    let ifindex = crate::sys::ifindex(interface)?;
    let mut netdev = NetdevNetlink::open()?;
    let queues = netdev.rx_queues(ifindex)?;
    Ok(queues
        .into_iter()
        .map(|info| queue_report(info, &mut netdev))
        .collect())
}

fn queue_report(info: RxQueueInfo, netdev: &mut NetdevNetlink) -> QueueReport {
    // The interrupt is a hint for placing the queue's driver thread; a NAPI instance the
    // kernel cannot describe just has none.
    let irq = info
        .napi_id
        .and_then(|napi| netdev.napi(napi).ok())
        .and_then(|napi| napi.irq);
    QueueReport {
        id: info.id,
        napi_id: info.napi_id,
        io_uring_provider: info.io_uring,
        dmabuf: info.dmabuf.is_some(),
        xsk: info.xsk,
        irq,
    }
}

/// The NAPI instance (a receive queue's poller) the last packet of `socket` arrived through:
/// `SO_INCOMING_NAPI_ID`. `None` until the socket has received a packet through one (the
/// handshake's last ACK usually sets it) and for sockets whose packets come through no NAPI
/// instance, such as loopback's. Compare it with [`QueueReport::napi_id`] to tell which
/// receive queue a connection's packets land on.
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:9000").await?;
/// let (socket, _) = listener.accept().await?;
/// let queues = tokio_zcrx::probe::rx_queues("eth0")?;
/// let napi = tokio_zcrx::probe::incoming_napi_id(&socket)?;
/// let queue = queues.iter().find(|q| q.napi_id.is_some() && q.napi_id == napi);
/// println!("this connection arrives on rx queue {:?}", queue.map(|q| q.id));
/// # Ok(())
/// # }
/// ```
pub fn incoming_napi_id(socket: &impl AsFd) -> io::Result<Option<u32>> {
    crate::sys::netdev::incoming_napi_id(socket.as_fd())
}

/// The ethtool commands that steer one port's TCP traffic to the queue group `first..rx_queues`
/// of `interface` and keep default RSS on the queues before it, with what the driver supports.
pub(super) fn steering_report(
    interface: &str,
    first: u32,
    rx_queues: u32,
    ntuple: Support,
    rss: Support,
) -> SteeringReport {
    let mut commands = vec![format!("ethtool -G {interface} tcp-data-split on")];
    let group = rx_queues.saturating_sub(first);
    if first == 0 || group == 0 {
        // Every queue is in the group: RSS spreads every flow over them, nothing to steer.
        return SteeringReport {
            first_queue: first,
            queues: group.max(1).min(rx_queues.max(1)),
            ntuple,
            rss,
            commands,
        };
    }
    commands.push(format!("ethtool -K {interface} ntuple on"));
    commands.push(format!("ethtool -X {interface} equal {first}"));
    if group == 1 {
        commands.push(format!(
            "ethtool -N {interface} flow-type tcp6 dst-port PORT action {first}"
        ));
        commands.push(format!(
            "ethtool -N {interface} flow-type tcp4 dst-port PORT action {first}"
        ));
    } else {
        commands.push(format!(
            "ethtool -X {interface} context new start {first} equal {group}"
        ));
        commands.push(format!(
            "ethtool -N {interface} flow-type tcp6 dst-port PORT context CONTEXT"
        ));
        commands.push(format!(
            "ethtool -N {interface} flow-type tcp4 dst-port PORT context CONTEXT"
        ));
    }
    SteeringReport {
        first_queue: first,
        queues: group,
        ntuple,
        rss,
        commands,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{run, ProbeOptions, Verdict};

    #[test]
    fn a_group_of_several_queues_gets_an_rss_context_and_a_rule() {
        let report = steering_report("eth0", 4, 8, Support::Supported, Support::Supported);
        assert_eq!((report.first_queue, report.queues), (4, 4));
        assert_eq!(
            report.commands,
            [
                "ethtool -G eth0 tcp-data-split on",
                "ethtool -K eth0 ntuple on",
                "ethtool -X eth0 equal 4",
                "ethtool -X eth0 context new start 4 equal 4",
                "ethtool -N eth0 flow-type tcp6 dst-port PORT context CONTEXT",
                "ethtool -N eth0 flow-type tcp4 dst-port PORT context CONTEXT",
            ]
        );
    }

    #[test]
    fn one_queue_gets_a_rule_with_an_action() {
        let report = steering_report("eth1", 3, 4, Support::Unsupported, Support::Unknown);
        assert_eq!((report.first_queue, report.queues), (3, 1));
        assert_eq!(report.ntuple, Support::Unsupported);
        assert_eq!(
            report.commands[2..],
            [
                "ethtool -X eth1 equal 3",
                "ethtool -N eth1 flow-type tcp6 dst-port PORT action 3",
                "ethtool -N eth1 flow-type tcp4 dst-port PORT action 3",
            ]
        );
    }

    #[test]
    fn every_queue_in_the_group_needs_no_steering() {
        let report = steering_report("nsim0", 0, 4, Support::Unsupported, Support::Unsupported);
        assert_eq!((report.first_queue, report.queues), (0, 4));
        assert_eq!(report.commands, ["ethtool -G nsim0 tcp-data-split on"]);
    }

    /// A probe report of this machine with one constructed NIC in it.
    fn report_with_nic() -> crate::probe::ProbeReport {
        let mut report = run(&ProbeOptions::new().interface("lo"));
        let nic = &mut report.interfaces[0];
        nic.name = "eth0".to_owned();
        nic.verdict = Verdict::PreconditionsMet;
        nic.queues = vec![
            QueueReport {
                id: 0,
                napi_id: Some(8193),
                io_uring_provider: false,
                dmabuf: false,
                xsk: false,
                irq: Some(42),
            },
            QueueReport {
                id: 1,
                napi_id: Some(8194),
                io_uring_provider: true,
                dmabuf: false,
                xsk: false,
                irq: None,
            },
        ];
        nic.steering = Some(steering_report(
            "eth0",
            1,
            2,
            Support::Supported,
            Support::Supported,
        ));
        report
    }

    #[test]
    fn renders_queues_and_steering() {
        let text = report_with_nic().to_string();
        for expected in [
            "  rx queue 0      NAPI id 8193, irq 42, nothing bound\n",
            "  rx queue 1      NAPI id 8194, io_uring (zcrx) provider bound\n",
            "  steering        to steer port PORT to queue 1: n-tuple rules supported, RSS supported\n",
            "                  ethtool -N eth0 flow-type tcp6 dst-port PORT action 1\n",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn queues_and_steering_serialize_with_the_documented_names() {
        let json = serde_json::to_value(report_with_nic()).unwrap();
        let nic = &json["interfaces"][0];
        assert_eq!(nic["queues"][1]["napi_id"], 8194);
        assert_eq!(nic["queues"][1]["io_uring_provider"], true);
        assert_eq!(nic["queues"][0]["irq"], 42);
        assert_eq!(nic["queues"][1]["irq"], serde_json::Value::Null);
        assert_eq!(nic["steering"]["first_queue"], 1);
        assert_eq!(nic["steering"]["queues"], 1);
        assert_eq!(nic["steering"]["ntuple"], "supported");
        assert_eq!(nic["steering"]["commands"][2], "ethtool -X eth0 equal 1");
    }

    #[test]
    fn loopback_has_one_queue_without_napi_and_no_steering() {
        let report = run(&ProbeOptions::new().interface("lo"));
        let lo = &report.interfaces[0];
        assert!(lo.steering.is_none(), "virtual device: {:?}", lo.steering);
        // lo is up and has one rx queue, without a NAPI instance (a kernel without the netdev
        // family says so in a note instead).
        match lo.queues.as_slice() {
            [queue] => assert_eq!(
                (queue.id, queue.napi_id, queue.io_uring_provider),
                (0, None, false)
            ),
            [] => assert!(
                lo.notes.iter().any(|n| n.contains("netdev netlink")),
                "{:?}",
                lo.notes
            ),
            more => panic!("lo has one rx queue, not {more:?}"),
        }
    }
}
