//! Software nobody here wrote, through the `proxy` example in copy mode: `redis-benchmark` and
//! `redis-cli` to `redis-server`, `curl` uploads and downloads to `nginx`.
//!
//! The programs come from Debian packages that `cargo xtask test` installs (`cargo xtask
//! real-software` runs this tier alone), so these tests are `#[ignore]`d in a plain `cargo
//! test` and run by the xtask with `--ignored`; there a missing program fails the test, saying
//! what to install, instead of skipping it. Every server runs on a private loopback port
//! with its files in a temporary directory, and every process is killed when its guard drops,
//! so a failing assertion leaves nothing running.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use support::{free_port, number, wait_for_port, Guard, Proxy};
use tokio_zcrx_examples::payload::Payload;

/// A directory of our own under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("tzx-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command to its end; panics, with its output, unless it succeeds.
fn run(what: &str, command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({command:?}): {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Deterministic, incompressible test bytes.
fn test_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    Payload::new(seed, 0).fill(0, &mut bytes);
    bytes
}

fn sha256(path: &Path) -> String {
    let output = run("sha256sum", Command::new("sha256sum").arg(path));
    String::from_utf8(output.stdout).unwrap()[..64].to_string()
}

fn redis_cli(port: u16) -> Command {
    let mut command = Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    command
}

/// `INFO commandstats` of the server itself: calls per command.
fn redis_calls(port: u16, command: &str) -> u64 {
    let output = run(
        "redis-cli info",
        redis_cli(port).args(["info", "commandstats"]),
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    text.lines()
        .find_map(|line| line.trim().strip_prefix(&prefix))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

#[test]
#[ignore = "needs redis-server, redis-tools, nginx and curl: run by `cargo xtask test`"]
fn redis_benchmark_through_the_proxy() {
    let dir = TempDir::new("redis");
    let port = free_port();
    let _redis = Guard::spawn(
        "redis-server",
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--maxclients", "1000", "--logfile", ""])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null()),
    );
    wait_for_port(port, "redis-server");
    let proxy = Proxy::start(port, &[]);
    let proxy_port = proxy.addr.port().to_string();
    let started = Instant::now();

    // Value size, requests, clients, keep-alive: the last run opens a connection per request.
    let runs = [
        (4096, 10_000, 50, true),
        (65536, 2_000, 50, true),
        (4096, 1_000, 20, false),
    ];
    let (mut set_bytes, mut get_bytes) = (0, 0);
    for (size, requests, clients, keepalive) in runs {
        run(
            "redis-cli config resetstat",
            redis_cli(port).args(["config", "resetstat"]),
        );
        let output = run(
            "redis-benchmark",
            Command::new("redis-benchmark")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &proxy_port,
                    "-t",
                    "set,get",
                    "--csv",
                ])
                .args(["-d", &size.to_string(), "-n", &requests.to_string()])
                .args([
                    "-c",
                    &clients.to_string(),
                    "-k",
                    if keepalive { "1" } else { "0" },
                ])
                .stdin(Stdio::null()),
        );
        let csv = String::from_utf8(output.stdout).unwrap();
        eprintln!("redis-benchmark -d {size} -n {requests} -c {clients} -k {keepalive}:\n{csv}");
        // A test's line appears only once all its requests have been answered.
        for test in ["SET", "GET"] {
            let line = csv
                .lines()
                .find(|line| line.starts_with(&format!("\"{test}\",")))
                .unwrap_or_else(|| panic!("no {test} line in redis-benchmark's output:\n{csv}"));
            let rps: f64 = line
                .split(',')
                .nth(1)
                .unwrap()
                .trim_matches('"')
                .parse()
                .unwrap();
            assert!(rps > 0.0, "{line}");
        }
        // And the server saw every one of them, through the proxy.
        assert_eq!(redis_calls(port, "set"), requests, "SET calls, -d {size}");
        assert_eq!(redis_calls(port, "get"), requests, "GET calls, -d {size}");
        set_bytes += requests * size;
        get_bytes += requests * size;
    }

    // A value of every byte value, set and read back through the proxy, byte for byte.
    let value = test_bytes(3, 1 << 20);
    let mut set = redis_cli(proxy.addr.port())
        .args(["-x", "set", "tzx:value"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin.take().unwrap().write_all(&value).unwrap();
    let reply = set.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&reply.stdout).trim(), "OK");
    let got = run(
        "redis-cli get",
        redis_cli(proxy.addr.port()).args(["get", "tzx:value"]),
    );
    // redis-cli prints the raw bytes and a newline when its output is not a terminal.
    assert_eq!(got.stdout.len(), value.len() + 1);
    assert!(
        got.stdout[..value.len()] == value[..],
        "GET returned other bytes than SET"
    );
    assert_eq!(got.stdout[value.len()], b'\n');
    let seconds = started.elapsed().as_secs_f64();

    let summary = proxy.stop();
    assert_eq!(summary["failed"], 0, "{summary}");
    // The values went through, each way, plus the protocol around them.
    assert!(number(&summary, "to_upstream_bytes") > set_bytes + value.len() as u64);
    assert!(number(&summary, "to_client_bytes") > get_bytes + value.len() as u64);
    // 50 + 50 + 50 + 50 keep-alive clients, a connection per request in the last run, the
    // redis-benchmark's own CONFIG queries and two redis-cli calls.
    assert!(
        number(&summary, "connections") >= 2 * 1_000 + 200,
        "{summary}"
    );
    eprintln!(
        "redis through the proxy: {} MiB up, {} MiB down, {} connections in {seconds:.1} s",
        number(&summary, "to_upstream_bytes") >> 20,
        number(&summary, "to_client_bytes") >> 20,
        number(&summary, "connections")
    );
}

/// nginx serving a directory, with PUT (WebDAV) for uploads, and one process only, so that
/// killing it leaves no worker behind.
fn nginx_config(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    format!(
        "daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 1g;
        }}
    }}
}}
"
    )
}

