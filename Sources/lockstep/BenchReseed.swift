import Foundation
import Glibc
import Machine
import Pair

// MARK: re-seeding a running guest

extension PairBench {
    struct ReseedResult {
        /// Per re-seed, from the primary's --stats-json (its first seed, at exit 0, is left out).
        var pauseMs: [Double]
        var totalMs: [Double]
        /// Echo round trips while each new secondary was being seeded.
        var rttUs: [Double]
        var digestsMatch: Bool
        var json: [String: Any] {
            ["pause_ms": pauseMs, "total_ms": totalMs, "rtt_us_p50": percentile(rttUs, 50) ?? 0,
             "rtt_us_max": rttUs.max() ?? 0, "digests_match": digestsMatch]
        }
    }

    /// One echo pair; `count` times: kill -9 the secondary, start a new one on the same address and keep
    /// the client's requests going while the primary seeds it (pre-copy), until it is protected again.
    /// The last secondary must end with the primary's state digest.
    func reseedTrials(_ count: Int) throws -> ReseedResult {
        let tag = "reseed"
        progress("echo: \(count) re-seeds of the running guest")
        let stats = tempFile(tag, "stats.json")
        let fence = try fence(tag)
        let udp = try LoopbackPort.free()
        let serial = "udp:127.0.0.1:\(udp)"
        var (sec, port) = try startSecondary("\(tag)0", serial: "none", fence: fence)
        let pri = try startPrimary(tag, guest: "echo", peer: port, serial: serial, fence: fence, stats: stats)
        let client = try UDPLineClient(port: udp)
        try ping(client, [pri, sec])
        var next: UInt64 = 1
        var rtt: [Double] = []
        for i in 1...count {
            sec.kill9()
            _ = sec.wait(until: monotonicNs() + 5_000_000_000)
            try awaitLines(pri, containing: "continuing unprotected", count: i, [pri])
            sec = try startSecondary("\(tag)\(i)", serial: "none", fence: fence, listen: "127.0.0.1:\(port)").0
            // Requests until the primary is protected again (the seed runs beside them), bounded.
            let deadline = monotonicNs() + timeoutNs
            while lineCount(pri, "protected: secondary") < i + 1 {
                if monotonicNs() >= deadline { throw failure("re-seed \(i): the primary was not protected again in time", [pri, sec]) }
                let r = try drive(client, count: 20, window: 1, first: next, [pri, sec])
                next += 20
                rtt += r.rttUs
            }
        }
        try quit(client, pri, [sec])
        try finish(pri, [sec])
        guard sec.wait(until: monotonicNs() + 30_000_000_000) else { throw failure("re-seed: the last secondary did not end", [sec, pri]) }
        let st = try primaryStats(stats, "re-seed", pri)
        return ReseedResult(pauseMs: Array(st.seedPauseMs.dropFirst()), totalMs: Array(st.seedTotalMs.dropFirst()), rttUs: rtt,
                            digestsMatch: sec.code == 0 && pri.digest != nil && pri.digest == sec.digest)
    }

    struct DirtyReseedResult {
        var pauseMs: Double
        var totalMs: Double
        var throttlePercent: Int
        /// The primary's `protected:` line for it (pages per round, pages in the pause).
        var line: String
        var digestsMatch: Bool
        /// Peak resident sets (MiB): the seed's copy of 32 MiB of written pages shows in the new secondary's.
        var primaryRSSMiB: Double
        var secondaryRSSMiB: Double
        var json: [String: Any] {
            ["pause_ms": pauseMs, "total_ms": totalMs, "throttle_percent": throttlePercent, "line": line, "digests_match": digestsMatch,
             "primary_max_rss_mib": primaryRSSMiB, "secondary_max_rss_mib": secondaryRSSMiB]
        }
    }

