import ArgumentParser
import Failover
import Foundation
import Glibc
import Machine
import Pair

/// `lockstep bench pair`: the live pair's figures from one invocation, measured on real `lockstep` processes.
///
/// Why separate processes (this executable, spawned on loopback) rather than in-process runners: a failover
/// must survive a real kill -9 (sockets torn down by the kernel, the fence's flock released by process death),
/// and the protected/unprotected ratio must include everything a user's pair pays.
struct BenchPairCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pair",
        abstract: "Measure the live pair: protected/unprotected throughput, replication lag, output gate latency, re-seed pause, kill -9 failover time.",
        discussion: """
        Spawns this lockstep executable on 127.0.0.1, one guest at a time: for timer-compute, exit-heavy and echo a \
        protected run (secondary + primary) and an unprotected `lockstep run`; then --reseeds re-seeds of a running \
        echo (pre-copy pause, connected → protected), one of the dirty guest (auto-converge), one divergence of \
        echo-state repaired by a delta seed against a new secondary's full seed (these three skipped with \
        --reseeds 0), --migrations moves of a running echo to a new host (guest stopped, unprotected after), --trials kill -9 failovers of echo, and --restarts kill -9s of an echo pair whose sides run under \
        `lockstep supervise` (kill → survivor's reply, kill → protected again by the killed side's restart). \
        Children's stderr, the key and the stats files live in a temporary directory (kept and named when something \
        fails). Exits 1 (FAIL) when a run fails, the two sides' state digests differ or a failover gets no reply; a \
        missed performance target is reported (MISS), not an error.
        """)

    @Option(name: .long, help: "Directory holding the guest ELF images.") var guests: String = "Guests/build"
    @Option(name: .long, help: "Write every figure as one JSON object to this file.") var json: String?
    @Option(name: .long, help: "Directory for the SVG plots (default: the --json file's directory; none without either).") var plots: String?
    @Option(name: .long, help: "kill -9 failover trials.") var trials: Int = 20
    @Option(name: .long, help: "Re-seeds of the running echo guest (kill -9 of the secondary, a new one seeded by pre-copy); above 0, one of the dirty guest and a divergence repair of echo-state too.") var reseeds: Int = 5
    @Option(name: .long, help: "kill -9s of a supervised echo pair, alternating sides (HA restart: the killed side comes back as the survivor's secondary).") var restarts: Int = 6
    @Option(name: .long, help: "Migrations of the running echo guest (`control … migrate`), each to a new target whose --peer is the pair's secondary.") var migrations: Int = 4
    @Option(name: .long, help: "Echo requests per throughput run.") var requests: Int = 2000
    @Option(name: .long, help: "Echo requests in flight at once (1: closed loop, one request per round trip).") var window: Int = 1
    @Option(name: .long, help: "Protected/unprotected run pairs per guest (medians are reported).") var `repeat`: Int = 1
    @Option(name: .long, help: "Guest RAM in MiB.") var memory: UInt32 = 256
    @Option(name: .long, help: "Upper bound on any one child's run, in seconds (it is killed after that).") var timeoutS: Int = 120
    @Option(name: .long, help: "--link-cpu for both sides: a core, or none. Default: 1, the primary's vCPU core, when the host has 2 or more (one host: the link threads then wake each other without an IPI).") var linkCpu: String?
    @Option(name: .long, help: "The only core the secondary may use, as if on a host of its own: a core, or none (the default).") var secondaryCpu: String?
    @Option(name: .long, help: "--link-poll-us for the secondary (default 0: its receiver sleeps between frames).") var linkPollUs: UInt64 = 0
    @Option(name: .long, help: "--encrypt for both sides: disabled, opportunistic (the default: AES-256-GCM) or required.") var encrypt: String = "opportunistic"
    @Option(name: .long, help: "Fence every pair in this etcd (etcd://HOST:PORT[,HOST:PORT...], or etcds://...[?cacert=FILE&cert=FILE&key=FILE] over TLS), each under a fresh key prefix, instead of in a temporary directory.") var fenceEtcd: String?
    @Flag(name: .long, help: "Keep the temporary directory (children's stderr, stats JSON, key) even on success.") var keepTemp = false

    func validate() throws {
        guard trials >= 0, reseeds >= 0, restarts >= 0, migrations >= 0, requests >= 1, window >= 1, `repeat` >= 1, timeoutS >= 10 else {
            throw ValidationError("need --trials ≥ 0, --reseeds ≥ 0, --restarts ≥ 0, --migrations ≥ 0, --requests ≥ 1, --window ≥ 1, --repeat ≥ 1, --timeout-s ≥ 10")
        }
        for (name, v) in [("--link-cpu", linkCpu), ("--secondary-cpu", secondaryCpu)] {
            if let c = v, c != "none", Int32(c).map(Cores.allows) != true {
                throw ValidationError("\(name) \(c): none, or one of this process's cores (\(Cores.list))")
            }
        }
        guard linkPollUs <= 1_000_000 else { throw ValidationError("--link-poll-us \(linkPollUs): at most 1000000") }
        if let e = fenceEtcd {
            guard case .etcd? = try? FenceLocation(parsing: PairBench.etcdFence(e, prefix: "/lockstep-bench")) else {
                throw ValidationError("--fence-etcd \(e): expected etcd://HOST:PORT[,HOST:PORT...] or etcds://HOST:PORT[,...][?cacert=FILE&cert=FILE&key=FILE]")
            }
        }
        guard ["disabled", "opportunistic", "required"].contains(encrypt) else {
            throw ValidationError("--encrypt \(encrypt): use disabled, opportunistic or required")
        }
    }

    /// Where the children run (they start with this process's cores). Default: both sides' link threads on the
    /// primary's vCPU core, the secondary's other threads anywhere. Benchmarks/README.md compares the secondary
    /// on a core of its own, polling (`--secondary-cpu 0 --link-cpu 0 --link-poll-us 5000`).
    var placement: PairBench.Placement {
        PairBench.Placement(secondaryCPU: secondaryCpu.flatMap { Int32($0) }, linkCPU: linkCpu.map { Int32($0) } ?? Cores.vcpu,
                            linkPollUs: linkPollUs)
    }

    func run() throws {
        LiveChildren.killOnInterrupt()
        let h = try PairBench(guestDir: guests, memory: memory, timeoutS: timeoutS, placement: placement, encrypt: encrypt,
                              fenceEtcd: fenceEtcd)
        var ok = false
        defer {
            h.killAll()
            if ok && !keepTemp { h.cleanUp() } else { FileHandle.standardError.write(Data("bench pair: children's stderr and stats kept in \(h.tempDir)\n".utf8)) }
        }
        let plotDir = plots ?? json.map { ($0 as NSString).deletingLastPathComponent }.map { $0.isEmpty ? "." : $0 }
        var report: [String: Any]
        do {
            report = try h.measure(requests: requests, window: window, repeats: `repeat`, trials: trials, reseeds: reseeds, restarts: restarts, migrations: migrations, plotDir: plotDir)
        } catch let e as BenchFailure {
            print("FAIL: \(e.message)")
            if let json { try? Bench.writeJSON(["ok": false, "failure": e.message, "host": Bench.hostInfo()], to: json) }
            throw ExitCode(1)
        }
        if let json {
            do { try Bench.writeJSON(report, to: json) } catch { throw fail("cannot write \(json): \(error.localizedDescription)", .ioError) }
            print("JSON written to \(json)")
        }
        ok = report["ok"] as? Bool ?? false
        if !ok { throw ExitCode(1) }
    }
}

