#if canImport(Glibc)
import Glibc
#endif
import CLockstep

/// Who holds (or wants) the fence.
public struct FenceIdentity: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var pid: Int32
    public init(host: String, pid: Int32) { self.host = host; self.pid = pid }
    /// This host's name and this process's pid.
    public static func current() -> FenceIdentity {
        var buf = [UInt8](repeating: 0, count: 256)
        let name = buf.withUnsafeMutableBufferPointer { p -> String in
            gethostname(UnsafeMutableRawPointer(p.baseAddress!).assumingMemoryBound(to: CChar.self), 255) == 0
                ? String(decoding: p.prefix { $0 != 0 }, as: UTF8.self) : "unknown"
        }
        return FenceIdentity(host: name, pid: getpid())
    }
    public var description: String { "\(host) pid \(pid)" }
}

/// Proof of holding the fence. `generation` increases on every acquisition: a fencing token
/// that downstream systems can use to reject a stale holder.
public struct FenceToken: Sendable, Equatable {
    public let generation: UInt64
    public let identity: FenceIdentity
}

/// What the fence file says about the current (or last) holder.
public struct FenceHolder: Sendable, Equatable, CustomStringConvertible {
    public var generation: UInt64
    public var identity: FenceIdentity?
    public init(generation: UInt64, identity: FenceIdentity?) { self.generation = generation; self.identity = identity }
    public var description: String { "\(identity?.description ?? "unknown holder") (generation \(generation))" }
}

public enum FenceError: Error, Equatable, Sendable, CustomStringConvertible {
    case directoryMissing(String)
    case notADirectory(String)
    case permissionDenied(String)
    /// flock is not supported there (e.g. NFS without lock support).
    case lockingUnsupported(String)
    case system(call: String, errno: Int32, path: String)
    /// `release` without holding.
    case notHeld

    public var description: String {
        switch self {
        case .directoryMissing(let d): return "fence directory \(d) does not exist"
        case .notADirectory(let d): return "fence path \(d) is not a directory"
        case .permissionDenied(let d): return "no permission to create/lock the fence file in \(d)"
        case .lockingUnsupported(let d): return "file locking is not supported in \(d) (NFS needs NLM or NFSv4 locks)"
        case .system(let c, let e, let p): return "\(c) on \(p) failed: \(String(cString: strerror(e))) (errno \(e))"
        case .notHeld: return "the fence is not held"
        }
    }
}

/// The at-most-one-live-primary primitive. The embedded default is `Fence` (flock on a shared
/// directory); an etcd lease (revision = fencing token) can implement the same protocol.
public protocol Fencing: AnyObject {
    /// Takes the fence if nobody holds it. nil = held by someone else (see `holder`).
    func tryAcquire(identity: FenceIdentity) throws -> FenceToken?
    /// The holder as last recorded (after a denied acquisition: the current holder).
    var holder: FenceHolder? { get }
    /// Gives the fence up.
    func release() throws
}

/// `flock(LOCK_EX|LOCK_NB)` on `DIR/lockstep.fence`. The lock lives with the open file
/// description: the holder keeps it for its lifetime, and the kernel drops it when the process dies
/// (kill -9 included). Two `Fence` objects in one process are independent (separate opens).
public final class Fence: Fencing, @unchecked Sendable {
    public static let fileName = "lockstep.fence"
    public let directory: String
    public var path: String { directory + "/" + Fence.fileName }
    public private(set) var holder: FenceHolder?
    public private(set) var token: FenceToken?
    private var fd: Int32 = -1

    public init(directory: String) { self.directory = directory }
    // Unlock before closing: a child forked by another thread (posix_spawn, before its exec closes
    // the O_CLOEXEC fd) shares the open file description, and close alone would leave it locked.
    deinit { if fd >= 0 { Fence.unlockAndClose(fd) } }

    private static func unlockAndClose(_ f: Int32) {
        _ = flock(f, LOCK_UN)
        _ = close(f)
    }

    /// The syscall chokepoint for the fence: retries EINTR, throws a FenceError naming the path.
    @discardableResult
    private func sys<T: BinaryInteger>(_ call: StaticString, _ body: () -> T) throws -> T {
        while true {
            let r = body()
            if r >= 0 { return r }
            let e = errno
            if e == EINTR { continue }
            throw FenceError.system(call: "\(call)", errno: e, path: path)
        }
    }

