// Module layers, lowest first. A module imports only modules of earlier layers, and the
// modules of one layer do not import each other; tests may import anything. `cargo xtask
// layers` checks it against the order in xtask/src/layers.rs, which must match this one:
// error, mode, event, privilege -> sys -> config -> buf -> send -> writer -> probe ->
// backend::wake -> backend::uring, backend::copy -> backend -> backend::select -> stream ->
// connection -> zcrx -> listener -> lib
//! io_uring zero-copy receive (zcrx) for Tokio.
//!
//! TCP payloads land straight from the NIC in the zcrx receive area; your tasks read them
//! there as [`ZcBuf`]s, with no copy, and dropping a buffer (on any thread) gives the memory
//! back to the kernel. One driver thread per registered queue owns the io_uring; streams and
//! buffers are ordinary `Send` values for any Tokio task.
//!
//! ```no_run
//! use futures::StreamExt;
//! use tokio_zcrx::{Zcrx, ZcListener};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Zero copy needs a capable NIC queue (docs/nic-setup.md); `.no_device()` runs the same
//! // code through the kernel's copy path on any socket (Linux 7.1+).
//! let zcrx = Zcrx::builder().interface("eth0", 3).build()?;
//! let listener = ZcListener::bind(&zcrx, "[::]:9000").await?;
//! let (mut stream, _reply, peer) = listener.accept().await?;
//! while let Some(buf) = stream.next().await {
//!     let buf = buf?; // bytes in the zcrx area; dropped here, returned to the kernel
//!     println!("{peer}: {} bytes", buf.len());
//! }
//! println!("copy statistics: {}", zcrx.stats());
//! # Ok(())
//! # }
//! ```
//!
//! # The API at a glance
//!
//! - [`Zcrx`]: the runtime, built with [`Zcrx::builder`] in the best [`Mode`] this machine
//!   has; [`Zcrx::subscribe`] for [`Event`]s (handle `RecvError::Lagged` and carry on),
//!   [`Zcrx::stats`].
//! - [`ZcListener`] accepts connections ([`accept`](ZcListener::accept), or
//!   [`incoming`](ZcListener::incoming) as a `Stream`); [`Zcrx::attach`] takes a connected
//!   `TcpStream`. Each connection is a [`ZcStream`] and a [`ZcWriteHalf`].
//! - [`ZcStream`] is a `futures_core::Stream` of [`ZcBuf`]s; [`next_batch`] and
//!   [`recv_many`] take what has arrived at once as a [`ZcBatch`], which returns all its
//!   buffers in one go (`recv_many` reuses the caller's batch).
//! - [`ZcBuf`] and [`ZcBatch`] are [`bytes::Buf`]s; [`ZcBuf::into_bytes`] makes a
//!   `bytes::Bytes` without a copy; [`ZcWriteHalf::write_all_buffers`] sends buffers back
//!   with vectored writes.
//! - Forwarding: [`ZcWriteHalf::send_buf`] and [`ZcWriteHalf::send_batch`] send received
//!   buffers on, to any connection of the runtime, without a copy (`IORING_OP_SENDMSG_ZC` from
//!   the registered area; each buffer goes back to the kernel after the send's
//!   notification), pipelined; in copy mode they write normally.
//! - For `tokio::io` code: [`ZcStream::into_async_read`] gives a [`ZcReader`] (`AsyncRead`,
//!   and `AsyncBufRead` that hands out the bytes in place); [`ZcConnection`] is a whole
//!   connection as one `AsyncRead + AsyncBufRead + AsyncWrite` value, for hyper, TLS,
//!   tokio-util codecs and proxies (its documentation shows each).
//!
//! [`next_batch`]: ZcStream::next_batch
//! [`recv_many`]: ZcStream::recv_many
//!
//! Layers: [`zcrx_sys`] declares the kernel interface, `zcrx_core` holds the protocol logic
//! without I/O (refill ring producer, completion decoding, accounting, event re-arming), and
//! this crate runs it. [`probe`] tells what a machine can do. See docs/architecture.md.
#![warn(missing_docs)]

