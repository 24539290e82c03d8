//! The side-by-side receive comparison: every receiver, at every connection count, repeated.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::protocol::{Receiver, Spec, ZcrxInfo, READ_BUFFER};
use crate::runner::{self, Launcher, RunOutcome, SEND_WRITE};
use crate::stats::{Spread, Table};
use crate::system::{Bytes, Machine, GIB};
use crate::{plot, Options};

/// One measured (or failed) run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunRecord {
    pub receiver: Receiver,
    pub conns: usize,
    pub rep: usize,
    pub bytes: u64,
    pub seconds: Option<f64>,
    pub gbps: Option<f64>,
    pub cpu_user_s: Option<f64>,
    pub cpu_sys_s: Option<f64>,
    pub cpu_s_per_gib: Option<f64>,
    pub peak_rss: Option<u64>,
    pub voluntary_switches: Option<i64>,
    pub involuntary_switches: Option<i64>,
    pub sender_cpu_s_per_gib: Option<f64>,
    /// Machine-wide busy CPU over the run (/proc/stat), and the part of it charged to neither
    /// the receiver nor the sender: other processes, or kernel threads working for the run
    /// (ksoftirqd, io_uring ring teardown). Tick accounting: about +-0.03 s.
    pub machine_busy_s: Option<f64>,
    pub unattributed_cpu_s: Option<f64>,
    pub steal_s: Option<f64>,
    /// TCP counters (memory pressure, pruning, drops, zero windows) that moved.
    pub tcp_counters: BTreeMap<String, i64>,
    pub zcrx: Option<ZcrxInfo>,
    pub error: Option<String>,
}

impl RunRecord {
    /// Whether a noticeable share of the machine's CPU went to neither receiver nor sender.
    pub(crate) fn unattributed_load(&self) -> bool {
        match (self.unattributed_cpu_s, self.machine_busy_s) {
            (Some(other), Some(busy)) => other > 0.1 && other > 0.1 * busy,
            _ => false,
        }
    }

