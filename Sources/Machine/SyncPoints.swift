import CLockstep
import EventLog
import KVM

/// Sync points: the full vCPU state plus every page dirtied since the previous one (design notes §3).
/// Recording captures one whenever the guest was stopped at a point replay cannot find by counting exits;
/// replay loads it instead of executing the gap. Buffers are allocated once and reused.
final class SyncPointStore {
    let vm: VirtualMachine
    let memory: GuestMemory
    var encoder: LogEncoder?
    let msrs: [UInt32]
    let bitmap: UnsafeMutablePointer<UInt64>
    /// Every page the guest has written since boot (seeds a new secondary: the rest equals the loaded image).
    let everDirty: UnsafeMutablePointer<UInt64>
    let words: Int
    let pageNumbers: UnsafeMutablePointer<UInt32>
    var pageData: UnsafeMutableRawPointer
    var pageDataCapacity: Int
    private(set) var captured: UInt64 = 0
    private(set) var pagesCaptured: UInt64 = 0

    init(vm: VirtualMachine, memory: GuestMemory, encoder: LogEncoder?, msrs: [UInt32]) {
        self.vm = vm; self.memory = memory; self.encoder = encoder; self.msrs = msrs
        words = (memory.pageCount + 63) / 64
        bitmap = .allocate(capacity: words)
        bitmap.initialize(repeating: 0, count: words)
        everDirty = .allocate(capacity: words)
        everDirty.initialize(repeating: 0, count: words)
        pageNumbers = .allocate(capacity: memory.pageCount)
        pageDataCapacity = 1 << 20
        pageData = .allocate(byteCount: pageDataCapacity, alignment: 4096)
    }

    deinit {
        bitmap.deallocate(); everDirty.deallocate(); pageNumbers.deallocate(); pageData.deallocate()
    }

    /// Record side: captures and appends a sync point at the current exit.
    func capture(vcpu: VCPU, hooks: InputHooks) throws(SysError) {
        let state = try vcpu.captureState(msrs: msrs, fromRun: true)
        let n = try collectDirtyPages()
        state.bytes.withUnsafeBytes { st in
            encoder?.appendSyncPoint(exit: hooks.exit, signature: hooks.signature, vcpuState: st,
                                     pageNumbers: UnsafeBufferPointer(start: pageNumbers, count: n),
                                     pageData: UnsafeRawBufferPointer(start: pageData, count: n * 4096))
        }
        captured += 1
        pagesCaptured += UInt64(n)
    }

    /// Fetches (and clears) the dirty log and copies the dirty pages out; returns how many.
    func collectDirtyPages() throws(SysError) -> Int {
        try vm.fetchDirtyLog(into: bitmap)
        for i in 0..<words { everDirty[i] |= bitmap[i] }
        let n = lk_bitmap_pages(bitmap, memory.pageCount, pageNumbers, memory.pageCount)
        if n * 4096 > pageDataCapacity {
            pageData.deallocate()
            pageDataCapacity = max(n * 4096, pageDataCapacity * 2)
            pageData = .allocate(byteCount: pageDataCapacity, alignment: 4096)
        }
        // SAFETY: every page number comes from the bitmap of this slot, so it is < pageCount.
        lk_gather_pages(memory.base.assumingMemoryBound(to: UInt8.self), pageNumbers, n, pageData.assumingMemoryBound(to: UInt8.self))
        return n
    }

    /// Every page written since boot (after harvesting the current dirty log), with its contents.
    func pagesSinceBoot() throws(SysError) -> (numbers: [UInt32], data: [UInt8]) {
        _ = try collectDirtyPages()
        let n = lk_bitmap_pages(everDirty, memory.pageCount, pageNumbers, memory.pageCount)
        let numbers = Array(UnsafeBufferPointer(start: pageNumbers, count: n))
        var data = [UInt8](repeating: 0, count: n * 4096)
        data.withUnsafeMutableBytes { d in
            // SAFETY: page numbers come from this slot's bitmap (< pageCount); d holds n * 4096 bytes.
            lk_gather_pages(memory.base.assumingMemoryBound(to: UInt8.self), pageNumbers, n, d.baseAddress!.assumingMemoryBound(to: UInt8.self))
        }
        return (numbers, data)
    }

    /// Replay side: writes the pages and loads the vCPU state. Returns the injection readiness recorded with it.
    func apply(_ sp: SyncPoint, vcpu: VCPU) throws -> (Bool, Bool) {
        let limit = UInt32(memory.pageCount)
        guard sp.pageData.count == sp.pageNumbers.count * 4096 else {
            throw MachineError.config("sync point at exit \(sp.exit) has \(sp.pageData.count) bytes for \(sp.pageNumbers.count) pages")
        }
        if let bad = sp.pageNumbers.first(where: { $0 >= limit }) {
            throw MachineError.config("sync point at exit \(sp.exit) names page \(bad), beyond RAM (\(limit) pages)")
        }
        // KVM finishes a pending I/O (the IN/OUT of the last exit) only on the next KVM_RUN. Complete it now,
        // without running guest code, so it cannot land on top of the loaded state.
        vcpu.completePendingIO()
        // Written from user space, so the dirty log never sees them; a snapshot of this machine needs them.
        for n in sp.pageNumbers { everDirty[Int(n) >> 6] |= 1 << UInt64(n & 63) }
        sp.pageNumbers.withUnsafeBufferPointer { pn in
            sp.pageData.withUnsafeBytes { pd in
                // SAFETY: page numbers checked against RAM above; pd holds count * 4096 bytes.
                lk_scatter_pages(memory.base.assumingMemoryBound(to: UInt8.self), pn.baseAddress, pn.count,
                                 pd.baseAddress?.assumingMemoryBound(to: UInt8.self))
            }
        }
        let flags = try vcpu.restoreState(VCPUState(bytes: sp.vcpuState))
        return (flags.ready, flags.ifFlag)
    }
}
