import CLockstep
import Devices
import EventLog
import Glibc
import KVM
import Synchronization

/// How a run ended.
public enum Ending: Equatable, Sendable {
    /// The guest wrote `status` to isa-debug-exit (port 0xF4).
    case guestExit(status: UInt8)
    /// Triple fault or a KVM shutdown/reset request.
    case shutdown(String)
    /// `cli; hlt` (or halted with nothing that could ever wake it).
    case haltedForever
    /// An operator or the pair asked the machine to stop.
    case stopped

    /// The status a process ends with for this ending (and the pair record's `ended STATUS`): the guest's own
    /// value, 71 for a crash, 0 when stopped.
    public var processStatus: Int32 {
        switch self {
        case .guestExit(let s): return Int32(s)
        case .shutdown, .haltedForever: return Ending.crashedStatus
        case .stopped: return 0
        }
    }

    /// `lockstep`'s "guest crashed" status.
    public static let crashedStatus: Int32 = 71
}

public enum MachineError: Error, CustomStringConvertible {
    case kvm(KVMError)
    case image(ImageError)
    case sys(SysError)
    case log(LogError)
    case divergence(Divergence)
    case guestFault(String)
    case config(String)

    public var description: String {
        switch self {
        case .kvm(let e): return e.description
        case .image(let e): return e.description
        case .sys(let e): return "KVM call failed: \(e.description)"
        case .log(let e): return e.description
        case .divergence(let d): return d.description
        case .guestFault(let s): return s
        case .config(let s): return s
        }
    }
}

/// The vCPU loop. An explicit state machine: every KVM_RUN return goes through `step()`, and every exit
/// through `handleExit`. Record, replay and run share this code; the mode only changes what the
/// recording hooks (`InputHooks`) do and whether sync points are written or loaded.
public final class Engine {
    /// `halted`: the guest executed HLT and waits for an interrupt; each step is one wait, so the runner gets
    /// the thread between two (to attach or seed a secondary while the guest sleeps).
    public enum State: Equatable { case entering, halted, finished(Ending) }

    public let machine: Machine
    public private(set) var state: State = .entering
    let hooks: InputHooks
    let vcpu: VCPU
    let devices: DeviceSet
    let pacer: Pacer?
    let syncPoints: SyncPointStore?
    /// Injection readiness as of the last return from KVM_RUN (or the last loaded sync point).
    var ready = false
    var ifFlag = false
    var windowRequested = false
    var stopRequested = false
    /// Replaying a recording an operator stopped: the exit it stopped at (its trailer's). The replay stops
    /// there once the log holds nothing more for that exit, where the recorder's stop came.
    public var stoppedAtExit: UInt64?
    public private(set) var kicks: UInt64 = 0
    public private(set) var windowExits: UInt64 = 0
    /// The last sync point's capture time (ns), until its batch has left (`beforeEntry`): together its cost,
    /// which sets the pacer's latency bound. 0: none pending.
    private var syncPointCaptureNs: UInt64 = 0
    /// A state digest covers the registers and one window of RAM this size, picked by hashing the exit index:
    /// both sides agree on it with no state to carry in a seed, and a guest whose exits come at a fixed pace
    /// still visits every window (a 256 MiB guest has 512: most are checked within a minute at the
    /// recording's 50 ms pace, all within a few).
    static let digestWindowBytes = 512 << 10
    /// Steps that got somewhere (natural exits, loaded sync points): what a watchdog watches.
    let progress = Atomic<UInt64>(0)
    /// Set (with a kick) to get the vCPU out of a replayed guest; `stall` says why, if it is an error.
    let interruptRequested = Atomic<Bool>(false)
    let stall = Mutex<String?>(nil)

    init(machine: Machine) {
        self.machine = machine
        hooks = machine.hooks
        vcpu = machine.vcpu
        devices = machine.devices
        pacer = machine.pacer
        syncPoints = machine.syncPoints
    }

