#if canImport(Glibc)
import Glibc
import CLockstep
#endif

/// A priority-inheriting pthread mutex (the send side of a Connection is serialized by one). Why inheriting:
/// the primary's vCPU thread (normal priority) holds it while it sends a log part, and a real-time thread on
/// its core (a secondary's receiver on the same host, woken by that very send) can preempt it there for as
/// long as it computes; the link thread, real-time too, then waited for the lock to send a heartbeat, and
/// the secondary heard nothing for 90 ms (`echo-state-large`'s 96 MiB sync point). Inheriting, the holder
/// runs at the waiter's priority until it lets go.
final class Lock: @unchecked Sendable {
    private let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    init() {
        var a = pthread_mutexattr_t()
        pthread_mutexattr_init(&a)
        pthread_mutexattr_setprotocol(&a, Int32(PTHREAD_PRIO_INHERIT))
        pthread_mutex_init(m, &a)
        pthread_mutexattr_destroy(&a)
    }
    deinit { pthread_mutex_destroy(m); m.deallocate() }
    func tryLock() -> Bool { pthread_mutex_trylock(m) == 0 }
    func unlock() { pthread_mutex_unlock(m) }
    @inline(__always)
    func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return try body()
    }
}

enum SocketOps {
    static func monotonicMs() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }

    /// Waits until fd is ready for `events` or the deadline (ms, monotonic; nil = forever) passes.
    /// Returns false on timeout.
    static func wait(_ fd: Int32, events: Int16, deadlineMs: Int64?) throws -> Bool {
        try wait(fd, events: events, orEvent: -1, deadlineMs: deadlineMs) == .ready
    }

    enum Readiness: Equatable { case ready, woken, timeout }

    /// As `wait`, and also returns `.woken` when the eventfd `event` (-1: none) is signalled; its count is consumed.
    static func wait(_ fd: Int32, events: Int16, orEvent event: Int32, deadlineMs: Int64?) throws -> Readiness {
        while true {
            var timeout: Int32 = -1
            if let d = deadlineMs { timeout = Int32(clamping: max(0, d - monotonicMs())) }
            // poll(2) skips a negative descriptor.
            var p = (pollfd(fd: fd, events: events, revents: 0), pollfd(fd: event, events: Int16(POLLIN), revents: 0))
            let n = try withUnsafeMutableBytes(of: &p) { b in
                // SAFETY: two pollfd structs laid out back to back in a tuple, as poll(2) reads them.
                try sys("poll") { poll(b.baseAddress!.assumingMemoryBound(to: pollfd.self), 2, timeout) }
            }
            if n > 0 {
                if p.1.revents != 0 { var v: UInt64 = 0; _ = try? sys("read") { read(event, &v, 8) } }  // drain (non-blocking eventfd)
                return p.0.revents != 0 ? .ready : .woken
            }
            if let d = deadlineMs, monotonicMs() >= d { return .timeout }
        }
    }

    static func setNoDelay(_ fd: Int32) throws {
        var one: Int32 = 1
        try sys("setsockopt(TCP_NODELAY)") { setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size)) }
    }

    /// Sets TCP_RTO_MIN_US; returns the kernel's value (µs, rounded up to its clock tick).
    static func setRetransmitFloor(_ fd: Int32, us: Int32) throws -> Int32 {
        var v = us
        try sys("setsockopt(TCP_RTO_MIN_US)") { setsockopt(fd, Int32(IPPROTO_TCP), LK_TCP_RTO_MIN_US, &v, socklen_t(MemoryLayout<Int32>.size)) }
        var len = socklen_t(MemoryLayout<Int32>.size)
        try sys("getsockopt(TCP_RTO_MIN_US)") { getsockopt(fd, Int32(IPPROTO_TCP), LK_TCP_RTO_MIN_US, &v, &len) }
        return v
    }

    static func setBlocking(_ fd: Int32, _ blocking: Bool) throws {
        let flags = try sys("fcntl(F_GETFL)") { fcntl(fd, F_GETFL) }
        let nf = blocking ? flags & ~O_NONBLOCK : flags | O_NONBLOCK
        try sys("fcntl(F_SETFL)") { fcntl(fd, F_SETFL, nf) }
    }

    static func resolve(host: String, port: UInt16, passive: Bool) throws -> UnsafeMutablePointer<addrinfo> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &res)
        guard rc == 0, let r = res else {
            throw ChannelError.resolveFailed(host: host, reason: String(cString: gai_strerror(rc)))
        }
        return r
    }

    /// TCP connect with a timeout; maps refused / unreachable / timeout to clear errors.
    static func connect(host: String, port: UInt16, timeoutMs: Int) throws -> Int32 {
        let list = try resolve(host: host, port: port, passive: false)
        defer { freeaddrinfo(list) }
        let deadline = monotonicMs() + Int64(timeoutMs)
        var lastError: ChannelError = .connectTimeout(host: host, port: port, ms: timeoutMs)
        var ai: UnsafeMutablePointer<addrinfo>? = list
        while let a = ai {
            ai = a.pointee.ai_next
            let fd: Int32
            do {
                fd = try sys("socket") { socket(a.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0) }
            } catch { lastError = error as! ChannelError; continue }
            var ok = false
            defer { if !ok { _ = Glibc.close(fd) } }
            var err: Int32 = 0
            do {
                try sys("connect") { Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) }
            } catch ChannelError.system(let e) {
                err = e.errno
            }
            if err == EINPROGRESS {
                guard try wait(fd, events: Int16(POLLOUT), deadlineMs: deadline) else {
                    lastError = .connectTimeout(host: host, port: port, ms: timeoutMs); continue
                }
                var soErr: Int32 = 0
                var len = socklen_t(MemoryLayout<Int32>.size)
                do { try sys("getsockopt(SO_ERROR)") { getsockopt(fd, SOL_SOCKET, SO_ERROR, &soErr, &len) } }
                catch { lastError = error as! ChannelError; continue }
                err = soErr
            }
            switch err {
            case 0: break
            case ECONNREFUSED: lastError = .connectionRefused(host: host, port: port); continue
            case ETIMEDOUT: lastError = .connectTimeout(host: host, port: port, ms: timeoutMs); continue
            case EHOSTUNREACH, ENETUNREACH, EHOSTDOWN, ENETDOWN:
                lastError = .unreachable(host: host, port: port, errno: err); continue
            default: lastError = .system(SystemCallError(call: "connect", errno: err)); continue
            }
            try setBlocking(fd, true)
            try setNoDelay(fd)
            ok = true
            return fd
        }
        throw lastError
    }
}

