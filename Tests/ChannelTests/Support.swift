import Foundation
@testable import Channel

/// Runs `body` on its own thread; `wait` is bounded.
final class Pending<T: Sendable>: @unchecked Sendable {
    private let sem = DispatchSemaphore(value: 0)
    private var result: Result<T, any Error>?
    init(_ body: @escaping @Sendable () throws -> T) {
        let t = Thread { [self] in
            do { result = .success(try body()) } catch { result = .failure(error) }
            sem.signal()
        }
        t.start()
    }
    func wait(seconds: Double = 10) -> Result<T, any Error> {
        guard sem.wait(timeout: .now() + seconds) == .success else { fatalError("thread did not finish in \(seconds) s") }
        return result!
    }
}

let testKey = Array("0123456789abcdef-lockstep-test-key".utf8)

func config(_ role: PeerRole, key: [UInt8] = testKey, _ mode: EncryptionMode = .opportunistic,
            payload: [UInt8] = [], version: UInt16 = ChannelConfig.currentVersion) -> ChannelConfig {
    ChannelConfig(key: key, role: role, encryption: mode, payload: payload, handshakeTimeoutMs: 5000, protocolVersion: version)
}

/// Connects a primary (initiator) to a secondary (responder) over 127.0.0.1.
/// Returns both results (either may be an error).
func pair(primary: ChannelConfig, secondary: ChannelConfig) throws -> (Result<Connection, any Error>, Result<Connection, any Error>) {
    let listener = try Listener(host: "127.0.0.1", port: 0)
    let server = Pending { try listener.accept(timeoutMs: 5000, config: secondary) }
    let client = Result { try Connection.connect(host: "127.0.0.1", port: listener.port, timeoutMs: 2000, config: primary) }
    return (client, server.wait())
}

func established(_ mode: EncryptionMode = .opportunistic) throws -> (Connection, Connection) {
    let (c, s) = try pair(primary: config(.primary, mode), secondary: config(.secondary, mode))
    return (try c.get(), try s.get())
}

func channelError<T>(_ r: Result<T, any Error>) -> ChannelError? {
    if case .failure(let e) = r { return e as? ChannelError }
    return nil
}

/// A raw TCP client that writes arbitrary bytes.
func rawConnect(port: UInt16) throws -> Connection {
    try Connection.connectRaw(host: "127.0.0.1", port: port, timeoutMs: 2000)
}

func rawWrite(_ c: Connection, _ bytes: [UInt8]) {
    bytes.withUnsafeBytes { b in _ = Foundation.send(c.fd, b.baseAddress, b.count, Int32(MSG_NOSIGNAL)) }
}
