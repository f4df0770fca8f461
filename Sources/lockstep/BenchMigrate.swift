import Foundation
import Glibc
import Machine

// MARK: migrating a running guest

extension PairBench {
    struct MigrationResult {
        /// Per migration: the guest stopped (the switch: the old secondary's last ack → the target's take-over), from
        /// the `migrated:` answer; the command's whole time; the target's take-over → protected again by B's re-seed.
        var stoppedMs: [Double]
        var commandMs: [Double]
        var unprotectedMs: [Double]
        /// Echo round trips while the migrations ran.
        var rttUs: [Double]
        var digestsMatch: Bool
        var json: [String: Any] {
            ["stopped_ms": stoppedMs, "command_ms": commandMs, "unprotected_ms": unprotectedMs,
             "rtt_us_p50": percentile(rttUs, 50) ?? 0, "rtt_us_max": rttUs.max() ?? 0, "digests_match": digestsMatch]
        }
    }

    /// One echo pair, A protected by B; `count` times: start a target on a new port (`--peer` B), migrate the
    /// guest there from the side running it (`control … migrate`) while the client's requests go on, and wait
    /// until the target, live, has seeded B again. B stays the secondary throughout and must end with the last
    /// primary's state digest.
    func migrationTrials(_ count: Int) throws -> MigrationResult {
        let tag = "migrate"
        progress("echo: \(count) migrations of the running guest, each to a new host on loopback")
        let fence = try fence(tag)
        let udp = try LoopbackPort.free()
        let serial = "udp:127.0.0.1:\(udp)"
        let (sec, portB) = try startSecondary("\(tag)-b", serial: serial, fence: fence)
        var control = tempFile(tag, "sock")
        var pri = try startPrimary(tag, guest: "echo", peer: portB, serial: serial, fence: fence, stats: nil, extra: ["--control", control])
        let client = try UDPLineClient(port: udp)
        try ping(client, [pri, sec])
        var next: UInt64 = 1
        var result = MigrationResult(stoppedMs: [], commandMs: [], unprotectedMs: [], rttUs: [], digestsMatch: false)
        for i in 1...count {
            let sock = tempFile("\(tag)\(i)", "sock")
            let (target, port) = try startSecondary("\(tag)-t\(i)", serial: serial, fence: fence, extra: ["--peer", "127.0.0.1:\(portB)", "--control", sock])
            let alive = [pri, sec, target]
            let move = try spawn("\(tag)-command\(i)", ["control", control, "migrate", "127.0.0.1:\(port)", "--within-ms", "30000"])
            let deadline = monotonicNs() + timeoutNs
            // Requests while the command runs, then until the target is protected by B again, bounded.
            while !move.reap() || lineCount(target, "protected: secondary at 127.0.0.1:\(portB)") == 0 {
                if monotonicNs() >= deadline { throw failure("migration \(i): not done in time", alive + [move]) }
                let r = try drive(client, count: 5, window: 1, first: next, alive.filter { $0 !== pri })
                next += 5
                result.rttUs += r.rttUs
            }
            guard move.code == 0, let line = move.stdoutText.split(separator: "\n").first(where: { $0.hasPrefix("migrated: ") }).map(String.init) else {
                throw failure("migration \(i): the command ended with \(move.endText)", [move, pri, target])
            }
            try finish(pri, [target, sec])
            result.stoppedMs.append(try number(line, #"the guest was stopped ([0-9.]+) ms"#, [move]))
            result.commandMs.append(move.wallMs)
            let protected = try awaitLine(target, containing: "protected: secondary at 127.0.0.1:\(portB)")
            result.unprotectedMs.append(try number(protected, #"the guest ran unprotected for ([0-9.]+) ms"#, [target]))
            pri = target
            control = sock
        }
        try quit(client, pri, [sec])
        try finish(pri, [sec])
        try finish(sec, [pri])
        result.digestsMatch = pri.digest != nil && pri.digest == sec.digest
        return result
    }

    /// The first capture of `pattern` in `line`, as a number.
    func number(_ line: String, _ pattern: String, _ cs: [Child]) throws -> Double {
        guard let m = try Regex(pattern).firstMatch(in: line), let v = m.output[1].substring.flatMap({ Double($0) }) else {
            throw failure("no \"\(pattern)\" in: \(line)", cs)
        }
        return v
    }
}
