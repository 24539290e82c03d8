//! The parent's side of one measured run: start a receiver child, connect the sender to it,
//! start sending when the child is ready, and collect what it measured.
//!
//! The sender is the same for every receiver: one blocking thread per connection, writing a
//! fixed pattern in 256 KiB `write_all` calls, then shutting its write side down. It runs in
//! this (parent) process on the same two cores as the receiver, as in docs/perf-notes.

use std::io::{BufRead, BufReader, Lines, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};

use crate::protocol::{Msg, Outcome, Spec};
use crate::system::{self, MachineCpu, Usage};

/// Size of each sender write.
pub(crate) const SEND_WRITE: usize = 256 << 10;

/// How to start a child: the bench binary itself, optionally behind a wrapper command
/// (e.g. `valgrind --tool=callgrind`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Launcher {
    pub wrapper: Vec<String>,
}

/// A measured run as the parent sees it.
#[derive(Debug, Clone)]
pub(crate) struct RunOutcome {
    /// What the receiver child measured.
    pub child: Outcome,
    /// CPU seconds of the sender threads (this process) over the sending.
    pub sender_cpu_s: f64,
    /// For scaling runs: resident memory before the first connection and with all idle.
    pub rss_baseline: Option<u64>,
    pub rss_idle: Option<u64>,
    /// Machine-wide busy and stolen CPU over the sending (to spot other load).
    pub machine: MachineCpu,
    /// TCP counters that moved during the run (memory pressure, pruning, drops).
    pub tcp_counters: Vec<(String, i64)>,
}

/// CPU and TCP counters around the measured part of a run.
struct Meter {
    usage: Usage,
    machine: MachineCpu,
    counters: Vec<(String, i64)>,
}

impl Meter {
    fn start() -> Meter {
        Meter {
            usage: Usage::now(),
            machine: MachineCpu::now(),
            counters: system::tcp_counters(),
        }
    }

    /// Sender CPU seconds, machine CPU, counter deltas.
    fn stop(self) -> (f64, MachineCpu, Vec<(String, i64)>) {
        let used = Usage::now().since(&self.usage);
        (
            used.user_s + used.sys_s,
            MachineCpu::now().since(&self.machine),
            system::counter_deltas(&self.counters, &system::tcp_counters()),
        )
    }
}

