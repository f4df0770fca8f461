#if canImport(Glibc)
import Glibc
#endif
import COpenSSL

/// How an `etcds://` fence reaches its members: TLS 1.2 or newer, the member's certificate checked against
/// `caFile` (nil: the system's trust store) and its name or IP address, and a client certificate when the
/// cluster asks for one (etcd's `--client-cert-auth`). PEM files, as etcdctl's `--cacert`, `--cert` and `--key`.
public struct EtcdTLS: Sendable, Equatable {
    public var caFile: String?
    public var certFile: String?
    public var keyFile: String?
    public init(caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil) {
        self.caFile = caFile; self.certFile = certFile; self.keyFile = keyFile
    }
}

/// What an etcd fence needs besides its members: TLS (`etcds://`), and a user of etcd's authentication with
/// the file holding its password. Given in the location's query:
/// `?cacert=FILE&cert=FILE&key=FILE&user=NAME&password-file=FILE`, any of them.
public struct EtcdAccess: Sendable, Equatable {
    public var tls: EtcdTLS?
    public var user: String?
    public var passwordFile: String?
    public init(tls: EtcdTLS? = nil, user: String? = nil, passwordFile: String? = nil) {
        self.tls = tls; self.user = user; self.passwordFile = passwordFile
    }

    /// The query that names them ("" when none is given).
    var query: String {
        let parts = [("cacert", tls?.caFile), ("cert", tls?.certFile), ("key", tls?.keyFile), ("user", user), ("password-file", passwordFile)]
            .compactMap { k, v in v.map { "\(k)=\($0)" } }
        return parts.isEmpty ? "" : "?" + parts.joined(separator: "&")
    }

    /// An unknown name, TLS files without `etcds://`, a certificate without its key or a user without a
    /// password file (or the reverse) is refused naming it.
    init(query: Substring, secure: Bool, in location: String) throws(FenceError) {
        var files = EtcdTLS()
        for pair in query.split(separator: "&") {
            guard let eq = pair.firstIndex(of: "="), !pair[pair.index(after: eq)...].isEmpty else {
                throw .etcd("--fence \(location): '\(pair)' is not NAME=VALUE (cacert, cert, key, user, password-file)")
            }
            let value = String(pair[pair.index(after: eq)...])
            switch pair[..<eq] {
            case "cacert": files.caFile = value
            case "cert": files.certFile = value
            case "key": files.keyFile = value
            case "user": user = value
            case "password-file": passwordFile = value
            default: throw .etcd("--fence \(location): unknown option '\(pair[..<eq])' (cacert, cert, key, user, password-file)")
            }
        }
        if secure { tls = files } else if files != EtcdTLS() { throw .etcd("--fence \(location): TLS options need etcds://") }
        guard (files.certFile == nil) == (files.keyFile == nil) else {
            throw .etcd("--fence \(location): give a client certificate and its key together (cert=FILE&key=FILE)")
        }
        guard (user == nil) == (passwordFile == nil) else {
            throw .etcd("--fence \(location): give a user and the file with its password together (user=NAME&password-file=FILE)")
        }
    }
}

/// One OpenSSL client context per fence, built from `EtcdTLS` once (the files are read then); each request
/// makes its own connection and session from it.
final class TLSClient: @unchecked Sendable {
    // SAFETY: an SSL_CTX is only read once configured (SSL_new takes its own references), so threads may share it.
    private let ctx: OpaquePointer
    /// Whether this side offers a certificate (a refusal of it reads differently from a missing one).
    private let hasClientCertificate: Bool

    init(_ tls: EtcdTLS, location: String) throws(FenceError) {
        hasClientCertificate = tls.certFile != nil
        for file in [tls.caFile, tls.certFile, tls.keyFile].compactMap({ $0 }) where access(file, R_OK) != 0 {
            throw .etcd("--fence \(location): cannot read \(file): \(String(cString: strerror(errno)))")
        }
        ERR_clear_error()
        guard let ctx = SSL_CTX_new(TLS_client_method()) else { throw .etcd("--fence \(location): OpenSSL: \(Self.errors())") }
        self.ctx = ctx
        _ = lk_ssl_ctx_min_tls12(ctx)
        lk_ssl_ctx_eof_ends_stream(ctx)
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nil)
        let loaded = tls.caFile.map { SSL_CTX_load_verify_locations(ctx, $0, nil) } ?? SSL_CTX_set_default_verify_paths(ctx)
        guard loaded == 1 else { throw .etcd("--fence \(location): cannot load the CA certificates from \(tls.caFile ?? "the system's store"): \(Self.errors())") }
        if let cert = tls.certFile, let key = tls.keyFile {
            guard SSL_CTX_use_certificate_chain_file(ctx, cert) == 1 else { throw .etcd("--fence \(location): cannot load the client certificate \(cert): \(Self.errors())") }
            let mismatch = "--fence \(location): the key \(key) is not the certificate \(cert)'s"
            guard SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) == 1 else {
                let why = Self.errors()
                throw .etcd(why.contains("key values mismatch") ? mismatch : "--fence \(location): cannot load the client key \(key): \(why)")
            }
            guard SSL_CTX_check_private_key(ctx) == 1 else { throw .etcd("\(mismatch): \(Self.errors())") }
        }
    }

    deinit { SSL_CTX_free(ctx) }

