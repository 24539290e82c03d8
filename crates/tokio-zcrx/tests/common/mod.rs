//! Helpers shared by the copy-mode host tests (each test binary uses some of them).
#![allow(dead_code)]

use tokio::net::{TcpListener, TcpStream};
use tokio_zcrx::{ActiveMode, Mode, StreamOptions, ZcStream, ZcWriteHalf, Zcrx};

/// The byte at `pos` of connection `seed`'s payload.
pub(crate) fn pattern(seed: u64, pos: u64) -> u8 {
    let x = (pos ^ seed.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// A splitmix64 generator: reproducible sizes and choices.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A copy-mode runtime with a pool of `buffers` x `size` bytes that never hands out more
/// than that (the memory limit is the recycled set), so streams wait when all are held, and
/// without per-stream budgets, so that the pool alone decides when a stream waits (budgets
/// are tested in copy_elastic.rs).
pub(crate) fn copy_runtime(buffers: u32, size: usize) -> Zcrx {
    let zcrx = Zcrx::builder()
        .mode(Mode::Copy)
        .copy_pool(buffers, size)
        .copy_memory_limit(u64::from(buffers) * size as u64)
        .stream_budget(u64::MAX)
        .build()
        .unwrap();
    assert_eq!(zcrx.mode(), ActiveMode::Copy);
    zcrx
}

/// An attached loopback connection: the server side's stream and write half, and the client.
pub(crate) async fn attached(
    zcrx: &Zcrx,
    options: StreamOptions,
) -> (ZcStream, ZcWriteHalf, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (socket, _) = listener.accept().await.unwrap();
    let (stream, writer) = zcrx.attach_with(socket, options).unwrap();
    (stream, writer, client)
}
