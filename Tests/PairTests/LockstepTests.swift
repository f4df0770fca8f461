import Channel
import Foundation
import Glibc
import Machine
import Testing

/// A pair that is not disturbed runs to the guest's end on both sides with the same state digest.
extension PairTests { @Suite struct LockstepTests {
    static func runPair(_ guest: String, memory: Int = 32, primaryArgs: [String] = [], secondaryArgs: [String] = [],
                        primaryEnvironment: [String: String] = [:]) throws -> (Child, Child) {
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let common = PairFixture.common(ws)
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "none"] + common + secondaryArgs)
        let port = try sec.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest(guest), "--peer", "127.0.0.1:\(port)", "--memory", "\(memory)",
                                        "--serial", "none"] + common + primaryArgs, environment: primaryEnvironment)
        let ps = try pri.wait(seconds: 240)
        let ss = try sec.wait(seconds: 60)
        #expect(ps == 0, "\(guest): primary ended with \(ps):\n\(pri.stderrText)")
        #expect(ss == ps, "\(guest): secondary ended with \(ss):\n\(sec.stderrText)")
        #expect(pri.digest != nil && pri.digest == sec.digest, "\(guest): digests differ: primary \(pri.digest ?? "-"), secondary \(sec.digest ?? "-")")
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") }, "\(guest): the secondary went live:\n\(sec.stderrText)")
        return (pri, sec)
    }

    @Test(arguments: ["hello", "timer-compute-short", "clock", "idle", "exit-heavy"])
    func everyGuestEndsWithEqualDigests(guest: String) throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let stats = NSTemporaryDirectory() + "lockstep-\(guest)-\(getpid()).json"
        defer { try? FileManager.default.removeItem(atPath: stats) }
        _ = try Self.runPair(guest, primaryArgs: ["--stats-json", stats])
        // A boot seed has no run to overlap: the guest waits for the secondary's confirmation, so it is
        // protected from its first instruction (it used to start 1-7 ms before, its first batches queued).
        let j = try PairFixture.jsonObject(stats)
        #expect(j?["startedProtected"] as? Bool == true, "\(guest): startedProtected is \(String(describing: j?["startedProtected"]))")
    }

    /// Tens of MiB dirtied under a timer: sync points carry many pages, and their cost stretches the
    /// interrupt latency bound (default bounds). Frames of tens of MiB take longer than the 50 ms failure
    /// timeout to send and decode: neither side may mistake that for silence.
    @Test func dirtyGuestWithSyncPoints() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let stats = NSTemporaryDirectory() + "lockstep-dirty-\(getpid()).json"
        defer { try? FileManager.default.removeItem(atPath: stats) }
        _ = try Self.runPair("dirty", memory: 128, primaryArgs: ["--stats-json", stats])
        let peak = try PairFixture.jsonObject(stats)?["peakLatencyBoundUs"] as? Int ?? 0
        #expect(peak > 1000 && peak <= Int(MachineConfig.defaultMaxInterruptLatencyUs), "peakLatencyBoundUs \(peak)")
    }

    /// A ceiling under the floor is a usage error (exit 64) naming both, before any machine is built.
    @Test(arguments: ["record", "primary"])
    func aCeilingBelowTheFloorIsRefused(command: String) throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let target = command == "record" ? ["--log", ws.dir + "/never.log"] : ["--peer", "127.0.0.1:9", "--key-file", ws.key]
        let c = try Child(command, [command, try PairFixture.guest("hello")] + target
                          + ["--interrupt-latency-us", "2000", "--max-interrupt-latency-us", "1500"], captureStdout: true)
        #expect(try c.wait(seconds: 30) == 64, "\(c.stderrText)")
        #expect(c.stderrText.contains("--max-interrupt-latency-us 1500: below --interrupt-latency-us 2000"), "\(c.stderrText)")
    }

    /// A sync point larger than one 64 MiB frame: `echo-state-large` fills 96 MiB in ring 3, says READY, and
    /// spins in ring 3 until a byte comes; the kick that delivers the client's first request writes one sync
    /// point with all of it, which crosses the FT link in 256 KiB parts (docs/protocol.md, "Parts"). The
    /// pair stays in lockstep, and neither side takes the seconds of sending, gathering and decoding it
    /// for a failure (it did: 90 ms of silence while the secondary gathered the parts, 1 run in 4).
    @Test func aSyncPointLargerThanAFrameCrossesTheLink() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let tcp = try PairFixture.freeTCPPort()
        // The default failure timeout, not the suite's 500 ms: the silence this guards against lasted ~90 ms.
        let common = PairFixture.common(ws) + ["--failure-timeout-ms", "50"]
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "tcp:127.0.0.1:\(tcp)"] + common)
        let port = try sec.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo-state-large"), "--peer", "127.0.0.1:\(port)",
                                        "--memory", "160", "--serial", "tcp:127.0.0.1:\(tcp)", "--verbose"] + common)
        try pri.waitForLine(containing: "protected: ")
        let link = TCPLineClient(port: tcp)
        #expect(link.open(), "nothing listens on the service port \(tcp)")
        // Nothing is sent before READY: a request during the fill would be delivered by a kick then, and cut it.
        var greeting: [String] = []
        let deadline = Date().addingTimeInterval(60)
        while !greeting.contains("READY"), Date() < deadline { greeting += link.receive(ms: 100) }
        try #require(greeting.contains("READY"), "no READY from the guest: \(greeting)\n\(pri.stderrText)")
        let talk = EchoClient(link)
        for seq in 1...3 { #expect(talk.request("REQ \(seq) big", expect: "REP \(seq) ", retryMs: 500, seconds: 60) != nil) }
        _ = talk.request("QUIT", expect: "RESULT echo", retryMs: 500, seconds: 30)
        #expect(try pri.wait(seconds: 60) == 0, "\(pri.stderrText)")
        #expect(try sec.wait(seconds: 60) == 0, "\(sec.stderrText)")
        #expect(pri.digest != nil && pri.digest == sec.digest, "primary \(pri.digest ?? "-"), secondary \(sec.digest ?? "-")")
        #expect(!pri.stderr.contains { $0.contains("secondary lost") }, "\(pri.stderrText)")
        #expect(!sec.stderr.contains { $0.contains("presumed failed") || $0.hasPrefix("live: ") }, "\(sec.stderrText)")
        // "N sync points (P pages, at most M in one)": one of them held more than 64 MiB (16,384 pages).
        let summary = try #require(pri.stderr.first { $0.contains(" sync points (") }, "\(pri.stderrText)")
        let largest = summary.range(of: #"at most \d+"#, options: .regularExpression)
            .flatMap { Int(summary[$0].split(separator: " ").last ?? "") } ?? Int(summary.split(separator: "(")[1].split(separator: " ")[0]) ?? 0
        #expect(largest > 16_384, "no sync point over 64 MiB: \(summary)")
        print("largest sync point: \(largest) pages (\(largest / 256) MiB): \(summary)")
    }

    /// The `dirty` guest (128 MiB) protected, its secondary killed with kill -9, and a new one started on the
    /// same address, which the primary then seeds while the guest writes. Returns (primary, old, new). The
    /// bound is held at 20 ms: stretched, the guest would end within a second, before the new secondary came.
    static func dirtyGuestWithANewSecondary(_ ws: (dir: String, key: String, fence: String)) throws -> (Child, Child, Child) {
        let common = PairFixture.common(ws)
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "none"] + common)
        let port = try sec.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest("dirty"), "--peer", "127.0.0.1:\(port)", "--memory", "128",
                                        "--serial", "none", "--interrupt-latency-us", "20000", "--max-interrupt-latency-us", "20000"] + common)
        try pri.waitForLine(containing: "protected: secondary")
        sec.kill9()
        try pri.waitForLine(containing: "continuing unprotected", seconds: 10)
        let sec2 = try Child("secondary-2", ["secondary", "--listen", "127.0.0.1:\(port)", "--serial", "none"] + common)
        return (pri, sec, sec2)
    }

    /// A secondary seeded while the guest rewrites 32 MiB under a timer: pre-copy sends pages while they
    /// change, so the pause carries the last writes; the new secondary replays to the end with the primary's
    /// digest, so no page it holds is stale.
    @Test func precopySeedWhileTheGuestDirtiesMemory() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let (pri, sec, sec2) = try Self.dirtyGuestWithANewSecondary(ws)
        let line = try pri.waitForLine(containing: "seeded at exit", occurrence: 2, seconds: 60)
        #expect(!line.contains("at exit 0:"), "\(line)")
        // "… N pages in R rounds (T ms), then M with the guest paused P ms"
        let words = line.split(separator: " ")
        let sent = words.firstIndex(of: "pages").flatMap { Int(words[$0 - 1]) } ?? 0
        let paused = words.firstIndex(of: "then").flatMap { Int(words[$0 + 1]) } ?? 0
        // How much the guest wrote by then depends on the host; that it wrote, and kept writing, does not.
        #expect(sent > 0 && sent + paused > 256, "round 0 carries what the guest wrote: \(line)")
        // It rewrites its 32 MiB faster than a round sends it: auto-converge must have throttled it.
        #expect(line.contains("guest throttled up to"), "\(line)")
        #expect(try pri.wait(seconds: 240) == 0, "\(pri.stderrText)")
        #expect(try sec2.wait(seconds: 60) == 0, "\(sec2.stderrText)")
        #expect(pri.digest != nil && pri.digest == sec2.digest, "primary \(pri.digest ?? "-"), secondary \(sec2.digest ?? "-")")
        #expect(!sec2.stderr.contains { $0.hasPrefix("live: ") }, "\(sec2.stderrText)")
        _ = try? sec.wait(seconds: 10)
    }

    /// Sync points go as deltas against what earlier ones sent (docs/log-format.md, "References"). A secondary
    /// seeded mid-run holds none of those: the primary resets its references at the seed, and the new
    /// secondary replays the rest of a timer-driven compute guest (a sync point every ~2 ms) to the same digest.
    @Test func aSecondarySeededMidRunFollowsDeltaSyncPoints() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let common = PairFixture.common(ws)
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "none"] + common)
        let port = try sec.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest("timer-compute"), "--peer", "127.0.0.1:\(port)",
                                        "--memory", "32", "--serial", "none"] + common)
        try pri.waitForLine(containing: "protected: secondary")
        sec.kill9()
        try pri.waitForLine(containing: "continuing unprotected", seconds: 10)
        let sec2 = try Child("secondary-2", ["secondary", "--listen", "127.0.0.1:\(port)", "--serial", "none"] + common)
        let line = try pri.waitForLine(containing: "seeded at exit", occurrence: 2, seconds: 30)
        #expect(!line.contains("at exit 0:"), "\(line)")
        #expect(try pri.wait(seconds: 240) == 0, "\(pri.stderrText)")
        #expect(try sec2.wait(seconds: 60) == 0, "\(sec2.stderrText)")
        #expect(pri.digest != nil && pri.digest == sec2.digest, "primary \(pri.digest ?? "-"), secondary \(sec2.digest ?? "-")")
        #expect(!sec2.stderrText.contains("cannot follow") && !sec2.stderr.contains { $0.hasPrefix("live: ") }, "\(sec2.stderrText)")
        _ = try? sec.wait(seconds: 10)
    }

    /// kill -9 of the primary while it seeds a new secondary: that secondary holds no confirmed seed (the pair
    /// record does not name it), so it must not take over; it reports the broken seed and waits for a primary.
    @Test func aHalfSeededSecondaryNeverGoesLive() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let (pri, sec, sec2) = try Self.dirtyGuestWithANewSecondary(ws)
        try sec2.waitForLine(containing: "receiving a seed", seconds: 30)
        pri.kill9()
        _ = try? pri.wait(seconds: 10)
        let reseeded = pri.stderr.filter { $0.contains("protected: secondary") }.count == 2
        if reseeded {
            // The pages of 128 MiB usually take longer than this; the kill came after the seed this time.
            print("note: the seed completed before the kill; the half-seeded case was not exercised")
            sec2.kill9()
        } else {
            try sec2.waitForLine(containing: "seed did not arrive", seconds: 30)
            #expect(!sec2.stderr.contains { $0.hasPrefix("live: ") || $0.contains("taking the fence") }, "\(sec2.stderrText)")
            sec2.kill9()
        }
        _ = try? sec2.wait(seconds: 10)
        _ = try? sec.wait(seconds: 10)
    }

    /// RAM that goes wrong on the secondary where no register shows it (one byte flipped at the end of every
    /// digest window) is found by the next periodic state digest, named as a RAM difference, and repaired
    /// like any divergence: the primary seeds the secondary again and the pair ends in lockstep.
    @Test func aRAMDifferenceIsFoundByTheStateDigest() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws),
                            environment: ["LOCKSTEP_FAULT_RAM_AT_EXIT": "20"])
        let port = try sec.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(port)", "--memory", "32",
                                        "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws))
        try pri.waitForLine(containing: "protected: secondary")
        let client = EchoClient(port: udp)
        // Digests come every 50 ms of the primary's time, at its exits: keep it busy until one is checked.
        var seq = 0
        while !pri.stderrText.contains("diverged") && seq < 2000 {
            seq += 1
            #expect(client.request("REQ \(seq) x", expect: "REP \(seq) ") != nil)
        }
        let dropped = try pri.waitForLine(containing: "diverged", seconds: 10)
        #expect(dropped.contains("RAM differs in guest physical") && dropped.contains("(registers equal)"), "\(dropped)")
        let reseeded = try pri.waitForLine(containing: "seeded at exit", occurrence: 2, seconds: 30)
        #expect(!reseeded.contains("at exit 0:"), "\(reseeded)")
        // The flipped bytes lie in pages the primary never wrote (zero there): the delta must still find each.
        let (sent, _) = try Self.deltaSeed(reseeded)
        #expect(sent >= 64, "one byte flipped in each 512 KiB window of 32 MiB, \(sent) pages sent: \(reseeded)")
        for s in seq + 1...seq + 3 { #expect(client.request("REQ \(s) b", expect: "REP \(s) ") != nil) }
        _ = client.request("QUIT", expect: "RESULT echo")
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)")
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
        #expect(pri.digest != nil && pri.digest == sec.digest, "primary \(pri.digest ?? "-"), secondary \(sec.digest ?? "-")")
        print("RAM fault found after \(seq) requests: \(dropped)")
    }

    /// A log that lies (one event's signature altered in flight) makes the secondary diverge: it reports it,
    /// the primary drops it and seeds it again from the running guest, and the pair still ends in lockstep.
    /// The secondary keeps its RAM: `echo-state` has 48 MiB written at boot, and the repair carries only the
    /// pages that differ from what the secondary holds (a delta seed), not the guest's memory.
    @Test func divergenceIsRepairedByADeltaSeed() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws))
        let port = try sec.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo-state"), "--peer", "127.0.0.1:\(port)", "--memory", "96",
                                        "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws),
                            environment: ["LOCKSTEP_FAULT_SIGNATURE_AT_EXIT": "100"])
        let client = EchoClient(port: udp)
        #expect(client.request("REQ 1 a", expect: "REP 1 ") != nil)
        try pri.waitForLine(containing: "diverged", seconds: 30)
        try sec.waitForLine(containing: "waiting for a new seed", seconds: 30)
        let reseeded = try pri.waitForLine(containing: "seeded at exit", occurrence: 2, seconds: 30)
        #expect(!reseeded.contains("at exit 0:"), "\(reseeded)")
        let (sent, needed) = try Self.deltaSeed(reseeded)
        #expect(sent < 64 && needed > 12_000, "a repair sent \(sent) pages of the \(needed) a new machine needs: \(reseeded)")
        for seq in 2...4 { #expect(client.request("REQ \(seq) b", expect: "REP \(seq) ") != nil) }
        _ = client.request("QUIT", expect: "RESULT echo")
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)")
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
        #expect(pri.digest != nil && pri.digest == sec.digest, "primary \(pri.digest ?? "-"), secondary \(sec.digest ?? "-")")
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") })
        print("divergence repaired by a delta seed: \(sent) pages sent, \(needed) for a new machine")
    }

    /// From a primary's "protected" line: the pages a delta seed's round 0 sent and those a new machine needed.
    static func deltaSeed(_ line: String) throws -> (sent: Int, needed: Int) {
        guard let r = line.range(of: #"round 0 sent (\d+) pages where a new machine needs (\d+)"#, options: .regularExpression) else {
            throw PairTestError("not a delta seed: \(line)")
        }
        let numbers = line[r].split(separator: " ").compactMap { Int($0) }  // 0 (the round), sent, needed
        return (numbers[1], numbers[2])
    }

    @Test func timingGuestRepeatedlyInLockstep() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        var digests = Set<String>()
        for _ in 0..<5 {
            let (p, _) = try Self.runPair("timer-compute-short")
            if let d = p.digest { digests.insert(d) }
        }
        // Interrupts land differently each run, and each run is still mirrored exactly.
        #expect(digests.count > 1, "five runs gave one digest: the guest's timing was not exercised")
    }

    /// A secondary that busy-polls for frames, on the primary's link core, stays in lockstep, and its receiver
    /// takes frames by spinning.
    @Test func aPollingSecondaryRunsInLockstep() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let stats = NSTemporaryDirectory() + "lockstep-poll-\(getpid()).json"
        defer { try? FileManager.default.removeItem(atPath: stats) }
        _ = try Self.runPair("timer-compute-short", primaryArgs: ["--link-cpu", "0"],
                             secondaryArgs: ["--link-cpu", "0", "--link-poll-us", "5000", "--stats-json", stats])
        let j = try PairFixture.jsonObject(stats)
        let spins = j?["spinReceives"] as? Int ?? 0, batches = j?["logBatchesReceived"] as? Int ?? 0
        #expect(batches > 10 && spins > 0, "spin receives \(spins) of \(batches) batches")
        print("polling secondary: \(spins) receives by spinning, \(batches) log batches")
    }
}

}

