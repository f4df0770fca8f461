import Channel
import Foundation
import Testing
@testable import Pair

/// The `--control` server without a pair: requests are answered side by side, and a bounded number at once.
@Suite struct ControlServerTests {
    /// Eight requests still being answered (here: connections that have not sent their line yet) do not hold up
    /// a status request from being refused at once, by name, rather than waiting behind them.
    @Test func aNinthRequestWhileEightAreAnsweredIsRefusedAsBusy() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lockstep-control-server-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/c.sock"
        let server = try ControlServer(path: path, options: PairOptions(key: [UInt8](repeating: 7, count: 32)), role: CurrentRole())
        defer { server.stop() }
        // Accepted in order, each on a thread of its own, each waiting (up to 2 s) for its request line.
        let waiting = try (0..<ControlServer.maxRequests).map { _ in try ControlConnection(path: path) }
        // Refused at once, maybe before its line is written (the write then fails with EPIPE): it reads the refusal
        // either way (a run of the suite failed on that write).
        let ninth = try ControlConnection(path: path)
        #expect(try ninth.ask("status", timeoutMs: 5000) == "refused: busy: \(ControlServer.maxRequests) requests are being answered")
        // One of the eight asks now: it is answered (nothing runs yet, so the status is empty).
        #expect(try waiting[0].ask("status", timeoutMs: 5000) == "{}")
    }
}
