//! The `netdev` generic netlink family (Documentation/netlink/specs/netdev.yaml): which NAPI
//! instance serves each receive queue of an interface, and whether an io_uring memory
//! provider (a zcrx instance) is bound to it; the NAPI instance's interrupt and polling thread;
//! and `SO_INCOMING_NAPI_ID`, the NAPI instance a socket's packets arrived through.
//!
//! These are the facts multi-queue receive is built on: a socket belongs to the zcrx instance
//! bound to the queue whose NAPI id it reports, and a queue whose previous instance is still
//! being torn down (EEXIST at registration) is free once no io_uring provider is reported on
//! it. Encoding and parsing are pure functions, tested without a kernel; the framing is
//! [`super::netlink`]'s.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use super::netlink::{
    attributes, find_attribute, read_u32, resolve_family, MessageBuilder, NetlinkSocket,
    GENL_HDRLEN, NLM_F_DUMP, NLM_F_REQUEST,
};
use super::syscall;

// include/uapi/linux/netdev.h
const NETDEV_GENL_NAME: &str = "netdev";
const NETDEV_GENL_VERSION: u8 = 1;
const NETDEV_CMD_QUEUE_GET: u8 = 10;
const NETDEV_CMD_NAPI_GET: u8 = 11;
const NETDEV_QUEUE_TYPE_RX: u32 = 0;

const NETDEV_A_QUEUE_ID: u16 = 1;
const NETDEV_A_QUEUE_IFINDEX: u16 = 2;
const NETDEV_A_QUEUE_TYPE: u16 = 3;
const NETDEV_A_QUEUE_NAPI_ID: u16 = 4;
const NETDEV_A_QUEUE_DMABUF: u16 = 5;
/// An empty nest, present while an io_uring memory provider (a zcrx instance) is bound to
/// the queue (Linux 6.15+).
const NETDEV_A_QUEUE_IO_URING: u16 = 6;
/// An empty nest, present while an AF_XDP socket is bound to the queue.
const NETDEV_A_QUEUE_XSK: u16 = 7;

const NETDEV_A_NAPI_IFINDEX: u16 = 1;
const NETDEV_A_NAPI_ID: u16 = 2;
const NETDEV_A_NAPI_IRQ: u16 = 3;
const NETDEV_A_NAPI_PID: u16 = 4;

/// `SO_INCOMING_NAPI_ID` (asm-generic/socket.h; x86, arm64, riscv and the other architectures
/// that use the generic numbers).
const SO_INCOMING_NAPI_ID: libc::c_int = 56;

/// What the kernel says about one receive queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RxQueueInfo {
    /// The queue's index (`ethtool -l`'s channel numbering).
    pub(crate) id: u32,
    /// The NAPI instance that polls it; `None` when the driver does not link queues to NAPI
    /// instances (or the device is down).
    pub(crate) napi_id: Option<u32>,
    /// An io_uring memory provider (a zcrx instance, maybe one being torn down) is bound.
    pub(crate) io_uring: bool,
    /// The id of a bound devmem dma-buf, if any.
    pub(crate) dmabuf: Option<u32>,
    /// An AF_XDP socket is bound.
    pub(crate) xsk: bool,
}

/// What the kernel says about one NAPI instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NapiInfo {
    pub(crate) id: u32,
    pub(crate) ifindex: Option<u32>,
    /// The interrupt it is scheduled from, if the driver told the kernel.
    pub(crate) irq: Option<u32>,
    /// The kernel thread that polls it, with threaded NAPI.
    pub(crate) thread_pid: Option<u32>,
}

/// `NETDEV_CMD_QUEUE_GET` for receive queue `queue` of `ifindex`.
pub(crate) fn encode_queue_get(family_id: u16, seq: u32, ifindex: u32, queue: u32) -> Vec<u8> {
    let mut message = MessageBuilder::new(family_id, NLM_F_REQUEST, seq);
    message.put_genl_header(NETDEV_CMD_QUEUE_GET, NETDEV_GENL_VERSION);
    message.put_u32(NETDEV_A_QUEUE_IFINDEX, ifindex);
    message.put_u32(NETDEV_A_QUEUE_TYPE, NETDEV_QUEUE_TYPE_RX);
    message.put_u32(NETDEV_A_QUEUE_ID, queue);
    message.finish()
}

/// `NETDEV_CMD_QUEUE_GET` as a dump of every queue (rx and tx) of `ifindex`.
pub(crate) fn encode_queue_dump(family_id: u16, seq: u32, ifindex: u32) -> Vec<u8> {
    let mut message = MessageBuilder::new(family_id, NLM_F_REQUEST | NLM_F_DUMP, seq);
    message.put_genl_header(NETDEV_CMD_QUEUE_GET, NETDEV_GENL_VERSION);
    message.put_u32(NETDEV_A_QUEUE_IFINDEX, ifindex);
    message.finish()
}

