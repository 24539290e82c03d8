//! A synthetic ring: the whole runtime without a kernel.
//!
//! [`ring::SyntheticRing`] plays the kernel's side of the ring against the real driver,
//! area and refill ring, answering like a chosen kernel ([`personality`]), optionally with
//! seeded faults ([`faults`]), and writing a verifiable byte pattern ([`pattern`]).
//! Everything else (decoding, routing, waking tasks, consuming, dropping, refill
//! publication) is the runtime's own code. It backs the per-chunk benchmark (through
//! `tokio_zcrx::__bench::start`, `bench-internals`) and the driver's host tests
//! (`backend/uring/tests/`): scenarios against every personality, fault injection, idle CPU.

// The benchmark build (`bench-internals`) uses one personality and no faults: what only the
// tests use is not dead code.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod faults;
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod pattern;
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod personality;
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod ring;

use std::io;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use zcrx_core::completion::AreaLayout;
use zcrx_sys::event::zcrx_stats;
use zcrx_sys::zcrx::io_uring_zcrx_rqe;

use super::area::Area;
use super::driver::{drive, Driver, FixedBuffer};
use super::instance::SharedLayout;
use super::{DriverShared, Stopper, UringHandle};
use crate::config::{EventsPolicy, Target};
use crate::error::{Error, ErrorKind};
use crate::mode::{ActiveMode, ModeSelection};
use crate::sys::mem::Mapping;
use crate::{Builder, Zcrx};
use faults::{FaultConfig, FaultInjector};
use personality::{Personality, Registration};
use ring::{Control, KernelSetup, Path, SharedMemory, SyntheticRing};

pub(crate) const CHUNK_SIZE: u32 = 4096;
/// Where the refill ring's head and tail sit in the region (entries: the personality's).
const HEAD_OFFSET: usize = 0;
const TAIL_OFFSET: usize = 4;

/// A synthetic runtime to start.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone)]
pub(crate) struct SyntheticConfig {
    pub(crate) personality: Personality,
    pub(crate) registration: Registration,
    pub(crate) area_chunks: u32,
    /// `None`: the builder's default (the chunk count, rounded up to a power of two).
    pub(crate) refill_entries: Option<u32>,
    /// Whole chunks for connections without a plan of their own.
    pub(crate) chunks_per_stream: u64,
    pub(crate) default_path: Path,
    pub(crate) write_pattern: bool,
    /// See [`KernelSetup::full_speed_nic`].
    pub(crate) full_speed_nic: bool,
    /// Register for events (where the personality has them).
    pub(crate) events: bool,
    pub(crate) faults: Option<FaultConfig>,
    /// The driver thread's name (tests that find the thread by name choose their own).
    pub(crate) thread_name: String,
    /// `Builder::stream_budget` (`None`: derived budgets, the default).
    pub(crate) stream_budget: Option<u64>,
    /// What a real runtime reads from the bound interface's MTU (`None`: unknown, or NODEV).
    pub(crate) segment_payload: Option<u32>,
    /// The area is registered as fixed buffer 0 for sends (else sends go unregistered).
    pub(crate) fixed_buffer: bool,
    /// The sockets lack `SOCK_SUPPORT_ZC`: `SEND_ZC` fails with `-EOPNOTSUPP`.
    pub(crate) refuse_send_zc: bool,
    /// `Builder::area_growth` (the first area is then `initial`, not `area_chunks`).
    pub(crate) growth: Option<crate::AreaGrowth>,
    /// `Builder::mode`: `Auto` (the default) only reports a refused growth policy, the
    /// registration's own mode refuses to start without it.
    pub(crate) mode: crate::Mode,
    /// The NIC queue it plays (named in events and `queue_stats`); `None`: none.
    pub(crate) queue: Option<u32>,
    /// The event channel to report on (a group of queues shares one); `None`: its own.
    pub(crate) events_channel: Option<tokio::sync::broadcast::Sender<crate::Event>>,
    /// A member of a group: `EFAULT` ends a stream as moved (`UringConfig::hand_over_moved`).
    pub(crate) hand_over_moved: bool,
    /// `Builder::driver_linger` (`None`: the default).
    pub(crate) driver_linger: Option<std::time::Duration>,
}

