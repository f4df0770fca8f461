import Failover
import Foundation
import Glibc
import Testing

/// kill -9 and partitions against real `lockstep primary` / `lockstep secondary` processes on loopback.
extension PairTests { @Suite struct FailoverTests {
    /// Starts a secondary and a primary running the echo guest, both with `--serial udp:127.0.0.1:PORT`.
    /// `serial`: both sides' service address (default `udp:127.0.0.1:UDP`).
    static func startPair(_ ws: (dir: String, key: String, fence: String), udp: UInt16, serial: String? = nil, guest: String = "echo",
                          extraPrimary: [String] = [], extraSecondary: [String] = [], primaryEnvironment: [String: String] = [:],
                          peerOverride: ((UInt16) throws -> UInt16)? = nil) throws -> (Child, Child, UInt16) {
        let common = PairFixture.common(ws)
        let service = serial ?? "udp:127.0.0.1:\(udp)"
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", service] + common + extraSecondary)
        let port = try sec.listeningPort()
        let peer = try peerOverride?(port) ?? port
        let pri = try Child("primary", ["primary", try PairFixture.guest(guest), "--peer", "127.0.0.1:\(peer)", "--memory", "32",
                                        "--serial", service] + common + extraPrimary, environment: primaryEnvironment)
        try pri.waitForLine(containing: "protected: secondary")
        return (pri, sec, port)
    }

    /// One trial: requests, kill -9 of the primary after `killAfter` replies, requests against the survivor, QUIT.
    static func killPrimaryTrial(killAfter: Int, total: Int, extraSecondary: [String] = []) throws -> Double {
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try startPair(ws, udp: udp, extraSecondary: extraSecondary)
        let talk = Conversation(port: udp)
        var failoverMs = 0.0
        for seq in 1...total {
            if seq == killAfter + 1 {
                pri.kill9()
                let t0 = Date()
                let r = talk.request(seq, "after-kill")
                guard r != nil else { throw PairTestError("no reply from the survivor after kill -9; secondary:\n\(sec.stderrText)") }
                failoverMs = Date().timeIntervalSince(t0) * 1000
                continue
            }
            guard talk.request(seq, "text-\(seq)") != nil else {
                throw PairTestError("no reply to seq \(seq); primary:\n\(pri.stderrText)\nsecondary:\n\(sec.stderrText)")
            }
        }
        talk.expectConsistent()
        #expect(talk.history.replies.count == total)
        talk.quit()
        let status = try sec.wait(seconds: 30)
        #expect(status == 0, "survivor ended with \(status): \(sec.stderrText)")
        #expect(sec.stderr.contains { $0.hasPrefix("live: ") }, "the survivor never said live:")
        #expect(sec.digest != nil)
        try pri.wait(seconds: 10)
        #expect(pri.process.terminationReason == .uncaughtSignal)
        try? FileManager.default.removeItem(atPath: ws.dir)
        return failoverMs
    }

    /// 20 trials per CI run; `scripts/soak.sh` sets LOCKSTEP_KILL_TRIALS=1000.
    @Test func killPrimaryRepeatedly() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let trials = ProcessInfo.processInfo.environment["LOCKSTEP_KILL_TRIALS"].flatMap { Int($0) } ?? 20
        var times: [Double] = []
        for i in 0..<trials {
            times.append(try Self.killPrimaryTrial(killAfter: 1 + i % 5, total: 8))
        }
        times.sort()
        print("kill -9 → first survivor reply over \(times.count) trials: p50 \(String(format: "%.1f", times[times.count / 2])) ms, "
              + "p99 \(String(format: "%.1f", times[min(times.count - 1, times.count * 99 / 100)])) ms, max \(String(format: "%.1f", times.last!)) ms")
    }

