import EventLog
import Foundation
import Machine
import Testing

/// A log whose frames are intact but whose content does not match the guest: replay must stop with a
/// report naming the exit, expected vs found, the RIP and the instructions there.
@Suite(.serialized, .enabled(if: Fixture.kvmSkipReason == nil, "\(Fixture.kvmSkipReason ?? "")"))
struct DivergenceTests {
    @Test func alteredClockValueIsReportedWithDisassembly() throws {
        let image = try Fixture.guest("clock")
        let good = Fixture.tempPath("div-good-\(UUID().uuidString).log")
        let bad = Fixture.tempPath("div-bad-\(UUID().uuidString).log")
        defer { try? FileManager.default.removeItem(atPath: good); try? FileManager.default.removeItem(atPath: bad) }
        _ = try Fixture.onThread { try RecordSession(image: image, config: MachineConfig(), logPath: good, output: nil).run() }

        // Re-encode with the 200th clock read attributed to another instruction (its exit signature's RIP
        // bits changed); every CRC stays valid.
        let clockReads = try Self.reencode(good, into: bad) { e in e.signature = ExitSignature(raw: e.signature.raw ^ 0x10) }
        #expect(clockReads > 200)

        #expect {
            _ = try Fixture.onThread { try ReplaySession(logPath: bad, output: nil).run() }
        } throws: { e in
            guard case MachineError.divergence(let d) = e else { return false }
            let text = d.description
            return text.contains("divergence at exit") && text.contains("expected") && text.contains("RIP 0x") && text.contains(": ")
        }
    }

    /// Altered values (valid CRCs) can steer the replayed guest anywhere, including a loop with no exits;
    /// whatever happens, the replay ends with a divergence within a bound (the watchdog), never hangs.
    @Test func alteredClockValuesNeverHangTheReplay() throws {
        let image = try Fixture.guest("clock")
        let good = Fixture.tempPath("div-good-\(UUID().uuidString).log")
        let bad = Fixture.tempPath("div-bad-\(UUID().uuidString).log")
        defer { try? FileManager.default.removeItem(atPath: good); try? FileManager.default.removeItem(atPath: bad) }
        _ = try Fixture.onThread { try RecordSession(image: image, config: MachineConfig(), logPath: good, output: nil).run() }
        _ = try Self.reencode(good, into: bad, from: 200) { e in e.value = e.value &* 7 &+ 123_456_789 }
        #expect {
            _ = try Fixture.onThread(seconds: 60) {
                let s = try ReplaySession(logPath: bad, output: nil)
                s.stallSeconds = 2
                return try s.run()
            }
        } throws: { e in
            guard case MachineError.divergence = e else { return false }
            return true
        }
    }

    /// The watchdog's path: a replay interrupted from outside stops with the reason as a divergence.
    @Test func interruptedReplayReportsWhy() throws {
        let image = try Fixture.guest("timer-compute-short")
        let log = Fixture.tempPath("int-\(UUID().uuidString).log")
        defer { try? FileManager.default.removeItem(atPath: log) }
        _ = try Fixture.onThread { try RecordSession(image: image, config: MachineConfig(), logPath: log, output: nil).run() }
        #expect {
            _ = try Fixture.onThread {
                let s = try ReplaySession(logPath: log, output: nil)
                var seen = 0
                s.machine.hooks.observer = { _ in seen += 1; if seen == 5 { s.interruptReplay("stopped by the test") } }
                return try s.run()
            }
        } throws: { e in
            guard case MachineError.divergence(let d) = e else { return false }
            return d.description.contains("stopped by the test")
        }
    }

    /// Copies a log, passing the 200th clock read (and with `from`, every one after it) through `alter`.
    /// Returns how many clock reads it holds.
    static func reencode(_ from: String, into to: String, from first: Int? = nil, alter: (inout Event) -> Void) throws -> Int {
        let reader = try LogFileReader(path: from)
        let writer = try LogFileWriter(path: to, header: reader.header)
        var clockReads = 0
        while let r = try reader.next() {
            switch r {
            case .event(var e):
                if e.kind == .clockRead {
                    clockReads += 1
                    if clockReads == 200 || (first.map { clockReads >= $0 } ?? false) { alter(&e) }
                }
                writer.encoder.append(e)
            case .syncPoint(let s):
                s.vcpuState.withUnsafeBytes { v in
                    s.pageNumbers.withUnsafeBufferPointer { p in
                        s.pageData.withUnsafeBytes { d in
                            writer.encoder.appendSyncPoint(exit: s.exit, signature: s.signature, vcpuState: v, pageNumbers: p, pageData: d)
                        }
                    }
                }
            }
            try writer.flushIfNeeded()
        }
        try writer.finish(trailer: reader.trailer)
        return clockReads
    }
}
