import Foundation
import Glibc
import Machine
import Testing
@testable import Failover

/// A real etcd (Debian's `etcd-server`) on loopback for one test: free ports, a fresh data directory, stopped
/// and removed by `stop()`. With `tls`, its client port serves only TLS and wants a client certificate
/// signed by the test CA (`--client-cert-auth`).
final class EtcdServer {
    static let binary = ["/usr/bin/etcd", "/usr/local/bin/etcd"].first { FileManager.default.isExecutableFile(atPath: $0) }
    /// Why etcd tests cannot run here, or nil.
    static var skipReason: String? {
        binary == nil ? "etcd is not installed (apt-get install etcd-server; scripts/test.sh does): etcd fence tests skipped" : nil
    }

    private(set) var process = Process()
    private(set) var dir = ""
    private(set) var port: UInt16 = 0
    let tls: TestCerts?

    init(tls: TestCerts? = nil) throws {
        guard let binary = Self.binary else { throw PairTestError("etcd is not installed") }
        self.tls = tls
        // A port found free can be taken before etcd binds it (as an outgoing connection's ephemeral port: the
        // fence opens one per request, and other tests run fences): an etcd that exits at once is started again
        // on other ports, twice at most.
        for attempt in 1...3 {
            if try start(binary) { return }
            if attempt == 3 { throw PairTestError("etcd on 127.0.0.1:\(port) did not start (it exited at once, 3 times, on fresh ports)") }
        }
    }

    /// Starts etcd on fresh ports: true once it answers, false if it exited first; throws if it runs and does
    /// not answer within 20 s.
    private func start(_ binary: String) throws -> Bool {
        port = try LoopbackPort.free(tcp: true)
        let peer = try LoopbackPort.free(tcp: true)
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("lockstep-etcd-\(getpid())-\(port)").path
        process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        let client = (tls == nil ? "http" : "https") + "://127.0.0.1:\(port)"
        process.arguments = ["--name", "t", "--data-dir", dir,
                             "--listen-client-urls", client, "--advertise-client-urls", client,
                             "--listen-peer-urls", "http://127.0.0.1:\(peer)", "--initial-advertise-peer-urls", "http://127.0.0.1:\(peer)",
                             "--initial-cluster", "t=http://127.0.0.1:\(peer)", "--log-level", "error"]
            + (tls.map { ["--cert-file", $0.serverCert, "--key-file", $0.serverKey, "--client-cert-auth", "--trusted-ca-file", $0.ca] } ?? [])
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Ready once it answers a read (bounded: etcd starts in ~0.3 s here).
        let probe = fence("/probe")
        let deadline = Date().addingTimeInterval(20)
        while true {
            do { _ = try probe.readPairRecord(); return true } catch {}
            if !process.isRunning { stop(); return false }
            guard Date() < deadline else { stop(); throw PairTestError("etcd on 127.0.0.1:\(port) did not answer within 20 s") }
            usleep(20_000)
        }
    }

    /// Its members for `--fence` (with TLS: by the name its certificate carries, and the client's files).
    var url: String { tls == nil ? "etcd://127.0.0.1:\(port)" : "etcds://localhost:\(port)" }
    func location(_ prefix: String) -> String {
        let options = (tls.map { ["cacert=\($0.ca)", "cert=\($0.clientCert)", "key=\($0.clientKey)"] } ?? [])
            + (user.map { ["user=\($0.name)", "password-file=\($0.passwordFile)"] } ?? [])
        return url + prefix + (options.isEmpty ? "" : "?" + options.joined(separator: "&"))
    }
    func fence(_ prefix: String, leaseMs: Int = 30_000) -> EtcdFence {
        EtcdFence(endpoints: [EtcdEndpoint(host: tls == nil ? "127.0.0.1" : "localhost", port: port)], prefix: prefix, leaseMs: leaseMs,
                  access: EtcdAccess(tls: tls.map { EtcdTLS(caFile: $0.ca, certFile: $0.clientCert, keyFile: $0.clientKey) },
                                     user: user?.name, passwordFile: user?.passwordFile))
    }

