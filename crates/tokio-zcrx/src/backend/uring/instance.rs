//! Setting up the ring and registering the zcrx interface queue, with feature detection and
//! errors that say what to do. Runs on the driver thread: with SINGLE_ISSUER the ring belongs
//! to the thread that created it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use io_uring::{cqueue, squeue, IoUring};
use zcrx_sys::event::{
    zcrx_event_desc, ZCRX_EVENT_ALLOC_FAIL, ZCRX_EVENT_COPY, ZCRX_EVENT_DESC_FLAG_STATS,
};
use zcrx_sys::query::query_zcrx;
use zcrx_sys::region::{io_uring_region_desc, IORING_MEM_REGION_TYPE_USER};
use zcrx_sys::ring::IORING_OP_RECV_ZC;
use zcrx_sys::zcrx::{
    io_uring_zcrx_area_reg, io_uring_zcrx_ifq_reg, register_zcrx_ifq, ZCRX_FEATURE_EVENT,
    ZCRX_FEATURE_RX_PAGE_SIZE, ZCRX_REG_NODEV,
};

use zcrx_core::refill::RingLayout;
use zcrx_core::user_data::UserData;

use super::ring::Capabilities;
use crate::config::{EventsPolicy, Target, Validated};
use crate::error::{Error, ErrorKind, Result};
use crate::probe::{self, InterfaceReport, ProbeOptions, Verdict};
use crate::sys::fork::RingForkGuard;
use crate::sys::mem::{page_size, Mapping};

/// The ring type zcrx needs: 32-byte CQEs carry the receive offset.
pub(crate) type Ring = IoUring<squeue::Entry, cqueue::Entry32>;

/// SQ size: the driver submits one request per stream start and a few control entries. The
/// kernel wants the CQ at least as large, so small CQs get a smaller SQ.
const SQ_ENTRIES: u32 = 256;

/// What the kernel can do, detected before registering.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KernelFeatures {
    /// The zcrx query answered (6.19+): ZCRX_CTRL exists, and ring teardown stops the queue
    /// before it reclaims user-held chunks.
    pub(crate) query: bool,
    /// `nr_ctrl_opcodes` from the query (FLUSH_RQ is opcode 0).
    pub(crate) ctrl_opcodes: u32,
    pub(crate) nodev: bool,
    pub(crate) events: bool,
    pub(crate) rx_buf_len: bool,
}

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

fn detect_features() -> KernelFeatures {
    match query_zcrx() {
        Ok(q) => KernelFeatures {
            query: true,
            ctrl_opcodes: q.nr_ctrl_opcodes,
            nodev: q.register_flags & u64::from(ZCRX_REG_NODEV) != 0,
            events: q.features & ZCRX_FEATURE_EVENT != 0 && q.nr_ctrl_opcodes >= 3,
            rx_buf_len: q.features & ZCRX_FEATURE_RX_PAGE_SIZE != 0,
        },
        // Before 6.19 there is no zcrx query, and none of these features either.
        Err(_) => KernelFeatures::default(),
    }
}

