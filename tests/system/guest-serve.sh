#!/bin/sh
# Runs INSIDE the VM at every boot of the host-driven tests (tests/system/vmhost.py), as
# /mnt/io/run.sh; /mnt/io/mode says which: "power" (power.py) or "flood" (flood.py).
# The first boot installs the .deb (the service starts and stays enabled); every boot (after the
# first, in power mode, a boot after a power cut) reports what the Maildir holds, brings up the
# network for the host's clients and says READY. It never powers off: the host kills qemu.
#
# Everything goes to the second serial port (/dev/ttyS1, a file on the host), line by line:
#   BOOT <release> <kernel> <write_cache of the disks>
#   INSTALLED <seconds> | FAIL <why>
#   M <seq> <sha256 of the body, 16 hex> <size>   one per file in new/ and cur/ (seq "?" if the
#                                                 file has no X-Power-Seq header: a torn file)
#   T <size> <name>                               one per file still in tmp/
#   S <size> <name>                               one per file in tmp/ when elemta started
#                                                 (before its clean-up removed its leftovers)
#   CLEANED <n>                                   tmp/ files elemta's start-up removed this boot
#   READY <interface> | FAIL <why>
# Flood mode then serves line commands on port 7000 (see the Python below).
set -u
IO=/mnt/io
MODE=$(cat "$IO/mode" 2>/dev/null || echo power)
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
    # The shipped socket listens on loopback only; the host's clients come through the network,
    # so open it as elemta.socket's comment tells an administrator to.
    mkdir -p /etc/systemd/system/elemta.socket.d
    printf '[Socket]\nListenStream=\nListenStream=0.0.0.0:25\n' >/etc/systemd/system/elemta.socket.d/50-host-test.conf
    if [ "$MODE" = flood ]; then
        # A small memory limit for the flood, in a drop-in as an administrator would set it
        # (elemta applies its thresholds to it); the configuration stays as shipped.
        mkdir -p /etc/systemd/system/elemta.service.d
        printf '[Service]\nMemoryHigh=infinity\nMemoryMax=384M\n' >/etc/systemd/system/elemta.service.d/50-flood.conf
        # 2-3 GiB of mail would fill the 3 GiB root disk, and elemta would rightly refuse for
        # want of space: the Maildir goes on the (large, sparse) I/O disk instead.
        systemctl stop elemta.service elemta.socket
        mkdir -p "$IO/mail"
        cp -a /var/lib/elemta/mail/. "$IO/mail/"
        chown --reference=/var/lib/elemta/mail "$IO/mail"
        chmod --reference=/var/lib/elemta/mail "$IO/mail"
        mount --bind "$IO/mail" /var/lib/elemta/mail || fail "cannot bind $IO/mail"
    fi
    # What tmp/ holds when elemta starts (before its clean-up): after a cut, an acknowledged
    # message found there would mean its move into new/ was not durable.
    mkdir -p /etc/systemd/system/elemta.service.d
    printf '[Service]\nExecStartPre=+/bin/sh -c "ls -l --time-style=+%%%%s %s/tmp >/run/elemta-tmp-at-start || :"\n' \
        "$MAIL" >/etc/systemd/system/elemta.service.d/50-tmp-snapshot.conf
    systemctl stop elemta.service elemta.socket
    systemctl daemon-reload
    systemctl start elemta.socket elemta.service || fail "cannot restart elemta with the drop-ins"
    # The package must survive the first cut too: the test is about mail, not dpkg's database.
    sync
    say "INSTALLED $(( $(date +%s) - t0 ))"
fi

cat >/tmp/manifest.py <<'PY'
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
manifest() { python3 /tmp/manifest.py "$MAIL"; }
manifest >/tmp/manifest
cat /tmp/manifest >/dev/ttyS1
is_active() { [ "$(systemctl is-active elemta.service)" = active ]; }
wait_for 120 is_active || fail "elemta.service is $(systemctl is-active elemta.service): $(journalctl -b -u elemta -n 5 --no-pager -o cat | tr '\n' ' ')"
# tmp/ as elemta found it at start (the drop-in above): size and name of each file
[ -f /run/elemta-tmp-at-start ] && awk 'NF >= 7 && $1 ~ /^-/ {print "S", $5, $7}' /run/elemta-tmp-at-start >/dev/ttyS1

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
[ "$MODE" = flood ] || { say "READY $IF"; exec sleep infinity; }