    /// The user `fence` and `location` act as, once `enableAuth` has turned etcd's authentication on.
    private(set) var user: (name: String, passwordFile: String)?

    /// Turns on etcd's authentication: `root` (password `rootpw`), and user `lockstep` (its password in a file
    /// in `dir`) whose role may read and write the keys under `prefix` only; `fence` and `location` then act
    /// as `lockstep`.
    func enableAuth(prefix: String, passwordFile: String) throws {
        let c = EtcdClient(endpoints: [EtcdEndpoint(host: "127.0.0.1", port: port)])
        let b64 = { (s: String) in Data(s.utf8).base64EncodedString() }
        try "lockstep-pw\n".write(toFile: passwordFile, atomically: true, encoding: .utf8)
        for (path, body) in [("/v3/auth/user/add", ["name": "root", "password": "rootpw"]), ("/v3/auth/user/grant", ["user": "root", "role": "root"]),
                             ("/v3/auth/role/add", ["name": "lockstep"]),
                             ("/v3/auth/role/grant", ["name": "lockstep", "perm": ["key": b64(prefix + "/"), "range_end": b64(prefix + "0"), "permType": "READWRITE"]] as [String: Any]),
                             ("/v3/auth/user/add", ["name": "lockstep", "password": "lockstep-pw"]), ("/v3/auth/user/grant", ["user": "lockstep", "role": "lockstep"]),
                             ("/v3/auth/enable", [:])] as [(String, [String: Any])] {
            _ = try c.call(path, body)
        }
        user = ("lockstep", passwordFile)
    }

    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
        try? FileManager.default.removeItem(atPath: dir)
        try? FileManager.default.removeItem(atPath: dir + ".password")
    }
}

/// `EtcdFence` against a real etcd: no guest, no KVM.
@Suite struct EtcdFenceTests {
    let me = FenceIdentity(host: "hostA", pid: 111)
    let other = FenceIdentity(host: "hostB", pid: 222)

    /// `a` holds the fence of the pair `/p` and names the secondary `1f` in its record; `b` is the other side.
    func holderNaming1f(_ etcd: EtcdServer) throws -> (EtcdFence, EtcdFence, FenceToken) {
        let a = etcd.fence("/p"), b = etcd.fence("/p")
        let t = try #require(try a.tryAcquire(identity: me))
        try a.writePairRecord("protected 1f")
        return (a, b, t)
    }

    @Test func oneHolderAtATimeWithGrowingGenerations() throws {
        if let why = EtcdServer.skipReason { print("skipped: \(why)"); return }
        let etcd = try EtcdServer()
        defer { etcd.stop() }
        let a = etcd.fence("/pair1"), b = etcd.fence("/pair1")
        let t = try #require(try a.tryAcquire(identity: me))
        #expect(try a.tryAcquire(identity: me) == t)  // idempotent for the holder
        #expect(try b.tryAcquire(identity: other) == nil)
        #expect(b.holder == FenceHolder(generation: t.generation, identity: me))
        #expect(a.check(holding: t) == .confirmed)
        try a.writePairRecord("unprotected")
        #expect(try b.readPairRecord() == "unprotected")
        try a.release()
        #expect(throws: FenceError.notHeld) { try a.release() }
        let t2 = try #require(try b.tryAcquire(identity: other))
        #expect(t2.generation > t.generation)
        #expect(a.check(holding: t) == .taken(FenceHolder(generation: t2.generation, identity: other)))
        #expect(etcd.fence("/pair1").readHolder() == FenceHolder(generation: t2.generation, identity: other))
        // Another prefix is another pair.
        #expect(try etcd.fence("/pair2").tryAcquire(identity: me) != nil)
    }

    /// The store ID in etcd: made by the first to ask, read by the rest; another prefix is another pair's store.
    @Test func theStoreIDIsOnePerPrefix() throws {
        if let why = EtcdServer.skipReason { print("skipped: \(why)"); return }
        let etcd = try EtcdServer()
        defer { etcd.stop() }
        let id = try etcd.fence("/ids").storeID()
        #expect(id.count == 32 && id.allSatisfy(\.isHexDigit))
        #expect(try etcd.fence("/ids").storeID() == id)
        #expect(try etcd.fence("/ids2").storeID() != id)
    }

