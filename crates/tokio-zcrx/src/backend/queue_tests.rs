//! Host tests of several queues ([`super::queues`]): synthetic drivers, one per queue, each a
//! synthetic kernel of its own, and a synthetic device whose sockets carry NAPI ids.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::queues::{GroupSpec, Incoming, NapiSource, QueueGroup};
use super::uring::synthetic::pattern;
use super::uring::synthetic::personality::{Personality, Registration};
use super::uring::synthetic::ring::{Control, StreamPlan};
use super::uring::synthetic::{start_driver, SyntheticConfig};
use super::Backend;
use crate::config::{CopyConfig, DriverCpus};
use crate::error::{Error, ErrorKind};
use crate::event::EventKind;
use crate::mode::{ActiveMode, ModeSelection};
use crate::sys::lock;
use crate::Zcrx;

/// The NAPI id of synthetic queue `queue`.
fn napi(queue: u32) -> u32 {
    0x2000 + queue
}

/// A synthetic device: its queues' NAPI ids, and the NAPI id each connection (by the
/// client's port) arrives with; a connection marked `after_data` has none until its first
/// byte is readable, as a socket whose handshake's last ACK did not record one.
#[derive(Debug, Default)]
struct SyntheticNapi {
    queues: Mutex<Vec<(u32, Option<u32>)>>,
    sockets: Mutex<HashMap<u16, (u32, bool)>>,
    /// How often the runtime read the queues' ids.
    reads: AtomicU64,
}

#[derive(Debug)]
struct SharedNapi(Arc<SyntheticNapi>);

impl NapiSource for SharedNapi {
    fn queues(&self) -> io::Result<Vec<(u32, Option<u32>)>> {
        self.0.reads.fetch_add(1, Ordering::Relaxed);
        Ok(lock(&self.0.queues).clone())
    }

    fn incoming(
        &self,
        socket: std::os::fd::BorrowedFd<'_>,
        _local: Option<std::net::SocketAddr>,
        peer: Option<std::net::SocketAddr>,
    ) -> Incoming {
        let port = peer.unwrap().port();
        match lock(&self.0.sockets).get(&port) {
            None => Incoming::Never,
            Some(&(id, true)) if !readable(socket.as_raw_fd()) => {
                let _ = id;
                Incoming::NotYet
            }
            Some(&(id, _)) => Incoming::Napi(id),
        }
    }
}

fn readable(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd; a zero timeout does not block.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready == 1 && poll.revents & libc::POLLIN != 0
}

struct Group {
    zcrx: Zcrx,
    group: Arc<QueueGroup>,
    /// Each bound queue's synthetic kernel.
    controls: HashMap<u32, Arc<Control>>,
    napi: Arc<SyntheticNapi>,
    listener: tokio::net::TcpListener,
}

const CHUNKS: u64 = 64;

struct Setup {
    queues: u32,
    bind: Vec<u32>,
    fail: Vec<u32>,
    required: bool,
    napi_wait: Duration,
}

impl Setup {
    fn new(queues: u32, bind: &[u32]) -> Setup {
        Setup {
            queues,
            bind: bind.to_vec(),
            fail: Vec::new(),
            required: true,
            napi_wait: Duration::from_millis(200),
        }
    }
}