    /// The session spent `ns` writing out what it buffered (a recording's file write): part of the pending sync
    /// point's cost, when one is pending.
    func addToSyncPointCost(_ ns: UInt64) {
        if syncPointCaptureNs != 0 { syncPointCaptureNs &+= ns }
    }

    /// One trip through the guest: deliver a due interrupt, enter, handle what came back.
    public func step() throws(MachineError) -> State {
        switch state {
        case .entering: break
        case .halted: return try haltedStep()
        case .finished: return state
        }
        // The kick may have been absorbed by a KVM_RUN of our own (completing I/O): the flag decides.
        if hooks.mode == .replay, interruptRequested.load(ordering: .acquiring) { return try interruptedReplay() }
        deliverInterrupt()
        if hooks.mode == .replay, let sp = hooks.pendingSyncPoint() {
            // The recorded run was kicked here: load its state instead of executing the gap.
            do { (ready, ifFlag) = try syncPoints!.apply(sp, vcpu: vcpu) } catch { throw .guestFault("cannot load sync point at exit \(sp.exit): \(error)") }
            hooks.consumeSyncPoint()
            progress.add(1, ordering: .relaxed)
            serviceAsync()
            return try checked()
        }
        // A pending sync point's batch leaves here; what the runner did between the steps (a seed, flow
        // control) is not its cost.
        let flushBegan = syncPointCaptureNs != 0 ? lk_monotonic_ns() : 0
        machine.beforeEntry?()
        if flushBegan != 0 {
            pacer?.syncPointTook(syncPointCaptureNs &+ (lk_monotonic_ns() &- flushBegan))
            syncPointCaptureNs = 0
        }
        let outcome: RunOutcome
        do { outcome = try vcpu.enter() } catch { throw .sys(error) }
        ready = vcpu.readyForInjection
        ifFlag = vcpu.interruptFlag
        switch outcome {
        case .interrupted:
            if hooks.mode == .replay, interruptRequested.load(ordering: .acquiring) { return try interruptedReplay() }
            try asynchronousStop()
        case .exit(UInt32(LK_EXIT_IRQ_WINDOW_OPEN)):
            // Not a deterministic point on every KVM (PVM delivers it late): handled like a kick.
            windowExits += 1
            windowRequested = false
            vcpu.requestInterruptWindow(false)
            try asynchronousStop()
        case .exit(let reason):
            hooks.exit &+= 1
            progress.add(1, ordering: .relaxed)
            let rip = lk_run_rip(vcpu.run)
            hooks.signature = signature(reason: reason, rip: rip)
            hooks.checkNothingSkipped()
            try handleExit(reason)
            if state != .halted { exitHandled() }
        }
        return try checked()
    }

    /// The end of an exit's handling (for HLT: once the halt is over).
    @inline(__always) private func exitHandled() {
        if case .entering = state { serviceAsync() }
        if hooks.digestDue() {
            let (value, window) = stateDigest()
            hooks.digest(value, window: window)
        }
    }

    /// Someone asked for the replaying vCPU back: with a reason it is a stall (an error), without one the
    /// caller just wants control (an abandoned stream).
    private func interruptedReplay() throws(MachineError) -> State {
        interruptRequested.store(false, ordering: .releasing)
        if let why = stall.withLock({ $0 }) {
            throw .divergence(report(Divergence(exit: hooks.exit, expected: hooks.describePending(), found: why)))
        }
        return try checked()
    }

    /// The guest stopped at a point no replay can find again (a kick, a window exit). Recording writes a
    /// sync point; a replay (which is never kicked) just re-enters.
    private func asynchronousStop() throws(MachineError) {
        if hooks.mode == .record {
            kicks += 1
            let began = lk_monotonic_ns()
            do { try syncPoints!.capture(vcpu: vcpu, hooks: hooks) } catch { throw .sys(error) }
            syncPointCaptureNs = max(1, lk_monotonic_ns() &- began)
        }
        if hooks.mode != .replay { serviceAsync() }
    }

