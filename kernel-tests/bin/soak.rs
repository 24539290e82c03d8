//! The soak run of `cargo xtask soak`, inside the QEMU guest.
//!
//! ```text
//! soak [--seconds S] [--connections N] [--concurrency C] [--seed S] [--only PHASE]...
//!      [--drop-privileges]
//! ```
//!
//! Four phases, one server process each: the `echo` and `sink` examples, each in nic mode
//! (on the netdevsim queue, the clients in namespace nsb) and in nodev mode (loopback).
//! Every phase churns connections in rounds; each connection has its own seeded payload and
//! random size and ends one of three ways: a normal end (the client half-closes and reads
//! to the server's end), a reset (SO_LINGER 0 after part of the payload), or an empty
//! connection. The sink is started with `--hold` (buffers kept by another task beyond their
//! stream), `--drop-every` (streams dropped mid-flight) and `--lagging-subscriber` (an event
//! subscriber that falls behind).
//!
//! Every byte is checked: echoed bytes against the payload as they arrive, and the sink's
//! per-connection byte count and CRC-32 against the payload prefix the client sent. Once a
//! second the server's open fds (/proc/PID/fd), RSS (VmRSS), driver-thread CPU and
//! outstanding chunks (`buffers_outstanding` from its stats line) are sampled.
//!
//! A phase fails on any wrong byte, unexplained connection failure, or growth: after the
//! warm-up round and at the end, with no connection open and every held buffer released, the
//! server must hold no more fds than at the start of the measurement, no outstanding chunk,
//! and at most `RSS_TOLERANCE` more resident memory; and its driver thread must use under
//! `IDLE_CPU_LIMIT` in an idle second at the end.
//!
//! Output: libtest-style lines (`test soak::PHASE ... ok`, `test result: ...`) that the xtask
//! counts, and one `soak-report {JSON}` line per phase with the figures.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_zcrx_examples::payload::Payload;
use tokio_zcrx_kernel_tests::procfs::{self, Pid};

/// Connections per round: the server is checked for quiescence between rounds.
const ROUND: usize = 250;
/// Resident memory a phase may gain between the start of measurement (after the warm-up
/// round) and its end. glibc's per-thread malloc arenas keep freed memory and settle only
/// after the first few hundred connections have touched every arena; the warm-up round
/// absorbs most of that. 2 MiB is well under what a leak of one driver entry, socket buffer
/// or task per connection amounts to over a few thousand connections (hundreds of bytes to
/// kilobytes each), and well above the page-granular noise seen between quiescent points.
const RSS_TOLERANCE: u64 = 2 << 20;
/// The driver thread's CPU allowed in one idle second at the end of a phase.
const IDLE_CPU_LIMIT: Duration = Duration::from_millis(10);
/// How long one round of connections may take before the phase is declared hung.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a phase may wait for its server to report every connection and go quiet.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    Echo,
    Sink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NetMode {
    Nic,
    Nodev,
}

#[derive(Debug, Clone, Copy)]
struct Phase {
    server: ServerKind,
    mode: NetMode,
}

impl Phase {
    fn name(self) -> String {
        let server = match self.server {
            ServerKind::Echo => "echo",
            ServerKind::Sink => "sink",
        };
        let mode = match self.mode {
            NetMode::Nic => "nic",
            NetMode::Nodev => "nodev",
        };
        format!("{server}_{mode}")
    }
}

const PHASES: [Phase; 4] = [
    Phase {
        server: ServerKind::Echo,
        mode: NetMode::Nic,
    },
    Phase {
        server: ServerKind::Echo,
        mode: NetMode::Nodev,
    },
    Phase {
        server: ServerKind::Sink,
        mode: NetMode::Nic,
    },
    Phase {
        server: ServerKind::Sink,
        mode: NetMode::Nodev,
    },
];

