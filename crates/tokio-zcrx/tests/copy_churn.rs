//! Copy mode as a long-lived server sees it: about two thousand loopback connections through
//! a `ZcListener`, with random sizes, half-closes, resets, buffers held by other tasks and
//! streams dropped mid-flight. Every byte is checked, and open descriptors and outstanding
//! pool buffers must be back where they started.
//!
//! Alone in its test binary, so no other test opens descriptors while it counts them.

mod common;

use common::{pattern, Rng};

use std::collections::VecDeque;
use std::io::ErrorKind as IoErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_zcrx::{ActiveMode, Mode, ZcBuf, ZcListener, ZcStream, Zcrx};

const CONNECTIONS: u64 = 2000;
/// Clients connected at once: more than the pool has buffers, so streams wait for them.
const CONCURRENT: usize = 64;
const POOL_BUFFERS: u32 = 32;
const BUFFER_SIZE: usize = 16 << 10;
/// Each holder task keeps at most this many buffers (two holders: half the pool).
const HELD_PER_HOLDER: usize = 8;

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    /// The client half-closes after its payload; the server replies with the byte count.
    HalfClose,
    /// The client resets the connection (SO_LINGER 0) after `at` bytes.
    ClientReset { at: u64 },
    /// The server drops its stream and write half after `at` bytes.
    ServerDrop { at: u64 },
}

/// What connection `seed` does, derived from the seed on both sides.
#[derive(Debug, Clone, Copy)]
struct Plan {
    payload: u64,
    ending: Ending,
    /// Every `hold_every`-th buffer goes to a holder task (0: none).
    hold_every: u64,
    /// The server reads with a short deadline, abandoning pending `next()`s.
    impatient: bool,
}

impl Plan {
    fn of(seed: u64) -> Plan {
        let mut rng = Rng(seed);
        // Mostly small, some up to 256 KiB; a few empty.
        let payload = match rng.next() % 8 {
            0 => 0,
            1..=5 => rng.next() % (8 << 10),
            6 => rng.next() % (64 << 10),
            _ => rng.next() % (256 << 10),
        };
        let cut = if payload == 0 {
            0
        } else {
            rng.next() % payload
        };
        let ending = match rng.next() % 10 {
            0..=5 => Ending::HalfClose,
            6 | 7 => Ending::ClientReset { at: cut },
            _ => Ending::ServerDrop { at: cut },
        };
        Plan {
            payload,
            ending,
            hold_every: [0, 1, 3, 7][(rng.next() % 4) as usize],
            impatient: rng.next() % 4 == 0,
        }
    }
}

