//! Copy mode makes one read system call per buffer, not two (issue 10: after every buffer
//! the stream used to make one more `recvfrom` that failed with EAGAIN, because
//! `try_read` keeps the socket's readiness after a short read; 80,003 EAGAIN for 40k redis
//! requests through a proxy).
//!
//! Counted exactly: this test binary defines `recv`, which the standard library (under mio
//! and Tokio) calls for every socket read, so the linker binds those calls here. Each call is
//! passed on to the kernel with the `recvfrom` system call (what glibc's `recv` makes) and
//! counted when it reads the socket under test. Its own binary, so no other test sees the
//! shim.

mod common;

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_zcrx::StreamOptions;

/// The descriptor whose reads are counted (-1: none).
static WATCHED_FD: AtomicI32 = AtomicI32::new(-1);
static READS: AtomicU64 = AtomicU64::new(0);
static WOULD_BLOCK: AtomicU64 = AtomicU64::new(0);

/// `recv(2)` as glibc has it, counted for the watched descriptor.
///
/// # Safety
///
/// As `recv(2)`: `buf` is writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn recv(
    fd: libc::c_int,
    buf: *mut libc::c_void,
    len: libc::size_t,
    flags: libc::c_int,
) -> libc::ssize_t {
    // SAFETY: the caller's arguments, passed on unchanged; null address arguments are what
    // glibc's recv passes to recvfrom.
    let result = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf,
            len,
            flags,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    if fd == WATCHED_FD.load(Ordering::Relaxed) {
        READS.fetch_add(1, Ordering::Relaxed);
        if result < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
            WOULD_BLOCK.fetch_add(1, Ordering::Relaxed);
        }
    }
    result as libc::ssize_t
}

/// Request and reply, `ROUNDS` times: each request arrives alone, so each is one buffer; the
/// stream must read each with one system call (plus one for the end of the stream).
#[tokio::test(flavor = "current_thread")]
async fn each_buffer_costs_one_read_system_call() {
    const ROUNDS: u64 = 1000;
    const REQUEST: usize = 1000;
    let zcrx = common::copy_runtime(64, 64 << 10);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (socket, _) = listener.accept().await.unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let (mut stream, mut writer) = zcrx.attach_with(socket, StreamOptions::new()).unwrap();
    WATCHED_FD.store(fd, Ordering::Relaxed);
    // The shim is in use (a build that bypassed it would count nothing and pass wrongly).
    let server = async {
        let mut buffers = 0u64;
        while let Some(buf) = stream.next().await {
            let buf = buf.unwrap();
            assert_eq!(buf.len(), REQUEST);
            writer.write_all(&buf[..1]).await.unwrap();
            buffers += 1;
        }
        buffers
    };
    let client = async {
        let request = vec![7u8; REQUEST];
        let mut reply = [0u8; 1];
        for _ in 0..ROUNDS {
            client.write_all(&request).await.unwrap();
            client.read_exact(&mut reply).await.unwrap();
        }
        drop(client);
    };
    let (buffers, ()) = tokio::join!(server, client);
    WATCHED_FD.store(-1, Ordering::Relaxed);
    let (reads, would_block) = (
        READS.load(Ordering::Relaxed),
        WOULD_BLOCK.load(Ordering::Relaxed),
    );
    println!("{buffers} buffers: {reads} reads of the socket, {would_block} EAGAIN");
    assert_eq!(buffers, ROUNDS);
    assert!(reads >= ROUNDS, "the shim did not see the reads: {reads}");
    // One per buffer and one for EOF; a few spurious wake-ups are tolerated. The old
    // poll_read_ready + try_read made 2 per buffer (one EAGAIN each).
    assert!(
        reads <= ROUNDS + 1 + ROUNDS / 100,
        "{reads} reads for {ROUNDS} buffers ({would_block} EAGAIN)"
    );
}
