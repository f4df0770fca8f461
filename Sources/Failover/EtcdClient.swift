#if canImport(Glibc)
import Glibc
#endif
import CLockstep
import Foundation
import Synchronization

/// One member of an etcd cluster: `HOST:PORT` of its client URL.
public struct EtcdEndpoint: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt16
    public init(host: String, port: UInt16) { self.host = host; self.port = port }
    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// A blocking client for etcd's v3 JSON gateway (`POST /v3/...`, base64 keys, int64s as strings), enough for the
/// fence: a request per call on a fresh connection (`Connection: close`), over TLS and as an etcd user when
/// `EtcdAccess` says so, each bounded by `timeoutMs`. It tries the endpoints in order and moves on only when
/// one cannot be reached (or its certificate is refused): a request that was sent is never repeated
/// elsewhere, since it may have been applied.
final class EtcdClient: Sendable {
    let endpoints: [EtcdEndpoint]
    let timeoutMs: Int
    /// What every call needs (the TLS context, the user's password), or why it could not be had (a file
    /// unreadable): every call then fails with that, so the side's first fence operation (at its start)
    /// names the file.
    private let setup: Result<Setup, FenceError>
    /// The token etcd gave the user (nil: none yet, or it expired).
    let token = Mutex<String?>(nil)
    /// The most a reply may carry: a fence's replies are a few hundred bytes; this bounds a stray server's.
    static let maxReply = 1 << 20

    private struct Setup: Sendable {
        var tls: TLSClient?
        var user: String?
        var password: String?
    }

    init(endpoints: [EtcdEndpoint], access: EtcdAccess = EtcdAccess(), location: String = "", timeoutMs: Int = 2000) {
        self.endpoints = endpoints
        self.timeoutMs = timeoutMs
        do throws(FenceError) {
            let tls = try access.tls.map { t throws(FenceError) in try TLSClient(t, location: location) }
            let password = try access.passwordFile.map { f throws(FenceError) in try Self.password(in: f, location: location) }
            setup = .success(Setup(tls: tls, user: access.user, password: password))
        } catch {
            setup = .failure(error)
        }
    }

    /// Calls `path` with a JSON body; the reply's JSON object, or `FenceError.etcd` saying which member failed how.
    func call(_ path: String, _ body: [String: Any]) throws -> [String: Any] {
        let setup = try self.setup.get()
        guard let user = setup.user, let password = setup.password else { return try exchange(path, body, setup.tls, token: nil) }
        var renewed = false
        while true {
            let current: String
            if let t = token.withLock({ $0 }) { current = t } else {
                let reply = try exchange("/v3/auth/authenticate", ["name": user, "password": password], setup.tls, token: nil, user: user)
                guard let t = reply["token"] as? String, !t.isEmpty else {
                    throw FenceError.etcd("etcd gave user \(user) no token: is authentication enabled in the cluster (etcdctl auth enable)?")
                }
                token.withLock { $0 = t }
                current = t
            }
            do { return try exchange(path, body, setup.tls, token: current, user: user) } catch let e as ExpiredToken {
                // A simple token expires unused after the cluster's --auth-token-ttl; the refused request was
                // not applied, so it goes again under a new token (once).
                token.withLock { if $0 == current { $0 = nil } }
                if renewed { throw e.error }
                renewed = true
            }
        }
    }

    /// etcd refused the token (expired): the request was not applied.
    private struct ExpiredToken: Error { var error: FenceError }

    /// One request to the first member that can be reached.
    private func exchange(_ path: String, _ body: [String: Any], _ tls: TLSClient?, token: String?, user: String? = nil) throws -> [String: Any] {
        let json = try JSONSerialization.data(withJSONObject: body)
        var unreachable: [String] = []
        for e in endpoints {
            let deadline = lk_monotonic_ns() + UInt64(timeoutMs) * 1_000_000
            let fd: Int32
            do { fd = try connect(e, deadline: deadline) } catch { unreachable.append("\(e): \(error)"); continue }
            defer { close(fd) }
            let waitTLS = { (events: Int16) throws(EtcdFailure) in try self.wait(fd, for: events, until: deadline, doing: "TLS") }
            var session: TLSSession?
            if let tls {
                do { session = try tls.handshake(fd: fd, host: e.host, wait: waitTLS) } catch { unreachable.append("\(e): \(error)"); continue }
            }
            let head = "POST \(path) HTTP/1.1\r\nHost: \(e)\r\nContent-Type: application/json\r\nContent-Length: \(json.count)\r\n"
                + (token.map { "Authorization: \($0)\r\n" } ?? "") + "Connection: close\r\n\r\n"
            let request = Array(head.utf8) + Array(json)
            do throws(EtcdFailure) {
                let reply: [UInt8]
                if let session {
                    try session.send(request, wait: waitTLS)
                    reply = try Self.receive { (b: inout [UInt8]) throws(EtcdFailure) in try session.readSome(&b, wait: waitTLS) }
                } else {
                    try send(fd, request, deadline: deadline)
                    reply = try Self.receive { (b: inout [UInt8]) throws(EtcdFailure) in try readSome(fd, &b, deadline: deadline) }
                }
                return try Self.parse(reply: reply)
            } catch {
                let failure = FenceError.etcd("etcd at \(e) (\(path)): \(error.text)" + Self.hint(error.text, user: user))
                if token != nil, error.text.hasSuffix("invalid auth token") { throw ExpiredToken(error: failure) }
                throw failure
            }
        }
        throw FenceError.etcd("no etcd member reachable: " + unreachable.joined(separator: "; "))
    }

