//! Capability probe: can this machine do io_uring zero-copy receive, and on which interface?
//!
//! [`run`] checks the kernel (release, io_uring availability, `IORING_OP_RECV_ZC`, the zcrx
//! query and the features derived from it), the process (CAP_NET_ADMIN) and every network
//! interface (driver, rx queues, tcp-data-split, hds-thresh, XDP), and returns a
//! [`ProbeReport`]. It never panics and never fails: a check that cannot be made becomes a
//! reported reason. Its [`Display`](std::fmt::Display) output is the human summary the `probe`
//! example prints.
//!
//! ```no_run
//! use tokio_zcrx::probe::{self, ProbeOptions, Verdict};
//!
//! let report = probe::run(&ProbeOptions::new());
//! print!("{report}");
//! for interface in &report.interfaces {
//!     if interface.verdict == Verdict::Ready {
//!         println!("zcrx works on {} queue {:?}", interface.name, interface.queue);
//!     }
//! }
//! ```
//!
//! # Non-disruptive by default
//!
//! A *successful* zcrx registration restarts the NIC receive queue it binds (a short traffic
//! blip); a failed one does not, because the kernel refuses before the restart. So by default
//! the probe registers for real only where registration cannot succeed and therefore cannot
//! disturb anything: on virtual interfaces (no parent device), where tcp-data-split is known
//! off or unsupported, where hds-thresh is known non-zero, where an XDP program is attached, and
//! where the queue is out of range. That turns the kernel's own answer (an errno) into the
//! verdict. Where every precondition looks met it stops at [`Verdict::PreconditionsMet`];
//! [`ProbeOptions::try_register`] (`--try-register` in the example) then registers and tears
//! down at once, which yields [`Verdict::Ready`] or the kernel's reason. A registration without
//! a device (`ZCRX_REG_NODEV`, Linux 7.1+) touches no NIC and is always tried where the kernel
//! supports it.
//!
//! # JSON
//!
//! With the `serde` feature every report type implements `serde::Serialize`. The field names
//! below are stable (snake_case; enums serialize as snake_case strings; an absent value is
//! `null`):
//!
//! - `kernel_release`: string, `uname -r`.
//! - `io_uring`: `disabled_sysctl` (0/1/2 or null), `usable` (bool), `setup_errno` (errno or
//!   null), `summary`.
//! - `recv_zc`: `support` (`"supported"`, `"unsupported"`, `"unknown"`), `summary`.
//! - `zcrx_query`: `status` (`"answered"`, `"predates_query"`, `"failed"`), `errno`,
//!   `summary`, `result` (null unless answered): `register_flags`, `area_flags`,
//!   `nr_ctrl_opcodes`, `features`, `rq_hdr_size`, `rq_hdr_alignment` (raw kernel values) and
//!   the decoded booleans `register_import`, `register_nodev`, `area_dmabuf`, `ctrl_arm_event`,
//!   `ctrl_add_area`, `feature_rx_page_size`, `feature_event`.
//! - `features`: `import`, `rx_buf_len`, `nodev`, `events`, each `{support, min_kernel,
//!   summary}`.
//! - `generation`: the kernel's zcrx generation. `kernel` (string or null): the release of
//!   the newest step this kernel has together with every older one (`"7.2"`); `steps`: array,
//!   oldest first, of `{step, name, min_kernel, support, gives}` where `step` is one of
//!   `"nic"` (6.15), `"ctrl_ops"` (6.19), `"query"` (6.19), `"rx_buf_len"` (7.0), `"nodev"`
//!   (7.1), `"events"` (7.2), `"add_area"` (7.3); `missing`: the `step`s this kernel lacks;
//!   `summary`.
//! - `nodev_trial`: a trial outcome (below).
//! - `cap_net_admin`: `effective`, `permitted`, `bounding` (each bool or null), `dropped`
//!   (string or null: when this process gave it up), `needed_for`, `summary`.
//! - `interfaces`: array of `name`, `ifindex`, `driver` (null for a virtual device),
//!   `virtual_device`, `rx_queues`, `queue` (the queue examined), `tcp_data_split` (`"on"`,
//!   `"off"`, `"unsupported"`, `"unknown"`), `hds_thresh`, `xdp_attached` (bool or null),
//!   `registration` (trial outcome), `verdict` (`"ready"`, `"preconditions_met"`,
//!   `"needs_configuration"`, `"unsupported"`, `"not_found"`, `"unknown"`), `reason`, `fix`
//!   (string or null), `hints` (strings), `exposure` (strings: what else RSS and n-tuple
//!   rules steer to the queue), `queues` (array of `id`, `napi_id` (null if none),
//!   `io_uring_provider`, `dmabuf`, `xsk` (bools: what is bound to the queue), `irq` (null if
//!   unknown); empty for a device that is down or a kernel without the `netdev` family),
//!   `steering` (null for virtual devices and unknown queue counts; else `first_queue`,
//!   `queues`, `ntuple` and `rss` (support words), `commands` (strings, with `PORT` and
//!   `CONTEXT` to fill in)), `notes` (strings).
//!
//! A trial outcome is an object whose `outcome` is `"not_attempted"` (with `reason`),
//! `"registered"`, `"refused"` (with `errno`: the kernel said no) or `"failed"` (with `step`
//! and `errno`: preparing the registration failed, the kernel was not asked). An errno is
//! `{"code": 95, "name": "EOPNOTSUPP"}`.

