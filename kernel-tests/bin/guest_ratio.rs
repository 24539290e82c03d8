//! The runtime's zcrx receive against a minimal raw receive loop, in the QEMU guest.
//!
//! ```text
//! cargo xtask vm-bench [-- --mib 256 --reps 7 --batches --detail]
//! ```
//!
//! Guest timings are emulated (QEMU TCG), so only the ratio between the two receivers on the
//! same kernel and traffic means anything. The raw loop is the plainest user of the kernel
//! ABI (`tokio_zcrx_kernel_tests::receive_all`: one thread, multishot RECV_ZC, every chunk
//! checked and returned at once). The runtime receiver reads one `ZcStream` on a
//! multi-threaded Tokio runtime, checks every chunk the same way and drops it. Both run in nic
//! mode on the netdevsim queue (peer in its namespace) and in nodev mode over loopback.
//! Target: the runtime at least 0.9x the raw loop's throughput.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_zcrx::{EventsPolicy, Mode, Zcrx};
use tokio_zcrx_kernel_tests::{
    first_mismatch, listen, receive_all, spawn_sender, Config, GuestNet, RawZcrx, Target,
};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Nic,
    NoDevice,
}

fn raw(kind: Kind, net: &GuestNet, total: u64, detail: bool) -> Duration {
    let target = match kind {
        Kind::Nic => Target::Nic {
            ifindex: net.nic_ifindex(),
            rxq: 0,
        },
        Kind::NoDevice => Target::Nodev,
    };
    let mut zcrx = RawZcrx::register(Config {
        target,
        area_bytes: 32 << 20,
        rq_entries: 8192,
        cq_entries: 8192,
        events: true,
    })
    .expect("raw registration");
    let (ip, netns) = endpoint(kind, net);
    let (listener, addr) = listen(&ip);
    let sender = spawn_sender(addr, total, netns);
    let (conn, _) = listener.accept().unwrap();
    let before = Usage::now();
    let started = Instant::now();
    let report = receive_all(&mut zcrx, conn.as_raw_fd(), total);
    let elapsed = started.elapsed();
    if detail {
        Usage::now().report(&before, "raw", elapsed);
    }
    assert_eq!(sender.join().unwrap(), total);
    assert_eq!(report.bytes, total);
    elapsed
}

fn endpoint(kind: Kind, net: &GuestNet) -> (String, Option<String>) {
    match kind {
        Kind::Nic => (net.nic_addr.clone(), Some(net.peer_netns.clone())),
        Kind::NoDevice => ("127.0.0.1".into(), None),
    }
}

fn runtime(kind: Kind, net: &GuestNet, total: u64, detail: bool, batches: bool) -> Duration {
    let builder = match kind {
        Kind::Nic => Zcrx::builder().mode(Mode::Nic).interface(&net.nic, 0),
        Kind::NoDevice => Zcrx::builder().mode(Mode::NoDevice),
    };
    // The same sizes as the raw loop.
    let builder = builder
        .area_size(32 << 20)
        .refill_entries(8192)
        .cq_entries(8192)
        .events(EventsPolicy::Required);
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (ip, netns) = endpoint(kind, net);
    tokio.block_on(async {
        let zcrx = loop {
            match builder.clone().build() {
                Ok(zcrx) => break zcrx,
                // The previous instance on this queue may still be tearing down.
                Err(e) if e.kind() == tokio_zcrx::ErrorKind::QueueBusy => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("runtime: {e}"),
            }
        };
        let listener = tokio::net::TcpListener::bind((ip.as_str(), 0))
            .await
            .unwrap();
        let sender = spawn_sender(listener.local_addr().unwrap(), total, netns);
        let (socket, _) = listener.accept().await.unwrap();
        let (mut stream, _writer) = zcrx.attach(socket).unwrap();
        let before = Usage::now();
        let started = Instant::now();
        let mut position = 0u64;
        if batches {
            while let Some(batch) = stream.next_batch(64).await {
                for buf in batch.unwrap().iter() {
                    assert_eq!(first_mismatch(position, buf), None, "byte at {position}");
                    position += buf.len() as u64;
                }
            }
        } else {
            while let Some(buf) = stream.next().await {
                let buf = buf.unwrap();
                assert_eq!(first_mismatch(position, &buf), None, "byte at {position}");
                position += buf.len() as u64;
            }
        }
        let elapsed = started.elapsed();
        if detail {
            Usage::now().report(&before, "runtime", elapsed);
            println!("           {}", zcrx.stats());
        }
        assert_eq!(position, total);
        assert_eq!(sender.join().unwrap(), total);
        zcrx.shutdown().await;
        elapsed
    })
}

