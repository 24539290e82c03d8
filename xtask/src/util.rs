//! Small helpers: running commands with clear failures, cache keys, stamps.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Runs a command, inheriting stdout/stderr, and fails with the command line if it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs a command quietly; on failure prints the tail of its output in the error.
pub(crate) fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        bail!(
            "`{}` failed ({}); last output:\n{}",
            show(cmd),
            out.status,
            tail_lines(&text, 30)
        );
    }
    Ok(())
}

/// Runs a command and returns its stdout as text; fails with its stderr otherwise.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            tail_lines(&String::from_utf8_lossy(&out.stderr), 30)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, echoing its stdout line by line (prefixed) while also capturing it.
///
/// `on_line` sees every line as it arrives, so callers can show progress and parse results
/// without waiting for the end. Returns the exit success and the captured text.
pub(crate) fn run_streaming(
    cmd: &mut Command,
    mut on_line: impl FnMut(&str),
) -> Result<(bool, String)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut captured = String::new();
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if reader.read_until(b'\n', &mut raw)? == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\n', '\r']);
        on_line(line);
        captured.push_str(line);
        captured.push('\n');
    }
    let status = child.wait()?;
    Ok((status.success(), captured))
}

/// The command line, for messages.
pub(crate) fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Prints a progress step with the elapsed time since `start`.
pub(crate) fn step(start: Instant, what: impl std::fmt::Display) {
    println!("[xtask {:>6.1}s] {what}", start.elapsed().as_secs_f64());
    let _ = std::io::stdout().flush();
}

/// A stable 64-bit FNV-1a digest, for cache keys (not for security).
#[derive(Clone)]
pub(crate) struct CacheKey(u64);

impl CacheKey {
    pub(crate) fn new(domain: &str) -> Self {
        let mut key = CacheKey(0xcbf2_9ce4_8422_2325);
        key.add(domain.as_bytes());
        key
    }

    pub(crate) fn add(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate fields so ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        self
    }

    pub(crate) fn add_str(&mut self, s: impl AsRef<OsStr>) -> &mut Self {
        self.add(s.as_ref().as_encoded_bytes())
    }

    pub(crate) fn add_file(&mut self, path: &Path) -> Result<&mut Self> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(self.add(&bytes))
    }

    pub(crate) fn hex(&self) -> String {
        let mut s = String::new();
        let _ = write!(s, "{:016x}", self.0);
        s
    }
}

/// The project's cache root, outside the clone so fresh clones reuse downloads and builds.
pub(crate) fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("TZX_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("tokio-zcrx")
}

/// A directory whose contents are complete once its stamp file exists.
///
/// Builds write into the directory and call [`Stamped::finish`] last, so an interrupted build
/// is redone instead of trusted.
pub(crate) struct Stamped {
    pub dir: PathBuf,
}

impl Stamped {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Stamped { dir }
    }

    fn stamp(&self) -> PathBuf {
        self.dir.join(".tzx-complete")
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.stamp().exists()
    }

    /// Empties the directory for a fresh build.
    pub(crate) fn reset(&self) -> Result<()> {
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)
                .with_context(|| format!("removing stale {}", self.dir.display()))?;
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        Ok(())
    }

    pub(crate) fn finish(&self) -> Result<()> {
        std::fs::write(self.stamp(), b"")
            .with_context(|| format!("writing {}", self.stamp().display()))
    }
}

/// The workspace root (the parent of this crate's directory).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_separates_fields() {
        let a = CacheKey::new("t").add(b"ab").add(b"c").hex();
        let b = CacheKey::new("t").add(b"a").add(b"bc").hex();
        assert_ne!(a, b);
        assert_eq!(a, CacheKey::new("t").add(b"ab").add(b"c").hex());
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
    }
}
