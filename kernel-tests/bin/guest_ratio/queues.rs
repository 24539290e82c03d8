//! Every receive queue of the guest's netdevsim port at once (`--queues 4`): three receivers
//! of the same traffic, alternating, in one run:
//!
//! - **tokio-zcrx**: `Builder::interface_queues(nsim0, QueueSet::All)` (a zcrx binding, area
//!   and driver thread per queue) on a 2-worker Tokio runtime; connections accepted with
//!   `ZcListener` (each handed to the driver of the queue its NAPI id names), one task per
//!   `ZcStream`, every chunk checked and dropped; `copy_bytes == 0` asserted on every queue.
//! - **raw loop**: one thread per queue, each with its own ring and zcrx binding
//!   (`RawZcrx`), receiving all of its queue's connections with one multishot RECV_ZC each
//!   (`receive_streams`); every socket goes to the thread of the queue its
//!   `SO_INCOMING_NAPI_ID` names, every chunk is checked and returned at once.
//! - **tokio read**: plain `tokio::net::TcpStream::read` on a 2-worker Tokio runtime, one task
//!   per connection with its own reused 64 KiB buffer, every byte checked; no zcrx binding.
//!
//! The sender is a separate process (this binary again, `--send`) in the peer namespace, so
//! the receiving process's CPU time is the receiver's alone. Flows are spread over the four
//! queues by the peer's flow hash (`SpreadFlows`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio_zcrx::{probe, QueueSet, ZcListener};
use tokio_zcrx_kernel_tests::support::{build, nic, SpreadFlows};
use tokio_zcrx_kernel_tests::{
    enter_netns, first_mismatch, pattern_byte, receive_streams, Config, GuestNet, RawZcrx, Target,
};

use crate::usage::{ratio_interval, system_cpu, verdict, Spread, Usage};

/// Per queue, for both zero-copy receivers: the single-queue comparison's sizes.
const AREA: usize = 32 << 20;
const REFILL_ENTRIES: u32 = 8192;
const CQ_ENTRIES: u32 = 8192;
/// Tokio read's buffer, one per connection, reused.
const READ_BUFFER: usize = 64 << 10;
/// Tokio worker threads for tokio-zcrx's consumers and for tokio read: the guest's vCPUs.
const WORKERS: usize = 2;
/// The sender's writes.
const SEND_BUFFER: usize = 256 << 10;
/// Longest a run may take before the benchmark gives up (a stalled connection would
/// otherwise hold the guest until the host's timeout).
const RUN_LIMIT: Duration = Duration::from_secs(300);

pub(crate) struct Options {
    pub(crate) queues: u32,
    pub(crate) mib: u64,
    pub(crate) reps: usize,
    pub(crate) conns: usize,
    pub(crate) detail: bool,
    /// Also run tokio-zcrx with `stream_budget(u64::MAX)`: no per-stream budget, so TCP
    /// tunes each socket's receive buffer as for the other receivers (a diagnosis).
    pub(crate) unbudgeted: bool,
    /// Also run tokio-zcrx with `stream_budget(BYTES)`: one fixed budget for every stream,
    /// which still sizes each socket's receive buffer (a diagnosis).
    pub(crate) fixed_budget: Option<u64>,
    /// Also run tokio-zcrx with consumers that take `next_batch(64)` instead of `next()`:
    /// what the consumer API's cost per buffer is (tokio read takes up to 64 KiB per call).
    pub(crate) batches: bool,
    /// Also run tokio-zcrx with chunks of this many bytes (`Builder::chunk_size`, Linux 7.0+,
    /// the area on huge pages): how much of the runtime's cost is per buffer.
    pub(crate) chunk: Option<u32>,
    /// Also run tokio read with each connection reading into successive 64 KiB windows of
    /// its own share of as much memory as tokio-zcrx's areas, instead of one reused 64 KiB
    /// buffer: what touching fresh memory for every read costs in this guest, as every
    /// zero-copy receiver does (its chunks are spread over the area).
    pub(crate) read_spread: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Receiver {
    Zcrx,
    Raw,
    Read,
    ZcrxUnbudgeted,
    ZcrxFixedBudget,
    ZcrxBatches,
    ZcrxLargeChunks,
    ReadSpread,
}

impl Receiver {
    fn name(self) -> &'static str {
        match self {
            Receiver::Zcrx => "tokio-zcrx",
            Receiver::ZcrxUnbudgeted => "tokio-zcrx unbudgeted",
            Receiver::ZcrxFixedBudget => "tokio-zcrx fixed budget",
            Receiver::ZcrxBatches => "tokio-zcrx next_batch",
            Receiver::ZcrxLargeChunks => "tokio-zcrx large chunks",
            Receiver::Raw => "raw loop",
            Receiver::Read => "tokio read",
            Receiver::ReadSpread => "tokio read spread",
        }
    }
}

