//! The guest kernel: choosing a Debian kernel >= 7.2, unpacking it, and building the
//! patched netdevsim module against it.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::chroot::{file_name, Chroot};
use crate::util::{self, step, CacheKey, Stamped};

/// The oldest kernel with everything the tests use (zcrx events and stats).
const MIN_VERSION: (u32, u32) = (7, 2);

/// Environment variable that pins the guest kernel, e.g. `7.3.4+deb13-amd64`.
pub(crate) const PIN_ENV: &str = "TZX_GUEST_KERNEL";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelVersion {
    /// Debian's ABI name, e.g. `7.3.4+deb13-amd64`: also the kernel's `uname -r`.
    pub abi: String,
    pub numbers: (u32, u32, u32),
}

impl KernelVersion {
    /// Parses the ABI name of a plain amd64 flavour (not -cloud, -rt or debug packages).
    pub(crate) fn parse_abi(abi: &str) -> Option<KernelVersion> {
        let base = abi.strip_suffix("-amd64")?;
        if base.ends_with("-cloud") || base.ends_with("-rt") {
            return None;
        }
        let numeric = base.split(['+', '-']).next()?;
        let mut parts = numeric.split('.').map(|p| p.parse::<u32>().ok());
        let numbers = (parts.next()??, parts.next()??, parts.next()??);
        if parts.next().is_some() {
            return None;
        }
        Some(KernelVersion {
            abi: abi.to_string(),
            numbers,
        })
    }

    pub(crate) fn series(&self) -> String {
        format!("{}.{}", self.numbers.0, self.numbers.1)
    }
}

/// Picks the newest kernel >= 7.2 for which we have a netdevsim patch.
pub(crate) fn choose(available: &[String], patched_series: &[String]) -> Result<KernelVersion> {
    let mut candidates: Vec<KernelVersion> = available
        .iter()
        .filter_map(|abi| KernelVersion::parse_abi(abi))
        .filter(|k| (k.numbers.0, k.numbers.1) >= MIN_VERSION)
        .collect();
    candidates.sort_by(|a, b| b.numbers.cmp(&a.numbers).then(Ordering::Equal));
    if candidates.is_empty() {
        bail!(
            "no Debian kernel >= {}.{} found in trixie-backports (saw {} kernel packages). \
             The real-kernel tier needs one; check the mirror, or pin one with {PIN_ENV}=ABI \
             (e.g. 7.3.4+deb13-amd64) if it is still in the archive.",
            MIN_VERSION.0,
            MIN_VERSION.1,
            available.len()
        );
    }
    candidates
        .iter()
        .find(|k| patched_series.contains(&k.series()))
        .cloned()
        .with_context(|| {
            format!(
                "the newest guest kernels ({}) have no netdevsim patch in vm/netdevsim/ \
                 (patched series: {}). Port the patch to the new series, or pin an older \
                 kernel with {PIN_ENV}=ABI.",
                candidates
                    .iter()
                    .take(3)
                    .map(|k| k.abi.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                patched_series.join(", ")
            )
        })
}

/// The kernel series for which `vm/netdevsim/<series>/` holds a patch.
pub(crate) fn patched_series() -> Result<Vec<String>> {
    let dir = util::workspace_root().join("vm/netdevsim");
    let mut series = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.path().join("netdevsim-zcrx.patch").exists() {
            series.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    series.sort();
    Ok(series)
}

/// Everything the guest needs from the kernel side.
pub(crate) struct GuestKernel {
    pub version: KernelVersion,
    pub vmlinuz: PathBuf,
    /// Modules to load in order (dependencies first), uncompressed.
    pub modules: Vec<PathBuf>,
}

/// Chooses, downloads and unpacks the guest kernel, and builds netdevsim for it.
pub(crate) fn prepare(chroot: &Chroot, start: Instant) -> Result<GuestKernel> {
    let version = match std::env::var(PIN_ENV) {
        Ok(abi) => KernelVersion::parse_abi(&abi).with_context(|| {
            format!("{PIN_ENV}={abi} is not a Debian amd64 kernel ABI like 7.3.4+deb13-amd64")
        })?,
        Err(_) => {
            let names = util::output(&mut chroot.command(&["apt-cache", "pkgnames", "linux-"]))?;
            let available: Vec<String> = names
                .lines()
                .filter_map(|n| n.strip_prefix("linux-binary-"))
                .map(str::to_string)
                .collect();
            choose(&available, &patched_series()?)?
        }
    };
    step(start, format_args!("guest kernel: {}", version.abi));
    let package_version = package_version(chroot, &version)?;
    let unpacked = unpack_kernel(chroot, &version, &package_version, start)?;
    let netdevsim = build_netdevsim(chroot, &version, &package_version, start)?;
    let vmlinuz = find_file(&unpacked, |p| file_name(p).starts_with("vmlinuz"))?
        .context("the kernel package holds no vmlinuz")?;
    let modules = module_load_order(chroot, &unpacked, &netdevsim)?;
    Ok(GuestKernel {
        version,
        vmlinuz,
        modules,
    })
}

fn package_version(chroot: &Chroot, version: &KernelVersion) -> Result<String> {
    let package = format!("linux-binary-{}", version.abi);
    let text =
        util::output(&mut chroot.command(&["apt-cache", "show", "--no-all-versions", &package]))
            .with_context(|| {
                format!("{package} is not in the archive: pick another with {PIN_ENV} or unset it")
            })?;
    text.lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_string)
        .with_context(|| format!("apt-cache show {package} gave no version"))
}

/// Downloads the kernel image and modules packages and unpacks them (cached per version).
fn unpack_kernel(
    chroot: &Chroot,
    version: &KernelVersion,
    package_version: &str,
    start: Instant,
) -> Result<PathBuf> {
    let stamped = Stamped::new(
        util::cache_root()
            .join("kernel")
            .join(format!("{}_{package_version}", version.abi)),
    );
    if stamped.is_complete() {
        return Ok(stamped.dir);
    }
    stamped.reset()?;
    step(
        start,
        format_args!(
            "downloading kernel {} ({package_version}) packages",
            version.abi
        ),
    );
    let debs = chroot.host_path("/tzx-debs");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs)?;
    let image = format!("linux-binary-{}={package_version}", version.abi);
    let modules = format!("linux-modules-{}={package_version}", version.abi);
    util::run_quiet(&mut chroot.command(&[
        "sh",
        "-c",
        "cd /tzx-debs && apt-get download -q \"$0\" \"$1\"",
        &image,
        &modules,
    ]))
    .context("downloading the guest kernel packages")?;
    for deb in std::fs::read_dir(&debs)? {
        let deb = deb?.path();
        util::run_quiet(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(&stamped.dir),
        )
        .with_context(|| format!("unpacking {}", deb.display()))?;
    }
    std::fs::remove_dir_all(&debs)?;
    stamped.finish()?;
    Ok(stamped.dir)
}