    /// The `dirty` guest rewrites 32 MiB over and over, faster than pre-copy sends it: one re-seed shows
    /// auto-converge (the rounds throttle the guest until what is left fits a short pause). The new
    /// secondary must end with the primary's state digest. Its interrupt latency bound is held at 1 ms: stretched
    /// (`LatencyBound`), the guest would end within a second, before the kill and the new secondary.
    func dirtyReseed() throws -> DirtyReseedResult {
        let tag = "reseed-dirty"
        progress("dirty: a re-seed while the guest rewrites 32 MiB")
        let stats = tempFile(tag, "stats.json")
        let fence = try fence(tag)
        let (sec, port) = try startSecondary("\(tag)0", serial: "none", fence: fence)
        let pri = try startPrimary(tag, guest: "dirty", peer: port, serial: "none", fence: fence, stats: stats,
                                   extra: ["--max-interrupt-latency-us", "1000"])
        try awaitLines(pri, containing: "protected: secondary", count: 1, [pri, sec])
        sec.kill9()
        _ = sec.wait(until: monotonicNs() + 5_000_000_000)
        try awaitLines(pri, containing: "continuing unprotected", count: 1, [pri])
        let sec2 = try startSecondary("\(tag)1", serial: "none", fence: fence, listen: "127.0.0.1:\(port)").0
        try awaitLines(pri, containing: "protected: secondary", count: 2, [pri, sec2])
        try finish(pri, [sec2])
        guard sec2.wait(until: monotonicNs() + 30_000_000_000) else { throw failure("dirty re-seed: the new secondary did not end", [sec2, pri]) }
        let st = try primaryStats(stats, "dirty re-seed", pri)
        guard st.seedPauseMs.count == 2, st.seedThrottlePercent.count == 2 else { throw failure("dirty re-seed: the primary reports \(st.seedPauseMs.count) seeds, not 2", [pri]) }
        let line = pri.stderrText.split(separator: "\n").filter { $0.contains("protected: secondary") }.last.map(String.init) ?? ""
        return DirtyReseedResult(pauseMs: st.seedPauseMs[1], totalMs: st.seedTotalMs[1], throttlePercent: st.seedThrottlePercent[1], line: line,
                                 digestsMatch: sec2.code == 0 && pri.digest != nil && pri.digest == sec2.digest,
                                 primaryRSSMiB: pri.maxRSSMiB, secondaryRSSMiB: sec2.maxRSSMiB)
    }

    func lineCount(_ c: Child, _ text: String) -> Int {
        c.stderrText.split(separator: "\n").filter { $0.contains(text) }.count
    }

    /// Waits (bounded) until `c` printed `count` lines containing `text`.
    func awaitLines(_ c: Child, containing text: String, count: Int, _ alive: [Child]) throws {
        let deadline = monotonicNs() + timeoutNs
        while lineCount(c, text) < count {
            if c.reap() { throw failure("\(c.name) ended before printing \"\(text)\" \(count) times", alive) }
            if monotonicNs() >= deadline { throw failure("\(c.name) did not print \"\(text)\" \(count) times in time", alive) }
            usleep(2000)  // poll the stderr file
        }
    }
}

// MARK: repairing a divergence

extension PairBench {
    struct RepairResult {
        /// The delta seed that repaired the diverged secondary: round 0's pages and what a new machine needs.
        var deltaPages: Int
        var newMachinePages: Int
        var deltaTotalMs: Double
        var deltaConfirmMs: Double
        /// Echo round trips while the secondary diverged and was repaired.
        var rttUs: [Double]
        /// The full seed of a new secondary of the same guest, for comparison.
        var fullPages: Int
        var fullTotalMs: Double
        var fullConfirmMs: Double
        var digestsMatch: Bool
        var json: [String: Any] {
            ["delta_pages": deltaPages, "new_machine_pages": newMachinePages, "delta_total_ms": deltaTotalMs, "delta_confirm_ms": deltaConfirmMs,
             "rtt_us_max": rttUs.max() ?? 0, "full_pages": fullPages, "full_total_ms": fullTotalMs, "full_confirm_ms": fullConfirmMs,
             "digests_match": digestsMatch]
        }
    }

