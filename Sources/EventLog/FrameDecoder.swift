import CLockstep

/// Decodes frames (from a file or the network) back to records.
///
/// Events frames decode on their own (deltas restart at each frame). Across frames the decoder carries the
/// expected sequence number, so a lost, duplicated or reordered frame is reported, and the references sync
/// points are delta-encoded against (`References`), so it must see every sync point of the stream from its
/// start or from a reference reset. Copies of a decoder share the references: use one per stream.
public struct FrameDecoder {
    /// The sequence number the next frame must carry.
    public private(set) var nextSequence: UInt32
    private let references = References()

    public init() { nextSequence = 0 }
    public init(firstSequence: UInt32) { nextSequence = firstSequence }

    /// Validates one whole frame (header + payload) and returns its records, in order.
    public mutating func decode(frame: UnsafeRawBufferPointer) throws(LogError) -> [LogRecord] {
        try decodeLocated(frame: frame, at: 0).map(\.record)
    }

    /// As `decode(frame:)`, with each record's byte offset; `offset` is where the frame starts in its file or stream.
    public mutating func decodeLocated(frame: UnsafeRawBufferPointer, at offset: UInt64) throws(LogError) -> [LocatedRecord] {
        let header = try checkFrame(frame, at: offset)
        var out: [LocatedRecord] = []
        switch header.kind {
        case .events:
            try Self.decodeEvents(frame, header: header, at: offset, into: &out)
        case .syncPoint:
            let (start, sp, deltas) = try decodeSyncPoint(frame, header: header, at: offset)
            out.append(LocatedRecord(offset: start, frame: header.sequence, frameOffset: offset, record: .syncPoint(sp),
                                     length: frame.count - LogFormat.frameHeaderSize, deltaItems: deltas))
        case .trailer:
            throw .corrupt(offset: offset, detail: "frame \(header.sequence): unexpected trailer frame (use decodeTrailer)")
        }
        nextSequence = header.sequence &+ 1
        return out
    }

    /// Validates a trailer frame (the last frame of a stream) and returns the trailer.
    public mutating func decodeTrailer(frame: UnsafeRawBufferPointer, at offset: UInt64 = 0) throws(LogError) -> LogTrailer {
        let header = try checkFrame(frame, at: offset)
        guard header.kind == .trailer else {
            throw .corrupt(offset: offset, detail: "frame \(header.sequence): expected a trailer frame, found \(header.kind)")
        }
        var c = ByteCursor(frame, from: LogFormat.frameHeaderSize, to: frame.count, baseOffset: offset,
                           context: .frame(header.sequence, kind: "trailer"))
        let t = try LogTrailer.parse(&c)
        nextSequence = header.sequence &+ 1
        return t
    }

    /// Checks the header, the length, the CRC and the sequence number of a frame.
    private func checkFrame(_ frame: UnsafeRawBufferPointer, at offset: UInt64) throws(LogError) -> FrameHeader {
        let h = try FrameHeader.parse(frame, at: offset)
        guard frame.count == h.frameLength else {
            throw .corrupt(offset: offset + 8, detail: "frame \(h.sequence): header says \(h.frameLength) bytes, frame has \(frame.count)")
        }
        let crc = frameCRC(frame)
        guard crc == h.crc else {
            throw .corrupt(offset: offset + 12, detail: "frame \(h.sequence) (\(h.kind), \(h.payloadLength) payload bytes): "
                           + "CRC32C mismatch (stored 0x\(String(h.crc, radix: 16)), computed 0x\(String(crc, radix: 16)))")
        }
        guard h.sequence == nextSequence else {
            throw .outOfSequence(offset: offset + 4, expected: nextSequence, found: h.sequence)
        }
        return h
    }