    /// A note for the progress line: unattributed CPU and TCP counters, if any.
    pub(crate) fn notes(&self) -> String {
        let mut notes = String::new();
        if self.unattributed_load() {
            notes.push_str(&format!(
                " [unattributed CPU: {:.2} s]",
                self.unattributed_cpu_s.unwrap_or(0.0)
            ));
        }
        // Zero-window advertisements are routine when the sender outruns the receiver;
        // pressure, pruning and drops are not.
        let list: Vec<String> = self
            .tcp_counters
            .iter()
            .filter(|(k, _)| !k.contains("ZeroWindowAdv"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !list.is_empty() {
            notes.push_str(&format!(" [tcp: {}]", list.join(" ")));
        }
        notes
    }

    fn new(
        receiver: Receiver,
        conns: usize,
        rep: usize,
        bytes: u64,
        result: Result<RunOutcome>,
    ) -> RunRecord {
        let mut record = RunRecord {
            receiver,
            conns,
            rep,
            bytes,
            seconds: None,
            gbps: None,
            cpu_user_s: None,
            cpu_sys_s: None,
            cpu_s_per_gib: None,
            peak_rss: None,
            voluntary_switches: None,
            involuntary_switches: None,
            sender_cpu_s_per_gib: None,
            machine_busy_s: None,
            unattributed_cpu_s: None,
            steal_s: None,
            tcp_counters: BTreeMap::new(),
            zcrx: None,
            error: None,
        };
        match result {
            Ok(run) => {
                let c = run.child;
                record.machine_busy_s = Some(run.machine.busy_s);
                record.unattributed_cpu_s =
                    Some(run.machine.busy_s - c.user_s - c.sys_s - run.sender_cpu_s);
                record.steal_s = Some(run.machine.steal_s);
                record.tcp_counters = run.tcp_counters.into_iter().collect();
                let gib = c.bytes as f64 / GIB;
                record.seconds = Some(c.seconds);
                record.gbps = Some(c.bytes as f64 * 8.0 / c.seconds / 1e9);
                record.cpu_user_s = Some(c.user_s);
                record.cpu_sys_s = Some(c.sys_s);
                record.cpu_s_per_gib = Some((c.user_s + c.sys_s) / gib);
                record.peak_rss = Some(c.peak_rss);
                record.voluntary_switches = Some(c.voluntary_switches);
                record.involuntary_switches = Some(c.involuntary_switches);
                record.sender_cpu_s_per_gib = Some(run.sender_cpu_s / gib);
                record.zcrx = c.zcrx;
            }
            Err(e) => record.error = Some(format!("{e:#}")),
        }
        record
    }
}

/// Median and range of one receiver at one connection count, and how it compares with tokio.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub receiver: Receiver,
    pub label: String,
    pub conns: usize,
    pub runs_ok: usize,
    pub runs_failed: usize,
    pub gbps: Option<Spread>,
    pub cpu_s_per_gib: Option<Spread>,
    pub user_s_per_gib: Option<Spread>,
    pub sys_s_per_gib: Option<Spread>,
    pub peak_rss: Option<Spread>,
    pub voluntary_switches_per_gib: Option<Spread>,
    pub sender_cpu_s_per_gib: Option<Spread>,
    /// Runs in which more than 10% of the machine's busy CPU was charged to neither side.
    pub runs_unattributed_load: usize,
    /// Median throughput divided by tokio `TcpStream::read`'s.
    pub gbps_vs_tokio: Option<f64>,
    /// Median CPU s/GiB divided by tokio `TcpStream::read`'s.
    pub cpu_vs_tokio: Option<f64>,
    /// The first error, when a run failed.
    pub error: Option<String>,
}

/// The whole result file.
#[derive(Debug, Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    generated_unix_s: u64,
    machine: &'a Machine,
    zcrx: Option<&'a ZcrxInfo>,
    settings: Settings,
    targets: Targets,
    summary: &'a [Summary],
    runs: &'a [RunRecord],
    /// Unmeasured warm-up runs (rep 0), one set per connection count.
    warmups: &'a [RunRecord],
}

#[derive(Debug, Serialize)]
struct Settings {
    quick: bool,
    repetitions: usize,
    warmup_runs: usize,
    conns: Vec<usize>,
    bytes_per_run: Vec<(usize, u64)>,
    receivers: Vec<Receiver>,
    read_buffer: usize,
    /// `--pin`: the CPU of the receiver (the sender has another one).
    receiver_cpu: Option<usize>,
    tokio_uring_threads: usize,
    sender: String,
}

/// The goals for tokio-zcrx in copy mode, against tokio `TcpStream::read`.
#[derive(Debug, Serialize)]
struct Targets {
    min_gbps_ratio: f64,
    max_cpu_ratio: f64,
}

const TARGET_GBPS_RATIO: f64 = 0.95;
const TARGET_CPU_RATIO: f64 = 1.05;

pub(crate) fn sender_description(options: &Options) -> String {
    let placement = match options.receiver_cpu {
        Some(cpu) => format!("pinned apart: receiver on CPU {cpu}, sender on another"),
        None => "sender and receiver share all CPUs".into(),
    };
    format!(
        "blocking std sender in the parent process, one thread per connection, {} write_all \
         calls; {placement}",
        Bytes(SEND_WRITE as u64)
    )
}

