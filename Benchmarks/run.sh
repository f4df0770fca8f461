#!/bin/sh
# Benchmarks/run.sh - build Lockstep (release) and the guests, then run `lockstep bench`.
# Why: the figures are only meaningful from an optimized build, measured on the guests built from
# this tree; one script makes that the default. Extra arguments go to `lockstep bench` (e.g. --repeat 5).
# Output: the table on stdout, every figure in bench-out/bench.json. Exit status: non-zero if a
# build fails or a replay digest differs from its recording (missed performance targets are not errors).
set -eu
cd "$(dirname "$0")/.."
SCRATCH=${SCRATCH:-.build-bench}
swift build -c release --scratch-path "$SCRATCH"
make -s -C Guests
mkdir -p bench-out
exec "$SCRATCH/release/lockstep" bench --guests Guests/build --json bench-out/bench.json "$@"
