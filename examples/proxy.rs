//! A TCP proxy on tokio-zcrx: both directions of every connection are received through the
//! runtime and forwarded straight from the received buffers.
//!
//! ```text
//! cargo run --release --example proxy -- --listen ADDR --upstream ADDR
//!     [--mode auto|nic|nodev|copy] [--interface IF --queue N] [--copy [--copy-buffer B]]
//!     [--json] [--duration S] [--connections N]
//! ```
//!
//! Each accepted client gets its own connection to the upstream server. The client's socket
//! comes from a `ZcListener`; the upstream socket is connected with Tokio and `attach`ed to
//! the same runtime, so what the upstream answers arrives through tokio-zcrx too. Each
//! direction receives a batch of buffers and forwards it whole ([`forward`]), then lets the
//! batch go (docs/holding-buffers.md, "write back in one go").
//!
//! TCP's semantics pass through: an end of stream one way shuts down that direction's write
//! side only (half-close), and the other direction goes on; a reset or any error on either
//! side resets both. `--copy` proxies with `tokio::io::copy_bidirectional` on plain Tokio
//! sockets instead, for comparison (the benchmark's other side).
//!
//! It prints the throughput once a second, each connection's byte counts when it ends, and on
//! exit (SIGINT, SIGTERM, `--duration`, or after `--connections` connections) a summary as one
//! JSON line: bytes each way, connections, sends (zero-copy and copied) and the runtime's
//! receive statistics. `--json` makes every line JSON (fields in docs/cli.md).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_zcrx::{Mode, Stats, ZcBatch, ZcListener, ZcStream, ZcWriteHalf, Zcrx};
use tokio_zcrx_examples::{
    gbps, human_bytes, parse_bytes, parse_command_line, say, ShutdownSignals,
};

const USAGE_LINE: &str = "usage: proxy --listen ADDR --upstream ADDR \
                          [--mode auto|nic|nodev|copy] [--interface IF --queue N] [--copy] \
                          [--copy-buffer B] [--json] [--duration S] [--connections N]";

const HELP: &str = "\
options:
  --listen ADDR       address to listen on for clients, e.g. [::]:8000 (required)
  --upstream ADDR     the server every client is forwarded to, e.g. 127.0.0.1:6379 (required)
  --mode MODE         how both directions receive (tokio-zcrx), as for sink and echo:
                      auto (default): the best that works here, nic, then nodev, then copy
                      nic: zero copy on --interface's rx --queue (Linux 6.15+, capable NIC)
                      nodev: the kernel's device-less zcrx mode (Linux 7.1+), copies
                      copy: plain Tokio reads into the runtime's buffer pool
  --interface IF      the NIC for nic mode (needs --queue)
  --queue N           its rx queue, steered to this proxy (docs/nic-setup.md)
  --copy              no tokio-zcrx: tokio::io::copy_bidirectional on plain Tokio sockets
                      (64 KiB buffers each way), for comparison
  --copy-buffer B     with --copy: copy_bidirectional's buffer size each way (K/M suffix)
  --json              one JSON object per line instead of text (see docs/cli.md)
  --duration S        stop after S seconds (fractions allowed), cutting open connections
  --connections N     stop once N connections have ended
  -h, --help          print this help";

/// Bytes `copy_bidirectional` reads at once with `--copy` unless `--copy-buffer` says: the
/// size of the runtime's copy-mode buffers, so both sides of the comparison move bytes in
/// buffers of the same size.
const COPY_BUFFER: usize = 64 << 10;

/// Buffers one direction takes from its stream at once, and forwards with one vectored write.
const BATCH: usize = 64;

struct Args {
    listen: String,
    upstream: String,
    mode: Mode,
    interface: Option<(String, u32)>,
    copy: bool,
    /// `copy_bidirectional`'s buffer size each way (`--copy`).
    copy_buffer: usize,
    json: bool,
    duration: Option<Duration>,
    connections: Option<u64>,
}

