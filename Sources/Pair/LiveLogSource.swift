import CLockstep
import Channel
import EventLog
import Failover
import Foundation
import Machine
import Synchronization

/// The secondary's record source: a receiver thread decodes log batches from the primary into records,
/// acks each batch as soon as it holds it, heartbeats when idle, and on the primary's failure takes the
/// fence. The vCPU thread replays from it (`RecordSource`) and never runs past the primary's watermark.
final class LiveLogSource: RecordSource, @unchecked Sendable {
    enum End: Equatable {
        case trailer(LogTrailer)
        case goLive(String)
        /// The primary is alive (it holds the fence) or went on without this side: never go live. `rejoin`: the
        /// fence answered (this side may wait for a new seed); false: the fence itself is unusable.
        case fenced(String, rejoin: Bool)
        /// The primary stopped in an orderly way (goodbye without a trailer): nothing to take over.
        case primaryStopped(String)
        /// This side cannot follow the log (bad frame, divergence): the primary is told and re-seeds it.
        case resync(String)
        /// A migration moved the guest to the secondary at this address and let this side go: wait for a new seed.
        case released(to: String)
    }

    let conn: Connection
    let options: PairOptions
    let output: SuppressedOutput
    /// The replayer's position (written by the vCPU thread after each step, read for acks).
    let replayed: Atomic<UInt64>
    private let wake = lk_eventfd()
    private struct Queue {
        var records: [LogRecord] = []
        var head = 0
        var horizon: UInt64
        var end: End?
    }
    private let queue: Mutex<Queue>
    private var decoder: FrameDecoder
    private var fsm = FailoverMachine.secondary()
    private let done = DispatchSemaphore(value: 0)
    private(set) var fenceToken: FenceToken?
    /// The fence this side won (held for the rest of its life once live).
    private(set) var fence: (any Fencing)?
    /// The fence directory failed (not merely held): nothing to wait for.
    private var fenceUnusable = false
    /// The receiver waits on a held fence the pair record lets this side take (for the status line).
    let awaitingFence = Atomic<Bool>(false)
    let heldExit: Atomic<UInt64>
    let bytesReceived = Atomic<UInt64>(0)
    let batchesReceived = Atomic<UInt64>(0)
    private let lastSentNs = Atomic<UInt64>(0)
    /// The stream ended in a way that leaves nothing to replay toward (fenced, stopped, resync): the
    /// replayer stops at once rather than finish what it holds.
    let abandoned = Atomic<Bool>(false)
    /// Called (from the receiver thread) when the stream is abandoned.
    var onAbandon: (@Sendable () -> Void)?
    /// Heartbeats come from their own thread: decoding a large sync point must not look like death.
    private var heartbeat: Ticker?

    /// The client the primary's service answered last (for output re-sent on go-live); nil: none yet.
    let replyAddress = Mutex<[UInt8]?>(nil)
    /// Serial input the primary's guest never read, passed on with a handover (`PairMessage.input`).
    let handedInput = Mutex<[UInt8]>([])

    /// Who asked this side's primary for a handover and waits for the outcome; closed when the stream ends.
    private let handoverReplies = HandoverReplies()

    /// Names this secondary in the primary's pair record (see `PairRecord`).
    let protectionID: UInt64
    /// Fault injection for the handover test (`LOCKSTEP_FAULT_IGNORE_HANDOVER`): a secondary that never takes over.
    private static let ignoreHandover = ProcessInfo.processInfo.environment["LOCKSTEP_FAULT_IGNORE_HANDOVER"] != nil

    init(conn: Connection, startExit: UInt64, firstSequence: UInt32, protectionID: UInt64, options: PairOptions, output: SuppressedOutput) {
        self.conn = conn; self.options = options; self.output = output; self.protectionID = protectionID
        queue = Mutex(Queue(horizon: startExit))
        replayed = Atomic(startExit)
        heldExit = Atomic(startExit)
        decoder = FrameDecoder(firstSequence: firstSequence)
        _ = fsm.handle(.handshakeOK)
        _ = fsm.handle(.seedComplete)
    }

    deinit { close(wake) }

    var end: End? { queue.withLock { $0.end } }

    func start() {
        var polls = false
        do { try conn.enablePolling(windowNs: options.linkPollNs); polls = options.linkPollNs > 0 } catch {
            warn("--link-poll-us: \(error); the receiver sleeps between frames")
        }
        // A spinning real-time thread would starve every other thread of its core.
        startLinkThread("lockstep-receive", cpu: options.linkCPU, priority: polls ? nil : linkPriority, done: done) { [self] in loop() }
        heartbeat = Ticker(ms: options.heartbeatMs, name: "lockstep-heartbeat", priority: linkPriority) { [self] in
            if lk_monotonic_ns() &- lastSentNs.load(ordering: .relaxed) >= options.heartbeatNs { sendAck() }
        }
    }

