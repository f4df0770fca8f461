#!/usr/bin/env bash
# The demo: builds Lockstep and its guests, records a guest whose result depends on where timer
# interrupts land, replays it bit-exactly, shows the log, and shows that a second recording differs;
# then the live pair: kill -9 of the primary (failover), SIGUSR2 (a planned switchover), roles swapped
# back and forth by `lockstep control`, a lost host (SIGSTOP) with the fence in etcd, and HA restart
# (`lockstep supervise`: each killed side comes back as the survivor's secondary; both lost: a cold restart,
# on host B from the copy of the guest its secondary saved when host A is gone), and a migration of the running
# guest to a third host (`lockstep control ... migrate`) that keeps it protected.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
make -s -C Guests
swift build -c release
L=.build/release/lockstep
OUT=$(mktemp -d)
ETCD=""
trap '[ -z "$ETCD" ] || kill "$ETCD" 2>/dev/null; rm -rf "$OUT"' EXIT
FENCE="$OUT/fence"
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then echo "demo: /dev/kvm cannot be opened (run as root on a KVM host)" >&2; exit 69; fi

echo "== 1. record timer-compute (ring-3 compute, 1 kHz PIT, interrupts land wherever the host timer says)"
$L record Guests/build/timer-compute.elf --log "$OUT/a.log" --serial "file:$OUT/a.out" --verbose 2>"$OUT/a.err"
cat "$OUT/a.out"; tail -2 "$OUT/a.err"
echo "== 2. replay it: no real clock, no real input; sync points stand in for the kicks"
$L replay "$OUT/a.log" --serial "file:$OUT/a.replay.out" --verbose 2>"$OUT/a.replay.err"
tail -2 "$OUT/a.replay.err"
cmp "$OUT/a.out" "$OUT/a.replay.out" && echo "serial output: identical"
[ "$(tail -1 "$OUT/a.err")" = "$(tail -1 "$OUT/a.replay.err")" ] && echo "state digest: identical" || { echo "DIGEST MISMATCH"; exit 72; }
echo "== 3. a second recording: different interrupt timing, different result"
$L record Guests/build/timer-compute.elf --log "$OUT/b.log" --serial "file:$OUT/b.out" 2>"$OUT/b.err"
grep RESULT "$OUT/a.out" "$OUT/b.out"
echo "== 4. the log (first events, with guest RIP and the instruction there)"
($L log inspect "$OUT/a.log" || true) | head -12
echo "== 5. the interrupt-driven echo service, recorded with live UDP input and replayed"
$L record Guests/build/echo.elf --log "$OUT/e.log" --serial udp:127.0.0.1:5555 2>"$OUT/e.err" &
REC=$!
python3 - <<'PY'
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
deadline = time.time() + 20
for req in [b"REQ 1 hello\n", b"REQ 2 world\n", b"REQ 1 hello\n", b"QUIT\n"]:
    while time.time() < deadline:
        s.sendto(req, ("127.0.0.1", 5555))
        try:
            print("  reply:", s.recv(200).decode().strip()); break
        except socket.timeout:
            continue
