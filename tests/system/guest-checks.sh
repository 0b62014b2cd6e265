#!/bin/sh
# Runs INSIDE the VM (systemd as PID 1, cgroup v2) as root, from the I/O disk mounted at /mnt/io.
# Installs the .deb with apt and checks the service end to end. One line per check goes to
# /mnt/io/results.txt: "PASS|FAIL|SKIP <check>: <detail>". Figures go to /mnt/io/figures.txt.
set -u
IO=/mnt/io
RES=$IO/results.txt
FIG=$IO/figures.txt
: >"$RES"
: >"$FIG"
export DEBIAN_FRONTEND=noninteractive
PKGDIR=/usr/lib/python3/dist-packages/elemta

result() { echo "$1 $2: $3" | tee -a "$RES"; }
pass() { result PASS "$1" "$2"; }
fail() { result FAIL "$1" "$2"; }
skip() { result SKIP "$1" "$2"; }
prop() { systemctl show -p "$1" --value elemta.service; }
# wait_for SECONDS COMMAND...: poll until COMMAND succeeds
wait_for() {
    n=$1; shift
    while [ "$n" -gt 0 ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1; n=$((n - 1))
    done
    return 1
}
is_active() { [ "$(systemctl is-active elemta.service)" = active ]; }
has_status() { prop StatusText | grep -q "$1"; }

echo "guest: $(uname -r), systemd $(systemctl --version | head -1 | cut -d' ' -f2), $(stat -fc %T /sys/fs/cgroup)"

# ---- install
cp "$IO"/elemta_*_all.deb /tmp/
t0=$(date +%s)
# The guest has no network: everything the package depends on must already be in the image.
if (cd /tmp && apt-get install -y ./elemta_*_all.deb) >"$IO/apt-install.log" 2>&1; then
    pass install "apt-get install ./$(basename /tmp/elemta_*_all.deb) in $(( $(date +%s) - t0 ))s"
else
    fail install "apt-get install failed: $(grep -E '^E:' "$IO/apt-install.log" | head -2 | tr '\n' ' ')"
    exit 1
fi

# ---- units
if out=$(systemd-analyze verify /lib/systemd/system/elemta.service /lib/systemd/system/elemta.socket 2>&1) \
        && [ -z "$out" ]; then
    pass verify "systemd-analyze verify elemta.service elemta.socket: clean"
else
    fail verify "systemd-analyze verify: $(echo "$out" | tr '\n' ' ')"
fi
score=$(systemd-analyze security elemta.service 2>/dev/null | sed -n 's/.*Overall exposure level for elemta.service: \([0-9.]*\).*/\1/p')
echo "security_exposure=$score" >>"$FIG"
if [ -n "$score" ] && awk "BEGIN{exit !($score <= 2.0)}"; then
    pass security "systemd-analyze security elemta.service: exposure $score (<= 2.0)"
else
    fail security "systemd-analyze security elemta.service: exposure '${score}' (want <= 2.0)"
fi

# ---- running
if wait_for 90 is_active; then
    pass is-active "elemta.service active, MainPID $(prop MainPID), user $(ps -o user= -p "$(prop MainPID)")"
else
    fail is-active "elemta.service is $(systemctl is-active elemta.service): $(journalctl -u elemta -n 5 --no-pager -o cat | tr '\n' ' ')"
fi
if [ "$(systemctl is-active elemta.socket)" = active ] \
        && journalctl -u elemta -o cat | grep -q "passed by systemd"; then
    pass socket "elemta.socket active; daemon uses the inherited listener ($(systemctl show -p Listen --value elemta.socket))"
else
    fail socket "elemta.socket $(systemctl is-active elemta.socket); inherited listener not reported in the journal: $(journalctl -b -u elemta.socket -o cat --no-pager | tail -3 | tr '\n' ' ')"
fi
if wait_for 20 has_status "sessions"; then
    pass status "StatusText=$(prop StatusText)"
else
    fail status "StatusText='$(prop StatusText)'"
fi

# ---- mail
token="elemta-vm-$(date +%s)-$$"
if swaks --server 127.0.0.1:25 --from sender@example.test --to postmaster@localhost \
        --header "Subject: $token" --body "$token" >"$IO/swaks.log" 2>&1; then
    sleep 1
    file=$(grep -rl "$token" /var/lib/elemta/mail/localhost/postmaster/new/ 2>/dev/null | head -1)
    if [ -n "$file" ]; then
        pass mail "swaks -> 250, stored in $file (owner $(stat -c %U "$file"))"
    else
        fail mail "swaks got 250 but no file with the token under /var/lib/elemta/mail/localhost/postmaster/new/"
    fi
else
    fail mail "swaks failed: $(grep -E '^ *<~?\*? *[0-9]{3} ' "$IO/swaks.log" | tail -1)"
fi

# ---- recipients: unknown users refused at RCPT; `elemta mailbox add` (as root) makes one for elemta
unknown="nobody-$$@localhost"
if swaks --server 127.0.0.1:25 --from sender@example.test --to "$unknown" --quit-after RCPT \
        >"$IO/swaks-unknown.log" 2>&1; then
    fail recipients "RCPT TO:<$unknown> accepted (default [delivery] recipients = \"maildir\")"
elif ! grep -q "550 5.1.1" "$IO/swaks-unknown.log" || [ -e "/var/lib/elemta/mail/localhost/nobody-$$" ]; then
    fail recipients "unknown user: $(grep -E '^ *<~?\*? *[0-9]{3} ' "$IO/swaks-unknown.log" | tail -1)"
elif ! elemta mailbox add "alice-$$@localhost" >"$IO/mailbox-add.log" 2>&1; then
    fail recipients "elemta mailbox add: $(cat "$IO/mailbox-add.log")"
elif [ "$(stat -c %U:%a "/var/lib/elemta/mail/localhost/alice-$$/new")" != elemta:700 ]; then
    fail recipients "new mailbox is $(stat -c %U:%a "/var/lib/elemta/mail/localhost/alice-$$/new"), not elemta:700"
elif swaks --server 127.0.0.1:25 --from sender@example.test --to "alice-$$@localhost" \
        >"$IO/swaks-alice.log" 2>&1 && [ -n "$(ls "/var/lib/elemta/mail/localhost/alice-$$/new/")" ]; then
    pass recipients "unknown user -> 550 5.1.1, no directory; elemta mailbox add -> elemta:700, mail stored"
else
    fail recipients "mail to the added mailbox: $(grep -E '^ *<~?\*? *[0-9]{3} ' "$IO/swaks-alice.log" | tail -1)"
fi

# ---- journal
journalctl -u elemta -o json --no-pager >"$IO/journal-install.json" 2>/dev/null
python3 - "$IO/journal-install.json" >"$IO/journal-check.txt" <<'PY'
import json, sys
entries = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
mine = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "elemta"]
events = sorted({e["ELEMTA_EVENT"] for e in mine if "ELEMTA_EVENT" in e})
with_id = [e for e in mine if "ELEMTA_EVENT" in e and "MESSAGE_ID" in e]
print(len(entries), len(mine), len(with_id), ",".join(events) or "-")
PY
read -r n_all n_mine n_ev evnames <"$IO/journal-check.txt"
if [ "${n_ev:-0}" -gt 0 ]; then
    pass journal "$n_mine entries with SYSLOG_IDENTIFIER=elemta, $n_ev with ELEMTA_EVENT+MESSAGE_ID ($evnames)"