#[derive(Default)]
struct Tally {
    bytes_verified: AtomicU64,
    held: AtomicU64,
    resets_seen: AtomicU64,
    server_drops: AtomicU64,
    replies_checked: AtomicU64,
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A buffer handed to a holder: checked again there, then dropped there.
struct Held {
    buf: ZcBuf,
    seed: u64,
    position: u64,
}

impl Held {
    fn verify(&self) {
        for (i, &b) in self.buf.iter().enumerate() {
            let pos = self.position + i as u64;
            assert_eq!(
                b,
                pattern(self.seed, pos),
                "held buffer of {}: byte {pos}",
                self.seed
            );
        }
    }
}

/// Keeps up to `HELD_PER_HOLDER` buffers, returning the oldest when more come and all of them
/// a few milliseconds after the last arrival, so holding never blocks the pool for good.
async fn holder(mut incoming: mpsc::UnboundedReceiver<Held>) {
    let mut held: VecDeque<Held> = VecDeque::new();
    loop {
        let next = tokio::time::timeout(Duration::from_millis(3), incoming.recv()).await;
        match next {
            Ok(Some(buf)) => {
                held.push_back(buf);
                if held.len() > HELD_PER_HOLDER {
                    let oldest = held.pop_front().unwrap();
                    oldest.verify();
                }
            }
            Ok(None) => break,
            Err(_) => {
                for buf in held.drain(..) {
                    buf.verify();
                }
            }
        }
    }
    for buf in held {
        buf.verify();
    }
}

/// Serves one connection: reads the seed, then the payload as the plan says, checking each
/// byte.
async fn serve(
    mut stream: ZcStream,
    mut writer: tokio_zcrx::ZcWriteHalf,
    holders: [mpsc::UnboundedSender<Held>; 2],
    tally: Arc<Tally>,
) {
    let mut header = Vec::with_capacity(8);
    let mut plan: Option<(u64, Plan)> = None;
    let mut position = 0u64; // payload bytes seen
    let mut buffers = 0u64;
    loop {
        if let Some((
            _,
            Plan {
                ending: Ending::ServerDrop { at },
                ..
            },
        )) = plan
        {
            if position >= at {
                tally.server_drops.fetch_add(1, Ordering::Relaxed);
                return; // drops the stream and the write half mid-flight
            }
        }
        let next = match plan {
            Some((_, p)) if p.impatient => {
                match tokio::time::timeout(Duration::from_micros(200), stream.next()).await {
                    Ok(next) => next,
                    Err(_) => continue, // abandoned a pending next(); poll again
                }
            }
            _ => stream.next().await,
        };
        let buf = match next {
            None => break,
            Some(Ok(buf)) => buf,
            Some(Err(e)) => {
                // Only a reset may end a connection with an error (possibly before the
                // header, whose bytes the reset can discard).
                if let Some((seed, p)) = plan {
                    assert!(
                        matches!(p.ending, Ending::ClientReset { .. }),
                        "connection {seed} ({p:?}) failed: {e}"
                    );
                }
                assert_eq!(e.kind(), IoErrorKind::ConnectionReset, "{plan:?}: {e}");
                tally.resets_seen.fetch_add(1, Ordering::Relaxed);
                assert!(stream.next().await.is_none(), "a poll after the error");
                return;
            }
        };
        let mut data = &buf[..];
        if plan.is_none() {
            let need = (8 - header.len()).min(data.len());
            header.extend_from_slice(&data[..need]);
            data = &data[need..];
            if header.len() == 8 {
                let seed = u64::from_le_bytes(header[..].try_into().unwrap());
                plan = Some((seed, Plan::of(seed)));
            }
        }
        let Some((seed, p)) = plan else { continue };
        for (i, &b) in data.iter().enumerate() {
            let pos = position + i as u64;
            assert_eq!(b, pattern(seed, pos), "connection {seed}: byte {pos}");
        }
        tally
            .bytes_verified
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let start = position;
        position += data.len() as u64;
        assert!(position <= p.payload, "connection {seed}: more than sent");
        buffers += 1;
        // Whole-payload buffers (not carrying header bytes) may go to a holder task, which
        // checks them again later and drops them on its own thread.
        if p.hold_every != 0 && buffers % p.hold_every == 0 && data.len() == buf.len() {
            tally.held.fetch_add(1, Ordering::Relaxed);
            let held = Held {
                buf,
                seed,
                position: start,
            };
            let _ = holders[(seed % 2) as usize].send(held);
        }
    }
    // EOF: a half-close (or a reset that arrived as EOF after all data).
    let Some((seed, p)) = plan else {
        assert!(header.is_empty(), "EOF inside the header");
        return; // a client that reset before sending its header
    };
    match p.ending {
        Ending::HalfClose => {
            assert_eq!(position, p.payload, "connection {seed}: bytes lost");
            // The reply may fail if the client is gone; it is not: it waits for this.
            writer.write_all(&position.to_le_bytes()).await.unwrap();
            writer.shutdown().await.unwrap();
        }
        Ending::ClientReset { at } => assert!(position <= at, "{seed}: past the reset"),
        Ending::ServerDrop { .. } => {
            assert_eq!(position, p.payload, "{seed}: EOF before the drop point")
        }
    }
}

/// One client: connects, sends its seed and payload, ends as planned.
async fn client(addr: std::net::SocketAddr, seed: u64, tally: Arc<Tally>) {
    let plan = Plan::of(seed);
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.write_all(&seed.to_le_bytes()).await.unwrap();
    let stop_at = match plan.ending {
        Ending::ClientReset { at } => at,
        _ => plan.payload,
    };
    let mut rng = Rng(seed ^ 0x5555);
    let mut sent = 0u64;
    let mut chunk = Vec::new();
    while sent < stop_at {
        let n = (rng.next() % 20_000 + 1).min(stop_at - sent);
        chunk.clear();
        chunk.extend((sent..sent + n).map(|p| pattern(seed, p)));
        if let Err(e) = socket.write_all(&chunk).await {
            // Only a server that drops the connection may make a write fail.
            assert!(
                matches!(plan.ending, Ending::ServerDrop { .. }),
                "{seed}: write failed: {e}"
            );
            return;
        }
        sent += n;
    }
    match plan.ending {
        Ending::HalfClose => {
            socket.shutdown().await.unwrap();
            let mut reply = Vec::new();
            socket.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, plan.payload.to_le_bytes(), "{seed}: server's count");
            tally.replies_checked.fetch_add(1, Ordering::Relaxed);
        }
        Ending::ClientReset { .. } => {
            // SO_LINGER 0 makes the close a reset (tokio deprecates the setter only because
            // a non-zero linger blocks).
            #[allow(deprecated)]
            socket.set_linger(Some(Duration::ZERO)).unwrap();
            drop(socket);
        }
        Ending::ServerDrop { .. } => {
            // Wait for the server to close (EOF or a reset, no reply).
            let _ = socket.shutdown().await;
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
            assert!(rest.is_empty(), "{seed}: a reply after a server drop");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_leave_no_descriptor_or_buffer_behind() {
    let started = Instant::now();
    let zcrx = Zcrx::builder()
        .mode(Mode::Copy)
        .copy_pool(POOL_BUFFERS, BUFFER_SIZE)
        .build()
        .unwrap();
    assert_eq!(zcrx.mode(), ActiveMode::Copy);
    let fds_before = open_fds();
    let tally = Arc::new(Tally::default());

    let listener = ZcListener::bind(&zcrx, "127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hold_a, rx_a) = mpsc::unbounded_channel();
    let (hold_b, rx_b) = mpsc::unbounded_channel();
    let holders = [tokio::spawn(holder(rx_a)), tokio::spawn(holder(rx_b))];
    let server = {
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            let mut handlers = tokio::task::JoinSet::new();
            for _ in 0..CONNECTIONS {
                let (stream, writer, _peer) = listener.accept().await.unwrap();
                let senders = [hold_a.clone(), hold_b.clone()];
                handlers.spawn(serve(stream, writer, senders, Arc::clone(&tally)));
            }
            drop(listener);
            while let Some(done) = handlers.join_next().await {
                done.expect("a connection handler failed");
            }
        })
    };

    let slots = Arc::new(Semaphore::new(CONCURRENT));
    let mut clients = tokio::task::JoinSet::new();
    for seed in 0..CONNECTIONS {
        let permit = Arc::clone(&slots).acquire_owned().await.unwrap();
        let tally = Arc::clone(&tally);
        clients.spawn(async move {
            client(addr, seed * 7919 + 1, tally).await;
            drop(permit);
        });
    }
    let clients_done = async {
        while let Some(done) = clients.join_next().await {
            done.expect("a client failed");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), clients_done)
        .await
        .expect("clients did not finish within 60 s");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server's handlers did not finish within 10 s")
        .unwrap();
    for holder in holders {
        tokio::time::timeout(Duration::from_secs(5), holder)
            .await
            .expect("a holder did not finish")
            .unwrap();
    }

    let expected: u64 = (0..CONNECTIONS)
        .map(|s| Plan::of(s * 7919 + 1))
        .filter(|p| p.ending == Ending::HalfClose)
        .map(|p| p.payload)
        .sum();
    let verified = tally.bytes_verified.load(Ordering::Relaxed);
    assert!(
        verified >= expected,
        "{verified} bytes checked, {expected} expected at least"
    );
    let half_closes = (0..CONNECTIONS)
        .filter(|&s| Plan::of(s * 7919 + 1).ending == Ending::HalfClose)
        .count() as u64;
    assert_eq!(tally.replies_checked.load(Ordering::Relaxed), half_closes);
    assert!(
        tally.held.load(Ordering::Relaxed) > 100,
        "few buffers held across tasks"
    );
    assert!(
        tally.resets_seen.load(Ordering::Relaxed) > 50,
        "few resets seen"
    );
    assert!(
        tally.server_drops.load(Ordering::Relaxed) > 50,
        "few server drops"
    );

    assert_eq!(zcrx.stats().buffers_outstanding, 0, "pool buffers leaked");
    // Descriptors close when their owners drop; give the runtime a moment for any that a
    // worker thread is still dropping.
    let deadline = Instant::now() + Duration::from_secs(2);
    while open_fds() != fds_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(open_fds(), fds_before, "open descriptors before and after");
    println!(
        "{CONNECTIONS} connections in {:?}: {verified} bytes checked, {} buffers held across \
         tasks, {} resets, {} server drops, {} replies; {} chunks copied",
        started.elapsed(),
        tally.held.load(Ordering::Relaxed),
        tally.resets_seen.load(Ordering::Relaxed),
        tally.server_drops.load(Ordering::Relaxed),
        tally.replies_checked.load(Ordering::Relaxed),
        zcrx.stats().chunks,
    );
}