/// Process-wide CPU time and context switches, and CPU time per live thread (by name), so a
/// run can show where its time went (`--detail`).
#[derive(Clone, Default)]
struct Usage {
    cpu: Duration,
    voluntary_switches: i64,
    involuntary_switches: i64,
    /// Per live thread name: CPU ticks, voluntary and involuntary switches.
    threads: BTreeMap<String, (u64, u64, u64)>,
}

impl Usage {
    fn now() -> Usage {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        let mut threads = BTreeMap::new();
        for task in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ... utime stime are fields 14 and 15.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let name = stat[open + 1..close].to_string();
            let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
            let ticks: u64 =
                fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let switches = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let entry = threads.entry(name).or_insert((0, 0, 0));
            entry.0 += ticks;
            entry.1 += switches("voluntary_ctxt_switches:");
            entry.2 += switches("nonvoluntary_ctxt_switches:");
        }
        Usage {
            cpu: time(usage.ru_utime) + time(usage.ru_stime),
            voluntary_switches: usage.ru_nvcsw,
            involuntary_switches: usage.ru_nivcsw,
            threads,
        }
    }

    fn report(&self, before: &Usage, label: &str, elapsed: Duration) {
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut threads = String::new();
        for (name, (ticks, voluntary, involuntary)) in &self.threads {
            let (ticks0, voluntary0, involuntary0) =
                before.threads.get(name).copied().unwrap_or_default();
            // Threads of one name are summed; one that exited makes a sum shrink.
            if ticks > &ticks0 {
                threads += &format!(
                    " {name}={:.2}s/{}v/{}i",
                    (ticks - ticks0) as f64 / ticks_per_second,
                    voluntary.saturating_sub(voluntary0),
                    involuntary.saturating_sub(involuntary0)
                );
            }
        }
        println!(
            "  {label:<8} {:.2}s  cpu {:.2}s  switches {} voluntary {} involuntary  live threads:{threads}",
            elapsed.as_secs_f64(),
            (self.cpu - before.cpu).as_secs_f64(),
            self.voluntary_switches - before.voluntary_switches,
            self.involuntary_switches - before.involuntary_switches,
        );
    }
}

/// Median, minimum and maximum, shown as `median [min-max]`.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: sorted[sorted.len() / 2],
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = format!("{:.1} [{:.1}-{:.1}]", self.median, self.min, self.max);
        f.pad(&text)
    }
}

fn main() {
    let mut mib: u64 = 256;
    let mut reps = 7;
    let mut detail = false;
    let mut batches = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--detail" {
            detail = true;
            continue;
        }
        if arg == "--batches" {
            batches = true;
            continue;
        }
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), value) {
            ("--mib", Some(n)) if n > 0 => mib = n,
            ("--reps", Some(n)) if n > 0 => reps = n as usize,
            _ => {
                eprintln!("usage: guest-ratio [--mib N] [--reps R] [--batches] [--detail]");
                std::process::exit(2);
            }
        }
    }
    let net = GuestNet::from_env();
    let total = mib << 20;
    println!(
        "runtime vs raw zcrx receive in the guest (TCG: only ratios count), {mib} MiB per run, \
         {reps} alternating pairs, median [min-max]; the runtime's consumer uses {}",
        if batches { "next_batch(64)" } else { "next()" }
    );
    println!(
        "{:>6}  {:>22}  {:>22}  {:>13}  {:>17}",
        "mode", "raw MiB/s", "runtime MiB/s", "runtime / raw", "pairs' ratios"
    );
    let mut missed = false;
    for (kind, name) in [(Kind::Nic, "nic"), (Kind::NoDevice, "nodev")] {
        let (mut raw_rates, mut runtime_rates) = (Vec::new(), Vec::new());
        // Alternate, so drift in the emulator affects both alike.
        for _ in 0..reps {
            raw_rates.push(mib as f64 / raw(kind, &net, total, detail).as_secs_f64());
            runtime_rates
                .push(mib as f64 / runtime(kind, &net, total, detail, batches).as_secs_f64());
        }
        let pairs: Vec<f64> = runtime_rates
            .iter()
            .zip(&raw_rates)
            .map(|(runtime, raw)| runtime / raw)
            .collect();
        let (raw_rate, runtime_rate) = (Spread::of(&raw_rates), Spread::of(&runtime_rates));
        let pairs = Spread::of(&pairs);
        let ratio = runtime_rate.median / raw_rate.median;
        missed |= ratio < 0.9;
        println!(
            "{name:>6}  {raw_rate:>22}  {runtime_rate:>22}  {ratio:>12.2}x  {:>8.2}x-{:.2}x",
            pairs.min, pairs.max
        );
    }
    println!(
        "target: runtime >= 0.9x raw: {}",
        if missed { "MISSED" } else { "met" }
    );
}