PY
wait $REC || true
$L replay "$OUT/e.log" --serial none 2>&1 | tail -1
tail -1 "$OUT/e.err"
# A pair on loopback running GUEST with the service on UDP port UDP: three requests, then signal SIG to the
# primary (KILL: a failure; USR2: a planned switchover), then requests to whoever holds the guest. SWAP: the
# pair is configured both ways; `lockstep control` on A hands the guest to B and asks for it back, requests between.
pair_demo() {
    local tag=$1 link=$2 udp=$3 guest=$4 sig=$5 back=$(( $2 + 100 ))
    local pair=(--key-file "$OUT/key" --fence "$FENCE" --serial "udp:127.0.0.1:$udp" --status-interval-ms 0)
    local both=() both_sec=()
    if [ "$sig" = SWAP ]; then
        both=(--listen "127.0.0.1:$back" --control "$OUT/a$tag.sock"); both_sec=(--peer "127.0.0.1:$back" --control "$OUT/b$tag.sock")
    fi
    $L secondary --listen "127.0.0.1:$link" "${pair[@]}" ${both_sec[@]+"${both_sec[@]}"} 2>"$OUT/s$tag.err" &
    SEC=$!
    $L primary "Guests/build/$guest.elf" --peer "127.0.0.1:$link" --memory 64 "${pair[@]}" ${both[@]+"${both[@]}"} 2>"$OUT/p$tag.err" &
    PRI=$!
    PYTHONPATH="$OUT" python3 - "$PRI" "$udp" "$sig" "$L" "$OUT/a$tag.sock" "$OUT/b$tag.sock" "$OUT/p$tag.err" "$OUT/s$tag.err" <<'PY'
import os, signal, subprocess, sys, time
pri, port, sig, lockstep, sock_a, sock_b, err_a, err_b = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:]
from democlient import asker
ask = asker(port)
for i in range(1, 4): print("  primary:  ", ask("REQ %d before" % i, "REP %d " % i))
if sig == "SWAP":
    def handover(sock, side):
        t0 = time.time()
        r = subprocess.run([lockstep, "control", sock, "handover"], capture_output=True, text=True, timeout=60)
        print("  %s: lockstep control ... handover -> %s (%.1f ms)" % (side, r.stdout.strip().split(" (")[0], (time.time() - t0) * 1000))
        if r.returncode != 0: sys.exit("demo: the handover failed: " + r.stdout + r.stderr)
    def protected(err, times, side, limit=30.0):  # until the new primary has seeded the old one
        deadline = time.time() + limit
        while time.time() < deadline:
            lines = [l for l in open(err).read().splitlines() if "protected: secondary at" in l]
            if len(lines) >= times:
                l = lines[-1].replace("lockstep: ", ""); print("  %s: %s" % (side, l[:l.index(":", l.index("seeded at exit"))])); return
            time.sleep(0.01)
        sys.exit("demo: %s was never protected again" % side)
    handover(sock_a, "A (primary)")
    print("  B:        ", ask("REQ 4 on-B", "REP 4 "))
    protected(err_b, 1, "B")
    handover(sock_a, "A (secondary, asking for the guest back)")
    print("  A:        ", ask("REQ 5 on-A-again", "REP 5 "))
    protected(err_a, 2, "A")
    print("  A:        ", ask("QUIT", "RESULT"))
    sys.exit(0)
os.kill(pri, getattr(signal, "SIG" + sig)); t0 = time.time()
print("  kill -%s primary" % ("9" if sig == "KILL" else sig))
r = ask("REQ 4 after", "REP 4 "); print("  answer:   ", r, "(%.1f ms after the signal)" % ((time.time() - t0) * 1000))
if sig == "STOP":  # the lost host comes back: it finds the fence taken and stops, releasing nothing
    os.kill(pri, signal.SIGCONT); print("  kill -CONT old primary")
print("  survivor: ", ask("REQ 2 before", "REP 2 "), "(a retried request gets the same answer)")
print("  survivor: ", ask("QUIT", "RESULT"))
PY
}

head -c 32 /dev/urandom > "$OUT/key"; mkdir -p "$OUT/fence"
# The pair steps' UDP client of the echo guest (imported by their Python).
cat > "$OUT/democlient.py" <<'PY'
import re, socket, sys, time
def asker(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.01)
    def ask(line, want, limit=20.0):  # resent every 10 ms until a reply starting with want, bounded
        deadline = time.time() + limit
        while time.time() < deadline:
            s.sendto(line.encode() + b"\n", ("127.0.0.1", port))
            try:
                r = s.recv(200).decode().strip()
                if r.startswith(want): return r
            except socket.timeout:
                pass
        sys.exit("demo: no reply to %r" % line)
    return ask
def supervised(err):  # err: each side's supervisor's stderr file
    def line(side, text, n=1, limit=30.0):  # the nth line of a side's supervisor containing text
        deadline = time.time() + limit
        while time.time() < deadline:
            hits = [l for l in open(err[side]).read().splitlines() if text in l]
            if len(hits) >= n: return hits[n - 1]
            time.sleep(0.005)
        sys.exit("demo: %s never printed %r" % (side, text))
    def started(side, n):  # the pid of the nth process a side's supervisor started
        return int(re.search(r", pid (\d+):", line(side, "started the", n)).group(1))
    return line, started
