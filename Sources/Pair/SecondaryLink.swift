import CLockstep
import Channel
import Failover
import Foundation
import Machine
import Synchronization

/// The primary's end of one secondary: its link thread reads acks and heartbeats, sends heartbeats when
/// the link is idle, releases gated output, and declares the secondary lost after the failure timeout.
/// The vCPU thread sends log batches through `send`.
final class SecondaryLink: @unchecked Sendable {
    let conn: Connection
    let options: PairOptions
    let gate: OutputGate
    let metrics: PairMetrics
    /// The secondary holds every record of exits below this.
    let held: Atomic<UInt64>
    let replayed: Atomic<UInt64>
    let lost = Atomic<Bool>(false)
    /// The secondary said it cannot follow this log (set before `lost`): it will never take the guest over.
    let refused = Atomic<Bool>(false)
    private let lostReason = Mutex<String>("")
    /// A log batch could not be sent (vCPU thread): the stream is broken, and the link thread loses the link.
    private let sendBroken = Atomic<Bool>(false)
    private let sendFailure = Mutex<String>("")
    /// Orders this link's pair-record writes: a loss always writes last.
    private let recordLock = NSLock()
    private var handingOver = false  // under recordLock
    /// The pair record names this secondary (under recordLock): it may go live if this process dies, so no
    /// output leaves on its loss until the record says otherwise.
    private var named = false
    /// A migration's switch (under recordLock): the guest is stopped with nothing held while two links are up,
    /// so this link's loss writes no record and releases nothing; the vCPU thread settles both when it ends.
    private var parked = false
    /// The protection its seed started (0: none): what the pair record says while it names this secondary.
    let protectionID: UInt64
    /// This process's fence (nil: none): checked after each record write that lets output leave.
    private let fence: (any Fencing)?
    /// Signalled on every ack and on loss (flow control waits on it).
    let ackEvent = lk_eventfd()
    let lastSendNs = Atomic<UInt64>(lk_monotonic_ns())
    private let done = DispatchSemaphore(value: 0)

    /// Batches in flight: (watermark, send time, cumulative bytes), appended by the vCPU thread.
    private struct Batch { var watermark: UInt64; var ns: UInt64; var bytes: UInt64 }
    private let batches = Mutex<(list: [Batch], heldAt: Int, replayedAt: Int)>(([], 0, 0))
    private(set) var bytesSent: UInt64 = 0
    private let bytesReplayed = Atomic<UInt64>(0)
    private let oldestUnreplayedNs = Atomic<UInt64>(0)
    private(set) var batchCount: UInt64 = 0

    /// A seeded secondary that has not yet said it loaded the seed and found the same seed digest. Until it
    /// does, the pair record does not name it (it may not go live) and no output is released on its acks.
    struct Unconfirmed {
        var protectionID: UInt64
        var exit: UInt64
        /// Called once the record names it (on the thread that wrote the record, under `recordLock`).
        var onConfirmed: @Sendable () -> Void
    }
    /// Touched by the link thread only (after `start`); nil once the seed's answer has come.
    private var unconfirmed: Unconfirmed?
    /// The pair record names this secondary: output may leave on its acks. Set by the thread that writes
    /// the record (`confirm`), not by the link thread, which keeps taking acks meanwhile.
    private let confirmed: Atomic<Bool>
    /// How long a secondary may take to answer the seed's header (it hashes the RAM it kept) or to load and check it.
    static let seedTimeoutNs: UInt64 = 30_000_000_000

    /// Wakes the vCPU thread (`lose`): it detaches this link at its next step boundary.
    private let wakeVCPU: @Sendable () -> Void
    /// The secondary's operator asked for a handover (link thread); the argument sends the outcome back.
    private let handoverAsked: @Sendable (@escaping HandoverReplies.Reply) -> Void

