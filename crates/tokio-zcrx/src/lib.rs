//! io_uring zero-copy receive (zcrx) for Tokio.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod probe;