/// One run of one receiver.
struct Sample {
    /// From the first accepted connection to the last byte of the last one.
    elapsed: Duration,
    /// The receiving process's user + system time over `elapsed`.
    cpu: Duration,
    /// The sender process's user + system time, its whole life.
    sender_cpu: Duration,
    /// The guest's busy CPU time (all CPUs) over `elapsed`.
    guest_busy: f64,
    /// The guest's softirq time (all CPUs) over `elapsed`, whatever thread it ran on.
    softirq: f64,
    /// Packets the receiving port took in (data) and sent (acknowledgements) over `elapsed`.
    rx_packets: u64,
    tx_packets: u64,
}

/// A counter of the receiving port (`/sys/class/net/IF/statistics/NAME`).
fn port_counter(nic: &str, name: &str) -> u64 {
    let path = format!("/sys/class/net/{nic}/statistics/{name}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The whole benchmark, with its results and whether the target was met printed.
pub(crate) fn run(net: &GuestNet, options: &Options) {
    let available = probe::rx_queues(&net.nic)
        .unwrap_or_else(|e| panic!("QUEUE_GET on {}: {e}", net.nic))
        .len() as u32;
    if options.queues != available {
        eprintln!(
            "guest-ratio: --queues {} but {} has {available} rx queues: the multi-queue \
             comparison binds every queue (--queues {available}); --queues 1 is the \
             single-queue one",
            options.queues, net.nic
        );
        std::process::exit(2);
    }
    let conns = options.conns;
    let per_conn = (options.mib << 20) / conns as u64;
    let total = per_conn * conns as u64;
    let gib = total as f64 / f64::from(1 << 30);
    println!(
        "{} queues of {}: tokio-zcrx (interface_queues all) vs a raw loop (a thread per \
         queue) vs tokio read, in the guest (TCG: only ratios count); {conns} connections of \
         {} MiB per run, {} alternating reps, median [min-max]",
        options.queues,
        net.nic,
        per_conn >> 20,
        options.reps
    );
    println!(
        "CPU = the receiving process's user + system time (getrusage RUSAGE_SELF: all its \
         threads; the sender is another process), first accept to last byte"
    );
    // Every connection carries the same pattern stream: precomputed once, so checking a
    // chunk is a memcmp and the sender writes without computing.
    let pattern: Arc<Vec<u8>> = Arc::new((0..per_conn).map(pattern_byte).collect());
    let mut receivers = vec![Receiver::Zcrx, Receiver::Raw, Receiver::Read];
    if options.unbudgeted {
        receivers.push(Receiver::ZcrxUnbudgeted);
    }
    if options.fixed_budget.is_some() {
        receivers.push(Receiver::ZcrxFixedBudget);
    }
    if options.batches {
        receivers.push(Receiver::ZcrxBatches);
    }
    if options.chunk.is_some() {
        receivers.push(Receiver::ZcrxLargeChunks);
    }
    if options.read_spread {
        receivers.push(Receiver::ReadSpread);
    }
    let spread = SpreadFlows::new(net);
    let mut samples: Vec<(Receiver, Sample)> = Vec::new();
    for rep in 0..options.reps {
        // Alternate, and rotate who goes first, so drift in the emulator affects all alike.
        for i in 0..receivers.len() {
            let receiver = receivers[(rep + i) % receivers.len()];
            let watchdog = watchdog(receiver.name());
            let sample = match receiver {
                Receiver::Zcrx => zcrx_run(net, options, &pattern, Variant::DEFAULT),
                Receiver::ZcrxUnbudgeted => zcrx_run(
                    net,
                    options,
                    &pattern,
                    Variant {
                        budget: Some(u64::MAX),
                        ..Variant::DEFAULT
                    },
                ),
                Receiver::ZcrxFixedBudget => zcrx_run(
                    net,
                    options,
                    &pattern,
                    Variant {
                        budget: options.fixed_budget,
                        ..Variant::DEFAULT
                    },
                ),
                Receiver::ZcrxBatches => zcrx_run(
                    net,
                    options,
                    &pattern,
                    Variant {
                        consume: Consume::Batches,
                        ..Variant::DEFAULT
                    },
                ),
                Receiver::ZcrxLargeChunks => zcrx_run(
                    net,
                    options,
                    &pattern,
                    Variant {
                        chunk: options.chunk,
                        ..Variant::DEFAULT
                    },
                ),
                Receiver::Raw => raw_run(net, options, &pattern),
                Receiver::Read => read_run(net, options, &pattern, false),
                Receiver::ReadSpread => read_run(net, options, &pattern, true),
            };
            drop(watchdog);
            println!(
                "  rep {rep} {:<21} {:6.1} MiB/s  cpu {:5.2} s ({:5.1} s/GiB)  sender {:5.2} s  \
                 guest busy {:5.2} s of {:5.2} s x2, softirq {:5.2} s  \
                 {}: {} packets in ({:.1} KiB each), {} out",
                receiver.name(),
                total as f64 / f64::from(1 << 20) / sample.elapsed.as_secs_f64(),
                sample.cpu.as_secs_f64(),
                sample.cpu.as_secs_f64() / gib,
                sample.sender_cpu.as_secs_f64(),
                sample.guest_busy,
                sample.elapsed.as_secs_f64(),
                sample.softirq,
                net.nic,
                sample.rx_packets,
                total as f64 / 1024.0 / sample.rx_packets.max(1) as f64,
                sample.tx_packets,
            );
            samples.push((receiver, sample));
        }
    }
    drop(spread);

    let of = |receiver: Receiver| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|(r, _)| *r == receiver)
            .map(|(_, s)| s)
            .collect()
    };
    let rate = |s: &Sample| total as f64 / f64::from(1 << 20) / s.elapsed.as_secs_f64();
    let cpu_per_gib = |s: &Sample| s.cpu.as_secs_f64() / gib;
    println!("per GiB received, median [min-max] of the reps:");
    println!(
        "{:<21} {:>20} {:>20} {:>20} {:>20} {:>20}",
        "receiver", "MiB/s", "receiver CPU s", "sender CPU s", "guest busy s", "softirq s"
    );
    for &receiver in &receivers {
        let runs = of(receiver);
        let per_gib = |value: &dyn Fn(&Sample) -> f64| {
            Spread::of(&runs.iter().map(|s| value(s) / gib).collect::<Vec<_>>()).precision(2)
        };
        println!(
            "{:<21} {:>20} {:>20} {:>20} {:>20} {:>20}",
            receiver.name(),
            Spread::of(&runs.iter().map(|s| rate(s)).collect::<Vec<_>>()),
            per_gib(&|s| s.cpu.as_secs_f64()),
            per_gib(&|s| s.sender_cpu.as_secs_f64()),
            per_gib(&|s| s.guest_busy),
            per_gib(&|s| s.softirq),
        );
    }
    // Ratios of the medians, and each rep's own ratio (its runs ran back to back).
    let ratio = |a: Receiver, b: Receiver, value: &dyn Fn(&Sample) -> f64| {
        let (a, b) = (of(a), of(b));
        let median = |runs: &[&Sample]| {
            Spread::of(&runs.iter().map(|s| value(s)).collect::<Vec<_>>()).median
        };
        let per_rep: Vec<f64> = a.iter().zip(&b).map(|(a, b)| value(a) / value(b)).collect();
        (median(&a) / median(&b), Spread::of(&per_rep).precision(2))
    };
    // Against the target: the ratio of the medians with its bootstrap interval over the reps,
    // and whether this sitting settles it.
    let against_target = |a: Receiver| {
        let values = |r: Receiver| of(r).iter().map(|s| cpu_per_gib(s)).collect::<Vec<_>>();
        let interval = ratio_interval(&values(a), &values(Receiver::Read));
        format!(
            "90% interval [{:.2}-{:.2}]; target <= 0.7x: {}",
            interval.0,
            interval.1,
            verdict(interval, 0.7)
        )
    };
    let (throughput, throughput_reps) = ratio(Receiver::Zcrx, Receiver::Raw, &rate);
    let (cpu, cpu_reps) = ratio(Receiver::Zcrx, Receiver::Read, &cpu_per_gib);
    let (raw_cpu, raw_cpu_reps) = ratio(Receiver::Raw, Receiver::Read, &cpu_per_gib);
    let (read_rate, read_rate_reps) = ratio(Receiver::Zcrx, Receiver::Read, &rate);
    println!(
        "tokio-zcrx / raw loop, throughput:         {throughput:.2}x (medians); per rep {throughput_reps}"
    );
    println!(
        "tokio-zcrx / tokio read, CPU per GiB:      {cpu:.2}x (medians); per rep {cpu_reps}; {}",
        against_target(Receiver::Zcrx)
    );
    println!("raw loop / tokio read, CPU per GiB:        {raw_cpu:.2}x (medians); per rep {raw_cpu_reps}");
    println!(
        "tokio-zcrx / tokio read, throughput:       {read_rate:.2}x (medians); per rep {read_rate_reps}"
    );
    if options.unbudgeted {
        let (cpu, cpu_reps) = ratio(Receiver::ZcrxUnbudgeted, Receiver::Read, &cpu_per_gib);
        let (rate, rate_reps) = ratio(Receiver::ZcrxUnbudgeted, Receiver::Raw, &rate);
        println!(
            "unbudgeted / tokio read, CPU per GiB:      {cpu:.2}x (medians); per rep {cpu_reps}"
        );
        println!(
            "unbudgeted / raw loop, throughput:         {rate:.2}x (medians); per rep {rate_reps}"
        );
    }
    if options.batches {
        let (cpu, cpu_reps) = ratio(Receiver::ZcrxBatches, Receiver::Read, &cpu_per_gib);
        println!(
            "next_batch / tokio read, CPU per GiB:      {cpu:.2}x (medians); per rep {cpu_reps}; {}",
            against_target(Receiver::ZcrxBatches)
        );
    }
    if options.fixed_budget.is_some() {
        let (cpu, cpu_reps) = ratio(Receiver::ZcrxFixedBudget, Receiver::Read, &cpu_per_gib);
        println!(
            "fixed budget / tokio read, CPU per GiB:    {cpu:.2}x (medians); per rep {cpu_reps}"
        );
    }
    if options.read_spread {
        let (cpu, cpu_reps) = ratio(Receiver::ReadSpread, Receiver::Read, &cpu_per_gib);
        println!(
            "read spread / tokio read, CPU per GiB:     {cpu:.2}x (medians); per rep {cpu_reps}"
        );
        let (cpu, cpu_reps) = ratio(Receiver::Zcrx, Receiver::ReadSpread, &cpu_per_gib);
        println!(
            "tokio-zcrx / read spread, CPU per GiB:     {cpu:.2}x (medians); per rep {cpu_reps}"
        );
    }
    if let Some(chunk) = options.chunk {
        let (cpu, cpu_reps) = ratio(Receiver::ZcrxLargeChunks, Receiver::Read, &cpu_per_gib);
        let (rate, rate_reps) = ratio(Receiver::ZcrxLargeChunks, Receiver::Read, &rate);
        println!(
            "{} KiB chunks / tokio read, CPU per GiB:  {cpu:.2}x (medians); per rep {cpu_reps}; {}",
            chunk >> 10,
            against_target(Receiver::ZcrxLargeChunks)
        );
        println!(
            "{} KiB chunks / tokio read, throughput:   {rate:.2}x (medians); per rep {rate_reps}",
            chunk >> 10
        );
    }
}

