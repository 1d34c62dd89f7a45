#!/usr/bin/env bash
# Fetches Debian's cloud kernel for TrEnv's real-kernel boot check and caches it.
#
#   fetch-kernel.sh [--with-busybox] [CACHE_DIR]
#
# Prints, one per line:
#   vmlinux=<path>    uncompressed ELF kernel (extracted from the bzImage on the host; booting it skips the
#                     in-guest decompressor, which is emulated instruction by instruction on kvm_pvm hosts)
#   vmlinuz=<path>    the bzImage as Debian ships it
#   busybox=<path>    (with --with-busybox) a static busybox from Debian's busybox-static
#
# Cache: CACHE_DIR, else ${TRENV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trenv}/linux.
# TRENV_LINUX_PACKAGE overrides the kernel package (default: the newest
# linux-image-<abi>-cloud-amd64-unsigned apt knows about); a cache holding another package is refreshed.
# A second run with everything cached prints the paths without touching the network.
set -euo pipefail

die() {
    echo "fetch-kernel.sh: error: $*" >&2
    exit 1
}
note() {
    echo "fetch-kernel.sh: $*" >&2
}

with_busybox=0
cache_dir=""
for arg in "$@"; do
    case "$arg" in
    --with-busybox) with_busybox=1 ;;
    -h | --help)
        # The comment block at the top of this file.
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 0
        ;;
    -*) die "unknown option '$arg' (usage: fetch-kernel.sh [--with-busybox] [CACHE_DIR])" ;;
    *)
        [[ -z "$cache_dir" ]] || die "more than one CACHE_DIR given"
        cache_dir="$arg"
        ;;
    esac
done
if [[ -z "$cache_dir" ]]; then
    cache_dir="${TRENV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trenv}/linux"
fi
mkdir -p "$cache_dir" || die "cannot create cache directory $cache_dir"
cache_dir="$(cd "$cache_dir" && pwd)"

vmlinux="$cache_dir/vmlinux"
vmlinuz="$cache_dir/vmlinuz"
busybox="$cache_dir/busybox"

print_paths() {
    echo "vmlinux=$vmlinux"
    echo "vmlinuz=$vmlinuz"
    if ((with_busybox)); then
        echo "busybox=$busybox"
    fi
}

is_elf() {
    [[ "$(head -c 4 "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n')" == "7f454c46" ]]
}

kernel_cached() {
    [[ -s "$vmlinuz" && -s "$vmlinux" ]] && is_elf "$vmlinux" || return 1
    # An explicitly requested package must be the one the cache holds.
    [[ -z "${TRENV_LINUX_PACKAGE:-}" || "$(cat "$cache_dir/package" 2>/dev/null)" == "$TRENV_LINUX_PACKAGE" ]]
}
busybox_cached() {
    ((!with_busybox)) || { [[ -x "$busybox" ]] && is_elf "$busybox"; }
}

if kernel_cached && busybox_cached; then
    print_paths
    exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found: this script needs a Debian-based host"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"

# Anything set -e stops on still gets a message naming the failed command.
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

work="$(mktemp -d "$cache_dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

apt_updated=0
apt_update() {
    ((apt_updated)) && return 0
    note "running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed (no network or no permission? run as root)"
    apt_updated=1
}

# Has apt a downloadable version of package $1?
has_candidate() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }')"
    [[ -n "$cand" && "$cand" != "(none)" ]]
}

# The newest linux-image-<abi>-cloud-amd64-unsigned with a candidate, or nothing.
newest_cloud_kernel() {
    local name abi best="" best_abi=""
    while read -r name _; do
        abi="${name#linux-image-}"
        abi="${abi%-cloud-amd64-unsigned}"
        has_candidate "$name" || continue
        if [[ -z "$best" ]] || dpkg --compare-versions "$abi" gt "$best_abi"; then
            best="$name"
            best_abi="$abi"
        fi
    done < <(apt-cache search --names-only '^linux-image-[0-9][0-9.]*-[0-9]+-cloud-amd64-unsigned$' 2>/dev/null)
    echo "$best"
}

# Downloads the .deb of package $1 into $work/debs and sets $deb to its path (not printed: a die in a command
# substitution would only end the subshell).
download_deb() {
    local pkg="$1"
    if ! has_candidate "$pkg"; then
        apt_update
        has_candidate "$pkg" || die "apt has no package '$pkg' (check /etc/apt/sources.list)"
    fi
    mkdir -p "$work/debs"
    note "downloading $pkg"
    (cd "$work/debs" && apt-get download -q "$pkg" >&2) ||
        die "apt-get download $pkg failed (no network?)"
    local debs=("$work/debs/${pkg}"_*.deb)
    deb="${debs[0]}"
    [[ -f "$deb" ]] || die "apt-get download $pkg produced no .deb"
}

# Makes sure command $1 exists, installing Debian package $2 if it does not.
need_tool() {
    command -v "$1" >/dev/null && return 0
    note "'$1' missing: installing Debian package $2"
    apt-get install -y -qq "$2" >&2 || {
        apt_update
        apt-get install -y -qq "$2" >&2 || die "cannot install $2 (needed for '$1')"
    }
}

