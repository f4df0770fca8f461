import Testing
@testable import EventLog

@Suite struct CodecTests {
    func decodeAll(_ frames: [[UInt8]]) throws(LogError) -> [LogRecord] {
        var d = FrameDecoder()
        var out: [LogRecord] = []
        for f in frames {
            out += try f.withBytes { (b) throws(LogError) in try d.decode(frame: b) }
        }
        return out
    }

    @Test func roundTripEveryRecordKind() throws {
        let records = sampleRecords()
        // Every event kind is present, and both sync points.
        for k in EventKind.allCases where k != .syncPoint {
            #expect(records.contains { if case .event(let e) = $0 { e.kind == k } else { false } })
        }
        let enc = LogEncoder(frameTarget: 200)
        var frames: [[UInt8]] = []
        for r in records {
            enc.append(r)
            if enc.shouldFlush { frames += enc.sealedFrames() }
        }
        frames += enc.sealedFrames()
        #expect(frames.count > 4)
        #expect(try decodeAll(frames) == records)
        #expect(enc.eventCount == 60 && enc.syncPointCount == 2)
    }

    @Test func extremeValuesRoundTrip() throws {
        let sig = ExitSignature(raw: .max)
        let events = [
            Event(kind: .timer, exit: 0, signature: ExitSignature(raw: 0), value: .max),
            Event(kind: .clockRead, exit: 0, signature: sig, value: 0),
            Event(kind: .digest, exit: UInt64.max / 2, signature: sig, value: .max),
            Event(kind: .serialInput, exit: UInt64.max, signature: sig, value: 255),
            Event(kind: .inject, exit: UInt64.max, signature: ExitSignature(raw: 0), value: 0),
            Event(kind: .window, exit: UInt64.max, signature: ExitSignature(raw: 0)),
        ]
        let enc = LogEncoder()
        events.forEach { enc.append($0) }
        let sp = sampleSyncPoint(exit: .max, pages: [0, 1, UInt32.max], seed: 9)
        enc.append(sp)
        #expect(try decodeAll(enc.sealedFrames()) == events.map { .event($0) } + [.syncPoint(sp)])
    }

    @Test func eachFrameDecodesOnItsOwn() throws {
        let records = sampleEvents(count: 500, seed: 2).map { LogRecord.event($0) }
        let enc = LogEncoder(frameTarget: 100)
        var frames: [[UInt8]] = []
        for r in records {
            enc.append(r)
            if enc.shouldFlush { frames += enc.sealedFrames() }
        }
        frames += enc.sealedFrames()
        var decoded: [LogRecord] = []
        for (i, f) in frames.enumerated() {
            // A fresh decoder per frame: no state from earlier frames is needed.
            var d = FrameDecoder(firstSequence: UInt32(i))
            decoded += try f.withBytes { (b) throws(LogError) in try d.decode(frame: b) }
        }
        #expect(decoded == records)
    }

    /// Bytes per event excluding the payload (clock delta varint, data byte, digest), frame headers included.
    func overhead(_ events: [Event]) -> Double {
        let enc = LogEncoder()
        var total = 0
        var payload = 0
        var prevClock: UInt64 = 0
        for e in events {
            enc.append(e)
            if enc.shouldFlush {
                enc.sealFrame { total += $0.count }
                prevClock = 0
            }
        }
        enc.sealFrame { total += $0.count }
        // Recompute payload sizes with the same frame boundaries (64 KiB frames: the reset rarely matters).
        prevClock = 0
        for e in events {
            switch e.kind {
            case .timer, .clockRead:
                payload += varintSize(zigzag(Int64(bitPattern: e.value &- prevClock)))
                prevClock = e.value
            case .serialInput, .inject: payload += 1
            case .digest: payload += 8
            case .window, .syncPoint: break
            }
        }
        return Double(total - payload) / Double(events.count)
    }

    @Test func overheadPerEventIsAtMostEightBytes() {
        let typical = overhead(sampleEvents(count: 200_000, seed: 3))
        let worst = overhead(sampleEvents(count: 200_000, seed: 4, distinctSignatures: true))
        print("bytes/event excluding payload: typical \(typical), every signature distinct \(worst)")
        #expect(typical <= 8)
        #expect(worst <= 8)
        #expect(typical <= 6)
    }

