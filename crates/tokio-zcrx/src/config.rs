//! The runtime builder: which queue to register and how big everything is.
//!
//! [`Builder::validate`] checks every setting once and splits them into a [`Config`]: what
//! mode selection needs, the io_uring backend's [`UringConfig`] and the copy backend's
//! [`CopyConfig`], so each backend reads only its own checked settings, never the builder.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::mode::Mode;
use crate::sys::hugepages::{HugePageFacts, HUGE_PAGE_SIZE};
use crate::sys::registration::AreaBacking;

mod queues;
pub use queues::{DriverCpus, ParseQueueSetError, QueueSet};

/// Which receive queue the io_uring backend registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A NIC receive queue, by interface name (e.g. `"eth0"`) and queue index.
    Interface {
        /// Interface name, resolved in the calling thread's network namespace.
        name: String,
        /// Receive queue index (see `ethtool -l IF`).
        queue: u32,
    },
    /// A NIC receive queue by interface index.
    InterfaceIndex {
        /// The interface index (`ip link` shows it first).
        index: u32,
        /// Receive queue index.
        queue: u32,
    },
    /// The device-less mode (Linux 7.1+): no NIC is bound; the kernel copies every received
    /// byte into the area. Works on any TCP socket, loopback included. Useful for testing and
    /// for one API across machines; it saves no copy.
    NoDevice,
}

/// Whether the kernel's zcrx events (allocation failure, copy fallback) and copy statistics
/// are required, in the io_uring modes (`nic`, `nodev`).
///
/// Copy mode has no kernel events: it counts every byte as copied and announces copying with
/// its own [`CopyFallback`](crate::EventKind::CopyFallback) events, whatever the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventsPolicy {
    /// Use events and copy statistics when the kernel has them (7.2+), run without otherwise.
    #[default]
    IfSupported,
    /// Only run an io_uring mode with events: on kernels without them (before 7.2),
    /// [`Mode::Nic`] and [`Mode::NoDevice`] fail [`Builder::build`] with
    /// [`ErrorKind::KernelTooOld`], and [`Mode::Auto`] skips both (the reasons are in
    /// [`Zcrx::mode_selection`](crate::Zcrx::mode_selection)) and chooses copy mode, where
    /// every copy is reported. So monitoring sees the copies in whatever mode runs.
    Required,
    /// Do not register for the kernel's events (its copy statistics are then unavailable
    /// too). Copy mode still reports its own copies.
    Disabled,
}

/// Which 2 MiB huge pages back the receive area when chunks are larger than a page (see
/// [`Builder::chunk_size`]); one-page chunks need none.
///
/// The kernel wants every chunk physically contiguous, which 2 MiB pages guarantee for chunks
/// up to 2 MiB. Reserved pages (hugetlb, `vm.nr_hugepages`) are set aside by the
/// administrator and always contiguous; transparent huge pages come from free memory when the
/// kernel can find whole 2 MiB blocks, which a busy machine may not. The runtime checks
/// before registering that the area really is backed by huge pages (`AnonHugePages` in
/// `/proc/self/smaps`), and [`Builder::build`] fails with
/// [`ErrorKind::HugePagesUnavailable`] otherwise; the message says how many pages the area
/// needs, how many are free, and the command that reserves them.
///
/// ```no_run
/// # fn main() -> Result<(), tokio_zcrx::Error> {
/// use tokio_zcrx::{HugePages, Mode, Zcrx};
///
/// // 64 KiB chunks in a 64 MiB area: 32 reserved 2 MiB pages
/// // (`echo 32 > /proc/sys/vm/nr_hugepages` as root), nothing else.
/// let zcrx = Zcrx::builder()
///     .mode(Mode::Nic)
///     .interface("eth0", 3)
///     .chunk_size(64 << 10)
///     .area_size(64 << 20)
///     .huge_pages(HugePages::Reserved)
///     .build()?;
/// # drop(zcrx);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Reserved pages when enough are free, else transparent huge pages if the kernel allows
    /// them (`/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`).
    #[default]
    Auto,
    /// Only reserved 2 MiB pages (`MAP_HUGETLB`); too few free fails the build.
    Reserved,
    /// Only transparent huge pages (`MADV_HUGEPAGE` on a 2 MiB-aligned area).
    Transparent,
}

/// Configures and starts a zcrx runtime ([`Zcrx`](crate::Zcrx)).
///
/// ```no_run
/// # fn main() -> Result<(), tokio_zcrx::Error> {
/// use std::time::Duration;
/// use tokio_zcrx::{Mode, Zcrx};
///
/// // Zero copy on queue 3 of eth0, or fail (see docs/nic-setup.md for the ethtool steps).
/// let zcrx = Zcrx::builder()
///     .mode(Mode::Nic)
///     .interface("eth0", 3)
///     .area_size(64 << 20)
///     .event_rearm_interval(Duration::from_millis(250))
///     .build()?;
/// # drop(zcrx);
/// // Whatever this machine allows: zero copy, the kernel's copy path, or plain copying.
/// let zcrx = Zcrx::builder().interface("eth0", 3).build()?;
/// println!("receiving in {} mode", zcrx.mode_selection());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    pub(crate) mode: Mode,
    pub(crate) interface: Option<Target>,
    pub(crate) area_size: usize,
    pub(crate) refill_entries: Option<u32>,
    pub(crate) chunk_size: Option<u32>,
    pub(crate) huge_pages: HugePages,
    pub(crate) cq_entries: u32,
    pub(crate) events: EventsPolicy,
    pub(crate) event_rearm_interval: Duration,
    pub(crate) thread_name: String,
    pub(crate) copy_buffers: u32,
    pub(crate) copy_buffer_size: usize,
    pub(crate) copy_memory_limit: Option<u64>,
    pub(crate) stream_budget: Option<u64>,
    pub(crate) queue_release_wait: Duration,
    pub(crate) area_growth: Option<AreaGrowth>,
    /// `interface_queues`: the queues of `interface` (whose own queue index is then unused).
    pub(crate) queues: Option<QueueSet>,
    pub(crate) napi_wait: Duration,
    pub(crate) driver_cpus: DriverCpus,
    pub(crate) driver_linger: Duration,
}

/// How the receive area grows under load ([`Builder::area_growth`], Linux 7.3+): it starts
/// with `initial` bytes, and the driver adds a kernel area of `step` bytes
/// (`ZCRX_CTRL_ADD_AREA`) whenever receives run short of chunks, until the areas hold
/// `maximum` bytes (the last step may be smaller). Each size is rounded up to whole chunks.
///
/// ```
/// use tokio_zcrx::AreaGrowth;
///
/// // 256 KiB at first, then 256 KiB more at a time, up to 4 MiB (16 areas).
/// let growth = AreaGrowth { initial: 256 << 10, step: 256 << 10, maximum: 4 << 20 };
/// assert_eq!(growth.areas(), 16);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AreaGrowth {
    /// Bytes registered with the queue (the first area); replaces [`Builder::area_size`].
    pub initial: usize,
    /// Bytes in each area added.
    pub step: usize,
    /// The most bytes in all areas together.
    pub maximum: usize,
}

impl AreaGrowth {
    /// How many areas the policy makes at most, the first included (before rounding to
    /// chunks); 0 if `maximum` is below `initial` or `step` is 0.
    pub fn areas(&self) -> usize {
        if self.maximum < self.initial || self.step == 0 {
            return 0;
        }
        1 + (self.maximum - self.initial).div_ceil(self.step)
    }
}

/// The checked growth policy: sizes in whole chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrowthPlan {
    /// Bytes per added area.
    pub(crate) step: usize,
    /// The most bytes in all areas.
    pub(crate) maximum: usize,
    /// The most areas, the first included (at most `zcrx_core::completion::MAX_AREAS`).
    pub(crate) max_areas: u32,
    /// Whether a kernel without `ZCRX_CTRL_ADD_AREA` is an error (modes nic and nodev), or
    /// only reported in the mode selection (auto).
    pub(crate) required: bool,
}

