import CLockstep
import Foundation
import Histogram
import Machine
import Synchronization

/// The output rule on the primary (VMware FT): a byte the guest wrote while handling exit E leaves the VM only
/// once the secondary holds every record of the exits before E (its ack watermark is ≥ E), the log that
/// produced the byte. The guest is never stalled: held bytes wait here and are released from the link thread
/// when the ack arrives.
public final class OutputGate: SerialOutput, @unchecked Sendable {
    let backend: SerialOutput
    private let lock = NSLock()
    private var held: [(exit: UInt64, byte: UInt8, ns: UInt64)] = []
    private var head = 0
    private var gating = false
    /// Bytes of exits below this may leave (one past the secondary's cumulative ack).
    private var releasedBelow: UInt64 = 0
    /// What the gate adds, per line: the guest wrote the line's newline → the line was released, ns. (The
    /// backend sends whole lines, so earlier bytes of a line could not leave sooner even unprotected.)
    private var latency = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
    /// An idle flush waits until the bytes held when it was asked for have left (index into `held`), and
    /// then flushes at exactly that point: bytes released in the same drain belong to a later line.
    private var flushMark: Int?

    public init(backend: SerialOutput) { self.backend = backend }

    /// A held line is complete: the backend sends whole lines, so that is when the watermark must move at once.
    /// A partial line does not ask (a send and two wake-ups per OUT exit, for bytes the backend would keep):
    /// it leaves with its newline, on idle (the guest halts → a forced flush), or with the next batch.
    private let lineHeld = Atomic<Bool>(false)

    @inline(__always) var lineWaits: Bool { lineHeld.load(ordering: .relaxed) }

    public func emit(_ byte: UInt8, exit: UInt64) {
        lock.lock(); defer { lock.unlock() }
        if !gating || (exit < releasedBelow && head == held.count) {
            backend.emit(byte, exit: exit)
        } else {
            held.append((exit, byte, lk_monotonic_ns()))
            if byte == 0x0A { lineHeld.store(true, ordering: .relaxed) }
        }
    }

    /// The guest went idle: push out a partial line, but only once every byte before it has left (flushing the
    /// released part of a held line would split it across datagrams).
    public func flush() {
        lock.lock(); defer { lock.unlock() }
        if head == held.count { backend.flush() } else { flushMark = held.count }
    }

    /// The secondary acked `watermark`: it holds every record of the exits below it. A byte of exit E depends
    /// only on those (an OUT consumes no input), so the bytes of exits up to and including the watermark leave.
    func secondaryHolds(below watermark: UInt64) {
        let bound = watermark &+ 1
        lock.lock(); defer { lock.unlock() }
        guard bound > releasedBelow else { return }
        releasedBelow = bound
        drain { $0 < bound }
    }

    /// Starts holding output for a secondary's acks (from its seed's exit on).
    func startGating(from exit: UInt64) {
        lock.lock(); defer { lock.unlock() }
        gating = true
        releasedBelow = exit
    }

    /// No secondary: everything held leaves now, and nothing is held from here on.
    func stopGating() {
        lock.lock(); defer { lock.unlock() }
        gating = false
        drain { _ in true }
    }

    private func drain(_ releasable: (UInt64) -> Bool) {
        let now = lk_monotonic_ns()
        var n = 0
        while head < held.count, releasable(held[head].exit) {
            let h = held[head]
            backend.emit(h.byte, exit: h.exit)
            if h.byte == 0x0A { _ = latency.record(now &- h.ns) }
            head += 1; n += 1
            if head == flushMark { flushMark = nil; backend.flush() }
        }
        if n > 0 {
            lineHeld.store(held[head...].contains { $0.byte == 0x0A }, ordering: .relaxed)
        }
        if head == held.count { held.removeAll(keepingCapacity: true); head = 0 } else if head > 4096 {
            held.removeFirst(head); flushMark = flushMark.map { $0 - head }; head = 0
        }
    }

    var heldBytes: Int { lock.lock(); defer { lock.unlock() }; return held.count - head }
    var releasedWatermark: UInt64 { lock.lock(); defer { lock.unlock() }; return releasedBelow }
    func latencySnapshot() -> Histogram<UInt64> { lock.lock(); defer { lock.unlock() }; return latency }
}

/// The secondary's side of the output rule: while replaying, the guest's output is held back (the primary
/// sends it). Bytes the primary reports released are dropped; on go-live the rest leaves through the
/// survivor's backend, so output the primary never released is produced again (at-least-once at the
/// failover instant: bytes released after the primary's last report are sent twice).
public final class SuppressedOutput: SerialOutput, @unchecked Sendable {
    private let lock = NSLock()
    private var held: [(exit: UInt64, byte: UInt8)] = []
    private var releasedBelow: UInt64 = 0
    private var live: SerialOutput?

    public init() {}

    public func emit(_ byte: UInt8, exit: UInt64) {
        lock.lock(); defer { lock.unlock() }
        if let live { live.emit(byte, exit: exit); return }
        // A line the replay finishes after the primary reported it released has left already (exits only grow,
        // so every byte held before it is older still).
        if byte == 0x0A, exit < releasedBelow { held.removeAll(keepingCapacity: true); return }
        held.append((exit, byte))
    }

    public func flush() {
        lock.lock(); defer { lock.unlock() }
        live?.flush()
    }

    /// The seed's line head (`SeedEnd.lineHead`): bytes of exits before the seed's that the primary's backend
    /// held unsent. They start what is held, as released bytes of the line the replay goes on writing.
    func startLine(_ head: [UInt8], seedExit: UInt64) {
        guard !head.isEmpty else { return }
        lock.lock(); defer { lock.unlock() }
        held.insert(contentsOf: head.map { (max(seedExit, 1) - 1, $0) }, at: 0)
    }

    /// The primary released every byte of exits below `watermark`.
    func primaryReleased(below watermark: UInt64) {
        lock.lock(); defer { lock.unlock() }
        guard watermark > releasedBelow else { return }
        releasedBelow = watermark
        // Drop released bytes only up to the last whole line: the primary's backend may still hold the partial
        // line after it, and if the primary dies now that line must come from here (a duplicate at worst).
        let i = held.firstIndex(where: { $0.exit >= watermark }) ?? held.count
        if let nl = held[..<i].lastIndex(where: { $0.byte == 0x0A }) { held.removeFirst(nl + 1) }
        else if i > 1 << 16 { held.removeFirst(i) }  // a "line" this long is not a line: bound the memory
    }

    /// Go-live: emits what the primary may not have released, then passes everything through. Returns the count.
    @discardableResult
    func goLive(to backend: SerialOutput) -> Int {
        lock.lock(); defer { lock.unlock() }
        for h in held { backend.emit(h.byte, exit: h.exit) }
        let n = held.count
        held.removeAll()
        live = backend
        return n
    }
}