    init(conn: Connection, startExit: UInt64, options: PairOptions, gate: OutputGate, metrics: PairMetrics, fence: (any Fencing)?, unconfirmed: Unconfirmed? = nil,
         handoverAsked: @escaping @Sendable (@escaping HandoverReplies.Reply) -> Void = { _ in }, wakeVCPU: @escaping @Sendable () -> Void = {}) {
        self.conn = conn; self.options = options; self.gate = gate; self.metrics = metrics; self.fence = fence
        self.unconfirmed = unconfirmed
        protectionID = unconfirmed?.protectionID ?? 0
        confirmed = Atomic(unconfirmed == nil)
        self.handoverAsked = handoverAsked
        self.wakeVCPU = wakeVCPU
        held = Atomic(startExit)
        replayed = Atomic(startExit)
    }

    deinit { close(ackEvent) }

    func start() {
        startLinkThread("lockstep-link", cpu: options.linkCPU, priority: ackPriority, done: done) { [self] in loop() }
    }

    var reason: String { lostReason.withLock { $0 } }

    /// From here the pair record names this secondary until it takes the fence: a handover is under way,
    /// and the link's end (the secondary closes it to take over) must not un-name it.
    func beginHandover() { recordLock.withLock { handingOver = true } }

    /// A handover nobody took: the fence is this side's again, and the record must stop naming the secondary
    /// before the guest runs on (whether or not the link is lost by now, its output is no longer held).
    func endHandover() {
        recordLock.withLock {
            handingOver = false
            sayUnprotected()
        }
    }

    var isConfirmed: Bool { confirmed.load(ordering: .acquiring) }

    /// vCPU thread: waits until the secondary has confirmed its seed or is lost, or until `deadline`. The link
    /// thread loses a secondary that does not confirm within `seedTimeoutNs`.
    func awaitConfirmation(until deadline: UInt64) {
        while !confirmed.load(ordering: .acquiring) && !lost.load(ordering: .acquiring) && lk_monotonic_ns() < deadline {
            _ = lk_eventfd_wait(ackEvent, deadline)
        }
    }

    /// Marks the secondary lost (idempotent): releases everything gated and wakes a throttled vCPU.
    func lose(_ why: String) {
        // Before any held output leaves: this secondary's state is stale from now on, and it must not go
        // live even if it wins the fence after this process ends. (Under the lock: a confirmation racing
        // this loss must not write the record after it.)
        // The reason is stored before `lost` is set: a thread that sees `lost` reads it at once.
        let (first, release) = recordLock.withLock { () -> (Bool, Bool) in
            guard !lost.load(ordering: .acquiring) else { return (false, false) }
            lostReason.withLock { $0 = why }
            lost.store(true, ordering: .releasing)
            if !handingOver && !parked { sayUnprotected() }
            return (true, !parked)
        }
        guard first else { return }
        if release { gate.stopGating() }
        conn.close()
        lk_eventfd_signal(ackEvent)
        wakeVCPU()
    }

    /// A migration's switch begins: see `parked`.
    func park() { recordLock.withLock { parked = true } }

    /// The switch ended: this link's loss writes the record and releases output again. Lost meanwhile: the
    /// record stops naming it (if it did) and false is returned; the caller releases output if nobody else
    /// protects the guest. Up: with `rename`, the record names it again if it did before (the other link's
    /// confirmation may have written it).
    func unpark(rename: Bool) -> Bool {
        recordLock.withLock {
            parked = false
            guard lost.load(ordering: .acquiring) else {
                if rename, named, !PairRecord.write(fence, PairRecord.protected(protectionID)) {
                    warn("cannot write the pair record in \(fence?.location ?? ""): it may not name the secondary that protects the guest")
                }
                return true
            }
            if named { unname() }
            return false
        }
    }

    /// Under recordLock: the record says no secondary may take over. Once it named this one, that must hold
    /// before output leaves (`unname`); otherwise one write will do.
    private func sayUnprotected() {
        if named { unname() } else { PairRecord.write(fence, PairRecord.unprotected) }
    }