    /// The secondary the record names takes the fence from a holder whose lease still runs (a lost host), and
    /// the old holder's next record write fails its compare: exactly one of them goes on.
    @Test func theNamedSecondaryTakesALiveLeaseAndTheOldHolderCannotWrite() throws {
        if let why = EtcdServer.skipReason { print("skipped: \(why)"); return }
        let etcd = try EtcdServer()
        defer { etcd.stop() }
        let (a, b, t) = try holderNaming1f(etcd)
        #expect(try b.tryAcquire(identity: other, claim: "protected 2") == nil)  // not named
        let t2 = try #require(try b.tryAcquire(identity: other, claim: "protected 1f"))
        #expect(t2.generation > t.generation)
        #expect(throws: FenceError.notHolder(FenceHolder(generation: t2.generation, identity: other))) {
            try a.writePairRecord("unprotected")
        }
        #expect(try b.readPairRecord() == "protected 1f")
        #expect(a.check(holding: t) == .taken(FenceHolder(generation: t2.generation, identity: other)))
        #expect(b.check(holding: t2) == .confirmed)
    }

    /// The other order: the holder un-names the secondary first, and the claim no longer matches.
    @Test func aHolderThatUnnamesFirstKeepsTheFence() throws {
        if let why = EtcdServer.skipReason { print("skipped: \(why)"); return }
        let etcd = try EtcdServer()
        defer { etcd.stop() }
        let (a, b, t) = try holderNaming1f(etcd)
        try a.writePairRecord("unprotected")
        #expect(try b.tryAcquire(identity: other, claim: "protected 1f") == nil)
        #expect(b.holder == FenceHolder(generation: t.generation, identity: me))
        #expect(a.check(holding: t) == .confirmed)
    }

    /// A holder whose lease ended (revoked here, as etcd does when it runs out) has lost the fence, and anyone
    /// may take it.
    @Test func anEndedLeaseLosesTheFence() throws {
        if let why = EtcdServer.skipReason { print("skipped: \(why)"); return }
        let etcd = try EtcdServer()
        defer { etcd.stop() }
        let a = etcd.fence("/p")
        let t = try #require(try a.tryAcquire(identity: me))
        #expect(a.lease != 0 && a.ttlSeconds == 60)  // twice the default watch bound of 30 s
        _ = try a.client.call("/v3/lease/revoke", ["ID": String(a.lease)])
        guard case .lost(let why) = a.check(holding: t) else { Issue.record("\(a.check(holding: t))"); return }
        #expect(why.contains("etcd lease \(a.lease) at \(etcd.location("/p")) expired"), "\(why)")
        #expect(throws: FenceError.notHolder(nil)) { try a.writePairRecord("unprotected") }
        #expect(try etcd.fence("/p").tryAcquire(identity: other) != nil)
    }

    @Test func anUnreachableClusterIsAClearErrorAndTheNextMemberServes() throws {
        if let why = EtcdServer.skipReason { print("skipped: \(why)"); return }
        let dead = try LoopbackPort.free(tcp: true)
        let nobody = EtcdFence(endpoints: [EtcdEndpoint(host: "127.0.0.1", port: dead)], prefix: "/p", leaseMs: 1000)
        #expect(throws: FenceError.etcd("no etcd member reachable: 127.0.0.1:\(dead): connect: Connection refused")) {
            try nobody.tryAcquire(identity: me)
        }
        guard case .unreadable(let why) = nobody.check(holding: FenceToken(generation: 1, identity: me)) else { Issue.record(); return }
        #expect(why.contains("Connection refused"))
        let etcd = try EtcdServer()
        defer { etcd.stop() }
        let two = EtcdFence(endpoints: [EtcdEndpoint(host: "127.0.0.1", port: dead), EtcdEndpoint(host: "127.0.0.1", port: etcd.port)],
                            prefix: "/p", leaseMs: 1000)
        #expect(try two.tryAcquire(identity: me) != nil)
        // A name with several addresses (here perhaps ::1, where etcd does not listen, then 127.0.0.1).
        let named = EtcdFence(endpoints: [EtcdEndpoint(host: "localhost", port: etcd.port)], prefix: "/q", leaseMs: 1000)
        #expect(try named.tryAcquire(identity: me) != nil)
    }

    /// Something that is not etcd on the port: a clear error naming it, whatever it sends.
    @Test func aServerThatIsNotEtcdIsNamed() throws {
        for reply in ["SSH-2.0-OpenSSH_9.2\r\n", "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
                      "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "", "HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"header\":"] {
            let server = try OneReplyServer(reply)
            let f = EtcdFence(endpoints: [EtcdEndpoint(host: "127.0.0.1", port: server.port)], prefix: "/p", leaseMs: 1000)
            do {
                _ = try f.readPairRecord()
                Issue.record("no error for \(reply.debugDescription)")
            } catch FenceError.etcd(let why) {
                let expected = reply.isEmpty ? "closed without a reply" : reply.hasPrefix("HTTP/1.1 404") ? "HTTP 404: 'not found'"
                    : reply.contains("50") ? "a reply cut short (10 of 50 bytes)" : "not an etcd server"
                #expect(why.hasPrefix("etcd at 127.0.0.1:\(server.port) (/v3/kv/txn): ") && why.contains(expected), "\(why)")
            }
            server.join()
        }
    }

    @Test func fenceLocations() throws {
        #expect(try FenceLocation(parsing: "/mnt/ft") == .directory("/mnt/ft"))
        #expect(try FenceLocation(parsing: "etcd://10.0.0.1:2379,etcd-b,[::1]:2380/lockstep/vm1/")
                == .etcd([EtcdEndpoint(host: "10.0.0.1", port: 2379), EtcdEndpoint(host: "etcd-b", port: 2379),
                          EtcdEndpoint(host: "::1", port: 2380)], prefix: "/lockstep/vm1", access: EtcdAccess()))
        #expect(try FenceLocation(parsing: "etcd://a:1/p").description == "etcd://a:1/p")
        for bad in ["etcd://a:1", "etcd://a:1/", "etcd:///p", "etcd://a:x/p", "etcd://a:0/p", "etcd://:1/p"] {
            #expect(throws: FenceError.self, "\(bad)") { try FenceLocation(parsing: bad) }
        }
    }
}