pub(crate) fn run(options: &Options, machine: &Machine, launcher: &Launcher) -> Result<()> {
    let started = Instant::now();
    let total_runs = options.conns.len() * options.reps * options.receivers.len();
    eprintln!(
        "receive benchmark: {} runs ({} receivers x conns {:?} x {} repetitions); {}",
        total_runs,
        options.receivers.len(),
        options.conns,
        options.reps,
        machine
    );
    let mut records = Vec::with_capacity(total_runs);
    let mut warmups = Vec::new();
    let mut done = 0;
    for &conns in &options.conns {
        let bytes = options.bytes_for(conns);
        let bytes_per_conn = (bytes / conns as u64).max(1);
        let measure = |receiver: Receiver, rep: usize, tag: String| {
            eprint!(
                "{tag} {conns:>3} conns, {:<12} {} ... ",
                receiver.id(),
                Bytes(bytes_per_conn * conns as u64)
            );
            let spec = Spec::Receive {
                receiver,
                conns,
                bytes_per_conn,
                uring_threads: options.uring_threads,
                timeout_s: options.timeout_for(bytes),
                pin_cpu: options.receiver_cpu,
            };
            let record = RunRecord::new(
                receiver,
                conns,
                rep,
                bytes_per_conn * conns as u64,
                runner::receive(launcher, &spec),
            );
            match (&record.error, record.gbps, record.cpu_s_per_gib) {
                (Some(e), _, _) => eprintln!("FAILED: {e}"),
                (None, Some(gbps), Some(cpu)) => eprintln!(
                    "{gbps:.1} Gbit/s, {cpu:.3} CPU s/GiB, peak RSS {}{}",
                    Bytes(record.peak_rss.unwrap_or(0)),
                    record.notes()
                ),
                _ => eprintln!("?"),
            }
            record
        };
        // Unmeasured runs first: the first runs at a new connection count were sometimes
        // much slower (sender-side kernel time), whichever receiver came first.
        let warmup_receiver = if options.receivers.contains(&Receiver::TokioRead) {
            Receiver::TokioRead
        } else {
            options.receivers[0]
        };
        for _ in 0..options.warmup {
            warmups.push(measure(warmup_receiver, 0, "[warm-up]".into()));
        }
        for rep in 1..=options.reps {
            // Rotate the order every repetition, so no receiver always runs first or last.
            let n = options.receivers.len();
            for k in 0..n {
                let receiver = options.receivers[(k + rep - 1) % n];
                done += 1;
                let tag = format!("[{done:>2}/{total_runs}] rep {rep}/{},", options.reps);
                records.push(measure(receiver, rep, tag));
            }
        }
    }
    eprintln!(
        "receive benchmark: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let summary = summarise(options, &records);
    let zcrx = records.iter().find_map(|r| r.zcrx.as_ref());
    let text = render(options, machine, zcrx, &summary);
    println!("{text}");

    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let report = Report {
        benchmark: "receive",
        generated_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine,
        zcrx,
        settings: Settings {
            quick: options.quick,
            repetitions: options.reps,
            warmup_runs: options.warmup,
            conns: options.conns.clone(),
            bytes_per_run: options
                .conns
                .iter()
                .map(|&c| (c, options.bytes_for(c)))
                .collect(),
            receivers: options.receivers.clone(),
            read_buffer: READ_BUFFER,
            receiver_cpu: options.receiver_cpu,
            tokio_uring_threads: options.uring_threads,
            sender: sender_description(options),
        },
        targets: Targets {
            min_gbps_ratio: TARGET_GBPS_RATIO,
            max_cpu_ratio: TARGET_CPU_RATIO,
        },
        summary: &summary,
        runs: &records,
        warmups: &warmups,
    };
    let json_path = options.out.join("receive.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let text_path = options.out.join("receive.txt");
    std::fs::write(&text_path, &text)
        .with_context(|| format!("writing {}", text_path.display()))?;
    let png_path = options.out.join("receive.png");
    let title = format!(
        "Loopback TCP receive, {} per run, median of {} (bars: min-max)",
        bytes_caption(options),
        options.reps
    );
    plot::receive(
        &png_path,
        &title,
        machine,
        zcrx,
        &options.conns,
        &options.receivers,
        &summary,
    )
    .with_context(|| format!("drawing {}", png_path.display()))?;
    eprintln!(
        "wrote {}, {} and {}",
        text_path.display(),
        json_path.display(),
        png_path.display()
    );
    Ok(())
}

fn bytes_caption(options: &Options) -> String {
    let mut sizes: Vec<(u64, Vec<usize>)> = Vec::new();
    for &c in &options.conns {
        let b = options.bytes_for(c);
        match sizes.iter_mut().find(|(size, _)| *size == b) {
            Some((_, conns)) => conns.push(c),
            None => sizes.push((b, vec![c])),
        }
    }
    if sizes.len() == 1 {
        return Bytes(sizes[0].0).to_string();
    }
    sizes
        .iter()
        .map(|(b, conns)| {
            let conns: Vec<String> = conns.iter().map(|c| c.to_string()).collect();
            format!("{} ({} conns)", Bytes(*b), conns.join("/"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn summarise(options: &Options, records: &[RunRecord]) -> Vec<Summary> {
    let mut out = Vec::new();
    for &conns in &options.conns {
        let mut group: Vec<Summary> = options
            .receivers
            .iter()
            .map(|&receiver| {
                let runs: Vec<&RunRecord> = records
                    .iter()
                    .filter(|r| r.receiver == receiver && r.conns == conns)
                    .collect();
                let ok: Vec<&RunRecord> =
                    runs.iter().copied().filter(|r| r.error.is_none()).collect();
                let per_gib = |f: fn(&RunRecord) -> Option<f64>| {
                    Spread::of(
                        ok.iter()
                            .filter_map(|r| Some(f(r)? / (r.bytes as f64 / GIB))),
                    )
                };
                Summary {
                    receiver,
                    label: label(receiver, records),
                    conns,
                    runs_ok: ok.len(),
                    runs_failed: runs.len() - ok.len(),
                    gbps: Spread::of(ok.iter().filter_map(|r| r.gbps)),
                    cpu_s_per_gib: Spread::of(ok.iter().filter_map(|r| r.cpu_s_per_gib)),
                    user_s_per_gib: per_gib(|r| r.cpu_user_s),
                    sys_s_per_gib: per_gib(|r| r.cpu_sys_s),
                    peak_rss: Spread::of(ok.iter().filter_map(|r| r.peak_rss.map(|b| b as f64))),
                    voluntary_switches_per_gib: per_gib(|r| r.voluntary_switches.map(|n| n as f64)),
                    sender_cpu_s_per_gib: Spread::of(
                        ok.iter().filter_map(|r| r.sender_cpu_s_per_gib),
                    ),
                    runs_unattributed_load: ok.iter().filter(|r| r.unattributed_load()).count(),
                    gbps_vs_tokio: None,
                    cpu_vs_tokio: None,
                    error: runs.iter().find_map(|r| r.error.clone()),
                }
            })
            .collect();
        let tokio = group
            .iter()
            .find(|s| s.receiver == Receiver::TokioRead)
            .map(|s| (s.gbps, s.cpu_s_per_gib));
        if let Some((Some(gbps), Some(cpu))) = tokio {
            for s in &mut group {
                s.gbps_vs_tokio = s.gbps.map(|g| g.median / gbps.median);
                s.cpu_vs_tokio = s.cpu_s_per_gib.map(|c| c.median / cpu.median);
            }
        }
        out.extend(group);
    }
    out
}

/// The receiver's name with its mode (tokio-zcrx) or thread count (tokio-uring).
pub(crate) fn label(receiver: Receiver, records: &[RunRecord]) -> String {
    match receiver {
        Receiver::TokioZcrx => match records.iter().find_map(|r| r.zcrx.as_ref()) {
            Some(info) => format!("{} ({})", receiver.label(), info.mode),
            None => receiver.label().to_string(),
        },
        _ => receiver.label().to_string(),
    }
}

fn render(
    options: &Options,
    machine: &Machine,
    zcrx: Option<&ZcrxInfo>,
    summary: &[Summary],
) -> String {
    let mut out = String::new();
    out.push_str("tokio-zcrx receive benchmark: loopback TCP, same sender for every receiver\n");
    out.push_str(&format!("machine: {machine}\n"));
    if let Some(info) = zcrx {
        out.push_str(&format!(
            "tokio-zcrx: Zcrx::builder().build() chose {}; {}\n",
            info.mode_selection, info.description
        ));
    }
    out.push_str(&format!("sender: {}\n", sender_description(options)));
    out.push_str(&format!(
        "bytes per run: {}; {} repetition(s), median [min-max]; CPU = receiver process user+sys \
         (getrusage) per GiB received; csw = voluntary context switches per GiB\n\n",
        bytes_caption(options),
        options.reps
    ));
    let mut table = Table::new(
        &[
            "conns",
            "receiver",
            "Gbit/s",
            "CPU s/GiB",
            "user+sys",
            "csw/GiB",
            "peak RSS",
            "x tokio Gbit/s",
            "x tokio CPU",
        ],
        2,
    );
    let mut last_conns = None;
    for s in summary {
        if last_conns.is_some() && last_conns != Some(s.conns) {
            table.gap();
        }
        last_conns = Some(s.conns);
        let Some(gbps) = s.gbps else {
            let error = s.error.clone().unwrap_or_else(|| "no result".into());
            table.row(vec![
                s.conns.to_string(),
                s.label.clone(),
                format!("FAILED: {}", first_line(&error, 90)),
            ]);
            continue;
        };
        let ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
        let split = match (s.user_s_per_gib, s.sys_s_per_gib) {
            (Some(u), Some(k)) => format!("{:.3}+{:.3}", u.median, k.median),
            _ => "-".into(),
        };
        let mut label = s.label.clone();
        if s.runs_failed > 0 {
            label.push_str(&format!(" ({} failed)", s.runs_failed));
        }
        table.row(vec![
            s.conns.to_string(),
            label,
            gbps.show(1),
            s.cpu_s_per_gib.map_or("-".into(), |c| c.show(3)),
            split,
            s.voluntary_switches_per_gib
                .map_or("-".into(), |c| format!("{:.0}", c.median)),
            s.peak_rss
                .map_or("-".into(), |r| Bytes(r.median as u64).to_string()),
            ratio(s.gbps_vs_tokio),
            ratio(s.cpu_vs_tokio),
        ]);
    }
    out.push_str(&table.render());
    let unattributed: usize = summary.iter().map(|s| s.runs_unattributed_load).sum();
    if unattributed > 0 {
        out.push_str(&format!(
            "\nnote: in {unattributed} run(s) more than 10% of the machine's busy CPU time was \
             charged to neither receiver nor sender: other processes, or kernel threads working \
             for the run (ksoftirqd, io_uring ring teardown); `unattributed_cpu_s` in the JSON\n"
        ));
    }

    // The targets for the tokio-zcrx copy-mode sink.
    let verdicts: Vec<String> = summary
        .iter()
        .filter(|s| s.receiver == Receiver::TokioZcrx)
        .filter_map(|s| {
            let (g, c) = (s.gbps_vs_tokio?, s.cpu_vs_tokio?);
            let ok = g >= TARGET_GBPS_RATIO && c <= TARGET_CPU_RATIO;
            Some(format!(
                "  {:>3} conns: throughput {g:.2}x (>= {TARGET_GBPS_RATIO}), CPU {c:.2}x (<= {TARGET_CPU_RATIO}): {}",
                s.conns,
                if ok { "met" } else { "MISSED" }
            ))
        })
        .collect();
    if !verdicts.is_empty() {
        out.push_str("\ntargets for tokio-zcrx against tokio TcpStream::read (medians):\n");
        for v in verdicts {
            out.push_str(&v);
            out.push('\n');
        }
    }
    out
}

/// The first line of `text`, at most `max` characters.
pub(crate) fn first_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() > max {
        let cut: String = line.chars().take(max - 3).collect();
        format!("{cut}...")
    } else {
        line.to_string()
    }
}
