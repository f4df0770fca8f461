import CLockstep
import Channel
import EventLog
import Failover
import Foundation
import Machine
import Synchronization

/// `lockstep secondary`: waits for a primary, loads its seed, replays its log in lockstep, and goes live
/// (fence, drain, live devices, service address) when the primary fails.
public final class SecondaryRunner: PairRole, @unchecked Sendable {
    let listener: Listener
    let options: PairOptions
    let serial: SerialSpec
    private var session: StandbySession?
    private var source: LiveLogSource? { didSet { sourceForStatus.withLock { $0 = source } } }
    /// `source` for the status and control threads.
    private let sourceForStatus = Mutex<LiveLogSource?>(nil)
    private var backend: SerialBackend?
    /// Watches the fence this side took to go live (`FenceWatch`); its protector shares it.
    private var liveWatch: FenceWatch? { didSet { liveWatchForStatus.withLock { $0 = liveWatch } } }
    private let liveWatchForStatus = Mutex<FenceWatch?>(nil)
    /// `--peer`: once live, this side protects itself with a new secondary there (nil: it runs unprotected).
    /// The operator may move it (`changePeer`).
    var reprotectPeer: String? { reprotectAddress.withLock { $0 } }
    private let reprotectAddress: Mutex<String?>
    /// The survivor's protection (after go-live, with `--peer`).
    private var protector: PrimaryRunner? { didSet { protectorForSignals.withLock { $0 = protector } } }
    /// `protector` for the thread that asks for a handover.
    private let protectorForSignals = Mutex<PrimaryRunner?>(nil)
    /// The session while `wentLive`, for the thread that stops it (SIGTERM).
    private let liveSession = Mutex<StandbySession?>(nil)
    private var seedImage: PVHImage?
    /// The RAM of the last machine, kept for the next seed (a delta seed sends only what differs from it).
    private var retained: RetainedRAM?
    private var seedConfig = MachineConfig()
    /// This side's fence store ID (`Fencing.storeID`; "" without a fence), read at the first seed.
    private var fenceID: String?
    /// How the run ended, for the exit status.
    public private(set) var wentLive = false { didSet { liveSession.withLock { $0 = wentLive ? session : nil } } }
    /// Asked to end after a handover (a stop signal, a migration) instead of listening for the new primary.
    private let leaving = Atomic<Bool>(false)
    /// `run` returned because this side handed its guest over and was asked to end (a stop signal, a migration).
    public var handedOverToLeave: Bool { leaving.load(ordering: .acquiring) && protector?.handedOver == true }
    private let startNs = lk_monotonic_ns()
    private let reports = JSONReports()

    public init(listen: String, serial: SerialSpec, options: PairOptions, reprotectPeer: String? = nil) throws(PairError) {
        reprotectAddress = Mutex(reprotectPeer)
        let (host, port) = try PairOptions.hostPort(listen, option: "--listen", anyPort: true)
        do { listener = try Listener(host: host, port: port) } catch {
            throw .config("--listen \(listen): \(error)")
        }
        self.serial = serial
        self.options = options
    }

    public var port: UInt16 { listener.port }

    /// Keeps `ram` (a primary's that handed its guest over and stays as a secondary) for the first seed.
    public func keep(_ ram: RetainedRAM) { retained = ram }

    /// Accepts primaries until one completes the handshake and the seed (a bad peer is reported and dropped),
    /// then replays until the guest ends or this side goes live and the guest ends. A divergence while
    /// replaying is reported to the primary, which seeds this side again; so does a primary that was presumed
    /// failed but held the fence, once it finds this side again. A survivor that hands the guest
    /// over becomes a secondary again: it listens for the new primary, which re-protects itself here.
    public func run(acceptTimeoutMs: Int = -1) throws -> SessionResult {
        defer { listener.close() }
        while true {
            let (s, src) = try acceptSeeded(acceptTimeoutMs: acceptTimeoutMs)
            if let r = try follow(s, src) {
                guard protector?.handedOver == true else {
                    // The guest ended here: free the fence now (see `PrimaryRunner.endFence`; a protector did already).
                    liveWatch?.stop()
                    if wentLive, let f = source?.fence, f.token != nil {
                        PairRecord.write(f, PairRecord.ended(r.ending.processStatus))
                        try? f.release()
                    }
                    return r
                }
                if leaving.load(ordering: .acquiring) { return r }
                warn("secondary: handed the guest over; listening again on \(listener.host):\(port) for the new primary")
                liveWatch?.stop()
                protector = nil; backend = nil; wentLive = false; liveWatch = nil
            }
            // The next seed builds a new machine around this one's RAM: the primary sends only what differs.
            retained = try? session?.machine.retainRAM()
            session = nil; source = nil
        }
    }

