#!/bin/sh
# Benchmarks/run.sh - build Lockstep (release) and the guests, then run `lockstep bench`.
# Why: the figures are only meaningful from an optimized build, measured on the guests built from
# this tree; one script makes that default. Extra arguments go to `lockstep bench` (e.g. --repeat 5).
# `Benchmarks/run.sh pair [ARGS]` runs `lockstep bench pair` instead (JSON in bench-out/pair.json,
# SVG plots beside it). Output: the table on stdout, every figure in bench-out/*.json. Exit status:
# non-zero if a build fails, a replay or secondary digest differs, or a failover gets no reply
# (missed performance targets are not errors).
set -eu
cd "$(dirname "$0")/.."
SCRATCH=${SCRATCH:-.build-bench}
swift build -c release --scratch-path "$SCRATCH"
make -s -C Guests
mkdir -p bench-out
if [ "${1:-}" = pair ]; then
    shift
    exec "$SCRATCH/release/lockstep" bench pair --guests Guests/build --json bench-out/pair.json "$@"
fi
exec "$SCRATCH/release/lockstep" bench --guests Guests/build --json bench-out/bench.json "$@"