async fn start_group(setup: Setup) -> Result<Group, Error> {
    let device = Arc::new(SyntheticNapi::default());
    *lock(&device.queues) = (0..setup.queues).map(|q| (q, Some(napi(q)))).collect();
    let spec = GroupSpec {
        interface: "synthetic0".into(),
        queues: setup.bind.clone(),
        required: setup.required,
        napi_wait: setup.napi_wait,
        driver_cpus: DriverCpus::Anywhere,
        copy: CopyConfig {
            buffers: 16,
            buffer_size: 64 << 10,
            memory_limit: None,
            event_interval: Duration::from_millis(100),
            stream_budget: None,
        },
    };
    let mut controls = HashMap::new();
    let fail = setup.fail.clone();
    let mut start_queue = |queue: u32, cpus: Option<Vec<usize>>, events| {
        assert!(cpus.is_none(), "DriverCpus::Anywhere places nothing");
        if fail.contains(&queue) {
            return Err(Error::new(
                ErrorKind::QueueBusy,
                format!("cannot register synthetic0 rx queue {queue}: EEXIST"),
            ));
        }
        let (handle, control, _) = start_driver(SyntheticConfig {
            chunks_per_stream: CHUNKS,
            queue: Some(queue),
            events_channel: Some(events),
            hand_over_moved: true,
            thread_name: format!("tzx-syn-q{queue}"),
            ..SyntheticConfig::new(Personality::Linux7_3, Registration::Nic)
        })?;
        controls.insert(queue, control);
        Ok(handle)
    };
    let group = QueueGroup::start(
        spec,
        Box::new(SharedNapi(Arc::clone(&device))),
        &mut start_queue,
    )?;
    let group = Arc::new(group);
    let selection = ModeSelection {
        queues_bound: group.bound(),
        queues_refused: group.refused().to_vec(),
        ..ModeSelection::new(ActiveMode::Nic, Vec::new())
    };
    let zcrx = Zcrx::from_parts(Backend::Queues(Arc::clone(&group)), selection);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Ok(Group {
        zcrx,
        group,
        controls,
        napi: device,
        listener,
    })
}

impl Group {
    /// A loopback connection that the synthetic device says arrives on `queue` (`None`: on
    /// no NAPI instance); `after_data`: only once its first byte is readable. The server's
    /// socket (not attached yet), its fd, and the client.
    async fn connect(&self, queue: Option<u32>, after_data: bool) -> (TcpStream, RawFd, TcpStream) {
        let client = TcpStream::connect(self.listener.local_addr().unwrap())
            .await
            .unwrap();
        if let Some(queue) = queue {
            lock(&self.napi.sockets).insert(
                client.local_addr().unwrap().port(),
                (napi(queue), after_data),
            );
        }
        let (server, _) = self.listener.accept().await.unwrap();
        let fd = server.as_raw_fd();
        (server, fd, client)
    }

