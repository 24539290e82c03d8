//! What the parent tells a receiver child (its [`Spec`], one JSON argument) and what the child
//! answers (one [`Msg`] per line on its stdout).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use anyhow::bail;
use serde::{Deserialize, Serialize};

/// The receivers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Receiver {
    /// tokio-zcrx in the mode the host supports (`Zcrx::builder().build()`), consuming
    /// `ZcStream` buffers and dropping them.
    TokioZcrx,
    /// Tokio's multi-threaded runtime, `TcpStream::read` into a reused 64 KiB buffer.
    TokioRead,
    /// tokio-uring, one runtime per CPU, `TcpStream::read` into a reused 64 KiB buffer.
    TokioUring,
    /// One blocking `std` thread per connection, `read` into a reused 64 KiB buffer.
    StdThreads,
}

impl Receiver {
    pub const ALL: [Receiver; 4] = [
        Receiver::TokioZcrx,
        Receiver::TokioRead,
        Receiver::TokioUring,
        Receiver::StdThreads,
    ];

    /// The name used on the command line and in the JSON.
    pub fn id(self) -> &'static str {
        match self {
            Receiver::TokioZcrx => "tokio-zcrx",
            Receiver::TokioRead => "tokio-read",
            Receiver::TokioUring => "tokio-uring",
            Receiver::StdThreads => "std-threads",
        }
    }

    /// What the table calls it.
    pub fn label(self) -> &'static str {
        match self {
            Receiver::TokioZcrx => "tokio-zcrx ZcStream",
            Receiver::TokioRead => "tokio TcpStream::read",
            Receiver::TokioUring => "tokio-uring read",
            Receiver::StdThreads => "std thread per conn",
        }
    }
}

impl fmt::Display for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for Receiver {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Receiver> {
        match Receiver::ALL.into_iter().find(|r| r.id() == s) {
            Some(r) => Ok(r),
            None => bail!("unknown receiver {s:?}: expected tokio-zcrx, tokio-read, tokio-uring or std-threads"),
        }
    }
}

/// The size of the reused read buffer of the read-based receivers.
pub(crate) const READ_BUFFER: usize = 64 << 10;

/// What one receiver child does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Spec {
    /// Accept `conns` connections, then read `bytes_per_conn` from each until EOF.
    Receive {
        receiver: Receiver,
        conns: usize,
        bytes_per_conn: u64,
        /// tokio-uring runtimes (threads).
        uring_threads: usize,
        /// The child gives up (and says so) after this many seconds.
        timeout_s: u64,
        /// Run the receiver on this CPU only (`--pin`).
        pin_cpu: Option<usize>,
    },
    /// Accept `idle + busy` connections (each idle one sends `hello` bytes first), report the
    /// memory they cost, then receive `busy_bytes_per_conn` on each busy one.
    Scaling {
        receiver: Receiver,
        idle: usize,
        busy: usize,
        hello: u64,
        busy_bytes_per_conn: u64,
        timeout_s: u64,
        pin_cpu: Option<usize>,
    },
}

impl Spec {
    pub(crate) fn timeout_s(&self) -> u64 {
        match self {
            Spec::Receive { timeout_s, .. } | Spec::Scaling { timeout_s, .. } => *timeout_s,
        }
    }

    pub(crate) fn pin_cpu(&self) -> Option<usize> {
        match self {
            Spec::Receive { pin_cpu, .. } | Spec::Scaling { pin_cpu, .. } => *pin_cpu,
        }
    }
}

/// A line from the child.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Msg {
    /// The listener is up: connect here.
    Listening { addr: SocketAddr },
    /// Every connection is accepted and being received; the measured window starts now.
    Ready {
        /// Scaling: resident memory before the first connection.
        rss_baseline: Option<u64>,
        /// Scaling: resident memory with every connection open and idle.
        rss_idle: Option<u64>,
    },
    /// The measured window is over.
    Done(Outcome),
    /// The child failed; it exits next.
    Error { message: String },
}

/// What a child measured over its window (from `Ready` to the last byte).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Outcome {
    pub bytes: u64,
    pub seconds: f64,
    pub user_s: f64,
    pub sys_s: f64,
    pub voluntary_switches: i64,
    pub involuntary_switches: i64,
    /// VmHWM at the end: the child's peak resident memory.
    pub peak_rss: u64,
    /// VmRSS at the end.
    pub rss_end: u64,
    pub rss_baseline: Option<u64>,
    pub rss_idle: Option<u64>,
    /// For tokio-zcrx: the mode it chose and its statistics.
    pub zcrx: Option<ZcrxInfo>,
}

/// How the tokio-zcrx receiver ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ZcrxInfo {
    /// `Zcrx::mode()`: nic, nodev or copy.
    pub mode: String,
    /// `Zcrx::mode_selection()`: the mode and why better ones were refused.
    pub mode_selection: String,
    /// `Zcrx::description()`.
    pub description: String,
    /// `Zcrx::stats()` after the run.
    pub stats: String,
}
