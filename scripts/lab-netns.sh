#!/usr/bin/env bash
# lab-netns.sh - a two-host pair lab on one machine: the primary in network namespace lkA, the secondary
# in lkB, their FT link delayed and lossy (netem, or link-impair.py where the kernel has none), then a kill -9 of the primary
# (or, with --no-kill, the guest run to its end and the pair's replication figures).
# Why: loopback (`lockstep bench pair`) has no wire latency and never drops a packet; this shows what the
# pair does over a link with both, and that failover works across hosts (separate network stacks).
#
# Topology (every address lives inside the lab's namespaces; the host's own network is not touched):
#   lkA 10.77.0.1/24 --- lkvA ====FT link (netem, or link-impair.py)==== lkvB --- 10.77.0.2/24 lkB
#   lkA 10.77.1.1/24 --- service link --- 10.77.1.3/24 lkC 10.77.2.3/24 --- service link --- 10.77.2.2/24 lkB
# lkC holds the client: it talks to the service on both hosts (10.77.1.1 and 10.77.2.2, the same UDP port)
# the way a client with two server addresses would, so only the FT link is impaired.
#
# Needs: root, iproute2 (ip, tc), a kernel with network namespaces and veth; for --delay-ms, --jitter-ms or
# --loss-pct other than 0 the netem qdisc or TUN/TAP (--impair auto: netem if the kernel has it, else the FT
# link is two TAP devices joined by scripts/link-impair.py); /dev/kvm; python3; a release build and the guests.
# Usage: scripts/lab-netns.sh [--delay-ms N] [--jitter-ms J] [--loss-pct P] [--impair auto|netem|tap] [--guest NAME]
#                              [--requests N] [--kill-after-ms N] [--no-kill] [--failure-timeout-ms N]
#                              [--rto-min-ms N] [--keep] [--lockstep PATH] [--guests DIR]
# --jitter-ms varies each frame's delay by up to J either way (uniform; frames may overtake each other).
# --failure-timeout-ms is given to both sides (lockstep's default: 50). --rto-min-ms sets the FT link's route
# rto_min on both sides (Linux's default floor is 200 ms; lockstep lowers it per socket itself on Linux 6.15+;
# see docs/lab.md). --keep keeps the logs, and names their directory, also when the run succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."

DELAY_MS=1 JITTER_MS=0 LOSS_PCT=0 IMPAIR=auto GUEST=echo REQUESTS=200 KILL_AFTER_MS=1000 KILL=1 PORT=7000
LOCKSTEP="" GUESTS=Guests/build FAILURE_MS="" RTO_MIN_MS="" KEEP=0
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 64; }
die() { echo "lab-netns: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --delay-ms) DELAY_MS=$2; shift 2 ;;
        --jitter-ms) JITTER_MS=$2; shift 2 ;;
        --loss-pct) LOSS_PCT=$2; shift 2 ;;
        --guest) GUEST=$2; shift 2 ;;
        --requests) REQUESTS=$2; shift 2 ;;
        --kill-after-ms) KILL_AFTER_MS=$2; shift 2 ;;
        --no-kill) KILL=0; shift ;;
        --failure-timeout-ms) FAILURE_MS=$2; shift 2 ;;
        --rto-min-ms) RTO_MIN_MS=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --impair) IMPAIR=$2; shift 2 ;;
        --lockstep) LOCKSTEP=$2; shift 2 ;;
        --guests) GUESTS=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "lab-netns: unknown option $1" >&2; usage ;;
    esac
done

# --- what it needs, checked before anything is created
case "$IMPAIR" in auto|netem|tap) ;; *) echo "lab-netns: --impair $IMPAIR: want auto, netem or tap" >&2; usage ;; esac
[ "$(id -u)" -eq 0 ] || die "needs root (it creates network namespaces, veth pairs and a tc qdisc); run it with sudo"
command -v ip >/dev/null && command -v tc >/dev/null || die "needs iproute2 (ip, tc): apt-get install iproute2"
command -v python3 >/dev/null || die "needs python3 (the echo client)"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || die "/dev/kvm cannot be opened (KVM is required on this host)"
if [ -z "$LOCKSTEP" ]; then
    for c in .build-bench/release/lockstep .build/release/lockstep; do [ -x "$c" ] && { LOCKSTEP=$c; break; }; done