/// Bad peers: each is a clear error, the connection is dropped, and nothing running is harmed.
extension PairTests { @Suite struct BadPeerTests {
    static func secondary(_ ws: (dir: String, key: String, fence: String), _ extra: [String] = []) throws -> (Child, UInt16) {
        let s = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "none", "--key-file", ws.key,
                                        "--status-interval-ms", "0", "--failure-timeout-ms", PairFixture.failureTimeoutMs] + extra)
        return (s, try s.listeningPort())
    }

    static func primary(_ port: UInt16, key: String, _ extra: [String] = []) throws -> Child {
        try Child("primary", ["primary", try PairFixture.guest("hello"), "--peer", "127.0.0.1:\(port)", "--memory", "32",
                              "--serial", "none", "--key-file", key, "--status-interval-ms", "0",
                              "--failure-timeout-ms", PairFixture.failureTimeoutMs] + extra)
    }

    /// The channel config of a hand-made primary that holds the workspace's key.
    static func primaryConfig(_ ws: (dir: String, key: String, fence: String)) throws -> ChannelConfig {
        ChannelConfig(key: [UInt8](try Data(contentsOf: URL(fileURLWithPath: ws.key))), role: .primary)
    }

    /// A primary (`primary(port, key:, extra)`) that must end with `status`, its stderr naming `text`.
    @discardableResult
    static func expectRefused(_ port: UInt16, key: String, _ extra: [String] = [], status: Int32, saying text: String,
                              sourceLocation: SourceLocation = #_sourceLocation) throws -> Child {
        let bad = try primary(port, key: key, extra)
        #expect(try bad.wait() == status, sourceLocation: sourceLocation)
        #expect(bad.stderrText.contains(text), "\(bad.stderrText)", sourceLocation: sourceLocation)
        return bad
    }

    /// After a bad peer, the secondary still pairs with a good primary and mirrors it to the end.
    static func stillServes(_ sec: Child, port: UInt16, key: String) throws {
        let good = try primary(port, key: key)
        #expect(try good.wait(seconds: 60) == 0, "\(good.stderrText)")
        #expect(try sec.wait(seconds: 60) == 0, "\(sec.stderrText)")
        #expect(good.digest != nil && good.digest == sec.digest)
    }

    @Test func wrongKey() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let (sec, port) = try Self.secondary(ws)
        let other = ws.dir + "/other-key"
        _ = FileManager.default.createFile(atPath: other, contents: Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
        try Self.expectRefused(port, key: other, status: 76, saying: "authentication")
        try sec.waitForLine(containing: "refused a peer")
        try Self.stillServes(sec, port: port, key: ws.key)
    }

    @Test func garbageBytes() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let (sec, port) = try Self.secondary(ws)
        let c = try Connection.connectRaw(host: "127.0.0.1", port: port, timeoutMs: 2000)
        _ = Array("GET / HTTP/1.1\r\nHost: lockstep\r\n\r\n".utf8).withUnsafeBytes { send(c.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        try sec.waitForLine(containing: "refused a peer")
        c.close()
        try Self.stillServes(sec, port: port, key: ws.key)
    }

    @Test func versionMismatch() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let (sec, port) = try Self.secondary(ws)
        var cfg = try Self.primaryConfig(ws)
        cfg.protocolVersion = ChannelConfig.currentVersion + 1
        #expect(throws: ChannelError.self) { _ = try Connection.connect(host: "127.0.0.1", port: port, timeoutMs: 2000, config: cfg) }
        let l = try sec.waitForLine(containing: "refused a peer")
        #expect(l.contains("version"), "\(l)")
        try Self.stillServes(sec, port: port, key: ws.key)
    }

    /// A peer that passes the handshake (it has the key) but sends a seed that is not one: exit 76, named.
    @Test func badSeed() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let (sec, port) = try Self.secondary(ws)
        let c = try Connection.connect(host: "127.0.0.1", port: port, timeoutMs: 2000, config: try Self.primaryConfig(ws))
        try c.send(.bulk([0xEE, 1, 2, 3]))
        #expect(try sec.wait() == 76)
        #expect(sec.stderrText.contains("bad seed from the primary"), "\(sec.stderrText)")
        c.close()
    }

    /// A primary whose guest ends before it seeds a secondary that connected says goodbye (`dropOffer`): the
    /// secondary stops, exit 0, saying why, and never goes live.
    @Test func aGoodbyeBeforeTheSeedStopsTheSecondary() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let (sec, port) = try Self.secondary(ws)
        let c = try Connection.connect(host: "127.0.0.1", port: port, timeoutMs: 2000, config: try Self.primaryConfig(ws))
        try c.send(.goodbye("the guest ended before this secondary was seeded"))
        #expect(try sec.wait() == 0, "\(sec.stderrText)")
        #expect(sec.stderrText.contains("the primary stopped before the seed was complete: the guest ended before this secondary was seeded; not going live"),
                "\(sec.stderrText)")
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") })
        c.close()
    }

    /// A seed whose pages load to another state than the primary's (one byte changed after it was hashed,
    /// `LOCKSTEP_FAULT_SEED_PAGE`): the secondary refuses it by its digest (76) and never acks it; the primary
    /// stays unprotected, and the next secondary gets a good seed.
    @Test func aSeedThatLoadsToAnotherStateIsRefused() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let common = PairFixture.common(ws)
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "none"] + common)
        let port = try sec.listeningPort()
        // The first seed, at exit 0, carries no pages: the fault waits for the next one.
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(port)", "--memory", "32",
                                        "--serial", "udp:127.0.0.1:\(udp)"] + common, environment: ["LOCKSTEP_FAULT_SEED_PAGE": "1"])
        try pri.waitForLine(containing: "protected: secondary")
        let client = EchoClient(port: udp)
        #expect(client.request("REQ 1 a", expect: "REP 1 ") != nil)
        sec.kill9()
        try pri.waitForLine(containing: "continuing unprotected", seconds: 10)
        let bad = try Child("secondary-2", ["secondary", "--listen", "127.0.0.1:\(port)", "--serial", "none"] + common)
        #expect(try bad.wait(seconds: 30) == 76)
        #expect(bad.stderrText.contains("after loading the seed this side's state digest is"), "\(bad.stderrText)")
        try pri.waitForLine(containing: "continuing unprotected", occurrence: 2, seconds: 10)
        #expect(pri.stderr.filter { $0.contains("protected: secondary") }.count == 1, "\(pri.stderrText)")
        let good = try Child("secondary-3", ["secondary", "--listen", "127.0.0.1:\(port)", "--serial", "none"] + common)
        try pri.waitForLine(containing: "protected: secondary", occurrence: 2, seconds: 30)
        #expect(client.request("REQ 2 b", expect: "REP 2 ") != nil)
        _ = client.request("QUIT", expect: "RESULT echo")
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)")
        #expect(try good.wait(seconds: 30) == 0, "\(good.stderrText)")
        #expect(pri.digest != nil && pri.digest == good.digest)
        _ = try? sec.wait(seconds: 10)
    }

    @Test func requiredEncryptionAgainstDisabled() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let (sec, port) = try Self.secondary(ws, ["--encrypt", "disabled"])
        try Self.expectRefused(port, key: ws.key, ["--encrypt", "required"], status: 76, saying: "encrypt")
        try sec.waitForLine(containing: "refused a peer")
        try Self.stillServes(sec, port: port, key: ws.key)
    }

    /// Also with both sides' link threads on core 0 (`--link-cpu`, as the bench places them on one host).
    @Test func encryptedPairRunsInLockstep() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let (p, s) = try PairTests.LockstepTests.runPair("timer-compute-short", primaryArgs: ["--encrypt", "required", "--link-cpu", "0"],
                                                         secondaryArgs: ["--encrypt", "required", "--link-cpu", "0"])
        #expect(p.digest == s.digest)
        #expect(!(p.stderrText + s.stderrText).contains("cannot run on core"), "\(p.stderrText)\n\(s.stderrText)")
    }

    /// An address without a port is a usage error naming the option, on either side.
    @Test func anAddressWithoutAPortIsRefused() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let pri = try Child("primary", ["primary", try PairFixture.guest("hello"), "--peer", "127.0.0.1", "--memory", "32",
                                        "--serial", "none", "--key-file", ws.key])
        #expect(try pri.wait() == 64)
        #expect(pri.stderrText.contains("--peer 127.0.0.1: expected HOST:PORT"), "\(pri.stderrText)")
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:http", "--serial", "none", "--key-file", ws.key])
        #expect(try sec.wait() == 64)
        #expect(sec.stderrText.contains("--listen 127.0.0.1:http: expected HOST:PORT"), "\(sec.stderrText)")
    }

    @Test func aLinkCoreThisHostLacksAPollTooLongOrALeaseTooShortIsRefused() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        try Self.expectRefused(1, key: ws.key, ["--link-cpu", "4096"], status: 64, saying: "--link-cpu 4096: this process may run on")
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "none", "--key-file", ws.key,
                                          "--link-poll-us", "2000000"])
        #expect(try sec.wait() == 64)
        #expect(sec.stderrText.contains("--link-poll-us 2000000: at most 1000000"), "\(sec.stderrText)")
        try Self.expectRefused(1, key: ws.key, ["--fence-lease-ms", "50"], status: 64,
                               saying: "--fence-lease-ms 50: use 0 (no check) or at least 100")
        try Self.expectRefused(1, key: ws.key, ["--connect-timeout-ms", "0"], status: 64,
                               saying: "--connect-timeout-ms 0: give at least 1 (0 only with --start-unprotected: boot at once)")
    }

    @Test func unreachablePeer() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        // Port 1 on loopback: nothing listens there.
        try Self.expectRefused(1, key: ws.key, ["--connect-timeout-ms", "300"], status: 68, saying: "unreachable")
    }

    @Test func shortKeyFile() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        _ = FileManager.default.createFile(atPath: ws.dir + "/short", contents: Data([1, 2, 3]))
        try Self.expectRefused(1, key: ws.dir + "/short", status: 64, saying: "at least 16")
    }

    /// A status file that cannot be written is named before anything runs (exit 64), not skipped in silence.
    @Test func anUnwritableStatusFileIsRefusedAtStart() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let bad = try Self.expectRefused(1, key: ws.key, ["--status-json", ws.dir + "/no-such-dir/status.json"], status: 64, saying: "--status-json \(ws.dir)/no-such-dir/status.json")
        #expect(bad.stderrText.contains("No such file or directory"), "\(bad.stderrText)")
    }
}
}