    fn queue_bytes(&self) -> HashMap<u32, u64> {
        self.zcrx
            .queue_stats()
            .iter()
            .map(|q| (q.queue, q.stats.bytes))
            .collect()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Reads a synthetic stream to its end, checking every byte against the pattern seeded
/// with its server fd; buffers are dropped on other tasks. Returns the bytes.
async fn read_synthetic(mut stream: crate::ZcStream, seed: RawFd) -> io::Result<u64> {
    let mut position = 0u64;
    let mut drops = Vec::new();
    while let Some(buf) = stream.next().await {
        let buf = buf?;
        pattern::verify(seed as u64, position, &buf)
            .unwrap_or_else(|at| panic!("stream {seed}: wrong byte at {at}"));
        position += buf.len() as u64;
        drops.push(tokio::spawn(async move { drop(buf) }));
    }
    for drop in drops {
        drop.await.unwrap();
    }
    Ok(position)
}

/// Reads a copy-mode stream to its end, checking `pattern` bytes of stream `seed`.
async fn read_copied(mut stream: crate::ZcStream, seed: u64) -> u64 {
    let mut position = 0u64;
    while let Some(buf) = stream.next().await {
        let buf = buf.unwrap();
        pattern::verify(seed, position, &buf).unwrap_or_else(|at| panic!("wrong byte at {at}"));
        position += buf.len() as u64;
    }
    position
}

/// Writes `bytes` of pattern `seed` and closes the sending side.
async fn send_pattern(mut client: TcpStream, seed: u64, bytes: u64) -> TcpStream {
    let mut data = vec![0u8; bytes as usize];
    pattern::fill(seed, 0, &mut data);
    client.write_all(&data).await.unwrap();
    client.shutdown().await.unwrap();
    client
}

/// Every connection goes to the driver of the queue its NAPI id names: each queue's
/// statistics and synthetic kernel see exactly its connections' chunks, every byte arrives
/// in order, and nothing is unmatched.
#[test]
fn connections_go_to_their_queues_driver() {
    runtime().block_on(async {
        let group = start_group(Setup::new(4, &[0, 1, 2, 3])).await.unwrap();
        // Queue q gets q + 1 connections, so a misrouted one changes the counts.
        let mut readers = Vec::new();
        let mut clients = Vec::new();
        for queue in 0..4u32 {
            for _ in 0..=queue {
                let (server, fd, client) = group.connect(Some(queue), false).await;
                let (stream, _writer) = group.zcrx.attach(server).unwrap();
                assert!(
                    !stream.is_copy_mode(),
                    "queue {queue}'s connection was copied"
                );
                clients.push(client);
                readers.push((queue, tokio::spawn(read_synthetic(stream, fd))));
            }
        }
        for (queue, reader) in readers {
            assert_eq!(
                reader.await.unwrap().unwrap(),
                CHUNKS * 4096,
                "queue {queue}"
            );
        }
        let bytes = group.queue_bytes();
        for queue in 0..4u32 {
            assert_eq!(
                bytes[&queue],
                u64::from(queue + 1) * CHUNKS * 4096,
                "queue {queue}"
            );
            // A budgeted request that ends inside a chunk leaves the rest of it to the next
            // one: a buffer more, never fewer.
            let report = group.controls[&queue].report();
            let chunks = u64::from(queue + 1) * CHUNKS;
            assert!(
                (chunks..chunks + chunks / 8 + 4).contains(&report.data_cqes),
                "queue {queue}: {} data CQEs",
                report.data_cqes
            );
            assert_eq!(report.copy_bytes, 0);
        }
        let napi_ids: Vec<_> = group.zcrx.queue_stats().iter().map(|q| q.napi_id).collect();
        assert_eq!(napi_ids, (0..4).map(|q| Some(napi(q))).collect::<Vec<_>>());
        // A connection the kernel copies on queue 2 (headers, say): the driver's copy event
        // names its queue.
        let mut events = group.zcrx.subscribe();
        let (server, fd, client) = group.connect(Some(2), false).await;
        group.controls[&2].plan(
            fd,
            StreamPlan {
                path: super::uring::synthetic::ring::Path::Copy,
                ..StreamPlan::new(fd as u64, 8 * 4096)
            },
        );
        let (stream, _writer) = group.zcrx.attach(server).unwrap();
        assert_eq!(read_synthetic(stream, fd).await.unwrap(), 8 * 4096);
        let event = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let event = events.recv().await.unwrap();
                if event.kind == EventKind::CopyFallback {
                    break event;
                }
            }
        })
        .await
        .expect("a copy event");
        assert_eq!(event.queue, Some(2));
        // A snapshot of queue 2's own statistics as the event went out.
        let copied = event.stats.copy_bytes;
        assert!(copied.is_some_and(|b| b > 0 && b <= 8 * 4096), "{event:?}");
        for queue in group.zcrx.queue_stats() {
            let copied = if queue.queue == 2 { 8 * 4096 } else { 0 };
            assert_eq!(
                queue.stats.copy_bytes,
                Some(copied),
                "queue {}",
                queue.queue
            );
        }
        drop(client);
        let total = group.zcrx.stats();
        assert_eq!(total.unmatched_connections, 0);
        assert_eq!(total.bytes, 10 * CHUNKS * 4096 + 8 * 4096);
        assert_eq!(total.buffers_outstanding, 0);
        group.zcrx.shutdown().await;
    });
}