    /// Runs the handshake on the connected, non-blocking `fd`; `wait` blocks (bounded) until it is readable or
    /// writable. The session checks the member's certificate against `host` (a name, or an IP address).
    func handshake(fd: Int32, host: String, wait: (Int16) throws(EtcdClient.EtcdFailure) -> Void) throws(EtcdClient.EtcdFailure) -> TLSSession {
        ERR_clear_error()
        guard let ssl = SSL_new(ctx) else { throw .init(text: "TLS: \(Self.errors())") }
        let session = TLSSession(ssl, offersCertificate: hasClientCertificate)
        var address = in6_addr()
        let isIP = inet_pton(AF_INET, host, &address) == 1 || inet_pton(AF_INET6, host, &address) == 1
        let named = isIP ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host) : SSL_set1_host(ssl, host) & lk_ssl_set_sni(ssl, host)
        guard named == 1, SSL_set_fd(ssl, fd) == 1 else { throw .init(text: "TLS: \(Self.errors())") }
        try session.retry("TLS handshake", wait: wait) { SSL_connect(ssl) }
        return session
    }

    /// OpenSSL's queued errors, oldest first, by reason ("certificate verify failed"), and the queue cleared.
    static func errors() -> String {
        var reasons: [String] = []
        while case let e = ERR_get_error(), e != 0 {
            // A system error (OpenSSL 3 sets the top bit) carries errno, which has no reason string.
            let reason = e & (1 << 31) != 0 ? String(cString: strerror(Int32(truncatingIfNeeded: e & 0x7fff_ffff)))
                                            : ERR_reason_error_string(e).map { String(cString: $0) } ?? "error \(e)"
            if !reasons.contains(reason) { reasons.append(reason) }
        }
        return reasons.isEmpty ? "unknown error" : reasons.joined(separator: "; ")
    }
}

/// One TLS connection of a request: reads and writes on the non-blocking socket, waiting (bounded) as
/// OpenSSL asks. The socket stays the caller's to close.
final class TLSSession {
    private let ssl: OpaquePointer
    private let offersCertificate: Bool
    init(_ ssl: OpaquePointer, offersCertificate: Bool) { self.ssl = ssl; self.offersCertificate = offersCertificate }
    deinit { SSL_free(ssl) }

    func send(_ bytes: [UInt8], wait: (Int16) throws(EtcdClient.EtcdFailure) -> Void) throws(EtcdClient.EtcdFailure) {
        guard !bytes.isEmpty else { return }
        if let alert = pendingAlert() { throw alert }
        var failure: EtcdClient.EtcdFailure?
        // SAFETY: the bytes outlive the call; OpenSSL retries a write with the same buffer and length.
        bytes.withUnsafeBytes { b in
            do throws(EtcdClient.EtcdFailure) { try retry("TLS write", wait: wait) { SSL_write(ssl, b.baseAddress, Int32(b.count)) } } catch { failure = error }
        }
        if let failure { throw pendingAlert() ?? failure }
    }

    /// A member that refuses this side's certificate (TLS 1.3: after the client's handshake) sends an alert and
    /// closes, and the request's write may fail on the reset that follows: an alert already here says why.
    /// Called before the request (nothing but session tickets can precede the reply) and after a failed write.
    private func pendingAlert() -> EtcdClient.EtcdFailure? {
        ERR_clear_error()
        var byte: UInt8 = 0
        let n = SSL_read(ssl, &byte, 1)
        if n > 0 { return .init(text: "the member sent data before the request: not an etcd server") }
        let code = SSL_get_error(ssl, n)
        guard code == SSL_ERROR_SSL else { ERR_clear_error(); return nil }
        return .init(text: "TLS read: \(failure(code))")
    }

    /// Reads what has come into `buf`: how many bytes, 0 at the member's close.
    func readSome(_ buf: inout [UInt8], wait: (Int16) throws(EtcdClient.EtcdFailure) -> Void) throws(EtcdClient.EtcdFailure) -> Int {
        while true {
            ERR_clear_error()
            let n = buf.withUnsafeMutableBytes { SSL_read(ssl, $0.baseAddress, Int32($0.count)) }
            if n > 0 { return Int(n) }
            switch SSL_get_error(ssl, n) {
            case SSL_ERROR_ZERO_RETURN: return 0
            case SSL_ERROR_WANT_READ: try wait(Int16(POLLIN))
            case SSL_ERROR_WANT_WRITE: try wait(Int16(POLLOUT))
            case let e: throw .init(text: "TLS read: \(failure(e))")
            }
        }
    }

    /// Calls `op` until it succeeds, waiting as OpenSSL asks; a failure says why, with the certificate check's
    /// verdict when that is what failed.
    func retry(_ what: String, wait: (Int16) throws(EtcdClient.EtcdFailure) -> Void, _ op: () -> Int32) throws(EtcdClient.EtcdFailure) {
        while true {
            ERR_clear_error()
            let rc = op()
            if rc > 0 { return }
            switch SSL_get_error(ssl, rc) {
            case SSL_ERROR_WANT_READ: try wait(Int16(POLLIN))
            case SSL_ERROR_WANT_WRITE: try wait(Int16(POLLOUT))
            case let e: throw .init(text: "\(what): \(failure(e))")
            }
        }
    }

    private func failure(_ code: Int32) -> String {
        let verdict = SSL_get_verify_result(ssl)
        if verdict != X509_V_OK { return "the member's certificate is refused: " + String(cString: X509_verify_cert_error_string(verdict)) }
        if code == SSL_ERROR_SYSCALL {
            let e = errno
            return ERR_peek_error() != 0 ? TLSClient.errors() : e == 0 ? "the member closed the connection" : String(cString: strerror(e))
        }
        let why = TLSClient.errors()
        // TLS 1.3 finishes the client's handshake before the server checks its certificate: the refusal comes as
        // an alert on the first read.
        guard why.contains("certificate required") || why.contains("bad certificate") else { return why }
        return why + (offersCertificate ? " (the cluster refused this side's certificate: is it signed by a CA in the members' --trusted-ca-file, for client auth?)"
                                        : " (the cluster wants a client certificate: add cert=FILE&key=FILE)")
    }
}
