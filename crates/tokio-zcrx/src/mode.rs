//! Receive modes, and how `auto` chooses one.

use std::fmt;
use std::str::FromStr;

/// How a runtime receives. See [`Builder::mode`](crate::Builder::mode).
///
/// | mode | needs | copies |
/// |---|---|---|
/// | `Nic` | Linux 6.15+, a capable NIC queue (docs/nic-setup.md), `CAP_NET_ADMIN` | none (zero copy) |
/// | `NoDevice` | Linux 7.1+, `CAP_NET_ADMIN` | the kernel copies into the zcrx area |
/// | `Copy` | nothing but Tokio (no io_uring) | reads copy into a buffer pool |
/// | `Auto` | | the first of `Nic` (if an interface is given), `NoDevice`, `Copy` that works |
///
/// ```
/// use tokio_zcrx::Mode;
///
/// let mode: Mode = "nodev".parse().unwrap();
/// assert_eq!(mode, Mode::NoDevice);
/// assert_eq!(mode.to_string(), "nodev");
/// assert!("zerocopy".parse::<Mode>().is_err());
/// ```
///
/// `#[non_exhaustive]`: a later kernel may bring another way to receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Mode {
    /// Try `Nic` (when an interface is given), then `NoDevice`, then `Copy`; the runtime
    /// reports which it chose and why the others were refused ([`Zcrx::mode_selection`]).
    ///
    /// [`Zcrx::mode_selection`]: crate::Zcrx::mode_selection
    #[default]
    Auto,
    /// Zero copy on the NIC receive queue given with [`Builder::interface`](crate::Builder::interface);
    /// fail if it cannot be registered.
    Nic,
    /// The kernel's device-less zcrx mode (Linux 7.1+): same kernel path, every byte copied.
    NoDevice,
    /// No io_uring: Tokio readiness and a bounded buffer pool.
    Copy,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Nic => "nic",
            Mode::NoDevice => "nodev",
            Mode::Copy => "copy",
        })
    }
}

/// The error of parsing a [`Mode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseModeError(String);

impl fmt::Display for ParseModeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown mode {:?}: expected auto, nic, nodev or copy",
            self.0
        )
    }
}

impl std::error::Error for ParseModeError {}

impl FromStr for Mode {
    type Err = ParseModeError;

    fn from_str(s: &str) -> Result<Mode, ParseModeError> {
        match s {
            "auto" => Ok(Mode::Auto),
            "nic" => Ok(Mode::Nic),
            "nodev" | "no-device" | "nodevice" => Ok(Mode::NoDevice),
            "copy" => Ok(Mode::Copy),
            other => Err(ParseModeError(other.to_string())),
        }
    }
}

/// The mode a runtime actually runs in. With the `serde` feature it serializes as its
/// `Display` name (`"nic"`, `"nodev"`, `"copy"`). `#[non_exhaustive]`, as [`Mode`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub enum ActiveMode {
    /// Zero copy on a NIC queue.
    #[cfg_attr(feature = "serde", serde(rename = "nic"))]
    Nic,
    /// The kernel's device-less zcrx mode.
    #[cfg_attr(feature = "serde", serde(rename = "nodev"))]
    NoDevice,
    /// Copy mode, without io_uring.
    #[cfg_attr(feature = "serde", serde(rename = "copy"))]
    Copy,
}

impl ActiveMode {
    /// Whether received bytes arrive without a copy (only on a NIC queue, and only for
    /// traffic the NIC steers to it; see the statistics).
    pub fn is_zero_copy(self) -> bool {
        self == ActiveMode::Nic
    }
}

impl fmt::Display for ActiveMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActiveMode::Nic => "nic",
            ActiveMode::NoDevice => "nodev",
            ActiveMode::Copy => "copy",
        })
    }
}

/// Which mode a runtime chose, and why each better one was refused.
///
/// Displays as e.g. `copy (nic: no interface given; nodev: device-less mode needs Linux 7.1
/// or later; this kernel is 6.18.44)`.
///
/// Built by [`Builder::build`](crate::Builder::build), read with
/// [`Zcrx::mode_selection`](crate::Zcrx::mode_selection); `#[non_exhaustive]`, so it can say
/// more in a later version.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModeSelection {
    /// The mode in use.
    pub chosen: ActiveMode,
    /// Modes tried (or skipped) before it, each with the reason in plain words.
    pub refused: Vec<(Mode, String)>,
    /// What was asked for and the chosen mode does without on this kernel, in plain words
    /// (with [`Mode::Auto`]: e.g. [`Builder::area_growth`](crate::Builder::area_growth)
    /// before Linux 7.3, where the area stays at its initial size).
    pub unavailable: Vec<String>,
    /// In nic mode, the receive queues bound, ascending (one for
    /// [`Builder::interface`](crate::Builder::interface); those of the set for
    /// [`Builder::interface_queues`](crate::Builder::interface_queues) that could be).
    /// Empty in the other modes.
    pub queues_bound: Vec<u32>,
    /// In nic mode with [`Mode::Auto`], the queues of the set that could not be bound, each
    /// with the reason (their connections are received in copy mode).
    pub queues_refused: Vec<(u32, String)>,
}

impl ModeSelection {
    pub(crate) fn new(chosen: ActiveMode, refused: Vec<(Mode, String)>) -> ModeSelection {
        ModeSelection {
            chosen,
            refused,
            unavailable: Vec::new(),
            queues_bound: Vec::new(),
            queues_refused: Vec::new(),
        }
    }
}

impl fmt::Display for ModeSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.chosen)?;
        if !self.refused.is_empty() {
            f.write_str(" (")?;
            for (i, (mode, reason)) in self.refused.iter().enumerate() {
                if i > 0 {
                    f.write_str("; ")?;
                }
                write!(f, "{mode}: {reason}")?;
            }
            f.write_str(")")?;
        }
        match self.queues_bound.as_slice() {
            [] | [_] if self.queues_refused.is_empty() => {}
            bound => {
                let list: Vec<String> = bound.iter().map(u32::to_string).collect();
                write!(f, "; queues {} bound", list.join(", "))?;
            }
        }
        for (queue, reason) in &self.queues_refused {
            write!(f, "; queue {queue} refused: {reason}")?;
        }
        for missing in &self.unavailable {
            write!(f, "; without {missing}")?;
        }
        Ok(())
    }
}
