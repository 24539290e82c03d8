//! What /proc says about a process: open fds, resident memory, and the CPU time of one of
//! its threads (the zcrx driver thread, found by name). Used by the idle-CPU tests and by the
//! soak run (`cargo xtask soak`), which watch a server for growth.

use std::io;
use std::time::Duration;

/// The driver thread's default name (`Builder::thread_name`), as /proc shows it: the kernel
/// keeps the first 15 bytes of a thread's name.
pub const DRIVER_THREAD_COMM: &str = "tokio-zcrx-driv";

/// Which process: `"self"` or a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid {
    /// The calling process.
    Current,
    /// Another process.
    Of(u32),
}

impl Pid {
    fn dir(self) -> String {
        match self {
            Pid::Current => "/proc/self".into(),
            Pid::Of(pid) => format!("/proc/{pid}"),
        }
    }
}

/// Open file descriptors of `pid`.
pub fn open_fds(pid: Pid) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("{}/fd", pid.dir()))?.count())
}

/// What the open file descriptors of `pid` refer to, sorted, each as /proc shows its link
/// without the inode number: `socket`, `pipe`, `anon_inode:[io_uring]`, a path, ...
pub fn open_fd_kinds(pid: Pid) -> io::Result<Vec<String>> {
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(format!("{}/fd", pid.dir()))? {
        // The descriptor of this very listing is gone by the time it is read.
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let kind = match target.split_once(":[") {
            Some(("socket", inode)) => describe_socket(pid, inode.trim_end_matches(']')),
            Some((kind, rest)) if rest.trim_end_matches(']').parse::<u64>().is_ok() => {
                kind.to_owned()
            }
            _ => target,
        };
        kinds.push(kind);
    }
    kinds.sort();
    Ok(kinds)
}

/// The socket with inode number `inode`, as the tables of /proc/PID/net (of the calling
/// thread's network namespace) name it: `socket tcp 0100007F:2328 state 01`, `socket
/// netlink protocol 16`, `socket unix`; just `socket` if no table has it.
fn describe_socket(pid: Pid, inode: &str) -> String {
    // (table, column of the inode number)
    for (table, column) in [
        ("tcp", 9),
        ("tcp6", 9),
        ("udp", 9),
        ("udp6", 9),
        ("netlink", 9),
        ("unix", 6),
    ] {
        let Ok(text) = std::fs::read_to_string(format!("{}/net/{table}", pid.dir())) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(column) != Some(&inode) {
                continue;
            }
            return match table {
                "tcp" | "tcp6" => format!(
                    "socket {table} {} -> {} state {}",
                    fields[1], fields[2], fields[3]
                ),
                "netlink" => format!("socket netlink protocol {}", fields[1]),
                _ => format!("socket {table}"),
            };
        }
    }
    "socket".to_owned()
}

/// A size field (`NAME:   N kB`) of /proc/PID/status, in bytes.
fn status_bytes(pid: Pid, name: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("{}/status", pid.dir()))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .ok_or_else(|| io::Error::other(format!("no {name} line in /proc/PID/status")))?;
    Ok(kib * 1024)
}

/// Resident set size of `pid` in bytes (`VmRSS` of /proc/PID/status).
pub fn rss_bytes(pid: Pid) -> io::Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// Memory of `pid` pinned by the kernel, in bytes (`VmPin` of /proc/PID/status: the
/// process's `pinned_vm`). io_uring charges each zcrx area's pages to it at registration
/// and takes them off when it frees the area (`io_account_mem`/`io_unaccount_mem`,
/// io_uring/rsrc.c, called from io_uring/zcrx.c), which happens when the kernel tears the
/// instance down, asynchronously after the ring is closed.
pub fn pinned_bytes(pid: Pid) -> io::Result<u64> {
    status_bytes(pid, "VmPin")
}

/// The names (`comm`) of the threads of `pid`, sorted.
pub fn thread_names(pid: Pid) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(format!("{}/task", pid.dir()))? {
        // A thread that ended meanwhile has no comm any more.
        if let Ok(comm) = std::fs::read_to_string(entry?.path().join("comm")) {
            names.push(comm.trim_end().to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The thread ids of `pid` whose name (`comm`) is `name`.
pub fn threads_named(pid: Pid, name: &str) -> io::Result<Vec<u32>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("{}/task", pid.dir()))? {
        let entry = entry?;
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if comm.trim_end() == name {
            if let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) {
                found.push(tid);
            }
        }
    }
    Ok(found)
}

/// The one zcrx driver thread of `pid`; an error if there is none or more than one.
pub fn driver_thread(pid: Pid) -> io::Result<u32> {
    match threads_named(pid, DRIVER_THREAD_COMM)?[..] {
        [tid] => Ok(tid),
        [] => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no thread named {DRIVER_THREAD_COMM} in {}", pid.dir()),
        )),
        ref many => Err(io::Error::other(format!(
            "{} threads named {DRIVER_THREAD_COMM} in {}",
            many.len(),
            pid.dir()
        ))),
    }
}

/// CPU time used so far by thread `tid` of `pid`, in nanoseconds.
///
/// Read from /proc/PID/task/TID/schedstat (time on CPU, nanoseconds, the scheduler's own
/// accounting), which resolves far better than the clock ticks of `stat` (10 ms each): an
/// idle budget of 10 ms could not be measured in ticks. Falls back to `stat`'s utime+stime
/// when the kernel has no schedstat.
pub fn thread_cpu(pid: Pid, tid: u32) -> io::Result<Duration> {
    let task = format!("{}/task/{tid}", pid.dir());
    if let Ok(schedstat) = std::fs::read_to_string(format!("{task}/schedstat")) {
        if let Some(ns) = schedstat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
        {
            return Ok(Duration::from_nanos(ns));
        }
    }
    let stat = std::fs::read_to_string(format!("{task}/stat"))?;
    // The name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("malformed /proc/PID/task/TID/stat"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; field 3 is the first after the name.
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("malformed /proc/PID/task/TID/stat"))
    };
    // SAFETY: sysconf has no memory effects.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_nanos(total * 1_000_000_000 / per_second))
}

/// The CPU time the driver thread of `pid` uses while `during` runs.
pub fn driver_cpu_during<T>(pid: Pid, during: impl FnOnce() -> T) -> io::Result<(Duration, T)> {
    let tid = driver_thread(pid)?;
    let before = thread_cpu(pid, tid)?;
    let result = during();
    let after = thread_cpu(pid, tid)?;
    Ok((after.saturating_sub(before), result))
}

/// Context switches of thread `tid` of `pid` so far (voluntary + involuntary, from
/// /proc/PID/task/TID/status): a sleeping thread that keeps waking up shows here even when
/// each wake-up costs little CPU.
pub fn thread_switches(pid: Pid, tid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("{}/task/{tid}/status", pid.dir()))?;
    let mut total = 0;
    for line in status.lines() {
        if let Some(rest) = line
            .strip_prefix("voluntary_ctxt_switches:")
            .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
        {
            total += rest
                .trim()
                .parse::<u64>()
                .map_err(|_| io::Error::other("malformed ctxt_switches line"))?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_named_with_its_address_and_state() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let kinds = open_fd_kinds(Pid::Current).unwrap();
        // /proc/net/tcp: 127.0.0.1 as 0100007F, the port in hex, LISTEN is state 0A.
        let expected = format!("socket tcp 0100007F:{port:04X} -> 00000000:0000 state 0A");
        assert!(kinds.contains(&expected), "{expected} not in {kinds:?}");
        drop(listener);
        assert!(!open_fd_kinds(Pid::Current).unwrap().contains(&expected));
    }
}
