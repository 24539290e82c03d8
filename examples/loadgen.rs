//! A TCP load generator for the echo and sink examples (and for tests).
//!
//! ```text
//! cargo run --release --example loadgen -- --connect ADDR [--conns N] [--bytes B | --duration S]
//!     [--seed S] [--max-write W] [--verify-echo] [--netns PATH]
//! ```
//!
//! Opens N connections to ADDR at once. Each sends its own payload, reproducible from
//! (seed, connection index), in writes of random size (1..=W bytes, also seeded), then shuts
//! down its write side and reads until the server closes. With `--verify-echo` it checks
//! that the server sent back exactly what it received, byte for byte, reading concurrently
//! with writing.
//!
//! It prints one JSON line: `bytes`, `seconds`, `gbps`, `errors`, and per connection its
//! local address (the server's `peer`), `bytes` and `crc32` (IEEE CRC-32 as zlib computes
//! it), so a sink's per-connection checksums can be compared. It exits with status 1 if any
//! connection failed or an echo differed. `--netns` first moves the process into a network
//! namespace, e.g. `/run/netns/nsb` in the test guest.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Duration;

use tokio_zcrx_examples::load::{self, Budget, LoadConfig};
use tokio_zcrx_examples::{parse_bytes, parse_command_line};

const USAGE_LINE: &str = "usage: loadgen --connect ADDR [--conns N] [--bytes B | --duration S] \
                          [--seed S] [--max-write W] [--verify-echo] [--netns PATH]";

const HELP: &str = "\
options:
  --connect ADDR    the server, e.g. 127.0.0.1:9000 or [::1]:9000 (required)
  --conns N         concurrent connections (default 1)
  --bytes B         bytes each connection sends, with an optional K/M/G/T suffix
                    (powers of 1024; default 64M)
  --duration S      instead of --bytes: each connection sends for S seconds
  --seed S          seed of the payloads and write sizes (default 1); connection i
                    always sends the same bytes for the same seed
  --max-write W     largest write; each is 1..=W bytes, at random (default 64K)
  --verify-echo     check that the server echoes every byte, in order
  --netns PATH      enter this network namespace first (e.g. /run/netns/nsb)
  -h, --help        print this help

Prints one JSON line: {\"bytes\",\"seconds\",\"gbps\",\"errors\",\"echoed\",...,
\"conns\":[{\"index\",\"local\",\"bytes\",\"crc32\",\"echoed\",\"error\"}]}.
Exit status: 0 if every connection succeeded, 1 otherwise, 2 for a bad command line.";

struct Args {
    connect: String,
    netns: Option<String>,
    config: LoadConfig,
}

/// The command line, or `None` when help was asked for.
fn parse_args() -> Result<Option<Args>, lexopt::Error> {
    use lexopt::prelude::*;

    let mut connect = None;
    let mut netns = None;
    let mut config = LoadConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)), // resolved from --connect later
        conns: 1,
        budget: Budget::Bytes(64 << 20),
        seed: 1,
        max_write: 64 << 10,
        verify_echo: false,
    };
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("connect") | Short('c') => connect = Some(parser.value()?.string()?),
            Long("conns") | Short('n') => config.conns = parser.value()?.parse()?,
            Long("bytes") | Short('b') => {
                config.budget = Budget::Bytes(parser.value()?.parse_with(parse_bytes)?);
            }
            Long("duration") | Short('d') => {
                let seconds: f64 = parser.value()?.parse()?;
                let duration = Duration::try_from_secs_f64(seconds)
                    .map_err(|_| format!("--duration {seconds}: not a number of seconds"))?;
                config.budget = Budget::Time(duration);
            }
            Long("seed") => config.seed = parser.value()?.parse()?,
            Long("max-write") => {
                let max = parser.value()?.parse_with(parse_bytes)?;
                config.max_write = match usize::try_from(max) {
                    Ok(max) if max > 0 && max <= 1 << 30 => max,
                    _ => return Err("--max-write must be between 1 and 1G".into()),
                };
            }
            Long("verify-echo") => config.verify_echo = true,
            Long("netns") => netns = Some(parser.value()?.string()?),
            Long("help") | Short('h') => return Ok(None),
            _ => return Err(arg.unexpected()),
        }
    }
    let Some(connect) = connect else {
        return Err("--connect ADDR is required".into());
    };
    Ok(Some(Args {
        connect,
        netns,
        config,
    }))
}

/// Moves the calling thread into the network namespace at `path`.
///
/// A network namespace belongs to a thread, and a new thread starts in its creator's: called
/// before the Tokio runtime exists, it moves every thread the runtime will start.
fn enter_netns(path: &str) -> io::Result<()> {
    let namespace = File::open(path)?;
    // SAFETY: setns only reads the descriptor, which `namespace` keeps open for the call.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = match parse_command_line("loadgen", USAGE_LINE, HELP, parse_args) {
        Ok(args) => args,
        Err(code) => return code,
    };
    if let Some(path) = &args.netns {
        if let Err(error) = enter_netns(path) {
            eprintln!("loadgen: cannot enter network namespace {path}: {error}");
            return ExitCode::FAILURE;
        }
    }
    // Resolved here, after setns, so names resolve as the namespace sees them.
    match args.connect.to_socket_addrs().map(|mut addrs| addrs.next()) {
        Ok(Some(addr)) => args.config.addr = addr,
        Ok(None) => {
            eprintln!("loadgen: {} resolves to no address", args.connect);
            return ExitCode::from(2);
        }
        Err(error) => {
            eprintln!("loadgen: cannot resolve {}: {error}", args.connect);
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadgen: cannot start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(load::run(&args.config));
    for conn in &report.conns {
        if let Some(error) = &conn.error {
            eprintln!("loadgen: connection {}: {error}", conn.index);
        }
    }
    println!("{}", report.to_json(&args.config));
    if report.errors() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