impl SyntheticConfig {
    /// A 7.3 NIC queue receiving zero-copy, with the pattern written.
    pub(crate) fn new(personality: Personality, registration: Registration) -> SyntheticConfig {
        SyntheticConfig {
            personality,
            registration,
            area_chunks: 64,
            refill_entries: None,
            chunks_per_stream: 16,
            default_path: Path::ZeroCopy,
            write_pattern: true,
            full_speed_nic: false,
            events: true,
            faults: None,
            thread_name: "tokio-zcrx-synthetic".into(),
            stream_budget: None,
            segment_payload: None,
            fixed_buffer: true,
            refuse_send_zc: false,
            growth: None,
            mode: crate::Mode::Auto,
            queue: None,
            events_channel: None,
            hand_over_moved: false,
            driver_linger: None,
        }
    }
}

/// Starts a runtime whose driver runs over a [`SyntheticRing`] answering like the
/// benchmark's kernel (7.3, NIC queue under steady traffic, zero-copy, no pattern): every attached stream
/// receives `chunks_per_stream` chunks of 4 KiB, then EOF. The sockets are only
/// placeholders.
pub(crate) fn start(area_chunks: u32, chunks_per_stream: u64) -> Result<Zcrx, Error> {
    let config = SyntheticConfig {
        area_chunks,
        chunks_per_stream,
        write_pattern: false,
        full_speed_nic: true,
        ..SyntheticConfig::new(Personality::Linux7_3, Registration::Nic)
    };
    start_with(config).map(|(zcrx, _)| zcrx)
}

/// Starts a runtime of `queues` synthetic NIC queues (a `QueueGroup`, as
/// `Builder::interface_queues` starts, each queue its own driver thread `tzx-bench-qN`,
/// area of `area_chunks` chunks, refill ring and kernel answering as [`start`]'s) whose
/// synthetic device deals the attached sockets over the queues in turn, the first to queue
/// 0: every stream attached receives `chunks_per_stream` chunks on its queue's driver. With
/// each queue's synthetic kernel, in queue order.
pub(crate) fn start_queues(
    queues: u32,
    area_chunks: u32,
    chunks_per_stream: u64,
    driver_linger: Option<std::time::Duration>,
) -> Result<(Zcrx, Vec<Arc<Control>>), Error> {
    use crate::backend::queues::{GroupSpec, QueueGroup};

    let spec = GroupSpec {
        interface: "synthetic0".into(),
        queues: (0..queues).collect(),
        required: true,
        napi_wait: std::time::Duration::ZERO,
        driver_cpus: crate::DriverCpus::Anywhere,
        copy: Builder::new().validate()?.copy,
    };
    let mut kernels = Vec::new();
    let mut start_queue = |queue: u32, _cpus, events| {
        let config = SyntheticConfig {
            area_chunks,
            chunks_per_stream,
            write_pattern: false,
            full_speed_nic: true,
            queue: Some(queue),
            events_channel: Some(events),
            hand_over_moved: true,
            driver_linger,
            thread_name: format!("tzx-bench-q{queue}"),
            ..SyntheticConfig::new(Personality::Linux7_3, Registration::Nic)
        };
        let (handle, control, _) = start_driver(config)?;
        kernels.push(control);
        Ok(handle)
    };
    let device = DealtNapi {
        queues,
        dealt: std::sync::Mutex::new((0, std::collections::HashMap::new())),
    };
    let group = QueueGroup::start(spec, Box::new(device), &mut start_queue)?;
    let selection = ModeSelection {
        queues_bound: group.bound(),
        queues_refused: group.refused().to_vec(),
        ..ModeSelection::new(ActiveMode::Nic, Vec::new())
    };
    let zcrx = Zcrx::from_parts(crate::backend::Backend::Queues(Arc::new(group)), selection);
    Ok((zcrx, kernels))
}

