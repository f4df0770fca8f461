import CLockstep
import Channel
import EventLog
import Failover
import Foundation
import Machine
import Synchronization

/// `lockstep primary`: runs the guest, streams its log to a secondary, gates output on the secondary's acks,
/// and keeps running unprotected (looking for a new secondary) when it loses one.
///
/// Threads: the vCPU thread runs `run()` (guest, encoder, log sends, seeding); the link thread of the
/// current secondary (acks, heartbeats, releases); a connector thread while no secondary is attached;
/// the status ticker. The vCPU thread alone attaches and detaches secondaries, at step boundaries.
public final class PrimaryRunner: PairRole, @unchecked Sendable {
    let session: RecordingSession
    /// The session this runner created and drives (`lockstep primary`); nil when it protects a survivor's.
    let own: StreamRecordSession?
    let image: PVHImage
    let config: MachineConfig
    let gate: OutputGate
    let options: PairOptions
    /// Where the connector looks for a new secondary: `--peer`, until the operator moves it (`changePeer`).
    private let peerAddress: Mutex<(host: String, port: UInt16)>
    /// `HOST:PORT` of `peerAddress`, read once.
    public var peer: String { Self.text(peerAddress.withLock { $0 }) }
    private static func text(_ a: (host: String, port: UInt16)) -> String { a.host.contains(":") ? "[\(a.host)]:\(a.port)" : "\(a.host):\(a.port)" }
    let metrics = PairMetrics()
    private let reports = JSONReports()
    let fence: (any Fencing)?
    /// The fence store's ID (`Fencing.storeID`; "" without a fence), sent in each seed: a secondary whose
    /// `--fence` reaches another store refuses it.
    let fenceID: String
    /// Stops this process if the fence stops being its own (`FenceWatch`); shared with a survivor that adopted it.
    let watch: FenceWatch?
    private let fsm = Mutex(FailoverMachine.primary())
    private var link: SecondaryLink?
    /// A secondary being seeded while the guest runs (vCPU thread only).
    private var seeding: Precopy? { didSet { seedingNow.store(seeding != nil, ordering: .relaxed) } }
    /// `seeding != nil`, for the status thread.
    private let seedingNow = Atomic<Bool>(false)
    /// `link` for other threads (status); written only by the vCPU thread.
    private let current = Mutex<SecondaryLink?>(nil)
    /// A secondary the connector reached, and the peer address it was sought at.
    private let offered = Mutex<(conn: Connection, peer: String)?>(nil)
    private let hasOffer = Atomic<Bool>(false)
    private let connecting = Atomic<Bool>(false)
    /// The peer address the secondary being seeded, and the one attached, were sought at (vCPU thread).
    private var seedingFrom = ""
    private var linkFrom = ""
    /// An operator's migration (`migrate`): asked on any thread, carried out by the vCPU thread.
    private let migration = Mutex<Migration?>(nil)
    private let migrationWanted = Atomic<Bool>(false)
    /// Wakes the thread that bounds a migration (`Migration.deadlineNs`) when it ends sooner.
    private let migrationEnded = lk_eventfd()
    /// When the current secondary was attached, and how many in a row were lost (or failed their seed) within
    /// `shortLivedNs` of it (vCPU thread): the connector waits longer before each next try, so a secondary
    /// that keeps coming back only to fail (a pair record that cannot be written) is not re-seeded 10 times a second.
    private var attachedNs: UInt64 = 0
    private var shortLived = 0
    private static let shortLivedNs: UInt64 = 2_000_000_000
    private let finished = Atomic<Bool>(false)
    /// An operator asked for a planned switchover (`requestHandover`, any thread).
    private let handoverWanted = Atomic<Bool>(false)
    /// Who waits for the handover's outcome (the control socket, a secondary that asked); closed once the run ended.
    private let handoverReplies = HandoverReplies()
    /// The secondary took the guest over: the run ends without a trailer (vCPU thread).
    public private(set) var handedOver = false
    private var lastFlushNs: UInt64 = 0
    /// Reused buffer for one batch (no allocation per flush in steady state).
    private var batch: [UInt8] = []
    private var sentWatermark: UInt64 = 0
    /// When the records waiting in the encoder began to wait (0: none wait); a batch's replication lag starts there.
    private var firstAppendNs: UInt64 = 0
    private var seeded = 0
    /// The guest started with a confirmed secondary (`PairStats.startedProtected`).
    private var startedProtected = false
    private var totalBytes: UInt64 = 0
    /// TCP retransmissions of the links dropped so far (`PairStats.linkRetransmits`).
    private var droppedLinkRetransmits: UInt64 = 0
    private var totalBatches: UInt64 = 0
    private var firstSequence: UInt32 = 0
    /// Records wait at most this long for company: lower means less replay lag, more sends (each wakes the secondary).
    static let batchIntervalNs: UInt64 = 50_000
    /// A bare watermark (no records) at most this often when no output waits for it.
    static let watermarkIntervalNs: UInt64 = 1_000_000
    /// Fault injection for the short-log handover test (`LOCKSTEP_FAULT_HANDOVER_EXIT_AHEAD`): the handover
    /// names an exit this far past the real one, as if log the secondary never got were missing.
    static let handoverExitAhead = ProcessInfo.processInfo.environment["LOCKSTEP_FAULT_HANDOVER_EXIT_AHEAD"].flatMap { UInt64($0) } ?? 0
    /// Fault injection (`LOCKSTEP_FAULT_DIE_BEFORE_REPORT`): the process is killed once the pair record names its
    /// first secondary, before it tells its supervisor it is protected.
    static let dieBeforeReport = ProcessInfo.processInfo.environment["LOCKSTEP_FAULT_DIE_BEFORE_REPORT"] != nil
    /// Fault injection for the handed-input test (`LOCKSTEP_FAULT_HANDOVER_PAUSE_MS`): the handover waits this
    /// long with the guest stopped, before the fence passes, as a slow fence store would make it.
    static let handoverPauseMs = ProcessInfo.processInfo.environment["LOCKSTEP_FAULT_HANDOVER_PAUSE_MS"].flatMap { UInt32($0) } ?? 0
    /// At most this much unread serial input is passed on with a handover (it travels in one status frame).
    static let maxHandedInput = 60_000