    private func checked() throws(MachineError) -> State {
        if let d = hooks.divergence { throw .divergence(report(d)) }
        if let e = hooks.sourceError {
            if let le = e as? LogError { throw .log(le) }
            throw .config("log source failed: \(e)")
        }
        if case .entering = state, stopRequested || recordedStopReached { state = .finished(.stopped) }
        return state
    }

    @inline(__always) private var recordedStopReached: Bool { hooks.exit == stoppedAtExit && !hooks.hasPendingAtExit }

    // MARK: interrupts

    /// Injects the PIC's pending interrupt when the vCPU can take it, else asks for a window.
    @inline(__always) private func deliverInterrupt() {
        if hooks.mode == .replay { replayInterrupt(); return }
        guard devices.pic.interruptPending else { return }
        // Record/run: inject when KVM says the vCPU can take it, else ask for a window.
        if ready {
            let vector = devices.pic.acknowledge()
            hooks.injected(vector)
            if windowRequested { windowRequested = false; vcpu.requestInterruptWindow(false) }
            ready = false
            do { try vcpu.inject(vector: vector) } catch { hooks.fail(expected: "KVM_INTERRUPT to succeed", found: error.description) }
        } else if !windowRequested {
            windowRequested = true
            hooks.windowRequested()
            vcpu.requestInterruptWindow(true)
        }
    }

    /// Replay does what the log says at this exit rather than recomputing readiness: KVM's
    /// ready_for_interrupt_injection is not a pure function of guest state on every KVM (PVM reports it
    /// differently when no window was requested). The vector is still checked against the PIC.
    @inline(__always) private func replayInterrupt() {
        if hooks.pendingIs(.inject) {
            let vector = devices.pic.interruptPending ? devices.pic.acknowledge() : 0
            hooks.injected(vector)
            windowRequested = false
            ready = false
            if hooks.pendingSyncPoint() != nil { return }
            do { try vcpu.inject(vector: vector) } catch { hooks.fail(expected: "KVM_INTERRUPT to succeed", found: error.description) }
        } else if hooks.pendingIs(.window) {
            hooks.windowRequested()
            windowRequested = true
        }
    }

    // MARK: asynchronous inputs (time, serial)

    /// Applies what became due since the last exit: a timer sample, serial input, a stop request.
    @inline(__always) func serviceAsync() {
        let due = pacer?.takeDue() ?? []
        let timer = hooks.mode == .replay ? hooks.replayTimerDue() : due.contains(.timer)
        if timer {
            repeat {
                devices.advance(to: hooks.clock(.timer))
            } while hooks.mode == .replay && hooks.replayTimerDue()
            publishDeadline()
        }
        if hooks.mode == .replay || machine.input.hasData {
            while devices.uart.rxSpace > 0, let b = hooks.serialByte(live: { machine.input.pop() }) {
                devices.uart.receive(b)
            }
        }
        if due.contains(.stop) { stopRequested = true }
    }

    func publishDeadline() {
        guard let pacer else { return }
        pacer.publishDeadline(devices.nextDeadline().map { hooks.hostTime(ofGuest: $0) } ?? .max)
    }

    // MARK: exits

