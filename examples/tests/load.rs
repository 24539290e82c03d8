//! The load generator against small servers: echo checking, corruption detection, and the
//! per-connection CRC-32 that a tokio-zcrx sink (copy mode, so it runs anywhere) recomputes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_zcrx::{Mode, ZcListener, Zcrx};
use tokio_zcrx_examples::load::{self, Budget, LoadConfig};

fn config(addr: SocketAddr, conns: usize, verify_echo: bool) -> LoadConfig {
    LoadConfig {
        addr,
        conns,
        budget: Budget::Bytes(300_001),
        seed: 7,
        max_write: 5000,
        verify_echo,
    }
}

/// A plain Tokio echo server that flips one byte at `corrupt_at` (if given).
async fn echo_server(corrupt_at: Option<u64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0; 10_000];
                let mut offset = 0u64;
                loop {
                    // The client hangs up on a corrupted echo: an error ends this task.
                    let n = socket.read(&mut buf).await?;
                    if n == 0 {
                        return socket.shutdown().await;
                    }
                    let range = offset..offset + n as u64;
                    if let Some(at) = corrupt_at.filter(|at| range.contains(at)) {
                        buf[(at - offset) as usize] ^= 1;
                    }
                    socket.write_all(&buf[..n]).await?;
                    offset += n as u64;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_is_verified_byte_for_byte() {
    let addr = echo_server(None).await;
    let config = config(addr, 8, true);
    let report = load::run(&config).await;
    assert_eq!(report.errors(), 0, "{report:?}");
    assert_eq!(report.bytes(), 8 * 300_001);
    assert!(report.conns.iter().all(|c| c.echoed == c.bytes));
    let json = report.to_json(&config);
    assert_eq!(json["errors"], 0);
    assert_eq!(json["conns"].as_array().unwrap().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_echo_is_an_error_at_the_right_byte() {
    let addr = echo_server(Some(123_457)).await;
    let report = load::run(&config(addr, 2, true)).await;
    assert_eq!(report.errors(), 2);
    for conn in &report.conns {
        let error = conn.error.as_deref().unwrap();
        assert!(error.contains("differs at byte 123457"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zcrx_sink_sees_the_crc32_the_load_generator_reports() {
    let zcrx = Zcrx::builder().mode(Mode::Copy).build().unwrap();
    let listener = ZcListener::bind(&zcrx, "127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (done, mut received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _writer, peer) = listener.accept().await.unwrap();
            let done = done.clone();
            tokio::spawn(async move {
                let mut crc = crc32fast::Hasher::new();
                let mut bytes = 0;
                while let Some(buf) = stream.next().await {
                    let buf = buf.unwrap();
                    crc.update(&buf);
                    bytes += buf.len() as u64;
                }
                done.send((peer, (bytes, crc.finalize()))).unwrap();
            });
        }
    });
    let mut config = config(addr, 4, false);
    config.budget = Budget::Time(Duration::from_millis(200));
    let report = load::run(&config).await;
    assert_eq!(report.errors(), 0, "{report:?}");
    let mut seen = HashMap::new();
    while seen.len() < 4 {
        let (peer, result) = received.recv().await.unwrap();
        seen.insert(peer, result);
    }
    for conn in &report.conns {
        assert_eq!(
            seen[&conn.local.unwrap()],
            (conn.bytes, conn.crc32),
            "{conn:?}"
        );
    }
}