    public init(image: PVHImage, config: MachineConfig, backend: SerialOutput, peer: String, options: PairOptions) throws(PairError) {
        peerAddress = Mutex(try PairOptions.hostPort(peer, option: "--peer"))
        self.image = image; self.config = config; self.options = options
        fence = try takeFence(options)
        if fence == nil { warn("no --fence: nothing stops two live primaries after a partition") }
        if options.coldRestart { try Self.checkColdRestart(fence) }
        do { fenceID = try fence?.storeID() ?? "" } catch {
            try? fence?.release()
            throw .config("--fence \(fence?.location ?? ""): cannot read or make the fence's ID: \(error)")
        }
        watch = watchFence(fence, options)
        PairRecord.write(fence, PairRecord.unprotected)
        gate = OutputGate(backend: backend)
        let s: StreamRecordSession
        do { s = try StreamRecordSession(image: image, config: config, output: gate) } catch { throw .config("\(error)") }
        session = s
        own = s
        if let v = ProcessInfo.processInfo.environment["LOCKSTEP_FAULT_SIGNATURE_AT_EXIT"], let n = UInt64(v) {
            warn("fault injection: the log lies about the signature of the first event at exit \(n) or later")
            session.machine.hooks.faultAtExit = n
        }
    }

    deinit { close(migrationEnded) }

    /// A cold restart reads the pair record once it holds the fence, so no live side can write it meanwhile: a
    /// guest that ended is not booted again (this process ends with its status instead).
    private static func checkColdRestart(_ fence: (any Fencing)?) throws(PairError) {
        guard let fence else { throw .config("--cold-restart needs --fence: the pair record says whether the guest ended") }
        let text = PairRecord.read(fence)
        if let status = PairRecord.endedStatus(text) {
            try? fence.release()
            throw .pairEnded(status: status, "cold restart: the pair record in \(fence.location) says '\(text)': the guest ended with \(status); not booting it again")
        }
        warn("cold restart: this side took the fence in \(fence.location) and the pair record says '\(text)': nobody runs the guest, so it boots again (its clients see it restart)")
    }

    /// Protects a running machine that is already live and holds the fence (a secondary that went live):
    /// unprotected until the connector finds a new secondary at `peer`. `gate` must already be its output.
    init(adopting session: RecordingSession, image: PVHImage, config: MachineConfig, gate: OutputGate, peer: String,
         options: PairOptions, fence: (any Fencing)?, fenceID: String, watch: FenceWatch?) throws(PairError) {
        peerAddress = Mutex(try PairOptions.hostPort(peer, option: "--peer"))
        self.image = image; self.config = config; self.options = options; self.fence = fence; self.watch = watch
        self.fenceID = fenceID
        self.gate = gate
        self.session = session
        own = nil
    }

    public var machine: Machine { session.machine }

    /// A survivor's protection starts: it is live and unprotected; look for a new secondary.
    func beginAdopted() {
        unprotectedSinceNs = lk_monotonic_ns()
        PairRecord.write(fence, PairRecord.unprotected)
        session.machine.onIdle = { [unowned self] in flushLog(force: true, idle: true) }
        session.machine.beforeEntry = { [unowned self] in flushLog(force: false) }
        startConnector()
    }

    @inline(__always) func stepAdopted() { afterStep() }

    /// The guest ended: close the log to the secondary (if any) and release everything. After a handover
    /// the log has no end: the secondary runs the guest on, and the pair record is its to write.
    func endRun(_ ending: Ending) throws(MachineError) -> SessionResult {
        metrics.guestEnded()
        answerHandovers(.refused("handover refused: the guest ended first"))
        // A migration that handed the guest over was answered already.
        endMigration(.refused("migration refused: the guest's run here ended (\(ending.endReason))"))
        dropSeeding("the guest ended before this secondary was seeded")
        if !handedOver { releaseFinalOutput() }
        let (result, trailer) = try session.finish(ending)
        if handedOver { detachTakenOver() } else { finishLog(trailer, status: ending.processStatus); endFence() }
        finished.store(true, ordering: .releasing)
        dropOffer()
        return result
    }

    var state: FailoverState { fsm.withLock { $0.state } }

    /// The guest ended and the record says so (no secondary may take over): the fence is free from now, not
    /// when this process exits (an etcd lease would hold it for its TTL and refuse the next primary meanwhile).
    private func endFence() {
        watch?.stop()
        try? fence?.release()
    }

    /// Connects the first secondary (bounded by `connectTimeoutMs`), then runs the guest to its end. With
    /// `startUnprotected` and no secondary by then (or a timeout of 0: at once), the guest runs unprotected
    /// while the connector looks on.
    public func run() throws -> SessionResult {
        guard let own else { throw PairError.config("run() drives its own session only") }
        defer { watch?.stop() }
        let conn: Connection?
        if options.startUnprotected && options.connectTimeoutMs == 0 {
            // No wait at all (a cold restart: the guest is down until it boots); the connector seeds a secondary
            // from the running guest as soon as one answers.
            warn("running the guest unprotected from its start; looking for a secondary at \(self.peer)")
            conn = nil
        } else {
            do { conn = try connectInitial() } catch PairError.peerUnreachable(let why) where options.startUnprotected {
                warn("no secondary within --connect-timeout-ms \(options.connectTimeoutMs) (\(why)): running the guest unprotected; looking for one at \(self.peer)")
                conn = nil
            }
        }
        if let conn {
            // Before the guest runs there is nothing to overlap: the rounds run here.
            do {
                let first = seed(conn, from: peer)
                try first.copyHere()
                try attach(first)
                // Nor is there a run for the secondary's load and check to overlap: the guest starts once the
                // secondary holds its seed, so it is protected from its first instruction, and its first
                // batches do not wait in the socket behind that load (1-7 ms here, the start's replication lag).
                link?.awaitConfirmation(until: lk_monotonic_ns() + SecondaryLink.seedTimeoutNs + options.failureNs)
            } catch where options.startUnprotected {
                // The guest need not wait on a secondary that refused (another fence store, a bad guest copy):
                // it runs as if none had answered, and the connector tries again, backing off.
                conn.close()
                warn("could not seed the secondary at \(self.peer): \(error); running the guest unprotected; looking for one at \(self.peer)")
                shortLived += 1
                startConnector()
            }
        } else {
            startConnector()
        }
        session.machine.onIdle = { [unowned self] in flushLog(force: true, idle: true) }
        session.machine.beforeEntry = { [unowned self] in flushLog(force: false) }
        let ticker = options.statusIntervalMs > 0 ? Ticker(ms: options.statusIntervalMs, name: "lockstep-status") { [self] in report() } : nil
        if link == nil { unprotectedSinceNs = lk_monotonic_ns() }
        startedProtected = link?.isConfirmed ?? false
        own.start()
        var ending: Ending = .stopped
        do {
            while true {
                if case .finished(let e) = try own.step() { ending = e; break }
                afterStep()
                if handedOver { break }
            }
        } catch {
            own.stop()
            ticker?.stop()
            answerHandovers(.refused("handover refused: the primary failed: \(error)"))
            endMigration(.refused("migration refused: the primary failed: \(error)"))
            dropSeeding("primary failed: \(error)")
            detach(goodbye: "primary failed: \(error)")
            throw error
        }
        own.stop()
        let result = try endRun(ending)
        ticker?.stop()
        report()
        if let path = options.statsJSON { reports.write(stats(), to: path, option: "--stats-json") }
        return result
    }

