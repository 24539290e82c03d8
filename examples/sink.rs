//! A sink on tokio-zcrx: consumes every byte it receives, counts it, checksums it per
//! connection, and shows the throughput and what the runtime reports.
//!
//! ```text
//! cargo run --release --example sink -- --listen ADDR [--mode auto|nic|nodev|copy]
//!     [--interface IF (--queue N | --queues all|A-B|A,B,...)] [--json]
//! cargo run --release --example sink -- --demo SECONDS [--mode MODE] [--json]
//! ```
//!
//! It prints the mode the runtime chose and why better ones were refused, the throughput
//! once a second, runtime events (copy fallback, allocation failure, ...) as they arrive,
//! each connection's byte count and CRC-32 when it ends, and a summary on SIGINT or SIGTERM
//! (then it exits with status 0).
//!
//! `--demo SECONDS` is the "try it" command: it listens on a free loopback port and, in the
//! same process, runs the load generator of the `loadgen` example against itself with 4
//! connections for SECONDS seconds, checks that every connection's CRC-32 matches what was
//! sent, prints the summary and exits.
//!
//! `--json` prints one JSON object per line instead, each with a `type`: `listening`,
//! `tick`, `event`, `conn`, `summary` (fields in docs/cli.md).
//!
//! Options for soak testing (`cargo xtask soak`) make it a rougher user of the runtime:
//! `--hold MS` hands every batch to another task that keeps it MS milliseconds (buffers
//! outlive their stream), `--drop-every N` drops every Nth connection's stream after its
//! first batch, while the peer is still sending, and `--lagging-subscriber` adds an event
//! subscriber that reads one event every 100 ms, so it falls behind and misses events.

use std::collections::HashMap;
use std::future::pending;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_zcrx::{
    DropPrivileges, Event, EventKind, Mode, ModeSelection, QueueSet, QueueStats, Stats, ZcBatch,
    ZcListener, ZcStream, ZcWriteHalf, Zcrx,
};
use tokio_zcrx_examples::load::{self, Budget, LoadConfig, LoadReport};
use tokio_zcrx_examples::{gbps, human_bytes, parse_command_line, say, ShutdownSignals};

const USAGE_LINE: &str = "usage: sink --listen ADDR [--mode auto|nic|nodev|copy] \
                          [--interface IF --queue N|--queues SET] [--json] [--demo SECONDS] \
                          [--hold MS] [--drop-every N] [--lagging-subscriber] \
                          [--event-rearm MS] [--drop-privileges]";

const HELP: &str = "\
options:
  --listen ADDR       address to listen on, e.g. [::]:9000 (required, except with --demo)
  --mode MODE         auto (default): the best that works here, nic, then nodev, then copy
                      nic: zero copy on --interface's rx --queue (Linux 6.15+, capable NIC)
                      nodev: the kernel's device-less zcrx mode (Linux 7.1+), copies
                      copy: plain Tokio reads into a buffer pool, works everywhere
  --interface IF      the NIC for nic mode (needs --queue or --queues)
  --queue N           its rx queue, steered to this sink (docs/nic-setup.md)
  --queues SET        several rx queues, a driver each: all, A-B or A,B,...; connections
                      go to their queue's driver (others are copied: `unmatched`); the
                      ticks and the summary show each queue
  --json              one JSON object per line instead of text (see docs/cli.md)
  --demo SECONDS      send to itself over loopback for SECONDS seconds (4 connections),
                      check every byte's CRC-32, print the summary and exit
  --hold MS           give each batch to a holder task that keeps it MS milliseconds
                      before dropping it (buffers outlive their stream)
  --drop-every N      drop every Nth connection's stream after its first batch, while
                      the peer still sends (the connection ends as `dropped`)
  --lagging-subscriber
                      also subscribe to events with a receiver that reads one event
                      every 100 ms, and count what it misses (`events_missed`)
  --event-rearm MS    the runtime's event re-arm interval (default: the library's)
  --drop-privileges   once registered and listening, give up every capability for the
                      rest of the run (Zcrx::drop_privileges; docs/nic-setup.md, Security)
  -h, --help          print this help";