mod errno;
mod host;
mod interface;
mod queues;
mod render;
mod system;
mod trial;

pub use errno::Errno;
pub use queues::{incoming_napi_id, rx_queues};

/// What to probe and how far to go. Built with [`ProbeOptions::new`] (everything, no
/// registration) and the setters, so that options added later do not break callers.
///
/// ```
/// use tokio_zcrx::probe::ProbeOptions;
///
/// // Only eth1, queue 3, confirming with a real registration.
/// let options = ProbeOptions::new()
///     .interface("eth1")
///     .queue(3)
///     .try_register(true);
/// assert_eq!(options.interface.as_deref(), Some("eth1"));
/// assert!(ProbeOptions::default().interface.is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProbeOptions {
    /// Probe only this interface; `None` probes every interface in `/sys/class/net`.
    pub interface: Option<String>,
    /// The receive queue to examine; `None` picks the last one, the queue a zcrx deployment
    /// keeps RSS away from.
    pub queue: Option<u32>,
    /// Also register where every precondition looks met. A successful registration briefly
    /// restarts that NIC receive queue; the probe tears it down at once.
    pub try_register: bool,
}

impl ProbeOptions {
    /// Every interface, its last receive queue, no registration: the same as `default()`.
    pub fn new() -> ProbeOptions {
        ProbeOptions::default()
    }

    /// Probes only the interface `name` (by default every interface in `/sys/class/net`).
    pub fn interface(mut self, name: impl Into<String>) -> ProbeOptions {
        self.interface = Some(name.into());
        self
    }

    /// Examines receive queue `queue` (by default the last one, the queue a zcrx deployment
    /// keeps RSS away from).
    pub fn queue(mut self, queue: u32) -> ProbeOptions {
        self.queue = Some(queue);
        self
    }

    /// Whether to also register where every precondition looks met (by default not). A
    /// successful registration briefly restarts that NIC receive queue; the probe tears it
    /// down at once.
    pub fn try_register(mut self, try_register: bool) -> ProbeOptions {
        self.try_register = try_register;
        self
    }
}

/// Whether the kernel has something. Exhaustive: a yes, a no, or a don't know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Support {
    /// Present.
    Supported,
    /// Absent.
    Unsupported,
    /// Could not be determined; the accompanying summary says why.
    Unknown,
}

/// Everything the probe found. Serializable with the `serde` feature (see the
/// [module docs](self) for the JSON field names); [`Display`](std::fmt::Display) prints the
/// human summary.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ProbeReport {
    /// The kernel release (`uname -r`), `"unknown"` if uname failed.
    pub kernel_release: String,
    /// Whether this process may use io_uring at all.
    pub io_uring: IoUringReport,
    /// Whether the kernel has `IORING_OP_RECV_ZC` (opcode 58, Linux 6.15).
    pub recv_zc: OpcodeReport,
    /// What the kernel's zcrx query (`IORING_REGISTER_QUERY`, Linux 6.19) says.
    pub zcrx_query: ZcrxQueryReport,
    /// zcrx features derived from the query, with the kernel release each needs.
    pub features: ZcrxFeatures,
    /// The kernel's zcrx generation: which steps of zcrx's growth (6.15 to 7.3) it has, and
    /// what the missing ones would give.
    pub generation: ZcrxGeneration,
    /// A registration without a device (`ZCRX_REG_NODEV`), which touches no NIC.
    pub nodev_trial: TrialOutcome,
    /// Whether this process has CAP_NET_ADMIN, which zcrx registration needs.
    pub cap_net_admin: CapNetAdminReport,
    /// One entry per probed interface, sorted by name.
    pub interfaces: Vec<InterfaceReport>,
}

