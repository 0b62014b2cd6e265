#!/bin/sh
# `make deb [DEBIAN=bookworm|trixie]`: build dist/elemta_<version>+debNN_all.deb with
# dpkg-buildpackage from a staged copy of the tree (dpkg-buildpackage wants debian/ at the root;
# the repository keeps it in packaging/debian/).
#
# Without DEBIAN the package is built on this machine, for this machine's release; missing build
# dependencies are installed with apt-get when run as root. With DEBIAN=<release> it is built in
# a clean debootstrap chroot of that release, as sbuild would: pybuild then runs the unit tests
# on that release's Python and libraries, and that release's lintian checks the result. The
# chroot's base is cached in $ELEMTA_BUILD_CACHE (default /var/cache/elemta-build/<release>-<key>)
# and copied afresh for every build.
#
# Each release gets its own .deb (version suffix +deb12 / +deb13): the code is the same, but
# systemd >= 254 gets a unit drop-in (Type=notify-reload, MemoryPressureWatch=auto) that
# bookworm's systemd 252 would misread (README, "Supported releases").
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
HOST_RELEASE=$(. /etc/os-release && echo "${VERSION_CODENAME:-unknown}")
RELEASE=${DEBIAN:-$HOST_RELEASE}
case $RELEASE in
    bookworm) SUFFIX=+deb12 ;;
    trixie) SUFFIX=+deb13 ;;
    *) echo "build-deb: unknown release '$RELEASE' (DEBIAN=bookworm or DEBIAN=trixie)" >&2; exit 2 ;;
esac
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
CHANGELOG_VERSION=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$VERSION" != "$CHANGELOG_VERSION" ]; then
    echo "build-deb: pyproject.toml says $VERSION but packaging/debian/changelog says $CHANGELOG_VERSION" >&2
    exit 1
fi
DEBVERSION=$VERSION$SUFFIX

# Build-Depends from debian/control, without versions and build profiles: what apt installs.
build_deps() {
    python3 - packaging/debian/control <<'PY'
import re, sys
text = open(sys.argv[1]).read()
field = re.search(r"^Build-Depends:(.*?)(?=^\S)", text, re.M | re.S).group(1)
# Virtual build dependencies name the real packages that provide them.
real = {"debhelper-compat": "debhelper", "dh-sequence-python3": "dh-python"}
names = (re.sub(r"\(.*?\)|<.*?>|\[.*?\]", "", d).strip() for d in field.split(","))
print(" ".join(real.get(n, n) for n in names if n))
PY
}

STAGE=$(mktemp -d /tmp/elemta-deb.XXXXXX)
CHROOT=""
cleanup() {
    if [ -n "$CHROOT" ]; then
        umount -R "$CHROOT/dev" 2>/dev/null || true
        umount "$CHROOT/proc" 2>/dev/null || true
        rm -rf --one-file-system "$CHROOT"
    fi
    rm -rf "$STAGE"
}
trap cleanup EXIT
SRC="$STAGE/elemta-$VERSION"
mkdir -p "$SRC"
# Tracked and new (not ignored) files: what a clean clone plus your edits would contain.
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$SRC" 2>/dev/null || \
    git ls-files -co --exclude-standard | while read -r f; do [ -e "$f" ] && cp --parents "$f" "$SRC"; done
rm -rf "$SRC/debian"
cp -r packaging/debian "$SRC/debian"
cp packaging/systemd/elemta.service packaging/systemd/elemta.socket "$SRC/debian/"
python3 packaging/gen-conffile.py >"$SRC/debian/elemta.toml"
# The release's own changelog entry: the version says which release the .deb is for.
{
    printf 'elemta (%s) %s; urgency=medium\n\n  * Build for Debian %s.\n\n' "$DEBVERSION" "$RELEASE" "$RELEASE"
    printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -l packaging/debian/changelog -S Maintainer)" \
        "$(git log -1 --format=%aD 2>/dev/null || date -R)"  # later than the entry below
    cat packaging/debian/changelog
} >"$SRC/debian/changelog"

