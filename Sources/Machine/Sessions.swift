import CLockstep
import EventLog
import Foundation
import Synchronization

/// What a finished run reports.
public struct SessionResult: Sendable {
    public var ending: Ending
    public var digest: [UInt8]
    public var exits: UInt64
    public var events: UInt64
    public var syncPoints: UInt64
    public var syncPointPages: UInt64
    /// The most pages one sync point carried.
    public var largestSyncPointPages: UInt64
    /// Of `syncPointPages`, those the dirty log had left writable since the fetch before (hot pages).
    public var hotSyncPointPages: UInt64
    public var kicks: UInt64
    /// The longest sync points' cost stretched the interrupt latency bound to (µs; 0: never beyond its floor).
    public var peakLatencyBoundUs: UInt64
    public var windowExits: UInt64
    public var elapsedNs: UInt64
    public var logBytes: UInt64
    public var digestHex: String { StateDigest.hex(digest) }
}

/// Shared driving of an engine on the current thread (which becomes the vCPU thread).
public class Session: @unchecked Sendable {  // requestStop, interruptReplay and progress are for other threads
    public let machine: Machine
    public let engine: Engine
    var started: UInt64 = 0

    init(machine: Machine) {
        self.machine = machine
        engine = Engine(machine: machine)
    }

    /// Without pacing (a replay) the thread stays where the scheduler puts it: pinning a standby's replay off
    /// the primary's vCPU core on one host measured no better.
    func begin(pacing: Bool = true) {
        if pacing { startPacing() } else { machine.pacer?.bindVCPUThread(run: machine.vcpu.run, core: nil) }
        started = lk_monotonic_ns()
    }

    /// Stops a replay that cannot go on (from any thread): the vCPU is kicked out of the guest, and the
    /// step fails with a divergence naming `reason` (nil: the step just returns, for a caller that stops).
    public func interruptReplay(_ reason: String?) {
        if let reason { engine.stall.withLock { $0 = reason } }
        engine.interruptRequested.store(true, ordering: .releasing)
        machine.pacer?.kickNow()
    }

    /// Natural exits and sync points so far; a watchdog compares two readings.
    public var progress: UInt64 { engine.progress.load(ordering: .relaxed) }

    /// Starts the pacer (timers, input wake-ups, kicks) with this thread as the vCPU thread.
    func startPacing() {
        guard let pacer = machine.pacer else { return }
        pacer.bindVCPUThread(run: machine.vcpu.run, core: Cores.vcpu)
        engine.publishDeadline()
        pacer.start()
    }

    func end() {
        machine.pacer?.stop()
        machine.output?.flush()
    }

    /// Asks a running session to stop at its next exit (from any thread).
    public func requestStop() { machine.pacer?.requestStop() }

    func result(_ ending: Ending, events: UInt64, logBytes: UInt64) throws(MachineError) -> SessionResult {
        SessionResult(ending: ending, digest: try machine.stateDigest(), exits: machine.hooks.exit, events: events,
                      syncPoints: machine.syncPointCount, syncPointPages: machine.syncPointPages,
                      largestSyncPointPages: machine.largestSyncPointPages, hotSyncPointPages: machine.hotSyncPointPages,
                      kicks: machine.pacer?.kicks.load(ordering: .relaxed) ?? 0,
                      peakLatencyBoundUs: machine.pacer?.peakStretchUs ?? 0,
                      windowExits: engine.windowExits,
                      elapsedNs: lk_monotonic_ns() - started, logBytes: logBytes)
    }
}

/// `lockstep run`: the guest, unprotected, no log.
public final class RunSession: Session, @unchecked Sendable {
    public init(image: PVHImage, config: MachineConfig, output: SerialOutput?, keepTranscript: Bool = false) throws(MachineError) {
        super.init(machine: try Machine(image: image, config: config, mode: .run, output: output, keepTranscript: keepTranscript))
    }

    public func step() throws(MachineError) -> Engine.State { try engine.step() }