    /// `echo-state` holds 48 MiB written at boot. Its primary's log lies once (fault injection,
    /// `LOCKSTEP_FAULT_SIGNATURE_AT_EXIT`): the secondary diverges, keeps its RAM, and is repaired by a delta
    /// seed. Then it is killed (kill -9) and a new secondary takes a full seed of the same guest, for
    /// comparison. Requests run throughout; the last secondary must end with the primary's digest.
    func repairTrial() throws -> RepairResult {
        let tag = "repair"
        progress("echo-state: a divergence repaired by a delta seed, then a new secondary's full seed")
        let stats = tempFile(tag, "stats.json")
        let fence = try fence(tag)
        let udp = try LoopbackPort.free()
        var (sec, port) = try startSecondary("\(tag)0", serial: "none", fence: fence)
        let pri = try startPrimary(tag, guest: "echo-state", peer: port, serial: "udp:127.0.0.1:\(udp)", fence: fence, stats: stats,
                                   environment: ["LOCKSTEP_FAULT_SIGNATURE_AT_EXIT": "300"])
        let client = try UDPLineClient(port: udp)
        try ping(client, [pri, sec])
        var next: UInt64 = 1
        var rtt: [Double] = []
        // Requests (which move the exits on) until the primary is protected for the `n`th time, bounded.
        func serve(until n: Int, _ alive: [Child]) throws {
            let deadline = monotonicNs() + timeoutNs
            while lineCount(pri, "protected: secondary") < n {
                if monotonicNs() >= deadline { throw failure("repair: the primary was not protected a \(n)th time in time", alive) }
                let r = try drive(client, count: 20, window: 1, first: next, alive)
                next += 20
                rtt += r.rttUs
            }
        }
        try serve(until: 2, [pri, sec])
        let repairRtt = rtt
        sec.kill9()
        _ = sec.wait(until: monotonicNs() + 5_000_000_000)
        try awaitLines(pri, containing: "continuing unprotected", count: 2, [pri])
        sec = try startSecondary("\(tag)1", serial: "none", fence: fence, listen: "127.0.0.1:\(port)").0
        try serve(until: 3, [pri, sec])
        try quit(client, pri, [sec])
        try finish(pri, [sec])
        guard sec.wait(until: monotonicNs() + 30_000_000_000) else { throw failure("repair: the new secondary did not end", [sec, pri]) }
        let st = try primaryStats(stats, "repair", pri)
        let lines = pri.stderrText.split(separator: "\n").filter { $0.contains("protected: secondary") }.map(String.init)
        guard st.seedTotalMs.count == 3, lines.count == 3 else { throw failure("repair: the primary reports \(st.seedTotalMs.count) seeds, not 3", [pri]) }
        func number(_ line: String, _ pattern: String) throws -> Double {
            guard let m = try Regex(pattern).firstMatch(in: line), let v = m.output[1].substring.flatMap({ Double($0) }) else {
                throw failure("repair: no \"\(pattern)\" in: \(line)", [pri])
            }
            return v
        }
        let confirmed = #"confirmed ([0-9.]+) ms after the pause"#
        return RepairResult(deltaPages: Int(try number(lines[1], #"round 0 sent (\d+) pages"#)),
                            newMachinePages: Int(try number(lines[1], #"a new machine needs (\d+)"#)),
                            deltaTotalMs: st.seedTotalMs[1], deltaConfirmMs: try number(lines[1], confirmed), rttUs: repairRtt,
                            fullPages: Int(try number(lines[2], #"seeded at exit \d+: (\d+) pages"#)),
                            fullTotalMs: st.seedTotalMs[2], fullConfirmMs: try number(lines[2], confirmed),
                            digestsMatch: sec.code == 0 && pri.digest != nil && pri.digest == sec.digest)
    }
}