/// io_uring availability.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct IoUringReport {
    /// `/proc/sys/kernel/io_uring_disabled`: 0 allowed, 1 restricted to privileged users and
    /// `kernel.io_uring_group`, 2 disabled; `None` if unreadable (kernels before 6.6).
    pub disabled_sysctl: Option<u32>,
    /// Whether `io_uring_setup` succeeded for a small ring.
    pub usable: bool,
    /// The errno of a failed `io_uring_setup`.
    pub setup_errno: Option<Errno>,
    /// Plain-words summary, including why io_uring is unusable where it is.
    pub summary: String,
}

/// Support of one io_uring opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct OpcodeReport {
    /// Whether the kernel supports the opcode.
    pub support: Support,
    /// Plain-words summary.
    pub summary: String,
}

/// How the zcrx query went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum QueryStatus {
    /// The kernel answered; see [`ZcrxQueryReport::result`].
    Answered,
    /// The kernel is older than the zcrx query (Linux 6.19): it answered EINVAL, EBADF or
    /// EOPNOTSUPP. Every feature the query reports is newer still, so none is present.
    PredatesQuery,
    /// The query failed otherwise (e.g. a seccomp filter); nothing is known.
    Failed,
}

/// The zcrx query result (`IO_URING_QUERY_ZCRX`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ZcrxQueryReport {
    /// How the query went.
    pub status: QueryStatus,
    /// The errno, unless answered.
    pub errno: Option<Errno>,
    /// Plain-words summary.
    pub summary: String,
    /// The kernel's answer, when it gave one.
    pub result: Option<ZcrxQueryResult>,
}

/// The kernel's answer to the zcrx query, raw and decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ZcrxQueryResult {
    /// Supported `ZCRX_REG_*` registration flags.
    pub register_flags: u64,
    /// Supported `IORING_ZCRX_AREA_*` area flags.
    pub area_flags: u64,
    /// Number of `ZCRX_CTRL_*` operations (3 means `ZCRX_CTRL_ARM_EVENT` exists).
    pub nr_ctrl_opcodes: u32,
    /// Supported `ZCRX_FEATURE_*` bits.
    pub features: u32,
    /// Size of the refill ring header in front of the entries.
    pub rq_hdr_size: u32,
    /// Alignment of the refill ring header.
    pub rq_hdr_alignment: u32,
    /// `ZCRX_REG_IMPORT`: a zcrx instance can be exported and imported into another ring.
    pub register_import: bool,
    /// `ZCRX_REG_NODEV`: registration without a device (copy mode, any socket).
    pub register_nodev: bool,
    /// `IORING_ZCRX_AREA_DMABUF`: areas backed by a dma-buf.
    pub area_dmabuf: bool,
    /// `ZCRX_CTRL_ARM_EVENT` exists.
    pub ctrl_arm_event: bool,
    /// `ZCRX_CTRL_ADD_AREA` exists: areas can be added at run time (Linux 7.3).
    pub ctrl_add_area: bool,
    /// `ZCRX_FEATURE_RX_PAGE_SIZE`: chunks larger than a page (`rx_buf_len`).
    pub feature_rx_page_size: bool,
    /// `ZCRX_FEATURE_EVENT`: events and shared-memory stats.
    pub feature_event: bool,
}

/// One zcrx feature.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct FeatureReport {
    /// Whether this kernel has it.
    pub support: Support,
    /// The first Linux release that has it, e.g. `"7.1"`.
    pub min_kernel: &'static str,
    /// Plain-words summary.
    pub summary: String,
}