/// A TCP server on loopback that answers one connection with fixed bytes and closes it.
final class OneReplyServer: @unchecked Sendable {
    let fd: Int32
    let port: UInt16
    private let done = DispatchSemaphore(value: 0)

    init(_ reply: String) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var a = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: 0, sin_addr: in_addr(s_addr: inet_addr("127.0.0.1")), sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        // SAFETY: `a` is a sockaddr_in on the stack, passed with its own size.
        let ok = withUnsafeMutablePointer(to: &a) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && listen(fd, 1) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        guard ok else { close(fd); throw PairTestError("cannot listen on loopback") }
        self.fd = fd
        port = UInt16(bigEndian: a.sin_port)
        let done = done
        Thread.detachNewThread {
            let c = accept(fd, nil, nil)
            if c >= 0 {
                var buf = [UInt8](repeating: 0, count: 4096)
                _ = recv(c, &buf, buf.count, 0)  // the request
                _ = Array(reply.utf8).withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                close(c)
            }
            done.signal()
        }
    }

    /// Waits (bounded) for the one connection to be served, and closes the listener.
    func join() {
        _ = done.wait(timeout: .now() + 10)
        close(fd)
    }
}

/// Pairs fenced in etcd: real primary and secondary processes, a real etcd.
extension PairTests { @Suite struct EtcdPairTests {
    typealias F = FailoverTests

    static var skipReason: String? { PairFixture.skipReason ?? EtcdServer.skipReason }

