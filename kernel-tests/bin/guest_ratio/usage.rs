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
            median: median_of_sorted(&sorted),
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

/// The median of sorted values: the middle one, or the mean of the two middle ones.
fn median_of_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    median_of_sorted(&sorted)
}

/// Resamples [`ratio_interval`] draws.
const RESAMPLES: usize = 4000;

/// How far `median(a) / median(b)` can be trusted, where `a[i]` and `b[i]` are one rep's
/// measurements of two receivers (they ran back to back, so a rep is resampled whole): the
/// 5th and 95th percentiles of that ratio over [`RESAMPLES`] bootstrap resamples of the reps.
/// The generator has a fixed seed, so the same measurements give the same interval.
pub(crate) fn ratio_interval(a: &[f64], b: &[f64]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "one measurement of each per rep");
    let n = a.len();
    // xorshift64*: enough for picking reps.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut pick = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    };
    let (mut ra, mut rb) = (vec![0.0; n], vec![0.0; n]);
    let mut ratios: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            for i in 0..n {
                let rep = pick();
                (ra[i], rb[i]) = (a[rep], b[rep]);
            }
            median(&ra) / median(&rb)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    (
        ratios[RESAMPLES / 20],
        ratios[RESAMPLES - 1 - RESAMPLES / 20],
    )
}

/// What a sitting says about a ratio that must be at most `target`.
pub(crate) fn verdict(interval: (f64, f64), target: f64) -> &'static str {
    if interval.1 <= target {
        "met"
    } else if interval.0 > target {
        "MISSED"
    } else {
        "not settled by this sitting"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(Spread::of(&[4.0, 1.0, 3.0, 2.0]).median, 2.5);
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]).median, 2.0);
    }

    #[test]
    fn a_constant_ratio_has_no_spread() {
        let b = [4.0, 9.0, 5.0, 7.0, 6.0];
        let a: Vec<f64> = b.iter().map(|v| v * 0.5).collect();
        let (lo, hi) = ratio_interval(&a, &b);
        assert!(
            (lo - 0.5).abs() < 1e-12 && (hi - 0.5).abs() < 1e-12,
            "{lo} {hi}"
        );
        assert_eq!(verdict((lo, hi), 0.7), "met");
    }

    #[test]
    fn noisy_reps_widen_the_interval_around_the_ratio_of_medians() {
        let a = [5.5, 4.7, 4.3, 4.5, 4.0, 4.2, 7.3, 6.0];
        let b = [6.7, 6.8, 5.7, 5.3, 5.3, 5.5, 9.1, 10.5];
        let ratio = median(&a) / median(&b);
        let (lo, hi) = ratio_interval(&a, &b);
        assert!(lo < ratio && ratio < hi, "{lo} {ratio} {hi}");
        assert!(hi - lo > 0.05, "{lo} {hi}");
        // Deterministic: the same measurements, the same interval.
        assert_eq!(ratio_interval(&a, &b), (lo, hi));
        assert_eq!(verdict((0.6, 0.8), 0.7), "not settled by this sitting");
        assert_eq!(verdict((0.75, 0.8), 0.7), "MISSED");
    }
}
