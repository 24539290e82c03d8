//! What `attach` checks about a socket before receiving from it, and the claim that keeps a
//! socket from being attached twice.
//!
//! Two readers of one connection (a second `attach` through a `try_clone`d or `dup`ed
//! descriptor) would split its bytes between two streams in no defined order, and in the
//! io_uring modes two multishot receives would race for the same data. A socket is the same
//! socket whatever descriptor refers to it, so claims are keyed by its inode (sockfs device
//! and inode number from fstat), process-wide: across runtimes too.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

use super::syscall;
use crate::error::{Error, ErrorKind, Result};

/// TCP states as `tcpi_state` reports them (include/net/tcp_states.h).
const TCP_SYN_SENT: u8 = 2;
const TCP_SYN_RECV: u8 = 3;
const TCP_CLOSE: u8 = 7;

/// Sockets attached to a stream that is still alive, by (device, inode).
static CLAIMED: Mutex<BTreeSet<(u64, u64)>> = Mutex::new(BTreeSet::new());

/// A socket's claim: released when the stream that owns it is dropped.
#[derive(Debug)]
pub(crate) struct SocketClaim {
    id: (u64, u64),
}

impl SocketClaim {
    /// Whether `fd` refers to the claimed socket (through any descriptor of it).
    pub(crate) fn is_socket(&self, fd: BorrowedFd<'_>) -> bool {
        socket_identity(fd).is_ok_and(|id| id == self.id)
    }
}

impl Drop for SocketClaim {
    fn drop(&mut self) {
        lock_claimed().remove(&self.id);
    }
}

fn lock_claimed() -> std::sync::MutexGuard<'static, BTreeSet<(u64, u64)>> {
    // The set is only inserted into and removed from: a panic cannot leave it half-changed.
    super::lock(&CLAIMED)
}

fn invalid_socket(message: String) -> Error {
    Error::new(ErrorKind::InvalidSocket, message)
}

/// `fstat` of a descriptor.
fn fstat(fd: BorrowedFd<'_>) -> std::io::Result<libc::stat> {
    // SAFETY: `stat` is plain old data; all-zero is valid.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a live descriptor (borrowed for this call); `stat` is writable.
    unsafe { syscall!(fstat(fd.as_raw_fd(), &mut stat)) }?;
    Ok(stat)
}

/// What identifies a socket whatever descriptor refers to it: sockfs device and inode.
fn socket_identity(fd: BorrowedFd<'_>) -> std::io::Result<(u64, u64)> {
    fstat(fd).map(|stat| (stat.st_dev, stat.st_ino))
}

/// Checks that `fd` is a TCP connection nobody receives from yet, and claims it.
pub(crate) fn claim_connected_tcp(fd: BorrowedFd<'_>) -> Result<SocketClaim> {
    let raw = fd.as_raw_fd();
    let stat =
        fstat(fd).map_err(|e| invalid_socket("cannot fstat the socket".into()).with_source(e))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(invalid_socket(
            "the descriptor is not a socket: attach a TCP connection (from TcpStream::connect \
             or TcpListener::accept)"
                .into(),
        ));
    }
    let protocol = socket_option(raw, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let kind = socket_option(raw, libc::SOL_SOCKET, libc::SO_TYPE)?;
    if kind != libc::SOCK_STREAM || protocol != libc::IPPROTO_TCP {
        return Err(invalid_socket(
            "the socket is not a TCP socket (zero-copy receive is TCP only): attach a TCP \
             connection"
                .into(),
        ));
    }
    if socket_option(raw, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0 {
        return Err(invalid_socket(
            "the socket is listening, not connected: accept a connection and attach that \
             (ZcListener does both)"
                .into(),
        ));
    }
    let info = tcp_info(raw)?;
    // A socket that was connected and has since been reset or closed is attached anyway:
    // its stream reports the end or the error, as for any connection (refusing it would
    // turn a peer's reset into an error of the accept loop).
    let never_connected =
        info.tcpi_state == TCP_CLOSE && info.tcpi_segs_in == 0 && info.tcpi_segs_out == 0;
    if never_connected {
        return Err(invalid_socket(
            "the socket is not connected: connect it first (TcpStream::connect) or attach an \
             accepted connection"
                .into(),
        ));
    }
    if info.tcpi_state == TCP_SYN_SENT || info.tcpi_state == TCP_SYN_RECV {
        return Err(invalid_socket(
            "the socket's connection is not established yet: attach it after connect \
             completed (await TcpStream::connect)"
                .into(),
        ));
    }
    let id = (stat.st_dev, stat.st_ino);
    if !lock_claimed().insert(id) {
        return Err(invalid_socket(
            "this socket is already attached (through another descriptor of it, from \
             try_clone or dup): a connection can have one receiving stream; keep using the \
             first, or drop it before attaching again"
                .into(),
        ));
    }
    Ok(SocketClaim { id })
}

fn socket_option(fd: libc::c_int, level: libc::c_int, name: libc::c_int) -> Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and writable, and `len` is the size of `value`.
    let read = unsafe {
        syscall!(getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        ))
    };
    if let Err(error) = read {
        return Err(invalid_socket("cannot read the socket's type".into()).with_source(error));
    }
    Ok(value)
}

pub(crate) fn tcp_info(fd: libc::c_int) -> Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all-zero is valid (and what a kernel that reports
    // fewer fields leaves in the rest).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are live and writable, and `len` is the size of `info`.
    let read = unsafe {
        syscall!(getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        ))
    };
    if let Err(error) = read {
        return Err(invalid_socket("cannot read the socket's TCP state".into()).with_source(error));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, IntoRawFd};

    use crate::backend::uring::synthetic;
    use crate::error::ErrorKind;

    fn kind_of(err: std::io::Error) -> ErrorKind {
        let inner = err.into_inner().expect("a tokio_zcrx::Error inside");
        inner
            .downcast::<crate::Error>()
            .expect("a tokio_zcrx::Error")
            .kind()
    }

    /// The io_uring backend refuses the same sockets as copy mode (tests/bad_input.rs, which
    /// also counts descriptors: this binary's parallel tests make a count here unreliable).
    #[test]
    fn the_uring_backend_refuses_sockets_it_cannot_receive_from() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let zcrx = synthetic::start(64, 1).unwrap();
        runtime.block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            // SAFETY: the descriptor moves out of `listener`: one owner.
            let listening = unsafe { std::net::TcpStream::from_raw_fd(listener.into_raw_fd()) };
            listening.set_nonblocking(true).unwrap();
            let err = zcrx
                .attach(tokio::net::TcpStream::from_std(listening).unwrap())
                .map(drop)
                .unwrap_err();
            assert_eq!(kind_of(err), ErrorKind::InvalidSocket);

            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let server = server.into_std().unwrap();
            let duplicate = server.try_clone().unwrap();
            let (stream, writer) = zcrx
                .attach(tokio::net::TcpStream::from_std(server).unwrap())
                .unwrap();
            let err = zcrx
                .attach(tokio::net::TcpStream::from_std(duplicate.try_clone().unwrap()).unwrap())
                .map(drop)
                .unwrap_err();
            assert_eq!(kind_of(err), ErrorKind::InvalidSocket);
            // Once the stream is gone, the connection may be attached again.
            drop((stream, writer));
            let (stream, writer) = zcrx
                .attach(tokio::net::TcpStream::from_std(duplicate).unwrap())
                .unwrap();
            drop((stream, writer, listener, _client));
            zcrx.shutdown().await;
        });
    }
}