    private func acceptSeeded(acceptTimeoutMs: Int) throws -> (StandbySession, LiveLogSource) {
        let cfg = options.channel(role: .secondary)
        // Waiting to be seeded again (this side followed the guest before): the guest may end meanwhile, and
        // then nobody will seed it. The pair record says so; before the first seed it may be an earlier pair's.
        let ended = seedImage == nil ? nil : options.openFence()
        let deadline = acceptTimeoutMs < 0 ? nil : lk_monotonic_ns() + UInt64(acceptTimeoutMs) * 1_000_000
        while true {
            if let f = ended { try stopIfEnded(f) }
            let left = deadline.map { Int(($0 &- min($0, lk_monotonic_ns())) / 1_000_000) }
            let conn: Connection
            do {
                conn = try listener.acceptRaw(timeoutMs: ended == nil ? left ?? -1 : min(left ?? Int.max, Self.recordPollMs))
            } catch ChannelError.timeout {
                if let d = deadline, lk_monotonic_ns() >= d { throw PairError.peerUnreachable("no primary connected within \(acceptTimeoutMs) ms") }
                continue
            } catch {
                warn("refused a peer: \(error)")
                continue
            }
            do { try conn.handshake(initiator: false, config: cfg) } catch {
                conn.close()
                warn("refused a peer: \(error)")
                continue
            }
            options.checkRetransmitFloor(conn)
            do { return try receiveSeed(conn) } catch let e as PairError {
                warn("\(e)")
                try? conn.send(.error(.protocolViolation, "\(e)"))
                conn.close()
                // A primary that went away mid-seed is not a bad peer: keep waiting for one.
                if case .peerUnreachable = e { continue }
                throw e
            }
        }
    }

    /// How often a side waiting to be seeded again reads the pair record (an etcd fence: one request each).
    static let recordPollMs = 500

    /// Throws `pairEnded` when the pair record says the guest ended (an unreadable record: keep waiting).
    private func stopIfEnded(_ f: any Fencing) throws(PairError) {
        let text = PairRecord.read(f)
        guard let status = PairRecord.endedStatus(text) else { return }
        throw .pairEnded(status: status, "secondary: the pair record in \(f.location) says '\(text)': the guest ended (status \(status)) while this side waited to be seeded again; nothing left to follow")
    }

    /// The control socket's `peer HOST:PORT`: a survivor protecting itself seeks new secondaries there; a
    /// secondary started with `--peer` will, once live. One started without it never protects itself.
    public func changePeer(_ address: String) -> String {
        do { _ = try PairOptions.hostPort(address, option: "peer") } catch { return "refused: \(error)" }
        guard moveReprotectPeer(to: address) else { return "refused: this secondary was started without --peer: once live it runs the guest unprotected" }
        if let p = protectorForSignals.withLock({ $0 }) { return p.changePeer(address) }
        warn("the operator moved the peer address to \(address): once live, this side looks for its secondary there")
        return "ok: once live, this side looks for its secondary at \(address)"
    }

    /// Moves where this side, once live, seeks its secondary; false when it was started without `--peer` (it
    /// never protects itself). The caller checked the address.
    private func moveReprotectPeer(to address: String) -> Bool {
        reprotectAddress.withLock { a in
            guard a != nil else { return false }
            a = address
            return true
        }
    }

    /// SIGTERM: a survivor protecting itself hands its guest over and `run` returns instead of listening again.
    public func handOverToLeave(reply: @escaping @Sendable (HandoverOutcome) -> Void) {
        guard let p = protectorForSignals.withLock({ $0 }) else {
            reply(.refused("this side does not run the guest protected (a secondary, or a survivor with no secondary of its own)")); return
        }
        leaving.store(true, ordering: .releasing)
        p.requestHandover(reply: reply)
    }

    /// `migrate`: a survivor protecting itself moves its guest (see `PrimaryRunner.migrate`) and `run` returns
    /// instead of listening again.
    public func migrate(to address: String, withinMs: Int, reply: @escaping @Sendable (HandoverOutcome) -> Void) {
        guard let p = protectorForSignals.withLock({ $0 }) else {
            return reply(.refused("migration refused: this side does not run the guest with a secondary of its own (a secondary replaying, or a survivor started without --peer)"))
        }
        leaving.store(true, ordering: .releasing)
        p.migrate(to: address, withinMs: withinMs) { [self] outcome in
            // Not moved (and not handed over otherwise): a later handover keeps this side listening again.
            if !p.handedOver { leaving.store(false, ordering: .releasing) }
            reply(outcome)
        }
    }

