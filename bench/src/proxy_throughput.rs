//! `proxy-throughput`: the `proxy` example's bulk throughput and CPU per GiB, tokio-zcrx
//! against `tokio::io::copy_bidirectional` (`proxy --copy`), on the host or in the QEMU guest.
//!
//! ```text
//! cargo build --release -p tokio-zcrx-examples --example proxy
//! cargo run --release -p tokio-zcrx-bench --bin proxy-throughput -- [--rounds 7 --secs 3
//!     --conns 1,16 --mode copy --proxy PATH --copy-buffer B]
//! ```
//!
//! Each run starts a fresh proxy process (`target/release/examples/proxy` next to this
//! binary, or `--proxy PATH`), `--mode MODE` (default `copy`) or `--copy`, in front of an
//! upstream sink in this process; `--conns` clients write 64 KiB at a time as fast as the
//! proxy takes it. After a 0.5 s warm-up, for `--secs` seconds, it counts the bytes the sink
//! receives and the proxy process's CPU time (user + system, all threads, from
//! `/proc/PID/stat`). The two proxies alternate within each round, which one goes first
//! switching every round. Printed per connection count: each proxy's median \[range\] of
//! Gbit/s and CPU seconds per GiB, the ratio of the medians and the median \[range\] of the
//! ratios within each round (runs seconds apart, so load that comes and goes moves them less).
//!
//! One direction only (clients to upstream): the proxy's two directions are the same code,
//! and one direction keeps the sink's count a clean measure of what was forwarded.
//!
//! In the QEMU guest (`cargo xtask vm-bench --proxy`, nic mode): the clients and the sink
//! live in the peer's namespace (`--netns /run/netns/nsb`, `--upstream-ip 192.0.2.2`), the
//! proxy listens on the netdevsim address (`--listen-ip 192.0.2.1`) and receives zero-copy on
//! `--interface nsim0 --queue 0`, so every byte crosses the netdevsim pair twice. `--results
//! FILE` writes every sample and the proxies' own summaries as JSON (the guest prints it as
//! one `@@proxy-bench` line instead: `--results -`); `zcrx-bench --plot-proxy FILE` draws it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes per client write and per sink read.
const IO_SIZE: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Zcrx,
    CopyBidirectional,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Zcrx => "tokio-zcrx proxy",
            Proxy::CopyBidirectional => "copy_bidirectional proxy",
        }
    }

    /// The name in the results file (and the plot's colours).
    fn id(self) -> &'static str {
        match self {
            Proxy::Zcrx => "tokio-zcrx",
            Proxy::CopyBidirectional => "copy_bidirectional",
        }
    }
}

struct Settings {
    rounds: usize,
    secs: f64,
    conns: Vec<usize>,
    mode: String,
    proxy: PathBuf,
    /// The proxy's address, and where the clients and the sink live.
    listen_ip: String,
    upstream_ip: String,
    netns: Option<String>,
    /// nic mode's queue, passed to the proxy.
    interface: Option<(String, u32)>,
    /// Where the results go as JSON (`-`: one `@@proxy-bench` line on stdout).
    results: Option<String>,
    /// `copy_bidirectional`'s buffer size each way, if not the proxy's 64 KiB.
    copy_buffer: Option<usize>,
}

#[derive(Debug, Clone)]
struct Sample {
    gbps: f64,
    cpu_s_per_gib: f64,
    /// The proxy's JSON summary at exit (its send and receive statistics).
    summary: Option<Value>,
}