/// A running receiver child and its message lines.
struct ChildProcess {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ChildProcess {
    fn spawn(launcher: &Launcher, spec: &Spec) -> Result<ChildProcess> {
        let exe = std::env::current_exe().context("cannot find the bench binary")?;
        let mut command = match launcher.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        command
            .arg("__child")
            .arg(serde_json::to_string(spec)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start the receiver child ({command:?})"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        Ok(ChildProcess {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The child's next message; its error message if it failed.
    fn next(&mut self) -> Result<Msg> {
        loop {
            let Some(line) = self.lines.next() else {
                let status = self.child.wait()?;
                bail!("the receiver child exited ({status}) without a result");
            };
            let line = line.context("reading the receiver child's output")?;
            // Anything that is not one of our messages (a library's println) is passed on.
            match serde_json::from_str::<Msg>(&line) {
                Ok(Msg::Error { message }) => {
                    let _ = self.child.wait();
                    bail!("receiver: {message}");
                }
                Ok(msg) => return Ok(msg),
                Err(_) => eprintln!("receiver: {line}"),
            }
        }
    }

    fn finish(mut self) -> Result<()> {
        let status = self.child.wait()?;
        if !status.success() {
            // A late error message, if any, says more than the status.
            self.next()?;
            bail!("the receiver child failed ({status})");
        }
        Ok(())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // Only reached with the child still running on an error path: don't leave it behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A one-shot start signal for the sender threads: open (go) or abandoned (stop).
#[derive(Default)]
struct Gate {
    state: Mutex<Option<bool>>,
    changed: Condvar,
}

impl Gate {
    fn set(&self, go: bool) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(go);
        self.changed.notify_all();
    }

    /// Blocks until set; true means go.
    fn wait(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(go) = *state {
                return go;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Sender threads, each with its connection, waiting at the gate.
struct Senders {
    gate: Arc<Gate>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Senders {
    fn start(sockets: Vec<TcpStream>, bytes_per_conn: u64) -> Result<Senders> {
        let gate = Arc::new(Gate::default());
        let payload: Arc<Vec<u8>> =
            Arc::new((0..SEND_WRITE).map(|i| (i * 31 % 251) as u8).collect());
        let mut threads = Vec::with_capacity(sockets.len());
        for (i, socket) in sockets.into_iter().enumerate() {
            let thread_gate = Arc::clone(&gate);
            let payload = Arc::clone(&payload);
            let thread = std::thread::Builder::new()
                .name(format!("sender-{i}"))
                .stack_size(64 << 10)
                .spawn(move || {
                    if !thread_gate.wait() {
                        return Ok(());
                    }
                    send(socket, bytes_per_conn, &payload)
                        .with_context(|| format!("sender connection {}", i + 1))
                });
            match thread {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    gate.set(false);
                    return Err(e).context("spawning a sender thread");
                }
            }
        }
        Ok(Senders { gate, threads })
    }

    /// Opens the gate and waits for every sender; returns the first error.
    fn run(mut self) -> Result<()> {
        self.gate.set(true);
        let mut first_error = None;
        for thread in self.threads.drain(..) {
            let result = thread
                .join()
                .map_err(|_| anyhow!("a sender thread panicked"))
                .and_then(|r| r);
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        // Not run: release the threads so they end.
        self.gate.set(false);
    }
}

fn send(mut socket: TcpStream, bytes: u64, payload: &[u8]) -> Result<()> {
    let mut left = bytes;
    while left > 0 {
        let n = left.min(payload.len() as u64) as usize;
        socket.write_all(&payload[..n])?;
        left -= n as u64;
    }
    socket.shutdown(Shutdown::Write)?;
    Ok(())
}

fn connect(addr: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
    (0..count)
        .map(|i| {
            TcpStream::connect(addr)
                .with_context(|| format!("connecting {} of {count} to {addr}", i + 1))
        })
        .collect()
}

fn expect_listening(child: &mut ChildProcess) -> Result<SocketAddr> {
    match child.next()? {
        Msg::Listening { addr } => Ok(addr),
        other => bail!("protocol error: expected the listening address, got {other:?}"),
    }
}

/// One receive run: `conns` connections each sending `bytes_per_conn`.
pub(crate) fn receive(launcher: &Launcher, spec: &Spec) -> Result<RunOutcome> {
    let &Spec::Receive {
        conns,
        bytes_per_conn,
        ..
    } = spec
    else {
        bail!("not a receive spec");
    };
    let mut child = ChildProcess::spawn(launcher, spec)?;
    let addr = expect_listening(&mut child)?;
    let senders = Senders::start(connect(addr, conns)?, bytes_per_conn)?;
    let outcome = measure(&mut child, senders)?;
    child.finish()?;
    // Receive runs report no idle-phase memory.
    Ok(RunOutcome {
        rss_baseline: None,
        rss_idle: None,
        ..outcome
    })
}

/// Waits until the child is ready, runs the senders while metering, and collects the child's
/// result, with the RSS figures the child reported when ready.
fn measure(child: &mut ChildProcess, senders: Senders) -> Result<RunOutcome> {
    let (rss_baseline, rss_idle) = match child.next()? {
        Msg::Ready {
            rss_baseline,
            rss_idle,
        } => (rss_baseline, rss_idle),
        other => bail!("protocol error: expected ready, got {other:?}"),
    };
    let meter = Meter::start();
    let sent = senders.run();
    // The child's word first: when it failed, the senders' broken pipes are only a symptom.
    let outcome = match child.next()? {
        Msg::Done(outcome) => outcome,
        other => bail!("protocol error: expected the result, got {other:?}"),
    };
    let (sender_cpu_s, machine, tcp_counters) = meter.stop();
    sent?;
    Ok(RunOutcome {
        child: outcome,
        sender_cpu_s,
        rss_baseline,
        rss_idle,
        machine,
        tcp_counters,
    })
}

/// One scaling run: `idle` connections that send `hello` bytes and then nothing, plus `busy`
/// connections that each send `busy_bytes_per_conn`.
pub(crate) fn scaling(launcher: &Launcher, spec: &Spec) -> Result<RunOutcome> {
    let &Spec::Scaling {
        idle,
        busy,
        hello,
        busy_bytes_per_conn,
        ..
    } = spec
    else {
        bail!("not a scaling spec");
    };
    let mut child = ChildProcess::spawn(launcher, spec)?;
    let addr = expect_listening(&mut child)?;
    let hello_bytes: Vec<u8> = (0..hello).map(|i| (i % 253) as u8).collect();
    let mut idle_sockets = Vec::with_capacity(idle);
    for i in 0..idle {
        let mut socket = TcpStream::connect(addr)
            .with_context(|| format!("connecting idle connection {} of {idle} to {addr}", i + 1))?;
        socket
            .write_all(&hello_bytes)
            .with_context(|| format!("sending hello on idle connection {}", i + 1))?;
        idle_sockets.push(socket);
    }
    let senders = Senders::start(connect(addr, busy)?, busy_bytes_per_conn)?;
    let outcome = measure(&mut child, senders)?;
    drop(idle_sockets);
    child.finish()?;
    Ok(outcome)
}