    /// The guest has ended, so its log is complete: a watermark past the last exit lets the secondary ack
    /// (and the gate release) the last output now, not after the final state digest (a pass over all RAM).
    private func releaseFinalOutput() {
        guard let l = link, !l.lost.load(ordering: .acquiring) else { return }
        send(l, watermark: session.exit &+ 1)
    }

    /// A secondary that connected but was never seeded is told why it is dropped.
    private func dropOffer() {
        if let c = offered.withLock({ o -> Connection? in defer { o = nil }; return o?.conn }) {
            try? c.send(.goodbye("the guest ended before this secondary was seeded"))
            c.close()
        }
    }

    // MARK: vCPU thread

    /// After each step: attach an offered secondary, drop a lost one, push the log, and slow down if the
    /// secondary's replay is too far behind.
    @inline(__always) private func afterStep() {
        if handoverWanted.load(ordering: .relaxed) { handOver(); if handedOver { return } }
        if migrationWanted.load(ordering: .relaxed) { migrateStep(); if handedOver { return } }
        if hasOffer.load(ordering: .relaxed) { adoptOffer() }
        if let p = seeding { seedStep(p) }
        guard let l = link else {
            // Unprotected: nobody needs the records (a new secondary gets a seed).
            if session.encoder.bufferedBytes > 0 { session.encoder.sealFrame { _ in } }
            return
        }
        if l.lost.load(ordering: .relaxed) { detachLost(l); return }
        // No flush here: the next step flushes, just before the guest re-enters (`beforeEntry`, with the
        // injection that entry brings, so a kick's sync point and its interrupt leave as one batch) or before
        // a halted guest sleeps (`onIdle`).
        let now = lk_monotonic_ns()
        // What waits for the next entry goes first: the secondary replays toward it while the guest waits.
        if l.mustSlowDown(now: now) { flushLog(force: true); throttle(l, since: now) }
    }

    // MARK: the operator

    /// The control socket's `peer HOST:PORT` (any thread): new secondaries are sought there from now on, as
    /// when a host is lost for good and a third takes its place. A secondary protecting the guest now stays
    /// until it is lost (or leaves: SIGTERM to it); the connector, if looking, tries the new address next.
    public func changePeer(_ address: String) -> String {
        let next: (host: String, port: UInt16)
        do { next = try PairOptions.hostPort(address, option: "peer") } catch { return "refused: \(error)" }
        if let m = migration.withLock({ $0?.target }) { return "refused: a migration to \(m) is under way: it decides the peer address" }
        let old = peer
        peerAddress.withLock { $0 = next }
        warn("the operator moved the peer address from \(old) to \(peer)")
        let l = current.withLock { $0 }
        if let l, !l.lost.load(ordering: .acquiring) {
            return "ok: new secondaries are sought at \(peer); the secondary that protects the guest now stays until it is lost"
        }
        return "ok: looking for a secondary at \(peer)"
    }

    // MARK: migration

    /// A migration under way: where to, until when, and who waits for its outcome.
    private struct Migration {
        var target: String
        var startNs: UInt64
        /// The peer address before it, restored if the migration fails with the secondary there still attached.
        var previous: (host: String, port: UInt16)
        var deadlineNs: UInt64
        var reply: @Sendable (HandoverOutcome) -> Void
        /// The target answered (vCPU thread), and why its last seed failed, if it did.
        var answered = false
        var problem: String?
    }
    /// When the guest stopped for a migration's switch (0: none; vCPU thread).
    private var switchNs: UInt64 = 0
    /// Since when the running guest has had no secondary (0: it has one, or it has not run yet; vCPU thread).
    private var unprotectedSinceNs: UInt64 = 0

    /// The control socket's `migrate HOST:PORT` (any thread): moves the guest to the secondary listening there.
    /// The connector reaches it; it is seeded by pre-copy while the guest runs, protected meanwhile by the
    /// secondary it has (if any); then the guest stops until the target holds its state (`switchTo`), the old
    /// secondary is let go (a `migrated` message: it waits for a new seed, never live), and the guest is handed to the target as
    /// by `handover`; this side's run ends. `reply` gets the outcome: handed over, or why not within `withinMs`
    /// (the guest then runs on here, protected as before).
    public func migrate(to address: String, withinMs: Int, reply: @escaping @Sendable (HandoverOutcome) -> Void) {
        let target: (host: String, port: UInt16)
        do { target = try PairOptions.hostPort(address, option: "migrate") } catch { return reply(.refused("migration refused: \(error)")) }
        guard !finished.load(ordering: .acquiring) else { return reply(.refused("migration refused: the guest's run has ended")) }
        let now = lk_monotonic_ns(), deadline = now + UInt64(max(withinMs, 1)) * 1_000_000
        let previous = peerAddress.withLock { p -> (host: String, port: UInt16)? in
            guard migration.withLock({ m in
                guard m == nil else { return false }
                m = Migration(target: Self.text(target), startNs: now, previous: p, deadlineNs: deadline, reply: reply)
                return true
            }) else { return nil }
            defer { p = target }
            return p
        }
        guard let previous else { return reply(.refused("migration refused: one is under way already")) }
        warn("the operator migrates the guest to \(Self.text(target)) (from a secondary sought at \(Self.text(previous))); looking for it there")
        migrationWanted.store(true, ordering: .releasing)
        var stale: UInt64 = 0
        _ = read(migrationEnded, &stale, 8)  // an earlier migration's end, signalled after its bound ran out
        startThread("lockstep-migrate") { [self] in
            // The bound holds while a halted guest's vCPU thread sleeps: wake it at the deadline.
            if lk_eventfd_wait(migrationEnded, deadline) == 0 { session.machine.pacer?.raise(.boundary) }
        }
        session.machine.pacer?.raise(.boundary)
    }

