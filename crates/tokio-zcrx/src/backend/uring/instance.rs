//! Setting up the ring and registering the zcrx interface queue, with feature detection and
//! errors that say what to do. Runs on the driver thread: with SINGLE_ISSUER the ring belongs
//! to the thread that created it.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use zcrx_core::query::QueryFeatures;
use zcrx_core::user_data::UserData;
use zcrx_sys::opcode_probe::probe_opcode_supported;
use zcrx_sys::query::query_zcrx;
use zcrx_sys::ring::IORING_OP_RECV_ZC;

use super::ring::Capabilities;
use crate::config::{self, EventsPolicy, GrowthPlan, Target, UringConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::probe::{self, InterfaceReport, ProbeOptions, Verdict};
use crate::sys::fork::RingForkGuard;
use crate::sys::hugepages::HugePageFacts;
use crate::sys::mem::Mapping;
use crate::sys::netdev::{wait_for_release, NetdevNetlink, ReleaseWait, RxQueueInfo};
use crate::sys::netlink::RouteNetlink;
use crate::sys::page_size;
use crate::sys::privilege::{self, CAP_NET_ADMIN_FIX};
use crate::sys::registration::{
    AreaBacking, QueueBinding, RegisterError, Ring, SetupStep, ZcrxInstance, ZcrxRequest, ZcrxRing,
};

/// A registered queue: the ring, and the memory the kernel shares with us.
pub(crate) struct Instance {
    pub(crate) ring: Ring,
    /// Closes the ring's descriptor in forked children; dropped before the ring.
    pub(crate) fork_guard: RingForkGuard,
    pub(crate) area: Mapping,
    pub(crate) region: Mapping,
    pub(crate) layout: SharedLayout,
    pub(crate) zcrx_id: u32,
    pub(crate) nodev: bool,
    pub(crate) caps: Capabilities,
    pub(crate) description: String,
    /// The most TCP payload one segment on the bound interface carries without receive
    /// offloads that merge segments (its MTU less 40 bytes of IPv4 and TCP headers): each
    /// segment lands in a chunk of its own. `None` in NODEV mode, or if the MTU is unknown.
    pub(crate) segment_payload: Option<u32>,
    /// The growth policy, if asked for and this kernel can add areas.
    pub(crate) growth: Option<GrowthPlan>,
    /// The policy was asked for in auto mode and this kernel cannot add areas: why, for
    /// `ModeSelection::unavailable`.
    pub(crate) growth_refused: Option<String>,
}

/// Where things are in the area and the refill region, as the kernel reported.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedLayout {
    pub(crate) area_token: u64,
    pub(crate) chunk_size: u32,
    pub(crate) rq_entries: u32,
    pub(crate) rq_head_offset: usize,
    pub(crate) rq_tail_offset: usize,
    pub(crate) rqes_offset: usize,
    /// Offset of the kernel's `zcrx_stats` in the region, when events are on.
    pub(crate) stats_offset: Option<usize>,
}

/// What the kernel can do, detected before registering: `None` before 6.19, which has no
/// zcrx query (and none of the features it reports either).
fn detect_features() -> Option<QueryFeatures> {
    query_zcrx()
        .ok()
        .map(|answer| QueryFeatures::decode(&answer))
}

fn release() -> String {
    crate::sys::kernel_release().unwrap_or_else(|| "unknown".into())
}

fn too_old(feature: &str, needs: &str) -> Error {
    Error::new(
        ErrorKind::KernelTooOld,
        format!(
            "{feature} needs Linux {needs} or later; this kernel is {}. Run \
             `cargo run --example probe` to see what it supports",
            release()
        ),
    )
}

/// Why a new file descriptor could not be had, if that is why `error` happened: EMFILE and
/// ENFILE become [`ErrorKind::TooManyOpenFiles`] naming the limit to raise.
pub(crate) fn out_of_descriptors(what: &str, error: &io::Error) -> Option<Error> {
    let message = match error.raw_os_error()? {
        libc::EMFILE => format!(
            "cannot create {what}: this process has as many files open as RLIMIT_NOFILE \
             allows (EMFILE); close unused descriptors or raise the limit (`ulimit -n`, \
             LimitNOFILE= in systemd)"
        ),
        libc::ENFILE => format!(
            "cannot create {what}: the system-wide limit on open files is reached (ENFILE); \
             raise `sysctl fs.file-max` or close files in other processes"
        ),
        _ => return None,
    };
    Some(Error::new(ErrorKind::TooManyOpenFiles, message))
}

