#!/usr/bin/env bash
# Soak: the kill -9 failover trial of the test suite, N times (default 1,000). Each trial starts a pair
# running the echo service, kills the primary with SIGKILL mid-conversation, and checks every reply the
# client ever got against the survivor's history. Stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
make -s -C Guests
swift build --build-tests
LOCKSTEP_KILL_TRIALS="${1:-1000}" swift test --skip-build --filter "PairTests.FailoverTests/killPrimaryRepeatedly"
