//! Operating-system helpers, one of each, for the whole crate: the [`syscall!`] helper
//! (every libc call that fails with -1 goes through it), page size, kernel release, interface indices, a poison-free `lock`,
//! [`CachePadded`], memory mappings, fork safety, netlink, socket claims, the process-wide
//! capability drop, and the one zcrx
//! registration (ring + area + refill region) that the runtime and the probe share.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

pub(crate) mod claim;
pub(crate) mod fork;
pub(crate) mod hugepages;
pub(crate) mod mem;
pub(crate) mod netdev;
pub(crate) mod netlink;
pub(crate) mod privilege;
pub(crate) mod registration;
pub(crate) mod steering;

/// Calls `libc::$fn($args)` and turns the C convention "-1 and `errno`" into an
/// [`io::Result`] of the return value, as mio's `syscall!` does.
///
/// It expands to a plain call, not to an `unsafe` block: every call site writes
/// `unsafe { syscall!(...) }` with its own `// SAFETY:` comment, so the reason a particular
/// call is sound stays next to the call (as the workspace's `undocumented_unsafe_blocks`
/// lint wants), instead of being hidden inside the macro.
///
/// Only for functions whose failure value is -1 (or -1 as `ssize_t`/`long`); functions that
/// fail with a null pointer, 0 or `MAP_FAILED` are checked by hand where they are called.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        let result = libc::$fn($($arg),*);
        if result == -1 {
            Err(::std::io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }};
}
pub(crate) use syscall;

/// `clock` now, in nanoseconds. For `CLOCK_MONOTONIC` (what [`std::time::Instant`] reads)
/// and `CLOCK_MONOTONIC_COARSE` (the time at the last tick: a third of the cost, no
/// timestamp counter read), which every Linux that runs Tokio has; it panics for another
/// clock that fails, as `Instant::now` does.
pub(crate) fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass.
    let read = unsafe { syscall!(clock_gettime(clock, &mut time)) };
    read.expect("clock_gettime of a monotonic clock");
    time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
}

/// The resolution of `clock` in nanoseconds (for `CLOCK_MONOTONIC_COARSE`, the tick), or
/// `None` if the kernel does not say.
pub(crate) fn clock_resolution_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut resolution = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes only the timespec we pass.
    let read = unsafe { syscall!(clock_getres(clock, &mut resolution)) };
    read.ok()?;
    Some(resolution.tv_sec as u64 * 1_000_000_000 + resolution.tv_nsec as u64)
}

/// The system page size (4096 if sysconf cannot tell, which it always can on Linux).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf takes no pointers.
    let size = unsafe { syscall!(sysconf(libc::_SC_PAGESIZE)) };
    size.ok()
        .and_then(|size| usize::try_from(size).ok())
        .filter(|&size| size > 0)
        .unwrap_or(4096)
}

/// `uname -r`, or `None` if uname(2) fails (it does not in practice).
pub(crate) fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname for the duration of the call.
    unsafe { syscall!(uname(&mut uts)) }.ok()?;
    // SAFETY: the kernel NUL-terminates `release` within the array, which lives in `uts`.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

