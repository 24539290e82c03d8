//! What steers packets to a receive queue, read with the ethtool ioctl (`SIOCETHTOOL`): the
//! default RSS context's indirection table and the n-tuple rules (`ethtool -x` and `ethtool
//! -n`). Ethtool's netlink family does not carry the rules, so the ioctl it is.
//!
//! Every packet steered to a zcrx queue lands in the zcrx process's memory, whatever socket
//! it is for; the probe uses this to say what else would reach the queue.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::syscall;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GRXCLSRLCNT: u32 = 0x2e;
const ETHTOOL_GRXCLSRULE: u32 = 0x2f;
const ETHTOOL_GRXCLSRLALL: u32 = 0x30;
const ETHTOOL_GRXFHINDIR: u32 = 0x38;

const TCP_V4_FLOW: u32 = 0x01;
const TCP_V6_FLOW: u32 = 0x05;
const FLOW_EXT: u32 = 0x8000_0000;
const FLOW_MAC_EXT: u32 = 0x4000_0000;
const FLOW_RSS: u32 = 0x2000_0000;
const RX_CLS_FLOW_WAKE: u64 = 0xffff_ffff_ffff_fffe;
const ETHTOOL_RX_FLOW_SPEC_RING_VF: u64 = 0x0000_00ff_0000_0000;

/// `struct ifreq` with `ifr_data`.
#[repr(C)]
struct IfReqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _rest: [u8; 16],
}
const _: () = assert!(size_of::<IfReqData>() == 40);

/// `struct ethtool_rx_flow_spec` (include/uapi/linux/ethtool.h): the two flow unions are 52
/// bytes, the two extensions 20.
#[repr(C)]
#[derive(Clone, Copy)]
struct FlowSpec {
    flow_type: u32,
    h_u: [u8; 52],
    h_ext: [u8; 20],
    m_u: [u8; 52],
    m_ext: [u8; 20],
    ring_cookie: u64,
    location: u32,
}

/// `struct ethtool_rxnfc` without its flexible `rule_locs`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RxNfc {
    cmd: u32,
    flow_type: u32,
    data: u64,
    fs: FlowSpec,
    rule_cnt: u32,
}

const _: () = {
    assert!(std::mem::offset_of!(FlowSpec, m_u) == 76);
    assert!(std::mem::offset_of!(FlowSpec, ring_cookie) == 152);
    assert!(size_of::<FlowSpec>() == 168);
    assert!(std::mem::offset_of!(RxNfc, fs) == 16);
    assert!(std::mem::offset_of!(RxNfc, rule_cnt) == 184);
};
/// Where `rule_locs` starts: right after `rule_cnt` (the struct's tail padding is not used).
const RULE_LOCS_OFFSET: usize = 188;

impl RxNfc {
    fn command(cmd: u32) -> RxNfc {
        // SAFETY: plain integers and byte arrays; all-zero is a valid value.
        let mut nfc: RxNfc = unsafe { std::mem::zeroed() };
        nfc.cmd = cmd;
        nfc
    }
}

/// Where an n-tuple rule sends what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RuleTarget {
    /// Receive queue N.
    Queue(u32),
    /// Spread by RSS context `context`, from queue offset `offset`.
    RssContext { context: u32, offset: u32 },
    /// Dropped, sent to a virtual function, or used to wake the host: none of this host's
    /// queues.
    Elsewhere,
}

/// One n-tuple rule, as much as the probe needs of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SteeringRule {
    pub(crate) location: u32,
    pub(crate) target: RuleTarget,
    /// The TCP destination port the rule matches exactly, if it is a TCP rule that does.
    pub(crate) tcp_dst_port: Option<u16>,
}

