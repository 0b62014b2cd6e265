#!/bin/sh
# Builds (once) the Debian VM base image the system test boots (argument: bookworm or trixie,
# default bookworm), and prints its directory.
#
# The image is cached OUTSIDE the repository under $ELEMTA_VM_CACHE (default /var/cache/elemta-vm),
# keyed by a hash of the package list and the guest set-up below: change either and a new image is
# built, otherwise the cached one is reused. Needs root (debootstrap) and Debian's archive.
#
# The guest is deliberately generic: a oneshot unit mounts the second NVMe namespace (the "I/O disk"),
# runs /run.sh from it with output to the same disk, and powers off. Everything the test does lives
# in that script (tests/system/guest-checks.sh), so editing the checks never rebuilds the image.
set -eu

CACHE=${ELEMTA_VM_CACHE:-/var/cache/elemta-vm}
SUITE=${1:-bookworm}
case $SUITE in bookworm|trixie) ;; *) echo "build-image: unknown release $SUITE (bookworm, trixie)" >&2; exit 2 ;; esac
# The root filesystem sits in a GPT partition with this fixed PARTUUID, and the kernel is told
# root=PARTUUID=...: trixie's 6.12 kernel names NVMe namespaces asynchronously, so /dev/nvme0n1
# may be the I/O disk (../shared/notes/vm-testing.md). The same layout boots bookworm.
PARTUUID=6e1a3f00-e1e7-4a00-9000-00000000e1e7
# Everything the elemta .deb depends on must already be here: the guest has no network.
# swaks and curl are the in-guest SMTP and HTTP clients of the checks; man-db lets
# `systemd-analyze verify` resolve Documentation=man:elemta(8). pytest and hypothesis run the
# real-cgroup tests (tests/realcgroup.py) in the guest, the one pure cgroup v2 host we have.
PACKAGES="systemd,systemd-sysv,udev,dbus,iproute2,procps,netbase,adduser,ca-certificates,\
linux-image-cloud-amd64,init-system-helpers,python3,python3-systemd,python3-psutil,\
python3-prometheus-client,python3-aiosmtpd,swaks,curl,man-db,python3-pytest,python3-hypothesis"

mirror() {
    # The mirror apt already uses here (deb822 "URIs:" or one-line "deb URL suite").
    m=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | grep -m1 -E '/debian/?$' || true)
    [ -n "$m" ] || m=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '{print $2}' | grep -m1 -E '/debian/?$' || true)
    echo "${m:-http://deb.debian.org/debian}"
}

runner_script() {
    cat <<'SH'
#!/bin/sh
# elemta system test runner: run /run.sh from the I/O disk, keep its output there, power off.
mkdir -p /mnt/io
if mount LABEL=elemta-io /mnt/io; then
    if [ -x /mnt/io/run.sh ]; then
        /mnt/io/run.sh >/mnt/io/out.log 2>&1
        echo $? >/mnt/io/rc
    fi
    sync
    umount /mnt/io
fi
systemctl --no-block poweroff
SH
}

runner_unit() {
    cat <<'UNIT'
[Unit]
Description=elemta system test runner
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/elemta-vm-runner
StandardOutput=journal+console
StandardError=journal+console
[Install]
WantedBy=multi-user.target
UNIT
}

KEY=$( { echo "$SUITE $PACKAGES $PARTUUID"; runner_script; runner_unit; echo v3-gpt; } | sha256sum | cut -c1-16)
DIR="$CACHE/$SUITE-$KEY"
if [ -f "$DIR/base.raw" ] && [ -f "$DIR/vmlinuz" ] && [ -f "$DIR/partuuid" ]; then
    echo "$DIR"
    exit 0
fi

[ "$(id -u)" = 0 ] || { echo "build-image: needs root (debootstrap)" >&2; exit 1; }
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
start=$(date +%s)
echo "build-image: debootstrap $SUITE from $(mirror) into $WORK (a few minutes)" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$(mirror)" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }

echo elemta-vm >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 elemta-vm\n' >"$ROOT/etc/hosts"
# Root comes from the kernel command line (rw): no fsck, no fstab entry needed.
: >"$ROOT/etc/fstab"
runner_script >"$ROOT/usr/local/sbin/elemta-vm-runner"
chmod 755 "$ROOT/usr/local/sbin/elemta-vm-runner"
runner_unit >"$ROOT/etc/systemd/system/elemta-vm-runner.service"
ln -sf /etc/systemd/system/elemta-vm-runner.service \
    "$ROOT/etc/systemd/system/multi-user.target.wants/elemta-vm-runner.service"
# Timers that would only add noise and CPU under emulation.
for t in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$t"
done
apt_clean_dir="$ROOT/var/cache/apt/archives"
rm -f "$apt_clean_dir"/*.deb

cp "$(ls "$ROOT"/boot/vmlinuz-* | sort | tail -1)" "$WORK/vmlinuz"
truncate -s 3G "$WORK/base.raw"
printf 'label: gpt\nstart=2048, size=6287360, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=%s\n' \
    "$PARTUUID" | sfdisk -q "$WORK/base.raw"
mkfs.ext4 -q -L elemta-root -E offset=1048576 -d "$ROOT" "$WORK/base.raw" 3070M
echo "$PARTUUID" >"$WORK/partuuid"
mkdir -p "$DIR"
mv "$WORK/base.raw" "$WORK/vmlinuz" "$WORK/partuuid" "$DIR/"
echo "$PACKAGES" >"$DIR/packages"
echo "$(( $(date +%s) - start ))" >"$DIR/build-seconds"
echo "build-image: built $DIR in $(cat "$DIR/build-seconds") s" >&2
# Older images (another package list or layout) are kept: another checkout (a branch) may still
# boot them. Remove them by hand (rm -rf $CACHE/<release>-<key>) when no checkout needs them.
echo "$DIR"
