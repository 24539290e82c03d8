//! Connection scaling: thousands of idle connections and a few busy ones. What does an idle
//! connection cost in resident memory, and does the busy traffic still flow?

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::protocol::{Receiver, Spec, ZcrxInfo, READ_BUFFER};
use crate::receive::{first_line, sender_description};
use crate::runner::{self, Launcher, RunOutcome};
use crate::stats::{Spread, Table};
use crate::system::{self, Bytes, Machine, GIB};
use crate::{plot, Options};

const RECEIVERS: [Receiver; 2] = [Receiver::TokioZcrx, Receiver::TokioRead];

/// The goal: idle connections cost at least this many times less than with tokio and
/// a 64 KiB buffer per connection.
const TARGET_MEMORY_RATIO: f64 = 10.0;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScalingRecord {
    pub receiver: Receiver,
    pub rep: usize,
    pub rss_baseline: Option<u64>,
    pub rss_idle: Option<u64>,
    /// (rss_idle - rss_baseline) / idle connections.
    pub bytes_per_idle_conn: Option<f64>,
    pub peak_rss: Option<u64>,
    pub busy_bytes: u64,
    pub busy_gbps: Option<f64>,
    pub cpu_s_per_gib: Option<f64>,
    /// Machine CPU charged to neither receiver nor sender during the busy phase.
    pub unattributed_cpu_s: Option<f64>,
    /// TCP counters (memory pressure, pruning, drops, zero windows) that moved.
    pub tcp_counters: BTreeMap<String, i64>,
    pub zcrx: Option<ZcrxInfo>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScalingSummary {
    pub receiver: Receiver,
    pub label: String,
    pub runs_ok: usize,
    pub runs_failed: usize,
    pub rss_baseline: Option<Spread>,
    pub rss_idle: Option<Spread>,
    pub bytes_per_idle_conn: Option<Spread>,
    pub peak_rss: Option<Spread>,
    pub busy_gbps: Option<Spread>,
    pub cpu_s_per_gib: Option<Spread>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    generated_unix_s: u64,
    machine: &'a Machine,
    zcrx: Option<&'a ZcrxInfo>,
    settings: Settings,
    /// tokio's bytes per idle connection divided by tokio-zcrx's (medians).
    memory_ratio: Option<f64>,
    target_memory_ratio: f64,
    summary: &'a [ScalingSummary],
    runs: &'a [ScalingRecord],
}

#[derive(Debug, Serialize)]
struct Settings {
    quick: bool,
    repetitions: usize,
    idle_conns: usize,
    busy_conns: usize,
    hello_bytes_per_idle_conn: u64,
    busy_bytes_total: u64,
    read_buffer: usize,
    /// `--pin`: the CPU of the receiver (the sender has another one).
    receiver_cpu: Option<usize>,
    sender: String,
}

fn record(
    receiver: Receiver,
    rep: usize,
    idle: usize,
    busy_bytes: u64,
    result: Result<RunOutcome>,
) -> ScalingRecord {
    let mut record = ScalingRecord {
        receiver,
        rep,
        rss_baseline: None,
        rss_idle: None,
        bytes_per_idle_conn: None,
        peak_rss: None,
        busy_bytes,
        busy_gbps: None,
        cpu_s_per_gib: None,
        unattributed_cpu_s: None,
        tcp_counters: BTreeMap::new(),
        zcrx: None,
        error: None,
    };
    match result {
        Ok(run) => {
            let c = run.child;
            record.rss_baseline = run.rss_baseline;
            record.rss_idle = run.rss_idle;
            if let (Some(base), Some(idle_rss)) = (run.rss_baseline, run.rss_idle) {
                record.bytes_per_idle_conn =
                    Some((idle_rss as f64 - base as f64) / idle.max(1) as f64);
            }
            record.peak_rss = Some(c.peak_rss);
            record.busy_gbps = Some(c.bytes as f64 * 8.0 / c.seconds / 1e9);
            record.cpu_s_per_gib = Some((c.user_s + c.sys_s) / (c.bytes as f64 / GIB));
            record.unattributed_cpu_s =
                Some(run.machine.busy_s - c.user_s - c.sys_s - run.sender_cpu_s);
            record.tcp_counters = run.tcp_counters.into_iter().collect();
            record.zcrx = c.zcrx;
        }
        Err(e) => record.error = Some(format!("{e:#}")),
    }
    record
}

pub(crate) fn run(options: &Options, machine: &Machine, launcher: &Launcher) -> Result<()> {
    let started = Instant::now();
    // The sender (this process) holds one end of every connection.
    system::raise_nofile((options.idle + options.busy) as u64 + 64)?;
    let busy_per_conn = (options.busy_bytes / options.busy.max(1) as u64).max(1);
    let busy_total = busy_per_conn * options.busy as u64;
    let total_runs = options.reps * RECEIVERS.len();
    eprintln!(
        "scaling benchmark: {} idle + {} busy connections, {} runs; {}",
        options.idle, options.busy, total_runs, machine
    );
    let mut records = Vec::new();
    let mut done = 0;
    for rep in 1..=options.reps {
        for k in 0..RECEIVERS.len() {
            let receiver = RECEIVERS[(k + rep - 1) % RECEIVERS.len()];
            done += 1;
            eprint!(
                "[{done}/{total_runs}] rep {rep}/{}, {:<11} {} idle + {} busy ... ",
                options.reps,
                receiver.id(),
                options.idle,
                options.busy
            );
            let spec = Spec::Scaling {
                receiver,
                idle: options.idle,
                busy: options.busy,
                hello: options.hello,
                busy_bytes_per_conn: busy_per_conn,
                timeout_s: options.timeout_for(busy_total) + options.idle as u64 / 100,
                pin_cpu: options.receiver_cpu,
            };
            let r = record(
                receiver,
                rep,
                options.idle,
                busy_total,
                runner::scaling(launcher, &spec),
            );
            match (&r.error, r.bytes_per_idle_conn, r.busy_gbps) {
                (Some(e), _, _) => eprintln!("FAILED: {e}"),
                (None, Some(per), Some(gbps)) => eprintln!(
                    "{:.2} KiB per idle connection, busy {gbps:.1} Gbit/s, peak RSS {}",
                    per / 1024.0,
                    Bytes(r.peak_rss.unwrap_or(0))
                ),
                _ => eprintln!("?"),
            }
            records.push(r);
        }
    }
    eprintln!(
        "scaling benchmark: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let zcrx = records.iter().find_map(|r| r.zcrx.as_ref());
    let summary: Vec<ScalingSummary> = RECEIVERS
        .iter()
        .map(|&receiver| {
            let runs: Vec<&ScalingRecord> =
                records.iter().filter(|r| r.receiver == receiver).collect();
            let ok: Vec<&ScalingRecord> =
                runs.iter().copied().filter(|r| r.error.is_none()).collect();
            let bytes = |f: fn(&ScalingRecord) -> Option<u64>| {
                Spread::of(ok.iter().filter_map(|r| f(r).map(|b| b as f64)))
            };
            ScalingSummary {
                receiver,
                label: match (receiver, zcrx) {
                    (Receiver::TokioZcrx, Some(info)) => {
                        format!("{} ({})", receiver.label(), info.mode)
                    }
                    (Receiver::TokioRead, _) => format!(
                        "{} ({} per conn)",
                        receiver.label(),
                        Bytes(READ_BUFFER as u64)
                    ),
                    _ => receiver.label().to_string(),
                },
                runs_ok: ok.len(),
                runs_failed: runs.len() - ok.len(),
                rss_baseline: bytes(|r| r.rss_baseline),
                rss_idle: bytes(|r| r.rss_idle),
                bytes_per_idle_conn: Spread::of(ok.iter().filter_map(|r| r.bytes_per_idle_conn)),
                peak_rss: bytes(|r| r.peak_rss),
                busy_gbps: Spread::of(ok.iter().filter_map(|r| r.busy_gbps)),
                cpu_s_per_gib: Spread::of(ok.iter().filter_map(|r| r.cpu_s_per_gib)),
                error: runs.iter().find_map(|r| r.error.clone()),
            }
        })
        .collect();
    let per_conn = |receiver| {
        summary
            .iter()
            .find(|s| s.receiver == receiver)
            .and_then(|s| s.bytes_per_idle_conn)
            .map(|s| s.median)
    };
    let memory_ratio = match (per_conn(Receiver::TokioRead), per_conn(Receiver::TokioZcrx)) {
        (Some(tokio), Some(zcrx)) if zcrx > 0.0 => Some(tokio / zcrx),
        _ => None,
    };

    let text = render(options, machine, zcrx, &summary, memory_ratio, busy_total);
    println!("{text}");
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let report = Report {
        benchmark: "scaling",
        generated_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine,
        zcrx,
        settings: Settings {
            quick: options.quick,
            repetitions: options.reps,
            idle_conns: options.idle,
            busy_conns: options.busy,
            hello_bytes_per_idle_conn: options.hello,
            busy_bytes_total: busy_total,
            read_buffer: READ_BUFFER,
            receiver_cpu: options.receiver_cpu,
            sender: sender_description(options),
        },
        memory_ratio,
        target_memory_ratio: TARGET_MEMORY_RATIO,
        summary: &summary,
        runs: &records,
    };
    let json_path = options.out.join("scaling.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let text_path = options.out.join("scaling.txt");
    std::fs::write(&text_path, &text)
        .with_context(|| format!("writing {}", text_path.display()))?;
    let png_path = options.out.join("scaling.png");
    let title = format!(
        "{} idle + {} busy loopback connections, median of {} (bars: min-max)",
        options.idle, options.busy, options.reps
    );
    plot::scaling(&png_path, &title, machine, zcrx, &summary)
        .with_context(|| format!("drawing {}", png_path.display()))?;
    eprintln!(
        "wrote {}, {} and {}",
        text_path.display(),
        json_path.display(),
        png_path.display()
    );
    Ok(())
}

fn render(
    options: &Options,
    machine: &Machine,
    zcrx: Option<&ZcrxInfo>,
    summary: &[ScalingSummary],
    memory_ratio: Option<f64>,
    busy_total: u64,
) -> String {
    let mut out = String::new();
    out.push_str(
        "tokio-zcrx connection scaling: many idle connections, a few busy ones (loopback TCP)\n",
    );
    out.push_str(&format!("machine: {machine}\n"));
    if let Some(info) = zcrx {
        out.push_str(&format!(
            "tokio-zcrx: Zcrx::builder().build() chose {}; {}\n",
            info.mode_selection, info.description
        ));
    }
    out.push_str(&format!("sender: {}\n", sender_description(options)));
    out.push_str(&format!(
        "{} idle connections (each sent {} once, then nothing) + {} busy ones sending {} in all; \
         {} repetition(s), median [min-max]\n",
        options.idle,
        Bytes(options.hello),
        options.busy,
        Bytes(busy_total),
        options.reps
    ));
    out.push_str(
        "RSS: receiver process VmRSS before the first connection (base) and with every \
         connection open and idle; per idle conn = (idle - base) / idle connections\n\n",
    );
    let mut table = Table::new(
        &[
            "receiver",
            "RSS base",
            "RSS idle",
            "per idle conn",
            "peak RSS",
            "busy Gbit/s",
            "CPU s/GiB",
        ],
        1,
    );
    for s in summary {
        let Some(per) = s.bytes_per_idle_conn else {
            let error = s.error.clone().unwrap_or_else(|| "no result".into());
            table.row(vec![
                s.label.clone(),
                format!("FAILED: {}", first_line(&error, 90)),
            ]);
            continue;
        };
        let mib = |s: Option<Spread>| s.map_or("-".into(), |s| Bytes(s.median as u64).to_string());
        table.row(vec![
            s.label.clone(),
            mib(s.rss_baseline),
            mib(s.rss_idle),
            show_kib(per),
            mib(s.peak_rss),
            s.busy_gbps.map_or("-".into(), |g| g.show(1)),
            s.cpu_s_per_gib.map_or("-".into(), |c| c.show(3)),
        ]);
    }
    out.push_str(&table.render());
    if let Some(ratio) = memory_ratio {
        out.push_str(&format!(
            "\nidle connections cost {ratio:.1}x less memory with tokio-zcrx than with tokio + 64 KiB \
             buffers (target >= {TARGET_MEMORY_RATIO}x): {}\n",
            if ratio >= TARGET_MEMORY_RATIO { "met" } else { "MISSED" }
        ));
    }
    out
}

/// Bytes per connection in KiB with two decimals, `1.17 KiB [1.16-1.18]`, or just the
/// median for one value.
fn show_kib(spread: Spread) -> String {
    let kib = |v: f64| v.max(0.0) / 1024.0;
    if (kib(spread.max) - kib(spread.min)) < 0.005 {
        format!("{:.2} KiB", kib(spread.median))
    } else {
        format!(
            "{:.2} KiB [{:.2}-{:.2}]",
            kib(spread.median),
            kib(spread.min),
            kib(spread.max)
        )
    }
}