/// Ends the process if the run `name` takes longer than [`RUN_LIMIT`]; dropping the
/// returned sender disarms it.
fn watchdog(name: &'static str) -> mpsc::Sender<()> {
    let (disarm, armed) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = armed.recv_timeout(RUN_LIMIT) {
            eprintln!("guest-ratio: the {name} run did not finish in {RUN_LIMIT:?}: giving up");
            std::process::exit(3);
        }
    });
    disarm
}

/// Checks one chunk of a connection's stream against the pattern.
fn check(pattern: &[u8], position: u64, data: &[u8]) {
    let start = position as usize;
    let end = start + data.len();
    if end > pattern.len() {
        panic!(
            "a stream carried more than the {} bytes sent ({end})",
            pattern.len()
        );
    }
    if data != &pattern[start..end] {
        let i = first_mismatch(position, data).unwrap_or(0);
        panic!("byte {} of a stream is wrong", position + i as u64);
    }
}

/// The sender: this binary again (`--send`), in the peer namespace.
struct Sender(Child);

impl Sender {
    fn spawn(net: &GuestNet, addr: SocketAddr, conns: usize, per_conn: u64) -> Sender {
        let child = Command::new(std::env::current_exe().expect("this binary's path"))
            .args(["--send", &addr.to_string()])
            .args(["--conns", &conns.to_string()])
            .args(["--bytes", &per_conn.to_string()])
            .args(["--netns", &net.peer_netns])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the sender process");
        Sender(child)
    }

