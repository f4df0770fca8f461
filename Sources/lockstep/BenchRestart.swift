import Foundation
import Glibc
import Machine

// MARK: HA restart: supervised sides protected again after kill -9

extension PairBench {
    struct RestartResult {
        var killToReplyMs: [Double]
        /// kill → the survivor's `protected:` line for the killed side's restart (the harness polls every 1 ms).
        var killToProtectedMs: [Double]
        var json: [String: Any] { ["kill_to_reply_ms": killToReplyMs, "kill_to_protected_ms": killToProtectedMs] }
    }

    /// One echo pair, each side under `lockstep supervise` (A primary, B secondary, each naming the other);
    /// `kills` times, alternating sides: kill -9 the process serving the guest, then time the survivor's first
    /// reply and its being protected again by the killed side's restart. Every supervisor must end with the
    /// guest's status 0 at QUIT.
    func supervisedRestarts(_ kills: Int) throws -> RestartResult {
        let tag = "restart"
        progress("echo: \(kills) kill -9s of supervised sides")
        let udp = try LoopbackPort.free()
        let (portA, portB) = (try LoopbackPort.free(tcp: true), try LoopbackPort.free(tcp: true))
        let pair = ["--serial", "udp:127.0.0.1:\(udp)", "--fence", try fence(tag)] + common
        let b = try spawn("\(tag)-B", ["supervise", "secondary", "--listen", "127.0.0.1:\(portB)", "--peer", "127.0.0.1:\(portA)"] + pair)
        _ = try awaitLine(b, containing: "listening on")
        let a = try spawn("\(tag)-A", ["supervise", "primary", guest("echo"), "--peer", "127.0.0.1:\(portB)", "--listen", "127.0.0.1:\(portA)",
                                        "--memory", "\(memory)"] + pair)
        let client = try UDPLineClient(port: udp)
        try ping(client, [a, b])
        _ = try awaitLine(a, containing: "protected: secondary")
        var seq = UInt64(1)
        _ = try drive(client, count: Self.warmRequests, window: 1, first: seq, [a, b])
        seq += UInt64(Self.warmRequests)
        var sides = [(a, portA), (b, portB)]
        var result = RestartResult(killToReplyMs: [], killToProtectedMs: [])
        for k in 1...kills {
            let ((victim, victimPort), (survivor, _)) = (sides[0], sides[1])
            let started = victim.stderrText.split(separator: "\n").last { $0.hasPrefix("lockstep supervise: started the ") }
            guard let started, let r = started.range(of: ", pid "), let pid = pid_t(started[r.upperBound...].prefix { $0.isNumber }) else {
                throw failure("restart \(k): no process pid in \(victim.name)'s stderr", [a, b])
            }
            let reprotected = "protected: secondary at 127.0.0.1:\(victimPort)"
            let before = lineCount(survivor, reprotected)
            let t0 = monotonicNs()
            kill(pid, SIGKILL)
            var nextSend = t0, replyAt: UInt64?, protectedAt: UInt64?
            let deadline = t0 + 10_000_000_000
            while replyAt == nil || protectedAt == nil {
                if monotonicNs() >= deadline || a.reap() || b.reap() {
                    throw failure("restart \(k): " + (replyAt == nil ? "no reply" : "not protected again") + " within 10 s of the kill", [a, b])
                }
                if replyAt == nil {
                    if monotonicNs() >= nextSend { client.send("REQ \(seq) restart"); nextSend += 2_000_000 }
                    if client.receive(until: min(nextSend, monotonicNs() + 1_000_000)).contains(where: { EchoReply($0)?.seq == seq }) {
                        replyAt = monotonicNs()
                    }
                } else {
                    usleep(1000)  // poll the survivor's stderr file
                }
                if protectedAt == nil, lineCount(survivor, reprotected) > before { protectedAt = monotonicNs() }
            }
            result.killToReplyMs.append(Double(replyAt! &- t0) / 1e6)
            result.killToProtectedMs.append(Double(protectedAt! &- t0) / 1e6)
            seq += 1
            _ = try drive(client, count: 5, window: 1, first: seq, [a, b])
            seq += 5
            sides.swapAt(0, 1)
        }
        try quit(client, sides[0].0, [sides[1].0])
        for s in [a, b] {
            guard s.wait(until: monotonicNs() + 30_000_000_000), s.code == 0, s.stderrText.contains("the pair ended (status 0)") else {
                throw failure("restart: \(s.name) did not end with the guest's status 0", [a, b])
            }
        }
        return result
    }
}