    @inline(__always) private func handleExit(_ reason: UInt32) throws(MachineError) {
        switch Int(reason) {
        case Int(LK_EXIT_IO): handleIO()
        case Int(LK_EXIT_MMIO): handleMMIO()
        case Int(LK_EXIT_HLT): handleHalt()
        case Int(LK_EXIT_SHUTDOWN):
            state = .finished(.shutdown("the guest triple-faulted (KVM_EXIT_SHUTDOWN) at exit \(hooks.exit), RIP 0x\(String(lk_run_rip(vcpu.run), radix: 16))"))
        case Int(LK_EXIT_SYSTEM_EVENT):
            state = .finished(.shutdown("the guest requested a system event of type \(lk_run_system_event_type(vcpu.run))"))
        case Int(LK_EXIT_INTERNAL_ERROR):
            throw .guestFault("KVM internal error (suberror \(lk_run_internal_suberror(vcpu.run))) at exit \(hooks.exit), RIP 0x\(String(lk_run_rip(vcpu.run), radix: 16)): KVM could not emulate the guest's instruction")
        case Int(LK_EXIT_FAIL_ENTRY):
            throw .guestFault("KVM could not enter the guest (hardware reason 0x\(String(lk_run_fail_entry_reason(vcpu.run), radix: 16)))")
        default:
            throw .guestFault("unexpected KVM exit reason \(reason) at exit \(hooks.exit)")
        }
    }

