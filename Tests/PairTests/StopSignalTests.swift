import Foundation
import Glibc
import Testing

/// The operator's stop signals on `run` and `record`: the guest stops at its next exit, and a recording so
/// stopped is a finished log that replays to the same state (as `rr record` ends on Ctrl-C).
extension PairTests { @Suite struct StopSignalTests {
    static func workspace() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lockstep-stop-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Replays `log` and expects the recorder's end: stopped, with its state digest.
    static func expectReplaysToTheStop(_ log: String, _ recorder: Child, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(FileManager.default.fileExists(atPath: log) && !FileManager.default.fileExists(atPath: log + ".partial"),
                "the stopped recording must be a finished log", sourceLocation: sourceLocation)
        let replay = try Child("replay", ["replay", log, "--serial", "none"])
        #expect(try replay.wait(seconds: 60) == 0, "\(replay.stderrText)", sourceLocation: sourceLocation)
        #expect(replay.stderr.contains("lockstep: stopped"), "\(replay.stderrText)", sourceLocation: sourceLocation)
        #expect(recorder.digest != nil && replay.digest == recorder.digest, "\(recorder.stderrText)\n\(replay.stderrText)",
                sourceLocation: sourceLocation)
    }

    /// SIGINT (Ctrl-C) while the echo service waits for requests, halted: the log ends where it stopped.
    @Test func aRecordingStoppedWhileTheGuestWaitsReplaysToItsStop() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let dir = try Self.workspace()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let udp = try PairFixture.freeUDPPort(), log = dir + "/echo.log"
        let rec = try Child("record", ["record", try PairFixture.guest("echo"), "--log", log, "--memory", "32", "--serial", "udp:127.0.0.1:\(udp)"])
        defer { rec.kill9() }
        let talk = Conversation(port: udp)
        talk.exchange(1...3, "a", "\(rec.stderrText)")
        rec.signal(SIGINT)
        #expect(try rec.wait(seconds: 30) == 0, "\(rec.stderrText)")
        #expect(rec.stderr.contains("lockstep: SIGINT: stopping the guest at its next exit and finishing the log (another signal kills at once)"), "\(rec.stderrText)")
        #expect(rec.stderr.contains("lockstep: stopped"), "\(rec.stderrText)")
        try Self.expectReplaysToTheStop(log, rec)
        talk.expectConsistent()
    }

    /// SIGTERM while the guest computes in ring 3: the stop is a kick, so the log's last record is a sync point.
    @Test func aRecordingStoppedWhileTheGuestComputesReplaysToItsStop() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let dir = try Self.workspace()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = dir + "/compute.log"
        let rec = try Child("record", ["record", try PairFixture.guest("timer-compute"), "--log", log, "--memory", "32", "--serial", "stdio"],
                            captureStdout: true)
        defer { rec.kill9() }
        try rec.waitForLine(containing: "iterations in ring 3")
        rec.signal(SIGTERM)
        #expect(try rec.wait(seconds: 30) == 0, "\(rec.stderrText)")
        #expect(rec.stderr.contains("lockstep: stopped"), "\(rec.stderrText)")
        try Self.expectReplaysToTheStop(log, rec)
    }

    /// A process started with SIGHUP ignored (`nohup`) keeps it ignored: a closed terminal does not stop the guest.
    @Test func sighupIgnoredAtStartStaysIgnored() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let udp = try PairFixture.freeUDPPort()
        let run = try Child("run", ["run", try PairFixture.guest("echo"), "--memory", "32", "--serial", "udp:127.0.0.1:\(udp)"],
                            launcher: ["/usr/bin/env", "--ignore-signal=HUP"])
        defer { run.kill9() }
        let talk = Conversation(port: udp)
        talk.exchange(1...1, "a", "\(run.stderrText)")
        run.signal(SIGHUP)
        // Not killed by it (its default action), and not stopping either: then the SIGTERM would kill at once (143).
        talk.exchange(2...3, "b", "\(run.stderrText)")
        run.signal(SIGTERM)
        #expect(try run.wait(seconds: 30) == 0, "\(run.stderrText)")
        #expect(!run.stderr.contains { $0.contains("SIGHUP") }, "\(run.stderrText)")
        #expect(run.stderr.contains("lockstep: SIGTERM: stopping the guest at its next exit (another signal kills at once)"), "\(run.stderrText)")
        talk.expectConsistent()
    }
} }
