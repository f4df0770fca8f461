import CLockstep
import Devices
import EventLog

/// What a record source has for the replayer.
public enum SourceRead {
    /// The next record, in log order.
    case record(LogRecord)
    /// No record exists before exit `before` (the primary's watermark); more may come after it.
    case empty(before: UInt64)
    /// The log is complete (trailer or end of file).
    case ended
    /// The live log stopped for good and this side won the right to continue: replay has consumed all of it,
    /// and the machine switches to live inputs here.
    case goLive(reason: String)
}

/// Where a replaying machine gets its records: a log file, or the live channel on a secondary.
public protocol RecordSource: AnyObject {
    /// The next record, or a statement that none exists at or before `exit`. A live source blocks until it can
    /// say one or the other (or the stream ends), so the replayer never runs ahead of the log.
    func next(atOrBefore exit: UInt64) throws -> SourceRead
}

/// A replay that does not match its log.
public struct Divergence: Error, CustomStringConvertible {
    public let exit: UInt64
    public let expected: String
    public let found: String
    public var report: String = ""
    public init(exit: UInt64, expected: String, found: String) { self.exit = exit; self.expected = expected; self.found = found }
    public var description: String { "divergence at exit \(exit): expected \(expected), found \(found)" + (report.isEmpty ? "" : "\n" + report) }
}

/// The recording interface: one hook per nondeterministic input, QEMU-replay style.
/// Live (run/record) mode samples the host, and in record mode appends the value to the log;
/// replay mode returns the logged value. Both paths share every call site, so they cannot drift apart.
public final class InputHooks: DeviceInputs {
    public enum Mode: Equatable { case run, record, replay }
    public private(set) var mode: Mode
    /// The exit index: natural exits so far. The deterministic clock of the run.
    public internal(set) var exit: UInt64 = 0
    public internal(set) var signature = ExitSignature(raw: 0)
    public let epochSeconds: UInt64
    private(set) var encoder: LogEncoder?
    /// Where a standby machine records once it goes live (so a survivor can protect itself again); nil: run mode.
    var liveEncoder: LogEncoder?
    /// Set once before the first step: a standby machine gets its source with the seed's snapshot.
    var source: RecordSource?
    /// Guest time = host monotonic - hostBase (live). Moved on go-live so the guest clock stays monotonic.
    var hostBase: UInt64
    public private(set) var lastClock: UInt64 = 0
    /// The first mismatch seen inside a device callback (which cannot throw); the engine checks it after each exit.
    public internal(set) var divergence: Divergence?
    public internal(set) var sourceError: Error?
    /// Sees every record as replay consumes it (`lockstep log inspect`); nil otherwise.
    public var observer: ((LogRecord) -> Void)?
    /// Called on the vCPU thread right after a live source said `.goLive` (the machine is now in `.run` mode).
    public var onGoLive: ((String) -> Void)?

    // The replay cursor: the next record, read ahead by one.
    private var pending: LogRecord?
    /// Exit index of the pending record; UInt64.max when none is known.
    public private(set) var pendingExit: UInt64 = .max
    private var ended = false
    /// The live source said no record exists before this exit.
    private var emptyBefore: UInt64 = 0

    public init(mode: Mode, epochSeconds: UInt64, encoder: LogEncoder? = nil, source: RecordSource? = nil) {
        self.mode = mode
        self.epochSeconds = epochSeconds
        self.encoder = encoder
        self.source = source
        hostBase = lk_monotonic_ns()
        // The replay cursor fills on first use (a live source has nothing before the seed is loaded).
    }

    // MARK: the hooks

    /// DeviceInputs: a device reads the clock.
    public func now() -> UInt64 { clock(.clockRead) }

