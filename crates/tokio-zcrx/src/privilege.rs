//! Capabilities, and what [`Zcrx::drop_privileges`](crate::Zcrx::drop_privileges) keeps.
//!
//! Only registering a zcrx queue needs `CAP_NET_ADMIN` (the kernel checks it in
//! `io_register_zcrx` and nowhere else: receives, refills, event re-arming, flushes and sends
//! do not). A server can therefore build every runtime it needs, then give the capability up
//! for the rest of its life. One thing changes after the drop: receive buffers of budgeted
//! NIC streams can no longer be sized past `net.core.rmem_max` (`SO_RCVBUFFORCE`), so raise
//! that sysctl first where streams need large windows.

use std::fmt;

/// A Linux capability, by its number in `<linux/capability.h>`.
///
/// ```
/// use tokio_zcrx::Capability;
///
/// assert_eq!(Capability::NET_ADMIN.to_string(), "CAP_NET_ADMIN");
/// assert_eq!(Capability::from_number(10), Some(Capability::NET_BIND_SERVICE));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Capability(u8);

/// The names of the capabilities Linux 7.3 defines, indexed by number.
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

impl Capability {
    /// `CAP_NET_BIND_SERVICE`: bind ports below 1024.
    pub const NET_BIND_SERVICE: Capability = Capability(10);
    /// `CAP_NET_ADMIN`: what registering a zcrx queue needs.
    pub const NET_ADMIN: Capability = Capability(12);
    /// `CAP_NET_RAW`: raw and packet sockets.
    pub const NET_RAW: Capability = Capability(13);
    /// `CAP_IPC_LOCK`: lock memory beyond `RLIMIT_MEMLOCK`.
    pub const IPC_LOCK: Capability = Capability(14);
    /// `CAP_SYS_ADMIN`.
    pub const SYS_ADMIN: Capability = Capability(21);
    /// `CAP_SYS_NICE`: raise priorities, set real-time scheduling and CPU affinity freely.
    pub const SYS_NICE: Capability = Capability(23);
    /// `CAP_SYS_RESOURCE`: exceed resource limits.
    pub const SYS_RESOURCE: Capability = Capability(24);

    /// The capability numbered `number` (`CAP_NET_ADMIN` is 12), for any of the 64 a
    /// capability set can hold, including numbers a later kernel may define.
    pub const fn from_number(number: u8) -> Option<Capability> {
        if number < 64 {
            Some(Capability(number))
        } else {
            None
        }
    }

    /// Its number in `<linux/capability.h>`.
    pub const fn number(self) -> u8 {
        self.0
    }

    pub(crate) const fn bit(self) -> u64 {
        1 << self.0
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match NAMES.get(usize::from(self.0)) {
            Some(name) => f.write_str(name),
            None => write!(f, "capability {}", self.0),
        }
    }
}

impl fmt::Debug for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The capabilities in a 64-bit set, as names, e.g. `CAP_NET_ADMIN, CAP_NET_RAW` (`none` for
/// the empty set).
pub(crate) fn describe_set(set: u64) -> String {
    if set == 0 {
        return "none".to_owned();
    }
    (0..64u8)
        .filter(|number| set & (1 << number) != 0)
        .map(|number| Capability(number).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`Zcrx::drop_privileges`](crate::Zcrx::drop_privileges) keeps: nothing by default;
/// [`keep`](DropPrivileges::keep) names what the application still needs.
///
/// ```
/// use tokio_zcrx::{Capability, DropPrivileges};
///
/// // Every capability goes, except binding to ports below 1024.
/// let drop = DropPrivileges::all().keep(Capability::NET_BIND_SERVICE);
/// assert_eq!(drop.kept().collect::<Vec<_>>(), [Capability::NET_BIND_SERVICE]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropPrivileges {
    keep: u64,
}

impl DropPrivileges {
    /// Drop every capability (`CAP_NET_ADMIN` included) from the effective, permitted,
    /// inheritable and ambient sets, and from the bounding set where the process may change
    /// it (it holds `CAP_SETPCAP`).
    pub fn all() -> DropPrivileges {
        DropPrivileges::default()
    }

    /// Keeps `capability` (where the process has it) in every set.
    #[must_use]
    pub fn keep(mut self, capability: Capability) -> DropPrivileges {
        self.keep |= capability.bit();
        self
    }

    /// The capabilities kept, in number order.
    pub fn kept(&self) -> impl Iterator<Item = Capability> + '_ {
        (0..64u8)
            .filter(|number| self.keep & (1 << number) != 0)
            .map(Capability)
    }

    pub(crate) fn kept_set(&self) -> u64 {
        self.keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernel_numbers() {
        assert_eq!(Capability::NET_ADMIN.number(), 12);
        assert_eq!(Capability::NET_ADMIN.to_string(), "CAP_NET_ADMIN");
        assert_eq!(Capability(40).to_string(), "CAP_CHECKPOINT_RESTORE");
        assert_eq!(Capability(41).to_string(), "capability 41");
        assert_eq!(Capability::from_number(64), None);
        assert_eq!(describe_set(0), "none");
        assert_eq!(
            describe_set(Capability::NET_ADMIN.bit() | Capability::NET_RAW.bit()),
            "CAP_NET_ADMIN, CAP_NET_RAW"
        );
    }

    #[test]
    fn keeps_only_what_is_named() {
        let drop = DropPrivileges::all()
            .keep(Capability::NET_RAW)
            .keep(Capability::NET_BIND_SERVICE);
        assert_eq!(
            drop.kept().collect::<Vec<_>>(),
            [Capability::NET_BIND_SERVICE, Capability::NET_RAW]
        );
        assert_eq!(DropPrivileges::all().kept_set(), 0);
    }
}