    /// Waits for the sender to exit successfully; returns the CPU time it used sending.
    fn wait(self) -> Duration {
        let output = self.0.wait_with_output().expect("waiting for the sender");
        assert!(
            output.status.success(),
            "the sender failed: {}",
            output.status
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let seconds: f64 = text
            .lines()
            .find_map(|line| line.strip_prefix("sender-cpu "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("the sender did not report its CPU time: {text:?}"));
        Duration::from_secs_f64(seconds)
    }
}

/// `--send ADDR --conns N --bytes B --netns PATH`: N connections to ADDR from the namespace,
/// each sending the first B bytes of the pattern and closing. Prints `sender-cpu SECONDS`:
/// its user + system time from the first connect on (making the pattern is not counted).
pub(crate) fn send_main(args: &[String]) {
    let value = |key: &str| -> &str {
        args.iter()
            .position(|a| a == key)
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("--send needs {key}"))
    };
    let addr: SocketAddr = value("--send").parse().expect("--send ADDR");
    let conns: usize = value("--conns").parse().expect("--conns N");
    let bytes: u64 = value("--bytes").parse().expect("--bytes B");
    // Threads made from here on are in the namespace too.
    enter_netns(value("--netns"));
    let pattern: Arc<Vec<u8>> = Arc::new((0..bytes).map(pattern_byte).collect());
    let before = Usage::now().cpu;
    let senders: Vec<_> = (0..conns)
        .map(|_| {
            let pattern = Arc::clone(&pattern);
            std::thread::spawn(move || {
                use std::io::Write;
                let mut stream = TcpStream::connect(addr).expect("sender: connect");
                for piece in pattern.chunks(SEND_BUFFER) {
                    stream.write_all(piece).expect("sender: write");
                }
                stream
                    .shutdown(std::net::Shutdown::Write)
                    .expect("sender: shutdown");
            })
        })
        .collect();
    for sender in senders {
        sender.join().expect("a sender thread panicked");
    }
    println!("sender-cpu {}", (Usage::now().cpu - before).as_secs_f64());
}

/// When the measured interval began.
struct Clock {
    started: Instant,
    usage: Usage,
    busy: f64,
    softirq: f64,
    nic: String,
    rx_packets: u64,
    tx_packets: u64,
}

impl Clock {
    fn start(net: &GuestNet) -> Clock {
        Clock {
            started: Instant::now(),
            usage: Usage::now(),
            busy: system_cpu().busy,
            softirq: system_cpu().softirq,
            rx_packets: port_counter(&net.nic, "rx_packets"),
            tx_packets: port_counter(&net.nic, "tx_packets"),
            nic: net.nic.clone(),
        }
    }