#[cfg(test)]
mod api_tests;
mod backend;
mod buf;
mod config;
mod connection;
mod error;
mod event;
mod listener;
mod mode;
mod privilege;
pub mod probe;
mod send;
mod stream;
mod sys;
mod writer;
mod zcrx;

pub use buf::{ZcBatch, ZcBuf};
pub use config::{
    AreaGrowth, Builder, DriverCpus, EventsPolicy, HugePages, ParseQueueSetError, QueueSet,
    StreamOptions,
};
pub use connection::{IntoTcpStreamError, ReuniteError, ZcConnection};
pub use error::{Error, ErrorKind, Result};
pub use event::{Event, EventKind, QueueStats, Stats};
pub use listener::{Incoming, ZcListener};
pub use mode::{ActiveMode, Mode, ModeSelection, ParseModeError};
pub use privilege::{Capability, DropPrivileges};
pub use stream::{ZcReader, ZcStream};
pub use writer::ZcWriteHalf;
pub use zcrx::Zcrx;

/// Internals for the per-chunk benchmark (`bench-internals` feature): the runtime driven by a
/// synthetic completion source. Not a stable API.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod __bench {
    /// Starts a [`Zcrx`](crate::Zcrx) whose driver runs over a synthetic ring answering like
    /// Linux 7.3 on a NIC queue under steady traffic: an area of `area_chunks` 4 KiB chunks,
    /// and every stream attached to it receives `chunks_per_stream` chunks, then EOF (its
    /// socket is only a placeholder; nothing is read from it). The harness that times it is
    /// bench/src/per_chunk.rs.
    pub fn start(area_chunks: u32, chunks_per_stream: u64) -> crate::Result<crate::Zcrx> {
        crate::backend::uring::synthetic::start(area_chunks, chunks_per_stream)
    }

    /// Starts a [`Zcrx`](crate::Zcrx) of `queues` synthetic NIC queues, as
    /// `Builder::interface_queues` would on a NIC: a driver thread (`tzx-bench-qN`), area of
    /// `area_chunks` chunks and refill ring per queue, each answering as [`start`]'s. The
    /// attached sockets are dealt over the queues in turn (the first to queue 0), each
    /// receiving `chunks_per_stream` chunks on its queue's driver. `driver_linger`:
    /// `Builder::driver_linger` (`None`: the default).
    pub fn start_queues(
        queues: u32,
        area_chunks: u32,
        chunks_per_stream: u64,
        driver_linger: Option<std::time::Duration>,
    ) -> crate::Result<(crate::Zcrx, Kernels)> {
        let (zcrx, kernels) = crate::backend::uring::synthetic::start_queues(
            queues,
            area_chunks,
            chunks_per_stream,
            driver_linger,
        )?;
        Ok((zcrx, Kernels(kernels)))
    }

    /// The synthetic kernels of [`start_queues`]' queues.
    #[derive(Debug)]
    pub struct Kernels(Vec<std::sync::Arc<crate::backend::uring::synthetic::ring::Control>>);

    impl Kernels {
        /// The CPU time the driver threads have spent so far polling for returned chunks
        /// with nothing to deliver (as of each kernel's last enter): the synthetic NIC's
        /// idle spinning, which a real NIC's driver would sleep through.
        pub fn idle_poll_cpu(&self) -> std::time::Duration {
            self.0.iter().map(|k| k.report().idle_poll_cpu).sum()
        }

        /// How often the driver threads have entered their kernels so far (as of each
        /// kernel's last enter): one per turn of a driver's loop that submits or waits.
        pub fn enters(&self) -> u64 {
            self.0.iter().map(|k| k.report().enters).sum()
        }
    }
}

/// The user guides' code blocks compile too.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/nic-setup.md")]
struct NicSetupGuide;

#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct Readme;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/holding-buffers.md")]
struct HoldingBuffersGuide;