elif grep -rqs JournalHandler "$PKGDIR"; then
    fail journal "$n_all entries, $n_mine with SYSLOG_IDENTIFIER=elemta, none with ELEMTA_EVENT/MESSAGE_ID"
else
    skip journal "$n_all entries for the unit but no structured ELEMTA_EVENT fields: this build has no journal handler (observability branch not merged)"
fi

# ---- journal catalog (journalctl -x explanations)
CATALOG=/usr/lib/systemd/catalog/elemta.catalog
if [ -f "$CATALOG" ]; then
    ids=$(grep -c '^-- [0-9a-f]\{32\}' "$CATALOG")
    grep -o '^-- [0-9a-f]\{32\}' "$CATALOG" | cut -c4- >/tmp/catalog-ids
    known=$(journalctl --list-catalog --no-pager 2>/dev/null | grep -c -F -f /tmp/catalog-ids)
    if [ "$ids" -gt 0 ] && [ "$known" -ge "$ids" ]; then
        pass catalog "$CATALOG: journalctl --list-catalog knows all $ids MESSAGE_IDs"
    else
        fail catalog "$CATALOG has $ids entries, journalctl --list-catalog knows $known"
    fi
else
    skip catalog "no journal catalog in this build (packaging/journal/elemta.catalog not generated yet)"