/// The error for a ring the kernel would not create.
fn ring_creation_error(cq_entries: u32, error: io::Error) -> Error {
    if let Some(err) = out_of_descriptors("the io_uring", &error) {
        return err.with_source(error);
    }
    let errno = probe::Errno::from_io_error(&error);
    if errno.code() == libc::ENOMEM {
        return Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "cannot create an io_uring with a {cq_entries}-entry CQ: the kernel is out of \
                 memory for its rings (or the cgroup's memory limit is reached); free memory or \
                 use a smaller .cq_entries"
            ),
        )
        .with_source(error);
    }
    let why = if errno.code() == libc::EINVAL {
        // The sizes were validated against the kernel's limits, and a plain ring works on
        // every kernel with io_uring: what can be refused is one of the flags zcrx needs.
        format!(
            "the kernel refused a ring with SINGLE_ISSUER | DEFER_TASKRUN | CQE32 and a \
             {cq_entries}-entry CQ (zcrx needs Linux 6.15+; this is {})",
            release()
        )
    } else {
        probe::explain_io_uring_setup_failure(errno)
    };
    Error::new(
        ErrorKind::IoUringUnavailable,
        format!("cannot create an io_uring: {why}"),
    )
    .with_source(error)
}

/// Creates the ring and registers the queue described by `config`.
pub(crate) fn register(config: &UringConfig) -> Result<Instance> {
    // After Zcrx::drop_privileges the kernel would answer EPERM (or refuse the ring itself
    // under kernel.io_uring_disabled = 1): say why before creating anything.
    if let Some(dropped) = privilege::registration_after_drop(&describe_target(&config.target)) {
        return Err(dropped);
    }
    let ring =
        ZcrxRing::new(config.cq_entries).map_err(|e| ring_creation_error(config.cq_entries, e))?;
    let recv_zc = probe_opcode_supported(ring.ring.as_fd(), IORING_OP_RECV_ZC).unwrap_or(false);
    if !recv_zc {
        return Err(too_old(
            "io_uring zero-copy receive (IORING_OP_RECV_ZC)",
            "6.15",
        ));
    }
    let queried = detect_features();
    let features = queried.unwrap_or_default();
    let (binding, description) = match &config.target {
        Target::NoDevice => {
            if !features.register_nodev {
                return Err(too_old("the device-less mode (ZCRX_REG_NODEV)", "7.1"));
            }
            (QueueBinding::NoDevice, "no device (NODEV mode)".to_string())
        }
        Target::Interface { name, queue } => {
            let index = ifindex(name)?;
            (
                QueueBinding::Interface {
                    ifindex: index,
                    rx_queue: *queue,
                },
                format!("{name} rx queue {queue}"),
            )
        }
        Target::InterfaceIndex { index, queue } => (
            QueueBinding::Interface {
                ifindex: *index,
                rx_queue: *queue,
            },
            format!("interface #{index} rx queue {queue}"),
        ),
    };
    let events = match config.events {
        EventsPolicy::Disabled => false,
        EventsPolicy::IfSupported => features.events(),
        EventsPolicy::Required if !features.events() => {
            return Err(too_old("zcrx events and copy statistics", "7.2"))
        }
        EventsPolicy::Required => true,
    };
    let (growth, growth_refused) = growth_on(config, features.ctrl_add_area)?;
    if config.custom_chunk && !features.rx_page_size {
        return Err(too_old(
            &format!("a chunk size of {} bytes (rx_buf_len)", config.chunk_size),
            "7.0",
        ));
    }
    if config.custom_chunk && binding == QueueBinding::NoDevice {
        // The kernel refuses rx_buf_len without a device (EOPNOTSUPP); say so before
        // asking for huge pages the mode could never use.
        return Err(Error::new(
            ErrorKind::ChunkSizeUnsupported,
            format!(
                "the device-less mode (NODEV) takes only one-page chunks, not {} bytes (the \
                 kernel copies into the area, so larger chunks would save nothing): omit \
                 .chunk_size, or use .chunk_size({}), or a NIC queue whose driver supports \
                 rx page sizes",
                config.chunk_size,
                page_size()
            ),
        ));
    }
    // Chunks larger than a page need huge pages: decided (and explained if there are too few)
    // before anything is mapped.
    let facts = HugePageFacts::read();
    let backing = config::plan_area_backing(config, &facts)?;
    if config.custom_chunk {
        tracing::info!(
            chunk_size = config.chunk_size,
            area_size = config.area_size,
            huge_pages = config::huge_pages_needed(config.area_size),
            ?backing,
            free = ?facts.pool.map(|pool| pool.available()),
            thp = facts.thp.name(),
            "backing the receive area with 2 MiB huge pages"
        );
    }

    let segment_payload = match binding {
        QueueBinding::NoDevice => None,
        // An unknown MTU only makes budgeted requests assume full chunks at first.
        QueueBinding::Interface { ifindex, .. } => crate::sys::interface_mtu(ifindex)
            .ok()
            .map(|mtu| mtu.saturating_sub(40).max(1)),
    };
    let request = ZcrxRequest {
        binding,
        area_size: config.area_size,
        backing,
        refill_entries: config.refill_entries,
        rx_buf_len: if config.custom_chunk {
            config.chunk_size
        } else {
            0
        },
        event_user_data: events.then(|| UserData::EVENT.as_u64()),
    };
    let instance = register_waiting_out_teardown(ring, &request, config)?.map_err(|e| match e {
        RegisterError::Setup {
            step: SetupStep::MapArea,
            error,
        } if backing != AreaBacking::Pages => Error::new(
            ErrorKind::HugePagesUnavailable,
            format!(
                "cannot map the {} byte receive area with huge pages ({backing:?}): {}",
                config.area_size,
                // What is free now, after the attempt (another process may have taken them).
                config::huge_page_shortage(config, &HugePageFacts::read(), None)
            ),
        )
        .with_source(error),
        RegisterError::Setup {
            step: SetupStep::MapArea,
            error,
        } => Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "cannot map a {} byte receive area: reduce the area size",
                config.area_size
            ),
        )
        .with_source(error),
        RegisterError::NotHugeBacked { backed, .. } => Error::new(
            ErrorKind::HugePagesUnavailable,
            config::huge_page_shortage(config, &facts, Some(backed)),
        ),
        RegisterError::Setup {
            step: SetupStep::MapRegion,
            error,
        } => Error::new(ErrorKind::OutOfMemory, "cannot map the refill ring region")
            .with_source(error),
        RegisterError::Setup {
            step: SetupStep::ExcludeFromFork,
            error,
        } => Error::new(
            ErrorKind::Kernel,
            "madvise(MADV_DONTFORK) on the receive area failed",
        )
        .with_source(error),
        RegisterError::Refused(error) => explain_refusal(&config.target, config, error),
    })?;
    // The ring's part of the region ends where the statistics begin.
    let ring_layout = instance.ring_layout().map_err(|e| {
        let offsets = instance.offsets;
        Error::new(
            ErrorKind::Kernel,
            format!(
                "the kernel's refill ring layout is not supported ({e}; head {}, tail {}, \
                 entries at {}, {} entries, {}-byte region): this kernel's zcrx ABI \
                 differs from the one tokio-zcrx knows; use copy mode or report the kernel \
                 version",
                offsets.head,
                offsets.tail,
                offsets.rqes,
                instance.rq_entries,
                instance.region_layout.ring_len
            ),
        )
    })?;
    let ZcrxInstance {
        fork_guard,
        ring,
        region,
        area,
        region_layout,
        rq_entries: _,
        offsets: _,
        area_token,
        rx_buf_len,
        zcrx_id,
    } = instance;
    let chunk_size = if rx_buf_len != 0 {
        rx_buf_len
    } else {
        config.chunk_size
    };
    Ok(Instance {
        ring,
        fork_guard,
        area,
        region,
        layout: SharedLayout {
            area_token,
            chunk_size,
            rq_entries: ring_layout.entries,
            rq_head_offset: ring_layout.head,
            rq_tail_offset: ring_layout.tail,
            rqes_offset: ring_layout.rqes,
            stats_offset: region_layout.stats_offset,
        },
        zcrx_id,
        nodev: matches!(config.target, Target::NoDevice),
        caps: Capabilities::detected(queried.as_ref(), events),
        description,
        segment_payload,
        growth,
        growth_refused,
    })
}