    /// Ends the interval: the sample (without the sender's time) and the usage at its end.
    fn stop(self, label: &str, detail: bool) -> Sample {
        let elapsed = self.started.elapsed();
        let usage = Usage::now();
        let system = system_cpu();
        if detail {
            usage.report(&self.usage, label, elapsed);
        }
        Sample {
            elapsed,
            cpu: usage.cpu - self.usage.cpu,
            sender_cpu: Duration::ZERO,
            guest_busy: system.busy - self.busy,
            softirq: system.softirq - self.softirq,
            rx_packets: port_counter(&self.nic, "rx_packets") - self.rx_packets,
            tx_packets: port_counter(&self.nic, "tx_packets") - self.tx_packets,
        }
    }
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .unwrap()
}

/// How tokio-zcrx's consumers take their buffers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Consume {
    /// `ZcStream::next`, each buffer checked and dropped.
    EachBuffer,
    /// `ZcStream::next_batch(64)`, each batch checked and dropped whole.
    Batches,
}

/// What one tokio-zcrx receiver changes from the defaults.
#[derive(Clone, Copy)]
struct Variant {
    /// The `stream_budget` set, if any.
    budget: Option<u64>,
    consume: Consume,
    /// The `chunk_size` set, if any (the area then on huge pages, `HugePages::Auto`).
    chunk: Option<u32>,
}