    /// The clock, sampled (live) or read back (replay). Monotonic for the guest.
    @inline(__always) func clock(_ kind: EventKind) -> UInt64 {
        if mode == .replay { settle() }  // may go live
        if mode == .replay {
            guard let v = take(kind) else { return lastClock }
            lastClock = v
            return v
        }
        var t = lk_monotonic_ns() &- hostBase
        if t < lastClock { t = lastClock }
        lastClock = t
        log(kind, t)
        return t
    }

    /// Host ns at which guest time reaches `guestNs` (for the pacer).
    func hostTime(ofGuest guestNs: UInt64) -> UInt64 { guestNs &+ hostBase }

    /// Replay: is a timer sample logged at this exit?
    @inline(__always) func replayTimerDue() -> Bool { pendingIs(.timer) }

    /// Serial input: live mode pops from the backend queue, replay reads the logged byte.
    @inline(__always) func serialByte(live: () -> UInt8?) -> UInt8? {
        if mode == .replay { settle() }
        if mode == .replay {
            guard pendingIs(.serialInput), let v = take(.serialInput) else { return nil }
            return UInt8(truncatingIfNeeded: v)
        }
        guard let b = live() else { return nil }
        log(.serialInput, UInt64(b))
        return b
    }

    /// An injection decision: logged when recording, checked against the log when replaying.
    @inline(__always) func injected(_ vector: UInt8) { note(.inject, UInt64(vector)) }
    @inline(__always) func windowRequested() { note(.window, 0) }
    /// A state digest (`Engine.stateDigest`) over the registers and the RAM in `window`: logged, or checked
    /// against the log, a mismatch naming which half differs (registers: low 32 bits; RAM: high 32 bits).
    @inline(__always) func digest(_ value: UInt64, window: Range<Int>) {
        guard mode == .replay else { return note(.digest, value) }
        guard let logged = take(.digest), logged != value else { return }
        let what = (logged ^ value) & 0xFFFF_FFFF != 0 ? "the registers differ"
            : "RAM differs in guest physical 0x\(String(window.lowerBound, radix: 16))..<0x\(String(window.upperBound, radix: 16)) (registers equal)"
        fail(expected: "state digest 0x\(String(logged, radix: 16)) (from the log)", found: "0x\(String(value, radix: 16)): \(what)")
    }

    /// How often a recording writes a state digest (at the first natural exit once this much time passed).
    public static let digestIntervalNs: UInt64 = 50_000_000
    private var nextDigestNs: UInt64 = 0

    /// Whether this exit carries a state digest: in a replay, when the log has one here; while recording,
    /// when `digestIntervalNs` has passed since the last.
    @inline(__always) func digestDue() -> Bool {
        switch mode {
        case .run: return false
        case .replay: return pendingIs(.digest)
        case .record:
            let now = lk_monotonic_ns()
            guard now >= nextDigestNs else { return false }
            nextDigestNs = now &+ InputHooks.digestIntervalNs
            return true
        }
    }

    @inline(__always) private func note(_ kind: EventKind, _ value: UInt64) {
        switch mode {
        case .run: return
        case .record: log(kind, value)
        case .replay:
            if let v = take(kind), v != value {
                fail(expected: "\(kind) \(v) (from the log)", found: "\(kind) \(value) (recomputed by the replay)")
            }
        }
    }

    /// Record mode: appends one event at the current exit.
    @inline(__always) private func log(_ kind: EventKind, _ value: UInt64) {
        var sig = signature
        if exit >= faultAtExit { sig = ExitSignature(raw: sig.raw ^ 0x10); faultAtExit = .max }
        encoder?.append(Event(kind: kind, exit: exit, signature: sig, value: value))
    }

    /// Fault injection for tests of divergence handling: the first event logged at or after this exit carries a wrong
    /// signature (the run itself is unchanged; only its log lies). Set from `LOCKSTEP_FAULT_SIGNATURE_AT_EXIT`.
    public var faultAtExit: UInt64 = .max

    // MARK: replay cursor