/// A connection on a queue that is not bound, or with an id no queue has, or without one
/// (loopback) is received in copy mode: every byte arrives, it is counted and reported
/// (with its queue where known), and the bound queues see none of it.
#[test]
fn unmatched_connections_are_copied_counted_and_reported() {
    runtime().block_on(async {
        let group = start_group(Setup::new(4, &[0, 1])).await.unwrap();
        let mut events = group.zcrx.subscribe();
        let cases: [(Option<u32>, Option<u32>); 3] = [
            // Unbound queue 3: reported with its queue.
            (Some(3), Some(3)),
            // No NAPI instance (loopback): no queue.
            (None, None),
            // Queue 2, unbound too.
            (Some(2), Some(2)),
        ];
        for (i, (queue, reported)) in cases.into_iter().enumerate() {
            let (server, _fd, client) = group.connect(queue, false).await;
            let (stream, _writer) = group.zcrx.attach(server).unwrap();
            assert!(stream.is_copy_mode());
            let seed = 100 + i as u64;
            let sender = tokio::spawn(send_pattern(client, seed, 1 << 20));
            assert_eq!(read_copied(stream, seed).await, 1 << 20);
            drop(sender.await.unwrap());
            let event = loop {
                let event = events.recv().await.unwrap();
                if event.kind == EventKind::UnmatchedConnection {
                    break event;
                }
            };
            assert_eq!(event.queue, reported);
            assert_eq!(event.stats.unmatched_connections, i as u64 + 1);
        }
        // A NAPI id that belongs to no queue: the runtime looks again (once), then copies.
        let reads = group.napi.reads.load(Ordering::Relaxed);
        let (server, _fd, client) = group.connect(None, false).await;
        lock(&group.napi.sockets).insert(client.local_addr().unwrap().port(), (0x9999, false));
        // The first look at start was less than the refresh interval ago: no second look yet.
        let (stream, _writer) = group.zcrx.attach(server).unwrap();
        assert!(stream.is_copy_mode());
        assert_eq!(group.napi.reads.load(Ordering::Relaxed), reads);
        drop((stream, client));
        let total = group.zcrx.stats();
        assert_eq!(total.unmatched_connections, 4);
        assert_eq!(total.bytes, 3 << 20);
        assert_eq!(group.queue_bytes(), HashMap::from([(0, 0), (1, 0)]));
        assert_eq!(
            group
                .zcrx
                .queue_stats()
                .iter()
                .map(|q| q.stats.bytes)
                .sum::<u64>(),
            0
        );
        group.zcrx.shutdown().await;
    });
}

/// An id the runtime does not know makes it read the device's ids again (at most once a
/// second): a queue whose NAPI id changed (a reconfigured device) is found again.
#[test]
fn an_unknown_napi_id_refreshes_the_map() {
    runtime().block_on(async {
        let group = start_group(Setup::new(2, &[0, 1])).await.unwrap();
        // Let the refresh interval pass, then give queue 1 a new NAPI id.
        std::thread::sleep(Duration::from_millis(1100));
        lock(&group.napi.queues)[1].1 = Some(0x3001);
        let (server, fd, client) = group.connect(None, false).await;
        lock(&group.napi.sockets).insert(client.local_addr().unwrap().port(), (0x3001, false));
        let (stream, _writer) = group.zcrx.attach(server).unwrap();
        assert!(!stream.is_copy_mode(), "the new id was not looked up");
        assert_eq!(read_synthetic(stream, fd).await.unwrap(), CHUNKS * 4096);
        assert_eq!(group.queue_bytes()[&1], CHUNKS * 4096);
        assert_eq!(group.zcrx.queue_stats()[1].napi_id, Some(0x3001));
        drop(client);
        group.zcrx.shutdown().await;
    });
}