    /// SIGTERM: a live side stops its guest (its protector, if any, ends the log to its secondary); a
    /// secondary replaying has no guest of its own to stop.
    public func stopGuest() -> Bool {
        if let p = protectorForSignals.withLock({ $0 }) { return p.stopGuest() }
        guard let s = liveSession.withLock({ $0 }) else { return false }
        s.requestStop()
        return true
    }

    /// Both sides must fence in one store, or nothing stops two live primaries: compares the store IDs.
    private func checkFence(_ header: SeedHeader) throws(PairError) {
        let mine = options.fence?.description ?? ""
        if fenceID == nil, let f = options.openFence() {
            do { fenceID = try f.storeID() } catch {
                throw .peerUnreachable("cannot read this side's fence ID in \(mine) (\(error)): a secondary that cannot reach its fence could never go live")
            }
        }
        let id = fenceID ?? ""
        guard header.fenceID != id else { return }
        func side(_ loc: String, _ id: String) -> String { id.isEmpty ? "no --fence" : "--fence \(loc) (store \(id.prefix(8))…)" }
        throw .config("the primary runs with \(side(header.fenceLocation, header.fenceID)) and this side with \(side(mine, id)): they must be one store both hosts reach, or nothing stops two live primaries; give both the same --fence")
    }

    /// A planned switchover (any thread): a survivor protecting itself hands its guest to its secondary; a
    /// secondary asks its primary to hand the guest over to this side.
    public func requestHandover(reply: (@Sendable (HandoverOutcome) -> Void)? = nil) {
        if let p = protectorForSignals.withLock({ $0 }) { p.requestHandover(reply: reply); return }
        let src = sourceForStatus.withLock { $0 }
        if let src, src.end == nil {
            warn("secondary: asking the primary to hand the guest over to this side")
            src.askForHandover { outcome in
                warn(outcome.message)
                reply?(outcome)
            }
            return
        }
        let why: String
        if case .goLive? = src?.end {
            why = "handover refused: this side runs the guest unprotected (a survivor needs --peer and a seeded secondary to hand it over)"
        } else {
            why = "handover refused: this side follows no primary now"
        }
        warn(why)
        reply?(.refused(why))
    }

    /// Fault injection for the state-digest test (`LOCKSTEP_FAULT_RAM_AT_EXIT`): once the replay passes this exit,
    /// this side's RAM goes wrong, once per process (the re-seeded machine that repairs it stays right).
    private static let ramFaultExit = Atomic<UInt64>(ProcessInfo.processInfo.environment["LOCKSTEP_FAULT_RAM_AT_EXIT"].flatMap { UInt64($0) } ?? .max)

    /// Replays one seeded stream. Returns the result when the guest ended; nil when this side must be seeded
    /// again (it diverged or could not read the log).
    private func follow(_ s: StandbySession, _ src: LiveLogSource) throws -> SessionResult? {
        session = s; source = src
        s.onGoLive = { [unowned self] reason in goLive(reason) }
        src.onAbandon = { [weak s] in s?.interruptReplay(nil) }
        src.start()
        let ticker = options.statusIntervalMs > 0 ? Ticker(ms: options.statusIntervalMs, name: "lockstep-status") { [self] in report() } : nil
        defer { ticker?.stop() }
        s.start()
        var ending: Ending = .stopped
        // Fault injection for the flow-control test: a replayer this many µs slower per exit.
        let delayUs = ProcessInfo.processInfo.environment["LOCKSTEP_FAULT_REPLAY_DELAY_US"].flatMap { UInt32($0) } ?? 0
        do {
            while true {
                if case .finished(let e) = try s.step() { ending = e; break }
                if let p = protector {
                    p.stepAdopted()
                    if p.handedOver { break }
                    continue
                }
                src.replayed.store(s.exit, ordering: .releasing)
                if !wentLive, src.abandoned.load(ordering: .acquiring) { break }
                if delayUs > 0, !wentLive { usleep(delayUs) }
                if s.exit >= Self.ramFaultExit.load(ordering: .relaxed), !wentLive {
                    Self.ramFaultExit.store(.max, ordering: .relaxed)
                    s.corruptRAMForTest()
                }
            }
        } catch {
            s.stop()
            // A replay that runs out of log because the stream ended is not a divergence of its own.
            if !wentLive, src.end == nil, case .divergence(let d) = error { src.reportDivergence(d.description) }
            src.shutdown(goodbye: nil)
            if !wentLive, try stoppedShort(src) { return nil }
            throw error
        }
        s.stop()
        if !wentLive, src.abandoned.load(ordering: .acquiring) {
            src.shutdown(goodbye: nil)
            _ = try stoppedShort(src)
            return nil
        }
        let r = try protector?.endRun(ending) ?? s.result(ending)
        if !wentLive {
            src.replayed.store(s.exit, ordering: .releasing)
            src.awaitEnd()
            src.shutdown(goodbye: "replay finished")
            if try stoppedShort(src) { return nil }
            guard case .trailer(let t)? = src.end else { throw PairError.badPeerData("replay ended without the primary's trailer") }
            guard t.finalExit == s.exit, t.stateDigest == r.digest else {
                throw MachineError.divergence(Divergence(exit: s.exit, expected: "the primary's end at exit \(t.finalExit), state \(StateDigest.hex(t.stateDigest))",
                                                         found: "exit \(s.exit), state \(r.digestHex)"))
            }
        }
        if wentLive { src.shutdown(goodbye: nil) }  // the receiver and heartbeat threads of the old stream
        backend?.close()
        if let path = options.statsJSON { reports.write(stats(exits: s.exit), to: path, option: "--stats-json") }
        return r
    }

