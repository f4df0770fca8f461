import CLockstep
#if canImport(Glibc)
import Glibc
#endif

/// Event tag byte: bits 0-3 the EventKind, bit 4 "exit delta is 0 (no varint)",
/// bit 5 "signature equals the previous event's (not stored)", bits 6-7 reserved (0).
enum EventTag {
    static let kindMask: UInt8 = 0x0F
    static let sameExit: UInt8 = 0x10
    static let sameSignature: UInt8 = 0x20
    static let reserved: UInt8 = 0xC0
}

/// Encodes events into CRC-framed frames in a reusable buffer. The per-event path does not allocate
/// (the buffer only grows if the caller keeps appending far past `frameTarget` without sealing, or for a sync point).
///
/// The buffer holds whole frames back to back: zero or more closed frames (a closed events frame, then a
/// sync point frame, ...) followed by the open events frame. Sequence numbers are given when a frame is closed.
public final class LogEncoder {
    public let frameTarget: Int
    private var buffer: UnsafeMutableRawPointer
    private var capacity: Int
    private var used = 0
    /// Offset of the open events frame's header, or -1.
    private var openStart = -1
    // Delta state of the open frame; reset when a frame opens so every frame decodes on its own.
    private var prevExit: UInt64 = 0
    private var prevSignature: UInt32 = 0
    private var prevClock: UInt64 = 0
    /// Sequence number the next closed frame gets.
    public private(set) var nextSequence: UInt32 = 0
    public private(set) var eventCount: UInt64 = 0
    public private(set) var syncPointCount: UInt64 = 0
    /// Payload bytes of the sync points appended, and how many of their items (states, pages) went as deltas.
    public private(set) var syncPointBytes: UInt64 = 0
    public private(set) var deltaItems: UInt64 = 0
    private let references = References()
    private var resetPending = false
    /// Delta output before it is known to be smaller than the raw item.
    private var scratch: [UInt8] = []
    public private(set) var lastExit: UInt64 = 0

    public init(frameTarget: Int = 64 * 1024) {
        precondition(frameTarget > 0 && frameTarget <= LogFormat.maxEventsPayload, "frameTarget out of range")
        self.frameTarget = frameTarget
        capacity = Self.defaultCapacity(frameTarget)
        buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
    }

    deinit { buffer.deallocate() }

    private static func defaultCapacity(_ target: Int) -> Int {
        target + LogFormat.frameHeaderSize + 4 * LogFormat.maxEventSize + 64
    }

    /// Bytes waiting to be handed out by `sealFrame` (frame headers included).
    public var bufferedBytes: Int { used }
    public var shouldFlush: Bool { used >= frameTarget }

    @inline(__always) private func ensure(_ n: Int) {
        if used + n > capacity { grow(used + n) }
    }

    private func grow(_ needed: Int) {
        let newCapacity = max(needed, capacity * 2)
        let p = UnsafeMutableRawPointer.allocate(byteCount: newCapacity, alignment: 16)
        p.copyMemory(from: buffer, byteCount: used)
        buffer.deallocate()
        buffer = p
        capacity = newCapacity
    }

    private func openEventsFrame() {
        closeOpenFrame()
        ensure(LogFormat.frameHeaderSize + LogFormat.maxEventSize)
        openStart = used
        used += LogFormat.frameHeaderSize
        prevExit = 0
        prevSignature = 0
        prevClock = 0
    }

    /// Writes the header of the open events frame (sequence, length, CRC); drops it when empty.
    private func closeOpenFrame() {
        guard openStart >= 0 else { return }
        let payload = used - openStart - LogFormat.frameHeaderSize
        if payload == 0 {
            used = openStart
        } else {
            writeHeader(at: openStart, kind: .events, payloadLength: payload)
        }
        openStart = -1
    }

    private func writeHeader(at start: Int, kind: FrameKind, payloadLength: Int) {
        let h = buffer + start
        h.storeBytes(of: kind.rawValue, toByteOffset: 0, as: UInt8.self)
        h.storeBytes(of: 0, toByteOffset: 1, as: UInt8.self)
        storeLE16(0, h, 2)
        storeLE32(nextSequence, h, 4)
        storeLE32(UInt32(payloadLength), h, 8)
        let frame = UnsafeRawBufferPointer(start: h, count: LogFormat.frameHeaderSize + payloadLength)
        storeLE32(frameCRC(frame), h, 12)
        nextSequence &+= 1
    }