/// The command line, or `None` when help was asked for.
fn parse_args() -> Result<Option<Args>, lexopt::Error> {
    use lexopt::prelude::*;

    let (mut listen, mut upstream, mut mode) = (None, None, Mode::Auto);
    let (mut interface, mut queue, mut copy, mut json) = (None, None, false, false);
    let (mut duration, mut connections, mut copy_buffer) = (None, None, None);
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("listen") | Short('l') => listen = Some(parser.value()?.string()?),
            Long("upstream") | Short('u') => upstream = Some(parser.value()?.string()?),
            Long("mode") | Short('m') => mode = parser.value()?.parse()?,
            Long("interface") | Short('i') => interface = Some(parser.value()?.string()?),
            Long("queue") | Short('q') => queue = Some(parser.value()?.parse()?),
            Long("copy") => copy = true,
            Long("copy-buffer") => {
                let text = parser.value()?.string()?;
                let bytes = parse_bytes(&text).map_err(|e| format!("--copy-buffer: {e}"))?;
                copy_buffer = Some(
                    usize::try_from(bytes)
                        .ok()
                        .filter(|&b| b > 0)
                        .ok_or_else(|| format!("--copy-buffer {text}: not a buffer size"))?,
                );
            }
            Long("json") => json = true,
            Long("duration") => {
                let seconds: f64 = parser.value()?.parse()?;
                duration = Some(
                    Duration::try_from_secs_f64(seconds)
                        .map_err(|_| format!("--duration {seconds} is not a time in seconds"))?,
                );
            }
            Long("connections") => connections = Some(parser.value()?.parse()?),
            Long("help") | Short('h') => return Ok(None),
            _ => return Err(arg.unexpected()),
        }
    }
    let interface = match (interface, queue) {
        (Some(name), Some(queue)) => Some((name, queue)),
        (None, None) => None,
        _ => return Err("--interface and --queue go together".into()),
    };
    if copy && (interface.is_some() || mode != Mode::Auto) {
        return Err("--copy uses no tokio-zcrx runtime: drop --mode and --interface".into());
    }
    if copy_buffer.is_some() && !copy {
        return Err("--copy-buffer sizes --copy's buffers: add --copy".into());
    }
    Ok(Some(Args {
        listen: listen.ok_or("--listen ADDR is required")?,
        upstream: upstream.ok_or("--upstream ADDR is required")?,
        mode,
        interface,
        copy,
        copy_buffer: copy_buffer.unwrap_or(COPY_BUFFER),
        json,
        duration,
        connections,
    }))
}

/// Starts the zcrx runtime in the mode asked for.
fn build_runtime(args: &Args) -> tokio_zcrx::Result<Zcrx> {
    let mut builder = Zcrx::builder().mode(args.mode);
    if let Some((name, queue)) = &args.interface {
        builder = builder.interface(name, *queue);
    }
    builder.build()
}

/// What every connection adds to, read by the ticker and the summary.
#[derive(Default)]
struct Totals {
    /// Bytes forwarded from clients to the upstream server.
    to_upstream: AtomicU64,
    /// Bytes forwarded from the upstream server to clients.
    to_client: AtomicU64,
}

/// One direction's progress: the bytes it forwarded.
#[derive(Default)]
struct Flow {
    bytes: u64,
}

/// How a connection ended.
enum End {
    /// Both directions reached their end of stream and were shut down in turn.
    Closed,
    /// A side failed (a reset, an unreachable upstream, ...): both sides were reset.
    Error(io::Error),
    /// Cut when the proxy stopped.
    Shutdown,
}

struct ConnReport {
    peer: SocketAddr,
    to_upstream: u64,
    to_client: u64,
    seconds: f64,
    end: End,
}

