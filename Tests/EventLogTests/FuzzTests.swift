import Foundation
import Testing
@testable import EventLog

/// Random damage to a log must end in a LogError or in exactly the original log: never a crash, a hang,
/// a silently different record, or a huge allocation.
@Suite struct FuzzTests {
    struct Layout {
        var headerEnd: Int
        var frames: [Range<Int>]   // frames before the trailer, then the trailer frame
    }

    func layout(_ b: [UInt8]) -> Layout {
        b.withUnsafeBytes { p in
            let headerEnd = 16 + Int(loadLE32(p, 12)) + 4
            var frames: [Range<Int>] = []
            var pos = headerEnd
            while pos < b.count - 24 {
                let len = 16 + Int(loadLE32(p, pos + 8))
                frames.append(pos..<pos + len)
                pos += len
            }
            return Layout(headerEnd: headerEnd, frames: frames)
        }
    }

    func peakRSSKiB() -> Int {
        var u = rusage()
        getrusage(RUSAGE_SELF.rawValue, &u)
        return u.ru_maxrss
    }

    func fixFrameCRC(_ m: inout [UInt8], _ r: Range<Int>) {
        guard r.upperBound <= m.count else { return }
        m.withUnsafeMutableBytes { p in
            let f = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(p)[r])
            storeLE32(frameCRC(f), p.baseAddress!, r.lowerBound + 12)
        }
    }

    @Test(.timeLimit(.minutes(3)))
    func randomMutationsNeverCrashOrLie() throws {
        // The second sync point changes a few bytes of the first: its state and pages are deltas.
        var touched = sampleSyncPoint(exit: 1_000_000, pages: [2, 9], seed: 2)
        for i in [3, 70, 4096 + 5, 4096 + 4000] { touched.pageData[i] &+= 1 }
        touched.vcpuState[17] &+= 1
        let records: [LogRecord] = sampleEvents(count: 40, seed: 21).map { .event($0) }
            + [.syncPoint(sampleSyncPoint(exit: 1_000_000, pages: [2, 9], seed: 2)), .syncPoint(touched)]
            + sampleEvents(count: 20, seed: 22).map { .event(Event(kind: $0.kind, exit: 1_000_000 + $0.exit, signature: $0.signature, value: $0.value)) }
        let original = try writeLog(records, to: tempDir() + "/fuzz.log", frameTarget: 48)
        let (h0, t0, r0) = try readAllFromMemory(original)
        #expect(r0 == records)
        let lay = layout(original)
        #expect(lay.frames.count > 6)
        // Bias positions towards structure (header, frame headers, trailer, footer) rather than page data.
        var hot: [Int] = Array(0..<lay.headerEnd) + Array((original.count - 24 - 77)..<original.count)
        for f in lay.frames { hot += Array(f.lowerBound..<min(f.upperBound, f.lowerBound + 40)) }

        var rng = SplitMix(seed: 0xF022)
        let rssBefore = peakRSSKiB()
        var errors = 0, identical = 0, crcForged = 0
        let iterations = 25_000
        for i in 0..<iterations {
            var m = original
            func pos() -> Int { rng.next() % 2 == 0 ? hot[Int(rng.next() % UInt64(hot.count))] : Int(rng.next() % UInt64(m.count)) }
            func frame() -> Range<Int> { lay.frames[Int(rng.next() % UInt64(lay.frames.count))] }
            var forged = false
            switch rng.next() % 12 {
            case 0: let p = pos(); m[p] ^= UInt8(1) << (rng.next() % 8)
            case 1: let p = pos(); m[p] = UInt8(truncatingIfNeeded: rng.next())
            case 2: m.removeLast(Int(rng.next() % UInt64(m.count)) + 1)
            case 3:
                let n = Int(rng.next() % 16) + 1
                let p = pos()
                m.insert(contentsOf: (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: p)
            case 4:
                let p = pos()
                m.removeSubrange(p..<min(m.count, p + Int(rng.next() % 16) + 1))
            case 5:
                // A frame's length field: 0, off by one, huge, all ones, random.
                let f = frame()
                let old = Int(loadLE32(original.withUnsafeBytes { $0 }, f.lowerBound + 8))
                let choices: [UInt32] = [0, UInt32(old + 1), UInt32(max(old - 1, 0)), 0x4000_0000, .max,
                                         UInt32(truncatingIfNeeded: rng.next())]
                let v = choices[Int(rng.next() % UInt64(choices.count))]
                m.withUnsafeMutableBytes { storeLE32(v, $0.baseAddress!, f.lowerBound + 8) }
            case 6:
                let v: UInt32 = [0, .max, 0x0FFF_FFFF, UInt32(truncatingIfNeeded: rng.next())][Int(rng.next() % 4)]
                m.withUnsafeMutableBytes { storeLE32(v, $0.baseAddress!, 12) }
            case 7:
                let f = lay.frames[Int(rng.next() % UInt64(lay.frames.count - 1))]
                m.insert(contentsOf: original[f], at: f.upperBound)
            case 8:
                let k = Int(rng.next() % UInt64(lay.frames.count - 2))
                let a = lay.frames[k], b = lay.frames[k + 1]
                m.replaceSubrange(a.lowerBound..<b.upperBound, with: original[b] + original[a])
            case 9:
                for _ in 0..<(2 + rng.next() % 4) { let p = pos(); m[p] ^= UInt8(truncatingIfNeeded: rng.next() | 1) }
            case 10:
                // Footer pointing elsewhere, with a valid footer CRC.
                let at = m.count - 24
                let target = rng.next() % UInt64(m.count + 100)
                m.withUnsafeMutableBytes { p in
                    storeLE64(target, p.baseAddress!, at)
                    storeLE32(crc32c(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(p)[at..<at + 12])), p.baseAddress!, at + 12)
                }
            default:
                // Garbage inside a frame with its CRC recomputed: the decoder must survive CRC-valid nonsense.
                let f = frame()
                for _ in 0..<(1 + rng.next() % 4) {
                    let p = f.lowerBound + 16 + Int(rng.next() % UInt64(f.count - 16))
                    m[p] = UInt8(truncatingIfNeeded: rng.next())
                }
                fixFrameCRC(&m, f)
                forged = true
            }
            do {
                let (h, t, r) = try readAllFromMemory(m)
                if forged {
                    crcForged += 1   // may legitimately decode to other values; it must just not crash
                } else {
                    #expect(h == h0 && t == t0 && r == r0, "iteration \(i): mutation accepted but the log reads differently")
                    identical += 1
                }
            } catch {
                #expect(!error.description.isEmpty)
                errors += 1
            }
        }
        let growthMiB = (peakRSSKiB() - rssBefore) / 1024
        print("fuzz: \(iterations) mutations, \(errors) errors, \(identical) identical, \(crcForged) CRC-forged accepted, peak RSS +\(growthMiB) MiB")
        #expect(errors + identical + crcForged == iterations)
        #expect(errors > iterations / 2)
        #expect(growthMiB < 256)
    }

    @Test(.timeLimit(.minutes(1)))
    func randomFramesIntoTheDecoder() {
        // Arbitrary bytes, some with a plausible header and a valid CRC, straight into FrameDecoder.
        var rng = SplitMix(seed: 77)
        var accepted = 0
        for i in 0..<20_000 {
            let len = Int(rng.next() % 64)
            var f = (0..<(16 + len)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if i % 2 == 0 {
                f[0] = UInt8(1 + rng.next() % 3); f[1] = 0; f[2] = 0; f[3] = 0
                f.withUnsafeMutableBytes { storeLE32(0, $0.baseAddress!, 4); storeLE32(UInt32(len), $0.baseAddress!, 8) }
                fixFrameCRC(&f, 0..<f.count)
            }
            var d = FrameDecoder()
            do {
                _ = try f.withBytes { (b) throws(LogError) in try d.decode(frame: b) }
                accepted += 1
            } catch {
                #expect(!error.description.isEmpty)
            }
        }
        print("decoder fuzz: \(accepted) of 20000 CRC-valid random frames decoded")
    }
}