# Flood mode: a control server for flood.py, one command per line, one reply (ending "END"):
#   ballast FRACTION   a process in elemta.service's cgroup holding anonymous memory until the
#                      working set (as elemta counts it: memory.current minus the clean page
#                      cache, elemta.memory.cgroup.reclaimable_file) passes FRACTION of
#                      memory.max; replies once it holds it
#   release            the ballast exits
#   stats              memory.events, memory.current/max, active/inactive file, journal counts
#   manifest           the Maildir listing (as above)
cat >/tmp/ballast.py <<'PY'
import sys, time
cg, fraction = sys.argv[1], float(sys.argv[2])
# Wait until moved into the service's cgroup: only pages touched afterwards are charged there.
while "elemta.service" not in open("/proc/self/cgroup").read():
    time.sleep(0.05)
def read(name):
    return open(f"{cg}/{name}").read()
from elemta.memory.cgroup import parse_keyed, reclaimable_file  # the installed package's
def working_set():
    return int(read("memory.current")) - reclaimable_file(parse_keyed(read("memory.stat")), 2)
limit = int(read("memory.max"))
chunks = []
while working_set() < fraction * limit:
    chunks.append(bytearray(1 << 20))
    for i in range(0, 1 << 20, 4096):
        chunks[-1][i] = 1
print(f"ready {len(chunks)}", flush=True)
sys.stdin.read()  # until released
PY
cat >/tmp/control.py <<'PY'
import os, shutil, socket, subprocess, sys
mail = sys.argv[1]
def cgroup():
    pid = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", "elemta.service"],
                         capture_output=True, text=True).stdout.strip()
    rel = [l.split(":", 2)[2] for l in open(f"/proc/{pid}/cgroup").read().splitlines() if l.startswith("0:")][0]
    return "/sys/fs/cgroup" + rel.strip()
def stats():
    cg = cgroup()
    ev = dict(l.split() for l in open(cg + "/memory.events").read().splitlines())
    st = dict(l.split() for l in open(cg + "/memory.stat").read().splitlines())
    j = subprocess.run(["journalctl", "-u", "elemta", "-b", "-o", "cat", "--no-pager"],
                       capture_output=True, text=True).stdout
    main = subprocess.run(["systemctl", "show", "-p", "MainPID,NRestarts", "elemta.service"],
                          capture_output=True, text=True).stdout.split()
    return [f"oom_kill {ev.get('oom_kill', '?')}", f"oom {ev.get('oom', '?')}", f"max_events {ev.get('max', '?')}",
            f"current {open(cg + '/memory.current').read().strip()}", f"limit {open(cg + '/memory.max').read().strip()}",
            f"active_file {st['active_file']}", f"inactive_file {st['inactive_file']}",
            f"mail_free {shutil.disk_usage(mail).free}",
            f"critical_lines {j.count('Memory critical threshold exceeded')}",
            f"breaker_opened {j.count('Circuit breaker opened')}", f"breaker_closed {j.count('Circuit breaker closed')}",
            *main]
srv = socket.create_server(("10.0.2.15", 7000))
ballast = None
while True:
    conn, _ = srv.accept()
    f = conn.makefile("rw")
    for line in f:
        cmd = line.split()
        out = []
        if cmd[:1] == ["ballast"] and ballast is None:
            ballast = subprocess.Popen([sys.executable, "/tmp/ballast.py", cgroup(), cmd[1]],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            with open(cgroup() + "/cgroup.procs", "w") as procs:
                procs.write(str(ballast.pid))
            out = [ballast.stdout.readline().strip() or f"ballast exited {ballast.wait()}"]
        elif cmd[:1] == ["release"] and ballast is not None:
            ballast.stdin.close()
            out = [f"released {ballast.wait()}"]
            ballast = None
        elif cmd[:1] == ["debug"]:  # what a stuck flood looks like from inside
            out = subprocess.run(["sh", "-c", "ss -tnoi state established '( sport = :25 )' | head -60; "
                                  "journalctl -u elemta -b -o cat --no-pager | tail -30"],
                                 capture_output=True, text=True).stdout.splitlines()
        elif cmd[:1] == ["stats"]:
            out = stats()
        elif cmd[:1] == ["manifest"]:
            out = subprocess.run([sys.executable, "/tmp/manifest.py", mail], capture_output=True, text=True).stdout.splitlines()
        else:
            out = [f"? {line.strip()}"]
        f.write("\n".join(out + ["END"]) + "\n")
        f.flush()
    conn.close()
PY
python3 /tmp/control.py "$MAIL" >/tmp/control.log 2>&1 &
control_up() { python3 -c 'import socket; socket.create_connection(("10.0.2.15", 7000), 5).close()'; }
wait_for 30 control_up || fail "control server did not start: $(tail -3 /tmp/control.log | tr '\n' ' ')"
say "READY $IF"
exec sleep infinity