/// The largest refill ring the kernel accepts without clamping (`IO_RQ_MAX_ENTRIES`).
pub(crate) const MAX_REFILL_ENTRIES: u32 = 32768;
/// The largest completion queue the kernel accepts without `IORING_SETUP_CLAMP`
/// (`IORING_MAX_CQ_ENTRIES` = 2 * `IORING_MAX_ENTRIES` = 65536).
pub(crate) const MAX_CQ_ENTRIES: u32 = 65536;
/// The smallest completion queue this runtime accepts: a smaller one would overflow, and so
/// end receives, at nearly every burst.
pub(crate) const MIN_CQ_ENTRIES: u32 = 64;
/// The largest chunk: the area is backed by 2 MiB huge pages when chunks exceed a page, and a
/// chunk must be physically contiguous.
pub(crate) const MAX_CHUNK_SIZE: u32 = 2 << 20;
/// The largest copy pool (bytes), which is allocated and faulted in at build.
pub(crate) const MAX_COPY_POOL_BYTES: usize = 1 << 30;
/// The most copy buffers (the free list holds one index per buffer).
pub(crate) const MAX_COPY_BUFFERS: u32 = 1 << 20;
/// The longest event re-arm interval: events are wake-ups, and a later one helps nobody.
pub(crate) const MAX_EVENT_REARM_INTERVAL: Duration = Duration::from_secs(3600);
/// The longest wait for a queue's previous zcrx instance to go: teardown takes milliseconds to
/// seconds; a queue still held after minutes is held by a live process.
pub(crate) const MAX_QUEUE_RELEASE_WAIT: Duration = Duration::from_secs(600);
/// The default wait, what the kernel's own zcrx selftest allows.
pub(crate) const DEFAULT_QUEUE_RELEASE_WAIT: Duration = Duration::from_secs(5);
/// How long a connection whose NAPI id is not known yet waits for its first packet, by
/// default (`Builder::napi_wait`).
pub(crate) const DEFAULT_NAPI_WAIT: Duration = Duration::from_millis(200);
/// The longest such wait: a connection that sent nothing in seconds is not worth holding
/// back the accept loop for.
pub(crate) const MAX_NAPI_WAIT: Duration = Duration::from_secs(10);
/// How long a driver whose streams are all paused, while their readers drop buffers, waits
/// for the next to resume before it sleeps (`Builder::driver_linger`): a reader draining a
/// stream of tens of chunks reaches its low mark within microseconds, and a sleep and
/// eventfd wake-up cost about 8 µs of CPU (both sides' context switches, measured with the
/// per-chunk benchmark's two queues).
pub(crate) const DEFAULT_DRIVER_LINGER: Duration = Duration::from_micros(50);
/// The longest linger: beyond a millisecond a sleep costs less than the CPU lingering takes.
pub(crate) const MAX_DRIVER_LINGER: Duration = Duration::from_millis(1);

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            mode: Mode::Auto,
            interface: None,
            area_size: 32 << 20,
            refill_entries: None,
            chunk_size: None,
            huge_pages: HugePages::Auto,
            cq_entries: 8192,
            events: EventsPolicy::default(),
            event_rearm_interval: Duration::from_millis(100),
            thread_name: "tokio-zcrx-driver".into(),
            // 4 MiB: fits the CPU cache, which matters more for copying than pool size.
            copy_buffers: 64,
            copy_buffer_size: 64 << 10,
            copy_memory_limit: None,
            stream_budget: None,
            queue_release_wait: DEFAULT_QUEUE_RELEASE_WAIT,
            area_growth: None,
            queues: None,
            napi_wait: DEFAULT_NAPI_WAIT,
            driver_cpus: DriverCpus::default(),
            driver_linger: DEFAULT_DRIVER_LINGER,
        }
    }
}

impl Builder {
    /// A builder with defaults: mode `Auto`, 32 MiB area, one-page chunks, an 8192-entry
    /// CQ, events if supported (re-armed at most every 100 ms), a copy pool of 64 buffers of
    /// 64 KiB.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// How to receive; default [`Mode::Auto`], which picks the best mode that works here.
    pub fn mode(mut self, mode: Mode) -> Builder {
        self.mode = mode;
        self
    }

    /// The NIC receive queue for [`Mode::Nic`] (and the first choice of [`Mode::Auto`]):
    /// queue `queue` of interface `name`. An interface that does not exist fails
    /// [`build`](Builder::build) with [`ErrorKind::InterfaceNotFound`] in both modes: `Auto`
    /// does not hide a misspelt name behind another mode.
    pub fn interface(mut self, name: impl Into<String>, queue: u32) -> Builder {
        self.interface = Some(Target::Interface {
            name: name.into(),
            queue,
        });
        self.queues = None;
        self
    }

    /// Like [`interface`](Builder::interface), by interface index.
    pub fn interface_index(mut self, index: u32, queue: u32) -> Builder {
        self.interface = Some(Target::InterfaceIndex { index, queue });
        self.queues = None;
        self
    }

    /// Several receive queues of interface `name` ([`Mode::Nic`], and the first choice of
    /// [`Mode::Auto`]): all of them, a range or a list ([`QueueSet`]). Each queue gets a zcrx
    /// binding, an area of [`area_size`](Builder::area_size) bytes and a driver thread of
    /// its own, registered as [`interface`](Builder::interface) registers one queue, and
    /// every setting of this builder applies to each. A set of one queue is exactly
    /// `interface(name, queue)`.
    ///
    /// With several queues the runtime hands each connection (from
    /// [`ZcListener`](crate::ZcListener) or [`Zcrx::attach`](crate::Zcrx::attach)) to the
    /// driver of the queue its packets arrive on, by the NAPI id the kernel recorded for the
    /// socket (`SO_INCOMING_NAPI_ID`); a connection that arrives on a queue not bound here is
    /// received in copy mode on Tokio's reactor, counted in
    /// [`Stats::unmatched_connections`](crate::Stats::unmatched_connections) and reported as
    /// [`EventKind::UnmatchedConnection`](crate::EventKind::UnmatchedConnection): giving it
    /// to another queue's binding could fail with `EFAULT`. See docs/architecture.md,
    /// "Several queues".
    ///
    /// A queue that cannot be bound fails [`build`](Builder::build) in [`Mode::Nic`],
    /// naming the queue and why; in [`Mode::Auto`] the queues that can be bound are, and the
    /// others are listed with their reasons in
    /// [`ModeSelection::queues_refused`](crate::ModeSelection::queues_refused) (nic mode is
    /// refused only if none can be).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), tokio_zcrx::Error> {
    /// use tokio_zcrx::{Mode, QueueSet, Zcrx};
    ///
    /// // Queues 4 to 7 of eth0, where an RSS context steers the service's port.
    /// let zcrx = Zcrx::builder().mode(Mode::Nic).interface_queues("eth0", 4..=7).build()?;
    /// for queue in zcrx.queue_stats() {
    ///     println!("queue {}: {} bytes", queue.queue, queue.stats.bytes);
    /// }
    /// // Every receive queue eth0 has.
    /// let all = Zcrx::builder().interface_queues("eth0", QueueSet::All).build()?;
    /// # drop((zcrx, all));
    /// # Ok(())
    /// # }
    /// ```
    pub fn interface_queues(
        mut self,
        name: impl Into<String>,
        queues: impl Into<QueueSet>,
    ) -> Builder {
        let queues = queues.into();
        self.interface = Some(Target::Interface {
            name: name.into(),
            queue: queues.single().unwrap_or(0),
        });
        self.queues = queues.single().is_none().then_some(queues);
        self
    }

    /// How long a connection whose NAPI id the kernel has not recorded yet (it has received
    /// no packet through a NAPI instance since the handshake) waits for its first packet
    /// before it is placed, with [`interface_queues`](Builder::interface_queues) of several
    /// queues. [`ZcListener::accept`](crate::ZcListener::accept) and
    /// [`Zcrx::attach_async`](crate::Zcrx::attach_async) wait, then read the id again; a
    /// connection still without one is received in copy mode (unmatched). Default 200 ms;
    /// at most 10 s. Loopback connections never get an id and are placed at once.
    pub fn napi_wait(mut self, wait: Duration) -> Builder {
        self.napi_wait = wait;
        self
    }

    /// Where the driver threads of NIC queues run: by default on the CPUs of each queue's
    /// interrupt, where the system says ([`DriverCpus::NearInterrupt`]).
    pub fn driver_cpus(mut self, cpus: DriverCpus) -> Builder {
        self.driver_cpus = cpus;
        self
    }