/// The index of the network interface `name` in this network namespace, or the OS error
/// (`ENODEV`) if there is none. A name with a NUL cannot be an interface's: `ENODEV` too.
pub(crate) fn ifindex(name: &str) -> io::Result<u32> {
    let c_name = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::ENODEV))?;
    // SAFETY: `c_name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    // if_nametoindex fails with 0, not -1, so it cannot go through `syscall!`.
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// The name of the network interface with `index` in this network namespace, with the OS
/// error if there is none.
pub(crate) fn interface_name(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    // if_indextoname fails with a null pointer, so it cannot go through `syscall!`.
    if ptr.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the name is NUL-terminated inside `buf`.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// The MTU of the network interface with `index` in this network namespace.
pub(crate) fn interface_mtu(index: u32) -> io::Result<u32> {
    let name = interface_name(index)?;
    // SAFETY: an all-zero ifreq is valid (a C struct of integers and arrays).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
        // The name came from if_indextoname: shorter than IF_NAMESIZE, so a NUL stays.
        *to = from as libc::c_char;
    }
    // SAFETY: plain socket creation; the descriptor is owned right below.
    let fd = unsafe {
        syscall!(socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0
        ))
    }?;
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into `request`, which lives
    // through the call.
    unsafe {
        syscall!(ioctl(
            socket.as_raw_fd(),
            libc::SIOCGIFMTU as _,
            &mut request as *mut libc::ifreq
        ))
    }?;
    // SAFETY: SIOCGIFMTU succeeded, so it wrote the union's `ifru_mtu`.
    let mtu = unsafe { request.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Limits the TCP receive window `socket` advertises to `bytes` (`TCP_WINDOW_CLAMP`; the
/// kernel raises values below about a kilobyte): its peer can have no more than that much
/// unread data queued in it. A window already advertised is not taken back.
pub(crate) fn set_tcp_window_clamp(socket: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` lives through the call and its size is passed with it.
    unsafe {
        syscall!(setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t
        ))
    }?;
    Ok(())
}

/// The receive buffer of `socket` (`SO_RCVBUF`: twice what was set, as the kernel keeps
/// it).
pub(crate) fn receive_buffer(socket: BorrowedFd<'_>) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` live through the call; `len` says how large `value` is.
    unsafe {
        syscall!(getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut value as *mut libc::c_int).cast(),
            &mut len
        ))
    }?;
    u32::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Sets the receive buffer of `socket` (`SO_RCVBUF`; the kernel keeps twice `bytes`,
/// within `net.core.rmem_max`, and stops tuning it by itself).
pub(crate) fn set_receive_buffer(socket: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    set_receive_buffer_option(socket, libc::SO_RCVBUF, bytes)
}

/// Sets the receive buffer of `socket` past `net.core.rmem_max` (`SO_RCVBUFFORCE`; needs
/// `CAP_NET_ADMIN`, else EPERM): otherwise as [`set_receive_buffer`].
pub(crate) fn force_receive_buffer(socket: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    set_receive_buffer_option(socket, libc::SO_RCVBUFFORCE, bytes)
}

fn set_receive_buffer_option(
    socket: BorrowedFd<'_>,
    option: libc::c_int,
    bytes: u32,
) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` lives through the call and its size is passed with it.
    unsafe {
        syscall!(setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t
        ))
    }?;
    Ok(())
}

/// Locks `mutex`, ignoring poisoning. Every lock in this crate guards data that a panicking
/// holder cannot leave half-changed (queues and tables changed by single calls, counters),
/// and the runtime must keep working (and returning buffers) after a panic in user code.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs the calling thread on `cpus` only (`sched_setaffinity`). CPUs past the kernel's
/// `cpu_set_t` are ignored; none left is EINVAL.
pub(crate) fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let mut any = false;
    for &cpu in cpus {
        if cpu < 8 * size_of::<libc::cpu_set_t>() {
            // SAFETY: `cpu` is within the set's bits (checked above).
            unsafe { libc::CPU_SET(cpu, &mut set) };
            any = true;
        }
    }
    if !any {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    unsafe { syscall!(sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)) }?;
    Ok(())
}

/// A CPU list as the kernel writes it (`0-3,8,10-11`): the CPUs, ascending.
pub(crate) fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|part| !part.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
                if first > last || last - first > 1 << 16 {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    (!cpus.is_empty()).then_some(cpus)
}

/// The CPUs interrupt `irq` is delivered to: `/proc/irq/N/effective_affinity_list` where the
/// kernel has it (where it really fires), else `smp_affinity_list` (where it may).
pub(crate) fn irq_cpus(irq: u32) -> Option<Vec<usize>> {
    ["effective_affinity_list", "smp_affinity_list"]
        .iter()
        .find_map(|file| {
            let text = std::fs::read_to_string(format!("/proc/irq/{irq}/{file}")).ok()?;
            parse_cpu_list(&text)
        })
}

/// How many receive queues interface `name` has (`/sys/class/net/NAME/queues/rx-*`).
pub(crate) fn rx_queue_count(name: &str) -> io::Result<u32> {
    let entries = std::fs::read_dir(format!("/sys/class/net/{name}/queues"))?;
    let count = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

/// Keeps `T` on cache lines of its own: zcrx-core's padding (128 bytes, see there why not
/// 64), so the crate has one idea of how far apart contended data must be.
pub(crate) use zcrx_core::pad::CachePadded;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_system() {
        assert!(page_size() >= 4096);
        assert!(page_size().is_power_of_two());
        assert!(kernel_release().is_some_and(|release| !release.is_empty()));
        let lo = ifindex("lo").expect("every network namespace has lo");
        assert_eq!(interface_name(lo).unwrap(), "lo");
        assert!(ifindex("no-such-if0").is_err());
        assert!(ifindex("nul\0").is_err());
        // What `ip link show lo` says.
        let sysfs = std::fs::read_to_string("/sys/class/net/lo/mtu").unwrap();
        assert_eq!(
            interface_mtu(lo).unwrap(),
            sysfs.trim().parse::<u32>().unwrap()
        );
        assert!(interface_mtu(u32::MAX).is_err());
    }

    #[test]
    fn socket_buffers_and_window_clamps_take() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let socket = std::os::fd::AsFd::as_fd(&client);
        set_receive_buffer(socket, 40_960).unwrap();
        // The kernel keeps twice the value (within net.core.rmem_max).
        assert_eq!(receive_buffer(socket).unwrap(), 81_920);
        set_tcp_window_clamp(socket, 16_384).unwrap();
        let mut clamp: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `clamp` and `len` live through the call; `len` says how large it is.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_WINDOW_CLAMP,
                (&mut clamp as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!((rc, clamp), (0, 16_384));
    }

    #[test]
    fn a_forced_receive_buffer_passes_rmem_max_and_a_plain_one_stops_there() {
        let rmem_max: u32 = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let socket = std::os::fd::AsFd::as_fd(&client);
        let wanted = rmem_max.saturating_mul(4).min(i32::MAX as u32 / 2);
        set_receive_buffer(socket, wanted).unwrap();
        assert_eq!(receive_buffer(socket).unwrap(), 2 * rmem_max);
        match force_receive_buffer(socket, wanted) {
            Ok(()) => assert_eq!(receive_buffer(socket).unwrap(), 2 * wanted),
            // Without CAP_NET_ADMIN (the test suite runs as root, but may not be).
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM)),
        }
    }

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn a_thread_can_be_pinned_and_unpinned() {
        std::thread::spawn(|| {
            // SAFETY: sched_getcpu takes nothing.
            let here = unsafe { libc::sched_getcpu() } as usize;
            pin_current_thread(&[here]).unwrap();
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getcpu() } as usize, here);
            assert_eq!(
                pin_current_thread(&[usize::MAX])
                    .unwrap_err()
                    .raw_os_error(),
                Some(libc::EINVAL)
            );
        })
        .join()
        .unwrap();
        assert_eq!(rx_queue_count("lo").unwrap(), 1);
    }

    #[test]
    fn syscall_maps_minus_one_to_the_os_error() {
        // SAFETY: closing a descriptor that cannot be open touches nothing.
        let closed = unsafe { syscall!(close(-1)) };
        assert_eq!(closed.unwrap_err().raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn lock_survives_a_panicking_holder() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let held = std::sync::Arc::clone(&mutex);
        let _ = std::thread::spawn(move || {
            let _guard = held.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}
