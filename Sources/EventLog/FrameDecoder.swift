/// Decodes frames (from a file or the network) back to records.
///
/// Every frame decodes on its own (deltas restart at each frame); the decoder carries only the expected
/// sequence number across frames, so a lost, duplicated or reordered frame is reported.
public struct FrameDecoder {
    /// The sequence number the next frame must carry.
    public private(set) var nextSequence: UInt32

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
            let (start, sp) = try Self.decodeSyncPoint(frame, header: header, at: offset)
            out.append(LocatedRecord(offset: start, frame: header.sequence, frameOffset: offset, record: .syncPoint(sp)))
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
                           context: "frame \(header.sequence) (trailer)")
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
                           context: "frame \(header.sequence)")
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
                                                          value: value))))
        }
    }

    private static func decodeSyncPoint(_ frame: UnsafeRawBufferPointer, header: FrameHeader,
                                        at offset: UInt64) throws(LogError) -> (UInt64, SyncPoint) {
        var c = ByteCursor(frame, from: LogFormat.frameHeaderSize, to: frame.count, baseOffset: offset,
                           context: "frame \(header.sequence) (sync point)")
        let start = c.offset
        let exit = try c.u64("exit")
        let signature = try c.u32("signature")
        let stateLength = try c.varint("vCPU state length")
        guard stateLength <= UInt64(c.remaining) else {
            throw c.fail("vCPU state length \(stateLength) exceeds the \(c.remaining) bytes left in the frame")
        }
        let state = try c.bytes(Int(stateLength), "vCPU state")
        let countAt = c.pos
        let count = try c.varint("page count")
        // Each page needs at least 1 byte of number and 4096 of data: bound the count before allocating.
        guard count <= UInt64(c.remaining / (LogFormat.pageSize + 1)) else {
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
        let dataLength = Int(count) * LogFormat.pageSize
        guard c.remaining == dataLength else {
            throw c.fail("page data is \(c.remaining) bytes, expected \(dataLength) for \(count) pages")
        }
        let data = try c.bytes(dataLength, "page data")
        return (start, SyncPoint(exit: exit, signature: ExitSignature(raw: signature), vcpuState: state,
                                 pageNumbers: pages, pageData: data))
    }
}