    /// How long a driver thread waits, giving its CPU to other threads, before it sleeps
    /// when every stream it receives for is paused by its budget
    /// ([`StreamOptions::budget`]) and their readers are dropping buffers: the next stream
    /// whose reader reaches its resume mark meanwhile is resumed without the sleep and the
    /// wake-up (an eventfd write by the reader, two context switches: about 8 µs of CPU).
    /// It never lingers when no buffer came back since it last slept (an idle runtime, or
    /// readers that hold what they have), and after a linger that found nothing it skips
    /// the next ones (1, 2, 4, ... up to 64 sleeps) until one finds work again.
    ///
    /// Default 50 µs; zero sleeps at once (for a host where a few microseconds of spare
    /// CPU matter more than the wake-ups); at most 1 ms.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokio_zcrx::Zcrx;
    ///
    /// // Many readers on a busy host, each draining tens of buffers at a time.
    /// let builder = Zcrx::builder().driver_linger(Duration::from_micros(100));
    /// # drop(builder);
    /// ```
    pub fn driver_linger(mut self, linger: Duration) -> Builder {
        self.driver_linger = linger;
        self
    }

    /// Shorthand for `.mode(Mode::NoDevice)`: the kernel's device-less mode (Linux 7.1+).
    pub fn no_device(self) -> Builder {
        self.mode(Mode::NoDevice)
    }

    /// The copy-mode buffer pool's recycled set and largest read: `buffers` buffers of
    /// `buffer_size` bytes (default 64 of 64 KiB), allocated up front and reused while they
    /// are in the CPU cache, which copies fastest. Reads are sized to what arrives (powers of
    /// two from 4 KiB up to `buffer_size`); smaller buffers are recycled too (up to `buffers`
    /// of each size). When more is held, the pool allocates beyond the recycled set, up to
    /// [`copy_memory_limit`](Builder::copy_memory_limit), and frees the extra when it comes
    /// back: no stream waits because others hold buffers until that limit is reached. Both
    /// must be at least 1; at most 2^20 buffers and 1 GiB in all, else
    /// [`build`](Builder::build) fails with [`ErrorKind::InvalidConfig`].
    pub fn copy_pool(mut self, buffers: u32, buffer_size: usize) -> Builder {
        self.copy_buffers = buffers;
        self.copy_buffer_size = buffer_size;
        self
    }

    /// The most memory copy-mode buffers handed out may take together (held by the
    /// application, or being read into). Beyond it, streams wait for buffers to come back,
    /// in the order they started waiting. Default: 256 MiB, or a quarter of the memory
    /// available to the process (its cgroup's limit included) when that is less, and never
    /// less than the recycled set of [`copy_pool`](Builder::copy_pool). At least one buffer
    /// of the pool's `buffer_size` and at least the recycled set, else
    /// [`build`](Builder::build) fails with [`ErrorKind::InvalidConfig`]; `u64::MAX` sets no
    /// limit. [`Stats::memory_capacity`](crate::Stats::memory_capacity) reports it.
    pub fn copy_memory_limit(mut self, bytes: u64) -> Builder {
        self.copy_memory_limit = Some(bytes);
        self
    }

    /// The bytes each stream may hold (received, handed out and not yet dropped) before it
    /// stops receiving; it receives again once it holds half as much, or, once its reader
    /// has taken everything delivered and waits for more, as soon as it holds less than the
    /// budget (a reader that waits while it holds part of a message is never left waiting
    /// for its own drops). The rest of its data
    /// waits in its socket, and TCP flow control slows its peer, so that one reader that holds
    /// on to its buffers (a peer that does not read its replies, a leaked buffer) cannot take
    /// the memory every other stream receives into.
    ///
    /// In every mode. By default the budget is derived from the shared memory (the zcrx
    /// area, or the copy pool's memory limit) and the number of open streams: half the
    /// memory shared among them, at least two chunks or buffers each, at most a quarter of
    /// the memory for one stream ([`zcrx_core::budget::BudgetPolicy`]); while a quarter of
    /// the memory is held, derived budgets share out a quarter of what is left instead (nic and
    /// nodev modes; at least two chunks). In nic and nodev
    /// modes a budget counts whole chunks, and a stream asks the kernel for at most its
    /// room; in nic mode it also bounds what the kernel queues for the socket, which is in
    /// the area too (see [`Zcrx::prepare_listener`](crate::Zcrx::prepare_listener) and
    /// docs/holding-buffers.md). A budget set here is the same for every stream;
    /// [`StreamOptions::budget`] overrides it per stream. At least 1 byte; `u64::MAX` turns
    /// budgets off.
    pub fn stream_budget(mut self, bytes: u64) -> Builder {
        self.stream_budget = Some(bytes);
        self
    }

    /// Size of the receive area in bytes (rounded up to whole chunks). Every buffer handed
    /// out lives in it, so it bounds the memory held by unconsumed data. Keeping it near the
    /// CPU cache size helps in copy fallback (see docs/architecture.md). Default 32 MiB.
    /// At least two chunks; at most 2^31 - 1 pages (the kernel's pinning limit; kernels
    /// before mid-2026 also refuse more than 1 GiB at registration).
    pub fn area_size(mut self, bytes: usize) -> Builder {
        self.area_size = bytes;
        self
    }

    /// Lets the receive area grow under load (Linux 7.3+): it starts with
    /// `growth.initial` bytes (instead of [`Self::area_size`]), and whenever receives run
    /// short of chunks the driver adds an area of `growth.step` bytes with
    /// `ZCRX_CTRL_ADD_AREA`, up to `growth.maximum` bytes in all. Derived stream budgets follow
    /// the memory as it grows; [`Stats::areas`](crate::Stats::areas) and
    /// [`Stats::memory_capacity`](crate::Stats::memory_capacity) report it, and an
    /// [`EventKind::AreaGrown`](crate::EventKind::AreaGrown) event tells each step. Areas are
    /// never given back while the runtime runs (the kernel cannot remove one); like the first
    /// area, each stays mapped until the last buffer in it is dropped.
    ///
    /// The driver adds an area when the kernel reports an allocation failure (a NIC queue's
    /// page pool found no chunk: the NIC drops), when a receive ends with `ENOMEM` (the copy
    /// path, and so every NODEV receive, found no chunk), and, before either happens, when
    /// the application holds three quarters of the memory. See docs/holding-buffers.md.
    ///
    /// Before Linux 7.3 modes `Nic` and `NoDevice` refuse to build
    /// ([`ErrorKind::KernelTooOld`](crate::ErrorKind::KernelTooOld)); `Auto` keeps a fixed
    /// area of `growth.initial` bytes and says so in
    /// [`ModeSelection::unavailable`](crate::ModeSelection::unavailable). Copy mode ignores it.
    ///
    /// ```no_run
    /// use tokio_zcrx::{AreaGrowth, Mode, Zcrx};
    ///
    /// # fn main() -> Result<(), tokio_zcrx::Error> {
    /// let zcrx = Zcrx::builder()
    ///     .mode(Mode::NoDevice)
    ///     .area_growth(AreaGrowth { initial: 1 << 20, step: 1 << 20, maximum: 64 << 20 })
    ///     .build()?;
    /// println!("{} areas, {} bytes", zcrx.stats().areas, zcrx.stats().memory_capacity);
    /// # Ok(())
    /// # }
    /// ```
    pub fn area_growth(mut self, growth: AreaGrowth) -> Builder {
        self.area_growth = Some(growth);
        self
    }

    /// Entries in the refill ring, 1 to 32768 (the kernel's limit), rounded up to a power of
    /// two. Default: one per area chunk (of the `maximum` under [`Builder::area_growth`]),
    /// capped at 32768.
    pub fn refill_entries(mut self, entries: u32) -> Builder {
        self.refill_entries = Some(entries);
        self
    }