/// Forwards one direction until its end of stream, then shuts down the writer's sending
/// side (the peer sees the end of stream too) and returns.
async fn pump(
    stream: &mut ZcStream,
    writer: &mut ZcWriteHalf,
    flow: &mut Flow,
    counter: &AtomicU64,
) -> io::Result<()> {
    // One batch for the direction's life: `send_batch` moves its buffers into zero-copy
    // sends (SEND_ZC from the receive area; plain writes in copy mode) and returns once they
    // are queued, so the next batch is received while the kernel sends this one; it waits
    // only when the connection has its most sends in flight. Each buffer goes back to the
    // kernel after its send's notification.
    let mut batch = ZcBatch::with_capacity(BATCH);
    while stream.recv_many(&mut batch, BATCH).await? > 0 {
        let bytes = batch.len_bytes() as u64;
        writer.send_batch(&mut batch).await?;
        flow.bytes += bytes;
        counter.fetch_add(bytes, Ordering::Relaxed);
    }
    // After every queued send (the peer sees the end of stream after the last byte).
    writer.shutdown().await?;
    Ok(())
}

/// Resets a TCP connection now: the peer gets an RST instead of a FIN, so a failure on one
/// side reaches the other as a failure, never as a clean (possibly truncated) end of stream.
///
/// `connect(AF_UNSPEC)` disconnects the socket (Linux's `tcp_disconnect`, which sends the
/// RST) without closing the descriptor, which the stream and the write half still own; their
/// later shutdown and close find the socket closed and do nothing more.
fn reset(socket: &impl AsFd) {
    let address = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: the descriptor is open (borrowed from its owner for this call) and `address`
    // is a valid `sockaddr` of the length passed.
    let result = unsafe {
        libc::connect(
            socket.as_fd().as_raw_fd(),
            &address,
            size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if result != 0 {
        // Already closed or reset by the peer: nothing left to tell it.
        let error = io::Error::last_os_error();
        if !matches!(error.raw_os_error(), Some(libc::ENOTCONN)) {
            eprintln!("proxy: resetting a connection failed: {error}");
        }
    }
}

/// One client through tokio-zcrx: connects upstream, attaches that socket to the runtime and
/// forwards both directions until both have ended, one fails, or the proxy stops.
async fn relay_zcrx(
    zcrx: Zcrx,
    (mut client, mut client_writer, peer): (ZcStream, ZcWriteHalf, SocketAddr),
    upstream: SocketAddr,
    totals: Arc<Totals>,
    stop: CancellationToken,
) -> ConnReport {
    let started = Instant::now();
    let (mut up, mut down) = (Flow::default(), Flow::default());
    let end = async {
        let socket = TcpStream::connect(upstream).await?;
        // Request-response protocols (redis) must not wait for Nagle's timer, either way.
        socket.set_nodelay(true)?;
        client_writer.set_nodelay(true)?;
        let (mut server, mut server_writer) = zcrx.attach(socket)?;
        let result = tokio::select! {
            result = async {
                tokio::try_join!(
                    pump(&mut client, &mut server_writer, &mut up, &totals.to_upstream),
                    pump(&mut server, &mut client_writer, &mut down, &totals.to_client),
                )
            } => result.map(|_| End::Closed),
            () = stop.cancelled() => Ok(End::Shutdown),
        };
        if result.is_err() {
            reset(&server_writer);
        }
        result
    }
    .await;
    let end = end.unwrap_or_else(|error| {
        reset(&client_writer);
        End::Error(error)
    });
    // The streams and write halves drop here: each socket closes, and every buffer the
    // batches held is back already.
    ConnReport {
        peer,
        to_upstream: up.bytes,
        to_client: down.bytes,
        seconds: started.elapsed().as_secs_f64(),
        end,
    }
}

/// A Tokio socket that counts the bytes written to it (`--copy`), so the plain Tokio proxy
/// reports the same throughput lines as the tokio-zcrx one.
struct Counted<'a> {
    socket: &'a mut TcpStream,
    written: u64,
    total: &'a AtomicU64,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut *this.socket).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = result {
            this.written += written as u64;
            this.total.fetch_add(written as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().socket).poll_shutdown(cx)
    }
}