    @Test func sequenceGapDuplicateAndReorderAreDetected() throws {
        let enc = LogEncoder(frameTarget: 50)
        var frames: [[UInt8]] = []
        for e in sampleEvents(count: 100, seed: 5) {
            enc.append(e)
            if enc.shouldFlush { frames += enc.sealedFrames() }
        }
        #expect(frames.count >= 3)
        func run(_ order: [Int]) -> LogError? {
            expectLogError { _ = try decodeAll(order.map { frames[$0] }) }
        }
        #expect(run([0, 1, 2]) == nil)
        #expect(run([0, 2]) == .outOfSequence(offset: 4, expected: 1, found: 2))
        #expect(run([0, 0]) == .outOfSequence(offset: 4, expected: 1, found: 0))
        #expect(run([1, 0]) == .outOfSequence(offset: 4, expected: 0, found: 1))
        #expect(run([0, 2])!.description.contains("lost, duplicated or reordered"))
    }

    /// Builds an events frame around a hand-made payload, with a valid CRC.
    func frame(kind: UInt8 = 1, seq: UInt32 = 0, payload: [UInt8]) -> [UInt8] {
        var f = [kind, 0, 0, 0] + withUnsafeBytes(of: seq.littleEndian, Array.init)
            + withUnsafeBytes(of: UInt32(payload.count).littleEndian, Array.init) + [0, 0, 0, 0] + payload
        let crc = f.withUnsafeBytes { frameCRC($0) }
        f.withUnsafeMutableBytes { storeLE32(crc, $0.baseAddress!, 12) }
        return f
    }

    @Test func unknownKindsAreCorruptWithKindAndOffset() throws {
        // Event tag with kind 9 as the second event of the frame (after a window event: tag 0x35 = window, same exit+sig).
        let e1 = expectLogError { _ = try decodeAll([frame(payload: [0x35, 0x39])]) }
        #expect(e1 == .corrupt(offset: 17, detail: "frame 0: unknown event kind 9"))
        // Kind 6 (sync point) is not an event inside an events frame; kind 0 is invalid.
        #expect(expectLogError { _ = try decodeAll([frame(payload: [0x36])]) }!.description.contains("unknown event kind 6"))
        #expect(expectLogError { _ = try decodeAll([frame(payload: [0x30])]) }!.description.contains("unknown event kind 0"))
        // Unknown frame kind.
        let e2 = expectLogError { _ = try decodeAll([frame(kind: 7, payload: [0x35])]) }
        #expect(e2 == .corrupt(offset: 0, detail: "unknown frame kind 7"))
        #expect(e2!.description.contains("byte 0"))
        // A huge length is refused from the header alone, before anything is allocated.
        var big = frame(payload: [0x35])
        big.withUnsafeMutableBytes { storeLE32(0xFFFF_FFF0, $0.baseAddress!, 8) }
        #expect(expectLogError { _ = try decodeAll([big]) }!.description.contains("exceeds the bound"))
        // Truncated event inside a CRC-valid frame.
        #expect(expectLogError { _ = try decodeAll([frame(payload: [0x07, 0x01])]) }!.description.contains("remain"))
    }

    @Test func failedSinkKeepsFramesForRetry() throws {
        struct Full: Error {}
        let enc = LogEncoder(frameTarget: 64)
        for e in sampleEvents(count: 40, seed: 6) { enc.append(e) }
        enc.append(sampleSyncPoint(exit: 1_000_000, pages: [1], seed: 6))
        for e in sampleEvents(count: 10, seed: 7) { enc.append(Event(kind: e.kind, exit: 1_000_000 + e.exit, signature: e.signature, value: e.value)) }
        var got: [[UInt8]] = []
        var calls = 0
        #expect(throws: Full.self) {
            try enc.sealFrame { b in
                calls += 1
                if calls == 2 { throw Full() }
                got.append(Array(b))
            }
        }
        #expect(got.count == 1)
        #expect(enc.bufferedBytes > 0)
        got += enc.sealedFrames()
        #expect(got.count == 3)
        var d = FrameDecoder()
        var n = 0
        for f in got { n += try f.withBytes { (b) throws(LogError) in try d.decode(frame: b) }.count }
        #expect(n == 51)
    }
}