/// zcrx features derived from the query.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ZcrxFeatures {
    /// Export an instance and import it into another ring (Linux 6.19).
    pub import: FeatureReport,
    /// Chunks larger than a page, `rx_buf_len` (Linux 7.0).
    pub rx_buf_len: FeatureReport,
    /// Registration without a device, `ZCRX_REG_NODEV` (Linux 7.1).
    pub nodev: FeatureReport,
    /// Events and shared-memory stats, `ZCRX_FEATURE_EVENT` with `ZCRX_CTRL_ARM_EVENT`
    /// (Linux 7.2).
    pub events: FeatureReport,
}

/// One step of zcrx's growth, in the order the kernel gained them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum GenerationStep {
    /// `IORING_OP_RECV_ZC` on a NIC queue, one area, the refill ring (Linux 6.15).
    Nic,
    /// `IORING_REGISTER_ZCRX_CTRL` with `ZCRX_CTRL_FLUSH_RQ` and `ZCRX_CTRL_EXPORT` (6.19).
    CtrlOps,
    /// The zcrx query, `IORING_REGISTER_QUERY` / `IO_URING_QUERY_ZCRX` (6.19).
    Query,
    /// Chunks larger than a page, `rx_buf_len` (7.0).
    RxBufLen,
    /// Registration without a device, `ZCRX_REG_NODEV` (7.1).
    Nodev,
    /// Events and shared-memory stats, `ZCRX_FEATURE_EVENT` with `ZCRX_CTRL_ARM_EVENT` (7.2).
    Events,
    /// Areas added at run time, `ZCRX_CTRL_ADD_AREA`, with the cache-line refill header (7.3).
    AddArea,
}

impl GenerationStep {
    /// Every step, oldest first.
    pub const ALL: [GenerationStep; 7] = [
        GenerationStep::Nic,
        GenerationStep::CtrlOps,
        GenerationStep::Query,
        GenerationStep::RxBufLen,
        GenerationStep::Nodev,
        GenerationStep::Events,
        GenerationStep::AddArea,
    ];

    /// Its short name, as the human summary prints it (`"ctrl ops"`).
    pub fn name(self) -> &'static str {
        match self {
            GenerationStep::Nic => "NIC only",
            GenerationStep::CtrlOps => "ctrl ops",
            GenerationStep::Query => "query",
            GenerationStep::RxBufLen => "rx_buf_len",
            GenerationStep::Nodev => "NODEV",
            GenerationStep::Events => "events",
            GenerationStep::AddArea => "ADD_AREA",
        }
    }

    /// The first Linux release that has it.
    pub fn min_kernel(self) -> &'static str {
        match self {
            GenerationStep::Nic => "6.15",
            GenerationStep::CtrlOps | GenerationStep::Query => "6.19",
            GenerationStep::RxBufLen => "7.0",
            GenerationStep::Nodev => "7.1",
            GenerationStep::Events => "7.2",
            GenerationStep::AddArea => "7.3",
        }
    }

    /// What it gives a tokio-zcrx program, in words (what a kernel without it misses).
    pub fn gives(self) -> &'static str {
        match self {
            GenerationStep::Nic => "zero-copy receive on a NIC queue with header/data split",
            GenerationStep::CtrlOps => {
                "FLUSH_RQ (returned buffers reach the kernel at once, needed by NODEV) and \
                 EXPORT (an instance shared with another ring)"
            }
            GenerationStep::Query => {
                "feature detection (without the query the runtime assumes none of the later \
                 steps)"
            }
            GenerationStep::RxBufLen => {
                "chunks larger than a page (fewer completions per byte, huge-page areas)"
            }
            GenerationStep::Nodev => {
                "copy mode without a capable NIC (any TCP socket, loopback included)"
            }
            GenerationStep::Events => {
                "copy-fallback and allocation-failure events and the kernel's copy counters \
                 (Zcrx::subscribe, stats)"
            }
            GenerationStep::AddArea => {
                "growing the receive memory at run time instead of dropping packets \
                 (ZCRX_CTRL_ADD_AREA)"
            }
        }
    }
}

/// Whether the kernel has one [`GenerationStep`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct GenerationEntry {
    /// The step.
    pub step: GenerationStep,
    /// [`GenerationStep::name`].
    pub name: &'static str,
    /// [`GenerationStep::min_kernel`].
    pub min_kernel: &'static str,
    /// Whether this kernel has it.
    pub support: Support,
    /// [`GenerationStep::gives`].
    pub gives: &'static str,
}

