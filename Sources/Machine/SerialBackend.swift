import Foundation
import Glibc
import Synchronization

/// `--serial BACKEND`: where COM1 goes.
public enum SerialSpec: Equatable, Sendable, CustomStringConvertible {
    case stdio
    case file(String)
    case tcp(host: String, port: UInt16)
    case udp(host: String, port: UInt16)
    case none

    public static func parse(_ s: String) throws(MachineError) -> SerialSpec {
        if s == "stdio" { return .stdio }
        if s == "none" { return .none }
        if s.hasPrefix("file:") {
            let p = String(s.dropFirst(5))
            guard !p.isEmpty else { throw .config("--serial file: needs a path (file:PATH)") }
            return .file(p)
        }
        for (prefix, isTCP) in [("tcp:", true), ("udp:", false)] where s.hasPrefix(prefix) {
            let rest = s.dropFirst(prefix.count)
            guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]), port > 0 else {
                throw .config("--serial \(s): expected \(prefix)HOST:PORT with a port in 1...65535")
            }
            let host = String(rest[..<colon])
            guard !host.isEmpty else { throw .config("--serial \(s): missing host") }
            return isTCP ? .tcp(host: host, port: port) : .udp(host: host, port: port)
        }
        throw .config("--serial \(s): unknown backend (use stdio, file:PATH, tcp:HOST:PORT or udp:HOST:PORT)")
    }

    public var description: String {
        switch self {
        case .stdio: return "stdio"
        case .file(let p): return "file:\(p)"
        case .tcp(let h, let p): return "tcp:\(h):\(p)"
        case .udp(let h, let p): return "udp:\(h):\(p)"
        case .none: return "none"
        }
    }
}

/// A serial backend: output is line-buffered (a UDP datagram or a write per line), input is read by a
/// thread into the machine's `SerialInputQueue`.
public final class SerialBackend: SerialOutput, @unchecked Sendable {
    public let spec: SerialSpec
    private let lock = NSLock()
    private var pending: [UInt8] = []
    private var outFD: Int32 = -1
    private var listenFD: Int32 = -1
    private var clientFD: Int32 = -1
    private var udpPeer: sockaddr_storage?
    private var udpPeerLen: socklen_t = 0
    private var closed = false
    /// Bumped whenever the UDP client the backend answers changes (a pair's primary passes it on).
    public let replyAddressChanges = Atomic<UInt64>(0)
    public var hasInput: Bool { switch spec { case .stdio, .tcp, .udp: return true; default: return false } }

    /// Opens the backend (binds sockets now, so address errors surface before the guest starts).
    public init(_ spec: SerialSpec) throws(MachineError) {
        self.spec = spec
        switch spec {
        case .none: break
        case .stdio: outFD = 1
        case .file(let p):
            outFD = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if outFD < 0 { throw .config("--serial file:\(p): \(String(cString: strerror(errno)))") }
        case .tcp(let h, let p):
            listenFD = try SerialBackend.bind(host: h, port: p, type: SOCK_STREAM)
            guard listen(listenFD, 1) == 0 else { throw .config("--serial tcp:\(h):\(p): listen: \(String(cString: strerror(errno)))") }
        case .udp(let h, let p):
            outFD = try SerialBackend.bind(host: h, port: p, type: SOCK_DGRAM)
        }
    }

    deinit { close() }

    static func bind(host: String, port: UInt16, type: Int32) throws(MachineError) -> Int32 {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host, &addr.sin_addr) == 1 else {
            throw .config("serial backend: '\(host)' is not an IPv4 address")
        }
        let fd = socket(AF_INET, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .config("serial backend: socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard r == 0 else {
            let e = errno
            Glibc.close(fd)
            throw .config("serial backend: cannot bind \(host):\(port): \(String(cString: strerror(e)))")
        }
        return fd
    }

    static func bind(host: String, port: UInt16, type: __socket_type) throws(MachineError) -> Int32 {
        try bind(host: host, port: port, type: Int32(bitPattern: type.rawValue))
    }

    /// Starts the input thread feeding `queue`.
    public func startInput(into queue: SerialInputQueue) {
        guard hasInput else { return }
        startThread("lockstep-serial-in") { [self] in inputLoop(queue) }
    }