/// How often to ask the kernel whether a queue's previous instance is gone.
const QUEUE_RELEASE_POLL: Duration = Duration::from_millis(20);

/// Registers `request` on `ring`; if the kernel answers EEXIST for an interface queue (a
/// previous zcrx instance on it is still being torn down, e.g. right after the process that
/// had it exited), waits up to `config.queue_release_wait` until the kernel reports no io_uring
/// memory provider on the queue, and registers again on a fresh ring. The outer error is a
/// queue still held when the time is up; the inner result is the last registration's.
fn register_waiting_out_teardown(
    ring: ZcrxRing,
    request: &ZcrxRequest,
    config: &UringConfig,
) -> Result<std::result::Result<ZcrxInstance, RegisterError>> {
    let start = Instant::now();
    let deadline = start + config.queue_release_wait;
    let mut ring = Some(ring);
    let mut netdev: Option<NetdevNetlink> = None;
    let mut retries = 0u32;
    loop {
        let this_ring = match ring.take() {
            Some(ring) => ring,
            None => ZcrxRing::new(config.cq_entries)
                .map_err(|e| ring_creation_error(config.cq_entries, e))?,
        };
        let (ifindex, queue) = match (ZcrxInstance::register(this_ring, request), request.binding) {
            (Err(RegisterError::Refused(error)), QueueBinding::Interface { ifindex, rx_queue })
                if error.raw_os_error() == Some(libc::EEXIST) =>
            {
                // Past the deadline after a retry: the queue was reported free but is refused
                // again; let the probe explain the refusal. An XDP program on the device is
                // refused with the same EEXIST and no wait ends it: explained at once.
                if (retries > 0 && Instant::now() >= deadline) || xdp_attached(ifindex) {
                    return Ok(Err(RegisterError::Refused(error)));
                }
                (ifindex, rx_queue)
            }
            (Ok(instance), _) => {
                if retries > 0 {
                    tracing::info!(
                        target = %describe_target(&config.target),
                        waited_ms = start.elapsed().as_millis() as u64,
                        retries,
                        "registered after the queue's previous zcrx instance was torn down"
                    );
                }
                return Ok(Ok(instance));
            }
            (Err(error), _) => return Ok(Err(error)),
        };
        let session = match &mut netdev {
            Some(session) => session,
            None => match NetdevNetlink::open() {
                Ok(session) => netdev.insert(session),
                Err(error) => {
                    return Err(queue_held_error(
                        &config.target,
                        start.elapsed(),
                        QueueHeld::Unknown(error),
                    ))
                }
            },
        };
        tracing::debug!(
            target = %describe_target(&config.target),
            "EEXIST: waiting for the queue's previous zcrx instance to be torn down"
        );
        let remaining = deadline.saturating_duration_since(Instant::now());
        match wait_for_release(session, ifindex, queue, remaining, QUEUE_RELEASE_POLL) {
            ReleaseWait::Released { waited, polls } => {
                tracing::debug!(
                    waited_ms = waited.as_millis() as u64,
                    polls,
                    "the kernel reports no io_uring provider on the queue any more; registering again"
                );
                retries += 1;
            }
            ReleaseWait::StillBound { waited, polls } => {
                tracing::warn!(
                    target = %describe_target(&config.target),
                    waited_ms = waited.as_millis() as u64,
                    polls,
                    "the queue's io_uring provider is still bound; giving up"
                );
                let held = match session.rx_queue(ifindex, queue) {
                    Ok(info) => QueueHeld::Bound(info),
                    Err(error) => QueueHeld::Unknown(error),
                };
                return Err(queue_held_error(&config.target, start.elapsed(), held));
            }
            ReleaseWait::Unknown { error, .. } => {
                return Err(queue_held_error(
                    &config.target,
                    start.elapsed(),
                    QueueHeld::Unknown(error),
                ))
            }
        }
    }
}

