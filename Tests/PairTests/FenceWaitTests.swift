import Foundation
import Glibc
import Testing

/// The fence and the pair record when a lock outlives its holder (an NFS lease after a host loss), simulated on
/// one host: SIGSTOP keeps a silent primary's lock, and the fence file or the record is changed under a live pair.
extension PairTests { @Suite struct FenceWaitTests {
    typealias F = FailoverTests

    /// A pair with a 100 ms fence wait answers three requests; then its primary is stopped (SIGSTOP) until the
    /// secondary, named by the pair record, says it waits for the primary's lock.
    static func stopPrimaryPastTheFenceWait(_ ws: (dir: String, key: String, fence: String)) throws -> (Child, Child, Conversation) {
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try F.startPair(ws, udp: udp, extraSecondary: ["--fence-wait-ms", "100"])
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a")
        pri.signal(SIGSTOP)
        try sec.waitForLine(containing: "but the pair record still names this secondary: waiting for the lock", seconds: 20)
        return (pri, sec, talk)
    }

    /// A silent primary whose lock stays held past the fence wait, while the pair record names the secondary:
    /// the secondary keeps trying and goes live once the lock goes (here: the stopped primary is killed).
    @Test func aLockHeldPastTheFenceWaitIsTakenOnceReleased() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let (pri, sec, talk) = try Self.stopPrimaryPastTheFenceWait(ws)
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") }, "\(sec.stderrText)")
        pri.kill9()
        let live = try sec.waitForLine(containing: "live: ", seconds: 20)
        #expect(live.contains("fence generation 2"), "\(live)")
        talk.exchange(4...6, "b")
        talk.quit()
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
        talk.expectConsistent()
        _ = try? pri.wait(seconds: 10)
    }

