/// Everything that can go wrong on the FT link. Protocol errors (anything about bytes received)
/// drop the connection; the peer is told with an `error` frame when the socket still works.
public enum ChannelError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A syscall failed (name + errno).
    case system(SystemCallError)
    /// Name resolution failed for host.
    case resolveFailed(host: String, reason: String)
    /// Nothing listens on host:port (ECONNREFUSED).
    case connectionRefused(host: String, port: UInt16)
    /// No answer from host:port within the timeout.
    case connectTimeout(host: String, port: UInt16, ms: Int)
    /// No route / network unreachable (errno kept).
    case unreachable(host: String, port: UInt16, errno: Int32)
    /// `receive`/`accept` saw nothing within the timeout. The connection stays usable.
    case timeout(ms: Int)
    /// The peer closed the TCP connection (EOF), possibly in the middle of a frame.
    case peerClosed(midFrame: Bool)
    /// This side closed the connection already.
    case closed
    /// The first two header bytes after the length are not the frame magic: garbage on the link.
    case badMagic(UInt16)
    /// Frame type 0 or a value this version does not know.
    case unknownFrameType(UInt8)
    /// Frame flags carry bits this version does not know.
    case unknownFlags(UInt8)
    /// The header announces more bytes than the type allows; rejected before allocating.
    case frameTooLarge(type: FrameType, length: UInt32, limit: UInt32)
    /// CRC32C of the body does not match the header.
    case checksumMismatch(expected: UInt32, actual: UInt32)
    /// A body that does not parse as its type says.
    case malformedBody(type: FrameType, reason: String)
    /// A frame arrived that is not allowed at this point (e.g. log before the handshake).
    case unexpectedFrame(expected: String, got: FrameType)
    /// The peer speaks another protocol version.
    case versionMismatch(local: UInt16, remote: UInt16)
    /// The peer does not know the pre-shared key (or this side does not). No key ever crosses the wire.
    case authenticationFailed
    /// Encryption negotiation failed: one side requires it and the other has it disabled.
    case encryptionRefused(String)
    /// Both ends claim the same role (two primaries or two secondaries).
    case roleConflict(PeerRole)
    /// AES-GCM tag check failed: the frame was tampered with, reordered, replayed, or the keys differ.
    case decryptionFailed(type: FrameType)
    /// An encrypted frame on a clear session or vice versa.
    case encryptionFlagMismatch(sessionEncrypted: Bool)
    /// The peer sent an `error` frame.
    case peerError(code: ErrorCode, message: String)
    /// The pre-shared key is unusable (too short, unreadable).
    case invalidKey(String)
    /// OpenSSL failed (should not happen).
    case crypto(String)
    /// The control socket (`--control`): a bad path, or a request line too long.
    case control(String)

    public var description: String {
        switch self {
        case .system(let e): return "system call failed: \(e)"
        case .resolveFailed(let h, let r): return "cannot resolve \(h): \(r)"
        case .connectionRefused(let h, let p): return "connection refused by \(h):\(p) (is the peer listening?)"
        case .connectTimeout(let h, let p, let ms): return "no answer from \(h):\(p) within \(ms) ms"
        case .unreachable(let h, let p, let e): return "\(h):\(p) unreachable: \(SystemCallError(call: "connect", errno: e))"
        case .timeout(let ms): return "nothing received within \(ms) ms"
        case .peerClosed(let mid): return mid ? "peer closed the connection in the middle of a frame" : "peer closed the connection"
        case .closed: return "connection already closed"
        case .badMagic(let m): return "garbage on the link: bad frame magic 0x\(String(m, radix: 16))"
        case .unknownFrameType(let t): return "unknown frame type \(t)"
        case .unknownFlags(let f): return "unknown frame flags 0x\(String(f, radix: 16))"
        case .frameTooLarge(let t, let l, let lim): return "\(t) frame of \(l) bytes exceeds the \(lim)-byte limit"
        case .checksumMismatch(let e, let a): return "frame checksum mismatch: header says 0x\(String(e, radix: 16)), body has 0x\(String(a, radix: 16))"
        case .malformedBody(let t, let r): return "malformed \(t) frame: \(r)"
        case .unexpectedFrame(let e, let g): return "unexpected \(g) frame (expected \(e))"
        case .versionMismatch(let l, let r): return "protocol version mismatch: this side speaks v\(l), the peer v\(r)"
        case .authenticationFailed: return "authentication failed: the peer does not hold the same pre-shared key"
        case .encryptionRefused(let s): return "encryption negotiation refused: \(s)"
        case .roleConflict(let r): return "both ends claim the role \(r)"
        case .decryptionFailed(let t): return "\(t) frame failed authentication (tampered, replayed or wrong key)"
        case .encryptionFlagMismatch(let enc): return enc ? "clear frame on an encrypted session" : "encrypted frame on a clear session"
        case .peerError(let c, let m): return "peer reported \(c): \(m)"
        case .invalidKey(let s): return "invalid pre-shared key: \(s)"
        case .crypto(let s): return "OpenSSL failure: \(s)"
        case .control(let s): return s
        }
    }

    /// The code sent to the peer in an `error` frame when this error drops the connection.
    var wireCode: ErrorCode {
        switch self {
        case .versionMismatch: return .versionMismatch
        case .authenticationFailed: return .authenticationFailed
        case .encryptionRefused: return .encryptionRefused
        case .roleConflict: return .roleConflict
        case .checksumMismatch: return .badChecksum
        case .decryptionFailed, .encryptionFlagMismatch: return .decryptionFailed
        case .badMagic, .unknownFrameType, .unknownFlags, .frameTooLarge, .malformedBody, .unexpectedFrame: return .protocolViolation
        default: return .internalError
        }
    }
}

/// Reason codes carried in `error` frames (u16 on the wire).
public enum ErrorCode: UInt16, Sendable, Equatable {
    case protocolViolation = 1
    case versionMismatch = 2
    case authenticationFailed = 3
    case encryptionRefused = 4
    case roleConflict = 5
    case badChecksum = 6
    case decryptionFailed = 7
    case internalError = 8
    case shuttingDown = 9
    case unknown = 0xFFFF
}
