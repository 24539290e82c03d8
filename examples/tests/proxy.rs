//! The `proxy` example (copy mode, so it runs anywhere) between Tokio clients and servers of
//! this test: half-close passes through, resets reach the other side as resets, and many
//! connections leave no descriptor or buffer behind. (Real software through it:
//! real_software.rs.)

mod support;

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::time::Duration;

use support::{number, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_zcrx_examples::payload::Payload;

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    Payload::new(seed, 0).fill(0, &mut bytes);
    bytes
}

/// Makes closing `socket` send an RST instead of a FIN (SO_LINGER with a zero timeout).
fn linger_zero(socket: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid open socket and a `linger` of the size passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "{}", std::io::Error::last_os_error());
}

/// Reads until the end of stream or an error; returns what was read and how it ended.
async fn read_to_end(socket: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut bytes = Vec::new();
    let result = socket.read_to_end(&mut bytes).await.map(drop);
    (bytes, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_through_both_ways() {
    // The server reads the whole request, then answers with a reply that depends on it: it
    // can only answer after the client's end of stream has come through the proxy, while the
    // proxy's other direction is still open.
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let reply_len = 3 << 20;
    let serve = tokio::spawn(async move {
        let (mut socket, _) = server.accept().await.unwrap();
        let (request, result) = read_to_end(&mut socket).await;
        result.unwrap();
        let mut reply = payload(request.len() as u64, reply_len);
        reply[..request.len().min(16)].copy_from_slice(&request[..request.len().min(16)]);
        socket.write_all(&reply).await.unwrap();
        socket.shutdown().await.unwrap();
        request
    });
    let proxy = Proxy::start(port, &[]);
    let request = payload(1, 5 << 20);
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(&request).await.unwrap();
    client.shutdown().await.unwrap();
    let (reply, result) = read_to_end(&mut client).await;
    result.unwrap();
    assert!(
        serve.await.unwrap() == request,
        "the server got other bytes"
    );
    let mut expected = payload(request.len() as u64, reply_len);
    expected[..16].copy_from_slice(&request[..16]);
    assert!(reply == expected, "the client got another reply");

    let summary = proxy.stop();
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(number(&summary, "to_upstream_bytes"), request.len() as u64);
    assert_eq!(number(&summary, "to_client_bytes"), reply_len as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_reach_the_other_side() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let proxy = Proxy::start(port, &[]);

    // The server resets: the client must see a reset, not an end of stream.
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    let (mut upstream, _) = server.accept().await.unwrap();
    let mut hello = [0; 5];
    upstream.read_exact(&mut hello).await.unwrap();
    linger_zero(&upstream);
    drop(upstream);
    let (_, result) = read_to_end(&mut client).await;
    assert_eq!(
        result.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "the client saw a clean end of stream after the server's reset"
    );

    // The client resets: the server must see a reset, not an end of stream.
    let client = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut upstream, _) = server.accept().await.unwrap();
    let mut client = client;
    client.write_all(b"hello").await.unwrap();
    upstream.read_exact(&mut hello).await.unwrap();
    linger_zero(&client);
    drop(client);
    let (_, result) = read_to_end(&mut upstream).await;
    assert_eq!(
        result.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "the server saw a clean end of stream after the client's reset"
    );

    // No upstream at all: the client is reset. The reset can come so soon that the
    // client's own connect, still waiting to be told it succeeded, reports it.
    drop(server);
    let result = match TcpStream::connect(proxy.addr).await {
        Ok(mut client) => read_to_end(&mut client).await.1,
        Err(error) => Err(error),
    };
    assert_eq!(
        result.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset)
    );

    // Give the proxy a moment to see the last failure before it is stopped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let summary = proxy.stop();
    assert_eq!(number(&summary, "connections"), 3, "{summary}");
    assert_eq!(number(&summary, "failed"), 3, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_leave_nothing_behind() {
    const CONNECTIONS: u64 = 400;
    // An echo server.
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = server.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                tokio::io::copy(&mut reader, &mut writer).await?;
                writer.shutdown().await
            });
        }
    });
    let proxy = Proxy::start(port, &["--connections", &CONNECTIONS.to_string()]);
    let addr = proxy.addr;
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..CONNECTIONS {
        clients.spawn(async move {
            let data = payload(index, 1000 + index as usize * 97);
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (mut reader, mut writer) = client.split();
            let (echoed, ()) = tokio::join!(
                async {
                    let mut echoed = Vec::new();
                    reader.read_to_end(&mut echoed).await.unwrap();
                    echoed
                },
                async {
                    writer.write_all(&data).await.unwrap();
                    writer.shutdown().await.unwrap();
                }
            );
            assert!(echoed == data, "connection {index}: the echo differs");
            data.len() as u64
        });
        // A few dozen at a time, so connections also start while others end.
        if clients.len() >= 32 {
            clients.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(result) = clients.join_next().await {
        result.unwrap();
    }
    let sent: u64 = (0..CONNECTIONS).map(|i| 1000 + i * 97).sum();
    // The proxy stops by itself after the last connection (`--connections`).
    let summary = proxy.summary();
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(number(&summary, "connections"), CONNECTIONS);
    assert_eq!(number(&summary, "to_upstream_bytes"), sent);
    assert_eq!(number(&summary, "to_client_bytes"), sent);
}