    /// Chunk size (the kernel's `rx_buf_len`, Linux 7.0+): a power of two from a page to
    /// 2 MiB. Default: one page.
    ///
    /// The NIC writes each packet's payload into chunks, and every chunk filled is one
    /// completion and one buffer: with 64 KiB chunks a 64 KiB TSO/GRO packet is one buffer
    /// instead of sixteen. Larger chunks need three things, checked in this order by
    /// [`build`](Builder::build):
    ///
    /// - a kernel with `rx_buf_len` (7.0+), else [`ErrorKind::KernelTooOld`];
    /// - an area of 2 MiB huge pages, since a chunk must be physically contiguous: the area
    ///   (rounded up to 2 MiB) needs `area_size / 2 MiB` pages, reserved with
    ///   `echo N > /proc/sys/vm/nr_hugepages` (N = the pages already reserved plus those
    ///   needed; per NUMA node in
    ///   `/sys/devices/system/node/nodeX/hugepages/hugepages-2048kB/nr_hugepages`), or
    ///   transparent huge pages where allowed (see [`HugePages`]); else
    ///   [`ErrorKind::HugePagesUnavailable`], whose message has the numbers and the command;
    /// - a NIC driver that supports rx page sizes (`QCFG_RX_PAGE_SIZE`: mlx5 and bnxt in
    ///   7.2 and 7.3), and
    ///   `ethtool -G IF tcp-data-split on` as for any zcrx queue; else
    ///   [`ErrorKind::ChunkSizeUnsupported`].
    ///
    /// The device-less mode ([`Mode::NoDevice`]) only takes one-page chunks.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), tokio_zcrx::Error> {
    /// use tokio_zcrx::{Mode, Zcrx};
    ///
    /// // 16 KiB chunks in a 32 MiB area: 16 huge pages (reserved, or transparent).
    /// let zcrx = Zcrx::builder()
    ///     .mode(Mode::Nic)
    ///     .interface("eth0", 3)
    ///     .chunk_size(16 << 10)
    ///     .area_size(32 << 20)
    ///     .build()?;
    /// # drop(zcrx);
    /// # Ok(())
    /// # }
    /// ```
    pub fn chunk_size(mut self, bytes: u32) -> Builder {
        self.chunk_size = Some(bytes);
        self
    }

    /// Which huge pages back an area of chunks larger than a page: reserved ones when enough
    /// are free, else transparent ones ([`HugePages::Auto`], the default), or only one kind.
    /// Ignored with one-page chunks.
    pub fn huge_pages(mut self, policy: HugePages) -> Builder {
        self.huge_pages = policy;
        self
    }

    /// Completion queue entries: a power of two from 64 to 65536 (the kernel's
    /// `IORING_MAX_CQ_ENTRIES`). Each received chunk costs one; a full CQ ends receives,
    /// which the runtime resubmits (counted in the statistics). Default 8192.
    pub fn cq_entries(mut self, entries: u32) -> Builder {
        self.cq_entries = entries;
        self
    }

    /// Whether the kernel's events are required, optional (default) or unwanted.
    pub fn events(mut self, policy: EventsPolicy) -> Builder {
        self.events = policy;
        self
    }

    /// Minimum time between a kernel event and re-arming it, so a steady copy fallback costs
    /// one event (and one syscall) per interval instead of one per packet. Default 100 ms;
    /// zero re-arms at once; at most one hour (use [`EventsPolicy::Disabled`] for no events).
    pub fn event_rearm_interval(mut self, interval: Duration) -> Builder {
        self.event_rearm_interval = interval;
        self
    }

    /// How long registration waits for the queue's previous zcrx instance to go. Right after
    /// a process that had the queue bound exits (or closes its ring), the kernel tears the
    /// instance down asynchronously, and a new registration of the same queue is refused
    /// with EEXIST until it is gone. The runtime then polls the kernel (`netdev` netlink,
    /// `QUEUE_GET`) until no io_uring memory provider is reported on the queue and registers
    /// again; past this bound, [`build`](Builder::build) fails with
    /// [`ErrorKind::QueueBusy`](crate::ErrorKind::QueueBusy), saying what holds the queue.
    /// Default 5 s (what the kernel's own selftest allows); zero fails at once; at most
    /// 10 minutes.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokio_zcrx::Zcrx;
    ///
    /// // A supervisor restarts the server at once: give the old instance up to 10 s to go.
    /// let builder = Zcrx::builder()
    ///     .interface("eth0", 3)
    ///     .queue_release_wait(Duration::from_secs(10));
    /// # drop(builder);
    /// ```
    pub fn queue_release_wait(mut self, wait: Duration) -> Builder {
        self.queue_release_wait = wait;
        self
    }

    /// Name of the driver thread. Default `tokio-zcrx-driver`. It must not contain a NUL
    /// byte; Linux shows only its first 15 bytes.
    pub fn thread_name(mut self, name: impl Into<String>) -> Builder {
        self.thread_name = name.into();
        self
    }

    /// The configuration for registering `target` with the io_uring backend.
    pub(crate) fn validate_for(&self, target: Target, page: u32) -> Result<UringConfig> {
        let invalid = |msg: String| Err(Error::new(ErrorKind::InvalidConfig, msg));
        let chunk = self.chunk_size.unwrap_or(page);
        if !chunk.is_power_of_two() || chunk < page {
            return invalid(format!(
                "chunk size {chunk} must be a power of two of at least the page size ({page}): \
                 use .chunk_size({page}) or omit it for one-page chunks"
            ));
        }
        if chunk > MAX_CHUNK_SIZE {
            return invalid(format!(
                "chunk size {chunk} is larger than {MAX_CHUNK_SIZE} bytes, the huge page size \
                 that backs the area (a chunk must be physically contiguous): use \
                 .chunk_size({MAX_CHUNK_SIZE}) or less"
            ));
        }
        let requested_area = self.area_growth.map_or(self.area_size, |g| g.initial);
        let area_size = checked_area(requested_area, chunk, page, "area size")?;
        let chunks = area_size / chunk as usize;
        let area_growth = match self.area_growth {
            Some(growth) => Some(self.growth_plan(growth, area_size, chunk, page)?),
            None => None,
        };
        let refill_entries = match self.refill_entries {
            Some(0) => {
                return invalid(format!(
                    "refill entries must be between 1 and {MAX_REFILL_ENTRIES}: use \
                     .refill_entries(N) with N >= 1, or omit it for one entry per chunk"
                ))
            }
            Some(n) if n > MAX_REFILL_ENTRIES => {
                return invalid(format!(
                    "refill entries {n} exceeds the kernel's limit of {MAX_REFILL_ENTRIES}: \
                     use .refill_entries({MAX_REFILL_ENTRIES}) or less"
                ))
            }
            Some(n) => n.next_power_of_two(),
            // One entry per chunk of the largest the area may become: the ring is sized once,
            // at registration, and returns that do not fit wait in the overflow list, unseen
            // by the kernel (a NIC's page pool finds no chunk while they wait).
            None => {
                let most = area_growth
                    .as_ref()
                    .map_or(chunks, |plan| plan.maximum / chunk as usize);
                u32::try_from(most)
                    .unwrap_or(u32::MAX)
                    .min(MAX_REFILL_ENTRIES)
                    .next_power_of_two()
                    .min(MAX_REFILL_ENTRIES)
            }
        };
        if !self.cq_entries.is_power_of_two()
            || !(MIN_CQ_ENTRIES..=MAX_CQ_ENTRIES).contains(&self.cq_entries)
        {
            return invalid(format!(
                "CQ entries {} must be a power of two from {MIN_CQ_ENTRIES} to {MAX_CQ_ENTRIES} \
                 (the kernel's IORING_MAX_CQ_ENTRIES): use .cq_entries({}) for example",
                self.cq_entries,
                self.cq_entries
                    .clamp(MIN_CQ_ENTRIES, MAX_CQ_ENTRIES)
                    .next_power_of_two()
                    .min(MAX_CQ_ENTRIES)
            ));
        }
        match &target {
            Target::Interface { name, .. } => validate_interface_name(name)?,
            Target::InterfaceIndex { index: 0, .. } => {
                return invalid(
                    "interface index 0 does not exist (indices start at 1; `ip link` shows \
                     them): use .interface(NAME, QUEUE) or a listed index"
                        .into(),
                )
            }
            Target::InterfaceIndex { .. } | Target::NoDevice => {}
        }
        Ok(UringConfig {
            target,
            area_size,
            chunk_size: chunk,
            custom_chunk: self.chunk_size.is_some_and(|c| c != page),
            huge_pages: self.huge_pages,
            refill_entries,
            cq_entries: self.cq_entries,
            events: self.events,
            event_rearm_interval: self.event_rearm_interval,
            thread_name: self.thread_name.clone(),
            stream_budget: self.stream_budget,
            queue_release_wait: self.queue_release_wait,
            area_growth,
            cpus: None,
            hand_over_moved: false,
            linger: self.driver_linger,
        })
    }