fn release() -> String {
    // SAFETY: utsname is plain old data; all-zero is valid.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: the kernel NUL-terminates `release` within the array.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
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
pub(crate) fn register(config: &Validated) -> Result<Instance> {
    let (ring, fork_guard) = crate::sys::fork::create_ring(
        || {
            IoUring::<squeue::Entry, cqueue::Entry32>::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_coop_taskrun()
                // With COOP_TASKRUN the kernel flags pending deferred work in the SQ ring
                // instead of interrupting; the driver enters with GETEVENTS every turn anyway.
                .setup_taskrun_flag()
                .setup_submit_all()
                .setup_cqsize(config.cq_entries)
                .build(SQ_ENTRIES.min(config.cq_entries))
        },
        |ring| ring.as_raw_fd(),
    )
    .map_err(|e| ring_creation_error(config.cq_entries, e))?;
    let mut op_probe = io_uring::Probe::new();
    let recv_zc = ring.submitter().register_probe(&mut op_probe).is_ok()
        && op_probe.is_supported(IORING_OP_RECV_ZC);
    if !recv_zc {
        return Err(too_old(
            "io_uring zero-copy receive (IORING_OP_RECV_ZC)",
            "6.15",
        ));
    }
    let features = detect_features();
    let (if_idx, if_rxq, flags, description) = match &config.target {
        Target::NoDevice => {
            if !features.nodev {
                return Err(too_old("the device-less mode (ZCRX_REG_NODEV)", "7.1"));
            }
            (0, 0, ZCRX_REG_NODEV, "no device (NODEV mode)".to_string())
        }
        Target::Interface { name, queue } => {
            let index = ifindex(name)?;
            (index, *queue, 0, format!("{name} rx queue {queue}"))
        }
        Target::InterfaceIndex { index, queue } => (
            *index,
            *queue,
            0,
            format!("interface #{index} rx queue {queue}"),
        ),
    };
    let events = match config.events {
        EventsPolicy::Disabled => false,
        EventsPolicy::IfSupported => features.events,
        EventsPolicy::Required if !features.events => {
            return Err(too_old("zcrx events and copy statistics", "7.2"))
        }
        EventsPolicy::Required => true,
    };
    if config.custom_chunk && !features.rx_buf_len {
        return Err(too_old(
            &format!("a chunk size of {} bytes (rx_buf_len)", config.chunk_size),
            "7.0",
        ));
    }

    let page = page_size();
    let area = Mapping::new(config.area_size, config.custom_chunk).map_err(|e| {
        let hint = if config.custom_chunk {
            "chunks larger than a page need a huge-page area: reserve 2 MiB pages with \
             `echo N > /proc/sys/vm/nr_hugepages` (N = area size / 2 MiB)"
        } else {
            "reduce the area size"
        };
        Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "cannot map a {} byte receive area: {hint}",
                config.area_size
            ),
        )
        .with_source(e)
    })?;
    // The refill ring header comes first; before the zcrx query (6.19) its size is not
    // reported, so a whole page covers every kernel. The stats follow the ring, 8-aligned.
    let ring_bytes = (config.refill_entries as usize * 16 + page).div_ceil(page) * page;
    let region_len = if events {
        ring_bytes + page
    } else {
        ring_bytes
    };
    let region = Mapping::new(region_len, false).map_err(|e| {
        Error::new(ErrorKind::OutOfMemory, "cannot map the refill ring region").with_source(e)
    })?;
    // The kernel pins the area and writes both for the instance's lifetime: a forked child
    // must get neither (see crate::fork).
    for mapping in [&area, &region] {
        crate::sys::fork::exclude_mapping(mapping).map_err(|e| {
            Error::new(
                ErrorKind::Kernel,
                "madvise(MADV_DONTFORK) on the receive area failed",
            )
            .with_source(e)
        })?;
    }

    let mut area_reg = io_uring_zcrx_area_reg {
        addr: area.as_ptr() as u64,
        len: area.len() as u64,
        ..Default::default()
    };
    let mut region_desc = io_uring_region_desc {
        user_addr: region.as_ptr() as u64,
        size: region.len() as u64,
        flags: IORING_MEM_REGION_TYPE_USER,
        ..Default::default()
    };
    let event_desc = zcrx_event_desc {
        user_data: UserData::EVENT.as_u64(),
        type_mask: (1 << ZCRX_EVENT_ALLOC_FAIL) | (1 << ZCRX_EVENT_COPY),
        flags: ZCRX_EVENT_DESC_FLAG_STATS,
        stats_offset: ring_bytes as u64,
        ..Default::default()
    };
    let mut reg = io_uring_zcrx_ifq_reg {
        if_idx,
        if_rxq,
        rq_entries: config.refill_entries,
        flags,
        area_ptr: &mut area_reg as *mut io_uring_zcrx_area_reg as u64,
        region_ptr: &mut region_desc as *mut io_uring_region_desc as u64,
        rx_buf_len: if config.custom_chunk {
            config.chunk_size
        } else {
            0
        },
        event_desc: if events {
            &event_desc as *const zcrx_event_desc as u64
        } else {
            0
        },
        ..Default::default()
    };
    // SAFETY: `area_reg`, `region_desc` and `event_desc` outlive the call and are not borrowed
    // elsewhere while the kernel reads and writes them. The area and region are fresh mappings
    // dedicated to this instance; they are only accessed through raw pointers and atomics,
    // and the runtime keeps them mapped until the ring is closed and no buffer refers to them.
    if let Err(e) = unsafe { register_zcrx_ifq(ring.as_fd(), &mut reg) } {
        return Err(explain_refusal(&config.target, config, e));
    }
    let offsets = reg.offsets;
    // The offsets are the kernel's word: check them before any pointer is made from them.
    // The ring's part of the region ends where the statistics begin.
    let ring_layout = RingLayout::validate(
        offsets.head,
        offsets.tail,
        offsets.rqes,
        reg.rq_entries,
        ring_bytes,
    )
    .map_err(|e| {
        Error::new(
            ErrorKind::Kernel,
            format!(
                "the kernel's refill ring layout is not supported ({e}; head {}, tail {}, \
                 entries at {}, {} entries, {ring_bytes}-byte region): this kernel's zcrx ABI \
                 differs from the one tokio-zcrx knows; use copy mode or report the kernel \
                 version",
                offsets.head, offsets.tail, offsets.rqes, reg.rq_entries
            ),
        )
    })?;
    let chunk_size = if reg.rx_buf_len != 0 {
        reg.rx_buf_len
    } else {
        config.chunk_size
    };
    Ok(Instance {
        ring,
        fork_guard,
        area,
        region,
        layout: SharedLayout {
            area_token: area_reg.rq_area_token,
            chunk_size,
            rq_entries: ring_layout.entries,
            rq_head_offset: ring_layout.head,
            rq_tail_offset: ring_layout.tail,
            rqes_offset: ring_layout.rqes,
            stats_offset: events.then_some(ring_bytes),
        },
        zcrx_id: reg.zcrx_id,
        nodev: matches!(config.target, Target::NoDevice),
        caps: Capabilities {
            ctrl: features.query && features.ctrl_opcodes > 0,
            events,
            teardown_stops_queue_first: features.query,
        },
        description,
    })
}

