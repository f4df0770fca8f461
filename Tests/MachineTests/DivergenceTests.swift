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
        // bits changed); every CRC stays valid. (Altering values instead can steer the replayed guest into
        // a loop without exits, which replay cannot bound yet: see docs/architecture.md.)
        let reader = try LogFileReader(path: good)
        let writer = try LogFileWriter(path: bad, header: reader.header)
        var clockReads = 0
        while let r = try reader.next() {
            switch r {
            case .event(var e):
                if e.kind == .clockRead { clockReads += 1; if clockReads == 200 { e.signature = ExitSignature(raw: e.signature.raw ^ 0x10) } }
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
        #expect(clockReads > 200)

        #expect {
            _ = try Fixture.onThread { try ReplaySession(logPath: bad, output: nil).run() }
        } throws: { e in
            guard case MachineError.divergence(let d) = e else { return false }
            let text = d.description
            return text.contains("divergence at exit") && text.contains("expected") && text.contains("RIP 0x") && text.contains(": ")
        }
    }
}
