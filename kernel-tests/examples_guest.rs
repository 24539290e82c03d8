//! The `sink`, `echo` and `loadgen` examples, run as programs inside the guest (they are on
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
    assert_eq!(summary["copy_bytes"], summary["bytes"], "{summary}");
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
