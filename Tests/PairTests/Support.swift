import Foundation
import Glibc
import Machine
import Testing

/// Every pair test runs one at a time: each starts processes that pin a vCPU thread, on two cores.
@Suite(.serialized) struct PairTests {}

/// Real `lockstep` processes for the pair tests: spawn, watch stderr for lines (event-driven, bounded),
/// kill -9, reap with a bound.
enum PairFixture {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The JSON object in `path` (a `--stats-json`, `--status-json` or bench report); nil when it is not an object.
    static func jsonObject(_ path: String) throws -> [String: Any]? {
        try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any]
    }

    /// The `lockstep` executable next to the test binary (built by `swift build --build-tests`).
    static var binary: String {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        let sibling = URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("lockstep").path
        if FileManager.default.isExecutableFile(atPath: sibling) { return sibling }
        return root.appendingPathComponent(".build/debug/lockstep").path
    }

    /// Why these tests cannot run here, or nil.
    static var skipReason: String? {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        if fd < 0 { return "/dev/kvm cannot be opened (absent, or not root): pair tests skipped" }
        close(fd)
        if !FileManager.default.isExecutableFile(atPath: binary) { return "the lockstep executable is not built at \(binary): run `swift build --build-tests`" }
        return nil
    }

    static let guestsBuilt: Bool = {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/make")
        p.arguments = ["-s", "-C", root.appendingPathComponent("Guests").path]
        try? p.run()
        p.waitUntilExit()
        return p.terminationStatus == 0
    }()

    static func guest(_ name: String) throws -> String {
        guard guestsBuilt else { throw PairTestError("make -C Guests failed") }
        return root.appendingPathComponent("Guests/build/\(name).elf").path
    }

    /// A fresh directory with a random 32-byte key and a fence directory.
    static func workspace() throws -> (dir: String, key: String, fence: String) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lockstep-pair-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: dir + "/fence", withIntermediateDirectories: true)
        var key = [UInt8](repeating: 0, count: 32)
        for i in key.indices { key[i] = UInt8.random(in: 0...255) }
        _ = FileManager.default.createFile(atPath: dir + "/key", contents: Data(key))
        return (dir, dir + "/key", dir + "/fence")
    }

    /// The tests share two cores with other suites: a 500 ms failure timeout keeps a descheduled peer from
    /// being taken for dead (kill -9 is detected at once anyway, by the closed socket).
    static let failureTimeoutMs = "500"

    static func common(_ ws: (dir: String, key: String, fence: String)) -> [String] {
        ["--key-file", ws.key, "--fence", ws.fence, "--status-interval-ms", "0", "--failure-timeout-ms", failureTimeoutMs]
    }

    /// A UDP port free right now (bound to 0 and released).
    static func freeUDPPort() throws -> UInt16 { try LoopbackPort.free() }
    /// A TCP port free right now (an FT-link address to give both sides before either listens).
    static func freeTCPPort() throws -> UInt16 { try LoopbackPort.free(tcp: true) }
}

struct PairTestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// One child process whose stderr is collected line by line; waits are on those lines or on exit, never on sleeps.
final class Child: @unchecked Sendable {
    let process = Process()
    let name: String
    private let cond = NSCondition()
    private var lines: [String] = []
    private var exited = false
    /// stderr reached end of file: every line the process wrote has been collected.
    private var eof = false
    private var partial = Data()