/// A listening TCP socket (SO_REUSEADDR). `port` is the bound port (useful with port 0).
public final class Listener: @unchecked Sendable {
    public let fd: Int32
    public let port: UInt16
    public let host: String

    public init(host: String = "127.0.0.1", port: UInt16 = 0, backlog: Int32 = 8) throws {
        let list = try SocketOps.resolve(host: host, port: port, passive: true)
        defer { freeaddrinfo(list) }
        let a = list.pointee
        do {
            let fd = try sys("socket") { socket(a.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
            do {
                var one: Int32 = 1
                try sys("setsockopt(SO_REUSEADDR)") { setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size)) }
                try sys("bind") { bind(fd, a.ai_addr, a.ai_addrlen) }
                try sys("listen") { listen(fd, backlog) }
                var ss = sockaddr_storage()
                var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
                try withUnsafeMutablePointer(to: &ss) { p in
                    try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sp in
                        _ = try sys("getsockname") { getsockname(fd, sp, &len) }
                    }
                }
                let family = Int32(ss.ss_family)
                let bound: UInt16 = withUnsafePointer(to: &ss) { p in
                    if family == AF_INET6 {
                        return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
                    }
                    return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
                }
                self.fd = fd
                self.port = bound
                self.host = host
            } catch {
                _ = Glibc.close(fd)
                throw error
            }
        }
    }

    deinit { _ = Glibc.close(fd) }

    /// Accepts one TCP connection (no handshake yet). Throws `.timeout` when none arrives in time.
    public func acceptRaw(timeoutMs: Int) throws -> Connection {
        let deadline = timeoutMs < 0 ? nil : SocketOps.monotonicMs() + Int64(timeoutMs)
        guard try SocketOps.wait(fd, events: Int16(POLLIN), deadlineMs: deadline) else { throw ChannelError.timeout(ms: timeoutMs) }
        let c: Int32
        c = try sys("accept") { Glibc.accept(fd, nil, nil) }
        _ = fcntl(c, F_SETFD, FD_CLOEXEC)
        do { try SocketOps.setNoDelay(c) } catch { _ = Glibc.close(c); throw error }
        return Connection(fd: c)
    }

    /// Accepts one connection and runs the handshake as responder.
    public func accept(timeoutMs: Int, config: ChannelConfig) throws -> Connection {
        let c = try acceptRaw(timeoutMs: timeoutMs)
        do { try c.handshake(initiator: false, config: config) } catch { c.close(); throw error }
        return c
    }

    /// Stops listening (wakes a blocked accept).
    public func close() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
}
