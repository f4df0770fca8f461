import CLockstep
import EventLog
import KVM
import Synchronization

/// Sync points: the full vCPU state plus every page dirtied since the previous one (design notes §3).
/// Recording captures one whenever the guest was stopped at a point replay cannot find by counting exits;
/// replay loads it instead of executing the gap. Buffers are allocated once and reused.
///
/// KVM's dirty log has one reader: `harvest` fetches (and clears) it and ORs it into three sets, so sync
/// points, the since-boot set and a pre-copy seed each see every write: `sinceSync` (the next sync point's pages),
/// `everDirty` (pages that differ from the loaded image) and `sinceTaken` (the seeding thread's). The
/// seeding thread harvests while the guest runs, so the sets are behind `dirtyLock`.
final class SyncPointStore: @unchecked Sendable {
    let vm: VirtualMachine
    let memory: GuestMemory
    var encoder: LogEncoder?
    let msrs: [UInt32]
    let words: Int
    /// Where `capture` puts the vCPU state (made once: the per-exit path does not allocate).
    private let state: StateCapture
    private let dirtyLock = Mutex(())
    private let fetched: UnsafeMutablePointer<UInt64>
    private let sinceSync: UnsafeMutablePointer<UInt64>
    /// Every page the guest has written since boot (seeds a new secondary: the rest equals the loaded image).
    private let everDirty: UnsafeMutablePointer<UInt64>
    private let sinceTaken: UnsafeMutablePointer<UInt64>
    /// Pages left writable across fetches (nil when KVM clears the log itself on every fetch).
    private let hot: HotPages?
    /// The pages the loader wrote (immutable): with `everDirty`, every page that may not be zero.
    let loaded: UnsafeMutablePointer<UInt64>
    let pageNumbers: UnsafeMutablePointer<UInt32>
    var pageData: UnsafeMutableRawPointer
    var pageDataCapacity: Int
    private(set) var captured: UInt64 = 0
    private(set) var pagesCaptured: UInt64 = 0
    /// The most pages one sync point carried (a batch that large crosses the FT link in parts).
    private(set) var largestPages: UInt64 = 0
    /// Of `pagesCaptured`, those that were hot: left writable since the fetch before, so no fault logged them.
    private(set) var hotPagesCaptured: UInt64 = 0

    /// `written`: pages already written when this store starts (`words` words; RAM adopted from another machine).
    init(vm: VirtualMachine, memory: GuestMemory, encoder: LogEncoder?, msrs: [UInt32], loaded pages: [Int], written: [UInt64]? = nil) {
        self.vm = vm; self.memory = memory; self.encoder = encoder; self.msrs = msrs
        state = StateCapture(msrs: msrs)
        let words = (memory.pageCount + 63) / 64
        self.words = words
        func bitmap() -> UnsafeMutablePointer<UInt64> {
            let b = UnsafeMutablePointer<UInt64>.allocate(capacity: words)
            b.initialize(repeating: 0, count: words)
            return b
        }
        fetched = bitmap(); sinceSync = bitmap(); everDirty = bitmap(); sinceTaken = bitmap(); loaded = bitmap()
        hot = vm.manualDirtyProtect ? HotPages(words: words) : nil
        for p in pages where p < memory.pageCount { loaded[p >> 6] |= 1 << UInt64(p & 63) }
        if let written {
            precondition(written.count == words, "a written-page bitmap of \(written.count) words for \(words)")
            everDirty.update(from: written, count: words)
        }
        pageNumbers = .allocate(capacity: memory.pageCount)
        pageDataCapacity = 1 << 20
        pageData = .allocate(byteCount: pageDataCapacity, alignment: 4096)
    }

    deinit {
        fetched.deallocate(); sinceSync.deallocate(); everDirty.deallocate(); sinceTaken.deallocate(); loaded.deallocate()
        pageNumbers.deallocate(); pageData.deallocate()
    }

    /// Fetches KVM's log into the three sets and clears it, except for hot pages. Caller holds `dirtyLock`.
    private func harvest() throws(SysError) {
        try vm.fetchDirtyLog(into: fetched)
        for i in 0..<words {
            let w = fetched[i]
            everDirty[i] |= w; sinceSync[i] |= w; sinceTaken[i] |= w
        }
        if let hot, hot.plan(fetched: fetched) { try vm.clearDirtyLog(hot.clear, pageCount: memory.pageCount) }
    }