/// A socket without a NAPI id yet waits for its first packet (`attach_async`, the
/// listener's way) and then goes to its queue; one that stays silent past the NAPI wait is
/// copied, and the synchronous `attach` copies at once.
#[test]
fn a_socket_without_a_napi_id_waits_for_its_first_packet() {
    runtime().block_on(async {
        let group = start_group(Setup {
            napi_wait: Duration::from_millis(300),
            ..Setup::new(2, &[0, 1])
        })
        .await
        .unwrap();
        // Data after 50 ms: placed on queue 1.
        let (server, fd, mut client) = group.connect(Some(1), true).await;
        let writer = tokio::spawn(async move {
            std::thread::sleep(Duration::from_millis(50));
            client.write_all(b"hello").await.unwrap();
            client
        });
        let started = std::time::Instant::now();
        let (stream, _writer) = group.zcrx.attach_async(server).await.unwrap();
        let waited = started.elapsed();
        assert!(
            !stream.is_copy_mode(),
            "not placed after its first packet ({waited:?})"
        );
        assert!(waited < Duration::from_millis(290), "waited {waited:?}");
        assert_eq!(read_synthetic(stream, fd).await.unwrap(), CHUNKS * 4096);
        assert_eq!(group.queue_bytes()[&1], CHUNKS * 4096);
        let client = writer.await.unwrap();
        // Silent: copied after the wait, with its bytes received in copy mode.
        let (server, _fd, silent) = group.connect(Some(0), true).await;
        let started = std::time::Instant::now();
        let (stream, _writer) = group.zcrx.attach_async(server).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(stream.is_copy_mode());
        let sender = tokio::spawn(send_pattern(silent, 7, 100_000));
        assert_eq!(read_copied(stream, 7).await, 100_000);
        drop(sender.await.unwrap());
        // The synchronous attach cannot wait.
        let (server, _fd, _quiet) = group.connect(Some(0), true).await;
        let started = std::time::Instant::now();
        let (stream, _writer) = group.zcrx.attach(server).unwrap();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(stream.is_copy_mode());
        assert_eq!(group.zcrx.stats().unmatched_connections, 2);
        assert_eq!(group.queue_bytes()[&0], 0);
        drop(client);
        group.zcrx.shutdown().await;
    });
}

/// A queue that cannot be bound fails the build in nic mode, naming the queue and the
/// reason; in auto mode the others are bound, the refusal is listed in the mode selection
/// and the description, and its connections are copied.
#[test]
fn a_queue_that_cannot_be_bound_in_nic_and_auto_modes() {
    runtime().block_on(async {
        let error = start_group(Setup {
            fail: vec![1],
            ..Setup::new(4, &[0, 1, 2, 3])
        })
        .await
        .err()
        .expect("nic mode needs every queue");
        assert_eq!(error.kind(), ErrorKind::QueueBusy);
        let text = error.to_string();
        assert!(
            text.contains("cannot bind rx queue 1 of synthetic0"),
            "{text}"
        );
        assert!(
            text.contains("1 of the 4 queues asked for were bound"),
            "{text}"
        );
        assert!(text.contains("EEXIST"), "{text}");

        let group = start_group(Setup {
            fail: vec![1],
            required: false,
            ..Setup::new(4, &[0, 1, 2, 3])
        })
        .await
        .unwrap();
        let selection = group.zcrx.mode_selection();
        assert_eq!(selection.queues_bound, vec![0, 2, 3]);
        assert_eq!(selection.queues_refused.len(), 1);
        assert_eq!(selection.queues_refused[0].0, 1);
        let shown = selection.to_string();
        assert!(shown.contains("queues 0, 2, 3 bound"), "{shown}");
        assert!(
            shown.contains("queue 1 refused: cannot register synthetic0 rx queue 1"),
            "{shown}"
        );
        let description = group.zcrx.description();
        assert!(description.contains("rx queues 0, 2, 3"), "{description}");
        assert!(description.contains("queue 1 not bound"), "{description}");
        let (server, _fd, client) = group.connect(Some(1), false).await;
        let (stream, _writer) = group.zcrx.attach(server).unwrap();
        assert!(stream.is_copy_mode());
        drop((stream, client));
        assert_eq!(group.zcrx.stats().unmatched_connections, 1);
        group.zcrx.shutdown().await;

        // No queue at all: the group is refused (auto then tries the next mode).
        let error = start_group(Setup {
            fail: vec![0, 1],
            required: false,
            ..Setup::new(2, &[0, 1])
        })
        .await
        .err()
        .unwrap();
        assert!(
            error
                .to_string()
                .contains("no rx queue of synthetic0 could be bound"),
            "{error}"
        );
    });
}

