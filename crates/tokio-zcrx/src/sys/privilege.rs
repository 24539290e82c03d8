//! Dropping capabilities in every thread of the process.
//!
//! Linux keeps capability sets per thread: `capset`, `PR_CAPBSET_DROP` and `PR_CAP_AMBIENT`
//! change only the calling thread. A Tokio program has many threads by the time it is ready to
//! drop (runtime workers, the blocking pool, driver threads), so dropping in one thread would
//! leave the others holding `CAP_NET_ADMIN`. This module does what glibc does for `setuid`
//! (its "setxid" broadcast) and what libcap's libpsx does for capabilities:
//!
//! 1. it installs a handler for a real-time signal of its own ([`drop_signal`]), refusing if
//!    the application already handles that signal;
//! 2. it drops in the calling thread (the bounding set first, while `CAP_SETPCAP` is still
//!    held; then the ambient set; then the effective, permitted and inheritable sets; and
//!    `PR_SET_KEEPCAPS` 0);
//! 3. it sends the signal to each other thread listed in `/proc/self/task` with `tgkill` and
//!    waits for that thread's answer: the handler does the same drop in its thread, with raw
//!    system calls and atomics only (it runs at any point of the thread's code, so it must be
//!    async-signal-safe);
//! 4. it lists the threads again until one pass finds none it has not handled: a thread
//!    created meanwhile inherits its creator's sets, and a creator that had not dropped yet is
//!    itself on the list;
//! 5. it reads `CapEff`, `CapPrm`, `CapInh`, `CapAmb` (and `CapBnd` if the bounding set was
//!    dropped) of every `/proc/self/task/*/status` and fails, naming the thread, if any still
//!    holds a capability it was not asked to keep.
//!
//! io_uring's worker threads (`iou-wrk-*`, flagged `PF_IO_WORKER`) are listed in
//! `/proc/self/task` too, but they are kernel threads that run no signal handler. They are
//! skipped: a request they run carries the credentials of the thread that submitted it
//! (`io_prep_async_work` takes `get_current_cred()` in io_uring/io_uring.c), so after the drop
//! they act without the dropped capabilities whatever their own status line says. (SQPOLL
//! threads, which use the credentials of the ring's creator, are never created by this crate.)
//!
//! The handler stays installed after the drop: a signal that arrives late must not meet the
//! default action of a real-time signal, which ends the process.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{lock, syscall};
use crate::error::{Error, ErrorKind, Result};
use crate::privilege::{describe_set, Capability, DropPrivileges};

/// The drop signal is `SIGRTMIN() + DROP_SIGNAL_OFFSET`. glibc keeps the two real-time signals
/// below its `SIGRTMIN()` (32 and 33, for thread cancellation and its own setxid broadcast) to
/// itself; the offset keeps clear of the first few, which applications pick most often.
pub(crate) const DROP_SIGNAL_OFFSET: libc::c_int = 7;

/// How long a thread may take to answer the drop signal. A thread answers as soon as the
/// kernel schedules it, unless it blocks the signal.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// `CAP_SETPCAP`, which changing the bounding set needs.
const CAP_SETPCAP: u64 = 1 << 8;
/// `PF_IO_WORKER` in the flags of /proc/PID/task/TID/stat: an io_uring worker thread.
const PF_IO_WORKER: u64 = 0x10;

/// How to give a process `CAP_NET_ADMIN`, shared by every message that says it is missing
/// (the runtime's `PermissionDenied`, the probe's report and verdicts).
pub(crate) const CAP_NET_ADMIN_FIX: &str =
    "grant CAP_NET_ADMIN in one of three ways: file capabilities on the binary \
     (`sudo setcap cap_net_admin+ep BINARY`); a systemd unit with \
     `AmbientCapabilities=CAP_NET_ADMIN` and `CapabilityBoundingSet=CAP_NET_ADMIN` (and \
     `User=` a dedicated user); or a privileged launcher that starts it with the capability \
     in its ambient set (`setpriv --reuid USER --regid GROUP --init-groups --inh-caps \
     +net_admin --ambient-caps +net_admin BINARY`), or run it as root. Once its queues are \
     registered it can give the capability up (Zcrx::drop_privileges; docs/nic-setup.md, \
     Security)";

