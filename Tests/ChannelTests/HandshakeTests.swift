import Testing
import Foundation
@testable import Channel

@Suite struct HandshakeTests {
    @Test func sameKeyHandshakeSucceedsAndExchangesPayloads() throws {
        let (c, s) = try pair(primary: config(.primary, payload: Array("config+digest-P".utf8)),
                              secondary: config(.secondary, payload: Array("S".utf8)))
        let client = try c.get(), server = try s.get()
        #expect(client.session?.peerRole == .secondary)
        #expect(server.session?.peerRole == .primary)
        #expect(client.session?.peerPayload == Array("S".utf8))
        #expect(server.session?.peerPayload == Array("config+digest-P".utf8))
        #expect(client.session?.encrypted == true && server.session?.encrypted == true)
        // Messages both ways.
        try client.sendLog(LogBatch(exitIndex: 42, bytes: [1, 2, 3]))
        #expect(try server.receiveMessage(timeoutMs: 2000) == .log(LogBatch(exitIndex: 42, bytes: [1, 2, 3])))
        try server.sendAck(Ack(heldExitIndex: 42, replayedExitIndex: 40))
        #expect(try client.receiveMessage(timeoutMs: 2000) == .ack(Ack(heldExitIndex: 42, replayedExitIndex: 40)))
        try server.sendHeartbeat(Heartbeat(sentNs: 7, echoNs: 5))
        #expect(try client.receiveMessage(timeoutMs: 2000) == .heartbeat(Heartbeat(sentNs: 7, echoNs: 5)))
        try client.send([.status([9]), .bulk([1, 1]), .goodbye("bye")])   // coalesced into one write
        #expect(try server.receiveMessage(timeoutMs: 2000) == .status([9]))
        #expect(try server.receiveMessage(timeoutMs: 2000) == .bulk([1, 1]))
        #expect(try server.receiveMessage(timeoutMs: 2000) == .goodbye("bye"))
    }

    /// The retransmission floor is set on both ends before the handshake, as the kernel rounds it (its clock
    /// tick); a kernel without TCP_RTO_MIN_US (before Linux 6.15) refuses it, and the connection says so.
    @Test func aRetransmitFloorIsSetOnBothEndsOrRefusedClearly() throws {
        var p = config(.primary), s = config(.secondary)
        p.retransmitFloorMs = 10; s.retransmitFloorMs = 10
        let (c, a) = try pair(primary: p, secondary: s)
        for conn in [try c.get(), try a.get()] {
            switch conn.retransmitFloor {
            case .set(let us): #expect(us >= 10_000 && us < 20_000, "\(us) µs")
            case .refused(let why):
                print("this kernel has no TCP_RTO_MIN_US: \(why)")
                #expect(why.contains("TCP_RTO_MIN_US"))
            case .kernels: Issue.record("the floor was not asked for")
            }
        }
        #expect(try established().0.retransmitFloor == .kernels)
        // TCP_INFO reads: nothing is lost on loopback.
        #expect(try c.get().retransmittedSegments() == 0)
    }

    @Test func wrongKeyFailsOnBothSides() throws {
        let (c, s) = try pair(primary: config(.primary, key: Array("AAAAAAAAAAAAAAAAAAAA".utf8)),
                              secondary: config(.secondary, key: Array("BBBBBBBBBBBBBBBBBBBB".utf8)))
        #expect(channelError(c) == .authenticationFailed)
        #expect(channelError(s) == .authenticationFailed)
    }

    @Test func shortKeyIsRejectedLocally() throws {
        #expect(throws: ChannelError.self) {
            _ = try pair(primary: config(.primary, key: [1, 2, 3]), secondary: config(.secondary)).0.get()
        }
    }

    @Test func keyFileLoads() throws {
        let path = NSTemporaryDirectory() + "lk-key-\(getpid())"
        defer { unlink(path) }
        _ = FileManager.default.createFile(atPath: path, contents: Data(testKey))
        #expect(try ChannelConfig.loadKey(path: path) == testKey)
        _ = FileManager.default.createFile(atPath: path, contents: Data([1, 2]))
        #expect { try ChannelConfig.loadKey(path: path) } throws: { e in
            guard case ChannelError.invalidKey(let m) = e else { return false }
            return m.contains("at least 16")
        }
    }

    @Test func versionMismatchIsReportedOnBothSides() throws {
        let (c, s) = try pair(primary: config(.primary, version: 2), secondary: config(.secondary, version: 1))
        #expect(channelError(c) == .versionMismatch(local: 2, remote: 1))
        #expect(channelError(s) == .versionMismatch(local: 1, remote: 2))
        #expect(channelError(c)!.description.contains("v2"))
    }

    @Test func sameRoleIsRefused() throws {
        let (c, s) = try pair(primary: config(.primary), secondary: config(.primary))
        #expect(channelError(s) == .roleConflict(.primary))
        #expect(channelError(c) != nil)
    }

    @Test(arguments: EncryptionMode.allCases)
    func encryptionMatrix(initiator: EncryptionMode) throws {
        for responder in EncryptionMode.allCases {
            let (c, s) = try pair(primary: config(.primary, initiator), secondary: config(.secondary, responder))
            let refuse = (initiator == .required && responder == .disabled) || (initiator == .disabled && responder == .required)
            if refuse {
                guard case .encryptionRefused(let cm) = channelError(c), case .encryptionRefused(let sm) = channelError(s) else {
                    Issue.record("expected refusal for \(initiator)/\(responder): \(c) \(s)"); continue
                }
                #expect(cm.contains("requires encryption") && sm.contains("requires encryption"))
                // Each side's message is from its own point of view.
                #expect(cm.contains(initiator == .required ? "this side requires" : "the peer requires"))
                #expect(sm.contains(responder == .required ? "this side requires" : "the peer requires"))
            } else {
                let client = try c.get(), server = try s.get()
                let encrypted = initiator != .disabled && responder != .disabled
                #expect(client.session?.encrypted == encrypted && server.session?.encrypted == encrypted)
                var seen: UInt8 = 0xFF
                client.testHookBeforeWrite = { f in seen = f[5] }
                try client.sendLog(LogBatch(exitIndex: 1, bytes: Array(repeating: 0x41, count: 100)))
                #expect(seen == (encrypted ? FrameLayout.flagEncrypted : 0))
                #expect(try server.receiveMessage(timeoutMs: 2000) == .log(LogBatch(exitIndex: 1, bytes: Array(repeating: 0x41, count: 100))))
            }
        }
    }
}