struct Args {
    /// Measured churn time, shared by the phases.
    seconds: f64,
    /// Each phase runs at least this many connections (after the warm-up round).
    connections: u64,
    concurrency: usize,
    seed: u64,
    phases: Vec<Phase>,
    /// Start the servers with `--drop-privileges`: they serve without any capability.
    drop_privileges: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 40.0,
        connections: 0,
        concurrency: 32,
        seed: 1,
        phases: Vec::new(),
        drop_privileges: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                args.seconds = value("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--connections" => {
                args.connections = value("--connections")?
                    .parse()
                    .map_err(|e| format!("--connections: {e}"))?
            }
            "--concurrency" => {
                args.concurrency = value("--concurrency")?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?
            }
            "--seed" => {
                args.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--only" => {
                let name = value("--only")?;
                let phase = PHASES.iter().find(|p| p.name() == name).ok_or(format!(
                    "--only {name}: phases are echo_nic, echo_nodev, sink_nic, sink_nodev"
                ))?;
                args.phases.push(*phase);
            }
            "--drop-privileges" => args.drop_privileges = true,
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if args.phases.is_empty() {
        args.phases = PHASES.to_vec();
    }
    Ok(args)
}

/// The guest's network, from the environment vm/guest/init sets.
struct Net {
    nic: String,
    nic_addr: String,
    peer_netns: String,
}

impl Net {
    fn from_env() -> Result<Net, String> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| {
                format!("{name} is not set: run me in the test guest (cargo xtask soak)")
            })
        };
        Ok(Net {
            nic: var("TZX_NIC")?,
            nic_addr: var("TZX_NIC_ADDR")?,
            peer_netns: var("TZX_PEER_NETNS")?,
        })
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("soak: {error}");
            return ExitCode::from(2);
        }
    };
    let net = match Net::from_env() {
        Ok(net) => net,
        Err(error) => {
            eprintln!("soak: {error}");
            return ExitCode::from(2);
        }
    };
    println!("\nrunning {} tests", args.phases.len());
    let run_started = Instant::now();
    let per_phase = Duration::from_secs_f64(args.seconds / args.phases.len() as f64);
    let (mut passed, mut failed) = (0, 0);
    for (i, phase) in args.phases.iter().enumerate() {
        let name = phase.name();
        let seed = args.seed.wrapping_add(i as u64 * 0x1000_0000);
        println!(
            "soak {name}: starting at {:.1} s",
            run_started.elapsed().as_secs_f64()
        );
        let report = run_phase(*phase, &net, &args, per_phase, seed);
        println!(
            "soak {name}: ended at {:.1} s",
            run_started.elapsed().as_secs_f64()
        );
        println!("soak-report {}", report.to_json(&name));
        report.print_summary(&name);
        if report.problems.is_empty() {
            passed += 1;
            println!("test {name} ... ok");
        } else {
            failed += 1;
            for problem in &report.problems {
                println!("soak::{name}: FAILED: {problem}");
            }
            println!("test {name} ... FAILED");
        }
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out"
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------------------
// The server process and what it prints.

/// One connection as the sink reported it (a `conn` JSON line).
#[derive(Debug, Clone)]
struct SinkConn {
    peer: String,
    bytes: u64,
    crc32: u32,
    end: String,
}

#[derive(Debug, Default)]
struct ServerState {
    addr: Option<String>,
    /// The server said it gave up every capability (`--drop-privileges`).
    privileges_dropped: bool,
    /// Connections the server reported finished.
    finished: u64,
    /// Of those, how many it reported as failed (echo: an error line).
    failed: u64,
    /// Sink: the finished connections not yet checked.
    sink_conns: Vec<SinkConn>,
    /// The latest stats line: (sequence number, connections open, buffers outstanding).
    stats_seq: u64,
    open: u64,
    outstanding: u64,
    summary: Option<Value>,
    /// Lines that were neither expected output nor understood (kept for the report).
    odd_lines: Vec<String>,
}

struct Server {
    child: Child,
    pid: u32,
    state: Arc<Mutex<ServerState>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(phase: Phase, net: &Net, drop_privileges: bool) -> Result<Server, String> {
        let listen = match phase.mode {
            NetMode::Nic => format!("{}:0", net.nic_addr),
            NetMode::Nodev => "127.0.0.1:0".to_string(),
        };
        let mut args: Vec<String> = vec!["--listen".into(), listen];
        match phase.mode {
            NetMode::Nic => args.extend(
                ["--mode", "nic", "--interface", &net.nic, "--queue", "0"].map(String::from),
            ),
            NetMode::Nodev => args.extend(["--mode", "nodev"].map(String::from)),
        }
        if drop_privileges {
            args.push("--drop-privileges".into());
        }
        let program = match phase.server {
            ServerKind::Echo => {
                args.push("--stats".into());
                "echo"
            }
            ServerKind::Sink => {
                args.extend(
                    [
                        "--json",
                        "--hold",
                        "30",
                        "--drop-every",
                        "7",
                        "--lagging-subscriber",
                        "--event-rearm",
                        "2",
                    ]
                    .map(String::from),
                );
                "sink"
            }
        };
        // `echo` is a shell builtin elsewhere; here it is the example on PATH (/tzx/bin).
        let mut child = Command::new(program)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {program}: {e}"))?;
        let pid = child.id();
        let state = Arc::new(Mutex::new(ServerState::default()));
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let stderr = BufReader::new(child.stderr.take().expect("piped"));
        let kind = phase.server;
        let readers = vec![
            {
                let state = Arc::clone(&state);
                std::thread::spawn(move || {
                    for line in stdout.lines().map_while(Result::ok) {
                        parse_stdout(kind, &line, &mut state.lock().unwrap());
                    }
                })
            },
            {
                let state = Arc::clone(&state);
                std::thread::spawn(move || {
                    for line in stderr.lines().map_while(Result::ok) {
                        parse_stderr(kind, &line, &mut state.lock().unwrap());
                    }
                })
            },
        ];
        let mut server = Server {
            child,
            pid,
            state,
            readers,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if server.state.lock().unwrap().addr.is_some() {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "{program} exited with {status} before listening: {:?}",
                    server.state.lock().unwrap().odd_lines
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{program} did not start listening within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn addr(&self) -> SocketAddr {
        let addr = self.state.lock().unwrap().addr.clone().expect("listening");
        addr.parse().expect("a socket address")
    }

    /// SIGTERM; waits for the exit status and the last output.
    fn stop(mut self) -> Result<(), String> {
        // SAFETY: kill(2) with the pid of our own child; no memory is involved.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let status = self.child.wait().map_err(|e| e.to_string())?;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        if status.success() {
            Ok(())
        } else {
            Err(format!("the server exited with {status}"))
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_stdout(kind: ServerKind, line: &str, state: &mut ServerState) {
    match kind {
        ServerKind::Echo => {
            if let Some(addr) = line.strip_prefix("echo: listening on ") {
                state.addr = Some(addr.trim().to_string());
            } else if line == "echo: every capability dropped" {
                state.privileges_dropped = true;
            } else if line.contains(": echoed ") {
                state.finished += 1;
            } else if let Some(json) = line.strip_prefix("stats: ") {
                if let Ok(v) = serde_json::from_str::<Value>(json) {
                    state.stats_seq += 1;
                    state.open = v["open"].as_u64().unwrap_or(u64::MAX);
                    state.outstanding = v["buffers_outstanding"].as_u64().unwrap_or(u64::MAX);
                }
            } else if !line.starts_with("mode:") && !line.starts_with("echo: ") {
                // Anything else is unexpected; shown in the report.
                state.odd_lines.push(line.to_string());
            }
        }
        ServerKind::Sink => {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                state.odd_lines.push(line.to_string());
                return;
            };
            match v["type"].as_str() {
                Some("listening") => state.addr = v["addr"].as_str().map(str::to_string),
                Some("conn") => {
                    state.finished += 1;
                    if v["end"] == "error" {
                        state.failed += 1;
                    }
                    state.sink_conns.push(SinkConn {
                        peer: v["peer"].as_str().unwrap_or("?").to_string(),
                        bytes: v["bytes"].as_u64().unwrap_or(u64::MAX),
                        crc32: v["crc32"].as_u64().unwrap_or(u64::MAX) as u32,
                        end: v["end"].as_str().unwrap_or("?").to_string(),
                    });
                }
                Some("tick") => {
                    state.stats_seq += 1;
                    state.open = v["open"].as_u64().unwrap_or(u64::MAX);
                    state.outstanding = v["buffers_outstanding"].as_u64().unwrap_or(u64::MAX);
                }
                Some("summary") => state.summary = Some(v),
                _ => {}
            }
        }
    }
}

fn parse_stderr(kind: ServerKind, line: &str, state: &mut ServerState) {
    // The echo reports a failed connection as "PEER: ERROR" on stderr.
    if kind == ServerKind::Echo {
        if let Some((peer, _)) = line.split_once(": ") {
            if peer.parse::<SocketAddr>().is_ok() {
                state.finished += 1;
                state.failed += 1;
                return;
            }
        }
    }
    // The sink's remarks in JSON mode ("SIGTERM, stopping", and the drop of
    // --drop-privileges) are expected.
    if kind == ServerKind::Sink && line == "sink: every capability dropped" {
        state.privileges_dropped = true;
        return;
    }
    if kind == ServerKind::Sink && line.ends_with(", stopping") {
        return;
    }
    state.odd_lines.push(format!("stderr: {line}"));
}

// ---------------------------------------------------------------------------------------
// Sampling.

#[derive(Debug, Clone, Copy)]
struct Sample {
    fds: usize,
    rss: u64,
    outstanding: u64,
    /// Driver CPU since the previous sample, per second of wall time.
    cpu_ms_per_s: f64,
}

/// Samples the server once a second until stopped.
fn spawn_sampler(
    pid: u32,
    state: Arc<Mutex<ServerState>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Vec<Sample>, String>> {
    std::thread::spawn(move || {
        let pid = Pid::Of(pid);
        let tid = procfs::driver_thread(pid).map_err(|e| e.to_string())?;
        let mut samples = Vec::new();
        let mut last = (
            Instant::now(),
            procfs::thread_cpu(pid, tid).map_err(|e| e.to_string())?,
        );
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_secs(1));
            let now = Instant::now();
            let cpu = procfs::thread_cpu(pid, tid).map_err(|e| e.to_string())?;
            let per_s = (cpu - last.1).as_secs_f64() * 1000.0 / (now - last.0).as_secs_f64();
            last = (now, cpu);
            samples.push(Sample {
                fds: procfs::open_fds(pid).map_err(|e| e.to_string())?,
                rss: procfs::rss_bytes(pid).map_err(|e| e.to_string())?,
                outstanding: state.lock().unwrap().outstanding,
                cpu_ms_per_s: per_s,
            });
        }
        Ok(samples)
    })
}

/// The server's state with no connection open and every buffer back.
#[derive(Debug, Clone, Copy)]
struct Quiet {
    fds: usize,
    rss: u64,
}

/// Waits until the server has reported `expected` connections finished and a stats line
/// taken after that shows none open and nothing outstanding; then reads fds and RSS. Socket
/// closes complete on the driver thread shortly after a stream is dropped, so the fd count
/// is read until it stops falling (up to 2 s), and the lowest is taken.
fn quiesce(server: &Server, expected: u64) -> Result<Quiet, String> {
    let deadline = Instant::now() + QUIESCE_TIMEOUT;
    let seq = loop {
        {
            let state = server.state.lock().unwrap();
            if state.finished >= expected {
                break state.stats_seq;
            }
        }
        if Instant::now() > deadline {
            let state = server.state.lock().unwrap();
            return Err(format!(
                "the server reported {} of {expected} connections finished after {} s",
                state.finished,
                QUIESCE_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    loop {
        {
            let state = server.state.lock().unwrap();
            if state.stats_seq > seq && state.open == 0 && state.outstanding == 0 {
                break;
            }
        }
        if Instant::now() > deadline {
            let state = server.state.lock().unwrap();
            return Err(format!(
                "the server did not go quiet: {} connections open, {} chunks outstanding",
                state.open, state.outstanding
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = Pid::Of(server.pid);
    let mut fds = procfs::open_fds(pid).map_err(|e| e.to_string())?;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = procfs::open_fds(pid).map_err(|e| e.to_string())?;
        if now >= fds {
            break;
        }
        fds = now;
    }
    Ok(Quiet {
        fds,
        rss: procfs::rss_bytes(pid).map_err(|e| e.to_string())?,
    })
}

// ---------------------------------------------------------------------------------------
// The clients.

#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Send everything, half-close, read until the server closes.
    Normal,
    /// Send `cut` bytes of the payload, then close with SO_LINGER 0: a reset.
    Reset { cut: u64 },
    /// Connect, half-close at once, read until the server closes.
    Empty,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    index: u64,
    size: u64,
    ending: Ending,
}

/// SplitMix64: the plans are reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn plan(&mut self, index: u64) -> Plan {
        // Sizes spread over 0 B .. 256 KiB, most of them small (log-uniform).
        let bits = self.below(19);
        let size = self.below(1 << bits);
        let ending = match self.below(10) {
            0..=5 => Ending::Normal,
            6..=8 => Ending::Reset {
                cut: self.below(size + 1),
            },
            _ => Ending::Empty,
        };
        let size = if matches!(ending, Ending::Empty) {
            0
        } else {
            size
        };
        Plan {
            index,
            size,
            ending,
        }
    }
}

#[derive(Debug, Clone)]
struct ClientResult {
    plan: Plan,
    local: Option<SocketAddr>,
    sent: u64,
    /// Bytes the server sent back, every one checked against the payload.
    echoed: u64,
    /// The server reset or closed the connection before the client was done.
    cut_by_server: bool,
    error: Option<String>,
}

/// A client thread (in the peer namespace for nic mode) that runs rounds of connections.
struct Clients {
    rounds: mpsc::Sender<Vec<Plan>>,
    results: mpsc::Receiver<Vec<ClientResult>>,
}

impl Clients {
    fn start(
        addr: SocketAddr,
        netns: Option<String>,
        concurrency: usize,
        seed: u64,
        echo: bool,
    ) -> Clients {
        let (rounds, round_rx) = mpsc::channel::<Vec<Plan>>();
        let (result_tx, results) = mpsc::channel();
        std::thread::spawn(move || {
            if let Some(ns) = &netns {
                tokio_zcrx_kernel_tests::enter_netns(ns);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a client runtime");
            let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
            while let Ok(plans) = round_rx.recv() {
                let results = runtime.block_on(async {
                    let mut tasks = tokio::task::JoinSet::new();
                    for plan in plans {
                        let permit = Arc::clone(&limit).acquire_owned().await.unwrap();
                        tasks.spawn(async move {
                            let result = connection(addr, plan, seed, echo).await;
                            drop(permit);
                            result
                        });
                    }
                    let mut results = Vec::new();
                    while let Some(joined) = tasks.join_next().await {
                        results.push(joined.expect("a client task panicked"));
                    }
                    results
                });
                if result_tx.send(results).is_err() {
                    break;
                }
            }
        });
        Clients { rounds, results }
    }

    /// Runs one round; an error if it does not finish within `ROUND_TIMEOUT` (a hang).
    fn run(&self, plans: Vec<Plan>) -> Result<Vec<ClientResult>, String> {
        let count = plans.len();
        self.rounds.send(plans).expect("the client thread is alive");
        self.results.recv_timeout(ROUND_TIMEOUT).map_err(|_| {
            format!(
                "a round of {count} connections did not finish within {} s: the server stopped \
                 answering",
                ROUND_TIMEOUT.as_secs()
            )
        })
    }
}

fn is_cut(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

async fn connection(addr: SocketAddr, plan: Plan, seed: u64, echo: bool) -> ClientResult {
    let mut result = ClientResult {
        plan,
        local: None,
        sent: 0,
        echoed: 0,
        cut_by_server: false,
        error: None,
    };
    let socket = match TcpStream::connect(addr).await {
        Ok(socket) => socket,
        Err(e) => {
            result.error = Some(format!("connect: {e}"));
            return result;
        }
    };
    result.local = socket.local_addr().ok();
    let payload = Payload::new(seed, plan.index);
    let to_send = match plan.ending {
        Ending::Reset { cut } => cut,
        _ => plan.size,
    };
    if matches!(plan.ending, Ending::Reset { .. }) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a live socket with a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as u32,
            );
        }
    }
    let (mut reader, mut writer) = socket.into_split();
    // Counted as writes complete, so every way the connection ends knows what was sent
    // (a reset connection whose server closed first too).
    let written = std::sync::atomic::AtomicU64::new(0);
    let half_close = !matches!(plan.ending, Ending::Reset { .. });
    let send = async {
        let mut sizes = payload.write_sizes(16 << 10);
        let mut buf = vec![0; 16 << 10];
        let mut sent = 0u64;
        while sent < to_send {
            let n = sizes.next().unwrap_or(1).min((to_send - sent) as usize);
            payload.fill(sent, &mut buf[..n]);
            // Not write_all: a write cut short by a reset still counts what it wrote.
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let wrote = match writer.write(rest).await {
                    Ok(0) => Err(std::io::ErrorKind::WriteZero.into()),
                    other => other,
                }
                .map_err(|e| (sent, e))?;
                rest = &rest[wrote..];
                sent += wrote as u64;
                written.store(sent, Ordering::Relaxed);
            }
        }
        if half_close {
            writer.shutdown().await.map_err(|e| (sent, e))?;
        }
        Ok::<_, (u64, std::io::Error)>((sent, writer))
    };
    // Counted as bytes arrive and pass the check, so a reset connection reports its part.
    let verified = std::sync::atomic::AtomicU64::new(0);
    let receive = async {
        let mut buf = vec![0; 64 << 10];
        let mut want = vec![0; 64 << 10];
        let mut received = 0u64;
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) => return Ok((received, reader)),
                Ok(n) => n,
                Err(e) => return Err((received, e)),
            };
            payload.fill(received, &mut want[..n]);
            if let Some(at) = buf[..n].iter().zip(&want).position(|(a, b)| a != b) {
                let e = std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("echoed byte {} is wrong", received + at as u64),
                );
                return Err((received, e));
            }
            received += n as u64;
            verified.store(received, Ordering::Relaxed);
        }
    };
    match plan.ending {
        Ending::Reset { .. } => {
            // Send the part, read whatever comes back for a moment, then reset.
            tokio::pin!(receive);
            let sent = tokio::select! {
                sent = send => sent,
                _ = &mut receive => Err((0, std::io::Error::other("the server closed first"))),
            };
            match sent {
                Ok((sent, writer)) => {
                    result.sent = sent;
                    let wait = tokio::time::sleep(Duration::from_millis(plan.index % 20));
                    tokio::select! {
                        _ = wait => {}
                        _ = &mut receive => {}
                    }
                    drop(writer); // with `reader` below (dropped with `receive`): the RST
                }
                Err((_, e)) => {
                    result.sent = written.load(Ordering::Relaxed);
                    if !is_cut(&e) && e.to_string() != "the server closed first" {
                        result.error = Some(format!("send: {e}"));
                    } else {
                        result.cut_by_server = true;
                    }
                }
            }
            // What was echoed was checked as it came.
            result.echoed = verified.load(Ordering::Relaxed);
        }
        _ => {
            let (sent, received) = tokio::join!(send, receive);
            match sent {
                Ok((sent, _writer)) => result.sent = sent,
                Err((sent, e)) => {
                    result.sent = sent;
                    if is_cut(&e) {
                        result.cut_by_server = true;
                    } else {
                        result.error = Some(format!("send: {e}"));
                    }
                }
            }
            match received {
                Ok((echoed, _)) => result.echoed = echoed,
                Err((echoed, e)) => {
                    result.echoed = echoed;
                    if is_cut(&e) {
                        result.cut_by_server = true;
                    } else {
                        result.error = Some(format!("receive: {e}"));
                    }
                }
            }
            if echo && result.error.is_none() && !result.cut_by_server && result.echoed != plan.size
            {
                result.error = Some(format!(
                    "the echo ended after {} of {} bytes",
                    result.echoed, plan.size
                ));
            }
        }
    }
    result
}

/// CRC-32 of the first `len` bytes of a payload.
fn payload_crc(payload: Payload, len: u64) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0; 64 << 10];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        payload.fill(at, &mut buf[..n]);
        crc.update(&buf[..n]);
        at += n as u64;
    }
    crc.finalize()
}