/// The NAPI id of synthetic queue `queue` in [`start_queues`].
fn bench_napi_id(queue: u32) -> u32 {
    0x2000 + queue
}

/// [`start_queues`]'s device: queue N has NAPI id `0x2000 + N`, and each new connection (by
/// its peer address) arrives on the next queue in turn.
#[derive(Debug)]
struct DealtNapi {
    queues: u32,
    /// How many connections were dealt, and the queue of each.
    dealt: std::sync::Mutex<(u32, std::collections::HashMap<std::net::SocketAddr, u32>)>,
}

impl crate::backend::queues::NapiSource for DealtNapi {
    fn queues(&self) -> io::Result<Vec<(u32, Option<u32>)>> {
        Ok((0..self.queues)
            .map(|q| (q, Some(bench_napi_id(q))))
            .collect())
    }

    fn incoming(
        &self,
        _socket: std::os::fd::BorrowedFd<'_>,
        _local: Option<std::net::SocketAddr>,
        peer: Option<std::net::SocketAddr>,
    ) -> crate::backend::queues::Incoming {
        use crate::backend::queues::Incoming;
        let Some(peer) = peer else {
            return Incoming::Never;
        };
        let mut dealt = crate::sys::lock(&self.dealt);
        let (count, by_peer) = &mut *dealt;
        let queue = *by_peer.entry(peer).or_insert_with(|| {
            let queue = *count % self.queues;
            *count += 1;
            queue
        });
        Incoming::Napi(bench_napi_id(queue))
    }
}

/// Starts a runtime over a synthetic kernel as configured; the [`Control`] sets plans for
/// connections and reads the kernel's report.
pub(crate) fn start_with(config: SyntheticConfig) -> Result<(Zcrx, Arc<Control>), Error> {
    let registration = config.registration;
    let (handle, control, growth_refused) = start_driver(config)?;
    let zcrx = Zcrx::from_parts(
        crate::backend::Backend::Uring(handle),
        ModeSelection {
            unavailable: growth_refused.into_iter().collect(),
            ..ModeSelection::new(
                match registration {
                    Registration::Nic => ActiveMode::Nic,
                    Registration::NoDevice => ActiveMode::NoDevice,
                },
                Vec::new(),
            )
        },
    );
    Ok((zcrx, control))
}

