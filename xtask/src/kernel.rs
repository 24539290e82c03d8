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

/// The guest kernels of one run: the newest kernel of each series that has a netdevsim
/// patch, newest series first, and what the archive offered, in words.
#[derive(Debug)]
pub(crate) struct Selection {
    pub kernels: Vec<KernelVersion>,
    /// One line per series found (kernels, whether it has a patch, which one runs), for the
    /// run's log: when the archive moves on, this says what changed.
    pub found: Vec<String>,
}

/// Picks the newest kernel of each series >= 7.2 that has a netdevsim patch.
///
/// `patches` are the patched series with the kernel each patch was made for
/// (`("7.3", "7.3.4")`), used in the error that says how to pin when no series qualifies.
pub(crate) fn choose_matrix(available: &[String], patches: &[PatchedSeries]) -> Result<Selection> {
    let mut candidates: Vec<KernelVersion> = available
        .iter()
        .filter_map(|abi| KernelVersion::parse_abi(abi))
        .filter(|k| (k.numbers.0, k.numbers.1) >= MIN_VERSION)
        .collect();
    candidates.sort_by(|a, b| b.numbers.cmp(&a.numbers).then(Ordering::Equal));
    candidates.dedup_by(|a, b| a.abi == b.abi);
    let patched = |series: &str| patches.iter().any(|p| p.series == series);
    let mut series: Vec<String> = candidates.iter().map(KernelVersion::series).collect();
    series.dedup();
    let mut found = Vec::new();
    let mut kernels = Vec::new();
    for name in &series {
        let of_series: Vec<&KernelVersion> =
            candidates.iter().filter(|k| &k.series() == name).collect();
        let list = of_series
            .iter()
            .map(|k| k.abi.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if patched(name) {
            found.push(format!(
                "{name}: {list} (patched: runs {})",
                of_series[0].abi
            ));
            kernels.push(of_series[0].clone());
        } else {
            found.push(format!(
                "{name}: {list} (no vm/netdevsim/{name}/netdevsim-zcrx.patch: not tested)"
            ));
        }
    }
    for patch in patches {
        if !series.contains(&patch.series) {
            found.push(format!(
                "{}: no kernel of this series in the archive any more (its patch is unused)",
                patch.series
            ));
        }
    }
    if candidates.is_empty() {
        bail!(
            "no Debian kernel >= {}.{} found in trixie-backports (saw {} kernel packages). \
             The real-kernel tier needs one; check the mirror, or pin kernels that are still \
             in the archive: {}",
            MIN_VERSION.0,
            MIN_VERSION.1,
            available.len(),
            pin_command(patches)
        );
    }
    if kernels.is_empty() {
        bail!(
            "none of the guest kernels in trixie-backports has a netdevsim patch in \
             vm/netdevsim/:\n  {}\nPort the newest patch to the new series (see \
             vm/netdevsim/README.md), or pin the kernels the patches were made for, if the \
             archive still has them:\n  {}",
            found.join("\n  "),
            pin_command(patches)
        );
    }
    Ok(Selection { kernels, found })
}

/// The command that pins the guest tier to the kernels the patches were made for.
fn pin_command(patches: &[PatchedSeries]) -> String {
    let mut made_for: Vec<&PatchedSeries> = patches.iter().collect();
    made_for.sort_by_key(|p| std::cmp::Reverse(p.series_numbers()));
    let abis: Vec<String> = made_for
        .iter()
        .filter_map(|p| p.made_for.as_ref())
        .map(|release| format!("{release}+deb13-amd64"))
        .collect();
    if abis.is_empty() {
        format!("{PIN_ENV}=7.3.4+deb13-amd64 cargo xtask test")
    } else {
        format!("{PIN_ENV}={} cargo xtask test", abis.join(","))
    }
}

/// A series with a netdevsim patch: `vm/netdevsim/<series>/netdevsim-zcrx.patch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PatchedSeries {
    pub series: String,
    /// The kernel release the patch was made for, from its `# Made for: Linux X.Y.Z` line.
    pub made_for: Option<String>,
}