impl Variant {
    const DEFAULT: Variant = Variant {
        budget: None,
        consume: Consume::EachBuffer,
        chunk: None,
    };
}

/// tokio-zcrx on every queue.
fn zcrx_run(net: &GuestNet, options: &Options, pattern: &Arc<Vec<u8>>, variant: Variant) -> Sample {
    let Variant {
        budget,
        consume,
        chunk,
    } = variant;
    let conns = options.conns;
    let per_conn = pattern.len() as u64;
    let mut builder = nic(net)
        .interface_queues(&net.nic, QueueSet::All)
        .area_size(AREA)
        .refill_entries(REFILL_ENTRIES)
        .cq_entries(CQ_ENTRIES);
    if let Some(bytes) = budget {
        builder = builder.stream_budget(bytes);
    }
    if let Some(bytes) = chunk {
        builder = builder.chunk_size(bytes);
    }
    let zcrx = build(builder);
    let label = match (budget, chunk) {
        (_, Some(_)) => "large chunks",
        (None, None) if consume == Consume::Batches => "next_batch",
        (None, None) => "tokio-zcrx",
        (Some(u64::MAX), None) => "unbudgeted",
        (Some(_), None) => "fixed budget",
    };
    assert_eq!(
        zcrx.mode_selection().queues_bound.len(),
        options.queues as usize,
        "{}",
        zcrx.mode_selection()
    );
    let tokio = tokio_runtime();
    let (mut sample, sender) = tokio.block_on(async {
        let listener = ZcListener::bind(&zcrx, (net.nic_addr.as_str(), 0))
            .await
            .unwrap();
        let sender = Sender::spawn(net, listener.local_addr().unwrap(), conns, per_conn);
        let mut clock = None;
        let mut readers = Vec::new();
        for _ in 0..conns {
            let (mut stream, writer, _) = listener.accept().await.unwrap();
            clock.get_or_insert_with(|| Clock::start(net));
            let pattern = Arc::clone(pattern);
            readers.push(tokio::spawn(async move {
                let _writer = writer;
                let mut position = 0;
                match consume {
                    Consume::EachBuffer => {
                        while let Some(buf) = stream.next().await {
                            let buf = buf.expect("stream error");
                            check(&pattern, position, &buf);
                            position += buf.len() as u64;
                        }
                    }
                    Consume::Batches => {
                        while let Some(batch) = stream.next_batch(64).await {
                            for buf in batch.expect("stream error").iter() {
                                check(&pattern, position, buf);
                                position += buf.len() as u64;
                            }
                        }
                    }
                }
                position
            }));
        }
        for reader in readers {
            assert_eq!(reader.await.unwrap(), per_conn, "a stream ended early");
        }
        let sample = clock.unwrap().stop(label, options.detail);
        (sample, sender)
    });
    let stats = zcrx.stats();
    let mut spread = Vec::new();
    for queue in zcrx.queue_stats() {
        assert_eq!(
            queue.stats.copy_bytes,
            Some(0),
            "tokio-zcrx: queue {} copied: {}",
            queue.queue,
            queue.stats
        );
        assert_eq!(queue.stats.bytes % per_conn, 0, "queue {}", queue.queue);
        spread.push(queue.stats.bytes / per_conn);
    }
    assert_eq!(stats.unmatched_connections, 0, "{stats}");
    assert_eq!(stats.bytes, per_conn * conns as u64, "{stats}");
    if options.detail {
        println!("           connections per queue {spread:?}; {stats:?}");
    }
    tokio.block_on(zcrx.shutdown());
    sample.sender_cpu = sender.wait();
    sample
}

