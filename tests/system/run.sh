#!/bin/sh
# `make system-test [DEBIAN=bookworm|trixie]`: boot that Debian release with its own systemd as PID 1 and cgroup v2 in qemu (software
# emulation; see ../shared/notes/vm-testing.md), install the .deb with apt and check the service
# end to end (tests/system/guest-checks.sh). Prints one line per check; exit 0 only if none failed.
#
# Usage: tests/system/run.sh dist/elemta_<version>_all.deb [bookworm|trixie]
# Env: ELEMTA_VM_CACHE (base image cache, default /var/cache/elemta-vm), ELEMTA_VM_TIMEOUT (s, 900),
#      ELEMTA_VM_KEEP=1 keeps the work directory (console log, journal, disks) for inspection.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
DEB=$(readlink -f "${1:?usage: $0 path/to/elemta_VERSION_all.deb}")
RELEASE=${2:-bookworm}
TIMEOUT=${ELEMTA_VM_TIMEOUT:-900}

for tool in qemu-system-x86_64 qemu-img mkfs.ext4 debugfs sfdisk; do
    command -v "$tool" >/dev/null || { echo "system-test: SKIP: $tool missing (apt-get install qemu-system-x86 qemu-utils e2fsprogs fdisk)"; exit 77; }
done

t_image=$(date +%s)
if ! IMAGE=$("$HERE/build-image.sh" "$RELEASE"); then
    echo "system-test: SKIP: cannot build the VM base image (needs root and a Debian mirror; see above)"
    exit 77
fi
echo "system-test ($RELEASE): base image $IMAGE (ready in $(( $(date +%s) - t_image ))s; built once in $(cat "$IMAGE/build-seconds")s)"

WORK=$(mktemp -d /tmp/elemta-vm.XXXXXX)
[ "${ELEMTA_VM_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/in" "$WORK/out"
cp "$DEB" "$WORK/in/"
cp "$HERE/guest-checks.sh" "$WORK/in/run.sh"
# The tests the guest runs with pytest against the installed package (the real-cgroup ones).
mkdir -p "$WORK/in/src"
cp "$HERE/../../pyproject.toml" "$WORK/in/src/"
(cd "$HERE/../.." && tar -c --exclude=__pycache__ --exclude=tests/system tests) | tar -x -C "$WORK/in/src"
chmod 755 "$WORK/in/run.sh"
# One boot: a fresh I/O disk and root overlay each time, so a retried boot starts clean.
boot() {
    rm -f "$WORK/io.img" "$WORK/root.qcow2" "$WORK/console.log"
    truncate -s 256M "$WORK/io.img"
    mkfs.ext4 -q -L elemta-io -d "$WORK/in" "$WORK/io.img"
    qemu-img create -q -f qcow2 -b "$IMAGE/base.raw" -F raw "$WORK/root.qcow2"
    t_vm=$(date +%s)
    rc=0
    timeout "$TIMEOUT" "$HERE/qemu.sh" "$IMAGE" "$WORK/root.qcow2" "$WORK/io.img" "$WORK/console.log" writeback \
        -nic none || rc=$?
    vm_seconds=$(( $(date +%s) - t_vm ))
}

boot
# Software emulation (TCG) has panicked the guest kernel in its first seconds of boot, before
# userspace ran (once in many boots, "Fatal exception in interrupt" in a timer): that says
# nothing about elemta, so such a boot is retried once. A panic after userspace started (the
# console's getty banner, "Debian GNU/Linux ...", is there) is not.
if [ "$rc" != 124 ] && grep -q 'Kernel panic' "$WORK/console.log" \
        && ! grep -q 'Debian GNU/Linux' "$WORK/console.log"; then
    echo "system-test ($RELEASE): the guest kernel panicked during early boot (qemu exit $rc), before userspace; booting once more. Its console:"
    grep -m 3 -E 'Kernel panic|RIP:|Fatal exception' "$WORK/console.log" || true
    boot
fi
if [ "$rc" = 124 ]; then
    echo "system-test: FAIL: the VM did not power off within ${TIMEOUT}s; last console lines:"
    tail -15 "$WORK/console.log"
    exit 1
fi
debugfs -R "rdump / $WORK/out" "$WORK/io.img" >/dev/null 2>&1
OUT="$WORK/out"
[ -d "$OUT/lost+found" ] && OUT="$WORK/out"
if [ ! -f "$OUT/results.txt" ]; then
    echo "system-test: FAIL: no results from the guest (qemu exit $rc); last console lines:"
    tail -25 "$WORK/console.log"
    [ -f "$OUT/out.log" ] && tail -20 "$OUT/out.log"
    exit 1
fi
cat "$OUT/results.txt"
mkdir -p "$HERE/../../dist/system-test/$RELEASE"
cp "$OUT"/*.txt "$OUT"/*.log "$OUT"/*.json "$WORK/console.log" "$HERE/../../dist/system-test/$RELEASE/" 2>/dev/null || true
pass=$(grep -c '^PASS' "$OUT/results.txt" || true)
fail=$(grep -c '^FAIL' "$OUT/results.txt" || true)
skip=$(grep -c '^SKIP' "$OUT/results.txt" || true)
echo "system-test ($RELEASE): $pass passed, $fail failed, $skip skipped; VM round trip ${vm_seconds}s (boot, install, checks, poweroff); logs in dist/system-test/$RELEASE/"
[ "$fail" = 0 ]
