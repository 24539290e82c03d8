//! The QEMU guest: building its image, running it, and reading back what happened.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::chroot::{file_name, Chroot};
use crate::initramfs::{self, Archive};
use crate::kernel::{self, GuestKernel};
use crate::util::{self, step, CacheKey, Stamped};

/// Guest binaries are static so the initramfs needs no Rust-side shared libraries.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const GUEST_PROFILE: &str = "guest";

/// Tools from the chroot that the guest needs, with their shared libraries.
const GUEST_TOOLS: &[&str] = &["/usr/sbin/ip", "/usr/sbin/ethtool"];

/// Everything needed to boot: kernel and cached base initramfs.
pub(crate) struct GuestImage {
    pub kernel: GuestKernel,
    pub base_initramfs: PathBuf,
}

/// Prepares host packages, the chroot, and for each guest kernel of the run (see
/// [`kernel::select`]: the newest of each patched series, or the pinned ones) the kernel,
/// its netdevsim and its base initramfs, each cached per kernel. Newest kernel first.
pub(crate) fn prepare_all(start: Instant) -> Result<Vec<GuestImage>> {
    crate::host::ensure_packages(start)?;
    let chroot = Chroot::ensure(start)?;
    let mut images = Vec::new();
    for version in kernel::select(&chroot, start)? {
        let kernel = kernel::prepare(&chroot, &version, start)?;
        let base_initramfs = base_initramfs(&chroot, &kernel, start)?;
        images.push(GuestImage {
            kernel,
            base_initramfs,
        });
    }
    Ok(images)
}

/// The newest guest kernel of the run, for the commands that boot one guest (vm-run,
/// vm-bench, soak). Only that kernel is prepared.
pub(crate) fn prepare_newest(start: Instant) -> Result<GuestImage> {
    crate::host::ensure_packages(start)?;
    let chroot = Chroot::ensure(start)?;
    let newest = kernel::select(&chroot, start)?
        .into_iter()
        .next()
        .context("no guest kernel selected")?;
    let kernel = kernel::prepare(&chroot, &newest, start)?;
    let base_initramfs = base_initramfs(&chroot, &kernel, start)?;
    Ok(GuestImage {
        kernel,
        base_initramfs,
    })
}

fn base_initramfs(chroot: &Chroot, kernel: &GuestKernel, start: Instant) -> Result<PathBuf> {
    let init = util::workspace_root().join("vm/guest/init");
    let mut key = CacheKey::new("base-initramfs-v1");
    key.add_file(&init)?;
    key.add_str(&chroot.root).add_str(&kernel.version.abi);
    for module in &kernel.modules {
        key.add_file(module)?;
    }
    let stamped = Stamped::new(util::cache_root().join("initramfs").join(key.hex()));
    let image = stamped.dir.join("base.cpio");
    if stamped.is_complete() {
        return Ok(image);
    }
    stamped.reset()?;
    step(start, "packing the guest's base initramfs");
    let mut archive = Archive::default();
    archive.file("init", &init, 0o755)?;
    archive.file("bin/busybox", &chroot.host_path("/usr/bin/busybox"), 0o755)?;
    for tool in GUEST_TOOLS {
        archive.file(tool, &chroot.host_path(tool), 0o755)?;
        for lib in chroot.shared_libraries(tool)? {
            archive.file(&lib, &chroot.host_path(&lib), 0o755)?;
        }
    }
    let mut order = String::new();
    for module in &kernel.modules {
        let name = file_name(module);
        archive.file(&format!("lib/modules/tzx/{name}"), module, 0o644)?;
        order.push_str(&name);
        order.push('\n');
    }
    archive.bytes("lib/modules/tzx/load-order", 0o644, order.into_bytes());
    for dir in ["proc", "sys", "dev", "run", "tmp", "root", "tzx/include"] {
        archive.dir(dir);
    }
    archive.write_file(&image)?;
    stamped.finish()?;
    Ok(image)
}