    /// Appends one event. O(1), no allocation. Exits must not go backwards; sync points use `appendSyncPoint`.
    public func append(_ event: Event) {
        precondition(event.kind != .syncPoint, "sync points are appended with appendSyncPoint")
        precondition(event.exit >= lastExit, "event exit \(event.exit) is before the previous exit \(lastExit)")
        if openStart < 0 || used - openStart - LogFormat.frameHeaderSize > LogFormat.maxEventsPayload - LogFormat.maxEventSize {
            openEventsFrame()
        }
        ensure(LogFormat.maxEventSize)
        let p = buffer
        let tagAt = used
        var i = used + 1
        var tag = event.kind.rawValue
        let delta = event.exit - prevExit
        if delta == 0 { tag |= EventTag.sameExit } else { storeVarint(delta, p, &i) }
        let sig = event.signature.raw
        if sig == prevSignature { tag |= EventTag.sameSignature } else { storeLE32(sig, p, i); i += 4 }
        switch event.kind {
        case .timer, .clockRead:
            storeVarint(zigzag(Int64(bitPattern: event.value &- prevClock)), p, &i)
            prevClock = event.value
        case .serialInput, .inject:
            precondition(event.value <= 0xFF, "\(event.kind) value \(event.value) does not fit a byte")
            p.storeBytes(of: UInt8(event.value), toByteOffset: i, as: UInt8.self)
            i += 1
        case .window:
            precondition(event.value == 0, "window events carry no value")
        case .digest:
            storeLE64(event.value, p, i)
            i += 8
        case .syncPoint:
            preconditionFailure()
        }
        p.storeBytes(of: tag, toByteOffset: tagAt, as: UInt8.self)
        used = i
        prevExit = event.exit
        prevSignature = sig
        lastExit = event.exit
        eventCount += 1
    }

    /// Appends a sync point in a frame of its own (the open events frame is closed first). The vCPU state and
    /// each page go as a delta against the references (`References`) when that is smaller, raw otherwise.
    /// Page numbers must be strictly ascending; pageData holds pageNumbers.count * 4096 bytes.
    public func appendSyncPoint(exit: UInt64, signature: ExitSignature, vcpuState: UnsafeRawBufferPointer,
                                pageNumbers: UnsafeBufferPointer<UInt32>, pageData: UnsafeRawBufferPointer) {
        precondition(exit >= lastExit, "sync point exit \(exit) is before the previous exit \(lastExit)")
        precondition(pageData.count == pageNumbers.count * LogFormat.pageSize, "pageData must hold 4096 bytes per page")
        var numbersSize = 0
        var prev: Int64 = -1
        for n in pageNumbers {
            precondition(Int64(n) > prev, "sync point page numbers must be strictly ascending")
            numbersSize += varintSize(UInt64(Int64(n) - prev - 1))
            prev = Int64(n)
        }
        // The payload when every item is raw: no encoding is larger.
        let bound = 8 + 4 + 1 + 1 + varintSize(UInt64(vcpuState.count)) + vcpuState.count
            + varintSize(UInt64(pageNumbers.count)) + numbersSize + pageNumbers.count * (1 + LogFormat.pageSize)
        precondition(bound <= LogFormat.maxSyncPointPayload,
                     "sync point of \(bound) bytes exceeds the \(LogFormat.maxSyncPointPayload)-byte frame bound")
        closeOpenFrame()
        ensure(LogFormat.frameHeaderSize + bound)
        let start = used
        let p = buffer
        var i = start + LogFormat.frameHeaderSize
        storeLE64(exit, p, i); i += 8
        storeLE32(signature.raw, p, i); i += 4
        p.storeBytes(of: resetPending ? SyncPointFlags.resetReferences : 0, toByteOffset: i, as: UInt8.self); i += 1
        resetPending = false
        // No local copy of the reference: `storeState` below would then copy it to write in place.
        references.state.withUnsafeBytes { ref in
            putItem(vcpuState.baseAddress, count: vcpuState.count, reference: ref.count == vcpuState.count ? ref.baseAddress : nil,
                    lengthFirst: true, at: &i)
        }
        references.storeState(vcpuState)
        storeVarint(UInt64(pageNumbers.count), p, &i)
        prev = -1
        for n in pageNumbers {
            storeVarint(UInt64(Int64(n) - prev - 1), p, &i)
            prev = Int64(n)
        }
        let cached = pageNumbers.count <= References.maxPages
        for (k, n) in pageNumbers.enumerated() {
            let page = pageData.baseAddress! + k * LogFormat.pageSize
            putItem(page, count: LogFormat.pageSize, reference: cached ? references.page(n) : nil, lengthFirst: false, at: &i)
            if cached { references.store(n, page) }
        }
        let payload = i - start - LogFormat.frameHeaderSize
        assert(payload <= bound)
        used = i
        writeHeader(at: start, kind: .syncPoint, payloadLength: payload)
        lastExit = exit
        syncPointCount += 1
        syncPointBytes += UInt64(payload)
    }