    private func sendAck() {
        let ack = Ack(heldExitIndex: heldExit.load(ordering: .acquiring), replayedExitIndex: replayed.load(ordering: .acquiring))
        if (try? conn.sendAck(ack)) != nil { lastSentNs.store(lk_monotonic_ns(), ordering: .relaxed) }
    }

    /// Closes the link (after go-live or at the end) and waits for the receiver thread.
    func shutdown(goodbye: String?) {
        heartbeat?.stop()
        heartbeat = nil
        if let g = goodbye { try? conn.send(.goodbye(g)) }
        conn.close()
        done.wait()
    }

    /// Asks the primary to hand the guest over to this side (any thread). The answer comes from the primary
    /// when the guest does not move, and from this stream's end otherwise (`finish`).
    func askForHandover(reply: @escaping HandoverReplies.Reply) {
        guard handoverReplies.add(reply) else { return reply(.refused("handover refused: the primary's stream to this side has ended")) }
        do { try conn.send(.status([PairMessage.handoverRequest.rawValue])) } catch {
            handoverReplies.answer(.refused("handover refused: cannot reach the primary: \(error)"), closing: false)
        }
    }

    // MARK: RecordSource (vCPU thread)

    func next(atOrBefore exit: UInt64) throws -> SourceRead {
        var asked = false
        while true {
            let r: SourceRead? = queue.withLock { q in
                if q.head < q.records.count {
                    let rec = q.records[q.head]
                    q.head += 1
                    if q.head == q.records.count { q.records.removeAll(keepingCapacity: true); q.head = 0 }
                    return .record(rec)
                }
                if q.horizon > exit { return .empty(before: q.horizon) }
                switch q.end {
                case .trailer?: return .ended
                case .goLive(let why)?: return .goLive(reason: why)
                case .fenced?, .primaryStopped?, .resync?, .released?: return .ended
                case nil: return nil
                }
            }
            if let r { return r }
            // Starved: everything received is replayed. Say so in acks, or a primary throttling on replay
            // lag would wait for a position this side can only reach with records it has not sent yet.
            replayed.store(exit, ordering: .releasing)
            // Once per wait (not per bounded retry): an idle guest leaves the receiver asleep after one window.
            if !asked { conn.armPolling(); asked = true }
            // Bounded: the receiver thread always ends the stream within the failure timeout (+ fence wait).
            _ = lk_eventfd_wait(wake, lk_monotonic_ns() + 100_000_000)
        }
    }

    /// After the replayed guest ended: waits for the stream's end (the trailer follows once the primary has
    /// hashed its state). Bounded by the receiver, which ends the stream on the primary's failure.
    func awaitEnd() {
        while queue.withLock({ $0.end == nil }) { _ = lk_eventfd_wait(wake, lk_monotonic_ns() + 100_000_000) }
    }

    // MARK: receiver thread

