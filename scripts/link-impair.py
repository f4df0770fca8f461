#!/usr/bin/env python3
"""link-impair.py - an FT link with delay, jitter and loss where the kernel has no netem qdisc.

Two TAP devices, each moved into a network namespace, joined by this process: every Ethernet frame read
from one is written to the other after --delay-ms, give or take up to --jitter-ms (uniform, never below 0),
unless it is dropped (--loss-pct, per frame, each direction on its own, as `tc qdisc ... netem delay D J
loss P` on both ends of a veth pair does). Frames leave when their delay is up, so with jitter a frame may
overtake one read before it (reordering, as under netem); without jitter they keep their order. ARP is
impaired too, as under netem.

Why: scripts/lab-netns.sh impairs its FT link with netem; some kernels (this project's sandbox among
them) are built without sch_netem. The delay is kept by this process's clock, so it is accurate to about
0.1 ms, and it costs CPU on the host being measured: on a host with netem, use netem.

Usage: link-impair.py --a NS:IF --b NS:IF --delay-ms D [--jitter-ms J] --loss-pct P [--seed N] [--stats FILE]
It prints "ready" on stdout once both devices are in their namespaces (the caller then gives them
addresses), forwards until SIGTERM or SIGINT, and then writes its counts to --stats (one line) and exits 0.
Exit status 2: bad arguments (argparse's message); 1: a value out of range, or a device that cannot be made
or moved (no TUN/TAP, not root, no such namespace), named on stderr.
"""
import argparse, fcntl, heapq, os, random, select, signal, struct, subprocess, sys, time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def die(msg):
    print(f"link-impair: {msg}", file=sys.stderr)
    sys.exit(1)


def tap(ns, name):
    """A TAP device named NAME in namespace NS, owned by this process's fd (gone when it exits)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        die(f"cannot open /dev/net/tun ({e.strerror}): the kernel needs TUN/TAP (CONFIG_TUN) and this needs root")
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        die(f"cannot create TAP device {name} ({e.strerror})")
    r = subprocess.run(["ip", "link", "set", name, "netns", ns], capture_output=True, text=True)
    if r.returncode != 0:
        die(f"cannot move {name} into namespace {ns}: {r.stderr.strip()}")
    os.set_blocking(fd, False)
    return fd


def endpoint(s):
    ns, sep, name = s.partition(":")
    if not sep or not ns or not name or len(name) > 15:
        raise argparse.ArgumentTypeError(f"{s!r}: want NAMESPACE:INTERFACE (an interface name of 1-15 characters)")
    return ns, name


def main():
    p = argparse.ArgumentParser(description="join two namespaces by TAP devices with delay, jitter and loss")
    p.add_argument("--a", type=endpoint, required=True, help="NAMESPACE:INTERFACE of one end")
    p.add_argument("--b", type=endpoint, required=True, help="NAMESPACE:INTERFACE of the other end")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction (ms)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="each frame's delay varies by up to this much either way (ms)")
    p.add_argument("--loss-pct", type=float, default=0.0, help="frames dropped, each direction (%%)")
    p.add_argument("--seed", type=int, default=None, help="seed of the loss and jitter draws (repeatable runs)")
    p.add_argument("--stats", help="file for the counts, written at exit")
    a = p.parse_args()
    if not 0 <= a.delay_ms <= 10_000:
        die(f"--delay-ms {a.delay_ms}: want 0 to 10000")
    if not 0 <= a.jitter_ms <= 10_000:
        die(f"--jitter-ms {a.jitter_ms}: want 0 to 10000")
    if not 0 <= a.loss_pct <= 100:
        die(f"--loss-pct {a.loss_pct}: want 0 to 100")

    rng = random.Random(a.seed)
    fds = [tap(*a.a), tap(*a.b)]
    delay, jitter, loss = a.delay_ms / 1000, a.jitter_ms / 1000, a.loss_pct / 100
    # Per direction (0: a→b, 1: b→a): frames waiting, a heap of (due time, arrival number, bytes), and counts.
    # `released`: the highest arrival number written so far; a frame written after a later one was reordered.
    queues = [[], []]
    seen, dropped, peak, reordered, released = [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A parent may have blocked them (a test runner does), and the mask is inherited: the handler would never run.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    print("ready", flush=True)

    while not stop:
        now = time.monotonic()
        dues = [q[0][0] for q in queues if q]
        timeout = max(min(dues) - now, 0) if dues else 0.5  # 0.5 s: look at `stop` now and then
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for d in (0, 1):
            if fds[d] not in readable:
                continue
            while True:
                try:
                    frame = os.read(fds[d], 65536)
                except BlockingIOError:
                    break
                except OSError as e:
                    die(f"cannot read from {(a.a, a.b)[d][1]}: {e.strerror}")
                seen[d] += 1
                if loss and rng.random() < loss:
                    dropped[d] += 1
                    continue
                due = now + max(delay + (rng.uniform(-jitter, jitter) if jitter else 0), 0)
                heapq.heappush(queues[d], (due, seen[d], frame))
                peak[d] = max(peak[d], len(queues[d]))
        for d in (0, 1):
            q, out = queues[d], fds[1 - d]
            while q and q[0][0] <= now:
                _, n, frame = heapq.heappop(q)
                if n < released[d]:
                    reordered[d] += 1
                released[d] = max(released[d], n)
                try:
                    os.write(out, frame)
                except OSError:
                    pass  # the other end is down (no carrier) or its queue is full: lost, as on a wire
    if a.stats:
        with open(a.stats, "w") as f:
            f.write(f"a->b {seen[0]} frames, {dropped[0]} dropped, {reordered[0]} reordered, at most {peak[0]} in flight; "
                    f"b->a {seen[1]} frames, {dropped[1]} dropped, {reordered[1]} reordered, at most {peak[1]} in flight\n")


if __name__ == "__main__":
    main()