// ---------------------------------------------------------------------------------------
// A phase.

#[derive(Debug, Default)]
struct Tally {
    connections: u64,
    bytes_verified: u64,
    resets_sent: u64,
    half_closes: u64,
    cut_by_server: u64,
}

#[derive(Debug, Default)]
struct PhaseReport {
    tally: Tally,
    samples: Vec<Sample>,
    start: Option<Quiet>,
    end: Option<Quiet>,
    idle_cpu: Option<Duration>,
    seconds: f64,
    events_missed: Option<u64>,
    problems: Vec<String>,
}

impl PhaseReport {
    fn min_max<T: PartialOrd + Copy>(&self, f: impl Fn(&Sample) -> T) -> Option<(T, T)> {
        let mut values = self.samples.iter().map(f);
        let first = values.next()?;
        Some(values.fold((first, first), |(lo, hi), v| {
            (if v < lo { v } else { lo }, if v > hi { v } else { hi })
        }))
    }

    fn to_json(&self, name: &str) -> Value {
        json!({
            "phase": name,
            "ok": self.problems.is_empty(),
            "seconds": self.seconds,
            "connections": self.tally.connections,
            "bytes_verified": self.tally.bytes_verified,
            "resets_sent": self.tally.resets_sent,
            "half_closes": self.tally.half_closes,
            "cut_by_server": self.tally.cut_by_server,
            "events_missed": self.events_missed,
            "fds_min_max": self.min_max(|s| s.fds),
            "rss_min_max": self.min_max(|s| s.rss),
            "outstanding_min_max": self.min_max(|s| s.outstanding),
            "driver_cpu_ms_per_s_min_max": self.min_max(|s| s.cpu_ms_per_s),
            "quiet_start": self.start.map(|q| json!({"fds": q.fds, "rss": q.rss})),
            "quiet_end": self.end.map(|q| json!({"fds": q.fds, "rss": q.rss})),
            "idle_driver_cpu_ms": self.idle_cpu.map(|d| d.as_secs_f64() * 1000.0),
            // Once a second: RSS in KiB and open fds, to see a trend.
            "rss_kib_series": self.samples.iter().map(|s| s.rss >> 10).collect::<Vec<_>>(),
            "fds_series": self.samples.iter().map(|s| s.fds).collect::<Vec<_>>(),
            "problems": self.problems,
        })
    }