    /// `captureStdout`: stdout lines join the stderr lines (`lockstep control` answers on stdout).
    /// `launcher`: a command that execs `lockstep` (e.g. `env --ignore-signal=HUP`).
    init(_ name: String, _ args: [String], environment: [String: String] = [:], captureStdout: Bool = false,
         launcher: [String] = []) throws {
        self.name = name
        process.executableURL = URL(fileURLWithPath: launcher.first ?? PairFixture.binary)
        process.arguments = launcher.isEmpty ? args : launcher.dropFirst() + [PairFixture.binary] + args
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        let err = Pipe()
        process.standardError = err
        process.standardOutput = captureStdout ? err : FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        err.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            guard let self else { return }
            self.cond.lock()
            if d.isEmpty { h.readabilityHandler = nil; self.eof = true } else { self.partial.append(d) }
            while let nl = self.partial.firstIndex(of: 0x0A) {
                self.lines.append(String(decoding: self.partial[self.partial.startIndex..<nl], as: UTF8.self))
                self.partial.removeSubrange(self.partial.startIndex...nl)
            }
            self.cond.broadcast()
            self.cond.unlock()
        }
        process.terminationHandler = { [weak self] _ in
            guard let self else { return }
            self.cond.lock(); self.exited = true; self.cond.broadcast(); self.cond.unlock()
        }
        try process.run()
    }

    deinit { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }

    var stderr: [String] { cond.lock(); defer { cond.unlock() }; return lines }
    var stderrText: String { stderr.joined(separator: "\n") }

    /// Waits for a stderr line containing `text`; returns it.
    @discardableResult
    func waitForLine(containing text: String, occurrence: Int = 1, seconds: Double = 30) throws -> String {
        try waitForLine(matching: { $0.contains(text) }, describing: text, occurrence: occurrence, seconds: seconds)
    }

    func waitForLine(matching test: (String) -> Bool, describing text: String = "the line asked for", occurrence: Int = 1,
                     seconds: Double = 30) throws -> String {
        let deadline = Date().addingTimeInterval(seconds)
        cond.lock(); defer { cond.unlock() }
        while true {
            let hits = lines.filter(test)
            if hits.count >= occurrence { return hits[occurrence - 1] }
            if exited && eof { throw PairTestError("\(name) exited (status \(process.terminationStatus)) without printing '\(text)'; stderr:\n\(lines.suffix(20).joined(separator: "\n"))") }
            if !cond.wait(until: deadline) { throw PairTestError("\(name) did not print '\(text)' within \(seconds) s; stderr:\n\(lines.suffix(20).joined(separator: "\n"))") }
        }
    }

    /// The first of `children` to print a line containing `text` (each one's lines waited on by a thread of its own,
    /// which ends when that child prints it, exits, or `seconds` pass).
    static func first(of children: [Child], containing text: String, seconds: Double = 30) throws -> Child {
        let done = DispatchSemaphore(value: 0)
        let winner = NSLock()
        nonisolated(unsafe) var first: Child?
        for c in children {
            Thread.detachNewThread {
                guard (try? c.waitForLine(containing: text, seconds: seconds)) != nil else { return }
                winner.lock(); if first == nil { first = c }; winner.unlock()
                done.signal()
            }
        }
        _ = done.wait(timeout: .now() + seconds)
        winner.lock(); defer { winner.unlock() }
        guard let first else { throw PairTestError("none of \(children.map(\.name)) printed '\(text)' within \(seconds) s") }
        return first
    }

    /// Waits for the process to end; returns its status (or the signal number for a signal death).
    @discardableResult
    func wait(seconds: Double = 60) throws -> Int32 {
        let deadline = Date().addingTimeInterval(seconds)
        cond.lock()
        // Either sign of the end will do (Foundation delivers them independently): the termination handler,
        // or end of file on stderr, which the process closes when it exits.
        while !(exited || eof) {
            if !cond.wait(until: deadline) {
                cond.unlock()
                kill(process.processIdentifier, SIGKILL)
                throw PairTestError("\(name) did not exit within \(seconds) s; stderr:\n\(stderr.suffix(20).joined(separator: "\n"))")
            }
        }
        // Then the last lines: stderr to its end, briefly bounded.
        let tail = Date().addingTimeInterval(2)
        while !eof, cond.wait(until: tail) {}
        cond.unlock()
        process.waitUntilExit()
        return process.terminationStatus
    }

    func kill9() { kill(process.processIdentifier, SIGKILL) }
    func signal(_ signo: Int32) { kill(process.processIdentifier, signo) }

    /// The `state-digest:` value printed at the end.
    var digest: String? { stderr.last(where: { $0.hasPrefix("state-digest: ") }).map { String($0.dropFirst(14)) } }

    /// The port a secondary says it listens on.
    func listeningPort() throws -> UInt16 {
        let l = try waitForLine(containing: "listening on ")
        guard let p = l.split(separator: ":").last.flatMap({ UInt16($0) }) else { throw PairTestError("no port in '\(l)'") }
        return p
    }
}

/// A UDP client of the echo guest: sends a line, retries until the matching reply arrives (bounded).
/// Where an echo client's lines go: `--serial udp:` or `--serial tcp:`.
protocol LineLink: AnyObject {
    func send(_ line: String)
    func receive(ms: Int) -> [String]
    var partialLine: String { get }
}

extension UDPLineClient: LineLink {}

/// The other end of `--serial tcp:HOST:PORT`, as a client of the service would be: it connects when it has
/// something to send, and when the connection ends (the server was killed) it drops what it held of a line
/// and connects again on its next send, to whoever serves the port by then.
final class TCPLineClient: LineLink {
    let port: UInt16
    private var fd: Int32 = -1
    private var partial: [UInt8] = []
    /// Connections made, the first included.
    private(set) var connections = 0

    init(port: UInt16) { self.port = port }
    deinit { if fd >= 0 { close(fd) } }