/// Whether an XDP program is attached to interface `ifindex` (rtnetlink's
/// `IFLA_XDP_ATTACHED`): the kernel refuses a memory provider on any queue of such a device
/// with the EEXIST a queue that is still bound gets (`__net_mp_open_rxq`), and no release
/// will come. `false` where the kernel cannot be asked: then the wait finds out.
fn xdp_attached(ifindex: u32) -> bool {
    match RouteNetlink::open().and_then(|mut route| route.xdp_attached(ifindex)) {
        Ok(mode) => mode != 0,
        Err(error) => {
            tracing::debug!("tokio-zcrx: cannot ask rtnetlink about XDP: {error}");
            false
        }
    }
}

/// What the kernel said about a queue that stayed refused.
#[derive(Debug)]
enum QueueHeld {
    /// Its state when the time was up.
    Bound(RxQueueInfo),
    /// The `netdev` family could not be asked.
    Unknown(io::Error),
}

/// The error for a queue whose previous binding did not go within the configured wait: what
/// holds it, and the commands that show it.
fn queue_held_error(target: &Target, waited: Duration, held: QueueHeld) -> Error {
    let what = describe_target(target);
    let ifindex = match target {
        Target::Interface { name, .. } => crate::sys::ifindex(name).ok(),
        Target::InterfaceIndex { index, .. } => Some(*index),
        Target::NoDevice => None,
    };
    let show = format!(
        "`ynl --family netdev --dump queue-get --json '{{\"ifindex\": {}}}'` (from the kernel's \
         tools/net/ynl) shows io-uring on a queue while a provider is bound; `ls -l \
         /proc/*/fd 2>/dev/null | grep io_uring` lists the processes with io_uring instances",
        ifindex.map_or_else(|| "N".to_owned(), |i| i.to_string())
    );
    let waited = format!("{:.1} s", waited.as_secs_f64());
    let (holder, source) = match held {
        QueueHeld::Bound(info) => {
            let mut holders = Vec::new();
            if info.io_uring {
                holders.push("an io_uring memory provider (a zcrx instance of a live process, or one still being torn down; the kernel does not say which process)");
            }
            if info.dmabuf.is_some() {
                holders.push("a devmem dma-buf binding");
            }
            if info.xsk {
                holders.push("an AF_XDP socket");
            }
            let holder = if holders.is_empty() {
                "nothing the kernel reports now (it was released just as the wait ended): try again"
                    .to_owned()
            } else {
                holders.join(" and ")
            };
            (holder, None)
        }
        QueueHeld::Unknown(error) => (
            "something the kernel could not be asked about (netdev netlink unavailable)".to_owned(),
            Some(error),
        ),
    };
    let error = Error::new(
        ErrorKind::QueueBusy,
        format!(
            "cannot register {what}: the kernel answers EEXIST (the queue already has a \
             memory provider) and after {waited} it is still held by {holder}. Stop the \
             process that holds it, or raise .queue_release_wait() if a previous instance \
             takes longer to go; {show}"
        ),
    );
    match source {
        Some(source) => error.with_source(source),
        None => error,
    }
}

