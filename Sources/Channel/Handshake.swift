#if canImport(Glibc)
import Glibc
#endif

/// Which side of the pair a peer is.
public enum PeerRole: UInt8, Sendable, Equatable, CustomStringConvertible {
    case primary = 1
    case secondary = 2
    public var description: String { self == .primary ? "primary" : "secondary" }
}

/// What the handshake needs from the caller.
public struct ChannelConfig: Sendable {
    public static let currentVersion: UInt16 = 6
    public static let minimumKeyBytes = 16

    /// Pre-shared key (raw bytes, at least 16).
    public var key: [UInt8]
    public var role: PeerRole
    public var encryption: EncryptionMode
    /// Opaque bytes carried in the hello (machine config + guest image digest).
    public var payload: [UInt8]
    public var handshakeTimeoutMs: Int
    /// Protocol version spoken; only tests change it.
    public var protocolVersion: UInt16
    /// A floor under TCP's retransmission timeout for this link (ms; 0: the kernel's, 200 ms on Linux): a lost
    /// segment that fast retransmit does not recover leaves the link silent until it, so it must sit well
    /// under the failure timeout. Applied before the handshake; `Connection.retransmitFloor` says how it went.
    public var retransmitFloorMs: Int = 0

    public init(key: [UInt8], role: PeerRole, encryption: EncryptionMode = .opportunistic,
                payload: [UInt8] = [], handshakeTimeoutMs: Int = 5000,
                protocolVersion: UInt16 = ChannelConfig.currentVersion) {
        self.key = key; self.role = role; self.encryption = encryption; self.payload = payload
        self.handshakeTimeoutMs = handshakeTimeoutMs; self.protocolVersion = protocolVersion
    }

    /// Reads a raw key file (`--key-file`); at least 16 bytes.
    public static func loadKey(path: String) throws -> [UInt8] {
        let fd: Int32
        do { fd = try sys("open") { open(path, O_RDONLY | O_CLOEXEC) } }
        catch { throw ChannelError.invalidKey("cannot open key file \(path): \(error)") }
        defer { _ = close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n: Int
            do { n = try sys("read") { read(fd, &chunk, chunk.count) } }
            catch { throw ChannelError.invalidKey("cannot read key file \(path): \(error)") }
            if n == 0 { break }
            out.append(contentsOf: chunk[0..<n])
            if out.count > 1 << 20 { throw ChannelError.invalidKey("key file \(path) is larger than 1 MiB") }
        }
        guard out.count >= minimumKeyBytes else {
            throw ChannelError.invalidKey("key file \(path) holds \(out.count) bytes; at least \(minimumKeyBytes) are needed")
        }
        return out
    }
}

/// The outcome of a successful handshake.
public struct Session: Sendable, Equatable {
    public let protocolVersion: UInt16
    public let peerRole: PeerRole
    public let peerPayload: [UInt8]
    public let peerEncryption: EncryptionMode
    /// True when frames are AES-256-GCM encrypted.
    public let encrypted: Bool
}

enum HelloLabel {
    static let responderProof = Array("lockstep-ft v1 responder proof".utf8)
    static let initiatorProof = Array("lockstep-ft v1 initiator proof".utf8)
    static let keyI2R = Array("lockstep-ft v1 key initiator->responder".utf8)
    static let keyR2I = Array("lockstep-ft v1 key responder->initiator".utf8)
}

/// Parsed hello / helloReply (common prefix; the reply carries a trailing 32-byte MAC).
struct Hello {
    static let nonceBytes = 32
    static let macBytes = 32
    var version: UInt16
    var role: PeerRole
    var mode: EncryptionMode
    var nonce: [UInt8]
    var payload: [UInt8]

    func encode() -> [UInt8] {
        var w = ByteWriter(capacity: 40 + payload.count)
        w.u16(version); w.u8(role.rawValue); w.u8(mode.rawValue); w.bytes(nonce)
        w.u32(UInt32(payload.count)); w.bytes(payload)
        return w.out
    }

