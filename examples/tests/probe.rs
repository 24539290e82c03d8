//! The `probe` tool as a program: its report read whole, and written into a pipe whose
//! reader has gone (`probe | head`), which must end the program quietly, not in a panic.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};

#[test]
fn the_probe_prints_its_report_and_exits_quietly_into_a_closed_pipe() {
    let probe = support::example_binary("probe");
    for args in [&[][..], &["--json"][..]] {
        // Read whole: a report.
        let output = Command::new(&probe).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "probe {args:?}: {output:?}");
        assert!(
            stdout.contains("kernel"),
            "probe {args:?} printed: {stdout}"
        );

        // Into a pipe closed before the first write: Rust ignores SIGPIPE, so every write
        // fails with EPIPE, on which `print!` panics.
        let mut child = Command::new(&probe)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success() && !stderr.contains("panicked"),
            "probe {args:?} into a closed pipe: {status}, stderr: {stderr}"
        );
    }
}
