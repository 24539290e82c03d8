//! Raw Linux io_uring zero-copy receive (zcrx) kernel interface.
#![deny(unsafe_op_in_unsafe_fn)]
