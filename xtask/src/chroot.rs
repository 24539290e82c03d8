//! A Debian trixie build root.
//!
//! The guest kernels come from trixie-backports and their headers were built with gcc-14,
//! which bookworm lacks, so netdevsim is built in a trixie chroot. The same chroot supplies
//! the guest's userland (busybox, iproute2, ethtool) and downloads the kernel packages.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::host;
use crate::util::{self, step, CacheKey, Stamped};

const SUITE: &str = "trixie";

/// Packages every run needs; kernel headers and sources are added per kernel version.
const BASE_PACKAGES: &[&str] = &[
    "make",
    "patch",
    "pahole",
    "xz-utils",
    "kmod",
    "busybox-static",
    "iproute2",
    "ethtool",
];

/// Package lists older than this are refreshed, so a new guest kernel is noticed.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

pub(crate) struct Chroot {
    pub root: PathBuf,
}

impl Chroot {
    /// Creates (or reuses) the chroot. Keyed by suite and package list.
    pub(crate) fn ensure(start: Instant) -> Result<Chroot> {
        let mut key = CacheKey::new("chroot-v1");
        key.add_str(SUITE);
        for p in BASE_PACKAGES {
            key.add_str(p);
        }
        let stamped = Stamped::new(
            util::cache_root()
                .join("chroot")
                .join(format!("{SUITE}-{}", key.hex())),
        );
        let chroot = Chroot {
            root: stamped.dir.clone(),
        };
        if stamped.is_complete() {
            chroot.refresh_lists_if_old(start)?;
            return Ok(chroot);
        }
        host::require_root("creating the trixie build chroot")?;
        stamped.reset()?;
        let mirror = host::debian_mirror();
        step(
            start,
            format_args!(
                "creating a {SUITE} build chroot in {} (debootstrap, about a minute)",
                chroot.root.display()
            ),
        );
        util::run_quiet(
            Command::new("debootstrap")
                .args(["--variant=minbase", SUITE])
                .arg(&chroot.root)
                .arg(&mirror),
        )
        .context("debootstrap of the trixie build chroot failed")?;
        std::fs::write(
            chroot
                .root
                .join("etc/apt/sources.list.d/tzx-backports.sources"),
            format!(
                "Types: deb\nURIs: {mirror}\nSuites: {SUITE}-backports\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )?;
        chroot.apt_update()?;
        step(start, "installing build tools in the chroot");
        chroot.apt_install(BASE_PACKAGES)?;
        stamped.finish()?;
        Ok(chroot)
    }

    fn refresh_lists_if_old(&self, start: Instant) -> Result<()> {
        let lists = self.root.join("var/lib/apt/lists");
        let newest = std::fs::read_dir(&lists)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
            .max();
        let stale = newest
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|age| age > LISTS_MAX_AGE);
        if stale {
            step(start, "refreshing the chroot's package lists");
            self.apt_update()?;
        }
        Ok(())
    }

    fn apt_update(&self) -> Result<()> {
        util::run_quiet(&mut self.command(&["apt-get", "update", "-q"]))
            .context("apt-get update in the trixie chroot failed: is the Debian mirror reachable?")
    }

    pub(crate) fn apt_install(&self, packages: &[&str]) -> Result<()> {
        let mut args = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
        args.extend_from_slice(packages);
        util::run_quiet(&mut self.command(&args))
            .with_context(|| format!("installing {packages:?} in the trixie chroot"))
    }

    /// A command run inside the chroot with /proc mounted in a private mount namespace, so
    /// nothing stays mounted when it ends (objtool needs /proc; apt likes it).
    pub(crate) fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "chroot"])
            .arg(&self.root)
            .args([
                "/bin/sh",
                "-c",
                "mount -t proc proc /proc && exec \"$@\"",
                "sh",
            ])
            .args(argv)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C.UTF-8")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd
    }

    /// A path inside the chroot, as seen from the host.
    pub(crate) fn host_path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// Shared libraries (as paths inside the chroot) that a chroot binary needs.
    pub(crate) fn shared_libraries(&self, binary: &str) -> Result<Vec<String>> {
        let text = util::output(&mut self.command(&["ldd", binary]))
            .with_context(|| format!("ldd {binary} in the chroot"))?;
        Ok(parse_ldd(&text))
    }
}

/// Extracts the library paths from `ldd` output (`name => /path (addr)` or `/path (addr)`).
fn parse_ldd(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::parse_ldd;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libmnl.so.0",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }
}