    /// Writes one item of a sync point at `i`: its encoding byte, then (the state: its length, then) raw bytes,
    /// or a delta's length and the delta when it saves at least 16 bytes.
    private func putItem(_ bytes: UnsafeRawPointer?, count: Int, reference: UnsafeRawPointer?, lengthFirst: Bool, at i: inout Int) {
        let p = buffer
        let tagAt = i
        i += 1
        if lengthFirst { storeVarint(UInt64(count), p, &i) }
        if let ref = reference, let cur = bytes, count > 32 {
            if scratch.count < count { scratch = [UInt8](repeating: 0, count: max(count, LogFormat.pageSize)) }
            let n = scratch.withUnsafeMutableBytes { s in
                // SAFETY: ref and cur hold `count` bytes (a page, or a state of the reference's length); s holds ≥ count.
                lk_delta_encode(ref.assumingMemoryBound(to: UInt8.self), cur.assumingMemoryBound(to: UInt8.self), count,
                                s.baseAddress!.assumingMemoryBound(to: UInt8.self), count - 16)
            }
            if n >= 0 {
                p.storeBytes(of: ItemEncoding.delta.rawValue, toByteOffset: tagAt, as: UInt8.self)
                storeVarint(UInt64(n), p, &i)
                scratch.withUnsafeBytes { s in (p + i).copyMemory(from: s.baseAddress!, byteCount: n) }
                i += n
                deltaItems += 1
                return
            }
        }
        p.storeBytes(of: ItemEncoding.raw.rawValue, toByteOffset: tagAt, as: UInt8.self)
        if let b = bytes, count > 0 { (p + i).copyMemory(from: b, byteCount: count) }
        i += count
    }

    /// Drops the references: the next sync point is encoded without them and tells readers to drop theirs.
    /// For a reader that starts here (a secondary seeded at this point of the stream).
    public func resetReferences() {
        references.reset()
        resetPending = true
    }

    /// Seals buffered events into one frame and hands each buffered frame's bytes to body, in order
    /// (one call per frame; the bytes are valid only during the call). No-op when empty.
    /// If body throws, the frames it did not accept stay buffered (already sealed) and a later call hands them out again.
    public func sealFrame<E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> Void) throws(E) {
        closeOpenFrame()
        var pos = 0
        while pos < used {
            let len = LogFormat.frameHeaderSize + Int(loadLE32(UnsafeRawBufferPointer(start: buffer + pos, count: 12), 8))
            do {
                try body(UnsafeRawBufferPointer(start: buffer + pos, count: len))
            } catch {
                if pos > 0 {
                    (buffer).copyMemory(from: buffer + pos, byteCount: used - pos)
                    used -= pos
                }
                throw error
            }
            pos += len
        }
        used = 0
        // A large sync point grew the buffer: give the memory back (sync points are rare).
        let normal = Self.defaultCapacity(frameTarget)
        if capacity > 4 * normal {
            buffer.deallocate()
            capacity = normal
            buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
        }
    }

    /// Seals what is buffered (as `sealFrame`), then hands body the trailer frame, which ends the stream.
    /// The trailer's event and sync point counts must match what was appended.
    public func sealTrailer<E: Error>(_ trailer: LogTrailer, _ body: (UnsafeRawBufferPointer) throws(E) -> Void) throws(E) {
        precondition(trailer.eventCount == eventCount && trailer.syncPointCount == syncPointCount,
                     "trailer counts (\(trailer.eventCount) events, \(trailer.syncPointCount) sync points) differ from "
                     + "what was encoded (\(eventCount), \(syncPointCount))")
        try sealFrame(body)
        let n = LogFormat.frameHeaderSize + LogFormat.trailerPayloadSize
        ensure(n)
        trailer.store(into: buffer + LogFormat.frameHeaderSize)
        let seq = nextSequence
        writeHeader(at: 0, kind: .trailer, payloadLength: LogFormat.trailerPayloadSize)
        used = n
        do {
            try body(UnsafeRawBufferPointer(start: buffer, count: n))
        } catch {
            // Keep the trailer buffered under its sequence number so a retry re-sends the same frame.
            nextSequence = seq
            used = 0
            throw error
        }
        used = 0
    }
}
