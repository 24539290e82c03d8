//! The receiver child: one process per measured run, so its getrusage and peak RSS belong to
//! the receiver alone. It listens, tells the parent where (stdout, one JSON line), accepts the
//! sender's connections, says `Ready` when the measured window starts and `Done` when every
//! byte has arrived.

use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use tokio_zcrx::{ZcStream, Zcrx};

use crate::protocol::{Msg, Outcome, Receiver, Spec, ZcrxInfo, READ_BUFFER};
use crate::system::{self, Usage};

/// Runs the child described by `spec_json` (the hidden `__child` subcommand).
pub(crate) fn main(spec_json: &str) -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        emit(&Msg::Error {
            message: format!("receiver panicked: {info}"),
        });
    }));
    let result = serde_json::from_str::<Spec>(spec_json)
        .context("bad child spec")
        .and_then(|spec| {
            if let Some(cpu) = spec.pin_cpu() {
                // Before any other thread starts: they all inherit it.
                system::pin_to_cpu(cpu)?;
            }
            start_watchdog(Duration::from_secs(spec.timeout_s()));
            match spec {
                Spec::Receive {
                    receiver,
                    conns,
                    bytes_per_conn,
                    uring_threads,
                    ..
                } => receive(receiver, conns, bytes_per_conn, uring_threads),
                Spec::Scaling {
                    receiver,
                    idle,
                    busy,
                    hello,
                    busy_bytes_per_conn,
                    ..
                } => scaling(receiver, idle, busy, hello, busy_bytes_per_conn),
            }
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            emit(&Msg::Error {
                message: format!("{e:#}"),
            });
            ExitCode::FAILURE
        }
    }
}

/// Writes one message line to the parent.
fn emit(msg: &Msg) {
    let line = serde_json::to_string(msg).expect("messages serialise");
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Ends the process if the run takes longer than `limit` (a stuck receiver must not hang the
/// whole benchmark; exiting resets the connections, which stops the sender too).
fn start_watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        emit(&Msg::Error {
            message: format!("timed out after {} s", limit.as_secs()),
        });
        std::process::exit(3);
    });
}

/// A listener on a fresh loopback port with a backlog deep enough for thousands of connects.
fn listen() -> Result<TcpListener> {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .context("socket")?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into()).context("bind 127.0.0.1:0")?;
    socket.listen(4096).context("listen")?;
    Ok(socket.into())
}

/// The measured window: wall time and CPU from `Ready` on.
struct Window {
    start: Instant,
    usage: Usage,
    rss_baseline: Option<u64>,
    rss_idle: Option<u64>,
}

impl Window {
    /// Starts the window and tells the parent to start sending.
    fn open(rss_baseline: Option<u64>, rss_idle: Option<u64>) -> Window {
        let window = Window {
            start: Instant::now(),
            usage: Usage::now(),
            rss_baseline,
            rss_idle,
        };
        emit(&Msg::Ready {
            rss_baseline,
            rss_idle,
        });
        window
    }

    fn close(self, bytes: u64) -> Outcome {
        let seconds = self.start.elapsed().as_secs_f64();
        let used = Usage::now().since(&self.usage);
        Outcome {
            bytes,
            seconds,
            user_s: used.user_s,
            sys_s: used.sys_s,
            voluntary_switches: used.voluntary_switches,
            involuntary_switches: used.involuntary_switches,
            peak_rss: system::status_bytes("VmHWM"),
            rss_end: system::status_bytes("VmRSS"),
            rss_baseline: self.rss_baseline,
            rss_idle: self.rss_idle,
            zcrx: None,
        }
    }
}