/// What the operator sees, and what the primary does when the secondary cannot keep up.
extension PairTests { @Suite struct StatusAndFlowTests {
    /// A secondary slowed to 5 ms per step falls behind; with a 20 ms bound the primary slows down to match,
    /// its stats say for how long, and the pair still ends in lockstep.
    @Test func slowSecondaryThrottlesThePrimary() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "none"] + PairFixture.common(ws),
                            environment: ["LOCKSTEP_FAULT_REPLAY_DELAY_US": "5000"])
        let port = try sec.listeningPort()
        let stats = ws.dir + "/stats.json"
        let pri = try Child("primary", ["primary", try PairFixture.guest("timer-compute-short"), "--peer", "127.0.0.1:\(port)",
                                        "--memory", "32", "--serial", "none", "--max-lag-ms", "20", "--stats-json", stats] + PairFixture.common(ws))
        #expect(try pri.wait(seconds: 120) == 0, "\(pri.stderrText)")
        #expect(try sec.wait(seconds: 60) == 0, "\(sec.stderrText)")
        #expect(pri.digest != nil && pri.digest == sec.digest)
        let json = try PairFixture.jsonObject(stats)
        let throttled = json?["throttledMs"] as? Double ?? 0
        #expect(throttled > 100, "the primary should have waited for the slow secondary; throttledMs = \(throttled)")
        // The bound is on the oldest unreplayed batch's age, so it acts only once a batch is 20 ms old: the
        // guest's boot runs ~160 exits in those first ms, which this secondary replays at 5 ms each (~0.8 s,
        // the max). After that backlog the lag stays near the bound (p50 ~80 ms in a debug build).
        let lag = json?["replayLagUs"] as? [String: Any]
        let maxLag = lag?["max"] as? Double ?? .infinity, medianLag = lag?["p50"] as? Double ?? .infinity
        #expect(maxLag < 3_000_000, "replay lag max \(maxLag) µs: more than the first 20 ms of log can take to replay")
        #expect(medianLag < 300_000, "replay lag p50 \(medianLag) µs: the primary did not hold the secondary near the bound")
    }

    /// A secondary whose replay stops moving must not stall the primary: it is dropped, and the primary
    /// ends its guest unprotected. (The secondary, slowed to 2 s per step, then finds the fence held and
    /// waits for a new seed; each one it gets, it is dropped again.)
    @Test func stuckSecondaryIsDropped() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "none"] + PairFixture.common(ws),
                            environment: ["LOCKSTEP_FAULT_REPLAY_DELAY_US": "2000000"])
        let port = try sec.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest("timer-compute-short"), "--peer", "127.0.0.1:\(port)",
                                        "--memory", "32", "--serial", "none", "--max-lag-ms", "20", "--replay-stall-ms", "300"]
                                       + PairFixture.common(ws))
        try pri.waitForLine(containing: "has not moved", seconds: 60)
        #expect(try pri.wait(seconds: 120) == 0, "\(pri.stderrText)")
        try sec.waitForLine(containing: "waiting for the primary to seed this side again", seconds: 60)
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") }, "\(sec.stderrText)")
        sec.kill9()
    }

    @Test func statusLineAndJSON() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let status = ws.dir + "/status.json"
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws))
        let port = try sec.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(port)", "--memory", "32",
                                        "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws) + ["--status-interval-ms", "50", "--status-json", status])
        // The idle echo guest's link carries heartbeats, each echoed: the line gains the link's round trip.
        let line = try pri.waitForLine(containing: " rtt=", seconds: 30)
        #expect(line.contains("status: primary primaryProtected protected"), "\(line)")
        let json = try PairFixture.jsonObject(status)
        #expect(json?["protected"] as? Bool == true && json?["connected"] as? Bool == true, "\(String(describing: json))")
        #expect(json?["role"] as? String == "primary")
        let rtt = json?["linkRoundTripMicroseconds"] as? Double ?? 0
        #expect(rtt > 0 && rtt < 1_000_000, "\(String(describing: json))")
        let fenceAge = json?["fenceConfirmedMsAgo"] as? Double ?? .infinity
        #expect(fenceAge < 30_000, "\(String(describing: json))")
        sec.kill9()
        try pri.waitForLine(containing: "status: primary primaryUnprotected UNPROTECTED", seconds: 30)
        let after = try PairFixture.jsonObject(status)
        #expect(after?["protected"] as? Bool == false, "\(String(describing: after))")
        _ = EchoClient(port: udp).request("QUIT", expect: "RESULT echo")
        #expect(try pri.wait(seconds: 30) == 0)
    }
} }