PY
echo "== 6. the live pair: a secondary replays the primary in lockstep; kill -9 the primary; the survivor answers"
pair_demo 1 7700 5556 echo KILL
{ wait $PRI; } 2>/dev/null || true  # killed on purpose
wait $SEC && echo "survivor exited 0"
grep -E "^live:|state-digest" "$OUT/s1.err"
echo "== 7. a planned switchover: SIGUSR2 makes the primary hand the guest to its secondary, nothing lost or repeated"
echo "   (echo-tickless sleeps in HLT with no timer between requests)"
pair_demo 2 7701 5557 echo-tickless USR2
wait $PRI && echo "old primary exited 0"
wait $SEC && echo "new primary exited 0"
grep -E "handed over" "$OUT/p2.err"
grep -E "^live:" "$OUT/s2.err"
echo "== 8. roles swap: a pair configured both ways (primary --listen, secondary --peer to it) hands the guest"
echo "   from A to B, then A (now the secondary) asks for it back; \`lockstep control SOCKET handover\` both times; each side re-seeds the other"
pair_demo 3 7702 5558 echo SWAP
wait $PRI && echo "A (primary, then secondary, then primary) exited 0"
wait $SEC && echo "B (secondary, then primary, then secondary) exited 0"
grep -h "state-digest" "$OUT/p3.err" "$OUT/s3.err"
echo "== 9. a lost host, with the fence in etcd: the primary is frozen (SIGSTOP), its etcd lease would run 60 s;"
echo "   the secondary named by the pair record takes the fence from it at once; resumed, the old primary stops (75)"
python3 - "$OUT/etcd" 2>"$OUT/etcd.err" <<'PY' &
import os, sys
d = sys.argv[1]
os.execvp("etcd", ["etcd", "--name", "demo", "--data-dir", d, "--log-level", "error",
    "--listen-client-urls", "http://127.0.0.1:23790", "--advertise-client-urls", "http://127.0.0.1:23790",
    "--listen-peer-urls", "http://127.0.0.1:23800", "--initial-advertise-peer-urls", "http://127.0.0.1:23800",
    "--initial-cluster", "demo=http://127.0.0.1:23800"])
PY
ETCD=$!
python3 - <<'PY'
import socket, time
deadline = time.time() + 20
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", 23790), 0.2).close(); break
    except OSError:
        time.sleep(0.05)
else:
    raise SystemExit("demo: etcd did not start on 127.0.0.1:23790")
PY
FENCE="etcd://127.0.0.1:23790/lockstep/demo"
pair_demo 4 7703 5559 echo STOP
set +e; wait $PRI; st=$?; set -e
echo "old primary exited $st (75: fenced)"; grep -E "not by this process" "$OUT/p4.err"
wait $SEC && echo "survivor exited 0"
grep -E "^live:" "$OUT/s4.err"
echo "== 10. HA restart: each side runs under \`lockstep supervise\`; kill -9 the primary: the survivor serves on,"
echo "   the killed side comes back as its secondary and is seeded; then kill -9 the survivor: the same the other way"
SUP=(--key-file "$OUT/key" --fence "$OUT/fence" --serial "udp:127.0.0.1:5560" --status-interval-ms 0)
$L supervise secondary --listen 127.0.0.1:7705 --peer 127.0.0.1:7704 "${SUP[@]}" 2>"$OUT/sb.err" &
SB=$!
$L supervise primary Guests/build/echo.elf --peer 127.0.0.1:7705 --listen 127.0.0.1:7704 --memory 64 "${SUP[@]}" 2>"$OUT/sa.err" &
SA=$!
PYTHONPATH="$OUT" python3 - "$OUT/sa.err" "$OUT/sb.err" <<'PY'
import os, signal, sys, time
from democlient import asker, supervised
line, started = supervised({"A": sys.argv[1], "B": sys.argv[2]})
ask = asker(5560)
def kill(side, other, port, seq, n):
    pid = started(side, n)
    os.kill(pid, signal.SIGKILL); t0 = time.time()
    print("  kill -9 %s's process (pid %d)" % (side, pid))
    print("  %s:         %s (%.1f ms after the kill)" % (other, ask("REQ %d after" % seq, "REP %d " % seq), (time.time() - t0) * 1000))
    print("  %s" % line(side, "restarting as").replace("lockstep supervise: ", "%s's supervisor: " % side))
    p = line(other, "protected: secondary at 127.0.0.1:%d" % port, 2 if other == "A" else 1)
    print("  %s: protected again by %s's restart, %.0f ms after the kill: %s" % (other, side, (time.time() - t0) * 1000,
          p[p.index("seeded at exit"):p.index(":", p.index("seeded at exit"))]))