/// The real-time signal that asks a thread to drop its capabilities.
pub(crate) fn drop_signal() -> libc::c_int {
    libc::SIGRTMIN() + DROP_SIGNAL_OFFSET
}

#[repr(C)]
struct CapUserHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapUserData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The three capability sets of one thread that capget/capset handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CapSets {
    pub(crate) effective: u64,
    pub(crate) permitted: u64,
    pub(crate) inheritable: u64,
}

/// This thread's sets. Async-signal-safe (one system call, no allocation).
pub(crate) fn capget_this_thread() -> io::Result<CapSets> {
    let mut header = CapUserHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0, // this thread
    };
    let mut data = [CapUserData::default(); 2];
    // SAFETY: version 3 makes the kernel write exactly two CapUserData entries, which `data`
    // holds; both pointers are valid for the call.
    unsafe {
        syscall!(syscall(
            libc::SYS_capget,
            &mut header as *mut CapUserHeader,
            data.as_mut_ptr(),
        ))
    }?;
    let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
    Ok(CapSets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// Sets this thread's sets. Async-signal-safe (one system call, no allocation).
fn capset_this_thread(sets: CapSets) -> io::Result<()> {
    let mut header = CapUserHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // The kernel reads the low words from the first entry and the high words from the second.
    let data = [
        CapUserData {
            effective: sets.effective as u32,
            permitted: sets.permitted as u32,
            inheritable: sets.inheritable as u32,
        },
        CapUserData {
            effective: (sets.effective >> 32) as u32,
            permitted: (sets.permitted >> 32) as u32,
            inheritable: (sets.inheritable >> 32) as u32,
        },
    ];
    // SAFETY: version 3 makes the kernel read exactly two CapUserData entries, which `data`
    // holds; both pointers are valid for the call.
    unsafe {
        syscall!(syscall(
            libc::SYS_capset,
            &mut header as *mut CapUserHeader,
            data.as_ptr(),
        ))
    }?;
    Ok(())
}

fn current_tid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// A step of the drop in one thread, for the error that names what failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    ReadSets = 1,
    Bounding = 2,
    Ambient = 3,
    SetSets = 4,
    KeepCaps = 5,
}

impl Step {
    fn describe(self) -> &'static str {
        match self {
            Step::ReadSets => "reading its capability sets (capget)",
            Step::Bounding => "dropping from its bounding set (PR_CAPBSET_DROP)",
            Step::Ambient => "clearing its ambient set (PR_CAP_AMBIENT_CLEAR_ALL)",
            Step::SetSets => "lowering its effective, permitted and inheritable sets (capset)",
            Step::KeepCaps => "clearing PR_SET_KEEPCAPS",
        }
    }

    fn from_code(code: u64) -> Option<Step> {
        Some(match code {
            1 => Step::ReadSets,
            2 => Step::Bounding,
            3 => Step::Ambient,
            4 => Step::SetSets,
            5 => Step::KeepCaps,
            _ => return None,
        })
    }
}

/// What a thread's drop failed at: the step and the errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StepFailure {
    step: Step,
    errno: i32,
}

impl StepFailure {
    fn at(step: Step, error: &io::Error) -> StepFailure {
        StepFailure {
            step,
            errno: error.raw_os_error().unwrap_or(0),
        }
    }

    /// Packed into one atomic word for the handler's answer (0 is success).
    fn encode(self) -> u64 {
        ((self.step as u64) << 32) | u64::from(self.errno as u32)
    }

    fn decode(word: u64) -> Option<StepFailure> {
        Some(StepFailure {
            step: Step::from_code(word >> 32)?,
            errno: word as u32 as i32,
        })
    }
}

// The request every thread applies, stored before any thread is asked. The handler reads it
// with acquire loads; tgkill orders the stores before the signal's delivery anyway.
/// Capabilities to keep (a 64-bit set).
static KEEP: AtomicU64 = AtomicU64::new(0);
/// 1 if the bounding set is dropped too (the calling thread held CAP_SETPCAP).
static DROP_BOUNDING: AtomicU64 = AtomicU64::new(0);
/// The highest capability number this kernel knows (/proc/sys/kernel/cap_last_cap).
static LAST_CAP: AtomicU64 = AtomicU64::new(40);

// The answer of the thread asked last: its failure word, then its tid (release), which the
// asking thread waits for (acquire).
static ANSWER_TID: AtomicI32 = AtomicI32::new(0);
static ANSWER_FAILURE: AtomicU64 = AtomicU64::new(0);

