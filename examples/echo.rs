//! An echo server on tokio-zcrx: every byte received is written back on the same connection.
//!
//! ```text
//! cargo run --release --example echo -- --listen ADDR [--mode auto|nic|nodev|copy]
//!     [--interface IF (--queue N | --queues all|A-B|A,B,...)]
//! ```
//!
//! Received bytes arrive as `ZcBuf`s (zero copy in `nic` mode) and are written back straight
//! from them. When a client shuts down its write side, the echo finishes writing what it
//! received, then shuts down its own: half-close works as TCP intends. Any number of
//! connections run at once, one task each. SIGINT or SIGTERM stops it. Pair it with
//! `loadgen --verify-echo`.
//!
//! `--drop-privileges` gives up every capability (`CAP_NET_ADMIN` included) once the runtime
//! is registered and the listener bound: the server runs the rest of its life without them.
//!
//! `--stats` adds a line `stats: {JSON}` once a second (connections served and open, and the
//! runtime's statistics, e.g. `buffers_outstanding`), for soak tests (`cargo xtask soak`).

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio_zcrx::{
    DropPrivileges, Mode, QueueSet, ZcBatch, ZcListener, ZcStream, ZcWriteHalf, Zcrx,
};
use tokio_zcrx_examples::{human_bytes, parse_command_line, say, ShutdownSignals};

const USAGE_LINE: &str = "usage: echo --listen ADDR [--mode auto|nic|nodev|copy] \
                          [--interface IF --queue N|--queues SET] [--stats] \
                          [--drop-privileges]";

const HELP: &str = "\
options:
  --listen ADDR       address to listen on, e.g. [::]:9000 or 127.0.0.1:9000 (required)
  --mode MODE         auto (default): the best that works here, nic, then nodev, then copy
                      nic: zero copy on --interface's rx --queue (Linux 6.15+, capable NIC)
                      nodev: the kernel's device-less zcrx mode (Linux 7.1+), copies
                      copy: plain Tokio reads into a buffer pool, works everywhere
  --interface IF      the NIC for nic mode (needs --queue or --queues)
  --queue N           its rx queue, steered to this server (docs/nic-setup.md)
  --queues SET        several rx queues, a driver each: all, A-B or A,B,...; connections
                      go to their queue's driver (others are copied: `unmatched`)
  --stats             print `stats: {JSON}` once a second: served, open, failed and the
                      runtime's statistics (bytes, chunks, buffers_outstanding, ...)
  --drop-privileges   once registered and listening, give up every capability for the
                      rest of the run (Zcrx::drop_privileges; docs/nic-setup.md, Security)
  -h, --help          print this help";

struct Args {
    listen: String,
    mode: Mode,
    interface: Option<(String, QueueSet)>,
    stats: bool,
    drop_privileges: bool,
}

/// The command line, or `None` when help was asked for.
fn parse_args() -> Result<Option<Args>, lexopt::Error> {
    use lexopt::prelude::*;

    let (mut listen, mut mode, mut interface, mut queue) = (None, Mode::Auto, None, None);
    let mut queues = None;
    let (mut stats, mut drop_privileges) = (false, false);
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("listen") | Short('l') => listen = Some(parser.value()?.string()?),
            Long("mode") | Short('m') => mode = parser.value()?.parse()?,
            Long("interface") | Short('i') => interface = Some(parser.value()?.string()?),
            Long("queue") | Short('q') => queue = Some(parser.value()?.parse::<u32>()?),
            Long("queues") => queues = Some(parser.value()?.parse::<QueueSet>()?),
            Long("stats") => stats = true,
            Long("drop-privileges") => drop_privileges = true,
            Long("help") | Short('h') => return Ok(None),
            _ => return Err(arg.unexpected()),
        }
    }
    let interface = match (interface, queue, queues) {
        (Some(name), Some(queue), None) => Some((name, QueueSet::from(queue))),
        (Some(name), None, Some(queues)) => Some((name, queues)),
        (None, None, None) => None,
        (_, Some(_), Some(_)) => return Err("--queue and --queues exclude each other".into()),
        _ => return Err("--interface goes with --queue N or --queues SET".into()),
    };
    let listen = listen.ok_or("--listen ADDR is required")?;
    Ok(Some(Args {
        listen,
        mode,
        interface,
        stats,
        drop_privileges,
    }))
}

