#if canImport(Glibc)
import Glibc
#endif

/// The operator's way into a running `primary` or `secondary` (`--control PATH`): a Unix-domain stream
/// socket, owner-only (0600), one request line and one reply line per connection.
public final class ControlListener: @unchecked Sendable {
    public let path: String
    private let fd: Int32

    /// Binds `path`, replacing a socket a dead process left there (never another kind of file).
    public init(path: String) throws {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else { throw ChannelError.control("--control \(path) exists and is not a socket") }
            unlink(path)
        }
        let fd = try ControlListener.socketAt(path) { fd, sp, len in _ = try sys("bind") { bind(fd, sp, len) } }
        do {
            // Before listen: nobody connects while the mode is still the umask's.
            try sys("chmod") { chmod(path, 0o600) }
            try sys("listen") { listen(fd, 4) }
        } catch {
            _ = Glibc.close(fd)
            unlink(path)
            throw error
        }
        self.fd = fd
        self.path = path
    }

    deinit { _ = Glibc.close(fd) }

    /// A new Unix stream socket, bound or connected to `path` by `attach` (closed again if that fails).
    static func socketAt(_ path: String, _ attach: (Int32, UnsafePointer<sockaddr>, socklen_t) throws -> Void) throws -> Int32 {
        var addr = try address(path)
        let fd = try sys("socket") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        do {
            // SAFETY: addr is a whole sockaddr_un, passed with its own size.
            try withUnsafePointer(to: &addr) { p in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { try attach(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
        return fd
    }

    static func address(_ path: String) throws -> sockaddr_un {
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count < MemoryLayout.size(ofValue: a.sun_path) else {
            throw ChannelError.control("--control \(path): a socket path has 1 to \(MemoryLayout.size(ofValue: a.sun_path) - 1) bytes")
        }
        // SAFETY: bytes.count < sizeof(sun_path) (checked above), so the path stays NUL-terminated.
        withUnsafeMutableBytes(of: &a.sun_path) { $0.copyBytes(from: bytes) }
        return a
    }

    /// The next connection, or nil after `close` (or when none came within `timeoutMs`).
    public func accept(timeoutMs: Int) throws -> ControlConnection? {
        guard try SocketOps.wait(fd, events: Int16(POLLIN), deadlineMs: SocketOps.monotonicMs() + Int64(timeoutMs)) else { return nil }
        do {
            let c = try sys("accept") { Glibc.accept(fd, nil, nil) }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            return ControlConnection(fd: c)
        } catch ChannelError.system(let e) where e.errno == EINVAL {
            return nil  // shut down
        }
    }

    /// Wakes a blocked `accept` and removes the socket file.
    public func close() {
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
        unlink(path)
    }
}

/// One control request: a line each way, every read bounded.
public final class ControlConnection: @unchecked Sendable {
    let fd: Int32
    init(fd: Int32) { self.fd = fd }
    deinit { _ = Glibc.close(fd) }

    /// Connects to a running process's control socket.
    public convenience init(path: String) throws {
        self.init(fd: try ControlListener.socketAt(path) { fd, sp, len in _ = try sys("connect") { Glibc.connect(fd, sp, len) } })
    }

    /// Reads one line (without its newline), at most 64 KiB, by the deadline; nil when the peer closed first.
    public func readLine(timeoutMs: Int) throws -> String? {
        let deadline = SocketOps.monotonicMs() + Int64(timeoutMs)
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < 65536 {
            guard try SocketOps.wait(fd, events: Int16(POLLIN), deadlineMs: deadline) else { throw ChannelError.timeout(ms: timeoutMs) }
            let n = try sys("read") { Glibc.read(fd, &byte, 1) }
            if n == 0 { return line.isEmpty ? nil : String(decoding: line, as: UTF8.self) }
            if byte == UInt8(ascii: "\n") { return String(decoding: line, as: UTF8.self) }
            line.append(byte)
        }
        throw ChannelError.control("a control line of more than 64 KiB")
    }

    /// Sends a request line and reads its answer (nil: closed without one). A busy server refuses without
    /// reading the request and closes; if that came first, the write fails (EPIPE) and the refusal is still
    /// here to read.
    public func ask(_ request: String, timeoutMs: Int) throws -> String? {
        do { try writeLine(request) } catch ChannelError.system(let e) where e.errno == EPIPE || e.errno == ECONNRESET {
            guard let answer = try? readLine(timeoutMs: 0) else { throw ChannelError.system(e) }
            return answer
        }
        return try readLine(timeoutMs: timeoutMs)
    }

    public func writeLine(_ s: String) throws {
        let bytes = Array((s + "\n").utf8)
        var off = 0
        while off < bytes.count {
            // SAFETY: off < bytes.count, so the pointer and the length stay inside the array.
            off += try bytes.withUnsafeBytes { b in try sys("write") { Glibc.send(fd, b.baseAddress! + off, b.count - off, Int32(MSG_NOSIGNAL)) } }
        }
    }
}
