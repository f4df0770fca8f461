import Foundation
import KVM
import Machine
import Testing

/// Shared helpers: guest images (built on first use with the system C compiler), KVM availability,
/// and a bounded way to run a session on its own thread.
enum Fixture {
    static let root: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let guests = root.appendingPathComponent("Guests")
    static let lock = NSLock()
    nonisolated(unsafe) static var built = false

    /// Why KVM tests cannot run here, or nil when they can.
    static var kvmSkipReason: String? {
        KVMHost.isAvailable() ? nil : "/dev/kvm cannot be opened (absent, or not root): KVM tests skipped"
    }

    static func guest(_ name: String) throws -> PVHImage {
        lock.lock(); defer { lock.unlock() }
        if !built {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/make")
            p.arguments = ["-s", "-C", guests.path]
            try p.run()
            p.waitUntilExit()
            guard p.terminationStatus == 0 else { throw FixtureError("make -C Guests failed (\(p.terminationStatus))") }
            built = true
        }
        let data = try Data(contentsOf: guests.appendingPathComponent("build/\(name).elf"))
        return try PVHImage(bytes: [UInt8](data))
    }

    static func tempPath(_ name: String) -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lockstep-tests-\(getpid())")
        try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir.appendingPathComponent(name).path
    }

    /// Runs `body` on a dedicated thread (the vCPU thread gets pinned; keep it off the test pool)
    /// and waits at most `seconds`.
    static func onThread<T: Sendable>(seconds: Double = 120, _ body: @escaping @Sendable () throws -> T) throws -> T {
        let box = ResultBox<T>()
        let done = DispatchSemaphore(value: 0)
        let t = Thread {
            box.set(Result { try body() })
            done.signal()
        }
        t.stackSize = 8 << 20
        t.start()
        guard done.wait(timeout: .now() + seconds) == .success else { throw FixtureError("session did not finish within \(seconds) s") }
        return try box.get()
    }
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

final class ResultBox<T>: @unchecked Sendable {
    private var r: Result<T, Error>?
    private let l = NSLock()
    func set(_ v: Result<T, Error>) { l.lock(); r = v; l.unlock() }
    func get() throws -> T { l.lock(); defer { l.unlock() }; return try r!.get() }
}

/// Collects guest serial output; can answer lines (e.g. send requests once the guest says READY).
final class Capture: SerialOutput, @unchecked Sendable {
    private let l = NSLock()
    private var bytes: [UInt8] = []
    var onLine: ((String) -> Void)?
    private var line: [UInt8] = []
    func emit(_ byte: UInt8, exit: UInt64) {
        l.lock(); bytes.append(byte)
        var done: String?
        if byte == 0x0A { done = String(decoding: line, as: UTF8.self); line.removeAll() } else { line.append(byte) }
        l.unlock()
        if let done, let onLine { onLine(done) }
    }
    func flush() {}
    var text: String { l.lock(); defer { l.unlock() }; return String(decoding: bytes, as: UTF8.self) }
    var result: String? { text.split(separator: "\n").first(where: { $0.hasPrefix("RESULT ") }).map(String.init) }
}

/// One recording and its replay.
struct RoundTrip: Sendable {
    var record: SessionResult
    var replay: SessionResult
    var recordOutput: String
    var replayOutput: String
}

func recordAndReplay(_ guest: String, input: (@Sendable (String, SerialInputQueue) -> Void)? = nil,
                     latencyUs: UInt32 = 1000, memoryMiB: UInt32 = 256) throws -> RoundTrip {
    let image = try Fixture.guest(guest)
    let log = Fixture.tempPath("\(guest)-\(UUID().uuidString).log")
    defer { try? FileManager.default.removeItem(atPath: log) }
    let recOut = Capture(), repOut = Capture()
    let rec = try Fixture.onThread {
        let s = try RecordSession(image: image, config: MachineConfig(memoryMiB: memoryMiB, interruptLatencyUs: latencyUs), logPath: log, output: recOut)
        if let input {
            let q = s.machine.input
            recOut.onLine = { line in input(line, q) }
        }
        return try s.run()
    }
    let rep = try Fixture.onThread { try ReplaySession(logPath: log, output: repOut).run() }
    return RoundTrip(record: rec, replay: rep, recordOutput: recOut.text, replayOutput: repOut.text)
}