/// The kernel's zcrx generation: the steps of zcrx's growth it has.
///
/// ```no_run
/// use tokio_zcrx::probe::{self, GenerationStep, ProbeOptions};
///
/// let report = probe::run(&ProbeOptions::new().interface("lo"));
/// println!("zcrx generation: {}", report.generation.summary);
/// if report.generation.missing.contains(&GenerationStep::AddArea) {
///     println!("this kernel cannot grow a receive area at run time (Linux 7.3+)");
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ZcrxGeneration {
    /// The first release of the newest step this kernel has together with every older one
    /// (`"7.2"`); `None` when it has no zcrx, or the first step is unknown.
    pub kernel: Option<&'static str>,
    /// Every step, oldest first.
    pub steps: Vec<GenerationEntry>,
    /// The steps this kernel lacks (unknown ones are not listed).
    pub missing: Vec<GenerationStep>,
    /// Plain-words summary.
    pub summary: String,
}

/// CAP_NET_ADMIN in this thread's capability sets, and what needs it on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct CapNetAdminReport {
    /// Whether CAP_NET_ADMIN is effective; `None` if it could not be read.
    pub effective: Option<bool>,
    /// Whether it is permitted (could be made effective); `None` if unreadable.
    pub permitted: Option<bool>,
    /// Whether it is in the bounding set (an exec of a binary with file capabilities could
    /// gain it); `None` if unreadable.
    pub bounding: Option<bool>,
    /// When this process gave it up with
    /// [`Zcrx::drop_privileges`](crate::Zcrx::drop_privileges), in words (`12.3 s ago (at
    /// 2026-11-30 21:03:04 UTC)`); `None` if it did not.
    pub dropped: Option<String>,
    /// Which zcrx operations need it on this kernel, in words.
    pub needed_for: String,
    /// Plain-words summary.
    pub summary: String,
}

/// The result of a trial registration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "outcome", rename_all = "snake_case"))]
#[non_exhaustive]
pub enum TrialOutcome {
    /// The probe did not register, for the reason given.
    NotAttempted {
        /// Why not.
        reason: String,
    },
    /// The kernel registered the instance; the probe tore it down at once.
    Registered,
    /// The kernel refused the registration.
    Refused {
        /// The kernel's answer.
        errno: Errno,
    },
    /// Preparing the registration failed; the kernel was not asked.
    Failed {
        /// What was being prepared.
        step: String,
        /// The error.
        errno: Errno,
    },
}

/// An interface's header/data split setting (`ethtool -g`'s "TCP data split").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum TcpDataSplit {
    /// Header/data split is on.
    On,
    /// Header/data split is off.
    Off,
    /// The driver does not report it (it has no header/data split, or no ring parameters at
    /// all, like virtual devices).
    Unsupported,
    /// It could not be read (ethtool netlink unavailable); see the interface's notes.
    Unknown,
}

/// The probe's conclusion for one interface and queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Verdict {
    /// A trial registration succeeded: zcrx works on this queue.
    Ready,
    /// Every precondition the probe can see is met, but it did not register (that would
    /// restart the queue); [`ProbeOptions::try_register`] confirms.
    PreconditionsMet,
    /// zcrx can work here after a configuration change; see the fix.
    NeedsConfiguration,
    /// This interface or kernel cannot do zcrx.
    Unsupported,
    /// No such interface.
    NotFound,
    /// The probe could not tell; the reason says why.
    Unknown,
}