    fn print_summary(&self, name: &str) {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        println!(
            "soak {name}: {} connections in {:.1} s, {:.1} MiB verified, {} resets sent, {} \
             half-closes, {} cut by the server",
            self.tally.connections,
            self.seconds,
            mib(self.tally.bytes_verified),
            self.tally.resets_sent,
            self.tally.half_closes,
            self.tally.cut_by_server
        );
        if let (Some(fds), Some(rss), Some(out), Some(cpu)) = (
            self.min_max(|s| s.fds),
            self.min_max(|s| s.rss),
            self.min_max(|s| s.outstanding),
            self.min_max(|s| s.cpu_ms_per_s),
        ) {
            println!(
                "soak {name}: over time: fds {}..{}, RSS {:.1}..{:.1} MiB, outstanding chunks \
                 {}..{}, driver CPU {:.0}..{:.0} ms/s",
                fds.0,
                fds.1,
                mib(rss.0),
                mib(rss.1),
                out.0,
                out.1,
                cpu.0,
                cpu.1
            );
        }
        if let (Some(start), Some(end)) = (self.start, self.end) {
            println!(
                "soak {name}: quiet: fds {} -> {}, RSS {:.2} -> {:.2} MiB; idle driver CPU {:.2} ms",
                start.fds,
                end.fds,
                mib(start.rss),
                mib(end.rss),
                self.idle_cpu.unwrap_or_default().as_secs_f64() * 1000.0
            );
        }
    }
}