    /// A stream that stopped short of the guest's end: an unusable fence or an orderly stop of the primary is
    /// the error this side ends with; a resync, or a fence held by a primary that lives or went on without this
    /// side (a partition, a false alarm), returns true: wait for a new seed. False: it did not stop short.
    private func stoppedShort(_ src: LiveLogSource) throws -> Bool {
        switch src.end {
        case .fenced(let why, let rejoin)?:
            guard rejoin else { throw PairError.fenced(why) }
            // The primary looks for a secondary while unprotected: it finds this one again when the link allows,
            // and seeds it by a delta against the RAM kept here. Leaving would need an operator to restart it.
            warn("secondary: \(why); waiting for the primary to seed this side again")
            return true
        case .primaryStopped(let why)?: throw PairError.primaryStopped(why)
        case .resync(let why)?:
            warn("secondary: cannot follow the primary (\(why.split(separator: "\n").first ?? "")); waiting for a new seed")
            return true
        case .released(let target)?:
            // The guest runs on at the target: its primary (given --peer here) seeds this side again, by a delta
            // against the RAM kept here. Should the target fail, its host is where this side, live, finds its own
            // secondary (the target's restart), no longer the host the guest left.
            let moved = target != reprotectPeer && (try? PairOptions.hostPort(target, option: "peer")) != nil && moveReprotectPeer(to: target)
            if moved { SupervisorReport.peer(target) }
            warn("secondary: the primary moved the guest to \(target) and let this side go; waiting for a primary to seed it again"
                 + (moved ? "; once live, this side looks for its secondary at \(target)" : ""))
            return true
        case .trailer?, .goLive?, nil: return false
        }
    }

    /// The next part of the seed (`.pages` also takes the end).
    private func part(_ want: SeedPart, from conn: Connection) throws -> [UInt8] {
        let m: Message
        do { m = try conn.receiveMessage(timeoutMs: 10_000) } catch { throw PairError.peerUnreachable("the primary's seed did not arrive: \(error)") }
        if case .goodbye(let why) = m { throw PairError.primaryStopped("the primary stopped before the seed was complete: \(why)") }
        guard case .bulk(let b) = m else { throw PairError.badPeerData("expected the seed (\(want)), got \(m)") }
        do { guard try SeedCodec.part(b) == want || want == .pages else { throw SeedError("expected \(want)") } } catch { throw PairError.badPeerData("\(error)") }
        return b
    }

