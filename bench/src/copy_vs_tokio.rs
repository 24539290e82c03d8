//! Copy mode against plain Tokio, request and reply, same process, same run (issue 10).
//!
//! ```text
//! cargo run --release -p tokio-zcrx-bench --bin copy-vs-tokio [-- --rounds 5 --secs 1.5
//!     --conns 64 --request 512 --buffer 65536 --workload echo|proxy --variant KEY]
//! ```
//!
//! `--variant` runs one server alone (keys `zcrx-echo`, `tokio-echo`, `zcrx-proxy`,
//! `tokio-copy-bidirectional`, `tokio-proxy`), e.g. under a profiler, one process per variant.
//!
//! Two workloads, each served by one current-thread runtime on its own thread (whose CPU
//! time is read with its thread CPU clock, so client load is not counted):
//!
//! - **echo**: the server reads what arrives and writes it back. tokio-zcrx copy mode
//!   (`next` + `write_all`) against Tokio `read` + `write_all` with a buffer of the same
//!   size per connection.
//! - **proxy**: the server forwards each connection to an echo backend and the replies
//!   back. tokio-zcrx copy mode on both sides against Tokio `copy_bidirectional_with_sizes`
//!   and `read` + `write_all`, buffers of the same size.
//!
//! The clients (and the proxy's backend) run on the main thread: `--conns` connections,
//! each sending a `--request`-byte request and waiting for the whole reply, for `--secs`
//! seconds per run. The variants of a workload alternate within every round (the order
//! rotates), for `--rounds` rounds; medians and ranges of requests per second and server
//! CPU per request are printed (and the clients' CPU per request), and the ratios to each
//! Tokio variant: of the medians, and the median \[range\] of the ratios within a round.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_zcrx::{Mode, ZcListener, Zcrx};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    ZcrxEcho,
    TokioEcho,
    ZcrxProxy,
    TokioCopyBidirectional,
    TokioProxy,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::ZcrxEcho => "tokio-zcrx copy echo",
            Variant::TokioEcho => "tokio read+write_all echo",
            Variant::ZcrxProxy => "tokio-zcrx copy proxy",
            Variant::TokioCopyBidirectional => "tokio copy_bidirectional proxy",
            Variant::TokioProxy => "tokio read+write_all proxy",
        }
    }

    /// The name `--variant` takes.
    fn key(self) -> &'static str {
        match self {
            Variant::ZcrxEcho => "zcrx-echo",
            Variant::TokioEcho => "tokio-echo",
            Variant::ZcrxProxy => "zcrx-proxy",
            Variant::TokioCopyBidirectional => "tokio-copy-bidirectional",
            Variant::TokioProxy => "tokio-proxy",
        }
    }

    fn is_zcrx(self) -> bool {
        matches!(self, Variant::ZcrxEcho | Variant::ZcrxProxy)
    }
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    rounds: usize,
    secs: f64,
    conns: usize,
    request: usize,
    buffer: usize,
    /// Run only this workload (`echo` or `proxy`), or both.
    workload: Option<&'static str>,
    /// Run only this variant (its `key`).
    variant: Option<&'static str>,
}

/// One run's result.
#[derive(Debug, Clone, Copy)]
struct Sample {
    requests_per_sec: f64,
    cpu_ns_per_request: f64,
    /// The clients' thread (and the proxy's backend), per request: when the server is not
    /// busy all the time, the clients may be what limits the rate.
    client_cpu_ns_per_request: f64,
}

/// The server's thread CPU clock, read from any thread.
fn thread_cpu_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; the clock is a live thread's.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Starts the server of `variant` on its own thread; returns its address and CPU clock.
fn start_server(
    variant: Variant,
    settings: Settings,
    backend: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (SocketAddr, libc::clockid_t, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: our own thread's CPU clock id, written to `clock`.
        let got = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        assert_eq!(got, 0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(serve(variant, settings, backend, clock, tx, stop));
    });
    let (addr, clock) = rx.recv().unwrap();
    (addr, clock, handle)
}