if [ -n "${DEBIAN:-}" ]; then
    [ "$(id -u)" = 0 ] || { echo "build-deb: DEBIAN=$RELEASE builds in a chroot: needs root" >&2; exit 1; }
    command -v debootstrap >/dev/null || { echo "build-deb: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    CACHE=${ELEMTA_BUILD_CACHE:-/var/cache/elemta-build}
    DEPS="$(build_deps) lintian"
    KEY=$(echo "$RELEASE $DEPS v2" | sha256sum | cut -c1-12)
    BASE="$CACHE/$RELEASE-$KEY"
    if [ ! -f "$BASE/ok" ]; then
        # The mirror apt already uses here (deb822 "URIs:" or one-line "deb URL suite").
        mirror=$(grep -hsE '^URIs:|^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
            | awk '{print $2}' | grep -m1 -E '/debian/?$' || true)
        mirror=${mirror:-http://deb.debian.org/debian}
        echo "build-deb: debootstrap $RELEASE build chroot into $BASE (once; a few minutes)" >&2
        rm -rf "$BASE" && mkdir -p "$BASE"
        t0=$(date +%s)
        debootstrap --variant=buildd "$RELEASE" "$BASE/root" "$mirror" >"$BASE/debootstrap.log" 2>&1 \
            || { tail -20 "$BASE/debootstrap.log" >&2; exit 1; }
        # apt, not debootstrap, resolves the build dependencies: debootstrap cannot follow
        # virtual packages (trixie's libnet-ssleay-perl needs perl-openssl-abi-3).
        cp /etc/resolv.conf "$BASE/root/etc/resolv.conf"
        mount -t proc proc "$BASE/root/proc"
        # shellcheck disable=SC2086
        chroot "$BASE/root" sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $DEPS" \
            >>"$BASE/debootstrap.log" 2>&1 || { umount "$BASE/root/proc"; tail -20 "$BASE/debootstrap.log" >&2; exit 1; }
        umount "$BASE/root/proc"
        chroot "$BASE/root" apt-get clean
        echo "$(( $(date +%s) - t0 ))" >"$BASE/build-seconds"
        touch "$BASE/ok"
    fi
    CHROOT=$(mktemp -d "$CACHE/run.XXXXXX")
    cp -a "$BASE/root/." "$CHROOT/"
    mount -t proc proc "$CHROOT/proc"
    mount --rbind /dev "$CHROOT/dev"  # with /dev/pts: the tests open a pty
    mount --make-rslave "$CHROOT/dev"  # nothing done under it reaches the host's /dev
    mkdir -p "$CHROOT/build"
    cp -a "$SRC" "$CHROOT/build/"
    echo "build-deb: building $DEBVERSION in a clean $RELEASE chroot ($(chroot "$CHROOT" python3 --version))" >&2
    chroot "$CHROOT" sh -c "cd /build/elemta-$VERSION && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/build LC_ALL=C.UTF-8 dpkg-buildpackage -us -uc -b" \
        >"$STAGE/build.log" 2>&1 || {
        tail -40 "$STAGE/build.log" >&2
        echo "build-deb: dpkg-buildpackage failed in the $RELEASE chroot (last 40 lines above)" >&2
        exit 1
    }
    OUTDIR="$CHROOT/build"
    lint() { chroot "$CHROOT" sh -c "lintian --info --display-info /build/elemta_${DEBVERSION}_*.changes"; }
else
    if ! dpkg-checkbuilddeps packaging/debian/control >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then
            echo "build-deb: installing build dependencies: $(build_deps)" >&2
            # shellcheck disable=SC2046
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends $(build_deps); } >"$STAGE/apt.log" 2>&1 \
                || { tail -20 "$STAGE/apt.log" >&2; echo "build-deb: apt-get failed" >&2; exit 1; }
        else
            dpkg-checkbuilddeps packaging/debian/control || true
            echo "build-deb: not root: install the build dependencies above (sudo apt-get install ...)" >&2
            exit 1
        fi
    fi
    # Debian's own Python, not whatever python3 comes first in PATH (pyenv, a venv).
    (cd "$SRC" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) >"$STAGE/build.log" 2>&1 || {
        tail -40 "$STAGE/build.log" >&2
        echo "build-deb: dpkg-buildpackage failed (full log above, last 40 lines)" >&2
        exit 1
    }
    OUTDIR=$STAGE
    lint() {
        if command -v lintian >/dev/null; then
            lintian --info --display-info "$STAGE"/elemta_"${DEBVERSION}"_*.changes
        else
            echo "lintian not installed: not checked"
        fi
    }
fi
DEB="elemta_${DEBVERSION}_all.deb"
mkdir -p dist
cp "$OUTDIR/$DEB" dist/
cp "$STAGE/build.log" "dist/build-$RELEASE.log"
echo "build-deb: $ROOT/dist/$DEB (for $RELEASE)"
lint | tee "dist/lintian-$RELEASE.txt" || true
echo "build-deb: lintian ($RELEASE) output in dist/lintian-$RELEASE.txt ($(grep -c '^[EW]:' "dist/lintian-$RELEASE.txt" || true) errors/warnings)"
