#!/usr/bin/env bash
# The whole test suite: installs dependencies, builds, builds the guests, runs every test.
# Tests that need /dev/kvm skip (and say why) when it cannot be opened.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
make -s -C Guests
if command -v qemu-system-x86_64 >/dev/null; then
    echo "== guests under QEMU"
    bash Guests/check-qemu.sh
fi
echo "== swift test"
swift build --build-tests
# The pair tests run after the rest, not beside it: each starts lockstep processes that pin a vCPU thread
# and run real-time link threads, which would distort the record/replay tests' interrupt timing.
swift test --skip-build --skip PairTests
echo "== pair tests (real primary/secondary processes on loopback)"
swift test --skip-build --filter PairTests