/// One pair bench: the temporary directory, the key, the children.
final class PairBench {
    let exe: String
    let guestDir: String
    let memory: UInt32
    let timeoutNs: UInt64
    let placement: Placement
    /// `--encrypt` for both sides.
    let encrypt: String
    /// `--fence-etcd`: the etcd holding every pair's fence (nil: a temporary directory each).
    let fenceEtcd: String?
    let tempDir: String
    let keyPath: String
    private var children: [Child] = []
    private var counter = 0

    // Targets (issue 3).
    static let lagP50Target = 30.0, lagP99Target = 200.0, gateP50Target = 50.0, failoverP99TargetMs = 50.0
    static let computeRatioTarget = 0.97, echoRatioTarget = 0.90
    /// Requests answered before each kill, so the secondary is replaying real traffic when the primary dies.
    static let warmRequests = 20

    /// Where the children run (`lockstep bench pair --secondary-cpu --link-cpu --link-poll-us`).
    struct Placement {
        var secondaryCPU: Int32?
        var linkCPU: Int32?
        var linkPollUs: UInt64
        var text: String {
            "secondary on \(secondaryCPU.map { "core \($0)" } ?? "any core"), link threads on \(linkCPU.map { "core \($0)" } ?? "any core")"
                + (linkPollUs > 0 ? ", the secondary's receiver polls \(linkPollUs) µs" : "")
        }
        var json: [String: Any] {
            ["secondary_cpu": secondaryCPU.map { Int($0) as Any } ?? NSNull(), "link_cpu": linkCPU.map { Int($0) as Any } ?? NSNull(),
             "link_poll_us": linkPollUs]
        }
    }

    init(guestDir: String, memory: UInt32, timeoutS: Int, placement: Placement, encrypt: String = "opportunistic",
         fenceEtcd: String? = nil) throws {
        self.placement = placement
        self.encrypt = encrypt
        self.fenceEtcd = fenceEtcd
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { throw fail("cannot read /proc/self/exe: \(String(cString: strerror(errno)))", .internalError) }
        exe = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        self.guestDir = guestDir
        self.memory = memory
        timeoutNs = UInt64(timeoutS) * 1_000_000_000
        for g in ["timer-compute", "exit-heavy", "echo"] {
            let path = (guestDir as NSString).appendingPathComponent("\(g).elf")
            guard FileManager.default.isReadableFile(atPath: path) else {
                throw fail("\(path) not found: build the guests with `make -C Guests` or pass --guests", .usage)
            }
        }
        guard let dir = makeTemporaryDirectory("lockstep-pair") else { throw fail("cannot create a temporary directory in \(NSTemporaryDirectory())", .ioError) }
        tempDir = dir
        // A fresh random 32-byte pre-shared key, readable only by us.
        keyPath = tempDir + "/psk"
        var key = [UInt8](repeating: 0, count: 32)
        var rng = SystemRandomNumberGenerator()
        for i in key.indices { key[i] = rng.next() }
        guard FileManager.default.createFile(atPath: keyPath, contents: Data(key), attributes: [.posixPermissions: 0o600]) else {
            throw fail("cannot write the key file \(keyPath)", .ioError)
        }
    }

    func cleanUp() { try? FileManager.default.removeItem(atPath: tempDir) }
    func guest(_ name: String) -> String { (guestDir as NSString).appendingPathComponent("\(name).elf") }
    func progress(_ s: String) { FileHandle.standardError.write(Data("bench pair: \(s)\n".utf8)) }

    // MARK: children

    func spawn(_ tag: String, _ args: [String], cpu: Int32? = nil, environment: [String: String] = [:]) throws -> Child {
        counter += 1
        let base = "\(tempDir)/\(String(format: "%03d", counter))-\(tag)"
        let c = try Child(name: tag, exe: exe, args: args, outPath: base + ".out", errPath: base + ".err", cpu: cpu, environment: environment)
        children.append(c)
        return c
    }

    /// SIGKILLs every child still running and reaps them all (bounded).
    func killAll() {
        for c in children { c.kill9() }
        let deadline = monotonicNs() + 5_000_000_000
        for c in children { _ = c.wait(until: deadline) }
        children.removeAll { $0.ended }
    }

    /// A failure with the tails of the children's stderr; kills every child first.
    func failure(_ message: String, _ cs: [Child]) -> BenchFailure {
        killAll()
        return BenchFailure(message: ([message] + cs.map { $0.tail() }).joined(separator: "\n"))
    }

    /// Waits (bounded) for `c` to end with status 0.
    func finish(_ c: Child, within ns: UInt64? = nil, _ others: [Child] = []) throws {
        guard c.wait(until: monotonicNs() + (ns ?? timeoutNs)) else { throw failure("\(c.name) did not end in time", [c] + others) }
        guard c.code == 0 else { throw failure("\(c.name) ended with \(c.endText)", [c] + others) }
    }

    /// Waits (bounded) for a stderr line containing `text`; returns the line.
    func awaitLine(_ c: Child, containing text: String, timeoutNs: UInt64 = 20_000_000_000) throws -> String {
        let deadline = monotonicNs() + timeoutNs
        while true {
            if let l = c.stderrText.split(separator: "\n").first(where: { $0.contains(text) }) { return String(l) }
            if c.reap() { throw failure("\(c.name) ended before printing \"\(text)\"", [c]) }
            if monotonicNs() >= deadline { throw failure("\(c.name) did not print \"\(text)\" in time", [c]) }
            usleep(2000)  // poll the stderr file
        }
    }