/// `perf` from the chroot (Debian's linux-perf of trixie-backports, the newest guest kernel's
/// series) with its shared libraries, as files for [`RunOptions::tools`]: the guest has no
/// profiler of its own, and kernel time under emulation is only found by sampling it.
pub(crate) fn profiler(start: Instant) -> Result<Vec<(String, PathBuf)>> {
    let chroot = Chroot::ensure(start)?;
    const PERF: &str = "/usr/bin/perf";
    if !chroot.host_path(PERF).exists() {
        step(
            start,
            "installing linux-perf (trixie-backports) in the chroot",
        );
        chroot.apt_install(&["-t", "trixie-backports", "linux-perf"])?;
    }
    let mut files = vec![(PERF.to_string(), chroot.host_path(PERF))];
    for lib in chroot.shared_libraries(PERF)? {
        let host = chroot.host_path(&lib);
        files.push((lib, host));
    }
    Ok(files)
}

/// A statically linked program built for the guest.
#[derive(Clone)]
pub(crate) struct GuestBinary {
    pub name: String,
    pub path: PathBuf,
    pub kind: &'static str,
}

/// Builds static test binaries and/or examples for the guest with cargo.
pub(crate) fn build_binaries(
    tests: bool,
    examples: bool,
    start: Instant,
) -> Result<Vec<GuestBinary>> {
    step(
        start,
        "building static guest binaries (cargo, profile `guest`)",
    );
    let mut binaries = Vec::new();
    if tests {
        // The kernel-interface crate's own tests check version-dependent answers, so they run
        // on the guest kernel too. Examples are built separately: under `cargo test` they
        // would be test harnesses, not the programs.
        cargo_build_for_guest(
            &[
                "test",
                "--no-run",
                "-p",
                "tokio-zcrx-kernel-tests",
                "-p",
                "zcrx-sys",
            ],
            &mut binaries,
        )?;
        if !binaries.iter().any(|b| b.kind == "test") {
            bail!("cargo built no test binary for the guest");
        }
    }
    if examples {
        cargo_build_for_guest(
            &["build", "-p", "tokio-zcrx-examples", "--examples"],
            &mut binaries,
        )?;
    }
    Ok(binaries)
}

/// Builds the soak run's binaries for the guest: the example servers and the `soak` driver.
pub(crate) fn build_soak(start: Instant) -> Result<Vec<GuestBinary>> {
    step(
        start,
        "building the static soak binaries (cargo, profile `guest`)",
    );
    let mut binaries = Vec::new();
    cargo_build_for_guest(
        &["build", "-p", "tokio-zcrx-examples", "--examples"],
        &mut binaries,
    )?;
    cargo_build_for_guest(
        &["build", "-p", "tokio-zcrx-kernel-tests", "--bin", "soak"],
        &mut binaries,
    )?;
    if !binaries.iter().any(|b| b.name == "soak") {
        bail!("cargo built no soak binary");
    }
    Ok(binaries)
}

/// Builds the guest benchmark (`guest-ratio`) with the release profile: no debug assertions,
/// as users would run the runtime.
pub(crate) fn build_benchmark(start: Instant) -> Result<Vec<GuestBinary>> {
    step(
        start,
        "building the static guest benchmark (cargo, profile `release`)",
    );
    let mut binaries = Vec::new();
    cargo_build_for_guest_with(
        &[
            "build",
            "-p",
            "tokio-zcrx-kernel-tests",
            "--bin",
            "guest-ratio",
        ],
        "release",
        &mut binaries,
    )?;
    if binaries.is_empty() {
        bail!("cargo built no guest-ratio binary");
    }
    Ok(binaries)
}

/// Builds the guest's proxy benchmark (`proxy-throughput`) and the `proxy` example with the
/// release profile.
pub(crate) fn build_proxy_benchmark(start: Instant) -> Result<Vec<GuestBinary>> {
    step(
        start,
        "building the static proxy benchmark and proxy (cargo, profile `release`)",
    );
    let mut binaries = Vec::new();
    cargo_build_for_guest_with(
        &["build", "-p", "tokio-zcrx-examples", "--example", "proxy"],
        "release",
        &mut binaries,
    )?;
    cargo_build_for_guest_with(
        &[
            "build",
            "-p",
            "tokio-zcrx-bench",
            "--bin",
            "proxy-throughput",
        ],
        "release",
        &mut binaries,
    )?;
    for name in ["proxy", "proxy-throughput"] {
        if !binaries.iter().any(|b| b.name == name) {
            bail!("cargo built no {name} binary for the guest");
        }
    }
    Ok(binaries)
}