fn ifindex(name: &str) -> Result<u32> {
    let cname = CString::new(name)
        .map_err(|_| Error::new(ErrorKind::InvalidConfig, format!("{name:?} contains a NUL")))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(Error::new(
            ErrorKind::InterfaceNotFound,
            format!(
                "no network interface named {name} in this network namespace (`ip link` lists \
                 them)"
            ),
        )
        .with_source(io::Error::last_os_error()));
    }
    Ok(index)
}

/// Turns a refused registration into an error that says what to do. For a NIC queue the
/// probe looks at the interface (without registering) to tell the causes of EINVAL apart.
fn explain_refusal(target: &Target, config: &Validated, error: io::Error) -> Error {
    let queue = match target {
        Target::NoDevice => None,
        Target::Interface { name, queue } => Some((name.clone(), *queue)),
        Target::InterfaceIndex { index, queue } => Some((interface_name(*index), *queue)),
    };
    let errno = error.raw_os_error().unwrap_or(0);
    // The probe is only needed where the errno alone does not say what to do.
    let report = match &queue {
        Some((interface, queue)) if !matches!(errno, libc::EPERM | libc::ENOMEM) => {
            Some(probe::run(&ProbeOptions {
                interface: Some(interface.clone()),
                queue: Some(*queue),
                try_register: false,
            }))
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
    config: &Validated,
    error: io::Error,
    diagnosis: Option<&InterfaceReport>,
) -> Error {
    let errno = error.raw_os_error().unwrap_or(0);
    if errno == libc::EPERM {
        return Error::new(
            ErrorKind::PermissionDenied,
            "registering a zcrx queue needs CAP_NET_ADMIN: run as root or grant it with \
             `setcap cap_net_admin+ep PROGRAM`",
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
        return Error::new(ErrorKind::InterfaceUnsupported, message).with_source(error);
    }
    let kind = match errno {
        libc::ENODEV => ErrorKind::InterfaceNotFound,
        libc::ERANGE => ErrorKind::QueueOutOfRange,
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
        Target::InterfaceIndex { index, .. } => {
            let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: `buf` has IF_NAMESIZE bytes as if_indextoname requires.
            if unsafe { libc::if_indextoname(*index, buf.as_mut_ptr()) }.is_null() {
                return Err(Error::new(
                    ErrorKind::InterfaceNotFound,
                    format!(
                        "no network interface has index {index} in this network namespace \
                         (`ip link` lists them with their indices)"
                    ),
                )
                .with_source(io::Error::last_os_error()));
            }
            Ok(())
        }
        Target::NoDevice => Ok(()),
    }
}

fn interface_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return format!("#{index}");
    }
    // SAFETY: on success the name is NUL-terminated inside `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{TcpDataSplit, TrialOutcome};
    use crate::Builder;

    fn config(builder: Builder) -> Validated {
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
        assert_eq!(err.kind(), ErrorKind::InterfaceUnsupported, "{text}");
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

    fn config_nodev(builder: Builder) -> Validated {
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
}
