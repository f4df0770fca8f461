import Foundation
import Glibc
import Testing
@testable import Failover

/// A test CA and the certificates signed by it, made with the `openssl` command in a fresh directory: the
/// server's names only `localhost` (so 127.0.0.1 is a name mismatch) and serves client auth too (etcd's JSON
/// gateway dials the member's own gRPC port with it), the client's is for client auth; and a second CA, which
/// signed a client certificate the server does not trust (the stranger's).
final class TestCerts {
    static let openssl = ["/usr/bin/openssl", "/usr/local/bin/openssl"].first { FileManager.default.isExecutableFile(atPath: $0) }
    static var skipReason: String? {
        EtcdServer.skipReason ?? (openssl == nil ? "the openssl command is not installed (apt-get install openssl; scripts/setup.sh does): etcd TLS tests skipped" : nil)
    }

    let dir: String
    var ca: String { dir + "/ca.pem" }
    var otherCA: String { dir + "/other-ca.pem" }
    var serverCert: String { dir + "/server.pem" }
    var serverKey: String { dir + "/server.key" }
    var clientCert: String { dir + "/client.pem" }
    var clientKey: String { dir + "/client.key" }
    var strangerCert: String { dir + "/stranger.pem" }
    var strangerKey: String { dir + "/stranger.key" }

    init() throws {
        guard let openssl = Self.openssl else { throw PairTestError("openssl is not installed") }
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("lockstep-certs-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for name in ["ca", "other-ca"] {
            try run(openssl, ["req", "-x509"] + ec + ["-keyout", "\(name).key", "-out", "\(name).pem", "-days", "2", "-subj", "/CN=lockstep-test-\(name)"])
        }
        for (name, ca, ext) in [("server", "ca", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"),
                                ("client", "ca", "extendedKeyUsage=clientAuth\n"), ("stranger", "other-ca", "extendedKeyUsage=clientAuth\n")] {
            try ext.write(toFile: "\(dir)/\(name).ext", atomically: true, encoding: .utf8)
            try run(openssl, ["req"] + ec + ["-keyout", "\(name).key", "-out", "\(name).csr", "-subj", "/CN=\(name)"])
            try run(openssl, ["x509", "-req", "-in", "\(name).csr", "-CA", "\(ca).pem", "-CAkey", "\(ca).key", "-CAcreateserial",
                              "-out", "\(name).pem", "-days", "2", "-extfile", "\(name).ext"])
        }
    }

    private func run(_ tool: String, _ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = args
        p.currentDirectoryURL = URL(fileURLWithPath: dir)
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw PairTestError("openssl \(args.joined(separator: " ")) failed") }
    }

    func remove() { try? FileManager.default.removeItem(atPath: dir) }
}

/// The etcd fence over TLS (`etcds://`), against a real etcd that wants client certificates.
@Suite struct EtcdTLSTests {
    let me = FenceIdentity(host: "hostA", pid: 111)

    /// With the CA and a client certificate, the fence works as over plain HTTP, by name (checked against the
    /// server's certificate); the location names the files, so both sides and the supervisor can be given it.
    @Test func theFenceWorksOverTLS() throws {
        if let why = TestCerts.skipReason { print("skipped: \(why)"); return }
        let certs = try TestCerts()
        defer { certs.remove() }
        let etcd = try EtcdServer(tls: certs)
        defer { etcd.stop() }
        let location = try FenceLocation(parsing: etcd.location("/p"))
        #expect(location.description == etcd.location("/p"))
        let a = location.open(leaseMs: 1000)
        let t = try #require(try a.tryAcquire(identity: me))
        try a.writePairRecord("secondary 1f")
        let b = try FenceLocation(parsing: etcd.location("/p")).open(leaseMs: 1000)
        #expect(try b.readPairRecord() == "secondary 1f")
        #expect(b.readHolder()?.generation == t.generation)
        #expect(try a.storeID() == b.storeID())
    }

