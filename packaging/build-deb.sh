#!/bin/sh
# `make deb`: build dist/elemta_<version>_all.deb with dpkg-buildpackage from a staged copy of the
# tree (dpkg-buildpackage wants debian/ at the root; the repository keeps it in packaging/debian/).
# Needs: debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools, and for the
# build-time tests python3-pytest python3-hypothesis and the runtime python3-* packages.
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
CHANGELOG_VERSION=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$VERSION" != "$CHANGELOG_VERSION" ]; then
    echo "build-deb: pyproject.toml says $VERSION but packaging/debian/changelog says $CHANGELOG_VERSION" >&2
    exit 1
fi
STAGE=$(mktemp -d /tmp/elemta-deb.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
SRC="$STAGE/elemta-$VERSION"
mkdir -p "$SRC"
# Tracked and new (not ignored) files: what a clean clone plus your edits would contain.
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$SRC" 2>/dev/null || \
    git ls-files -co --exclude-standard | while read -r f; do [ -e "$f" ] && cp --parents "$f" "$SRC"; done
rm -rf "$SRC/debian"
cp -r packaging/debian "$SRC/debian"
cp packaging/systemd/elemta.service packaging/systemd/elemta.socket "$SRC/debian/"
python3 packaging/gen-conffile.py >"$SRC/debian/elemta.toml"
# Debian's own Python, not whatever python3 comes first in PATH (pyenv, a venv).
(cd "$SRC" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) >"$STAGE/build.log" 2>&1 || {
    tail -40 "$STAGE/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (full log above, last 40 lines)" >&2
    exit 1
}
mkdir -p dist
cp "$STAGE/elemta_${VERSION}_all.deb" dist/
cp "$STAGE/build.log" dist/build.log
echo "build-deb: $ROOT/dist/elemta_${VERSION}_all.deb"
if command -v lintian >/dev/null; then
    lintian --info --display-info "$STAGE"/elemta_"${VERSION}"_*.changes | tee dist/lintian.txt || true
    echo "build-deb: lintian output in dist/lintian.txt ($(grep -c '^[EW]:' dist/lintian.txt || true) errors/warnings)"
fi