async fn serve(
    variant: Variant,
    settings: Settings,
    backend: SocketAddr,
    clock: libc::clockid_t,
    ready: std::sync::mpsc::Sender<(SocketAddr, libc::clockid_t)>,
    stop: Arc<AtomicBool>,
) {
    let buffer = settings.buffer;
    let stopper = async {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if variant.is_zcrx() {
        let zcrx = Zcrx::builder()
            .mode(Mode::Copy)
            .copy_pool(64, buffer)
            .build()
            .unwrap();
        let listener = ZcListener::bind(&zcrx, "127.0.0.1:0").await.unwrap();
        ready.send((listener.local_addr().unwrap(), clock)).unwrap();
        let accept = async {
            loop {
                let (mut stream, mut writer, _) = listener.accept().await.unwrap();
                // As the Tokio servers do: replies go out at once, not after Nagle's wait.
                writer.set_nodelay(true).unwrap();
                if variant == Variant::ZcrxEcho {
                    tokio::spawn(async move {
                        while let Some(Ok(buf)) = stream.next().await {
                            if writer.write_all(&buf).await.is_err() {
                                return;
                            }
                        }
                    });
                } else {
                    let upstream = TcpStream::connect(backend).await.unwrap();
                    upstream.set_nodelay(true).unwrap();
                    let (mut up_stream, mut up_writer) = zcrx.attach(upstream).unwrap();
                    tokio::spawn(async move {
                        while let Some(Ok(buf)) = stream.next().await {
                            if up_writer.write_all(&buf).await.is_err() {
                                return;
                            }
                        }
                    });
                    tokio::spawn(async move {
                        while let Some(Ok(buf)) = up_stream.next().await {
                            if writer.write_all(&buf).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        };
        tokio::select! { () = accept => {}, () = stopper => {} }
        zcrx.shutdown().await;
    } else {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        ready.send((listener.local_addr().unwrap(), clock)).unwrap();
        let accept = async {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                socket.set_nodelay(true).unwrap();
                match variant {
                    Variant::TokioEcho => {
                        tokio::spawn(async move {
                            let (mut read, mut write) = socket.into_split();
                            let mut buf = vec![0u8; buffer];
                            while let Ok(n) = read.read(&mut buf).await {
                                if n == 0 || write.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Variant::TokioCopyBidirectional => {
                        let mut upstream = TcpStream::connect(backend).await.unwrap();
                        upstream.set_nodelay(true).unwrap();
                        let mut socket = socket;
                        tokio::spawn(async move {
                            let _ = tokio::io::copy_bidirectional_with_sizes(
                                &mut socket,
                                &mut upstream,
                                buffer,
                                buffer,
                            )
                            .await;
                        });
                    }
                    _ => {
                        let upstream = TcpStream::connect(backend).await.unwrap();
                        upstream.set_nodelay(true).unwrap();
                        let (mut down_read, mut down_write) = socket.into_split();
                        let (mut up_read, mut up_write) = upstream.into_split();
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; buffer];
                            while let Ok(n) = down_read.read(&mut buf).await {
                                if n == 0 || up_write.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        });
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; buffer];
                            while let Ok(n) = up_read.read(&mut buf).await {
                                if n == 0 || down_write.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                }
            }
        };
        tokio::select! { () = accept => {}, () = stopper => {} }
    }
}

/// The proxy's backend: a plain Tokio echo server on the clients' runtime.
async fn start_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = socket.into_split();
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = read.read(&mut buf).await {
                    if n == 0 || write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn run(variant: Variant, settings: Settings, backend: SocketAddr) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, clock, server) = start_server(variant, settings, backend, Arc::clone(&stop));
    let count = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..settings.conns {
        let count = Arc::clone(&count);
        let done = Arc::clone(&done);
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket.set_nodelay(true).unwrap();
        clients.push(tokio::spawn(async move {
            let request: Vec<u8> = (0..settings.request).map(|j| (i + j) as u8).collect();
            let mut reply = vec![0u8; settings.request];
            while !done.load(Ordering::Relaxed) {
                socket.write_all(&request).await.unwrap();
                socket.read_exact(&mut reply).await.unwrap();
                assert!(reply == request, "a wrong reply");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm up, then measure a window.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (requests0, cpu0, client0, t0) = (
        count.load(Ordering::Relaxed),
        thread_cpu_ns(clock),
        thread_cpu_ns(libc::CLOCK_THREAD_CPUTIME_ID),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(settings.secs)).await;
    let (requests1, cpu1, client1, elapsed) = (
        count.load(Ordering::Relaxed),
        thread_cpu_ns(clock),
        thread_cpu_ns(libc::CLOCK_THREAD_CPUTIME_ID),
        t0.elapsed(),
    );
    done.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
    let requests = (requests1 - requests0) as f64;
    Sample {
        requests_per_sec: requests / elapsed.as_secs_f64(),
        cpu_ns_per_request: (cpu1 - cpu0) as f64 / requests,
        client_cpu_ns_per_request: (client1 - client0) as f64 / requests,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn main() {
    let mut settings = Settings {
        rounds: 5,
        secs: 1.5,
        conns: 64,
        request: 512,
        buffer: 64 << 10,
        workload: None,
        variant: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match arg.as_str() {
            "--rounds" => settings.rounds = value.parse().expect("--rounds N"),
            "--secs" => settings.secs = value.parse().expect("--secs S"),
            "--conns" => settings.conns = value.parse().expect("--conns N"),
            "--request" => settings.request = value.parse().expect("--request BYTES"),
            "--buffer" => settings.buffer = value.parse().expect("--buffer BYTES"),
            "--variant" => {
                let all = [
                    Variant::ZcrxEcho,
                    Variant::TokioEcho,
                    Variant::ZcrxProxy,
                    Variant::TokioCopyBidirectional,
                    Variant::TokioProxy,
                ];
                let variant = all.iter().find(|v| v.key() == value);
                settings.variant = Some(variant.expect("--variant KEY (see the docs)").key());
            }
            "--workload" => {
                settings.workload = match value.as_str() {
                    "echo" => Some("echo"),
                    "proxy" => Some("proxy"),
                    _ => panic!("--workload echo|proxy"),
                }
            }
            _ => {
                eprintln!(
                    "usage: copy-vs-tokio [--rounds N] [--secs S] [--conns N] \
                     [--request BYTES] [--buffer BYTES] [--workload echo|proxy] [--variant KEY]"
                );
                std::process::exit(2);
            }
        }
    }
    println!(
        "copy mode vs tokio: {} rounds x {} s, {} connections, {}-byte requests, {}-byte \
         buffers; server on one current-thread runtime, CPU from its thread clock",
        settings.rounds, settings.secs, settings.conns, settings.request, settings.buffer
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let backend = start_backend().await;
        let workloads: [(&str, Vec<Variant>); 2] = [
            ("echo", vec![Variant::ZcrxEcho, Variant::TokioEcho]),
            (
                "proxy",
                vec![
                    Variant::ZcrxProxy,
                    Variant::TokioCopyBidirectional,
                    Variant::TokioProxy,
                ],
            ),
        ];
        for (workload, mut variants) in workloads {
            variants.retain(|v| settings.variant.is_none_or(|only| only == v.key()));
            if variants.is_empty() || settings.workload.is_some_and(|only| only != workload) {
                continue;
            }
            let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
            for round in 0..settings.rounds {
                for k in 0..variants.len() {
                    let index = (k + round) % variants.len();
                    let sample = run(variants[index], settings, backend).await;
                    samples[index].push(sample);
                }
            }
            println!("\n{workload}:");
            let mut medians = Vec::new();
            for (variant, samples) in variants.iter().zip(&samples) {
                let mut rates: Vec<f64> = samples.iter().map(|s| s.requests_per_sec).collect();
                let mut cpu: Vec<f64> = samples.iter().map(|s| s.cpu_ns_per_request).collect();
                let mut client: Vec<f64> = samples
                    .iter()
                    .map(|s| s.client_cpu_ns_per_request)
                    .collect();
                let (rate, cost) = (median(&mut rates), median(&mut cpu));
                println!(
                    "  {:32} {:>9.0} req/s (range {:.0}..{:.0})  {:>6.0} ns CPU/req (range \
                     {:.0}..{:.0})  clients {:.0} ns/req",
                    variant.name(),
                    rate,
                    rates[0],
                    rates[rates.len() - 1],
                    cost,
                    cpu[0],
                    cpu[cpu.len() - 1],
                    median(&mut client)
                );
                medians.push((*variant, rate, cost));
            }
            let Some((zcrx_index, &(_, zcrx_rate, zcrx_cost))) =
                medians.iter().enumerate().find(|(_, m)| m.0.is_zcrx())
            else {
                continue;
            };
            for (index, &(variant, rate, cost)) in medians.iter().enumerate() {
                if index == zcrx_index {
                    continue;
                }
                // Also the ratios within each round (runs seconds apart), whose median is
                // less moved by load that comes and goes than the ratio of the medians.
                let paired = |value: fn(&Sample) -> f64| {
                    let mut ratios: Vec<f64> = samples[zcrx_index]
                        .iter()
                        .zip(&samples[index])
                        .map(|(z, t)| value(z) / value(t))
                        .collect();
                    let mid = median(&mut ratios);
                    (mid, ratios[0], ratios[ratios.len() - 1])
                };
                let rate_ratio = paired(|s| s.requests_per_sec);
                let cost_ratio = paired(|s| s.cpu_ns_per_request);
                println!(
                    "  tokio-zcrx / {}: {:.3}x throughput, {:.3}x CPU per request; per round: \
                     {:.3}x [{:.3}-{:.3}], {:.3}x [{:.3}-{:.3}]",
                    variant.name(),
                    zcrx_rate / rate,
                    zcrx_cost / cost,
                    rate_ratio.0,
                    rate_ratio.1,
                    rate_ratio.2,
                    cost_ratio.0,
                    cost_ratio.1,
                    cost_ratio.2
                );
            }
        }
    });
}
