//! The `sink`, `echo`, `loadgen` and `proxy` examples, run as programs inside the guest (they are on
//! its PATH), in nic mode on the netdevsim queue and in nodev mode, verified end to end.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const NIC_QUEUE: &str = "0";

/// A running example server; killed if the test fails before stopping it.
struct Server {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl Server {
    fn start(program: &str, args: &[&str]) -> Server {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} is on the guest's PATH: {e}"));
        let lines = BufReader::new(child.stdout.take().unwrap());
        // Its diagnostics go into the test's captured output, not onto the console.
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let name = program.to_string();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                println!("{name} (stderr): {line}");
            }
        });
        Server { child, lines }
    }

    fn next_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.lines.read_line(&mut line).unwrap() {
            0 => None,
            _ => Some(line.trim_end().to_string()),
        }
    }

    /// Reads lines until one contains `needle`; returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        while let Some(line) = self.next_line() {
            println!("server: {line}");
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the server ended before printing {needle:?}");
    }

    /// SIGTERM, then the remaining output; the server must exit 0.
    fn stop(mut self) -> Vec<String> {
        // SAFETY: kill(2) with a pid we own; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut rest = Vec::new();
        while let Some(line) = self.next_line() {
            println!("server: {line}");
            rest.push(line);
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the server exited with {status}");
        rest
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs loadgen and returns its JSON summary; it must exit 0.
fn loadgen(args: &[&str]) -> Value {
    let out = Command::new("loadgen").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("loadgen: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "loadgen {args:?} failed: {}",
        out.status
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["errors"], 0, "{summary}");
    summary
}

fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// A sink in `mode`, fed by loadgen; checks every connection's CRC-32 and the summary.
fn sink_round_trip(mode_args: &[&str], listen: &str, peer_netns: Option<&str>) -> Value {
    let mut args = vec!["--json", "--listen", listen];
    args.extend_from_slice(mode_args);
    let mut sink = Server::start("sink", &args);
    let listening: Value = serde_json::from_str(&sink.wait_for("\"listening\"")).unwrap();
    let addr = listening["addr"].as_str().unwrap().to_string();
    let mut load = vec![
        "--connect",
        &addr,
        "--conns",
        "4",
        "--bytes",
        "8M",
        "--seed",
        "11",
    ];
    if let Some(netns) = peer_netns {
        load.extend_from_slice(&["--netns", netns]);
    }
    let sent = loadgen(&load);
    // Let the sink see every connection end before stopping it.
    std::thread::sleep(Duration::from_millis(500));
    let output = json_lines(&sink.stop());
    for conn in sent["conns"].as_array().unwrap() {
        let local = conn["local"].as_str().unwrap();
        let received = output
            .iter()
            .find(|l| l["type"] == "conn" && l["peer"] == local)
            .unwrap_or_else(|| panic!("the sink reported no connection from {local}"));
        assert_eq!(received["bytes"], conn["bytes"], "{received} vs {conn}");
        assert_eq!(received["crc32"], conn["crc32"], "{received} vs {conn}");
    }
    let summary = output
        .iter()
        .find(|l| l["type"] == "summary")
        .expect("a summary line on SIGTERM")
        .clone();
    assert_eq!(summary["bytes"], sent["bytes"], "{summary}");
    assert_eq!(summary["conns"], 4);
    assert_eq!(summary["buffers_outstanding"], 0, "{summary}");
    summary
}

fn nic_args(nic: &str) -> Vec<&str> {
    vec!["--mode", "nic", "--interface", nic, "--queue", NIC_QUEUE]
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn sink_in_nic_mode_receives_zero_copy_from_loadgen() {
    let nic = std::env::var("TZX_NIC").unwrap();
    let addr = std::env::var("TZX_NIC_ADDR").unwrap();
    let netns = std::env::var("TZX_PEER_NETNS").unwrap();
    let summary = sink_round_trip(&nic_args(&nic), &format!("{addr}:0"), Some(&netns));
    assert_eq!(summary["mode"], "nic");
    assert_eq!(summary["copy_bytes"], 0, "zero copy expected: {summary}");
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn sink_in_nodev_mode_counts_every_byte_as_copied() {
    let summary = sink_round_trip(&["--mode", "nodev"], "127.0.0.1:0", None);
    assert_eq!(summary["mode"], "nodev");
    assert_nodev_copies_counted(&summary, "bytes");
}

/// NODEV copies every received byte, and the kernel's counters say so, nearly: it updates
/// them non-atomically from the receive paths of both CPUs and does not count copies of a
/// packet's linear part (`io_zcrx_recv_skb`, 7.2 and 7.3; ../shared/zcrx-kernel.md, "Events
/// and stats"), which TCP makes when it collapses a full receive queue, as it does for a
/// stream paused by its budget. So a few bytes can go uncounted (53 of 81,788,992 in one
/// proxy run, 38 of 33,554,432 in one sink run) but never more than arrived. `received` names
/// the summary's field of bytes received.
fn assert_nodev_copies_counted(summary: &Value, received: &str) {
    let copied = summary["copy_bytes"].as_u64().expect("copy_bytes");
    let received = summary[received].as_u64().expect("bytes received");
    assert!(
        copied <= received && copied >= received - received / 100,
        "{summary}"
    );
}

/// An echo server in `mode`; loadgen verifies every echoed byte.
fn echo_round_trip(mode_args: &[&str], listen: &str, peer_netns: Option<&str>) {
    let mut args = vec!["--listen", listen];
    args.extend_from_slice(mode_args);
    let mut echo = Server::start("echo", &args);
    let line = echo.wait_for("listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let mode = echo.wait_for("mode:");
    println!("{mode}");
    let mut load = vec![
        "--connect",
        &addr,
        "--conns",
        "8",
        "--bytes",
        "4M",
        "--seed",
        "5",
        "--verify-echo",
    ];
    if let Some(netns) = peer_netns {
        load.extend_from_slice(&["--netns", netns]);
    }
    let summary = loadgen(&load);
    assert_eq!(summary["echoed"], summary["bytes"], "{summary}");
    assert_eq!(summary["bytes"], 8 * (4 << 20), "{summary}");
    echo.stop();
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn echo_in_nic_mode_returns_every_byte() {
    let nic = std::env::var("TZX_NIC").unwrap();
    let addr = std::env::var("TZX_NIC_ADDR").unwrap();
    let netns = std::env::var("TZX_PEER_NETNS").unwrap();
    echo_round_trip(&nic_args(&nic), &format!("{addr}:0"), Some(&netns));
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn echo_in_nodev_mode_returns_every_byte() {
    echo_round_trip(&["--mode", "nodev"], "127.0.0.1:0", None);
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn sink_demo_runs_on_a_zcrx_kernel() {
    let out = Command::new("sink")
        .args(["--demo", "2", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "sink --demo failed: {}", out.status);
    let lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let listening = lines.iter().find(|l| l["type"] == "listening").unwrap();
    // No interface given: auto skips nic and takes the kernel's device-less mode.
    assert_eq!(listening["mode"], "nodev", "{listening}");
    let summary = lines.iter().find(|l| l["type"] == "summary").unwrap();
    assert!(summary["bytes"].as_u64().unwrap() > 0, "{summary}");
}

/// `sink --queues all` on the 4-queue pair with flows spread: a driver per queue, the
/// JSON says which queues are bound and what each received; every connection's CRC-32
/// matches, no queue copies, nothing is unmatched.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn sink_with_every_queue_bound_reports_each_queue() {
    let net = tokio_zcrx_kernel_tests::GuestNet::from_env();
    let spread = tokio_zcrx_kernel_tests::support::SpreadFlows::new(&net);
    let args = ["--mode", "nic", "--interface", &net.nic, "--queues", "all"];
    let summary = sink_round_trip(&args, &format!("{}:0", net.nic_addr), Some(&net.peer_netns));
    drop(spread);
    let queues = summary["queues"].as_array().expect("per-queue statistics");
    let ids: Vec<u64> = queues
        .iter()
        .map(|q| q["queue"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [0, 1, 2, 3], "{summary}");
    let mut per_queue = 0;
    for queue in queues {
        assert_eq!(queue["copy_bytes"], 0, "{queue}");
        assert!(queue["napi_id"].as_u64().is_some(), "{queue}");
        per_queue += queue["runtime_bytes"].as_u64().unwrap();
    }
    assert_eq!(summary["runtime_bytes"], per_queue, "{summary}");
    assert_eq!(summary["unmatched_connections"], 0, "{summary}");
    assert_eq!(summary["copy_bytes"], 0, "{summary}");
}

/// `echo --queues 0-3` on the spread pair: every byte comes back.
#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn echo_with_every_queue_bound_returns_every_byte() {
    let net = tokio_zcrx_kernel_tests::GuestNet::from_env();
    let spread = tokio_zcrx_kernel_tests::support::SpreadFlows::new(&net);
    let args = ["--mode", "nic", "--interface", &net.nic, "--queues", "0-3"];
    echo_round_trip(&args, &format!("{}:0", net.nic_addr), Some(&net.peer_netns));
    drop(spread);
}

// ---------------------------------------------------------------------------------------
// The `proxy` example (issue 13): verified clients -> proxy -> a verified upstream, both
// directions, as a program.

/// How one client connection through the proxy behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Both directions at once: the client sends `UP` bytes while the upstream sends `DOWN`
    /// back; each side then shuts its sending direction down and reads to the end.
    Both,
    /// The client sends `UP` bytes and half-closes; only after that end of stream reached
    /// the upstream does it answer with `DOWN` bytes, which the client reads on its still
    /// open direction.
    HalfClose,
    /// The client sends `BEFORE_RESET` bytes and, once the upstream has checked them all,
    /// resets (`SO_LINGER` 0): the proxy must reset the upstream connection too.
    Reset,
    /// The client sends nothing and half-closes at once; the upstream sends `DOWN` bytes.
    DownOnly,
}

/// Eight connections: four both ways at once, two half-closing, one reset, one download.
const ROLES: [Role; 8] = [
    Role::Both,
    Role::Both,
    Role::Both,
    Role::Both,
    Role::HalfClose,
    Role::HalfClose,
    Role::Reset,
    Role::DownOnly,
];
/// Client to upstream, per connection (after the 8-byte id).
const UP: u64 = 8 << 20;
/// Upstream to client, per connection.
const DOWN: u64 = 4 << 20;
const BEFORE_RESET: u64 = 2 << 20;
/// Every socket read in the clients and the upstream gives up after this (a hung proxy
/// fails the test instead of hanging it).
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Where connection `id`'s bytes start in the pattern, per direction: every stream is
/// distinct, so bytes crossing from one connection (or direction) into another are caught.
fn pattern_base(id: u64, downstream: bool) -> u64 {
    (id << 36) | (u64::from(downstream) << 35)
}

/// Writes `total` pattern bytes from `base` on.
fn write_pattern(socket: &mut std::net::TcpStream, base: u64, total: u64) {
    use std::io::Write;
    let mut buf = vec![0u8; 256 << 10];
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(buf.len() as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = tokio_zcrx_kernel_tests::pattern_byte(base + sent + i as u64);
        }
        socket.write_all(&buf[..n]).expect("write");
        sent += n as u64;
    }
}

/// Reads to the end of stream, checking every byte against the pattern from `base`; calls
/// `progress` with the bytes checked so far after each read. Returns the bytes read, or the
/// error that ended the stream (and how many bytes were checked before it).
fn read_pattern(
    socket: &mut std::net::TcpStream,
    base: u64,
    what: &str,
    mut progress: impl FnMut(u64),
) -> Result<u64, (std::io::Error, u64)> {
    use std::io::Read;
    let mut buf = vec![0u8; 256 << 10];
    let mut position = 0u64;
    loop {
        let n = match socket.read(&mut buf) {
            Ok(0) => return Ok(position),
            Ok(n) => n,
            Err(e) => return Err((e, position)),
        };
        if let Some(i) = tokio_zcrx_kernel_tests::first_mismatch(base + position, &buf[..n]) {
            panic!("{what}: byte {} is wrong", position + i as u64);
        }
        position += n as u64;
        progress(position);
    }
}

/// What the client of connection `id` saw.
#[derive(Debug)]
struct ClientEnd {
    id: u64,
    /// Its local address: the proxy names connections by it.
    local: String,
    sent: u64,
    /// Bytes read (and checked) from the proxy.
    received: u64,
}

/// One client: connects to the proxy, sends its id and its bytes, reads what comes back.
/// `upstream_checked` says when the upstream has checked every byte (for the reset).
fn client(
    proxy: std::net::SocketAddr,
    id: u64,
    role: Role,
    upstream_checked: std::sync::mpsc::Receiver<()>,
) -> ClientEnd {
    use std::io::Write;
    let mut socket = std::net::TcpStream::connect(proxy).expect("client: connect");
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let local = socket.local_addr().unwrap().to_string();
    socket.write_all(&id.to_le_bytes()).unwrap();
    let up = match role {
        Role::Both | Role::HalfClose => UP,
        Role::Reset => BEFORE_RESET,
        Role::DownOnly => 0,
    };
    if role == Role::Reset {
        write_pattern(&mut socket, pattern_base(id, false), up);
        upstream_checked
            .recv_timeout(IO_TIMEOUT)
            .expect("the upstream checked the bytes before the reset");
        // Nothing came downstream (the upstream answers only after an end of stream).
        socket.set_nonblocking(true).unwrap();
        let nothing = std::io::Read::read(&mut socket, &mut [0u8; 1]);
        assert!(
            matches!(&nothing, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "client {id}: {nothing:?} before the reset"
        );
        // Closing this, the only descriptor, with a zero linger time sends the reset.
        tokio_zcrx_kernel_tests::reset_on_close(&socket);
        drop(socket);
        return ClientEnd {
            id,
            local,
            sent: 8 + up,
            received: 0,
        };
    }
    // The download runs beside the upload, so neither direction waits for the other.
    let mut reader = socket.try_clone().unwrap();
    let download = std::thread::spawn(move || {
        read_pattern(&mut reader, pattern_base(id, true), "client", |_| {})
    });
    write_pattern(&mut socket, pattern_base(id, false), up);
    socket.shutdown(std::net::Shutdown::Write).unwrap();
    let received = download
        .join()
        .unwrap()
        .unwrap_or_else(|(e, n)| panic!("client {id}: download failed after {n} bytes: {e}"));
    ClientEnd {
        id,
        local,
        sent: 8 + up,
        received,
    }
}

/// What the upstream saw on one connection.
#[derive(Debug)]
struct UpstreamEnd {
    id: u64,
    /// Bytes checked (after the id).
    received: u64,
    /// How the stream from the proxy ended: `None` for an end of stream.
    error: Option<std::io::ErrorKind>,
    sent: u64,
}

/// The upstream's side of one connection: reads the id, then checks the client's bytes and
/// answers as the role says.
fn upstream_conn(
    mut socket: std::net::TcpStream,
    checked: &[std::sync::mpsc::SyncSender<()>],
) -> UpstreamEnd {
    use std::io::Read;
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut id = [0u8; 8];
    socket.read_exact(&mut id).expect("upstream: id");
    let id = u64::from_le_bytes(id);
    let role = ROLES[id as usize];
    let reply = move |socket: &mut std::net::TcpStream| {
        write_pattern(socket, pattern_base(id, true), DOWN);
        socket.shutdown(std::net::Shutdown::Write).unwrap();
        DOWN
    };
    // `Both` answers while it reads; the others only after the client's end of stream.
    let answering = (role == Role::Both).then(|| {
        let mut writer = socket.try_clone().unwrap();
        std::thread::spawn(move || reply(&mut writer))
    });
    let signal = checked[id as usize].clone();
    let mut signalled = false;
    let read = read_pattern(&mut socket, pattern_base(id, false), "upstream", |n| {
        if role == Role::Reset && n >= BEFORE_RESET && !signalled {
            signalled = true;
            signal.send(()).unwrap();
        }
    });
    let (received, error) = match read {
        Ok(n) => (n, None),
        Err((e, n)) => (n, Some(e.kind())),
    };
    let sent = match answering {
        Some(thread) => thread.join().unwrap(),
        None if matches!(role, Role::HalfClose | Role::DownOnly) && error.is_none() => {
            reply(&mut socket)
        }
        None => 0,
    };
    UpstreamEnd {
        id,
        received,
        error,
        sent,
    }
}

/// The whole scenario through a `proxy` started with `mode_args`, listening on `listen_ip`,
/// with the clients and the upstream in `peer_netns` (if any) on `upstream_ip`. Returns the
/// proxy's JSON summary, after checking everything that does not depend on the mode.
fn proxy_round_trip(
    mode_args: &[&str],
    listen_ip: &str,
    upstream_ip: &str,
    peer_netns: Option<&str>,
) -> Value {
    use std::sync::mpsc;
    let netns = peer_netns.map(str::to_string);
    let enter = |netns: &Option<String>| {
        if let Some(ns) = netns {
            tokio_zcrx_kernel_tests::enter_netns(ns);
        }
    };
    // The upstream server, in the peer's namespace.
    let upstream_ip = upstream_ip.to_string();
    let (upstream_tx, upstream_rx) = mpsc::channel();
    let (checked_tx, checked_rx): (Vec<_>, Vec<_>) =
        ROLES.iter().map(|_| mpsc::sync_channel(1)).unzip();
    let upstream = {
        let netns = netns.clone();
        std::thread::spawn(move || {
            enter(&netns);
            let listener = std::net::TcpListener::bind((upstream_ip.as_str(), 0)).unwrap();
            upstream_tx.send(listener.local_addr().unwrap()).unwrap();
            let mut conns = Vec::new();
            for _ in ROLES {
                let (socket, _) = listener.accept().expect("upstream: accept");
                let checked = checked_tx.clone();
                conns.push(std::thread::spawn(move || upstream_conn(socket, &checked)));
            }
            let mut ends: Vec<UpstreamEnd> = conns.into_iter().map(|c| c.join().unwrap()).collect();
            ends.sort_by_key(|e| e.id);
            ends
        })
    };
    let upstream_addr = upstream_rx.recv_timeout(IO_TIMEOUT).unwrap().to_string();

    let connections = ROLES.len().to_string();
    let listen = format!("{listen_ip}:0");
    let mut args = vec![
        "--json",
        "--listen",
        &listen,
        "--upstream",
        &upstream_addr,
        "--connections",
        &connections,
    ];
    args.extend_from_slice(mode_args);
    let mut proxy = Server::start("proxy", &args);
    let listening: Value = serde_json::from_str(&proxy.wait_for("\"listening\"")).unwrap();
    let addr: std::net::SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
    // A proxy that never ends fails the test instead of hanging it.
    let pid = proxy.child.id() as i32;
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let finished = std::sync::Arc::clone(&finished);
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            while std::time::Instant::now() < deadline {
                if finished.load(std::sync::atomic::Ordering::Relaxed) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // SAFETY: kill(2) on our own child, which has not been reaped (`finished` is
            // set before the wait).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        })
    };

    let clients: Vec<_> = ROLES
        .iter()
        .zip(checked_rx)
        .enumerate()
        .map(|(id, (&role, checked))| {
            let netns = netns.clone();
            std::thread::spawn(move || {
                enter(&netns);
                client(addr, id as u64, role, checked)
            })
        })
        .collect();
    let clients: Vec<ClientEnd> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let upstream = upstream.join().unwrap();
    println!("clients: {clients:?}\nupstream: {upstream:?}");

    // The proxy stops by itself after --connections; every line after `listening`.
    let mut lines = Vec::new();
    while let Some(line) = proxy.next_line() {
        println!("proxy: {line}");
        lines.push(line);
    }
    finished.store(true, std::sync::atomic::Ordering::Relaxed);
    let status = proxy.child.wait().unwrap();
    assert!(!watchdog.join().unwrap(), "the proxy did not stop in 180 s");
    assert!(status.success(), "the proxy exited with {status}");
    let output = json_lines(&lines);

    // Every byte arrived, checked, at both ends; the reset cut exactly its connection.
    for (c, u) in clients.iter().zip(&upstream) {
        let role = ROLES[c.id as usize];
        assert_eq!(c.id, u.id);
        assert_eq!(
            u.received + 8,
            c.sent,
            "connection {}: upstream {u:?}",
            c.id
        );
        match role {
            Role::Reset => {
                assert_eq!(u.error, Some(std::io::ErrorKind::ConnectionReset), "{u:?}");
                assert_eq!((u.sent, c.received), (0, 0), "{u:?} {c:?}");
            }
            _ => {
                assert_eq!(u.error, None, "connection {}: {u:?}", c.id);
                assert_eq!(u.sent, DOWN);
                assert_eq!(c.received, DOWN, "connection {}: {c:?}", c.id);
            }
        }
        // The proxy's own account of the connection.
        let conn = output
            .iter()
            .find(|l| l["type"] == "conn" && l["peer"] == c.local.as_str())
            .unwrap_or_else(|| panic!("the proxy reported no connection from {}", c.local));
        assert_eq!(conn["to_upstream"], c.sent, "{conn}");
        assert_eq!(conn["to_client"], c.received, "{conn}");
        let end = if role == Role::Reset {
            "error"
        } else {
            "closed"
        };
        assert_eq!(conn["end"], end, "{conn}");
    }
    let summary = output
        .iter()
        .find(|l| l["type"] == "summary")
        .expect("a summary line at exit")
        .clone();
    let to_upstream: u64 = clients.iter().map(|c| c.sent).sum();
    let to_client: u64 = clients.iter().map(|c| c.received).sum();
    assert_eq!(summary["connections"], ROLES.len(), "{summary}");
    assert_eq!(summary["failed"], 1, "only the reset fails: {summary}");
    assert_eq!(summary["to_upstream_bytes"], to_upstream, "{summary}");
    assert_eq!(summary["to_client_bytes"], to_client, "{summary}");
    // Both directions came in through the runtime.
    assert_eq!(
        summary["runtime_bytes"],
        to_upstream + to_client,
        "{summary}"
    );
    assert_eq!(summary["buffers_outstanding"], 0, "{summary}");
    assert_eq!(
        summary["fds_at_exit"], summary["fds_listening"],
        "{summary}"
    );
    // The send side: every forwarded byte went out through a queued send (the reset
    // connection's too: the upstream had checked them all before the reset), and the
    // sends are counted.
    let field = |name: &str| {
        summary[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} in {summary}"))
    };
    assert_eq!(
        field("send_zero_copy_bytes")
            + field("send_kernel_copied_bytes")
            + field("send_plain_bytes"),
        to_upstream + to_client,
        "{summary}"
    );
    assert!(field("sends") > 0, "{summary}");
    summary
}

/// The send side as the guest's kernel does it, in both modes: `IORING_OP_SEND_ZC` from
/// the receive area, no fallback, and every notification reporting the bytes as copied. The
/// netdevsim peer (like loopback) is in the same kernel, whose receive path copies
/// zero-copy frags before a socket gets them (`skb_orphan_frags_rx`); only a NIC that
/// transmits reads the area in place (docs/testing.md, on forwarding).
fn assert_sends_copied_by_the_receiving_kernel(summary: &Value) {
    assert_eq!(summary["send_fallbacks"], 0, "{summary}");
    assert_eq!(summary["send_plain_bytes"], 0, "{summary}");
    assert_eq!(summary["send_zero_copy_bytes"], 0, "{summary}");
    assert_eq!(
        summary["send_kernel_copied_bytes"], summary["runtime_bytes"],
        "{summary}"
    );
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn proxy_in_nic_mode_forwards_both_ways_zero_copy() {
    let net = tokio_zcrx_kernel_tests::GuestNet::from_env();
    let summary = proxy_round_trip(
        &nic_args(&net.nic),
        &net.nic_addr,
        &net.peer_addr,
        Some(&net.peer_netns),
    );
    assert_eq!(summary["mode"], "nic", "{summary}");
    // The receive side, both directions: straight into the area, no byte copied.
    assert_eq!(summary["copy_bytes"], 0, "zero copy expected: {summary}");
    assert_sends_copied_by_the_receiving_kernel(&summary);
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn proxy_in_nodev_mode_forwards_both_ways() {
    let summary = proxy_round_trip(&["--mode", "nodev"], "127.0.0.1", "127.0.0.1", None);
    assert_eq!(summary["mode"], "nodev", "{summary}");
    assert_nodev_copies_counted(&summary, "runtime_bytes");
    assert_sends_copied_by_the_receiving_kernel(&summary);
}