    /// vCPU thread, between two steps: the connector seeks the target (also while protected, for a migration);
    /// `adoptOffer` lets the old secondary go and seeds the target; once the target's seed is confirmed, hand over.
    private func migrateStep() {
        guard let m = migration.withLock({ $0 }) else { migrationWanted.store(false, ordering: .relaxed); return }
        if let l = link, linkFrom == m.target, state == .primaryProtected, !l.lost.load(ordering: .acquiring) {
            let outcome = attemptHandover()
            let stopped = switchNs == 0 ? "" : String(format: "; the guest was stopped %.1f ms for the move", Double(lk_monotonic_ns() &- switchNs) / 1e6)
            switchNs = 0
            switch outcome {
            case .handedOver(let why): endMigration(.handedOver("migrated to \(m.target): \(why)\(stopped)"))
            case .refused(let why): endMigration(.failed("migration failed: \(why); the guest runs on here, protected by \(m.target)"))
            case .failed(let why): endMigration(.failed("migration failed: \(why)"))
            }
            return
        }
        // Seek the target unless it answered already (an offer waits, its seed runs, or it is attached).
        if seeding == nil, !hasOffer.load(ordering: .acquiring), link == nil || linkFrom != m.target { startConnector() }
        guard lk_monotonic_ns() >= m.deadlineNs else { return }
        let within = "within \((m.deadlineNs &- m.startNs) / 1_000_000) ms"
        if let l = link, !l.lost.load(ordering: .acquiring), linkFrom != m.target {
            // Nothing was let go: the secondary that protects the guest stays, and so does its address.
            dropSeeding("the migration to \(m.target) ran out of time")
            peerAddress.withLock { $0 = m.previous }
            let what = m.answered ? "the secondary at \(m.target) answered but was not seeded \(within) (\(m.problem ?? "its seed was still running"))"
                : "no secondary answered at \(m.target) \(within)"
            endMigration(.failed("migration failed: \(what); the guest runs on here, still protected by the secondary at \(Self.text(m.previous))"))
            return
        }
        SupervisorReport.peer(m.target)  // the address stays moved: a supervisor's restarts take it, as an operator's `peer`
        if let l = link, !l.lost.load(ordering: .acquiring) {
            endMigration(.failed("migration failed: the secondary at \(m.target) did not confirm its seed \(within); the guest runs on here, protected by it once it does"))
            return
        }
        let seedRan = seeding != nil
        dropSeeding("the migration to \(m.target) ran out of time")
        endMigration(.failed("migration failed: the secondary at \(m.target) \(seedRan ? "was not seeded" : "was not reached") \(within); the guest runs on here, unprotected, looking for a secondary at \(m.target)"))
        startConnector()
    }

    /// Says and answers a migration's outcome (none under way: nothing to do).
    private func endMigration(_ outcome: HandoverOutcome) {
        guard let m = migration.withLock({ m -> Migration? in defer { m = nil }; return m }) else { return }
        migrationWanted.store(false, ordering: .releasing)
        lk_eventfd_signal(migrationEnded)
        warn(outcome.message)
        m.reply(outcome)
    }

    // MARK: planned switchover

    /// Asks for a planned switchover (any thread; SIGUSR2 or the control socket): at its next step boundary
    /// the primary hands the guest to its secondary, or says why it cannot. `reply` gets the outcome.
    public func requestHandover(reply: (@Sendable (HandoverOutcome) -> Void)? = nil) {
        guard handoverReplies.add(reply) else { reply?(.refused("handover refused: the guest's run has ended")); return }
        handoverWanted.store(true, ordering: .releasing)
        session.machine.pacer?.raise(.boundary)
    }

    public func handOverToLeave(reply: @escaping @Sendable (HandoverOutcome) -> Void) { requestHandover(reply: reply) }

    public func stopGuest() -> Bool {
        guard !finished.load(ordering: .acquiring) else { return false }
        session.machine.pacer?.requestStop()
        return true
    }

    /// Answers everyone waiting for a handover; after the run's end, answers come at once.
    private func answerHandovers(_ outcome: HandoverOutcome, closing: Bool = true) { handoverReplies.answer(outcome, closing: closing) }

    /// vCPU thread, guest stopped between two steps: one handover attempt, its outcome said and answered.
    private func handOver() {
        handoverWanted.store(false, ordering: .relaxed)
        let outcome = attemptHandover()
        if case .failed = outcome {} else { warn(outcome.message) }  // a failure was said by the failover machine
        answerHandovers(outcome, closing: handedOver)
    }

