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
//!
//! With `--queues 4` it binds every queue of the netdevsim port instead and compares three
//! receivers of connections spread over the queues (see `queues.rs`): tokio-zcrx with
//! `interface_queues`, a raw loop with a thread per queue, and tokio's `TcpStream::read`.

mod queues;
mod usage;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_zcrx::{EventsPolicy, Mode, Zcrx};
use tokio_zcrx_kernel_tests::{
    first_mismatch, listen, receive_all, spawn_sender, Config, GuestNet, RawZcrx, Target,
};
use usage::{Spread, Usage};

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

const USAGE: &str = "usage: guest-ratio [--mib N] [--reps R] [--batches] [--detail]
       guest-ratio --queues 4 [--conns C] [--mib N] [--reps R] [--detail]
                          [--unbudgeted] [--budget BYTES] [--batches] [--chunk BYTES]
                          [--read-spread]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--send") {
        // The multi-queue comparison's sender process.
        queues::send_main(&args);
        return;
    }
    let (mut mib, mut reps, mut queues, mut conns) = (None, None, 1u32, 8usize);
    let mut detail = false;
    let mut batches = false;
    let mut unbudgeted = false;
    let mut fixed_budget = None;
    let mut chunk = None;
    let mut read_spread = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--detail" {
            detail = true;
            continue;
        }
        if arg == "--unbudgeted" {
            unbudgeted = true;
            continue;
        }
        if arg == "--batches" {
            batches = true;
            continue;
        }
        if arg == "--read-spread" {
            read_spread = true;
            continue;
        }
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), value) {
            ("--mib", Some(n)) if n > 0 => mib = Some(n),
            ("--reps", Some(n)) if n > 0 => reps = Some(n as usize),
            ("--queues", Some(n)) if n > 0 => queues = n as u32,
            ("--conns", Some(n)) if n > 0 => conns = n as usize,
            ("--budget", Some(n)) if n > 0 => fixed_budget = Some(n),
            ("--chunk", Some(n)) if n.is_power_of_two() && n > 4096 && n <= 1 << 20 => {
                chunk = Some(n as u32)
            }
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let net = GuestNet::from_env();
    if queues == 1 && (unbudgeted || fixed_budget.is_some() || chunk.is_some() || read_spread) {
        eprintln!(
            "guest-ratio: --unbudgeted, --budget, --chunk and --read-spread are for the \
             multi-queue comparison\n{USAGE}"
        );
        std::process::exit(2);
    }
    if queues > 1 {
        let options = queues::Options {
            queues,
            mib: mib.unwrap_or(256),
            reps: reps.unwrap_or(5),
            conns,
            detail,
            unbudgeted,
            fixed_budget,
            batches,
            chunk,
            read_spread,
        };
        // Like the single-queue comparison, a missed target is reported, not an error.
        queues::run(&net, &options);
        return;
    }
    let (mib, reps) = (mib.unwrap_or(256), reps.unwrap_or(7));
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
