//! Just enough netlink to read what the probe needs from the kernel: the ethtool ring
//! parameters (tcp-data-split, hds-thresh) over generic netlink, and whether an XDP program
//! is attached over rtnetlink. The framing (messages, attributes, requests and dumps) is
//! shared with the `netdev` family's queries in [`super::netdev`].
//!
//! Hand-rolled on a raw `AF_NETLINK` socket: the messages are few and fixed, and a netlink
//! library would be a large dependency for two requests. Encoding and parsing are pure
//! functions over byte buffers so that they are unit-tested without a kernel.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::syscall;

// Netlink framing (include/uapi/linux/netlink.h).
pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLA_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ROOT | NLM_F_MATCH`: answer with every object the request's attributes select.
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

// Generic netlink controller (include/uapi/linux/genetlink.h).
pub(crate) const GENL_HDRLEN: usize = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// ethtool netlink (include/uapi/linux/ethtool_netlink_generated.h).
const ETHTOOL_GENL_NAME: &str = "ethtool";
const ETHTOOL_GENL_VERSION: u8 = 1;
const ETHTOOL_MSG_RINGS_GET: u8 = 15;
const ETHTOOL_A_HEADER_DEV_NAME: u16 = 2;
const ETHTOOL_A_RINGS_HEADER: u16 = 1;
const ETHTOOL_A_RINGS_TCP_DATA_SPLIT: u16 = 11;
const ETHTOOL_A_RINGS_HDS_THRESH: u16 = 17;
const ETHTOOL_A_RINGS_HDS_THRESH_MAX: u16 = 18;

// rtnetlink (include/uapi/linux/rtnetlink.h, if_link.h).
const RTM_GETLINK: u16 = 18;
const IFINFOMSG_LEN: usize = 16;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_EXT_MASK: u16 = 29;
/// Leaves the (large) link statistics out of the RTM_GETLINK answer.
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

/// Values of `ETHTOOL_A_RINGS_TCP_DATA_SPLIT` (`enum ethtool_tcp_data_split`).
pub(crate) const TCP_DATA_SPLIT_UNKNOWN: u8 = 0;
pub(crate) const TCP_DATA_SPLIT_DISABLED: u8 = 1;
pub(crate) const TCP_DATA_SPLIT_ENABLED: u8 = 2;

/// Largest answer we accept. One RINGS_GET or (stats-less) RTM_GETLINK reply is well under
/// this; a larger one is reported as EMSGSIZE rather than silently truncated.
const RECV_BUFFER_LEN: usize = 64 * 1024;

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Builds one netlink message: header, optional fixed family header, then attributes.
#[derive(Debug)]
pub(crate) struct MessageBuilder {
    pub(crate) buf: Vec<u8>,
}

impl MessageBuilder {
    pub(crate) fn new(message_type: u16, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, filled in by finish()
        buf.extend_from_slice(&message_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0 addresses the kernel
        Self { buf }
    }

    pub(crate) fn put_bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    pub(crate) fn put_genl_header(&mut self, cmd: u8, version: u8) {
        self.put_bytes(&[cmd, version, 0, 0]);
    }

    pub(crate) fn put_attr(&mut self, attr_type: u16, payload: &[u8]) {
        let len = u16::try_from(NLA_HDRLEN + payload.len()).expect("netlink attribute too long");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.put_bytes(payload);
    }

    pub(crate) fn put_u32(&mut self, attr_type: u16, value: u32) {
        self.put_attr(attr_type, &value.to_ne_bytes());
    }

    /// Strings travel NUL-terminated (`NLA_NUL_STRING` / `NLA_STRING` both accept that).
    pub(crate) fn put_str(&mut self, attr_type: u16, value: &str) {
        let mut bytes = Vec::with_capacity(value.len() + 1);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
        self.put_attr(attr_type, &bytes);
    }

    /// Starts a nested attribute; returns its offset for [`Self::end_nested`].
    pub(crate) fn begin_nested(&mut self, attr_type: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(attr_type | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub(crate) fn end_nested(&mut self, start: usize) {
        let len = u16::try_from(self.buf.len() - start).expect("nested attribute too long");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).expect("netlink message too long");
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `CTRL_CMD_GETFAMILY` for `family_name`: asks for the id of a generic netlink family.
pub(crate) fn encode_get_family(seq: u32, family_name: &str) -> Vec<u8> {
    let mut message = MessageBuilder::new(GENL_ID_CTRL, NLM_F_REQUEST, seq);
    message.put_genl_header(CTRL_CMD_GETFAMILY, 1);
    message.put_str(CTRL_ATTR_FAMILY_NAME, family_name);
    message.finish()
}

/// `ETHTOOL_MSG_RINGS_GET` for the device named `ifname` (the header names the device by
/// name, so the request needs no ifindex and works even if the index changed).
pub(crate) fn encode_rings_get(family_id: u16, seq: u32, ifname: &str) -> Vec<u8> {
    let mut message = MessageBuilder::new(family_id, NLM_F_REQUEST, seq);
    message.put_genl_header(ETHTOOL_MSG_RINGS_GET, ETHTOOL_GENL_VERSION);
    let header = message.begin_nested(ETHTOOL_A_RINGS_HEADER);
    message.put_str(ETHTOOL_A_HEADER_DEV_NAME, ifname);
    message.end_nested(header);
    message.finish()
}

/// `RTM_GETLINK` for one interface index, without statistics.
pub(crate) fn encode_get_link(seq: u32, ifindex: u32) -> Vec<u8> {
    let mut message = MessageBuilder::new(RTM_GETLINK, NLM_F_REQUEST, seq);
    let mut ifinfomsg = [0u8; IFINFOMSG_LEN];
    // struct ifinfomsg { u8 family (AF_UNSPEC), u8 pad, u16 type, i32 index, u32 flags, u32 change }
    ifinfomsg[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    message.put_bytes(&ifinfomsg);
    message.put_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
    message.finish()
}

/// One netlink message taken out of a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    pub(crate) message_type: u16,
    pub(crate) seq: u32,
    /// Everything after the 16-byte `nlmsghdr`.
    pub(crate) payload: &'a [u8],
}

/// Splits a receive buffer into messages. A malformed length ends the walk: the kernel never
/// sends one, and a parser that stops is safer than one that guesses.
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            rest = &[];
            return None;
        }
        let message = Message {
            message_type: u16::from_ne_bytes(rest[4..6].try_into().ok()?),
            seq: u32::from_ne_bytes(rest[8..12].try_into().ok()?),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some(message)
    })
}

/// Walks the attributes of a payload, yielding `(type without flag bits, value)`.
pub(crate) fn attributes(payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = payload;
    std::iter::from_fn(move || {
        if rest.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16::from_ne_bytes(rest[0..2].try_into().ok()?) as usize;
        if len < NLA_HDRLEN || len > rest.len() {
            rest = &[];
            return None;
        }
        let attr_type = u16::from_ne_bytes(rest[2..4].try_into().ok()?) & NLA_TYPE_MASK;
        let value = &rest[NLA_HDRLEN..len];
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some((attr_type, value))
    })
}

pub(crate) fn find_attribute(payload: &[u8], wanted: u16) -> Option<&[u8]> {
    attributes(payload).find_map(|(attr_type, value)| (attr_type == wanted).then_some(value))
}

pub(crate) fn read_u8(value: &[u8]) -> Option<u8> {
    value.first().copied()
}

pub(crate) fn read_u16(value: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(value.get(..2)?.try_into().ok()?))
}

pub(crate) fn read_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.get(..4)?.try_into().ok()?))
}

/// The error code of an `NLMSG_ERROR` payload: 0 is an acknowledgement, otherwise a
/// positive errno.
pub(crate) fn parse_error(payload: &[u8]) -> Option<i32> {
    let raw = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    Some(raw.checked_neg().unwrap_or(libc::EINVAL))
}

/// The family id in a `CTRL_CMD_GETFAMILY` answer (payload includes the genl header).
pub(crate) fn parse_family_id(payload: &[u8]) -> Option<u16> {
    read_u16(find_attribute(
        payload.get(GENL_HDRLEN..)?,
        CTRL_ATTR_FAMILY_ID,
    )?)
}

/// What the probe reads from an ethtool RINGS_GET answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RingsInfo {
    /// `ETHTOOL_A_RINGS_TCP_DATA_SPLIT`. The kernel leaves the attribute out when the driver
    /// reports `ETHTOOL_TCP_DATA_SPLIT_UNKNOWN` (0), which is folded into 0 here.
    pub(crate) tcp_data_split: u8,
    /// `ETHTOOL_A_RINGS_HDS_THRESH`, present only when the driver supports the threshold.
    pub(crate) hds_thresh: Option<u32>,
    /// `ETHTOOL_A_RINGS_HDS_THRESH_MAX`, present together with `hds_thresh`.
    pub(crate) hds_thresh_max: Option<u32>,
}

/// Parses an ethtool RINGS_GET_REPLY payload (including the genl header).
pub(crate) fn parse_rings_reply(payload: &[u8]) -> Option<RingsInfo> {
    let attrs = payload.get(GENL_HDRLEN..)?;
    let mut info = RingsInfo::default();
    for (attr_type, value) in attributes(attrs) {
        match attr_type {
            ETHTOOL_A_RINGS_TCP_DATA_SPLIT => {
                info.tcp_data_split = read_u8(value).unwrap_or(TCP_DATA_SPLIT_UNKNOWN)
            }
            ETHTOOL_A_RINGS_HDS_THRESH => info.hds_thresh = read_u32(value),
            ETHTOOL_A_RINGS_HDS_THRESH_MAX => info.hds_thresh_max = read_u32(value),
            _ => {}
        }
    }
    Some(info)
}

/// `IFLA_XDP_ATTACHED` from an RTM_NEWLINK answer: 0 none, 1 driver, 2 generic (skb),
/// 3 offloaded, 4 several. `None` when the kernel sent no IFLA_XDP.
pub(crate) fn parse_link_xdp_attached(payload: &[u8]) -> Option<u8> {
    let attrs = payload.get(align4(IFINFOMSG_LEN)..)?;
    read_u8(find_attribute(
        find_attribute(attrs, IFLA_XDP)?,
        IFLA_XDP_ATTACHED,
    )?)
}

/// A blocking netlink socket with a receive timeout, so that a probe never hangs on an
/// answer that does not come.
#[derive(Debug)]
pub(crate) struct NetlinkSocket {
    fd: OwnedFd,
    next_seq: u32,
}

impl NetlinkSocket {
    /// Opens `AF_NETLINK` with `protocol` (`NETLINK_GENERIC`, `NETLINK_ROUTE`).
    pub(crate) fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let raw = unsafe {
            syscall!(socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            ))
        }?;
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a valid timeval that lives across the call, and the length
        // passed is its size.
        unsafe {
            syscall!(setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            ))
        }?;
        Ok(Self { fd, next_seq: 1 })
    }

    fn take_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        seq
    }

    /// Sends one request and returns the payload of the answer carrying its sequence number,
    /// or the errno of an `NLMSG_ERROR` answer.
    pub(crate) fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Vec<u8>> {
        let seq = self.take_seq();
        let request = build(seq);
        self.send_request(&request)?;
        let mut buf = vec![0u8; RECV_BUFFER_LEN];
        loop {
            let received = self.receive(&mut buf)?;
            for message in messages(&buf[..received]) {
                if message.seq != seq {
                    continue; // a late answer to an earlier request that timed out
                }
                return match message.message_type {
                    NLMSG_ERROR => match parse_error(message.payload) {
                        Some(0) | None => Err(io::Error::from_raw_os_error(libc::ENODATA)),
                        Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                    },
                    NLMSG_DONE => Err(io::Error::from_raw_os_error(libc::ENODATA)),
                    _ => Ok(message.payload.to_vec()),
                };
            }
        }
    }

    /// Sends one request message.
    fn send_request(&self, request: &[u8]) -> io::Result<()> {
        // SAFETY: the pointer and length describe `request`, which outlives the call.
        unsafe {
            syscall!(send(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            ))
        }?;
        Ok(())
    }

    /// Receives one datagram of answers into `buf`; returns its length. An answer larger than
    /// `buf` is `EMSGSIZE` (MSG_TRUNC makes recv report its full length).
    fn receive(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe `buf`, which outlives the call.
        let received = unsafe {
            syscall!(recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            ))
        }? as usize;
        if received > buf.len() {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        Ok(received)
    }

    /// Sends one dump request and returns the payload of every answer until `NLMSG_DONE`
    /// (a dump can take several receives: the kernel fills one buffer at a time). An
    /// `NLMSG_ERROR` answer ends the dump with its errno.
    pub(crate) fn dump(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Vec<Vec<u8>>> {
        let seq = self.take_seq();
        let request = build(seq);
        self.send_request(&request)?;
        let mut buf = vec![0u8; RECV_BUFFER_LEN];
        let mut answers = Vec::new();
        loop {
            let received = self.receive(&mut buf)?;
            for message in messages(&buf[..received]) {
                if message.seq != seq {
                    continue; // a late answer to an earlier request that timed out
                }
                match message.message_type {
                    // NLMSG_DONE carries the dump's own result (0, or -errno if it stopped).
                    NLMSG_DONE | NLMSG_ERROR => match parse_error(message.payload) {
                        Some(0) | None => return Ok(answers),
                        Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                    },
                    _ => answers.push(message.payload.to_vec()),
                }
            }
        }
    }
}

/// Resolves the id of the generic netlink family `name` on `socket` (ENOENT when the kernel
/// does not have it).
pub(crate) fn resolve_family(socket: &mut NetlinkSocket, name: &str) -> io::Result<u16> {
    let answer = socket.request(|seq| encode_get_family(seq, name))?;
    parse_family_id(&answer).ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))
}

/// An ethtool generic netlink session: the family id is resolved once.
#[derive(Debug)]
pub(crate) struct EthtoolNetlink {
    socket: NetlinkSocket,
    family_id: u16,
}

impl EthtoolNetlink {
    /// Opens a generic netlink socket and resolves the "ethtool" family (ENOENT when the
    /// kernel has no ethtool netlink, i.e. `CONFIG_ETHTOOL_NETLINK=n`).
    pub(crate) fn open() -> io::Result<Self> {
        let mut socket = NetlinkSocket::open(libc::NETLINK_GENERIC)?;
        let family_id = resolve_family(&mut socket, ETHTOOL_GENL_NAME)?;
        Ok(Self { socket, family_id })
    }

    /// Reads the ring parameters of `ifname`. EOPNOTSUPP means the driver has no ring
    /// parameters at all (virtual devices), ENODEV that the device does not exist.
    pub(crate) fn rings(&mut self, ifname: &str) -> io::Result<RingsInfo> {
        let family_id = self.family_id;
        let answer = self
            .socket
            .request(|seq| encode_rings_get(family_id, seq, ifname))?;
        parse_rings_reply(&answer).ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))
    }
}

/// An rtnetlink session for link queries.
#[derive(Debug)]
pub(crate) struct RouteNetlink {
    socket: NetlinkSocket,
}

impl RouteNetlink {
    pub(crate) fn open() -> io::Result<Self> {
        Ok(Self {
            socket: NetlinkSocket::open(libc::NETLINK_ROUTE)?,
        })
    }

    /// `IFLA_XDP_ATTACHED` of `ifindex` (0 when the kernel does not report it).
    pub(crate) fn xdp_attached(&mut self, ifindex: u32) -> io::Result<u8> {
        let answer = self.socket.request(|seq| encode_get_link(seq, ifindex))?;
        Ok(parse_link_xdp_attached(&answer).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(buf: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(buf[at..at + 2].try_into().unwrap())
    }

    fn u32_at(buf: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap())
    }

    /// Builds an answer the way the kernel lays it out, for the parser tests.
    fn kernel_message(message_type: u16, seq: u32, fixed_header: &[u8], attrs: &[u8]) -> Vec<u8> {
        let mut message = MessageBuilder::new(message_type, 0, seq);
        message.put_bytes(fixed_header);
        message.buf.extend_from_slice(attrs);
        message.finish()
    }

    fn attr(attr_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut builder = MessageBuilder { buf: Vec::new() };
        builder.put_attr(attr_type, payload);
        builder.buf
    }

    #[test]
    fn get_family_request_layout() {
        let message = encode_get_family(7, "ethtool");
        // nlmsghdr
        assert_eq!(u32_at(&message, 0) as usize, message.len());
        assert_eq!(u16_at(&message, 4), GENL_ID_CTRL);
        assert_eq!(u16_at(&message, 6), NLM_F_REQUEST);
        assert_eq!(u32_at(&message, 8), 7);
        assert_eq!(u32_at(&message, 12), 0);
        // genlmsghdr
        assert_eq!(&message[16..20], &[CTRL_CMD_GETFAMILY, 1, 0, 0]);
        // CTRL_ATTR_FAMILY_NAME "ethtool\0": 4 + 8 bytes, already aligned
        assert_eq!(u16_at(&message, 20), 12);
        assert_eq!(u16_at(&message, 22), CTRL_ATTR_FAMILY_NAME);
        assert_eq!(&message[24..32], b"ethtool\0");
        assert_eq!(message.len(), 32);
    }

    #[test]
    fn rings_get_request_layout() {
        let message = encode_rings_get(0x1c, 3, "eth0");
        assert_eq!(u32_at(&message, 0) as usize, message.len());
        assert_eq!(u16_at(&message, 4), 0x1c);
        assert_eq!(
            &message[16..20],
            &[ETHTOOL_MSG_RINGS_GET, ETHTOOL_GENL_VERSION, 0, 0]
        );
        // nested ETHTOOL_A_RINGS_HEADER { ETHTOOL_A_HEADER_DEV_NAME "eth0\0" (4+5, padded to 12) }
        assert_eq!(u16_at(&message, 20), 4 + 12);
        assert_eq!(u16_at(&message, 22), ETHTOOL_A_RINGS_HEADER | NLA_F_NESTED);
        assert_eq!(u16_at(&message, 24), 9);
        assert_eq!(u16_at(&message, 26), ETHTOOL_A_HEADER_DEV_NAME);
        assert_eq!(&message[28..33], b"eth0\0");
        assert_eq!(&message[33..36], &[0, 0, 0]);
        assert_eq!(message.len(), 36);
    }

    #[test]
    fn get_link_request_layout() {
        let message = encode_get_link(9, 42);
        assert_eq!(u16_at(&message, 4), RTM_GETLINK);
        assert_eq!(message[16], 0); // AF_UNSPEC
        assert_eq!(u32_at(&message, 20), 42);
        assert_eq!(u16_at(&message, 32), 8);
        assert_eq!(u16_at(&message, 34), IFLA_EXT_MASK);
        assert_eq!(u32_at(&message, 36), RTEXT_FILTER_SKIP_STATS);
        assert_eq!(message.len(), 40);
    }

    #[test]
    fn parses_family_id() {
        let mut attrs = attr(CTRL_ATTR_FAMILY_NAME, b"ethtool\0");
        attrs.extend(attr(CTRL_ATTR_FAMILY_ID, &0x1du16.to_ne_bytes()));
        let buf = kernel_message(GENL_ID_CTRL, 1, &[1, 2, 0, 0], &attrs);
        let message = messages(&buf).next().unwrap();
        assert_eq!(message.seq, 1);
        assert_eq!(parse_family_id(message.payload), Some(0x1d));
    }

    #[test]
    fn parses_rings_reply_with_split_and_threshold() {
        let mut header = Vec::new();
        header.extend(attr(ETHTOOL_A_HEADER_DEV_NAME, b"eni0np1\0"));
        let mut attrs = attr(ETHTOOL_A_RINGS_HEADER | NLA_F_NESTED, &header);
        attrs.extend(attr(6, &512u32.to_ne_bytes())); // ETHTOOL_A_RINGS_RX, ignored
        attrs.extend(attr(
            ETHTOOL_A_RINGS_TCP_DATA_SPLIT,
            &[TCP_DATA_SPLIT_ENABLED],
        ));
        attrs.extend(attr(ETHTOOL_A_RINGS_HDS_THRESH, &0u32.to_ne_bytes()));
        attrs.extend(attr(ETHTOOL_A_RINGS_HDS_THRESH_MAX, &1024u32.to_ne_bytes()));
        let buf = kernel_message(0x1d, 2, &[16, 1, 0, 0], &attrs);
        let message = messages(&buf).next().unwrap();
        let info = parse_rings_reply(message.payload).unwrap();
        assert_eq!(
            info,
            RingsInfo {
                tcp_data_split: TCP_DATA_SPLIT_ENABLED,
                hds_thresh: Some(0),
                hds_thresh_max: Some(1024),
            }
        );
    }

    #[test]
    fn rings_reply_without_split_attribute_is_unknown() {
        let attrs = attr(6, &256u32.to_ne_bytes());
        let buf = kernel_message(0x1d, 2, &[16, 1, 0, 0], &attrs);
        let info = parse_rings_reply(messages(&buf).next().unwrap().payload).unwrap();
        assert_eq!(info.tcp_data_split, TCP_DATA_SPLIT_UNKNOWN);
        assert_eq!(info.hds_thresh, None);
    }

    #[test]
    fn parses_error_and_several_messages() {
        let mut buf = kernel_message(NLMSG_ERROR, 5, &(-libc::EOPNOTSUPP).to_ne_bytes(), &[]);
        buf.extend(kernel_message(NLMSG_ERROR, 6, &0i32.to_ne_bytes(), &[]));
        let all: Vec<_> = messages(&buf).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].message_type, NLMSG_ERROR);
        assert_eq!(parse_error(all[0].payload), Some(libc::EOPNOTSUPP));
        assert_eq!(all[1].seq, 6);
        assert_eq!(parse_error(all[1].payload), Some(0));
    }

    #[test]
    fn parses_xdp_attached() {
        let xdp = attr(IFLA_XDP_ATTACHED, &[1]);
        let mut attrs = attr(3, b"eth0\0"); // IFLA_IFNAME, ignored
        attrs.extend(attr(IFLA_XDP | NLA_F_NESTED, &xdp));
        let buf = kernel_message(16, 1, &[0u8; IFINFOMSG_LEN], &attrs);
        assert_eq!(
            parse_link_xdp_attached(messages(&buf).next().unwrap().payload),
            Some(1)
        );
        let without = kernel_message(16, 1, &[0u8; IFINFOMSG_LEN], &attr(3, b"lo\0"));
        assert_eq!(
            parse_link_xdp_attached(messages(&without).next().unwrap().payload),
            None
        );
    }

    #[test]
    fn malformed_lengths_stop_the_walk() {
        // nlmsg_len larger than the buffer
        let mut buf = encode_get_family(1, "ethtool");
        buf[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(messages(&buf).count(), 0);
        // attribute length shorter than its header
        let mut attrs = attr(1, &[1, 2, 3, 4]);
        attrs[0..2].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(attributes(&attrs).count(), 0);
        // truncated u32 value
        assert_eq!(read_u32(&[1, 2]), None);
        assert_eq!(parse_rings_reply(&[0, 0]), None);
    }
}