    /// The secondary gets the log through this exit and acks it (so all output is released), then this side
    /// gives up the fence and sends `handover`. The fence decides: a new holder means the secondary took over
    /// (this run ends); none in time, and this side takes it back and goes on unprotected (the secondary,
    /// denied the fence, stops).
    private func attemptHandover() -> HandoverOutcome {
        guard state == .primaryProtected else {
            return .refused(fsm.withLock { $0.handle(.handoverRequested) }.warnings.first ?? "handover refused: this primary is not protected")
        }
        guard let l = link, !l.lost.load(ordering: .acquiring) else { return .refused("handover refused: the secondary's link is down") }
        flushLog(force: true)
        let exit = session.exit
        guard awaitRelease(l, through: exit) else {
            return .refused("handover refused: the secondary did not acknowledge the log through exit \(exit)")
        }
        guard fsm.withLock({ $0.handle(.handoverRequested) }).contains(.handOver) else { return .refused("handover refused by the failover machine") }
        let generation = fence?.token?.generation ?? 0
        if Self.handoverPauseMs > 0 {
            warn("fault injection: the handover waits \(Self.handoverPauseMs) ms with the guest stopped")
            usleep(Self.handoverPauseMs * 1000)
        }
        l.beginHandover()
        watch?.suspend()
        try? fence?.release()
        let t0 = lk_monotonic_ns()
        // Input queued while the guest stood still was never read, so no record holds it: the survivor's guest reads it.
        let unread = session.machine.input.takeAll()
        let passed = Array(unread.prefix(Self.maxHandedInput))
        var frames = [PairMessage.released.status(gate.releasedWatermark)]  // or the secondary would send the last line again
        // Whom the service answers: a secondary attached moments ago (a migration's target) may not have it yet,
        // and a survivor that does not know the client drops its first reply.
        if let a = (gate.backend as? SerialBackend)?.replyAddress { frames.append(PairMessage.replyAddress.status(bytes: a)) }
        if !passed.isEmpty { frames.append(PairMessage.input.status(bytes: passed)) }
        frames.append(PairMessage.handover.status(exit + Self.handoverExitAhead))
        do { try l.conn.send(frames) } catch { warn("handover: cannot tell the secondary: \(error)") }
        // The secondary takes the fence within its fence wait; allow that and a failure timeout.
        let until = t0 + UInt64(options.fenceWaitMs) * 1_000_000 + options.failureNs + 1_000_000_000
        var taken = false
        while !taken, lk_monotonic_ns() < until {
            // A secondary that said it cannot follow the log never takes over. Without a fence, the link's
            // close is the only other sign.
            if l.refused.load(ordering: .acquiring) { break }
            if let f = fence { taken = (f.readHolder()?.generation ?? 0) > generation } else { taken = l.lost.load(ordering: .acquiring) }
            if !taken { usleep(1000) }  // poll the fence file
        }
        // Not taken in time: take the fence back. Held by someone else by now (or unusable), this side must stop.
        if !taken, let f = fence {
            let back = (try? f.tryAcquire(identity: .current())) ?? nil
            taken = back == nil
            if let back { watch?.resume(back) }
        }
        if taken {
            _ = fsm.withLock { $0.handle(.peerTookOver) }
            handedOver = true
            if unread.count > passed.count { warn("handover: \(unread.count - passed.count) bytes of serial input beyond \(Self.maxHandedInput) were not passed on") }
            // The survivor binds the service address now: free it before this side's digest and exit. A line
            // the guest had begun goes out whole from the survivor, so its start is not sent from here.
            (gate.backend as? SerialBackend)?.close(sendingPartialLine: false)
            return .handedOver("handed over to the secondary at exit \(exit) (fence taken \(String(format: "%.1f", Double(lk_monotonic_ns() &- t0) / 1e6)) ms after the handover was sent); this side's run of the guest ends")
        }
        // This side holds the fence again: the secondary never went live, and it is denied from here on.
        session.machine.input.putBack(unread)
        l.endHandover()
        dropLink(l, losing: "it did not take the fence when handed the guest")
        let actions = fsm.withLock { $0.handle(.fenceAcquired(generation: fence?.token?.generation ?? 0)) }
        carryOut(actions)
        if l.refused.load(ordering: .acquiring) { return .failed("handover failed: \(l.reason); continuing unprotected") }
        return .failed(actions.warnings.first ?? "handover failed; continuing unprotected")
    }

    /// With the guest stopped at `exit` and its log sent: waits (bounded) until `l`'s acks released all output
    /// through it, that is, until `l` holds the whole log. The link thread stores the ack, then releases the
    /// gate: this waits for the release itself.
    private func awaitRelease(_ l: SecondaryLink, through exit: UInt64) -> Bool {
        let ackBy = lk_monotonic_ns() + max(options.failureNs, 1_000_000_000)
        while gate.releasedWatermark <= exit, !l.lost.load(ordering: .acquiring), lk_monotonic_ns() < ackBy {
            _ = lk_eventfd_wait(l.ackEvent, min(ackBy, lk_monotonic_ns() + 1_000_000))
        }
        return gate.releasedWatermark > exit && !l.lost.load(ordering: .acquiring)
    }

    /// After a handover: the link is the secondary's to close; only the threads are left to end.
    private func detachTakenOver() {
        finished.store(true, ordering: .releasing)
        if let l = link { dropLink(l, losing: "the secondary took the guest over") }
    }

    /// Sends buffered records, or a bare watermark when none wait: output exits write no records, and held
    /// output (or a secondary waiting for records at an exit the primary has passed) needs the watermark to move.
    /// `idle`: the guest halted. Its records leave at once; a bare watermark only if output is held, since exits
    /// without records or output replay no faster from the log than they run live after a go-live.
    private func flushLog(force: Bool, idle: Bool = false) {
        guard let l = link else { return }
        let exit = session.exit
        let now = lk_monotonic_ns()
        let outputWaits = gate.lineWaits
        if session.encoder.bufferedBytes > 0 {
            // The step that appended them just ended: the records' append time, to within the step's bookkeeping.
            if firstAppendNs == 0 { firstAppendNs = now }
            guard force || session.encoder.shouldFlush || outputWaits || now &- lastFlushNs >= Self.batchIntervalNs else { return }
        } else {
            let forced = force && (!idle || gate.heldBytes > 0)
            guard exit > sentWatermark, outputWaits || forced || now &- lastFlushNs >= Self.watermarkIntervalNs else { return }
        }
        lastFlushNs = now
        send(l, watermark: exit)
    }

    /// Sends everything buffered as ONE batch: its watermark holds only once all its frames are there (a
    /// watermark on the first of several frames would let the secondary replay past a sync point in a later one).
    private func send(_ l: SecondaryLink, watermark: UInt64) {
        batch.removeAll(keepingCapacity: true)
        session.encoder.sealFrame { (b: UnsafeRawBufferPointer) in batch.append(contentsOf: b) }
        batch.withUnsafeBytes { _ = l.send(watermark: watermark, bytes: $0, appendedNs: firstAppendNs) }
        firstAppendNs = 0
        sentWatermark = watermark
        if batch.capacity > 4 << 20 { batch = [] }  // a large sync point passed: give the memory back
    }