fn run_phase(phase: Phase, net: &Net, args: &Args, budget: Duration, seed: u64) -> PhaseReport {
    let mut report = PhaseReport::default();
    if let Err(problem) = soak(phase, net, args, budget, seed, &mut report) {
        report.problems.push(problem);
    }
    report
}

/// The server's threads (io_uring's own workers aside) with a capability in their effective,
/// permitted or ambient set, as `TID NAME: FIELD MASK`.
fn threads_holding_capabilities(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![format!("cannot list /proc/{pid}/task")];
    };
    let mut holding = Vec::new();
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let dir = format!("/proc/{pid}/task/{tid}");
        let name = std::fs::read_to_string(format!("{dir}/comm")).unwrap_or_default();
        let name = name.trim();
        if name.starts_with("iou-") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("{dir}/status")) else {
            continue; // exited meanwhile
        };
        for field in ["CapEff:", "CapPrm:", "CapAmb:"] {
            let mask = status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|value| u64::from_str_radix(value.trim(), 16).ok());
            if mask != Some(0) {
                holding.push(format!("{tid} {name}: {field} {mask:?}"));
            }
        }
    }
    holding
}

fn soak(
    phase: Phase,
    net: &Net,
    args: &Args,
    budget: Duration,
    seed: u64,
    report: &mut PhaseReport,
) -> Result<(), String> {
    let server = Server::start(phase, net, args.drop_privileges)?;
    let netns = (phase.mode == NetMode::Nic).then(|| net.peer_netns.clone());
    let echo = phase.server == ServerKind::Echo;
    let clients = Clients::start(server.addr(), netns, args.concurrency, seed, echo);
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = spawn_sampler(
        server.pid,
        Arc::clone(&server.state),
        Arc::clone(&stop_sampler),
    );
    let mut rng = Rng(seed);
    let made = std::cell::Cell::new(0u64);
    let mut round = |report: &mut PhaseReport| -> Result<(), String> {
        let plans: Vec<Plan> = (0..ROUND)
            .map(|_| {
                made.set(made.get() + 1);
                rng.plan(made.get())
            })
            .collect();
        let results = clients.run(plans)?;
        check_round(phase, &server, &results, seed, report, made.get())
    };

    // Warm-up: the first connections grow malloc arenas, task storage and the like.
    round(report)?;
    report.start = Some(quiesce(&server, made.get())?);
    let started = Instant::now();
    let measured_from = made.get();
    while started.elapsed() < budget || made.get() - measured_from < args.connections {
        round(report)?;
    }
    report.end = Some(quiesce(&server, made.get())?);
    report.seconds = started.elapsed().as_secs_f64();
    let next_index = made.get();

    // An idle second: the driver must sleep.
    let pid = Pid::Of(server.pid);
    let (cpu, ()) = procfs::driver_cpu_during(pid, || std::thread::sleep(Duration::from_secs(1)))
        .map_err(|e| format!("reading the driver's CPU time: {e}"))?;
    report.idle_cpu = Some(cpu);
    stop_sampler.store(true, Ordering::Relaxed);
    report.samples = sampler.join().expect("the sampler panicked")?;

    let holding = if args.drop_privileges {
        threads_holding_capabilities(server.pid)
    } else {
        Vec::new()
    };
    let state = Arc::clone(&server.state);
    server.stop()?;
    let state = state.lock().unwrap();
    if let Some(summary) = &state.summary {
        report.events_missed = summary["events_missed"].as_u64();
        if summary["buffers_outstanding"] != 0 {
            report.problems.push(format!(
                "the sink's summary shows chunks outstanding: {summary}"
            ));
        }
    } else if phase.server == ServerKind::Sink {
        report.problems.push("the sink printed no summary".into());
    }
    if !holding.is_empty() {
        report.problems.push(format!(
            "--drop-privileges: server threads still hold capabilities: {holding:?}"
        ));
    }
    if args.drop_privileges {
        if state.privileges_dropped {
            println!(
                "soak {}: the server ran without any capability",
                phase.name()
            );
        } else {
            report
                .problems
                .push("--drop-privileges: the server did not report dropping".into());
        }
    }
    if !state.odd_lines.is_empty() {
        println!(
            "soak {}: unexpected server output: {:?}",
            phase.name(),
            &state.odd_lines[..state.odd_lines.len().min(10)]
        );
    }
    drop(state);

    let (start, end) = (report.start.unwrap(), report.end.unwrap());
    if end.fds > start.fds {
        report.problems.push(format!(
            "open fds grew from {} to {} over {} connections (with none open)",
            start.fds,
            end.fds,
            next_index - measured_from
        ));
    }
    if end.rss > start.rss + RSS_TOLERANCE {
        report.problems.push(format!(
            "RSS grew from {} to {} bytes over {} connections (tolerance {RSS_TOLERANCE})",
            start.rss,
            end.rss,
            next_index - measured_from
        ));
    }
    if cpu >= IDLE_CPU_LIMIT {
        report.problems.push(format!(
            "the idle driver thread used {:.1} ms of CPU in one second (limit {} ms)",
            cpu.as_secs_f64() * 1000.0,
            IDLE_CPU_LIMIT.as_millis()
        ));
    }
    Ok(())
}

