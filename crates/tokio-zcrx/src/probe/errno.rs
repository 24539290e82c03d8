//! A Linux error number with its symbolic name, as the probe reports it.

use std::fmt;
use std::io;

/// A Linux `errno` value returned by a system call, kept together with its symbolic name.
///
/// The probe reports kernel answers as `Errno` rather than as [`io::Error`] so that a report
/// can be compared, cloned and serialized. With the `serde` feature it serializes as
/// `{"code": 95, "name": "EOPNOTSUPP"}`.
///
/// ```
/// use tokio_zcrx::probe::Errno;
///
/// let errno = Errno::new(libc::EOPNOTSUPP);
/// assert_eq!(errno.name(), "EOPNOTSUPP");
/// assert_eq!(errno.to_string(), "EOPNOTSUPP (95)");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(i32);

impl Errno {
    /// Wraps a positive errno value, as found in `errno` or negated in a kernel return value.
    pub const fn new(code: i32) -> Self {
        Self(code)
    }

    /// Takes the errno out of an [`io::Error`]; errors that carry none (rare, library-made
    /// errors) become `EIO`, which reads as "an I/O error" and never as a kernel verdict.
    pub fn from_io_error(error: &io::Error) -> Self {
        Self(error.raw_os_error().unwrap_or(libc::EIO))
    }

    /// The raw positive errno value.
    pub const fn code(self) -> i32 {
        self.0
    }

    /// The symbolic name (`"EOPNOTSUPP"`), or `"E?"` for a value this table does not know.
    pub fn name(self) -> &'static str {
        errno_name(self.0).unwrap_or("E?")
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match errno_name(self.0) {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "errno {}", self.0),
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Errno {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut state = serializer.serialize_struct("Errno", 2)?;
        state.serialize_field("code", &self.0)?;
        state.serialize_field("name", self.name())?;
        state.end()
    }
}

/// Names of the errno values a probe can meet. `EOPNOTSUPP` is listed before `ENOTSUP`
/// because they are the same number on Linux and the kernel's name is `EOPNOTSUPP`.
fn errno_name(code: i32) -> Option<&'static str> {
    const NAMES: &[(i32, &str)] = &[
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::ESRCH, "ESRCH"),
        (libc::EINTR, "EINTR"),
        (libc::EIO, "EIO"),
        (libc::ENXIO, "ENXIO"),
        (libc::E2BIG, "E2BIG"),
        (libc::EBADF, "EBADF"),
        (libc::EAGAIN, "EAGAIN"),
        (libc::ENOMEM, "ENOMEM"),
        (libc::EACCES, "EACCES"),
        (libc::EFAULT, "EFAULT"),
        (libc::EBUSY, "EBUSY"),
        (libc::EEXIST, "EEXIST"),
        (libc::ENODEV, "ENODEV"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENFILE, "ENFILE"),
        (libc::EMFILE, "EMFILE"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::ERANGE, "ERANGE"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::EOVERFLOW, "EOVERFLOW"),
        (libc::EPROTONOSUPPORT, "EPROTONOSUPPORT"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::EAFNOSUPPORT, "EAFNOSUPPORT"),
        (libc::ENETDOWN, "ENETDOWN"),
        (libc::ENOBUFS, "ENOBUFS"),
        (libc::ETIMEDOUT, "ETIMEDOUT"),
        (libc::ECONNREFUSED, "ECONNREFUSED"),
        (libc::EMSGSIZE, "EMSGSIZE"),
        (libc::ENOTSOCK, "ENOTSOCK"),
    ];
    NAMES
        .iter()
        .find(|(known, _)| *known == code)
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_display() {
        assert_eq!(Errno::new(libc::EOPNOTSUPP).name(), "EOPNOTSUPP");
        assert_eq!(Errno::new(libc::ERANGE).to_string(), "ERANGE (34)");
        assert_eq!(Errno::new(4242).name(), "E?");
        assert_eq!(Errno::new(4242).to_string(), "errno 4242");
    }

    #[test]
    fn from_io_error_keeps_the_code() {
        let error = io::Error::from_raw_os_error(libc::EBUSY);
        assert_eq!(Errno::from_io_error(&error), Errno::new(libc::EBUSY));
        let synthetic = io::Error::other("no errno");
        assert_eq!(Errno::from_io_error(&synthetic).code(), libc::EIO);
    }
}