    var common: [String] {
        ["--key-file", keyPath, "--status-interval-ms", "0", "--encrypt", encrypt] + (placement.linkCPU.map { ["--link-cpu", "\($0)"] } ?? [])
    }

    /// A secondary listening on an ephemeral port; returns it and the port it printed.
    func startSecondary(_ tag: String, serial: String, fence: String?, listen: String = "127.0.0.1:0", extra: [String] = []) throws -> (Child, UInt16) {
        let s = try spawn("\(tag)-secondary", ["secondary", "--listen", listen, "--serial", serial, "--verbose",
                                                "--accept-timeout-ms", "30000", "--link-poll-us", "\(placement.linkPollUs)"]
                                               + common + (fence.map { ["--fence", $0] } ?? []) + extra, cpu: placement.secondaryCPU)
        let line = try awaitLine(s, containing: "listening on")
        guard let port = line.split(separator: ":").last.flatMap({ UInt16($0) }) else { throw failure("cannot read the port in: \(line)", [s]) }
        return (s, port)
    }

    func startPrimary(_ tag: String, guest g: String, peer: UInt16, serial: String, fence: String?, stats: String?,
                      environment: [String: String] = [:], extra: [String] = []) throws -> Child {
        try spawn("\(tag)-primary", ["primary", guest(g), "--peer", "127.0.0.1:\(peer)", "--serial", serial, "--memory", "\(memory)",
                                      "--verbose", "--connect-timeout-ms", "20000"] + common
                  + (fence.map { ["--fence", $0] } ?? []) + (stats.map { ["--stats-json", $0] } ?? []) + extra, environment: environment)
    }

    // MARK: echo client

    struct EchoResult {
        var requests: Int
        var seconds: Double
        var rttUs: [Double]
        var resends: Int
        var lastN: UInt64
        /// Reply datagrams, and those that ended inside a line.
        var datagrams = 0
        var splitDatagrams = 0
        var perSecond: Double { Double(requests) / seconds }
        var json: [String: Any] {
            ["requests": requests, "seconds": seconds, "requests_per_second": perSecond, "resends": resends, "last_n": lastN,
             "datagrams": datagrams, "datagrams_ending_mid_line": splitDatagrams,
             "rtt_us_p50": percentile(rttUs, 50) ?? 0, "rtt_us_p99": percentile(rttUs, 99) ?? 0, "rtt_us_max": rttUs.max() ?? 0]
        }
    }

    /// PING until PONG: the guest is up and (when protected) its output passes the gate.
    func ping(_ client: UDPLineClient, _ alive: [Child]) throws {
        let deadline = monotonicNs() + 30_000_000_000
        while monotonicNs() < deadline {
            client.send("PING")
            if client.receive(until: monotonicNs() + 20_000_000).contains("PONG") { return }
            if alive.contains(where: { $0.reap() }) { throw failure("a child ended before the echo guest answered PING", alive) }
        }
        throw failure("the echo guest did not answer PING within 30 s", alive)
    }

    /// Sends `count` REQ lines (seq from `first`), `window` in flight, resending one unanswered for 100 ms.
    func drive(_ client: UDPLineClient, count: Int, window: Int, first: UInt64, _ alive: [Child]) throws -> EchoResult {
        var sentAt: [UInt64: UInt64] = [:], lastSend: [UInt64: UInt64] = [:]
        var next = first, done = 0, resends = 0, lastN: UInt64 = 0
        var rtt: [Double] = []
        rtt.reserveCapacity(count)
        let start = monotonicNs(), deadline = start + timeoutNs
        while done < count {
            while sentAt.count < window && next < first + UInt64(count) {
                let now = monotonicNs()
                client.send("REQ \(next) bench-\(next)")
                sentAt[next] = now; lastSend[next] = now
                next += 1
            }
            let lines = client.receive(until: monotonicNs() + 5_000_000)
            for l in lines {
                guard let r = EchoReply(l), let t = sentAt.removeValue(forKey: r.seq) else { continue }
                lastSend[r.seq] = nil
                rtt.append(Double(monotonicNs() &- t) / 1000)
                lastN = max(lastN, r.n)
                done += 1
            }
            if lines.isEmpty {
                let now = monotonicNs()
                if now >= deadline { throw failure("echo: \(done)/\(count) requests answered before the timeout", alive) }
                if alive.contains(where: { $0.reap() }) { throw failure("a child ended while echo requests were outstanding", alive) }
                for (seq, t) in lastSend where now &- t >= 100_000_000 {
                    client.send("REQ \(seq) bench-\(seq)"); lastSend[seq] = now; resends += 1
                }
            }
        }
        return EchoResult(requests: count, seconds: Double(monotonicNs() - start) / 1e9, rttUs: rtt, resends: resends, lastN: lastN,
                          datagrams: client.datagrams, splitDatagrams: client.splitDatagrams)
    }

    /// QUIT until the guest's process ends (a lost datagram is resent every 200 ms).
    func quit(_ client: UDPLineClient, _ c: Child, _ others: [Child] = []) throws {
        let deadline = monotonicNs() + 10_000_000_000
        while !c.reap() {
            if monotonicNs() >= deadline { throw failure("\(c.name) did not end after QUIT", [c] + others) }
            client.send("QUIT")
            _ = c.wait(until: monotonicNs() + 200_000_000)
        }
    }

    // MARK: runs

    struct Protected {
        var stats: PairStats
        var primaryDigest: String
        var secondaryDigest: String
        var guestMs: Double
        var wallMs: Double
        var echo: EchoResult?
        /// Why the secondary did not follow the primary to its end (nil when it did).
        var problem: String?
        /// Peak resident sets (MiB) of the two processes.
        var primaryRSSMiB: Double
        var secondaryRSSMiB: Double
        var json: [String: Any] {
            var o: [String: Any] = ["guest_elapsed_ms": guestMs, "primary_wall_ms": wallMs, "primary_digest": primaryDigest,
                                    "secondary_digest": secondaryDigest, "stats": PairBench.jsonObject(stats), "problem": problem ?? NSNull(),
                                    "primary_max_rss_mib": primaryRSSMiB, "secondary_max_rss_mib": secondaryRSSMiB]
            o["echo"] = echo?.json
            return o
        }
    }