/// Builds netdevsim.ko with our test-only zcrx patch (cached per kernel and patch).
fn build_netdevsim(
    chroot: &Chroot,
    version: &KernelVersion,
    package_version: &str,
    start: Instant,
) -> Result<PathBuf> {
    let patch_dir = util::workspace_root()
        .join("vm/netdevsim")
        .join(version.series());
    let build_script = util::workspace_root().join("vm/netdevsim/build.sh");
    let patch = patch_dir.join("netdevsim-zcrx.patch");
    let mut key = CacheKey::new("netdevsim-v1");
    key.add_str(&version.abi)
        .add_str(package_version)
        .add_file(&patch)?
        .add_file(&build_script)?;
    let stamped = Stamped::new(util::cache_root().join("netdevsim").join(format!(
        "{}-{}",
        version.abi,
        key.hex()
    )));
    let module = stamped.dir.join("netdevsim.ko");
    if stamped.is_complete() {
        return Ok(module);
    }
    stamped.reset()?;
    let series = version.series();
    step(
        start,
        format_args!(
            "installing linux-headers-{} and linux-source-{series} in the chroot",
            version.abi
        ),
    );
    chroot.apt_install(&[
        &format!("linux-headers-{}={package_version}", version.abi),
        &format!("linux-source-{series}={package_version}"),
    ])?;
    step(start, "building the patched netdevsim module");
    let work = chroot.host_path("/tzx-netdevsim");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::copy(&build_script, work.join("build.sh"))?;
    std::fs::copy(&patch, work.join("netdevsim-zcrx.patch"))?;
    let tarball = format!("/usr/src/linux-source-{series}.tar.xz");
    let headers = format!("/usr/src/linux-headers-{}", version.abi);
    let mut build = chroot.command(&[
        "sh",
        "/tzx-netdevsim/build.sh",
        &tarball,
        &headers,
        "/tzx-netdevsim/out",
    ]);
    build.env("NSIM_PATCH", "/tzx-netdevsim/netdevsim-zcrx.patch");
    util::run_quiet(&mut build).context("building netdevsim (vm/netdevsim/build.sh) failed")?;
    std::fs::copy(work.join("out/netdevsim.ko"), &module)
        .context("build.sh did not leave out/netdevsim.ko")?;
    std::fs::remove_dir_all(&work)?;
    stamped.finish()?;
    Ok(module)
}