    /// What to do about etcd's authentication refusals.
    static func hint(_ text: String, user: String?) -> String {
        if text.hasSuffix("user name is empty") { return " (the cluster has authentication on: add user=NAME&password-file=FILE)" }
        if text.hasSuffix("permission denied"), let user { return " (give user \(user) a role that may read and write this fence's prefix)" }
        return ""
    }

    /// The first line of `file`, which must not be empty.
    private static func password(in file: String, location: String) throws(FenceError) -> String {
        guard let text = FileManager.default.contents(atPath: file).map({ String(decoding: $0, as: UTF8.self) }) else {
            let why = access(file, R_OK) == 0 ? "not readable" : String(cString: strerror(errno))
            throw .etcd("--fence \(location): cannot read the password file \(file): \(why)")
        }
        let line = text.split(separator: "\n", omittingEmptySubsequences: false).first.map { $0.hasSuffix("\r") ? String($0.dropLast()) : String($0) } ?? ""
        guard !line.isEmpty else { throw .etcd("--fence \(location): the password file \(file) is empty") }
        return line
    }

    /// Why one exchange failed, before the member is named.
    struct EtcdFailure: Error, CustomStringConvertible {
        var text: String
        var description: String { text }
    }

    /// Connects to the first of the member's addresses that accepts (a name may resolve to IPv6 and IPv4).
    private func connect(_ e: EtcdEndpoint, deadline: UInt64) throws(EtcdFailure) -> Int32 {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(e.host, String(e.port), &hints, &res)
        guard rc == 0, res != nil else { throw EtcdFailure(text: "cannot resolve \(e.host): \(String(cString: gai_strerror(rc)))") }
        defer { freeaddrinfo(res) }
        var failure = EtcdFailure(text: "no address")
        var next = res
        // SAFETY: the nodes are getaddrinfo's list, alive until the deferred freeaddrinfo; only read here.
        while let node = next {
            let ai = node.pointee
            next = ai.ai_next
            do { return try connect(ai, deadline: deadline) } catch { failure = error }
        }
        throw failure
    }