    struct Unprotected {
        var digest: String
        var guestMs: Double
        var wallMs: Double
        var echo: EchoResult?
        var rssMiB: Double
        var json: [String: Any] {
            var o: [String: Any] = ["guest_elapsed_ms": guestMs, "wall_ms": wallMs, "digest": digest, "max_rss_mib": rssMiB]
            o["echo"] = echo?.json
            return o
        }
    }

    static func jsonObject<T: Encodable>(_ v: T) -> Any {
        (try? JSONEncoder().encode(v)).flatMap { try? JSONSerialization.jsonObject(with: $0) } ?? NSNull()
    }

    /// A fresh file name in the temporary directory.
    func tempFile(_ tag: String, _ ext: String) -> String {
        counter += 1
        return "\(tempDir)/\(String(format: "%03d", counter))-\(tag).\(ext)"
    }

    /// `--fence-etcd`'s members with a key prefix, before its TLS query if it has one.
    static func etcdFence(_ members: String, prefix: String) -> String {
        guard let q = members.firstIndex(of: "?") else { return members + prefix }
        return members[..<q] + prefix + members[q...]
    }

    /// A fresh `--fence` for one pair: a prefix in `fenceEtcd`, or a new directory.
    func fence(_ tag: String) throws -> String {
        if let e = fenceEtcd { return Self.etcdFence(e, prefix: "/lockstep-bench/\(getpid())-\(tag)-\(counter)") }
        let fence = tempFile(tag, "fence")
        try FileManager.default.createDirectory(atPath: fence, withIntermediateDirectories: true)
        return fence
    }

    /// The primary's `--stats-json` file, written when it ended (`what` names the run in the error).
    func primaryStats(_ path: String, _ what: String, _ pri: Child) throws -> PairStats {
        do { return try JSONDecoder().decode(PairStats.self, from: Data(contentsOf: URL(fileURLWithPath: path))) } catch {
            throw failure("\(what): cannot read the primary's --stats-json \(path): \(error)", [pri])
        }
    }

    /// Serial backend of a throughput run: echo talks UDP to the harness; the others write a file.
    func serial(_ g: String, _ tag: String) throws -> (String, UInt16?) {
        if g == "echo" { let p = try LoopbackPort.free(); return ("udp:127.0.0.1:\(p)", p) }
        return ("file:" + tempFile(tag, "serial"), nil)
    }

    func protectedRun(_ g: String, requests: Int, window: Int) throws -> Protected {
        let tag = "\(g)-protected"
        progress("\(g): protected run")
        let stats = tempFile(tag, "stats.json")
        // A fence, as a real pair has: a secondary that wrongly presumes the primary failed then stops rather
        // than running a second live copy of the guest (which nothing would ever end).
        let fence = try fence(tag)
        let (sec, port) = try startSecondary(tag, serial: "none", fence: fence)
        let (ser, udp) = try serial(g, tag)
        let pri = try startPrimary(tag, guest: g, peer: port, serial: ser, fence: fence, stats: stats)
        var echo: EchoResult?
        if let udp {
            let client = try UDPLineClient(port: udp)
            try ping(client, [pri, sec])
            echo = try drive(client, count: requests, window: window, first: 1, [pri, sec])
            try quit(client, pri, [sec])
        }
        try finish(pri, [sec])
        guard sec.wait(until: monotonicNs() + 30_000_000_000) else { throw failure("\(g): the secondary did not end after the primary", [sec, pri]) }
        // A secondary that lost the primary mid-run is a finding to report, not a reason to stop the bench.
        var problem: String?
        if sec.code != 0 {
            let why = sec.stderrText.split(separator: "\n").first { $0.contains("presumed failed") || $0.contains("error") }
            problem = "the secondary did not follow the primary to its end (\(sec.endText)): \(why ?? "")"
            progress("\(g): \(problem!)\n\(sec.tail())\n\(pri.tail(6))")
        }
        guard let pd = pri.digest else { throw failure("\(g): the primary printed no state-digest", [pri, sec]) }
        let sd = sec.digest ?? "none"
        guard let ms = pri.guestElapsedMs else { throw failure("\(g): no run time in the primary's --verbose line", [pri]) }
        let st = try primaryStats(stats, g, pri)
        return Protected(stats: st, primaryDigest: pd, secondaryDigest: sd, guestMs: ms, wallMs: pri.wallMs, echo: echo, problem: problem,
                         primaryRSSMiB: pri.maxRSSMiB, secondaryRSSMiB: sec.maxRSSMiB)
    }

    func unprotectedRun(_ g: String, requests: Int, window: Int) throws -> Unprotected {
        let tag = "\(g)-unprotected"
        progress("\(g): unprotected run")
        let (ser, udp) = try serial(g, tag)
        let c = try spawn(tag, ["run", guest(g), "--serial", ser, "--memory", "\(memory)", "--verbose"])
        var echo: EchoResult?
        if let udp {
            let client = try UDPLineClient(port: udp)
            try ping(client, [c])
            echo = try drive(client, count: requests, window: window, first: 1, [c])
            try quit(client, c)
        }
        try finish(c)
        guard let d = c.digest, let ms = c.guestElapsedMs else { throw failure("\(g): no state-digest or run time from `lockstep run`", [c]) }
        return Unprotected(digest: d, guestMs: ms, wallMs: c.wallMs, echo: echo, rssMiB: c.maxRSSMiB)
    }

    // MARK: failover

    struct Trial {
        var killToReplyMs: Double?
        var killToLiveMsUpperBound: Double?
        var liveLine: String = ""
        var replyN: UInt64 = 0
        var survivorEnd = ""
        var problem: String?
        var json: [String: Any] {
            ["kill_to_reply_ms": killToReplyMs ?? NSNull(), "kill_to_live_ms_upper_bound": killToLiveMsUpperBound ?? NSNull(),
             "live_line": liveLine, "reply_n": replyN, "survivor_end": survivorEnd, "problem": problem ?? NSNull()]
        }
    }