/// What the probe found for one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct InterfaceReport {
    /// The interface name.
    pub name: String,
    /// Its index, `None` if it does not exist.
    pub ifindex: Option<u32>,
    /// The driver bound to its parent device; `None` for a virtual device (or no driver).
    pub driver: Option<String>,
    /// No parent device (lo, veth, bridges, ifb...): zcrx has nothing to DMA into.
    pub virtual_device: bool,
    /// Number of receive queues, from `/sys/class/net/IF/queues/rx-*`.
    pub rx_queues: Option<u32>,
    /// The receive queue examined.
    pub queue: Option<u32>,
    /// Header/data split, from the ethtool netlink ring parameters.
    pub tcp_data_split: TcpDataSplit,
    /// Header/data split threshold in bytes (zcrx needs 0); `None` if not reported.
    pub hds_thresh: Option<u32>,
    /// Whether an XDP program is attached (zcrx refuses then); `None` if unknown.
    pub xdp_attached: Option<bool>,
    /// The trial registration, if any.
    pub registration: TrialOutcome,
    /// The conclusion.
    pub verdict: Verdict,
    /// Why, in plain words.
    pub reason: String,
    /// The command or change that fixes it, where there is one.
    pub fix: Option<String>,
    /// Advice for using the interface (e.g. steering the flow to the queue).
    pub hints: Vec<String>,
    /// What the NIC steers to the probed queue besides the service's flow, as far as its RSS
    /// indirection table and n-tuple rules tell (`ethtool -x`, `ethtool -n`): every packet
    /// steered there is written into the zcrx process's memory, whatever socket it is for.
    /// Empty for virtual devices.
    pub exposure: Vec<String>,
    /// Every receive queue as the kernel's `netdev` family reports it: NAPI id and what is
    /// bound. Empty while the interface is down, or where the kernel cannot say (see notes).
    pub queues: Vec<QueueReport>,
    /// How to steer a service's port to the queue group from the probed queue to the last
    /// one, and whether the driver supports it. `None` for virtual devices.
    pub steering: Option<SteeringReport>,
    /// Side observations, such as a check that could not be made.
    pub notes: Vec<String>,
}

/// One receive queue, as the kernel's `netdev` generic netlink family reports it
/// (`NETDEV_CMD_QUEUE_GET`; what `ynl --family netdev --dump queue-get` prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct QueueReport {
    /// The queue's index.
    pub id: u32,
    /// The NAPI instance polling it: a socket whose
    /// [`incoming_napi_id`] equals it receives through this queue. `None` when the driver
    /// does not link queues to NAPI instances.
    pub napi_id: Option<u32>,
    /// An io_uring memory provider (a zcrx instance, maybe one still being torn down) is
    /// bound to the queue.
    pub io_uring_provider: bool,
    /// A devmem dma-buf is bound to the queue.
    pub dmabuf: bool,
    /// An AF_XDP socket is bound to the queue.
    pub xsk: bool,
    /// The interrupt its NAPI instance is scheduled from, if the driver says: the CPU that
    /// serves it is where the queue's zcrx driver thread belongs.
    pub irq: Option<u32>,
}

/// Steering one port's traffic to a group of receive queues: the ethtool commands, and
/// whether the driver has what they need.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct SteeringReport {
    /// The group's first queue (the probed queue); default RSS keeps the queues before it.
    pub first_queue: u32,
    /// Queues in the group, up to the last queue.
    pub queues: u32,
    /// Whether the driver has n-tuple rules (`ethtool -n` answers rather than EOPNOTSUPP).
    pub ntuple: Support,
    /// Whether the driver has an RSS indirection table (`ethtool -x` answers). A group of more
    /// than one queue also needs additional RSS contexts, which only creating one shows
    /// (of the zcrx-capable drivers, mlx5, bnxt and fbnic have them in 7.2 and 7.3; gve has
    /// none, only n-tuple rules to single queues).
    pub rss: Support,
    /// The commands, in order: `PORT` is the service's TCP port, `CONTEXT` the number
    /// `ethtool -X ... context new` prints.
    pub commands: Vec<String>,
}

/// Runs the probe. Never panics, never fails: whatever cannot be checked is reported as such.
///
/// ```no_run
/// use tokio_zcrx::probe::{self, ProbeOptions, Support};
///
/// let report = probe::run(&ProbeOptions::new().interface("lo"));
/// if report.features.nodev.support == Support::Supported {
///     println!("NODEV mode works on any TCP socket, loopback included");
/// }
/// ```
pub fn run(options: &ProbeOptions) -> ProbeReport {
    let host = host::probe_host();
    let interfaces = interface::probe_interfaces(options, &host);
    ProbeReport {
        kernel_release: host.release,
        io_uring: host.io_uring,
        recv_zc: host.recv_zc,
        zcrx_query: host.zcrx_query,
        features: host.features,
        generation: host.generation,
        nodev_trial: host.nodev_trial,
        cap_net_admin: host.cap_net_admin,
        interfaces,
    }
}

/// Why `io_uring_setup` failed here, in the probe's words (sysctl, seccomp, ...); the runtime
/// uses it for its own errors.
pub(crate) fn explain_io_uring_setup_failure(errno: Errno) -> String {
    system::explain_setup_failure(errno, system::io_uring_disabled_sysctl())
}