    private func inputLoop(_ queue: SerialInputQueue) {
        var buf = [UInt8](repeating: 0, count: 4096)
        switch spec {
        case .stdio:
            while true {
                let n = read(0, &buf, buf.count)
                if n <= 0 { return }
                queue.push(buf[0..<n])
            }
        case .tcp:
            while true {
                let c = accept(listenFD, nil, nil)
                if c < 0 { if errno == EINTR { continue }; return }
                var one: Int32 = 1
                setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                lock.lock(); clientFD = c; let early = pending; pending.removeAll(); lock.unlock()
                if !early.isEmpty { writeAll(c, early) }
                while true {
                    let n = read(c, &buf, buf.count)
                    if n <= 0 { break }
                    queue.push(buf[0..<n])
                }
                lock.lock(); if clientFD == c { clientFD = -1 }; lock.unlock()
                Glibc.close(c)
            }
        case .udp:
            while true {
                var from = sockaddr_storage()
                var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
                let n = withUnsafeMutablePointer(to: &from) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(outFD, &buf, buf.count, 0, $0, &len) } }
                if n < 0 { if errno == EINTR { continue }; return }
                lock.lock()
                let changed = udpPeer.map { SerialBackend.sameClient($0, from) } != true
                udpPeer = from; udpPeerLen = len
                lock.unlock()
                if changed { replyAddressChanges.add(1, ordering: .releasing) }
                queue.push(buf[0..<n])
            }
        default: return
        }
    }

    /// The UDP client output goes to: IPv4 address then port, network order (6 bytes); nil before any datagram.
    public var replyAddress: [UInt8]? {
        lock.lock(); defer { lock.unlock() }
        return udpPeer.map { SerialBackend.replyAddress($0) }
    }

    /// A survivor answers the client its primary answered: output it sends again on go-live reaches that
    /// client without waiting for it to send first. A client heard from here already wins.
    public func adoptReplyAddress(_ a: [UInt8]) {
        guard case .udp = spec, a.count == 6 else { return }
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        // SAFETY: 4 and 2 bytes into fields of exactly those sizes; sockaddr_in fits in sockaddr_storage.
        withUnsafeMutableBytes(of: &sin.sin_addr) { $0.copyBytes(from: a[0..<4]) }
        withUnsafeMutableBytes(of: &sin.sin_port) { $0.copyBytes(from: a[4..<6]) }
        var ss = sockaddr_storage()
        withUnsafeMutableBytes(of: &ss) { d in withUnsafeBytes(of: &sin) { d.copyMemory(from: $0) } }
        lock.lock()
        let adopt = udpPeer == nil
        if adopt { udpPeer = ss; udpPeerLen = socklen_t(MemoryLayout<sockaddr_in>.size) }
        lock.unlock()
        if adopt { replyAddressChanges.add(1, ordering: .releasing) }
    }

    /// Same IPv4 address and port (no allocation: this runs for every datagram).
    private static func sameClient(_ a: sockaddr_storage, _ b: sockaddr_storage) -> Bool {
        // SAFETY: the backend's socket is AF_INET, so both storages hold a sockaddr_in (smaller, same alignment).
        let x = withUnsafeBytes(of: a) { $0.load(as: sockaddr_in.self) }, y = withUnsafeBytes(of: b) { $0.load(as: sockaddr_in.self) }
        return x.sin_addr.s_addr == y.sin_addr.s_addr && x.sin_port == y.sin_port
    }

    private static func replyAddress(_ ss: sockaddr_storage) -> [UInt8] {
        var ss = ss
        // SAFETY: the backend's socket is AF_INET, so the storage holds a sockaddr_in (smaller, same alignment).
        return withUnsafeBytes(of: &ss) { raw in
            let sin = raw.load(as: sockaddr_in.self)
            return withUnsafeBytes(of: sin.sin_addr) { Array($0) } + withUnsafeBytes(of: sin.sin_port) { Array($0) }
        }
    }

    /// The bytes emitted and not sent yet (the start of a line, waiting for its newline), at most the last `limit`.
    public func unsentLine(limit: Int) -> [UInt8] {
        lock.lock(); defer { lock.unlock() }
        return closed ? [] : Array(pending.suffix(limit))
    }

    public func emit(_ byte: UInt8, exit: UInt64) {
        lock.lock()
        pending.append(byte)
        let full = byte == 0x0A || pending.count >= 1024
        lock.unlock()
        if full { flush() }
    }

    /// Writes out buffered bytes (whole lines or on idle/stop). For tcp, bytes wait until a client connects.
    public func flush() {
        lock.lock()
        defer { lock.unlock() }
        guard !pending.isEmpty, !closed else { return }
        switch spec {
        case .none: pending.removeAll()
        case .stdio, .file: writeAll(outFD, pending); pending.removeAll()
        case .tcp:
            guard clientFD >= 0 else { if pending.count > 1 << 16 { pending.removeFirst(pending.count - (1 << 16)) }; return }
            writeAll(clientFD, pending); pending.removeAll()
        case .udp:
            guard var peer = udpPeer else { pending.removeAll(); return } // nobody to send to yet
            let len = udpPeerLen
            _ = pending.withUnsafeBytes { b in
                withUnsafePointer(to: &peer) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(outFD, b.baseAddress, b.count, 0, $0, len) } }
            }
            pending.removeAll()
        }
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + off, $0.count - off) }
            if n <= 0 { if errno == EINTR { continue }; return }
            off += n
        }
    }

    /// `sendingPartialLine` false: bytes not yet out are dropped (a primary that handed its guest over: the
    /// survivor sends that line whole, and half of it sent here would garble it for a line-reading client).
    public func close(sendingPartialLine: Bool = true) {
        if sendingPartialLine { flush() }
        lock.lock(); defer { lock.unlock() }
        guard !closed else { return }
        closed = true
        if case .file = spec { Glibc.close(outFD) }
        if case .udp = spec { shutdown(outFD, Int32(SHUT_RDWR)); Glibc.close(outFD) }
        if listenFD >= 0 { shutdown(listenFD, Int32(SHUT_RDWR)); Glibc.close(listenFD) }
        if clientFD >= 0 { shutdown(clientFD, Int32(SHUT_RDWR)) }
    }
}
