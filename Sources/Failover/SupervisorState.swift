import EventLog
#if canImport(Glibc)
import Glibc
#endif

/// What a supervisor keeps across its own restarts (`lockstep supervise --state-file FILE`): the address its
/// peer moved to (an operator's `control … peer`, or the target of a migration that let this side go) and
/// the `--peer` that move replaced. An init system starts a supervisor again from its unit's command line;
/// without this file a side would, once live, look for its secondary on the host the pair left.
///
/// Layout (text, one field a line; written whole under a temporary name, fsynced, then renamed):
///
///     lockstep-supervise-state 1
///     given HOST:PORT      the command line's --peer the move replaced
///     peer HOST:PORT       the address this side's runs take instead
///
/// The move applies only while the command line still says `given`: an operator who edited `--peer` since
/// meant the new address.
public struct SupervisorState: Sendable, Equatable {
    public static let magic = "lockstep-supervise-state"
    public static let version = 1
    static let maxBytes = 4096

    public var given: String
    public var peer: String

    public init(given: String, peer: String) {
        self.given = given
        self.peer = peer
    }

    public func encoded() -> String { "\(Self.magic) \(Self.version)\ngiven \(given)\npeer \(peer)\n" }

    public init(parsing text: String, path: String) throws(SupervisorStateError) {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        guard text.hasSuffix("\n") else { throw .malformed(path: path, line: lines.count, reason: "it ends inside a line (truncated)") }
        let head = lines[0].split(separator: " ")
        guard head.count == 2, head[0] == Self.magic else {
            throw .malformed(path: path, line: 1, reason: "not a supervisor's state file (it starts '\(lines[0].prefix(40))')")
        }
        guard let v = Int(head[1]), v == Self.version else { throw .wrongVersion(path: path, found: String(head[1])) }
        guard lines.count == 4 else { throw .malformed(path: path, line: min(lines.count, 4), reason: "3 lines expected, \(lines.count - 1) found") }
        func field(_ i: Int, _ name: String) throws(SupervisorStateError) -> String {
            let parts = lines[i].split(separator: " ", omittingEmptySubsequences: false)
            guard parts.count == 2, parts[0] == name else {
                throw .malformed(path: path, line: i + 1, reason: "'\(name) HOST:PORT' expected, found '\(lines[i].prefix(80))'")
            }
            let address = String(parts[1])
            guard Self.isAddress(address) else { throw .malformed(path: path, line: i + 1, reason: "'\(address.prefix(80))' is not HOST:PORT") }
            return address
        }
        given = try field(1, "given")
        peer = try field(2, "peer")
    }

    /// HOST:PORT with a port in 1...65535 and no blank (a bracketed IPv6 host too).
    static func isAddress(_ s: String) -> Bool {
        guard let colon = s.lastIndex(of: ":"), colon != s.startIndex, !s.contains(where: { $0 == " " || $0 == "\t" }),
              let port = UInt16(s[s.index(after: colon)...]), port > 0 else { return false }
        return true
    }

    /// The state in `path`; nil when there is none.
    public static func load(_ path: String) throws(SupervisorStateError) -> SupervisorState? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return nil }
            throw .unreadable(path: path, errno: errno)
        }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: maxBytes + 1)
        var count = 0
        while count < bytes.count {
            // SAFETY: reads into the array's own storage, from `count` to its end.
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + count, $0.count - count) }
            if n < 0, errno == EINTR { continue }
            guard n >= 0 else { throw .unreadable(path: path, errno: errno) }
            if n == 0 { break }
            count += n
        }
        guard count <= maxBytes else { throw .malformed(path: path, line: 1, reason: "over \(maxBytes) bytes") }
        guard count > 0 else { throw .malformed(path: path, line: 1, reason: "empty") }
        return try SupervisorState(parsing: String(decoding: bytes[..<count], as: UTF8.self), path: path)
    }

    /// Writes `path` atomically (a reader finds the old state or the new one, whole).
    public func save(_ path: String) throws(SupervisorStateError) {
        do { try replaceFile(path, with: Array(encoded().utf8), temporary: path + ".tmp", sync: true) } catch {
            throw .unwritable(path: path, error.description)
        }
    }

    /// Removes `path` (none there is fine).
    public static func remove(_ path: String) throws(SupervisorStateError) {
        guard unlink(path) == 0 || errno == ENOENT else { throw .unwritable(path: path, "cannot remove it: \(String(cString: strerror(errno)))") }
    }

    /// The peer a supervisor started with `--peer commandLine` runs with, given the state it found.
    public static func resolve(commandLine: String, saved: SupervisorState?) -> Resolution {
        guard let saved else { return .commandLine }
        return saved.given == commandLine ? .moved(saved.peer) : .superseded(saved)
    }

    public enum Resolution: Sendable, Equatable {
        /// No move kept: the command line's --peer.
        case commandLine
        /// The peer moved there before this supervisor started.
        case moved(String)
        /// The kept move replaced another --peer than the command line's: the operator changed it since, and
        /// the command line wins (the state is stale).
        case superseded(SupervisorState)
    }
}

public enum SupervisorStateError: Error, Equatable, CustomStringConvertible {
    case unreadable(path: String, errno: Int32)
    case malformed(path: String, line: Int, reason: String)
    case wrongVersion(path: String, found: String)
    case unwritable(path: String, String)

    public var description: String {
        switch self {
        case .unreadable(let p, let e):
            return "--state-file \(p): cannot read it: \(String(cString: strerror(e)))"
        case .malformed(let p, let line, let reason):
            return "--state-file \(p): line \(line): \(reason); remove the file to start from the command line's --peer"
        case .wrongVersion(let p, let found):
            return "--state-file \(p): version \(found.prefix(20)), this lockstep reads version \(SupervisorState.version); remove the file to start from the command line's --peer"
        case .unwritable(let p, let why):
            return "--state-file \(p): \(why)"
        }
    }
}
