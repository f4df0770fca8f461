/// Frame types (u8 on the wire; 0 is invalid so a zeroed header never parses).
public enum FrameType: UInt8, Sendable, Equatable, CaseIterable, CustomStringConvertible {
    case hello = 1        // initiator -> responder: version, role, encryption mode, nonce, payload
    case helloReply = 2   // responder -> initiator: same + responder's HMAC proof
    case helloAuth = 3    // initiator -> responder: initiator's HMAC proof
    case helloDone = 4    // responder -> initiator: proof accepted, session (maybe encrypted) starts
    case log = 5          // exit index reached + opaque event-log bytes
    case ack = 6          // cumulative exit index held + replayed
    case heartbeat = 7    // timestamp + echo of the peer's last timestamp (RTT)
    case status = 8       // opaque status bytes
    case goodbye = 9      // orderly close, with a reason text
    case error = 10       // reason code + text; the sender drops the connection
    case bulk = 11        // opaque bulk data after the handshake (guest image, seed pages)
    case logPart = 12     // a leading part of a log batch: event-log bytes; the batch's `log` frame follows

    public var description: String {
        switch self {
        case .hello: "hello"; case .helloReply: "helloReply"; case .helloAuth: "helloAuth"
        case .helloDone: "helloDone"; case .log: "log"; case .ack: "ack"; case .heartbeat: "heartbeat"
        case .status: "status"; case .goodbye: "goodbye"; case .error: "error"; case .bulk: "bulk"
        case .logPart: "logPart"
        }
    }

    /// Largest body (as sent: including the GCM tag) this type may announce. Checked on the
    /// 12-byte header, before any allocation for the body.
    public var maxBodyBytes: UInt32 {
        switch self {
        case .log, .logPart: UInt32(FrameLayout.logPartBytes) + 64
        case .bulk: FrameLayout.maxBulkPayload + 64
        case .hello, .helloReply: FrameLayout.maxHelloPayload + 256
        default: FrameLayout.maxSmallBody
        }
    }
}

/// Byte layout of a frame header (see docs/protocol.md). All integers little-endian.
///
///     0  u32 body length (bytes after the header; includes the 16-byte GCM tag when encrypted)
///     4  u8  type
///     5  u8  flags (bit 0: body is AES-256-GCM ciphertext + tag)
///     6  u8  'L'  (0x4C) magic
///     7  u8  'K'  (0x4B) magic
///     8  u32 CRC32C of the body exactly as sent
///     12 body
public enum FrameLayout {
    public static let headerBytes = 12
    /// Header bytes authenticated as AAD when encrypted (everything but the CRC, which covers the ciphertext).
    public static let aadBytes = 8
    public static let magic0: UInt8 = 0x4C
    public static let magic1: UInt8 = 0x4B
    public static let flagEncrypted: UInt8 = 0x01
    public static let knownFlags: UInt8 = 0x01
    public static let tagBytes = 16
    /// Largest bulk payload (a chunk of seed pages).
    public static let maxBulkPayload: UInt32 = 64 << 20
    /// Largest log bytes per frame: a larger batch (a sync point of many pages) leaves as `logPart` frames and
    /// a closing `log` frame, each sealed and sent on its own, so bytes flow while it is sealed and the other
    /// frames (heartbeats) are not held up behind it.
    public static let logPartBytes = 256 << 10
    /// Largest log batch, all parts together: a sync point at the log format's 1 GiB bound and its events.
    public static let maxLogBatch = (1 << 30) + (64 << 20)
    public static let maxHelloPayload: UInt32 = 1 << 20
    public static let maxSmallBody: UInt32 = 64 << 10
}

/// One frame, decrypted and checked: its type and its plaintext body.
public struct Frame: Sendable, Equatable {
    public var type: FrameType
    public var body: [UInt8]
    public init(type: FrameType, body: [UInt8]) { self.type = type; self.body = body }
}

// MARK: typed bodies

/// A batch of event-log bytes; `exitIndex` is the exit index the batch reaches.
public struct LogBatch: Sendable, Equatable {
    public var exitIndex: UInt64
    public var bytes: [UInt8]
    public init(exitIndex: UInt64, bytes: [UInt8]) { self.exitIndex = exitIndex; self.bytes = bytes }
}

/// Cumulative acknowledgement from the secondary.
public struct Ack: Sendable, Equatable {
    /// Highest exit index whose log the secondary holds (received and buffered).
    public var heldExitIndex: UInt64
    /// How far the secondary has replayed.
    public var replayedExitIndex: UInt64
    public init(heldExitIndex: UInt64, replayedExitIndex: UInt64) {
        self.heldExitIndex = heldExitIndex; self.replayedExitIndex = replayedExitIndex
    }
}

/// Heartbeat: the sender's monotonic time, and the last peer timestamp it saw (0 = none) for RTT.
public struct Heartbeat: Sendable, Equatable {
    public var sentNs: UInt64
    public var echoNs: UInt64
    public init(sentNs: UInt64, echoNs: UInt64) { self.sentNs = sentNs; self.echoNs = echoNs }
}

/// Decoded post-handshake message.
public enum Message: Sendable, Equatable {
    case log(LogBatch)
    case ack(Ack)
    case heartbeat(Heartbeat)
    case status([UInt8])
    case goodbye(String)
    case bulk([UInt8])
}