    /// Each way TLS can go wrong is refused naming the member and what failed; nothing is written.
    @Test func badTLSIsAClearError() throws {
        if let why = TestCerts.skipReason { print("skipped: \(why)"); return }
        let certs = try TestCerts()
        defer { certs.remove() }
        let etcd = try EtcdServer(tls: certs)
        defer { etcd.stop() }
        let p = etcd.port
        func refusal(_ location: String) -> String {
            do {
                _ = try FenceLocation(parsing: location).open(leaseMs: 1000).readPairRecord()
                return "no error"
            } catch { return "\(error)" }
        }
        let client = "cert=\(certs.clientCert)&key=\(certs.clientKey)"
        let cases: [(String, String)] = [
            ("etcds://localhost:\(p)/p?cacert=\(certs.otherCA)&\(client)", "the member's certificate is refused: unable to get local issuer certificate"),
            ("etcds://127.0.0.1:\(p)/p?cacert=\(certs.ca)&\(client)", "the member's certificate is refused: IP address mismatch"),
            ("etcds://localhost:\(p)/p?cacert=\(certs.ca)", "the cluster wants a client certificate: add cert=FILE&key=FILE"),
            ("etcds://localhost:\(p)/p?cacert=\(certs.ca)&cert=\(certs.strangerCert)&key=\(certs.strangerKey)", "the cluster refused this side's certificate"),
            ("etcds://localhost:\(p)/p?cacert=\(certs.dir)/missing.pem&\(client)", "cannot read \(certs.dir)/missing.pem: No such file or directory"),
            ("etcds://localhost:\(p)/p?cacert=\(certs.dir)/client.ext&\(client)", "cannot load the CA certificates from \(certs.dir)/client.ext: "),
            ("etcds://localhost:\(p)/p?cacert=\(certs.ca)&cert=\(certs.clientCert)&key=\(certs.serverKey)", "the key \(certs.serverKey) is not the certificate \(certs.clientCert)'s"),
            ("etcds://localhost:\(p)/p?cacert=\(certs.ca)&cert=\(certs.dir)/missing.pem&key=\(certs.clientKey)", "cannot read \(certs.dir)/missing.pem: No such file or directory"),
        ]
        for (location, expected) in cases {
            let why = refusal(location)
            #expect(why.contains(expected), "\(location): \(why)")
        }
        // A TLS port spoken to in the clear, and a plain server spoken to in TLS.
        #expect(refusal("etcd://127.0.0.1:\(p)/p").contains("etcd at 127.0.0.1:\(p) (/v3/kv/txn): "), "\(refusal("etcd://127.0.0.1:\(p)/p"))")
        let plain = try OneReplyServer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        let why = refusal("etcds://127.0.0.1:\(plain.port)/p?cacert=\(certs.ca)")
        #expect(why.hasPrefix("no etcd member reachable: 127.0.0.1:\(plain.port): TLS handshake: "), "\(why)")
        plain.join()
        #expect(etcd.fence("/p").readHolder() == nil)
    }

    @Test func accessInLocations() throws {
        #expect(try FenceLocation(parsing: "etcds://a:1,b/p/?cacert=/c.pem&cert=/x.pem&key=/x.key")
                == .etcd([EtcdEndpoint(host: "a", port: 1), EtcdEndpoint(host: "b", port: 2379)], prefix: "/p",
                         access: EtcdAccess(tls: EtcdTLS(caFile: "/c.pem", certFile: "/x.pem", keyFile: "/x.key"))))
        #expect(try FenceLocation(parsing: "etcds://a:1/p") == .etcd([EtcdEndpoint(host: "a", port: 1)], prefix: "/p", access: EtcdAccess(tls: EtcdTLS())))
        #expect(try FenceLocation(parsing: "etcd://a:1/p?user=u&password-file=/pw")
                == .etcd([EtcdEndpoint(host: "a", port: 1)], prefix: "/p", access: EtcdAccess(user: "u", passwordFile: "/pw")))
        #expect(try FenceLocation(parsing: "etcds://a:1/p?key=/k&user=u&cert=/c&password-file=/pw").description
                == "etcds://a:1/p?cert=/c&key=/k&user=u&password-file=/pw")
        for (bad, why) in [("etcd://a:1/p?cacert=/c", "TLS options need etcds://"), ("etcds://a:1/p?cert=/c", "together"),
                           ("etcds://a:1/p?ca=/c", "unknown option 'ca'"), ("etcds://a:1/p?cacert", "'cacert' is not NAME=VALUE"),
                           ("etcds://a:1?cacert=/c", "give a key prefix"), ("etcd://a:1/p?user=u", "give a user and the file with its password together")] {
            #expect(throws: FenceError.self, "\(bad)") { try FenceLocation(parsing: bad) }
            do { _ = try FenceLocation(parsing: bad) } catch { #expect("\(error)".contains(why), "\(bad): \(error)") }
        }
    }
}

