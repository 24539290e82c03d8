//! The io_uring backend: the driver thread that owns the ring and its zcrx queue, and the
//! handle ([`UringHandle`]) through which the rest of the crate talks to it.
//!
//! Like Tokio's I/O driver, the work is split between a *driver* that owns the kernel object
//! (here the io_uring with its zcrx queue, on one dedicated thread, as SINGLE_ISSUER requires)
//! and cheap *handles* that any thread can use to talk to it: commands go through a mutex-
//! protected queue and an eventfd the ring polls, so the driver sleeps in `io_uring_enter`
//! until the kernel or a handle has something for it. See docs/architecture.md.

pub(crate) mod area;
pub(crate) mod driver;
mod holdings;
pub(crate) mod instance;
pub(crate) mod ring;
mod stream;
#[cfg(any(test, feature = "bench-internals"))]
pub(crate) mod synthetic;
#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::net::TcpStream;
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use zcrx_core::user_data::{StreamId, StreamSlots};

use crate::config::{StreamOptions, UringConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, Stats};
use crate::send::{ConnSends, Piece, SendCounters, SendPath};
/// The crate's poison-free lock, under the name this backend's files import it by.
pub(crate) use crate::sys::lock;
use crate::sys::syscall;
use crate::writer::ZcWriteHalf;

pub(crate) use stream::{StreamEnd, StreamShared, UringStream};

pub(crate) type StreamKey = StreamId;

/// Capacity of the event channel; a subscriber that falls further behind sees `Lagged`.
const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// Messages from handles to the driver.
pub(crate) enum Command {
    Attach {
        key: StreamKey,
        socket: Arc<std::net::TcpStream>,
        shared: Arc<StreamShared>,
        options: StreamOptions,
    },
    /// A limited stream wants its next request.
    ReadMore(StreamKey),
    /// The reader of a paused stream took everything delivered and waits for more
    /// (`StreamShared::pause` and `UringStream::poll_next`).
    ReaderWaiting(StreamKey),
    /// The stream was dropped: cancel its receive and release its slot.
    Close(StreamKey),
    /// Send `pieces`, in order, on `socket`, for `conn` (see `driver/sends.rs`).
    Send {
        socket: Arc<std::net::TcpStream>,
        conn: Arc<ConnSends>,
        pieces: Vec<Arc<Piece>>,
    },
    /// Stop receiving, end every stream, close the ring.
    Shutdown(Option<oneshot::Sender<()>>),
    /// Make the driver thread panic (tests of the failure path).
    #[cfg(feature = "fault-injection")]
    InjectPanic,
}

const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const FAILED: u8 = 2;

/// What handles and the driver share.
pub(crate) struct DriverShared {
    commands: Mutex<Vec<Command>>,
    /// The driver's wake-up: written by handles, polled by the ring.
    eventfd: OwnedFd,
    /// The driver is (about to be) blocked in io_uring_enter: wakers must write the eventfd.
    sleeping: AtomicBool,
    state: AtomicU8,
    failure: Mutex<Option<String>>,
    slots: Mutex<StreamSlots>,
    /// The event channel's sender for `subscribe`; taken when the driver exits, so that,
    /// with the driver's own clone gone too, every receiver sees the channel close.
    events: Mutex<Option<broadcast::Sender<Event>>>,
    /// Cancelled by the driver when it exits.
    stopped: CancellationToken,
    /// Weak: the area holds this struct (as its [`area::DriverLink`], to wake the driver),
    /// and buffers may keep the area alive past the runtime; a strong reference here would
    /// keep both alive forever.
    area: Mutex<Option<Weak<area::Area>>>,
    /// The area's statistics as it was freed, for `stats()` after that.
    final_stats: Mutex<Option<Stats>>,
    description: Mutex<String>,
    /// NIC mode with budgets: the TCP window that listeners bound their connections to
    /// until they are attached (`Zcrx::prepare_listener`); 0: none.
    listener_window: AtomicU32,
    /// Send statistics, shared with every write half.
    pub(crate) send_counters: Arc<SendCounters>,
    /// What was asked for and this kernel lacks (`ModeSelection::unavailable`), set by the
    /// driver thread before it reports ready.
    unavailable: Mutex<Vec<String>>,
    /// The NIC receive queue this driver binds (named in its events); `None` in NODEV mode.
    pub(crate) queue: Option<u32>,
    /// That queue's NAPI id, as `netdev` netlink reported it at start (0: not known).
    pub(crate) napi_id: AtomicU32,
}