    /// The record names this lost secondary: output it does not hold may leave only once the record says
    /// `unprotected` and this process still holds the fence. Until then the calling thread retries (the guest
    /// waits: a primary cut off from its fence directory cannot know whether the secondary has taken over).
    private func unname() {
        let retryUs: UInt32 = 100_000
        var tries = 0
        while true {
            let problem: String
            // Confirmed before the write too: a side that lost the fence must not overwrite the new holder's record.
            // (With etcd the write is one compare-and-swap and nothing is read around it, so it also wins a race
            // with a claim more often.)
            _ = PairRecord.confirmFence(fence)
            if let e = PairRecord.tryWrite(fence, PairRecord.unprotected) {
                problem = "cannot write the pair record: \(e)"
            } else if let why = PairRecord.confirmFence(fence) {
                problem = why
            } else {
                named = false
                if tries > 0 { warn("the pair record says unprotected again after \(tries) tries: held output leaves") }
                return
            }
            if tries % 50 == 0 {
                warn("\(problem); the record names the lost secondary, so held output stays held and the guest waits (retrying every \(retryUs / 1000) ms)")
            }
            tries += 1
            usleep(retryUs)  // a fence directory coming back (NFS)
        }
    }

    /// Stops the link thread (after `lose` or at the end of the run).
    func join() { conn.close(); done.wait() }

    // MARK: vCPU thread

    /// Sends encoded log bytes that complete every record below `watermark`.
    /// `appendedNs`: when the batch's first record was appended (0: now); its replication lag runs from there.
    func send(watermark: UInt64, bytes: UnsafeRawBufferPointer, appendedNs: UInt64 = 0) -> Bool {
        guard !lost.load(ordering: .acquiring), !sendBroken.load(ordering: .acquiring) else { return false }
        let now = lk_monotonic_ns()
        bytesSent &+= UInt64(bytes.count)
        batchCount &+= 1
        let b = Batch(watermark: watermark, ns: appendedNs == 0 ? now : min(appendedNs, now), bytes: bytesSent)
        batches.withLock { $0.list.append(b) }
        do { try conn.sendLog(exitIndex: watermark, bytes: bytes) } catch {
            // The link thread, which reads the connection, loses it (`sendFailed`): it may hold a reason first.
            sendFailure.withLock { $0 = "cannot send to the secondary: \(error)" }
            sendBroken.store(true, ordering: .releasing)
            return false
        }
        lastSendNs.store(now, ordering: .releasing)
        return true
    }

    /// Flow control: true while the secondary's replay is too far behind (bytes or time).
    func mustSlowDown(now: UInt64) -> Bool {
        if lost.load(ordering: .acquiring) { return false }
        if bytesSent &- bytesReplayed.load(ordering: .acquiring) > options.maxLagBytes { return true }
        let oldest = oldestUnreplayedNs.load(ordering: .acquiring)
        return oldest != 0 && now &- oldest > options.maxLagMs * 1_000_000
    }

    // MARK: link thread

