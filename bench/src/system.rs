//! What the benchmark needs from the operating system: the machine's description, resource
//! usage, memory figures from `/proc/self/status`, the descriptor limit, and byte sizes.

use std::fmt;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The machine and kernel the numbers were measured on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Machine {
    /// Online CPUs (what `nproc` prints).
    pub cpus: usize,
    /// `model name` of the first CPU in /proc/cpuinfo.
    pub cpu_model: String,
    /// `MemTotal` from /proc/meminfo, in bytes.
    pub memory_bytes: u64,
    /// `uname -r`.
    pub kernel: String,
}

impl Machine {
    pub(crate) fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| kib_field(&text, "MemTotal"))
            .map_or(0, |kib| kib * 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_bytes,
            kernel,
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {} CPUs, {} RAM, Linux {}",
            self.cpu_model,
            self.cpus,
            Bytes(self.memory_bytes),
            self.kernel
        )
    }
}

/// CPU time and context switches of this process (all its threads), from getrusage.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub user_s: f64,
    pub sys_s: f64,
    pub voluntary_switches: i64,
    pub involuntary_switches: i64,
}

impl Usage {
    pub(crate) fn now() -> Usage {
        // SAFETY: getrusage fills the zeroed struct we pass; RUSAGE_SELF cannot fail.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut ru);
            ru
        };
        let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        Usage {
            user_s: seconds(ru.ru_utime),
            sys_s: seconds(ru.ru_stime),
            voluntary_switches: ru.ru_nvcsw,
            involuntary_switches: ru.ru_nivcsw,
        }
    }

    /// What was used between `earlier` and `self`.
    pub(crate) fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            user_s: self.user_s - earlier.user_s,
            sys_s: self.sys_s - earlier.sys_s,
            voluntary_switches: self.voluntary_switches - earlier.voluntary_switches,
            involuntary_switches: self.involuntary_switches - earlier.involuntary_switches,
        }
    }
}

/// Machine-wide CPU time from the first line of /proc/stat, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MachineCpu {
    /// Everything but idle and iowait (user, nice, system, irq, softirq, steal).
    pub busy_s: f64,
    /// Time the hypervisor gave to someone else.
    pub steal_s: f64,
}

impl MachineCpu {
    pub(crate) fn now() -> MachineCpu {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<f64> = text
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let field = |i: usize| fields.get(i).copied().unwrap_or(0.0) / hz;
        // user nice system idle iowait irq softirq steal (guest time is inside user)
        MachineCpu {
            busy_s: field(0) + field(1) + field(2) + field(5) + field(6) + field(7),
            steal_s: field(7),
        }
    }

    pub(crate) fn since(&self, earlier: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy_s: self.busy_s - earlier.busy_s,
            steal_s: self.steal_s - earlier.steal_s,
        }
    }
}

/// TCP counters (from /proc/net/netstat) that tell whether the kernel was short of socket
/// memory or dropped data during a run.
pub(crate) const TCP_COUNTERS: [&str; 9] = [
    "TCPMemoryPressures",
    "PruneCalled",
    "RcvPruned",
    "TCPRcvCollapsed",
    "TCPRcvQDrop",
    "TCPBacklogDrop",
    "TCPZeroWindowDrop",
    "TCPToZeroWindowAdv",
    "TCPWantZeroWindowAdv",
];

/// The current values of [`TCP_COUNTERS`].
pub(crate) fn tcp_counters() -> Vec<(String, i64)> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter(|(name, _)| TCP_COUNTERS.contains(name))
        .filter_map(|(name, value)| Some((name.to_string(), value.parse().ok()?)))
        .collect()
}

/// The counters that changed between two [`tcp_counters`] snapshots.
pub(crate) fn counter_deltas(
    before: &[(String, i64)],
    after: &[(String, i64)],
) -> Vec<(String, i64)> {
    after
        .iter()
        .filter_map(|(name, value)| {
            let old = before
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, v)| *v);
            (value != &old).then(|| (name.clone(), value - old))
        })
        .collect()
}

/// The CPUs this process may run on (sched_getaffinity), in order.
pub(crate) fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect())
    }
}

/// Restricts the calling thread (and the threads it starts later) to `cpu`.
pub(crate) fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data, set up with the libc helpers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sched_setaffinity to CPU {cpu}"));
        }
    }
    Ok(())
}

/// A `kB` field of /proc/self/status (e.g. `VmRSS`, `VmHWM`), in bytes.
pub(crate) fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| kib_field(&text, field))
        .map_or(0, |kib| kib * 1024)
}

/// The value of a `Name:   1234 kB` line.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Raises RLIMIT_NOFILE to at least `needed` descriptors (up to the hard limit, or beyond it
/// when the process may raise the hard limit, as root may). Returns the new soft limit.
pub(crate) fn raise_nofile(needed: u64) -> Result<u64> {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        let wanted = libc::rlimit {
            rlim_cur: limit.rlim_max.max(needed),
            rlim_max: limit.rlim_max.max(needed),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            return Ok(wanted.rlim_cur);
        }
        // Not allowed to raise the hard limit: take what it allows.
        let soft = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
        if soft.rlim_cur < needed {
            bail!(
                "need {needed} file descriptors but the hard limit (ulimit -Hn) is {}; \
                 raise it or use fewer connections",
                soft.rlim_cur
            );
        }
        Ok(soft.rlim_cur)
    }
}

/// Parses a byte count with an optional K/M/G suffix (powers of 1024), e.g. `4G`, `256M`.
pub(crate) fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let upper = text.to_ascii_uppercase();
    let digits = upper.trim_end_matches("IB").trim_end_matches('B');
    let (number, shift) = match digits.chars().last() {
        Some('K') => (&digits[..digits.len() - 1], 10),
        Some('M') => (&digits[..digits.len() - 1], 20),
        Some('G') => (&digits[..digits.len() - 1], 30),
        Some('T') => (&digits[..digits.len() - 1], 40),
        _ => (digits, 0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .with_context(|| format!("{text:?} is not a size like 4G, 256M or 65536"))?;
    if value.is_nan() || value < 0.0 {
        bail!("{text:?}: a size must not be negative");
    }
    Ok((value * (1u64 << shift) as f64) as u64)
}

/// A byte count printed with a binary unit: `4 GiB`, `6.2 MiB`, `512 B`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 || value.fract() == 0.0 || value >= 100.0 {
            write!(f, "{value:.0} {}", UNITS[unit])
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

pub(crate) const GIB: f64 = (1u64 << 30) as f64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
    }

    #[test]
    fn bytes_print() {
        assert_eq!(Bytes(4 << 30).to_string(), "4 GiB");
        assert_eq!(Bytes(6_500_000).to_string(), "6.2 MiB");
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(300 << 20).to_string(), "300 MiB");
    }

    #[test]
    fn proc_fields_parse() {
        let text = "Name:\tx\nVmHWM:\t   1234 kB\nVmRSS:\t  99 kB\n";
        assert_eq!(kib_field(text, "VmHWM"), Some(1234));
        assert_eq!(kib_field(text, "VmRSS"), Some(99));
        assert_eq!(kib_field(text, "VmSwap"), None);
        assert!(status_bytes("VmRSS") > 0);
    }
}