    public func tryAcquire(identity: FenceIdentity) throws -> FenceToken? {
        if let t = token { return t }
        var st = stat()
        do { try sys("stat") { stat(directory, &st) } } catch FenceError.system(_, let e, _) {
            if e == ENOENT { throw FenceError.directoryMissing(directory) }
            if e == EACCES { throw FenceError.permissionDenied(directory) }
            throw FenceError.system(call: "stat", errno: e, path: directory)
        }
        guard st.st_mode & S_IFMT == S_IFDIR else { throw FenceError.notADirectory(directory) }
        let f: Int32
        do { f = try sys("open") { open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644) } } catch FenceError.system(_, let e, _) {
            if e == EACCES || e == EROFS || e == EPERM { throw FenceError.permissionDenied(directory) }
            throw FenceError.system(call: "open", errno: e, path: path)
        }
        do {
            try sys("flock") { flock(f, LOCK_EX | LOCK_NB) }
        } catch FenceError.system(_, let e, _) {
            holder = (try? readHolder(f)) ?? nil
            _ = close(f)
            if e == EWOULDBLOCK { return nil }
            if e == ENOLCK || e == EOPNOTSUPP { throw FenceError.lockingUnsupported(directory) }
            throw FenceError.system(call: "flock", errno: e, path: path)
        }
        do {
            let previous = try readHolder(f)?.generation ?? 0
            let t = FenceToken(generation: previous + 1, identity: identity)
            let text = "generation=\(t.generation)\nhost=\(identity.host)\npid=\(identity.pid)\nacquired_ns=\(lk_realtime_ns())\n"
            let bytes = Array(text.utf8)
            // Write over the old record, then trim: the file is never seen empty.
            let n = try bytes.withUnsafeBytes { b in try sys("pwrite") { pwrite(f, b.baseAddress, b.count, 0) } }
            guard n == bytes.count else { throw FenceError.system(call: "pwrite", errno: EIO, path: path) }
            try sys("ftruncate") { ftruncate(f, off_t(bytes.count)) }
            try sys("fsync") { fsync(f) }
            fd = f
            token = t
            holder = FenceHolder(generation: t.generation, identity: identity)
            return t
        } catch {
            Fence.unlockAndClose(f)
            throw error
        }
    }

    public func release() throws {
        guard fd >= 0 else { throw FenceError.notHeld }
        let f = fd
        fd = -1
        token = nil
        try sys("flock(LOCK_UN)") { flock(f, LOCK_UN) }
        _ = close(f)
    }

    /// Reads the record in the fence file (nil when empty or unreadable).
    public func readHolder() -> FenceHolder? { (try? readRecord()) ?? nil }

    /// Reads the record in the fence file by its path (a fresh open: on NFS that asks the server, and so shows
    /// another host's record and renews this client's lease). nil: the file holds no generation.
    public func readRecord() throws -> FenceHolder? {
        let f = try sys("open") { open(path, O_RDONLY | O_CLOEXEC) }
        defer { _ = close(f) }
        return try readHolder(f)
    }

    /// What one read of the fence file says to a holder of `token`: the generation it wrote is still there, or
    /// another holder's is (the lock was lost: an NFS lease ran out and another host took it), or nothing can
    /// be told (the file cannot be read, or holds no generation).
    public func check(holding token: FenceToken) -> FenceCheck {
        do { return FenceCheck(record: try readRecord(), holding: token, path: path) } catch { return .unreadable("\(error)") }
    }

    private func readHolder(_ f: Int32) throws -> FenceHolder? {
        var buf = [UInt8](repeating: 0, count: 1024)
        var n = -1
        repeat { n = buf.withUnsafeMutableBytes { b in pread(f, b.baseAddress, b.count, 0) } } while n < 0 && errno == EINTR
        if n < 0 { throw FenceError.system(call: "pread", errno: errno, path: path) }
        guard n > 0 else { return nil }
        var fields: [String: String] = [:]
        for line in String(decoding: buf[0..<n], as: UTF8.self).split(separator: "\n") {
            let kv = line.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { fields[String(kv[0])] = String(kv[1]) }
        }
        guard let g = fields["generation"].flatMap({ UInt64($0) }) else { return nil }
        var id: FenceIdentity?
        if let h = fields["host"], let p = fields["pid"].flatMap({ Int32($0) }) { id = FenceIdentity(host: h, pid: p) }
        return FenceHolder(generation: g, identity: id)
    }
}

/// The verdict of one read of the fence file for a holder (`Fence.check`).
public enum FenceCheck: Equatable, Sendable {
    /// The file still carries the holder's generation.
    case confirmed
    /// The file carries another generation: someone else took the lock.
    case taken(FenceHolder)
    /// Nothing can be told; why.
    case unreadable(String)

    /// Pure: the verdict on a record read from `path` by the holder of `token`.
    public init(record: FenceHolder?, holding token: FenceToken, path: String) {
        guard let record else { self = .unreadable("the fence file \(path) holds no generation"); return }
        self = record.generation == token.generation ? .confirmed : .taken(record)
    }
}