    private func connect(_ ai: addrinfo, deadline: UInt64) throws(EtcdFailure) -> Int32 {
        let fd = socket(ai.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw EtcdFailure(text: "socket: \(String(cString: strerror(errno)))") }
        if Glibc.connect(fd, ai.ai_addr, ai.ai_addrlen) != 0 && errno != EINPROGRESS {
            let e = errno
            close(fd)
            throw EtcdFailure(text: "connect: \(String(cString: strerror(e)))")
        }
        do throws(EtcdFailure) {
            try wait(fd, for: Int16(POLLOUT), until: deadline, doing: "connect")
            var err: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
            if err != 0 { throw EtcdFailure(text: "connect: \(String(cString: strerror(err)))") }
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    private func wait(_ fd: Int32, for events: Int16, until deadline: UInt64, doing what: String) throws(EtcdFailure) {
        while true {
            let now = lk_monotonic_ns()
            guard now < deadline else { throw EtcdFailure(text: "no answer within \(timeoutMs) ms (\(what))") }
            var p = pollfd(fd: fd, events: events, revents: 0)
            let n = poll(&p, 1, Int32(min(UInt64(Int32.max), (deadline - now) / 1_000_000 + 1)))
            if n > 0 { return }
            if n < 0 && errno != EINTR { throw EtcdFailure(text: "poll: \(String(cString: strerror(errno)))") }
        }
    }

    private func send(_ fd: Int32, _ bytes: [UInt8], deadline: UInt64) throws(EtcdFailure) {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + off, $0.count - off, Int32(MSG_NOSIGNAL)) }
            if n > 0 { off += n; continue }
            if n < 0 && (errno == EAGAIN || errno == EINTR) { try wait(fd, for: Int16(POLLOUT), until: deadline, doing: "send"); continue }
            throw EtcdFailure(text: "send: \(String(cString: strerror(errno)))")
        }
    }

    /// Reads what has come into `buf`: how many bytes, 0 at the member's close.
    private func readSome(_ fd: Int32, _ buf: inout [UInt8], deadline: UInt64) throws(EtcdFailure) -> Int {
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n >= 0 { return n }
            if errno == EAGAIN || errno == EINTR { try wait(fd, for: Int16(POLLIN), until: deadline, doing: "reply"); continue }
            throw EtcdFailure(text: "recv: \(String(cString: strerror(errno)))")
        }
    }

    /// The reply up to the member's close, in the clear or over TLS (`readSome`), at most `maxReply` bytes.
    private static func receive(_ readSome: (inout [UInt8]) throws(EtcdFailure) -> Int) throws(EtcdFailure) -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = try readSome(&buf)
            if n == 0 { return out }
            out += buf[0..<n]
            guard out.count <= maxReply else { throw EtcdFailure(text: "a reply over \(maxReply) bytes: not an etcd server") }
        }
    }

    /// Pure: an HTTP/1.1 reply read to its close → its JSON object; a non-200 status → etcd's own message.
    static func parse(reply: [UInt8]) throws(EtcdFailure) -> [String: Any] {
        let sep: [UInt8] = [13, 10, 13, 10]
        guard let split = reply.firstRange(of: sep) else {
            throw EtcdFailure(text: reply.isEmpty ? "closed without a reply" : "not an HTTP reply: not an etcd server (\(excerpt(reply)))")
        }
        let head = String(decoding: reply[..<split.lowerBound], as: UTF8.self).split(separator: "\r\n")
        guard let status = head.first, status.hasPrefix("HTTP/1."), let code = status.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else {
            throw EtcdFailure(text: "not an HTTP reply: not an etcd server (\(excerpt(reply)))")
        }
        var body = Array(reply[split.upperBound...])
        if head.contains(where: { $0.lowercased().hasPrefix("transfer-encoding:") && $0.lowercased().contains("chunked") }) {
            body = try dechunk(body)
        } else if let length = head.lazy.compactMap({ h in h.lowercased().hasPrefix("content-length:") ? Int(h.dropFirst(15).trimmingCharacters(in: .whitespaces)) : nil }).first,
                  body.count < length {
            throw EtcdFailure(text: "a reply cut short (\(body.count) of \(length) bytes)")
        }
        let object = (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any]
        guard code == 200 else {
            let message = object?["message"] as? String ?? object?["error"] as? String ?? excerpt(body)
            throw EtcdFailure(text: "HTTP \(code): \(message)")
        }
        guard let object else { throw EtcdFailure(text: "a reply that is not a JSON object: not an etcd server (\(excerpt(body)))") }
        // A streaming call (lease keep-alive) wraps its one message in `result` or reports an `error`.
        if let error = object["error"] as? [String: Any] { throw EtcdFailure(text: error["message"] as? String ?? "\(error)") }
        return object
    }

    private static func dechunk(_ b: [UInt8]) throws(EtcdFailure) -> [UInt8] {
        var out: [UInt8] = [], i = 0
        while i < b.count {
            guard let eol = b[i...].firstRange(of: [13, 10]),
                  let size = Int(String(decoding: b[i..<eol.lowerBound], as: UTF8.self).split(separator: ";").first ?? "", radix: 16) else {
                throw EtcdFailure(text: "a malformed chunked reply")
            }
            if size == 0 { break }
            let start = eol.upperBound
            guard start + size <= b.count else { throw EtcdFailure(text: "a truncated chunked reply") }
            out += b[start..<start + size]
            i = start + size + 2
        }
        return out
    }

    private static func excerpt(_ b: some Collection<UInt8>) -> String {
        let s = String(decoding: b.prefix(60), as: UTF8.self).replacingOccurrences(of: "\r", with: "\\r").replacingOccurrences(of: "\n", with: "\\n")
        return "'\(s)'" + (b.count > 60 ? "..." : "")
    }
}

/// etcd's JSON spellings.
enum EtcdJSON {
    static func b64(_ s: String) -> String { Data(s.utf8).base64EncodedString() }
    static func text(_ any: Any?) -> String? { (any as? String).flatMap { Data(base64Encoded: $0) }.map { String(decoding: $0, as: UTF8.self) } }
    /// int64 fields come as strings; absent means 0 (proto3 leaves defaults out).
    static func int(_ any: Any?) -> Int64 {
        if let s = any as? String { return Int64(s) ?? 0 }
        if let n = any as? NSNumber { return n.int64Value }
        return 0
    }
    static func revision(_ reply: [String: Any]) -> UInt64 { UInt64(max(0, int((reply["header"] as? [String: Any])?["revision"]))) }
    /// The key-values a range (or a txn's range responses, in order) returned.
    static func kvs(_ reply: [String: Any]) -> [[String: Any]] {
        if let kvs = reply["kvs"] as? [[String: Any]] { return kvs }
        return (reply["responses"] as? [[String: Any]] ?? []).flatMap { r in
            ((r["response_range"] as? [String: Any])?["kvs"] as? [[String: Any]]) ?? []
        }
    }
}