impl DriverShared {
    /// `events`: the channel to report on (several queues share one); `None`: a new one.
    fn new(
        events: Option<broadcast::Sender<Event>>,
        queue: Option<u32>,
    ) -> std::io::Result<DriverShared> {
        // SAFETY: eventfd takes plain flags; the result is checked before use.
        let fd = unsafe { syscall!(eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)) }?;
        Ok(DriverShared {
            commands: Mutex::new(Vec::new()),
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
            state: AtomicU8::new(RUNNING),
            failure: Mutex::new(None),
            slots: Mutex::new(StreamSlots::new()),
            events: Mutex::new(Some(
                events.unwrap_or_else(|| broadcast::channel(EVENT_CHANNEL_CAPACITY).0),
            )),
            stopped: CancellationToken::new(),
            area: Mutex::new(None),
            final_stats: Mutex::new(None),
            description: Mutex::new(String::new()),
            listener_window: AtomicU32::new(0),
            send_counters: Arc::default(),
            unavailable: Mutex::new(Vec::new()),
            queue,
            napi_id: AtomicU32::new(0),
        })
    }

    fn stats(&self) -> Stats {
        let mut stats = self.area_stats();
        self.send_counters.fill(&mut stats);
        stats
    }

    fn area_stats(&self) -> Stats {
        loop {
            // The guard goes before `area` may be dropped: that can free the area, whose drop
            // takes `final_stats`.
            let area = lock(&self.area).clone();
            let Some(area) = area else {
                return Stats::default(); // not registered yet
            };
            if let Some(area) = area.upgrade() {
                return area.stats();
            }
            if let Some(stats) = *lock(&self.final_stats) {
                return stats;
            }
            // The last reference is going and the area's drop has not left its figures yet:
            // a few instructions away.
            std::thread::yield_now();
        }
    }

    /// Wakes the driver if it sleeps (or is about to). Cheap when it is awake.
    pub(crate) fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter (EAGAIN)
            // still leaves the fd readable, which is all the driver needs.
            let _ = unsafe {
                syscall!(write(
                    self.eventfd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    size_of::<u64>(),
                ))
            };
        }
    }

    /// Queues a command and wakes the driver.
    pub(crate) fn send(&self, command: Command) -> Result<()> {
        {
            // Checked under the queue's lock: the driver sets its final state under the same
            // lock before it drains the queue for the last time, so no command is stranded.
            let mut commands = lock(&self.commands);
            self.check_running()?;
            commands.push(command);
        }
        self.wake();
        Ok(())
    }

    /// The driver's last word: sets the final state and takes what is left in the queue.
    pub(crate) fn close_queue(&self, state: u8) -> Vec<Command> {
        let mut commands = lock(&self.commands);
        self.state.store(state, Ordering::Release);
        std::mem::take(&mut *commands)
    }

    fn check_running(&self) -> Result<()> {
        match self.state.load(Ordering::Acquire) {
            RUNNING => Ok(()),
            STOPPING => Err(Error::new(
                ErrorKind::RuntimeGone,
                "the tokio-zcrx runtime has been shut down",
            )),
            _ => Err(Error::new(
                ErrorKind::RuntimeGone,
                format!(
                    "the tokio-zcrx driver thread failed: {}",
                    lock(&self.failure).as_deref().unwrap_or("unknown reason")
                ),
            )),
        }
    }
}

/// Write halves queue their sends with the driver.
impl SendPath for DriverShared {
    fn queue(
        &self,
        socket: &Arc<std::net::TcpStream>,
        conn: &Arc<ConnSends>,
        pieces: Vec<Arc<Piece>>,
    ) -> std::io::Result<()> {
        self.send(Command::Send {
            socket: Arc::clone(socket),
            conn: Arc::clone(conn),
            pieces,
        })
        .map_err(std::io::Error::from)
    }
}

/// The area's narrow view of the driver (it imports nothing from here).
impl area::DriverLink for DriverShared {
    fn wake(&self) {
        DriverShared::wake(self);
    }

    fn area_freed(&self, final_stats: Stats) {
        *lock(&self.final_stats) = Some(final_stats);
    }
}

/// A handle to the io_uring driver.
#[derive(Clone)]
pub(crate) struct UringHandle {
    pub(crate) shared: Arc<DriverShared>,
    _stopper: Arc<Stopper>,
}

/// Stops the driver when the last handle goes.
struct Stopper(Arc<DriverShared>);

impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = self.0.send(Command::Shutdown(None));
    }
}

impl std::fmt::Debug for UringHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringHandle")
            .field("queue", &*lock(&self.shared.description))
            .finish_non_exhaustive()
    }
}

