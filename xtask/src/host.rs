//! Host preparation: the Debian packages the real-kernel tier needs on the build machine, and
//! the real software (redis, nginx, curl) the proxy is tested with.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{self, step};

/// Our own apt source for bookworm-backports; we never edit the machine's own sources.
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/tokio-zcrx-backports.sources";

/// Debian packages installed on the host, with the suite they must come from.
///
/// qemu-system-x86 comes from bookworm-backports because bookworm's own conflicts with the
/// newer qemu-utils these machines ship.
const HOST_PACKAGES: &[(&str, Option<&str>)] = &[
    ("qemu-system-x86", Some("bookworm-backports")),
    ("debootstrap", None),
    ("xz-utils", None),
    ("zstd", None),
];

/// The servers and clients the `proxy` example is tested with on the host
/// (examples/tests/real_software.rs): `redis-server` and `redis-benchmark`/`redis-cli`
/// (redis-tools), `nginx` with its WebDAV module (PUT uploads), `curl`.
const REAL_SOFTWARE_PACKAGES: &[(&str, Option<&str>)] = &[
    ("redis-server", None),
    ("redis-tools", None),
    ("nginx", None),
    ("curl", None),
];

/// Debian's hook that tells package scripts whether they may start services (exit 101: no).
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// The Debian archive the machine already uses (first `URIs:` in debian.sources that serves
/// the main archive), so that new suites come from the same place.
pub(crate) fn debian_mirror() -> String {
    let candidates = [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ];
    for path in candidates {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines() {
            let line = line.trim();
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace()
                    .find(|w| w.starts_with("http") || w.starts_with("file:"))
            } else {
                None
            };
            if let Some(uri) = uri {
                if uri.trim_end_matches('/').ends_with("/debian") {
                    return uri.trim_end_matches('/').to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Makes sure the host has qemu, debootstrap and friends. Fast when all are present.
pub(crate) fn ensure_packages(start: Instant) -> Result<()> {
    ensure(HOST_PACKAGES, start)
}

/// Makes sure the host has redis, nginx and curl for the proxy's tests, without starting
/// their services (the tests run their own servers on private ports). Fast when present.
pub(crate) fn ensure_real_software(start: Instant) -> Result<()> {
    if REAL_SOFTWARE_PACKAGES
        .iter()
        .all(|(name, _)| installed(name))
    {
        return Ok(());
    }
    // The packages' scripts would start redis and nginx on their default ports and leave
    // them running; Debian's policy hook says no. Ours only if the machine has none (a
    // container usually has one that says no already), and removed again after.
    let _no_services = if Path::new(POLICY_RC_D).exists() {
        None
    } else {
        require_root("installing the proxy tests' packages with apt-get")?;
        std::fs::write(POLICY_RC_D, "#!/bin/sh\n# tokio-zcrx xtask: no service starts while it installs packages.\nexit 101\n")
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(
            POLICY_RC_D,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Some(RemoveOnDrop(POLICY_RC_D))
    };
    ensure(REAL_SOFTWARE_PACKAGES, start)
}

/// Removes a file we created, when dropped (also on an error).
struct RemoveOnDrop(&'static str);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Installs those of `packages` that are missing, each from its suite.
fn ensure(packages: &[(&str, Option<&str>)], start: Instant) -> Result<()> {
    let missing: Vec<_> = packages
        .iter()
        .filter(|(name, _)| !installed(name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root("installing host packages with apt-get")?;
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "the real-kernel tier and the proxy's tests need a Debian host (apt-get) to \
             install {:?}; this machine has no apt-get",
            missing.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
    }
    if missing.iter().any(|(_, suite)| suite.is_some()) && !Path::new(BACKPORTS_SOURCES).exists() {
        let sources = format!(
            "# Added by tokio-zcrx's xtask for qemu-system-x86 (see README).\n\
             Types: deb\nURIs: {}\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
            debian_mirror()
        );
        std::fs::write(BACKPORTS_SOURCES, sources)
            .with_context(|| format!("writing {BACKPORTS_SOURCES}"))?;
    }
    step(
        start,
        format_args!(
            "installing host packages: {}",
            missing
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(" ")
        ),
    );
    util::run_quiet(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update failed: is a Debian package mirror reachable?")?;
    for (name, suite) in missing {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
        ]);
        if let Some(suite) = suite {
            cmd.args(["-t", suite]);
        }
        cmd.arg(name);
        util::run_quiet(&mut cmd).with_context(|| format!("installing {name}"))?;
    }
    Ok(())
}

pub(crate) fn require_root(why: &str) -> Result<()> {
    if !util::is_root() {
        bail!(
            "this needs root for {why} (apt-get, debootstrap, chroot). \
             Run it as root, e.g. `sudo -E cargo xtask vm-test`."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn mirror_is_an_archive_url() {
        let mirror = super::debian_mirror();
        assert!(mirror.starts_with("http") || mirror.starts_with("file:"));
        assert!(mirror.ends_with("/debian"), "{mirror}");
    }
}
