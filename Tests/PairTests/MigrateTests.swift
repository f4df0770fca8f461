import Foundation
import Glibc
import Testing

/// `lockstep control SOCKET migrate HOST:PORT`: the guest moves to a secondary on a third host.
extension PairTests { @Suite struct MigrateTests {
    static func migrate(_ control: String, to port: UInt16, withinMs: Int = 30_000) throws -> Child {
        try Child("migrate", ["control", control, "migrate", "127.0.0.1:\(port)", "--within-ms", "\(withinMs)"], captureStdout: true)
    }

    /// A primary protected by B moves its guest to C: C answers first, then B is let go (it stops without going
    /// live), C is seeded while the guest runs, and the guest is handed to C. The conversation runs through it:
    /// no reply lost or contradicted; A ends with 0.
    @Test func aMigrationMovesTheGuestToAThirdHost() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort(), control = ws.dir + "/a.sock"
        let (a, b, _) = try FailoverTests.startPair(ws, udp: udp, extraPrimary: ["--control", control])
        defer { a.kill9(); b.kill9() }
        let c = try Child("C", ["secondary", "--listen", "127.0.0.1:0", "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws))
        defer { c.kill9() }
        let portC = try c.listeningPort()
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a")
        let move = try Self.migrate(control, to: portC)
        #expect(try move.wait(seconds: 60) == 0, "\(move.stderrText)\nA:\n\(a.stderrText)")
        #expect(move.stderr.contains { $0.hasPrefix("migrated: migrated to 127.0.0.1:\(portC): handed over to the secondary at exit ") }, "\(move.stderrText)")
        #expect(try a.wait(seconds: 30) == 0, "\(a.stderrText)")
        #expect(a.stderr.contains { $0.hasPrefix("lockstep: secondary released (the guest migrates to 127.0.0.1:\(portC))") }, "\(a.stderrText)")
        #expect(try b.wait(seconds: 30) == 0, "\(b.stderrText)")
        #expect(b.stderr.contains("lockstep: the primary stopped: the operator migrates the guest to 127.0.0.1:\(portC); not going live"), "\(b.stderrText)")
        #expect(!b.stderr.contains { $0.hasPrefix("live: ") }, "\(b.stderrText)")
        try c.waitForLine(containing: "live: the primary handed the guest over at exit ")
        talk.exchange(4...6, "c", "\(c.stderrText)")
        talk.quit()
        #expect(try c.wait(seconds: 30) == 0, "\(c.stderrText)")
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
        talk.exchange(3...4, "b")
        a.kill9()
        try b.waitForLine(containing: "live: ")
        talk.exchange(5...6, "c", "\(b.stderrText)")
        talk.expectConsistent()
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
