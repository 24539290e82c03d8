//! Guest initramfs images, written directly as `newc` cpio archives.
//!
//! The kernel accepts several concatenated archives as one initramfs, so the guest image is
//! a cached base (busybox, iproute2, ethtool, modules, /init) followed by a small archive
//! per run (test binaries, examples, the run script, files the user asked for).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Collects files for one archive; directories are created implicitly.
#[derive(Default)]
pub(crate) struct Archive {
    entries: Vec<Entry>,
    dirs: BTreeSet<String>,
}

enum Entry {
    Dir(String),
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
}

impl Archive {
    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                self.entries.push(Entry::Dir(prefix.clone()));
            }
        }
    }

    pub(crate) fn dir(&mut self, path: &str) {
        let path = path.trim_start_matches('/').to_string();
        self.parents(&format!("{path}/x"));
    }

    pub(crate) fn bytes(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.parents(path);
        self.entries.push(Entry::File {
            path: path.trim_start_matches('/').to_string(),
            mode,
            data,
        });
    }

    /// Adds a host file, following symlinks (the guest gets the content).
    pub(crate) fn file(&mut self, guest_path: &str, host_path: &Path, mode: u32) -> Result<()> {
        let data = std::fs::read(host_path)
            .with_context(|| format!("reading {} for the guest", host_path.display()))?;
        self.bytes(guest_path, mode, data);
        Ok(())
    }

    /// Writes the archive (with its trailer) to `out`.
    pub(crate) fn write_to(&self, out: &mut impl Write) -> Result<()> {
        for (ino, entry) in (1u32..).zip(&self.entries) {
            let (path, mode, data): (&str, u32, &[u8]) = match entry {
                Entry::Dir(path) => (path, 0o040_755, &[]),
                Entry::File { path, mode, data } => (path, 0o100_000 | mode, data),
            };
            write_header(out, ino, mode, path, data.len())?;
            out.write_all(data)?;
            pad(out, data.len())?;
        }
        write_header(out, 0, 0, "TRAILER!!!", 0)?;
        Ok(())
    }

    pub(crate) fn write_file(&self, path: &Path) -> Result<()> {
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        self.write_to(&mut file)?;
        file.flush()?;
        Ok(())
    }
}

fn write_header(out: &mut impl Write, ino: u32, mode: u32, path: &str, size: usize) -> Result<()> {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let name_len = path.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: fixed, so archives are reproducible
        u32::try_from(size).context("file too large for cpio")?,
        0,
        0,
        0,
        0,
        u32::try_from(name_len)?,
        0,
    ];
    let mut header = String::from("070701");
    for field in fields {
        header.push_str(&format!("{field:08x}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(path.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, 110 + name_len)?;
    Ok(())
}

fn pad(out: &mut impl Write, len: usize) -> Result<()> {
    let padding = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..padding])?;
    Ok(())
}

/// Concatenates archives into one initramfs file.
pub(crate) fn concatenate(parts: &[PathBuf], out: &Path) -> Result<()> {
    let mut file = std::fs::File::create(out)?;
    for part in parts {
        let mut input =
            std::fs::File::open(part).with_context(|| format!("opening {}", part.display()))?;
        std::io::copy(&mut input, &mut file)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut archive = Archive::default();
        archive.bytes("/bin/hello", 0o755, b"hi!".to_vec());
        let mut out = Vec::new();
        archive.write_to(&mut out).unwrap();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        // The parent directory comes first, then the file and the trailer.
        let bin = text.find("bin\0").unwrap();
        let hello = text.find("bin/hello\0").unwrap();
        let trailer = text.find("TRAILER!!!\0").unwrap();
        assert!(bin < hello && hello < trailer);
        assert!(text.contains("hi!"));
    }
}
