import EventLog
import Foundation
import Machine
import Testing

/// Bad input gets a clear error naming what is wrong, never a crash.
@Suite(.serialized)
struct BadImageTests {
    @Test func notAnELF() {
        #expect(throws: ImageError.notELF) { try PVHImage(bytes: Array(repeating: 0x41, count: 4096)) }
        #expect(throws: ImageError.notELF) { try PVHImage(bytes: []) }
    }

    @Test func elfWithoutPVHNoteIsRefused() throws {
        var b = try Fixture.guest("hello").bytes
        // The note header: namesz 4, descsz 4, type 18, "Xen\0". Turn its type into 17.
        let pattern: [UInt8] = [4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, 0x58, 0x65, 0x6E, 0]
        let at = try #require((0...(b.count - pattern.count)).first { Array(b[$0..<$0 + pattern.count]) == pattern })
        b[at + 8] = 17
        #expect(throws: ImageError.noPVHNote) { try PVHImage(bytes: b) }
        let msg = ImageError.noPVHNote.description
        #expect(msg.contains("XEN_ELFNOTE_PHYS32_ENTRY"))
    }

    @Test func truncatedELFIsMalformed() throws {
        let b = try Fixture.guest("hello").bytes
        #expect(throws: ImageError.self) { try PVHImage(bytes: Array(b.prefix(200))) }
    }

    @Test func sharedObjectIsNotExecutable() throws {
        var b = try Fixture.guest("hello").bytes
        b[16] = 3 // ET_DYN
        #expect(throws: ImageError.notExecutable(type: 3)) { try PVHImage(bytes: b) }
    }

    @Test(.enabled(if: Fixture.kvmSkipReason == nil)) func imageLargerThanRAMIsRefused() throws {
        var b = try Fixture.guest("hello").bytes
        // Grow the first PT_LOAD's p_memsz to 1 GiB; the machine has 256 MiB.
        let phoff = Int(b[32]) | Int(b[33]) << 8
        for i in 0..<16 where b[phoff + i * 56] == 1 {
            let m = phoff + i * 56 + 40
            for k in 0..<8 { b[m + k] = 0 }
            b[m + 3] = 0x40
            break
        }
        let image = try PVHImage(bytes: b)
        #expect {
            _ = try RunSession(image: image, config: MachineConfig(memoryMiB: 256), output: nil)
        } throws: { e in
            guard case MachineError.image(.doesNotFit) = e else { return false }
            return "\(e)".contains("raise --memory")
        }
    }
}

@Suite(.serialized, .enabled(if: Fixture.kvmSkipReason == nil, "\(Fixture.kvmSkipReason ?? "")"))
struct BadRunTests {
    @Test func tripleFaultEndsTheRunClearly() throws {
        let image = try Fixture.guest("triple-fault")
        let r = try Fixture.onThread(seconds: 60) { try RunSession(image: image, config: MachineConfig(), output: nil).run() }
        guard case .shutdown(let why) = r.ending else { Issue.record("ended \(r.ending)"); return }
        #expect(why.contains("triple-fault"))
    }

    @Test func unknownPortReadsAllOnesAndIsReportedOnce() throws {
        let image = try Fixture.guest("unknown-port")
        let out = Capture()
        let warnings = ResultBox<[String]>()
        warnings.set(.success([]))
        let r = try Fixture.onThread(seconds: 60) {
            let s = try RunSession(image: image, config: MachineConfig(), output: out)
            s.machine.warn = { w in warnings.set(.success(((try? warnings.get()) ?? []) + [w])) }
            return try s.run()
        }
        #expect(r.ending == .guestExit(status: 0))
        #expect(out.text.contains("RESULT unknown-port ff"))
        let w = try warnings.get()
        #expect(w.filter { $0.contains("0x1234") }.count == 1)
        #expect(w.filter { $0.contains("0x1235") }.count == 1)
    }
}

/// Logs that are damaged, incomplete, of another version, or paired with the wrong image.
@Suite(.serialized, .enabled(if: Fixture.kvmSkipReason == nil, "\(Fixture.kvmSkipReason ?? "")"))
struct BadLogTests {
    static func recordHello() throws -> [UInt8] {
        let image = try Fixture.guest("idle")
        let log = Fixture.tempPath("bad-\(UUID().uuidString).log")
        defer { try? FileManager.default.removeItem(atPath: log) }
        _ = try Fixture.onThread { try RecordSession(image: image, config: MachineConfig(), logPath: log, output: nil).run() }
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: log)))
    }

    func replay(_ bytes: [UInt8], image: [UInt8]? = nil) throws -> SessionResult {
        let p = Fixture.tempPath("bad-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: p, contents: Data(bytes))
        defer { try? FileManager.default.removeItem(atPath: p) }
        return try Fixture.onThread { try ReplaySession(logPath: p, image: image, output: nil).run() }
    }

    @Test func damagedLogsAreRefusedClearly() throws {
        let good = try BadLogTests.recordHello()
        _ = try replay(good) // sanity: the undamaged log replays

        // Truncated anywhere: refused before or during replay, never a crash.
        for cut in [good.count - 1, good.count - 30, good.count / 2, 100, 9] {
            #expect(throws: MachineError.self) { _ = try replay(Array(good.prefix(cut))) }
        }
        // Flipped bytes anywhere.
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<12 {
            var b = good
            let i = Int.random(in: 0..<b.count, using: &rng)
            b[i] ^= 0x5A
            #expect(throws: MachineError.self, "flip at \(i) of \(b.count)") { _ = try replay(b) }
        }
    }

    @Test func wrongVersionIsNamed() throws {
        var b = try BadLogTests.recordHello()
        b[8] = 0x63; b[9] = 0 // format version 99
        #expect {
            _ = try replay(b)
        } throws: { e in
            guard case MachineError.log(let le) = e else { return false }
            if case .unsupportedVersion(found: 99, _) = le { return true }
            return "\(le)".contains("version")
        }
    }

    @Test func wrongImageIsNamed() throws {
        let good = try BadLogTests.recordHello()
        let other = try Fixture.guest("hello").bytes
        #expect {
            _ = try replay(good, image: other)
        } throws: { e in "\(e)".contains("does not match the log") }
    }

    @Test func unfinishedRecordingIsIncomplete() throws {
        let p = Fixture.tempPath("never-finished.log")
        #expect(throws: MachineError.self) { _ = try ReplaySession(logPath: p, output: nil) }
    }
}