    /// Waits for the secondary's replay to catch up. A replay that does not move for `replayStallMs` is stuck (a
    /// guest loop the log cannot explain): the secondary is dropped and re-seeded, so it cannot stall the primary.
    private func throttle(_ l: SecondaryLink, since start: UInt64) {
        let stallNs = options.replayStallMs * 1_000_000
        var lastReplayed = l.replayed.load(ordering: .acquiring)
        var movedAt = start
        while l.mustSlowDown(now: lk_monotonic_ns()) {
            _ = lk_eventfd_wait(l.ackEvent, lk_monotonic_ns() + 10_000_000)
            let r = l.replayed.load(ordering: .acquiring), now = lk_monotonic_ns()
            if r != lastReplayed { lastReplayed = r; movedAt = now }
            if now &- movedAt > stallNs {
                l.lose("the secondary's replay has not moved from exit \(r) for \((now &- movedAt) / 1_000_000) ms")
                break
            }
        }
        metrics.throttled(lk_monotonic_ns() &- start)
    }

    private func detachLost(_ l: SecondaryLink) {
        let actions = fsm.withLock { $0.handle(.channelError(l.reason)) }
        dropLink(l)
        carryOut(actions)
    }

    private func detach(goodbye: String) {
        guard let l = link else { return }
        try? l.conn.send(.goodbye(goodbye))
        dropLink(l, losing: goodbye)
    }

    /// Ends `l`'s link thread (after losing it for `why`, when given) and forgets it; its bytes stay in the totals.
    private func dropLink(_ l: SecondaryLink, losing why: String? = nil) {
        totalBytes &+= l.bytesSent; totalBatches &+= l.batchCount
        droppedLinkRetransmits &+= UInt64(l.conn.retransmittedSegments() ?? 0)
        if let why { l.lose(why) }
        l.join()
        guard link === l else { return }  // a migration's old secondary, let go after the target took its place
        link = nil
        unprotectedSinceNs = lk_monotonic_ns()
        current.withLock { $0 = nil }
    }

    /// The failover machine's actions for a primary left without its secondary (held output was released
    /// when the link was lost).
    private func carryOut(_ actions: [FailoverAction]) {
        for a in actions {
            switch a {
            case .logWarning(let s): warn(s)
            case .acceptNewSecondary:
                shortLived = lk_monotonic_ns() &- attachedNs < Self.shortLivedNs ? shortLived + 1 : 0
                startConnector()
            default: break
            }
        }
    }

    /// Starts seeding a connected secondary (see `Precopy`), sought at the peer address `from`.
    private func seed(_ conn: Connection, from: String) -> Precopy {
        seedingFrom = from
        let header = SeedHeader(config: config, imageSHA256: StateDigest.sha256(image.bytes), cpuidSHA256: session.machine.cpuidDigest, image: image.bytes,
                                fenceID: fenceID, fenceLocation: fence?.location ?? "")
        return Precopy(conn: conn, machine: session.machine, header: header)
    }

    /// Between two steps while a seed's rounds run: once they are done, pause and finish it; a peer that
    /// stopped taking the seed is dropped.
    private func seedStep(_ p: Precopy) {
        var state = p.state
        if state == .copying {
            let now = lk_monotonic_ns()
            guard now &- p.progressNs.load(ordering: .acquiring) > SecondaryLink.seedTimeoutNs else { p.throttleGuest(now: now); return }
            p.cancel("the secondary took no seed data for \(SecondaryLink.seedTimeoutNs / 1_000_000_000) s")
            state = .failed
        }
        seeding = nil
        do {
            guard state == .ready else { throw PairError.peerUnreachable(p.reason) }
            if let old = link, migrationWanted.load(ordering: .acquiring) {
                try switchTo(p, from: old)
                migrateStep()  // hand over now: the guest stays stopped from the switch to the target's take-over
            } else {
                try attach(p)
            }
        } catch {
            p.conn.close()
            let why = (error as? SwitchAbandoned)?.why ?? "\(error)"
            migration.withLock { $0?.problem = why }
            if !(error is SwitchAbandoned) {  // an abandoned switch said so already
                warn("could not seed the new secondary: \(why); " + (link.map { _ in "the secondary at \(linkFrom) protects the guest on" } ?? "continuing unprotected"))
            }
            shortLived += 1
            startConnector()
        }
    }

    /// A migration's target finished its rounds while the secondary `old` protects the guest. The guest stops
    /// here until the target holds its state, so that one of the two can always take it over: `old` acks the
    /// whole log, the target gets the final seed and confirms it, and only then is `old` let go (`migrated`: it
    /// waits for a new seed, never live). Both links are parked meanwhile (nothing is held; see `SecondaryLink.park`).
    /// The target failing leaves `old` protecting the guest, which runs on; the connector tries the target again.
    private func switchTo(_ p: Precopy, from old: SecondaryLink) throws {
        let t0 = lk_monotonic_ns(), oldFrom = linkFrom
        flushLog(force: true)
        let exit = session.exit
        guard awaitRelease(old, through: exit) else {
            if old.lost.load(ordering: .acquiring) {
                // Lost first: the target alone protects the guest from its seed on (nothing else is sought).
                let actions = fsm.withLock { $0.handle(.channelError(old.reason)) }
                dropLink(old)
                actions.warnings.forEach { warn($0) }
                try attach(p)
                return
            }
            throw PairError.peerUnreachable("the secondary at \(oldFrom) did not acknowledge the log through exit \(exit)")
        }
        old.park()
        _ = fsm.withLock { $0.handle(.migrationSwitch) }
        let target: SecondaryLink
        do {
            try attach(p, parked: true)
            guard let l = link, l !== old else { throw PairError.peerUnreachable("the target was not attached") }
            target = l
        } catch {
            abandonSwitch(nil, old: old, oldFrom: oldFrom, why: "\(error)")
            throw SwitchAbandoned(why: "\(error)")
        }
        // Confirmed: the failover machine leaves `primaryMigrating` (the link thread's record write does it).
        let deadline = migration.withLock { $0?.deadlineNs } ?? (t0 + SecondaryLink.seedTimeoutNs)
        while state == .primaryMigrating, !target.lost.load(ordering: .acquiring), lk_monotonic_ns() < deadline {
            _ = lk_eventfd_wait(target.ackEvent, min(deadline, lk_monotonic_ns() + 1_000_000))
        }
        guard state == .primaryProtected, target.unpark(rename: false) else {
            let why = target.lost.load(ordering: .acquiring) ? target.reason : "it did not confirm its seed in time"
            abandonSwitch(target, old: old, oldFrom: oldFrom, why: "the secondary at \(linkFrom): \(why)")
            throw SwitchAbandoned(why: why)
        }
        try? old.conn.send(PairMessage.migrated.status(bytes: linkFrom.utf8))
        dropLink(old, losing: "let go: the guest migrates to \(linkFrom)")
        switchNs = t0
        let ms = String(format: "%.1f", Double(lk_monotonic_ns() &- t0) / 1e6)
        warn("migration: the secondary at \(linkFrom) holds the guest's state at exit \(exit); the secondary at \(oldFrom) is let go (the guest stopped \(ms) ms so far)")
    }