/// An `AF_INET` datagram socket: what the ethtool ioctl is issued on.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain integers.
    let fd = unsafe {
        syscall!(socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0
        ))
    }?;
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues `SIOCETHTOOL` for `interface` with `data` (which starts with the command word and
/// is as large as the command needs).
fn ethtool(socket: &OwnedFd, interface: &str, data: *mut libc::c_void) -> io::Result<()> {
    let mut request = IfReqData {
        name: [0; libc::IFNAMSIZ],
        data,
        _rest: [0; 16],
    };
    if interface.len() >= libc::IFNAMSIZ || interface.contains('\0') {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    for (slot, byte) in request.name.iter_mut().zip(interface.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: `request` is a valid ifreq naming the interface; `data` points to a buffer the
    // caller sized for its command, which outlives the call.
    unsafe {
        syscall!(ioctl(
            socket.as_raw_fd(),
            SIOCETHTOOL as _,
            &mut request as *mut IfReqData
        ))
    }?;
    Ok(())
}

/// The queue each entry of the default RSS context's indirection table sends to.
pub(crate) fn rss_indirection(interface: &str) -> io::Result<Vec<u32>> {
    let socket = ioctl_socket()?;
    // `struct ethtool_rxfh_indir { u32 cmd; u32 size; u32 ring_index[]; }`: size 0 asks for
    // the table's size.
    let mut header = [ETHTOOL_GRXFHINDIR, 0u32];
    ethtool(&socket, interface, header.as_mut_ptr().cast())?;
    let size = header[1] as usize;
    let mut table = vec![0u32; 2 + size];
    table[0] = ETHTOOL_GRXFHINDIR;
    table[1] = header[1];
    ethtool(&socket, interface, table.as_mut_ptr().cast())?;
    Ok(table.split_off(2))
}

/// The n-tuple rules of `interface`, in location order. An empty list when the driver has
/// none; EOPNOTSUPP when it has no n-tuple filtering at all.
pub(crate) fn ntuple_rules(interface: &str) -> io::Result<Vec<SteeringRule>> {
    let socket = ioctl_socket()?;
    let mut count = RxNfc::command(ETHTOOL_GRXCLSRLCNT);
    ethtool(&socket, interface, (&mut count as *mut RxNfc).cast())?;
    let rules = count.rule_cnt as usize;
    if rules == 0 {
        return Ok(Vec::new());
    }
    // The header, then `rules` locations; u64 words keep the buffer aligned for RxNfc.
    let bytes = RULE_LOCS_OFFSET + 4 * rules;
    let mut buffer = vec![0u64; bytes.div_ceil(8).max(size_of::<RxNfc>() / 8)];
    let header = buffer.as_mut_ptr().cast::<RxNfc>();
    // SAFETY: the buffer holds at least one RxNfc and is 8-aligned.
    unsafe {
        header.write(RxNfc::command(ETHTOOL_GRXCLSRLALL));
        (*header).rule_cnt = count.rule_cnt;
    }
    ethtool(&socket, interface, header.cast())?;
    // SAFETY: the kernel wrote the header back, with rule_cnt at most what was asked.
    let written = unsafe { (*header).rule_cnt } as usize;
    // SAFETY: the buffer's u64 words are plain memory; viewing them as bytes is valid for
    // its whole length, and nothing writes to it while the view lives.
    let raw: &[u8] =
        unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), buffer.len() * 8) };
    let locations: Vec<u32> = (0..written.min(rules))
        .map(|i| {
            let start = RULE_LOCS_OFFSET + 4 * i;
            u32::from_ne_bytes([raw[start], raw[start + 1], raw[start + 2], raw[start + 3]])
        })
        .collect();
    let mut found = Vec::with_capacity(locations.len());
    for location in locations {
        let mut rule = RxNfc::command(ETHTOOL_GRXCLSRULE);
        rule.fs.location = location;
        ethtool(&socket, interface, (&mut rule as *mut RxNfc).cast())?;
        // With FLOW_RSS the union after `fs` holds the rule's RSS context.
        found.push(decode_rule(&rule.fs, rule.rule_cnt));
    }
    Ok(found)
}