    private func loop() {
        var silence = Silence()
        var lastReleaseReport: UInt64 = 0
        var reportedRelease: UInt64 = 0
        let service = gate.backend as? SerialBackend
        var sentReplyAddress: UInt64 = 0
        while !lost.load(ordering: .acquiring) {
            let began = lk_monotonic_ns()
            do {
                heard(try conn.receiveMessage(timeoutMs: options.heartbeatMs))
                silence.heard()
            } catch ChannelError.timeout {
            } catch {
                lose("\(error)")  // the failover machine names it a channel error
                break
            }
            if sendBroken.load(ordering: .acquiring) {
                sendFailed(sendFailure.withLock { $0 })
                break
            }
            if let ms = silence.reached(unconfirmed == nil ? options.failureNs : Self.seedTimeoutNs, conn: conn,
                                        receiveBegan: began, timeoutNs: options.heartbeatNs) {
                lose("no traffic from the secondary for \(ms) ms")
                break
            }
            let now = lk_monotonic_ns()
            // Tell the secondary what left the VM, so a go-live re-sends only what might not have.
            let released = gate.releasedWatermark
            if released > reportedRelease, now &- lastReleaseReport >= options.heartbeatNs {
                if (try? conn.send(PairMessage.released.status(released))) != nil { lastSendNs.store(now, ordering: .releasing) }
                reportedRelease = released
                lastReleaseReport = now
            }
            // Tell it whom the service answers, so a survivor's re-sent output reaches that client.
            if let service, case let v = service.replyAddressChanges.load(ordering: .acquiring), v != sentReplyAddress,
               let a = service.replyAddress {
                if (try? conn.send(PairMessage.replyAddress.status(bytes: a))) != nil { sentReplyAddress = v; lastSendNs.store(now, ordering: .releasing) }
            }
            if now &- lastSendNs.load(ordering: .acquiring) >= options.heartbeatNs {
                do { try conn.sendHeartbeat(Heartbeat(sentNs: now, echoNs: 0)) } catch { sendFailed("cannot send a heartbeat: \(error)"); break }
                lastSendNs.store(now, ordering: .releasing)
            }
        }
        lk_eventfd_signal(ackEvent)
    }

    private func heard(_ m: Message) {
        switch m {
        case .ack(let a):
            if let u = unconfirmed {
                guard confirm(a, u) else { return }
                unconfirmed = nil
            }
            acked(a, now: lk_monotonic_ns())
        case .goodbye(let why): lose("the secondary said goodbye: \(why)")
        case .status(let body): secondaryReported(body)
        case .heartbeat(let h) where h.echoNs != 0:
            let now = lk_monotonic_ns()
            if now > h.echoNs { metrics.roundTrip(now - h.echoNs) }
        default: break
        }
    }

    /// A send failed (link thread): a secondary that reports a divergence and closes resets the link, and
    /// a send can fail on that reset before the report is read. Its last words, when here, say why it went.
    private func sendFailed(_ why: String) {
        for m in conn.lastWords() where !lost.load(ordering: .acquiring) { heard(m) }
        lose(why)  // nothing more if the last words lost it
    }

    /// The secondary's first ack answers the seed: it holds the seed's exit and the same state. From here it
    /// may take over, so the pair record names it now, before any output is released on its acks. The record
    /// is written on a thread of its own: it is synced to the fence directory's storage (NFS in a lab), and
    /// meanwhile the link thread keeps taking acks, heartbeats and the secondary's loss. False: lost.
    private func confirm(_ a: Ack, _ u: Unconfirmed) -> Bool {
        guard a.heldExitIndex == u.exit else {
            lose("the secondary answered the seed of exit \(u.exit) with an ack of exit \(a.heldExitIndex)")
            return false
        }
        startThread("lockstep-record") { [self] in
            // nil: lost meanwhile; false: the record cannot be written, or the fence cannot be confirmed.
            let named = recordLock.withLock { () -> Bool? in
                guard !lost.load(ordering: .acquiring) else { return nil }
                guard PairRecord.write(fence, PairRecord.protected(u.protectionID)) else { return false }
                self.named = true
                if let why = PairRecord.confirmFence(fence) {
                    warn(why)
                    return false
                }
                // Under the lock: a loss (which takes it) comes after, for the record and for the failover machine.
                confirmed.store(true, ordering: .sequentiallyConsistent)
                u.onConfirmed()
                return true
            }
            lk_eventfd_signal(ackEvent)  // a vCPU thread waiting in `awaitConfirmation`
            if named == false { lose("cannot write the pair record in \(fence?.location ?? "") or read its fence") }
            // Either this sees the link thread's newest `held`, or the link thread sees `confirmed` and releases.
            if named == true { gate.secondaryHolds(below: held.load(ordering: .sequentiallyConsistent)) }
        }
        return true
    }

