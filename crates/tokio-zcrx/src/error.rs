//! Errors that say what went wrong and what to do about it.

use std::fmt;
use std::io;

/// What kind of problem an [`Error`] is, for code that wants to react to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A builder setting is out of range or inconsistent; nothing was registered.
    InvalidConfig,
    /// The process lacks `CAP_NET_ADMIN` (zcrx registration needs it); the message names the
    /// ways to grant it.
    PermissionDenied,
    /// A registration after this process gave up `CAP_NET_ADMIN` with
    /// [`Zcrx::drop_privileges`](crate::Zcrx::drop_privileges): build every nic and nodev
    /// runtime before dropping.
    PrivilegesDropped,
    /// [`Zcrx::drop_privileges`](crate::Zcrx::drop_privileges) could not drop in every thread;
    /// the message names the thread and says whether anything was dropped.
    PrivilegeDropFailed,
    /// io_uring cannot be used here (disabled by sysctl, forbidden by seccomp, too old).
    IoUringUnavailable,
    /// The running kernel lacks a feature that was asked for.
    KernelTooOld,
    /// The named interface does not exist (in this network namespace).
    InterfaceNotFound,
    /// The interface's driver cannot do zero-copy receive.
    InterfaceUnsupported,
    /// The interface could, but is not configured for it (header split, hds-thresh).
    InterfaceNotConfigured,
    /// The interface's driver does zero-copy receive, but not in chunks larger than a page
    /// (it lacks rx page size support, `QCFG_RX_PAGE_SIZE`): use one-page chunks (omit
    /// [`Builder::chunk_size`](crate::Builder::chunk_size)) or a NIC whose driver has it.
    ChunkSizeUnsupported,
    /// Chunks larger than a page need a receive area of 2 MiB huge pages, and none could be
    /// had: too few reserved pages (`vm.nr_hugepages`) and transparent huge pages disabled or
    /// not granted. The message says how many pages the area needs, how many are free, and
    /// the command that reserves them.
    HugePagesUnavailable,
    /// The receive queue index is out of range for the interface.
    QueueOutOfRange,
    /// The queue is already bound (another zcrx instance, XDP, AF_XDP). A previous zcrx
    /// instance still being torn down is waited out first, for up to
    /// [`Builder::queue_release_wait`](crate::Builder::queue_release_wait); the message says
    /// what still holds the queue.
    QueueBusy,
    /// Memory could not be mapped, pinned or registered (RLIMIT_MEMLOCK, huge pages).
    OutOfMemory,
    /// No file descriptor is left: the process reached RLIMIT_NOFILE (EMFILE; `ulimit -n`,
    /// `LimitNOFILE=` in systemd) or the system its `fs.file-max` (ENFILE).
    TooManyOpenFiles,
    /// The socket given to [`Zcrx::attach`](crate::Zcrx::attach) cannot be received from: it
    /// is not a TCP socket, it listens, it is not connected, or it (or a duplicate of it,
    /// from `try_clone` or `dup`) is already attached. Nothing was registered and the socket
    /// was closed.
    InvalidSocket,
    /// The runtime has shut down or its driver thread failed.
    RuntimeGone,
    /// The kernel refused a request for another reason; the source has the errno.
    Kernel,
}

/// The error type of tokio-zcrx: a kind, a message that says what to do, and the kernel's
/// error where there was one.
///
/// It converts into [`io::Error`] (keeping the message) for code that works in `io::Result`.
///
/// ```
/// use tokio_zcrx::{Error, ErrorKind};
///
/// let err = Error::new(ErrorKind::InvalidConfig, "area size must be at least one chunk");
/// assert_eq!(err.kind(), ErrorKind::InvalidConfig);
/// let io: std::io::Error = err.into();
/// assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
/// ```
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
}

impl Error {
    /// An error of `kind` with a message (which should say what to do).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn with_source(mut self, source: io::Error) -> Error {
        self.source = Some(source);
        self
    }

    /// What kind of problem this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The kernel's errno, if the kernel refused something.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(io::Error::raw_os_error)
    }

    /// The message, without the source.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, " ({source})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        let kind = match err.kind {
            ErrorKind::InvalidConfig | ErrorKind::InvalidSocket => io::ErrorKind::InvalidInput,
            ErrorKind::PermissionDenied | ErrorKind::PrivilegesDropped => {
                io::ErrorKind::PermissionDenied
            }
            ErrorKind::InterfaceNotFound => io::ErrorKind::NotFound,
            ErrorKind::IoUringUnavailable
            | ErrorKind::KernelTooOld
            | ErrorKind::InterfaceUnsupported
            | ErrorKind::ChunkSizeUnsupported => io::ErrorKind::Unsupported,
            ErrorKind::OutOfMemory | ErrorKind::HugePagesUnavailable => io::ErrorKind::OutOfMemory,
            ErrorKind::QueueBusy => io::ErrorKind::ResourceBusy,
            ErrorKind::RuntimeGone => io::ErrorKind::BrokenPipe,
            ErrorKind::InterfaceNotConfigured
            | ErrorKind::QueueOutOfRange
            | ErrorKind::TooManyOpenFiles
            | ErrorKind::PrivilegeDropFailed
            | ErrorKind::Kernel => match &err.source {
                Some(source) => source.kind(),
                None => io::ErrorKind::Other,
            },
        };
        io::Error::new(kind, err)
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_includes_the_kernel_error() {
        let err = Error::new(
            ErrorKind::QueueOutOfRange,
            "eth0 has 4 rx queues; queue 9 is out of range",
        )
        .with_source(io::Error::from_raw_os_error(libc::ERANGE));
        let text = err.to_string();
        assert!(text.starts_with("eth0 has 4 rx queues"), "{text}");
        assert!(text.contains("os error 34"), "{text}");
        assert_eq!(err.raw_os_error(), Some(libc::ERANGE));
        let io: io::Error = err.into();
        assert!(io.to_string().contains("queue 9"));
    }
}