/// Starts the zcrx runtime in the mode asked for.
fn build_runtime(args: &Args) -> tokio_zcrx::Result<Zcrx> {
    let mut builder = Zcrx::builder().mode(args.mode);
    if let Some((name, queues)) = &args.interface {
        builder = builder.interface_queues(name, queues.clone());
    }
    builder.build()
}

/// Echoes one connection until the client has finished sending, then half-closes.
async fn echo(mut stream: ZcStream, mut writer: ZcWriteHalf) -> io::Result<u64> {
    let mut echoed = 0;
    // One batch for the connection's life: `recv_many` refills it, `clear` empties it.
    let mut batch = ZcBatch::with_capacity(64);
    while stream.recv_many(&mut batch, 64).await? > 0 {
        // Every buffer in order, with as few `writev` calls as the socket allows.
        writer.write_all_buffers(&batch).await?;
        echoed += batch.len_bytes() as u64;
        // The chunks go back to the kernel together.
        batch.clear();
    }
    // End of stream: the client shut down its write side. Everything is written; say so.
    writer.shutdown().await?;
    Ok(echoed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_command_line("echo", USAGE_LINE, HELP, parse_args) {
        Ok(args) => args,
        Err(code) => return code,
    };
    match serve(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("echo: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut signals = ShutdownSignals::new()?;
    let zcrx = build_runtime(args)?;
    let listener = ZcListener::bind(&zcrx, &args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    say!("echo: listening on {}", listener.local_addr()?);
    say!("mode: {}", zcrx.mode_selection());
    if args.drop_privileges {
        Zcrx::drop_privileges(DropPrivileges::all())
            .map_err(|e| format!("cannot drop privileges: {e}"))?;
        say!("echo: every capability dropped");
    }

    let mut connections: JoinSet<(SocketAddr, io::Result<u64>)> = JoinSet::new();
    let (mut served, mut total, mut failed) = (0u64, 0u64, 0u64);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            signal = signals.recv() => {
                say!("echo: {signal}, stopping");
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, writer, peer)) => {
                    connections.spawn(async move { (peer, echo(stream, writer).await) });
                }
                Err(error) => {
                    // E.g. out of file descriptors: wait a little instead of spinning.
                    eprintln!("echo: accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(finished) = connections.join_next() => {
                let (peer, result) = finished?;
                served += 1;
                match result {
                    Ok(bytes) => {
                        total += bytes;
                        say!("{peer}: echoed {bytes} bytes");
                    }
                    Err(error) => {
                        failed += 1;
                        eprintln!("{peer}: {error}");
                    }
                }
            }
            _ = ticker.tick(), if args.stats => {
                let stats = zcrx.stats();
                let line = serde_json::json!({
                    "served": served,
                    "failed": failed,
                    "open": connections.len(),
                    "bytes": total,
                    "runtime_bytes": stats.bytes,
                    "chunks": stats.chunks,
                    "buffers_outstanding": stats.buffers_outstanding,
                    "copy_bytes": stats.copy_bytes,
                    "unmatched_connections": stats.unmatched_connections,
                    "queues": zcrx.queue_stats().iter().map(|queue| serde_json::json!({
                        "queue": queue.queue,
                        "napi_id": queue.napi_id,
                        "runtime_bytes": queue.stats.bytes,
                        "copy_bytes": queue.stats.copy_bytes,
                        "buffers_outstanding": queue.stats.buffers_outstanding,
                    })).collect::<Vec<_>>(),
                });
                say!("stats: {line}");
            }
        }
    }
    let open = connections.len();
    connections.shutdown().await; // ends the connections still open
    say!(
        "echo: {served} connections served ({open} still open at exit), {} echoed; {}",
        human_bytes(total),
        zcrx.stats()
    );
    zcrx.shutdown().await;
    Ok(())
}