fn zcrx_info(zcrx: &Zcrx) -> ZcrxInfo {
    ZcrxInfo {
        mode: zcrx.mode().to_string(),
        mode_selection: zcrx.mode_selection().to_string(),
        description: zcrx.description(),
        stats: zcrx.stats().to_string(),
    }
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

// ---------------------------------------------------------------------------------------
// The side-by-side receive run.

fn receive(
    receiver: Receiver,
    conns: usize,
    bytes_per_conn: u64,
    uring_threads: usize,
) -> Result<()> {
    system::raise_nofile(conns as u64 + 64)?;
    let listener = listen()?;
    emit(&Msg::Listening {
        addr: listener.local_addr()?,
    });
    let mut streams = Vec::with_capacity(conns);
    for i in 0..conns {
        let (stream, _) = listener
            .accept()
            .with_context(|| format!("accepting connection {}", i + 1))?;
        streams.push(stream);
    }
    drop(listener);

    let outcome = match receiver {
        Receiver::TokioZcrx => receive_zcrx(streams)?,
        Receiver::TokioRead => receive_tokio(streams)?,
        Receiver::TokioUring => receive_tokio_uring(streams, uring_threads)?,
        Receiver::StdThreads => receive_std(streams)?,
    };
    let expected = bytes_per_conn * conns as u64;
    if outcome.bytes != expected {
        bail!(
            "received {} bytes, expected {expected}: a connection ended early",
            outcome.bytes
        );
    }
    emit(&Msg::Done(outcome));
    Ok(())
}

/// tokio-zcrx in whatever mode this machine supports; each task consumes its `ZcStream` and
/// drops every buffer at once.
fn receive_zcrx(streams: Vec<TcpStream>) -> Result<Outcome> {
    let rt = tokio_runtime()?;
    rt.block_on(async {
        let zcrx = Zcrx::builder().build().context("Zcrx::builder().build()")?;
        let mut tasks = Vec::with_capacity(streams.len());
        for stream in streams {
            stream.set_nonblocking(true)?;
            let (stream, writer) = zcrx
                .attach(tokio::net::TcpStream::from_std(stream)?)
                .context("Zcrx::attach")?;
            tasks.push(tokio::spawn(async move {
                let _writer = writer;
                drain_zc(stream).await
            }));
        }
        let window = Window::open(None, None);
        let mut bytes = 0;
        for task in tasks {
            bytes += task.await.context("receiver task panicked")??;
        }
        let mut outcome = window.close(bytes);
        outcome.zcrx = Some(zcrx_info(&zcrx));
        Ok(outcome)
    })
}

async fn drain_zc(mut stream: ZcStream) -> Result<u64> {
    let mut bytes = 0;
    while let Some(buf) = stream.next().await {
        bytes += buf.context("ZcStream")?.len() as u64;
    }
    Ok(bytes)
}

/// Tokio's multi-threaded runtime, a task per connection reading into its own 64 KiB buffer.
fn receive_tokio(streams: Vec<TcpStream>) -> Result<Outcome> {
    let rt = tokio_runtime()?;
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(streams.len());
        for stream in streams {
            stream.set_nonblocking(true)?;
            let stream = tokio::net::TcpStream::from_std(stream)?;
            tasks.push(tokio::spawn(drain_tokio(stream, None)));
        }
        let window = Window::open(None, None);
        let mut bytes = 0;
        for task in tasks {
            bytes += task.await.context("receiver task panicked")??;
        }
        Ok(window.close(bytes))
    })
}

/// Reads until EOF into a 64 KiB buffer owned by the connection, counting into `progress`
/// when given.
async fn drain_tokio(
    mut stream: tokio::net::TcpStream,
    progress: Option<Arc<Progress>>,
) -> Result<u64> {
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut bytes = 0;
    loop {
        let n = stream.read(&mut buffer).await.context("TcpStream::read")?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes += n as u64;
        if let Some(progress) = &progress {
            progress.add_bytes(n as u64);
        }
    }
}

/// tokio-uring: one single-threaded runtime per thread, connections dealt out round-robin,
/// each read into its own 64 KiB buffer (owned buffers go to the kernel and come back).
fn receive_tokio_uring(streams: Vec<TcpStream>, threads: usize) -> Result<Outcome> {
    let threads = threads.clamp(1, streams.len().max(1));
    let mut shares: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, stream) in streams.into_iter().enumerate() {
        shares[i % threads].push(stream);
    }
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let mut handles = Vec::with_capacity(threads);
    for (t, share) in shares.into_iter().enumerate() {
        let started = started_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("tokio-uring-{t}"))
            .spawn(move || -> Result<u64> {
                let mut builder = tokio_uring::builder();
                builder.entries(256);
                let rt = tokio_uring::Runtime::new(&builder)
                    .context("cannot start a tokio-uring runtime (io_uring_setup)")?;
                rt.block_on(async move {
                    let tasks: Vec<_> = share
                        .into_iter()
                        .map(|stream| tokio_uring::spawn(drain_uring(stream)))
                        .collect();
                    let _ = started.send(());
                    let mut bytes = 0;
                    for task in tasks {
                        bytes += task.await.context("tokio-uring task panicked")??;
                    }
                    Ok(bytes)
                })
            })
            .context("spawning a tokio-uring thread")?;
        handles.push(handle);
    }
    drop(started_tx);
    let mut failed_early = false;
    for _ in 0..threads {
        if started_rx.recv().is_err() {
            failed_early = true;
            break;
        }
    }
    if failed_early {
        for handle in handles {
            match handle.join() {
                Ok(Err(e)) => return Err(e),
                Err(_) => bail!("a tokio-uring thread panicked during setup"),
                Ok(Ok(_)) => {}
            }
        }
        bail!("a tokio-uring thread ended during setup");
    }
    let window = Window::open(None, None);
    let mut bytes = 0;
    for handle in handles {
        bytes += handle
            .join()
            .map_err(|_| anyhow!("a tokio-uring thread panicked"))??;
    }
    Ok(window.close(bytes))
}

async fn drain_uring(stream: TcpStream) -> Result<u64> {
    let stream = tokio_uring::net::TcpStream::from_std(stream);
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut bytes = 0;
    loop {
        let (result, returned) = stream.read(buffer).await;
        buffer = returned;
        let n = result.context("tokio-uring TcpStream::read")?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes += n as u64;
    }
}