/// Runs `f` on a thread in the network namespace `netns` (if any): sockets it creates
/// stay in that namespace.
fn in_netns<T: Send + 'static>(
    netns: &Option<String>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let netns = netns.clone();
    std::thread::spawn(move || {
        if let Some(path) = netns {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns with a descriptor kept open by `file`; it changes only this
            // thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .unwrap()
}

/// The proxy process, killed if still running when dropped.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    /// The last JSON line it printed (its summary, once it has exited).
    last_line: mpsc::Receiver<Value>,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProxyProcess {
    fn start(settings: &Settings, proxy: Proxy, upstream: SocketAddr) -> ProxyProcess {
        let mut command = Command::new(&settings.proxy);
        command
            .args(["--listen", &format!("{}:0", settings.listen_ip), "--json"])
            .arg("--upstream")
            .arg(upstream.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        match proxy {
            Proxy::Zcrx => {
                command.args(["--mode", &settings.mode]);
                if let Some((name, queue)) = &settings.interface {
                    command.args(["--interface", name, "--queue", &queue.to_string()]);
                }
            }
            Proxy::CopyBidirectional => {
                command.arg("--copy");
                if let Some(bytes) = settings.copy_buffer {
                    command.args(["--copy-buffer", &bytes.to_string()]);
                }
            }
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; build it with `cargo build --release -p \
                 tokio-zcrx-examples --example proxy` or pass --proxy PATH",
                settings.proxy.display()
            )
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("no line from the proxy").unwrap();
        let listening: Value = serde_json::from_str(&first).unwrap();
        let addr = listening["addr"].as_str().unwrap().parse().unwrap();
        if proxy == Proxy::Zcrx {
            assert_eq!(listening["mode"], settings.mode.as_str(), "{first}");
        }
        // The rest of its output (ticks, connections) is read so it never blocks; the
        // summary comes last.
        let (tx, last_line) = mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if value["type"] == "summary" {
                        let _ = tx.send(value);
                    }
                }
            }
        });
        ProxyProcess {
            child,
            addr,
            last_line,
        }
    }

    /// SIGTERM, then its summary (`None` if it printed none within 20 s).
    fn stop(self) -> Option<Value> {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.last_line.recv_timeout(Duration::from_secs(20)).ok()
    }

    /// User + system CPU time of the whole process so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which may hold spaces): state is field 3, utime 14.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks as f64 / hz
    }
}

