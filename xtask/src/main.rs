//! Project automation for tokio-zcrx. Run `cargo xtask help`.

mod chroot;
mod guest;
mod host;
mod initramfs;
mod kernel;
mod layers;
mod util;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest::{Payload, RunOptions};
use crate::util::step;

const HELP: &str = "\
cargo xtask <command>

Commands:
  test        The project's whole test command (what CI runs): host tests, the loom
              model checks, clippy, rustdoc and rustfmt checks, the proxy with real
              software (below), then the real-kernel tier in a QEMU guest on each guest
              kernel (Debian's newest 7.2.x and 7.3.x), then the short soak run (newest
              kernel). Prints `N passed, N failed` per part and kernel, and the total as
              its last line.
  real-software
              Only the proxy example with real software on the host, in copy mode:
              installs redis-server, redis-tools, nginx and curl from Debian if missing
              (no service is started), then runs examples/tests/real_software.rs
              (redis-benchmark and redis-cli to redis-server, curl uploads and downloads
              to nginx, all through the proxy).
  vm-test     Only the real-kernel tier: builds the guests (cached per kernel under
              ~/.cache/tokio-zcrx) and runs the real-kernel tests in each, one boot per kernel.
  vm-run [--include PATH]... -- COMMAND...
              Boots the guest and runs a shell command in it, with the examples and the
              test binaries (tzx-test-NAME) on PATH and each --include'd file or directory
              copied to the working directory.
  vm-bench [-- ARGS]
              The runtime's zcrx receive against a minimal raw receive loop, in the guest
              (nic and nodev modes; only the ratio counts under emulation). ARGS go to
              guest-ratio: --mib N (256), --reps R (7), --batches (the runtime's consumer
              uses next_batch(64)), --detail (CPU time and context switches per thread).
  vm-bench -- --queues 4 [ARGS]
              All 4 queues of the guest's netdevsim port, flows spread over them: tokio-zcrx
              (interface_queues all) against a raw loop with a thread and zcrx binding per
              queue and against tokio TcpStream::read, alternating; receiver process CPU per
              GiB and throughput, sender in its own process. ARGS: --conns C (8), --mib N
              (256 per run, split over the connections), --reps R (5), --detail (CPU per
              thread), --unbudgeted (adds tokio-zcrx with stream_budget(u64::MAX)),
              --budget BYTES (adds tokio-zcrx with stream_budget(BYTES)), --batches (adds
              tokio-zcrx whose consumers take next_batch(64)), --chunk BYTES (adds
              tokio-zcrx with chunk_size(BYTES): chunks larger than a page, Linux 7.0+),
              --read-spread (adds tokio read reading into fresh memory each time, as a
              zero-copy receiver's chunks are).
  vm-bench --peer-threaded [-- ARGS]
              The same with the peer port's NAPI threaded: the peer's TCP and netdevsim's
              copy into the area (its stand-in for DMA) run in that kernel thread instead
              of in softirqs on the receiver's threads.
  vm-bench --napi-threaded [-- ARGS]
              Both ports' NAPI threaded: also the receiving port's, whose poll does
              netdevsim's copy into the area (tokio read's traffic takes no such copy), so
              no receiver is charged for the stand-in for DMA or for the rx protocol work.
  vm-bench --perf [-- ARGS]
              Either comparison under Debian's perf in the guest (every CPU, call chains):
              per-process totals, then the driver threads' (tokio-zcrx-driv,
              tokio-zcrx-d-qN) and the raw loop's (raw-qN) symbols and call chains, then
              the Tokio workers'. Use few reps: setup is sampled too.
  vm-bench --proxy [-- ARGS]
              The proxy example in nic mode (zero-copy receive on netdevsim, SEND_ZC)
              against `proxy --copy` (copy_bidirectional) in the guest, clients and upstream
              in the peer namespace; writes docs/bench/proxy.json and .png. ARGS go to
              proxy-throughput: --rounds N (7), --secs S (3), --conns 1,16.
  vm-bench --proxy --peer-split [-- ARGS]
              The same with header split on the peer port too, so netdevsim does not
              linearize (copy) what either proxy sends, as a NIC's DMA would not;
              writes docs/bench/proxy-peer-split.json and .png.
  vm-bench --proxy --perf [-- ARGS]
              One profiled run: Debian's perf in the guest samples every CPU with call
              chains; prints per-thread totals, the driver thread's call chains and the
              workers' hottest symbols. Writes nothing.
  soak [--minutes M] [--connections N] [-- SOAK-ARGS]
              The soak run in the guest: the echo and sink examples in nic and nodev
              modes churn connections (random sizes, resets, half-closes, held buffers,
              streams dropped mid-flight, a lagging event subscriber), every byte checked;
              fails if the servers' open fds, RSS or outstanding chunks grow, or the idle
              driver uses CPU. --minutes (default 1) is the whole run, guest boot included;
              --connections N makes each of the four servers serve at least N connections
              after warm-up (10000 for the issue's churn). SOAK-ARGS go to the guest's
              `soak` (--concurrency C, --seed S, --only echo_nic|echo_nodev|sink_nic|sink_nodev,
              --drop-privileges: the servers serve without any capability).
  vm-prepare  Only installs and builds what the guests need (host packages, chroot, and per
              guest kernel: kernel, netdevsim, initramfs).
  bench [ARGS]
              The receive benchmark, in release mode: `cargo run --release -p
              tokio-zcrx-bench -- ARGS`; `cargo xtask bench --help` lists ARGS
              (--quick, --scaling, ...). See docs/benchmarks.md.
  layers [SRC] Checks that tokio-zcrx's modules import only downwards in the layer order
              (xtask/src/layers.rs; part of `test`'s host tier). Prints FILE:LINE, the
              import and the rule for each one that does not.
  faults [--seeds N]
              Seeded fault injection over the synthetic kernel personalities (N seeds
              per fault test, default 2000; debug build, so every chunk return is
              checked). A failure prints its seed; replay it with TZX_FAULT_SEED=S.
  help        This text.

Environment:
  TZX_GUEST_KERNEL  pin the guest kernels by Debian ABI name, comma-separated, e.g.
                    7.3.4+deb13-amd64,7.2.12+deb13-amd64 (default: the newest kernel of
                    each series with a vm/netdevsim/<series>/ patch). vm-run, vm-bench and
                    soak boot the newest of them.
  TZX_VM_TIMEOUT    seconds before a guest run is killed (default 1800)
  TZX_TEST_TIMEOUT  seconds one guest test binary may run (default 600)
  TZX_VM_MEMORY     guest memory in MiB (default 4096)
  TZX_CACHE_DIR     cache directory (default ~/.cache/tokio-zcrx)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: &[String]) -> Result<ExitCode> {
    let start = Instant::now();
    match args.first().map(String::as_str) {
        Some("test") => test_all(start),
        Some("vm-test") => {
            let counts = vm_test(start)?;
            Ok(counts.finish("real-kernel tier"))
        }
        Some("vm-run") => vm_run(&args[1..], start),
        Some("real-software") => {
            let mut counts = Counts::default();
            real_software(&mut counts, start)?;
            Ok(counts.finish("the proxy with real software"))
        }
        Some("soak") => {
            let counts = vm_soak(&SoakOptions::parse(&args[1..])?, start)?;
            Ok(counts.finish("soak"))
        }
        Some("vm-bench") => vm_bench(&args[1..], start),
        Some("vm-prepare") => {
            guest::prepare_all(start)?;
            step(start, "guest ready");
            Ok(ExitCode::SUCCESS)
        }
        Some("bench") => {
            // Replaces this process; returns only if cargo could not be started.
            let args = match &args[1..] {
                [dashes, rest @ ..] if dashes == "--" => rest,
                rest => rest,
            };
            let err = std::os::unix::process::CommandExt::exec(
                cargo()
                    .args(["run", "--release", "-p", "tokio-zcrx-bench", "--"])
                    .args(args),
            );
            Err(err).context("running `cargo run --release -p tokio-zcrx-bench`")
        }
        Some("faults") => faults(&args[1..]),
        Some("layers") => Ok(if layers::run(args.get(1).map(String::as_str))? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Some("help" | "--help" | "-h") | None => {
            print!("{HELP}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => bail!("unknown command `{other}`; see `cargo xtask help`"),
    }
}

/// Passed/failed counts gathered across tiers.
#[derive(Default)]
struct Counts {
    passed: usize,
    failed: usize,
    problems: Vec<String>,
    /// The counts per part (host tier, each guest kernel, the soak run), printed before
    /// the total.
    parts: Vec<Part>,
}

/// One part's counts, e.g. the real-kernel tier on one kernel.
struct Part {
    label: String,
    passed: usize,
    failed: usize,
}

impl Counts {
    /// Runs a libtest command, streaming its output, and adds its results. A run that fails
    /// without a failed test (build error, crash) or that runs no test is a problem too.
    fn libtest(&mut self, cmd: &mut Command, what: &str) -> Result<()> {
        let (ok, output) = util::run_streaming(cmd, |line| println!("{line}"))?;
        let (passed, failed) = libtest_totals(&output);
        self.passed += passed;
        self.failed += failed;
        if !ok && failed == 0 {
            self.problems
                .push(format!("{what} failed to build or crashed (see above)"));
        } else if passed + failed == 0 {
            self.problems.push(format!("{what} ran no test"));
        }
        Ok(())
    }

    /// What [`Counts::finish`] prints, the total last.
    fn summary_lines(&self, what: &str) -> Vec<String> {
        let mut lines: Vec<String> = self
            .problems
            .iter()
            .map(|problem| format!("xtask: FAILED: {problem}"))
            .collect();
        let ok = self.failed == 0 && self.problems.is_empty();
        lines.push(format!(
            "xtask: {what}: {}",
            if ok { "all green" } else { "FAILURES above" }
        ));
        for part in &self.parts {
            lines.push(format!(
                "xtask: {}: {} passed, {} failed",
                part.label, part.passed, part.failed
            ));
        }
        lines.push(format!("{} passed, {} failed", self.passed, self.failed));
        lines
    }

    /// Adds another part's results (its own parts, or itself as one part named `label`).
    fn absorb(&mut self, label: &str, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.problems.extend(other.problems);
        if other.parts.is_empty() {
            self.parts.push(Part {
                label: label.to_string(),
                passed: other.passed,
                failed: other.failed,
            });
        } else {
            self.parts.extend(other.parts);
        }
    }

    /// Prints the problems, the verdict, the counts per part and, as the very last line,
    /// the total `N passed, N failed` (CI and the issue tracker read that line).
    fn finish(&self, what: &str) -> ExitCode {
        for line in self.summary_lines(what) {
            println!("{line}");
        }
        if self.failed == 0 && self.problems.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask faults [--seeds N]`: the fault-injection tests with N seeds each.
fn faults(args: &[String]) -> Result<ExitCode> {
    let seeds = match args {
        [] => 2000,
        [flag, n] if flag == "--seeds" => n
            .parse::<u64>()
            .with_context(|| format!("--seeds takes a number, not `{n}`"))?,
        _ => bail!("usage: cargo xtask faults [--seeds N]"),
    };
    let status = cargo()
        .args([
            "test",
            "-p",
            "tokio-zcrx",
            "--lib",
            "backend::uring::tests::fault_tests",
            "--",
            "--nocapture",
        ])
        .env("TZX_FAULT_SEEDS", seeds.to_string())
        .status()
        .context("running the fault-injection tests")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(util::workspace_root());
    cmd
}

fn test_all(start: Instant) -> Result<ExitCode> {
    let mut counts = Counts::default();

    step(start, "host tier: cargo test --workspace");
    counts.libtest(
        cargo().args(["test", "--workspace", "--all-targets"]),
        "host `cargo test`",
    )?;
    step(start, "host tier: doc tests");
    counts.libtest(cargo().args(["test", "--workspace", "--doc"]), "doc tests")?;
    step(
        start,
        "host tier: tokio-zcrx's layer order (cargo xtask layers)",
    );
    if !layers::run(None)? {
        counts
            .problems
            .push("an import breaks tokio-zcrx's layer order (run `cargo xtask layers`)".into());
    }
    step(
        start,
        "model check: loom over the refill producer and the buffer reference count",
    );
    counts.libtest(
        cargo()
            .args(["test", "-p", "zcrx-core", "--release"])
            .args(["--test", "loom_refill", "--test", "loom_refcount"])
            .env("RUSTFLAGS", "--cfg loom")
            .env("CARGO_TARGET_DIR", util::cache_root().join("target/loom")),
        "the loom model checks",
    )?;

    if let Err(err) = real_software(&mut counts, start) {
        counts.problems.push(format!(
            "the proxy's tests with real software could not run: {err:#}"
        ));
    }

    step(start, "lint: cargo clippy -D warnings");
    if util::run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))
    .is_err()
    {
        counts
            .problems
            .push("clippy reports warnings (run `cargo clippy --workspace --all-targets`)".into());
    }
    step(
        start,
        "lint: cargo doc (broken links and doc warnings are errors)",
    );
    if util::run(
        cargo()
            .args(["doc", "--no-deps", "--quiet"])
            .args(["-p", "zcrx-sys", "-p", "zcrx-core", "-p", "tokio-zcrx"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )
    .is_err()
    {
        counts
            .problems
            .push("rustdoc reports warnings (run `cargo doc --no-deps`)".into());
    }
    step(start, "lint: cargo fmt --check");
    if util::run(cargo().args(["fmt", "--all", "--", "--check"])).is_err() {
        counts
            .problems
            .push("code is not formatted (run `cargo fmt --all`)".into());
    }

    let host = std::mem::take(&mut counts);
    counts.absorb("host tier (tests, doc tests, loom)", host);
    match vm_test(start) {
        Ok(vm) => counts.absorb("real-kernel tier", vm),
        Err(err) => counts
            .problems
            .push(format!("the real-kernel tier could not run: {err:#}")),
    }
    // The short soak, on the newest guest kernel only: about a minute, guest boot included.
    match vm_soak(&SoakOptions::default(), start) {
        Ok(soak) => counts.absorb("soak run", soak),
        Err(err) => counts
            .problems
            .push(format!("the soak run could not run: {err:#}")),
    }
    step(start, "done");
    Ok(counts.finish("host and real-kernel tiers and the soak run"))
}

/// The proxy example between real clients and servers (examples/tests/real_software.rs):
/// installs them from Debian, then runs the tests that a plain `cargo test` leaves ignored.
fn real_software(counts: &mut Counts, start: Instant) -> Result<()> {
    step(
        start,
        "host tier: the proxy with real software (redis-benchmark, redis-cli, nginx, curl)",
    );
    host::ensure_real_software(start)?;
    // The tests start the proxy binary built next to them (debug: the host tier built it).
    util::run(cargo().args(["build", "-p", "tokio-zcrx-examples", "--example", "proxy"]))
        .context("building the proxy example")?;
    counts.libtest(
        cargo()
            .args([
                "test",
                "-p",
                "tokio-zcrx-examples",
                "--test",
                "real_software",
            ])
            .args(["--", "--ignored", "--test-threads", "1", "--nocapture"]),
        "the proxy's tests with real software",
    )
}

/// Sums libtest's `test result: ... N passed; M failed` lines.
pub(crate) fn libtest_totals(output: &str) -> (usize, usize) {
    let mut totals = (0, 0);
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(number)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = number.parse::<usize>() else {
                continue;
            };
            match label {
                "passed" => totals.0 += n,
                "failed" => totals.1 += n,
                _ => {}
            }
        }
    }
    totals
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a whole number")),
        Err(_) => Ok(default),
    }
}

fn run_options(
    binaries: Vec<guest::GuestBinary>,
    includes: Vec<PathBuf>,
    payload: Payload,
) -> Result<RunOptions> {
    Ok(RunOptions {
        binaries,
        includes,
        tools: Vec::new(),
        payload,
        timeout: Duration::from_secs(env_number("TZX_VM_TIMEOUT", 1800)?),
        test_timeout: Duration::from_secs(env_number("TZX_TEST_TIMEOUT", 600)?),
        memory_mib: u32::try_from(env_number("TZX_VM_MEMORY", 4096)?)?,
    })
}

/// The real-kernel tier: every guest test on each guest kernel of the run (the newest of
/// each patched series, or the pinned ones), one boot per kernel, counted per kernel.
fn vm_test(start: Instant) -> Result<Counts> {
    step(start, "real-kernel tier: preparing the guests");
    let images = guest::prepare_all(start)?;
    let binaries = guest::build_binaries(true, true, start)?;
    let mut counts = Counts::default();
    for image in &images {
        let abi = &image.kernel.version.abi;
        let kernel_start = Instant::now();
        let outcome = guest::run(
            image,
            &run_options(binaries.clone(), Vec::new(), Payload::Tests)?,
            start,
        )?;
        println!(
            "xtask: real-kernel tier on {abi} ({:.0} s):",
            kernel_start.elapsed().as_secs_f64()
        );
        for name in &outcome.passed {
            println!("  ok      [{abi}] {name}");
        }
        for name in &outcome.ignored {
            println!("  ignored [{abi}] {name}");
        }
        for name in &outcome.failed {
            println!("  FAILED  [{abi}] {name}");
        }
        let mut problems: Vec<String> = outcome
            .problems
            .iter()
            .map(|p| format!("[{abi}] {p}"))
            .collect();
        if outcome.kernel_release.as_deref() != Some(abi.as_str()) {
            problems.push(format!(
                "[{abi}] the guest reported kernel {:?}, not the one it was booted with",
                outcome.kernel_release
            ));
        }
        if outcome.passed.is_empty() && outcome.failed.is_empty() {
            problems.push(format!("[{abi}] the guest ran no test at all"));
        }
        if !outcome.success() && outcome.failed.is_empty() && problems.is_empty() {
            problems.push(format!(
                "[{abi}] the guest's test script exited with {:?}",
                outcome.exit_code
            ));
        }
        counts.absorb(
            &format!("real-kernel tier on {abi}"),
            Counts {
                passed: outcome.passed.len(),
                failed: outcome.failed.len(),
                problems,
                parts: Vec::new(),
            },
        );
    }
    Ok(counts)
}

/// `cargo xtask soak`'s options.
struct SoakOptions {
    /// The whole run, guest boot included.
    minutes: f64,
    /// Each server serves at least this many connections after warm-up.
    connections: Option<u64>,
    /// Passed to the guest's `soak` as they are.
    extra: Vec<String>,
}

impl Default for SoakOptions {
    fn default() -> SoakOptions {
        SoakOptions {
            minutes: 1.0,
            connections: None,
            extra: Vec::new(),
        }
    }
}

/// What a soak run spends besides churning: booting the guest and setting up its network,
/// and per server its start, warm-up round, quiescence checks, idle second and stop.
const SOAK_OVERHEAD_SECONDS: f64 = 30.0;

impl SoakOptions {
    fn parse(args: &[String]) -> Result<SoakOptions> {
        let mut options = SoakOptions::default();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            match arg.as_str() {
                "--minutes" => {
                    let value = rest.next().context("--minutes needs a number")?;
                    options.minutes = value
                        .parse()
                        .ok()
                        .filter(|m: &f64| m.is_finite() && *m > 0.0)
                        .with_context(|| format!("--minutes {value}: not a positive number"))?;
                }
                "--connections" => {
                    let value = rest.next().context("--connections needs a number")?;
                    options.connections =
                        Some(value.parse().with_context(|| {
                            format!("--connections {value}: not a whole number")
                        })?);
                }
                "--" => {
                    options.extra.extend(rest.by_ref().cloned());
                    break;
                }
                other => bail!(
                    "soak: unexpected `{other}`; usage: soak [--minutes M] [--connections N] \
                     [-- SOAK-ARGS]"
                ),
            }
        }
        Ok(options)
    }

    /// The churn time the four servers share.
    fn churn_seconds(&self) -> f64 {
        (self.minutes * 60.0 - SOAK_OVERHEAD_SECONDS).max(8.0)
    }
}

/// The soak run in the guest; its four servers count as four tests.
fn vm_soak(options: &SoakOptions, start: Instant) -> Result<Counts> {
    step(
        start,
        format_args!(
            "soak: {:.1} minutes, {:.0} s of churn{}",
            options.minutes,
            options.churn_seconds(),
            match options.connections {
                Some(n) => format!(", at least {n} connections per server"),
                None => String::new(),
            }
        ),
    );
    let image = guest::prepare_newest(start)?;
    let binaries = guest::build_soak(start)?;
    let mut command = format!("soak --seconds {:.0}", options.churn_seconds());
    if let Some(n) = options.connections {
        command.push_str(&format!(" --connections {n}"));
    }
    for arg in &options.extra {
        command.push(' ');
        command.push_str(arg);
    }
    // Room for a slow machine: the run may take twice its plan, plus the guest's boot, and
    // with --connections 0.1 s per connection (the guest serves 50-250 a second under TCG).
    let planned = (options.minutes * 60.0) as u64;
    let limit = planned * 2 + 300 + options.connections.unwrap_or(0) * 4 / 10;
    let script = format!(
        "echo '@@tzx run soak'\n\
         timeout -s KILL {limit} {command} 2>&1\n\
         rc=$?; echo; echo \"@@tzx done soak $rc\"\n\
         exit $rc"
    );
    let mut run = run_options(binaries, Vec::new(), Payload::Command(script))?;
    run.timeout = run.timeout.max(Duration::from_secs(limit + 300));
    let outcome = guest::run(&image, &run, start)?;
    println!("xtask: soak run on {}:", image.kernel.version.abi);
    for name in &outcome.passed {
        println!("  ok      {name}");
    }
    for name in &outcome.failed {
        println!("  FAILED  {name}");
    }
    let mut problems = outcome.problems.clone();
    if outcome.passed.is_empty() && outcome.failed.is_empty() {
        problems.push("the soak run reported no result".into());
    }
    if outcome.exit_code != Some(0) && outcome.failed.is_empty() && problems.is_empty() {
        problems.push(format!("the soak run exited with {:?}", outcome.exit_code));
    }
    Ok(Counts {
        passed: outcome.passed.len(),
        failed: outcome.failed.len(),
        problems,
        parts: vec![Part {
            label: format!("soak run on {}", image.kernel.version.abi),
            passed: outcome.passed.len(),
            failed: outcome.failed.len(),
        }],
    })
}

fn vm_bench(args: &[String], start: Instant) -> Result<ExitCode> {
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--")
        .collect();
    if args.first() == Some(&"--proxy") {
        return vm_bench_proxy(&args[1..], start);
    }
    let profile = args.contains(&"--perf");
    let napi_threaded = args.contains(&"--napi-threaded");
    let peer_threaded = napi_threaded || args.contains(&"--peer-threaded");
    let args: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| *a != "--perf" && *a != "--peer-threaded" && *a != "--napi-threaded")
        .collect();
    let image = guest::prepare_newest(start)?;
    let binaries = guest::build_benchmark(start)?;
    let mut command = format!("guest-ratio {}", args.join(" "));
    let mut options = run_options(binaries, Vec::new(), Payload::Command(String::new()))?;
    if profile {
        // The drivers of one queue (`tokio-zcrx-drive`) and of a queue group
        // (`tokio-zcrx-d-qN`), and the raw loop's threads, for comparison.
        let comms: Vec<String> = ["tokio-zcrx-driv".to_string()]
            .into_iter()
            .chain((0..8).map(|q| format!("tokio-zcrx-d-q{q}")))
            .chain((0..8).map(|q| format!("raw-q{q}")))
            .collect();
        let comms: Vec<&str> = comms.iter().map(String::as_str).collect();
        command = profiled(&command, &comms);
        options.tools = guest::profiler(start)?;
    }
    if peer_threaded {
        // The peer port's NAPI in a kernel thread of its own: its TCP (the sender's ACK
        // processing and the transmissions they clock) and, through it, nsim0's delivery
        // with netdevsim's copy into the area (which stands in for a NIC's DMA) run there,
        // not in a softirq on whichever receiver thread sent the acknowledgement. On real
        // hardware the peer is another machine and DMA costs no CPU.
        command = format!(
            "/usr/sbin/ip netns exec \"$(basename \"$TZX_PEER_NETNS\")\" \
               sh -c \"echo 1 > /sys/class/net/$TZX_PEER_NIC/threaded\" || exit 1\n\
             echo \"peer NAPI threaded: $(/usr/sbin/ip netns exec \"$(basename \"$TZX_PEER_NETNS\")\" \
               cat /sys/class/net/$TZX_PEER_NIC/threaded)\"\n{command}"
        );
    }
    if napi_threaded {
        // The receiving port's NAPI too: netdevsim's copy into the area, which stands in
        // for a NIC's DMA, runs in nsim0's NAPI poll (`nsim_rcv`); tokio read's traffic
        // takes no such copy (netdevsim hands the sender's skb over).
        command = format!(
            "echo 1 > /sys/class/net/$TZX_NIC/threaded || exit 1\n\
             echo \"receiving port NAPI threaded: $(cat /sys/class/net/$TZX_NIC/threaded)\"\n{command}"
        );
    }
    options.payload = Payload::Command(command);
    let outcome = guest::run(&image, &options, start)?;
    for problem in &outcome.problems {
        println!("xtask: {problem}");
    }
    let ok = outcome.problems.is_empty() && outcome.exit_code == Some(0);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `command` under `perf record` of every CPU with call chains, then the report: per
/// process, the threads named `driver_comms` per thread and symbol and with their call
/// chains (aggregated in the guest), and the Tokio workers per thread and symbol.
fn profiled(command: &str, driver_comms: &[&str]) -> String {
    let comms = driver_comms.join(",");
    let matches = driver_comms
        .iter()
        .map(|c| format!("$1 == \"{c}\""))
        .collect::<Vec<_>>()
        .join(" || ");
    format!(
        "perf record -q -a -g -F 499 -o /tmp/perf.data -- {command} || exit 1\n\
         echo '@@perf per process'\n\
         perf report -i /tmp/perf.data --no-inline --stdio --no-children -g none --sort pid \
           --percent-limit 1 2>/dev/null | grep -v '^$'\n\
         echo '@@perf the driver threads, per thread and symbol'\n\
         perf report -i /tmp/perf.data --no-inline --stdio --no-children -g none \
           --comms {comms} --sort comm,sym --percent-limit 0.4 2>/dev/null \
           | grep -v '^$' | head -150\n\
         echo '@@perf the driver threads, call chains'\n\
         perf script -i /tmp/perf.data --no-inline -F comm,tid,ip,sym 2>/dev/null \
           | awk '/^[^ \\t]/ {{ if (k && s != \"\") c[s]++; \
                                 k = ({matches}); s = $1; d = 0; next }} \
                  NF == 0 {{ next }} \
                  k && d < 14 {{ s = s \" < \" $2; d++ }} \
                  END {{ if (k && s != \"\") c[s]++; for (x in c) print c[x], x }}' \
           | sort -rn | head -80\n\
         echo '@@perf Tokio workers, per thread and symbol'\n\
         perf report -i /tmp/perf.data --no-inline --stdio --no-children -g none \
           --comms tokio-rt-worker --sort pid,sym --percent-limit 0.4 2>/dev/null \
           | grep -v '^$' | head -100"
    )
}

/// Boots `image` and runs `command` with `binaries` (and `includes`), prints the problems the
/// run reported, and returns the outcome with whether it succeeded (no problem, status 0).
fn run_in_guest(
    image: &guest::GuestImage,
    binaries: Vec<guest::GuestBinary>,
    includes: Vec<PathBuf>,
    command: String,
    start: Instant,
) -> Result<(guest::GuestOutcome, bool)> {
    let outcome = guest::run(
        image,
        &run_options(binaries, includes, Payload::Command(command))?,
        start,
    )?;
    for problem in &outcome.problems {
        println!("xtask: {problem}");
    }
    let ok = outcome.problems.is_empty() && outcome.exit_code == Some(0);
    Ok((outcome, ok))
}

/// The proxy benchmark in the guest, nic mode: `proxy-throughput` with its clients and sink
/// in the peer namespace, the proxy on the netdevsim queue; the results go to
/// docs/bench/proxy.json and are drawn as docs/bench/proxy.png.
fn vm_bench_proxy(args: &[&str], start: Instant) -> Result<ExitCode> {
    let profile = args.contains(&"--perf");
    let peer_split = args.contains(&"--peer-split");
    let args: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| *a != "--perf" && *a != "--peer-split")
        .collect();
    let image = guest::prepare_newest(start)?;
    let binaries = guest::build_proxy_benchmark(start)?;
    let mut command = format!(
        "proxy-throughput --proxy /tzx/bin/proxy --mode nic --interface \"$TZX_NIC\" --queue 0 \
         --listen-ip \"$TZX_NIC_ADDR\" --upstream-ip \"$TZX_PEER_ADDR\" \
         --netns \"$TZX_PEER_NETNS\" --results - {}",
        args.join(" ")
    );
    if peer_split {
        // netdevsim linearizes every non-linear skb it forwards unless the receiving port
        // has header split on (`nsim_start_xmit`): a copy of every byte sent, charged to
        // the sender, that a NIC's DMA would not make. With header split on the peer port
        // too, neither proxy pays it.
        command = format!(
            "/usr/sbin/ip netns exec \"$(basename \"$TZX_PEER_NETNS\")\" \
               ethtool -G \"$TZX_PEER_NIC\" tcp-data-split on || exit 1\n{command}"
        );
    }
    let mut options = run_options(binaries, Vec::new(), Payload::Command(String::new()))?;
    if profile {
        // Every CPU sampled with kernel and user stacks; the report per thread, then the
        // runtime's driver thread (only the tokio-zcrx proxy has one) per symbol and with
        // call chains, then the Tokio workers (of both proxies and of the clients).
        options.tools = guest::profiler(start)?;
        command = profiled(&command, &["tokio-zcrx-driv"]);
    }
    options.payload = Payload::Command(command);
    let outcome = guest::run(&image, &options, start)?;
    for problem in &outcome.problems {
        println!("xtask: {problem}");
    }
    if !outcome.problems.is_empty() || outcome.exit_code != Some(0) {
        return Ok(ExitCode::FAILURE);
    }
    if profile {
        // A profiled run's numbers are not the benchmark's: nothing is written.
        return Ok(ExitCode::SUCCESS);
    }
    let [line] = &outcome.results[..] else {
        bail!(
            "the guest printed {} `@@proxy-bench` result lines, expected one",
            outcome.results.len()
        );
    };
    let document: serde_json::Value =
        serde_json::from_str(line.trim_start_matches("@@proxy-bench ").trim())
            .context("the guest's @@proxy-bench line is not JSON")?;
    let name = if peer_split {
        "docs/bench/proxy-peer-split.json"
    } else {
        "docs/bench/proxy.json"
    };
    let file = util::workspace_root().join(name);
    std::fs::write(&file, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    step(
        start,
        format_args!("results in {}; drawing the plot", file.display()),
    );
    util::run(
        cargo()
            .args([
                "run",
                "--release",
                "-p",
                "tokio-zcrx-bench",
                "--",
                "--plot-proxy",
            ])
            .arg(&file),
    )
    .with_context(|| format!("drawing the plot of {name}"))?;
    Ok(ExitCode::SUCCESS)
}

fn vm_run(args: &[String], start: Instant) -> Result<ExitCode> {
    let mut includes = Vec::new();
    let mut rest = args.iter();
    let mut command = Vec::new();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--include" => includes.push(PathBuf::from(
                rest.next().context("--include needs a path")?,
            )),
            "--" => {
                command.extend(rest.by_ref().cloned());
                break;
            }
            other => {
                bail!("vm-run: unexpected `{other}`; usage: vm-run [--include PATH]... -- COMMAND")
            }
        }
    }
    if command.is_empty() {
        bail!("vm-run needs a command after `--`, e.g. cargo xtask vm-run -- 'probe --json'");
    }
    let image = guest::prepare_newest(start)?;
    // Test binaries come along (as tzx-test-NAME) so a single test can be run by hand.
    let binaries = guest::build_binaries(true, true, start)?;
    let (outcome, ok) = run_in_guest(&image, binaries, includes, command.join(" "), start)?;
    let code = outcome.exit_code.unwrap_or(1);
    println!("xtask: the command exited with status {code} in the guest");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn libtest_totals_are_summed() {
        let out = "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out\n\
                   junk\n\
                   test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured\n";
        assert_eq!(super::libtest_totals(out), (5, 1));
    }

    #[test]
    fn counts_per_part_then_the_total_last() {
        let mut total = super::Counts {
            passed: 300,
            ..Default::default()
        };
        let host = std::mem::take(&mut total);
        total.absorb("host tier", host);
        let mut vm = super::Counts::default();
        for (abi, passed, failed) in [("7.3.4+deb13-amd64", 70, 0), ("7.2.12+deb13-amd64", 69, 1)] {
            vm.absorb(
                &format!("real-kernel tier on {abi}"),
                super::Counts {
                    passed,
                    failed,
                    problems: vec![format!("[{abi}] x")]
                        .into_iter()
                        .filter(|_| failed > 0)
                        .collect(),
                    parts: Vec::new(),
                },
            );
        }
        total.absorb("real-kernel tier", vm);
        let lines = total.summary_lines("everything");
        assert_eq!(
            lines,
            [
                "xtask: FAILED: [7.2.12+deb13-amd64] x",
                "xtask: everything: FAILURES above",
                "xtask: host tier: 300 passed, 0 failed",
                "xtask: real-kernel tier on 7.3.4+deb13-amd64: 70 passed, 0 failed",
                "xtask: real-kernel tier on 7.2.12+deb13-amd64: 69 passed, 1 failed",
                "439 passed, 1 failed",
            ]
        );
        assert_eq!(
            super::libtest_totals(lines.last().unwrap()),
            (0, 0),
            "not a libtest line"
        );
    }

    #[test]
    fn soak_options_parse_and_bad_ones_are_refused() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = super::SoakOptions::parse(&args(&[
            "--minutes",
            "30",
            "--connections",
            "10000",
            "--",
            "--only",
            "sink_nic",
        ]))
        .unwrap();
        assert_eq!((o.minutes, o.connections), (30.0, Some(10000)));
        assert_eq!(o.extra, ["--only", "sink_nic"]);
        assert_eq!(
            o.churn_seconds(),
            30.0 * 60.0 - super::SOAK_OVERHEAD_SECONDS
        );
        let short = super::SoakOptions::default();
        assert_eq!(short.churn_seconds(), 60.0 - super::SOAK_OVERHEAD_SECONDS);
        for bad in [
            &["--minutes", "0"][..],
            &["--minutes", "x"],
            &["--connections"],
            &["-x"],
        ] {
            assert!(super::SoakOptions::parse(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