    /// Echo pair on one UDP service address, `warmRequests` answered, kill -9 of the primary, then REQ every 2 ms
    /// until the survivor answers. A trial that gets no answer is reported (with stderr tails), not thrown.
    func failoverTrial(_ i: Int) throws -> Trial {
        let tag = "failover\(i)"
        let fence = "\(tempDir)/fence-\(i)"
        try FileManager.default.createDirectory(atPath: fence, withIntermediateDirectories: true)
        let port = try LoopbackPort.free()
        let serial = "udp:127.0.0.1:\(port)"
        let (sec, sport) = try startSecondary(tag, serial: serial, fence: fence)
        let pri = try startPrimary(tag, guest: "echo", peer: sport, serial: serial, fence: fence, stats: nil)
        let client = try UDPLineClient(port: port)
        try ping(client, [pri, sec])
        _ = try awaitLine(sec, containing: "replaying")
        _ = try drive(client, count: Self.warmRequests, window: 1, first: 1, [pri, sec])
        let seq = UInt64(Self.warmRequests + 1)

        var t = Trial()
        let t0 = monotonicNs()
        kill(pri.pid, SIGKILL)
        var nextSend = t0, liveAt: UInt64?, replyAt: UInt64?
        let deadline = t0 + 10_000_000_000
        while replyAt == nil, monotonicNs() < deadline, !sec.reap() {
            if monotonicNs() >= nextSend { client.send("REQ \(seq) failover"); nextSend += 2_000_000 }
            for l in client.receive(until: nextSend) {
                if let r = EchoReply(l), r.seq == seq { replyAt = monotonicNs(); t.replyN = r.n; break }
            }
            if liveAt == nil, sec.stderrText.contains("\nlive: ") { liveAt = monotonicNs() }
        }
        guard pri.wait(until: monotonicNs() + 5_000_000_000) else { throw failure("the killed primary was not reaped", [pri, sec]) }
        if let line = sec.stderrText.split(separator: "\n").first(where: { $0.hasPrefix("live: ") }) {
            t.liveLine = String(line.dropFirst(6))
            t.killToLiveMsUpperBound = Double((liveAt ?? replyAt ?? monotonicNs()) &- t0) / 1e6
        }
        guard let replyAt else {
            t.problem = sec.ended ? "the secondary ended (\(sec.endText)) without answering" : "no reply within 10 s of the kill"
            progress("failover \(i): FAIL: \(t.problem!)\n\(sec.tail())\n\(pri.tail(4))")
            sec.kill9(); _ = sec.wait(until: monotonicNs() + 5_000_000_000)
            t.survivorEnd = sec.endText
            return t
        }
        t.killToReplyMs = Double(replyAt &- t0) / 1e6
        // The survivor must hold every request the primary answered: its count goes on from there.
        if t.replyN != seq { t.problem = "the survivor answered n=\(t.replyN), expected \(seq) (lost or repeated requests)" }
        try quit(client, sec)
        t.survivorEnd = sec.endText
        if sec.code != 0 && t.problem == nil { t.problem = "the survivor ended with \(sec.endText) after QUIT" }
        if let p = t.problem { progress("failover \(i): \(p)\n\(sec.tail())") }
        return t
    }
}

// MARK: the whole bench and its report

extension PairBench {
    static func median(_ xs: [Double]) -> Double {
        let s = xs.sorted(), n = s.count
        return n % 2 == 1 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2
    }

    /// Histograms of [value, count] buckets added together.
    struct MergedHistogram {
        var buckets: [(value: Double, count: Double)]
        var total: Double { buckets.reduce(0) { $0 + $1.count } }
        /// The smallest recorded value with at least `p` % of the counts at or below it (0 when empty).
        func percentile(_ p: Double) -> Double {
            let want = total * p / 100
            var seen = 0.0
            for b in buckets { seen += b.count; if seen >= want { return b.value } }
            return buckets.last?.value ?? 0
        }
    }

