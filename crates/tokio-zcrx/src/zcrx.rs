//! [`Zcrx`]: the handle to a running runtime, whatever backend receives for it.

use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::backend::{select, Backend};
use crate::config::Builder;
use crate::config::StreamOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, QueueStats, Stats};
use crate::mode::{ActiveMode, ModeSelection};
use crate::privilege::DropPrivileges;
use crate::stream::{Addresses, ZcStream};
use crate::sys::{claim, privilege};
use crate::writer::ZcWriteHalf;

/// A running zcrx runtime: one registered receive queue and its driver thread, or several
/// ([`Builder::interface_queues`](crate::Builder::interface_queues)), or copy mode.
///
/// Cheap to clone; every clone refers to the same runtime. The runtime stops when
/// [`shutdown`](Zcrx::shutdown) is called or the last `Zcrx` (including those held by
/// streams) is dropped. Buffers handed out stay valid after that.
///
/// ```no_run
/// use futures::StreamExt;
/// use tokio::sync::broadcast::error::RecvError;
/// use tokio_zcrx::{Zcrx, ZcListener};
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let zcrx = Zcrx::builder().interface("eth0", 3).build()?;
///     let mut events = zcrx.subscribe();
///     tokio::spawn(async move {
///         loop {
///             match events.recv().await {
///                 Ok(event) => eprintln!("zcrx: {} ({})", event.kind, event.stats),
///                 Err(RecvError::Lagged(missed)) => eprintln!("zcrx: {missed} events missed"),
///                 Err(RecvError::Closed) => break, // the runtime has stopped
///             }
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

impl std::fmt::Debug for Zcrx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zcrx")
            .field("mode", &self.selection.chosen)
            .field("receiving", &self.description())
            .finish_non_exhaustive()
    }
}

impl Zcrx {
    #[cfg(any(test, feature = "bench-internals"))]
    pub(crate) fn from_parts(backend: Backend, selection: ModeSelection) -> Zcrx {
        Zcrx::new(backend, selection)
    }

    /// The backend, for the backends' own tests.
    #[cfg(test)]
    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    pub(crate) fn new(backend: Backend, selection: ModeSelection) -> Zcrx {
        let stopped = backend.stopped_token();
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
    pub fn builder() -> Builder {
        Builder::new()
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
    /// With several queues ([`Builder::interface_queues`](crate::Builder::interface_queues))
    /// the connection goes to the driver of the queue the kernel says its packets arrive on;
    /// one whose NAPI id is not known yet (no packet since the handshake) is received in copy
    /// mode, as this call cannot wait for it: [`attach_async`](Zcrx::attach_async) (which
    /// [`ZcListener`](crate::ZcListener) uses) waits for its first packet.
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
        let (claim, addresses) = self.claim_for_attach(&socket, options)?;
        let (source, write_half) = self.backend.attach(socket, options)?;
        Ok((ZcStream::new(source, claim, addresses), write_half))
    }

    /// Like [`attach`](Zcrx::attach), but on a runtime of several queues
    /// ([`Builder::interface_queues`](crate::Builder::interface_queues)) a socket whose NAPI
    /// id the kernel has not recorded yet (no packet through a NAPI instance since the
    /// handshake) first waits for its first packet, up to
    /// [`Builder::napi_wait`](crate::Builder::napi_wait), so that it goes to its queue's
    /// driver; [`attach`](Zcrx::attach), which cannot wait, receives such a socket in copy
    /// mode (counted as unmatched). Elsewhere it is `attach`. [`ZcListener`](crate::ZcListener)
    /// uses this.
    ///
    /// ```no_run
    /// # async fn demo(zcrx: tokio_zcrx::Zcrx, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    /// let (socket, _) = listener.accept().await?;
    /// let (stream, writer) = zcrx.attach_async(socket).await?;
    /// # let _ = (stream, writer);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn attach_async(
        &self,
        socket: TcpStream,
    ) -> std::io::Result<(ZcStream, ZcWriteHalf)> {
        self.attach_async_with(socket, StreamOptions::default())
            .await
    }

    /// Like [`attach_async`](Zcrx::attach_async), with options.
    pub async fn attach_async_with(
        &self,
        socket: TcpStream,
        options: StreamOptions,
    ) -> std::io::Result<(ZcStream, ZcWriteHalf)> {
        let (claim, addresses) = self.claim_for_attach(&socket, options)?;
        let (source, write_half) = self.backend.attach_async(socket, options).await?;
        Ok((ZcStream::new(source, claim, addresses), write_half))
    }