    private func loop() {
        var silence = Silence()
        while queue.withLock({ $0.end == nil }) {
            let began = lk_monotonic_ns()
            do {
                let m = try conn.receiveMessage(timeoutMs: options.heartbeatMs)
                switch m {
                case .log(let batch):
                    // Ack first: the batch is here and its CRC checked. Decoding can still fail, but then
                    // this side asks for a new seed and can never go live, so nothing released is contradicted.
                    heldExit.store(batch.exitIndex, ordering: .releasing)
                    sendAck()
                    try received(batch)
                case .status(let body):
                    if body.first == PairMessage.released.rawValue, body.count == 9 {
                        var r = WireReader(body, what: "released")
                        if let w = try? r.u64() { output.primaryReleased(below: w) }
                    } else if body.first == PairMessage.replyAddress.rawValue, body.count == 7 {
                        replyAddress.withLock { $0 = Array(body.dropFirst()) }
                    } else if body.first == PairMessage.input.rawValue {
                        handedInput.withLock { if $0.count + body.count <= 1 << 17 { $0 += body.dropFirst() } }  // bounded: one handover's worth
                    } else if body.first == PairMessage.migrated.rawValue {
                        finish(.released(to: String(decoding: body.dropFirst().prefix(300), as: UTF8.self)))
                    } else if body.first == PairMessage.handoverAnswer.rawValue, let outcome = try? HandoverOutcome(answer: body) {
                        handoverReplies.answer(outcome, closing: false)
                    } else if body.first == PairMessage.handover.rawValue, body.count == 9, !Self.ignoreHandover {
                        var r = WireReader(body, what: "handover")
                        let exit = (try? r.u64()) ?? 0
                        let held = heldExit.load(ordering: .acquiring)
                        guard held >= exit else {
                            // Its log is not all here: taking over would lose what the primary released.
                            reportDivergence("the primary hands over at exit \(exit) but this side holds the log only to exit \(held)")
                            return
                        }
                        takeOver(.peerHandover, why: "the primary handed the guest over at exit \(exit)")
                        return
                    }
                case .goodbye(let why):
                    // An orderly stop without a trailer: the primary is not failing, do not go live.
                    if queue.withLock({ $0.end == nil }) { finish(.primaryStopped("the primary stopped: \(why)")) }
                case .heartbeat(let h) where h.sentNs != 0:
                    // Answered at once: the primary measures the FT link's round trip by it.
                    if (try? conn.sendHeartbeat(Heartbeat(sentNs: lk_monotonic_ns(), echoNs: h.sentNs))) != nil {
                        lastSentNs.store(lk_monotonic_ns(), ordering: .relaxed)
                    }
                case .heartbeat, .ack, .bulk: break
                }
                silence.heard()
            } catch ChannelError.timeout {
            } catch let e as LogError {
                // A log the secondary cannot decode: stop following it and ask for a new seed.
                reportDivergence("bad log from the primary: \(e)")
                return
            } catch {
                if queue.withLock({ $0.end == nil }) { primaryLost("channel: \(error)") }
                return
            }
            if let ms = silence.reached(options.failureNs, conn: conn, receiveBegan: began, timeoutNs: options.heartbeatNs) {
                primaryLost("no traffic from the primary for \(ms) ms")
                return
            }
        }
    }

    /// Splits a batch into log frames, decodes them, and queues the records with the batch's watermark.
    private func received(_ batch: LogBatch) throws {
        var records: [LogRecord] = []
        var trailer: LogTrailer?
        try batch.bytes.withUnsafeBytes { (all: UnsafeRawBufferPointer) throws in
            var pos = 0
            while pos < all.count {
                let rest = UnsafeRawBufferPointer(rebasing: all[pos...])
                let h = try FrameHeader.parse(rest)
                guard h.frameLength <= rest.count else {
                    throw LogError.corrupt(offset: UInt64(pos), detail: "a log batch ends inside frame \(h.sequence)")
                }
                let frame = UnsafeRawBufferPointer(rebasing: rest[..<h.frameLength])
                if h.kind == .trailer {
                    trailer = try decoder.decodeTrailer(frame: frame)
                } else {
                    records += try decoder.decode(frame: frame)
                }
                pos += h.frameLength
            }
        }
        bytesReceived.add(UInt64(batch.bytes.count), ordering: .relaxed)
        batchesReceived.add(1, ordering: .relaxed)
        queue.withLock { q in
            q.records += records
            q.horizon = max(q.horizon, batch.exitIndex)
            if let t = trailer { q.end = .trailer(t) }
        }
        conn.disarmPolling()  // the replay has work: the core is its
        lk_eventfd_signal(wake)
    }

    /// What a handover asked for on this side came to, by how the stream ended.
    static func handoverOutcome(_ e: End) -> HandoverOutcome {
        switch e {
        case .goLive(let why): return .handedOver("this side took the fence and goes live: \(why)")
        case .trailer: return .refused("handover refused: the guest ended first")
        case .primaryStopped(let why): return .refused("handover refused: \(why)")
        case .released(let to): return .refused("handover refused: the primary moved the guest to \(to)")
        case .fenced(let why, _): return .failed("handover failed: this side may not go live: \(why)")
        case .resync(let why): return .failed("handover failed: this side cannot follow the primary's log (\(why)); the primary re-seeds it")
        }
    }

    /// Tells the primary this side cannot follow its log (it drops the link and seeds this side again).
    func reportDivergence(_ text: String) {
        // The stream ends first: the primary closes the link on this report, and the receiver must not take
        // that close for the primary's death (a diverged side takes no fence, and it waits for a new seed).
        finish(.resync(text))
        try? conn.send(PairMessage.divergence.status(bytes: text.utf8.prefix(60_000)))
    }

