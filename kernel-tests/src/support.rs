//! What the guest tests of the runtime share: a Tokio runtime, building a zcrx runtime
//! while the previous test's instance is still being torn down, and accepting a stream.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_zcrx::{ZcBuf, ZcStream, Zcrx};

/// A two-worker Tokio runtime, like a small server's.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Reads a stream to its end, checking every byte against the pattern from `position`;
/// returns where it ended, and the last buffer if `hold_last` (else every buffer is dropped,
/// so returned, as soon as it is checked).
async fn read_checked(
    mut stream: ZcStream,
    mut position: u64,
    hold_last: bool,
) -> (u64, Option<ZcBuf>) {
    use futures::StreamExt;
    let mut last = None;
    while let Some(buf) = stream.next().await {
        let buf = buf.expect("stream error");
        if let Some(i) = crate::first_mismatch(position, &buf) {
            panic!("byte {} of the stream is wrong", position + i as u64);
        }
        position += buf.len() as u64;
        if hold_last {
            last = Some(buf);
        }
    }
    (position, last)
}

/// Reads a stream to its end, checking every byte against the pattern from `position`;
/// returns where it ended.
pub async fn read_verified_from(stream: ZcStream, position: u64) -> u64 {
    read_checked(stream, position, false).await.0
}

/// Reads a stream to its end, checking every byte; returns the byte count and the last
/// buffer received, still held: its chunk stays outstanding (not returned to the kernel)
/// until the buffer is dropped.
pub async fn read_verified_holding_last(stream: ZcStream) -> (u64, Option<ZcBuf>) {
    read_checked(stream, 0, true).await
}

/// Reads a stream to its end, checking every byte; returns the byte count.
pub async fn read_verified(stream: ZcStream) -> u64 {
    read_verified_from(stream, 0).await
}

/// A builder for the guest's zcrx-capable NIC queue (rx queue 0), events required.
pub fn nic(net: &crate::GuestNet) -> tokio_zcrx::Builder {
    Zcrx::builder()
        .mode(tokio_zcrx::Mode::Nic)
        .interface(&net.nic, 0)
        .events(tokio_zcrx::EventsPolicy::Required)
}

/// A builder for NODEV mode, events required.
pub fn nodev() -> tokio_zcrx::Builder {
    Zcrx::builder()
        .no_device()
        .events(tokio_zcrx::EventsPolicy::Required)
}

/// Builds a runtime. A queue whose previous instance the kernel is still tearing down
/// (asynchronously) answers EEXIST: the builder itself waits for it (`queue_release_wait`,
/// 5 s by default) and fails with `QueueBusy` past that.
pub fn build(builder: tokio_zcrx::Builder) -> Zcrx {
    builder
        .build()
        .unwrap_or_else(|e| panic!("building the runtime: {e}"))
}

/// Accepts one connection on `listener` and returns its stream (the write half dropped).
pub async fn accept(zcrx: &Zcrx, listener: &TcpListener) -> ZcStream {
    let (socket, _) = listener.accept().await.unwrap();
    zcrx.attach(socket).unwrap().0
}