/// The growth policy to run with on a kernel that can (`can_add_area`: the zcrx query
/// reports `ZCRX_CTRL_ADD_AREA`, 7.3+) or cannot add areas: the policy, or, without
/// `ZCRX_CTRL_ADD_AREA`, the error where the policy is required (modes nic and nodev) and
/// the reason to report where it is not (auto). The one rule for the real kernel and the
/// synthetic ones.
pub(crate) fn growth_on(
    config: &UringConfig,
    can_add_area: bool,
) -> Result<(Option<GrowthPlan>, Option<String>)> {
    match config.area_growth {
        Some(plan) if !can_add_area => {
            let refusal = too_old(
                "growing the receive area (Builder::area_growth, ZCRX_CTRL_ADD_AREA)",
                "7.3",
            );
            if plan.required {
                return Err(refusal);
            }
            Ok((None, Some(refusal.to_string())))
        }
        plan => Ok((plan, None)),
    }
}

/// What a registration binds, in words: `eth0 rx queue 3`, `a device-less (NODEV) zcrx
/// instance`.
fn describe_target(target: &Target) -> String {
    match target {
        Target::NoDevice => "a device-less (NODEV) zcrx instance".to_owned(),
        Target::Interface { name, queue } => format!("{name} rx queue {queue}"),
        Target::InterfaceIndex { index, queue } => {
            format!("{} rx queue {queue}", interface_name(*index))
        }
    }
}

/// The index of the interface `name`, or the error that says it does not exist.
fn ifindex(name: &str) -> Result<u32> {
    if name.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("{name:?} contains a NUL"),
        ));
    }
    crate::sys::ifindex(name).map_err(|error| {
        Error::new(
            ErrorKind::InterfaceNotFound,
            format!(
                "no network interface named {name} in this network namespace (`ip link` lists \
                 them)"
            ),
        )
        .with_source(error)
    })
}

/// Turns a refused registration into an error that says what to do. For a NIC queue the
/// probe looks at the interface (without registering) to tell the causes of EINVAL apart.
fn explain_refusal(target: &Target, config: &UringConfig, error: io::Error) -> Error {
    let queue = match target {
        Target::NoDevice => None,
        Target::Interface { name, queue } => Some((name.clone(), *queue)),
        Target::InterfaceIndex { index, queue } => Some((interface_name(*index), *queue)),
    };
    let errno = error.raw_os_error().unwrap_or(0);
    // The probe is only needed where the errno alone does not say what to do.
    let report = match &queue {
        Some((interface, queue)) if !matches!(errno, libc::EPERM | libc::ENOMEM) => {
            Some(probe::run(
                &ProbeOptions::new()
                    .interface(interface.clone())
                    .queue(*queue)
                    .try_register(false),
            ))
        }
        _ => None,
    };
    let diagnosis = report.as_ref().and_then(|r| r.interfaces.first());
    let queue = queue.as_ref().map(|(name, queue)| (name.as_str(), *queue));
    refusal_error(queue, config, error, diagnosis)
}