    /// Version first, so a peer of another version is recognised before anything else is parsed.
    static func peekVersion(_ body: [UInt8], type: FrameType) throws -> UInt16 {
        var r = ByteReader(body, type: type)
        return try r.u16()
    }

    static func decode(_ body: [UInt8], type: FrameType, trailingMac: Bool) throws -> (Hello, [UInt8]) {
        var r = ByteReader(body, type: type)
        let v = try r.u16()
        let rr = try r.u8()
        guard let role = PeerRole(rawValue: rr) else { throw ChannelError.malformedBody(type: type, reason: "role \(rr)") }
        let mr = try r.u8()
        guard let mode = EncryptionMode(rawValue: mr) else { throw ChannelError.malformedBody(type: type, reason: "encryption mode \(mr)") }
        let nonce = Array(try r.take(nonceBytes))
        let plen = Int(try r.u32())
        let payload = Array(try r.take(plen))
        var mac: [UInt8] = []
        if trailingMac { mac = Array(try r.take(macBytes)) }
        try r.end()
        return (Hello(version: v, role: role, mode: mode, nonce: nonce, payload: payload), mac)
    }
}

extension Connection {
    /// Runs the handshake. Initiator: hello -> (helloReply) -> helloAuth -> (helloDone).
    /// Both proofs are HMAC-SHA256(PSK, label || transcript) so the key never crosses the wire and
    /// the negotiated parameters (version, roles, encryption modes, payloads) cannot be altered.
    public func handshake(initiator: Bool, config: ChannelConfig) throws {
        guard config.key.count >= ChannelConfig.minimumKeyBytes else {
            throw ChannelError.invalidKey("\(config.key.count) bytes; at least \(ChannelConfig.minimumKeyBytes) are needed")
        }
        guard config.payload.count <= Int(FrameLayout.maxHelloPayload) else {
            throw ChannelError.frameTooLarge(type: .hello, length: UInt32(clamping: config.payload.count), limit: FrameLayout.maxHelloPayload)
        }
        localVersion = config.protocolVersion
        if config.retransmitFloorMs > 0 { setRetransmitFloor(ms: config.retransmitFloorMs) }
        let deadline = SocketOps.monotonicMs() + Int64(config.handshakeTimeoutMs)
        func remaining() -> Int { Int(max(0, deadline - SocketOps.monotonicMs())) }
        let mine = Hello(version: config.protocolVersion, role: config.role, mode: config.encryption,
                         nonce: try Crypto.random(Hello.nonceBytes), payload: config.payload)
        if initiator {
            let helloBody = mine.encode()
            try send(Frame(type: .hello, body: helloBody))
            let reply = try receive(timeoutMs: remaining())
            guard reply.type == .helloReply else { fail(.unexpectedFrame(expected: "helloReply", got: reply.type)); throw ChannelError.unexpectedFrame(expected: "helloReply", got: reply.type) }
            let (peer, mac): (Hello, [UInt8])
            do { (peer, mac) = try Hello.decode(reply.body, type: .helloReply, trailingMac: true) } catch { fail(error as! ChannelError); throw error }
            let unsigned = Array(reply.body.dropLast(Hello.macBytes))
            let expect = Crypto.hmacSHA256(key: config.key, [HelloLabel.responderProof, helloBody, unsigned])
            guard Crypto.equal(expect, mac) else { fail(.authenticationFailed); throw ChannelError.authenticationFailed }
            try checkAgreement(mine: mine, peer: peer)
            let proof = Crypto.hmacSHA256(key: config.key, [HelloLabel.initiatorProof, helloBody, reply.body])
            try send(Frame(type: .helloAuth, body: proof))
            let done = try receive(timeoutMs: remaining())
            guard done.type == .helloDone else { fail(.unexpectedFrame(expected: "helloDone", got: done.type)); throw ChannelError.unexpectedFrame(expected: "helloDone", got: done.type) }
            try finish(config: config, mine: mine, peer: peer, initiatorNonce: mine.nonce, responderNonce: peer.nonce, initiator: true)
        } else {
            let hello = try receive(timeoutMs: remaining())
            guard hello.type == .hello else { fail(.unexpectedFrame(expected: "hello", got: hello.type)); throw ChannelError.unexpectedFrame(expected: "hello", got: hello.type) }
            let peerVersion: UInt16
            do { peerVersion = try Hello.peekVersion(hello.body, type: .hello) } catch { fail(error as! ChannelError); throw error }
            guard peerVersion == config.protocolVersion else {
                let e = ChannelError.versionMismatch(local: config.protocolVersion, remote: peerVersion)
                fail(e, detail: config.protocolVersion,
                     text: "protocol version mismatch: the peer speaks v\(config.protocolVersion), this side v\(peerVersion)")
                throw e
            }
            let peer: Hello
            do { peer = try Hello.decode(hello.body, type: .hello, trailingMac: false).0 } catch { fail(error as! ChannelError); throw error }
            if peer.role == config.role { fail(.roleConflict(peer.role)); throw ChannelError.roleConflict(peer.role) }
            if case .failure(let e) = EncryptionMode.negotiate(local: config.encryption, remote: peer.mode) {
                let forPeer: String
                if case .failure(.encryptionRefused(let t)) = EncryptionMode.negotiate(local: peer.mode, remote: config.encryption) { forPeer = t } else { forPeer = e.description }
                fail(e, text: forPeer)
                throw e
            }
            let unsigned = mine.encode()
            let mac = Crypto.hmacSHA256(key: config.key, [HelloLabel.responderProof, hello.body, unsigned])
            let replyBody = unsigned + mac
            try send(Frame(type: .helloReply, body: replyBody))
            let auth = try receive(timeoutMs: remaining())
            guard auth.type == .helloAuth else { fail(.unexpectedFrame(expected: "helloAuth", got: auth.type)); throw ChannelError.unexpectedFrame(expected: "helloAuth", got: auth.type) }
            let expect = Crypto.hmacSHA256(key: config.key, [HelloLabel.initiatorProof, hello.body, replyBody])
            guard Crypto.equal(expect, auth.body) else { fail(.authenticationFailed); throw ChannelError.authenticationFailed }
            try send(Frame(type: .helloDone, body: []))
            try finish(config: config, mine: mine, peer: peer, initiatorNonce: peer.nonce, responderNonce: mine.nonce, initiator: false)
        }
    }