    /// Ends the stream; the first reason stands (a replay error after a fence refusal is its consequence).
    private func finish(_ e: End) {
        queue.withLock { q in if q.end == nil { q.end = e } }
        handoverReplies.answer(Self.handoverOutcome(e), closing: true)
        switch e {
        case .fenced, .primaryStopped, .resync, .released:
            abandoned.store(true, ordering: .releasing)
            onAbandon?()  // a replayer deep in the guest must come back to see it
        case .trailer, .goLive: break
        }
        lk_eventfd_signal(wake)
    }

    /// The primary is presumed failed: take the fence (retrying for `fenceWaitMs`, since a dead holder's lock
    /// may be released a moment after its socket), then go live, or stop if the fence stays held.
    private func primaryLost(_ why: String) { takeOver(.channelError(why), why: why) }

    /// Takes the fence and goes live (`drainLogAndGoLive`), or stops if the fence stays held: on the primary's
    /// failure, or when it hands the guest over.
    private func takeOver(_ event: FailoverEvent, why: String) {
        guard queue.withLock({ $0.end == nil }) else { return }  // it ended already (a divergence): nothing to take over
        conn.close()
        var actions = fsm.handle(event)
        while !actions.isEmpty {
            var next: [FailoverAction] = []
            for a in actions {
                switch a {
                case .logWarning(let s): warn(s)
                case .acquireFence: next += fsm.handle(acquireFence())
                case .awaitFence: next += fsm.handle(awaitFence())
                case .drainLogAndGoLive: finish(.goLive(why + (fenceToken.map { "; fence generation \($0.generation)" } ?? "; no fence")))
                case .stop(let reason): finish(.fenced(reason, rejoin: !fenceUnusable))
                default: break
                }
            }
            actions = next
        }
    }

    /// Tries the fence for `fenceWaitMs`. Still held then: `fenceHeld` while the pair record names this side.
    private func acquireFence() -> FailoverEvent {
        guard let f = options.openFence() else { return .fenceAcquired(generation: 0) }
        let deadline = lk_monotonic_ns() + UInt64(options.fenceWaitMs) * 1_000_000
        while true {
            if let e = tryFence(f) { return e }
            if lk_monotonic_ns() >= deadline {
                let holder = f.holder?.description ?? "another process"
                return pairRecord(f).namesThisSide ? .fenceHeld(holder: holder) : .fenceDenied(holder: "\(holder): the primary is alive")
            }
            usleep(2000)  // retry backoff while a dead holder's lock is released
        }
    }

    /// How often a secondary waiting on a held fence tries it again (an NFS lease runs for tens of seconds).
    static let fenceRetryUs: UInt32 = 100_000

    /// Tries the fence until it is free, with no deadline, as long as the pair record names this side: a live
    /// primary that lost this secondary writes `unprotected` before it releases any output, which ends the wait.
    private func awaitFence() -> FailoverEvent {
        guard let f = options.openFence() else { return .fenceAcquired(generation: 0) }
        awaitingFence.store(true, ordering: .relaxed)
        defer { awaitingFence.store(false, ordering: .relaxed) }
        while true {
            usleep(Self.fenceRetryUs)
            if let e = tryFence(f) { return e }
            let record = pairRecord(f)
            guard record.namesThisSide else {
                return .fenceDenied(holder: "\(f.holder?.description ?? "another process"), and the primary's pair record now says '\(record.text)': it went on without this secondary")
            }
        }
    }

    /// The primary's pair record, and whether it names this secondary (the one that may take over).
    private func pairRecord(_ f: any Fencing) -> (text: String, namesThisSide: Bool) {
        let text = PairRecord.read(f)
        return (text, text == PairRecord.protected(protectionID))
    }

    /// One try: `fenceAcquired` when won and the pair record names this side, `fenceDenied` when won but the
    /// record does not (released again) or when the fence fails, nil while someone holds it. Where the store
    /// can (etcd), a record naming this side lets it take the fence from a holder whose lease still runs.
    private func tryFence(_ f: any Fencing) -> FailoverEvent? {
        do {
            guard let t = try f.tryAcquire(identity: .current(), claim: PairRecord.protected(protectionID)) else { return nil }
            // The fence is ours; the primary's last word decides whether this state may go live.
            let record = pairRecord(f)
            guard record.namesThisSide else {
                try? f.release()
                let why = PairRecord.endedStatus(record.text) != nil ? "the guest ended there" : "it went on without this secondary, whose state is stale"
                return .fenceDenied(holder: "nobody, but the primary's pair record says '\(record.text)': \(why)")
            }
            fence = f
            fenceToken = t
            return .fenceAcquired(generation: t.generation)
        } catch {
            fenceUnusable = true
            return .fenceDenied(holder: "unusable fence (\(error))")
        }
    }
}
