import Testing
import Foundation
@testable import Channel

/// Log batches larger than `FrameLayout.logPartBytes` travel as `logPart` frames and a closing `log` frame.
@Suite struct LogPartTests {
    @Test func aLargeBatchLeavesInPartsAndArrivesWhole() throws {
        let (client, server) = try established(.required)
        let part = FrameLayout.logPartBytes
        var bytes = [UInt8](repeating: 0, count: 3 * part + 5)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 2654435761 >> 11) }
        let seen = Frames()
        client.testHookBeforeWrite = { f in seen.add(f) }
        try client.sendLog(LogBatch(exitIndex: 77, bytes: bytes))
        #expect(try server.receiveMessage(timeoutMs: 5000) == .log(LogBatch(exitIndex: 77, bytes: bytes)))
        // Three full parts, then the closing frame with the exit index and the last 5 bytes; each sealed alone.
        let tag = FrameLayout.tagBytes
        #expect(seen.list.map(\.type) == [.logPart, .logPart, .logPart, .log])
        #expect(seen.list.map(\.bodyBytes) == [part + tag, part + tag, part + tag, 8 + 5 + tag])
    }

    @Test func otherMessagesComeBetweenTheParts() throws {
        let (client, server) = try established()
        let a = [UInt8](repeating: 1, count: 1000), b = [UInt8](repeating: 2, count: 10)
        try client.send(Frame(type: .logPart, body: a))
        try client.sendHeartbeat(Heartbeat(sentNs: 5, echoNs: 0))
        try client.send(Frame(type: .logPart, body: a))
        // A batch is whole or not returned: the receiver's ack must not claim an exit whose bytes are not all here.
        #expect(try server.receiveMessage(timeoutMs: 5000) == .heartbeat(Heartbeat(sentNs: 5, echoNs: 0)))
        #expect(throws: ChannelError.timeout(ms: 20)) { try server.receiveMessage(timeoutMs: 20) }
        try client.sendLog(LogBatch(exitIndex: 9, bytes: b))
        #expect(try server.receiveMessage(timeoutMs: 5000) == .log(LogBatch(exitIndex: 9, bytes: a + a + b)))
        // The next batch starts empty.
        try client.sendLog(LogBatch(exitIndex: 10, bytes: b))
        #expect(try server.receiveMessage(timeoutMs: 5000) == .log(LogBatch(exitIndex: 10, bytes: b)))
    }

    @Test func partsBeyondTheBatchLimitDropTheConnection() throws {
        let (client, server) = try established()
        server.logBatchLimit = 1500
        try client.send(Frame(type: .logPart, body: [UInt8](repeating: 1, count: 1000)))
        try client.send(Frame(type: .logPart, body: [UInt8](repeating: 1, count: 1000)))
        #expect(throws: ChannelError.malformedBody(type: .logPart, reason: "a log batch of more than 1500 bytes")) {
            try server.receiveMessage(timeoutMs: 5000)
        }
        #expect(server.isClosed)
        #expect { try client.receive(timeoutMs: 2000) } throws: { e in
            guard case ChannelError.peerError(.protocolViolation, let text) = e else { return false }
            return text.contains("log batch of more than 1500 bytes")
        }
    }

    /// Acks, heartbeats and log frames are decoded in the receive buffer: a body of the wrong size is refused
    /// as `Frame.decode` refuses it, and the connection dropped.
    @Test(arguments: [(FrameType.ack, 10, "truncated at byte 8: need 8, have 2"), (.heartbeat, 3, "truncated at byte 0: need 8, have 3"),
                      (.ack, 17, "1 trailing bytes"), (.log, 5, "truncated at byte 0: need 8, have 5")])
    func aSmallFrameOfTheWrongSizeIsRefused(type: FrameType, size: Int, reason: String) throws {
        let (client, server) = try established()
        let body = [UInt8](repeating: 1, count: size)
        #expect(throws: ChannelError.malformedBody(type: type, reason: reason)) { try Frame(type: type, body: body).decode() }
        try client.send(Frame(type: type, body: body))
        #expect(throws: ChannelError.malformedBody(type: type, reason: reason)) { try server.receiveMessage(timeoutMs: 5000) }
        #expect(server.isClosed)
    }

    @Test func aLogFrameAbovePartSizeIsRefusedFromItsHeader() throws {
        // Only the header is written: the bound holds before any body is read. (Before parts, 64 MiB passed.)
        let (client, server) = try established(.disabled)
        let len = UInt32(FrameLayout.logPartBytes + 65)
        rawWrite(client, [UInt8(len & 0xFF), UInt8(len >> 8 & 0xFF), UInt8(len >> 16 & 0xFF), UInt8(len >> 24),
                          FrameType.log.rawValue, 0, 0x4C, 0x4B, 0, 0, 0, 0])
        #expect(throws: ChannelError.frameTooLarge(type: .log, length: len, limit: len - 1)) {
            try server.receiveMessage(timeoutMs: 5000)
        }
    }
}

/// Frames a connection wrote, as the test hook saw them (the hook runs under the send lock).
final class Frames: @unchecked Sendable {
    private let lock = NSLock()
    private var seen: [(type: FrameType, bodyBytes: Int)] = []
    func add(_ f: UnsafeMutableRawBufferPointer) {
        let t = FrameType(rawValue: f[4])!
        lock.withLock { seen.append((t, f.count - FrameLayout.headerBytes)) }
    }
    var list: [(type: FrameType, bodyBytes: Int)] { lock.withLock { seen } }
}