/// Drops the requested capabilities in the calling thread. Async-signal-safe: system calls
/// through `syscall!` (an `io::Error` of an errno allocates nothing), atomics, no locks.
fn drop_in_this_thread() -> std::result::Result<(), StepFailure> {
    let keep = KEEP.load(Ordering::Acquire);
    if DROP_BOUNDING.load(Ordering::Acquire) != 0 {
        // Before capset: dropping from the bounding set needs CAP_SETPCAP in the effective set.
        let last_cap = LAST_CAP.load(Ordering::Acquire).min(63);
        for cap in 0..=last_cap {
            if keep & (1 << cap) != 0 {
                continue;
            }
            // SAFETY: PR_CAPBSET_READ takes a capability number and reads no memory.
            let held = unsafe { syscall!(prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong)) }
                .map_err(|e| StepFailure::at(Step::Bounding, &e))?;
            if held == 1 {
                // SAFETY: PR_CAPBSET_DROP takes a capability number and reads no memory.
                unsafe { syscall!(prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong)) }
                    .map_err(|e| StepFailure::at(Step::Bounding, &e))?;
            }
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers; the unused arguments must be 0.
    let cleared = unsafe {
        syscall!(prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ))
    };
    match cleared {
        // EINVAL: a kernel before 4.3, which has no ambient set to clear.
        Err(e) if e.raw_os_error() != Some(libc::EINVAL) => {
            return Err(StepFailure::at(Step::Ambient, &e))
        }
        _ => {}
    }
    let held = capget_this_thread().map_err(|e| StepFailure::at(Step::ReadSets, &e))?;
    let kept = CapSets {
        effective: held.effective & keep,
        permitted: held.permitted & keep,
        inheritable: held.inheritable & keep,
    };
    if kept != held {
        capset_this_thread(kept).map_err(|e| StepFailure::at(Step::SetSets, &e))?;
    }
    // SAFETY: PR_SET_KEEPCAPS takes a flag and reads no memory.
    unsafe { syscall!(prctl(libc::PR_SET_KEEPCAPS, 0 as libc::c_ulong)) }
        .map_err(|e| StepFailure::at(Step::KeepCaps, &e))?;
    Ok(())
}

/// The drop signal's handler: drops in the interrupted thread and answers.
extern "C" fn on_drop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno, valid while the thread lives. A
    // handler must leave errno as it found it: the interrupted code may be about to read it.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above; a plain read of this thread's errno.
    let saved_errno = unsafe { *errno };
    let failure = match drop_in_this_thread() {
        Ok(()) => 0,
        Err(failure) => failure.encode(),
    };
    ANSWER_FAILURE.store(failure, Ordering::Relaxed);
    ANSWER_TID.store(current_tid(), Ordering::Release);
    // SAFETY: as above; restores the value read at entry.
    unsafe { *errno = saved_errno };
}

/// When this process dropped privileges, what it held before (the calling thread's
/// permitted set) and what it kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DropRecord {
    pub(crate) at: SystemTime,
    pub(crate) held: u64,
    pub(crate) kept: u64,
}

impl DropRecord {
    /// Whether the drop took CAP_NET_ADMIN away (a process that never had it did not lose it
    /// by dropping: its registrations fail for the ordinary reason).
    fn took_net_admin(&self) -> bool {
        let net_admin = Capability::NET_ADMIN.bit();
        self.held & net_admin != 0 && self.kept & net_admin == 0
    }
}

/// Serialises drops: the answer slots above serve one at a time.
static DROP_LOCK: Mutex<()> = Mutex::new(());
static RECORD: Mutex<Option<DropRecord>> = Mutex::new(None);

/// The last drop of this process, if it dropped.
pub(crate) fn dropped() -> Option<DropRecord> {
    *lock(&RECORD)
}

/// `PrivilegeDropFailed` with `message`.
fn drop_failed(message: String) -> Error {
    Error::new(ErrorKind::PrivilegeDropFailed, message)
}