/// Starts one synthetic driver: its handle, the kernel's [`Control`], and why a growth
/// policy was refused (auto mode on a kernel without `ZCRX_CTRL_ADD_AREA`).
pub(crate) fn start_driver(
    config: SyntheticConfig,
) -> Result<(UringHandle, Arc<Control>, Option<String>), Error> {
    let personality = config.personality;
    if !personality.supports(config.registration) {
        return Err(Error::new(
            ErrorKind::KernelTooOld,
            format!(
                "{personality} has no {:?} registration",
                config.registration
            ),
        ));
    }
    let mut builder = Builder::new()
        .area_size(config.area_chunks as usize * CHUNK_SIZE as usize)
        .events(if config.events {
            EventsPolicy::IfSupported
        } else {
            EventsPolicy::Disabled
        });
    if let Some(entries) = config.refill_entries {
        builder = builder.refill_entries(entries);
    }
    if let Some(budget) = config.stream_budget {
        builder = builder.stream_budget(budget);
    }
    if let Some(growth) = config.growth {
        builder = builder.area_growth(growth);
    }
    if let Some(linger) = config.driver_linger {
        builder = builder.driver_linger(linger);
    }
    builder = builder.mode(config.mode);
    let mut uring_config = builder.validate_for(Target::NoDevice, CHUNK_SIZE)?;
    uring_config.hand_over_moved = config.hand_over_moved;
    let caps = personality.capabilities(config.events);
    let (growth, growth_refused) = super::instance::growth_on(&uring_config, caps.add_area)?;
    let internal = |e: io::Error| Error::new(ErrorKind::Kernel, "synthetic runtime").with_source(e);
    let shared =
        Arc::new(DriverShared::new(config.events_channel.clone(), config.queue).map_err(internal)?);
    let memory = Mapping::new(uring_config.area_size, false).map_err(internal)?;
    let rq_entries = uring_config.refill_entries;
    let rqes_offset = personality.rqes_offset();
    let ring_bytes = rqes_offset + rq_entries as usize * 16;
    let stats_offset = caps.events.then_some(ring_bytes.next_multiple_of(8));
    let region_len = stats_offset.map_or(ring_bytes, |s| s + size_of::<zcrx_stats>());
    let region = Mapping::new(region_len, false).map_err(internal)?;
    let layout = SharedLayout {
        area_token: 0,
        chunk_size: CHUNK_SIZE,
        rq_entries,
        rq_head_offset: HEAD_OFFSET,
        rq_tail_offset: TAIL_OFFSET,
        rqes_offset,
        stats_offset,
    };
    let base = region.as_ptr();
    // SAFETY: every offset lies inside the region (sized above); the region moves into the
    // Area, which the driver keeps alive at least as long as the kernel.
    let shared_memory = unsafe {
        SharedMemory {
            area: memory.as_ptr(),
            area_len: memory.len(),
            head: base.add(HEAD_OFFSET).cast::<AtomicU32>(),
            tail: base.add(TAIL_OFFSET).cast::<AtomicU32>(),
            rqes: base.add(rqes_offset).cast::<io_uring_zcrx_rqe>(),
            rq_entries,
            stats: stats_offset.map(|s| base.add(s).cast::<zcrx_stats>()),
        }
    };
    let (shared_memory_area, shared_memory_len) = (shared_memory.area, shared_memory.area_len);
    let area = Area::new(
        memory,
        region,
        &layout,
        Arc::clone(&shared),
        growth.map(|plan| (plan.max_areas, plan.step as u64)),
    )
    .map_err(internal)?;
    let area_layout = AreaLayout::new(area.len() as u64, CHUNK_SIZE, 0)
        .map_err(|e| Error::new(ErrorKind::Kernel, format!("synthetic area: {e}")))?;
    let control = Arc::new(Control::default());
    let ring = SyntheticRing::new(
        KernelSetup {
            personality,
            registration: config.registration,
            chunk_size: CHUNK_SIZE,
            chunks_per_stream: config.chunks_per_stream,
            default_path: config.default_path,
            write_pattern: config.write_pattern,
            full_speed_nic: config.full_speed_nic,
            refuse_send_zc: config.refuse_send_zc,
            faults: config.faults.map(FaultInjector::new),
        },
        shared_memory,
        caps.events,
        Arc::clone(&control),
    );
    *super::lock(&shared.description) =
        format!("synthetic kernel {personality} ({:?})", config.registration);
    let fixed = FixedBuffer {
        base: shared_memory_area as usize,
        len: shared_memory_len,
        index: 0,
    };
    let driver = Driver::with_ring(
        ring,
        Arc::new(area),
        area_layout,
        config.registration == Registration::NoDevice,
        caps,
        config.segment_payload,
        config.fixed_buffer.then_some(fixed),
        growth,
        &uring_config,
        Arc::clone(&shared),
    )?;
    let driver_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name(config.thread_name)
        .spawn(move || drive(driver, driver_shared))
        .map_err(internal)?;
    let handle = UringHandle {
        _stopper: Arc::new(Stopper(Arc::clone(&shared))),
        shared,
    };
    Ok((handle, control, growth_refused))
}
