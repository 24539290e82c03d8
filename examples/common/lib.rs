//! What the tokio-zcrx examples share, apart from tokio-zcrx itself: the load generator
//! behind `loadgen` and `sink --demo`, its deterministic payload, units and signal handling.
//!
//! Each example builds its own zcrx runtime, so every use of the library is in the example.

use std::io::{self, Write};

use tokio::signal::unix::{signal, Signal, SignalKind};

pub mod load;
pub mod payload;

/// The examples' command line: `Ok(args)`, or the exit code after `--help` (0, help printed)
/// or a bad argument (2, the error and the usage line printed).
///
/// ```no_run
/// # fn parse_args() -> Result<Option<()>, lexopt::Error> { Ok(Some(())) }
/// # fn demo() -> std::process::ExitCode {
/// let args = match tokio_zcrx_examples::parse_command_line("echo", "usage: echo", "help", parse_args) {
///     Ok(args) => args,
///     Err(code) => return code,
/// };
/// # let () = args; std::process::ExitCode::SUCCESS }
/// ```
pub fn parse_command_line<T>(
    program: &str,
    usage_line: &str,
    help: &str,
    parse: impl FnOnce() -> Result<Option<T>, lexopt::Error>,
) -> Result<T, std::process::ExitCode> {
    match parse() {
        Ok(Some(args)) => Ok(args),
        Ok(None) => {
            println!("{usage_line}\n\n{help}");
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("{program}: {error}\n{usage_line} (--help for details)");
            Err(std::process::ExitCode::from(2))
        }
    }
}

/// `println!` for servers: a closed stdout (`sink | head`) loses the line instead of
/// panicking, and the server carries on until it is stopped.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say_line(format_args!($($arg)*))
    };
}

/// What [`say!`] calls.
pub fn say_line(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stdout().lock(), "{line}");
}

/// Bits per second in Gbit/s (10^9), as network people count.
pub fn gbps(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 * 8.0 / seconds / 1e9
    } else {
        0.0
    }
}

/// A byte count for people: `512 B`, `12.3 MiB`, `4.00 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// Parses a byte count with an optional binary suffix: `1000`, `64k`, `16M`, `2G` (K = 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        Some((i, 't' | 'T')) => (&text[..i], 40),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a byte count (examples: 1000, 64k, 16M, 2G)"))
}

/// SIGINT (Ctrl-C) and SIGTERM, both caught from the moment this is created, so a signal
/// that arrives before the program waits for it still stops it cleanly.
#[derive(Debug)]
pub struct ShutdownSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignals {
    /// Installs the handlers. Must be called within a Tokio runtime.
    pub fn new() -> io::Result<ShutdownSignals> {
        Ok(ShutdownSignals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM and returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_and_print() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert_eq!(parse_bytes("16M"), Ok(16 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("G").is_err());
        assert!(parse_bytes("1.5G").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.00 MiB");
    }

    #[test]
    fn gbps_counts_bits() {
        assert_eq!(gbps(125_000_000, 1.0), 1.0);
        assert_eq!(gbps(1, 0.0), 0.0);
    }
}