    /// A workspace whose `--fence` is a fresh prefix in `etcd`.
    static func workspace(_ etcd: EtcdServer) throws -> (dir: String, key: String, fence: String) {
        let ws = try PairFixture.workspace()
        return (ws.dir, ws.key, etcd.location("/lockstep/t\(UInt32.random(in: 0...UInt32.max))"))
    }

    /// Runs `body` with an echo pair fenced in a fresh etcd (its FT link through `proxy` when given), a
    /// conversation on its UDP service port and a view of its fence; the etcd and the workspace are removed after.
    /// How a pair's sides reach etcd.
    enum Access: CaseIterable { case plain, tls, user }

    static func withPair(peerThrough proxy: TCPProxy? = nil, access: Access = .plain,
                         _ body: (_ pri: Child, _ sec: Child, _ talk: Conversation, _ fence: any Fencing) throws -> Void) throws {
        let certs = access == .tls ? try TestCerts() : nil
        defer { certs?.remove() }
        let etcd = try EtcdServer(tls: certs)
        defer { etcd.stop() }
        if access == .user { try etcd.enableAuth(prefix: "/lockstep", passwordFile: etcd.dir + ".password") }
        let ws = try workspace(etcd)
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        let (pri, sec, _) = try F.startPair(ws, udp: udp, peerOverride: proxy.map { p in { try p.start(forwardingTo: $0) } })
        try body(pri, sec, Conversation(port: udp), try FenceLocation(parsing: ws.fence).open(leaseMs: 30_000))
    }

    /// kill -9 leaves the primary's etcd lease running (60 s here): the secondary, named by the pair record,
    /// takes the fence from it at once and serves on. Also with the fence over TLS (`etcds://`, client
    /// certificates), and as a user of etcd's authentication.
    @Test(arguments: Access.allCases) func killPrimaryWithAnEtcdFence(access: Access) throws {
        if let why = access == .tls ? TestCerts.skipReason ?? PairFixture.skipReason : Self.skipReason { print("skipped: \(why)"); return }
        try Self.withPair(access: access) { pri, sec, talk, fence throws in
            talk.exchange(1...5, "a")
            pri.kill9()
            talk.exchange(6...10, "b", sec.stderrText)
            let live = sec.stderr.first { $0.hasPrefix("live: ") } ?? ""
            #expect(live.contains("fence generation"), "\(sec.stderrText)")
            talk.quit()
            #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
            talk.expectConsistent()
            // The survivor's guest ended: it freed the fence rather than leave it to its lease.
            #expect(fence.readHolder() == nil)
            _ = try? pri.wait(seconds: 10)
        }
    }

    /// A pair whose guest ends frees the fence at once: the next primary need not wait out the lease.
    @Test func aPairThatEndsFreesTheFence() throws {
        if let why = Self.skipReason { print("skipped: \(why)"); return }
        try Self.withPair { pri, sec, talk, fence throws in
            #expect(fence.readHolder() != nil)
            talk.exchange(1...2, "a")
            try talk.quitInLockstep(pri, sec)
            #expect(fence.readHolder() == nil)
            #expect(try fence.readPairRecord() == "ended 0")
        }
    }

    /// A stopped primary stands in for a lost host: its lease would hold the fence for 60 s, a lock on NFS for
    /// the server's lease (90 s). The named secondary goes live after the failure timeout instead; the old
    /// primary, resumed, finds the fence taken and stops with 75, releasing nothing.
    @Test func aStoppedPrimaryLosesItsEtcdFenceAtOnce() throws {
        if let why = Self.skipReason { print("skipped: \(why)"); return }
        try Self.withPair { pri, sec, talk, fence throws in
            talk.exchange(1...3, "a")
            pri.signal(SIGSTOP)
            let t0 = Date()
            _ = try sec.waitForLine(containing: "live: ", seconds: 20)
            let ms = Date().timeIntervalSince(t0) * 1000
            #expect(ms < 10_000, "went live \(Int(ms)) ms after the stop")
            #expect(!sec.stderr.contains { $0.contains("waiting for the lock") }, "\(sec.stderrText)")
            talk.exchange(4...6, "b")
            pri.signal(SIGCONT)
            #expect(try pri.wait(seconds: 20) == 75, "\(pri.stderrText)")
            #expect(pri.stderrText.contains("not by this process: another side may be live"), "\(pri.stderrText)")
            talk.exchange(7...8, "c")
            talk.quit()
            #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
            talk.expectConsistent()
        }
    }