    /// The same silence, but the primary was only paused: it finds the link gone, writes the record
    /// `unprotected` before any output leaves, and the waiting secondary stops waiting, is re-seeded, never live.
    @Test func aPausedPrimaryEndsTheWaitAndReseeds() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let (pri, sec, talk) = try Self.stopPrimaryPastTheFenceWait(ws)
        pri.signal(SIGCONT)
        try sec.waitForLine(containing: "the primary's pair record now says 'unprotected'", seconds: 20)
        try sec.waitForLine(containing: "waiting for the primary to seed this side again", seconds: 10)
        talk.exchange(4...6, "b")
        try pri.waitForLine(containing: "protected: secondary", occurrence: 2, seconds: 30)
        talk.exchange(7...9, "c")
        try talk.quitInLockstep(pri, sec)
    }

    /// A fence directory that fails during the wait is not a held lock: the secondary stops with 75, naming it.
    @Test func aFenceDirectoryGoneWhileWaitingStopsTheSecondary() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let (pri, sec, _) = try Self.stopPrimaryPastTheFenceWait(ws)
        try FileManager.default.removeItem(atPath: ws.fence)
        #expect(try sec.wait(seconds: 20) == 75, "\(sec.stderrText)")
        #expect(sec.stderr.contains { $0.contains("unusable fence (fence directory \(ws.fence) does not exist)") }, "\(sec.stderrText)")
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") }, "\(sec.stderrText)")
        pri.kill9()
        _ = try? pri.wait(seconds: 10)
    }

    /// A primary that loses its secondary while the record names it and cannot write the record (its fence
    /// directory unreachable) releases nothing the secondary lacks: its guest waits until the record is written.
    @Test func aRecordThatCannotBeUnnamedHoldsOutput() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try F.startPair(ws, udp: udp)
        let talk = Conversation(port: udp)
        talk.exchange(1...1, "a")
        let record = ws.fence + "/lockstep.pair"
        try FileManager.default.removeItem(atPath: record)
        try FileManager.default.createDirectory(atPath: record + "/in-the-way", withIntermediateDirectories: true)
        sec.kill9()
        try pri.waitForLine(containing: "the record names the lost secondary, so held output stays held", seconds: 20)
        // Bounded negative check: no reply while the record cannot be written.
        #expect(talk.request(2, "b", seconds: 0.5) == nil)
        try FileManager.default.removeItem(atPath: record)
        try pri.waitForLine(containing: "the pair record says unprotected again", seconds: 20)
        talk.exchange(2...2, "b")
        #expect(PairRecordFile.read(ws.fence) == "unprotected")
        talk.quit()
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)")
        talk.expectConsistent()
    }

    /// A primary that finds, after writing the record on its secondary's loss, that the fence file names another
    /// holder (on NFS: its lease ran out and the secondary took the lock) stops at once with 75, releasing nothing.
    @Test func aPrimaryWhoseFenceWasTakenStops() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try F.startPair(ws, udp: udp)
        let client = EchoClient(port: udp)
        #expect(client.request("REQ 1 a", expect: "REP 1 ") != nil)
        try ForeignHolder.write(ws.fence)
        sec.kill9()
        #expect(try pri.wait(seconds: 20) == 75, "\(pri.stderrText)")
        #expect(pri.stderr.contains { $0.contains(ForeignHolder.named) }, "\(pri.stderrText)")
        #expect(!pri.stderr.contains { $0.contains("continuing unprotected") }, "\(pri.stderrText)")
    }

    /// An unprotected primary that cannot read its fence file for `--fence-lease-ms` (on NFS: cut off from the
    /// server, whose lease may then give the lock to another host) stops with 75 rather than serve on.
    @Test func aPrimaryThatCannotConfirmItsFenceStops() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try F.startPair(ws, udp: udp, extraPrimary: ["--fence-lease-ms", "1000"])
        let talk = Conversation(port: udp)
        talk.exchange(1...2, "a")
        sec.kill9()
        try pri.waitForLine(containing: "continuing unprotected", seconds: 20)
        talk.exchange(3...3, "b")
        try FileManager.default.moveItem(atPath: ws.fence, toPath: ws.fence + ".unreachable")
        let first = try pri.waitForLine(containing: "cannot confirm the fence", seconds: 20)
        #expect(first.contains("--fence-lease-ms 1000"), "\(first)")
        #expect(try pri.wait(seconds: 20) == 75, "\(pri.stderrText)")
        #expect(pri.stderr.contains { $0.contains("the fence in \(ws.fence) was last confirmed") && $0.contains("not within --fence-lease-ms 1000") },
                "\(pri.stderrText)")
        talk.expectConsistent()
    }

    /// A survivor (a secondary gone live) watches the fence it took: another holder's generation in the file
    /// stops it at once with 75.
    @Test func aSurvivorWhoseFenceWasTakenStops() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try F.startPair(ws, udp: udp, extraSecondary: ["--fence-lease-ms", "1000"])
        let talk = Conversation(port: udp)
        talk.exchange(1...2, "a")
        pri.kill9()
        try sec.waitForLine(containing: "live: ", seconds: 20)
        talk.exchange(3...3, "b")
        try ForeignHolder.write(ws.fence)
        #expect(try sec.wait(seconds: 20) == 75, "\(sec.stderrText)")
        #expect(sec.stderr.contains { $0.contains(ForeignHolder.named) },
                "\(sec.stderrText)")
        talk.expectConsistent()
        _ = try? pri.wait(seconds: 10)
    }
} }

/// The pair record as the tests read it.
enum PairRecordFile {
    static func read(_ fence: String) -> String? {
        (try? String(contentsOfFile: fence + "/lockstep.pair", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// Another host's holder record, written into the fence file as a new holder would (flock is advisory: the text
/// can change under the lock), and the words a side that finds it stops with.
enum ForeignHolder {
    static func write(_ fence: String) throws {
        try "generation=999\nhost=elsewhere\npid=1\n".write(toFile: fence + "/lockstep.fence", atomically: false, encoding: .utf8)
    }
    static let named = "the fence is now held by elsewhere pid 1 (generation 999), not by this process"
}
