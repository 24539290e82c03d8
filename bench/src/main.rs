//! `zcrx-bench`: tokio-zcrx side by side with tokio, tokio-uring and blocking reads, on the
//! same loopback sender, plus a connection-scaling run. See docs/benchmarks.md.
//!
//! Every measured run starts a fresh child process (this binary, hidden `__child`
//! subcommand) for the receiver, so its getrusage and peak RSS are its own; the parent is the
//! sender and collects the child's results as JSON lines.

mod child;
mod plot;
mod protocol;
mod receive;
mod runner;
mod scaling;
mod stats;
mod system;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::protocol::Receiver;
use crate::runner::Launcher;
use crate::system::{parse_size, Machine};

const HELP: &str = "\
zcrx-bench: tokio-zcrx receive benchmark (run it with `cargo xtask bench [OPTIONS]`)

Usage: zcrx-bench [--quick] [--scaling | --all] [OPTIONS]

Modes:
  (default)            receive comparison: every receiver at 1, 16 and 256 connections
  --scaling            connection scaling: 10,000 idle + 4 busy connections, tokio-zcrx
                       against tokio with a 64 KiB buffer per connection
  --all                both
  --quick              a short smoke run: 256 MiB per run, 1 repetition, 1,000 idle
                       connections; results go to target/zcrx-bench unless --out is given

Receive comparison:
  --reps N             repetitions of every configuration (default 3)
  --warmup N           unmeasured runs (tokio-read) before each connection count (default 1)
  --conns LIST         connection counts (default 1,16,256)
  --bytes SIZE         bytes per run with up to 16 connections (default 4G)
  --bytes-many SIZE    bytes per run with more than 16 connections (default 2G)
  --receivers LIST     tokio-zcrx,tokio-read,tokio-uring,std-threads (default: all)
  --uring-threads N    tokio-uring runtimes, one thread each (default: number of CPUs)

Scaling:
  --idle N             idle connections (default 10000)
  --busy N             busy connections (default 4)
  --busy-bytes SIZE    bytes the busy connections send in all (default 2G)
  --hello SIZE         bytes each idle connection sends once before going idle (default 64K)

Proxy benchmark plot:
  --plot-proxy FILE    draw FILE (the JSON of `proxy-throughput --results`, e.g.
                       docs/bench/proxy.json) as a PNG beside it (docs/bench/proxy.png)

Output and debugging:
  --out DIR            where receive.{txt,json,png} and scaling.{txt,json,png} go
                       (default docs/bench, or target/zcrx-bench with --quick)
  --wrap CMD           run each receiver child under CMD, split on spaces, e.g.
                       --wrap 'valgrind --tool=callgrind' (use a small --bytes)
  --timeout S          seconds a receiver child may take (default: from the bytes)
  --pin                sender threads on one CPU, the receiver process on another
                       (default: both share every CPU, as in docs/perf-notes)
  -h, --help           this text

SIZE takes K, M, G suffixes (powers of 1024).";

/// The command line, resolved.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub receive: bool,
    pub scaling: bool,
    pub reps: usize,
    /// Unmeasured runs before each connection count's repetitions.
    pub warmup: usize,
    pub conns: Vec<usize>,
    pub bytes: u64,
    pub bytes_many: u64,
    pub receivers: Vec<Receiver>,
    pub uring_threads: usize,
    pub idle: usize,
    pub busy: usize,
    pub busy_bytes: u64,
    pub hello: u64,
    pub out: PathBuf,
    pub wrap: Vec<String>,
    pub timeout_s: Option<u64>,
    /// `--pin`: sender on the first allowed CPU, receiver on the second.
    pub pin: bool,
    /// Set by `--pin` once the CPUs are known.
    pub receiver_cpu: Option<usize>,
}

impl Options {
    /// Bytes per run at `conns` connections.
    pub fn bytes_for(&self, conns: usize) -> u64 {
        if conns > 16 {
            self.bytes_many
        } else {
            self.bytes
        }
    }