/// Many connections over four queues and the copy path at once: some end with a reset,
/// some are half-closed by the server's write half while their data still arrives, buffers
/// are dropped on other tasks; every byte arrives, the per-queue statistics add up to the
/// total, and nothing stays outstanding.
#[test]
fn many_connections_with_resets_and_half_closes_add_up() {
    runtime().block_on(async {
        let group = start_group(Setup::new(4, &[0, 1, 2])).await.unwrap();
        let mut readers = Vec::new();
        let mut keep = Vec::new();
        let mut expected = HashMap::<u32, u64>::new();
        let mut copied_expected = 0u64;
        for i in 0..48u32 {
            let queue = i % 4;
            let (server, fd, client) = group.connect(Some(queue), false).await;
            if queue == 3 {
                // Unbound: copy mode, real bytes from the client.
                let (stream, writer) = group.zcrx.attach(server).unwrap();
                assert!(stream.is_copy_mode());
                let seed = 1000 + u64::from(i);
                let bytes = 50_000 + u64::from(i) * 1000;
                copied_expected += bytes;
                keep.push(tokio::spawn(send_pattern(client, seed, bytes)));
                readers.push(tokio::spawn(async move {
                    drop(writer);
                    Ok::<_, io::Error>((3, read_copied(stream, seed).await))
                }));
                continue;
            }
            let reset = i % 5 == 0;
            let bytes = (8 + u64::from(i % 7)) * 4096;
            if reset {
                group.controls[&queue].plan(
                    fd,
                    StreamPlan {
                        end: -libc::ECONNRESET,
                        ..StreamPlan::new(fd as u64, bytes)
                    },
                );
            } else {
                group.controls[&queue].plan(fd, StreamPlan::new(fd as u64, bytes));
            }
            *expected.entry(queue).or_default() += bytes;
            let (stream, mut writer) = group.zcrx.attach(server).unwrap();
            assert!(!stream.is_copy_mode());
            let half_close = i % 3 == 0;
            keep.push(tokio::spawn(async move { client }));
            readers.push(tokio::spawn(async move {
                if half_close {
                    writer.shutdown().await.unwrap();
                }
                let mut position = 0u64;
                let mut stream = stream;
                let mut ended = None;
                while let Some(buf) = stream.next().await {
                    match buf {
                        Ok(buf) => {
                            pattern::verify(fd as u64, position, &buf).unwrap();
                            position += buf.len() as u64;
                            tokio::spawn(async move { drop(buf) });
                        }
                        Err(e) => ended = e.raw_os_error(),
                    }
                }
                assert_eq!(position, bytes);
                assert_eq!(ended, reset.then_some(libc::ECONNRESET));
                drop(writer);
                Ok((queue, position))
            }));
        }
        let mut received = HashMap::<u32, u64>::new();
        for reader in readers {
            let (queue, bytes) = reader.await.unwrap().unwrap();
            *received.entry(queue).or_default() += bytes;
        }
        for client in keep {
            drop(client.await.unwrap());
        }
        assert_eq!(received[&3], copied_expected);
        // Buffers dropped on other tasks come back.
        for _ in 0..200 {
            if group.zcrx.stats().buffers_outstanding == 0 {
                break;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(5));
        }
        let per_queue = group.zcrx.queue_stats();
        let total = group.zcrx.stats();
        let unmatched = group.group.unmatched_stats();
        for queue in &per_queue {
            assert_eq!(
                queue.stats.bytes, expected[&queue.queue],
                "queue {}",
                queue.queue
            );
            assert_eq!(queue.stats.buffers_outstanding, 0);
        }
        assert_eq!(unmatched.bytes, copied_expected);
        assert_eq!(total.unmatched_connections, 12);
        assert_eq!(
            total.bytes,
            per_queue.iter().map(|q| q.stats.bytes).sum::<u64>() + unmatched.bytes
        );
        assert_eq!(
            total.chunks,
            per_queue.iter().map(|q| q.stats.chunks).sum::<u64>() + unmatched.chunks
        );
        assert_eq!(total.buffers_outstanding, 0);
        group.zcrx.shutdown().await;
        assert!(group.zcrx.check_running().is_err());
    });
}

