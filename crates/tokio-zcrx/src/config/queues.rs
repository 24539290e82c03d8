//! Several receive queues of one interface ([`QueueSet`]) and where their driver threads run
//! ([`DriverCpus`]).

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::str::FromStr;

/// Which receive queues of an interface a runtime binds ([`Builder::interface_queues`]):
/// all of them, a range or a list. Each queue gets its own zcrx binding, area and driver
/// thread; accepted connections go to the queue their flow arrives on (docs/architecture.md,
/// "Several queues").
///
/// Parses from the command-line forms `all`, `A-B` (both included), `A,B,...` and `N`:
///
/// ```
/// use tokio_zcrx::QueueSet;
///
/// assert_eq!("all".parse::<QueueSet>().unwrap(), QueueSet::All);
/// assert_eq!("2-5".parse::<QueueSet>().unwrap(), QueueSet::from(2..=5));
/// assert_eq!("0,3".parse::<QueueSet>().unwrap(), QueueSet::from(vec![0, 3]));
/// assert_eq!("7".parse::<QueueSet>().unwrap(), QueueSet::from(7));
/// assert_eq!(QueueSet::from(0..4).queues(8), vec![0, 1, 2, 3]);
/// assert_eq!(QueueSet::All.queues(3), vec![0, 1, 2]);
/// assert!("3-1".parse::<QueueSet>().is_err());
/// ```
///
/// [`Builder::interface_queues`]: crate::Builder::interface_queues
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueSet {
    /// Every receive queue the interface has when the runtime starts.
    All,
    /// The queues from the first to the last index, both included.
    Range(RangeInclusive<u32>),
    /// These queues (duplicates are bound once).
    List(Vec<u32>),
}

impl QueueSet {
    /// The queue indices this set names on an interface with `available` receive queues,
    /// ascending, without duplicates. Indices at or beyond `available` are kept: binding them
    /// fails with [`ErrorKind::QueueOutOfRange`](crate::ErrorKind::QueueOutOfRange), which
    /// says so.
    pub fn queues(&self, available: u32) -> Vec<u32> {
        let mut queues: Vec<u32> = match self {
            QueueSet::All => (0..available).collect(),
            QueueSet::Range(range) => range.clone().collect(),
            QueueSet::List(list) => list.clone(),
        };
        queues.sort_unstable();
        queues.dedup();
        queues
    }

    /// The one queue this set names, if it names exactly one without looking at the
    /// interface.
    pub(crate) fn single(&self) -> Option<u32> {
        match self {
            QueueSet::All => None,
            set => match set.queues(0).as_slice() {
                [queue] => Some(*queue),
                _ => None,
            },
        }
    }
}

impl From<u32> for QueueSet {
    fn from(queue: u32) -> QueueSet {
        QueueSet::List(vec![queue])
    }
}

impl From<Range<u32>> for QueueSet {
    fn from(range: Range<u32>) -> QueueSet {
        match range.end.checked_sub(1) {
            Some(last) if range.start <= last => QueueSet::Range(range.start..=last),
            _ => QueueSet::List(Vec::new()),
        }
    }
}

impl From<RangeInclusive<u32>> for QueueSet {
    fn from(range: RangeInclusive<u32>) -> QueueSet {
        QueueSet::Range(range)
    }
}

impl From<Vec<u32>> for QueueSet {
    fn from(list: Vec<u32>) -> QueueSet {
        QueueSet::List(list)
    }
}

impl<const N: usize> From<[u32; N]> for QueueSet {
    fn from(list: [u32; N]) -> QueueSet {
        QueueSet::List(list.to_vec())
    }
}

impl fmt::Display for QueueSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueSet::All => f.write_str("all"),
            QueueSet::Range(range) => write!(f, "{}-{}", range.start(), range.end()),
            QueueSet::List(list) => {
                for (i, queue) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{queue}")?;
                }
                Ok(())
            }
        }
    }
}

/// The error of parsing a [`QueueSet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseQueueSetError(String);

impl fmt::Display for ParseQueueSetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a set of queues: expected all, A-B (A <= B), A,B,... or N",
            self.0
        )
    }
}

impl std::error::Error for ParseQueueSetError {}

impl FromStr for QueueSet {
    type Err = ParseQueueSetError;

    fn from_str(s: &str) -> Result<QueueSet, ParseQueueSetError> {
        let error = || ParseQueueSetError(s.to_owned());
        let s = s.trim();
        if s == "all" {
            return Ok(QueueSet::All);
        }
        if let Some((first, last)) = s.split_once('-') {
            let first: u32 = first.trim().parse().map_err(|_| error())?;
            let last: u32 = last.trim().parse().map_err(|_| error())?;
            if first > last {
                return Err(error());
            }
            return Ok(QueueSet::Range(first..=last));
        }
        let list = s
            .split(',')
            .map(|queue| queue.trim().parse::<u32>())
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|_| error())?;
        Ok(QueueSet::List(list))
    }
}

/// Where each queue's driver thread runs ([`Builder::driver_cpus`]).
///
/// ```
/// use tokio_zcrx::{DriverCpus, Zcrx};
///
/// // Queues 0-3 of eth0, their drivers on CPUs 8, 9, 10 and 11.
/// let builder = Zcrx::builder()
///     .interface_queues("eth0", 0..4)
///     .driver_cpus(DriverCpus::Cpus(vec![8, 9, 10, 11]));
/// # drop(builder);
/// ```
///
/// [`Builder::driver_cpus`]: crate::Builder::driver_cpus
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DriverCpus {
    /// On the CPUs the queue's interrupt is steered to, where the system says: the queue's
    /// NAPI instance (`netdev` netlink) names its IRQ, and
    /// `/proc/irq/N/effective_affinity_list` (or `smp_affinity_list`) its CPUs. A queue
    /// whose interrupt is unknown (netdevsim, a device without one per queue) runs where the
    /// scheduler puts it. The default.
    #[default]
    NearInterrupt,
    /// Wherever the scheduler puts them.
    Anywhere,
    /// The i-th queue of the set (ascending) on CPU `cpus[i % cpus.len()]`.
    Cpus(Vec<usize>),
}
