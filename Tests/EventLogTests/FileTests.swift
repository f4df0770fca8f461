import Foundation
import Testing
@testable import EventLog

@Suite struct FileTests {
    @Test func fileRoundTrip() throws {
        let dir = tempDir()
        let path = dir + "/run.log"
        let records = sampleRecords(seed: 11, events: 3000)
        try writeLog(records, to: path, frameTarget: 1024)
        #expect(!FileManager.default.fileExists(atPath: path + ".partial"))
        let r = try LogFileReader(path: path)
        #expect(r.header == sampleHeader())
        #expect(r.trailer == sampleTrailer(events: 3000, syncs: 2, finalExit: r.trailer.finalExit))
        var got: [LogRecord] = []
        var lastOffset: UInt64 = 0
        while let loc = try r.nextLocated() {
            #expect(loc.offset > lastOffset && loc.offset < r.trailerOffset)
            #expect(loc.frameOffset < loc.offset)
            lastOffset = loc.offset
            got.append(loc.record)
        }
        #expect(got == records)
        #expect(r.recordIndex == UInt64(records.count))
        #expect(try r.next() == nil)
    }

    @Test func emptyLogRoundTrip() throws {
        let path = tempDir() + "/empty.log"
        let bytes = try writeLog([], to: path)
        let (h, t, recs) = try readAllFromMemory(bytes)
        #expect(h == sampleHeader() && recs.isEmpty && t.eventCount == 0)
    }

    func smallLog() throws -> [UInt8] {
        let records: [LogRecord] = sampleEvents(count: 12, seed: 12).map { .event($0) }
            + [.syncPoint(sampleSyncPoint(exit: 100_000, pages: [5], seed: 1))]
            + [.event(Event(kind: .inject, exit: 100_000, signature: ExitSignature(raw: 7), value: 32))]
        return try writeLog(records, to: tempDir() + "/small.log", frameTarget: 40)
    }