    /// A secondary whose receiver spins for frames (`--link-poll-us`) follows and takes over the same way: the
    /// primary's death ends a spin as it ends a sleep.
    @Test func aPollingSecondaryTakesOver() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        for i in 0..<3 { _ = try Self.killPrimaryTrial(killAfter: 2 + i, total: 7, extraSecondary: ["--link-poll-us", "20000"]) }
    }

    /// Output the primary released after its last `released` report is still held by the secondary, which
    /// sends it again on go-live: to the client the primary answered, without that client sending first.
    /// The same failover with the service on a TCP port: the client's connection dies with the primary; it
    /// connects again to the same port, which the survivor now serves, and the conversation goes on.
    @Test func killPrimaryOverATCPServicePort() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let tcp = try PairFixture.freeTCPPort()
        let (pri, sec, _) = try Self.startPair(ws, udp: 0, serial: "tcp:127.0.0.1:\(tcp)")
        let link = TCPLineClient(port: tcp)
        let talk = Conversation(EchoClient(link))
        talk.exchange(1...5, "a")
        #expect(link.connections == 1)
        pri.kill9()
        talk.exchange(6...10, "b", sec.stderrText)
        #expect(sec.stderr.contains { $0.hasPrefix("live: ") }, "\(sec.stderrText)")
        #expect(link.connections == 2, "the client connected \(link.connections) times")
        talk.quit()
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
        talk.expectConsistent()
        _ = try? pri.wait(seconds: 10)
    }

    @Test func survivorResendsTheLastReplyToTheClient() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        // Reports at most every 200 ms: the reply to REQ 2 is released and not yet reported when the kill lands.
        let (pri, sec, _) = try Self.startPair(ws, udp: udp, extraPrimary: ["--heartbeat-ms", "200"])
        let talk = Conversation(port: udp)
        talk.exchange(1...1, "a")
        let reply = talk.request(2, "b")
        pri.kill9()
        let live = try sec.waitForLine(containing: "went live", seconds: 10)
        // "(N output bytes the primary may not have released are sent again)"; 0 only if a report crossed the kill.
        let resent = live.split(separator: "(").last.flatMap { Int($0.split(separator: " ").first ?? "") } ?? -1
        if resent == 0 { print("the released report for REQ 2 arrived before the kill: nothing to re-send this time") }
        else {
            // Nothing is sent now: the survivor must find the client on its own.
            var again: [String] = []
            let deadline = Date().addingTimeInterval(10)
            while Date() < deadline, !again.contains(where: { $0.hasPrefix("REP 2 ") }) {
                for l in talk.client.receive(ms: 100) { talk.history.saw(l); again.append(l) }
            }
            #expect(reply != nil && again.contains(reply!), "survivor re-sent \(again), wanted \(reply ?? "-"); secondary:\n\(sec.stderrText)")
        }
        talk.exchange(3...3, "c")
        talk.expectConsistent()
        talk.quit()
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
        try pri.wait(seconds: 10)
        try? FileManager.default.removeItem(atPath: ws.dir)
    }

    @Test func killSecondaryThenReprotect() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, port) = try Self.startPair(ws, udp: udp)
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a")
        sec.kill9()
        try pri.waitForLine(containing: "continuing unprotected", seconds: 10)
        // Unprotected: output is not held for anyone.
        talk.exchange(4...6, "b")
        // A new secondary on the same address is seeded from the running guest (pre-copy) and protects it.
        let common = PairFixture.common(ws)
        let sec2 = try Child("secondary-2", ["secondary", "--listen", "127.0.0.1:\(port)", "--serial", "udp:127.0.0.1:\(udp)"] + common)
        let seeded = try pri.waitForLine(containing: "seeded at exit", occurrence: 2, seconds: 20)
        #expect(!seeded.contains("at exit 0:"), "the new secondary must be seeded from the running state: \(seeded)")
        talk.exchange(7...9, "c")
        // And it can take over.
        pri.kill9()
        talk.exchange(10...10, "d", "secondary-2:\n\(sec2.stderrText)")
        talk.quit()
        #expect(try sec2.wait(seconds: 30) == 0, "\(sec2.stderrText)")
        talk.expectConsistent()
        try pri.wait(seconds: 10)
        _ = try? sec.wait(seconds: 10)
    }

    /// `--start-unprotected`: with no secondary within the connect timeout the guest runs unprotected (its
    /// output leaves at once), and a secondary that comes later is seeded from the running guest and protects it.
    @Test func aPrimaryStartedUnprotectedIsProtectedOnceASecondaryListens() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let port = try PairFixture.freeTCPPort()
        let common = PairFixture.common(ws) + ["--serial", "udp:127.0.0.1:\(udp)"]
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(port)", "--memory", "32",
                                        "--connect-timeout-ms", "200", "--start-unprotected"] + common)
        defer { pri.kill9() }
        try pri.waitForLine(containing: "no secondary within --connect-timeout-ms 200 (")
        try Self.answersThenIsProtected(pri, udp: udp, port: port, common: common)
    }

    /// An unprotected primary's guest answers; a secondary then started at `port` is seeded from the running
    /// guest (not at exit 0), and the pair ends in lockstep.
    static func answersThenIsProtected(_ pri: Child, udp: UInt16, port: UInt16, common: [String]) throws {
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a", "\(pri.stderrText)")
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:\(port)"] + common)
        defer { sec.kill9() }
        let seeded = try pri.waitForLine(containing: "protected: secondary at 127.0.0.1:\(port) seeded at exit")
        #expect(!seeded.contains("at exit 0:"), "seeded from the running guest: \(seeded)")
        talk.exchange(4...6, "b")
        try talk.quitInLockstep(pri, sec)
    }

    /// A secondary whose --fence reaches another store than the primary's (here: another directory; or none)
    /// refuses the seed by naming both and exits 64, so no pair starts that a partition could split into two
    /// live primaries; the primary, whose first secondary this was, ends with the same reason (68).
    @Test(arguments: [true, false]) func aSecondaryFencedElsewhereRefusesThePrimary(fenced: Bool) throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let other = ws.dir + "/other-fence"
        try FileManager.default.createDirectory(atPath: other, withIntermediateDirectories: true)
        let port = try PairFixture.freeTCPPort()
        let secFence = fenced ? ["--fence", other] : []
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:\(port)", "--serial", "none", "--key-file", ws.key,
                                          "--status-interval-ms", "0"] + secFence)
        defer { sec.kill9() }
        _ = try sec.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(port)", "--memory", "32",
                                        "--serial", "none"] + PairFixture.common(ws))
        defer { pri.kill9() }
        #expect(try sec.wait(seconds: 30) == 64, "\(sec.stderrText)")
        let mine = fenced ? "--fence \(other) (store " : "no --fence"
        #expect(sec.stderr.contains { $0.contains("the primary runs with --fence \(ws.fence) (store ") && $0.contains("and this side with \(mine)")
                                       && $0.hasSuffix("give both the same --fence") }, "\(sec.stderrText)")
        #expect(try pri.wait(seconds: 30) == 68, "\(pri.stderrText)")
        #expect(pri.stderr.contains { $0.hasPrefix("lockstep: error: secondary unreachable: cannot send the seed: peer reported protocolViolation: the primary runs with --fence") && $0.hasSuffix("give both the same --fence") }, "\(pri.stderrText)")
    }

    /// With --start-unprotected, a first secondary that refuses the seed (here: fenced elsewhere) does not end
    /// the primary: its guest runs unprotected, output leaving at once, and a secondary that takes the seed
    /// at the same address protects it.
    @Test func aPrimaryStartedUnprotectedOutlivesASecondaryThatRefusesIt() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let other = ws.dir + "/other-fence"
        try FileManager.default.createDirectory(atPath: other, withIntermediateDirectories: true)
        let udp = try PairFixture.freeUDPPort()
        let port = try PairFixture.freeTCPPort()
        let common = PairFixture.common(ws) + ["--serial", "udp:127.0.0.1:\(udp)"]
        let refusing = try Child("secondary", ["secondary", "--listen", "127.0.0.1:\(port)", "--serial", "none", "--key-file", ws.key,
                                               "--status-interval-ms", "0", "--fence", other])
        defer { refusing.kill9() }
        _ = try refusing.listeningPort()
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(port)", "--memory", "32",
                                        "--start-unprotected"] + common)
        defer { pri.kill9() }
        #expect(try refusing.wait(seconds: 30) == 64, "\(refusing.stderrText)")
        try pri.waitForLine(containing: "could not seed the secondary at 127.0.0.1:\(port): secondary unreachable: cannot send the seed: peer reported protocolViolation: the primary runs with --fence")
        #expect(pri.stderr.contains { $0.hasSuffix("running the guest unprotected; looking for one at 127.0.0.1:\(port)") }, "\(pri.stderrText)")
        try Self.answersThenIsProtected(pri, udp: udp, port: port, common: common)
    }

    /// The pair record cannot be written (here its path is a directory): the secondary is never named, so it
    /// is dropped before any output leaves on its acks, and it does not go live; the primary serves on. The
    /// secondary waits to be seeded again, and the primary tries it again, waiting longer each time.
    @Test func aPairRecordThatCannotBeWrittenLeavesThePrimaryUnprotected() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        try FileManager.default.createDirectory(atPath: ws.fence + "/lockstep.pair/in-the-way", withIntermediateDirectories: true)
        let udp = try PairFixture.freeUDPPort()
        let common = PairFixture.common(ws)
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)"] + common)
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(try sec.listeningPort())",
                                        "--memory", "32", "--serial", "udp:127.0.0.1:\(udp)"] + common)
        try pri.waitForLine(containing: "cannot write the pair record in \(ws.fence)", seconds: 20)
        try pri.waitForLine(containing: "continuing unprotected", seconds: 10)
        try sec.waitForLine(containing: "waiting for the primary to seed this side again", seconds: 20)
        try pri.waitForLine(containing: "secondary lost (channel error: cannot write the pair record", occurrence: 2, seconds: 20)
        let client = EchoClient(port: udp)
        #expect(client.request("REQ 1 a", expect: "REP 1 ") != nil, "\(pri.stderrText)")
        _ = client.request("QUIT", expect: "RESULT echo")
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)")
        #expect(!pri.stderr.contains { $0.hasPrefix("lockstep: protected:") }, "\(pri.stderrText)")
        // Backed off: 0.2, 0.4, 0.8 s ... between tries, not one try per 100 ms.
        let tries = pri.stderr.filter { $0.contains("secondary lost (channel error: cannot write the pair record") }.count
        #expect(tries <= 4, "\(tries) tries: \(pri.stderrText)")
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") }, "\(sec.stderrText)")
        sec.kill9()
    }

    /// A fence directory that fails when the secondary needs it (here it is gone) is not a held fence: there is
    /// no primary to wait for a seed from, so the secondary stops with 75, naming the fence, and never goes live.
    @Test func aFenceDirectoryGoneAtFailoverStopsTheSecondary() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try Self.startPair(ws, udp: udp)
        try FileManager.default.removeItem(atPath: ws.fence)
        pri.kill9()
        #expect(try sec.wait(seconds: 20) == 75, "\(sec.stderrText)")
        #expect(sec.stderr.contains { $0.contains("unusable fence (fence directory \(ws.fence) does not exist)") }, "\(sec.stderrText)")
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") || $0.contains("waiting for the primary to seed") }, "\(sec.stderrText)")
        _ = try? pri.wait(seconds: 10)
    }

    /// A request that reaches the primary while its guest stands still for a handover (held there 300 ms by
    /// fault injection, `LOCKSTEP_FAULT_HANDOVER_PAUSE_MS`) is never read by that guest, so no log record holds
    /// it: it passes to the secondary with the handover, and the survivor's guest answers it. Sent once.
    @Test func inputQueuedDuringAHandoverIsAnsweredByTheSurvivor() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort(), control = ws.dir + "/primary.sock"
        let (pri, sec, _) = try Self.startPair(ws, udp: udp, extraPrimary: ["--control", control],
                                               primaryEnvironment: ["LOCKSTEP_FAULT_HANDOVER_PAUSE_MS": "300"])
        defer { pri.kill9(); sec.kill9() }
        let client = EchoClient(port: udp)
        #expect(client.request("REQ 1 a", expect: "REP 1 ") != nil)
        let handover = try Child("handover", ["control", control, "handover"], captureStdout: true)
        try pri.waitForLine(containing: "fault injection: the handover waits 300 ms with the guest stopped")
        client.send("REQ 2 once")
        var reply: String?
        let deadline = Date().addingTimeInterval(15)
        while reply == nil, Date() < deadline { reply = client.receive(ms: 100).first { $0.hasPrefix("REP 2 ") } }
        #expect(reply != nil, "no reply to a request sent once during the handover\nprimary:\n\(pri.stderrText)\nsecondary:\n\(sec.stderrText)")
        #expect(try handover.wait(seconds: 30) == 0, "\(handover.stderrText)")
        #expect(sec.stderr.contains { $0.hasPrefix("live: the primary handed the guest over at exit ") }, "\(sec.stderrText)")
        #expect(client.request("QUIT", expect: "RESULT echo") != nil)
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
    }

    /// A planned switchover (`lockstep control SOCKET handover`; SIGUSR2 does the same): the primary stops where
    /// the secondary holds its whole log, gives up the fence, and the secondary goes live at once; the command
    /// says so and exits 0. The conversation goes on with no request lost or answered twice differently; the
    /// old primary ends with status 0. A side with nothing to hand over refuses (exit 1) and keeps running.
    @Test func plannedHandoverKeepsTheConversation() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let priControl = ws.dir + "/primary.sock", secControl = ws.dir + "/secondary.sock"
        let (pri, sec, _) = try Self.startPair(ws, udp: udp, extraPrimary: ["--control", priControl], extraSecondary: ["--control", secControl])
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a")
        let bogus = try Child("bogus", ["control", priControl, "reboot"], captureStdout: true)
        #expect(try bogus.wait(seconds: 10) == 64, "\(bogus.stderrText)")
        #expect(bogus.stderrText.contains("unknown request reboot: use status, handover, peer HOST:PORT or migrate HOST:PORT"), "\(bogus.stderrText)")
        let status = try Child("status", ["control", priControl, "status"], captureStdout: true)
        #expect(try status.wait(seconds: 10) == 0, "\(status.stderrText)")
        #expect(status.stderr.contains { $0.contains("\"role\":\"primary\"") && $0.contains("\"protected\":true") }, "\(status.stderrText)")
        let t0 = Date()
        let handover = try Child("handover", ["control", priControl, "handover"], captureStdout: true)
        // Sent at once and resent until answered: whichever side holds the guest answers it, once.
        talk.exchange(4...4, "b", "secondary:\n\(sec.stderrText)")
        print("handover: request → the reply to a request sent with it in \(String(format: "%.1f", Date().timeIntervalSince(t0) * 1000)) ms")
        #expect(try handover.wait(seconds: 30) == 0, "\(handover.stderrText)")
        #expect(handover.stderr.contains { $0.hasPrefix("handed-over: handed over to the secondary at exit") }, "\(handover.stderrText)")
        let live = try sec.waitForLine(containing: "live: ", seconds: 10)
        #expect(live.contains("handed the guest over at exit"), "\(live)")
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)")
        #expect(!FileManager.default.fileExists(atPath: priControl), "the primary left its control socket behind")
        // The survivor has no secondary: it refuses (exit 1) and serves on.
        let refusal = try Child("refusal", ["control", secControl, "handover"], captureStdout: true)
        #expect(try refusal.wait(seconds: 10) == 1, "\(refusal.stderrText)")
        #expect(refusal.stderr.contains { $0.hasPrefix("refused: handover refused: this side runs the guest unprotected") }, "\(refusal.stderrText)")
        talk.exchange(5...6, "c")
        talk.quit()
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
        talk.expectConsistent()
        // Every reply was released before the handover, and the secondary was told: it sends none again.
        let went = sec.stderr.first { $0.contains("went live at exit") } ?? ""
        #expect(went.contains("(0 output bytes"), "nothing released may be sent again: \(went)")
        let gone = try Child("gone", ["control", priControl, "status"], captureStdout: true)
        #expect(try gone.wait(seconds: 10) == 68, "\(gone.stderrText)")
    }

    /// Host B is lost for good and host C takes its place: `lockstep control SOCKET peer C` moves where the
    /// primary seeks secondaries without restarting it. The secondary protecting the guest stays until it is
    /// lost; then C's is seeded, and a kill -9 of the primary fails over to C with the conversation intact.
    @Test func theOperatorMovesThePeerToAThirdHost() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let priControl = ws.dir + "/primary.sock"
        let (pri, b, _) = try Self.startPair(ws, udp: udp, extraPrimary: ["--control", priControl])
        defer { pri.kill9(); b.kill9() }
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a")
        let cControl = ws.dir + "/c.sock"
        let c = try Child("secondary C", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)", "--control", cControl]
                          + PairFixture.common(ws))
        defer { c.kill9() }
        let portC = try c.listeningPort()
        // C has no --peer: once live it runs unprotected, and no address can change that.
        let none = try Child("peer of C", ["control", cControl, "peer", "127.0.0.1:1"], captureStdout: true)
        #expect(try none.wait(seconds: 10) == 1, "\(none.stderrText)")
        #expect(none.stderr.contains { $0.hasPrefix("refused: this secondary was started without --peer") }, "\(none.stderrText)")
        let bare = try Child("peer without address", ["control", priControl, "peer"], captureStdout: true)
        #expect(try bare.wait(seconds: 10) == 64, "\(bare.stderrText)")
        #expect(bare.stderrText.contains("peer: give the new address, HOST:PORT"), "\(bare.stderrText)")
        let bad = try Child("bad peer", ["control", priControl, "peer", "nowhere"], captureStdout: true)
        #expect(try bad.wait(seconds: 10) == 1, "\(bad.stderrText)")
        #expect(bad.stderr.contains { $0.hasPrefix("refused: ") && $0.contains("nowhere") }, "\(bad.stderrText)")
        let move = try Child("peer", ["control", priControl, "peer", "127.0.0.1:\(portC)"], captureStdout: true)
        #expect(try move.wait(seconds: 10) == 0, "\(move.stderrText)")
        #expect(move.stderr.contains { $0 == "ok: new secondaries are sought at 127.0.0.1:\(portC); the secondary that protects the guest now stays until it is lost" },
                "\(move.stderrText)")
        talk.exchange(4...5, "b")
        #expect(!pri.stderr.contains { $0.contains("secondary lost") }, "\(pri.stderrText)")
        b.kill9()
        try pri.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portC) seeded at exit", seconds: 30)
        talk.exchange(6...7, "c")
        pri.kill9()
        talk.exchange(8...10, "d", c.stderrText)
        talk.quit()
        #expect(try c.wait(seconds: 30) == 0, "\(c.stderrText)")
        talk.expectConsistent()
    }

    /// SIGTERM to a survivor with no secondary of its own (started without --peer): nobody can take the guest, so
    /// it stops it and the pair record says the guest ended; the process exits 0 (`lockstep: stopped`).
    @Test func sigtermToAnUnprotectedSurvivorStopsTheGuestForGood() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try Self.startPair(ws, udp: udp)
        defer { pri.kill9(); sec.kill9() }
        let talk = Conversation(port: udp)
        talk.exchange(1...2, "a")
        pri.kill9()
        talk.exchange(3...3, "b", "\(sec.stderrText)")
        sec.signal(SIGTERM)
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
        #expect(sec.stderr.contains { $0.hasPrefix("lockstep: SIGTERM: ") && $0.hasSuffix("; stopping the guest here (the pair record will say it ended)") },
                "\(sec.stderrText)")
        #expect(sec.stderr.contains("lockstep: stopped"), "\(sec.stderrText)")
        #expect(try Fence(directory: ws.fence).readPairRecord() == "ended 0")
        talk.expectConsistent()
    }

    /// The operator's `peer` outlives a role swap: a primary moved to C that hands its guest over becomes the new
    /// primary's secondary, and when that one is lost it goes live and seeds C, not its command line's --peer.
    @Test func theOperatorsPeerOutlivesAHandover() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let control = ws.dir + "/a.sock"
        let (a, b, portA, _) = try Self.startBothWays(ws, udp: udp, controlA: control)
        defer { a.kill9(); b.kill9() }
        let c = try Child("C", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws))
        defer { c.kill9() }
        let portC = try c.listeningPort()
        let talk = Conversation(port: udp)
        talk.exchange(1...2, "a")
        let move = try Child("peer", ["control", control, "peer", "127.0.0.1:\(portC)"], captureStdout: true)
        #expect(try move.wait(seconds: 10) == 0, "\(move.stderrText)")
        let handover = try Child("handover", ["control", control, "handover"], captureStdout: true)
        #expect(try handover.wait(seconds: 30) == 0, "\(handover.stderrText)")
        try a.waitForLine(containing: "now the secondary of the new primary", seconds: 10)
        try b.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portA)", seconds: 30)
        talk.exchange(3...4, "b")
        b.kill9()
        talk.exchange(5...6, "c", "\(a.stderrText)")
        try a.waitForLine(containing: "looking for a new secondary at 127.0.0.1:\(portC)")
        try a.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portC)", seconds: 30)
        talk.quit()
        #expect(try a.wait(seconds: 30) == 0, "\(a.stderrText)")
        #expect(try c.wait(seconds: 30) == 0, "\(c.stderrText)")
        talk.expectConsistent()
    }

    /// A pair configured both ways (the primary with `--listen`, the secondary with `--peer` to it) swaps roles
    /// at each handover: the old primary stays as the new primary's secondary and is re-seeded, so the guest
    /// can be handed back, here asked for on the secondary's side. The conversation runs through both
    /// handovers; both sides end with one digest.
    @Test func handoversBackAndForthSwapTheRoles() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        try Self.handoversBackAndForth(ws)
    }

    /// A pair configured both ways, protected: B (`secondary --listen B --peer A`), then A (`primary echo --peer B
    /// --listen A --control controlA`), both serving `udp`; `whileBListens` runs between the two.
    static func startBothWays(_ ws: (dir: String, key: String, fence: String), udp: UInt16, controlA: String, controlB: String? = nil,
                              whileBListens: () throws -> Void = {}) throws -> (a: Child, b: Child, portA: UInt16, portB: UInt16) {
        let (portA, portB) = (try PairFixture.freeTCPPort(), try PairFixture.freeTCPPort())
        let common = PairFixture.common(ws) + ["--serial", "udp:127.0.0.1:\(udp)"]
        let b = try Child("B", ["secondary", "--listen", "127.0.0.1:\(portB)", "--peer", "127.0.0.1:\(portA)"]
                              + (controlB.map { ["--control", $0] } ?? []) + common)
        _ = try b.listeningPort()
        try whileBListens()
        let a = try Child("A", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(portB)", "--listen", "127.0.0.1:\(portA)",
                                "--memory", "32", "--control", controlA] + common)
        try a.waitForLine(containing: "protected: secondary")
        return (a, b, portA, portB)
    }

    /// The handovers of `handoversBackAndForthSwapTheRoles`, with the fence `ws` names.
    static func handoversBackAndForth(_ ws: (dir: String, key: String, fence: String)) throws {
        let udp = try PairFixture.freeUDPPort()
        let (controlA, controlB) = (ws.dir + "/a.sock", ws.dir + "/b.sock")
        let (a, b, portA, portB) = try startBothWays(ws, udp: udp, controlA: controlA, controlB: controlB) {
            // A secondary with no primary yet has nothing to ask for.
            let early = try Child("handover-0", ["control", controlB, "handover"], captureStdout: true)
            #expect(try early.wait(seconds: 10) == 1, "\(early.stderrText)")
            #expect(early.stderr.contains { $0.hasPrefix("refused: handover refused: this side follows no primary now") }, "\(early.stderrText)")
        }
        let talk = Conversation(port: udp)
        var seq = 0
        func requests(_ n: Int, _ tag: String) {
            for _ in 0..<n { seq += 1; #expect(talk.request(seq, tag) != nil, "A:\n\(a.stderrText)\nB:\n\(b.stderrText)") }
        }
        requests(3, "a")
        // A → B: B goes live, and re-protects itself by seeding A, now its secondary.
        let first = try Child("handover-1", ["control", controlA, "handover"], captureStdout: true)
        #expect(try first.wait(seconds: 30) == 0, "\(first.stderrText)")
        try a.waitForLine(containing: "now the secondary of the new primary", seconds: 10)
        // Each side keeps the guest's RAM as it was at the handover: the seeds carry what the guest wrote since.
        let seededA = try b.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portA)", seconds: 30)
        #expect(seededA.contains("a delta seed"), "\(seededA)")
        requests(3, "b")
        // B → A, asked on A (the secondary now): A goes live and seeds B, which listens again.
        let second = try Child("handover-2", ["control", controlA, "handover"], captureStdout: true)
        #expect(try second.wait(seconds: 30) == 0, "\(second.stderrText)")
        #expect(second.stderr.contains { $0.hasPrefix("handed-over: this side took the fence and goes live: the primary handed the guest over at exit") },
                "\(second.stderrText)")
        try b.waitForLine(containing: "the secondary asked for a handover", seconds: 10)
        try b.waitForLine(containing: "listening again on 127.0.0.1:\(portB)", seconds: 10)
        let seededB = try a.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portB)", occurrence: 2, seconds: 30)
        #expect(seededB.contains("a delta seed"), "\(seededB)")
        print("re-seeds after the handovers:\n\(seededA)\n\(seededB)")
        requests(3, "c")
        talk.quit()
        #expect(try a.wait(seconds: 30) == 0, "\(a.stderrText)")
        #expect(try b.wait(seconds: 30) == 0, "\(b.stderrText)")
        #expect(a.digest != nil && a.digest == b.digest, "A \(a.digest ?? "-"), B \(b.digest ?? "-")")
        talk.expectConsistent()
        #expect(a.stderr.filter { $0.hasPrefix("live: ") }.count == 1 && b.stderr.filter { $0.hasPrefix("live: ") }.count == 1)
    }

    /// A secondary that ignores the handover (fault injection): the primary, seeing nobody take the fence,
    /// takes it back and serves on unprotected; the secondary then finds the fence held, never goes live,
    /// and waits: the primary seeds it again (a delta seed) and the pair runs protected to the guest's end.
    /// `recordBlocked`: the pair record cannot be written when the primary takes the fence back, so the guest
    /// waits, its output held, until the record stops naming the secondary.
    @Test(arguments: [false, true]) func aHandoverNobodyTakesLeavesThePrimaryServing(recordBlocked: Bool) throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let common = PairFixture.common(ws)
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)"] + common,
                            environment: ["LOCKSTEP_FAULT_IGNORE_HANDOVER": "1"])
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(try sec.listeningPort())",
                                        "--memory", "32", "--serial", "udp:127.0.0.1:\(udp)"] + common)
        try pri.waitForLine(containing: "protected: secondary")
        let talk = Conversation(port: udp)
        talk.exchange(1...1, "a")
        let record = ws.fence + "/lockstep.pair"
        if recordBlocked {
            try FileManager.default.removeItem(atPath: record)
            try FileManager.default.createDirectory(atPath: record + "/in-the-way", withIntermediateDirectories: true)
        }
        pri.signal(SIGUSR2)
        if recordBlocked {
            try pri.waitForLine(containing: "the record names the lost secondary, so held output stays held", seconds: 20)
            #expect(talk.request(2, "b", seconds: 0.5) == nil)
            try FileManager.default.removeItem(atPath: record)
            try pri.waitForLine(containing: "the pair record says unprotected again", seconds: 20)
        }
        try pri.waitForLine(containing: "handover failed", seconds: 20)
        try sec.waitForLine(containing: "waiting for the primary to seed this side again", seconds: 20)
        talk.exchange(2...3, "b")
        let again = try pri.waitForLine(containing: "protected: secondary", occurrence: 2, seconds: 20)
        #expect(again.contains("a delta seed"), "\(again)")
        try talk.quitInLockstep(pri, sec)
    }

    /// The secondary refuses a handover whose log it does not hold to the end (fault injection: the primary
    /// names an exit past its real one): it asks for a new seed rather than take over. The primary, told so,
    /// answers `failed:`, keeps (or takes back) the fence, re-seeds that same secondary and serves on. Without
    /// a fence the refusal is the only thing that tells the secondary's close from a takeover. Without one the
    /// handover is asked for on the secondary's side, which answers from its own refusal.
    @Test(arguments: [true, false]) func aHandoverBeyondTheHeldLogIsRefusedAndTheSecondaryReseeded(fenced: Bool) throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (priControl, secControl) = (ws.dir + "/primary.sock", ws.dir + "/secondary.sock")
        var common = PairFixture.common(ws)
        if !fenced, let i = common.firstIndex(of: "--fence") { common.removeSubrange(i...i + 1) }
        let sec = try Child("secondary", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)", "--control", secControl] + common)
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(try sec.listeningPort())",
                                        "--memory", "32", "--serial", "udp:127.0.0.1:\(udp)", "--control", priControl] + common,
                            environment: ["LOCKSTEP_FAULT_HANDOVER_EXIT_AHEAD": "1000000"])
        try pri.waitForLine(containing: "protected: secondary")
        let talk = Conversation(port: udp)
        talk.exchange(1...1, "a")
        let handover = try Child("handover", ["control", fenced ? priControl : secControl, "handover"], captureStdout: true)
        #expect(try handover.wait(seconds: 30) == 1, "\(handover.stderrText)")
        let failed = fenced ? "failed: handover failed: the secondary diverged" : "failed: handover failed: this side cannot follow the primary's log"
        #expect(handover.stderr.contains { $0.hasPrefix(failed) }, "\(handover.stderrText)")
        let refused = try sec.waitForLine(containing: "cannot follow the primary", seconds: 10)
        #expect(refused.contains("but this side holds the log only to exit"), "\(refused)")
        try pri.waitForLine(containing: "protected: secondary", occurrence: 2, seconds: 30)
        talk.exchange(2...3, "b")
        try talk.quitInLockstep(pri, sec)
    }

    /// `echo-tickless` sleeps in HLT with no timer: nothing wakes it but a request. A new secondary is still
    /// seeded at once (the seed wakes the vCPU thread and is taken mid-halt), continues the halt, and replays
    /// the requests that end it to the primary's final state.
    @Test func aHaltedGuestIsSeededWithoutWaitingForInput() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, port) = try Self.startPair(ws, udp: udp, guest: "echo-tickless")
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a")
        sec.kill9()
        try pri.waitForLine(containing: "continuing unprotected", seconds: 10)
        let sec2 = try Child("secondary-2", ["secondary", "--listen", "127.0.0.1:\(port)", "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws))
        // No request until the primary says it is protected: the guest stays halted throughout.
        let seeded = try pri.waitForLine(containing: "seeded at exit", occurrence: 2, seconds: 20)
        #expect(seeded.contains(" ms while halted"), "\(seeded)")
        talk.exchange(4...6, "b")
        try talk.quitInLockstep(pri, sec2)
        _ = try? sec.wait(seconds: 10)
    }

    /// A prompt (output without a newline) the gate holds leaves once the guest halts: the halt's flush
    /// moves the watermark for held output. `echo-tickless` has no timer, so nothing else would.
    @Test func aHeldPromptLeavesWhenTheGuestHalts() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try Self.startPair(ws, udp: udp, guest: "echo-tickless")
        let client = EchoClient(port: udp)
        #expect(client.request("PING", expect: "PONG") != nil)
        client.send("PROMPT")
        let deadline = Date().addingTimeInterval(10)
        while client.lines.partialLine != "> ", Date() < deadline { _ = client.receive(ms: 20) }
        #expect(client.lines.partialLine == "> ", "got '\(client.lines.partialLine)' of the prompt")
        // The guest's next line completes the prompt's: "> echo: ...", then its result.
        #expect(client.request("QUIT", expect: "RESULT echo") != nil)
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)")
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
        #expect(pri.digest != nil && pri.digest == sec.digest, "primary \(pri.digest ?? "-"), secondary \(sec.digest ?? "-")")
    }

    /// A survivor given `--peer` protects itself: it seeds a new secondary from its running state, and
    /// that one survives the survivor's own kill -9. Two failovers, one conversation.
    @Test func survivorProtectsItselfAndFailsOverAgain() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let common = PairFixture.common(ws)
        // The last survivor would protect itself too, but nobody listens at its --peer: it ends unprotected.
        let stats = ws.dir + "/third-stats.json"
        let third = try Child("secondary-2", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)",
                                              "--peer", "127.0.0.1:\(try PairFixture.freeUDPPort())", "--stats-json", stats] + common)
        let p2 = try third.listeningPort()
        let second = try Child("secondary-1", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)",
                                               "--peer", "127.0.0.1:\(p2)"] + common)
        let p1 = try second.listeningPort()
        let first = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(p1)", "--memory", "32",
                                          "--serial", "udp:127.0.0.1:\(udp)"] + common)
        try first.waitForLine(containing: "protected: secondary")
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a")
        first.kill9()
        talk.exchange(4...4, "b", "\(second.stderrText)")
        let seeded = try second.waitForLine(containing: "protected: secondary at", seconds: 30)
        #expect(!seeded.contains("at exit 0:"), "\(seeded)")
        talk.exchange(5...6, "c")
        second.kill9()
        talk.exchange(7...7, "d", "\(third.stderrText)")
        talk.quit()
        #expect(try third.wait(seconds: 30) == 0, "\(third.stderrText)")
        #expect(third.stderr.contains { $0.hasPrefix("live: ") })
        talk.expectConsistent()
        let figures = try PairFixture.jsonObject(stats)
        #expect(figures?["role"] as? String == "survivor" && figures?["wentLive"] as? Bool == true)
        #expect((figures?["logBytesReceived"] as? Int ?? 0) > 0, "\(figures ?? [:])")
        #expect((figures?["asPrimary"] as? [String: Any])?["exits"] as? Int == figures?["exits"] as? Int)
        #expect((figures?["asPrimary"] as? [String: Any])?["startedProtected"] as? Bool == false, "a survivor's guest started before it was protected")
        try first.wait(seconds: 10)
        try second.wait(seconds: 10)
    }

    /// A pair whose FT link runs through a proxy, three requests answered, then the link cut with both sides
    /// alive: the secondary found the fence held, did not go live, and waits for a seed; the primary runs on
    /// unprotected.
    static func partitionedPair() throws -> (Child, Child, Conversation, TCPProxy) {
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let proxy = try TCPProxy()
        let (pri, sec, _) = try startPair(ws, udp: udp) { port in try proxy.start(forwardingTo: port) }
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a")
        proxy.cut()
        try sec.waitForLine(containing: "waiting for the primary to seed this side again", seconds: 30)
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") }, "the secondary went live while the primary held the fence")
        try pri.waitForLine(containing: "continuing unprotected", seconds: 10)
        return (pri, sec, talk, proxy)
    }

    /// A partition with both sides alive never gives two live primaries; once it heals, the primary finds the
    /// secondary again and protects the guest by a delta seed, with no operator.
    @Test func partitionNeverGivesTwoPrimariesAndHeals() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let (pri, sec, talk, proxy) = try Self.partitionedPair()
        talk.exchange(4...6, "b")
        try proxy.heal()
        let again = try pri.waitForLine(containing: "protected: secondary", occurrence: 2, seconds: 30)
        #expect(again.contains("a delta seed"), "\(again)")
        talk.exchange(7...9, "c")
        try talk.quitInLockstep(pri, sec)
    }

    /// A secondary dropped by a partition waits to be seeded again; when the guest ends on the primary
    /// meanwhile, nobody will seed it, and the pair record says so: it ends with the guest's status at once
    /// instead of waiting out its accept timeout (none given here: it would wait forever).
    @Test func aSecondaryWaitingToRejoinEndsWithTheGuest() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let (pri, sec, talk, _) = try Self.partitionedPair()
        talk.exchange(4...5, "b")
        talk.quit()
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)")
        // Bounded by the record's poll (0.5 s), not by an accept timeout.
        #expect(try sec.wait(seconds: 10) == 0, "\(sec.stderrText)")
        #expect(sec.stderr.contains { $0.contains("says 'ended 0': the guest ended (status 0) while this side waited to be seeded again") },
                "\(sec.stderrText)")
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") }, "\(sec.stderrText)")
        talk.expectConsistent()
    }
}

}