impl PatchedSeries {
    fn series_numbers(&self) -> (u32, u32) {
        let mut parts = self.series.split('.').map(|p| p.parse().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    }
}

/// The series for which `vm/netdevsim/<series>/` holds a patch.
pub(crate) fn patched_series() -> Result<Vec<PatchedSeries>> {
    let dir = util::workspace_root().join("vm/netdevsim");
    let mut series = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let patch = entry.path().join("netdevsim-zcrx.patch");
        if let Ok(text) = std::fs::read_to_string(&patch) {
            series.push(PatchedSeries {
                series: entry.file_name().to_string_lossy().into_owned(),
                made_for: made_for(&text),
            });
        }
    }
    series.sort_by(|a, b| a.series.cmp(&b.series));
    Ok(series)
}

/// The release in a patch header's `# Made for: Linux 7.3.4 (...)` line.
fn made_for(patch: &str) -> Option<String> {
    patch
        .lines()
        .find_map(|l| l.strip_prefix("# Made for: Linux "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

/// The guest kernels to run: those pinned with `TZX_GUEST_KERNEL` (a comma-separated list
/// of Debian ABI names), or else the newest of each patched series in trixie-backports.
/// Newest first.
pub(crate) fn select(chroot: &Chroot, start: Instant) -> Result<Vec<KernelVersion>> {
    if let Ok(pinned) = std::env::var(PIN_ENV) {
        let kernels = parse_pins(&pinned)?;
        step(
            start,
            format_args!(
                "guest kernels pinned by {PIN_ENV}: {}",
                kernels
                    .iter()
                    .map(|k| k.abi.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        return Ok(kernels);
    }
    let names = util::output(&mut chroot.command(&["apt-cache", "pkgnames", "linux-"]))?;
    let available: Vec<String> = names
        .lines()
        .filter_map(|n| n.strip_prefix("linux-binary-"))
        .map(str::to_string)
        .collect();
    let selection = choose_matrix(&available, &patched_series()?)?;
    step(start, "guest kernels in trixie-backports (>= 7.2, amd64):");
    for line in &selection.found {
        println!("    {line}");
    }
    Ok(selection.kernels)
}

/// `TZX_GUEST_KERNEL`'s value: ABI names separated by commas, newest first after parsing.
pub(crate) fn parse_pins(value: &str) -> Result<Vec<KernelVersion>> {
    let mut kernels = Vec::new();
    for abi in value.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let kernel = KernelVersion::parse_abi(abi).with_context(|| {
            format!(
                "{PIN_ENV}: `{abi}` is not a Debian amd64 kernel ABI like 7.3.4+deb13-amd64 \
                 (several: comma-separated)"
            )
        })?;
        if !kernels.contains(&kernel) {
            kernels.push(kernel);
        }
    }
    if kernels.is_empty() {
        bail!("{PIN_ENV} is set but names no kernel; unset it or give e.g. 7.3.4+deb13-amd64");
    }
    kernels.sort_by_key(|k| std::cmp::Reverse(k.numbers));
    Ok(kernels)
}

/// Everything the guest needs from the kernel side.
pub(crate) struct GuestKernel {
    pub version: KernelVersion,
    pub vmlinuz: PathBuf,
    /// Modules to load in order (dependencies first), uncompressed.
    pub modules: Vec<PathBuf>,
}

/// Downloads and unpacks the guest kernel `version`, and builds netdevsim for it (each
/// cached per kernel).
pub(crate) fn prepare(
    chroot: &Chroot,
    version: &KernelVersion,
    start: Instant,
) -> Result<GuestKernel> {
    step(start, format_args!("guest kernel: {}", version.abi));
    let package_version = package_version(chroot, version)?;
    let unpacked = unpack_kernel(chroot, version, &package_version, start)?;
    let netdevsim = build_netdevsim(chroot, version, &package_version, start)?;
    let vmlinuz = find_file(&unpacked, |p| file_name(p).starts_with("vmlinuz"))?
        .context("the kernel package holds no vmlinuz")?;
    let modules = module_load_order(chroot, &unpacked, &netdevsim)?;
    Ok(GuestKernel {
        version: version.clone(),
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
    if !patch.exists() {
        bail!(
            "kernel {} has no netdevsim patch ({} is missing): pin a kernel of a patched \
             series with {PIN_ENV}, or port the patch (vm/netdevsim/README.md)",
            version.abi,
            patch.display()
        );
    }
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

    fn patches(list: &[(&str, &str)]) -> Vec<PatchedSeries> {
        list.iter()
            .map(|(series, made_for)| PatchedSeries {
                series: series.to_string(),
                made_for: Some(made_for.to_string()),
            })
            .collect()
    }

    #[test]
    fn newest_kernel_of_each_patched_series_runs() {
        let available = names(&[
            "7.1.13+deb13-amd64",
            "7.2.9+deb13-amd64",
            "7.2.12+deb13-amd64",
            "7.3.4+deb13-amd64",
            "7.3.10+deb13-amd64",
            "7.4.1+deb13-amd64",
            "7.3.11+deb13-cloud-amd64",
        ]);
        let selection =
            choose_matrix(&available, &patches(&[("7.2", "7.2.12"), ("7.3", "7.3.4")])).unwrap();
        let abis: Vec<&str> = selection.kernels.iter().map(|k| k.abi.as_str()).collect();
        assert_eq!(abis, ["7.3.10+deb13-amd64", "7.2.12+deb13-amd64"]);
        assert_eq!(
            selection.found,
            [
                "7.4: 7.4.1+deb13-amd64 (no vm/netdevsim/7.4/netdevsim-zcrx.patch: not tested)",
                "7.3: 7.3.10+deb13-amd64, 7.3.4+deb13-amd64 (patched: runs 7.3.10+deb13-amd64)",
                "7.2: 7.2.12+deb13-amd64, 7.2.9+deb13-amd64 (patched: runs 7.2.12+deb13-amd64)",
            ]
        );
    }

    #[test]
    fn a_series_gone_from_the_archive_is_reported_not_fatal() {
        let selection = choose_matrix(
            &names(&["7.3.4+deb13-amd64"]),
            &patches(&[("7.2", "7.2.12"), ("7.3", "7.3.4")]),
        )
        .unwrap();
        assert_eq!(selection.kernels.len(), 1);
        assert!(
            selection.found[1].starts_with("7.2: no kernel of this series"),
            "{:?}",
            selection.found
        );
    }

    #[test]
    fn too_old_or_unpatched_is_a_clear_error_with_the_pin_command() {
        let both = patches(&[("7.2", "7.2.12"), ("7.3", "7.3.4")]);
        let err = choose_matrix(&names(&["7.1.13+deb13-amd64"]), &both).unwrap_err();
        assert!(err.to_string().contains("no Debian kernel >= 7.2"), "{err}");
        let err = choose_matrix(&names(&["7.4.1+deb13-amd64"]), &both).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("has a netdevsim patch"), "{text}");
        assert!(
            text.contains("7.4: 7.4.1+deb13-amd64 (no vm/netdevsim/7.4/"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "TZX_GUEST_KERNEL=7.3.4+deb13-amd64,7.2.12+deb13-amd64 cargo xtask test"
            ),
            "{text}"
        );
    }

    #[test]
    fn pins_are_a_comma_separated_list() {
        let kernels =
            parse_pins("7.2.12+deb13-amd64, 7.3.4+deb13-amd64,7.2.12+deb13-amd64").unwrap();
        let abis: Vec<&str> = kernels.iter().map(|k| k.abi.as_str()).collect();
        assert_eq!(abis, ["7.3.4+deb13-amd64", "7.2.12+deb13-amd64"]);
        assert!(parse_pins("7.3.4").is_err());
        assert!(parse_pins(" , ").is_err());
    }

    #[test]
    fn patch_headers_name_their_kernel() {
        assert_eq!(
            made_for("# x\n# Made for: Linux 7.2.12 (Debian linux-source-7.2).\n").as_deref(),
            Some("7.2.12")
        );
        assert_eq!(made_for("no header"), None);
    }

    #[test]
    fn the_patches_in_the_tree_are_found_with_their_kernels() {
        let found = patched_series().unwrap();
        for (series, release) in [("7.2", "7.2.12"), ("7.3", "7.3.4")] {
            let patch = found.iter().find(|p| p.series == series).unwrap();
            assert_eq!(patch.made_for.as_deref(), Some(release));
        }
    }
}