    private func connectIfNeeded() -> Bool {
        if fd >= 0 { return true }
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { return false }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        // Loopback: refused at once when nobody listens, so this does not block.
        let ok = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 } }
        guard ok else { close(s); return false }
        fd = s
        partial.removeAll()
        connections += 1
        return true
    }

    private func disconnect() { if fd >= 0 { close(fd); fd = -1 } }

    /// Connects without sending (a client that first waits for the service's greeting); false if nobody listens.
    func open() -> Bool { connectIfNeeded() }

    func send(_ line: String) {
        guard connectIfNeeded() else { return }
        let bytes = Array((line + "\n").utf8)
        // MSG_NOSIGNAL: a server killed meanwhile must not SIGPIPE the test process.
        if Glibc.send(fd, bytes, bytes.count, Int32(MSG_NOSIGNAL)) != bytes.count { disconnect() }
    }

    func receive(ms: Int) -> [String] {
        let deadline = Date().addingTimeInterval(Double(ms) / 1000)
        var lines: [String] = []
        var buf = [UInt8](repeating: 0, count: 2048)
        while lines.isEmpty, fd >= 0, case let left = deadline.timeIntervalSinceNow, left > 0 {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, Int32(left * 1000) + 1) <= 0 { continue }
            let n = recv(fd, &buf, buf.count, Int32(MSG_DONTWAIT))
            if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { disconnect(); break }
            if n < 0 { continue }
            partial += buf[0..<n]
            while let nl = partial.firstIndex(of: 0x0A) {
                lines.append(String(decoding: partial[..<nl], as: UTF8.self).trimmingCharacters(in: .whitespaces))
                partial.removeSubrange(...nl)
            }
        }
        // Not connected: nothing can arrive before the next send connects, so the retry period passes as a poll's would.
        if fd < 0, lines.isEmpty, case let left = deadline.timeIntervalSinceNow, left > 0 { usleep(useconds_t(left * 1e6)) }
        return lines
    }

    var partialLine: String { String(decoding: partial, as: UTF8.self) }
}

final class EchoClient {
    let lines: any LineLink

    init(port: UInt16) { lines = try! UDPLineClient(port: port) }
    init(_ link: any LineLink) { lines = link }

    func send(_ line: String) { lines.send(line) }

    /// Whole lines received within `ms` (reassembled: a datagram may end inside a line).
    func receive(ms: Int32) -> [String] { lines.receive(ms: Int(ms)) }

    /// Sends `line` every `retryMs` until a reply line starting with `prefix` arrives; every line received
    /// on the way is handed to `seen`. Returns the reply and when it arrived, or nil after `seconds`.
    func request(_ line: String, expect prefix: String, retryMs: Int32 = 20, seconds: Double = 15,
                 seen: (String) -> Void = { _ in }) -> String? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            send(line)
            for l in receive(ms: retryMs) {
                seen(l)
                if l.hasPrefix(prefix) { return l }
            }
        }
        return nil
    }
}

/// Checks every reply ever received: a seq is never answered with two different contents, and the
/// count of distinct requests always equals the seq (no request lost from the survivor's history).
struct History {
    var replies: [UInt64: String] = [:]
    var problems: [String] = []
    mutating func saw(_ line: String) {
        let f = line.split(separator: " ")
        guard f.count == 4, f[0] == "REP", let seq = UInt64(f[1]) else { return }
        if let old = replies[seq], old != line { problems.append("seq \(seq) answered twice: '\(old)' then '\(line)'") }
        replies[seq] = line
        if UInt64(f[2]) != seq { problems.append("'\(line)': the service counted \(f[2]) requests at seq \(seq)") }
    }
}

/// An echo conversation whose every reply goes into one `History`.
final class Conversation {
    let client: EchoClient
    var history = History()

    init(port: UInt16) { client = EchoClient(port: port) }
    init(_ client: EchoClient) { self.client = client }

    /// `REQ seq tag` for each seq, each retried until answered; an unanswered one is a test failure.
    func exchange(_ seqs: ClosedRange<Int>, _ tag: String, _ context: @autoclosure () -> String = "",
                  sourceLocation: SourceLocation = #_sourceLocation) {
        for seq in seqs {
            let reply = client.request("REQ \(seq) \(tag)", expect: "REP \(seq) ", seen: { history.saw($0) })
            #expect(reply != nil, "no reply to REQ \(seq) \(tag)\n\(context())", sourceLocation: sourceLocation)
        }
    }

    /// One request and its reply (nil when none came within `seconds`).
    func request(_ seq: Int, _ tag: String, seconds: Double = 15) -> String? {
        client.request("REQ \(seq) \(tag)", expect: "REP \(seq) ", seconds: seconds, seen: { history.saw($0) })
    }

    /// Ends the guest's service (its `RESULT` line).
    func quit() { _ = client.request("QUIT", expect: "RESULT echo") }

    /// Ends the service of a pair that stayed in lockstep to the end: both processes exit 0, the secondary never
    /// went live, both end with the same state digest, and every reply is consistent.
    func quitInLockstep(_ pri: Child, _ sec: Child, sourceLocation: SourceLocation = #_sourceLocation) throws {
        quit()
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)", sourceLocation: sourceLocation)
        #expect(try sec.wait(seconds: 30) == 0, "\(sec.stderrText)", sourceLocation: sourceLocation)
        #expect(!sec.stderr.contains { $0.hasPrefix("live: ") }, "\(sec.stderrText)", sourceLocation: sourceLocation)
        #expect(pri.digest != nil && pri.digest == sec.digest, "primary \(pri.digest ?? "-"), secondary \(sec.digest ?? "-")",
                sourceLocation: sourceLocation)
        expectConsistent(sourceLocation: sourceLocation)
    }

    /// No seq was answered twice differently, and none was lost from the service's count.
    func expectConsistent(sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(history.problems.isEmpty, "\(history.problems)", sourceLocation: sourceLocation)
    }
}