/// The error for a refused registration of `queue` (`None`: the device-less mode), given the
/// kernel's error and the probe's diagnosis of the interface. A pure function, so every case
/// can be tested without a NIC.
fn refusal_error(
    queue: Option<(&str, u32)>,
    config: &UringConfig,
    error: io::Error,
    diagnosis: Option<&InterfaceReport>,
) -> Error {
    let errno = error.raw_os_error().unwrap_or(0);
    if errno == libc::EPERM {
        // Dropped since the up-front check (another thread called drop_privileges)?
        let what = match queue {
            Some((interface, queue)) => format!("{interface} rx queue {queue}"),
            None => "a device-less (NODEV) zcrx instance".to_owned(),
        };
        if let Some(dropped) = privilege::registration_after_drop(&what) {
            return dropped.with_source(error);
        }
        return Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "registering a zcrx queue needs CAP_NET_ADMIN, which this process does not \
                 have (in its effective set): {CAP_NET_ADMIN_FIX}"
            ),
        )
        .with_source(error);
    }
    if errno == libc::ENOMEM {
        return Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "the kernel could not pin the {} byte area: raise the locked-memory limit \
                 (`ulimit -l`, LimitMEMLOCK= in systemd; Linux 6.17+ charges the area to it) \
                 or use a smaller area",
                config.area_size
            ),
        )
        .with_source(error);
    }
    if errno == libc::EFAULT && config.area_size > KERNEL_AREA_LIMIT_BEFORE_2026 {
        // io_validate_user_buf_range: "arbitrary limit, but we need something"; lifted in
        // 2026 (the pinning limit of 2^31 - 1 pages remains, which validation checks).
        return Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "this kernel refuses areas larger than 1 GiB ({KERNEL_AREA_LIMIT_BEFORE_2026} \
                 bytes); the area is {} bytes: use .area_size({KERNEL_AREA_LIMIT_BEFORE_2026}) \
                 or less",
                config.area_size
            ),
        )
        .with_source(error);
    }
    let Some((interface, queue)) = queue else {
        return Error::new(
            ErrorKind::Kernel,
            format!("the kernel refused the device-less (NODEV) registration: {error}"),
        )
        .with_source(error);
    };
    let mut message = format!("cannot register {interface} rx queue {queue} for zero-copy receive");
    let verdict = diagnosis.map(|d| d.verdict);
    // The probe judges the queue for one-page chunks. A driver without rx-page-size support
    // refuses larger chunks with EOPNOTSUPP although everything else is in order.
    let device_unsupported = matches!(verdict, Some(Verdict::Unsupported | Verdict::NotFound));
    if errno == libc::EOPNOTSUPP && config.custom_chunk && !device_unsupported {
        let driver = diagnosis
            .and_then(|d| d.driver.as_deref())
            .map_or_else(|| "its driver".to_owned(), |d| format!("driver {d}"));
        message.push_str(&format!(
            " with {}-byte chunks: {driver} does not support chunks larger than a page \
             (rx_buf_len, the queue's rx-page-size); fix: use the default chunk size (omit \
             .chunk_size, or .chunk_size({})), or a NIC whose driver supports rx-page-size",
            config.chunk_size,
            page_size()
        ));
        return Error::new(ErrorKind::ChunkSizeUnsupported, message).with_source(error);
    }
    // With rx_buf_len the kernel answers ERANGE when the pinned area is not physically
    // contiguous in chunk-size pieces, before it looks at the queue index.
    let queue_in_range = diagnosis
        .and_then(|d| d.rx_queues)
        .is_some_and(|queues| queue < queues);
    if errno == libc::ERANGE && config.custom_chunk && queue_in_range {
        message.push_str(&format!(
            ": the kernel found the receive area not physically contiguous in {}-byte \
             pieces (it must be backed by 2 MiB huge pages); {}",
            config.chunk_size,
            config::huge_page_shortage(config, &HugePageFacts::read(), None)
        ));
        return Error::new(ErrorKind::HugePagesUnavailable, message).with_source(error);
    }
    let kind = match errno {
        libc::ENODEV => ErrorKind::InterfaceNotFound,
        libc::ERANGE => ErrorKind::QueueOutOfRange,
        // Not busy: configured in a way zcrx excludes (the probe's diagnosis says so).
        libc::EEXIST if diagnosis.is_some_and(|d| d.xdp_attached == Some(true)) => {
            ErrorKind::InterfaceNotConfigured
        }
        libc::EEXIST | libc::EBUSY => ErrorKind::QueueBusy,
        libc::EOPNOTSUPP => ErrorKind::InterfaceUnsupported,
        libc::EINVAL => match verdict {
            Some(Verdict::NeedsConfiguration) => ErrorKind::InterfaceNotConfigured,
            _ => ErrorKind::Kernel,
        },
        _ => ErrorKind::Kernel,
    };
    match diagnosis {
        Some(d) => {
            message.push_str(": ");
            message.push_str(&d.reason);
            if let Some(fix) = &d.fix {
                message.push_str("; fix: ");
                message.push_str(fix);
            }
        }
        None => message.push_str(&format!(": the kernel answered {error}")),
    }
    Error::new(kind, message).with_source(error)
}

/// The largest area kernels before mid-2026 register (io_uring's registered-memory limit).
const KERNEL_AREA_LIMIT_BEFORE_2026: usize = 1 << 30;

/// Checks that the interface `config` names exists (in this network namespace), so that a
/// misspelt name is an error in every mode instead of a reason to fall back.
pub(crate) fn check_interface_exists(target: &Target) -> Result<()> {
    match target {
        Target::Interface { name, .. } => ifindex(name).map(drop),
        Target::InterfaceIndex { index, .. } => crate::sys::interface_name(*index)
            .map(drop)
            .map_err(|error| {
                Error::new(
                    ErrorKind::InterfaceNotFound,
                    format!(
                        "no network interface has index {index} in this network namespace \
                         (`ip link` lists them with their indices)"
                    ),
                )
                .with_source(error)
            }),
        Target::NoDevice => Ok(()),
    }
}