    static func merged(_ histograms: [[[Double]]]) -> MergedHistogram {
        var counts: [Double: Double] = [:]
        for h in histograms { for b in h where b.count == 2 { counts[b[0], default: 0] += b[1] } }
        return MergedHistogram(buckets: counts.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
    }

    /// The figures of one guest's protected runs (lag, gate, log) against its unprotected runs.
    func figures(_ g: String, _ prot: [Protected], _ unprot: [Unprotected]) -> (ratio: Double, [Figure]) {
        let key = g.replacingOccurrences(of: "-", with: "_")
        let isEcho = g == "echo"
        // Throughput: echo by the client's requests/s, the others by the guest's run time.
        let ratio = isEcho ? Self.median(prot.map { $0.echo!.perSecond }) / Self.median(unprot.map { $0.echo!.perSecond })
                           : Self.median(unprot.map(\.guestMs)) / Self.median(prot.map(\.guestMs))
        let goal: Figure.Goal = g == "timer-compute" ? .atLeast(Self.computeRatioTarget) : isEcho ? .atLeast(Self.echoRatioTarget) : .none
        let s = prot.last!.stats
        // Replication lag over every batch of every run (their histograms merged); the others, medians of the runs'.
        let lag = Self.merged(prot.map(\.stats.lagHistogram))
        let mid = { (v: (PairStats) -> Double) in Self.median(prot.map { v($0.stats) }) }
        let gateLines = prot.reduce(UInt64(0)) { $0 + $1.stats.gateLatencyUs.count }
        var f = [Figure(key: "\(key)_throughput_ratio", label: "\(g): protected/unprotected \(isEcho ? "requests/s" : "run time⁻¹")",
                        value: ratio, unit: "×", goal: goal)]
        if isEcho {
            // Medians of the runs', as the ratio is (the last run's alone read as if they made it).
            let pe = prot.map { $0.echo! }, ue = unprot.map { $0.echo! }
            f += [Figure(key: "echo_requests_per_second_protected", label: "echo: requests/s protected", value: Self.median(pe.map(\.perSecond)), unit: "/s"),
                  Figure(key: "echo_requests_per_second_unprotected", label: "echo: requests/s unprotected", value: Self.median(ue.map(\.perSecond)), unit: "/s"),
                  Figure(key: "echo_rtt_p50_us_protected", label: "echo: request round trip p50, protected", value: Self.median(pe.map { percentile($0.rttUs, 50) ?? 0 }), unit: "µs"),
                  Figure(key: "echo_rtt_p50_us_unprotected", label: "echo: request round trip p50, unprotected", value: Self.median(ue.map { percentile($0.rttUs, 50) ?? 0 }), unit: "µs")]
        }
        f += [
            Figure(key: "\(key)_replication_lag_p50_us", label: "\(g): replication lag p50", value: lag.percentile(50), unit: "µs", goal: .atMost(Self.lagP50Target)),
            Figure(key: "\(key)_replication_lag_p99_us", label: "\(g): replication lag p99", value: lag.percentile(99), unit: "µs", goal: .atMost(Self.lagP99Target)),
            Figure(key: "\(key)_replication_lag_p999_us", label: "\(g): replication lag p99.9", value: lag.percentile(99.9), unit: "µs"),
            Figure(key: "\(key)_replay_lag_p50_us", label: "\(g): replay lag p50", value: mid { $0.replayLagUs.p50 }, unit: "µs"),
            Figure(key: "\(key)_replay_lag_p99_us", label: "\(g): replay lag p99", value: mid { $0.replayLagUs.p99 }, unit: "µs"),
            Figure(key: "\(key)_replay_lag_p50_exits", label: "\(g): replay lag p50, exits", value: mid { $0.replayLagExits.p50 }, unit: "exits"),
            Figure(key: "\(key)_replay_lag_p99_exits", label: "\(g): replay lag p99, exits", value: mid { $0.replayLagExits.p99 }, unit: "exits"),
        ]
        if gateLines > 0 {
            f += [Figure(key: "\(key)_gate_latency_p50_us", label: "\(g): gate latency p50 (\(gateLines) lines)", value: mid { $0.gateLatencyUs.p50 }, unit: "µs", goal: .atMost(Self.gateP50Target)),
                  Figure(key: "\(key)_gate_latency_p99_us", label: "\(g): gate latency p99", value: mid { $0.gateLatencyUs.p99 }, unit: "µs")]
        }
        if prot.contains(where: { $0.stats.linkRoundTripUs.count > 0 }) {
            f += [Figure(key: "\(key)_link_rtt_p50_us", label: "\(g): FT link round trip p50 (idle heartbeats)", value: mid { $0.linkRoundTripUs.p50 }, unit: "µs"),
                  Figure(key: "\(key)_link_rtt_p99_us", label: "\(g): FT link round trip p99", value: mid { $0.linkRoundTripUs.p99 }, unit: "µs")]
        }
        f += [Figure(key: "\(key)_log_bytes_per_second", label: "\(g): log bytes/s", value: Double(s.logBytes) / max(s.elapsedSeconds, 1e-9), unit: "B/s"),
              Figure(key: "\(key)_log_bytes_per_event", label: "\(g): log bytes/event", value: s.events == 0 ? 0 : Double(s.logBytes) / Double(s.events), unit: "B/event")]
        // Memory: peak resident sets (medians over the runs), the protected primary's against the unprotected run.
        let runRSS = Self.median(unprot.map(\.rssMiB)), primaryRSS = Self.median(prot.map(\.primaryRSSMiB))
        f += [Figure(key: "\(key)_rss_ratio", label: "\(g): peak RSS, protected primary / unprotected", value: primaryRSS / max(runRSS, 1e-9), unit: "×"),
              Figure(key: "\(key)_rss_unprotected_mib", label: "\(g): peak RSS unprotected", value: runRSS, unit: "MiB"),
              Figure(key: "\(key)_rss_secondary_mib", label: "\(g): peak RSS secondary", value: Self.median(prot.map(\.secondaryRSSMiB)), unit: "MiB")]
        return (ratio, f)
    }

    func writePlot(_ svg: String, _ dir: String, _ name: String) -> String? {
        let path = (dir as NSString).appendingPathComponent(name)
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try svg.write(toFile: path, atomically: true, encoding: .utf8)
            return path
        } catch { progress("cannot write \(path): \(error.localizedDescription)"); return nil }
    }