    /// A migration's switch that did not complete (`abandonSwitch` said why).
    private struct SwitchAbandoned: Error { var why: String }

    /// The switch failed: the target (if attached) is dropped and `old` protects the guest again, or, lost
    /// meanwhile, is detached as any lost secondary (output released, a new one sought).
    private func abandonSwitch(_ target: SecondaryLink?, old: SecondaryLink, oldFrom: String, why: String) {
        if let target {
            dropLink(target, losing: why)
            _ = target.unpark(rename: false)
        }
        link = old; linkFrom = oldFrom
        unprotectedSinceNs = 0
        current.withLock { $0 = old }
        let up = old.unpark(rename: true)
        let said = fsm.withLock { $0.handle(.migrationAbandoned(why)) }.warnings.first
        warn(said ?? "migration abandoned (\(why)); the secondary that protected the guest protects it on")
        if !up {
            gate.stopGating()
            detachLost(old)
        }
    }

    /// The run ends while a seed's rounds run: stop them. No goodbye: the seeding thread may be blocked in a
    /// send to a peer that stopped reading, and the vCPU thread must not wait behind it; the secondary sees
    /// the connection close mid-seed and waits for another primary.
    private func dropSeeding(_ why: String) {
        guard let p = seeding else { return }
        seeding = nil
        p.cancel(why)
    }

    /// Ends a seed whose rounds are done, then gates output on the secondary's acks. The guest pauses for the
    /// pages written since the last round, the machine state and the seed digest only: the secondary's load
    /// and digest check (over the page hashes it kept as the pages came) overlap the guest's run. Its first
    /// ack confirms the seed (see `SecondaryLink.confirm`); until then the pair record does not name it and
    /// output stays held.
    /// `parked`: a migration's target, attached while the old secondary protects the guest (`switchTo`).
    private func attach(_ p: Precopy, parked: Bool = false) throws {
        let t0 = lk_monotonic_ns()
        let protectionID = UInt64.random(in: 1...UInt64.max)
        // Records before the seed's exit are not needed by this secondary, and its decoder holds no references.
        session.encoder.sealFrame { _ in }
        session.encoder.resetReferences()
        firstAppendNs = 0
        let snap: Snapshot
        // The start of the line the guest is writing, which the backend holds until its newline: bytes of exits
        // before the seed, so the secondary would not have them, and a survivor would send the line's end alone.
        let head = gate.heldBytes == 0 ? (gate.backend as? SerialBackend)?.unsentLine(limit: SeedEnd.maxLineHead) ?? [] : []
        do { snap = try p.finish(protectionID: protectionID, firstSequence: session.encoder.nextSequence, halted: session.isHalted, lineHead: head) } catch {
            p.conn.close()
            throw PairError.from(error)
        }
        let pause = lk_monotonic_ns() &- t0
        let ms: @Sendable (UInt64) -> String = { String(format: "%.1f", Double($0) / 1e6) }
        let line = "protected: secondary at \(p.conn.remote) seeded at exit \(snap.exit):"
            + " \(p.pagesSent - p.pagesInPause) pages in \(p.rounds) rounds (\(ms(t0 &- p.startNs)) ms"
            + (p.throttleReached > 0 ? ", guest throttled up to \(p.throttleReached) %)," : "),")
            + " then \(p.pagesInPause) with the guest paused \(ms(pause)) ms" + (snap.halted ? " while halted" : "")
            + (p.heldPages > 0 ? "; a delta seed: the secondary kept its RAM, \(p.heldEqual) of its \(p.heldPages) pages were right,"
                + " round 0 sent \(p.firstRoundPages) pages where a new machine needs \(p.newMachinePages)" : "")
        let since = unprotectedSinceNs
        unprotectedSinceNs = 0
        let confirmation = SecondaryLink.Unconfirmed(protectionID: protectionID, exit: snap.exit) { [weak self] in
            _ = self?.fsm.withLock { $0.handle(.seedComplete) }
            let now = lk_monotonic_ns()
            warn(line + " (confirmed \(ms(now &- t0)) ms after the pause began" + (since == 0 ? ")" : "; the guest ran unprotected for \(ms(now &- since)) ms)"))
            // A migration hands the guest over once its target protects it: a halted guest's vCPU thread does it now.
            if self?.migrationWanted.load(ordering: .acquiring) == true { self?.session.machine.pacer?.raise(.boundary) }
            // Fault injection for the supervisor's record check: killed between the record and the report.
            if Self.dieBeforeReport { kill(getpid(), SIGKILL) }
            SupervisorReport.protected()
        }
        sentWatermark = snap.exit
        let pacer = session.machine.pacer
        let l = SecondaryLink(conn: p.conn, startExit: snap.exit, options: options, gate: gate, metrics: metrics, fence: fence, unconfirmed: confirmation,
                              handoverAsked: { [weak self] reply in
            warn("the secondary asked for a handover")
            self?.requestHandover(reply: reply)
        }) {
            pacer?.raise(.boundary)  // a halted guest's vCPU thread detaches it and looks for a new one now
        }
        if parked { l.park() }
        gate.startGating(from: snap.exit)
        link = l
        linkFrom = seedingFrom
        attachedNs = lk_monotonic_ns()
        current.withLock { $0 = l }
        _ = fsm.withLock { $0.handle(.handshakeOK) }
        l.start()
        seeded += 1
        metrics.seeded(pauseNs: pause, totalNs: lk_monotonic_ns() &- p.startNs, throttlePercent: p.throttleReached)
    }

    private func adoptOffer() {
        hasOffer.store(false, ordering: .relaxed)
        guard let o = offered.withLock({ o -> (conn: Connection, peer: String)? in defer { o = nil }; return o }) else { return }
        if migrationWanted.load(ordering: .acquiring) { migration.withLock { $0?.answered = true } }
        if link != nil {
            // Only a migration seeks while protected: its target is seeded while the secondary here protects the guest.
            guard migrationWanted.load(ordering: .acquiring) else { o.conn.close(); return }
            warn("migration: the secondary at \(o.peer) answered; seeding it while the secondary at \(linkFrom) protects the guest")
        }
        let p = seed(o.conn, from: o.peer)
        seeding = p
        p.start()
    }