/// Shutdown stops every queue's driver and the copy path; subscribers see the channel
/// close, and attach fails with RuntimeGone.
#[test]
fn shutdown_stops_every_queue() {
    runtime().block_on(async {
        let group = start_group(Setup::new(3, &[0, 1, 2])).await.unwrap();
        let mut events = group.zcrx.subscribe();
        group.zcrx.shutdown().await;
        for control in group.controls.values() {
            assert!(control.report().torn_down, "a queue's ring is still open");
        }
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match events.recv().await {
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    _ => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the event channel stayed open");
        let (server, _fd, _client) = group.connect(Some(0), false).await;
        let error = group.zcrx.attach(server).err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        assert!(error.to_string().contains("shut down"), "{error}");
    });
}

/// Plans that a connection on `fd` gets `bytes` more of its stream on `queue`'s ring from
/// `start`, then `end` (`-EFAULT`: the ring meets buffers of another queue).
fn plan_part(group: &Group, queue: u32, fd: RawFd, start: u64, bytes: u64, end: i32) {
    group.controls[&queue].plan(
        fd,
        StreamPlan {
            start,
            end,
            ..StreamPlan::new(fd as u64, start + bytes)
        },
    );
}

/// A flow that moves to another queue mid-connection: its ring answers `EFAULT` (the
/// socket holds the other queue's buffers); the stream is handed to the driver of the queue
/// its last packet came through, which goes on from the same byte. With the NAPI id not
/// telling (still the old queue), the other queues' drivers are tried in turn. The reader
/// sees one unbroken stream; each queue counts its part; `streams_moved` counts the moves.
#[test]
fn a_stream_whose_flow_moves_is_handed_to_the_new_queues_driver() {
    runtime().block_on(async {
        let group = start_group(Setup::new(4, &[0, 1, 2, 3])).await.unwrap();
        const PART: u64 = 16 * 4096;
        // Moved from queue 0 to queue 2, and the NAPI id says so.
        let (server, fd, client) = group.connect(Some(0), false).await;
        plan_part(&group, 0, fd, 0, PART, -libc::EFAULT);
        plan_part(&group, 2, fd, PART, 2 * PART, 0);
        let (stream, _writer) = group.zcrx.attach(server).unwrap();
        lock(&group.napi.sockets).insert(client.local_addr().unwrap().port(), (napi(2), false));
        assert_eq!(read_synthetic(stream, fd).await.unwrap(), 3 * PART);
        assert_eq!(group.zcrx.stats().streams_moved, 1);
        assert_eq!(group.queue_bytes()[&0], PART);
        assert_eq!(group.queue_bytes()[&2], 2 * PART);
        drop(client);

        // Moved from queue 1, but the id still names queue 1: queue 2 refuses too, queue 3
        // takes it.
        let (server, fd, client) = group.connect(Some(1), false).await;
        plan_part(&group, 1, fd, 0, PART, -libc::EFAULT);
        plan_part(&group, 2, fd, PART, 0, -libc::EFAULT);
        plan_part(&group, 3, fd, PART, PART, 0);
        let (stream, _writer) = group.zcrx.attach(server).unwrap();
        assert_eq!(read_synthetic(stream, fd).await.unwrap(), 2 * PART);
        assert_eq!(group.zcrx.stats().streams_moved, 3);
        assert_eq!(group.queue_bytes()[&3], PART);
        drop(client);

        // Every ring refuses: the stream ends with EFAULT after the data it had.
        let (server, fd, client) = group.connect(Some(3), false).await;
        plan_part(&group, 3, fd, 0, PART, -libc::EFAULT);
        for queue in [0, 1, 2] {
            plan_part(&group, queue, fd, PART, 0, -libc::EFAULT);
        }
        let (mut stream, _writer) = group.zcrx.attach(server).unwrap();
        let mut position = 0u64;
        let error = loop {
            match stream.next().await.expect("an error before the end") {
                Ok(buf) => {
                    pattern::verify(fd as u64, position, &buf).unwrap();
                    position += buf.len() as u64;
                }
                Err(error) => break error,
            }
        };
        assert_eq!(position, PART);
        assert_eq!(error.raw_os_error(), Some(libc::EFAULT));
        assert!(stream.next().await.is_none());
        assert_eq!(group.zcrx.stats().streams_moved, 6);
        drop((stream, client));
        assert_eq!(group.zcrx.stats().buffers_outstanding, 0);
        group.zcrx.shutdown().await;
    });
}

/// The per-chunk benchmark's runtime of several queues (`__bench::start_queues`) deals the
/// attached streams over every queue in turn: each queue's driver carries its share of the
/// bytes, no stream is copied or unmatched, and queue N's thread is `tzx-bench-qN`.
#[test]
fn bench_queues_deal_streams_over_every_queue() {
    runtime().block_on(async {
        let (zcrx, kernels) = super::uring::synthetic::start_queues(3, 64, 32, None).unwrap();
        assert_eq!(zcrx.mode_selection().queues_bound, vec![0, 1, 2]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut clients = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..7 {
            clients.push(
                TcpStream::connect(listener.local_addr().unwrap())
                    .await
                    .unwrap(),
            );
            let (server, _) = listener.accept().await.unwrap();
            let (mut stream, _writer) = zcrx.attach(server).unwrap();
            assert!(!stream.is_copy_mode());
            readers.push(tokio::spawn(async move {
                let mut bytes = 0u64;
                while let Some(buf) = stream.next().await {
                    bytes += buf.unwrap().len() as u64;
                }
                bytes
            }));
        }
        for reader in readers {
            assert_eq!(reader.await.unwrap(), 32 * 4096);
        }
        let bytes: Vec<(u32, u64)> = zcrx
            .queue_stats()
            .iter()
            .map(|q| (q.queue, q.stats.bytes))
            .collect();
        // Streams 0, 3, 6 on queue 0; 1, 4 on queue 1; 2, 5 on queue 2.
        let per_queue = |streams: u64| streams * 32 * 4096;
        assert_eq!(
            bytes,
            vec![(0, per_queue(3)), (1, per_queue(2)), (2, per_queue(2))]
        );
        // Each queue's own kernel delivered them (at least a CQE per chunk).
        let cqes: Vec<u64> = kernels.iter().map(|k| k.report().data_cqes).collect();
        for (queue, (cqes, streams)) in cqes.iter().zip([3, 2, 2]).enumerate() {
            assert!(*cqes >= streams * 32, "queue {queue}: {cqes} data CQEs");
            assert_eq!(kernels[queue].report().copy_bytes, 0);
        }
        let stats = zcrx.stats();
        assert_eq!(stats.unmatched_connections, 0);
        assert_eq!(stats.copy_bytes.unwrap_or(0), 0);
        let threads: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
            .map(|name| name.trim().to_string())
            .collect();
        for queue in 0..3 {
            let name = format!("tzx-bench-q{queue}");
            assert!(threads.contains(&name), "no {name} among {threads:?}");
        }
        zcrx.shutdown().await;
    });
}