/// Where the guest binaries are built: beside the caller's own `CARGO_TARGET_DIR` if it
/// set one, else in the cache. Cargo names a workspace member's build by its path inside
/// the workspace, not by the checkout, so two checkouts sharing one target directory take
/// each other's builds for fresh (a git worktree whose files are older than the other's
/// last build is not rebuilt).
fn guest_target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("guest"),
        _ => util::cache_root().join("target/guest"),
    }
}

fn cargo_build_for_guest(args: &[&str], binaries: &mut Vec<GuestBinary>) -> Result<()> {
    cargo_build_for_guest_with(args, GUEST_PROFILE, binaries)
}

fn cargo_build_for_guest_with(
    args: &[&str],
    profile: &str,
    binaries: &mut Vec<GuestBinary>,
) -> Result<()> {
    let root = util::workspace_root();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(args)
        .args(["--profile", profile, "--target", GUEST_TARGET])
        .args(["--message-format", "json-render-diagnostics"])
        .env("CARGO_TARGET_DIR", guest_target_dir())
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    let (ok, _) = util::run_streaming(&mut cmd, |line| {
        if let Some(binary) = parse_artifact(line) {
            binaries.push(binary);
        }
    })?;
    if !ok {
        bail!("building the guest binaries failed (see the compiler output above)");
    }
    Ok(())
}

fn parse_artifact(line: &str) -> Option<GuestBinary> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg["reason"] != "compiler-artifact" {
        return None;
    }
    let path = PathBuf::from(msg["executable"].as_str()?);
    let target = &msg["target"];
    let kind = match target["kind"][0].as_str()? {
        "example" => "example",
        "bin" => "bin",
        _ if msg["profile"]["test"] == true => "test",
        _ => return None,
    };
    let name = target["name"].as_str()?.to_string();
    Some(GuestBinary { name, path, kind })
}

/// What to run inside the guest.
pub(crate) enum Payload {
    /// Each test binary with --include-ignored, one test at a time.
    Tests,
    /// A user's shell command, from /tzx/include.
    Command(String),
}

pub(crate) struct RunOptions {
    pub binaries: Vec<GuestBinary>,
    pub includes: Vec<PathBuf>,
    /// Files placed at the same path in the guest (a chroot tool and its libraries).
    pub tools: Vec<(String, PathBuf)>,
    pub payload: Payload,
    pub timeout: Duration,
    /// Limit for one test binary, so a hung test names itself instead of eating the run.
    pub test_timeout: Duration,
    pub memory_mib: u32,
}

/// What the guest reported.
#[derive(Debug, Default)]
pub(crate) struct GuestOutcome {
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub ignored: Vec<String>,
    /// Problems outside individual tests: setup, crashes, kernel warnings, timeouts.
    pub problems: Vec<String>,
    pub exit_code: Option<i32>,
    pub kernel_release: Option<String>,
    /// Result lines a guest benchmark printed for the host (`@@proxy-bench JSON`).
    pub results: Vec<String>,
}

impl GuestOutcome {
    pub(crate) fn success(&self) -> bool {
        self.failed.is_empty() && self.problems.is_empty() && self.exit_code == Some(0)
    }
}