    @inline(__always) private func handleIO() {
        let run = vcpu.run
        let port = lk_run_io_port(run), size = Int(lk_run_io_size(run)), count = Int(lk_run_io_count(run))
        let data = lk_run_io_data(run)!
        let out = lk_run_io_direction(run) == 1
        for i in 0..<count {
            // SAFETY: data points into the kvm_run page at data_offset; KVM sizes it for count * size bytes.
            let p = UnsafeMutableRawPointer(data) + i * size
            if out {
                let v: UInt32 = size == 1 ? UInt32(p.load(as: UInt8.self)) : size == 2 ? UInt32(p.loadUnaligned(as: UInt16.self)) : p.loadUnaligned(as: UInt32.self)
                devices.bus.write(port: port, size: size, value: v)
            } else {
                let v = devices.bus.read(port: port, size: size)
                switch size {
                case 1: p.storeBytes(of: UInt8(truncatingIfNeeded: v), as: UInt8.self)
                case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: v), as: UInt16.self)
                default: p.storeBytes(of: v, as: UInt32.self)
                }
            }
        }
        if devices.debugExit.exitRequested {
            state = .finished(.guestExit(status: devices.debugExit.exitStatus))
        } else if Machine.timedPorts(port) {
            publishDeadline()
        }
    }

    private func handleMMIO() {
        let run = vcpu.run
        let addr = lk_run_mmio_addr(run)
        machine.noteUnknownMMIO(addr, write: lk_run_mmio_is_write(run) != 0)
        if lk_run_mmio_is_write(run) == 0 {
            // SAFETY: mmio.data is an 8-byte array inside kvm_run.
            UnsafeMutableRawPointer(lk_run_mmio_data(run)!).initializeMemory(as: UInt8.self, repeating: 0xFF, count: 8)
        }
    }

    /// HLT: the vCPU sleeps until an interrupt is deliverable. KVM returns RIP after the HLT, so the engine
    /// must not re-enter before one is pending: it stays `halted`, one wait per step.
    private func handleHalt() {
        machine.output?.flush()
        if !(devices.pic.interruptPending && ifFlag) { state = .halted }
    }

    /// A seeded secondary whose primary was halted at the seed's exit continues the halt.
    func resumeHalted() {
        vcpu.completePendingIO()  // fills kvm_run's register area, which the halt's end may digest
        state = .halted
    }

    /// One wait of a halted vCPU: for the log's next record at this exit (replay), or for something due.
    private func haltedStep() throws(MachineError) -> State {
        if stopRequested || recordedStopReached {
            state = .finished(.stopped)
        } else if hooks.mode == .replay {
            let has = hooks.hasPendingAtExit  // a live source blocks here until the primary moves on
            if hooks.mode != .replay {
                // The secondary went live while halted: the next step waits as a live machine.
            } else if !has {
                if hooks.logEnded && !ifFlag {
                    state = .finished(.haltedForever)
                } else {
                    throw .divergence(report(Divergence(exit: hooks.exit, expected: hooks.describePending(),
                                                        found: "the guest halted at exit \(hooks.exit) with nothing in the log to wake it")))
                }
            } else {
                let before = hooks.pendingExit
                serviceAsync()
                if let d = hooks.divergence { throw .divergence(report(d)) }
                // A record that is neither time nor input while halted: let the loop consume it.
                if before == hooks.pendingExit, hooks.hasPendingAtExit, !devices.pic.interruptPending { state = .entering }
            }
        } else if !ifFlag {
            // cli; hlt: only an NMI could wake a real CPU, and this machine has no NMI source.
            state = .finished(.haltedForever)
        } else {
            machine.onIdle?()
            pacer!.waitUntilDue()
            serviceAsync()
        }
        if state == .halted, devices.pic.interruptPending && ifFlag { state = .entering }
        if state != .halted { exitHandled() }
        return try checked()
    }

    /// Adds where the guest is: the last exit's signature, RIP, and the instructions there.
    func report(_ d: Divergence) -> Divergence {
        var d = d
        let rip = (try? vcpu.regs().rip) ?? lk_run_rip(vcpu.run)
        let code = Disassembler.around(vcpu: vcpu, memory: machine.memory, count: 4)
        d.report = "  last exit: \(hooks.signature)\n  RIP 0x\(String(rip, radix: 16))\n" + code.map { "    " + $0 }.joined(separator: "\n")
        return d
    }

    // MARK: signatures

    @inline(__always) private func signature(reason: UInt32, rip: UInt64) -> ExitSignature {
        let run = vcpu.run
        switch Int(reason) {
        case Int(LK_EXIT_IO):
            return ExitSignature(kind: UInt8(truncatingIfNeeded: reason), portLow: UInt8(truncatingIfNeeded: lk_run_io_port(run)),
                                 size: lk_run_io_size(run), ripLow: UInt16(truncatingIfNeeded: rip))
        case Int(LK_EXIT_MMIO):
            return ExitSignature(kind: UInt8(truncatingIfNeeded: reason), portLow: UInt8(truncatingIfNeeded: lk_run_mmio_addr(run)),
                                 size: UInt8(truncatingIfNeeded: lk_run_mmio_len(run)), ripLow: UInt16(truncatingIfNeeded: rip))
        default:
            return ExitSignature(kind: UInt8(truncatingIfNeeded: reason), portLow: 0, size: 0, ripLow: UInt16(truncatingIfNeeded: rip))
        }
    }

    /// The registers' digest, its high half XORed with the CRC32C of this digest's window of RAM (returned with
    /// it): memory that differs is found within one sweep of the windows even when no register shows it yet.
    private func stateDigest() -> (UInt64, Range<Int>) {
        let memory = machine.memory
        let window = Engine.digestWindowBytes
        let windows = max(1, Int(memory.size) / window)
        var h = hooks.exit &+ 0x9E37_79B9_7F4A_7C15  // splitmix64's finalizer
        h = (h ^ h >> 30) &* 0xBF58_476D_1CE4_E5B9
        h = (h ^ h >> 27) &* 0x94D0_49BB_1331_11EB
        let offset = Int((h ^ h >> 31) % UInt64(windows)) * window
        let count = min(window, Int(memory.size) - offset)
        // SAFETY: offset + count stays inside the guest's RAM mapping, which lives as long as the machine.
        let crc = lk_crc32c(0, memory.base + offset, count)
        return (registerDigest() ^ UInt64(crc) << 32, offset..<offset + count)
    }

    /// FNV-1a over the general registers KVM synced into kvm_run at this exit.
    private func registerDigest() -> UInt64 {
        // SAFETY: kvm_regs lives inside the kvm_run page for the vCPU's lifetime.
        let p = UnsafeRawPointer(lk_run_regs(vcpu.run)!)
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for i in 0..<(144 / 8) { h = (h ^ p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) &* 0x100_0000_01b3 }
        return h
    }
}
