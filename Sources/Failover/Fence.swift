#if canImport(Glibc)
import Glibc
#endif
import CLockstep
import EventLog
import Foundation

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
    /// A conditional write found the fence no longer this side's: held by `holder` (nil: by nobody, the lease ran out).
    case notHolder(FenceHolder?)
    /// The etcd cluster could not be asked, or answered with an error.
    case etcd(String)
    /// The store's ID (`storeID`) is there but is not 32 hex digits.
    case damagedID(String)

    public var description: String {
        switch self {
        case .directoryMissing(let d): return "fence directory \(d) does not exist"
        case .notADirectory(let d): return "fence path \(d) is not a directory"
        case .permissionDenied(let d): return "no permission to create/lock the fence file in \(d)"
        case .lockingUnsupported(let d): return "file locking is not supported in \(d) (NFS needs NLM or NFSv4 locks)"
        case .damagedID(let p): return "the fence's ID at \(p) is damaged (not 32 hex digits); remove it with no pair running and both sides make a new one"
        case .system(let c, let e, let p): return "\(c) on \(p) failed: \(String(cString: strerror(e))) (errno \(e))"
        case .notHeld: return "the fence is not held"
        case .notHolder(let h): return "the fence is no longer this side's: \(h.map { "now held by \($0)" } ?? "nobody holds it (this side's lease ran out)")"
        case .etcd(let why): return why
        }
    }
}

/// The at-most-one-live-primary primitive, and the pair record kept beside it (which secondary, if any, may take
/// over from the holder). `Fence` (flock on a shared directory) is the embedded default; `EtcdFence` keeps both
/// in etcd, where a named secondary can replace a holder that is gone without waiting for its lease.
public protocol Fencing: AnyObject, Sendable {
    /// Where the fence lives, for messages: the directory, or the etcd URL.
    var location: String { get }
    /// This side's proof of holding the fence; nil when it does not.
    var token: FenceToken? { get }
    /// The holder as last recorded (after a denied acquisition: the current holder).
    var holder: FenceHolder? { get }
    /// Takes the fence if nobody holds it, or (where the store can do it atomically) if the pair record reads
    /// `claim`. nil = held by someone else (see `holder`).
    func tryAcquire(identity: FenceIdentity, claim: String?) throws -> FenceToken?
    /// Gives the fence up.
    func release() throws
    /// The current holder, read afresh (nil: nobody, or nothing can be read).
    func readHolder() -> FenceHolder?
    /// What one fresh read says to a holder of `token`.
    func check(holding token: FenceToken) -> FenceCheck
    /// The pair record's text (nil: none written yet).
    func readPairRecord() throws -> String?
    /// Replaces the pair record. Only the holder writes it; where the store can, the write is made
    /// conditional on still holding the fence (`FenceError.notHolder` otherwise).
    func writePairRecord(_ text: String) throws
    /// True when `writePairRecord` itself fails for a side that lost the fence: no read is needed around it.
    var writesAreConditional: Bool { get }
    /// The store's own name: 32 hex digits made by the first side to ask and kept there, so two sides agree on
    /// it exactly when their `--fence` reaches the same store (a directory's path may differ between hosts).
    func storeID() throws -> String
}

/// A new store ID: 16 random bytes in hex.
func newStoreID() -> String {
    var g = SystemRandomNumberGenerator()
    return (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &g)) }.joined()
}

func isStoreID(_ s: String) -> Bool { s.count == 32 && s.allSatisfy(\.isHexDigit) }

extension Fencing {
    public func tryAcquire(identity: FenceIdentity) throws -> FenceToken? { try tryAcquire(identity: identity, claim: nil) }
}

/// `flock(LOCK_EX|LOCK_NB)` on `DIR/lockstep.fence`. The lock lives with the open file
/// description: the holder keeps it for its lifetime, and the kernel drops it when the process dies
/// (kill -9 included). Two `Fence` objects in one process are independent (separate opens).
public final class Fence: Fencing, @unchecked Sendable {
    public static let fileName = "lockstep.fence"
    public static let pairFileName = "lockstep.pair"
    public let directory: String
    public var location: String { directory }
    public var writesAreConditional: Bool { false }
    public var path: String { directory + "/" + Fence.fileName }
    public var pairPath: String { directory + "/" + Fence.pairFileName }
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
    private func sys<T: BinaryInteger>(_ call: StaticString, path: String? = nil, _ body: () -> T) throws -> T {
        while true {
            let r = body()
            if r >= 0 { return r }
            let e = errno
            if e == EINTR { continue }
            throw FenceError.system(call: "\(call)", errno: e, path: path ?? self.path)
        }
    }

