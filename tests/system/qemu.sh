#!/bin/sh
# Boots the test VM: the one qemu command line of the system test (run.sh) and of the
# tests driven from the host (vmhost.py: power.py, flood.py). It execs qemu, so the caller's
# child pid is qemu's own (power.py kills it: a power cut).
#
# Usage: tests/system/qemu.sh IMAGE_DIR ROOT_QCOW2 IO_IMG CONSOLE_LOG CACHE [qemu args...]
#   IMAGE_DIR  a base image directory from build-image.sh (vmlinuz, partuuid)
#   ROOT       the root disk, NVMe namespace 1: a qcow2 overlay of IMAGE_DIR/base.raw (the
#              system test) or, named *.raw, a raw copy (power and flood tests: vmhost.py says why)
#   IO_IMG     the ext4 I/O disk labelled elemta-io (inputs, results), NVMe namespace 2
#   CACHE      qemu's cache mode for both disks: writeback (qemu's default) or none; both
#              pass the guest's flushes on to the host file. Never unsafe where durability is
#              tested: it drops them.
#   the rest   appended as is: the network (-nic none, or user-mode with hostfwd), more serials.
#
# KVM here is a paravirtual device qemu cannot use (../shared/notes/vm-testing.md): software
# emulation (TCG), always. The root is found by PARTUUID (trixie's kernel names NVMe namespaces
# asynchronously), no initramfs (the cloud kernel has NVMe and ext4 built in).
set -eu
IMAGE=${1:?usage: $0 IMAGE_DIR ROOT IO_IMG CONSOLE_LOG CACHE [qemu args...]}
ROOT=${2:?root disk}
IO=${3:?io disk}
CONSOLE=${4:?console log}
CACHE=${5:?cache mode}
case "$ROOT" in *.raw) ROOT_FORMAT=raw ;; *) ROOT_FORMAT=qcow2 ;; esac
shift 5
exec qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp 2 -m 2048 \
    -display none -serial "file:$CONSOLE" -monitor none -no-reboot \
    -kernel "$IMAGE/vmlinuz" \
    -append "root=PARTUUID=$(cat "$IMAGE/partuuid") rw console=ttyS0 panic=-1 systemd.unified_cgroup_hierarchy=1 quiet" \
    -device nvme,serial=elemta,id=nvme0 \
    -drive file="$ROOT",if=none,id=root,format="$ROOT_FORMAT",cache="$CACHE" \
    -device nvme-ns,drive=root,bus=nvme0,nsid=1 \
    -drive file="$IO",if=none,id=io,format=raw,cache="$CACHE" \
    -device nvme-ns,drive=io,bus=nvme0,nsid=2 \
    "$@"