    /// Checks a growth policy whose first area is `initial` bytes (whole chunks).
    fn growth_plan(
        &self,
        growth: AreaGrowth,
        initial: usize,
        chunk: u32,
        page: u32,
    ) -> Result<GrowthPlan> {
        let step = checked_area(growth.step, chunk, page, "area growth step")?;
        let example = "AreaGrowth { initial: 1 << 20, step: 1 << 20, maximum: 64 << 20 }";
        if growth.maximum < initial.saturating_add(step) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "area growth maximum {} leaves no room to grow: it must be at least the \
                     initial area ({initial} bytes) plus one step ({step} bytes), e.g. {example}",
                    growth.maximum
                ),
            ));
        }
        let max_areas = 1 + (growth.maximum - initial).div_ceil(step);
        let limit = zcrx_core::completion::MAX_AREAS as usize;
        if max_areas > limit {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "area growth from {initial} to {} bytes in steps of {step} bytes makes \
                     {max_areas} areas; the kernel takes at most {limit} per queue: use a \
                     step of at least {} bytes",
                    growth.maximum,
                    (growth.maximum - initial).div_ceil(limit - 1)
                ),
            ));
        }
        Ok(GrowthPlan {
            step,
            maximum: growth.maximum,
            max_areas: max_areas as u32,
            required: self.mode != Mode::Auto,
        })
    }

    /// Checks every setting, before anything is tried, and splits them per backend. The io_uring
    /// sizes are checked in every mode but copy (which does not use them): a bad setting is a
    /// bug in the caller whatever this machine supports.
    pub(crate) fn validate(&self) -> Result<Config> {
        let invalid = |msg: String| Err(Error::new(ErrorKind::InvalidConfig, msg));
        if self.mode == Mode::Nic && self.interface.is_none() {
            return invalid(
                "mode nic needs a receive queue: call .interface(NAME, QUEUE) on the builder"
                    .into(),
            );
        }
        if self.copy_buffers == 0 || self.copy_buffer_size == 0 {
            return invalid(
                "the copy pool needs at least one buffer of at least one byte: use \
                 .copy_pool(64, 65536) (the default) or other non-zero sizes"
                    .into(),
            );
        }
        if self.copy_buffers > MAX_COPY_BUFFERS {
            return invalid(format!(
                "{} copy buffers is more than the limit of {MAX_COPY_BUFFERS}: use fewer, \
                 larger buffers, e.g. .copy_pool(64, 65536)",
                self.copy_buffers
            ));
        }
        // The pool is allocated and faulted in up front, so its size is real memory.
        let pool_bytes = (self.copy_buffers as usize).checked_mul(self.copy_buffer_size);
        if pool_bytes.is_none_or(|bytes| bytes > MAX_COPY_POOL_BYTES) {
            return invalid(format!(
                "a copy pool of {} buffers of {} bytes exceeds the limit of {MAX_COPY_POOL_BYTES} \
                 bytes (1 GiB, allocated up front): pass fewer or smaller buffers to \
                 .copy_pool(), e.g. .copy_pool(64, 65536); a pool that fits the CPU cache \
                 copies fastest",
                self.copy_buffers, self.copy_buffer_size
            ));
        }
        if let Some(limit) = self.copy_memory_limit {
            // `pool_bytes` fits (checked above).
            let recycled = (self.copy_buffers as u64) * self.copy_buffer_size as u64;
            if limit < self.copy_buffer_size as u64 {
                return invalid(format!(
                    "a copy memory limit of {limit} bytes cannot hold one buffer of the copy \
                     pool ({} bytes): pass at least .copy_memory_limit({}), or leave the \
                     default (256 MiB)",
                    self.copy_buffer_size, self.copy_buffer_size
                ));
            }
            if limit < recycled {
                return invalid(format!(
                    "a copy memory limit of {limit} bytes is smaller than the copy pool's \
                     recycled set ({} buffers of {} bytes, {recycled} bytes): pass at least \
                     .copy_memory_limit({recycled}), or fewer buffers to .copy_pool()",
                    self.copy_buffers, self.copy_buffer_size
                ));
            }
        }
        if self.event_rearm_interval > MAX_EVENT_REARM_INTERVAL {
            return invalid(format!(
                "event re-arm interval {:?} is longer than the limit of {:?}: to receive no \
                 events, use .events(EventsPolicy::Disabled) instead",
                self.event_rearm_interval, MAX_EVENT_REARM_INTERVAL
            ));
        }
        if self.queue_release_wait > MAX_QUEUE_RELEASE_WAIT {
            return invalid(format!(
                "a queue release wait of {:?} is longer than the limit of {:?}: a queue still \
                 bound after minutes is held by a live process, which waiting does not fix; \
                 use the default (5 s) or less",
                self.queue_release_wait, MAX_QUEUE_RELEASE_WAIT
            ));
        }
        if self.napi_wait > MAX_NAPI_WAIT {
            return invalid(format!(
                "a NAPI wait of {:?} is longer than the limit of {:?}: a connection that sent \
                 nothing for that long holds back the accept loop; use the default (200 ms) \
                 or less",
                self.napi_wait, MAX_NAPI_WAIT
            ));
        }
        if self.driver_linger > MAX_DRIVER_LINGER {
            return invalid(format!(
                "a driver linger of {:?} is longer than the limit of {:?}: past that a sleep \
                 and wake-up cost less than lingering; use the default (50 µs), or zero to \
                 sleep at once",
                self.driver_linger, MAX_DRIVER_LINGER
            ));
        }
        if let Some(queues) = &self.queues {
            if queues.queues(1).is_empty() && *queues != QueueSet::All {
                return invalid(format!(
                    "the queue set {queues:?} names no queue: pass at least one, e.g. \
                     .interface_queues(NAME, 0..4) or QueueSet::All"
                ));
            }
            if let DriverCpus::Cpus(cpus) = &self.driver_cpus {
                if cpus.is_empty() {
                    return invalid(
                        "DriverCpus::Cpus needs at least one CPU: list one per queue, or use \
                         DriverCpus::Anywhere"
                            .into(),
                    );
                }
            }
        }
        if self.stream_budget == Some(0) {
            return invalid(
                "a stream budget of 0 bytes would never receive: pass at least one chunk's \
                 worth (e.g. .stream_budget(65536)), or u64::MAX for no budget"
                    .into(),
            );
        }
        if self.thread_name.contains('\0') {
            return invalid(format!(
                "thread name {:?} contains a NUL byte, which thread names cannot hold: remove it",
                self.thread_name
            ));
        }
        if let Some(Target::Interface { name, .. }) = &self.interface {
            validate_interface_name(name)?;
        }
        let page = crate::sys::page_size() as u32;
        // Validate the zcrx sizes even when copy mode may end up chosen: a bad setting is a
        // bug in the caller whatever this machine supports.
        let uring = if self.mode != Mode::Copy {
            let target = self.interface.clone().unwrap_or(Target::NoDevice);
            Some(self.validate_for(target, page)?)
        } else {
            None
        };
        Ok(Config {
            mode: self.mode,
            interface: self.interface.clone(),
            queues: self.queues.clone(),
            napi_wait: self.napi_wait,
            driver_cpus: self.driver_cpus.clone(),
            uring,
            copy: CopyConfig {
                buffers: self.copy_buffers,
                buffer_size: self.copy_buffer_size,
                memory_limit: self.copy_memory_limit,
                event_interval: self.event_rearm_interval,
                stream_budget: self.stream_budget,
            },
        })
    }
}

/// The 2 MiB pages an area of `area_size` bytes takes (the mapping is rounded up to them).
pub(crate) fn huge_pages_needed(area_size: usize) -> u64 {
    area_size.div_ceil(HUGE_PAGE_SIZE) as u64
}

/// What memory backs the area of `config`, decided before anything is mapped: small pages for
/// one-page chunks; for larger ones reserved huge pages or transparent ones as its
/// [`HugePages`] policy allows and `facts` (this machine, now) offer. The error says how many
/// pages are needed, how many are free and what to run.
pub(crate) fn plan_area_backing(
    config: &UringConfig,
    facts: &HugePageFacts,
) -> Result<AreaBacking> {
    if !config.custom_chunk {
        return Ok(AreaBacking::Pages);
    }
    let needed = huge_pages_needed(config.area_size);
    let reserved_enough = facts.pool.is_some_and(|pool| pool.available() >= needed);
    let backing = match config.huge_pages {
        HugePages::Auto | HugePages::Reserved if reserved_enough => AreaBacking::HugeTlb,
        HugePages::Auto | HugePages::Transparent if facts.thp.allowed() => AreaBacking::Transparent,
        _ => {
            return Err(Error::new(
                ErrorKind::HugePagesUnavailable,
                huge_page_shortage(config, facts, None),
            ))
        }
    };
    Ok(backing)
}

