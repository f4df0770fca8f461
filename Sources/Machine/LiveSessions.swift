import CLockstep
import EventLog

/// A machine that records into an in-memory encoder a pair can stream to a secondary: a primary, or a
/// secondary that went live and protects itself again.
public protocol RecordingSession: AnyObject {
    var machine: Machine { get }
    var encoder: LogEncoder { get }
    /// The exit index: every record for an earlier exit is in the encoder.
    var exit: UInt64 { get }
    /// The run's result and the trailer that closes its log.
    func finish(_ e: Ending) throws(MachineError) -> (SessionResult, LogTrailer)
    /// The engine waits in a HLT (between two of its steps).
    var isHalted: Bool { get }
}

extension Session {
    public var isHalted: Bool { engine.state == .halted }

    func trailer(_ e: Ending, encoder: LogEncoder) throws(MachineError) -> (SessionResult, LogTrailer) {
        let r = try result(e, events: encoder.eventCount, logBytes: 0)
        return (r, LogTrailer(endReason: e.endReason, exitStatus: e.exitStatus, finalExit: machine.hooks.exit,
                              eventCount: encoder.eventCount, syncPointCount: encoder.syncPointCount, stateDigest: r.digest))
    }
}

/// A pair's primary: records into an in-memory encoder whose frames the pair streams to the secondary.
public final class StreamRecordSession: Session, RecordingSession, @unchecked Sendable {
    public let encoder: LogEncoder

    public init(image: PVHImage, config: MachineConfig, output: SerialOutput?, frameTarget: Int = 32 << 10) throws(MachineError) {
        encoder = LogEncoder(frameTarget: frameTarget)
        super.init(machine: try Machine(image: image, config: config, mode: .record, encoder: encoder, output: output))
    }

    public func start() { begin() }
    public func stop() { end() }
    public func step() throws(MachineError) -> Engine.State { try engine.step() }
    public var exit: UInt64 { machine.hooks.exit }
    public func finish(_ e: Ending) throws(MachineError) -> (SessionResult, LogTrailer) { try trailer(e, encoder: encoder) }
}

/// A pair's secondary: replays a live log as it arrives and can go live where the log stops. Live, it
/// records into `encoder` (a `RecordingSession`), so it can seed a new secondary of its own.
public final class StandbySession: Session, RecordingSession, @unchecked Sendable {
    public let encoder = LogEncoder(frameTarget: 32 << 10)

    /// `recordWhenLive`: after go-live, record (for a new secondary) rather than just run. The log's source comes
    /// with the snapshot (`load`): the machine exists while the seed's pages arrive. `adopting`: the RAM an earlier
    /// machine of this side left (a delta seed writes only what differs into it).
    public init(image: PVHImage, config: MachineConfig, output: SerialOutput?, recordWhenLive: Bool = false,
                adopting: RetainedRAM? = nil) throws(MachineError) {
        super.init(machine: try Machine(image: image, config: config, mode: .replay, output: output, adopting: adopting))
        if recordWhenLive { machine.hooks.liveEncoder = encoder }
        machine.hooks.onGoLive = { [unowned self] reason in
            // Inputs are live from here (and recorded): the timers and wake-ups need the pacer.
            if recordWhenLive { machine.syncPoints?.encoder = encoder }
            startPacing()
            onGoLive?(reason)
        }
    }

    /// Fault injection for the state-digest test (`LOCKSTEP_FAULT_RAM_AT_EXIT`): flips the last byte of every
    /// digest window of RAM, a difference no register shows until the guest reads it. The pages count as
    /// written, as a replay's own wrong write would (a delta seed must find them).
    public func corruptRAMForTest() {
        let m = machine.memory, w = Engine.digestWindowBytes
        var pages: [Int] = []
        for end in stride(from: w, through: Int(m.size), by: w) {
            // SAFETY: end - 1 lies inside the guest's RAM mapping.
            (m.base + end - 1).storeBytes(of: (m.base + end - 1).load(as: UInt8.self) ^ 0x5A, as: UInt8.self)
            pages.append((end - 1) / 4096)
        }
        machine.syncPoints?.noteWritten(pages)
    }

    public func finish(_ e: Ending) throws(MachineError) -> (SessionResult, LogTrailer) { try trailer(e, encoder: encoder) }

    /// Called on the vCPU thread when the machine went live (after the pacer started).
    public var onGoLive: ((String) -> Void)?

    /// Loads the primary's snapshot (before the first step) and replays from `source`, which continues it.
    public func load(_ s: Snapshot, source: RecordSource) throws(MachineError) {
        (engine.ready, engine.ifFlag) = try machine.applySnapshot(s)
        machine.hooks.source = source
        if s.halted { engine.resumeHalted() }
    }

    public func start() { begin(pacing: false) }
    public func stop() { end() }
    public func step() throws(MachineError) -> Engine.State { try engine.step() }
    public var exit: UInt64 { machine.hooks.exit }
    public var isLive: Bool { machine.hooks.mode != .replay }
    public func result(_ e: Ending) throws(MachineError) -> SessionResult { try result(e, events: 0, logBytes: 0) }
}
