#!/usr/bin/env bash
# check-qemu.sh - boot every guest under QEMU (TCG) and check its RESULT line and exit status.
# Why: the guests must behave the same under QEMU as under the Lockstep VMM, so QEMU is the
# reference that catches SDK/boot bugs independently of the VMM.
# QEMU maps a debug-exit write of v to exit status (v<<1)|1, so success (v=0) is status 1.
# Note: QEMU 7.2 refuses "-serial stdio -nographic" (stdio used twice); we use -display none
# with -monitor none instead, which gives the same serial-on-stdio behaviour.
# Usage: ./check-qemu.sh [guest...]     (default: all)   Env: QEMU, TIMEOUT (seconds)
set -u
cd "$(dirname "$0")"
QEMU=${QEMU:-qemu-system-x86_64}
TIMEOUT=${TIMEOUT:-60}
make -s -j1 >/dev/null || { echo "build failed"; exit 1; }

qemu() {  # qemu <elf>
    timeout "$TIMEOUT" "$QEMU" -accel tcg -kernel "$1" \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -serial stdio -display none -monitor none -no-reboot -m 256
}

fails=0
report() {  # report <name> <ok 0|1> <seconds> <detail>
    if [ "$2" = 1 ]; then printf 'PASS %-20s %6ss  %s\n' "$1" "$3" "$4"
    else printf 'FAIL %-20s %6ss  %s\n' "$1" "$3" "$4"; fails=$((fails + 1)); fi
}

# Guests with no input: expected QEMU status and RESULT pattern.
declare -A STATUS=( [hello]=1 [timer-compute]=1 [timer-compute-short]=1 [clock]=1 [idle]=1
                    [dirty]=1 [exit-heavy]=1 [unknown-port]=1 [triple-fault]=0 )
declare -A PATTERN=(
    [hello]='^RESULT hello ok$'
    [timer-compute]='^RESULT timer-compute [0-9a-f]{16}$'
    [timer-compute-short]='^RESULT timer-compute-short [0-9a-f]{16}$'
    [clock]='^RESULT clock [0-9a-f]{16}$'
    [idle]='^RESULT idle [0-9a-f]{16}$'
    [dirty]='^RESULT dirty [0-9a-f]{16}$'
    [exit-heavy]='^RESULT exit-heavy [0-9a-f]{16}$'
    [unknown-port]='^RESULT unknown-port ff$'
    [triple-fault]='' )

run_simple() {
    local g=$1 t0 t1 out rc
    t0=$(date +%s.%N)
    out=$(qemu "build/$g.elf" </dev/null 2>&1); rc=$?
    t1=$(date +%s.%N)
    local secs; secs=$(printf '%.2f' "$(echo "$t1 - $t0" | bc)")
    local results; results=$(grep -c '^RESULT ' <<<"$out")
    if [ "$g" = triple-fault ]; then
        # no RESULT, the banner printed, QEMU shut down (status 0 with -no-reboot)
        if [ "$rc" = 0 ] && [ "$results" = 0 ] && grep -q '^triple-fault: ' <<<"$out"; then
            report "$g" 1 "$secs" "shutdown, status 0"
        else report "$g" 0 "$secs" "status $rc, $results RESULT lines"; echo "$out" | sed 's/^/    /'; fi
        return
    fi
    local line; line=$(grep '^RESULT ' <<<"$out")
    if [ "$rc" = "${STATUS[$g]}" ] && [ "$results" = 1 ] && grep -Eq "${PATTERN[$g]}" <<<"$line"; then
        report "$g" 1 "$secs" "$line"
    else
        report "$g" 0 "$secs" "status $rc (want ${STATUS[$g]}), $results RESULT lines"
        echo "$out" | sed 's/^/    /'
    fi
}

# echo: wait for READY, then drive the protocol and compare every reply.
run_echo() {
    local t0 t1 out rc
    t0=$(date +%s.%N)
    local in=$'PING\nREQ 1 hello\nREQ 2 world\nREQ 1 hello\nREQ 1 changed text\nbogus\nREQ 3\nQUIT\n'
    local want=$'READY\nPONG\nREP 1 1 c4acd65b0d19f2be\nREP 2 2 f80d20ab7eeaf4ea\nREP 1 1 c4acd65b0d19f2be\nREP 1 1 c4acd65b0d19f2be\nERR unknown\nREP 3 3 dc203603eb8661cf'
    local dir; dir=$(mktemp -d)
    mkfifo "$dir/in"
    # QEMU reads the fifo; fd 7 keeps its write end open until we are done sending.
    ( qemu build/echo.elf <"$dir/in" >"$dir/out" 2>&1; echo "QEMU-STATUS $?" >>"$dir/out" ) &
    local pid=$!
    exec 7>"$dir/in"
    local i
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        grep -q '^READY' "$dir/out" 2>/dev/null && break
        grep -q '^QEMU-STATUS' "$dir/out" 2>/dev/null && break
        sleep 0.1
    done
    printf '%s' "$in" >&7
    wait "$pid"
    exec 7>&-
    out=$(cat "$dir/out"); rm -rf "$dir"
    t1=$(date +%s.%N)
    local secs; secs=$(printf '%.2f' "$(echo "$t1 - $t0" | bc)")
    rc=$(sed -n 's/^QEMU-STATUS //p' <<<"$out")
    local got; got=$(grep -E '^(READY|PONG|REP |ERR )' <<<"$out")
    local line; line=$(grep '^RESULT ' <<<"$out")
    if [ "$rc" = 1 ] && [ "$got" = "$want" ] && [ "$line" = "RESULT echo dc203603eb8661cf" ]; then
        report echo 1 "$secs" "$line (8 requests, replies match)"
    else
        report echo 0 "$secs" "status $rc"; echo "$out" | sed 's/^/    /'
    fi
}

ALL="hello timer-compute timer-compute-short clock echo idle dirty exit-heavy unknown-port triple-fault"
for g in ${@:-$ALL}; do
    if [ "$g" = echo ]; then run_echo; else run_simple "$g"; fi
done
[ "$fails" = 0 ] && echo "all passed" || echo "$fails failed"
exit $((fails > 0))