/// Why an area of `config`'s chunks cannot be backed by huge pages here, with the numbers
/// and the commands: how many 2 MiB pages the area needs, how many are free now, how to
/// reserve them, and whether transparent huge pages are a way. `thp_backed`: the bytes of a
/// transparent huge page attempt the kernel did back with huge pages.
pub(crate) fn huge_page_shortage(
    config: &UringConfig,
    facts: &HugePageFacts,
    thp_backed: Option<u64>,
) -> String {
    let needed = huge_pages_needed(config.area_size);
    let area = needed * HUGE_PAGE_SIZE as u64;
    let mut text = format!(
        "{}-byte chunks need a receive area of 2 MiB huge pages (every chunk must be \
         physically contiguous): this {area}-byte area needs {needed} of them; ",
        config.chunk_size
    );
    match facts.pool {
        Some(pool) => {
            let target = pool.total + needed.saturating_sub(pool.available());
            text.push_str(&format!(
                "{} are free now (HugePages_Free {}, HugePages_Rsvd {}, HugePages_Total {} in \
                 /proc/meminfo). Reserve them as root with `echo {target} > \
                 /proc/sys/vm/nr_hugepages` (or per NUMA node in \
                 /sys/devices/system/node/nodeX/hugepages/hugepages-2048kB/nr_hugepages; \
                 `hugepages={target}` on the kernel command line reserves them at boot)",
                pool.available(),
                pool.free,
                pool.reserved,
                pool.total
            ));
            if config.huge_pages == HugePages::Transparent {
                text.push_str(", and pass .huge_pages(HugePages::Auto) or Reserved");
            }
        }
        None => text.push_str(
            "this kernel has no 2 MiB hugetlb pool (no /proc/meminfo HugePages lines for \
             2048 kB pages: hugetlbfs missing?)",
        ),
    }
    text.push_str("; ");
    match thp_backed {
        Some(backed) => text.push_str(&format!(
            "transparent huge pages were tried, but the kernel backed only {backed} of the \
             {area} bytes with them (memory too fragmented for whole 2 MiB blocks; reserved \
             pages do not depend on that)"
        )),
        None if config.huge_pages == HugePages::Reserved => text.push_str(
            "transparent huge pages are not tried with .huge_pages(HugePages::Reserved) \
             (HugePages::Auto tries them)",
        ),
        None if facts.thp.allowed() => text.push_str("transparent huge pages are allowed here"),
        None => text.push_str(&format!(
            "transparent huge pages, the fallback, are not available: \
             /sys/kernel/mm/transparent_hugepage/enabled is {} (`echo madvise > \
             /sys/kernel/mm/transparent_hugepage/enabled` allows them)",
            facts.thp.name()
        )),
    }
    text.push_str(&format!(
        ". Or use one-page chunks (omit .chunk_size, or .chunk_size({})), which need none",
        crate::sys::page_size()
    ));
    text
}

/// The largest area the kernel pins with `page`-byte pages, whole `chunk`s.
/// `bytes` rounded up to whole chunks, if an area of that size can be registered (at least
/// two chunks, at most what the kernel pins); `what` names the setting in the error.
fn checked_area(bytes: usize, chunk: u32, page: u32, what: &str) -> Result<usize> {
    let invalid = |msg: String| Err(Error::new(ErrorKind::InvalidConfig, msg));
    if bytes < 2 * chunk as usize {
        return invalid(format!(
            "{what} {bytes} is too small: it must hold at least two chunks of {chunk} bytes \
             (use .area_size({}) or more)",
            2 * chunk as usize
        ));
    }
    // The kernel pins at most i32::MAX pages per area (io_pin_pages); checked before the
    // rounding below, which could overflow otherwise.
    let max_area = max_area_size(page as usize, chunk as usize);
    if bytes > max_area {
        return invalid(format!(
            "{what} {bytes} is too large: the kernel pins at most 2^31 - 1 pages per area, \
             so at most {max_area} bytes with {chunk}-byte chunks (a few MiB to 1 GiB is \
             typical; see .area_size)"
        ));
    }
    Ok(bytes.div_ceil(chunk as usize) * chunk as usize)
}

fn max_area_size(page: usize, chunk: usize) -> usize {
    (i32::MAX as usize).saturating_mul(page) / chunk * chunk
}

/// An interface name as the kernel accepts it (`dev_valid_name`): 1 to 15 bytes, not `.` or
/// `..`, without `/`, `:`, whitespace or NUL.
fn validate_interface_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.contains(['/', ':', '\0'])
        && !name.chars().any(char::is_whitespace);
    if valid {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::InvalidConfig,
        format!(
            "{name:?} is not a valid interface name (1 to {} bytes, no '/', ':', whitespace \
             or NUL): use a name `ip link` lists",
            libc::IFNAMSIZ - 1
        ),
    ))
}

/// The checked configuration [`Builder::validate`] returns: what mode selection needs, and
/// each backend's own settings.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) mode: Mode,
    /// The NIC queue to try (mode nic, and auto's first choice); its name or index is checked.
    pub(crate) interface: Option<Target>,
    /// Several queues of `interface` (`Builder::interface_queues`); `None`: its one queue.
    pub(crate) queues: Option<QueueSet>,
    /// `Builder::napi_wait`.
    pub(crate) napi_wait: Duration,
    /// `Builder::driver_cpus`.
    pub(crate) driver_cpus: DriverCpus,
    /// The io_uring backend's settings, for `interface` (the device-less mode without one);
    /// `None` in copy mode, which neither checks nor uses them. See [`Config::uring_for`].
    uring: Option<UringConfig>,
    pub(crate) copy: CopyConfig,
}

impl Config {
    /// The io_uring backend's settings for registering `target` (the sizes do not depend on
    /// the target; the interface was checked with them).
    ///
    /// # Panics
    ///
    /// In copy mode, which starts no io_uring backend.
    pub(crate) fn uring_for(&self, target: Target) -> UringConfig {
        let uring = self.uring.as_ref().expect("checked in every mode but copy");
        UringConfig {
            target,
            ..uring.clone()
        }
    }
}

/// The copy backend's checked settings.
#[derive(Debug, Clone)]
pub(crate) struct CopyConfig {
    /// Buffers in the pool, 1 to [`MAX_COPY_BUFFERS`].
    pub(crate) buffers: u32,
    /// Bytes per buffer, at least 1; the pool is at most [`MAX_COPY_POOL_BYTES`].
    pub(crate) buffer_size: usize,
    /// The most bytes handed out at once (`Builder::copy_memory_limit`), at least one buffer
    /// and the recycled set; `None`: the default, which depends on the machine's memory.
    pub(crate) memory_limit: Option<u64>,
    /// At most one copy event per interval (the builder's event re-arm interval).
    pub(crate) event_interval: Duration,
    /// Every stream's budget in bytes, when fixed (`Builder::stream_budget`); derived from
    /// the pool's memory and the number of streams otherwise.
    pub(crate) stream_budget: Option<u64>,
}

/// The io_uring backend's checked configuration, for one target.
#[derive(Debug, Clone)]
pub(crate) struct UringConfig {
    pub(crate) target: Target,
    pub(crate) area_size: usize,
    pub(crate) chunk_size: u32,
    /// The chunk size differs from the page size, so `rx_buf_len` must be passed (7.0+).
    pub(crate) custom_chunk: bool,
    /// Which huge pages back the area when `chunk_size` exceeds a page.
    pub(crate) huge_pages: HugePages,
    pub(crate) refill_entries: u32,
    pub(crate) cq_entries: u32,
    pub(crate) events: EventsPolicy,
    pub(crate) event_rearm_interval: Duration,
    pub(crate) thread_name: String,
    /// Every stream's budget in bytes, when fixed (`Builder::stream_budget`); derived from
    /// the area and the number of streams otherwise.
    pub(crate) stream_budget: Option<u64>,
    /// How long to wait out a previous instance's teardown on the queue (EEXIST).
    pub(crate) queue_release_wait: Duration,
    /// `Builder::area_growth`, checked.
    pub(crate) area_growth: Option<GrowthPlan>,
    /// The CPUs the driver thread runs on (`Builder::driver_cpus`, resolved for its queue);
    /// `None`: wherever the scheduler puts it.
    pub(crate) cpus: Option<Vec<usize>>,
    /// One driver of several queues: a receive that fails with `EFAULT` (net_iovs of another
    /// queue: the flow moved) ends its stream as moved, for the group to hand the socket to
    /// the driver that owns them, instead of with the error.
    pub(crate) hand_over_moved: bool,
    /// `Builder::driver_linger`.
    pub(crate) linger: Duration,
}

