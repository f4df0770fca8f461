import CLockstep

// Constants and byte-level helpers of the log format. docs/log-format.md describes every byte.

/// Sizes and bounds of the format. A reader checks every length against these before allocating.
public enum LogFormat {
    /// "LOCKSTEP" at offset 0 of a file.
    public static let magic: [UInt8] = Array("LOCKSTEP".utf8)
    /// "LKSTPEND": the last 8 bytes of a finished file.
    public static let footerMagic: [UInt8] = Array("LKSTPEND".utf8)
    /// magic(8) version(2) flags(2) fieldsLength(4).
    public static let fileHeaderPrefixSize = 16
    /// Upper bound of the header field area (the embedded guest image dominates it).
    public static let maxHeaderFieldsLength = 256 << 20
    /// kind(1) flags(1) reserved(2) sequence(4) payloadLength(4) crc32c(4).
    public static let frameHeaderSize = 16
    /// Bound of an events frame payload. The encoder closes a frame before it would exceed it.
    public static let maxEventsPayload = 16 << 20
    /// Bound of a sync point frame payload (one sync point per frame): 1 GiB, about 262,000 dirty pages.
    public static let maxSyncPointPayload = 1 << 30
    /// endReason(1) exitStatus(4) finalExit(8) eventCount(8) syncPointCount(8) stateDigest(32).
    public static let trailerPayloadSize = 61
    /// trailerOffset(8) trailerLength(4) crc32c(4) magic(8).
    public static let footerSize = 24
    public static let pageSize = 4096
    /// Largest event encoding: tag 1 + exit delta varint 10 + signature 4 + payload varint 10.
    static let maxEventSize = 25

    static func maxPayload(for kind: FrameKind) -> Int {
        switch kind {
        case .events: return maxEventsPayload
        case .syncPoint: return maxSyncPointPayload
        case .trailer: return trailerPayloadSize
        }
    }
}

/// The kind byte of a frame. 0 is invalid.
public enum FrameKind: UInt8, Sendable, CaseIterable {
    case events = 1
    case syncPoint = 2
    case trailer = 3
}

/// The fixed 16-byte header of a frame, as found on disk or on the wire.
public struct FrameHeader: Equatable, Sendable {
    public var kind: FrameKind
    public var sequence: UInt32
    public var payloadLength: Int
    public var crc: UInt32
    /// The whole frame, header included.
    public var frameLength: Int { LogFormat.frameHeaderSize + payloadLength }

    /// Parses and bound-checks a frame header (not its CRC, which covers the payload too).
    /// `offset` is where the frame starts, for error messages. Lets a stream reader learn how many bytes to read.
    public static func parse(_ bytes: UnsafeRawBufferPointer, at offset: UInt64 = 0) throws(LogError) -> FrameHeader {
        guard bytes.count >= LogFormat.frameHeaderSize else {
            throw .corrupt(offset: offset, detail: "frame header needs \(LogFormat.frameHeaderSize) bytes, have \(bytes.count)")
        }
        let rawKind = bytes[0]
        guard let kind = FrameKind(rawValue: rawKind) else {
            throw .corrupt(offset: offset, detail: "unknown frame kind \(rawKind)")
        }
        guard bytes[1] == 0, bytes[2] == 0, bytes[3] == 0 else {
            throw .corrupt(offset: offset + 1, detail: "frame flags/reserved bytes are not zero")
        }
        let seq = loadLE32(bytes, 4)
        let len = Int(loadLE32(bytes, 8))
        let bound = LogFormat.maxPayload(for: kind)
        guard len <= bound else {
            throw .corrupt(offset: offset + 8, detail: "frame \(seq): \(kind) payload length \(len) exceeds the bound \(bound)")
        }
        if kind == .trailer && len != LogFormat.trailerPayloadSize {
            throw .corrupt(offset: offset + 8, detail: "frame \(seq): trailer payload length \(len), expected \(LogFormat.trailerPayloadSize)")
        }
        return FrameHeader(kind: kind, sequence: seq, payloadLength: len, crc: loadLE32(bytes, 12))
    }
}

// MARK: - little-endian helpers

@inline(__always) func loadLE16(_ b: UnsafeRawBufferPointer, _ i: Int) -> UInt16 {
    UInt16(littleEndian: b.loadUnaligned(fromByteOffset: i, as: UInt16.self))
}
@inline(__always) func loadLE32(_ b: UnsafeRawBufferPointer, _ i: Int) -> UInt32 {
    UInt32(littleEndian: b.loadUnaligned(fromByteOffset: i, as: UInt32.self))
}
@inline(__always) func loadLE64(_ b: UnsafeRawBufferPointer, _ i: Int) -> UInt64 {
    UInt64(littleEndian: b.loadUnaligned(fromByteOffset: i, as: UInt64.self))
}
@inline(__always) func storeLE16(_ v: UInt16, _ p: UnsafeMutableRawPointer, _ i: Int) {
    p.storeBytes(of: v.littleEndian, toByteOffset: i, as: UInt16.self)
}
@inline(__always) func storeLE32(_ v: UInt32, _ p: UnsafeMutableRawPointer, _ i: Int) {
    p.storeBytes(of: v.littleEndian, toByteOffset: i, as: UInt32.self)
}
@inline(__always) func storeLE64(_ v: UInt64, _ p: UnsafeMutableRawPointer, _ i: Int) {
    p.storeBytes(of: v.littleEndian, toByteOffset: i, as: UInt64.self)
}
/// LEB128: 7 bits per byte, low bits first, high bit set on every byte but the last.
@inline(__always) func storeVarint(_ value: UInt64, _ p: UnsafeMutableRawPointer, _ i: inout Int) {
    var v = value
    while v >= 0x80 {
        p.storeBytes(of: UInt8(truncatingIfNeeded: v) | 0x80, toByteOffset: i, as: UInt8.self)
        i += 1
        v >>= 7
    }
    p.storeBytes(of: UInt8(v), toByteOffset: i, as: UInt8.self)
    i += 1
}
@inline(__always) func varintSize(_ value: UInt64) -> Int {
    var v = value, n = 1
    while v >= 0x80 { v >>= 7; n += 1 }
    return n
}
@inline(__always) func zigzag(_ d: Int64) -> UInt64 { UInt64(bitPattern: (d << 1) ^ (d >> 63)) }
@inline(__always) func unzigzag(_ u: UInt64) -> Int64 { Int64(bitPattern: u >> 1) ^ -Int64(bitPattern: u & 1) }

