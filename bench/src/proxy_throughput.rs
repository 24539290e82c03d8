//! `proxy-throughput`: the `proxy` example's bulk throughput and CPU per GiB, tokio-zcrx
//! against `tokio::io::copy_bidirectional` (`proxy --copy`), on the host.
//!
//! ```text
//! cargo build --release -p tokio-zcrx-examples --example proxy
//! cargo run --release -p tokio-zcrx-bench --bin proxy-throughput -- [--rounds 7 --secs 3
//!     --conns 1,16 --mode copy --proxy PATH]
//! ```
//!
//! Each run starts a fresh proxy process (`target/release/examples/proxy` next to this
//! binary, or `--proxy PATH`), `--mode MODE` (default `copy`) or `--copy`, in front of an
//! upstream sink in this process; `--conns` clients write 64 KiB at a time as fast as the
//! proxy takes it. After a 0.5 s warm-up, for `--secs` seconds, it counts the bytes the sink
//! receives and the proxy process's CPU time (user + system, all threads, from
//! `/proc/PID/stat`). The two proxies alternate within each round, which one goes first
//! switching every round. Printed per connection count: each proxy's median [range] of
//! Gbit/s and CPU seconds per GiB, the ratio of the medians and the median [range] of the
//! ratios within each round (runs seconds apart, so load that comes and goes moves them less).
//!
//! One direction only (clients to upstream): the proxy's two directions are the same code,
//! and one direction keeps the sink's count a clean measure of what was forwarded.
//!
//! The hook for the guest's nic-mode forwarding benchmark (issue 13, once the zero-copy send
//! API is in): `--mode` is passed to the proxy as it is, and the proxy's `forward` is the one
//! call that switches to zero-copy sends. What the guest run still needs: the clients in the
//! peer namespace (`/run/netns/nsb`), the proxy listening on the netdevsim address with
//! `--interface nsim0 --queue 0`, and an `xtask vm-bench` entry to run it; see
//! docs/benchmarks.md.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
}

struct Settings {
    rounds: usize,
    secs: f64,
    conns: Vec<usize>,
    mode: String,
    proxy: PathBuf,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    gbps: f64,
    cpu_s_per_gib: f64,
}

/// The proxy process, killed if still running when dropped.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
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
            .args(["--listen", "127.0.0.1:0", "--json", "--upstream"])
            .arg(upstream.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        match proxy {
            Proxy::Zcrx => command.args(["--mode", &settings.mode]),
            Proxy::CopyBidirectional => command.arg("--copy"),
        };
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; build it with `cargo build --release -p \
                 tokio-zcrx-examples --example proxy` or pass --proxy PATH",
                settings.proxy.display()
            )
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("no line from the proxy").unwrap();
        let listening: serde_json::Value = serde_json::from_str(&first).unwrap();
        let addr = listening["addr"].as_str().unwrap().parse().unwrap();
        if proxy == Proxy::Zcrx {
            assert_eq!(listening["mode"], settings.mode.as_str(), "{first}");
        }
        // The rest of its output (ticks, connections) is read and dropped so it never blocks.
        std::thread::spawn(move || lines.for_each(drop));
        ProxyProcess { child, addr }
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
async fn start_sink(received: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
        let mut socket = TcpStream::connect(process.addr).await.unwrap();
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
    drop(process);
    assert!(bytes > 0, "{} forwarded nothing", proxy.name());
    Sample {
        gbps: bytes as f64 * 8.0 / seconds / 1e9,
        cpu_s_per_gib: cpu / (bytes as f64 / (1u64 << 30) as f64),
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
    };
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
            Long("help") | Short('h') => {
                println!(
                    "usage: proxy-throughput [--rounds N] [--secs S] [--conns 1,16] \
                     [--mode copy|nodev|nic] [--proxy PATH]"
                );
                std::process::exit(0);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(settings)
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
         against copy_bidirectional (64 KiB buffers)",
        settings.rounds, settings.secs, IO_SIZE, settings.mode
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let received = Arc::new(AtomicU64::new(0));
        let upstream = start_sink(Arc::clone(&received)).await;
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
                let mut ratios: Vec<f64> = samples[0]
                    .iter()
                    .zip(&samples[1])
                    .map(|(z, t)| value(z) / value(t))
                    .collect();
                let mid = median(&mut ratios);
                (mid, ratios[0], ratios[ratios.len() - 1])
            };
            let (rate_ratio, cost_ratio) = (paired(|s| s.gbps), paired(|s| s.cpu_s_per_gib));
            println!(
                "  tokio-zcrx / copy_bidirectional: {:.3}x throughput, {:.3}x CPU per GiB; per \
                 round: {:.3}x [{:.3}-{:.3}], {:.3}x [{:.3}-{:.3}]",
                medians[0].0 / medians[1].0,
                medians[0].1 / medians[1].1,
                rate_ratio.0,
                rate_ratio.1,
                rate_ratio.2,
                cost_ratio.0,
                cost_ratio.1,
                cost_ratio.2
            );
        }
    });
}
