import Testing
import Foundation
@testable import Channel

@Suite struct FrameErrorTests {
    /// A raw client sends bytes; the accepting side's handshake must fail with `expected`.
    func serverError(afterSending bytes: [UInt8], thenClose: Bool = false) throws -> ChannelError? {
        let listener = try Listener(host: "127.0.0.1", port: 0)
        let server = Pending { try listener.accept(timeoutMs: 5000, config: config(.secondary)) }
        let raw = try rawConnect(port: listener.port)
        rawWrite(raw, bytes)
        if thenClose { raw.close() }
        let r = server.wait()
        raw.close()
        return channelError(r)
    }

    @Test func garbageIsRejected() throws {
        let e = try serverError(afterSending: Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        guard case .badMagic = e else { Issue.record("got \(String(describing: e))"); return }
        #expect(e!.description.contains("garbage"))
    }

    @Test func oversizedLengthIsRejectedFromTheHeaderAlone() throws {
        // Only the 12-byte header is sent: an answer proves nothing waited for (or allocated) the body.
        let header: [UInt8] = [0xF0, 0xFF, 0xFF, 0xFF, FrameType.hello.rawValue, 0, 0x4C, 0x4B, 0, 0, 0, 0]
        let e = try serverError(afterSending: header)
        #expect(e == .frameTooLarge(type: .hello, length: 0xFFFF_FFF0, limit: FrameType.hello.maxBodyBytes))
    }

    @Test func unknownTypeIsRejected() throws {
        let e = try serverError(afterSending: [0, 0, 0, 0, 0xEE, 0, 0x4C, 0x4B, 0, 0, 0, 0])
        #expect(e == .unknownFrameType(0xEE))
    }

    @Test func unexpectedFirstFrameIsRejected() throws {
        // A well-formed empty log frame (CRC32C of nothing is 0) before any hello.
        let e = try serverError(afterSending: [0, 0, 0, 0, FrameType.log.rawValue, 0, 0x4C, 0x4B, 0, 0, 0, 0])
        #expect(e == .unexpectedFrame(expected: "hello", got: .log))
    }

    @Test func peerClosingMidFrameIsReported() throws {
        let e = try serverError(afterSending: [10, 0, 0, 0, FrameType.hello.rawValue, 0, 0x4C, 0x4B, 0, 0, 0, 0, 1, 2], thenClose: true)
        #expect(e == .peerClosed(midFrame: true))
    }

    @Test func crcFlipIsDetectedAndDropsTheConnection() throws {
        let (client, server) = try established(.disabled)
        client.testHookBeforeWrite = { f in f[FrameLayout.headerBytes + 3] ^= 0x01 }
        try client.sendLog(LogBatch(exitIndex: 9, bytes: Array(repeating: 7, count: 64)))
        #expect { try server.receive(timeoutMs: 2000) } throws: { e in
            guard case ChannelError.checksumMismatch = e else { return false }; return true
        }
        #expect(server.isClosed)
        // The sender learns why.
        #expect(throws: ChannelError.peerError(code: .badChecksum, message: "")) {
            do { _ = try client.receive(timeoutMs: 2000) } catch ChannelError.peerError(let code, _) {
                throw ChannelError.peerError(code: code, message: "")
            }
        }
    }

    @Test func tamperedCiphertextIsRejected() throws {
        let (client, server) = try established(.required)
        // An attacker flips a ciphertext bit and fixes the CRC: only GCM can notice.
        client.testHookBeforeWrite = { f in
            f[FrameLayout.headerBytes + 20] ^= 0x80
            FrameLayout.fixCRC(f)
        }
        try client.sendLog(LogBatch(exitIndex: 3, bytes: Array(repeating: 1, count: 100)))
        #expect(throws: ChannelError.decryptionFailed(type: .log)) { try server.receive(timeoutMs: 2000) }
    }

    @Test func tamperedHeaderIsRejected() throws {
        let (client, server) = try established(.required)
        // Changing the type (AAD) breaks authentication too: an ack disguised as status.
        client.testHookBeforeWrite = { f in f[4] = FrameType.status.rawValue; FrameLayout.fixCRC(f) }
        try client.sendAck(Ack(heldExitIndex: 1, replayedExitIndex: 1))
        #expect(throws: ChannelError.decryptionFailed(type: .status)) { try server.receive(timeoutMs: 2000) }
    }

    /// A peer that says why it leaves and closes at once, with bytes of ours unread, resets the connection:
    /// our next send fails, and what it said before is still ours to read (the primary's reason for a loss).
    @Test func aPeersLastWordsOutliveTheResetOfItsClose() throws {
        var (client, server): (Connection, Connection?) = try established()
        let report: [UInt8] = [2] + Array("divergence at exit 920".utf8)
        try server!.send(.status(report))
        try client.sendLog(LogBatch(exitIndex: 1, bytes: Array(repeating: 7, count: 4096)))
        #expect(try SocketOps.wait(server!.fd, events: Int16(POLLIN), deadlineMs: SocketOps.monotonicMs() + 5000))
        server = nil  // closed with the batch unread (once the accepting thread lets go of it too): a reset
        #expect(try SocketOps.wait(client.fd, events: 0x2000 /* POLLRDHUP: not imported */, deadlineMs: SocketOps.monotonicMs() + 5000))
        #expect(throws: ChannelError.peerClosed(midFrame: false)) { try client.sendHeartbeat(Heartbeat(sentNs: 1, echoNs: 0)) }
        #expect(client.lastWords() == [.status(report)])
        #expect(client.lastWords().isEmpty)
    }

    @Test func receiveTimeoutKeepsTheConnection() throws {
        let (client, server) = try established()
        #expect(throws: ChannelError.timeout(ms: 20)) { try server.receive(timeoutMs: 20) }
        try client.sendHeartbeat(Heartbeat(sentNs: 1, echoNs: 0))
        #expect(try server.receiveMessage(timeoutMs: 2000) == .heartbeat(Heartbeat(sentNs: 1, echoNs: 0)))
    }

    @Test func tenMegabyteLogBatchRoundTripsEncrypted() throws {
        let (client, server) = try established(.required)
        var bytes = [UInt8](repeating: 0, count: 10 << 20)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 2654435761 >> 13) }
        let batch = LogBatch(exitIndex: 123_456_789, bytes: bytes)
        let sender = Pending { try client.sendLog(batch); try client.sendLog(batch) }
        for _ in 0..<2 {
            let m = try server.receiveMessage(timeoutMs: 10_000)
            #expect(m == .log(batch))
        }
        _ = try sender.wait().get()
    }

    @Test func oversizedSendIsRefusedLocally() throws {
        let (client, _) = try established(.disabled)
        #expect { try client.send(.status([UInt8](repeating: 0, count: Int(FrameLayout.maxSmallBody) + 1))) } throws: { e in
            guard case ChannelError.frameTooLarge(.status, _, _) = e else { return false }; return true
        }
    }

    @Test func concurrentSenderAndReceiver() throws {
        let (a, b) = try established()
        let n = 2000
        let sender = Pending { for i in 0..<n { try a.sendLog(LogBatch(exitIndex: UInt64(i), bytes: [UInt8(i & 0xFF)])) } }
        let heartbeats = Pending { for i in 0..<n { try a.sendHeartbeat(Heartbeat(sentNs: UInt64(i), echoNs: 0)) } }
        var logs = 0, hbs = 0
        while logs + hbs < 2 * n {
            switch try b.receiveMessage(timeoutMs: 5000) {
            case .log(let l): #expect(l.exitIndex == UInt64(logs)); logs += 1
            case .heartbeat(let h): #expect(h.sentNs == UInt64(hbs)); hbs += 1
            default: Issue.record("unexpected")
            }
        }
        _ = try sender.wait().get(); _ = try heartbeats.wait().get()
    }

    @Test func connectingToAClosedPortIsRefused() throws {
        let port: UInt16 = try { let l = try Listener(host: "127.0.0.1", port: 0); return l.port }()  // closed on deinit
        #expect(throws: ChannelError.connectionRefused(host: "127.0.0.1", port: port)) {
            try Connection.connect(host: "127.0.0.1", port: port, timeoutMs: 1000, config: config(.primary))
        }
        #expect(ChannelError.connectionRefused(host: "127.0.0.1", port: port).description.contains("refused"))
    }

    @Test func unresolvableHostIsReported() throws {
        #expect { try Connection.connectRaw(host: "no-such-host.invalid", port: 1, timeoutMs: 1000) } throws: { e in
            guard case ChannelError.resolveFailed(let h, _) = e else { return false }; return h == "no-such-host.invalid"
        }
    }

    @Test func syscallErrorsCarryCallAndErrno() throws {
        let l = try Listener(host: "127.0.0.1", port: 0)
        #expect { try Listener(host: "127.0.0.1", port: l.port) } throws: { e in
            guard case ChannelError.system(let s) = e else { return false }
            return s.call == "bind" && s.errno == EADDRINUSE
        }
    }

    @Test func acceptTimesOut() throws {
        let l = try Listener(host: "127.0.0.1", port: 0)
        #expect(throws: ChannelError.timeout(ms: 10)) { try l.acceptRaw(timeoutMs: 10) }
    }
}