    private func acked(_ a: Ack, now: UInt64) {
        held.store(a.heldExitIndex, ordering: .sequentiallyConsistent)
        replayed.store(a.replayedExitIndex, ordering: .releasing)
        if confirmed.load(ordering: .sequentiallyConsistent) { gate.secondaryHolds(below: a.heldExitIndex) }
        var replayLag: UInt64 = 0
        var replayedBytes: UInt64 = 0
        var oldest: UInt64 = 0
        var newest: UInt64 = 0
        batches.withLock { s in
            while s.heldAt < s.list.count, s.list[s.heldAt].watermark <= a.heldExitIndex {
                metrics.replicated(lagNs: now &- s.list[s.heldAt].ns, at: now)
                s.heldAt += 1
            }
            while s.replayedAt < s.list.count, s.list[s.replayedAt].watermark <= a.replayedExitIndex {
                replayedBytes = s.list[s.replayedAt].bytes
                s.replayedAt += 1
            }
            if s.replayedAt < s.list.count { oldest = s.list[s.replayedAt].ns; replayLag = now &- oldest }
            newest = s.list.last?.watermark ?? 0
            if s.replayedAt > 8192 {
                s.list.removeFirst(s.replayedAt)
                s.heldAt -= s.replayedAt
                s.replayedAt = 0
            }
        }
        if replayedBytes > 0 { bytesReplayed.store(replayedBytes, ordering: .releasing) }
        oldestUnreplayedNs.store(oldest, ordering: .releasing)
        metrics.replayed(lagNs: replayLag, lagExits: newest > a.replayedExitIndex ? newest - a.replayedExitIndex : 0)
        lk_eventfd_signal(ackEvent)
    }

    /// Tells a secondary that asked for the handover why the guest did not move (best effort: when it did, the
    /// secondary knows, and when the link is gone its own stream's end answers it).
    private func answerHandover(_ outcome: HandoverOutcome) {
        if case .handedOver = outcome { return }
        try? conn.send(outcome.frame)
    }

    private func secondaryReported(_ body: [UInt8]) {
        if body == [PairMessage.handoverRequest.rawValue] {
            // Only a confirmed secondary may take the guest; the primary's failover machine decides the rest.
            guard confirmed.load(ordering: .acquiring) else { return answerHandover(.refused("handover refused: the primary has not confirmed this secondary's seed yet")) }
            handoverAsked { [weak self] in self?.answerHandover($0) }
            return
        }
        guard let tag = body.first, tag == PairMessage.divergence.rawValue else { return }
        let text = String(decoding: body.dropFirst(), as: UTF8.self)
        refused.store(true, ordering: .releasing)
        lose("the secondary diverged and was dropped: \(text)")
    }
}

/// How long the peer has been silent, as one link thread sees it: only time spent waiting for bytes counts.
/// Bytes of a large frame still arriving are life, and so is the time the thread spent handling what it got.
/// A pure function of the times it is given (`SilenceTests`).
struct Silence {
    private var lastHeard: UInt64
    /// The last judgement was put off because its receive was busy; the next one is not.
    private var deferred = false

    init(now: UInt64 = lk_monotonic_ns()) { lastHeard = now }

    /// A whole message was received and handled.
    mutating func heard(now: UInt64 = lk_monotonic_ns()) { lastHeard = now; deferred = false }

    /// The silence in ms once it reached `failureNs`; nil before. `receiveBegan`, `timeoutNs`: the receive that
    /// just timed out. One that overran its timeout by more than as much again was busy (gathering a large
    /// batch's parts: 90 ms for 96 MiB here), not waiting; on one host that busy real-time thread may be what
    /// kept the peer from sending. The verdict then waits for the next receive, which waits, once: a thread
    /// late every time (an overloaded host) still declares the failure one receive later.
    mutating func reached(_ failureNs: UInt64, conn: Connection, receiveBegan: UInt64, timeoutNs: UInt64) -> UInt64? {
        reached(failureNs, lastReceiveNs: conn.lastReceiveNs, receiveBegan: receiveBegan, timeoutNs: timeoutNs, now: lk_monotonic_ns())
    }