    public func run() throws(MachineError) -> SessionResult {
        begin()
        defer { end() }
        while true {
            if case .finished(let e) = try step() { return try result(e, events: 0, logBytes: 0) }
        }
    }
}

/// `lockstep record`: the guest with every nondeterministic input written to a log.
public final class RecordSession: Session, @unchecked Sendable {
    public let writer: LogFileWriter

    public init(image: PVHImage, config: MachineConfig, logPath: String, output: SerialOutput?, keepTranscript: Bool = false) throws(MachineError) {
        let header = LogHeader(formatVersion: LogHeader.currentVersion, memoryMiB: config.memoryMiB, vcpus: 1,
                               interruptLatencyUs: config.interruptLatencyUs, epochSeconds: config.epochSeconds,
                               imageSHA256: StateDigest.sha256(image.bytes), image: image.bytes,
                               cpuidSHA256: try CPUIDTable.hostDigest(), hostInfo: RecordSession.hostInfo())
        do { writer = try LogFileWriter(path: logPath, header: header) } catch { throw .log(error) }
        do {
            let m = try Machine(image: image, config: config, mode: .record, encoder: writer.encoder, output: output, keepTranscript: keepTranscript)
            super.init(machine: m)
        } catch {
            writer.abandon()
            throw error
        }
    }

    static func hostInfo() -> String {
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        return "linux \(release)"
    }

    public func step() throws(MachineError) -> Engine.State {
        let s = try engine.step()
        let began = lk_monotonic_ns()
        do { try writer.flushIfNeeded() } catch { throw .log(error) }
        engine.addToSyncPointCost(lk_monotonic_ns() &- began)
        return s
    }

    public func run() throws(MachineError) -> SessionResult {
        begin()
        var finished = false
        defer { end(); if !finished { writer.abandon() } }
        while true {
            // On an error the deferred abandon() keeps the .partial log for inspection.
            guard case .finished(let e) = try step() else { continue }
            let r = try result(e, events: writer.encoder.eventCount, logBytes: 0)
            let trailer = LogTrailer(endReason: e.endReason, exitStatus: e.exitStatus, finalExit: machine.hooks.exit,
                                     eventCount: writer.encoder.eventCount, syncPointCount: writer.encoder.syncPointCount,
                                     stateDigest: r.digest)
            do { try writer.finish(trailer: trailer) } catch { throw .log(error) }
            finished = true
            var out = r
            out.logBytes = writer.bytesWritten
            return out
        }
    }
}

/// Reads records from a finished log file.
final class FileRecordSource: RecordSource {
    let reader: LogFileReader
    /// The record handed out last, with where it lies in the file: the one a replay observer is shown (the
    /// cursor reads one ahead only after it was consumed).
    private(set) var last: LocatedRecord?
    init(_ reader: LogFileReader) { self.reader = reader }
    func next(atOrBefore exit: UInt64) throws -> SourceRead {
        guard let r = try reader.nextLocated() else { return .ended }
        last = r
        return .record(r.record)
    }
}

/// `lockstep replay`: re-executes a log with no real clock and no real input.
public final class ReplaySession: Session, @unchecked Sendable {
    public let reader: LogFileReader
    private let source: FileRecordSource
    /// The record the replay consumed last, located in the file (for `hooks.observer`).
    public var lastLocated: LocatedRecord? { source.last }