/// The upstream server: reads every connection to its end and counts the bytes.
async fn start_sink(settings: &Settings, received: Arc<AtomicU64>) -> SocketAddr {
    let ip = settings.upstream_ip.clone();
    let listener = in_netns(&settings.netns, move || {
        let listener = std::net::TcpListener::bind((ip.as_str(), 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    });
    let listener = TcpListener::from_std(listener).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let received = Arc::clone(&received);
            tokio::spawn(async move {
                let mut buf = vec![0; IO_SIZE];
                while let Ok(n @ 1..) = socket.read(&mut buf).await {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    addr
}

async fn run(
    settings: &Settings,
    proxy: Proxy,
    conns: usize,
    received: &AtomicU64,
    upstream: SocketAddr,
) -> Sample {
    let process = ProxyProcess::start(settings, proxy, upstream);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for index in 0..conns {
        let addr = process.addr;
        let socket = in_netns(&settings.netns, move || {
            let socket = std::net::TcpStream::connect(addr).unwrap();
            socket.set_nonblocking(true).unwrap();
            socket
        });
        let mut socket = TcpStream::from_std(socket).unwrap();
        socket.set_nodelay(true).unwrap();
        let stop = Arc::clone(&stop);
        clients.push(tokio::spawn(async move {
            let data = vec![index as u8; IO_SIZE];
            while !stop.load(Ordering::Relaxed) {
                if socket.write_all(&data).await.is_err() {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (bytes_before, cpu_before, started) = (
        received.load(Ordering::Relaxed),
        process.cpu_seconds(),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(settings.secs)).await;
    let (bytes, cpu, seconds) = (
        received.load(Ordering::Relaxed) - bytes_before,
        process.cpu_seconds() - cpu_before,
        started.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let summary = tokio::task::spawn_blocking(move || process.stop())
        .await
        .unwrap();
    assert!(bytes > 0, "{} forwarded nothing", proxy.name());
    Sample {
        gbps: bytes as f64 * 8.0 / seconds / 1e9,
        cpu_s_per_gib: cpu / (bytes as f64 / (1u64 << 30) as f64),
        summary,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn parse_args() -> Result<Settings, lexopt::Error> {
    use lexopt::prelude::*;

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut settings = Settings {
        rounds: 7,
        secs: 3.0,
        conns: vec![1, 16],
        mode: "copy".into(),
        proxy: exe.parent().unwrap().join("examples/proxy"),
        listen_ip: "127.0.0.1".into(),
        upstream_ip: "127.0.0.1".into(),
        netns: None,
        interface: None,
        results: None,
        copy_buffer: None,
    };
    let (mut interface, mut queue) = (None, None);
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("rounds") => settings.rounds = parser.value()?.parse()?,
            Long("secs") => settings.secs = parser.value()?.parse()?,
            Long("conns") => {
                settings.conns = parser
                    .value()?
                    .string()?
                    .split(',')
                    .map(|n| n.parse().map_err(|_| format!("--conns: bad number {n}")))
                    .collect::<Result<_, _>>()?;
            }
            Long("mode") => settings.mode = parser.value()?.string()?,
            Long("proxy") => settings.proxy = parser.value()?.into(),
            Long("listen-ip") => settings.listen_ip = parser.value()?.string()?,
            Long("upstream-ip") => settings.upstream_ip = parser.value()?.string()?,
            Long("netns") => settings.netns = Some(parser.value()?.string()?),
            Long("interface") => interface = Some(parser.value()?.string()?),
            Long("queue") => queue = Some(parser.value()?.parse()?),
            Long("results") => settings.results = Some(parser.value()?.string()?),
            Long("copy-buffer") => settings.copy_buffer = Some(parser.value()?.parse()?),
            Long("help") | Short('h') => {
                println!(
                    "usage: proxy-throughput [--rounds N] [--secs S] [--conns 1,16] \
                     [--mode copy|nodev|nic] [--proxy PATH] [--listen-ip IP] \
                     [--upstream-ip IP] [--netns PATH] [--interface IF --queue N] \
                     [--results FILE|-] [--copy-buffer BYTES]"
                );
                std::process::exit(0);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    settings.interface = match (interface, queue) {
        (Some(name), Some(queue)) => Some((name, queue)),
        (None, None) => None,
        _ => return Err("--interface and --queue go together".into()),
    };
    Ok(settings)
}

/// The machine in one line: CPU model, CPU count, kernel.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cpus} CPUs, Linux {}", kernel.trim())
}

/// Median, min and max.
fn spread(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    let mid = median(&mut sorted);
    json!({"median": mid, "min": sorted[0], "max": sorted[sorted.len() - 1]})
}

fn main() {
    let settings = match parse_args() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("proxy-throughput: {error}");
            std::process::exit(2);
        }
    };
    println!(
        "proxy throughput: {} rounds x {} s per proxy, {}-byte writes, tokio-zcrx in {} mode \
         against copy_bidirectional ({} KiB buffers)",
        settings.rounds,
        settings.secs,
        IO_SIZE,
        settings.mode,
        settings.copy_buffer.unwrap_or(64 << 10) >> 10
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut results = Vec::new();
    runtime.block_on(async {
        let received = Arc::new(AtomicU64::new(0));
        let upstream = start_sink(&settings, Arc::clone(&received)).await;
        let proxies = [Proxy::Zcrx, Proxy::CopyBidirectional];
        for &conns in &settings.conns {
            let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
            for round in 0..settings.rounds {
                for k in 0..proxies.len() {
                    let index = (k + round) % proxies.len();
                    let sample = run(&settings, proxies[index], conns, &received, upstream).await;
                    samples[index].push(sample);
                }
            }
            println!("\n{conns} connection(s):");
            let mut medians = Vec::new();
            for (proxy, samples) in proxies.iter().zip(&samples) {
                let mut rates: Vec<f64> = samples.iter().map(|s| s.gbps).collect();
                let mut cpu: Vec<f64> = samples.iter().map(|s| s.cpu_s_per_gib).collect();
                let (rate, cost) = (median(&mut rates), median(&mut cpu));
                println!(
                    "  {:26} {rate:>6.2} Gbit/s [{:.2}-{:.2}]  {cost:.3} CPU s/GiB [{:.3}-{:.3}]",
                    proxy.name(),
                    rates[0],
                    rates[rates.len() - 1],
                    cpu[0],
                    cpu[cpu.len() - 1],
                );
                medians.push((rate, cost));
            }
            let paired = |value: fn(&Sample) -> f64| {
                let ratios: Vec<f64> = samples[0]
                    .iter()
                    .zip(&samples[1])
                    .map(|(z, t)| value(z) / value(t))
                    .collect();
                ratios
            };
            let (rate_ratios, cost_ratios) = (paired(|s| s.gbps), paired(|s| s.cpu_s_per_gib));
            let (mut r, mut c) = (rate_ratios.clone(), cost_ratios.clone());
            let (rate_ratio, cost_ratio) = (median(&mut r), median(&mut c));
            println!(
                "  tokio-zcrx / copy_bidirectional: {:.3}x throughput, {:.3}x CPU per GiB; per \
                 round: {:.3}x [{:.3}-{:.3}], {:.3}x [{:.3}-{:.3}]",
                medians[0].0 / medians[1].0,
                medians[0].1 / medians[1].1,
                rate_ratio,
                r[0],
                r[r.len() - 1],
                cost_ratio,
                c[0],
                c[c.len() - 1]
            );
            // What the tokio-zcrx proxy itself reported (receive copies, sends).
            for sample in &samples[0] {
                if let Some(summary) = &sample.summary {
                    println!(
                        "    tokio-zcrx summary: mode {}, copy_bytes {}, sends {}, zero-copy {} \
                         B, kernel-copied {} B, plain {} B, fallbacks {}, buffers outstanding {}",
                        summary["mode"],
                        summary["copy_bytes"],
                        summary["sends"],
                        summary["send_zero_copy_bytes"],
                        summary["send_kernel_copied_bytes"],
                        summary["send_plain_bytes"],
                        summary["send_fallbacks"],
                        summary["buffers_outstanding"]
                    );
                }
            }
            let proxies_json: Vec<Value> = proxies
                .iter()
                .zip(&samples)
                .map(|(proxy, samples)| {
                    let gbps: Vec<f64> = samples.iter().map(|s| s.gbps).collect();
                    let cpu: Vec<f64> = samples.iter().map(|s| s.cpu_s_per_gib).collect();
                    json!({
                        "proxy": proxy.id(),
                        "gbps": gbps,
                        "cpu_s_per_gib": cpu,
                        "gbps_spread": spread(&gbps),
                        "cpu_spread": spread(&cpu),
                        "summaries": samples.iter().map(|s| s.summary.clone()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            results.push(json!({
                "conns": conns,
                "proxies": proxies_json,
                "throughput_ratio_of_medians": medians[0].0 / medians[1].0,
                "cpu_ratio_of_medians": medians[0].1 / medians[1].1,
                "throughput_ratio_per_round": spread(&rate_ratios),
                "cpu_ratio_per_round": spread(&cost_ratios),
            }));
        }
    });
    let Some(target) = &settings.results else {
        return;
    };
    let document = json!({
        "machine": machine(),
        "mode": settings.mode,
        "interface": settings.interface.as_ref().map(|(name, queue)| format!("{name} queue {queue}")),
        "netns": settings.netns,
        "rounds": settings.rounds,
        "secs": settings.secs,
        "io_size": IO_SIZE,
        "copy_buffer": settings.copy_buffer.unwrap_or(64 << 10),
        "results": results,
    });
    if target == "-" {
        println!("@@proxy-bench {document}");
    } else {
        let text = serde_json::to_string_pretty(&document).unwrap();
        std::fs::write(target, text + "\n").unwrap_or_else(|e| panic!("writing {target}: {e}"));
        println!("results in {target}");
    }
}
