//! Seeded fault injection at the ring boundary: the synthetic kernel asks a
//! [`FaultInjector`] at every point where a real kernel could fail, and it answers from a
//! small PRNG, so a failing seed replays exactly (as far as thread timing allows).

use std::fmt;

/// xorshift64*: small, fast, good enough to pick faults; no dependency.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        // Scramble so that seeds 0, 1, 2... start far apart (and never at zero).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `per_mille / 1000`.
    pub(crate) fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }

    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Errors a send can fail with that end the connection's byte stream.
pub(crate) const SEND_ERRORS: [i32; 3] = [libc::ECONNRESET, libc::EPIPE, libc::ETIMEDOUT];

/// How the synthetic kernel fails a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendFault {
    Short,
    NoMemory,
    Error(i32),
    /// A later SQE of the chain failed at prep: the kernel (`io_submit_fail_init`) fails
    /// this one, the head, with `-ECANCELED` before anything was sent, and the rest of the
    /// link with it.
    LinkFailedAtPrep,
}

/// Errors `io_uring_enter` can return that say "not now".
pub(crate) const ENTER_ERRORS: [i32; 3] = [libc::EINTR, libc::EAGAIN, libc::EBUSY];
/// Errors of the zcrx control calls (FLUSH_RQ, ARM_EVENT).
pub(crate) const CTRL_ERRORS: [i32; 3] = [libc::EINVAL, libc::ENXIO, libc::EFAULT];
/// Final `res` values a RECV_ZC request can end with besides EOF.
pub(crate) const RECV_ERRORS: [i32; 9] = [
    libc::ENOMEM,
    libc::ENOSPC,
    libc::EINTR,
    libc::EAGAIN,
    libc::EBUSY,
    libc::ECANCELED,
    libc::EFAULT,
    libc::ENOTCONN,
    libc::ECONNRESET,
];

/// A completion the kernel could not have meant: what the injector corrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// The offset carries another area's token.
    BadToken,
    /// The offset lies past the end of the area.
    OutsideArea,
    /// The data runs past the end of its chunk.
    CrossesChunk,
    /// The `user_data` names the stream's slot with an older generation.
    StaleUserData,
    /// Data without `IORING_CQE_F_MORE`: the data, then the end of the request.
    DataWithoutMore,
}

impl Malformed {
    pub(crate) const ALL: [Malformed; 5] = [
        Malformed::BadToken,
        Malformed::OutsideArea,
        Malformed::CrossesChunk,
        Malformed::StaleUserData,
        Malformed::DataWithoutMore,
    ];

    /// Whether the CQE still names the chunk the kernel lent for it, so that returning
    /// its offset gives the reference back (otherwise the kernel skips the return as out
    /// of range, and the chunk stays lent: leaked, on purpose or not).
    pub(crate) fn names_its_chunk(self) -> bool {
        !matches!(self, Malformed::BadToken | Malformed::OutsideArea)
    }
}

/// Which faults to inject, how often (per mille per opportunity), from which seed.
#[derive(Debug, Clone)]
pub(crate) struct FaultConfig {
    pub(crate) seed: u64,
    /// `io_uring_enter` fails (EINTR, EAGAIN, EBUSY).
    pub(crate) enter: u32,
    /// FLUSH_RQ / ARM_EVENT fail (EINVAL, ENXIO, EFAULT) where the kernel has them.
    pub(crate) ctrl: u32,
    /// A receive ends with one of [`RECV_ERRORS`] instead of delivering.
    pub(crate) recv_error: u32,
    /// A data completion is malformed in one of these ways.
    pub(crate) malformed: u32,
    pub(crate) malformed_kinds: Vec<Malformed>,
    /// Answer this errno to control calls instead of a random one.
    pub(crate) ctrl_errno: Option<i32>,
    /// At most this many control-call faults.
    pub(crate) ctrl_limit: u64,
    /// A send comes short (half its bytes; `MSG_WAITALL` then fails the link).
    pub(crate) send_short: u32,
    /// A send fails before its notification is allocated (`-ENOMEM`, no `F_MORE`).
    pub(crate) send_enomem: u32,
    /// A send fails with [`SEND_ERRORS`] (with `F_MORE` and a notification), which ends
    /// its connection's sends.
    pub(crate) send_error: u32,
    /// A send is cancelled because a later SQE of its chain failed at prep
    /// ([`SendFault::LinkFailedAtPrep`]).
    pub(crate) send_link_prep: u32,
}