/// `NETDEV_CMD_NAPI_GET` for the NAPI instance `napi_id`.
pub(crate) fn encode_napi_get(family_id: u16, seq: u32, napi_id: u32) -> Vec<u8> {
    let mut message = MessageBuilder::new(family_id, NLM_F_REQUEST, seq);
    message.put_genl_header(NETDEV_CMD_NAPI_GET, NETDEV_GENL_VERSION);
    message.put_u32(NETDEV_A_NAPI_ID, napi_id);
    message.finish()
}

/// Parses one QUEUE_GET answer (payload including the genl header). `None` for a transmit
/// queue or an answer without an id.
pub(crate) fn parse_rx_queue(payload: &[u8]) -> Option<RxQueueInfo> {
    let attrs = payload.get(GENL_HDRLEN..)?;
    let mut id = None;
    let mut queue_type = None;
    let mut info = RxQueueInfo {
        id: 0,
        napi_id: None,
        io_uring: false,
        dmabuf: None,
        xsk: false,
    };
    for (attr_type, value) in attributes(attrs) {
        match attr_type {
            NETDEV_A_QUEUE_ID => id = read_u32(value),
            NETDEV_A_QUEUE_TYPE => queue_type = read_u32(value),
            NETDEV_A_QUEUE_NAPI_ID => info.napi_id = read_u32(value).filter(|&napi| napi != 0),
            NETDEV_A_QUEUE_DMABUF => info.dmabuf = read_u32(value),
            NETDEV_A_QUEUE_IO_URING => info.io_uring = true,
            NETDEV_A_QUEUE_XSK => info.xsk = true,
            _ => {}
        }
    }
    if queue_type != Some(NETDEV_QUEUE_TYPE_RX) {
        return None;
    }
    info.id = id?;
    Some(info)
}

/// Parses a NAPI_GET answer (payload including the genl header).
pub(crate) fn parse_napi(payload: &[u8]) -> Option<NapiInfo> {
    let attrs = payload.get(GENL_HDRLEN..)?;
    Some(NapiInfo {
        id: read_u32(find_attribute(attrs, NETDEV_A_NAPI_ID)?)?,
        ifindex: find_attribute(attrs, NETDEV_A_NAPI_IFINDEX).and_then(read_u32),
        irq: find_attribute(attrs, NETDEV_A_NAPI_IRQ).and_then(read_u32),
        thread_pid: find_attribute(attrs, NETDEV_A_NAPI_PID)
            .and_then(read_u32)
            .filter(|&pid| pid != 0),
    })
}

/// A `netdev` generic netlink session: the family id is resolved once. Reading needs no
/// privilege.
#[derive(Debug)]
pub(crate) struct NetdevNetlink {
    socket: NetlinkSocket,
    family_id: u16,
}

impl NetdevNetlink {
    /// Opens a generic netlink socket and resolves the "netdev" family (ENOENT on kernels
    /// before 6.5, which do not have it).
    pub(crate) fn open() -> io::Result<Self> {
        let mut socket = NetlinkSocket::open(libc::NETLINK_GENERIC)?;
        let family_id = resolve_family(&mut socket, NETDEV_GENL_NAME)?;
        Ok(Self { socket, family_id })
    }

    /// Receive queue `queue` of `ifindex`. ENODEV: no such interface; EINVAL: no such queue;
    /// ENOENT: the interface is down.
    pub(crate) fn rx_queue(&mut self, ifindex: u32, queue: u32) -> io::Result<RxQueueInfo> {
        let family_id = self.family_id;
        let answer = self
            .socket
            .request(|seq| encode_queue_get(family_id, seq, ifindex, queue))?;
        parse_rx_queue(&answer).ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))
    }

    /// Every receive queue of `ifindex`, in queue order. Empty when the interface is down
    /// (the kernel lists the queues of running interfaces only).
    pub(crate) fn rx_queues(&mut self, ifindex: u32) -> io::Result<Vec<RxQueueInfo>> {
        let family_id = self.family_id;
        let answers = self
            .socket
            .dump(|seq| encode_queue_dump(family_id, seq, ifindex))?;
        let mut queues: Vec<RxQueueInfo> = answers
            .iter()
            .filter_map(|answer| parse_rx_queue(answer))
            .collect();
        queues.sort_by_key(|queue| queue.id);
        Ok(queues)
    }

    /// The NAPI instance `napi_id`: its interrupt and polling thread.
    pub(crate) fn napi(&mut self, napi_id: u32) -> io::Result<NapiInfo> {
        let family_id = self.family_id;
        let answer = self
            .socket
            .request(|seq| encode_napi_get(family_id, seq, napi_id))?;
        parse_napi(&answer).ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))
    }
}