    /// True when the next record is an event of `kind` at the current exit.
    @inline(__always) func pendingIs(_ kind: EventKind) -> Bool {
        settle()
        // After a divergence the cursor no longer moves: nothing is pending, so no loop waits on it.
        guard divergence == nil, pendingExit == exit, case .event(let e)? = pending else { return false }
        return e.kind == kind
    }

    /// The pending sync point at this exit, if the log has one next.
    func pendingSyncPoint() -> SyncPoint? {
        settle()
        guard divergence == nil, pendingExit == exit, case .syncPoint(let s)? = pending else { return nil }
        return s
    }

    func consumeSyncPoint() {
        if let observer, let p = pending { observer(p) }
        advanceCursor()
    }

    /// Whether any record remains at this exit (HLT in replay waits on these). May block on a live source.
    var hasPendingAtExit: Bool { settle(); return pendingExit == exit }
    var logEnded: Bool { ended }

    private func take(_ kind: EventKind) -> UInt64? {
        guard divergence == nil else { return nil }
        settle()
        guard mode == .replay else { return nil }  // went live: nothing left to compare with
        guard pendingExit == exit, case .event(let e)? = pending else {
            fail(expected: describePending(), found: "\(kind) at exit \(exit)")
            return nil
        }
        guard e.kind == kind else {
            fail(expected: "\(e.kind) at exit \(e.exit)", found: "\(kind) at exit \(exit)")
            return nil
        }
        guard e.signature == signature else {
            fail(expected: "\(kind) at \(e.signature)", found: "\(signature)")
            return nil
        }
        if let observer { observer(.event(e)) }
        advanceCursor()
        return e.value
    }

    func describePending() -> String {
        switch pending {
        case .event(let e)?: return "\(e.kind) at exit \(e.exit)"
        case .syncPoint(let s)?: return "sync point at exit \(s.exit)"
        case nil: return ended ? "end of log" : "no record"
        }
    }

    private func advanceCursor() {
        pending = nil
        pendingExit = .max
        pull()
    }

    /// Makes the cursor current for this exit: either the next record is known, or the source has said none
    /// exists at or before this exit. Cheap when already current (the per-exit path).
    @inline(__always) func settle() {
        if pending == nil, !ended, mode == .replay, exit >= emptyBefore { pull() }
    }

    private func pull() {
        guard let source else { ended = true; return }
        do {
            switch try source.next(atOrBefore: exit) {
            case .record(let r):
                pending = r
                switch r {
                case .event(let e): pendingExit = e.exit
                case .syncPoint(let s): pendingExit = s.exit
                }
            case .empty(let before): emptyBefore = before
            case .ended: ended = true
            case .goLive(let reason):
                goLive()
                onGoLive?(reason)
            }
        } catch {
            sourceError = error
            ended = true
        }
    }

    /// Called by the engine when the exit index moves on: a record left behind is a divergence.
    @inline(__always) func checkNothingSkipped() {
        settle()
        if mode == .replay, pendingExit < exit, divergence == nil {
            fail(expected: describePending(), found: "the guest reached exit \(exit) without it")
        }
    }

    func fail(expected: String, found: String) {
        if divergence == nil { divergence = Divergence(exit: exit, expected: expected, found: found) }
    }

    /// Continues from a snapshot's position (a seeded secondary).
    func resume(exit: UInt64, signature: ExitSignature, lastClock: UInt64) {
        self.exit = exit
        self.signature = signature
        self.lastClock = lastClock
        hostBase = lk_monotonic_ns() &- lastClock
        emptyBefore = 0
    }

    /// Go-live: switch from replaying the log to sampling the host, with the guest clock continuing
    /// monotonically from the last value it saw.
    public func goLive() {
        hostBase = lk_monotonic_ns() &- lastClock
        encoder = liveEncoder
        mode = liveEncoder == nil ? .run : .record
        pending = nil
        pendingExit = .max
        ended = true
    }
}