    /// `image` overrides the embedded one; it must be the recorded image.
    public init(logPath: String, image override: [UInt8]? = nil, output: SerialOutput?, keepTranscript: Bool = false) throws(MachineError) {
        do { reader = try LogFileReader(path: logPath) } catch { throw .log(error) }
        let h = reader.header
        let bytes = override ?? h.image
        if override != nil, StateDigest.sha256(bytes) != h.imageSHA256 {
            throw .config("the guest image given does not match the log: the log was recorded with image sha256 \(StateDigest.hex(h.imageSHA256)), this image is \(StateDigest.hex(StateDigest.sha256(bytes)))")
        }
        guard StateDigest.sha256(bytes) == h.imageSHA256 else {
            throw .log(.corrupt(offset: 0, detail: "the embedded guest image does not match its recorded sha256"))
        }
        let image: PVHImage
        do { image = try PVHImage(bytes: bytes) } catch { throw .image(error) }
        let config = MachineConfig(memoryMiB: h.memoryMiB, interruptLatencyUs: h.interruptLatencyUs, epochSeconds: h.epochSeconds)
        let cpuid = try CPUIDTable.hostDigest()
        guard cpuid == h.cpuidSHA256 else {
            throw .config("this host's pinned CPUID table (sha256 \(StateDigest.hex(cpuid))) differs from the one the log was recorded with (\(StateDigest.hex(h.cpuidSHA256))): replay needs an identical table (same CPU vendor and baseline features)")
        }
        source = FileRecordSource(reader)
        super.init(machine: try Machine(image: image, config: config, mode: .replay, source: source,
                                        output: output, keepTranscript: keepTranscript))
        if reader.trailer.endReason == .stopped { engine.stoppedAtExit = reader.trailer.finalExit }
    }

    public func step() throws(MachineError) -> Engine.State { try engine.step() }

    /// A replay that makes no progress for this long is stuck (a log whose values were altered can steer the
    /// guest into a loop with no exits): it fails as a divergence. 0: no watchdog.
    public var stallSeconds: UInt64 = 60

    public func run() throws(MachineError) -> SessionResult {
        begin(pacing: false)
        let watchdog = stallSeconds > 0 ? Watchdog(session: self, seconds: stallSeconds) : nil
        defer { watchdog?.stop(); end() }
        while true {
            guard case .finished(let e) = try step() else { continue }
            let r = try result(e, events: reader.trailer.eventCount, logBytes: 0)
            let t = reader.trailer
            if machine.hooks.exit != t.finalExit || e.endReason != t.endReason || e.exitStatus != t.exitStatus {
                throw .divergence(engine.report(Divergence(exit: machine.hooks.exit, expected: "the run to end at exit \(t.finalExit) (\(t.endReason), status \(t.exitStatus))",
                                             found: "it ended at exit \(machine.hooks.exit) (\(e.endReason), status \(e.exitStatus))")))
            }
            if r.digest != t.stateDigest {
                throw .divergence(engine.report(Divergence(exit: machine.hooks.exit, expected: "state digest \(StateDigest.hex(t.stateDigest))",
                                             found: "state digest \(r.digestHex)")))
            }
            return r
        }
    }
}

extension Ending {
    public var endReason: EndReason {
        switch self {
        case .guestExit: return .guestExit
        case .shutdown, .haltedForever: return .shutdown
        case .stopped: return .stopped
        }
    }
    public var exitStatus: UInt32 {
        if case .guestExit(let s) = self { return UInt32(s) }
        return 0
    }
}

/// Kicks a replay out of the guest when it has made no progress for `seconds`.
final class Watchdog: @unchecked Sendable {
    private let wake = lk_eventfd()
    private let stopped = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)

    init(session: Session, seconds: UInt64) {
        startThread("lockstep-watchdog") { [self, unowned session] in
            var last = session.progress
            var since = lk_monotonic_ns()
            while !stopped.load(ordering: .acquiring) {
                _ = lk_eventfd_wait(wake, lk_monotonic_ns() + 1_000_000_000)
                let p = session.progress, now = lk_monotonic_ns()
                if p != last { last = p; since = now; continue }
                if now &- since >= seconds * 1_000_000_000 {
                    session.interruptReplay("no exit for \(seconds) s: the replayed guest is running where the recorded one was not (a loop its log cannot explain)")
                    break
                }
            }
            done.signal()
        }
    }

    func stop() {
        stopped.store(true, ordering: .releasing)
        lk_eventfd_signal(wake)
        done.wait()
        close(wake)
    }
}
