//! Helpers shared by the real-kernel tests.
