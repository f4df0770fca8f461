import CLockstep
import Testing
@testable import EventLog

/// Sync points delta-encoded against the references both ends keep (References, docs/log-format.md).
@Suite struct DeltaTests {
    /// A timer guest's sync points: the same pages and state each time, a few bytes changed.
    func timerLike(count: Int, pages: [UInt32] = [2, 9, 300, 4_100], seed: UInt64 = 5) -> [SyncPoint] {
        var rng = SplitMix(seed: seed)
        var sp = sampleSyncPoint(exit: 10, pages: pages, seed: seed)
        sp.vcpuState = (0..<5248).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        var out: [SyncPoint] = []
        for k in 0..<count {
            sp.exit = 10 + UInt64(k)
            for _ in 0..<24 { sp.pageData[Int(rng.next() % UInt64(sp.pageData.count))] &+= 1 }
            for _ in 0..<8 { sp.vcpuState[Int(rng.next() % 200)] &+= 1 }
            out.append(sp)
        }
        return out
    }

    func encode(_ sps: [SyncPoint], resetBefore: Set<Int> = [], encoder: LogEncoder = LogEncoder()) -> [[UInt8]] {
        var frames: [[UInt8]] = []
        for (k, sp) in sps.enumerated() {
            if resetBefore.contains(k) { encoder.resetReferences() }
            encoder.append(sp)
            frames += encoder.sealedFrames()
        }
        return frames
    }

    func decode(_ frames: [[UInt8]], from first: Int = 0) throws(LogError) -> [SyncPoint] {
        var d = FrameDecoder(firstSequence: UInt32(first))
        var out: [SyncPoint] = []
        for f in frames[first...] {
            for r in try f.withBytes({ (b) throws(LogError) in try d.decode(frame: b) }) {
                if case .syncPoint(let s) = r { out.append(s) }
            }
        }
        return out
    }

    @Test func repeatedPagesAndStateShrinkToTheirChanges() throws {
        let sps = timerLike(count: 50)
        let enc = LogEncoder()
        let frames = encode(sps, encoder: enc)
        #expect(try decode(frames) == sps)
        // The first is raw (4 pages and the state: 21.6 KB); each later one carries its ~30 changed bytes.
        #expect(frames[0].count > 4 * 4096 + 5248)
        let later = frames.dropFirst().map(\.count).max()!
        #expect(later < 600, "a sync point with a few changed bytes took \(later) bytes")
        #expect(enc.deltaItems == 49 * 5)
        #expect(enc.syncPointBytes == UInt64(frames.map { $0.count - LogFormat.frameHeaderSize }.reduce(0, +)))
        // What `log inspect` shows per sync point adds up to what the encoder wrote.
        var d = FrameDecoder(firstSequence: 0)
        var located: [LocatedRecord] = []
        for f in frames { located += try f.withBytes { (b) throws(LogError) in try d.decodeLocated(frame: b, at: 0) } }
        #expect(located.map(\.deltaItems) == [0] + Array(repeating: 5, count: 49))
        #expect(UInt64(located.map(\.length).reduce(0, +)) == enc.syncPointBytes)
    }

    @Test func anEventsLengthIsItsEncodedBytes() throws {
        let enc = LogEncoder()
        enc.append(Event(kind: .timer, exit: 1, signature: ExitSignature(raw: 7), value: 1_000_000))
        enc.append(Event(kind: .inject, exit: 1, signature: ExitSignature(raw: 7), value: 0x20))
        enc.append(Event(kind: .serialInput, exit: 900, signature: ExitSignature(raw: 9), value: 0x41))
        var d = FrameDecoder(firstSequence: 0)
        let frames = enc.sealedFrames()
        var located: [LocatedRecord] = []
        for f in frames { located += try f.withBytes { (b) throws(LogError) in try d.decodeLocated(frame: b, at: 0) } }
        #expect(located.count == 3 && located.allSatisfy { $0.length > 0 && $0.deltaItems == 0 })
        #expect(located.map(\.length).reduce(0, +) == frames.map { $0.count - LogFormat.frameHeaderSize }.reduce(0, +))
    }

