//! The runtime: a [`Zcrx`] handle, and the driver thread behind it.
//!
//! Like Tokio's I/O driver, the work is split between a *driver* that owns the kernel object
//! (here the io_uring with its zcrx queue, on one dedicated thread, as SINGLE_ISSUER requires)
//! and cheap *handles* that any thread can use to talk to it: commands go through a mutex-
//! protected queue and an eventfd the ring polls, so the driver sleeps in `io_uring_enter`
//! until the kernel or a handle has something for it. See docs/architecture.md.

pub(crate) mod area;
mod claim;
mod driver;
pub(crate) mod instance;
mod kernel;
#[cfg(any(test, feature = "bench-internals"))]
pub(crate) mod synthetic;

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::net::TcpStream;
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use zcrx_core::user_data::{StreamId, StreamSlots};

use crate::config::{Target, Validated};
use crate::copy::{CopyRuntime, CopyStream};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, Stats};
use crate::mode::{ActiveMode, Mode, ModeSelection};
use crate::stream::{StreamOptions, StreamShared, ZcStream};
use crate::writer::ZcWriteHalf;

pub(crate) use claim::SocketClaim;

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
    /// The stream was dropped: cancel its receive and release its slot.
    Close(StreamKey),
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
    /// Weak: the area holds this struct (to wake the driver), and buffers may keep the area
    /// alive past the runtime; a strong reference here would keep both alive forever.
    area: Mutex<Option<Weak<area::Area>>>,
    /// The area's statistics as it was freed, for `stats()` after that.
    final_stats: Mutex<Option<Stats>>,
    description: Mutex<String>,
}

impl DriverShared {
    fn new() -> std::io::Result<DriverShared> {
        // SAFETY: eventfd takes plain flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DriverShared {
            commands: Mutex::new(Vec::new()),
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
            state: AtomicU8::new(RUNNING),
            failure: Mutex::new(None),
            slots: Mutex::new(StreamSlots::new()),
            events: Mutex::new(Some(broadcast::channel(EVENT_CHANNEL_CAPACITY).0)),
            stopped: CancellationToken::new(),
            area: Mutex::new(None),
            final_stats: Mutex::new(None),
            description: Mutex::new(String::new()),
        })
    }

    fn stats(&self) -> Stats {
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
            unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                );
            }
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running zcrx runtime: one registered receive queue and its driver thread.
///
/// Cheap to clone; every clone refers to the same runtime. The runtime stops when
/// [`shutdown`](Zcrx::shutdown) is called or the last `Zcrx` (including those held by
/// streams) is dropped. Buffers handed out stay valid after that.
///
/// ```no_run
/// use futures::StreamExt;
/// use tokio_zcrx::{Zcrx, ZcListener};
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let zcrx = Zcrx::builder().interface("eth0", 3).build()?;
///     let mut events = zcrx.subscribe();
///     tokio::spawn(async move {
///         while let Ok(event) = events.recv().await {
///             eprintln!("zcrx: {} ({})", event.kind, event.stats);
///         }
///     });
///     let listener = ZcListener::bind(&zcrx, "[::]:9000").await?;
///     loop {
///         let (mut stream, _writer, peer) = listener.accept().await?;
///         tokio::spawn(async move {
///             let mut total = 0;
///             while let Some(Ok(buf)) = stream.next().await {
///                 total += buf.len();
///             }
///             println!("{peer}: {total} bytes");
///         });
///     }
/// }
/// ```
#[derive(Clone)]
pub struct Zcrx {
    backend: Backend,
    selection: Arc<ModeSelection>,
    /// Cancelled when the runtime stops (shutdown, or a failed driver): what waits for
    /// something else (a listener's accept) stops waiting then.
    stopped: CancellationToken,
}

#[derive(Clone)]
pub(crate) enum Backend {
    Uring(UringHandle),
    Copy(Arc<CopyRuntime>),
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

impl std::fmt::Debug for Zcrx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zcrx")
            .field("mode", &self.selection.chosen)
            .field("receiving", &self.description())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for UringHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringHandle")
            .field("queue", &*lock(&self.shared.description))
            .finish_non_exhaustive()
    }
}

impl Zcrx {
    #[cfg(any(test, feature = "bench-internals"))]
    fn from_parts(backend: Backend, selection: ModeSelection) -> Zcrx {
        Zcrx::new(backend, selection)
    }

    fn new(backend: Backend, selection: ModeSelection) -> Zcrx {
        let stopped = match &backend {
            Backend::Uring(handle) => handle.shared.stopped.clone(),
            Backend::Copy(_) => CancellationToken::new(),
        };
        Zcrx {
            backend,
            selection: Arc::new(selection),
            stopped,
        }
    }

    /// Completes when the runtime has stopped.
    pub(crate) async fn stopped(&self) {
        self.stopped.cancelled().await
    }