/// netdevsim and the modules it needs from the kernel package, dependencies first, each
/// decompressed next to the cache copy (busybox insmod cannot read .ko.xz).
fn module_load_order(chroot: &Chroot, unpacked: &Path, netdevsim: &Path) -> Result<Vec<PathBuf>> {
    let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
    collect_modules(unpacked, &mut index)?;
    let mut order = Vec::new();
    let mut seen = Vec::new();
    visit_module(chroot, netdevsim, &index, &mut seen, &mut order)?;
    Ok(order)
}

fn visit_module(
    chroot: &Chroot,
    module: &Path,
    index: &BTreeMap<String, PathBuf>,
    seen: &mut Vec<PathBuf>,
    order: &mut Vec<PathBuf>,
) -> Result<()> {
    if seen.iter().any(|s| s == module) {
        return Ok(());
    }
    seen.push(module.to_path_buf());
    let plain = decompressed(module)?;
    for dep in module_depends(chroot, &plain)? {
        let path = index.get(&dep).with_context(|| {
            format!(
                "{} needs module {dep}, which the kernel package lacks",
                module.display()
            )
        })?;
        visit_module(chroot, path, index, seen, order)?;
    }
    order.push(plain);
    Ok(())
}

/// Reads a module's `depends=` field with the chroot's modinfo.
fn module_depends(chroot: &Chroot, module: &Path) -> Result<Vec<String>> {
    let inside = chroot.host_path("/tzx-modinfo.ko");
    std::fs::copy(module, &inside)?;
    let text = util::output(&mut chroot.command(&["modinfo", "-F", "depends", "/tzx-modinfo.ko"]));
    std::fs::remove_file(&inside)?;
    Ok(text?
        .trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect())
}

fn decompressed(module: &Path) -> Result<PathBuf> {
    let name = file_name(module);
    let Some(stem) = name.strip_suffix(".xz") else {
        return Ok(module.to_path_buf());
    };
    let out = module.with_file_name(stem);
    if !out.exists() {
        let status = Command::new("xz")
            .args(["-dkf"])
            .arg(module)
            .status()
            .context("running xz")?;
        if !status.success() {
            bail!("xz -d {} failed", module.display());
        }
    }
    Ok(out)
}

fn collect_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_modules(&path, index)?;
            continue;
        }
        let name = file_name(&path);
        if let Some(stem) = name
            .strip_suffix(".ko.xz")
            .or_else(|| name.strip_suffix(".ko"))
        {
            index.entry(stem.replace('-', "_")).or_insert(path);
        }
    }
    Ok(())
}

fn find_file(dir: &Path, pred: impl Fn(&Path) -> bool + Copy) -> Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, pred)? {
                return Ok(Some(found));
            }
        } else if pred(&path) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn abi_names_parse() {
        let k = KernelVersion::parse_abi("7.3.4+deb13-amd64").unwrap();
        assert_eq!(k.numbers, (7, 3, 4));
        assert_eq!(k.series(), "7.3");
        assert!(KernelVersion::parse_abi("7.3.4+deb13-cloud-amd64").is_none());
        assert!(KernelVersion::parse_abi("7.3.4+deb13-rt-amd64").is_none());
        assert!(KernelVersion::parse_abi("7.3.4+deb13-amd64-dbg").is_none());
        assert!(KernelVersion::parse_abi("unsigned-7.3.4+deb13-amd64").is_none());
    }

    #[test]
    fn newest_patched_kernel_wins() {
        let available = names(&[
            "7.1.13+deb13-amd64",
            "7.2.12+deb13-amd64",
            "7.3.4+deb13-amd64",
            "7.3.10+deb13-amd64",
            "7.4.1+deb13-amd64",
            "7.3.11+deb13-cloud-amd64",
        ]);
        let k = choose(&available, &names(&["7.3"])).unwrap();
        assert_eq!(k.abi, "7.3.10+deb13-amd64");
    }

    #[test]
    fn too_old_or_unpatched_is_a_clear_error() {
        let err = choose(&names(&["7.1.13+deb13-amd64"]), &names(&["7.3"])).unwrap_err();
        assert!(err.to_string().contains("no Debian kernel >= 7.2"), "{err}");
        let err = choose(&names(&["7.4.1+deb13-amd64"]), &names(&["7.3"])).unwrap_err();
        assert!(err.to_string().contains("no netdevsim patch"), "{err}");
    }
}