pub(crate) fn run(
    image: &GuestImage,
    options: &RunOptions,
    start: Instant,
) -> Result<GuestOutcome> {
    let run_dir = util::cache_root()
        .join("runs")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&run_dir)?;
    let mut archive = Archive::default();
    let mut script = String::from("set -u\n");
    for binary in &options.binaries {
        let guest_name = match binary.kind {
            "test" => format!("tzx-test-{}", binary.name),
            _ => binary.name.clone(),
        };
        archive.file(&format!("tzx/bin/{guest_name}"), &binary.path, 0o755)?;
        if binary.kind == "test" {
            if let Payload::Tests = options.payload {
                script.push_str(&format!(
                    "echo '@@tzx run {name}'\n\
                     timeout -s KILL {secs} /tzx/bin/{guest_name} --include-ignored \
                     --test-threads=1 2>&1\n\
                     rc=$?; echo; echo \"@@tzx done {name} $rc\"\n",
                    name = binary.name,
                    secs = options.test_timeout.as_secs(),
                ));
            }
        }
    }
    for (inside, host) in &options.tools {
        archive.file(inside, host, 0o755)?;
    }
    for include in &options.includes {
        add_tree(
            &mut archive,
            include,
            &format!("tzx/include/{}", file_name(include)),
        )?;
    }
    match &options.payload {
        Payload::Tests => script.push_str("exit 0\n"),
        Payload::Command(cmd) => {
            script.push_str(cmd);
            script.push('\n');
        }
    }
    archive.bytes("tzx/run.sh", 0o755, script.into_bytes());
    let run_archive = run_dir.join("run.cpio");
    archive.write_file(&run_archive)?;
    let initrd = run_dir.join("initrd.cpio");
    initramfs::concatenate(&[image.base_initramfs.clone(), run_archive], &initrd)?;

    step(
        start,
        format_args!(
            "booting the guest (kernel {}, QEMU TCG; timeout {} s)",
            image.kernel.version.abi,
            options.timeout.as_secs()
        ),
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .args(["-m", &options.memory_mib.to_string()])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
        .args(["-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&image.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 oops=panic rdinit=/init",
        ])
        .stdin(std::process::Stdio::null());

    let mut outcome = GuestOutcome::default();
    let mut current_binary = String::new();
    let mut failed_in_binary = 0usize;
    let mut running_test = None;
    let mut log = std::fs::File::create(run_dir.join("console.log"))?;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("could not start qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let child = Arc::new(Mutex::new(child));
    let timed_out = Arc::new(AtomicBool::new(false));
    let (finished, finished_rx) = mpsc::channel::<()>();
    let watchdog = {
        let (child, timed_out, timeout) =
            (Arc::clone(&child), Arc::clone(&timed_out), options.timeout);
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = finished_rx.recv_timeout(timeout) {
                timed_out.store(true, Ordering::SeqCst);
                let _ = child.lock().unwrap().kill();
            }
        })
    };
    let mut reader = std::io::BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if std::io::BufRead::read_until(&mut reader, b'\n', &mut raw)? == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&raw);
        let line = text.trim_end_matches(['\n', '\r']);
        let _ = writeln!(log, "{line}");
        println!("  guest| {line}");
        if line.starts_with("@@proxy-bench ") {
            outcome.results.push(line.to_string());
        }
        parse_line(
            line,
            &mut outcome,
            &mut current_binary,
            &mut failed_in_binary,
            &mut running_test,
        );
    }
    drop(finished);
    let _ = watchdog.join();
    let _ = child.lock().unwrap().wait();
    if timed_out.load(Ordering::SeqCst) {
        outcome.problems.push(format!(
            "the guest did not finish within {} s and was killed (raise TZX_VM_TIMEOUT if \
             the machine is just slow)",
            options.timeout.as_secs()
        ));
    } else if outcome.exit_code.is_none() {
        outcome.problems.push(
            "the guest stopped without reporting an exit code (kernel panic or crash?); \
             see the console output above"
                .into(),
        );
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(outcome)
}