impl FaultConfig {
    /// Every fault class at rates that end most streams early but not all.
    pub(crate) fn all(seed: u64) -> FaultConfig {
        FaultConfig {
            seed,
            enter: 20,
            ctrl: 100,
            recv_error: 3,
            malformed: 2,
            malformed_kinds: Malformed::ALL.to_vec(),
            ctrl_errno: None,
            ctrl_limit: u64::MAX,
            send_short: 50,
            send_enomem: 10,
            send_error: 0,
            send_link_prep: 10,
        }
    }

    /// No faults at all (set the fields wanted).
    pub(crate) fn none(seed: u64) -> FaultConfig {
        FaultConfig {
            seed,
            enter: 0,
            ctrl: 0,
            recv_error: 0,
            malformed: 0,
            malformed_kinds: Vec::new(),
            ctrl_errno: None,
            ctrl_limit: u64::MAX,
            send_short: 0,
            send_enomem: 0,
            send_error: 0,
            send_link_prep: 0,
        }
    }
}

/// Counts of what was injected, for the report and the invariants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Injected {
    pub(crate) enter_errors: u64,
    pub(crate) ctrl_errors: u64,
    pub(crate) recv_errors: u64,
    pub(crate) malformed: u64,
    /// Malformed data CQEs whose offset no longer names the lent chunk.
    pub(crate) malformed_unreturnable: u64,
    /// Of the malformed: data without F_MORE (valid data, then the request's end).
    pub(crate) without_more: u64,
    pub(crate) send_short: u64,
    pub(crate) send_enomem: u64,
    pub(crate) send_errors: u64,
    pub(crate) send_link_prep: u64,
}

impl fmt::Display for Injected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} enter errors, {} ctrl errors, {} receive errors, {} malformed CQEs ({} naming no chunk of the area)",
            self.enter_errors,
            self.ctrl_errors,
            self.recv_errors,
            self.malformed,
            self.malformed_unreturnable
        )
    }
}

/// Decides, call by call, whether and how the synthetic kernel fails.
#[derive(Debug)]
pub(crate) struct FaultInjector {
    config: FaultConfig,
    rng: Rng,
    pub(crate) injected: Injected,
}

impl FaultInjector {
    pub(crate) fn new(config: FaultConfig) -> FaultInjector {
        FaultInjector {
            rng: Rng::new(config.seed),
            config,
            injected: Injected::default(),
        }
    }

    /// An `io_uring_enter` error to answer instead of entering.
    pub(crate) fn enter(&mut self) -> Option<i32> {
        let errno = self
            .rng
            .chance(self.config.enter)
            .then(|| self.rng.pick(&ENTER_ERRORS))?;
        self.injected.enter_errors += 1;
        Some(errno)
    }

    /// An error for a control call the kernel has.
    pub(crate) fn ctrl(&mut self) -> Option<i32> {
        if self.injected.ctrl_errors >= self.config.ctrl_limit {
            return None;
        }
        let forced = self.config.ctrl_errno;
        let errno = self
            .rng
            .chance(self.config.ctrl)
            .then(|| forced.unwrap_or_else(|| self.rng.pick(&CTRL_ERRORS)))?;
        self.injected.ctrl_errors += 1;
        Some(errno)
    }

    /// A final error for a receive about to get data.
    pub(crate) fn recv_error(&mut self) -> Option<i32> {
        let errno = self
            .rng
            .chance(self.config.recv_error)
            .then(|| self.rng.pick(&RECV_ERRORS))?;
        self.injected.recv_errors += 1;
        Some(errno)
    }

    /// A corruption for the next data CQE.
    pub(crate) fn malformed(&mut self) -> Option<Malformed> {
        if self.config.malformed_kinds.is_empty() || !self.rng.chance(self.config.malformed) {
            return None;
        }
        let kind = self.rng.pick(&self.config.malformed_kinds);
        self.injected.malformed += 1;
        if !kind.names_its_chunk() {
            self.injected.malformed_unreturnable += 1;
        }
        if kind == Malformed::DataWithoutMore {
            self.injected.without_more += 1;
        }
        Some(kind)
    }

    /// A fault for the send about to run.
    pub(crate) fn send(&mut self) -> Option<SendFault> {
        if self.rng.chance(self.config.send_short) {
            self.injected.send_short += 1;
            return Some(SendFault::Short);
        }
        if self.rng.chance(self.config.send_enomem) {
            self.injected.send_enomem += 1;
            return Some(SendFault::NoMemory);
        }
        if self.rng.chance(self.config.send_link_prep) {
            self.injected.send_link_prep += 1;
            return Some(SendFault::LinkFailedAtPrep);
        }
        if self.rng.chance(self.config.send_error) {
            self.injected.send_errors += 1;
            return Some(SendFault::Error(self.rng.pick(&SEND_ERRORS)));
        }
        None
    }

    /// The PRNG, for choices that are not faults (lengths).
    pub(crate) fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }
}
