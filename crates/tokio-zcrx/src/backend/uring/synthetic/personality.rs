//! Kernel personalities: which zcrx kernel a synthetic kernel answers like.
//!
//! Each personality states what that kernel has (control ops, query, events, NODEV, the
//! refill-ring header) and how it behaves where kernels differ (when refill entries are
//! consumed, what a missing control op answers, the teardown order). The driver gets the
//! [`Capabilities`] it would detect on that kernel, derived from the personality's query
//! answer by the same rules `instance::register` applies to the real one. Facts from
//! /work/shared/zcrx-kernel.md and io_uring/zcrx.c.

use zcrx_core::query::QueryFeatures;
use zcrx_sys::query::io_uring_query_zcrx;

use super::super::ring::Capabilities;

/// A kernel (range) the synthetic kernel answers like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Personality {
    /// 6.15-6.18: no `IORING_REGISTER_ZCRX_CTRL` (FLUSH_RQ and ARM_EVENT answer EINVAL), no
    /// zcrx query, no events, NIC mode only. The refill ring is consumed only when the page
    /// pool needs buffers; copy-path traffic (loopback, other queues) that finds no free
    /// chunk ends its request with `-ENOMEM`. Ring teardown hands user-held chunks back to
    /// the live page pool before it stops the queue. Refill entries at offset 64 (6.18's
    /// header; 6.15-6.17 used 8, which the driver reads from the reported offsets anyway).
    Linux6_18,
    /// 7.1: query, ZCRX_CTRL (FLUSH_RQ, EXPORT), NODEV; in NODEV mode the refill ring is
    /// consumed only on FLUSH_RQ. No events.
    Linux7_1,
    /// 7.2: as 7.1 plus events: COPY fires once per arm (copy_count/copy_bytes counted in
    /// the shared stats), ALLOC_FAIL in NIC mode when the page pool finds no chunk;
    /// ARM_EVENT on a type that has not fired answers EINVAL.
    Linux7_2,
    /// 7.3: as 7.2, with the new refill header (entries at offset 128) and the ADD_AREA
    /// control op.
    Linux7_3,
}

/// How the queue was registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Registration {
    /// A NIC rx queue: data arrives zero-copy into page-pool chunks, or through the copy
    /// path for traffic that reaches the socket another way.
    Nic,
    /// `ZCRX_REG_NODEV` (7.1+): everything goes through the copy path.
    NoDevice,
}

/// The `IO_URING_QUERY_ZCRX` answer of a personality (fields of `io_uring_query_zcrx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueryAnswer {
    pub(crate) register_flags: u64,
    pub(crate) nr_ctrl_opcodes: u32,
    pub(crate) features: u32,
    pub(crate) rq_hdr_size: u32,
}

/// `ZCRX_CTRL` operations, in opcode order.
pub(crate) const CTRL_OPS: [&str; 4] = ["FLUSH_RQ", "EXPORT", "ARM_EVENT", "ADD_AREA"];

impl Personality {
    /// Every personality, oldest first.
    pub(crate) const ALL: [Personality; 4] = [
        Personality::Linux6_18,
        Personality::Linux7_1,
        Personality::Linux7_2,
        Personality::Linux7_3,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Personality::Linux6_18 => "6.15-6.18",
            Personality::Linux7_1 => "7.1",
            Personality::Linux7_2 => "7.2",
            Personality::Linux7_3 => "7.3",
        }
    }

    /// What the zcrx query answers; `None`: the query does not exist (EOPNOTSUPP).
    pub(crate) fn query(self) -> Option<QueryAnswer> {
        let (nr_ctrl_opcodes, features) = match self {
            Personality::Linux6_18 => return None,
            // RX_PAGE_SIZE since 7.0, EVENT since 7.2.
            Personality::Linux7_1 => (2, 1),
            Personality::Linux7_2 => (3, 1 | 2),
            Personality::Linux7_3 => (4, 1 | 2),
        };
        Some(QueryAnswer {
            // IMPORT | NODEV.
            register_flags: 1 | 2,
            nr_ctrl_opcodes,
            features,
            // Before 7.3 the query reports the bare header (`sizeof(struct io_uring)`, 8),
            // not where the entries start (64): the 7.2.12 guest answers 8. 7.3 reports its
            // padded header, 128, which is also the entries' offset.
            rq_hdr_size: match self {
                Personality::Linux7_3 => 128,
                _ => 8,
            },
        })
    }

    /// The control ops this kernel knows (`ZCRX_CTRL` opcodes below `nr_ctrl_opcodes`).
    pub(crate) fn ctrl_ops(self) -> &'static [&'static str] {
        let n = self.query().map_or(0, |q| q.nr_ctrl_opcodes as usize);
        &CTRL_OPS[..n]
    }

    /// `IORING_REGISTER_ZCRX_CTRL` exists (FLUSH_RQ works).
    pub(crate) fn has_ctrl(self) -> bool {
        !self.ctrl_ops().is_empty()
    }

    /// The query's answer decoded as the runtime decodes the real one.
    fn query_features(self) -> Option<QueryFeatures> {
        self.query().map(|q| {
            QueryFeatures::decode(&io_uring_query_zcrx {
                register_flags: q.register_flags,
                nr_ctrl_opcodes: q.nr_ctrl_opcodes,
                features: q.features,
                rq_hdr_size: q.rq_hdr_size,
                ..Default::default()
            })
        })
    }

    /// Events and shared stats can be registered (ARM_EVENT exists too).
    pub(crate) fn has_events(self) -> bool {
        self.query_features().is_some_and(|f| f.events())
    }

    /// `ZCRX_REG_NODEV` is accepted.
    pub(crate) fn supports(self, registration: Registration) -> bool {
        registration == Registration::Nic || self.query().is_some_and(|q| q.register_flags & 2 != 0)
    }

    /// Where the refill entries start in the region (head at 0, tail at 4).
    pub(crate) fn rqes_offset(self) -> usize {
        match self {
            Personality::Linux7_3 => 128,
            _ => 64,
        }
    }

    /// What the driver detects on this kernel: the same rules as `instance::register`
    /// (ctrl: the query reports control ops; events: asked for and supported; teardown
    /// stops the queue first from 6.19, i.e. wherever the query exists).
    pub(crate) fn capabilities(self, events_requested: bool) -> Capabilities {
        let events = events_requested && self.has_events();
        Capabilities::detected(self.query_features().as_ref(), events)
    }
}

impl std::fmt::Display for Personality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table the docs state, checked: what each personality has.
    #[test]
    fn each_personality_states_its_kernel() {
        let table: Vec<_> = Personality::ALL
            .iter()
            .map(|p| {
                let caps = p.capabilities(true);
                (
                    p.name(),
                    caps.ctrl,
                    caps.events,
                    caps.teardown_stops_queue_first,
                    p.supports(Registration::NoDevice),
                    p.rqes_offset(),
                    p.ctrl_ops().len(),
                )
            })
            .collect();
        assert_eq!(
            table,
            [
                ("6.15-6.18", false, false, false, false, 64, 0),
                ("7.1", true, false, true, true, 64, 2),
                ("7.2", true, true, true, true, 64, 3),
                ("7.3", true, true, true, true, 128, 4),
            ]
        );
        assert!(Personality::Linux7_3.ctrl_ops().contains(&"ADD_AREA"));
        assert!(!Personality::Linux7_2.capabilities(false).events);
    }
}