/// What a rule matches and where it sends it.
fn decode_rule(fs: &FlowSpec, rss_context: u32) -> SteeringRule {
    let flags = FLOW_EXT | FLOW_MAC_EXT | FLOW_RSS;
    let flow = fs.flow_type & !flags;
    let target = if fs.ring_cookie >= RX_CLS_FLOW_WAKE
        || fs.ring_cookie & ETHTOOL_RX_FLOW_SPEC_RING_VF != 0
    {
        RuleTarget::Elsewhere
    } else if fs.flow_type & FLOW_RSS != 0 {
        RuleTarget::RssContext {
            context: rss_context,
            offset: fs.ring_cookie as u32,
        }
    } else {
        RuleTarget::Queue(fs.ring_cookie as u32)
    };
    // The destination port's offset in the flow union: after two IPv4 or two IPv6 addresses
    // and the source port. A mask of all ones means "this exact port".
    let port_at = match flow {
        TCP_V4_FLOW => Some(10),
        TCP_V6_FLOW => Some(34),
        _ => None,
    };
    let tcp_dst_port = port_at.and_then(|at: usize| {
        (fs.m_u[at..at + 2] == [0xff, 0xff])
            .then(|| u16::from_be_bytes([fs.h_u[at], fs.h_u[at + 1]]))
    });
    SteeringRule {
        location: fs.location,
        target,
        tcp_dst_port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(flow_type: u32, ring_cookie: u64, port_at: usize, mask: [u8; 2]) -> FlowSpec {
        // SAFETY: plain integers and byte arrays; all-zero is valid.
        let mut fs: FlowSpec = unsafe { std::mem::zeroed() };
        fs.flow_type = flow_type;
        fs.ring_cookie = ring_cookie;
        fs.location = 3;
        fs.h_u[port_at..port_at + 2].copy_from_slice(&9000u16.to_be_bytes());
        fs.m_u[port_at..port_at + 2].copy_from_slice(&mask);
        fs
    }

    #[test]
    fn decodes_rules() {
        let exact = decode_rule(&spec(TCP_V6_FLOW, 7, 34, [0xff, 0xff]), 0);
        assert_eq!(exact.target, RuleTarget::Queue(7));
        assert_eq!(exact.tcp_dst_port, Some(9000));
        assert_eq!(exact.location, 3);
        let v4 = decode_rule(&spec(TCP_V4_FLOW | FLOW_EXT, 2, 10, [0xff, 0xff]), 0);
        assert_eq!(
            (v4.target, v4.tcp_dst_port),
            (RuleTarget::Queue(2), Some(9000))
        );
        // A port range (partial mask) or no port: not one port.
        let range = decode_rule(&spec(TCP_V4_FLOW, 7, 10, [0xff, 0x00]), 0);
        assert_eq!(range.tcp_dst_port, None);
        let udp = decode_rule(&spec(0x02, 7, 10, [0xff, 0xff]), 0);
        assert_eq!(udp.tcp_dst_port, None);
        assert_eq!(
            decode_rule(&spec(TCP_V4_FLOW, u64::MAX, 10, [0, 0]), 0).target,
            RuleTarget::Elsewhere
        );
        assert_eq!(
            decode_rule(&spec(TCP_V4_FLOW, 1 << 32 | 7, 10, [0, 0]), 0).target,
            RuleTarget::Elsewhere
        );
        assert_eq!(
            decode_rule(&spec(TCP_V6_FLOW | FLOW_RSS, 2, 34, [0xff, 0xff]), 1).target,
            RuleTarget::RssContext {
                context: 1,
                offset: 2
            }
        );
    }

    #[test]
    fn reads_what_this_machine_answers() {
        // lo has neither an RSS table nor n-tuple rules: the driver says so, nothing breaks.
        assert!(rss_indirection("lo").is_err());
        assert!(ntuple_rules("lo").is_err());
        assert_eq!(
            rss_indirection("no-such-if0").unwrap_err().raw_os_error(),
            Some(libc::ENODEV)
        );
    }
}