    /// A [`Builder`](crate::Builder) for a runtime.
    pub fn builder() -> crate::Builder {
        crate::Builder::new()
    }

    /// The mode this runtime receives in.
    pub fn mode(&self) -> ActiveMode {
        self.selection.chosen
    }

    /// The mode, and why better modes were refused (with [`Mode::Auto`](crate::Mode::Auto)).
    pub fn mode_selection(&self) -> &ModeSelection {
        &self.selection
    }

    /// Receives an existing connection through this runtime: returns its stream of
    /// buffers and the write half (for replies). Must be called within a Tokio runtime, in
    /// every mode (the write half and the stream use its reactor).
    ///
    /// Fails, closing the socket, with [`ErrorKind::InvalidConfig`](crate::ErrorKind) outside
    /// a Tokio runtime, [`ErrorKind::InvalidSocket`](crate::ErrorKind) for a socket that is
    /// listening, not connected or already attached (also through a `try_clone`d or `dup`ed
    /// descriptor), and [`ErrorKind::RuntimeGone`](crate::ErrorKind) after
    /// [`shutdown`](Zcrx::shutdown).
    pub fn attach(&self, socket: TcpStream) -> std::io::Result<(ZcStream, ZcWriteHalf)> {
        self.attach_with(socket, StreamOptions::default())
    }

    /// Like [`attach`](Zcrx::attach), with options (e.g. a byte limit per receive).
    pub fn attach_with(
        &self,
        socket: TcpStream,
        options: StreamOptions,
    ) -> std::io::Result<(ZcStream, ZcWriteHalf)> {
        if options.read_limit == Some(0) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "a read limit of 0 bytes would never read: use None for no limit",
            )
            .into());
        }
        self.check_running()?;
        // Required in copy mode too, although it could do without: code tested on a machine
        // that runs copy mode must not fail where zero copy runs.
        require_tokio("attach")?;
        // Released when the stream is dropped (or now, with the socket, on any error below).
        let claim = claim::claim_connected_tcp(socket.as_fd())?;
        let (mut stream, write_half) = match &self.backend {
            Backend::Uring(handle) => {
                // Out of Tokio's reactor for reads: the kernel receives into the area.
                let socket = Arc::new(socket.into_std()?);
                let write_half = ZcWriteHalf::write_only(Arc::clone(&socket))?;
                let key = lock(&handle.shared.slots).allocate();
                let shared = Arc::new(StreamShared::default());
                handle.shared.send(Command::Attach {
                    key,
                    socket,
                    shared: Arc::clone(&shared),
                    options,
                })?;
                let stream =
                    ZcStream::uring(shared, key, handle.clone(), options.read_limit.is_some());
                (stream, write_half)
            }
            Backend::Copy(copy) => {
                let (read_half, write_half) = socket.into_split();
                let stream = ZcStream::copy(CopyStream::new(
                    read_half,
                    Arc::clone(&copy.pool),
                    options.read_limit,
                ));
                (stream, ZcWriteHalf::tokio(write_half))
            }
        };
        stream.claim = Some(claim);
        Ok((stream, write_half))
    }

    /// `RuntimeGone` once the runtime has shut down (or its driver failed).
    pub(crate) fn check_running(&self) -> Result<()> {
        match &self.backend {
            Backend::Uring(handle) => handle.shared.check_running(),
            Backend::Copy(copy) => copy.check_running(),
        }
    }

    /// A receiver of runtime events (copy fallback, allocation failure, area exhausted, CQ
    /// overflow recovered), each with a statistics snapshot. After
    /// [`shutdown`](Zcrx::shutdown) the receiver is closed: `recv` returns `Closed` at once.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        if self.check_running().is_err() {
            // No event can come any more; a receiver of the live channel would wait forever.
            return broadcast::channel(1).1;
        }
        match &self.backend {
            Backend::Uring(handle) => match &*lock(&handle.shared.events) {
                Some(sender) => sender.subscribe(),
                None => broadcast::channel(1).1,
            },
            Backend::Copy(copy) => copy.events.subscribe(),
        }
    }

    /// The current statistics.
    pub fn stats(&self) -> Stats {
        match &self.backend {
            Backend::Uring(handle) => handle.shared.stats(),
            Backend::Copy(copy) => copy.stats(),
        }
    }

    /// What this runtime receives through, e.g. `eth0 rx queue 3`, `no device (NODEV
    /// mode)` or `copy mode (64 buffers of 65536 bytes)`.
    pub fn description(&self) -> String {
        match &self.backend {
            Backend::Uring(handle) => lock(&handle.shared.description).clone(),
            Backend::Copy(copy) => copy.description(),
        }
    }

    /// Makes the driver thread panic, to test how an application copes with a failed
    /// runtime. Only with the `fault-injection` feature; no effect in copy mode.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_driver_panic(&self) {
        if let Backend::Uring(handle) = &self.backend {
            let _ = handle.shared.send(Command::InjectPanic);
        }
    }

    /// Stops receiving: every stream ends with an error, the ring and the kernel's zcrx
    /// instance are closed. Completes when the driver thread has finished. Buffers still held
    /// stay valid; the area is unmapped when the last one is dropped.
    pub async fn shutdown(&self) {
        match &self.backend {
            Backend::Uring(handle) => {
                let (done, wait) = oneshot::channel();
                if handle.shared.send(Command::Shutdown(Some(done))).is_ok() {
                    let _ = wait.await;
                }
            }
            Backend::Copy(copy) => {
                copy.shut_down();
                self.stopped.cancel();
            }
        }
    }
}