/// A TCP forwarder the test controls: `cut()` drops both sides and stops accepting (a partition); `heal()`
/// accepts again on the same port.
final class TCPProxy: @unchecked Sendable {
    private(set) var listenFD: Int32
    let port: UInt16
    private let lock = NSLock()
    private var fds: [Int32] = []
    private var cutDone = false
    private var target: UInt16 = 0

    init() throws {
        (listenFD, port) = try Self.listen(port: 0)
    }

    private static func listen(port: UInt16) throws -> (Int32, UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        guard withUnsafePointer(to: &a, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }) == 0,
              Glibc.listen(fd, 4) == 0 else { close(fd); throw PairTestError("proxy: cannot listen on port \(port)") }
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return (fd, UInt16(bigEndian: a.sin_port))
    }

    /// The partition ends: connections to the same port get through again.
    func heal() throws {
        let (fd, _) = try Self.listen(port: port)
        lock.withLock { listenFD = fd; cutDone = false; fds = [] }
        _ = try start(forwardingTo: target)
    }

    /// Accepts connections and forwards each to 127.0.0.1:`target`. Returns the proxy's port.
    func start(forwardingTo target: UInt16) throws -> UInt16 {
        self.target = target
        let listenFD = listenFD
        Thread { [self] in
            while true {
                let c = accept(listenFD, nil, nil)
                if c < 0 { return }
                let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                var a = sockaddr_in()
                a.sin_family = sa_family_t(AF_INET)
                a.sin_port = target.bigEndian
                a.sin_addr.s_addr = inet_addr("127.0.0.1")
                guard withUnsafePointer(to: &a, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }) == 0 else {
                    close(c); close(s); continue
                }
                lock.lock()
                if cutDone { lock.unlock(); close(c); close(s); return }
                fds += [c, s]
                lock.unlock()
                pump(c, s); pump(s, c)
            }
        }.start()
        return port
    }

    private func pump(_ from: Int32, _ to: Int32) {
        Thread {
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = read(from, &buf, buf.count)
                if n <= 0 { return }
                var off = 0
                while off < n {
                    let w = buf.withUnsafeBytes { send(to, $0.baseAddress! + off, n - off, Int32(MSG_NOSIGNAL)) }
                    if w <= 0 { return }
                    off += w
                }
            }
        }.start()
    }

    /// The partition: both directions stop at once and no new connection gets through.
    func cut() {
        lock.lock(); defer { lock.unlock() }
        cutDone = true
        shutdown(listenFD, Int32(SHUT_RDWR))
        close(listenFD)  // frees the port for `heal`; the accept thread sees the shutdown first
        for fd in fds { shutdown(fd, Int32(SHUT_RDWR)) }
    }
}