    @Test func aReaderStartsAtAReferenceReset() throws {
        let sps = timerLike(count: 12)
        let frames = encode(sps, resetBefore: [6])
        // From the start, through the reset: every sync point.
        #expect(try decode(frames) == sps)
        // From the reset (a secondary seeded there): the rest.
        #expect(try decode(frames, from: 6) == Array(sps[6...]))
        #expect(frames[6].count > 4 * 4096, "the first sync point after a reset is raw")
        // From anywhere else: a clear error, never wrong pages.
        let e = expectLogError { _ = try decode(frames, from: 8) }
        #expect(e?.description.contains("delta against the previous sync point's, which this reader holds none of") == true)
    }

    /// Page 2^32−1 shares slot 4095 with page 4095; its tag must not wrap to "empty", or after a reset the
    /// writer would make a delta against what the slot held before it, which a new reader never had.
    @Test func theLastPageNumberIsNotTakenForAnEmptySlot() throws {
        var first = sampleSyncPoint(exit: 1, pages: [4095], seed: 8)
        var last = first
        last.exit = 2
        last.pageNumbers = [UInt32.max]
        last.pageData[100] &+= 1
        first.vcpuState = []
        let frames = encode([first, last], resetBefore: [1])
        #expect(try decode(frames, from: 1) == [last])
    }