/// Starts a runtime in the builder's mode; `Auto` tries the modes in order and records why
/// each was refused.
pub(crate) fn select_and_start(builder: crate::Builder) -> Result<Zcrx> {
    builder.validate_common()?;
    if builder.mode != Mode::Copy {
        // A misspelt interface is a mistake in every mode: checked before anything is tried,
        // so that Auto does not hide it behind another mode (nor behind an earlier refusal,
        // such as io_uring being forbidden).
        if let Some(target) = &builder.interface {
            instance::check_interface_exists(target)?;
        }
    }
    let page = crate::mem::page_size() as u32;
    let copy = |refused: Vec<(Mode, String)>| -> Result<Zcrx> {
        let runtime = CopyRuntime::new(&builder).map_err(|e| {
            Error::new(
                ErrorKind::OutOfMemory,
                "cannot allocate the copy-mode buffer pool",
            )
            .with_source(e)
        })?;
        let selection = ModeSelection {
            chosen: ActiveMode::Copy,
            refused,
        };
        Ok(Zcrx::new(Backend::Copy(Arc::new(runtime)), selection))
    };
    let uring = |target: Target, chosen: ActiveMode, refused: Vec<(Mode, String)>| {
        let handle = start(builder.validate_for(target, page)?)?;
        Ok::<Zcrx, Error>(Zcrx::new(
            Backend::Uring(handle),
            ModeSelection { chosen, refused },
        ))
    };
    let zcrx = match builder.mode {
        Mode::Copy => copy(Vec::new())?,
        Mode::NoDevice => uring(Target::NoDevice, ActiveMode::NoDevice, Vec::new())?,
        Mode::Nic => {
            let target = builder
                .interface
                .clone()
                .expect("validate_common checked it");
            uring(target, ActiveMode::Nic, Vec::new())?
        }
        Mode::Auto => {
            let mut refused = Vec::new();
            let nic = match builder.interface.clone() {
                Some(target) => match uring(target, ActiveMode::Nic, Vec::new()) {
                    Ok(zcrx) => Some(zcrx),
                    Err(e) if is_callers_to_fix(&e) => return Err(e),
                    Err(e) => {
                        refused.push((Mode::Nic, e.to_string()));
                        None
                    }
                },
                None => {
                    refused.push((Mode::Nic, "no interface given".to_string()));
                    None
                }
            };
            match nic {
                Some(zcrx) => zcrx,
                None => match uring(Target::NoDevice, ActiveMode::NoDevice, refused.clone()) {
                    Ok(zcrx) => zcrx,
                    Err(e) if is_callers_to_fix(&e) => return Err(e),
                    Err(e) => {
                        refused.push((Mode::NoDevice, e.to_string()));
                        copy(refused)?
                    }
                },
            }
        }
    };
    tracing::info!(
        mode = %zcrx.selection.chosen,
        receiving = %zcrx.description(),
        "tokio-zcrx runtime started: {}",
        zcrx.selection
    );
    Ok(zcrx)
}

/// `InvalidConfig` unless called within a Tokio runtime, which `what` needs for its reactor.
pub(crate) fn require_tokio(what: &str) -> Result<()> {
    tokio::runtime::Handle::try_current()
        .map(drop)
        .map_err(|_| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!(
                "{what} must be called within a Tokio runtime: its sockets are registered with \
                 that runtime's reactor (call it from a task, or enter the runtime with \
                 Runtime::enter)"
            ),
            )
        })
}

/// Refusals that `Auto` passes on instead of trying the next mode: no mode fixes them (a
/// setting this kernel cannot take, an interface that is not there, no file descriptor left).
fn is_callers_to_fix(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::InvalidConfig | ErrorKind::InterfaceNotFound | ErrorKind::TooManyOpenFiles
    )
}

/// Starts the driver thread and waits until it registered the queue (or failed to).
fn start(config: Validated) -> Result<UringHandle> {
    let shared = Arc::new(DriverShared::new().map_err(|e| {
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