/// Connections the demo opens.
const DEMO_CONNS: usize = 4;

struct Args {
    listen: Option<String>,
    mode: Mode,
    interface: Option<(String, QueueSet)>,
    json: bool,
    demo: Option<Duration>,
    /// How long a holder task keeps each batch (`--hold`).
    hold: Option<Duration>,
    /// Every Nth connection's stream is dropped after its first batch (`--drop-every`).
    drop_every: Option<u64>,
    lagging_subscriber: bool,
    event_rearm: Option<Duration>,
    drop_privileges: bool,
}

/// The command line, or `None` when help was asked for.
fn parse_args() -> Result<Option<Args>, lexopt::Error> {
    use lexopt::prelude::*;

    let mut args = Args {
        listen: None,
        mode: Mode::Auto,
        interface: None,
        json: false,
        demo: None,
        hold: None,
        drop_every: None,
        lagging_subscriber: false,
        event_rearm: None,
        drop_privileges: false,
    };
    let (mut interface, mut queue, mut queues) = (None, None, None);
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("listen") | Short('l') => args.listen = Some(parser.value()?.string()?),
            Long("mode") | Short('m') => args.mode = parser.value()?.parse()?,
            Long("interface") | Short('i') => interface = Some(parser.value()?.string()?),
            Long("queue") | Short('q') => queue = Some(parser.value()?.parse::<u32>()?),
            Long("queues") => queues = Some(parser.value()?.parse::<QueueSet>()?),
            Long("json") => args.json = true,
            Long("demo") => {
                let seconds: f64 = parser.value()?.parse()?;
                match Duration::try_from_secs_f64(seconds) {
                    Ok(duration) if seconds > 0.0 => args.demo = Some(duration),
                    _ => return Err(format!("--demo {seconds}: not a number of seconds").into()),
                }
            }
            Long("hold") => {
                args.hold = Some(Duration::from_millis(parser.value()?.parse()?));
            }
            Long("drop-every") => match parser.value()?.parse()? {
                0 => return Err("--drop-every must be at least 1".into()),
                n => args.drop_every = Some(n),
            },
            Long("lagging-subscriber") => args.lagging_subscriber = true,
            Long("drop-privileges") => args.drop_privileges = true,
            Long("event-rearm") => {
                args.event_rearm = Some(Duration::from_millis(parser.value()?.parse()?));
            }
            Long("help") | Short('h') => return Ok(None),
            _ => return Err(arg.unexpected()),
        }
    }
    args.interface = match (interface, queue, queues) {
        (Some(name), Some(queue), None) => Some((name, QueueSet::from(queue))),
        (Some(name), None, Some(queues)) => Some((name, queues)),
        (None, None, None) => None,
        (_, Some(_), Some(_)) => return Err("--queue and --queues exclude each other".into()),
        _ => return Err("--interface goes with --queue N or --queues SET".into()),
    };
    if args.listen.is_none() && args.demo.is_none() {
        return Err("--listen ADDR is required (or try --demo 3)".into());
    }
    Ok(Some(args))
}

/// Starts the zcrx runtime in the mode asked for.
fn build_runtime(args: &Args) -> tokio_zcrx::Result<Zcrx> {
    let mut builder = Zcrx::builder().mode(args.mode);
    if let Some((name, queues)) = &args.interface {
        builder = builder.interface_queues(name, queues.clone());
    }
    if let Some(interval) = args.event_rearm {
        builder = builder.event_rearm_interval(interval);
    }
    builder.build()
}

/// How a connection ended.
enum End {
    /// The peer closed it.
    Eof,
    /// It failed (e.g. reset by the peer).
    Error(std::io::Error),
    /// The sink stopped first.
    Shutdown,
    /// `--drop-every`: the sink dropped the stream after its first batch.
    Dropped,
}