/// Drops every capability `request` does not keep, in every thread of the process; see the
/// module's documentation for how.
pub(crate) fn drop_process_wide(request: &DropPrivileges) -> Result<()> {
    let _one_at_a_time = lock(&DROP_LOCK);
    let signal = drop_signal();
    install_handler(signal)?;
    let keep = request.kept_set();
    let own = capget_this_thread().map_err(|e| {
        drop_failed(
            "cannot read this thread's capability sets (capget); nothing was dropped".into(),
        )
        .with_source(e)
    })?;
    let drop_bounding = own.effective & CAP_SETPCAP != 0;
    let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(40);
    KEEP.store(keep, Ordering::Release);
    DROP_BOUNDING.store(u64::from(drop_bounding), Ordering::Release);
    LAST_CAP.store(last_cap, Ordering::Release);

    let me = current_tid();
    drop_in_this_thread().map_err(|failure| thread_failed(me, failure))?;
    // From here on some threads may lack what they had: a later registration must say why.
    let mut record = lock(&RECORD);
    // A second drop keeps the first one's account of what the process held.
    let held = record.map_or(own.permitted, |earlier| earlier.held | own.permitted);
    *record = Some(DropRecord {
        at: SystemTime::now(),
        held,
        kept: keep,
    });
    drop(record);

    let mut handled: HashSet<libc::pid_t> = HashSet::from([me]);
    loop {
        let pending: Vec<libc::pid_t> = list_threads()?
            .into_iter()
            .filter(|tid| !handled.contains(tid))
            .collect();
        if pending.is_empty() {
            break;
        }
        for tid in pending {
            if !is_io_worker(tid) {
                ask_thread(signal, tid)?;
            }
            handled.insert(tid);
        }
    }
    let threads = verify(keep, drop_bounding)?;
    tracing::info!(
        threads,
        kept = %describe_set(keep),
        bounding_set = if drop_bounding { "dropped" } else { "unchanged (no CAP_SETPCAP)" },
        "tokio-zcrx: capabilities dropped in every thread of the process"
    );
    Ok(())
}

/// Installs the drop signal's handler, unless the application handles that signal itself.
fn install_handler(signal: libc::c_int) -> Result<()> {
    let handler = on_drop_signal
        as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
        as libc::sighandler_t;
    // SAFETY: sigaction is plain old data; all-zero is a valid value (an empty mask).
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = handler;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `new.sa_mask` is a valid sigset_t owned by `new`.
    unsafe { syscall!(sigfillset(&mut new.sa_mask)) }.map_err(|e| {
        drop_failed("cannot prepare the drop signal's handler; nothing was dropped".into())
            .with_source(e)
    })?;
    // SAFETY: as above, all-zero is a valid sigaction to be overwritten.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid sigaction values for the call; the handler is an
    // `extern "C"` function with the SA_SIGINFO signature that lives as long as the program.
    unsafe { syscall!(sigaction(signal, &new, &mut old)) }.map_err(|e| {
        drop_failed(format!(
            "cannot install a handler for signal {signal}; nothing was dropped"
        ))
        .with_source(e)
    })?;
    if old.sa_sigaction == libc::SIG_DFL || old.sa_sigaction == handler {
        return Ok(());
    }
    // Someone else's: put it back, and refuse.
    // SAFETY: `old` is the disposition the kernel just returned; no old value is asked for.
    let _ = unsafe { syscall!(sigaction(signal, &old, std::ptr::null_mut())) };
    Err(drop_failed(format!(
        "cannot drop privileges: signal {signal} (SIGRTMIN+{DROP_SIGNAL_OFFSET}) already has a \
         handler in this process, and tokio-zcrx needs that signal to reach every thread \
         (capabilities belong to threads, not to the process); move the application's handler \
         to another signal. Nothing was dropped"
    )))
}