    private func receiveSeed(_ conn: Connection) throws -> (StandbySession, LiveLogSource) {
        let header: SeedHeader
        do { header = try SeedCodec.decodeHeader(try part(.header, from: conn)) } catch let e as SeedError { throw PairError.badPeerData(e.description) }
        guard StateDigest.sha256(header.image) == header.imageSHA256 else { throw PairError.badPeerData("the seed's guest image does not match its SHA-256") }
        try checkFence(header)
        let cpuid: [UInt8]
        do { cpuid = try CPUIDTable.hostDigest() } catch { throw PairError.config("\(error)") }
        guard cpuid == header.cpuidSHA256 else {
            throw PairError.badPeerData("the primary's pinned CPUID table (sha256 \(StateDigest.hex(header.cpuidSHA256))) differs from this host's (\(StateDigest.hex(cpuid))): lockstep needs identical tables")
        }
        let image: PVHImage
        do { image = try PVHImage(bytes: header.image) } catch { throw PairError.badPeerData("the primary's guest image: \(error)") }
        // The last machine's RAM serves only the same guest (image and size); otherwise it goes before the new RAM comes.
        var kept = retained
        retained = nil
        if let k = kept, !k.fits(image: image, config: header.config) { kept = nil }
        let held = kept?.heldPages() ?? HeldPages()
        do { for b in SeedCodec.held(held) { try conn.send(.bulk(b)) } } catch {
            retained = kept
            throw PairError.peerUnreachable("cannot answer the primary's seed: \(error)")
        }
        warn("secondary: receiving a seed (\(header.config.memoryMiB) MiB guest, image \(header.image.count) bytes)"
             + (kept != nil ? "; keeping this side's RAM (\(held.count) non-zero pages): only pages that differ come" : ""))
        // The machine exists before the pages arrive: each chunk goes straight into its RAM.
        let output = SuppressedOutput()
        let s = try StandbySession(image: image, config: header.config, output: output, recordWhenLive: reprotectPeer != nil, adopting: kept)
        do { return try load(s, header: header, image: image, conn: conn, output: output, hashes: SeedHashes(machine: s.machine, held: kept.map { _ in held })) } catch {
            // Whatever the failed seed wrote is tracked: the RAM still serves the next one.
            retained = try? s.machine.retainRAM()
            throw error
        }
    }

    /// Writes a seed's pages into `s` as they arrive (hashing them into `hashes`), then loads its end and checks the seed digest.
    private func load(_ s: StandbySession, header: SeedHeader, image: PVHImage, conn: Connection, output: SuppressedOutput,
                      hashes: SeedHashes) throws -> (StandbySession, LiveLogSource) {
        var received = 0
        var end: SeedEnd
        while true {
            let b = try part(.pages, from: conn)
            do {
                switch try SeedCodec.part(b) {
                case .pages:
                    let (n, range) = try SeedCodec.decodePages(b)
                    // SAFETY: decodePages checked that `range` lies inside `b` and holds n.count pages.
                    do {
                        try b.withUnsafeBytes {
                            let data = UnsafeRawBufferPointer(rebasing: $0[range])
                            try s.machine.writeSeedPages(n, data: data)
                            hashes.wrote(n, data: data)
                        }
                    } catch { throw SeedError("\(error)") }
                    received += n.count
                    continue
                case .end: end = try SeedCodec.decodeEnd(b)
                case .header: throw SeedError("a second header")
                case .held: throw SeedError("a held part (the secondary's to send)")
                }
            } catch let e as SeedError { throw PairError.badPeerData(e.description) }
            break
        }
        guard end.totalPages == received else { throw PairError.badPeerData("the seed announced \(end.totalPages) pages and carried \(received)") }
        output.startLine(end.lineHead, seedExit: end.exit)
        let src = LiveLogSource(conn: conn, startExit: end.exit, firstSequence: end.firstSequence, protectionID: end.protectionID,
                                options: options, output: output)
        seedImage = image
        seedConfig = header.config
        try s.load(Snapshot(exit: end.exit, signature: end.signature, lastClock: end.lastClock, vcpuState: end.vcpuState,
                            deviceState: end.deviceState, halted: end.runState == .halted), source: src)
        let digest = try hashes.digest(s.machine)
        guard digest == end.seedDigest else {
            throw PairError.badPeerData("after loading the seed this side's state digest is \(StateDigest.hex(digest)), the primary's is \(StateDigest.hex(end.seedDigest)): the two hosts cannot run in lockstep")
        }
        // The seed is loaded: the primary may release output up to here.
        try conn.sendAck(Ack(heldExitIndex: end.exit, replayedExitIndex: end.exit))
        warn("secondary: seeded at exit \(end.exit) (\(received) pages sent; state \(StateDigest.hex(digest).prefix(16))…); replaying")
        SupervisorReport.seeded()
        if let dir = options.saveGuestDir {
            // After the ack: the primary's output does not wait for this host's disk.
            do { try SavedGuest.save(dir, image: header.image, config: header.config) } catch {
                warn("secondary: cannot save the guest (--save-guest): \(error); if both sides are lost, this host cannot boot it again")
            }
        }
        return (s, src)
    }