    /// A partition with both sides alive and both reaching etcd: the primary's un-naming and the secondary's
    /// claim race in one compare-and-swap, so exactly one side runs the guest on (VMware FT's test-and-set);
    /// the other stops (the primary with 75) or waits for a seed (the secondary), and no reply contradicts another.
    @Test func aPartitionLeavesExactlyOneLiveSide() throws {
        if let why = Self.skipReason { print("skipped: \(why)"); return }
        let proxy = try TCPProxy()
        try Self.withPair(peerThrough: proxy) { pri, sec, talk, fence throws in
            talk.exchange(1...3, "a")
            proxy.cut()
            let outcome = try sec.waitForLine(matching: { $0.hasPrefix("live: ") || $0.contains("waiting for the primary to seed this side again") },
                                              describing: "live: or waiting for a seed")
            if outcome.hasPrefix("live: ") {
                #expect(try pri.wait(seconds: 20) == 75, "\(pri.stderrText)")
                talk.exchange(4...6, "b", sec.stderrText)
                talk.quit()
                #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)")
            } else {
                try pri.waitForLine(containing: "continuing unprotected", seconds: 10)
                talk.exchange(4...6, "b")
                try proxy.heal()
                try pri.waitForLine(containing: "protected: secondary", occurrence: 2, seconds: 30)
                talk.exchange(7...9, "c")
                try talk.quitInLockstep(pri, sec)
            }
            print("partition with an etcd fence: the \(outcome.hasPrefix("live: ") ? "secondary" : "primary") won")
            talk.expectConsistent()
        }
    }

    /// Handovers give the fence away (the key deleted) and the other side takes it: roles swap both ways.
    @Test func handoversBackAndForthWithAnEtcdFence() throws {
        if let why = Self.skipReason { print("skipped: \(why)"); return }
        let etcd = try EtcdServer()
        defer { etcd.stop() }
        let ws = try Self.workspace(etcd)
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        try F.handoversBackAndForth(ws)
    }

    /// Bad `--fence` values are usage errors naming the option; an unreachable etcd refuses the primary's start.
    @Test func badEtcdFencesAreRefused() throws {
        if let why = Self.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        typealias L = BadPeerTests
        try L.expectRefused(1, key: ws.key, ["--fence", "etcd://127.0.0.1:2379"], status: 64,
                            saying: "--fence etcd://127.0.0.1:2379: give a key prefix")
        try L.expectRefused(1, key: ws.key, ["--fence", "etcd://127.0.0.1:2379/p", "--fence-lease-ms", "0"], status: 64,
                            saying: "--fence-lease-ms 0 with an etcd fence")
        let dead = try LoopbackPort.free(tcp: true)
        try L.expectRefused(1, key: ws.key, ["--fence", "etcd://127.0.0.1:\(dead)/p"], status: 64,
                            saying: "--fence etcd://127.0.0.1:\(dead)/p: no etcd member reachable: 127.0.0.1:\(dead): connect: Connection refused")
        try L.expectRefused(1, key: ws.key, ["--fence", "etcds://127.0.0.1:\(dead)/p?cacert=\(ws.dir)/no-ca.pem"], status: 64,
                            saying: "--fence etcds://127.0.0.1:\(dead)/p?cacert=\(ws.dir)/no-ca.pem: cannot read \(ws.dir)/no-ca.pem: No such file or directory")
        try L.expectRefused(1, key: ws.key, ["--fence", "etcd://127.0.0.1:\(dead)/p?cacert=/x"], status: 64,
                            saying: "--fence etcd://127.0.0.1:\(dead)/p?cacert=/x: TLS options need etcds://")
    }
} }
