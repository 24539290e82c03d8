//! Facts about the running system that need no zcrx: whether io_uring may be used at all,
//! and the process's CAP_NET_ADMIN.

use std::fs;
use std::io;

use super::Errno;
use crate::sys::syscall;

/// The value of `/proc/sys/kernel/io_uring_disabled` (0 allowed, 1 only for privileged users
/// and members of `kernel.io_uring_group`, 2 disabled), `None` if the file cannot be read
/// (kernels before 6.6 have no such sysctl).
pub(crate) fn io_uring_disabled_sysctl() -> Option<u32> {
    fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why `io_uring_setup` failed, in plain words, given the sysctl value.
pub(crate) fn explain_setup_failure(errno: Errno, disabled_sysctl: Option<u32>) -> String {
    match errno.code() {
        libc::EPERM | libc::EACCES => match disabled_sysctl {
            Some(2) => "io_uring is disabled system-wide (kernel.io_uring_disabled = 2); \
                        `sysctl kernel.io_uring_disabled=0` enables it"
                .to_owned(),
            Some(1) => "io_uring is restricted to privileged processes and members of \
                        kernel.io_uring_group (kernel.io_uring_disabled = 1); run as root, \
                        join that group, or `sysctl kernel.io_uring_disabled=0`"
                .to_owned(),
            _ => "io_uring_setup is forbidden for this process although the kernel allows \
                  io_uring: a seccomp filter or security module blocks it, which is typical \
                  inside containers (Docker's and containerd's default seccomp profiles block \
                  io_uring); allow io_uring_setup, io_uring_enter and io_uring_register in \
                  the container's seccomp profile"
                .to_owned(),
        },
        libc::ENOSYS => "io_uring_setup does not exist here: the kernel was built without \
                         io_uring (CONFIG_IO_URING=n), or a seccomp filter hides the system \
                         call (containers and sandboxes do this)"
            .to_owned(),
        libc::ENOMEM => "io_uring_setup ran out of memory (or the locked-memory limit, \
                         RLIMIT_MEMLOCK, is too low on this kernel)"
            .to_owned(),
        libc::EMFILE | libc::ENFILE => {
            "io_uring_setup failed: the process or system is out of file descriptors".to_owned()
        }
        libc::EINVAL => "io_uring_setup rejected a plain ring: the kernel's io_uring is too \
                         old for this library"
            .to_owned(),
        _ => format!("io_uring_setup failed with {errno}"),
    }
}

/// Linux capability number of CAP_NET_ADMIN.
const CAP_NET_ADMIN: u32 = 12;

/// Whether CAP_NET_ADMIN is in this thread's effective set: capget(2) first, then the
/// `CapEff` line of /proc/self/status. Both failing gives the capget error.
pub(crate) fn has_cap_net_admin() -> io::Result<bool> {
    let effective = match crate::sys::privilege::capget_this_thread() {
        Ok(sets) => sets.effective,
        Err(capget_error) => proc_status_cap_eff().ok_or(capget_error)?,
    };
    Ok(effective & (1u64 << CAP_NET_ADMIN) != 0)
}

/// Whether CAP_NET_ADMIN is in this thread's permitted set; `None` if capget fails.
pub(crate) fn cap_net_admin_permitted() -> Option<bool> {
    let sets = crate::sys::privilege::capget_this_thread().ok()?;
    Some(sets.permitted & (1u64 << CAP_NET_ADMIN) != 0)
}

/// Whether CAP_NET_ADMIN is in this thread's bounding set; `None` if prctl cannot tell.
pub(crate) fn cap_net_admin_in_bounding_set() -> Option<bool> {
    // SAFETY: PR_CAPBSET_READ takes a capability number and reads no memory.
    let held = unsafe { syscall!(prctl(libc::PR_CAPBSET_READ, CAP_NET_ADMIN as libc::c_ulong)) };
    held.ok().map(|held| held == 1)
}

fn proc_status_cap_eff() -> Option<u64> {
    parse_cap_eff(&fs::read_to_string("/proc/self/status").ok()?)
}

/// The `CapEff:` hex mask of a /proc/PID/status text.
pub(crate) fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff_line() {
        let status = "Name:\tprobe\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let effective = parse_cap_eff(status).unwrap();
        assert_ne!(effective & (1 << CAP_NET_ADMIN), 0);
        assert_eq!(parse_cap_eff("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn setup_failures_read_as_plain_words() {
        let seccomp = explain_setup_failure(Errno::new(libc::EPERM), Some(0));
        assert!(seccomp.contains("seccomp"), "{seccomp}");
        let disabled = explain_setup_failure(Errno::new(libc::EPERM), Some(2));
        assert!(disabled.contains("disabled system-wide"), "{disabled}");
        let missing = explain_setup_failure(Errno::new(libc::ENOSYS), None);
        assert!(missing.contains("CONFIG_IO_URING"), "{missing}");
    }

    #[test]
    fn reads_this_process() {
        assert!(has_cap_net_admin().is_ok());
    }
}
