#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Build the test-only zcrx-capable netdevsim.ko out of tree.
#
#   build.sh SOURCE HEADERS_DIR OUT_DIR
#
#   SOURCE       linux-source-X.Y tarball (linux-source-7.3.tar.xz), or an
#                extracted source tree, or a drivers/net/netdevsim directory
#   HEADERS_DIR  matching /usr/src/linux-headers-<release> (e.g.
#                /usr/src/linux-headers-7.3.4+deb13-amd64)
#   OUT_DIR      receives netdevsim.ko (and build.log)
#
# Environment: NSIM_PATCH overrides the patch (default:
# <this dir>/<major.minor of the headers>/netdevsim-zcrx.patch).
#
# Meant to run inside a Debian chroot whose gcc matches the headers (trixie:
# gcc-14, make, pahole, binutils, xz-utils; `patch` or busybox), with /proc
# mounted: objtool fails without it.
set -eu

die() { echo "netdevsim build: error: $*" >&2; exit 1; }
note() { echo "netdevsim build: $*" >&2; }

[ $# -eq 3 ] || die "usage: $0 SOURCE HEADERS_DIR OUT_DIR"
src=$1 hdr=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)

# --- the headers and the toolchain they expect -------------------------------
[ -f "$hdr/Makefile" ] && [ -f "$hdr/.config" ] && [ -f "$hdr/Module.symvers" ] ||
	die "$hdr is not a kernel headers directory (Makefile, .config, Module.symvers)"
release=$(sed -n 's/^override KERNELRELEASE = //p' "$hdr/.kernelvariables" 2>/dev/null || true)
[ -n "$release" ] || release=$(basename "$hdr" | sed 's/^linux-headers-//')
majmin=$(echo "$release" | sed -n 's/^\([0-9]*\.[0-9]*\).*/\1/p')
[ -n "$majmin" ] || die "cannot tell the kernel version of $hdr"

patchfile=${NSIM_PATCH:-$here/$majmin/netdevsim-zcrx.patch}
[ -f "$patchfile" ] ||
	die "no patch for Linux $majmin ($patchfile); the patch is tied to the kernel it was made for"

command -v make >/dev/null || die "make not found"
cc=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\([^ ]*\) .*/\1/p' "$hdr/.config")
[ -z "$cc" ] || command -v "$cc" >/dev/null ||
	die "$cc not found: the headers were built with it (install it, e.g. gcc-14 in a trixie chroot)"
[ -r /proc/self/limits ] ||
	die "/proc is not mounted: objtool needs it (mount -t proc proc /proc in the chroot)"
if grep -q '^CONFIG_DEBUG_INFO_BTF_MODULES=y' "$hdr/.config" && ! command -v pahole >/dev/null; then
	die "pahole not found (CONFIG_DEBUG_INFO_BTF_MODULES=y): install pahole/dwarves"
fi
if command -v patch >/dev/null; then
	patch_cmd="patch -p1 --forward --batch"
elif command -v busybox >/dev/null && busybox patch --help >/dev/null 2>&1; then
	patch_cmd="busybox patch -p1"
else
	die "neither patch nor busybox (with its patch applet) found"
fi

# --- netdevsim sources into a scratch directory --------------------------------
mkdir -p "$out" || die "cannot create $out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/netdevsim-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/netdevsim"

if [ -f "$src" ]; then
	note "extracting drivers/net/netdevsim from $src"
	tar -xf "$src" -C "$work" --wildcards '*/drivers/net/netdevsim/*' ||
		die "cannot extract drivers/net/netdevsim from $src"
	d=$(find "$work" -path '*/drivers/net/netdevsim' -type d | head -n 1)
	[ -n "$d" ] || die "$src has no drivers/net/netdevsim"
	cp -R "$d/." "$work/netdevsim/"
elif [ -f "$src/netdev.c" ] && [ -f "$src/bus.c" ]; then
	cp -R "$src/." "$work/netdevsim/"
elif [ -f "$src/drivers/net/netdevsim/netdev.c" ]; then
	cp -R "$src/drivers/net/netdevsim/." "$work/netdevsim/"
else
	die "$src is neither a source tarball, a source tree nor a netdevsim directory"
fi
rm -f "$work/netdevsim"/*.o "$work/netdevsim"/*.ko "$work/netdevsim"/.*.cmd

# --- patch and build ------------------------------------------------------------
note "applying $(basename "$patchfile") (made for Linux $majmin)"
(cd "$work/netdevsim" && $patch_cmd < "$patchfile") > "$work/patch.log" 2>&1 || {
	cat "$work/patch.log" >&2
	die "the patch does not apply to these sources (made for Linux 7.3.4's netdevsim)"
}

note "building against $hdr"
if ! make -C "$hdr" M="$work/netdevsim" CONFIG_NETDEVSIM=m modules > "$out/build.log" 2>&1; then
	tail -n 30 "$out/build.log" >&2
	die "module build failed (full log: $out/build.log)"
fi
ko="$work/netdevsim/netdevsim.ko"
[ -f "$ko" ] || die "the build produced no netdevsim.ko (log: $out/build.log)"

# --- check the result -----------------------------------------------------------
if command -v objcopy >/dev/null; then
	objcopy -O binary --only-section=.modinfo "$ko" "$work/modinfo" ||
		die "cannot read .modinfo of $ko"
	vermagic=$(tr '\0' '\n' < "$work/modinfo" | sed -n 's/^vermagic=//p')
	depends=$(tr '\0' '\n' < "$work/modinfo" | sed -n 's/^depends=//p')
	case "$vermagic" in
	"$release "*) ;;
	*) die "vermagic '$vermagic' does not match the headers' release $release" ;;
	esac
	note "vermagic: $vermagic"
	note "depends: ${depends:-none} (load those modules first)"
fi
cp "$ko" "$out/netdevsim.ko"
note "built $out/netdevsim.ko (unsigned: loading it taints the kernel)"