/// The NAPI instance the last packet of `socket` arrived through (`SO_INCOMING_NAPI_ID`), or
/// `None` if the kernel has not recorded one: no packet yet, or packets that came through no
/// NAPI instance (loopback delivers from the sender's context; a device without NAPI).
pub(crate) fn incoming_napi_id(socket: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    let mut value: libc::c_uint = 0;
    let mut len = size_of::<libc::c_uint>() as libc::socklen_t;
    // SAFETY: `value` and `len` live through the call; `len` says how large `value` is.
    unsafe {
        syscall!(getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_INCOMING_NAPI_ID,
            (&mut value as *mut libc::c_uint).cast(),
            &mut len
        ))
    }?;
    Ok((value != 0).then_some(value))
}

/// Where the kernel tells whether an io_uring memory provider is bound to a queue: the
/// `netdev` family, or a scripted answer sequence in tests.
pub(crate) trait QueueProviders {
    /// Whether an io_uring memory provider is bound to receive queue `queue` of `ifindex`.
    fn io_uring_bound(&mut self, ifindex: u32, queue: u32) -> io::Result<bool>;
}

impl QueueProviders for NetdevNetlink {
    fn io_uring_bound(&mut self, ifindex: u32, queue: u32) -> io::Result<bool> {
        Ok(self.rx_queue(ifindex, queue)?.io_uring)
    }
}

/// How waiting for a queue's previous io_uring provider to go ended.
#[derive(Debug)]
pub(crate) enum ReleaseWait {
    /// The kernel reports no io_uring provider on the queue any more.
    Released { waited: Duration, polls: u32 },
    /// A provider was still bound when the time was up.
    StillBound { waited: Duration, polls: u32 },
    /// The kernel could not be asked (no `netdev` family, the queue vanished).
    Unknown { error: io::Error },
}