/// One client with `copy_bidirectional` (`--copy`), `buffer` bytes each way.
async fn relay_copy(
    (mut client, peer): (TcpStream, SocketAddr),
    upstream: SocketAddr,
    buffer: usize,
    totals: Arc<Totals>,
    stop: CancellationToken,
) -> ConnReport {
    let started = Instant::now();
    let (mut to_upstream, mut to_client) = (0, 0);
    let end = async {
        let mut server = TcpStream::connect(upstream).await?;
        server.set_nodelay(true)?;
        client.set_nodelay(true)?;
        // What `client` receives is written to `server` and counted there, and back.
        let mut server_side = Counted {
            socket: &mut server,
            written: 0,
            total: &totals.to_upstream,
        };
        let mut client_side = Counted {
            socket: &mut client,
            written: 0,
            total: &totals.to_client,
        };
        let result = tokio::select! {
            result = tokio::io::copy_bidirectional_with_sizes(
                &mut client_side, &mut server_side, buffer, buffer,
            ) => result.map(|_| End::Closed),
            () = stop.cancelled() => Ok(End::Shutdown),
        };
        (to_upstream, to_client) = (server_side.written, client_side.written);
        if result.is_err() {
            reset(&server);
        }
        result
    }
    .await;
    let end = end.unwrap_or_else(|error| {
        reset(&client);
        End::Error(error)
    });
    ConnReport {
        peer,
        to_upstream,
        to_client,
        seconds: started.elapsed().as_secs_f64(),
        end,
    }
}