    @Test func aReaderThatMissedASyncPointIsRefusedAtThePageItNeverHeld() throws {
        // A: pages 2 and 9; B: page 300 appears; C: page 300 as a delta against B's.
        let c = timerLike(count: 3, pages: [2, 9, 300])
        var a = c[0]
        a.pageNumbers = [2, 9]
        a.pageData = Array(a.pageData[..<(2 * 4096)])
        var frames = encode([a, c[1], c[2]])
        // C renumbered to follow A: the sequence check is what normally catches a lost frame.
        frames[2].withUnsafeMutableBytes { storeLE32(1, $0.baseAddress!, 4) }
        let crc = frames[2].withUnsafeBytes { frameCRC($0) }
        frames[2].withUnsafeMutableBytes { storeLE32(crc, $0.baseAddress!, 12) }
        let e = expectLogError { _ = try decode([frames[0], frames[2]]) }
        #expect(e?.description.contains("page 300 is a delta against a reference this reader does not hold") == true,
                "\(String(describing: e))")
    }

    @Test func largeSyncPointsAndSlotCollisionsStayInStep() throws {
        var rng = SplitMix(seed: 11)
        // Pages 7 and 7 + slots share a slot: the later one in a sync point evicts the earlier.
        let colliding: [UInt32] = [7, 8, UInt32(7 + References.slots)]
        var small = timerLike(count: 6, pages: colliding)
        // Between them, a sync point too large for the cache (raw, and the cache is left as it was).
        let large = sampleSyncPoint(exit: 12, pages: (0..<UInt32(References.maxPages + 1)).map { $0 * 3 }, seed: 4)
        small[3].pageData[Int(rng.next() % 4096)] &+= 1
        var sps = Array(small[..<3])
        sps.append(SyncPoint(exit: 12, signature: large.signature, vcpuState: small[2].vcpuState,
                             pageNumbers: large.pageNumbers, pageData: large.pageData))
        sps += small[3...].map { var s = $0; s.exit += 10; return s }
        let enc = LogEncoder()
        let frames = encode(sps, encoder: enc)
        #expect(try decode(frames) == sps)
        #expect(frames[3].count > (References.maxPages + 1) * 4097, "a large sync point goes raw")
        // 7 and 7 + slots evict each other each time (both raw); 8 and the state are deltas.
        #expect(frames[5].count > 2 * 4096 && frames[5].count < 2 * 4097 + 300, "\(frames[5].count) bytes")
    }

    // MARK: hand-made frames: every malformed item is an error that names it

    func leb(_ v: Int) -> [UInt8] {
        var v = v, out: [UInt8] = []
        repeat { out.append(UInt8(v & 0x7F) | (v >= 0x80 ? 0x80 : 0)); v >>= 7 } while v > 0
        return out
    }

    /// A sync point frame: an empty raw state unless given, then each page's number and item bytes.
    func handFrame(seq: UInt32, flags: UInt8 = 0, state: [UInt8] = [1, 0], pages: [(UInt32, [UInt8])]) -> [UInt8] {
        var p = [UInt8](repeating: 0, count: 12) + [flags] + state + leb(pages.count)
        var prev = -1
        for (n, _) in pages { p += leb(Int(n) - prev - 1); prev = Int(n) }
        for (_, item) in pages { p += item }
        var f = [2, 0, 0, 0] + withUnsafeBytes(of: seq.littleEndian, Array.init)
            + withUnsafeBytes(of: UInt32(p.count).littleEndian, Array.init) + [0, 0, 0, 0] + p
        let crc = f.withUnsafeBytes { frameCRC($0) }
        f.withUnsafeMutableBytes { storeLE32(crc, $0.baseAddress!, 12) }
        return f
    }

    @Test func malformedItemsAreNamed() throws {
        let rawPage5 = handFrame(seq: 0, pages: [(5, [1] + [UInt8](repeating: 0xEE, count: 4096))])
        func secondFails(_ f: [UInt8]) -> String {
            expectLogError { _ = try decode([rawPage5, f]) }?.description ?? "no error"
        }
        // A run that reaches past the page: skip 4000, 200 bytes.
        let past = [2] + leb(4 + 200) + leb(4000) + leb(200) + [UInt8](repeating: 1, count: 200)
        #expect(secondFails(handFrame(seq: 1, pages: [(5, past)])).contains("page 5: malformed delta"))
        // A zero-length run.
        #expect(secondFails(handFrame(seq: 1, pages: [(5, [2, 2, 0, 0])])).contains("page 5: malformed delta"))
        // A delta longer than the frame.
        #expect(secondFails(handFrame(seq: 1, pages: [(5, [2, 0x7F, 0, 1])])).contains("exceeds the"))
        // Encodings 0 and 3, reserved flag bits, a state delta with no reference.
        #expect(secondFails(handFrame(seq: 1, pages: [(5, [0, 0, 0])])).contains("page 5: unknown encoding 0"))
        #expect(secondFails(handFrame(seq: 1, state: [3, 0], pages: [])).contains("vCPU state: unknown encoding 3"))
        #expect(secondFails(handFrame(seq: 1, flags: 0x80, pages: [])).contains("reserved bits"))
        #expect(secondFails(handFrame(seq: 1, state: [2, 8, 0], pages: [])).contains("which this reader holds none of"))
        // A reset drops the reference of page 5: the same delta is refused after it.
        let ok = [UInt8(2)] + leb(3) + [0, 1, 9]
        #expect(try decode([rawPage5, handFrame(seq: 1, pages: [(5, ok)])]).last!.pageData[0] == 9)
        #expect(secondFails(handFrame(seq: 1, flags: SyncPointFlags.resetReferences, pages: [(5, ok)]))
            .contains("page 5 is a delta against a reference this reader does not hold"))
        // Bytes after the last page.
        #expect(secondFails(handFrame(seq: 1, pages: [(5, ok + [0])])).contains("1 bytes after the last page"))
    }

    @Test func theCodecRoundTripsAndKeepsToItsCap() {
        var rng = SplitMix(seed: 3)
        for trial in 0..<400 {
            let len = trial % 3 == 0 ? 5248 : 4096
            let ref = (0..<len).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            var cur = ref
            let changes = Int(rng.next() % 64) * (trial % 7 == 0 ? 40 : 1)
            for _ in 0..<changes { cur[Int(rng.next() % UInt64(len))] = UInt8(truncatingIfNeeded: rng.next()) }
            var out = [UInt8](repeating: 0, count: len)
            let n = ref.withUnsafeBufferPointer { r in cur.withUnsafeBufferPointer { c in out.withUnsafeMutableBufferPointer { o in
                lk_delta_encode(r.baseAddress!, c.baseAddress!, len, o.baseAddress!, len - 16)
            } } }
            if n < 0 { #expect(changes > 100); continue }
            var rebuilt = ref
            let rc = rebuilt.withUnsafeMutableBufferPointer { b in out.withUnsafeBufferPointer { o in
                lk_delta_apply(b.baseAddress!, len, o.baseAddress!, n)
            } }
            #expect(rc == 0 && rebuilt == cur)
            #expect(n <= 3 * changes + 4 * changes, "\(changes) changes took \(n) bytes")
            // One byte short of what it needs: refused, not overrun.
            if n > 0 {
                let m = ref.withUnsafeBufferPointer { r in cur.withUnsafeBufferPointer { c in out.withUnsafeMutableBufferPointer { o in
                    lk_delta_encode(r.baseAddress!, c.baseAddress!, len, o.baseAddress!, n - 1)
                } } }
                #expect(m == -1)
            }
        }
    }
}
