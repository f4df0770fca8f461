#if canImport(Glibc)
import Glibc
#endif

/// Everything that can go wrong reading or writing a log. Every case says what is wrong and where.
public enum LogError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The file does not start with the log magic.
    case notALog(path: String)
    /// The log was written by a format version this build cannot read.
    case unsupportedVersion(found: UInt16, supported: UInt16)
    /// The file ends before a structure that it announces (header, frame).
    case truncated(path: String, offset: UInt64, detail: String)
    /// A checksum, length, kind or value is wrong at `offset` (bytes from the start of the file or stream).
    case corrupt(offset: UInt64, detail: String)
    /// The file has no valid footer/trailer: the writer never finished it.
    case incomplete(path: String)
    /// A system call failed.
    case io(path: String, errno: Int32, detail: String)
    /// A frame arrived with the wrong sequence number: a frame was lost, duplicated or reordered.
    case outOfSequence(offset: UInt64, expected: UInt32, found: UInt32)
    /// The header has a field marked required that this build does not know.
    case unsupportedField(id: UInt16, offset: UInt64)

    public var description: String {
        switch self {
        case .notALog(let path):
            return "\(path): not a Lockstep log (the first 8 bytes are not \"LOCKSTEP\")"
        case .unsupportedVersion(let found, let supported):
            return "log format version \(found) is not supported (this build reads version \(supported))"
        case .truncated(let path, let offset, let detail):
            return "\(path): truncated log at byte \(offset): \(detail)"
        case .corrupt(let offset, let detail):
            return "corrupt log at byte \(offset): \(detail)"
        case .incomplete(let path):
            return "\(path): incomplete log: no valid trailer at the end of the file. The recorder did not finish it "
                + "(it crashed, was killed, ran out of disk, or the file was truncated or appended to). "
                + "A log that is still being written, or was abandoned, is named <path>.partial."
        case .io(let path, let code, let detail):
            let reason: String
            if code == ENOSPC {
                reason = "disk full (ENOSPC)"
            } else if let s = strerror(code) {
                reason = "\(String(cString: s)) (errno \(code))"
            } else {
                reason = "errno \(code)"
            }
            return "\(path): \(detail): \(reason)"
        case .outOfSequence(let offset, let expected, let found):
            return "frame sequence gap at byte \(offset): expected frame \(expected), found frame \(found) "
                + "(a frame was lost, duplicated or reordered)"
        case .unsupportedField(let id, let offset):
            return "header field \(id) at byte \(offset) is marked required but unknown to this build (log written by a newer Lockstep?)"
        }
    }
}
