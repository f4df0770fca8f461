import Foundation
import Glibc
import Testing

/// `lockstep control SOCKET migrate HOST:PORT`: the guest moves to a secondary on a third host.
extension PairTests { @Suite struct MigrateTests {
    static func migrate(_ control: String, to port: UInt16, withinMs: Int = 30_000) throws -> Child {
        try Child("migrate", ["control", control, "migrate", "127.0.0.1:\(port)", "--within-ms", "\(withinMs)"], captureStdout: true)
    }

    /// A primary protected by B moves its guest to C: C is seeded while the guest runs, B protecting it; the
    /// guest stops until C holds its state, then B is let go (it waits for a new seed, never live) and the
    /// guest is handed to C, which (given --peer B) seeds B again: the pair is C and B. Never unprotected. The
    /// conversation runs through it and through a kill -9 of C: no reply lost or contradicted; A ends with 0.
    @Test func aMigrationMovesTheGuestToAThirdHost() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let h = try Hosts(targetPeersB: true)
        defer { h.end() }
        let (a, b, c, portB, portC) = (h.a, h.b, h.c, h.portB, h.portC)
        let talk = Conversation(port: h.udp)
        talk.exchange(1...3, "a")
        let move = try Self.migrate(h.control, to: portC)
        #expect(try move.wait(seconds: 60) == 0, "\(move.stderrText)\nA:\n\(a.stderrText)")
        #expect(move.stderr.contains { $0.hasPrefix("migrated: migrated to 127.0.0.1:\(portC): handed over to the secondary at exit ")
                                       && $0.contains("; the guest was stopped ") }, "\(move.stderrText)")
        #expect(try a.wait(seconds: 30) == 0, "\(a.stderrText)")
        #expect(a.stderr.contains("lockstep: migration: the secondary at 127.0.0.1:\(portC) answered; seeding it while the secondary at 127.0.0.1:\(portB) protects the guest"), "\(a.stderrText)")
        #expect(a.stderr.contains { $0.hasPrefix("lockstep: migration: the secondary at 127.0.0.1:\(portC) holds the guest's state at exit ")
                                    && $0.contains("; the secondary at 127.0.0.1:\(portB) is let go") }, "\(a.stderrText)")
        #expect(!a.stderr.contains { $0.contains("unprotected") }, "\(a.stderrText)")
        try b.waitForLine(containing: "secondary: the primary moved the guest to 127.0.0.1:\(portC) and let this side go; waiting for a primary to seed it again")
        try c.waitForLine(containing: "live: the primary handed the guest over at exit ")
        try c.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portB) seeded at exit ")
        #expect(!b.stderr.contains { $0.hasPrefix("live: ") }, "\(b.stderrText)")
        talk.exchange(4...6, "c", "\(c.stderrText)")
        c.kill9()
        try b.waitForLine(containing: "live: ")
        talk.exchange(7...9, "d", "\(b.stderrText)")
        talk.quit()
        #expect(try b.wait(seconds: 30) == 0, "\(b.stderrText)")
        talk.expectConsistent()
    }

    /// Three hosts on loopback: A, the primary (with a control socket), protected by B, and C, a target
    /// listening, with the pair's key and service address. `primaryEnvironment`: A's fault injection.
    /// `targetFencedElsewhere`: C's --fence is another directory. `targetPeersB`: C is started with --peer B.
    struct Hosts {
        let ws: (dir: String, key: String, fence: String)
        let udp: UInt16, control: String
        let a: Child, b: Child, portB: UInt16, c: Child, portC: UInt16

        init(primaryEnvironment: [String: String] = [:], targetFencedElsewhere: Bool = false, targetPeersB: Bool = false) throws {
            ws = try PairFixture.workspace()
            do {
                (udp, control) = (try PairFixture.freeUDPPort(), ws.dir + "/a.sock")
                (a, b, portB) = try FailoverTests.startPair(ws, udp: udp, extraPrimary: ["--control", control], primaryEnvironment: primaryEnvironment)
                var extra = targetPeersB ? ["--peer", "127.0.0.1:\(portB)"] : []
                if targetFencedElsewhere {
                    let other = ws.dir + "/other-fence"
                    try FileManager.default.createDirectory(atPath: other, withIntermediateDirectories: true)
                    extra += ["--fence", other]
                }
                c = try Child("C", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws) + extra)
                portC = try c.listeningPort()
            } catch {
                try? FileManager.default.removeItem(atPath: ws.dir)
                throw error
            }
        }

        func end() {
            a.kill9(); b.kill9(); c.kill9()
            try? FileManager.default.removeItem(atPath: ws.dir)
        }
    }

    /// kill -9 of the primary while the target is being seeded (its rounds held back by fault injection): the
    /// secondary that protects the guest takes over, as it would without a migration, and C never goes live.
    @Test func aKill9WhileTheTargetIsSeededFailsOverToTheSecondary() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let h = try Hosts(primaryEnvironment: ["LOCKSTEP_FAULT_SEED_STALL_MS": "60000"])
        defer { h.end() }
        let (a, b, c, portC, control) = (h.a, h.b, h.c, h.portC, h.control)
        let talk = Conversation(port: h.udp)
        talk.exchange(1...3, "a")
        let move = try Self.migrate(control, to: portC)
        defer { move.kill9() }
        try a.waitForLine(containing: "migration: the secondary at 127.0.0.1:\(portC) answered; seeding it")
        talk.exchange(4...5, "b")  // protected still: each reply left on B's ack
        // The control socket answers while the migration waits: the status, and a refused peer change.
        let status = try Child("status", ["control", control, "status"], captureStdout: true)
        #expect(try status.wait(seconds: 10) == 0, "\(status.stderrText)")
        #expect(status.stderr.contains { $0.contains("\"state\":\"primaryProtected\"") && $0.contains("\"protected\":true") && $0.contains("\"seeding\":true") },
                "\(status.stderrText)")
        let peer = try Child("peer", ["control", control, "peer", "127.0.0.1:1"], captureStdout: true)
        #expect(try peer.wait(seconds: 10) == 1, "\(peer.stderrText)")
        #expect(peer.stderr.contains("refused: a migration to 127.0.0.1:\(portC) is under way: it decides the peer address"), "\(peer.stderrText)")
        a.kill9()
        try b.waitForLine(containing: "live: ")
        talk.exchange(6...8, "c", "\(b.stderrText)")
        talk.quit()
        #expect(try b.wait(seconds: 30) == 0, "\(b.stderrText)")
        talk.expectConsistent()
        #expect(!c.stderr.contains { $0.hasPrefix("live: ") }, "\(c.stderrText)")
    }

    /// A target that answers but refuses its seed (its --fence reaches another store): the guest runs on,
    /// protected by B all along; the migration fails at its bound, naming why; a kill -9 of A then fails over to B.
    @Test func aTargetThatRefusesItsSeedLeavesTheSecondaryProtecting() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let h = try Hosts(targetFencedElsewhere: true)
        defer { h.end() }
        let (a, b, c, portB, portC) = (h.a, h.b, h.c, h.portB, h.portC)
        let talk = Conversation(port: h.udp)
        talk.exchange(1...2, "a")
        let move = try Self.migrate(h.control, to: portC, withinMs: 3000)
        #expect(try move.wait(seconds: 60) == 1, "\(move.stderrText)")
        Self.expectNotSeeded(move, a, portB: portB, portC: portC)
        #expect(try c.wait(seconds: 30) == 64, "\(c.stderrText)")
        #expect(!a.stderr.contains { $0.contains("unprotected") }, "\(a.stderrText)")
        try Self.protectedByB(a, b, talk, from: 3)
    }

    /// A target whose final seed loads to another state (a page changed after it was hashed,
    /// `LOCKSTEP_FAULT_SEED_PAGE`; the seed at exit 0 carries no pages, so B's is whole) refuses it during the
    /// switch, with the guest stopped: the switch is abandoned, the pair record names B again, the guest runs
    /// on protected by B, and a kill -9 of A fails over to B.
    @Test func aTargetThatFailsItsFinalSeedLeavesTheSecondaryProtecting() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let h = try Hosts(primaryEnvironment: ["LOCKSTEP_FAULT_SEED_PAGE": "1"])
        defer { h.end() }
        let (a, b, c, portB, portC) = (h.a, h.b, h.c, h.portB, h.portC)
        let talk = Conversation(port: h.udp)
        talk.exchange(1...2, "a")
        let record = h.ws.fence + "/lockstep.pair"
        let named = try String(contentsOfFile: record, encoding: .utf8)
        #expect(named.hasPrefix("protected "), "\(named)")
        let move = try Self.migrate(h.control, to: portC, withinMs: 3000)
        #expect(try c.wait(seconds: 30) == 76, "\(c.stderrText)")
        #expect(try move.wait(seconds: 60) == 1, "\(move.stderrText)")
        Self.expectNotSeeded(move, a, portB: portB, portC: portC)
        #expect(a.stderr.contains { $0.hasPrefix("lockstep: migration abandoned (the secondary at 127.0.0.1:\(portC): ") }, "\(a.stderrText)")
        #expect(!a.stderr.contains { $0.contains("unprotected") }, "\(a.stderrText)")
        #expect(try String(contentsOfFile: record, encoding: .utf8) == named)
        try Self.protectedByB(a, b, talk, from: 3)
    }

    /// The migration failed at its 3000 ms bound: C answered, but its seed never completed.
    static func expectNotSeeded(_ move: Child, _ a: Child, portB: UInt16, portC: UInt16) {
        #expect(move.stderr.contains { $0.hasPrefix("failed: migration failed: the secondary at 127.0.0.1:\(portC) answered but was not seeded within 3000 ms (")
                                       && $0.hasSuffix("; the guest runs on here, still protected by the secondary at 127.0.0.1:\(portB)") },
                "\(move.stderrText)\nA:\n\(a.stderrText)")
    }

    /// B still protects the guest: two requests, a kill -9 of A, and B answers two more, all consistent.
    static func protectedByB(_ a: Child, _ b: Child, _ talk: Conversation, from n: Int) throws {
        talk.exchange(n...(n + 1), "b")
        a.kill9()
        try b.waitForLine(containing: "live: ")
        talk.exchange((n + 2)...(n + 3), "c", "\(b.stderrText)")
        talk.expectConsistent()
    }

    /// A malformed target is refused, and nobody listening at the target changes nothing: B still protects the
    /// guest (a kill -9 of A fails over to it), and the peer address is B's again.
    @Test func aMigrationToNobodyLeavesThePairAsItWas() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort(), control = ws.dir + "/a.sock"
        let (a, b, portB) = try FailoverTests.startPair(ws, udp: udp, extraPrimary: ["--control", control])
        defer { a.kill9(); b.kill9() }
        let talk = Conversation(port: udp)
        talk.exchange(1...2, "a")
        let bad = try Child("migrate", ["control", control, "migrate", "127.0.0.1"], captureStdout: true)
        #expect(try bad.wait(seconds: 30) == 1, "\(bad.stderrText)")
        #expect(bad.stderr.contains("refused: migration refused: migrate 127.0.0.1: expected HOST:PORT"), "\(bad.stderrText)")
        let nobody = try PairFixture.freeTCPPort()
        let move = try Self.migrate(control, to: nobody, withinMs: 500)
        #expect(try move.wait(seconds: 30) == 1, "\(move.stderrText)")
        #expect(move.stderr.contains("failed: migration failed: no secondary answered at 127.0.0.1:\(nobody) within 500 ms; the guest runs on here, still protected by the secondary at 127.0.0.1:\(portB)"),
                "\(move.stderrText)\nA:\n\(a.stderrText)")
        try Self.protectedByB(a, b, talk, from: 3)
    }

    /// Asked of a side that does not run the guest, or without an address: refused, nothing changes.
    @Test func aMigrationAskedOfASecondaryIsRefused() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort(), control = ws.dir + "/b.sock"
        let (a, b, _) = try FailoverTests.startPair(ws, udp: udp, extraSecondary: ["--control", control])
        defer { a.kill9(); b.kill9() }
        let move = try Self.migrate(control, to: 9)
        #expect(try move.wait(seconds: 30) == 1, "\(move.stderrText)")
        #expect(move.stderr.contains { $0.hasPrefix("refused: migration refused: this side does not run the guest with a secondary of its own") }, "\(move.stderrText)")
        let bare = try Child("migrate", ["control", control, "migrate"], captureStdout: true)
        #expect(try bare.wait(seconds: 30) == 64, "\(bare.stderrText)")
        #expect(bare.stderr.contains("lockstep: error: migrate: give the new address, HOST:PORT"), "\(bare.stderrText)")
        let talk = Conversation(port: udp)
        try talk.quitInLockstep(a, b)
    }
} }
