#if canImport(Glibc)
import Glibc
#endif
import CLockstep
import Synchronization

/// One end of the FT link over a TCP socket (TCP_NODELAY, blocking I/O from dedicated threads).
///
/// Thread-safety: one sender thread and one receiver thread may use a Connection concurrently;
/// the send side is serialized by a lock, the receive side must be used by one thread at a time.
/// `close()` may be called from any thread: it shuts the socket down, waking blocked calls;
/// the descriptor itself is released when the Connection is deinitialized.
public final class Connection: @unchecked Sendable {
    public let fd: Int32
    /// Set by the handshake; nil before.
    public private(set) var session: Session?
    /// What became of `ChannelConfig.retransmitFloorMs` (set by the handshake).
    public private(set) var retransmitFloor: RetransmitFloor = .kernels

    public enum RetransmitFloor: Sendable, Equatable {
        /// Not asked for: the kernel's (the route's `rto_min`, else 200 ms).
        case kernels
        /// The floor the kernel took (µs).
        case set(us: Int32)
        /// The kernel refused it (before Linux 6.15 it has no such option): the kernel's floor stays.
        case refused(String)
    }

    private let closedFlag = Atomic<Bool>(false)
    public var isClosed: Bool { closedFlag.load(ordering: .acquiring) }
    /// CLOCK_MONOTONIC ns of the last bytes received: a peer in the middle of a large frame is alive.
    private let lastReceive = Atomic<UInt64>(lk_monotonic_ns())
    public var lastReceiveNs: UInt64 { lastReceive.load(ordering: .relaxed) }

    // Send side (under sendLock): one growable buffer reused for every frame.
    private let sendLock = Lock()
    private var sbuf: UnsafeMutableRawPointer
    private var scap: Int
    private var slen = 0
    private var sealer: GCMDirection?

    // Receive side (one thread): buffered bytes live in rbuf[rstart..<rend].
    private var rbuf: UnsafeMutableRawPointer
    private var rcap: Int
    private var rstart = 0
    private var rend = 0
    private var opener: GCMDirection?
    /// The leading parts of a log batch whose closing `log` frame has not come yet.
    private var logParts: [UInt8] = []
    /// Largest log batch taken, all parts together (tests lower it).
    var logBatchLimit = FrameLayout.maxLogBatch

    // Busy polling (see `enablePolling`): the eventfd that wakes a sleeping receive to spin, and when the
    // current spin was asked for (0: none).
    private var pollWindowNs: UInt64 = 0
    private var pollEvent: Int32 = -1
    private let pollArmedNs = Atomic<UInt64>(0)
    private let spinReadCount = Atomic<UInt64>(0)
    /// recv(2) calls of a spin that brought bytes: frames (or parts) taken without a wake-up.
    public var spinReads: UInt64 { spinReadCount.load(ordering: .relaxed) }
    /// Test hook: a spin begins (receiving thread).
    var testHookSpinStarted: (() -> Void)?

    /// Protocol version this side speaks (set by the handshake).
    var localVersion: UInt16 = ChannelConfig.currentVersion

    /// Test hook: sees each outgoing frame's bytes (header + body) after CRC, before the write.
    var testHookBeforeWrite: ((UnsafeMutableRawBufferPointer) -> Void)?

    static let initialBuffer = 256 << 10

    /// `HOST:PORT` this side connected to, as it was asked ("" for an accepted connection).
    public let remote: String

    init(fd: Int32, remote: String = "") {
        self.fd = fd
        self.remote = remote
        scap = Connection.initialBuffer
        sbuf = .allocate(byteCount: scap, alignment: 16)
        rcap = Connection.initialBuffer
        rbuf = .allocate(byteCount: rcap, alignment: 16)
    }

    deinit {
        _ = Glibc.close(fd)
        if pollEvent >= 0 { _ = Glibc.close(pollEvent) }
        sbuf.deallocate()
        rbuf.deallocate()
    }