/// The thread ids of this process, from /proc/self/task.
fn list_threads() -> Result<Vec<libc::pid_t>> {
    let entries = fs::read_dir("/proc/self/task").map_err(|e| {
        drop_failed(
            "cannot list this process's threads in /proc/self/task (is /proc mounted?); some \
             threads may still hold their capabilities"
                .into(),
        )
        .with_source(e)
    })?;
    Ok(entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// The thread's name (`comm`), or `?` if it has exited.
fn thread_name(tid: libc::pid_t) -> String {
    fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|name| name.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

/// Whether `tid` is an io_uring worker thread (PF_IO_WORKER in its stat flags).
fn is_io_worker(tid: libc::pid_t) -> bool {
    fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|stat| stat_flags(&stat))
        .is_some_and(|flags| flags & PF_IO_WORKER != 0)
}

/// The `flags` field of a /proc/PID/stat line (the ninth; the name before it is in
/// parentheses and may hold spaces and parentheses of its own).
pub(crate) fn stat_flags(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(6)?.parse().ok()
}

fn thread_failed(tid: libc::pid_t, failure: StepFailure) -> Error {
    drop_failed(format!(
        "thread {tid} ({}) failed at {}: {}; the process may be left with some threads \
         holding capabilities, so do not go on serving as if the drop had worked",
        thread_name(tid),
        failure.step.describe(),
        io::Error::from_raw_os_error(failure.errno)
    ))
}

/// Sends the drop signal to `tid` and waits for its answer. A thread that exits first needs
/// no answer.
fn ask_thread(signal: libc::c_int, tid: libc::pid_t) -> Result<()> {
    ANSWER_TID.store(0, Ordering::Relaxed);
    ANSWER_FAILURE.store(0, Ordering::Relaxed);
    // SAFETY: getpid takes no arguments and cannot fail.
    let pid = unsafe { libc::getpid() };
    let start = Instant::now();
    loop {
        // SAFETY: tgkill takes plain integers; the signal has our handler.
        match unsafe { syscall!(tgkill(pid, tid, signal)) } {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()), // exited
            // EAGAIN: the real-time signal queue is full for now.
            Err(e)
                if e.raw_os_error() == Some(libc::EAGAIN) && start.elapsed() < ANSWER_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                return Err(drop_failed(format!(
                    "cannot signal thread {tid} ({}) to drop its capabilities",
                    thread_name(tid)
                ))
                .with_source(e))
            }
        }
    }
    let mut last_look = Instant::now();
    loop {
        if ANSWER_TID.load(Ordering::Acquire) == tid {
            return match StepFailure::decode(ANSWER_FAILURE.load(Ordering::Relaxed)) {
                None => Ok(()),
                Some(failure) => Err(thread_failed(tid, failure)),
            };
        }
        if last_look.elapsed() >= Duration::from_millis(20) {
            last_look = Instant::now();
            if fs::metadata(format!("/proc/self/task/{tid}")).is_err() {
                return Ok(()); // exited before it ran the handler
            }
            if start.elapsed() >= ANSWER_TIMEOUT {
                return Err(no_answer(signal, tid));
            }
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn no_answer(signal: libc::c_int, tid: libc::pid_t) -> Error {
    let status = fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap_or_default();
    let blocked = status_mask(&status, "SigBlk:")
        .is_some_and(|mask| signal >= 1 && mask & (1u64 << (signal - 1)) != 0);
    let why = if blocked {
        format!(
            "it blocks signal {signal} (its SigBlk mask); unblock SIGRTMIN+{DROP_SIGNAL_OFFSET} \
             in that thread"
        )
    } else {
        "it did not run (stopped, or stuck in the kernel)".to_owned()
    };
    drop_failed(format!(
        "thread {tid} ({}) did not drop its capabilities within {} s: {why}; the process may be \
         left with that thread holding capabilities",
        thread_name(tid),
        ANSWER_TIMEOUT.as_secs()
    ))
}

/// A hexadecimal mask line (`CapEff:`, `SigBlk:`, ...) of a /proc status text.
pub(crate) fn status_mask(status: &str, field: &str) -> Option<u64> {
    let value = status.lines().find_map(|line| line.strip_prefix(field))?;
    u64::from_str_radix(value.trim(), 16).ok()
}

/// Checks every thread's status; returns how many threads were checked.
fn verify(keep: u64, bounding_dropped: bool) -> Result<usize> {
    let mut checked = 0;
    for tid in list_threads()? {
        if is_io_worker(tid) {
            continue;
        }
        let Ok(status) = fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
            continue; // exited
        };
        let mut fields = vec!["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"];
        if bounding_dropped {
            fields.push("CapBnd:");
        }
        for field in fields {
            let Some(held) = status_mask(&status, field) else {
                continue; // CapAmb before Linux 4.3
            };
            let extra = held & !keep;
            if extra != 0 {
                return Err(drop_failed(format!(
                    "after the drop, thread {tid} ({}) still holds {} in {}; the process \
                     may be left with that thread holding capabilities",
                    thread_name(tid),
                    describe_set(extra),
                    field.trim_end_matches(':'),
                )));
            }
        }
        checked += 1;
    }
    Ok(checked)
}

/// The error for a registration after this process dropped `CAP_NET_ADMIN`, or `None` if it
/// did not (then the kernel decides). `what` names what was to be registered.
pub(crate) fn registration_after_drop(what: &str) -> Option<Error> {
    let record = dropped()?;
    if !record.took_net_admin() {
        return None;
    }
    Some(Error::new(
        ErrorKind::PrivilegesDropped,
        format!(
            "cannot register {what}: this process gave up CAP_NET_ADMIN with \
             Zcrx::drop_privileges {}, and registering a zcrx queue needs it (receiving, \
             returning buffers, events and flushes do not). Build every nic and nodev runtime \
             the process will need, restarts included, before dropping privileges; copy mode \
             needs none",
            describe_when(record.at, SystemTime::now())
        ),
    ))
}

/// When this process dropped CAP_NET_ADMIN, in words (`12.3 s ago (at ...)`), if it did.
pub(crate) fn dropped_net_admin_at() -> Option<String> {
    let record = dropped()?;
    record
        .took_net_admin()
        .then(|| describe_when(record.at, SystemTime::now()))
}

/// `12.3 s ago (at 2026-11-30 21:03:04 UTC)`.
fn describe_when(at: SystemTime, now: SystemTime) -> String {
    let ago = now.duration_since(at).unwrap_or_default();
    let seconds = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64);
    format!(
        "{:.1} s ago (at {})",
        ago.as_secs_f64(),
        format_utc(seconds)
    )
}

/// Seconds since the Unix epoch as `YYYY-MM-DD hh:mm:ss UTC` (proleptic Gregorian calendar;
/// the days-to-date conversion is Howard Hinnant's `civil_from_days`).
fn format_utc(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(1_764_460_800), "2025-11-30 00:00:00 UTC");
        assert_eq!(format_utc(1_796_072_584), "2026-11-30 21:03:04 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        let at = UNIX_EPOCH + Duration::from_secs(1_796_072_584);
        assert_eq!(
            describe_when(at, at + Duration::from_millis(12_340)),
            "12.3 s ago (at 2026-11-30 21:03:04 UTC)"
        );
    }

    #[test]
    fn reads_proc_fields() {
        let status = "Name:\tx\nSigBlk:\t0000000000000100\nCapEff:\t000001ffffffffff\n";
        assert_eq!(status_mask(status, "SigBlk:"), Some(0x100));
        assert_eq!(status_mask(status, "CapEff:"), Some(0x1ff_ffff_ffff));
        assert_eq!(status_mask(status, "CapAmb:"), None);
        // A name with a space and a parenthesis; flags 0x400050 (PF_IO_WORKER set).
        let stat = "1234 (iou-wrk (1) x) S 1 1 1 0 -1 4194384 0 0";
        assert_eq!(stat_flags(stat), Some(4_194_384));
        assert_ne!(stat_flags(stat).unwrap() & PF_IO_WORKER, 0);
        assert_eq!(stat_flags("garbage"), None);
    }

    #[test]
    fn step_failures_survive_the_answer_word() {
        let failure = StepFailure {
            step: Step::Bounding,
            errno: libc::EPERM,
        };
        assert_eq!(StepFailure::decode(failure.encode()), Some(failure));
        assert_eq!(StepFailure::decode(0), None);
    }

    #[test]
    fn only_a_drop_that_took_net_admin_is_blamed() {
        let record = |held: u64, kept: u64| DropRecord {
            at: UNIX_EPOCH,
            held,
            kept,
        };
        let net_admin = Capability::NET_ADMIN.bit();
        assert!(record(net_admin, 0).took_net_admin());
        assert!(!record(net_admin, net_admin).took_net_admin());
        assert!(!record(0, 0).took_net_admin());
    }

    #[test]
    fn the_drop_signal_is_above_glibcs_own() {
        assert!(drop_signal() > libc::SIGRTMIN());
        assert!(drop_signal() <= libc::SIGRTMAX());
    }

    #[test]
    fn reads_this_threads_sets() {
        let sets = capget_this_thread().unwrap();
        assert_eq!(sets.effective & !sets.permitted, 0);
    }
}