#[test]
#[ignore = "needs redis-server, redis-tools, nginx and curl: run by `cargo xtask test`"]
fn curl_uploads_and_downloads_through_the_proxy_to_nginx() {
    const FILES: u64 = 4;
    const SIZE: usize = 64 << 20;
    let dir = TempDir::new("nginx");
    std::fs::create_dir_all(dir.0.join("www")).unwrap();
    let port = free_port();
    let config = dir.0.join("nginx.conf");
    std::fs::write(&config, nginx_config(&dir.0, port)).unwrap();
    let _nginx = Guard::spawn(
        "nginx",
        Command::new("nginx")
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&config)
            .arg("-e")
            .arg(dir.0.join("error.log")),
    );
    wait_for_port(port, "nginx");
    let proxy = Proxy::start(port, &[]);
    let base = format!("http://{}", proxy.addr);
    let started = Instant::now();

    let mut sums = Vec::new();
    for index in 0..FILES {
        let path = dir.0.join(format!("upload-{index}.bin"));
        std::fs::write(&path, test_bytes(index + 10, SIZE)).unwrap();
        sums.push(sha256(&path));
    }
    let curl = |args: &[&str]| {
        let mut command = Command::new("curl");
        command
            .args(["--silent", "--show-error", "--fail", "--noproxy", "*"])
            .args(args);
        command
    };
    // Uploads, all at once.
    let uploads: Vec<_> = (0..FILES)
        .map(|index| {
            let file = dir.0.join(format!("upload-{index}.bin"));
            let url = format!("{base}/stored/file-{index}.bin");
            let mut command = curl(&["--upload-file", file.to_str().unwrap(), &url]);
            Guard::spawn("curl upload", command.stdout(Stdio::null()))
        })
        .collect();
    for mut upload in uploads {
        let status = upload.child.wait().unwrap();
        assert!(status.success(), "curl upload failed: {status}");
    }
    // What nginx stored is what was sent.
    for index in 0..FILES {
        let stored = dir.0.join(format!("www/stored/file-{index}.bin"));
        assert_eq!(sha256(&stored), sums[index as usize], "upload {index}");
    }
    // Downloads, all at once, of what was uploaded.
    let downloads: Vec<_> = (0..FILES)
        .map(|index| {
            let out = dir.0.join(format!("download-{index}.bin"));
            let url = format!("{base}/stored/file-{index}.bin");
            let mut command = curl(&["--output", out.to_str().unwrap(), &url]);
            Guard::spawn("curl download", &mut command)
        })
        .collect();
    for mut download in downloads {
        let status = download.child.wait().unwrap();
        assert!(status.success(), "curl download failed: {status}");
    }
    for index in 0..FILES {
        let downloaded = dir.0.join(format!("download-{index}.bin"));
        assert_eq!(
            sha256(&downloaded),
            sums[index as usize],
            "download {index}"
        );
    }
    let seconds = started.elapsed().as_secs_f64();

    let summary = proxy.stop();
    assert_eq!(summary["failed"], 0, "{summary}");
    let total = FILES * SIZE as u64;
    assert!(number(&summary, "to_upstream_bytes") > total, "{summary}");
    assert!(number(&summary, "to_client_bytes") > total, "{summary}");
    assert_eq!(number(&summary, "connections"), 2 * FILES, "{summary}");
    eprintln!(
        "nginx through the proxy: {FILES} x {} MiB up and down in {seconds:.1} s",
        SIZE >> 20
    );
}
