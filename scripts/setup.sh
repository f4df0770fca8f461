#!/usr/bin/env bash
# Installs what Lockstep needs on a fresh Debian machine with Swift: the C libraries it links
# (capstone, OpenSSL), the guest toolchain (gcc, binutils, make), QEMU for the guest cross-check, and etcd
# (the etcd fence's tests start their own server on loopback, with TLS certificates made by openssl).
# iproute2 and python3: the namespace lab (scripts/lab-netns.sh), which a pair test runs.
set -euo pipefail
need=()
for p in libcapstone-dev libssl-dev openssl pkg-config gcc binutils make qemu-system-x86 etcd-server iproute2 python3; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "setup: swift is not on PATH (Swift 6.1 or newer is required)" >&2; exit 1; }
