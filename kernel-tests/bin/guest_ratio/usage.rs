//! CPU time of this process and of its threads, and the spread of repeated measurements.

use std::collections::BTreeMap;
use std::time::Duration;

/// CPU time one thread (or several of one name) used: user and system clock ticks, and
/// voluntary and involuntary context switches.
#[derive(Clone, Copy, Default)]
pub(crate) struct ThreadCpu {
    pub(crate) threads: u32,
    pub(crate) user_ticks: u64,
    pub(crate) system_ticks: u64,
    pub(crate) voluntary: u64,
    pub(crate) involuntary: u64,
}

/// Process-wide CPU time and context switches, and CPU time per live thread (by name), so a
/// run can show where its time went (`--detail`).
#[derive(Clone, Default)]
pub(crate) struct Usage {
    /// User + system time of every thread of the process, live or exited
    /// (`getrusage(RUSAGE_SELF)`); not of its children.
    pub(crate) cpu: Duration,
    pub(crate) voluntary_switches: i64,
    pub(crate) involuntary_switches: i64,
    /// Per live thread name (from `/proc/self/task/*/stat` and `status`).
    pub(crate) threads: BTreeMap<String, ThreadCpu>,
}

impl Usage {
    pub(crate) fn now() -> Usage {
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
            let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let switches = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let entry: &mut ThreadCpu = threads.entry(name).or_default();
            entry.threads += 1;
            entry.user_ticks += field(11).unwrap_or(0);
            entry.system_ticks += field(12).unwrap_or(0);
            entry.voluntary += switches("voluntary_ctxt_switches:");
            entry.involuntary += switches("nonvoluntary_ctxt_switches:");
        }
        Usage {
            cpu: time(usage.ru_utime) + time(usage.ru_stime),
            voluntary_switches: usage.ru_nvcsw,
            involuntary_switches: usage.ru_nivcsw,
            threads,
        }
    }

    /// Each thread name's CPU time since `before`, as ` name=user+system s/Nv/Ni` (user and
    /// system seconds, voluntary and involuntary switches); `xN` after the name when N
    /// threads share it.
    pub(crate) fn threads_since(&self, before: &Usage) -> String {
        let hz = ticks_per_second();
        let mut threads = String::new();
        for (name, now) in &self.threads {
            let then = before.threads.get(name).copied().unwrap_or_default();
            // Threads of one name are summed; one that exited makes a sum shrink.
            let user = now.user_ticks.saturating_sub(then.user_ticks);
            let system = now.system_ticks.saturating_sub(then.system_ticks);
            if user + system == 0 {
                continue;
            }
            let count = if now.threads > 1 {
                format!("x{}", now.threads)
            } else {
                String::new()
            };
            threads += &format!(
                " {name}{count}={:.2}+{:.2}s/{}v/{}i",
                user as f64 / hz,
                system as f64 / hz,
                now.voluntary.saturating_sub(then.voluntary),
                now.involuntary.saturating_sub(then.involuntary)
            );
        }
        threads
    }

    pub(crate) fn report(&self, before: &Usage, label: &str, elapsed: Duration) {
        println!(
            "  {label:<8} {:.2}s  cpu {:.2}s  switches {} voluntary {} involuntary  live \
             threads (user+system):{}",
            elapsed.as_secs_f64(),
            (self.cpu - before.cpu).as_secs_f64(),
            self.voluntary_switches - before.voluntary_switches,
            self.involuntary_switches - before.involuntary_switches,
            self.threads_since(before),
        );
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// The guest's CPU time, all CPUs, from the first line of /proc/stat, in seconds.
pub(crate) struct SystemCpu {
    /// user, nice, system, irq, softirq and steal.
    pub(crate) busy: f64,
    /// softirq alone (also counted, by tick accounting, to the thread it interrupted).
    pub(crate) softirq: f64,
}

pub(crate) fn system_cpu() -> SystemCpu {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| values.get(i).copied().unwrap_or(0);
    let hz = ticks_per_second();
    SystemCpu {
        busy: (at(0) + at(1) + at(2) + at(5) + at(6) + at(7)) as f64 / hz,
        softirq: at(6) as f64 / hz,
    }
}

/// Median, minimum and maximum, shown as `median [min-max]`.
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// Decimals shown.
    pub(crate) precision: usize,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: sorted[sorted.len() / 2],
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            precision: 1,
        }
    }

    pub(crate) fn precision(self, precision: usize) -> Spread {
        Spread { precision, ..self }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.precision;
        let text = format!("{:.p$} [{:.p$}-{:.p$}]", self.median, self.min, self.max);
        f.pad(&text)
    }
}