/// Open file descriptors of this process, to show at exit that connections leave none.
fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_command_line("proxy", USAGE_LINE, HELP, parse_args) {
        Ok(args) => args,
        Err(code) => return code,
    };
    match serve(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Where clients come from: a tokio-zcrx listener, or a plain one with `--copy`.
enum Accepting {
    Zcrx(Zcrx, ZcListener),
    Copy(TcpListener),
}

async fn serve(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut signals = ShutdownSignals::new()?;
    let upstream = tokio::net::lookup_host(&args.upstream)
        .await
        .map_err(|e| format!("cannot resolve --upstream {}: {e}", args.upstream))?
        .next()
        .ok_or_else(|| format!("--upstream {} resolves to no address", args.upstream))?;
    let accepting = if args.copy {
        Accepting::Copy(
            TcpListener::bind(&args.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?,
        )
    } else {
        let zcrx = build_runtime(args)?;
        let listener = ZcListener::bind(&zcrx, &args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        Accepting::Zcrx(zcrx, listener)
    };
    let (local, mode) = match &accepting {
        Accepting::Zcrx(zcrx, listener) => (
            listener.local_addr()?,
            zcrx.mode_selection().chosen.to_string(),
        ),
        Accepting::Copy(listener) => (listener.local_addr()?, "copy_bidirectional".into()),
    };
    let mut out = Reporter::new(args.json);
    out.listening(local, upstream, &mode, &accepting);

    let totals = Arc::new(Totals::default());
    let stop = CancellationToken::new();
    let mut connections: JoinSet<ConnReport> = JoinSet::new();
    let mut ticker = tokio::time::interval_at(
        Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = args.duration.map(|d| Instant::now() + d);
    let fds_listening = open_fds();
    loop {
        tokio::select! {
            signal = signals.recv() => {
                out.note(&format!("{signal}, stopping"));
                break;
            }
            () = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await },
                if deadline.is_some() => {
                out.note("--duration is over, stopping");
                break;
            }
            accepted = accept(&accepting) => match accepted {
                Ok(Accepted::Zcrx(zcrx, conn)) => {
                    out.opened();
                    let (totals, stop) = (Arc::clone(&totals), stop.clone());
                    connections.spawn(relay_zcrx(zcrx, *conn, upstream, totals, stop));
                }
                Ok(Accepted::Copy(conn)) => {
                    out.opened();
                    let (totals, stop) = (Arc::clone(&totals), stop.clone());
                    let buffer = args.copy_buffer;
                    connections.spawn(relay_copy(conn, upstream, buffer, totals, stop));
                }
                Err(error) => {
                    // E.g. out of file descriptors: wait a little instead of spinning.
                    out.note(&format!("accept failed: {error}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(finished) = connections.join_next() => {
                out.conn(finished?);
                if args.connections.is_some_and(|n| out.ended >= n) {
                    out.note("--connections reached, stopping");
                    break;
                }
            }
            _ = ticker.tick() => out.tick(&totals, connections.len()),
        }
    }
    // Stop accepting, cut the connections still open (each reports how far it got).
    stop.cancel();
    while let Some(finished) = connections.join_next().await {
        out.conn(finished?);
    }
    if let (Accepting::Zcrx(zcrx, _), Some(listening)) = (&accepting, fds_listening) {
        // In the io_uring modes the sockets of an ended connection close asynchronously:
        // the driver closes each once it has cancelled its receive and its last send's
        // notification has come. Give that a moment (bounded), so the summary's descriptor
        // count shows what is really left, not what is still being torn down.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && (open_fds() != Some(listening) || zcrx.stats().sends_in_flight > 0)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let stats = match &accepting {
        Accepting::Zcrx(zcrx, _) => Some(zcrx.stats()),
        Accepting::Copy(_) => None,
    };
    out.summary(&mode, &totals, stats.as_ref(), fds_listening, open_fds());
    if let Accepting::Zcrx(zcrx, listener) = accepting {
        drop(listener);
        zcrx.shutdown().await;
    }
    Ok(())
}

enum Accepted {
    Zcrx(Zcrx, Box<(ZcStream, ZcWriteHalf, SocketAddr)>),
    Copy((TcpStream, SocketAddr)),
}

async fn accept(accepting: &Accepting) -> io::Result<Accepted> {
    match accepting {
        Accepting::Zcrx(zcrx, listener) => Ok(Accepted::Zcrx(
            zcrx.clone(),
            Box::new(listener.accept().await?),
        )),
        Accepting::Copy(listener) => Ok(Accepted::Copy(listener.accept().await?)),
    }
}

/// Counts what happens and prints it, as text or as JSON lines.
struct Reporter {
    json: bool,
    started: Instant,
    /// Bytes forwarded (both ways) at the last tick, and when that was.
    last_tick: (u64, u64, Instant),
    accepted: u64,
    ended: u64,
    failed: u64,
}

impl Reporter {
    fn new(json: bool) -> Reporter {
        let now = Instant::now();
        Reporter {
            json,
            started: now,
            last_tick: (0, 0, now),
            accepted: 0,
            ended: 0,
            failed: 0,
        }
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn listening(&self, local: SocketAddr, upstream: SocketAddr, mode: &str, how: &Accepting) {
        if self.json {
            let refused: serde_json::Map<String, Value> = match how {
                Accepting::Zcrx(zcrx, _) => zcrx
                    .mode_selection()
                    .refused
                    .iter()
                    .map(|(mode, reason)| (mode.to_string(), json!(reason)))
                    .collect(),
                Accepting::Copy(_) => serde_json::Map::new(),
            };
            let line = json!({
                "type": "listening",
                "addr": local.to_string(),
                "upstream": upstream.to_string(),
                "mode": mode,
                "refused": refused,
            });
            say!("{line}");
            return;
        }
        say!("proxy: listening on {local}, forwarding to {upstream}");
        match how {
            Accepting::Zcrx(zcrx, _) => {
                say!("mode: {}", zcrx.mode_selection().chosen);
                for (mode, reason) in &zcrx.mode_selection().refused {
                    say!("  not {mode}: {reason}");
                }
            }
            Accepting::Copy(_) => say!("mode: tokio::io::copy_bidirectional (no tokio-zcrx)"),
        }
    }

    /// A remark for people (stderr in JSON mode, to keep stdout parseable).
    fn note(&self, text: &str) {
        if self.json {
            eprintln!("proxy: {text}");
        } else {
            say!("proxy: {text}");
        }
    }

    fn opened(&mut self) {
        self.accepted += 1;
    }

    fn tick(&mut self, totals: &Totals, open: usize) {
        let (last_up, last_down, at) = self.last_tick;
        let now = Instant::now();
        let up = totals.to_upstream.load(Ordering::Relaxed);
        let down = totals.to_client.load(Ordering::Relaxed);
        self.last_tick = (up, down, now);
        let seconds = (now - at).as_secs_f64();
        let (up_rate, down_rate) = (gbps(up - last_up, seconds), gbps(down - last_down, seconds));
        if self.json {
            let line = json!({
                "type": "tick",
                "t": self.elapsed(),
                "to_upstream_gbps": up_rate,
                "to_client_gbps": down_rate,
                "to_upstream_bytes": up,
                "to_client_bytes": down,
                "open": open,
            });
            say!("{line}");
        } else if up != last_up || down != last_down || open > 0 {
            say!(
                "{:>6.1} s {up_rate:>8.2} Gbit/s to upstream {down_rate:>8.2} Gbit/s to clients \
                 {open:>4} open",
                self.elapsed(),
            );
        }
    }

    fn conn(&mut self, conn: ConnReport) {
        self.ended += 1;
        let (end, error) = match &conn.end {
            End::Closed => ("closed", None),
            End::Error(error) => ("error", Some(error.to_string())),
            End::Shutdown => ("shutdown", None),
        };
        if error.is_some() {
            self.failed += 1;
        }
        if self.json {
            let mut line = json!({
                "type": "conn",
                "peer": conn.peer.to_string(),
                "to_upstream": conn.to_upstream,
                "to_client": conn.to_client,
                "seconds": conn.seconds,
                "end": end,
            });
            if let Some(error) = error {
                line["error"] = json!(error);
            }
            say!("{line}");
            return;
        }
        let how = match error {
            Some(error) => format!("failed ({error}), both sides reset"),
            None if end == "shutdown" => "cut at shutdown".into(),
            None => "closed".into(),
        };
        say!(
            "{:>6.1} s conn {} {how}: {} to upstream, {} to the client in {:.2} s",
            self.elapsed(),
            conn.peer,
            human_bytes(conn.to_upstream),
            human_bytes(conn.to_client),
            conn.seconds
        );
    }

    fn summary(
        &self,
        mode: &str,
        totals: &Totals,
        stats: Option<&Stats>,
        fds_listening: Option<u64>,
        fds_at_exit: Option<u64>,
    ) {
        let up = totals.to_upstream.load(Ordering::Relaxed);
        let down = totals.to_client.load(Ordering::Relaxed);
        if !self.json {
            say!(
                "summary: {} connections ({} failed), {} to upstream, {} to clients, mode {mode}",
                self.accepted,
                self.failed,
                human_bytes(up),
                human_bytes(down),
            );
        }
        // Always one JSON line, also in text mode: the machine-readable record of the run.
        let line = json!({
            "type": "summary",
            "mode": mode,
            "seconds": self.elapsed(),
            "connections": self.accepted,
            "failed": self.failed,
            "to_upstream_bytes": up,
            "to_client_bytes": down,
            // The send side's statistics (`null` with --copy): sends queued, and their
            // bytes by how they went: from the area without a copy, copied by the kernel
            // after all (loopback, a device without scatter-gather), or written plainly
            // (copy mode, or a kernel that refused zero-copy sends).
            "sends": stats.map(|s| s.sends),
            "send_zero_copy_bytes": stats.map(|s| s.send_zero_copy_bytes),
            "send_kernel_copied_bytes": stats.map(|s| s.send_kernel_copied_bytes),
            "send_plain_bytes": stats.map(|s| s.send_plain_bytes),
            "send_fallbacks": stats.map(|s| s.send_fallbacks),
            "fds_listening": fds_listening,
            "fds_at_exit": fds_at_exit,
            // The receive side's statistics (`null` with --copy, which has no runtime).
            "runtime_bytes": stats.map(|s| s.bytes),
            "chunks": stats.map(|s| s.chunks),
            "copy_count": stats.and_then(|s| s.copy_count),
            "copy_bytes": stats.and_then(|s| s.copy_bytes),
            "buffers_outstanding": stats.map(|s| s.buffers_outstanding),
        });
        say!("{line}");
    }
}
