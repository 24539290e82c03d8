//! Can this machine do io_uring zero-copy receive (zcrx), and on which interface?
//!
//! ```text
//! cargo run --example probe [-- [--json] [--interface IF [--queue N]] [--try-register]]
//! ```
//!
//! Prints the kernel's zcrx support and a verdict per network interface, with the fix where
//! there is one. By default it never disturbs traffic: it registers only where registration
//! must fail. `--try-register` also registers where every precondition is met, which briefly
//! restarts that NIC receive queue. `--json` prints one JSON document instead (field names in
//! the `tokio_zcrx::probe` module docs).

use std::io::Write;
use std::process::ExitCode;

use tokio_zcrx::probe::{self, ProbeOptions};
use tokio_zcrx_examples::parse_command_line;

const USAGE_LINE: &str = "usage: probe [--json] [--interface IF [--queue N]] [--try-register]";

const HELP: &str = "\
options:
  --json            print one JSON document instead of the human summary
  --interface IF    probe only interface IF (default: every interface)
  --queue N         examine rx queue N (default: the last rx queue)
  --try-register    also register where all preconditions are met; this briefly
                    restarts that rx queue (a short traffic blip)
  -h, --help        print this help";

struct Args {
    json: bool,
    options: ProbeOptions,
}

/// The command line, or `None` when help was asked for.
fn parse_args() -> Result<Option<Args>, lexopt::Error> {
    use lexopt::prelude::*;

    let mut json = false;
    let mut options = ProbeOptions::new();
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("json") => json = true,
            Long("interface") | Short('i') => {
                options = options.interface(parser.value()?.string()?);
            }
            Long("queue") | Short('q') => options = options.queue(parser.value()?.parse()?),
            Long("try-register") => options = options.try_register(true),
            Long("help") | Short('h') => return Ok(None),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Some(Args { json, options }))
}

fn main() -> ExitCode {
    let args = match parse_command_line("probe", USAGE_LINE, HELP, parse_args) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let report = probe::run(&args.options);
    let text = if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => json + "\n",
            Err(error) => {
                eprintln!("probe: cannot encode the report as JSON: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        report.to_string()
    };
    // A reader that went away (`probe | head`) has what it wanted: not an error. (Rust
    // ignores SIGPIPE, so the write fails with EPIPE, on which `print!` would panic.)
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("probe: cannot write the report: {error}");
            ExitCode::FAILURE
        }
    }
}
