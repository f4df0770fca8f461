import Foundation
import Glibc
import Machine

// MARK: HA restart: supervised sides protected again after kill -9

extension PairBench {
    struct RestartResult {
        var killToReplyMs: [Double] = []
        /// kill → the survivor's `protected:` line for the killed side's restart (the harness polls every 1 ms).
        var killToProtectedMs: [Double] = []
        /// Both sides killed at once: kill → the rebooted guest's first reply, and → A protected again (each
        /// includes `rejoinMs` of waiting for a live side that never comes).
        var coldKillToReplyMs: Double = .infinity
        var coldKillToProtectedMs: Double = .infinity
        var json: [String: Any] {
            ["kill_to_reply_ms": killToReplyMs, "kill_to_protected_ms": killToProtectedMs, "rejoin_timeout_ms": PairBench.rejoinMs,
             "cold_restart_kill_to_reply_ms": coldKillToReplyMs, "cold_restart_kill_to_protected_ms": coldKillToProtectedMs]
        }
    }

    /// The supervisors' `--rejoin-timeout-ms` here: how long a restarted side waits before a cold restart.
    static let rejoinMs = 1000

    /// One echo pair, each side under `lockstep supervise` (A primary, B secondary, each naming the other);
    /// `kills` times, alternating sides: kill -9 the process serving the guest, then time the survivor's first
    /// reply and its being protected again by the killed side's restart. Then both processes at once: the time
    /// to the rebooted guest's first reply and to its protection (A's cold restart). Every supervisor must end
    /// with the guest's status 0 at QUIT.
    func supervisedRestarts(_ kills: Int) throws -> RestartResult {
        let tag = "restart"
        progress("echo: \(kills) kill -9s of supervised sides, then both sides at once")
        let udp = try LoopbackPort.free()
        let (portA, portB) = (try LoopbackPort.free(tcp: true), try LoopbackPort.free(tcp: true))
        let pair = ["--serial", "udp:127.0.0.1:\(udp)", "--fence", try fence(tag)] + common
        let supervise = ["supervise", "--rejoin-timeout-ms", "\(Self.rejoinMs)"]
        let b = try spawn("\(tag)-B", supervise + ["secondary", "--listen", "127.0.0.1:\(portB)", "--peer", "127.0.0.1:\(portA)"] + pair)
        _ = try awaitLine(b, containing: "listening on")
        let a = try spawn("\(tag)-A", supervise + ["primary", guest("echo"), "--peer", "127.0.0.1:\(portB)", "--listen", "127.0.0.1:\(portA)",
                                        "--memory", "\(memory)"] + pair)
        let client = try UDPLineClient(port: udp)
        try ping(client, [a, b])
        _ = try awaitLine(a, containing: "protected: secondary")
        var seq = UInt64(1)
        _ = try drive(client, count: Self.warmRequests, window: 1, first: seq, [a, b])
        seq += UInt64(Self.warmRequests)
        var sides = [(a, portA), (b, portB)]
        var result = RestartResult()
        for k in 1..<(kills + 1) {
            let ((victim, victimPort), (survivor, _)) = (sides[0], sides[1])
            let t = try timeKill([try lastStarted(victim, [a, b])], seq: seq, client, protected: (survivor, "protected: secondary at 127.0.0.1:\(victimPort)"),
                                 what: "restart \(k)", [a, b])
            result.killToReplyMs.append(t.replyMs)
            result.killToProtectedMs.append(t.protectedMs)
            seq += 1
            _ = try drive(client, count: 5, window: 1, first: seq, [a, b])
            seq += 5
            sides.swapAt(0, 1)
        }
        let cold = try timeKill([try lastStarted(a, [a, b]), try lastStarted(b, [a, b])], seq: seq, client,
                                protected: (a, "protected: secondary at 127.0.0.1:\(portB)"), what: "both sides killed", [a, b])
        (result.coldKillToReplyMs, result.coldKillToProtectedMs) = (cold.replyMs, cold.protectedMs)
        guard a.stderrText.contains("a cold restart") else { throw failure("both sides killed: A's supervisor made no cold restart", [a, b]) }
        try quit(client, a, [b])
        for s in [a, b] {
            guard s.wait(until: monotonicNs() + 30_000_000_000), s.code == 0, s.stderrText.contains("the pair ended (status 0)") else {
                throw failure("restart: \(s.name) did not end with the guest's status 0", [a, b])
            }
        }
        return result
    }

    /// The pid of the last process `supervisor` started.
    private func lastStarted(_ supervisor: Child, _ all: [Child]) throws -> pid_t {
        let started = supervisor.stderrText.split(separator: "\n").last { $0.hasPrefix("lockstep supervise: started the ") }
        guard let started, let r = started.range(of: ", pid "), let pid = pid_t(started[r.upperBound...].prefix { $0.isNumber }) else {
            throw failure("no process pid in \(supervisor.name)'s stderr", all)
        }
        return pid
    }

    /// kill -9s `pids`, then times the first reply to `REQ seq` (resent every 2 ms) and a new `protected` line.
    private func timeKill(_ pids: [pid_t], seq: UInt64, _ client: UDPLineClient, protected: (Child, String), what: String,
                          _ all: [Child]) throws -> (replyMs: Double, protectedMs: Double) {
        let before = lineCount(protected.0, protected.1)
        let t0 = monotonicNs()
        for p in pids { kill(p, SIGKILL) }
        var nextSend = t0, replyAt: UInt64?, protectedAt: UInt64?
        let deadline = t0 + 10_000_000_000 + UInt64(Self.rejoinMs) * 1_000_000
        while replyAt == nil || protectedAt == nil {
            if monotonicNs() >= deadline || all.contains(where: { $0.reap() }) {
                throw failure("\(what): " + (replyAt == nil ? "no reply" : "not protected again") + " within \((deadline - t0) / 1_000_000) ms of the kill", all)
            }
            if replyAt == nil {
                if monotonicNs() >= nextSend { client.send("REQ \(seq) restart"); nextSend += 2_000_000 }
                if client.receive(until: min(nextSend, monotonicNs() + 1_000_000)).contains(where: { EchoReply($0)?.seq == seq }) {
                    replyAt = monotonicNs()
                }
            } else {
                usleep(1000)  // poll the stderr file
            }
            if protectedAt == nil, lineCount(protected.0, protected.1) > before { protectedAt = monotonicNs() }
        }
        return (Double(replyAt! &- t0) / 1e6, Double(protectedAt! &- t0) / 1e6)
    }
}