    /// Opens a TCP connection (no handshake). Clear errors for refused / unreachable / timeout.
    public static func connectRaw(host: String, port: UInt16, timeoutMs: Int) throws -> Connection {
        Connection(fd: try SocketOps.connect(host: host, port: port, timeoutMs: timeoutMs), remote: host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)")
    }

    /// Opens a TCP connection and runs the handshake as initiator.
    public static func connect(host: String, port: UInt16, timeoutMs: Int, config: ChannelConfig) throws -> Connection {
        let c = try connectRaw(host: host, port: port, timeoutMs: timeoutMs)
        do { try c.handshake(initiator: true, config: config) } catch { c.close(); throw error }
        return c
    }

    /// Segments the kernel has sent again on this connection (`tcpi_total_retrans`): each one a loss, or a
    /// retransmission timeout, on the link. nil when TCP_INFO cannot be read.
    public func retransmittedSegments() -> UInt32? {
        var info = tcp_info()
        var len = socklen_t(MemoryLayout<tcp_info>.size)
        guard getsockopt(fd, Int32(IPPROTO_TCP), Int32(TCP_INFO), &info, &len) == 0 else { return nil }
        return info.tcpi_total_retrans
    }

    func setRetransmitFloor(ms: Int) {
        do { retransmitFloor = .set(us: try SocketOps.setRetransmitFloor(fd, us: Int32(clamping: ms * 1000))) } catch {
            retransmitFloor = .refused("\(error)")
        }
    }

