import CLockstep
import EventLog
import KVM

/// A running machine's state apart from its RAM, as a new secondary loads it: the vCPU, the devices, and
/// where the recording hooks are (exit index, last signature, last guest clock value). The pages travel on
/// their own: a primary's pre-copy sends them while the guest runs, and the secondary writes them into its
/// RAM as they arrive (`writeSeedPages`) before it loads this.
public struct Snapshot: Sendable {
    public var exit: UInt64
    public var signature: UInt32
    public var lastClock: UInt64
    public var vcpuState: [UInt8]
    public var deviceState: [UInt8]
    /// The guest waits in HLT (the exit is the HLT's): the engine continues the halt, it does not enter.
    public var halted: Bool

    public init(exit: UInt64, signature: UInt32, lastClock: UInt64, vcpuState: [UInt8], deviceState: [UInt8], halted: Bool) {
        self.exit = exit; self.signature = signature; self.lastClock = lastClock; self.vcpuState = vcpuState
        self.deviceState = deviceState; self.halted = halted
    }
}

extension Machine {
    /// The vCPU, devices and hooks between two exits or in a halt (`halted`, the engine's state) (vCPU thread,
    /// guest not running): the last step of a pre-copy seed, whose pages went ahead while the guest ran.
    public func captureState(halted: Bool) throws(MachineError) -> Snapshot {
        guard let store = syncPoints else { throw .config("snapshots need dirty tracking (record or replay mode)") }
        if hooks.exit > 0 { vcpu.completePendingIO() }
        do {
            let state = try vcpu.captureState(msrs: store.msrs)
            return Snapshot(exit: hooks.exit, signature: hooks.signature.raw, lastClock: hooks.lastClock,
                            vcpuState: state.bytes, deviceState: devices.stateBytes(), halted: halted)
        } catch { throw .sys(error) }
    }

    /// The pages the loader wrote into `into` (`dirtyBitmapWords` words); other pages not in the dirty log are zero.
    public func loadedPages(into: UnsafeMutablePointer<UInt64>) throws(MachineError) {
        guard let store = syncPoints else { throw .config("seeding needs dirty tracking (record or replay mode)") }
        into.update(from: store.loaded, count: dirtyBitmapWords)
    }

    /// Words in a dirty bitmap of this machine's RAM (one bit per page).
    public var dirtyBitmapWords: Int { (memory.pageCount + 63) / 64 }

    /// Pre-copy seeding: the pages written since the previous call (since boot when `sinceBoot`) into
    /// `into` (`dirtyBitmapWords` words). Any thread, while the guest runs; sync points still see every page.
    public func takeDirtyPages(into: UnsafeMutablePointer<UInt64>, sinceBoot: Bool) throws(MachineError) {
        guard let store = syncPoints else { throw .config("seeding needs dirty tracking (record or replay mode)") }
        do { try store.takeDirty(into: into, sinceBoot: sinceBoot) } catch { throw .sys(error) }
    }

    /// A secondary being seeded: writes a chunk of the primary's pages straight into RAM as it arrives (before
    /// `StandbySession.load`, whose snapshot then carries no pages), so the seed needs no copy of its own.
    /// Pre-copy sends a page again when the guest wrote it after it was sent: the last copy wins.
    public func writeSeedPages(_ numbers: [UInt32], data: UnsafeRawBufferPointer) throws(MachineError) {
        guard let store = syncPoints else { throw .config("seeding needs dirty tracking (replay mode)") }
        guard data.count == numbers.count * 4096 else { throw .config("\(data.count) bytes for \(numbers.count) pages") }
        if let bad = numbers.first(where: { Int($0) >= memory.pageCount }) {
            throw .config("page \(bad) is beyond RAM (\(memory.pageCount) pages)")
        }
        numbers.withUnsafeBufferPointer { store.writePages($0, data: data.baseAddress) }
    }

    /// Loads a snapshot into a freshly booted machine of the same image and config (its pages already
    /// written). Returns the injection readiness and IF recorded with the vCPU state.
    func applySnapshot(_ s: Snapshot) throws(MachineError) -> (ready: Bool, ifFlag: Bool) {
        guard let store = syncPoints else { throw .config("snapshots need dirty tracking (record or replay mode)") }
        let flags: (Bool, Bool)
        do {
            flags = try store.apply(SyncPoint(exit: s.exit, signature: ExitSignature(raw: s.signature), vcpuState: s.vcpuState,
                                              pageNumbers: [], pageData: []), vcpu: vcpu)
        } catch let e as MachineError { throw e } catch { throw .config("cannot load the snapshot's vCPU state: \(error)") }
        do { try devices.restoreState(s.deviceState) } catch { throw .config("cannot load the snapshot's device state: \(error)") }
        hooks.resume(exit: s.exit, signature: ExitSignature(raw: s.signature), lastClock: s.lastClock)
        return flags
    }

}

extension VCPU {
    /// KVM finishes the last exit's I/O (an IN's register write) only on the next KVM_RUN: run it with
    /// immediate_exit so the registers include it, without executing guest code.
    func completePendingIO() {
        lk_run_set_immediate_exit(run, 1)
        _ = try? enter()
        lk_run_set_immediate_exit(run, 0)
    }
}