    private static func decodeEvents(_ frame: UnsafeRawBufferPointer, header: FrameHeader, at offset: UInt64,
                                     into out: inout [LocatedRecord]) throws(LogError) {
        var c = ByteCursor(frame, from: LogFormat.frameHeaderSize, to: frame.count, baseOffset: offset,
                           context: .frame(header.sequence, kind: ""))
        guard !c.atEnd else { throw c.fail("empty events frame") }
        var prevExit: UInt64 = 0
        var prevSignature: UInt32 = 0
        var prevClock: UInt64 = 0
        while !c.atEnd {
            let start = c.pos
            let tag = try c.u8("event tag")
            guard tag & EventTag.reserved == 0 else {
                throw c.fail("event tag 0x\(String(tag, radix: 16)) has reserved bits set", at: start)
            }
            let rawKind = tag & EventTag.kindMask
            guard let kind = EventKind(rawValue: rawKind), kind != .syncPoint else {
                throw c.fail("unknown event kind \(rawKind)", at: start)
            }
            var exit = prevExit
            if tag & EventTag.sameExit == 0 {
                let delta = try c.varint("exit delta")
                let (sum, overflow) = prevExit.addingReportingOverflow(delta)
                guard !overflow else { throw c.fail("exit index overflows 64 bits", at: start) }
                exit = sum
            }
            let signature = try (tag & EventTag.sameSignature != 0 ? prevSignature : c.u32("signature"))
            var value: UInt64 = 0
            switch kind {
            case .timer, .clockRead:
                let zz = try c.varint("clock delta")
                value = prevClock &+ UInt64(bitPattern: unzigzag(zz))
                prevClock = value
            case .serialInput, .inject:
                value = UInt64(try c.u8("event byte"))
            case .window:
                value = 0
            case .digest:
                value = try c.u64("digest")
            case .syncPoint:
                preconditionFailure()
            }
            prevExit = exit
            prevSignature = signature
            out.append(LocatedRecord(offset: offset + UInt64(start), frame: header.sequence, frameOffset: offset,
                                     record: .event(Event(kind: kind, exit: exit, signature: ExitSignature(raw: signature),
                                                          value: value)), length: c.pos - start))
        }
    }