    /// `claim` is not used: a lock file cannot be taken from a holder whose lock the kernel (or the NFS server) keeps.
    public func tryAcquire(identity: FenceIdentity, claim: String?) throws -> FenceToken? {
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
            let text = FenceHolder.recordText(generation: t.generation, identity: identity)
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

    /// `DIR/lockstep.pair`, trimmed; nil when there is none.
    public func readPairRecord() throws -> String? {
        do { return try readText(pairPath, limit: 4096) } catch FenceError.system(_, let e, _) where e == ENOENT { return nil }
    }

    /// The first `limit` bytes of a small file beside the fence, trimmed.
    private func readText(_ path: String, limit: Int) throws -> String {
        let f = try sys("open", path: path) { open(path, O_RDONLY | O_CLOEXEC) }
        defer { _ = close(f) }
        var buf = [UInt8](repeating: 0, count: limit)
        let n = try buf.withUnsafeMutableBytes { b in try sys("pread", path: path) { pread(f, b.baseAddress, b.count, 0) } }
        return String(decoding: buf[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    public static let idFileName = "lockstep.id"

    /// `DIR/lockstep.id`, made whole under a temporary name and linked into place: `link` fails when the name
    /// exists (on NFS too), so of two sides making it at once one wins and both read its ID.
    public func storeID() throws -> String {
        let path = directory + "/" + Fence.idFileName
        if (try? readID(path)) == nil {
            let tmp = path + ".\(getpid()).\(UInt32.random(in: 0...UInt32.max)).tmp"
            try replaceFile(tmp, with: Array((newStoreID() + "\n").utf8), temporary: tmp + ".part", sync: true)
            defer { unlink(tmp) }
            if link(tmp, path) != 0, errno != EEXIST { throw FenceError.system(call: "link", errno: errno, path: path) }
        }
        return try readID(path)
    }

    private func readID(_ path: String) throws -> String {
        let id = try readText(path, limit: 64)
        guard isStoreID(id) else { throw FenceError.damagedID(path) }
        return id
    }

    /// Written under a temporary name, fsynced, renamed: a failure leaves the old record whole (`LogError.io`,
    /// naming the file and the reason). The caller checks the fence before and after (a lock file cannot make
    /// the write conditional).
    public func writePairRecord(_ text: String) throws {
        try replaceFile(pairPath, with: Array((text + "\n").utf8), temporary: pairPath + ".\(getpid()).tmp", sync: true)
    }

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
        let n = try buf.withUnsafeMutableBytes { b in try sys("pread") { pread(f, b.baseAddress, b.count, 0) } }
        guard n > 0 else { return nil }
        return FenceHolder(record: String(decoding: buf[0..<n], as: UTF8.self))
    }
}

extension FenceHolder {
    /// A holder's record: `key=value` lines. The generation is the one given, else the record's own.
    init?(record text: String, generation given: UInt64? = nil) {
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let kv = line.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { fields[String(kv[0])] = String(kv[1]) }
        }
        guard let g = given ?? fields["generation"].flatMap({ UInt64($0) }) else { return nil }
        var id: FenceIdentity?
        if let h = fields["host"], let p = fields["pid"].flatMap({ Int32($0) }) { id = FenceIdentity(host: h, pid: p) }
        self.init(generation: g, identity: id)
    }

    /// The record a holder writes (`generation` only where the store does not number holders itself).
    static func recordText(generation: UInt64?, identity: FenceIdentity) -> String {
        (generation.map { "generation=\($0)\n" } ?? "") + "host=\(identity.host)\npid=\(identity.pid)\nacquired_ns=\(lk_realtime_ns())\n"
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
    /// Nobody holds the fence any more: this side's claim ran out (an etcd lease expired); why.
    case lost(String)

    /// Pure: the verdict on a record read from `path` by the holder of `token`.
    public init(record: FenceHolder?, holding token: FenceToken, path: String) {
        guard let record else { self = .unreadable("the fence file \(path) holds no generation"); return }
        self = record.generation == token.generation ? .confirmed : .taken(record)
    }
}