line("A", "protected: secondary")
for i in range(1, 4): print("  A:         ", ask("REQ %d before" % i, "REP %d " % i))
kill("A", "B", 7704, 4, 1)
kill("B", "A", 7705, 5, 1)
print("  A:         ", ask("QUIT", "RESULT"))
PY
wait $SA && echo "supervisor A exited 0"
wait $SB && echo "supervisor B exited 0"
grep -h "the pair ended" "$OUT/sa.err" "$OUT/sb.err"
echo "== 11. both sides lost: kill -9 both processes at once; each supervisor restarts a secondary that nobody"
echo "   seeds; after --rejoin-timeout-ms (1 s here) A's supervisor boots the guest again (a cold restart), B protects it"
SUP=(--key-file "$OUT/key" --fence "$OUT/fence" --serial "udp:127.0.0.1:5561" --status-interval-ms 0)
$L supervise --rejoin-timeout-ms 1000 secondary --listen 127.0.0.1:7707 --peer 127.0.0.1:7706 "${SUP[@]}" 2>"$OUT/sd.err" &
SD=$!
$L supervise --rejoin-timeout-ms 1000 primary Guests/build/echo.elf --peer 127.0.0.1:7707 --listen 127.0.0.1:7706 --memory 64 "${SUP[@]}" 2>"$OUT/sc.err" &
SC=$!
PYTHONPATH="$OUT" python3 - "$OUT/sc.err" "$OUT/sd.err" <<'PY'
import os, signal, sys, time
from democlient import asker, supervised
line, started = supervised({"A": sys.argv[1], "B": sys.argv[2]})
ask = asker(5561)
line("A", "protected: secondary")
for i in range(1, 3): print("  A:         ", ask("REQ %d before" % i, "REP %d " % i))
pids = started("A", 1), started("B", 1)
for p in pids: os.kill(p, signal.SIGKILL)
t0 = time.time()
print("  kill -9 A's primary (pid %d) and B's secondary (pid %d)" % pids)
c = line("A", "a cold restart")
print("  A's supervisor: " + c[c.index("no live side"):])
line("A", "protected: secondary at 127.0.0.1:7707", 2)
print("  A: the guest booted again, protected by B's restarted secondary %.0f ms after the kills" % ((time.time() - t0) * 1000))
print("  A:         ", ask("REQ 1 again", "REP 1 "), "(a new incarnation: its request count starts again)")
print("  A:         ", ask("QUIT", "RESULT"))
PY
wait $SC && echo "supervisor A exited 0"
wait $SD && echo "supervisor B exited 0"
echo "== 12. host A gone: kill -9 A's supervisor and primary (B goes live), then B's process; B's secondary saved the"
echo "   guest (--save-guest), so B's supervisor boots it again from that copy, unprotected until a secondary listens at A"
SUP=(--key-file "$OUT/key" --fence "$OUT/fence" --serial "udp:127.0.0.1:5562" --status-interval-ms 0)
$L supervise --rejoin-timeout-ms 1000 secondary --listen 127.0.0.1:7709 --peer 127.0.0.1:7708 --save-guest "$OUT/saved" "${SUP[@]}" 2>"$OUT/sf.err" &
SF=$!
# A's supervisor and the secondary that comes later are the Python's children: it kills A's, so the shell never reports it.
PYTHONPATH="$OUT" python3 - "$OUT" "$L" "${SUP[@]}" <<'PY'
import os, signal, subprocess, sys, time
from democlient import asker, supervised
out, lockstep, sup = sys.argv[1], sys.argv[2], sys.argv[3:]
supA = subprocess.Popen([lockstep, "supervise", "--rejoin-timeout-ms", "1000", "primary", "Guests/build/echo.elf", "--peer", "127.0.0.1:7709",
                         "--listen", "127.0.0.1:7708", "--memory", "64"] + sup, stderr=open(out + "/se.err", "w"))