fi
[ -n "$LOCKSTEP" ] && [ -x "$LOCKSTEP" ] || die "no lockstep binary: build with 'swift build -c release' or pass --lockstep PATH"
LOCKSTEP=$(readlink -f "$LOCKSTEP")
IMAGE=$(readlink -f "$GUESTS/$GUEST.elf" 2>/dev/null) && [ -r "$IMAGE" ] || die "$GUESTS/$GUEST.elf not found: make -C Guests"
for ns in lkA lkB lkC; do
    ! ip netns list | grep -qw "$ns" || die "namespace $ns already exists (another lab running? remove it with: ip netns del $ns)"
done

WORK=$(mktemp -d /tmp/lab-netns-XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for ns in lkA lkB lkC; do ip netns del "$ns" 2>/dev/null || true; done  # deleting a namespace deletes its veths
    if [ $rc -ne 0 ] || [ "$KEEP" = 1 ]; then
        [ $rc -ne 0 ] && echo "lab-netns: failed (status $rc); logs kept in $WORK:" >&2 || echo "lab-netns: logs kept in $WORK" >&2
        [ $rc -ne 0 ] && for f in "$WORK"/*.err; do [ -f "$f" ] && { echo "--- $f" >&2; tail -8 "$f" >&2; }; done
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the namespaces and links
ip netns add lkA 2>/dev/null || die "cannot create network namespaces (ip netns add failed: no CAP_SYS_ADMIN or no netns support)"
ip netns add lkB; ip netns add lkC
link() {  # link NS1 IF1 ADDR1 NS2 IF2 ADDR2
    ip link add "$2" type veth peer name "$5" || die "cannot create a veth pair (kernel without veth?)"
    ip link set "$2" netns "$1"; ip link set "$5" netns "$4"
    ip -n "$1" addr add "$3" dev "$2"; ip -n "$4" addr add "$6" dev "$5"
    ip -n "$1" link set "$2" up; ip -n "$4" link set "$5" up
}
link lkA lksA 10.77.1.1/24 lkC lkcA 10.77.1.3/24     # service link to the primary
link lkB lksB 10.77.2.2/24 lkC lkcB 10.77.2.3/24     # service link to the secondary
for ns in lkA lkB lkC; do ip -n "$ns" link set lo up; done

# The FT link. Impaired in both directions (data one way, acks the other).
DELAY_TEXT="${DELAY_MS} ms" NETEM_JITTER=""
[ "$JITTER_MS" = 0 ] || { DELAY_TEXT="${DELAY_MS} ms ± ${JITTER_MS} ms"; NETEM_JITTER="${JITTER_MS}ms"; }
if [ "$DELAY_MS" = 0 ] && [ "$JITTER_MS" = 0 ] && [ "$LOSS_PCT" = 0 ]; then
    IMPAIR=none
elif [ "$IMPAIR" = auto ]; then
    IMPAIR=tap  # netem if this kernel has it (probed on lkA's loopback)
    if ip netns exec lkA tc qdisc add dev lo root netem delay 0ms 2>/dev/null; then
        ip netns exec lkA tc qdisc del dev lo root; IMPAIR=netem
    fi
fi
if [ "$IMPAIR" = tap ]; then
    python3 scripts/link-impair.py --a lkA:lkvA --b lkB:lkvB --delay-ms "$DELAY_MS" --jitter-ms "$JITTER_MS" --loss-pct "$LOSS_PCT" \
        --stats "$WORK/impair.stats" >"$WORK/impair.out" 2>"$WORK/impair.err" &
    IMPAIRER=$!; PIDS+=("$IMPAIRER")
    for _ in $(seq 100); do grep -q ready "$WORK/impair.out" && break; kill -0 "$IMPAIRER" 2>/dev/null || break; sleep 0.05; done
    grep -q ready "$WORK/impair.out" || die "link-impair.py did not start: $(cat "$WORK/impair.err")"
    for side in "lkA lkvA 10.77.0.1/24" "lkB lkvB 10.77.0.2/24"; do
        set -- $side
        ip -n "$1" addr add "$3" dev "$2"; ip -n "$1" link set "$2" up
    done
    echo "lab-netns: FT link 10.77.0.1 <-> 10.77.0.2 through link-impair.py (TAP devices): delay ${DELAY_TEXT}, loss ${LOSS_PCT} % each way"
else
    link lkA lkvA 10.77.0.1/24 lkB lkvB 10.77.0.2/24
    if [ "$IMPAIR" = netem ]; then
        for side in "lkA lkvA" "lkB lkvB"; do
            set -- $side
            ip netns exec "$1" tc qdisc add dev "$2" root netem delay "${DELAY_MS}ms" $NETEM_JITTER loss "${LOSS_PCT}%" 2>"$WORK/tc.err" \
                || die "tc netem failed ($(cat "$WORK/tc.err")): this kernel has no netem qdisc (sch_netem); use --impair tap (or auto)"
        done
        echo "lab-netns: FT link 10.77.0.1 <-> 10.77.0.2 with netem delay ${DELAY_TEXT}, loss ${LOSS_PCT} % each way"
    else
        echo "lab-netns: FT link 10.77.0.1 <-> 10.77.0.2 unimpaired (--delay-ms 0 --jitter-ms 0 --loss-pct 0)"
    fi
fi

if [ -n "$RTO_MIN_MS" ]; then
    # TCP's minimum retransmission timeout on the FT link's route, both sides: a lost segment that fast
    # retransmit and the tail loss probe do not recover waits for it, and the link is silent meanwhile.
    for side in "lkA lkvA 10.77.0.1" "lkB lkvB 10.77.0.2"; do
        set -- $side
        ip -n "$1" route replace 10.77.0.0/24 dev "$2" src "$3" rto_min "${RTO_MIN_MS}ms" 2>"$WORK/route.err" \
            || die "cannot set rto_min on the FT link's route: $(cat "$WORK/route.err")"
    done
    echo "lab-netns: FT link route rto_min ${RTO_MIN_MS} ms (both sides)"
fi

# --- the pair
head -c 32 /dev/urandom > "$WORK/psk"; chmod 600 "$WORK/psk"
mkdir "$WORK/fence"  # both namespaces see this filesystem: it stands for a shared fence directory
COMMON=(--key-file "$WORK/psk" --fence "$WORK/fence" --status-interval-ms 1000)
[ -z "$FAILURE_MS" ] || COMMON+=(--failure-timeout-ms "$FAILURE_MS")
if [ "$GUEST" = echo ]; then SERVE_A=udp:10.77.1.1:$PORT SERVE_B=udp:10.77.2.2:$PORT; else SERVE_A=file:$WORK/primary.serial SERVE_B=none; fi
ip netns exec lkB "$LOCKSTEP" secondary --listen 10.77.0.2:7400 --serial "$SERVE_B" --accept-timeout-ms 30000 --verbose "${COMMON[@]}" \
    >"$WORK/secondary.out" 2>"$WORK/secondary.err" &
SEC=$!; PIDS+=("$SEC")
for _ in $(seq 100); do grep -q "listening on" "$WORK/secondary.err" && break; sleep 0.05; done
grep -q "listening on" "$WORK/secondary.err" || die "the secondary did not start listening"
ip netns exec lkA "$LOCKSTEP" primary "$IMAGE" --peer 10.77.0.2:7400 --serial "$SERVE_A" --verbose \
    --stats-json "$WORK/stats.json" "${COMMON[@]}" >"$WORK/primary.out" 2>"$WORK/primary.err" &
PRI=$!; PIDS+=("$PRI")
echo "lab-netns: secondary (pid $SEC) in lkB, primary (pid $PRI) in lkA running $GUEST"

# reap PID SECONDS: waits for PID to end, killing it after SECONDS; sets STATUS. It polls rather than run a
# watchdog subshell: killing one that has not yet reset the script's traps ran `cleanup` in it.
reap() {
    local deadline=$((SECONDS + $2))
    while kill -0 "$1" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.02; done
    kill -9 "$1" 2>/dev/null || true
    STATUS=0; { wait "$1"; } 2>/dev/null || STATUS=$?  # braces: also silence bash's "Killed" job notice
}

CLIENT=0
if [ "$GUEST" = echo ]; then
    # The client: REQUESTS requests to the primary; then QUIT (--no-kill), or a kill -9 of the primary and
    # REQ every 2 ms to both service addresses until one answers.
    # The braces send the shell's own stderr to /dev/null while the client runs (bash would print a "Killed"
    # notice for the primary the client kills); the client's stderr goes to fd 3, the real stderr.
    { ip netns exec lkC python3 - "$PRI" "$PORT" "$REQUESTS" "$KILL" 2>&3 <<'PY'
import os, signal, socket, sys, time
pid, port, n, kill = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
A, B = ("10.77.1.1", port), ("10.77.2.2", port)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
buf = b""
def lines(timeout):
    global buf
    s.settimeout(timeout)
    try: buf += s.recv(4096)
    except (socket.timeout, ConnectionRefusedError): return []
    out = buf.split(b"\n"); buf = out.pop()  # a datagram may end inside a line
    return [l.decode(errors="replace").strip() for l in out]
def ask(msg, want, to, limit):
    deadline = time.time() + limit
    while time.time() < deadline:
        t = time.time(); s.sendto(msg, to)
        while time.time() - t < 0.2:
            if any(l.startswith(want) for l in lines(0.05)): return time.time() - t
    sys.exit(f"lab-netns: no {want!r} from {to} within {limit} s")
ask(b"PING\n", "PONG", A, 30)
rtt = sorted(ask(b"REQ %d lab\n" % i, "REP %d " % i, A, 10) for i in range(1, n + 1))
print(f"lab-netns: {n} requests through the primary: round trip p50 {rtt[n//2]*1e3:.2f} ms, p99 {rtt[min(n-1, int(n*0.99))]*1e3:.2f} ms")
if not kill:
    ask(b"QUIT\n", "RESULT", A, 10)
    sys.exit(0)
seq = n + 1
t0 = time.time(); os.kill(pid, signal.SIGKILL)
nxt = t0
while time.time() - t0 < 10:
    if time.time() >= nxt:
        for to in (A, B): s.sendto(b"REQ %d failover\n" % seq, to)
        nxt += 0.002
    for l in lines(max(nxt - time.time(), 0.0001)):
        f = l.split()
        if len(f) == 4 and f[0] == "REP" and f[1] == str(seq):
            print(f"lab-netns: kill -9 of the primary -> first survivor reply: {(time.time()-t0)*1e3:.1f} ms (n={f[2]}, expected {seq})")
            ask(b"QUIT\n", "RESULT", B, 5)
            sys.exit(0 if f[2] == str(seq) else 1)
print("lab-netns: no reply from either address within 10 s of the kill", file=sys.stderr)
sys.exit(2)
PY
    } 3>&2 2>/dev/null || CLIENT=$?
elif [ "$KILL" = 1 ]; then
    sleep "$(awk "BEGIN{print $KILL_AFTER_MS/1000}")"
    kill -9 "$PRI"
    echo "lab-netns: killed the primary after ${KILL_AFTER_MS} ms"
fi

# stop_impairer: ends link-impair.py (it writes its counts on SIGTERM) and shows them.
stop_impairer() {
    [ -n "${IMPAIRER:-}" ] || return 0
    kill -TERM "$IMPAIRER" 2>/dev/null || true
    reap "$IMPAIRER" 5
    [ -s "$WORK/impair.stats" ] && echo "lab-netns: FT link frames: $(cat "$WORK/impair.stats")"
    return 0
}

# false_alarms: how often each side took the other for dead while the primary ran (a kill's own detection
# is not counted: the secondary's last "presumed failed" after the kill).
false_alarms() {
    local lost presumed
    lost=$(grep -c "secondary lost" "$WORK/primary.err" || true)
    presumed=$(grep -c "primary presumed failed" "$WORK/secondary.err" || true)
    [ "$KILL" = 1 ] && [ "$presumed" -gt 0 ] && presumed=$((presumed - 1))
    echo "lab-netns: false alarms: the primary dropped its secondary $lost time(s), the secondary presumed a live primary failed $presumed time(s)"
}

if [ "$KILL" = 0 ]; then
    # No failover: both sides run the guest to its end; the primary's figures are the link's.
    reap "$PRI" 120; PRI_STATUS=$STATUS
    reap "$SEC" 30; SEC_STATUS=$STATUS
    stop_impairer
    false_alarms
    [ "$CLIENT" = 0 ] || die "the echo client failed (status $CLIENT)"
    [ "$PRI_STATUS" = 0 ] || die "the primary ended with status $PRI_STATUS"
    [ "$SEC_STATUS" = 0 ] || die "the secondary ended with status $SEC_STATUS"
    ! grep -q "^live: " "$WORK/secondary.err" || die "the secondary went live while the primary ran: $(grep '^live: ' "$WORK/secondary.err")"
    python3 - "$WORK/stats.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
def pc(k, unit="µs"):
    v = s.get(k) or {}
    return f"p50 {v.get('p50', 0):.1f} / p99 {v.get('p99', 0):.1f} / p99.9 {v.get('p999', 0):.1f} {unit} (n={v.get('count', 0)})"
print(f"lab-netns: replication lag (append -> ack) {pc('replicationLagUs')}")
print(f"lab-netns: output gate latency {pc('gateLatencyUs')}")
print(f"lab-netns: FT link round trip (heartbeat) {pc('linkRoundTripUs')}")
print(f"lab-netns: {s['batches']} batches, {s['logBytes']} log bytes in {s['elapsedSeconds']:.2f} s; primary throttled {s['throttledMs']:.1f} ms; "
      f"{s['linkRetransmits']} TCP segments sent again by the primary")
PY
    if [ "$GUEST" != echo ]; then
        # The same guest unprotected, in the primary's namespace once the pair is gone: the protected/unprotected
        # run-time ratio over this link (the bench's figure, `lockstep bench pair`, is over loopback).
        ip netns exec lkA "$LOCKSTEP" run "$IMAGE" --serial "file:$WORK/run.serial" --verbose >"$WORK/run.out" 2>"$WORK/run.err" \
            || die "lockstep run $GUEST (unprotected) failed: $(tail -2 "$WORK/run.err")"
        P=$(sed -n 's/.* in \([0-9.]*\) ms$/\1/p' "$WORK/primary.err" | tail -1) U=$(sed -n 's/.* in \([0-9.]*\) ms$/\1/p' "$WORK/run.err" | tail -1)
        [ -n "$P" ] && [ -n "$U" ] || die "no run time in the primary's or lockstep run's statistics"
        awk -v p="$P" -v u="$U" -v g="$GUEST" 'BEGIN { printf "lab-netns: %s ran %.1f ms protected, %.1f ms unprotected: protected/unprotected %.3f\n", g, p, u, u / p }'
    fi
    DA=$(grep '^state-digest: ' "$WORK/primary.err" | tail -1 || true) DB=$(grep '^state-digest: ' "$WORK/secondary.err" | tail -1 || true)
    [ -n "$DA" ] || die "the primary printed no state digest"
    if [ -n "$DB" ]; then
        [ "$DA" = "$DB" ] || die "the sides' state digests differ: primary '$DA', secondary '$DB'"
        echo "lab-netns: OK: both sides ran the guest to its end with the same state digest, no failover"
    elif grep -q "while this side waited to be seeded again" "$WORK/secondary.err"; then
        echo "lab-netns: OK: no failover; the guest ran its end unprotected: a false alarm had dropped the secondary, which ended with the guest"
    else
        die "the secondary printed no state digest"
    fi
    exit 0
fi

reap "$PRI" 5; echo "lab-netns: primary ended with status $STATUS (137: killed, as expected)"
reap "$SEC" 120; SEC_STATUS=$STATUS
stop_impairer
false_alarms
if ! grep -q "^live: " "$WORK/secondary.err"; then
    # The fence's answer when the kill found the guest unprotected: its secondary had been dropped (a false
    # alarm on a lossy link), so its state was stale and nobody may run the guest (a supervisor cold-restarts it).
    if grep -q "pair record says 'unprotected'" "$WORK/secondary.err"; then
        die "not a failover: the kill found the guest unprotected (a false alarm had dropped the secondary; see the false alarms above), so the secondary rightly refused to go live with a stale state. On a lossy link raise --failure-timeout-ms or lower --rto-min-ms (docs/lab.md)"
    fi
    die "the secondary never went live"
fi
grep -h "^live: \|went live" "$WORK/secondary.err" | sed 's/^/lab-netns:   /'
tail -1 "$WORK/secondary.err" | sed 's/^/lab-netns:   survivor /'
[ "$CLIENT" = 0 ] || die "the echo client failed (status $CLIENT)"
[ "$SEC_STATUS" = 0 ] || die "the survivor ended with status $SEC_STATUS (137 after 120 s: it was still running and was killed)"
echo "lab-netns: OK: the survivor took over and ran the guest to its end"