    /// Decodes a sync point, rebuilding delta-encoded items from the references, which it then updates as the
    /// encoder did. Every length is bounded before anything is allocated.
    private func decodeSyncPoint(_ frame: UnsafeRawBufferPointer, header: FrameHeader,
                                 at offset: UInt64) throws(LogError) -> (UInt64, SyncPoint, deltas: Int) {
        var c = ByteCursor(frame, from: LogFormat.frameHeaderSize, to: frame.count, baseOffset: offset,
                           context: .frame(header.sequence, kind: "sync point"))
        let start = c.offset
        let exit = try c.u64("exit")
        let signature = try c.u32("signature")
        let flagsAt = c.pos
        let flags = try c.u8("flags")
        guard flags & SyncPointFlags.reserved == 0 else {
            throw c.fail("sync point flags 0x\(String(flags, radix: 16)) have reserved bits set", at: flagsAt)
        }
        if flags & SyncPointFlags.resetReferences != 0 { references.reset() }

        var deltas = 0
        let stateAt = c.pos
        let stateEncoding = try Self.encoding(&c, "vCPU state")
        let stateLength = try c.varint("vCPU state length")
        var state: [UInt8]
        switch stateEncoding {
        case .raw:
            guard stateLength <= UInt64(c.remaining) else {
                throw c.fail("vCPU state length \(stateLength) exceeds the \(c.remaining) bytes left in the frame")
            }
            state = try c.bytes(Int(stateLength), "vCPU state")
            references.state = state  // shared, not copied
        case .delta:
            guard !references.state.isEmpty, stateLength == UInt64(references.state.count) else {
                throw c.fail("vCPU state of \(stateLength) bytes is a delta against the previous sync point's, which this "
                             + "reader holds \(references.state.isEmpty ? "none of" : "as \(references.state.count) bytes")", at: stateAt)
            }
            // In place: the reference becomes this state. It is copied only while an earlier sync point still
            // shares its buffer. (After a malformed delta the stream is refused, so a half-applied one is moot.)
            try Self.applyDelta(&c, to: &references.state, what: "vCPU state")
            state = references.state
            deltas += 1
        }

        let countAt = c.pos
        let count = try c.varint("page count")
        // A page takes at least 3 bytes (number, encoding, empty delta), and 4097 when the sync point is too
        // large for deltas: bound the count before allocating.
        let cached = count <= UInt64(References.maxPages)
        guard count <= UInt64(c.remaining / (cached ? 3 : LogFormat.pageSize + 1)) else {
            throw c.fail("page count \(count) does not fit in the \(c.remaining) bytes left in the frame", at: countAt)
        }
        var pages: [UInt32] = []
        pages.reserveCapacity(Int(count))
        var prev: Int64 = -1
        for _ in 0..<count {
            let at = c.pos
            let d = try c.varint("page number delta")
            guard d <= UInt64(UInt32.max) else { throw c.fail("page number delta \(d) out of range", at: at) }
            let n = prev + 1 + Int64(d)
            guard n <= Int64(UInt32.max) else { throw c.fail("page number \(n) out of range", at: at) }
            pages.append(UInt32(n))
            prev = n
        }
        var data = [UInt8](repeating: 0, count: Int(count) * LogFormat.pageSize)
        try data.withMutableBytes { (d) throws(LogError) in
            for (k, n) in pages.enumerated() {
                let at = c.pos
                let page = d.baseAddress! + k * LogFormat.pageSize
                switch try Self.encoding(&c, "page \(n)") {
                case .raw:
                    try c.need(LogFormat.pageSize, "page \(n)")
                    page.copyMemory(from: c.bytes.baseAddress! + c.pos, byteCount: LogFormat.pageSize)
                    c.pos += LogFormat.pageSize
                case .delta:
                    guard cached else {
                        throw c.fail("page \(n) is a delta in a sync point of \(count) pages (deltas need at most "
                                     + "\(References.maxPages))", at: at)
                    }
                    guard let ref = references.page(n) else {
                        throw c.fail("page \(n) is a delta against a reference this reader does not hold "
                                     + "(did the stream start after a reference reset?)", at: at)
                    }
                    page.copyMemory(from: ref, byteCount: LogFormat.pageSize)
                    try Self.applyDelta(&c, to: UnsafeMutableRawBufferPointer(start: page, count: LogFormat.pageSize),
                                        what: "page \(n)")
                    deltas += 1
                }
                if cached { references.store(n, page) }
            }
        }
        guard c.atEnd else { throw c.fail("\(c.remaining) bytes after the last page") }
        return (start, SyncPoint(exit: exit, signature: ExitSignature(raw: signature), vcpuState: state,
                                 pageNumbers: pages, pageData: data), deltas)
    }

    private static func encoding(_ c: inout ByteCursor, _ what: @autoclosure () -> String) throws(LogError) -> ItemEncoding {
        let at = c.pos
        let raw = try c.u8("\(what()) encoding")
        guard let e = ItemEncoding(rawValue: raw) else { throw c.fail("\(what()): unknown encoding \(raw)", at: at) }
        return e
    }

    /// Reads a delta's length and applies the delta to `target`, which holds the reference.
    private static func applyDelta(_ c: inout ByteCursor, to target: UnsafeMutableRawBufferPointer,
                                   what: @autoclosure () -> String) throws(LogError) {
        let at = c.pos
        let n = try c.varint("\(what()) delta length")
        guard n <= UInt64(c.remaining) else {
            throw c.fail("\(what()): delta of \(n) bytes exceeds the \(c.remaining) bytes left in the frame", at: at)
        }
        // SAFETY: the delta lies inside the frame (checked above); lk_delta_apply bounds every run by target.count.
        let rc = lk_delta_apply(target.baseAddress!.assumingMemoryBound(to: UInt8.self), target.count,
                                c.bytes.baseAddress!.advanced(by: c.pos).assumingMemoryBound(to: UInt8.self), Int(n))
        guard rc == 0 else { throw c.fail("\(what()): malformed delta (a run reaches past \(target.count) bytes)", at: at) }
        c.pos += Int(n)
    }

    private static func applyDelta(_ c: inout ByteCursor, to target: inout [UInt8], what: @autoclosure () -> String) throws(LogError) {
        try target.withMutableBytes { (t) throws(LogError) in try applyDelta(&c, to: t, what: what()) }
    }
}
