#!/usr/bin/env bash
# The demo: builds Lockstep and its guests, records a guest whose result depends on where timer
# interrupts land, replays it bit-exactly, shows the log, and shows that a second recording differs;
# then the live pair: kill -9 of the primary (failover), and SIGUSR2 (a planned switchover).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
make -s -C Guests
swift build -c release
L=.build/release/lockstep
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
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
# primary (KILL: a failure; USR2: a planned switchover), then requests to whoever holds the guest.
pair_demo() {
    local tag=$1 link=$2 udp=$3 guest=$4 sig=$5
    local pair=(--key-file "$OUT/key" --fence "$OUT/fence" --serial "udp:127.0.0.1:$udp" --status-interval-ms 0)
    $L secondary --listen "127.0.0.1:$link" "${pair[@]}" 2>"$OUT/s$tag.err" &
    SEC=$!
    $L primary "Guests/build/$guest.elf" --peer "127.0.0.1:$link" --memory 64 "${pair[@]}" 2>"$OUT/p$tag.err" &
    PRI=$!
    python3 - "$PRI" "$udp" "$sig" <<'PY'
import os, signal, socket, sys, time
pri, port, sig = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.01)
def ask(line, want, limit=20.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        s.sendto(line.encode() + b"\n", ("127.0.0.1", port))
        try:
            r = s.recv(200).decode().strip()
            if r.startswith(want): return r
        except socket.timeout:
            pass
    sys.exit("demo: no reply to %r" % line)
for i in range(1, 4): print("  primary:  ", ask("REQ %d before" % i, "REP %d " % i))
os.kill(pri, getattr(signal, "SIG" + sig)); t0 = time.time()
print("  kill -%s primary" % ("9" if sig == "KILL" else sig))
r = ask("REQ 4 after", "REP 4 "); print("  answer:   ", r, "(%.1f ms after the signal)" % ((time.time() - t0) * 1000))
print("  survivor: ", ask("REQ 2 before", "REP 2 "), "(a retried request gets the same answer)")
print("  survivor: ", ask("QUIT", "RESULT"))
PY
}

head -c 32 /dev/urandom > "$OUT/key"; mkdir -p "$OUT/fence"
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