/// One blocking thread per connection, reading into its own 64 KiB buffer.
fn receive_std(streams: Vec<TcpStream>) -> Result<Outcome> {
    let mut handles = Vec::with_capacity(streams.len());
    for (i, mut stream) in streams.into_iter().enumerate() {
        let handle = std::thread::Builder::new()
            .name(format!("reader-{i}"))
            .stack_size(64 << 10)
            .spawn(move || -> io::Result<u64> {
                let mut buffer = vec![0u8; READ_BUFFER];
                let mut bytes = 0;
                loop {
                    match stream.read(&mut buffer) {
                        Ok(0) => return Ok(bytes),
                        Ok(n) => bytes += n as u64,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            })
            .context("spawning a reader thread")?;
        handles.push(handle);
    }
    let window = Window::open(None, None);
    let mut bytes = 0;
    for handle in handles {
        bytes += handle
            .join()
            .map_err(|_| anyhow!("a reader thread panicked"))?
            .context("read")?;
    }
    Ok(window.close(bytes))
}

// ---------------------------------------------------------------------------------------
// Connection scaling: many idle connections, a few busy ones.

/// Counters every connection task updates, and a wake-up for whoever waits on them.
#[derive(Default)]
struct Progress {
    bytes: AtomicU64,
    accepted: AtomicUsize,
    /// Wake the waiter when `bytes` reaches this.
    target: AtomicU64,
    changed: Notify,
}

impl Progress {
    fn add_bytes(&self, n: u64) {
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        if total >= self.target.load(Ordering::Relaxed) {
            self.changed.notify_one();
        }
    }

    /// Waits until `accepted` connections are in and `bytes` have arrived.
    async fn wait_for(&self, accepted: usize, bytes: u64) {
        self.target.store(bytes, Ordering::Relaxed);
        loop {
            if self.accepted.load(Ordering::Relaxed) >= accepted
                && self.bytes.load(Ordering::Relaxed) >= bytes
            {
                return;
            }
            self.changed.notified().await;
        }
    }
}

fn scaling(
    receiver: Receiver,
    idle: usize,
    busy: usize,
    hello: u64,
    busy_bytes_per_conn: u64,
) -> Result<()> {
    if !matches!(receiver, Receiver::TokioZcrx | Receiver::TokioRead) {
        bail!("the scaling run compares tokio-zcrx and tokio-read only, not {receiver}");
    }
    let conns = idle + busy;
    system::raise_nofile(conns as u64 + 64)?;
    let rt = tokio_runtime()?;
    let outcome = rt.block_on(async {
        let zcrx = match receiver {
            Receiver::TokioZcrx => {
                Some(Zcrx::builder().build().context("Zcrx::builder().build()")?)
            }
            _ => None,
        };
        let listener = listen()?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let progress = Arc::new(Progress::default());
        // Let the runtime's workers start before taking the baseline.
        tokio::task::yield_now().await;
        let rss_baseline = system::status_bytes("VmRSS");
        emit(&Msg::Listening { addr });

        let accept_progress = Arc::clone(&progress);
        let accept_zcrx = zcrx.clone();
        // Accepts until the process exits; only an error ends it.
        let acceptor: tokio::task::JoinHandle<Result<Infallible>> = tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.context("accept")?;
                let progress = Arc::clone(&accept_progress);
                match &accept_zcrx {
                    Some(zcrx) => {
                        let (stream, writer) = zcrx.attach(socket).context("Zcrx::attach")?;
                        tokio::spawn(async move {
                            let _writer = writer;
                            drain_zc_counting(stream, progress).await
                        });
                    }
                    None => {
                        tokio::spawn(drain_tokio(socket, Some(progress)));
                    }
                }
                accept_progress.accepted.fetch_add(1, Ordering::Relaxed);
                accept_progress.changed.notify_one();
            }
        });

        let hello_total = hello * idle as u64;
        tokio::select! {
            _ = progress.wait_for(conns, hello_total) => {}
            result = acceptor => {
                let Err(e) = result.context("accept task panicked")?;
                return Err(e);
            }
        }
        let rss_idle = system::status_bytes("VmRSS");
        let window = Window::open(Some(rss_baseline), Some(rss_idle));
        let total = hello_total + busy_bytes_per_conn * busy as u64;
        progress.wait_for(conns, total).await;
        let mut outcome = window.close(progress.bytes.load(Ordering::Relaxed) - hello_total);
        outcome.zcrx = zcrx.as_ref().map(zcrx_info);
        Ok::<Outcome, anyhow::Error>(outcome)
    })?;
    emit(&Msg::Done(outcome));
    // Tearing down ten thousand tasks measures nothing: leave, the kernel closes the sockets.
    std::process::exit(0);
}

async fn drain_zc_counting(mut stream: ZcStream, progress: Arc<Progress>) -> Result<u64> {
    let mut bytes = 0;
    while let Some(buf) = stream.next().await {
        let n = buf.context("ZcStream")?.len() as u64;
        bytes += n;
        progress.add_bytes(n);
    }
    Ok(bytes)
}