/// How a stream reads, for [`Zcrx::attach_with`](crate::Zcrx::attach_with).
///
/// Built with [`new`](StreamOptions::new) (or `default()`) and setters, so that options can
/// be added without breaking callers (`#[non_exhaustive]`):
///
/// ```
/// use tokio_zcrx::StreamOptions;
///
/// let options = StreamOptions::new().read_limit(64 << 10);
/// assert_eq!(options.read_limit, Some(64 << 10));
/// assert_eq!(StreamOptions::new().read_limit, None);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamOptions {
    /// At most this many bytes per receive request (the kernel's `len`); the next request is
    /// made only when the consumer has taken everything delivered. `None` (the default) keeps
    /// one receive running until EOF, the fastest way. A limit is backpressure: a slow consumer
    /// then holds at most about `limit` bytes of the area.
    pub read_limit: Option<u32>,
    /// This stream's budget in bytes (see [`Builder::stream_budget`]); `None` (the default)
    /// takes the runtime's.
    pub budget: Option<u64>,
}

impl StreamOptions {
    /// The defaults: no read limit.
    pub fn new() -> StreamOptions {
        StreamOptions::default()
    }

    /// Sets [`read_limit`](StreamOptions::read_limit) to `bytes` per receive request. A limit
    /// of 0 would never read: [`attach_with`](crate::Zcrx::attach_with) refuses it with
    /// [`ErrorKind::InvalidConfig`].
    pub fn read_limit(mut self, bytes: u32) -> StreamOptions {
        self.read_limit = Some(bytes);
        self
    }

