import CLockstep
import Devices
import EventLog

/// Where a replaying machine gets its records: a log file, or the live channel on a secondary.
public protocol RecordSource: AnyObject {
    /// The next record, or nil when the log has ended. A live source blocks (bounded by its heartbeat
    /// timeout) until the record arrives, so the replayer never runs ahead of the log.
    func nextRecord() throws -> LogRecord?
    /// A live source may declare that no event exists before `exit` (the primary's watermark). Files return nil.
    func horizon() -> UInt64?
}

/// A replay that does not match its log.
public struct Divergence: Error, CustomStringConvertible {
    public let exit: UInt64
    public let expected: String
    public let found: String
    public var report: String = ""
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
    let encoder: LogEncoder?
    let source: RecordSource?
    /// Guest time = host monotonic - hostBase (live). Moved on go-live so the guest clock stays monotonic.
    var hostBase: UInt64
    public private(set) var lastClock: UInt64 = 0
    /// The first mismatch seen inside a device callback (which cannot throw); the engine checks it after each exit.
    public internal(set) var divergence: Divergence?
    public internal(set) var sourceError: Error?
    /// Sees every record as replay consumes it (`lockstep log inspect`); nil otherwise.
    public var observer: ((LogRecord) -> Void)?

    // The replay cursor: the next record, read ahead by one.
    private var pending: LogRecord?
    /// Exit index of the pending record; UInt64.max when none is known.
    public private(set) var pendingExit: UInt64 = .max
    private var ended = false

    public init(mode: Mode, epochSeconds: UInt64, encoder: LogEncoder? = nil, source: RecordSource? = nil) {
        self.mode = mode
        self.epochSeconds = epochSeconds
        self.encoder = encoder
        self.source = source
        hostBase = lk_monotonic_ns()
        if mode == .replay { advanceCursor() }
    }

    // MARK: the hooks

    /// DeviceInputs: a device reads the clock.
    public func now() -> UInt64 { clock(.clockRead) }

    /// The clock, sampled (live) or read back (replay). Monotonic for the guest.
    @inline(__always) func clock(_ kind: EventKind) -> UInt64 {
        if mode == .replay {
            guard let v = take(kind) else { return lastClock }
            lastClock = v
            return v
        }
        var t = lk_monotonic_ns() &- hostBase
        if t < lastClock { t = lastClock }
        lastClock = t
        encoder?.append(Event(kind: kind, exit: exit, signature: signature, value: t))
        return t
    }

    /// Host ns at which guest time reaches `guestNs` (for the pacer).
    func hostTime(ofGuest guestNs: UInt64) -> UInt64 { guestNs &+ hostBase }

    /// Replay: is a timer sample logged at this exit?
    @inline(__always) func replayTimerDue() -> Bool { pendingIs(.timer) }

    /// Serial input: live mode pops from the backend queue, replay reads the logged byte.
    @inline(__always) func serialByte(live: () -> UInt8?) -> UInt8? {
        if mode == .replay {
            guard pendingIs(.serialInput), let v = take(.serialInput) else { return nil }
            return UInt8(truncatingIfNeeded: v)
        }
        guard let b = live() else { return nil }
        encoder?.append(Event(kind: .serialInput, exit: exit, signature: signature, value: UInt64(b)))
        return b
    }

    /// An injection decision: logged when recording, checked against the log when replaying.
    @inline(__always) func injected(_ vector: UInt8) { note(.inject, UInt64(vector)) }
    @inline(__always) func windowRequested() { note(.window, 0) }
    @inline(__always) func digest(_ value: UInt64) { note(.digest, value) }

    @inline(__always) private func note(_ kind: EventKind, _ value: UInt64) {
        switch mode {
        case .run: return
        case .record: encoder?.append(Event(kind: kind, exit: exit, signature: signature, value: value))
        case .replay:
            if let v = take(kind), v != value {
                fail(expected: "\(kind) \(v) (from the log)", found: "\(kind) \(value) (recomputed by the replay)")
            }
        }
    }

    // MARK: replay cursor

    /// True when the next record is an event of `kind` at the current exit.
    @inline(__always) func pendingIs(_ kind: EventKind) -> Bool {
        guard pendingExit == exit, case .event(let e)? = pending else { return false }
        return e.kind == kind
    }

    /// The pending sync point at this exit, if the log has one next.
    func pendingSyncPoint() -> SyncPoint? {
        guard pendingExit == exit, case .syncPoint(let s)? = pending else { return nil }
        return s
    }

    func consumeSyncPoint() {
        if let observer, let p = pending { observer(p) }
        advanceCursor()
    }

    /// Whether any record remains at this exit (HLT in replay waits on these).
    var hasPendingAtExit: Bool { pendingExit == exit }
    var logEnded: Bool { ended }

    private func take(_ kind: EventKind) -> UInt64? {
        guard divergence == nil else { return nil }
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
        guard let source else { pending = nil; pendingExit = .max; return }
        do {
            pending = try source.nextRecord()
        } catch {
            sourceError = error
            pending = nil
        }
        switch pending {
        case .event(let e)?: pendingExit = e.exit
        case .syncPoint(let s)?: pendingExit = s.exit
        case nil: pendingExit = .max; ended = true
        }
    }

    /// Called by the engine when the exit index moves on: a record left behind is a divergence.
    @inline(__always) func checkNothingSkipped() {
        if mode == .replay, pendingExit < exit, divergence == nil {
            fail(expected: describePending(), found: "the guest reached exit \(exit) without it")
        }
    }

    func fail(expected: String, found: String) {
        if divergence == nil { divergence = Divergence(exit: exit, expected: expected, found: found) }
    }

    /// Go-live: switch from replaying the log to sampling the host, with the guest clock continuing
    /// monotonically from the last value it saw.
    public func goLive() {
        hostBase = lk_monotonic_ns() &- lastClock
        mode = .run
        pending = nil
        pendingExit = .max
    }
}