    /// How long a child may take to receive `bytes`: generous, since a stuck run only costs
    /// this once, and a wrapper such as valgrind slows everything down.
    pub fn timeout_for(&self, bytes: u64) -> u64 {
        self.timeout_s.unwrap_or(60 + bytes / (50 << 20))
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ sits in the workspace")
        .to_path_buf()
}

fn parse_list<T>(text: &str, what: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let items: Vec<T> = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| parse(s.trim()))
        .collect::<Result<_>>()
        .with_context(|| format!("bad {what} list {text:?}"))?;
    if items.is_empty() {
        bail!("the {what} list is empty");
    }
    Ok(items)
}

fn parse_args(args: Vec<String>) -> Result<Option<Options>> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut quick = false;
    let (mut receive, mut scaling) = (true, false);
    let mut reps = None;
    let mut warmup = 1;
    let mut conns = vec![1, 16, 256];
    let (mut bytes, mut bytes_many) = (None, None);
    let mut receivers = Receiver::ALL.to_vec();
    let mut uring_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut idle, mut busy, mut busy_bytes, mut hello) = (None, 4, None, 64 << 10);
    let mut out = None;
    let mut wrap = Vec::new();
    let mut timeout_s = None;
    let mut pin = false;
    fn value<T: std::str::FromStr>(parser: &mut lexopt::Parser) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let text = parser.value()?.string()?;
        text.parse().map_err(|e| anyhow::anyhow!("{text:?}: {e}"))
    }
    let size =
        |parser: &mut lexopt::Parser| -> Result<u64> { parse_size(&parser.value()?.string()?) };
    while let Some(arg) = parser.next()? {
        match arg {
            Long("quick") => quick = true,
            Long("scaling") => (receive, scaling) = (false, true),
            Long("all") => (receive, scaling) = (true, true),
            Long("reps") => reps = Some(value::<usize>(&mut parser)?.max(1)),
            Long("warmup") => warmup = value(&mut parser)?,
            Long("conns") => {
                conns = parse_list(&parser.value()?.string()?, "connection count", |s| {
                    let n: usize = s
                        .parse()
                        .with_context(|| format!("{s:?} is not a number"))?;
                    if n == 0 {
                        bail!("0 connections");
                    }
                    Ok(n)
                })?
            }
            Long("bytes") => bytes = Some(size(&mut parser)?),
            Long("bytes-many") => bytes_many = Some(size(&mut parser)?),
            Long("receivers") => {
                receivers = parse_list(&parser.value()?.string()?, "receiver", |s| s.parse())?
            }
            Long("uring-threads") => uring_threads = value::<usize>(&mut parser)?.max(1),
            Long("idle") => idle = Some(value(&mut parser)?),
            Long("busy") => busy = value::<usize>(&mut parser)?.max(1),
            Long("busy-bytes") => busy_bytes = Some(size(&mut parser)?),
            Long("hello") => hello = size(&mut parser)?,
            Long("out") => out = Some(PathBuf::from(parser.value()?)),
            Long("wrap") => {
                wrap = parser
                    .value()?
                    .string()?
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            }
            Long("timeout") => timeout_s = Some(value(&mut parser)?),
            Long("pin") => pin = true,
            Short('h') | Long("help") => return Ok(None),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let small = 256 << 20;
    Ok(Some(Options {
        quick,
        receive,
        scaling,
        reps: reps.unwrap_or(if quick { 1 } else { 3 }),
        warmup,
        conns,
        bytes: bytes.unwrap_or(if quick { small } else { 4 << 30 }),
        bytes_many: bytes_many.unwrap_or(if quick { small } else { 2 << 30 }),
        receivers,
        uring_threads,
        idle: idle.unwrap_or(if quick { 1000 } else { 10_000 }),
        busy,
        busy_bytes: busy_bytes.unwrap_or(if quick { small } else { 2 << 30 }),
        hello,
        out: out.unwrap_or_else(|| {
            if quick {
                workspace_root().join("target/zcrx-bench")
            } else {
                workspace_root().join("docs/bench")
            }
        }),
        wrap,
        timeout_s,
        pin,
        receiver_cpu: None,
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__child") {
        let Some(spec) = args.get(1) else {
            eprintln!("zcrx-bench __child: missing spec");
            return ExitCode::from(2);
        };
        return child::main(spec);
    }
    if args.first().map(String::as_str) == Some("--plot-proxy") {
        let Some(file) = args.get(1) else {
            eprintln!("zcrx-bench --plot-proxy: missing FILE");
            return ExitCode::from(2);
        };
        return match plot_proxy(std::path::Path::new(file)) {
            Ok(png) => {
                println!("drew {}", png.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("zcrx-bench --plot-proxy: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match parse_args(args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("zcrx-bench: {e:#}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zcrx-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Draws the proxy benchmark's results file as a PNG beside it; returns the PNG's path.
fn plot_proxy(file: &std::path::Path) -> Result<PathBuf> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let results: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let png = file.with_extension("png");
    plot::proxy(&png, &results)?;
    Ok(png)
}

fn run(options: &Options) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "zcrx-bench: warning: a debug build; run `cargo xtask bench` (release) for numbers"
        );
    }
    // Before --pin narrows this process to one CPU.
    let machine = Machine::detect();
    let mut options = options.clone();
    if options.pin {
        let cpus = system::allowed_cpus()?;
        let [sender, receiver, ..] = cpus[..] else {
            bail!("--pin needs two CPUs; this process may use {cpus:?}");
        };
        // This thread starts the sender threads, which inherit it.
        system::pin_to_cpu(sender)?;
        options.receiver_cpu = Some(receiver);
        eprintln!("zcrx-bench: sender pinned to CPU {sender}, receivers to CPU {receiver}");
    }
    let launcher = Launcher {
        wrapper: options.wrap.clone(),
    };
    // The 256-connection runs hold 256 sockets here and 256 threads; the scaling run raises
    // the limit further itself.
    system::raise_nofile(4096)?;
    if options.receive {
        receive::run(&options, &machine, &launcher)?;
    }
    if options.scaling {
        scaling::run(&options, &machine, &launcher)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Options {
        parse_args(args.iter().map(|s| s.to_string()).collect())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn defaults_and_quick() {
        let full = parse(&[]);
        assert!(full.receive && !full.scaling);
        assert_eq!(full.reps, 3);
        assert_eq!(full.bytes_for(16), 4 << 30);
        assert_eq!(full.bytes_for(256), 2 << 30);
        assert_eq!(full.idle, 10_000);
        assert!(full.out.ends_with("docs/bench"));
        let quick = parse(&["--quick", "--all"]);
        assert!(quick.receive && quick.scaling);
        assert_eq!(quick.reps, 1);
        assert_eq!(quick.bytes_for(1), 256 << 20);
        assert!(quick.out.ends_with("target/zcrx-bench"));
    }

    #[test]
    fn options_parse() {
        let o = parse(&[
            "--scaling",
            "--conns",
            "2,4",
            "--receivers",
            "tokio-read,tokio-zcrx",
            "--bytes",
            "1G",
            "--wrap",
            "valgrind --tool=callgrind",
        ]);
        assert!(!o.receive && o.scaling);
        assert_eq!(o.conns, vec![2, 4]);
        assert_eq!(o.receivers, vec![Receiver::TokioRead, Receiver::TokioZcrx]);
        assert_eq!(o.bytes, 1 << 30);
        assert_eq!(o.wrap, vec!["valgrind", "--tool=callgrind"]);
        assert!(parse_args(vec!["--receivers".into(), "nope".into()]).is_err());
        assert!(parse_args(vec!["--conns".into(), "0".into()]).is_err());
    }
}