    /// Sets [`budget`](StreamOptions::budget): this stream stops receiving while it holds
    /// `bytes` or more, and receives again at half of it, or below it while its reader
    /// waits (see [`Builder::stream_budget`]). `u64::MAX` turns the budget off for
    /// this stream; 0 would never receive: [`attach_with`](crate::Zcrx::attach_with) refuses
    /// it with [`ErrorKind::InvalidConfig`].
    ///
    /// In nic mode a connection's TCP window scale is fixed at its handshake, from the
    /// listener's window clamp, which [`Zcrx::prepare_listener`](crate::Zcrx::prepare_listener)
    /// sizes for the runtime's largest budget: a budget here larger than that gets a receive
    /// window of at most 2 to 4 times the window the runtime's largest budget needs. Set the
    /// larger budget with [`Builder::stream_budget`] if every stream may have it.
    pub fn budget(mut self, bytes: u64) -> StreamOptions {
        self.budget = Some(bytes);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::hugepages::{HugePagePool, ThpMode};

    fn validate(b: Builder) -> Result<UringConfig> {
        b.validate_for(Target::NoDevice, 4096)
    }

    fn kind(b: Builder) -> ErrorKind {
        match b.validate() {
            Err(e) => e.kind(),
            Ok(_) => validate(b).unwrap_err().kind(),
        }
    }

    #[test]
    fn area_growth_is_checked_and_planned_in_whole_chunks() {
        let growth = |initial, step, maximum| AreaGrowth {
            initial,
            step,
            maximum,
        };
        // 10,000 bytes round up to 3 pages; the last step may be smaller: 1 + ceil(87,712 /
        // 12,288) = 9 areas.
        let v = validate(Builder::new().area_growth(growth(10_000, 12_000, 100_000))).unwrap();
        assert_eq!(v.area_size, 12_288, "the initial area replaces area_size");
        let plan = v.area_growth.unwrap();
        assert_eq!(
            (plan.step, plan.maximum, plan.max_areas),
            (12_288, 100_000, 9)
        );
        assert!(
            !plan.required,
            "auto only reports a kernel without ADD_AREA"
        );
        // The refill ring has an entry for every chunk of the largest area (24 chunks), not
        // of the first (3).
        assert_eq!(v.refill_entries, 32);
        let nodev =
            Builder::new()
                .mode(Mode::NoDevice)
                .area_growth(growth(1 << 20, 1 << 20, 4 << 20));
        assert!(validate(nodev).unwrap().area_growth.unwrap().required);
        // No room for one step, a step below two chunks, more than 1024 areas.
        for (bad, needle) in [
            (
                growth(1 << 20, 1 << 20, (3 << 19) - 1),
                "leaves no room to grow",
            ),
            (
                growth(1 << 20, 4096, 4 << 20),
                "area growth step 4096 is too small",
            ),
            (growth(8192, 8192, 1025 * 8192), "makes 1025 areas"),
        ] {
            let err = validate(Builder::new().area_growth(bad)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        // 1024 areas is the kernel's limit, and fits.
        let v = validate(Builder::new().area_growth(growth(8192, 8192, 1024 * 8192))).unwrap();
        assert_eq!(v.area_growth.unwrap().max_areas, 1024);
        assert_eq!(growth(8192, 8192, 1024 * 8192).areas(), 1024);
        assert_eq!(growth(8192, 0, 1 << 20).areas(), 0);
    }

    #[test]
    fn defaults_are_sane() {
        let v = validate(Builder::new()).unwrap();
        assert_eq!(v.area_size, 32 << 20);
        assert_eq!(v.chunk_size, 4096);
        assert_eq!(v.refill_entries, 8192);
        assert!(!v.custom_chunk);
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        assert_eq!(
            kind(Builder::new().mode(Mode::Nic)),
            ErrorKind::InvalidConfig
        );
        assert_eq!(
            kind(Builder::new().copy_pool(0, 4096)),
            ErrorKind::InvalidConfig
        );
        assert_eq!(
            kind(Builder::new().no_device().area_size(4096)),
            ErrorKind::InvalidConfig
        );
        assert_eq!(
            kind(Builder::new().no_device().chunk_size(3000)),
            ErrorKind::InvalidConfig
        );
        assert_eq!(
            kind(Builder::new().no_device().cq_entries(100)),
            ErrorKind::InvalidConfig
        );
        assert_eq!(
            kind(Builder::new().no_device().refill_entries(40000)),
            ErrorKind::InvalidConfig
        );
        let empty_name = Builder::new().interface("", 0);
        let target = empty_name.interface.clone().unwrap();
        assert_eq!(
            empty_name.validate_for(target, 4096).unwrap_err().kind(),
            ErrorKind::InvalidConfig
        );
        let err = Builder::new().mode(Mode::Nic).validate().unwrap_err();
        assert!(err.to_string().contains(".interface(NAME, QUEUE)"), "{err}");
    }

    #[test]
    fn every_limit_is_exact() {
        let ok = |b: Builder| validate(b).map(drop);
        let invalid = |b: Builder| {
            let err = b
                .validate()
                .and_then(|_| validate(b.clone()).map(drop))
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        };
        // Area: two chunks .. 2^31 - 1 pages, and usize::MAX must not overflow (D1).
        ok(Builder::new().area_size(8192)).unwrap();
        invalid(Builder::new().no_device().area_size(8191));
        let max = (i32::MAX as usize) * 4096;
        let v = validate(Builder::new().area_size(max)).unwrap();
        assert_eq!(v.area_size, max);
        assert_eq!(v.refill_entries, MAX_REFILL_ENTRIES);
        invalid(Builder::new().no_device().area_size(max + 1));
        invalid(Builder::new().no_device().area_size(usize::MAX));
        invalid(
            Builder::new()
                .no_device()
                .area_size(usize::MAX)
                .chunk_size(2 << 20),
        );
        // With 2 MiB chunks the largest area is whole chunks below the page limit (rounding
        // up to a whole chunk must not cross it).
        let max_2m = max / (2 << 20) * (2 << 20);
        let v = validate(Builder::new().area_size(max_2m).chunk_size(2 << 20)).unwrap();
        assert_eq!(v.area_size, max_2m);
        invalid(
            Builder::new()
                .no_device()
                .area_size(max_2m + 1)
                .chunk_size(2 << 20),
        );
        // Chunks: page .. 2 MiB, powers of two.
        ok(Builder::new().chunk_size(2 << 20).area_size(4 << 20)).unwrap();
        invalid(
            Builder::new()
                .no_device()
                .chunk_size(4 << 20)
                .area_size(8 << 20),
        );
        invalid(Builder::new().no_device().chunk_size(8192 + 4096));
        // Refill: 1 .. 32768, rounded up.
        assert_eq!(
            validate(Builder::new().refill_entries(1))
                .unwrap()
                .refill_entries,
            1
        );
        assert_eq!(
            validate(Builder::new().refill_entries(32768))
                .unwrap()
                .refill_entries,
            32768
        );
        invalid(Builder::new().no_device().refill_entries(32769));
        // CQ: powers of two 64 .. 65536 (D3).
        ok(Builder::new().cq_entries(64)).unwrap();
        ok(Builder::new().cq_entries(65536)).unwrap();
        invalid(Builder::new().no_device().cq_entries(32));
        invalid(Builder::new().no_device().cq_entries(65537));
        invalid(Builder::new().no_device().cq_entries(131072));
        invalid(Builder::new().no_device().cq_entries(u32::MAX));
        // Copy pool, interval, thread name: checked in every mode, copy included (D2).
        Builder::new()
            .mode(Mode::Copy)
            .copy_pool(MAX_COPY_BUFFERS, 1024)
            .validate()
            .unwrap();
        invalid(
            Builder::new()
                .mode(Mode::Copy)
                .copy_pool(MAX_COPY_BUFFERS + 1, 1),
        );
        invalid(Builder::new().mode(Mode::Copy).copy_pool(2, 1 << 29 | 1));
        invalid(
            Builder::new()
                .mode(Mode::Copy)
                .copy_pool(u32::MAX, usize::MAX),
        );
        invalid(
            Builder::new()
                .mode(Mode::Copy)
                .event_rearm_interval(Duration::MAX),
        );
        invalid(Builder::new().mode(Mode::Copy).thread_name("driver\0"));
        Builder::new()
            .event_rearm_interval(MAX_EVENT_REARM_INTERVAL)
            .validate()
            .unwrap();
        // Interface names as the kernel's dev_valid_name has them.
        for bad in [
            "",
            ".",
            "..",
            "a:b",
            "a b",
            "a/b",
            "a\0",
            "0123456789abcdef",
        ] {
            invalid(Builder::new().interface(bad, 0));
        }
        Builder::new()
            .interface("0123456789abcde", 0)
            .validate()
            .unwrap();
        invalid(Builder::new().interface_index(0, 0));
    }

    #[test]
    fn each_backend_gets_its_own_checked_settings() {
        let config = Builder::new()
            .interface("eth0", 3)
            .copy_pool(8, 4096)
            .event_rearm_interval(Duration::from_millis(5))
            .area_size(10_000)
            .validate()
            .unwrap();
        assert_eq!(config.mode, Mode::Auto);
        assert_eq!((config.copy.buffers, config.copy.buffer_size), (8, 4096));
        assert_eq!(config.copy.event_interval, Duration::from_millis(5));
        let nic = config.uring_for(config.interface.clone().unwrap());
        let nodev = config.uring_for(Target::NoDevice);
        assert_eq!(
            nic.target,
            Target::Interface {
                name: "eth0".into(),
                queue: 3
            }
        );
        assert_eq!(nodev.target, Target::NoDevice);
        let page = crate::sys::page_size();
        assert_eq!(nodev.area_size, 10_000usize.div_ceil(page) * page);
        assert_eq!(nic.area_size, nodev.area_size);
        // Copy mode neither checks nor carries the io_uring settings.
        let copy = Builder::new().mode(Mode::Copy).chunk_size(3000).validate();
        assert!(copy.unwrap().uring.is_none());
    }

    fn facts(available: Option<u64>, thp: ThpMode) -> HugePageFacts {
        HugePageFacts {
            pool: available.map(|free| HugePagePool {
                total: free + 4,
                free: free + 1,
                reserved: 1,
            }),
            thp,
        }
    }

    fn large_chunks(policy: HugePages) -> UringConfig {
        let target = Target::Interface {
            name: "nsim0".into(),
            queue: 0,
        };
        Builder::new()
            .chunk_size(65536)
            .area_size(64 << 20)
            .huge_pages(policy)
            .validate_for(target, 4096)
            .unwrap()
    }

    #[test]
    fn one_page_chunks_need_no_huge_pages() {
        let config = validate(Builder::new().huge_pages(HugePages::Reserved)).unwrap();
        let nothing = facts(None, ThpMode::Never);
        assert_eq!(
            plan_area_backing(&config, &nothing).unwrap(),
            AreaBacking::Pages
        );
    }

    #[test]
    fn reserved_pages_come_first_then_transparent_ones() {
        // 64 MiB: 32 pages of 2 MiB.
        assert_eq!(huge_pages_needed(64 << 20), 32);
        assert_eq!(huge_pages_needed((64 << 20) + 1), 33);
        let auto = large_chunks(HugePages::Auto);
        let plan = |config: &UringConfig, facts| plan_area_backing(config, &facts);
        assert_eq!(
            plan(&auto, facts(Some(32), ThpMode::Never)).unwrap(),
            AreaBacking::HugeTlb
        );
        assert_eq!(
            plan(&auto, facts(Some(31), ThpMode::Madvise)).unwrap(),
            AreaBacking::Transparent
        );
        assert_eq!(
            plan(&auto, facts(None, ThpMode::Always)).unwrap(),
            AreaBacking::Transparent
        );
        let transparent = large_chunks(HugePages::Transparent);
        assert_eq!(
            plan(&transparent, facts(Some(100), ThpMode::Madvise)).unwrap(),
            AreaBacking::Transparent
        );
        let reserved = large_chunks(HugePages::Reserved);
        assert_eq!(
            plan(&reserved, facts(Some(32), ThpMode::Madvise)).unwrap(),
            AreaBacking::HugeTlb
        );
    }

    #[test]
    fn too_few_huge_pages_say_how_many_what_is_free_and_the_command() {
        let auto = large_chunks(HugePages::Auto);
        // 10 available (11 free, 1 promised), 14 reserved in all: 22 more make 36.
        let err = plan_area_backing(&auto, &facts(Some(10), ThpMode::Never)).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.kind(), ErrorKind::HugePagesUnavailable, "{text}");
        assert!(text.contains("65536-byte chunks"), "{text}");
        assert!(text.contains("needs 32 of them"), "{text}");
        assert!(text.contains("10 are free now"), "{text}");
        assert!(text.contains("HugePages_Free 11"), "{text}");
        assert!(
            text.contains("`echo 36 > /proc/sys/vm/nr_hugepages`"),
            "{text}"
        );
        assert!(text.contains("hugepages-2048kB/nr_hugepages"), "{text}");
        assert!(
            text.contains("transparent_hugepage/enabled is never"),
            "{text}"
        );
        assert!(text.contains(".chunk_size(4096)"), "{text}");

        let reserved = large_chunks(HugePages::Reserved);
        let err = plan_area_backing(&reserved, &facts(Some(0), ThpMode::Madvise)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::HugePagesUnavailable);
        assert!(err.to_string().contains("`echo 36 >"), "{err}");
        assert!(
            err.to_string().contains("HugePages::Auto tries them"),
            "{err}"
        );

        let transparent = large_chunks(HugePages::Transparent);
        let err = plan_area_backing(&transparent, &facts(None, ThpMode::Missing)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::HugePagesUnavailable);
        let text = err.to_string();
        assert!(text.contains("no 2 MiB hugetlb pool"), "{text}");
        assert!(text.contains("not built into this kernel"), "{text}");
    }

    #[test]
    fn a_partly_backed_transparent_area_is_explained() {
        let auto = large_chunks(HugePages::Auto);
        let text = huge_page_shortage(&auto, &facts(Some(0), ThpMode::Madvise), Some(6 << 20));
        assert!(
            text.contains("backed only 6291456 of the 67108864 bytes"),
            "{text}"
        );
        assert!(
            text.contains("`echo 36 > /proc/sys/vm/nr_hugepages`"),
            "{text}"
        );
    }

    #[test]
    fn sizes_round_up() {
        let v = validate(Builder::new().area_size(10_000).refill_entries(100)).unwrap();
        assert_eq!(v.area_size, 12288);
        assert_eq!(v.refill_entries, 128);
        let big = validate(Builder::new().area_size(1 << 30)).unwrap();
        assert_eq!(big.refill_entries, MAX_REFILL_ENTRIES);
    }
}