    /// vCPU thread, at the point the log stopped: the machine already samples live inputs.
    private func goLive(_ reason: String) {
        wentLive = true
        FileHandle.standardError.write(Data("live: \(reason)\n".utf8))
        source?.conn.close()
        // The primary's service address: bind it now (a killed primary's sockets are gone; retry briefly).
        var b: SerialBackend?
        let deadline = lk_monotonic_ns() + 2_000_000_000
        while b == nil {
            do { b = try SerialBackend(serial) } catch {
                if lk_monotonic_ns() > deadline { warn("cannot take over the service address \(serial): \(error); output is dropped"); break }
                usleep(5000)  // retry backoff: the old primary's socket is being torn down
            }
        }
        guard let b, let s = session, let src = source else { return }
        backend = b
        if let a = src.replyAddress.withLock({ $0 }) { b.adoptReplyAddress(a) }
        // This side is the only live one now: no earlier secondary of anyone may take over from it.
        PairRecord.write(src.fence, PairRecord.unprotected)
        liveWatch = watchFence(src.fence, options)
        var out: SerialOutput = b
        if let peer = reprotectPeer, let image = seedImage {
            let gate = OutputGate(backend: b)
            do {
                let p = try PrimaryRunner(adopting: s, image: image, config: seedConfig, gate: gate, peer: peer, options: options,
                                          fence: src.fence, fenceID: fenceID ?? "", watch: liveWatch)
                protector = p
                // Moved by the operator meanwhile: the protector looks there.
                if let moved = reprotectPeer, moved != peer { _ = p.changePeer(moved) }
                out = gate
                p.beginAdopted()
            } catch { warn("cannot protect the survivor: \(error); running unprotected") }
        }
        let resent = src.output.goLive(to: out)
        // Before the backend's own input: the primary's guest never read these, and they came first.
        s.machine.input.push(src.handedInput.withLock { $0 })
        b.startInput(into: s.machine.input)
        warn("secondary went live at exit \(s.exit) (\(resent) output bytes the primary may not have released are sent again)"
             + (protector != nil ? "; looking for a new secondary at \(reprotectPeer!)" : ""))
    }

    /// Any thread (the status ticker, the control socket).
    public func status() -> PairStatus {
        if let p = protectorForSignals.withLock({ $0 }) {
            var st = p.status()
            st.role = "survivor"
            return st
        }
        let source = sourceForStatus.withLock { $0 }
        let held = source?.heldExit.load(ordering: .acquiring) ?? 0
        let replayed = source?.replayed.load(ordering: .acquiring) ?? 0
        let bytes = source?.bytesReceived.load(ordering: .relaxed) ?? 0
        let state = wentLive ? "live" : source?.awaitingFence.load(ordering: .relaxed) == true ? "awaiting the fence" : "replaying"
        return PairStatus(role: "secondary", state: state, connected: !wentLive && source?.conn.isClosed == false,
                          protected: false, exit: replayed, heldExit: held, replayedExit: replayed,
                          lagExits: held > replayed ? held - replayed : 0, lagMicroseconds: 0, logBytes: bytes,
                          logBytesPerSecond: 0, heldOutputBytes: 0, throttledMs: 0, secondariesSeeded: 0,
                          linkRetransmits: wentLive ? 0 : UInt64(source?.conn.retransmittedSegments() ?? 0),
                          fenceConfirmedMsAgo: liveWatchForStatus.withLock { $0 }?.confirmedAgoMs())
    }

    func stats(exits: UInt64) -> SecondaryStats {
        SecondaryStats(role: wentLive ? "survivor" : "secondary", wentLive: wentLive,
                       logBytesReceived: source?.bytesReceived.load(ordering: .relaxed) ?? 0,
                       logBatchesReceived: source?.batchesReceived.load(ordering: .relaxed) ?? 0,
                       spinReceives: source?.conn.spinReads ?? 0, exits: exits,
                       secondariesSeeded: protector?.status().secondariesSeeded ?? 0,
                       elapsedSeconds: Double(lk_monotonic_ns() &- startNs) / 1e9, asPrimary: protector?.stats())
    }

    private func report() {
        let s = status()
        if let p = options.statusJSON { reports.write(s, to: p, option: "--status-json") }  // before the line: a reader of the line finds it current
        FileHandle.standardError.write(Data(("lockstep: " + s.line + "\n").utf8))
    }
}