/// Sets the guest's reserved 2 MiB huge pages (`vm.nr_hugepages`) to `pages` and waits (up
/// to 20 s) until the pool holds exactly that many, all free: the pages of a runtime that has
/// just shut down stay pinned until the kernel has torn its zcrx instance down, which is
/// asynchronous. Returns the pool's size then (fewer if memory is short, more if pages stayed
/// pinned).
pub fn reserve_huge_pages(pages: u64) -> u64 {
    let pool = |name: &str| -> u64 {
        let path = format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}"))
            .trim()
            .parse()
            .expect("a number of huge pages")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Written again each time: pages that were in use when it shrank are freed later.
        std::fs::write("/proc/sys/vm/nr_hugepages", format!("{pages}\n"))
            .expect("writing /proc/sys/vm/nr_hugepages");
        let (total, free) = (pool("nr_hugepages"), pool("free_hugepages"));
        if (total == pages && free == pages) || std::time::Instant::now() > deadline {
            return total;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `value` to a sysfs or procfs file and writes the old value back when dropped, so a
/// test that changes a kernel setting restores it even when it fails.
#[derive(Debug)]
pub struct KernelSetting {
    path: &'static str,
    old: String,
}

impl KernelSetting {
    pub fn set(path: &'static str, value: &str) -> KernelSetting {
        let old = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {value} to {path}: {e}"));
        KernelSetting { path, old }
    }
}

impl Drop for KernelSetting {
    fn drop(&mut self) {
        // The THP policy file reads `always [madvise] never`: write back the chosen word.
        let old = match self
            .old
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        {
            Some(chosen) => chosen.to_string(),
            None => self.old.trim().to_string(),
        };
        if let Err(e) = std::fs::write(self.path, &old) {
            eprintln!("could not restore {} to {old}: {e}", self.path);
        }
    }
}

/// Builds a runtime that is expected to fail and returns the error (the builder waits for
/// a queue still being torn down, as in [`build`]).
pub fn build_error(builder: tokio_zcrx::Builder) -> tokio_zcrx::Error {
    match builder.build() {
        Ok(zcrx) => panic!("built in {} mode, expected an error", zcrx.mode()),
        Err(e) => e,
    }
}

/// The peer's port in its namespace (vm/guest/init: nsim1 in nsb).
const PEER_NIC: &str = "nsim1";

/// Runs `script` with `sh -c` in the peer's network namespace (where its sysfs shows nsim1)
/// and returns its standard output, or what went wrong.
fn in_peer_namespace(net: &crate::GuestNet, script: &str) -> Result<String, String> {
    let netns = std::path::Path::new(&net.peer_netns)
        .file_name()
        .and_then(|name| name.to_str())
        .expect("TZX_PEER_NETNS names a namespace under /run/netns");
    let output = std::process::Command::new("/usr/sbin/ip")
        .args(["netns", "exec", netns, "sh", "-c", script])
        .output()
        .map_err(|e| format!("run ip netns exec: {e}"))?;
    if !output.status.success() {
        return Err(format!("`{script}` in {netns} failed: {output:?}"));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// While alive, the peer chooses each connection's tx queue by its flow hash, so flows
/// spread over all of nsim0's receive queues (netdevsim delivers to the rx queue numbered like
/// the sender's tx queue). The guest's default (vm/guest/init) sends every flow through tx
/// queue 0, so onto rx queue 0; dropping this restores it.
///
/// A flow keeps its hash, and so its queue, for its life: the guard also turns off the
/// peer's rehashing (`net.core.txrehash = 0`), which TCP otherwise does at every
/// retransmission timeout (`sk_rethink_txhash`) and which, through netdevsim, would move a
/// flow to another receive queue mid-connection. A NIC's RSS hashes the 4-tuple, which no
/// timeout changes; a flow moved to another queue's zcrx binding cannot be received by its
/// ring (`EFAULT`), as on a NIC whose RSS table is changed under live connections.
#[derive(Debug)]
#[must_use = "flows spread only while the guard lives"]
pub struct SpreadFlows {
    net: crate::GuestNet,
    saved_mask: String,
    saved_txrehash: Option<String>,
    saved_sack: String,
}

/// The peer namespace's TCP rehash switch (Linux 5.18+).
const TXREHASH: &str = "/proc/sys/net/core/txrehash";

/// The peer namespace's SACK switch. Off while flows spread: with flows on several netdevsim
/// queues, the peer's SACK processing hit a kernel BUG on both guest kernels (2 of 5 runs:
/// `skb_shift` `BUG_ON(todo > 0 && !nr_frags)`, net/core/skbuff.c, from `tcp_sacktag_walk`
/// in a softirq under `io_zcrx_recv`; docs/testing.md). Without SACK that path never runs;
/// loss is still recovered (NewReno), and nothing the tests assert depends on SACK.
const TCP_SACK: &str = "/proc/sys/net/ipv4/tcp_sack";

impl SpreadFlows {
    /// Clears the peer's XPS map (`xps_cpus` of every tx queue to 0), its rehashing and its
    /// SACK (off: see the note on `TCP_SACK` in this file).
    pub fn new(net: &crate::GuestNet) -> SpreadFlows {
        let queues = format!("/sys/class/net/{PEER_NIC}/queues");
        let saved_mask = in_peer_namespace(net, &format!("cat {queues}/tx-0/xps_cpus")).unwrap();
        in_peer_namespace(
            net,
            &format!("for q in {queues}/tx-*; do echo 0 > $q/xps_cpus || exit 1; done"),
        )
        .unwrap();
        let saved_txrehash = in_peer_namespace(net, &format!("cat {TXREHASH}")).ok();
        if saved_txrehash.is_some() {
            in_peer_namespace(net, &format!("echo 0 > {TXREHASH}")).unwrap();
        }
        let saved_sack = in_peer_namespace(net, &format!("cat {TCP_SACK}")).unwrap();
        in_peer_namespace(net, &format!("echo 0 > {TCP_SACK}")).unwrap();
        SpreadFlows {
            net: net.clone(),
            saved_mask,
            saved_txrehash,
            saved_sack,
        }
    }
}

/// The peer's TCP retransmission timeouts so far (`TcpExt: TCPTimeouts` in its
/// `/proc/net/netstat`): each would have moved its flow to another queue with rehashing on.
pub fn peer_tcp_timeouts(net: &crate::GuestNet) -> u64 {
    let netstat = in_peer_namespace(net, "cat /proc/net/netstat").unwrap();
    let mut lines = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "TCPTimeouts")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

impl Drop for SpreadFlows {
    fn drop(&mut self) {
        let queues = format!("/sys/class/net/{PEER_NIC}/queues");
        let restored = in_peer_namespace(
            &self.net,
            &format!("echo {} > {queues}/tx-0/xps_cpus", self.saved_mask),
        );
        let restored = restored.and_then(|_| match &self.saved_txrehash {
            Some(old) => in_peer_namespace(&self.net, &format!("echo {old} > {TXREHASH}")),
            None => Ok(String::new()),
        });
        let restored = restored.and_then(|_| {
            in_peer_namespace(&self.net, &format!("echo {} > {TCP_SACK}", self.saved_sack))
        });
        // A panic here, while a failed test unwinds, would abort the whole binary.
        if let Err(e) = restored {
            eprintln!("could not restore the peer's XPS map, rehashing or SACK (later tests may see flows on other queues): {e}");
        }
    }
}

/// Packets the interface `name` dropped on receive (`rx_dropped`; the test netdevsim counts
/// a packet it found no free chunk for there, as a NIC with an empty fill ring drops it).
pub fn rx_dropped(name: &str) -> u64 {
    let path = format!("/sys/class/net/{name}/statistics/rx_dropped");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Asserts that the kernel's copy counter (`Stats::copy_bytes`) shows every one of
/// `received` bytes copied, as in NODEV mode, within what the kernel leaves uncounted: it
/// counts fragment copies only, and payload in an skb's linear part is copied uncounted
/// (`io_zcrx_recv_skb`; the guest saw 53 of 16 MiB, a short tail segment). At most 1% may be
/// missing; more would mean bytes received some other way.
pub fn assert_all_copied(stats: &tokio_zcrx::Stats, received: u64) {
    let copied = stats.copy_bytes.expect("events and stats (7.2+)");
    assert!(
        copied <= received && received - copied <= received / 100,
        "{copied} of {received} bytes counted as copied: {stats}"
    );
}

/// An XDP program that passes every packet (and takes multi-buffer ones), attached to an
/// interface in generic (skb) mode through a BPF link; dropping it closes the link, which detaches the program. Made with the
/// `bpf` system call directly (two instructions: `r0 = XDP_PASS; exit`), so the guest needs
/// neither a compiler nor an object file.
pub struct PassingXdp {
    link: std::os::fd::OwnedFd,
    _program: std::os::fd::OwnedFd,
}

impl PassingXdp {
    /// Loads the program and attaches it to `interface`.
    pub fn attach(interface: &str) -> std::io::Result<PassingXdp> {
        use std::os::fd::FromRawFd;
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_XDP: u32 = 6;
        const BPF_XDP: u32 = 37;
        const XDP_FLAGS_SKB_MODE: u32 = 2;
        const XDP_PASS: i32 = 2;
        // struct bpf_insn: code, dst_reg:4 | src_reg:4, off (i16), imm (i32).
        let instruction = |code: u8, imm: i32| {
            let mut bytes = [0u8; 8];
            bytes[0] = code;
            bytes[4..].copy_from_slice(&imm.to_ne_bytes());
            u64::from_ne_bytes(bytes)
        };
        // BPF_ALU64 | BPF_MOV | BPF_K into r0; BPF_JMP | BPF_EXIT.
        let program = [instruction(0xb7, XDP_PASS), instruction(0x95, 0)];
        let license = c"GPL";
        let bpf = |command: libc::c_long, attr: &mut [u8; 128]| -> std::io::Result<i32> {
            // SAFETY: `attr` is a zeroed bpf_attr of 128 bytes (the kernel accepts a shorter
            // or longer one whose unknown tail is zero) holding pointers that outlive the call.
            let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), 128) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(fd as i32)
        };
        let put = |attr: &mut [u8; 128], at: usize, bytes: &[u8]| {
            attr[at..at + bytes.len()].copy_from_slice(bytes);
        };
        let mut load = [0u8; 128];
        put(&mut load, 0, &BPF_PROG_TYPE_XDP.to_ne_bytes());
        put(&mut load, 4, &(program.len() as u32).to_ne_bytes());
        put(&mut load, 8, &(program.as_ptr() as u64).to_ne_bytes());
        put(&mut load, 16, &(license.as_ptr() as u64).to_ne_bytes());
        // BPF_F_XDP_HAS_FRAGS: a device with tcp-data-split on (as zcrx needs) refuses a
        // program that cannot take multi-buffer packets with EBUSY (`dev_xdp_install`).
        put(&mut load, 44, &(1u32 << 5).to_ne_bytes());
        put(&mut load, 48, b"tzx_pass");
        put(&mut load, 68, &BPF_XDP.to_ne_bytes()); // expected_attach_type
        let program_fd = bpf(BPF_PROG_LOAD, &mut load)?;
        // SAFETY: a new fd the kernel just returned, owned by nothing else.
        let program_fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(program_fd) };
        let ifindex = {
            let name = std::ffi::CString::new(interface).unwrap();
            // SAFETY: a NUL-terminated name.
            match unsafe { libc::if_nametoindex(name.as_ptr()) } {
                0 => return Err(std::io::Error::last_os_error()),
                index => index,
            }
        };
        let mut create = [0u8; 128];
        put(
            &mut create,
            0,
            &(std::os::fd::AsRawFd::as_raw_fd(&program_fd) as u32).to_ne_bytes(),
        );
        put(&mut create, 4, &ifindex.to_ne_bytes());
        put(&mut create, 8, &BPF_XDP.to_ne_bytes());
        put(&mut create, 12, &XDP_FLAGS_SKB_MODE.to_ne_bytes());
        let link = bpf(BPF_LINK_CREATE, &mut create)?;
        Ok(PassingXdp {
            // SAFETY: as above.
            link: unsafe { std::os::fd::OwnedFd::from_raw_fd(link) },
            _program: program_fd,
        })
    }
}

impl std::fmt::Debug for PassingXdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassingXdp")
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}