    /// Sends the trailer, waits (bounded) for the secondary to hold it, then releases all output.
    private func finishLog(_ trailer: LogTrailer, status: Int32) {
        guard let l = link, !l.lost.load(ordering: .acquiring) else {
            PairRecord.write(fence, PairRecord.ended(status))
            gate.stopGating()
            return
        }
        let final = trailer.finalExit &+ 1
        batch.removeAll(keepingCapacity: true)
        session.encoder.sealTrailer(trailer) { (b: UnsafeRawBufferPointer) in batch.append(contentsOf: b) }
        let ok = batch.withUnsafeBytes { l.send(watermark: final, bytes: $0) }
        let deadline = lk_monotonic_ns() + options.failureNs
        while ok, l.held.load(ordering: .acquiring) < final, !l.lost.load(ordering: .acquiring), lk_monotonic_ns() < deadline {
            _ = lk_eventfd_wait(l.ackEvent, deadline)
        }
        // Losing the link un-names the secondary first: output it may not hold leaves only after that.
        detach(goodbye: "guest exited")
        gate.stopGating()
        PairRecord.write(fence, PairRecord.ended(status))
    }

    // MARK: connecting

    /// One connection to a would-be secondary (handshake included).
    private func connect(_ host: String, _ port: UInt16) throws -> Connection {
        let c = try Connection.connect(host: host, port: port, timeoutMs: 1000, config: options.channel(role: .primary))
        options.checkRetransmitFloor(c)
        return c
    }

    /// The first secondary: retried until `connectTimeoutMs` (it may still be starting); an authentication,
    /// version or encryption refusal is final.
    private func connectInitial() throws -> Connection {
        let deadline = lk_monotonic_ns() + UInt64(options.connectTimeoutMs) * 1_000_000
        var last: PairError = .peerUnreachable("\(peer): no attempt made")
        while lk_monotonic_ns() < deadline {
            do {
                let (host, port) = peerAddress.withLock { $0 }
                return try connect(host, port)
            } catch {
                last = PairError.from(error)
                if case .peerRejected = last { throw last }
                usleep(50_000)  // retry backoff: the secondary may still be starting
            }
        }
        throw last
    }

    /// While unprotected: keep trying the peer address; a secondary that answers is handed to the vCPU thread.
    /// After secondaries that did not last, the first try waits 0.2, 0.4, ... up to 5 s.
    private func startConnector() {
        guard !connecting.exchange(true, ordering: .acquiringAndReleasing) else { return }
        let backoffMs = Backoff.ms(after: shortLived)
        startThread("lockstep-connect") { [self] in
            // A refused connect costs microseconds, and a supervised restart listens again tens of ms after its kill:
            // a short period keeps re-protection from waiting on this loop.
            var delayMs: UInt64 = 20
            let until = lk_monotonic_ns() + backoffMs * 1_000_000
            while !finished.load(ordering: .acquiring), lk_monotonic_ns() < until { usleep(10_000) }
            // A protected primary seeks only for a migration, and stops seeking when it ends.
            while !finished.load(ordering: .acquiring), current.withLock({ $0 == nil }) || migrationWanted.load(ordering: .acquiring) {
                do {
                    let to = peerAddress.withLock { $0 }
                    let c = try connect(to.host, to.port)
                    offered.withLock { $0 = (c, Self.text(to)) }
                    hasOffer.store(true, ordering: .releasing)
                    session.machine.pacer?.raise(.boundary)  // a halted guest's vCPU thread adopts it now
                    break
                } catch {
                    if case .peerRejected(let why) = PairError.from(error) { warn("a would-be secondary was refused: \(why)"); delayMs = 1000 }
                }
                usleep(UInt32(delayMs * 1000))  // retry backoff
            }
            connecting.store(false, ordering: .releasing)
        }
    }

    // MARK: status

    public func status() -> PairStatus {
        let l = current.withLock { $0 }
        let exit = session.exit
        let held = l?.held.load(ordering: .acquiring) ?? 0
        let replayed = l?.replayed.load(ordering: .acquiring) ?? 0
        let secs = max(Double(lk_monotonic_ns() &- metrics.startNs) / 1e9, 1e-9)
        let bytes = l?.bytesSent ?? 0
        let latest = metrics.latest
        return PairStatus(role: "primary", state: "\(state)", connected: l != nil && !(l!.lost.load(ordering: .relaxed)),
                          protected: state.gatesOutput, exit: exit, heldExit: held, replayedExit: replayed,
                          lagExits: exit > replayed && l != nil ? exit - replayed : 0, lagMicroseconds: Double(latest.replayLagNs) / 1000,
                          logBytes: bytes, logBytesPerSecond: Double(bytes) / secs, heldOutputBytes: gate.heldBytes,
                          throttledMs: Double(metrics.throttledNs) / 1e6, secondariesSeeded: seeded,
                          seeding: seedingNow.load(ordering: .relaxed),
                          linkRoundTripMicroseconds: l == nil ? 0 : Double(latest.roundTripNs) / 1000,
                          linkRetransmits: UInt64(l?.conn.retransmittedSegments() ?? 0),
                          fenceConfirmedMsAgo: watch?.confirmedAgoMs())
    }

    private func report() {
        let s = status()
        if let p = options.statusJSON { reports.write(s, to: p, option: "--status-json") }  // before the line: a reader of the line finds it current
        FileHandle.standardError.write(Data(("lockstep: " + s.line + "\n").utf8))
    }

    func stats() -> PairStats {
        metrics.stats(gate: gate.latencySnapshot(), logBytes: totalBytes, events: session.encoder.eventCount,
                      batches: totalBatches, syncPoints: session.encoder.syncPointCount, exits: session.exit,
                      linkRetransmits: droppedLinkRetransmits &+ UInt64(link?.conn.retransmittedSegments() ?? 0),
                      startedProtected: startedProtected, peakLatencyBoundUs: session.machine.pacer?.peakStretchUs ?? 0)
    }
}

extension Array where Element == FailoverAction {
    /// The texts of the `logWarning` actions.
    var warnings: [String] { compactMap { if case .logWarning(let w) = $0 { w } else { nil } } }
}