/// Starts the driver thread and waits until it registered the queue (or failed to).
/// `events`: the channel to report on, shared with other queues' drivers; `None`: its own.
pub(crate) fn start(
    config: UringConfig,
    events: Option<broadcast::Sender<Event>>,
) -> Result<UringHandle> {
    let queue = match &config.target {
        crate::config::Target::Interface { queue, .. }
        | crate::config::Target::InterfaceIndex { queue, .. } => Some(*queue),
        crate::config::Target::NoDevice => None,
    };
    let shared = Arc::new(DriverShared::new(events, queue).map_err(|e| {
        let error = instance::out_of_descriptors("the driver's eventfd", &e).unwrap_or_else(|| {
            if e.raw_os_error() == Some(libc::ENOMEM) {
                Error::new(
                    ErrorKind::OutOfMemory,
                    "cannot create the driver's eventfd: the kernel is out of memory",
                )
            } else {
                Error::new(ErrorKind::Kernel, "cannot create the driver's eventfd")
            }
        });
        error.with_source(e)
    })?);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let driver_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name(config.thread_name.clone())
        .spawn(move || driver::run(config, driver_shared, ready_tx))
        .map_err(|e| {
            Error::new(
                ErrorKind::Kernel,
                "cannot spawn the driver thread: the process reached its thread limit \
                 (RLIMIT_NPROC, `ulimit -u`; or the cgroup's pids.max) or memory ran out",
            )
            .with_source(e)
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(UringHandle {
            _stopper: Arc::new(Stopper(Arc::clone(&shared))),
            shared,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::new(
            ErrorKind::RuntimeGone,
            "the driver thread exited before registering the queue",
        )),
    }
}

impl UringHandle {
    pub(crate) fn stopped_token(&self) -> CancellationToken {
        self.shared.stopped.clone()
    }

    pub(crate) fn check_running(&self) -> Result<()> {
        self.shared.check_running()
    }

    /// Hands a connected socket to the driver: reads go out of Tokio's reactor (the kernel
    /// receives into the area); writes stay with the caller.
    pub(crate) fn attach(
        &self,
        socket: TcpStream,
        options: StreamOptions,
    ) -> std::io::Result<(UringStream, ZcWriteHalf)> {
        let socket = Arc::new(socket.into_std()?);
        let path: Arc<dyn SendPath> = Arc::clone(&self.shared) as Arc<dyn SendPath>;
        let write_half = ZcWriteHalf::write_only(
            Arc::clone(&socket),
            path,
            Arc::clone(&self.shared.send_counters),
        )?;
        let stream = self.attach_socket(socket, options)?;
        Ok((stream, write_half))
    }

    /// Receives `socket` (already out of Tokio's reactor for reads) from here on: a stream
    /// handed over from another queue's driver keeps its write half.
    pub(crate) fn attach_socket(
        &self,
        socket: Arc<std::net::TcpStream>,
        options: StreamOptions,
    ) -> std::io::Result<UringStream> {
        let key = lock(&self.shared.slots).allocate();
        let shared = Arc::new(StreamShared::default());
        self.shared.send(Command::Attach {
            key,
            socket,
            shared: Arc::clone(&shared),
            options,
        })?;
        Ok(UringStream::new(
            shared,
            key,
            self.clone(),
            options.read_limit.is_some(),
        ))
    }

    /// Bounds the TCP window of `listener`'s connections until they are attached (NIC mode
    /// with budgets; nothing otherwise).
    pub(crate) fn prepare_listener(&self, listener: BorrowedFd<'_>) -> std::io::Result<()> {
        match self.shared.listener_window.load(Ordering::Relaxed) {
            0 => Ok(()),
            window => crate::sys::set_tcp_window_clamp(listener, window),
        }
    }

    /// The live event channel's receiver; a closed one once the driver has exited.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        match &*lock(&self.shared.events) {
            Some(sender) => sender.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The bound NIC queue's statistics (none in NODEV mode).
    pub(crate) fn queue_stats(&self) -> Option<crate::event::QueueStats> {
        let queue = self.shared.queue?;
        let napi_id = self.shared.napi_id.load(Ordering::Relaxed);
        Some(crate::event::QueueStats {
            queue,
            napi_id: (napi_id != 0).then_some(napi_id),
            stats: self.stats(),
        })
    }

    pub(crate) fn description(&self) -> String {
        lock(&self.shared.description).clone()
    }

    /// What was asked for and this kernel lacks (for `ModeSelection::unavailable`).
    pub(crate) fn unavailable(&self) -> Vec<String> {
        lock(&self.shared.unavailable).clone()
    }

    #[cfg(feature = "fault-injection")]
    pub(crate) fn inject_panic(&self) {
        let _ = self.shared.send(Command::InjectPanic);
    }

    /// Stops the driver and waits until its thread has finished.
    pub(crate) async fn shutdown(&self) {
        if let Some(wait) = self.begin_shutdown() {
            let _ = wait.await;
        }
    }

    /// Tells the driver to stop, now; the receiver completes when its thread has finished
    /// (`None`: it had already stopped). Several drivers stop together this way.
    pub(crate) fn begin_shutdown(&self) -> Option<oneshot::Receiver<()>> {
        let (done, wait) = oneshot::channel();
        self.shared.send(Command::Shutdown(Some(done))).ok()?;
        Some(wait)
    }
}