extension Message {
    /// Decodes a post-handshake message from its body where it lies (a frame's array, or the connection's
    /// receive buffer): acks and heartbeats without an allocation, a log batch with one copy. Handshake and
    /// error frames are not messages.
    static func decode(_ type: FrameType, _ body: UnsafeRawBufferPointer) throws -> Message {
        func u64(_ at: Int) throws -> UInt64 {
            guard body.count - at >= 8 else {
                throw ChannelError.malformedBody(type: type, reason: "truncated at byte \(at): need 8, have \(max(body.count - at, 0))")
            }
            return UInt64(littleEndian: body.loadUnaligned(fromByteOffset: at, as: UInt64.self))
        }
        func end(_ at: Int) throws {
            if body.count != at { throw ChannelError.malformedBody(type: type, reason: "\(body.count - at) trailing bytes") }
        }
        switch type {
        case .log: return .log(LogBatch(exitIndex: try u64(0), bytes: Array(body[8...])))
        case .ack:
            let a = Ack(heldExitIndex: try u64(0), replayedExitIndex: try u64(8)); try end(16); return .ack(a)
        case .heartbeat:
            let h = Heartbeat(sentNs: try u64(0), echoNs: try u64(8)); try end(16); return .heartbeat(h)
        case .status: return .status(Array(body))
        case .goodbye: return .goodbye(String(decoding: body, as: UTF8.self))
        case .bulk: return .bulk(Array(body))
        case .logPart, .hello, .helloReply, .helloAuth, .helloDone, .error:
            throw ChannelError.unexpectedFrame(expected: "a post-handshake message", got: type)
        }
    }
}

extension Frame {
    public static func log(_ b: LogBatch) -> Frame {
        var w = ByteWriter(capacity: 8 + b.bytes.count); w.u64(b.exitIndex); w.bytes(b.bytes)
        return Frame(type: .log, body: w.out)
    }
    public static func ack(_ a: Ack) -> Frame {
        var w = ByteWriter(capacity: 16); w.u64(a.heldExitIndex); w.u64(a.replayedExitIndex)
        return Frame(type: .ack, body: w.out)
    }
    public static func heartbeat(_ h: Heartbeat) -> Frame {
        var w = ByteWriter(capacity: 16); w.u64(h.sentNs); w.u64(h.echoNs)
        return Frame(type: .heartbeat, body: w.out)
    }
    public static func status(_ bytes: [UInt8]) -> Frame { Frame(type: .status, body: bytes) }
    public static func goodbye(_ reason: String) -> Frame { Frame(type: .goodbye, body: Array(reason.utf8)) }
    public static func bulk(_ bytes: [UInt8]) -> Frame { Frame(type: .bulk, body: bytes) }
    public static func error(_ code: ErrorCode, detail: UInt16 = 0, _ text: String) -> Frame {
        var w = ByteWriter(capacity: 4 + text.utf8.count); w.u16(code.rawValue); w.u16(detail); w.bytes(Array(text.utf8))
        return Frame(type: .error, body: w.out)
    }

    /// Decodes a post-handshake frame body. Handshake and error frames are not messages.
    public func decode() throws -> Message {
        try body.withUnsafeBytes { b throws in try Message.decode(type, b) }
    }

    /// Decodes an `error` frame body: (code, detail, text).
    func decodeError() -> (ErrorCode, UInt16, String) {
        var r = ByteReader(body, type: .error)
        let code = (try? r.u16()) ?? ErrorCode.unknown.rawValue
        let detail = (try? r.u16()) ?? 0
        return (ErrorCode(rawValue: code) ?? .unknown, detail, String(decoding: r.rest(), as: UTF8.self))
    }
}

// MARK: little-endian byte helpers

struct ByteWriter {
    var out: [UInt8]
    init(capacity: Int) { out = []; out.reserveCapacity(capacity) }
    mutating func u8(_ v: UInt8) { out.append(v) }
    mutating func u16(_ v: UInt16) { out.append(UInt8(v & 0xFF)); out.append(UInt8(v >> 8)) }
    mutating func u32(_ v: UInt32) { for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
    mutating func u64(_ v: UInt64) { for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
    mutating func bytes(_ b: [UInt8]) { out.append(contentsOf: b) }
}

struct ByteReader {
    let data: [UInt8]
    let type: FrameType
    var pos = 0
    init(_ data: [UInt8], type: FrameType) { self.data = data; self.type = type }
    mutating func take(_ n: Int) throws -> ArraySlice<UInt8> {
        guard data.count - pos >= n else {
            throw ChannelError.malformedBody(type: type, reason: "truncated at byte \(pos): need \(n), have \(data.count - pos)")
        }
        defer { pos += n }
        return data[pos..<pos + n]
    }
    mutating func u8() throws -> UInt8 { try take(1).first! }
    mutating func u16() throws -> UInt16 { let s = try take(2); return UInt16(s[s.startIndex]) | UInt16(s[s.startIndex + 1]) << 8 }
    mutating func u32() throws -> UInt32 {
        let s = try take(4); var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(s[s.startIndex + i]) << (8 * UInt32(i)) }
        return v
    }
    mutating func u64() throws -> UInt64 {
        let s = try take(8); var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(s[s.startIndex + i]) << (8 * UInt64(i)) }
        return v
    }
    mutating func rest() -> [UInt8] { defer { pos = data.count }; return Array(data[pos...]) }
    func end() throws {
        if pos != data.count { throw ChannelError.malformedBody(type: type, reason: "\(data.count - pos) trailing bytes") }
    }
}

@inline(__always) func loadLE32(_ p: UnsafeRawPointer) -> UInt32 { UInt32(littleEndian: p.loadUnaligned(as: UInt32.self)) }
@inline(__always) func storeLE32(_ p: UnsafeMutableRawPointer, _ v: UInt32) { p.storeBytes(of: v.littleEndian, as: UInt32.self) }
@inline(__always) func storeLE64(_ p: UnsafeMutableRawPointer, _ v: UInt64) { p.storeBytes(of: v.littleEndian, as: UInt64.self) }