fn parse_line(
    line: &str,
    outcome: &mut GuestOutcome,
    current_binary: &mut String,
    failed_in_binary: &mut usize,
    running_test: &mut Option<String>,
) {
    if let Some(totals) = line.trim().strip_prefix("test result: ") {
        // libtest's own count must match the per-test lines we read: output of a test's
        // child process on the console can garble a result line, and a lost result must
        // not pass unnoticed.
        let (passed, failed) = crate::libtest_totals(&format!("test result: {totals}"));
        let prefix = format!("{current_binary}::");
        let seen_passed = outcome
            .passed
            .iter()
            .filter(|t| t.starts_with(&prefix))
            .count();
        let seen_failed = outcome
            .failed
            .iter()
            .filter(|t| t.starts_with(&prefix))
            .count();
        if (seen_passed, seen_failed) != (passed, failed) {
            outcome.problems.push(format!(
                "{current_binary}: libtest counted {passed} passed and {failed} failed, but \
                 {seen_passed} passed and {seen_failed} failed were read from the console \
                 (a result line was garbled; see the output above)"
            ));
        }
        return;
    }
    if let Some(rest) = line.strip_prefix("@@tzx ") {
        let mut words = rest.split_whitespace();
        match words.next() {
            Some("run") => {
                *current_binary = words.next().unwrap_or("?").to_string();
                *failed_in_binary = 0;
            }
            Some("done") => {
                let name = words.next().unwrap_or("?");
                let code = words.next().unwrap_or("?");
                if let Some(test) = running_test.take() {
                    // Started, never finished: it hung (killed by the timeout) or crashed.
                    outcome.failed.push(format!("{name}::{test}"));
                    outcome.problems.push(format!(
                        "{name}::{test} did not finish (status {code}: 137 = killed by the \
                         per-binary timeout TZX_TEST_TIMEOUT, otherwise a crash)"
                    ));
                } else if code != "0" && *failed_in_binary == 0 {
                    outcome.problems.push(format!(
                        "test binary {name} exited with status {code} without a failed test \
                         (crash or abort?)"
                    ));
                }
            }
            Some("exit") => outcome.exit_code = words.next().and_then(|c| c.parse().ok()),
            Some("kernel") => outcome.kernel_release = words.next().map(str::to_string),
            Some("setup-failed") => outcome.problems.push(format!(
                "guest setup failed: {}",
                words.collect::<Vec<_>>().join(" ")
            )),
            Some("kernel-warnings") => {
                let count = words.next().unwrap_or("?");
                if count != "0" {
                    outcome.problems.push(format!(
                        "the guest kernel logged {count} warning(s) (WARNING/BUG/Oops); see above"
                    ));
                }
            }
            _ => {}
        }
        return;
    }
    if let Some(rest) = line.strip_prefix("test ") {
        if let Some(name) = rest.trim_end().strip_suffix(" ...") {
            // libtest prints the name first and the result when the test ends.
            *running_test = Some(name.to_string());
            return;
        }
        if let Some((name, result)) = rest.rsplit_once(" ... ") {
            *running_test = None;
            let full = format!("{current_binary}::{name}");
            match result.trim() {
                "ok" => outcome.passed.push(full),
                "FAILED" => {
                    *failed_in_binary += 1;
                    outcome.failed.push(full);
                }
                r if r.starts_with("ignored") => outcome.ignored.push(full),
                _ => {}
            }
        }
    }
}

/// Adds a host file or directory tree under `guest_path`.
fn add_tree(archive: &mut Archive, host: &Path, guest_path: &str) -> Result<()> {
    let meta = std::fs::metadata(host)
        .with_context(|| format!("--include {}: no such file or directory", host.display()))?;
    if meta.is_dir() {
        archive.dir(guest_path);
        for entry in std::fs::read_dir(host)? {
            let entry = entry?;
            add_tree(
                archive,
                &entry.path(),
                &format!("{guest_path}/{}", entry.file_name().to_string_lossy()),
            )?;
        }
    } else {
        use std::os::unix::fs::PermissionsExt;
        archive.file(guest_path, host, meta.permissions().mode() & 0o777)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[&str]) -> GuestOutcome {
        let mut outcome = GuestOutcome::default();
        let mut current = String::new();
        let mut failed = 0;
        let mut running = None;
        for line in lines {
            parse_line(line, &mut outcome, &mut current, &mut failed, &mut running);
        }
        outcome
    }

    #[test]
    fn results_are_read_per_binary() {
        let o = feed(&[
            "@@tzx kernel 7.3.4+deb13-amd64",
            "@@tzx run raw",
            "test nodev::loopback ... ok",
            "test errors::lo_is_refused ... FAILED",
            "test slow ... ignored, needs hardware",
            "test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out",
            "@@tzx done raw 101",
            "@@tzx kernel-warnings 0",
            "@@tzx exit 0",
        ]);
        assert_eq!(o.passed, ["raw::nodev::loopback"]);
        assert_eq!(o.failed, ["raw::errors::lo_is_refused"]);
        assert_eq!(o.ignored.len(), 1);
        assert!(o.problems.is_empty(), "{:?}", o.problems);
        assert_eq!(o.kernel_release.as_deref(), Some("7.3.4+deb13-amd64"));
        assert!(!o.success());
    }

    #[test]
    fn crash_warning_and_missing_exit_are_problems() {
        let o = feed(&[
            "@@tzx run raw",
            "test a ... ok",
            "@@tzx done raw 134",
            "@@tzx kernel-warnings 2",
        ]);
        assert_eq!(o.problems.len(), 2, "{:?}", o.problems);
        assert!(!o.success());
        let ok = feed(&[
            "@@tzx run raw",
            "test a ... ok",
            "@@tzx done raw 0",
            "@@tzx exit 0",
        ]);
        assert!(ok.success());
    }
}