/// What `consume` does besides counting: the soak-testing options.
#[derive(Clone)]
struct Rough {
    /// Batches go here to be held for a while by another task (`--hold`).
    holder: Option<tokio::sync::mpsc::UnboundedSender<(Instant, ZcBatch)>>,
    /// Drop the stream after its first batch (`--drop-every`).
    drop_after_first_batch: bool,
}

/// One finished connection.
struct Conn {
    peer: SocketAddr,
    bytes: u64,
    crc32: u32,
    seconds: f64,
    end: End,
}

/// Consumes one connection: counts and checksums every byte, and gives the buffers back a
/// batch at a time (one refill publication per batch).
async fn consume(
    mut stream: ZcStream,
    writer: ZcWriteHalf,
    peer: SocketAddr,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
    rough: Rough,
) -> Conn {
    let started = Instant::now();
    let mut crc = crc32fast::Hasher::new();
    let mut bytes = 0;
    let end = loop {
        let next = tokio::select! {
            next = stream.next_batch(64) => next,
            _ = stop.cancelled() => break End::Shutdown,
        };
        match next {
            Some(Ok(batch)) => {
                for buf in batch.iter() {
                    crc.update(buf);
                }
                bytes += batch.len_bytes() as u64;
                received.fetch_add(batch.len_bytes() as u64, Ordering::Relaxed);
                if let Some(holder) = &rough.holder {
                    // Held elsewhere; if the holder is gone, the batch just drops here.
                    let _ = holder.send((Instant::now(), batch));
                }
                // Otherwise `batch` drops here: its chunks go back to the kernel together.
                if rough.drop_after_first_batch {
                    break End::Dropped;
                }
            }
            Some(Err(error)) => break End::Error(error),
            None => break End::Eof,
        }
    };
    // Closes our side only now, so the client sees us finish reading. (A dropped stream
    // goes first: its socket closes with data unread, and the peer gets a reset.)
    drop(stream);
    drop(writer);
    Conn {
        // The client's own address, as it reports it: 127.0.0.1, not ::ffff:127.0.0.1.
        peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
        bytes,
        crc32: crc.finalize(),
        seconds: started.elapsed().as_secs_f64(),
        end,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_command_line("sink", USAGE_LINE, HELP, parse_args) {
        Ok(args) => args,
        Err(code) => return code,
    };
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE, // the demo found a problem (already reported)
        Err(error) => {
            eprintln!("sink: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the sink until a signal (or the demo's end); false if the demo found a problem.
async fn run(args: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    let mut signals = ShutdownSignals::new()?;
    let zcrx = build_runtime(args)?;
    let listen = args.listen.as_deref().unwrap_or("127.0.0.1:0");
    let listener = ZcListener::bind(&zcrx, listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    if args.drop_privileges {
        Zcrx::drop_privileges(DropPrivileges::all())
            .map_err(|e| format!("cannot drop privileges: {e}"))?;
        // On stderr: with --json, stdout holds only JSON lines.
        eprintln!("sink: every capability dropped");
    }
    let mut out = Reporter::new(args.json, args.demo.is_some());
    out.listening(addr, zcrx.mode_selection());

    let demo = args.demo.map(|duration| {
        let config = demo_config(addr, duration);
        out.demo_start(&config, duration);
        tokio::spawn(async move { load::run(&config).await })
    });
    let demo_done = async {
        match demo {
            Some(load) => load.await,
            None => pending().await,
        }
    };
    tokio::pin!(demo_done);

    let mut events = zcrx.subscribe();
    let mut events_open = true;
    let mut ticker = interval_at(
        Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    let holder = args.hold.map(|hold| {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        (sender, tokio::spawn(hold_batches(receiver, hold)))
    });
    let lagging = args
        .lagging_subscriber
        .then(|| tokio::spawn(lagging_subscriber(zcrx.subscribe(), stop.clone())));
    let mut accepted_count = 0u64;

    let mut demo_report = None;
    loop {
        tokio::select! {
            signal = signals.recv() => {
                out.note(&format!("{signal}, stopping"));
                break;
            }
            report = &mut demo_done => {
                demo_report = Some(report?);
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, writer, peer)) => {
                    out.tally.opened(Instant::now());
                    accepted_count += 1;
                    let rough = Rough {
                        holder: holder.as_ref().map(|(sender, _)| sender.clone()),
                        drop_after_first_batch: args
                            .drop_every
                            .is_some_and(|n| accepted_count.checked_rem(n) == Some(0)),
                    };
                    let (received, stop) = (Arc::clone(&received), stop.clone());
                    connections.spawn(consume(stream, writer, peer, received, stop, rough));
                }
                Err(error) => {
                    // E.g. out of file descriptors: wait a little instead of spinning.
                    out.note(&format!("accept failed: {error}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(finished) = connections.join_next() => out.conn(finished?),
            _ = ticker.tick() => out.tick(
                received.load(Ordering::Relaxed),
                &zcrx.stats(),
                &zcrx.queue_stats(),
            ),
            event = events.recv(), if events_open => match event {
                Ok(event) => out.event(&event),
                Err(RecvError::Lagged(missed)) => out.note(&format!("missed {missed} events")),
                Err(RecvError::Closed) => events_open = false,
            },
        }
    }

    // Stop: end the connections still open, and report them too.
    stop.cancel();
    while let Some(finished) = connections.join_next().await {
        out.conn(finished?);
    }
    if let Some((sender, task)) = holder {
        drop(sender);
        task.await?; // every held batch is back
    }
    if let Some(task) = lagging {
        out.events_missed = Some(task.await?);
    }
    out.summary(zcrx.mode_selection(), &zcrx.stats(), &zcrx.queue_stats());
    zcrx.shutdown().await;
    Ok(match demo_report {
        Some(report) => out.demo_end(&report),
        None => true,
    })
}

/// Keeps each batch `hold` after it was read, then drops it (`--hold`): the buffers outlive
/// the task, and often the stream, that read them. Ends when every sender is gone.
async fn hold_batches(
    mut batches: tokio::sync::mpsc::UnboundedReceiver<(Instant, ZcBatch)>,
    hold: Duration,
) {
    while let Some((read_at, batch)) = batches.recv().await {
        tokio::time::sleep_until(read_at + hold).await;
        drop(batch);
    }
}

/// An event subscriber that reads one event every 100 ms (`--lagging-subscriber`), so a
/// burst of events overtakes it; returns how many events it missed.
async fn lagging_subscriber(
    mut events: tokio::sync::broadcast::Receiver<Event>,
    stop: CancellationToken,
) -> u64 {
    let mut missed = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return missed,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        match events.try_recv() {
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => missed += n,
            Err(tokio::sync::broadcast::error::TryRecvError::Closed) => return missed,
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Empty) => {}
        }
    }
}

/// The demo's load: connections to our own address for `duration`.
fn demo_config(mut addr: SocketAddr, duration: Duration) -> LoadConfig {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    LoadConfig {
        addr,
        conns: DEMO_CONNS,
        budget: Budget::Time(duration),
        seed: 1,
        max_write: 64 << 10,
        verify_echo: false,
    }
}

/// Counters for the summary.
#[derive(Default)]
struct Tally {
    conns: u64,
    open: u64,
    bytes: u64,
    /// From the first connection to the end of the last one: the time throughput is over.
    busy_from: Option<Instant>,
    busy_until: Option<Instant>,
    /// What each finished connection received, by peer: only for the demo's check, as a
    /// long-running sink would collect them forever.
    by_peer: Option<HashMap<SocketAddr, (u64, u32)>>,
    events: HashMap<EventKind, u64>,
}

impl Tally {
    fn opened(&mut self, now: Instant) {
        self.conns += 1;
        self.open += 1;
        self.busy_from.get_or_insert(now);
    }

    fn seconds(&self) -> f64 {
        match (self.busy_from, self.busy_until) {
            (Some(from), Some(until)) => (until - from).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// Counts what happens and prints it, as text or as JSON lines.
struct Reporter {
    json: bool,
    started: Instant,
    /// Bytes received at the last tick, and when that was.
    last_tick: (u64, Instant),
    /// Per event kind: when a line was last printed, and how many came since (text only,
    /// where a steady copy fallback would otherwise print ten lines a second).
    event_lines: HashMap<EventKind, (Instant, u64)>,
    tally: Tally,
    /// Events the `--lagging-subscriber` missed, when there is one.
    events_missed: Option<u64>,
    /// Each queue's bytes at the last tick.
    last_queue_bytes: HashMap<u32, u64>,
}

impl Reporter {
    fn new(json: bool, demo: bool) -> Reporter {
        let now = Instant::now();
        Reporter {
            json,
            started: now,
            last_tick: (0, now),
            event_lines: HashMap::new(),
            tally: Tally {
                by_peer: demo.then(HashMap::new),
                ..Tally::default()
            },
            events_missed: None,
            last_queue_bytes: HashMap::new(),
        }
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn listening(&self, addr: SocketAddr, selection: &ModeSelection) {
        if self.json {
            let refused: serde_json::Map<String, Value> = selection
                .refused
                .iter()
                .map(|(mode, reason)| (mode.to_string(), json!(reason)))
                .collect();
            let line = json!({
                "type": "listening",
                "addr": addr.to_string(),
                "mode": selection.chosen.to_string(),
                "zero_copy": selection.chosen.is_zero_copy(),
                "refused": refused,
                "queues_bound": selection.queues_bound,
                "queues_refused": selection
                    .queues_refused
                    .iter()
                    .map(|(queue, reason)| json!({"queue": queue, "reason": reason}))
                    .collect::<Vec<_>>(),
            });
            say!("{line}");
            return;
        }
        say!("sink: listening on {addr}");
        let how = if selection.chosen.is_zero_copy() {
            "zero copy for traffic steered to the queue"
        } else {
            "every received byte is copied"
        };
        say!("mode: {} ({how})", selection.chosen);
        for (mode, reason) in &selection.refused {
            say!("  not {mode}: {reason}");
        }
        if selection.queues_bound.len() > 1 || !selection.queues_refused.is_empty() {
            let bound: Vec<String> = selection.queues_bound.iter().map(u32::to_string).collect();
            say!("  queues bound: {}", bound.join(", "));
        }
        for (queue, reason) in &selection.queues_refused {
            say!("  queue {queue} not bound: {reason}");
        }
    }

    fn demo_start(&self, config: &LoadConfig, duration: Duration) {
        if !self.json {
            say!(
                "demo: {} connections send to {} for {:.1} s (writes of 1..={} bytes)",
                config.conns,
                config.addr,
                duration.as_secs_f64(),
                config.max_write
            );
        }
    }

    /// A remark for people (stderr in JSON mode, to keep stdout parseable).
    fn note(&self, text: &str) {
        if self.json {
            eprintln!("sink: {text}");
        } else {
            say!("sink: {text}");
        }
    }

    fn tick(&mut self, received: u64, stats: &Stats, queues: &[QueueStats]) {
        let (last, at) = self.last_tick;
        let now = Instant::now();
        self.last_tick = (received, now);
        let bytes = received - last;
        let seconds = (now - at).as_secs_f64();
        let rate = gbps(bytes, seconds);
        // Each queue's bytes since the last tick (the runtime's count: what its driver
        // delivered).
        let per_queue: Vec<(&QueueStats, u64)> = queues
            .iter()
            .map(|queue| {
                let last = self.last_queue_bytes.insert(queue.queue, queue.stats.bytes);
                (queue, queue.stats.bytes - last.unwrap_or(0))
            })
            .collect();
        if self.json {
            let line = json!({
                "type": "tick",
                "t": self.elapsed(),
                "bytes": bytes,
                "gbps": rate,
                "total_bytes": received,
                "open": self.tally.open,
                "queues": per_queue
                    .iter()
                    .map(|(queue, bytes)| {
                        let mut line = queue_json(queue);
                        line["bytes"] = json!(bytes);
                        line["gbps"] = json!(gbps(*bytes, seconds));
                        line
                    })
                    .collect::<Vec<_>>(),
            });
            say!("{}", with_stats(line, stats));
        } else if bytes > 0 || self.tally.open > 0 {
            say!(
                "{:>6.1} s {:>8.2} Gbit/s  {:>3} open  {:>11} received  {} buffers held",
                self.elapsed(),
                rate,
                self.tally.open,
                human_bytes(received),
                stats.buffers_outstanding
            );
            if queues.len() > 1 {
                let line: Vec<String> = per_queue
                    .iter()
                    .map(|(queue, bytes)| {
                        format!(
                            "q{} {:.2} Gbit/s copied {}",
                            queue.queue,
                            gbps(*bytes, seconds),
                            queue
                                .stats
                                .copy_bytes
                                .map_or_else(|| "?".to_string(), human_bytes)
                        )
                    })
                    .collect();
                say!(
                    "         {}  unmatched {}",
                    line.join("  "),
                    stats.unmatched_connections
                );
            }
        }
    }

    fn event(&mut self, event: &Event) {
        *self.tally.events.entry(event.kind).or_default() += 1;
        if self.json {
            let line = json!({
                "type": "event",
                "t": self.elapsed(),
                "kind": event.kind.to_string(),
            });
            say!("{}", with_stats(line, &event.stats));
            return;
        }
        let (now, elapsed) = (Instant::now(), self.elapsed());
        let (printed, unprinted) = self
            .event_lines
            .entry(event.kind)
            .or_insert((now - Duration::from_secs(3600), 0));
        *unprinted += 1;
        if now - *printed < Duration::from_secs(1) {
            return;
        }
        let repeats = match *unprinted {
            1 => String::new(),
            n => format!(" x{n} since the last line"),
        };
        say!(
            "{elapsed:>6.1} s event: {}{repeats} ({})",
            event.kind,
            event.stats
        );
        (*printed, *unprinted) = (now, 0);
    }

    fn conn(&mut self, conn: Conn) {
        let tally = &mut self.tally;
        tally.open -= 1;
        tally.bytes += conn.bytes;
        tally.busy_until = Some(Instant::now());
        if let Some(by_peer) = &mut tally.by_peer {
            by_peer.insert(conn.peer, (conn.bytes, conn.crc32));
        }
        let (end, error) = match &conn.end {
            End::Eof => ("eof", None),
            End::Error(error) => ("error", Some(error.to_string())),
            End::Shutdown => ("shutdown", None),
            End::Dropped => ("dropped", None),
        };
        if self.json {
            let mut line = json!({
                "type": "conn",
                "peer": conn.peer.to_string(),
                "bytes": conn.bytes,
                "crc32": conn.crc32,
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
            Some(error) => format!("failed: {error}"),
            None if end == "shutdown" => "cut at shutdown".to_string(),
            None if end == "dropped" => "dropped after its first batch".to_string(),
            None => "closed".to_string(),
        };
        say!(
            "{:>6.1} s conn {} {how}: {} bytes ({}) in {:.2} s, crc32 {}",
            self.elapsed(),
            conn.peer,
            conn.bytes,
            human_bytes(conn.bytes),
            conn.seconds,
            conn.crc32
        );
    }

    fn summary(&mut self, selection: &ModeSelection, stats: &Stats, queues: &[QueueStats]) {
        let tally = &self.tally;
        let seconds = tally.seconds();
        let rate = gbps(tally.bytes, seconds);
        if self.json {
            let events: serde_json::Map<String, Value> = tally
                .events
                .iter()
                .map(|(kind, count)| (kind.to_string(), json!(count)))
                .collect();
            let line = json!({
                "type": "summary",
                "mode": selection.chosen.to_string(),
                "conns": tally.conns,
                "bytes": tally.bytes,
                "seconds": seconds,
                "gbps": rate,
                "events": events,
                "events_missed": self.events_missed,
                "queues": queues.iter().map(queue_json).collect::<Vec<_>>(),
            });
            say!("{}", with_stats(line, stats));
            return;
        }
        say!(
            "summary: {} connections, {} in {seconds:.2} s: {rate:.2} Gbit/s, mode {}",
            tally.conns,
            human_bytes(tally.bytes),
            selection.chosen
        );
        match (stats.copy_bytes, stats.copy_count) {
            (Some(bytes), Some(count)) => say!(
                "  copied: {} in {count} fragments ({:.0}% of what the runtime received)",
                human_bytes(bytes),
                100.0 * bytes as f64 / stats.bytes.max(1) as f64
            ),
            _ => say!("  copied: unknown (this kernel has no zcrx copy statistics)"),
        }
        say!("  runtime: {stats}");
        if queues.len() > 1 {
            for queue in queues {
                say!(
                    "  queue {} (NAPI id {}): {}",
                    queue.queue,
                    queue
                        .napi_id
                        .map_or_else(|| "?".to_string(), |id| id.to_string()),
                    queue.stats
                );
            }
            say!(
                "  unmatched connections (copy mode): {}",
                stats.unmatched_connections
            );
        }
        let mut events: Vec<_> = tally.events.iter().collect();
        events.sort_by_key(|(kind, _)| kind.to_string());
        for (kind, count) in events {
            say!("  events: {kind} x{count}");
        }
        if let Some(missed) = self.events_missed {
            say!("  the lagging subscriber missed {missed} events");
        }
    }

    /// Checks the demo's load against what the sink received; true if everything matched.
    fn demo_end(&self, report: &LoadReport) -> bool {
        let mut problems = Vec::new();
        for conn in &report.conns {
            let received = conn
                .local
                .and_then(|local| self.tally.by_peer.as_ref()?.get(&local));
            match (&conn.error, received) {
                (Some(error), _) => problems.push(format!("connection {}: {error}", conn.index)),
                (None, Some(&(bytes, crc32))) if (bytes, crc32) == (conn.bytes, conn.crc32) => {}
                (None, Some(&(bytes, crc32))) => problems.push(format!(
                    "connection {}: sent {} bytes with crc32 {}, received {bytes} with {crc32}",
                    conn.index, conn.bytes, conn.crc32
                )),
                (None, None) => problems.push(format!("connection {}: never seen", conn.index)),
            }
        }
        if self.json {
            let line = json!({
                "type": "demo",
                "sent": report.bytes(),
                "send_gbps": report.gbps(),
                "conns": report.conns.len(),
                "problems": problems,
            });
            say!("{line}");
        } else if problems.is_empty() {
            say!(
                "demo: OK, the CRC-32 of all {} connections matches what was sent ({})",
                report.conns.len(),
                human_bytes(report.bytes())
            );
        } else {
            for problem in &problems {
                say!("demo: FAILED: {problem}");
            }
        }
        problems.is_empty()
    }
}

/// One queue's statistics as JSON.
fn queue_json(queue: &QueueStats) -> Value {
    json!({
        "queue": queue.queue,
        "napi_id": queue.napi_id,
        "runtime_bytes": queue.stats.bytes,
        "chunks": queue.stats.chunks,
        "copy_count": queue.stats.copy_count,
        "copy_bytes": queue.stats.copy_bytes,
        "buffers_outstanding": queue.stats.buffers_outstanding,
    })
}

/// Adds the runtime's statistics to a JSON object, as top-level fields.
fn with_stats(mut line: Value, stats: &Stats) -> Value {
    let fields = json!({
        "copy_count": stats.copy_count,
        "copy_bytes": stats.copy_bytes,
        "runtime_bytes": stats.bytes,
        "chunks": stats.chunks,
        "buffers_outstanding": stats.buffers_outstanding,
        "resubmits_cq_overflow": stats.resubmits_cq_overflow,
        "resubmits_area_exhausted": stats.resubmits_area_exhausted,
        "kernel_events": stats.kernel_events,
        "unmatched_connections": stats.unmatched_connections,
    });
    if let (Value::Object(line), Value::Object(fields)) = (&mut line, fields) {
        line.extend(fields);
    }
    line
}