    /// Shuts the socket down (both directions). Idempotent.
    public func close() {
        if closedFlag.exchange(true, ordering: .acquiringAndReleasing) { return }
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    func enableEncryption(sendKey: [UInt8], receiveKey: [UInt8]) throws {
        let s = try GCMDirection(key: sendKey, encrypt: true)
        let o = try GCMDirection(key: receiveKey, encrypt: false)
        sendLock.withLock { sealer = s }
        opener = o
    }

    func setSession(_ s: Session) { session = s }

    // MARK: send

    /// Sends one frame.
    public func send(_ frame: Frame) throws {
        try sendLock.withLock { () throws in
            try frame.body.withUnsafeBytes { b throws in
                try appendFrame(type: frame.type, head: UnsafeRawBufferPointer(start: nil, count: 0), body: b)
            }
            try flushLocked()
        }
    }

    /// Sends several frames coalesced into one write.
    public func send(_ frames: [Frame]) throws {
        try sendLock.withLock { () throws in
            for f in frames {
                try f.body.withUnsafeBytes { b throws in
                    try appendFrame(type: f.type, head: UnsafeRawBufferPointer(start: nil, count: 0), body: b)
                }
            }
            try flushLocked()
        }
    }

    /// Sends a log batch without intermediate allocations (the bytes are copied once into the
    /// reused send buffer and encrypted there in place). A batch larger than `logPartBytes` leaves in parts,
    /// the lock taken for each: sealing 48 MiB of sync point took 40 ms with no byte on the wire and the
    /// heartbeat waiting behind it, long enough for the peer to presume this side dead.
    public func sendLog(exitIndex: UInt64, bytes: UnsafeRawBufferPointer) throws {
        let none = UnsafeRawBufferPointer(start: nil, count: 0)
        var rest = bytes
        while rest.count > FrameLayout.logPartBytes {
            let part = UnsafeRawBufferPointer(rebasing: rest[..<FrameLayout.logPartBytes])
            try sendLock.withLock { () throws in
                try appendFrame(type: .logPart, head: none, body: part)
                try flushLocked()
            }
            rest = UnsafeRawBufferPointer(rebasing: rest[FrameLayout.logPartBytes...])
        }
        var idx = exitIndex.littleEndian
        try sendLock.withLock { () throws in
            try withUnsafeBytes(of: &idx) { h throws in try appendFrame(type: .log, head: h, body: rest) }
            try flushLocked()
        }
    }

    public func sendLog(_ batch: LogBatch) throws {
        try batch.bytes.withUnsafeBytes { b throws in try sendLog(exitIndex: batch.exitIndex, bytes: b) }
    }

    public func sendAck(_ a: Ack) throws {
        var v = (a.heldExitIndex.littleEndian, a.replayedExitIndex.littleEndian)
        try sendSmall(.ack, &v)
    }

    public func sendHeartbeat(_ h: Heartbeat) throws {
        var v = (h.sentNs.littleEndian, h.echoNs.littleEndian)
        try sendSmall(.heartbeat, &v)
    }

    private func sendSmall<T>(_ type: FrameType, _ v: inout T) throws {
        try sendLock.withLock { () throws in
            try withUnsafeBytes(of: &v) { b throws in
                try appendFrame(type: type, head: UnsafeRawBufferPointer(start: nil, count: 0), body: b)
            }
            try flushLocked()
        }
    }

    /// Sends an error frame (best effort, never blocks on a busy sender) then closes.
    func fail(_ error: ChannelError, detail: UInt16 = 0, text: String? = nil) {
        if !isClosed, sendLock.tryLock() {
            let f = Frame.error(error.wireCode, detail: detail, text ?? error.description)
            slen = 0
            _ = try? f.body.withUnsafeBytes { b throws in
                try appendFrame(type: .error, head: UnsafeRawBufferPointer(start: nil, count: 0), body: b)
            }
            _ = try? flushLocked()
            sendLock.unlock()
        }
        close()
    }

    private func ensureSend(_ extra: Int) {
        if slen + extra <= scap { return }
        let ncap = max(slen + extra, scap * 2)
        let n = UnsafeMutableRawPointer.allocate(byteCount: ncap, alignment: 16)
        n.copyMemory(from: sbuf, byteCount: slen)
        sbuf.deallocate()
        sbuf = n
        scap = ncap
    }

    /// Appends header + (head ++ body) to the send buffer, encrypting when the session is.
    private func appendFrame(type: FrameType, head: UnsafeRawBufferPointer, body: UnsafeRawBufferPointer) throws {
        let plain = head.count + body.count
        let bodyLen = plain + (sealer == nil ? 0 : FrameLayout.tagBytes)
        guard bodyLen <= Int(type.maxBodyBytes) else {
            throw ChannelError.frameTooLarge(type: type, length: UInt32(clamping: bodyLen), limit: type.maxBodyBytes)
        }
        ensureSend(FrameLayout.headerBytes + bodyLen)
        let h = sbuf + slen
        let b = h + FrameLayout.headerBytes
        storeLE32(h, UInt32(bodyLen))
        h.storeBytes(of: type.rawValue, toByteOffset: 4, as: UInt8.self)
        h.storeBytes(of: sealer == nil ? 0 : FrameLayout.flagEncrypted, toByteOffset: 5, as: UInt8.self)
        h.storeBytes(of: FrameLayout.magic0, toByteOffset: 6, as: UInt8.self)
        h.storeBytes(of: FrameLayout.magic1, toByteOffset: 7, as: UInt8.self)
        if let p = head.baseAddress, head.count > 0 { b.copyMemory(from: p, byteCount: head.count) }
        if let p = body.baseAddress, body.count > 0 { (b + head.count).copyMemory(from: p, byteCount: body.count) }
        if let s = sealer {
            try s.seal(aad: h, aadCount: FrameLayout.aadBytes, src: b, count: plain, dst: b)
        }
        storeLE32(h + 8, lk_crc32c(0, b, bodyLen))
        if let hook = testHookBeforeWrite {
            hook(UnsafeMutableRawBufferPointer(start: h, count: FrameLayout.headerBytes + bodyLen))
        }
        slen += FrameLayout.headerBytes + bodyLen
    }

    private func flushLocked() throws {
        defer { slen = 0 }
        if isClosed { throw ChannelError.closed }
        var off = 0
        while off < slen {
            do {
                let n = try sys("send") { Glibc.send(fd, sbuf + off, slen - off, Int32(MSG_NOSIGNAL)) }
                off += n
            } catch ChannelError.system(let e) where e.errno == EPIPE || e.errno == ECONNRESET {
                throw ChannelError.peerClosed(midFrame: false)
            }
        }
    }

    // MARK: receive

    /// Lets `receive` spin on the socket, giving the core away at each turn, instead of sleeping in poll(2),
    /// for up to `windowNs` after each `armPolling`: bytes that come meanwhile are taken without a wake-up,
    /// which on a nested host costs tens of µs when the core has gone idle (Benchmarks/README.md). Call before
    /// the receiving thread starts; that thread should run at normal priority, or its spin starves the core.
    public func enablePolling(windowNs: UInt64) throws {
        guard windowNs > 0, pollEvent < 0 else { return }
        let e = lk_eventfd()
        guard e >= 0 else { throw ChannelError.system(SystemCallError(call: "eventfd", errno: -e)) }
        pollEvent = e
        pollWindowNs = windowNs
    }

    /// Any thread: the receiver should spin for its next bytes (woken if it sleeps). No-op unless enabled, or
    /// while a spin asked for earlier is still within its window.
    public func armPolling() {
        guard pollEvent >= 0 else { return }
        let now = lk_monotonic_ns()
        let armed = pollArmedNs.load(ordering: .acquiring)
        // A spin whose window ran out while the receiver was busy elsewhere is replaced, not kept.
        guard armed == 0 || now &- armed >= pollWindowNs,
              pollArmedNs.compareExchange(expected: armed, desired: now, ordering: .acquiringAndReleasing).exchanged else { return }
        lk_eventfd_signal(pollEvent)
    }

    /// What the spin waited for has come: sleep in poll(2) again until the next `armPolling`.
    public func disarmPolling() { pollArmedNs.store(0, ordering: .releasing) }

    /// A spin is asked for and its window has not run out.
    var pollingArmed: Bool {
        let armed = pollArmedNs.load(ordering: .acquiring)
        return armed != 0 && lk_monotonic_ns() &- armed < pollWindowNs
    }

    /// Spins while armed and within the window; true when bytes came. A spin that runs out disarms.
    private func spin(deadline: Int64?) throws -> Bool {
        if pollArmedNs.load(ordering: .relaxed) != 0 { testHookSpinStarted?() }
        while case let armed = pollArmedNs.load(ordering: .acquiring), armed != 0, !isClosed {
            if try readSome(Int32(MSG_DONTWAIT)) { spinReadCount.add(1, ordering: .relaxed); return true }
            if lk_monotonic_ns() &- armed >= pollWindowNs {
                _ = pollArmedNs.compareExchange(expected: armed, desired: 0, ordering: .acquiringAndReleasing)
                return false
            }
            if let d = deadline, SocketOps.monotonicMs() >= d { return false }
            sched_yield()
        }
        return false
    }

    /// One recv(2) into the buffer; false when a non-blocking one finds nothing.
    private func readSome(_ flags: Int32) throws -> Bool {
        let n: Int
        do { n = try sys("recv") { recv(fd, rbuf + rend, rcap - rend, flags) } }
        catch ChannelError.system(let e) {
            if e.errno == EAGAIN || e.errno == EWOULDBLOCK { return false }
            if isClosed { throw ChannelError.closed }
            if e.errno == ECONNRESET { throw ChannelError.peerClosed(midFrame: rend > rstart) }
            throw ChannelError.system(e)
        }
        if n == 0 { throw isClosed ? ChannelError.closed : ChannelError.peerClosed(midFrame: rend > rstart) }
        rend += n
        lastReceive.store(lk_monotonic_ns(), ordering: .relaxed)
        return true
    }

    /// Receives the next frame. `timeoutMs < 0` waits forever. On `.timeout` the connection stays
    /// usable (partial frames stay buffered). Protocol errors tell the peer and drop the connection.
    /// An `error` frame from the peer is thrown as the matching `ChannelError`.
    public func receive(timeoutMs: Int = -1) throws -> Frame {
        let (type, body) = try receiveInPlace(timeoutMs: timeoutMs)
        return Frame(type: type, body: Array(body))
    }

    /// As `receive`, the body left in the receive buffer: valid until the next receive, so `receiveMessage`
    /// decodes acks and heartbeats (one per batch on the link threads) without an allocation.
    private func receiveInPlace(timeoutMs: Int) throws -> (FrameType, UnsafeRawBufferPointer) {
        do {
            let (type, body) = try receiveFrame(timeoutMs: timeoutMs)
            if type == .error {
                close()
                let (code, detail, text) = Frame(type: type, body: Array(body)).decodeError()
                switch code {
                case .authenticationFailed: throw ChannelError.authenticationFailed
                case .versionMismatch: throw ChannelError.versionMismatch(local: localVersion, remote: detail)
                case .encryptionRefused: throw ChannelError.encryptionRefused(text)
                default: throw ChannelError.peerError(code: code, message: text)
                }
            }
            return (type, body)
        } catch let error as ChannelError {
            switch error {
            case .badMagic, .unknownFrameType, .unknownFlags, .frameTooLarge, .checksumMismatch,
                 .decryptionFailed, .encryptionFlagMismatch:
                fail(error)
            case .timeout: break
            default: close()
            }
            throw error
        }
    }

    /// Receives and decodes a post-handshake message. A log batch's parts are gathered here and the batch
    /// returned whole with its closing `log` frame; other messages may come between the parts.
    public func receiveMessage(timeoutMs: Int = -1) throws -> Message {
        let deadline = timeoutMs < 0 ? nil : SocketOps.monotonicMs() + Int64(timeoutMs)
        while true {
            let left = deadline.map { Int(max(0, $0 - SocketOps.monotonicMs())) } ?? -1
            let (type, body) = try receiveInPlace(timeoutMs: left)
            do {
                if type == .logPart {
                    guard logParts.count + body.count <= logBatchLimit else {
                        throw ChannelError.malformedBody(type: .logPart, reason: "a log batch of more than \(logBatchLimit) bytes")
                    }
                    logParts += body
                    continue
                }
                var m = try Message.decode(type, body)
                if case .log(var b) = m, !logParts.isEmpty {
                    // The closing bytes join the parts, and the parts' buffer becomes the batch: no second copy
                    // (and no second set of fresh pages to fault in) of a batch that may be 1 GiB.
                    logParts += b.bytes
                    b.bytes = logParts
                    logParts = []
                    m = .log(b)
                }
                return m
            } catch { fail(error as! ChannelError); throw error }
        }
    }

    /// What the peer said before the connection broke: the messages already here (buffered, or in the socket),
    /// taken without waiting, at most `limit`. A peer that reports why it leaves and closes at once resets a
    /// connection with bytes still coming to it; a send here fails on that reset, and its report is still readable.
    public func lastWords(limit: Int = 64) -> [Message] {
        var words: [Message] = []
        while words.count < limit, let m = try? receiveMessage(timeoutMs: 0) { words.append(m) }
        return words
    }

    private func ensureReceive(_ total: Int) {
        // Make room for `total` bytes starting at rstart.
        if rstart > 0 && (rcap - rstart < total || rstart == rend) {
            let have = rend - rstart
            if have > 0 { rbuf.copyMemory(from: rbuf + rstart, byteCount: have) }
            rstart = 0; rend = have
        }
        if total > rcap {
            let ncap = max(total, min(rcap * 2, Int(FrameLayout.maxBulkPayload) + 4096))
            let n = UnsafeMutableRawPointer.allocate(byteCount: max(ncap, total), alignment: 16)
            n.copyMemory(from: rbuf + rstart, byteCount: rend - rstart)
            rbuf.deallocate()
            rbuf = n; rcap = max(ncap, total); rend -= rstart; rstart = 0
        }
    }

    private func fill(_ total: Int, deadline: Int64?, timeoutMs: Int) throws {
        ensureReceive(total)
        while rend - rstart < total {
            if isClosed { throw ChannelError.closed }
            if pollEvent >= 0, try spin(deadline: deadline) { continue }
            switch try SocketOps.wait(fd, events: Int16(POLLIN), orEvent: pollEvent, deadlineMs: deadline) {
            case .timeout: throw ChannelError.timeout(ms: timeoutMs)
            case .woken: continue  // armed: spin
            case .ready: _ = try readSome(0)
            }
        }
    }

    /// The next frame, consumed; its body stays in the receive buffer until the next fill.
    private func receiveFrame(timeoutMs: Int) throws -> (FrameType, UnsafeRawBufferPointer) {
        if isClosed { throw ChannelError.closed }
        let deadline: Int64? = timeoutMs < 0 ? nil : SocketOps.monotonicMs() + Int64(timeoutMs)
        let H = FrameLayout.headerBytes
        try fill(H, deadline: deadline, timeoutMs: timeoutMs)
        // Validate the header before reading (and allocating for) the body.
        var h = rbuf + rstart
        let m0 = h.load(fromByteOffset: 6, as: UInt8.self), m1 = h.load(fromByteOffset: 7, as: UInt8.self)
        guard m0 == FrameLayout.magic0 && m1 == FrameLayout.magic1 else { throw ChannelError.badMagic(UInt16(m0) << 8 | UInt16(m1)) }
        let rawType = h.load(fromByteOffset: 4, as: UInt8.self)
        guard let type = FrameType(rawValue: rawType) else { throw ChannelError.unknownFrameType(rawType) }
        let flags = h.load(fromByteOffset: 5, as: UInt8.self)
        guard flags & ~FrameLayout.knownFlags == 0 else { throw ChannelError.unknownFlags(flags) }
        let len = loadLE32(h)
        guard len <= type.maxBodyBytes else { throw ChannelError.frameTooLarge(type: type, length: len, limit: type.maxBodyBytes) }
        let encrypted = flags & FrameLayout.flagEncrypted != 0
        guard encrypted == (opener != nil) else { throw ChannelError.encryptionFlagMismatch(sessionEncrypted: opener != nil) }
        try fill(H + Int(len), deadline: deadline, timeoutMs: timeoutMs)
        h = rbuf + rstart
        let body = h + H
        let want = loadLE32(h + 8)
        let got = lk_crc32c(0, body, Int(len))
        guard want == got else { throw ChannelError.checksumMismatch(expected: want, actual: got) }
        var plainLen = Int(len)
        if let o = opener {
            guard Int(len) >= FrameLayout.tagBytes else { throw ChannelError.malformedBody(type: type, reason: "shorter than the GCM tag") }
            plainLen -= FrameLayout.tagBytes
            guard o.open(aad: h, aadCount: FrameLayout.aadBytes, buf: body, count: plainLen) else { throw ChannelError.decryptionFailed(type: type) }
        }
        rstart += H + Int(len)
        if rstart == rend { rstart = 0; rend = 0 }  // positions only: the bytes stay until the next fill
        return (type, UnsafeRawBufferPointer(start: body, count: plainLen))
    }
}

extension FrameLayout {
    /// Recomputes the CRC of a complete frame in place (tests use it to simulate an attacker).
    static func fixCRC(_ frame: UnsafeMutableRawBufferPointer) {
        let b = frame.baseAddress!
        storeLE32(b + 8, lk_crc32c(0, b + headerBytes, frame.count - headerBytes))
    }
}
