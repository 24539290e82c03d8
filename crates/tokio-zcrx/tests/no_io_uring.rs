//! Where io_uring is forbidden (a container's seccomp profile), `auto` must still work, in
//! copy mode, and say why. The test forbids io_uring_setup for its own thread with a seccomp
//! filter (threads it creates inherit it; other tests' threads do not).

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_zcrx::{ActiveMode, Mode, Zcrx};

/// Makes io_uring_setup fail with EPERM in this thread and the threads it starts.
fn forbid_io_uring_setup() {
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let ld_w_abs = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let filter = [
        // seccomp_data: nr at offset 0, arch at offset 4.
        stmt(ld_w_abs, 4),
        jump(jeq, AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret, SECCOMP_RET_ALLOW),
        stmt(ld_w_abs, 0),
        jump(jeq, libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(ret, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with these options only changes this thread's privileges and filters;
    // `program` points to a live filter array for the duration of the call.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ),
            0,
            "installing the seccomp filter: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn auto_falls_back_to_copy_mode_when_seccomp_forbids_io_uring() {
    // A dedicated thread, so the filter stays away from the test harness's other threads.
    std::thread::spawn(|| {
        forbid_io_uring_setup();
        let zcrx = Zcrx::builder().interface("lo", 0).build().unwrap();
        assert_eq!(zcrx.mode(), ActiveMode::Copy);
        let selection = zcrx.mode_selection().to_string();
        assert!(selection.contains("seccomp"), "{selection}");
        let refused: Vec<Mode> = zcrx.mode_selection().refused.iter().map(|r| r.0).collect();
        assert_eq!(refused, [Mode::Nic, Mode::NoDevice]);

        // And copy mode works without io_uring.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = tokio::spawn(async move {
                let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
                socket.write_all(&[42u8; 300_000]).await.unwrap();
            });
            let (socket, _) = listener.accept().await.unwrap();
            let (mut stream, _writer) = zcrx.attach(socket).unwrap();
            let mut total = 0;
            while let Some(buf) = stream.next().await {
                let buf = buf.unwrap();
                assert!(buf.iter().all(|&b| b == 42));
                total += buf.len();
            }
            client.await.unwrap();
            assert_eq!(total, 300_000);
        });
        // io_uring really is forbidden here: an explicit io_uring mode fails, saying why.
        let err = Zcrx::builder().no_device().build().unwrap_err();
        assert_eq!(
            err.kind(),
            tokio_zcrx::ErrorKind::IoUringUnavailable,
            "{err}"
        );
    })
    .join()
    .unwrap();
}