/// Registers a queue, waiting (up to 10 s) while the previous binding of it is still being
/// torn down by the kernel (EEXIST).
fn register(ifindex: u32, rxq: u32) -> RawZcrx {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match RawZcrx::register(Config {
            target: Target::Nic { ifindex, rxq },
            area_bytes: AREA,
            rq_entries: REFILL_ENTRIES,
            cq_entries: CQ_ENTRIES,
            events: true,
        }) {
            Ok(zcrx) => return zcrx,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("raw loop: registering queue {rxq}: {e}"),
        }
    }
}

/// Waits (up to 10 s) until `socket` has data, so that the kernel has recorded the NAPI id
/// its packets arrive through.
fn wait_readable(socket: &TcpStream) {
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let ready = unsafe { libc::poll(&mut poll, 1, 10_000) };
    assert_eq!(ready, 1, "a connection sent nothing for 10 s");
}

fn raw_run(net: &GuestNet, options: &Options, pattern: &Arc<Vec<u8>>) -> Sample {
    let (conns, queues) = (options.conns, options.queues);
    let per_conn = pattern.len() as u64;
    let ifindex = net.nic_ifindex();
    let (ready_tx, ready) = mpsc::channel::<()>();
    let (done_tx, done) = mpsc::channel::<(u32, Vec<u64>, u64)>();
    let release = Arc::new(Barrier::new(queues as usize + 1));
    let mut work = Vec::new();
    let mut threads = Vec::new();
    for queue in 0..queues {
        let (work_tx, work_rx) = mpsc::channel::<Vec<TcpStream>>();
        work.push(work_tx);
        let (ready_tx, done_tx) = (ready_tx.clone(), done_tx.clone());
        let (release, pattern) = (Arc::clone(&release), Arc::clone(pattern));
        let thread = std::thread::Builder::new()
            .name(format!("raw-q{queue}"))
            .spawn(move || {
                // A ring is used by the thread that made it (SINGLE_ISSUER).
                let mut zcrx = register(ifindex, queue);
                ready_tx.send(()).unwrap();
                drop(ready_tx);
                let sockets = work_rx.recv().unwrap();
                let fds: Vec<_> = sockets.iter().map(|s| s.as_raw_fd()).collect();
                let report = receive_streams(&mut zcrx, &fds, |_, position, data| {
                    check(&pattern, position, data)
                });
                let (_, copied) = zcrx.stats();
                done_tx.send((queue, report.stream_bytes, copied)).unwrap();
                // So that the main thread's wait ends if another thread panics.
                drop(done_tx);
                // Alive until the main thread has read every thread's CPU time.
                release.wait();
                drop(sockets);
            })
            .expect("spawning a raw loop thread");
        threads.push(thread);
    }
    drop((ready_tx, done_tx));
    for _ in 0..queues {
        ready.recv().expect("a raw loop thread failed to register");
    }
    // The NAPI ids as they are with every queue bound.
    let queue_of_napi: std::collections::BTreeMap<u32, u32> = probe::rx_queues(&net.nic)
        .unwrap()
        .iter()
        .map(|q| (q.napi_id.expect("netdevsim: a NAPI id per queue"), q.id))
        .collect();
    let listener = TcpListener::bind((net.nic_addr.as_str(), 0)).unwrap();
    let sender = Sender::spawn(net, listener.local_addr().unwrap(), conns, per_conn);
    let mut clock = None;
    let mut per_queue: Vec<Vec<TcpStream>> = (0..queues).map(|_| Vec::new()).collect();
    let sockets: Vec<TcpStream> = (0..conns)
        .map(|_| {
            let (socket, _) = listener.accept().unwrap();
            clock.get_or_insert_with(|| Clock::start(net));
            socket
        })
        .collect();
    for socket in sockets {
        wait_readable(&socket);
        let napi = probe::incoming_napi_id(&socket)
            .unwrap()
            .expect("a socket that received through netdevsim has a NAPI id");
        let queue = queue_of_napi[&napi];
        per_queue[queue as usize].push(socket);
    }
    let spread: Vec<usize> = per_queue.iter().map(Vec::len).collect();
    for (work, sockets) in work.iter().zip(per_queue) {
        work.send(sockets).unwrap();
    }
    let mut copied = 0;
    for _ in 0..queues {
        let (queue, stream_bytes, queue_copied) = done
            .recv()
            .expect("a raw loop thread failed (its panic is above)");
        assert!(
            stream_bytes.iter().all(|&b| b == per_conn),
            "raw loop: queue {queue}: a stream ended early: {stream_bytes:?}"
        );
        copied += queue_copied;
    }
    let mut sample = clock.unwrap().stop("raw loop", options.detail);
    if options.detail {
        println!("           connections per queue {spread:?}; copied {copied} bytes");
    }
    release.wait();
    for thread in threads {
        thread.join().unwrap();
    }
    sample.sender_cpu = sender.wait();
    assert_eq!(copied, 0, "raw loop: the kernel copied");
    sample
}

