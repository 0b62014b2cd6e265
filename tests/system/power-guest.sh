#!/bin/sh
# Runs INSIDE the VM at every boot of the power-cut test (tests/system/power.py), as /mnt/io/run.sh.
# The first boot installs the .deb (the service starts and stays enabled); every boot, which after
# the first is a boot after a power cut, reports what the Maildir holds, then brings up the network
# for the host's client and says READY. It never powers off: the host kills qemu.
#
# Everything goes to the second serial port (/dev/ttyS1, a file on the host), line by line:
#   BOOT <release> <kernel> <write_cache of the disks>
#   INSTALLED <seconds> | FAIL <why>
#   M <seq> <sha256 of the body, 16 hex> <size>   one per file in new/ and cur/ (seq "?" if the
#                                                 file has no X-Power-Seq header: a torn file)
#   T <size> <name>                               one per file still in tmp/
#   CLEANED <n>                                   tmp/ files elemta's start-up removed this boot
#   READY <interface> | FAIL <why>
set -u
IO=/mnt/io
MAIL=/var/lib/elemta/mail/localhost/postmaster
say() { printf '%s\n' "$*" >/dev/ttyS1; }
fail() { say "FAIL $*"; exit 1; }
# wait_for SECONDS COMMAND...: poll until COMMAND succeeds
wait_for() {
    n=$1; shift
    while [ "$n" -gt 0 ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1; n=$((n - 1))
    done
    return 1
}

stty -F /dev/ttyS1 raw -echo 2>/dev/null
# "write back": the disks have a volatile write cache, so the guest kernel sends flushes (and
# qemu, with cache=none or writeback, honours them). "write through" would make the test moot.
say "BOOT $(. /etc/os-release && echo "$VERSION_CODENAME") $(uname -r) write_cache=$(cat /sys/block/nvme*/queue/write_cache | sort -u | tr ' \n' '_,')"

if ! dpkg -s elemta >/dev/null 2>&1; then
    cp "$IO"/elemta_*_all.deb /tmp/
    t0=$(date +%s)
    export DEBIAN_FRONTEND=noninteractive
    (cd /tmp && apt-get install -y ./elemta_*_all.deb) >/tmp/apt-install.log 2>&1 \
        || fail "apt-get install: $(grep -E '^E:' /tmp/apt-install.log | head -2 | tr '\n' ' ')"
    # The shipped socket listens on loopback only; the host's client comes through the network,
    # so open it as elemta.socket's comment tells an administrator to.
    mkdir -p /etc/systemd/system/elemta.socket.d
    printf '[Socket]\nListenStream=\nListenStream=0.0.0.0:25\n' >/etc/systemd/system/elemta.socket.d/50-power-test.conf
    systemctl stop elemta.service elemta.socket
    systemctl daemon-reload
    systemctl start elemta.socket elemta.service || fail "cannot restart elemta with the socket drop-in"
    # The package must survive the first cut too: the test is about mail, not dpkg's database.
    sync
    say "INSTALLED $(( $(date +%s) - t0 ))"
fi

python3 - "$MAIL" >/tmp/manifest <<'PY'
import hashlib, os, sys
root = sys.argv[1]
for sub in ("new", "cur"):
    d = os.path.join(root, sub)
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        data = open(os.path.join(d, name), "rb").read()
        head, _, body = data.partition(b"\n\n")
        seq = "?"
        for line in head.split(b"\n"):
            if line.lower().startswith(b"x-power-seq:"):
                seq = line.split(b":", 1)[1].strip().decode()
        print("M", seq, hashlib.sha256(body).hexdigest()[:16], len(data))
d = os.path.join(root, "tmp")
for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
    print("T", os.path.getsize(os.path.join(d, name)), name)
PY
cat /tmp/manifest >/dev/ttyS1

is_active() { [ "$(systemctl is-active elemta.service)" = active ]; }
wait_for 120 is_active || fail "elemta.service is $(systemctl is-active elemta.service): $(journalctl -b -u elemta -n 5 --no-pager -o cat | tr '\n' ' ')"
cleaned=$(journalctl -b -u elemta -o cat --no-pager | sed -n 's/.*removed \([0-9]*\) stale file.*/\1/p' | head -1)
say "CLEANED ${cleaned:-0}"

# User-mode network (qemu -nic user): the guest is 10.0.2.15, the host's hostfwd port leads to
# its port 25. The image configures no network, so do it here.
iface() { ip -o link show | awk -F': ' '$2 != "lo" {print $2; exit}' | grep .; }
wait_for 60 iface || fail "no network interface: $(ip -o link show | tr '\n' ' ')"
IF=$(iface)
ip link set "$IF" up && ip addr add 10.0.2.15/24 dev "$IF" || fail "cannot configure $IF"
banner() {
    python3 -c 'import socket; s = socket.create_connection(("10.0.2.15", 25), 10); assert s.recv(64).startswith(b"220")'
}
wait_for 60 banner || fail "no SMTP banner on 10.0.2.15:25"
say "READY $IF"
exec sleep infinity