fn interface_name(index: u32) -> String {
    crate::sys::interface_name(index).unwrap_or_else(|_| format!("#{index}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{TcpDataSplit, TrialOutcome};
    use crate::Builder;

    fn config(builder: Builder) -> UringConfig {
        let target = Target::Interface {
            name: "nsim0".into(),
            queue: 1,
        };
        builder.validate_for(target, page_size() as u32).unwrap()
    }

    /// What the probe says of a netdevsim queue that is set up for zcrx (one-page chunks).
    fn ready_netdevsim() -> InterfaceReport {
        InterfaceReport {
            name: "nsim0".into(),
            ifindex: Some(3),
            driver: Some("netdevsim".into()),
            virtual_device: false,
            rx_queues: Some(2),
            queue: Some(1),
            tcp_data_split: TcpDataSplit::On,
            hds_thresh: Some(0),
            xdp_attached: Some(false),
            registration: TrialOutcome::NotAttempted {
                reason: "not asked to".into(),
            },
            verdict: Verdict::PreconditionsMet,
            reason: "preconditions met; run with --try-register to confirm (briefly restarts \
                     rx queue 1 of nsim0)"
                .into(),
            fix: None,
            hints: Vec::new(),
            exposure: Vec::new(),
            queues: Vec::new(),
            steering: None,
            notes: Vec::new(),
        }
    }

    fn errno(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn large_chunks_refused_by_the_driver_say_so_and_what_to_do() {
        // Defect G: EOPNOTSUPP for 64 KiB chunks on a queue the probe finds ready.
        let config = config(Builder::new().chunk_size(65536));
        let diagnosis = ready_netdevsim();
        let err = refusal_error(
            Some(("nsim0", 1)),
            &config,
            errno(libc::EOPNOTSUPP),
            Some(&diagnosis),
        );
        let text = err.to_string();
        assert_eq!(err.kind(), ErrorKind::ChunkSizeUnsupported, "{text}");
        assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
        assert!(!text.contains("preconditions met"), "{text}");
        assert!(
            text.contains("netdevsim does not support chunks larger than a page"),
            "{text}"
        );
        assert!(text.contains("rx_buf_len"), "{text}");
        assert!(text.contains("rx-page-size"), "{text}");
        assert!(text.contains("default chunk size"), "{text}");
        assert!(text.contains("65536-byte chunks"), "{text}");
    }

    /// An XDP program makes the kernel answer EEXIST, as a bound queue does: the error says
    /// XDP and how to detach it, with a configuration kind, not a busy queue's.
    #[test]
    fn eexist_with_an_xdp_program_attached_names_the_program() {
        let config = config(Builder::new());
        let mut diagnosis = ready_netdevsim();
        diagnosis.xdp_attached = Some(true);
        // What the probe's verdict makes of it (verdict.rs).
        diagnosis.verdict = Verdict::NeedsConfiguration;
        diagnosis.reason = "an XDP program is attached to nsim0, and zcrx excludes XDP".into();
        diagnosis.fix = Some("detach it: `ip link set dev nsim0 xdp off`".into());
        let err = refusal_error(
            Some(("nsim0", 1)),
            &config,
            errno(libc::EEXIST),
            Some(&diagnosis),
        );
        let text = err.to_string();
        assert_eq!(err.kind(), ErrorKind::InterfaceNotConfigured, "{text}");
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert!(text.contains("XDP program is attached"), "{text}");
        assert!(text.contains("ip link set dev nsim0 xdp off"), "{text}");
        // Without XDP, EEXIST is a busy queue.
        diagnosis.xdp_attached = Some(false);
        let err = refusal_error(
            Some(("nsim0", 1)),
            &config,
            errno(libc::EEXIST),
            Some(&diagnosis),
        );
        assert_eq!(err.kind(), ErrorKind::QueueBusy);
    }

    #[test]
    fn a_device_without_zcrx_is_not_blamed_on_the_chunk_size() {
        let config = config(Builder::new().chunk_size(65536));
        let mut diagnosis = ready_netdevsim();
        diagnosis.verdict = Verdict::Unsupported;
        diagnosis.virtual_device = true;
        diagnosis.reason = "virtual device: there is no NIC behind nsim0 to receive into".into();
        diagnosis.fix = Some("use an interface on a zcrx-capable NIC".into());
        let err = refusal_error(
            Some(("nsim0", 1)),
            &config,
            errno(libc::EOPNOTSUPP),
            Some(&diagnosis),
        );
        assert_eq!(err.kind(), ErrorKind::InterfaceUnsupported);
        assert!(err.to_string().contains("virtual device"), "{err}");
        assert!(!err.to_string().contains("chunks larger"), "{err}");
    }

    #[test]
    fn default_chunks_keep_the_probe_diagnosis() {
        let config = config(Builder::new());
        let mut diagnosis = ready_netdevsim();
        diagnosis.verdict = Verdict::NeedsConfiguration;
        diagnosis.reason = "hds-thresh is 256, zcrx needs 0".into();
        diagnosis.fix = Some("`ethtool -G nsim0 hds-thresh 0`".into());
        let err = refusal_error(
            Some(("nsim0", 1)),
            &config,
            errno(libc::EINVAL),
            Some(&diagnosis),
        );
        assert_eq!(err.kind(), ErrorKind::InterfaceNotConfigured);
        assert!(
            err.to_string()
                .contains("fix: `ethtool -G nsim0 hds-thresh 0`"),
            "{err}"
        );
    }

    #[test]
    fn a_low_memlock_limit_names_the_limit() {
        // Linux 6.17+ charges the area to RLIMIT_MEMLOCK: registration answers ENOMEM.
        for queue in [Some(("nsim0", 1)), None] {
            let config = config(Builder::new());
            let err = refusal_error(queue, &config, errno(libc::ENOMEM), None);
            assert_eq!(err.kind(), ErrorKind::OutOfMemory);
            assert!(err.to_string().contains("`ulimit -l`"), "{err}");
            assert!(err.to_string().contains("LimitMEMLOCK="), "{err}");
        }
    }

    #[test]
    fn an_area_above_the_old_kernel_limit_is_a_setting_to_change() {
        let config = config(Builder::new().area_size(2 << 30));
        let err = refusal_error(None, &config, errno(libc::EFAULT), None);
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains(".area_size(1073741824)"), "{err}");
        // Within the limit, EFAULT stays the kernel's.
        let config = config_nodev(Builder::new());
        let err = refusal_error(None, &config, errno(libc::EFAULT), None);
        assert_eq!(err.kind(), ErrorKind::Kernel);
    }

    fn config_nodev(builder: Builder) -> UringConfig {
        builder
            .validate_for(Target::NoDevice, page_size() as u32)
            .unwrap()
    }

    #[test]
    fn no_descriptor_left_names_rlimit_nofile() {
        let err = ring_creation_error(8192, errno(libc::EMFILE));
        assert_eq!(err.kind(), ErrorKind::TooManyOpenFiles);
        assert!(err.to_string().contains("RLIMIT_NOFILE"), "{err}");
        assert!(err.to_string().contains("`ulimit -n`"), "{err}");
        assert!(err.to_string().contains("LimitNOFILE="), "{err}");
        let err = ring_creation_error(8192, errno(libc::ENFILE));
        assert_eq!(err.kind(), ErrorKind::TooManyOpenFiles);
        assert!(err.to_string().contains("fs.file-max"), "{err}");
        let err = ring_creation_error(8192, errno(libc::ENOMEM));
        assert_eq!(err.kind(), ErrorKind::OutOfMemory);
        assert!(err.to_string().contains(".cq_entries"), "{err}");
    }
    fn netdevsim_queue(queue: u32) -> Target {
        Target::Interface {
            name: "nsim0".into(),
            queue,
        }
    }

    #[test]
    fn a_queue_still_held_names_the_provider_and_the_commands() {
        let held = RxQueueInfo {
            id: 2,
            napi_id: Some(8195),
            io_uring: true,
            dmabuf: None,
            xsk: false,
        };
        let error = queue_held_error(
            &netdevsim_queue(2),
            Duration::from_millis(5020),
            QueueHeld::Bound(held),
        );
        assert_eq!(error.kind(), ErrorKind::QueueBusy);
        let message = error.to_string();
        for expected in [
            "cannot register nsim0 rx queue 2",
            "EEXIST",
            "after 5.0 s it is still held by an io_uring memory provider",
            "the kernel does not say which process",
            ".queue_release_wait()",
            "ynl --family netdev --dump queue-get",
            "grep io_uring",
        ] {
            assert!(message.contains(expected), "{expected:?} not in {message}");
        }
        // An AF_XDP socket and a dma-buf are named too.
        let other = RxQueueInfo {
            io_uring: false,
            dmabuf: Some(1),
            xsk: true,
            ..held
        };
        let message =
            queue_held_error(&netdevsim_queue(2), Duration::ZERO, QueueHeld::Bound(other))
                .to_string();
        assert!(
            message.contains("held by a devmem dma-buf binding and an AF_XDP socket"),
            "{message}"
        );
    }

    #[test]
    fn a_queue_the_kernel_cannot_describe_says_so() {
        let error = queue_held_error(
            &netdevsim_queue(0),
            Duration::from_secs(1),
            QueueHeld::Unknown(errno(libc::ENOENT)),
        );
        assert_eq!(error.kind(), ErrorKind::QueueBusy);
        assert!(
            error.to_string().contains("netdev netlink unavailable"),
            "{error}"
        );
        assert!(std::error::Error::source(&error).is_some());
    }

    #[test]
    fn the_release_wait_is_checked_and_carried() {
        let uring = config(Builder::new());
        assert_eq!(uring.queue_release_wait, Duration::from_secs(5));
        let uring = config(Builder::new().queue_release_wait(Duration::ZERO));
        assert_eq!(uring.queue_release_wait, Duration::ZERO);
        let error = Builder::new()
            .interface("nsim0", 1)
            .queue_release_wait(Duration::from_secs(601))
            .validate()
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidConfig);
        assert!(error.to_string().contains("queue release wait"), "{error}");
    }
}