    /// The checks of every attach, and the socket's claim (released when the stream is
    /// dropped, or with the socket on any error).
    fn claim_for_attach(
        &self,
        socket: &TcpStream,
        options: StreamOptions,
    ) -> std::io::Result<(claim::SocketClaim, Addresses)> {
        if options.budget == Some(0) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "a stream budget of 0 bytes would never receive: use None for the runtime's \
                 budget, or u64::MAX for none",
            )
            .into());
        }
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
        let addresses = Addresses::of(socket);
        Ok((claim, addresses))
    }

    /// Prepares a listening socket whose connections will be [`attach`](Zcrx::attach)ed:
    /// in nic mode with budgets (the default), it clamps the TCP window of its connections
    /// to the largest window the runtime will give an attached stream (its receive buffer
    /// at the largest budget, rounded up to a power of two), so that the handshake
    /// negotiates the window scale that window needs and no more. Elsewhere it does
    /// nothing. [`ZcListener`](crate::ZcListener) does this itself.
    ///
    /// Why: on a NIC queue bound to zcrx, every byte the kernel queues for a socket is
    /// already in the shared area, whether anyone reads it or not, so the runtime sizes an
    /// attached stream's receive buffer by its budget. TCP fixes a connection's window
    /// scale at the handshake, from the listener's clamp: too small a clamp would cap the
    /// stream's window for its whole life (a clamp of a few chunks negotiates no scaling:
    /// 64 KiB), too large a one lets a stream's window outgrow the buffer the runtime
    /// meant. A connection waiting to be accepted keeps what its initial receive buffer
    /// (`net.ipv4.tcp_rmem[1]`, 128 KiB by default) let in; accept promptly.
    ///
    /// ```no_run
    /// # async fn demo(zcrx: tokio_zcrx::Zcrx) -> std::io::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
    /// zcrx.prepare_listener(&listener)?;
    /// loop {
    ///     let (socket, _) = listener.accept().await?;
    ///     let (stream, writer) = zcrx.attach(socket)?;
    ///     # let _ = (stream, writer);
    /// }
    /// # }
    /// ```
    pub fn prepare_listener(&self, listener: &impl AsFd) -> std::io::Result<()> {
        self.backend.prepare_listener(listener.as_fd())
    }

    /// `RuntimeGone` once the runtime has shut down (or its driver failed).
    pub(crate) fn check_running(&self) -> Result<()> {
        self.backend.check_running()
    }

    /// A receiver of runtime events (copy fallback, allocation failure, area exhausted, CQ
    /// overflow recovered), each with a statistics snapshot. After
    /// [`shutdown`](Zcrx::shutdown) the receiver is closed: `recv` returns `Closed` at once.
    ///
    /// The channel holds the last 1024 events; a subscriber that falls further behind gets
    /// `RecvError::Lagged(missed)` once and then the newer events: a monitoring loop must
    /// carry on after it (stopping at the first `Err` would stop monitoring at the first
    /// burst), and end at `Closed`.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        if self.check_running().is_err() {
            // No event can come any more; a receiver of the live channel would wait forever.
            return broadcast::channel(1).1;
        }
        self.backend.subscribe()
    }

    /// The current statistics: with several queues
    /// ([`Builder::interface_queues`](crate::Builder::interface_queues)), the total of every
    /// queue's and of the connections received in copy mode because they arrived on no
    /// bound queue ([`Stats::unmatched_connections`]).
    pub fn stats(&self) -> Stats {
        self.backend.stats()
    }

    /// Each bound NIC queue's statistics, in queue order, with its NAPI id: one entry for
    /// [`Builder::interface`](crate::Builder::interface), one per bound queue for
    /// [`Builder::interface_queues`](crate::Builder::interface_queues), none in the
    /// device-less and copy modes. [`stats`](Zcrx::stats) is their total plus the copy path
    /// of unmatched connections.
    ///
    /// ```no_run
    /// # fn demo(zcrx: tokio_zcrx::Zcrx) {
    /// for queue in zcrx.queue_stats() {
    ///     println!(
    ///         "queue {} (NAPI {:?}): {} bytes, {:?} copied",
    ///         queue.queue, queue.napi_id, queue.stats.bytes, queue.stats.copy_bytes
    ///     );
    /// }
    /// # }
    /// ```
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        self.backend.queue_stats()
    }

    /// What this runtime receives through, e.g. `eth0 rx queue 3`, `no device (NODEV
    /// mode)` or `copy mode (64 buffers of 65536 bytes)`.
    pub fn description(&self) -> String {
        self.backend.description()
    }

    /// Gives up capabilities in every thread of this process, for the rest of its life:
    /// `CAP_NET_ADMIN` and every other capability `what` does not keep.
    ///
    /// Only registering a zcrx queue needs `CAP_NET_ADMIN` (Linux checks it there and
    /// nowhere else, as of 7.3): the runtimes built before the drop go on receiving with zero
    /// copy, returning buffers, re-arming events, flushing and sending, and new connections
    /// attach to them as before. So build every nic and nodev runtime the process will need,
    /// then call this. Afterwards, building another one fails with
    /// [`ErrorKind::PrivilegesDropped`](crate::ErrorKind::PrivilegesDropped) (and
    /// [`Mode::Auto`](crate::Mode::Auto) falls back to copy mode, saying why); copy mode needs
    /// no privilege.
    ///
    /// Linux keeps capabilities per thread, so this reaches every thread (Tokio's workers, its
    /// blocking pool, driver threads, the application's own) the way glibc's `setuid` does:
    /// through a signal of its own, `SIGRTMIN() + 7`. It fails with
    /// [`ErrorKind::PrivilegeDropFailed`](crate::ErrorKind::PrivilegeDropFailed) without
    /// dropping anything if the application handles that signal itself, and, naming the
    /// thread, if a thread does not drop (it blocks the signal for 5 s, say) or still holds a
    /// capability when every thread's `/proc` status is read back at the end. After such a
    /// failure some threads may still hold their capabilities: stop rather than serve. The
    /// signal interrupts what threads are blocked in: calls are restarted (`SA_RESTART`)
    /// where the kernel allows, and a driver thread's wait in `io_uring_enter`, answered
    /// `EINTR`, is retried and counted in [`Stats::faults_survived`](crate::Stats::faults_survived).
    ///
    /// The effective, permitted, inheritable and ambient sets lose everything not kept; the
    /// bounding set too, if the process holds `CAP_SETPCAP` (a root process does; a service
    /// started with only `CAP_NET_ADMIN` cannot and need not: its unit's
    /// `CapabilityBoundingSet=` already limits it). `no_new_privs` is not set.
    ///
    /// ```no_run
    /// use tokio_zcrx::{Capability, DropPrivileges, Mode, Zcrx};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Register every queue first: that is what needs CAP_NET_ADMIN.
    /// let zero_copy = Zcrx::builder().interface("eth0", 3).mode(Mode::Nic).build()?;
    /// let loopback = Zcrx::builder().mode(Mode::NoDevice).build()?;
    /// // Then run without it (keeping the right to bind ports below 1024).
    /// Zcrx::drop_privileges(DropPrivileges::all().keep(Capability::NET_BIND_SERVICE))?;
    /// # drop((zero_copy, loopback));
    /// # Ok(())
    /// # }
    /// ```
    pub fn drop_privileges(what: DropPrivileges) -> Result<()> {
        privilege::drop_process_wide(&what)
    }

    /// Makes the driver thread panic, to test how an application copes with a failed
    /// runtime. Only with the `fault-injection` feature; no effect in copy mode.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_driver_panic(&self) {
        self.backend.inject_driver_panic();
    }

    /// Stops receiving: every stream ends with an error, the ring and the kernel's zcrx
    /// instance are closed. Completes when the driver thread has finished. Buffers still held
    /// stay valid; the area is unmapped when the last one is dropped.
    pub async fn shutdown(&self) {
        self.backend.shutdown().await;
        // Also cancelled by a backend that stops on its own; in copy mode only here.
        self.stopped.cancel();
    }
}

impl Builder {
    /// Starts the runtime in the chosen mode. For the io_uring modes this starts the driver
    /// thread and registers the queue, blocking until the kernel answered (milliseconds; a
    /// NIC queue restart may take longer).
    ///
    /// Every refusal maps to an [`Error`] whose message says what to do; with
    /// [`Mode::Auto`](crate::Mode::Auto) refusals become [`Zcrx::mode_selection`](crate::Zcrx::mode_selection)
    /// reasons instead.
    pub fn build(self) -> Result<Zcrx> {
        let (backend, selection) = select::select_and_start(self.validate()?)?;
        Ok(Zcrx::new(backend, selection))
    }
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