func crc32c(_ b: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
    guard let base = b.baseAddress, b.count > 0 else { return seed }
    return lk_crc32c(seed, base, b.count)
}

/// The CRC of a frame: over its first 12 header bytes, then its payload.
func frameCRC(_ frame: UnsafeRawBufferPointer) -> UInt32 {
    let head = UnsafeRawBufferPointer(rebasing: frame[0..<12])
    let payload = UnsafeRawBufferPointer(rebasing: frame[LogFormat.frameHeaderSize...])
    return crc32c(payload, seed: crc32c(head))
}

// MARK: - bounds-checked reading

/// What a cursor reads, for its messages ("frame 12 (sync point)", "header"); a string only once a read fails.
enum CursorContext {
    case frame(UInt32, kind: StaticString)
    case named(StaticString)

    var text: String {
        switch self {
        case .frame(let seq, let kind): return kind.utf8CodeUnitCount == 0 ? "frame \(seq)" : "frame \(seq) (\(kind))"
        case .named(let name): return "\(name)"
        }
    }
}

/// Reads a byte range; every read is bounds-checked and fails with `corrupt` naming the file offset and frame.
/// Names of what is read are autoclosures: a decode that succeeds builds no strings (it runs per batch).
struct ByteCursor {
    let bytes: UnsafeRawBufferPointer
    var pos: Int
    let end: Int
    /// File/stream offset of bytes[0].
    let baseOffset: UInt64
    let context: CursorContext

    init(_ bytes: UnsafeRawBufferPointer, from: Int, to: Int, baseOffset: UInt64, context: CursorContext) {
        self.bytes = bytes; self.pos = from; self.end = to; self.baseOffset = baseOffset; self.context = context
    }

    var remaining: Int { end - pos }
    var atEnd: Bool { pos >= end }
    var offset: UInt64 { baseOffset + UInt64(pos) }

    func fail(_ detail: String, at p: Int? = nil) -> LogError {
        .corrupt(offset: baseOffset + UInt64(p ?? pos), detail: "\(context.text): \(detail)")
    }
    @inline(__always) mutating func need(_ n: Int, _ what: @autoclosure () -> String) throws(LogError) {
        guard n >= 0, n <= end - pos else {
            throw fail("\(what()) needs \(n) bytes but only \(end - pos) remain")
        }
    }
    @inline(__always) mutating func u8(_ what: @autoclosure () -> String) throws(LogError) -> UInt8 {
        try need(1, what())
        defer { pos += 1 }
        return bytes[pos]
    }
    @inline(__always) mutating func u16(_ what: @autoclosure () -> String) throws(LogError) -> UInt16 {
        try need(2, what())
        defer { pos += 2 }
        return loadLE16(bytes, pos)
    }
    @inline(__always) mutating func u32(_ what: @autoclosure () -> String) throws(LogError) -> UInt32 {
        try need(4, what())
        defer { pos += 4 }
        return loadLE32(bytes, pos)
    }
    @inline(__always) mutating func u64(_ what: @autoclosure () -> String) throws(LogError) -> UInt64 {
        try need(8, what())
        defer { pos += 8 }
        return loadLE64(bytes, pos)
    }
    @inline(__always) mutating func varint(_ what: @autoclosure () -> String) throws(LogError) -> UInt64 {
        let start = pos
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard pos < end else { throw fail("\(what()) varint runs past the end", at: start) }
            let b = bytes[pos]
            pos += 1
            if shift == 63 && b > 1 { throw fail("\(what()) varint overflows 64 bits", at: start) }
            result |= UInt64(b & 0x7F) << shift
            if b & 0x80 == 0 { return result }
            shift += 7
        }
    }
    mutating func bytes(_ n: Int, _ what: @autoclosure () -> String) throws(LogError) -> [UInt8] {
        try need(n, what())
        defer { pos += n }
        return Array(UnsafeRawBufferPointer(rebasing: bytes[pos..<pos + n]))
    }
}

// MARK: - typed-throws access to array bytes (Array.withUnsafeBytes rethrows `any Error`)

extension Array where Element == UInt8 {
    @inline(__always) func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws(LogError) -> R) throws(LogError) -> R {
        var result: Result<R, LogError>?
        withUnsafeBytes { b in result = Result { () throws(LogError) -> R in try body(b) } }
        return try result!.get()
    }
    @inline(__always) mutating func withMutableBytes<R>(
        _ body: (UnsafeMutableRawBufferPointer) throws(LogError) -> R) throws(LogError) -> R {
        var result: Result<R, LogError>?
        withUnsafeMutableBytes { b in result = Result { () throws(LogError) -> R in try body(b) } }
        return try result!.get()
    }
}