    func measure(requests: Int, window: Int, repeats: Int, trials: Int, reseeds: Int, restarts: Int, migrations: Int, plotDir: String?) throws -> [String: Any] {
        let loadStart = Bench.hostInfo()["loadavg"] ?? ""
        var figures: [Figure] = [], notes: [String] = [], plotPaths: [String] = []
        // First, on a quiet host: what the link's wake-up chain costs here at the least.
        progress("thread wake-up round trips")
        let wake = WakeProbe.measure()
        if let w = wake, let (v, h) = w.cores {
            figures += [Figure(key: "host_wake_round_trip_same_core_us", label: "host: thread wake-up round trip, same core (\(v))", value: w.sameCoreUs, unit: "µs"),
                        Figure(key: "host_wake_round_trip_cross_core_us", label: "host: thread wake-up round trip, cores \(v) ↔ \(h)", value: w.crossCoreUs, unit: "µs")]
            if w.crossCoreUs > 20, w.crossCoreUs > 3 * w.sameCoreUs {
                let idle = WakeProbe.idleInfo().map { "\($0.key) \($0.value)" }.sorted().joined(separator: ", ")
                notes.append("host: waking a thread on another core costs \(Bench.fmt(w.crossCoreUs)) µs a round trip (\(idle.isEmpty ? "idle driver unknown" : idle)): "
                             + "idle cores halt or sleep deeply, and every log batch whose threads sit on two cores pays that; see docs/lab.md, shallow idle states")
            }
        }
        var guestsJSON: [String: Any] = [:]
        var digestsMatch = true
        for g in ["timer-compute", "exit-heavy", "echo"] {
            var prot: [Protected] = [], unprot: [Unprotected] = []
            for i in 0..<repeats {
                // Alternate which goes first, so warm caches or a neighbour's burst do not favour one mode.
                if i % 2 == 0 { unprot.append(try unprotectedRun(g, requests: requests, window: window)) }
                prot.append(try protectedRun(g, requests: requests, window: window))
                if i % 2 == 1 { unprot.append(try unprotectedRun(g, requests: requests, window: window)) }
            }
            let (ratio, f) = self.figures(g, prot, unprot)
            figures += f
            let same = prot.allSatisfy { $0.primaryDigest == $0.secondaryDigest }
            if !same { digestsMatch = false }
            notes.append("\(g): state digests \(same ? "equal" : "DIFFER"): primary \(prot.last!.primaryDigest.prefix(16))…, secondary \(prot.last!.secondaryDigest.prefix(16))…"
                         + (prot.count > 1 ? " (\(prot.count) runs)" : ""))
            for p in prot { if let why = p.problem { notes.append("\(g): FAIL: \(why)") } }
            let s = prot.last!.stats
            let lag = Self.merged(prot.map(\.stats.lagHistogram))
            if let dir = plotDir {
                plotPaths += [writePlot(PairPlots.lagOverTime(guest: g, series: s.lagSeries, p50Target: Self.lagP50Target, p99Target: Self.lagP99Target), dir, "pair-lag-\(g).svg"),
                              writePlot(PairPlots.lagHistogram(guest: g, buckets: lag.buckets.map { [$0.value, $0.count] }, p50: lag.percentile(50), p99: lag.percentile(99),
                                                               p50Target: Self.lagP50Target, p99Target: Self.lagP99Target), dir, "pair-lag-hist-\(g).svg")].compactMap { $0 }
            }
            if s.throttledMs > 0 { notes.append("\(g): the primary was throttled \(Bench.fmt(s.throttledMs)) ms (secondary's replay too far behind)") }
            guestsJSON[g] = ["throughput_ratio": ratio, "protected": prot.map(\.json), "unprotected": unprot.map(\.json),
                             "digests_match": same] as [String: Any]
        }

        var reseed: ReseedResult?
        var dirty: DirtyReseedResult?
        var repair: RepairResult?
        if reseeds > 0 {
            let r = try reseedTrials(reseeds)
            reseed = r
            if !r.digestsMatch { digestsMatch = false }
            figures += [Figure(key: "reseed_pause_p50_ms", label: "re-seed (pre-copy): guest paused p50", value: percentile(r.pauseMs, 50) ?? .infinity, unit: "ms"),
                        Figure(key: "reseed_pause_max_ms", label: "re-seed (pre-copy): guest paused max", value: r.pauseMs.max() ?? .infinity, unit: "ms"),
                        Figure(key: "reseed_total_p50_ms", label: "re-seed (pre-copy): connected → protected p50", value: percentile(r.totalMs, 50) ?? .infinity, unit: "ms"),
                        Figure(key: "reseed_echo_rtt_max_us", label: "re-seed: echo round trip max while seeding", value: r.rttUs.max() ?? .infinity, unit: "µs")]
            notes.append("re-seed: \(r.pauseMs.count) secondaries seeded from the running echo guest (\(memory) MiB); the last ended with the primary's digest: \(r.digestsMatch ? "yes" : "NO")")
            let d = try dirtyReseed()
            dirty = d
            if !d.digestsMatch { digestsMatch = false }
            figures += [Figure(key: "reseed_dirty_pause_ms", label: "re-seed, dirty guest: guest paused", value: d.pauseMs, unit: "ms"),
                        Figure(key: "reseed_dirty_total_ms", label: "re-seed, dirty guest: connected → protected", value: d.totalMs, unit: "ms"),
                        Figure(key: "reseed_dirty_throttle_percent", label: "re-seed, dirty guest: auto-converge throttle reached", value: Double(d.throttlePercent), unit: "%"),
                        Figure(key: "reseed_dirty_secondary_rss_ratio", label: "re-seed, dirty guest: peak RSS, new secondary / primary", value: d.secondaryRSSMiB / max(d.primaryRSSMiB, 1e-9), unit: "×")]
            notes.append("re-seed, dirty guest: \(d.line.range(of: "seeded at").map { String(d.line[$0.lowerBound...]) } ?? d.line); the new secondary ended with the primary's digest: \(d.digestsMatch ? "yes" : "NO")")
            if memory >= 96 {
                let r = try repairTrial()
                repair = r
                if !r.digestsMatch { digestsMatch = false }
                figures += [Figure(key: "repair_delta_pages", label: "repair (delta seed), echo-state: pages sent in round 0", value: Double(r.deltaPages), unit: "pages"),
                            Figure(key: "repair_new_machine_pages", label: "repair: pages a new machine's round 0 sends", value: Double(r.newMachinePages), unit: "pages"),
                            Figure(key: "repair_delta_total_ms", label: "repair (delta seed): connected → protected", value: r.deltaTotalMs, unit: "ms"),
                            Figure(key: "repair_full_total_ms", label: "full seed of echo-state: connected → protected", value: r.fullTotalMs, unit: "ms")]
                notes.append("repair: a divergence of echo-state (48 MiB written) repaired by a delta seed of \(r.deltaPages) pages where a new machine needs \(r.newMachinePages), confirmed \(Bench.fmt(r.deltaConfirmMs)) ms after the pause; a new secondary's full seed: \(r.fullPages) pages, confirmed \(Bench.fmt(r.fullConfirmMs)) ms after; echo round trip max while repairing \(Bench.fmt(r.rttUs.max() ?? 0)) µs; the last secondary ended with the primary's digest: \(r.digestsMatch ? "yes" : "NO")")
            } else {
                notes.append("repair: not run (echo-state needs --memory 96 or more)")
            }
        }

        var migration: MigrationResult?
        if migrations > 0 {
            let m = try migrationTrials(migrations)
            migration = m
            if !m.digestsMatch { digestsMatch = false }
            figures += [Figure(key: "migration_stopped_p50_ms", label: "migration: guest stopped (switch → target live) p50", value: percentile(m.stoppedMs, 50) ?? .infinity, unit: "ms"),
                        Figure(key: "migration_stopped_max_ms", label: "migration: guest stopped max", value: m.stoppedMs.max() ?? .infinity, unit: "ms"),
                        Figure(key: "migration_command_p50_ms", label: "migration: control … migrate → migrated p50", value: percentile(m.commandMs, 50) ?? .infinity, unit: "ms"),
                        Figure(key: "migration_unprotected_p50_ms", label: "migration: target live → protected by B again p50", value: percentile(m.unprotectedMs, 50) ?? .infinity, unit: "ms"),
                        Figure(key: "migration_echo_rtt_max_us", label: "migration: echo round trip max while migrating", value: m.rttUs.max() ?? .infinity, unit: "µs")]
            notes.append("migration: \(m.stoppedMs.count) moves of the running echo guest (\(memory) MiB) to a new target each time, B the secondary throughout (re-seeded by a delta after each); B ended with the last primary's digest: \(m.digestsMatch ? "yes" : "NO")")
        }

        var results: [Trial] = []
        for i in 1...max(trials, 1) where trials > 0 {
            progress("failover trial \(i)/\(trials)")
            results.append(try failoverTrial(i))
        }
        let times = results.compactMap(\.killToReplyMs)
        let failed = results.filter { $0.problem != nil }.count
        if !results.isEmpty {
            figures += [Figure(key: "failover_kill_to_reply_p50_ms", label: "failover: kill -9 → first survivor reply p50", value: percentile(times, 50) ?? .infinity, unit: "ms"),
                        Figure(key: "failover_kill_to_reply_p99_ms", label: "failover: kill -9 → first survivor reply p99", value: percentile(times, 99) ?? .infinity, unit: "ms", goal: .atMost(Self.failoverP99TargetMs)),
                        Figure(key: "failover_kill_to_reply_max_ms", label: "failover: kill -9 → first survivor reply max", value: times.max() ?? .infinity, unit: "ms"),
                        Figure(key: "failover_kill_to_live_p50_ms", label: "failover: kill -9 → secondary prints live: p50 (≤)", value: percentile(results.compactMap(\.killToLiveMsUpperBound), 50) ?? .infinity, unit: "ms")]
            notes.append("failover: \(results.count - failed)/\(results.count) trials answered correctly (\(times.count) answered; the survivor's count continued from the primary's)")
            if let dir = plotDir, let p = writePlot(PairPlots.failover(results.map(\.killToReplyMs), target: Self.failoverP99TargetMs), dir, "pair-failover.svg") { plotPaths.append(p) }
        }

        var restart: RestartResult?
        if restarts > 0 {
            let r = try supervisedRestarts(restarts)
            restart = r
            figures += [Figure(key: "restart_kill_to_reply_p50_ms", label: "HA restart (supervise): kill -9 → survivor reply p50", value: percentile(r.killToReplyMs, 50) ?? .infinity, unit: "ms"),
                        Figure(key: "restart_kill_to_protected_p50_ms", label: "HA restart: kill -9 → protected again by the restart p50", value: percentile(r.killToProtectedMs, 50) ?? .infinity, unit: "ms"),
                        Figure(key: "restart_kill_to_protected_max_ms", label: "HA restart: kill -9 → protected again max", value: r.killToProtectedMs.max() ?? .infinity, unit: "ms"),
                        Figure(key: "cold_restart_kill_to_reply_ms", label: "Both sides killed: kill -9s → rebooted guest's reply", value: r.coldKillToReplyMs, unit: "ms"),
                        Figure(key: "cold_restart_kill_to_protected_ms", label: "Both sides killed: kill -9s → protected again", value: r.coldKillToProtectedMs, unit: "ms")]
            notes.append("HA restart: \(restarts) kill -9s of a supervised echo pair, alternating sides; each killed side came back as the survivor's secondary and both supervisors ended with the guest's status")
            notes.append("Both sides killed: the times include the supervisors' --rejoin-timeout-ms \(Self.rejoinMs) (waiting for a live side before A's cold restart)")
        }

        print("Lockstep pair bench (\(Bench.hostInfo()["kernel"] ?? ""), loopback, \(repeats) run\(repeats == 1 ? "" : "s") per mode, echo: \(requests) requests, window \(window), \(placement.text)\(encrypt == "opportunistic" ? "" : ", --encrypt \(encrypt)"), fence \(fenceEtcd ?? "in a directory"))")
        Bench.printRows(figures, passWord: "PASS")
        for n in notes { print(n) }
        if !plotPaths.isEmpty { print("plots: \(plotPaths.joined(separator: " "))") }
        var host = Bench.hostInfo()
        host["loadavg_start"] = loadStart
        host["loadavg_end"] = host["loadavg"]
        if let w = wake { host["wake_round_trip_us"] = ["same_core": w.sameCoreUs, "cross_core": w.crossCoreUs] }
        print("load average: \(loadStart) at start, \(host["loadavg"] ?? "") at end")
        if !digestsMatch { print("FAIL: a secondary did not end with its primary's state digest (see above)") }
        if failed > 0 { print("FAIL: \(failed) of \(results.count) failover trials did not answer correctly") }

        var figuresJSON: [String: Any] = [:]
        for f in figures { figuresJSON[f.key] = f.json }
        let targets = figures.compactMap(\.pass)
        return [
            "ok": digestsMatch && failed == 0, "digests_match": digestsMatch, "failover_trials_failed": failed,
            "settings": ["requests": requests, "window": window, "repeat": repeats, "trials": trials, "reseeds": reseeds, "restarts": restarts, "migrations": migrations, "memory_mib": memory, "placement": placement.json, "encrypt": encrypt, "fence": fenceEtcd ?? "directory",
                         "warm_requests_before_kill": Self.warmRequests] as [String: Any],
            "host": host, "figures": figuresJSON, "notes": notes, "plots": plotPaths,
            "targets_met": targets.filter { $0 }.count, "targets_total": targets.count, "all_targets_pass": targets.allSatisfy { $0 },
            "guests": guestsJSON,
            "failover": ["trials": results.map(\.json), "kill_to_reply_ms": times] as [String: Any],
            "reseed": reseed?.json ?? NSNull(),
            "reseed_dirty": dirty?.json ?? NSNull(),
            "repair": repair?.json ?? NSNull(),
            "restart": restart?.json ?? NSNull(),
            "migration": migration?.json ?? NSNull(),
            "definitions": [
                "throughput_ratio": "echo: protected requests/s / unprotected requests/s (closed loop when window is 1); others: unprotected guest run time / protected guest run time (first vCPU entry to guest exit, from --verbose)",
                "replication_lag": "primary's --stats-json: a log batch's first record appended → the secondary's ack that it holds the batch; percentiles over the batches of all protected runs (histograms merged)",
                "replay_lag": "primary's position → the secondary's replayed position, sampled per ack, in µs (the oldest batch it has not replayed) and in exits (the newest watermark sent − its replayed exit); median of the runs' percentiles",
                "gate_latency": "a guest output byte emitted → released after the secondary's ack; median of the runs' percentiles, lines summed",
                "log_bytes_per_second": "stats logBytes / elapsedSeconds (includes sync point frames)",
                "failover_kill_to_reply": "SIGKILL of the primary → first REP to a request the client resends every 2 ms to the service address",
                "failover_kill_to_live": "upper bound: the harness polls the secondary's stderr for `live:` every 2 ms",
                "reseed_pause": "primary's seedPauseMs: the guest paused for the last pages, the machine state and the seed digest (pre-copy rounds run beside the guest)",
                "reseed_total": "primary's seedTotalMs: a connected secondary → the pause's end",
                "host_wake_round_trip": "median of 2,000 round trips between two threads that wake each other through eventfds, both on the vCPU core or one on it and one on the pacer's core; a log batch's replication lag contains two such wake-ups",
                "restart_kill_to_protected": "SIGKILL of the process serving the guest (under lockstep supervise) → the survivor's `protected: secondary at <killed side>` line, polled every 1 ms: the supervisor's restart, a process start, the survivor's connector and the seed",
                "reseed_dirty_throttle": "primary's seedThrottlePercent: the share of its time the guest slept at the most during the rounds (auto-converge)",
            ],
        ]
    }
}