    /// As above, `lastReceiveNs` being when the connection last received any bytes.
    mutating func reached(_ failureNs: UInt64, lastReceiveNs: UInt64, receiveBegan: UInt64, timeoutNs: UInt64, now: UInt64) -> UInt64? {
        lastHeard = max(lastHeard, lastReceiveNs)
        guard now &- lastHeard >= failureNs else { deferred = false; return nil }
        if !deferred, now &- receiveBegan > 2 * timeoutNs { deferred = true; return nil }
        return (now &- lastHeard) / 1_000_000
    }
}

/// SCHED_FIFO priority of the link threads (acks, heartbeats): they sleep on I/O and must not wait a
/// scheduler tick behind a vCPU thread in an emulated guest on the same core. Without CAP_SYS_NICE they
/// run at normal priority.
let linkPriority: Int32 = 10
/// The primary's link thread, which takes the acks that release output, runs above the secondary's receiver:
/// with both on one core (a pair on one host), an ack must not wait while the receiver decodes the batch it
/// has already acknowledged.
let ackPriority: Int32 = linkPriority + 1

/// Starts a thread that blocks on the FT link at `priority` (nil: normal priority, for a thread that busy-polls),
/// on core `cpu` if given; `done` is signalled when `body` returns.
func startLinkThread(_ name: String, cpu: Int32?, priority: Int32? = linkPriority, done: DispatchSemaphore,
                     _ body: @escaping @Sendable () -> Void) {
    startThread(name) {
        if let priority { _ = lk_set_realtime_priority(priority) }
        if let cpu, lk_pin_current_thread(cpu) != 0 { warn("\(name): cannot run on core \(cpu); left to the scheduler") }
        body()
        done.signal()
    }
}

/// Status-frame messages of the pair (first body byte).
enum PairMessage: UInt8 {
    /// Primary → secondary: u64 watermark; every output byte of an exit below it has left the VM.
    case released = 1
    /// Secondary → primary: UTF-8 divergence report; the primary drops and re-seeds it.
    case divergence = 2
    /// Primary → secondary: the UDP client the serial backend answers (IPv4 address, port; network order).
    case replyAddress = 3
    /// Primary → secondary: u64 exit; the primary stopped its guest there (the secondary holds the whole log),
    /// gave up the fence, and hands the guest over (a planned switchover).
    case handover = 4
    /// Secondary → primary, no body: its operator asks for a planned switchover to the secondary.
    case handoverRequest = 5
    /// Primary → the secondary that asked: why the guest did not move (`HandoverOutcome.frame`).
    case handoverAnswer = 6
    /// Primary → the secondary a migration lets go: UTF-8 `HOST:PORT` of the target, which holds the guest's
    /// state now. Not a failure: the secondary never goes live on it, and waits for a new seed (the moved
    /// guest's primary may seed it again).
    case migrated = 7
    /// Primary → secondary, just before `handover`: serial input the guest had not read (queued while it was
    /// stopped for the handover, so in no log record). The survivor's guest reads it first once live.
    case input = 8

    /// A status frame of this message carrying one `u64` (released, handover).
    func status(_ value: UInt64) -> Frame {
        var w = Wire(tag: rawValue)
        w.u64(value)
        return .status(w.out)
    }

    /// A status frame of this message carrying raw bytes (divergence, reply address, migrated, input).
    func status<C: Collection>(bytes: C) -> Frame where C.Element == UInt8 {
        var w = Wire(tag: rawValue)
        w.raw(bytes)
        return .status(w.out)
    }
}