/// Checks one round's connections against what the server reported.
fn check_round(
    phase: Phase,
    server: &Server,
    results: &[ClientResult],
    seed: u64,
    report: &mut PhaseReport,
    expected_total: u64,
) -> Result<(), String> {
    let tally = &mut report.tally;
    tally.connections += results.len() as u64;
    for r in results {
        if let Some(error) = &r.error {
            return Err(format!(
                "connection {} ({:?}): {error}",
                r.plan.index, r.plan
            ));
        }
        match r.plan.ending {
            Ending::Reset { .. } => tally.resets_sent += 1,
            _ if !r.cut_by_server => tally.half_closes += 1,
            _ => {}
        }
        tally.cut_by_server += u64::from(r.cut_by_server);
    }
    match phase.server {
        ServerKind::Echo => {
            if let Some(r) = results.iter().find(|r| r.cut_by_server) {
                return Err(format!(
                    "the echo server cut connection {} ({:?}) short",
                    r.plan.index, r.plan
                ));
            }
            tally.bytes_verified += results.iter().map(|r| r.echoed).sum::<u64>();
            Ok(())
        }
        ServerKind::Sink => {
            // Wait until the sink reported the round, then match its lines to our clients.
            let deadline = Instant::now() + QUIESCE_TIMEOUT;
            while server.state.lock().unwrap().finished < expected_total {
                if Instant::now() > deadline {
                    return Err(format!(
                        "the sink reported {} of {expected_total} connections",
                        server.state.lock().unwrap().finished
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let conns = std::mem::take(&mut server.state.lock().unwrap().sink_conns);
            let mut by_peer: HashMap<String, Vec<SinkConn>> = HashMap::new();
            for conn in conns {
                by_peer.entry(conn.peer.clone()).or_default().push(conn);
            }
            for r in results {
                let local = r.local.expect("connected").to_string();
                let payload = Payload::new(seed, r.plan.index);
                let candidates = by_peer.get_mut(&local).ok_or_else(|| {
                    format!(
                        "the sink never reported connection {} from {local}",
                        r.plan.index
                    )
                })?;
                let found = candidates
                    .iter()
                    .position(|c| c.bytes <= r.sent && c.crc32 == payload_crc(payload, c.bytes));
                let Some(found) = found else {
                    return Err(format!(
                        "connection {} ({:?}, {} bytes sent from {local}): the sink received \
                         other bytes: {candidates:?}",
                        r.plan.index, r.plan, r.sent
                    ));
                };
                let conn = candidates.swap_remove(found);
                let consistent = match (r.plan.ending, conn.end.as_str()) {
                    (_, "dropped") => true,
                    (Ending::Reset { .. }, "error") => true,
                    (_, "eof") => !r.cut_by_server && conn.bytes == r.sent,
                    _ => false,
                };
                if !consistent {
                    return Err(format!(
                        "connection {} ({:?}, {} bytes sent, cut by the server: {}): the sink \
                         saw {conn:?}",
                        r.plan.index, r.plan, r.sent, r.cut_by_server
                    ));
                }
                tally.bytes_verified += conn.bytes;
            }
            if let Some(extra) = by_peer.values().flatten().next() {
                return Err(format!(
                    "the sink reported a connection nobody made: {extra:?}"
                ));
            }
            Ok(())
        }
    }
}