    private func checkAgreement(mine: Hello, peer: Hello) throws {
        if peer.version != mine.version {
            let e = ChannelError.versionMismatch(local: mine.version, remote: peer.version); fail(e); throw e
        }
        if peer.role == mine.role { fail(.roleConflict(peer.role)); throw ChannelError.roleConflict(peer.role) }
        if case .failure(let e) = EncryptionMode.negotiate(local: mine.mode, remote: peer.mode) { fail(e); throw e }
    }

    private func finish(config: ChannelConfig, mine: Hello, peer: Hello, initiatorNonce: [UInt8], responderNonce: [UInt8], initiator: Bool) throws {
        let encrypted = (try? EncryptionMode.negotiate(local: mine.mode, remote: peer.mode).get()) ?? false
        if encrypted {
            let salt = initiatorNonce + responderNonce
            let i2r = Crypto.hkdf(ikm: config.key, salt: salt, info: HelloLabel.keyI2R, length: 32)
            let r2i = Crypto.hkdf(ikm: config.key, salt: salt, info: HelloLabel.keyR2I, length: 32)
            try enableEncryption(sendKey: initiator ? i2r : r2i, receiveKey: initiator ? r2i : i2r)
        }
        setSession(Session(protocolVersion: mine.version, peerRole: peer.role, peerPayload: peer.payload,
                           peerEncryption: peer.mode, encrypted: encrypted))
    }
}