    @Test func truncationAtEveryOffsetIsAClearError() throws {
        let bytes = try smallLog()
        let (_, _, original) = try readAllFromMemory(bytes)
        let headerSize = 16 + Int(bytes.withUnsafeBytes { loadLE32($0, 12) }) + 4
        for n in 0..<bytes.count {
            let e = expectLogError { _ = try readAllFromMemory(Array(bytes[0..<n])) }
            guard let e else { Issue.record("truncation to \(n) bytes was not detected"); continue }
            #expect(!e.description.isEmpty)
            if n >= headerSize { #expect(e == .incomplete(path: "mem.log"), "at \(n): \(e)") }
        }
        #expect(original.count == 14)
        // The same through real files, at a few sizes.
        let dir = tempDir()
        for n in [0, 5, 15, 100, bytes.count / 2, bytes.count - 1] {
            let p = dir + "/t\(n).log"
            _ = FileManager.default.createFile(atPath: p, contents: Data(bytes[0..<n]))
            #expect(expectLogError { _ = try LogFileReader(path: p).readAll() } != nil)
        }
    }

    @Test func flippingAnyByteIsDetected() throws {
        let bytes = try smallLog()
        for i in 0..<bytes.count {
            for mask: UInt8 in [0x01, 0x80] {
                var m = bytes
                m[i] ^= mask
                if expectLogError({ _ = try readAllFromMemory(m) }) == nil {
                    Issue.record("flip 0x\(String(mask, radix: 16)) at byte \(i) not detected")
                }
            }
        }
    }

    @Test func wrongVersionAndNotALog() throws {
        var bytes = try smallLog()
        bytes[8] = 1  // version 1 had no delta-encoded sync points
        #expect(expectLogError { _ = try readAllFromMemory(bytes) } == .unsupportedVersion(found: 1, supported: 3))
        bytes[8] = 2  // version 2's digests covered the registers only, every 4096 exits
        #expect(expectLogError { _ = try readAllFromMemory(bytes) } == .unsupportedVersion(found: 2, supported: 3))
        bytes[8] = 4
        #expect(expectLogError { _ = try readAllFromMemory(bytes) } == .unsupportedVersion(found: 4, supported: 3))
        let dir = tempDir()
        let p = dir + "/notes.txt"
        _ = FileManager.default.createFile(atPath: p, contents: Data("hello, this is not a log at all".utf8))
        let e = expectLogError { _ = try LogFileReader(path: p) }
        #expect(e == .notALog(path: p))
        #expect(e!.description.contains("not a Lockstep log"))
        let missing = expectLogError { _ = try LogFileReader(path: dir + "/nope.log") }
        #expect(missing == .io(path: dir + "/nope.log", errno: ENOENT, detail: "cannot open the log"))
    }

    @Test func abandonedLogIsIncomplete() throws {
        let dir = tempDir()
        let path = dir + "/run.log"
        let w = try LogFileWriter(path: path, header: sampleHeader())
        for e in sampleEvents(count: 100, seed: 13) { w.encoder.append(e) }
        try w.flush()
        #expect(w.bytesWritten > 100)
        w.abandon()
        #expect(!FileManager.default.fileExists(atPath: path))
        #expect(FileManager.default.fileExists(atPath: path + ".partial"))
        let e = expectLogError { _ = try LogFileReader(path: path + ".partial") }
        #expect(e == .incomplete(path: path + ".partial"))
        #expect(e!.description.contains(".partial"))
        #expect(e!.description.contains("incomplete"))
    }

    @Test func diskFullSaysDiskFull() throws {
        let dir = tempDir()
        // /dev/full fails every write with ENOSPC. finish() is never reached, so nothing is renamed.
        let e = expectLogError {
            _ = try LogFileWriter(path: dir + "/run.log", temporaryPath: "/dev/full", header: sampleHeader())
        }
        guard case .io(let path, let code, _)? = e else { Issue.record("expected io, got \(String(describing: e))"); return }
        #expect(path == "/dev/full")
        #expect(code == ENOSPC)
        #expect(e!.description.contains("disk full"))
    }

    @Test func unknownOptionalHeaderFieldIsSkippedRequiredIsRefused() throws {
        let bytes = try smallLog()
        func withExtraField(flags: UInt16) -> [UInt8] {
            let fieldsLength = Int(bytes.withUnsafeBytes { loadLE32($0, 12) })
            let headerEnd = 16 + fieldsLength
            let field: [UInt8] = [99, 0] + withUnsafeBytes(of: flags.littleEndian, Array.init) + [3, 0, 0, 0, 1, 2, 3]
            var h = Array(bytes[0..<headerEnd]) + field
            h.withUnsafeMutableBytes { storeLE32(UInt32(fieldsLength + field.count), $0.baseAddress!, 12) }
            let crc = h.withUnsafeBytes { crc32c($0) }
            h += withUnsafeBytes(of: crc.littleEndian, Array.init)
            // Frames, trailer and footer shift by the field's size: rewrite the footer's trailer offset.
            var rest = Array(bytes[(headerEnd + 4)...])
            let footerAt = rest.count - 24
            rest.withUnsafeMutableBytes { f in
                let off = loadLE64(UnsafeRawBufferPointer(f), footerAt) + UInt64(field.count)
                storeLE64(off, f.baseAddress!, footerAt)
                storeLE32(crc32c(UnsafeRawBufferPointer(rebasing: f[footerAt..<footerAt + 12])), f.baseAddress!, footerAt + 12)
            }
            return h + rest
        }
        let (h, _, recs) = try readAllFromMemory(withExtraField(flags: 0))
        #expect(h == sampleHeader() && recs.count == 14)
        let e = expectLogError { _ = try readAllFromMemory(withExtraField(flags: 1)) }
        guard case .unsupportedField(let id, _)? = e else { Issue.record("got \(String(describing: e))"); return }
        #expect(id == 99)
    }
}