/// Polls `providers` every `interval` until no io_uring provider is bound to `queue` of
/// `ifindex`, for at most `bound`. The first poll is immediate. This is how the kernel's own
/// selftest waits out the asynchronous teardown of a previous process's zcrx instance.
pub(crate) fn wait_for_release(
    providers: &mut impl QueueProviders,
    ifindex: u32,
    queue: u32,
    bound: Duration,
    interval: Duration,
) -> ReleaseWait {
    let start = Instant::now();
    let mut polls = 0;
    loop {
        polls += 1;
        match providers.io_uring_bound(ifindex, queue) {
            Ok(false) => {
                return ReleaseWait::Released {
                    waited: start.elapsed(),
                    polls,
                }
            }
            Ok(true) => {}
            Err(error) => return ReleaseWait::Unknown { error },
        }
        let waited = start.elapsed();
        if waited >= bound {
            return ReleaseWait::StillBound { waited, polls };
        }
        std::thread::sleep(interval.min(bound - waited));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::netlink::{messages, NLA_F_NESTED};
    use std::collections::VecDeque;

    fn u16_at(buf: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(buf[at..at + 2].try_into().unwrap())
    }

    fn u32_at(buf: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap())
    }

    fn attr(attr_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut builder = MessageBuilder { buf: Vec::new() };
        builder.put_attr(attr_type, payload);
        builder.buf
    }

    /// A QUEUE_GET answer laid out as netdev_nl_queue_fill_one writes it: id, type,
    /// ifindex, then napi-id (if any), dmabuf, io-uring (empty nest), xsk (empty nest).
    fn queue_answer(id: u32, queue_type: u32, napi: Option<u32>, io_uring: bool) -> Vec<u8> {
        let mut message = MessageBuilder::new(0x15, 0, 4);
        message.put_genl_header(NETDEV_CMD_QUEUE_GET, NETDEV_GENL_VERSION);
        message.put_u32(NETDEV_A_QUEUE_ID, id);
        message.put_u32(NETDEV_A_QUEUE_TYPE, queue_type);
        message.put_u32(NETDEV_A_QUEUE_IFINDEX, 3);
        if let Some(napi) = napi {
            message.put_u32(NETDEV_A_QUEUE_NAPI_ID, napi);
        }
        if io_uring {
            message
                .buf
                .extend(attr(NETDEV_A_QUEUE_IO_URING | NLA_F_NESTED, &[]));
        }
        message.finish()
    }

    #[test]
    fn queue_get_request_layout() {
        let message = encode_queue_get(0x15, 9, 3, 2);
        assert_eq!(u32_at(&message, 0) as usize, message.len());
        assert_eq!(u16_at(&message, 4), 0x15);
        assert_eq!(u16_at(&message, 6), NLM_F_REQUEST);
        assert_eq!(u32_at(&message, 8), 9);
        assert_eq!(&message[16..20], &[NETDEV_CMD_QUEUE_GET, 1, 0, 0]);
        // ifindex, type, id: three u32 attributes of 8 bytes each
        assert_eq!((u16_at(&message, 20), u16_at(&message, 22)), (8, 2));
        assert_eq!(u32_at(&message, 24), 3);
        assert_eq!((u16_at(&message, 28), u16_at(&message, 30)), (8, 3));
        assert_eq!(u32_at(&message, 32), NETDEV_QUEUE_TYPE_RX);
        assert_eq!((u16_at(&message, 36), u16_at(&message, 38)), (8, 1));
        assert_eq!(u32_at(&message, 40), 2);
        assert_eq!(message.len(), 44);
    }

    #[test]
    fn queue_dump_and_napi_get_request_layout() {
        let dump = encode_queue_dump(0x15, 1, 7);
        assert_eq!(u16_at(&dump, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(&dump[16..20], &[NETDEV_CMD_QUEUE_GET, 1, 0, 0]);
        assert_eq!((u16_at(&dump, 22), u32_at(&dump, 24)), (2, 7));
        assert_eq!(dump.len(), 28);
        let napi = encode_napi_get(0x15, 2, 8193);
        assert_eq!(u16_at(&napi, 6), NLM_F_REQUEST);
        assert_eq!(&napi[16..20], &[NETDEV_CMD_NAPI_GET, 1, 0, 0]);
        assert_eq!(
            (u16_at(&napi, 22), u32_at(&napi, 24)),
            (NETDEV_A_NAPI_ID, 8193)
        );
    }

    #[test]
    fn parses_rx_queues_with_and_without_a_provider() {
        let bound = queue_answer(1, NETDEV_QUEUE_TYPE_RX, Some(8194), true);
        let info = parse_rx_queue(messages(&bound).next().unwrap().payload).unwrap();
        assert_eq!(
            info,
            RxQueueInfo {
                id: 1,
                napi_id: Some(8194),
                io_uring: true,
                dmabuf: None,
                xsk: false,
            }
        );
        let free = queue_answer(0, NETDEV_QUEUE_TYPE_RX, None, false);
        let info = parse_rx_queue(messages(&free).next().unwrap().payload).unwrap();
        assert_eq!((info.id, info.napi_id, info.io_uring), (0, None, false));
        // A transmit queue of the same dump is not a receive queue.
        let tx = queue_answer(0, 1, Some(8193), false);
        assert_eq!(parse_rx_queue(messages(&tx).next().unwrap().payload), None);
        // A dump answer holds several messages; all are walked.
        let mut dump = queue_answer(0, NETDEV_QUEUE_TYPE_RX, Some(8193), false);
        dump.extend(queue_answer(1, NETDEV_QUEUE_TYPE_RX, Some(8194), true));
        let ids: Vec<_> = messages(&dump)
            .filter_map(|m| parse_rx_queue(m.payload))
            .map(|q| (q.id, q.napi_id, q.io_uring))
            .collect();
        assert_eq!(ids, [(0, Some(8193), false), (1, Some(8194), true)]);
        // Truncated: no genl header.
        assert_eq!(parse_rx_queue(&[1, 2]), None);
    }

    #[test]
    fn parses_napi_answers() {
        let mut message = MessageBuilder::new(0x15, 0, 4);
        message.put_genl_header(NETDEV_CMD_NAPI_GET, NETDEV_GENL_VERSION);
        message.put_u32(NETDEV_A_NAPI_IFINDEX, 3);
        message.put_u32(NETDEV_A_NAPI_ID, 8193);
        message.put_u32(NETDEV_A_NAPI_IRQ, 42);
        message.put_u32(NETDEV_A_NAPI_PID, 0);
        let buf = message.finish();
        let napi = parse_napi(messages(&buf).next().unwrap().payload).unwrap();
        assert_eq!(
            napi,
            NapiInfo {
                id: 8193,
                ifindex: Some(3),
                irq: Some(42),
                thread_pid: None,
            }
        );
    }

    /// Answers from a script; once it runs out, the last answer repeats.
    struct Scripted {
        answers: VecDeque<io::Result<bool>>,
        asked: Vec<(u32, u32)>,
    }

    impl Scripted {
        fn new(answers: Vec<io::Result<bool>>) -> Scripted {
            Scripted {
                answers: answers.into(),
                asked: Vec::new(),
            }
        }
    }

    impl QueueProviders for Scripted {
        fn io_uring_bound(&mut self, ifindex: u32, queue: u32) -> io::Result<bool> {
            self.asked.push((ifindex, queue));
            if self.answers.len() > 1 {
                self.answers.pop_front().unwrap()
            } else {
                match self.answers.front().unwrap() {
                    Ok(bound) => Ok(*bound),
                    Err(e) => Err(io::Error::from_raw_os_error(e.raw_os_error().unwrap())),
                }
            }
        }
    }

    #[test]
    fn waits_until_the_provider_is_gone() {
        let mut providers = Scripted::new(vec![Ok(true), Ok(true), Ok(true), Ok(false)]);
        let outcome = wait_for_release(
            &mut providers,
            3,
            2,
            Duration::from_secs(5),
            Duration::from_millis(2),
        );
        match outcome {
            ReleaseWait::Released { polls, waited } => {
                assert_eq!(polls, 4);
                assert!(waited >= Duration::from_millis(6), "{waited:?}");
            }
            other => panic!("expected Released, got {other:?}"),
        }
        assert_eq!(providers.asked, [(3, 2); 4]);
    }

    #[test]
    fn a_free_queue_is_released_at_the_first_poll() {
        let mut providers = Scripted::new(vec![Ok(false)]);
        let outcome = wait_for_release(
            &mut providers,
            1,
            0,
            Duration::from_secs(5),
            Duration::from_secs(1),
        );
        assert!(
            matches!(outcome, ReleaseWait::Released { polls: 1, waited } if waited < Duration::from_secs(1))
        );
    }

    #[test]
    fn gives_up_at_the_bound_when_the_provider_stays() {
        let mut providers = Scripted::new(vec![Ok(true)]);
        let outcome = wait_for_release(
            &mut providers,
            1,
            0,
            Duration::from_millis(30),
            Duration::from_millis(5),
        );
        match outcome {
            ReleaseWait::StillBound { waited, polls } => {
                assert!(waited >= Duration::from_millis(30), "{waited:?}");
                assert!(waited < Duration::from_secs(2), "{waited:?}");
                assert!((2..=8).contains(&polls), "{polls} polls");
            }
            other => panic!("expected StillBound, got {other:?}"),
        }
    }

    #[test]
    fn an_unanswerable_query_ends_the_wait() {
        let mut providers = Scripted::new(vec![
            Ok(true),
            Err(io::Error::from_raw_os_error(libc::ENOENT)),
        ]);
        let outcome = wait_for_release(
            &mut providers,
            1,
            0,
            Duration::from_secs(5),
            Duration::from_millis(1),
        );
        assert!(
            matches!(&outcome, ReleaseWait::Unknown { error, .. } if error.raw_os_error() == Some(libc::ENOENT)),
            "{outcome:?}"
        );
    }

    #[test]
    fn loopback_sockets_report_no_napi_id() {
        // Loopback delivers in the sender's context, through no NAPI instance: the kernel
        // records nothing, and the getter says so instead of returning 0.
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"napi").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"napi");
        assert_eq!(incoming_napi_id(server.as_fd()).unwrap(), None);
        assert_eq!(incoming_napi_id(client.as_fd()).unwrap(), None);
    }

    #[test]
    fn napi_id_of_a_non_socket_is_an_error() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let error = incoming_napi_id(std::os::fd::AsFd::as_fd(&file)).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOTSOCK));
    }

    #[test]
    fn queue_query_on_loopback_answers_or_says_why() {
        // lo is always up and has one rx queue; it has no NAPI instance and no provider. A
        // kernel without the netdev family (before 6.5) answers ENOENT at open.
        let lo = crate::sys::ifindex("lo").unwrap();
        let mut netdev = match NetdevNetlink::open() {
            Ok(netdev) => netdev,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
                return;
            }
        };
        let queue = netdev.rx_queue(lo, 0).unwrap();
        assert_eq!(
            (queue.id, queue.napi_id, queue.io_uring, queue.xsk),
            (0, None, false, false)
        );
        let all = netdev.rx_queues(lo).unwrap();
        assert_eq!(all, [queue]);
        let missing = netdev.rx_queue(lo, 4096).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::EINVAL), "{missing}");
        let no_device = netdev.rx_queue(u32::MAX, 0).unwrap_err();
        assert_eq!(no_device.raw_os_error(), Some(libc::ENODEV), "{no_device}");
        assert!(!netdev.io_uring_bound(lo, 0).unwrap());
    }
}