# Reads an unsigned little-endian integer of $3 bytes at offset $2 of file $1.
read_le() {
    local bytes value=0 i
    bytes=($(od -An -tu1 -j "$2" -N "$3" "$1"))
    ((${#bytes[@]} == $3)) || die "$1 is too short to be a bzImage"
    for ((i = $3 - 1; i >= 0; i--)); do
        value=$((value * 256 + bytes[i]))
    done
    echo "$value"
}

# Extracts the compressed payload of bzImage $1 and decompresses it into ELF $2.
extract_vmlinux() {
    local image="$1" out="$2" setup_sects payload_offset payload_length start magic payload
    [[ "$(od -An -c -j $((0x202)) -N 4 "$image" | tr -d ' \n')" == "HdrS" ]] ||
        die "$image has no Linux setup header (no 'HdrS' at 0x202)"
    setup_sects="$(read_le "$image" $((0x1f1)) 1)"
    # A zero setup_sects means 4 (boot protocol).
    ((setup_sects != 0)) || setup_sects=4
    payload_offset="$(read_le "$image" $((0x248)) 4)"
    payload_length="$(read_le "$image" $((0x24c)) 4)"
    ((payload_length > 0)) || die "$image has no payload (boot protocol older than 2.08?)"
    start=$(((setup_sects + 1) * 512 + payload_offset))
    payload="$work/payload"
    # dd, not tail | head: under pipefail, head closing the pipe early would fail the pipeline.
    dd if="$image" of="$payload" bs=64K skip="$start" count="$payload_length" \
        iflag=skip_bytes,count_bytes status=none || die "cannot read the payload of $image"
    (($(stat -c %s "$payload") == payload_length)) || die "$image is shorter than its payload says"

    magic="$(od -An -tx1 -N 6 "$payload" | tr -d ' \n')"
    case "$magic" in
    02214c18*)
        need_tool lz4 lz4
        lz4 -dc <"$payload" >"$out.tmp" 2>/dev/null || true
        ;;
    fd377a585a00*)
        need_tool xz xz-utils
        xz -dc <"$payload" >"$out.tmp" 2>/dev/null || true
        ;;
    1f8b*)
        need_tool gzip gzip
        gzip -dc <"$payload" >"$out.tmp" 2>/dev/null || true
        ;;
    28b52ffd*)
        need_tool zstd zstd
        zstd -dcq <"$payload" >"$out.tmp" 2>/dev/null || true
        ;;
    425a68*)
        need_tool bzip2 bzip2
        bzip2 -dc <"$payload" >"$out.tmp" 2>/dev/null || true
        ;;
    5d0000*)
        need_tool lzma xz-utils
        lzma -dc <"$payload" >"$out.tmp" 2>/dev/null || true
        ;;
    89??????0d0a1a0a* | 894c5a4f*)
        need_tool lzop lzop
        lzop -dc <"$payload" >"$out.tmp" 2>/dev/null || true
        ;;
    *) die "unknown compression of the kernel payload (magic $magic)" ;;
    esac
    # The decompressors may complain about the trailing size word the kernel build appends; what matters is
    # that an ELF came out.
    [[ -s "$out.tmp" ]] && is_elf "$out.tmp" || die "decompressing the payload of $image did not give an ELF"
    mv -f "$out.tmp" "$out"
}

if ! kernel_cached; then
    pkg="${TRENV_LINUX_PACKAGE:-}"
    if [[ -z "$pkg" ]]; then
        pkg="$(newest_cloud_kernel)"
        if [[ -z "$pkg" ]]; then
            apt_update
            pkg="$(newest_cloud_kernel)"
        fi
        [[ -n "$pkg" ]] || die "apt knows no linux-image-*-cloud-amd64-unsigned package (is this Debian?)"
    fi
    download_deb "$pkg"
    mkdir -p "$work/root"
    dpkg-deb -x "$deb" "$work/root" || die "cannot unpack $deb"
    images=("$work"/root/boot/vmlinuz-*)
    image="${images[0]}"
    [[ -f "$image" ]] || die "$deb holds no boot/vmlinuz-*"
    note "extracting vmlinux from $(basename "$image")"
    extract_vmlinux "$image" "$work/vmlinux"
    cp "$image" "$work/vmlinuz"
    # Both land under their final names only once both exist.
    mv -f "$work/vmlinux" "$vmlinux.tmp.$$" && mv -f "$vmlinux.tmp.$$" "$vmlinux"
    mv -f "$work/vmlinuz" "$vmlinuz.tmp.$$" && mv -f "$vmlinuz.tmp.$$" "$vmlinuz"
    echo "$pkg" >"$cache_dir/package"
fi

if ! busybox_cached; then
    download_deb busybox-static
    mkdir -p "$work/bb"
    dpkg-deb -x "$deb" "$work/bb" || die "cannot unpack $deb"
    [[ -f "$work/bb/bin/busybox" ]] || die "$deb holds no bin/busybox"
    is_elf "$work/bb/bin/busybox" || die "busybox from $deb is not an ELF"
    cp "$work/bb/bin/busybox" "$busybox.tmp.$$"
    chmod 0755 "$busybox.tmp.$$"
    mv -f "$busybox.tmp.$$" "$busybox"
fi

print_paths