/// tokio read; with `spread`, each connection reads into successive 64 KiB windows of its
/// share of `queues` areas' worth of memory (written once beforehand, so no page is first
/// touched inside the measurement) instead of one reused buffer.
fn read_run(net: &GuestNet, options: &Options, pattern: &Arc<Vec<u8>>, spread: bool) -> Sample {
    let conns = options.conns;
    let per_conn = pattern.len() as u64;
    let share = if spread {
        (AREA * options.queues as usize / conns).max(READ_BUFFER) / READ_BUFFER * READ_BUFFER
    } else {
        READ_BUFFER
    };
    let mut buffers: Vec<Vec<u8>> = (0..conns).map(|_| vec![1u8; share]).collect();
    let label = if spread { "read spread" } else { "tokio read" };
    let tokio = tokio_runtime();
    let (mut sample, sender) = tokio.block_on(async {
        let listener = tokio::net::TcpListener::bind((net.nic_addr.as_str(), 0))
            .await
            .unwrap();
        let sender = Sender::spawn(net, listener.local_addr().unwrap(), conns, per_conn);
        let mut clock = None;
        let mut readers = Vec::new();
        for _ in 0..conns {
            let (mut socket, _) = listener.accept().await.unwrap();
            clock.get_or_insert_with(|| Clock::start(net));
            let pattern = Arc::clone(pattern);
            let mut memory = buffers.pop().expect("a buffer per connection");
            readers.push(tokio::spawn(async move {
                let mut position = 0;
                let mut at = 0;
                loop {
                    let window = &mut memory[at..at + READ_BUFFER];
                    let n = socket.read(window).await.expect("read");
                    if n == 0 {
                        break position;
                    }
                    check(&pattern, position, &window[..n]);
                    position += n as u64;
                    at = (at + READ_BUFFER) % memory.len();
                }
            }));
        }
        for reader in readers {
            assert_eq!(reader.await.unwrap(), per_conn, "a stream ended early");
        }
        (clock.unwrap().stop(label, options.detail), sender)
    });
    drop(tokio);
    sample.sender_cpu = sender.wait();
    sample
}
