//! The load generator: N TCP connections, each sending its own deterministic payload in
//! randomly sized writes while reading back (and optionally checking) whatever the server
//! returns, until the server closes.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::payload::Payload;

/// How much each connection sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Exactly this many bytes.
    Bytes(u64),
    /// As much as it can for this long.
    Time(Duration),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server.
    pub addr: SocketAddr,
    /// Number of concurrent connections.
    pub conns: usize,
    /// How much each connection sends.
    pub budget: Budget,
    /// Seed of the payloads and write sizes (see [`Payload`]).
    pub seed: u64,
    /// Largest write; each write is uniformly 1..=max_write bytes.
    pub max_write: usize,
    /// Check that the server echoes every byte back, in order, and nothing else.
    pub verify_echo: bool,
}

/// What one connection did.
#[derive(Debug, Clone, Default)]
pub struct ConnReport {
    /// The connection's index (its payload depends on it).
    pub index: usize,
    /// Our address, which the server sees as the peer; `None` if the connect failed.
    pub local: Option<SocketAddr>,
    /// Bytes sent.
    pub bytes: u64,
    /// IEEE CRC-32 (zlib's) of the bytes sent.
    pub crc32: u32,
    /// Bytes the server sent back.
    pub echoed: u64,
    /// Why the connection failed.
    pub error: Option<String>,
}

/// What the whole run did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// One per connection, by index.
    pub conns: Vec<ConnReport>,
    /// From the first connect to the last connection's end.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Bytes sent by all connections.
    pub fn bytes(&self) -> u64 {
        self.conns.iter().map(|c| c.bytes).sum()
    }

    /// Connections that failed.
    pub fn errors(&self) -> usize {
        self.conns.iter().filter(|c| c.error.is_some()).count()
    }

    /// Sending throughput in Gbit/s.
    pub fn gbps(&self) -> f64 {
        crate::gbps(self.bytes(), self.elapsed.as_secs_f64())
    }

    /// The report as one JSON object (the `loadgen` summary line).
    pub fn to_json(&self, config: &LoadConfig) -> serde_json::Value {
        let conns: Vec<_> = self
            .conns
            .iter()
            .map(|c| {
                json!({
                    "index": c.index,
                    "local": c.local.map(|a| a.to_string()),
                    "bytes": c.bytes,
                    "crc32": c.crc32,
                    "echoed": c.echoed,
                    "error": c.error,
                })
            })
            .collect();
        json!({
            "bytes": self.bytes(),
            "seconds": self.elapsed.as_secs_f64(),
            "gbps": self.gbps(),
            "errors": self.errors(),
            "echoed": self.conns.iter().map(|c| c.echoed).sum::<u64>(),
            "verify_echo": config.verify_echo,
            "seed": config.seed,
            "max_write": config.max_write,
            "conns": conns,
        })
    }
}

/// Runs every connection concurrently and waits for all of them.
pub async fn run(config: &LoadConfig) -> LoadReport {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for index in 0..config.conns {
        let config = config.clone();
        tasks.spawn(async move { connection(&config, index).await });
    }
    let mut conns = Vec::with_capacity(config.conns);
    while let Some(joined) = tasks.join_next().await {
        // A panic is a bug in this code; let it be seen as one.
        conns.push(joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())));
    }
    conns.sort_by_key(|c| c.index);
    LoadReport {
        conns,
        elapsed: start.elapsed(),
    }
}

/// One connection, start to end; failures end up in the report.
async fn connection(config: &LoadConfig, index: usize) -> ConnReport {
    let mut report = ConnReport {
        index,
        ..ConnReport::default()
    };
    if let Err(error) = exchange(config, &mut report).await {
        report.error = Some(error.to_string());
    }
    report
}

async fn exchange(config: &LoadConfig, report: &mut ConnReport) -> io::Result<()> {
    let socket = TcpStream::connect(config.addr).await?;
    report.local = Some(socket.local_addr()?);
    let payload = Payload::new(config.seed, report.index as u64);
    // Read while writing: an echo server writes back as we send, and would stall once
    // both directions' socket buffers are full if nobody read.
    let (reader, writer) = socket.into_split();
    let mut sent = Sent::default();
    let expected = config.verify_echo.then_some(payload);
    let result = tokio::try_join!(
        send(writer, payload, config, &mut sent),
        receive(reader, expected, &mut report.echoed),
    );
    report.bytes = sent.bytes;
    report.crc32 = sent.crc.finalize();
    result?;
    if config.verify_echo && report.echoed != report.bytes {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the echo ended after {} of {} bytes",
                report.echoed, report.bytes
            ),
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Sent {
    bytes: u64,
    crc: crc32fast::Hasher,
}

/// Sends the payload in randomly sized writes, then shuts down the write side (FIN).
async fn send(
    mut writer: OwnedWriteHalf,
    payload: Payload,
    config: &LoadConfig,
    sent: &mut Sent,
) -> io::Result<()> {
    let (limit, deadline) = match config.budget {
        Budget::Bytes(n) => (n, None),
        Budget::Time(t) => (u64::MAX, Some(Instant::now() + t)),
    };
    let mut buf = vec![0; config.max_write.max(1)];
    let mut sizes = payload.write_sizes(config.max_write);
    while sent.bytes < limit && deadline.is_none_or(|d| Instant::now() < d) {
        let size = sizes.next().unwrap_or(1).min((limit - sent.bytes) as usize);
        let chunk = &mut buf[..size];
        payload.fill(sent.bytes, chunk);
        writer.write_all(chunk).await?;
        sent.crc.update(chunk);
        sent.bytes += size as u64;
    }
    writer.shutdown().await
}

/// Reads until the server closes; compares with the payload if `expected` is given.
async fn receive(
    mut reader: OwnedReadHalf,
    expected: Option<Payload>,
    received: &mut u64,
) -> io::Result<()> {
    let mut buf = vec![0; 64 << 10];
    let mut want = vec![0; buf.len()];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if let Some(payload) = expected {
            payload.fill(*received, &mut want[..n]);
            if let Some(at) = buf[..n].iter().zip(&want).position(|(a, b)| a != b) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the echo differs at byte {}: expected {:#04x}, got {:#04x}",
                        *received + at as u64,
                        want[at],
                        buf[at]
                    ),
                ));
            }
        }
        *received += n as u64;
    }
}