/// The etcd fence as a user of etcd's authentication (`?user=NAME&password-file=FILE`), against a real etcd
/// with authentication on and a role that reaches one prefix.
@Suite struct EtcdAuthTests {
    let me = FenceIdentity(host: "hostA", pid: 111)

    @Test func theFenceWorksAsAnEtcdUser() throws {
        if let why = EtcdServer.skipReason { print("skipped: \(why)"); return }
        let etcd = try EtcdServer()
        defer { etcd.stop() }
        try etcd.enableAuth(prefix: "/p", passwordFile: etcd.dir + ".password")
        let a = try #require(try FenceLocation(parsing: etcd.location("/p")).open(leaseMs: 1000) as? EtcdFence)
        let t = try #require(try a.tryAcquire(identity: me))
        try a.writePairRecord("secondary 1f")
        #expect(a.check(holding: t) == .confirmed)
        // A token etcd no longer knows (as after --auth-token-ttl unused): the call is made again with a new one.
        a.client.token.withLock { $0 = "expired.1" }
        #expect(try a.readPairRecord() == "secondary 1f")
        #expect(a.client.token.withLock { $0 } != "expired.1")
        #expect(try a.storeID() == etcd.fence("/p").storeID())
    }

    /// Each refusal names what is wrong; nothing is written.
    @Test func badCredentialsAreAClearError() throws {
        if let why = EtcdServer.skipReason { print("skipped: \(why)"); return }
        let etcd = try EtcdServer()
        defer { etcd.stop() }
        let pw = etcd.dir + ".password"
        try etcd.enableAuth(prefix: "/p", passwordFile: pw)
        let wrong = etcd.dir + ".wrong"
        try "not-it\n".write(toFile: wrong, atomically: true, encoding: .utf8)
        let empty = etcd.dir + ".empty"
        try "\n".write(toFile: empty, atomically: true, encoding: .utf8)
        defer { for f in [wrong, empty] { try? FileManager.default.removeItem(atPath: f) } }
        let u = "etcd://127.0.0.1:\(etcd.port)"
        for (location, expected) in [
            ("\(u)/p?user=lockstep&password-file=\(wrong)", "(/v3/auth/authenticate): HTTP 400: etcdserver: authentication failed, invalid user ID or password"),
            ("\(u)/p", "etcdserver: user name is empty (the cluster has authentication on: add user=NAME&password-file=FILE)"),
            ("\(u)/other?user=lockstep&password-file=\(pw)", "etcdserver: permission denied (give user lockstep a role that may read and write this fence's prefix)"),
            ("\(u)/p?user=lockstep&password-file=\(etcd.dir).missing", "cannot read the password file \(etcd.dir).missing: No such file or directory"),
            ("\(u)/p?user=lockstep&password-file=\(empty)", "the password file \(empty) is empty"),
        ] {
            do {
                _ = try FenceLocation(parsing: location).open(leaseMs: 1000).tryAcquire(identity: me)
                Issue.record("no error for \(location)")
            } catch {
                #expect("\(error)".contains(expected), "\(location): \(error)")
            }
        }
        #expect(etcd.fence("/p").readHolder() == nil)
    }
}