line, started = supervised({"A": out + "/se.err", "B": out + "/sf.err"})
ask = asker(5562)
line("A", "protected: secondary")
for i in range(1, 3): print("  A:         ", ask("REQ %d before" % i, "REP %d " % i))
a = started("A", 1)
supA.kill(); supA.wait()
try: os.kill(a, signal.SIGKILL)  # it dies with its supervisor; this only makes sure
except ProcessLookupError: pass
print("  kill -9 A's supervisor and its primary (pid %d): host A is gone" % a)
print("  B:         ", ask("REQ 3 after", "REP 3 "))
b = started("B", 1)
os.kill(b, signal.SIGKILL); t0 = time.time()
print("  kill -9 B's process (pid %d)" % b)
c = line("B", "a cold restart")
print("  B's supervisor: " + c[c.index("no live side"):])
p = line("B", "started the primary")
print("  B's supervisor: " + p[p.index("lockstep primary"):p.index(" --peer")] + " ... --cold-restart")
print("  B:         ", ask("REQ 1 again", "REP 1 "), "(rebooted from the saved copy %.0f ms after the kill:" % ((time.time() - t0) * 1000))
print("              a rejoin timeout, then a boot at once, unprotected while nothing listens at A)")
sec = subprocess.Popen([lockstep, "secondary", "--listen", "127.0.0.1:7708"] + sup, stderr=open(out + "/sg.err", "w"))
print("  a secondary started at A's address")
line("B", "protected: secondary at 127.0.0.1:7708")
print("  B: protected again")
print("  B:         ", ask("REQ 2 again", "REP 2 "))
print("  B:         ", ask("QUIT", "RESULT"))
if sec.wait(30) != 0: sys.exit("demo: the new secondary did not exit 0")
PY
wait $SF && echo "supervisor B exited 0"
echo "== 13. migration to a third host: \`lockstep control SOCKET migrate\` moves the running guest from A to C;"
echo "   B protects it while C is seeded, the guest stops until C holds its state, then C (given --peer B) re-protects itself on B"
MIG=(--key-file "$OUT/key" --fence "$OUT/fence" --serial "udp:127.0.0.1:5570" --status-interval-ms 0)
$L secondary --listen 127.0.0.1:7720 "${MIG[@]}" 2>"$OUT/mb.err" &
MB=$!
$L secondary --listen 127.0.0.1:7721 --peer 127.0.0.1:7720 "${MIG[@]}" 2>"$OUT/mc.err" &
MC=$!
$L primary Guests/build/echo.elf --peer 127.0.0.1:7720 --memory 64 --control "$OUT/ma.sock" "${MIG[@]}" 2>"$OUT/ma.err" &
MA=$!
PYTHONPATH="$OUT" python3 - "$L" "$OUT" <<'PY'
import re, subprocess, sys, time
lockstep, out = sys.argv[1:]
from democlient import asker, supervised
ask = asker(5570)
line, _ = supervised({"A": out + "/ma.err", "B": out + "/mb.err", "C": out + "/mc.err"})
for i in range(1, 3): print("  A:        ", ask("REQ %d on-A" % i, "REP %d " % i))
t0 = time.time()
r = subprocess.run([lockstep, "control", out + "/ma.sock", "migrate", "127.0.0.1:7721"], capture_output=True, text=True, timeout=120)
if r.returncode != 0: sys.exit("demo: the migration failed: " + r.stdout + r.stderr)
m = re.search(r"the guest was stopped ([0-9.]+) ms", r.stdout)
print("  lockstep control ... migrate 127.0.0.1:7721 -> migrated (%.1f ms; the guest stopped %s ms)" % ((time.time() - t0) * 1000, m.group(1) if m else "?"))
print("  C:        ", ask("REQ 3 on-C", "REP 3 "))
b = line("B", "let this side go")
print("  B: " + b[b.index("the primary moved"):])
c = line("C", "protected: secondary at 127.0.0.1:7720")
print("  C: protected by B again: " + c[c.index("seeded at exit"):c.index(":", c.index("seeded at exit"))] + "; " + c[c.index("the guest ran unprotected"):].rstrip(")"))
print("  C:        ", ask("QUIT", "RESULT"))
PY
wait $MA && echo "A exited 0 (its run ended with the move)"
wait $MC && echo "C exited 0"
wait $MB && echo "B exited 0"
grep -h "state-digest" "$OUT/mc.err" "$OUT/mb.err"
