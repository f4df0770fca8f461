import Foundation
import Machine
import Testing

/// `lockstep log inspect`: with and without replay it lists the same records, a sync point with its size in
/// the log and how many of its items came as deltas; with replay each line also has the guest's RIP.
@Suite(.serialized, .enabled(if: Fixture.kvmSkipReason == nil, "\(Fixture.kvmSkipReason ?? "")"))
struct LogInspectorTests {
    init() { if let why = Fixture.kvmSkipReason { print("MachineTests: \(why)") } }

    final class Lines: @unchecked Sendable {
        var all: [InspectLine] = []
    }

    @Test func replayAndListingAgreeOnEveryRecord() throws {
        let image = try Fixture.guest("timer-compute-short")
        let log = Fixture.tempPath("inspect-\(UUID().uuidString).log")
        defer { try? FileManager.default.removeItem(atPath: log) }
        _ = try Fixture.onThread {
            try RecordSession(image: image, config: MachineConfig(memoryMiB: 32), logPath: log, output: nil).run()
        }
        let listed = Lines(), replayed = Lines()
        try Fixture.onThread { try LogInspector(path: log, replay: false).run { listed.all.append($0) } }
        try Fixture.onThread { try LogInspector(path: log, replay: true).run { replayed.all.append($0) } }
        #expect(!listed.all.isEmpty && listed.all.count == replayed.all.count, "\(listed.all.count) listed, \(replayed.all.count) replayed")
        let syncPoints = listed.all.filter { $0.kind == "syncPoint" }
        #expect(!syncPoints.isEmpty, "timer-compute-short recorded no sync point")
        for (l, r) in zip(listed.all, replayed.all) {
            #expect(l.exit == r.exit && l.kind == r.kind && l.value == r.value, "#\(l.index): listed \(l.text), replayed \(r.text)")
            #expect(r.rip != nil, "#\(r.index) has no RIP: \(r.text)")
        }
        #expect(syncPoints.allSatisfy { $0.value.contains("bytes in the log") }, "\(syncPoints.prefix(3).map(\.text))")
    }
}
