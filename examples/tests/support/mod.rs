#![allow(dead_code)] // each test file uses part of it
//! What the tests that run the `proxy` example share: process guards, the proxy process and
//! its JSON summary.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A child process killed (and reaped) when dropped.
pub(crate) struct Guard {
    pub(crate) child: Child,
    name: String,
}

impl Guard {
    pub(crate) fn spawn(name: &str, command: &mut Command) -> Guard {
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {name} ({command:?}): {e}. Install the Debian packages \
                 redis-server, redis-tools, nginx and curl, or run `cargo xtask real-software`"
            )
        });
        Guard {
            child,
            name: name.to_string(),
        }
    }

    pub(crate) fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with our own child's pid, which is not reaped before `drop`.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            eprintln!("killed {}", self.name);
        }
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on now (the server binds it right after).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`.
pub(crate) fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `proxy` example (see [`example_binary`]).
pub(crate) fn proxy_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| example_binary("proxy")).clone()
}

/// Example `name`, next to this test: `cargo test` builds examples only as test harnesses,
/// so the first test to need the real program builds it (`cargo build --example NAME`, same
/// profile and target directory; cargo's build lock is free while tests run).
pub(crate) fn example_binary(name: &str) -> PathBuf {
    // target/PROFILE/deps/TEST-HASH -> target/PROFILE/examples/NAME
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "-p", "tokio-zcrx-examples", "--example", name])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        build.arg("--release");
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("run cargo to build the {name} example: {e}"));
    assert!(
        status.success(),
        "building the {name} example failed: {status}"
    );
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing after the build",
        path.display()
    );
    path
}

/// The proxy in copy mode, with its JSON lines read on a thread.
pub(crate) struct Proxy {
    guard: Guard,
    pub(crate) addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Proxy {
    /// The proxy in front of `127.0.0.1:upstream`, with `extra` arguments.
    pub(crate) fn start(upstream: u16, extra: &[&str]) -> Proxy {
        let guard = Guard::spawn(
            "proxy",
            Command::new(proxy_binary())
                .args(["--listen", "127.0.0.1:0", "--mode", "copy", "--json"])
                .arg("--upstream")
                .arg(format!("127.0.0.1:{upstream}"))
                .args(extra)
                .stdout(Stdio::piped()),
        );
        let mut guard = guard;
        let stdout: ChildStdout = guard.child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the proxy printed no `listening` line");
        let listening: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(listening["type"], "listening", "{first}");
        assert_eq!(listening["mode"], "copy", "{first}");
        let addr = listening["addr"].as_str().unwrap().parse().unwrap();
        Proxy { guard, addr, lines }
    }

    /// Stops the proxy with SIGTERM and returns its summary; checks what holds for every
    /// run: every buffer came back, no descriptor stayed open, and the runtime received
    /// exactly what was forwarded. (Failed connections are the caller's to check.)
    pub(crate) fn stop(self) -> Value {
        self.guard.signal(libc::SIGTERM);
        self.summary()
    }

    /// Waits for the proxy to exit by itself (`--connections`), then checks its summary as
    /// [`stop`](Proxy::stop) does.
    pub(crate) fn summary(mut self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut summary = None;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let value: Value = serde_json::from_str(&line).unwrap();
            if value["type"] == "summary" {
                summary = Some(value);
            }
        }
        let status = self.guard.child.wait().unwrap();
        assert!(status.success(), "proxy exited with {status}");
        let summary = summary.expect("the proxy printed no summary");
        eprintln!("proxy summary: {summary}");
        assert_eq!(summary["buffers_outstanding"], 0, "{summary}");
        assert_eq!(
            summary["fds_at_exit"], summary["fds_listening"],
            "{summary}"
        );
        let forwarded = number(&summary, "to_upstream_bytes") + number(&summary, "to_client_bytes");
        assert_eq!(number(&summary, "runtime_bytes"), forwarded, "{summary}");
        // Copy mode: every byte received was copied, and every byte sent was written
        // plainly (no zero-copy send exists there), through the send API.
        assert_eq!(number(&summary, "copy_bytes"), forwarded, "{summary}");
        assert_eq!(number(&summary, "send_plain_bytes"), forwarded, "{summary}");
        assert_eq!(number(&summary, "send_zero_copy_bytes"), 0, "{summary}");
        assert!(number(&summary, "sends") > 0, "{summary}");
        summary
    }
}

pub(crate) fn number(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {value}"))
}
