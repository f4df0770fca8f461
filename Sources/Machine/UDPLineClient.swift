import CLockstep
import Foundation
import Glibc

/// The other end of `--serial udp:HOST:PORT`: sends lines to a guest's service and reads its replies as
/// lines. The serial port is a byte stream: a reply datagram may end inside a line (the pair's output gate
/// releases up to an exit, not a line), so lines are reassembled across datagrams. The socket is not
/// connected, so a dead server's ICMP errors do not fail it (a failover test keeps sending to the address
/// until the survivor answers). The benchmark and the pair tests drive the echo guest with it.
public final class UDPLineClient {
    public let fd: Int32
    private var addr = sockaddr_in()
    private var buf = [UInt8](repeating: 0, count: 2048)
    private var partial: [UInt8] = []
    /// Datagrams received, and those that did not end with a newline (a line split across datagrams).
    public private(set) var datagrams = 0
    public private(set) var splitDatagrams = 0

    public init(port: UInt16) throws(MachineError) {
        fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .config("UDP socket: \(String(cString: strerror(errno)))") }
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    }

    deinit { close(fd) }

    public func send(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = withUnsafePointer(to: &addr) { a in
            a.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, bytes, bytes.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }

    /// The whole lines that arrive before `deadline` (CLOCK_MONOTONIC ns): those of the first datagram(s)
    /// that complete a line; empty at the deadline. A partial line waits for the rest.
    public func receive(until deadline: UInt64) -> [String] {
        var lines: [String] = []
        while lines.isEmpty {
            let now = lk_monotonic_ns()
            if now >= deadline { return [] }
            // poll() has ms resolution: round up, the deadline is re-checked.
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, Int32(clamping: (deadline - now + 999_999) / 1_000_000)) <= 0 { continue }
            while true {  // drain what is queued without blocking
                let n = recv(fd, &buf, buf.count, Int32(MSG_DONTWAIT))
                if n <= 0 { break }
                datagrams += 1
                if buf[n - 1] != 0x0A { splitDatagrams += 1 }
                partial += buf[0..<n]
                while let nl = partial.firstIndex(of: 0x0A) {
                    lines.append(String(decoding: partial[..<nl], as: UTF8.self).trimmingCharacters(in: .whitespaces))
                    partial.removeSubrange(...nl)
                }
            }
        }
        return lines
    }

    /// The bytes of a line begun but not ended yet (a prompt, say).
    public var partialLine: String { String(decoding: partial, as: UTF8.self) }

    /// `receive(until:)` `ms` from now.
    public func receive(ms: Int) -> [String] { receive(until: lk_monotonic_ns() + UInt64(max(0, ms)) * 1_000_000) }
}

/// A port on 127.0.0.1 that nobody holds right now (bind port 0, read it, release it): for a service address,
/// or an FT-link address given to both sides before either listens (`tcp`).
public enum LoopbackPort {
    public static func free(tcp: Bool = false) throws(MachineError) -> UInt16 {
        let kind = tcp ? "TCP" : "UDP"
        let s = socket(AF_INET, Int32((tcp ? SOCK_STREAM : SOCK_DGRAM).rawValue), 0)
        guard s >= 0 else { throw .config("\(kind) socket: \(String(cString: strerror(errno)))") }
        defer { close(s) }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &a) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, len) == 0 && getsockname(s, $0, &len) == 0 }
        }
        guard ok else { throw .config("cannot find a free \(kind) port: \(String(cString: strerror(errno)))") }
        return UInt16(bigEndian: a.sin_port)
    }
}