    /// Record side: captures and appends a sync point at the current exit.
    func capture(vcpu: VCPU, hooks: InputHooks) throws(SysError) {
        let st = try state.capture(vcpu, fromRun: true)
        let n = try collectDirtyPages()
        hotPagesCaptured += UInt64(hot?.reportedHot ?? 0)
        encoder?.appendSyncPoint(exit: hooks.exit, signature: hooks.signature, vcpuState: st,
                                 pageNumbers: UnsafeBufferPointer(start: pageNumbers, count: n),
                                 pageData: UnsafeRawBufferPointer(start: pageData, count: n * 4096))
        captured += 1
        pagesCaptured += UInt64(n)
        largestPages = max(largestPages, UInt64(n))
    }

    /// Copies the pages dirtied since the last sync point out and forgets them; returns how many. (A seed does
    /// not clear them: the next sync point may carry pages from before the seed, which the secondary rewrites
    /// with the same bytes.)
    func collectDirtyPages() throws(SysError) -> Int {
        let n = try dirtyLock.withLock { _ throws(SysError) -> Int in
            try harvest()
            let n = lk_bitmap_pages(sinceSync, memory.pageCount, pageNumbers, memory.pageCount)
            sinceSync.update(repeating: 0, count: words)
            return n
        }
        if n * 4096 > pageDataCapacity {
            pageData.deallocate()
            pageDataCapacity = max(n * 4096, pageDataCapacity * 2)
            pageData = .allocate(byteCount: pageDataCapacity, alignment: 4096)
        }
        // SAFETY: every page number comes from a bitmap of this slot, so it is < pageCount.
        lk_gather_pages(memory.base.assumingMemoryBound(to: UInt8.self), pageNumbers, n, pageData.assumingMemoryBound(to: UInt8.self))
        return n
    }

    /// Seeding: copies into `into` (`words` words) the pages written since the last call, or since boot when
    /// `sinceBoot`, and starts the next interval. Any thread; the guest may be running.
    func takeDirty(into: UnsafeMutablePointer<UInt64>, sinceBoot: Bool) throws(SysError) {
        try dirtyLock.withLock { _ throws(SysError) in
            try harvest()
            into.update(from: sinceBoot ? everDirty : sinceTaken, count: words)
            sinceTaken.update(repeating: 0, count: words)
        }
    }

    /// Every page that may not be zero: loaded, or written since (guest or user space). Any thread.
    func writtenSinceBoot(into: UnsafeMutablePointer<UInt64>) throws(SysError) {
        try dirtyLock.withLock { _ throws(SysError) in
            try harvest()
            for i in 0..<words { into[i] = everDirty[i] | loaded[i] }
        }
    }

    /// Writes whole pages from user space (a sync point's, a seed's); the last write of a page wins. They are
    /// marked written since boot: the dirty log never sees them, and a seed taken from this machine needs them.
    /// The caller checked every number against RAM, and `data` holds `numbers.count` pages.
    func writePages(_ numbers: UnsafeBufferPointer<UInt32>, data: UnsafeRawPointer?) {
        dirtyLock.withLock { _ in for n in numbers { everDirty[Int(n) >> 6] |= 1 << UInt64(n & 63) } }
        // SAFETY: the caller checked the numbers against RAM and the length of `data` (see above).
        lk_scatter_pages(memory.base.assumingMemoryBound(to: UInt8.self), numbers.baseAddress, numbers.count,
                         data?.assumingMemoryBound(to: UInt8.self))
    }

    /// Marks pages written from user space without `writePages` (fault injection) as written since boot.
    func noteWritten(_ numbers: [Int]) {
        dirtyLock.withLock { _ in for n in numbers where n < memory.pageCount { everDirty[n >> 6] |= 1 << UInt64(n & 63) } }
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
        sp.pageNumbers.withUnsafeBufferPointer { pn in
            sp.pageData.withUnsafeBytes { pd in writePages(pn, data: pd.baseAddress) }
        }
        let flags = try vcpu.restoreState(VCPUState(bytes: sp.vcpuState))
        return (flags.ready, flags.ifFlag)
    }
}