fi

# ---- metrics
code=$(curl -s -o "$IO/metrics.txt" -w '%{http_code}' http://127.0.0.1:8080/metrics)
if [ "$code" = 200 ] && grep -q '^elemta_memory_usage_bytes' "$IO/metrics.txt"; then
    pass metrics "GET /metrics 200, $(grep -c '^elemta_' "$IO/metrics.txt") elemta_* samples"
elif [ ! -e "$PKGDIR/observe/metrics.py" ] && [ ! -e "$PKGDIR/observe/http.py" ]; then
    skip metrics "no /metrics endpoint in this build (HTTP $code; observability branch not merged)"
else
    fail metrics "GET /metrics: HTTP $code"
fi

# ---- memory limit from a drop-in; the test-only freeze trigger and a short watchdog for later
mkdir -p /etc/systemd/system/elemta.service.d
cat >/etc/systemd/system/elemta.service.d/50-system-test.conf <<'CONF'
[Service]
MemoryHigh=infinity
MemoryMax=256M
Environment=ELEMTA_TEST_BLOCK_LOOP_SECONDS=3600
WatchdogSec=8s
CONF
systemctl daemon-reload
systemctl restart elemta.service
wait_for 90 is_active
cg=/sys/fs/cgroup$(awk -F: '$1=="0"{print $3}' /proc/"$(prop MainPID)"/cgroup)
cgmax=$(cat "$cg/memory.max" 2>/dev/null)
stats=$(curl -sf http://127.0.0.1:8080/api/stats || true)
wait_for 20 has_status "MiB" || true
status=$(prop StatusText)
if [ -n "$stats" ]; then
    if echo "$stats" | python3 -c '
import json, sys
m = json.load(sys.stdin)["memory"]
ok = m.get("limit_bytes") == 268435456 and m.get("limit_source") == "cgroup-v2"
print(m.get("limit_bytes"), m.get("limit_source"))
sys.exit(0 if ok else 1)' >"$IO/stats-limit.txt" 2>&1; then
        pass memory-limit "MemoryMax=256M: $cg/memory.max=$cgmax; /api/stats limit $(cat "$IO/stats-limit.txt")"
    else
        fail memory-limit "MemoryMax=256M: memory.max=$cgmax; /api/stats says $(cat "$IO/stats-limit.txt")"
    fi
elif echo "$status" | grep -q "of 256.0 MiB (cgroup-v2)"; then
    pass memory-limit "MemoryMax=256M: $cg/memory.max=$cgmax; StatusText=$status"
elif [ ! -e "$PKGDIR/memory/governor.py" ]; then
    skip memory-limit "memory.max=$cgmax in $cg, but this build has no governor to report it (StatusText=$status)"
else
    fail memory-limit "MemoryMax=256M: memory.max=$cgmax; StatusText=$status; no /api/stats"
fi

# ---- reload: a good file keeps the process; a broken one is rejected and the old config stays
pid=$(prop MainPID)
systemctl reload elemta.service
sleep 2
if is_active && [ "$(prop MainPID)" = "$pid" ] \
        && journalctl -u elemta -o cat --no-pager | grep -q "configuration reloaded"; then
    pass reload "systemctl reload: still active, same MainPID $pid, journal: $(journalctl -u elemta -o cat --no-pager | grep "configuration reloaded" | tail -1)"
else
    fail reload "after systemctl reload: $(systemctl is-active elemta), MainPID $(prop MainPID) (was $pid)"
fi
cp /etc/elemta/elemta.toml /tmp/elemta.toml.good
sed -i 's/^#max_memory_usage = .*/max_memory_usage = "lots"/' /etc/elemta/elemta.toml
systemctl reload elemta.service
sleep 2
if is_active && [ "$(prop MainPID)" = "$pid" ] \
        && journalctl -u elemta -o cat --no-pager | grep -q "reload rejected"; then
    pass reload-broken "broken file: still active, same MainPID, journal: $(journalctl -u elemta -o cat --no-pager | grep "reload rejected" | tail -1 | cut -c1-160)"
else
    fail reload-broken "broken file: $(systemctl is-active elemta), MainPID $(prop MainPID) (was $pid)"
fi
cp /tmp/elemta.toml.good /etc/elemta/elemta.toml

# ---- watchdog: freeze the event loop for real; systemd must kill and restart the service
restarts=$(prop NRestarts)
pid=$(prop MainPID)
t0=$(date +%s)
systemctl kill --kill-whom=main --signal=SIGUSR2 elemta.service
restarted() { [ "$(prop NRestarts)" -gt "$restarts" ] && is_active && [ "$(prop MainPID)" != "$pid" ]; }
if wait_for 120 restarted; then
    pass watchdog "loop frozen (SIGUSR2, ELEMTA_TEST_BLOCK_LOOP_SECONDS=3600, WatchdogSec=8s): NRestarts $restarts -> $(prop NRestarts) after $(( $(date +%s) - t0 ))s, new MainPID $(prop MainPID); $(journalctl -u elemta -o cat --no-pager | grep -i 'watchdog timeout' | tail -1)"
else
    fail watchdog "NRestarts $(prop NRestarts) (was $restarts), $(systemctl is-active elemta)"
fi

# ---- stop drains and exits 0
systemctl stop elemta.service elemta.socket
if [ "$(prop Result)" = success ] && [ "$(prop ExecMainStatus)" = 0 ]; then
    pass stop "systemctl stop: Result=success, exit status 0"
else
    fail stop "systemctl stop: Result=$(prop Result), exit status $(prop ExecMainStatus)"
fi
journalctl -u elemta -o json --no-pager >"$IO/journal.json" 2>/dev/null
# The reloads above, as structured journal entries (ELEMTA_EVENT=config_reloaded, RESULT=...).
results=$(python3 -c '
import json, sys
print(" ".join(sorted({e.get("RESULT", "?") for e in map(json.loads, open(sys.argv[1]))
                       if e.get("ELEMTA_EVENT") == "config_reloaded" and e.get("CONFIG_PATH")})))
' "$IO/journal.json")
if [ "$results" = "applied rejected" ]; then
    pass journal-reload "ELEMTA_EVENT=config_reloaded with CONFIG_PATH and RESULT=applied, RESULT=rejected"
elif grep -rqs JournalHandler "$PKGDIR"; then
    fail journal-reload "config_reloaded entries with RESULT: '$results' (want applied and rejected)"
else
    skip journal-reload "no journal handler in this build (observability branch not merged)"
fi
journalctl -b --no-pager >"$IO/journal-boot.log" 2>/dev/null

# ---- purge
apt-get purge -y elemta >"$IO/apt-purge.log" 2>&1
left=""
getent passwd elemta >/dev/null && left="$left user"
getent group elemta >/dev/null && left="$left group"
[ -e /var/lib/elemta ] && left="$left /var/lib/elemta"
[ -e /etc/elemta ] && left="$left /etc/elemta"
[ -e /lib/systemd/system/elemta.service ] && left="$left unit"
systemctl list-units --all --no-legend 'elemta.*' | grep -q . && left="$left loaded-units"
if [ -z "$left" ] && ! dpkg -s elemta >/dev/null 2>&1; then
    pass purge "apt-get purge: package, user, group, /var/lib/elemta, /etc/elemta gone"
else
    fail purge "apt-get purge left:$left"
fi
grep -q '^FAIL' "$RES" && exit 1
exit 0
