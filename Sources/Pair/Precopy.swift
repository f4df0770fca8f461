import CLockstep
import Channel
import Dispatch
import Foundation
import Machine
import Synchronization

/// Seeds a new secondary by pre-copy (design notes §7). The seeding thread sends the image and every page
/// that differs from it while the guest runs, then round after round the pages written meanwhile, until
/// what is left is small or stops shrinking. The vCPU thread then pauses the guest (`finish`) to send the
/// rest with the vCPU and device state.
///
/// Delta seed: a secondary that kept the RAM of its last machine of this guest (it diverged, or handed the
/// guest over) answers the header with the hashes of the pages it holds (`HeldPages`). Round 0 then hashes
/// every page here and sends only those whose hash differs: a divergence costs what differs, not the
/// guest's memory. This is how a divergence is repaired (design notes §4): a sync point against what the
/// secondary actually holds, which no dirty log can know after a replay went wrong.
///
/// Auto-converge: a guest that writes pages at least half as fast as the rounds send them is throttled (the
/// vCPU thread sleeps a share of its time at step boundaries, `throttleGuest`), starting at 30 % and 20
/// points more each round that still does not converge, up to 90 %. The rounds end when even that does not
/// shrink the set. Without it, such a guest's pause carried its whole working set.
///
/// The seed digest (`StateDigest.seed`) hashes each page, then each chunk of page hashes. The seeding thread
/// keeps the hash of every page it sent (taken from the bytes sent) and of every page it did not (taken
/// from RAM), and after each round the hashes of the chunks whose page hashes changed. A page written after
/// its hash was taken is in a later dirty set, so it is sent and hashed again, at the latest in the pause:
/// at the pause every kept hash is the page's. The pause hashes only that last set, its chunks, and the
/// chunk hashes (32 bytes per 2 MiB of RAM).
final class Precopy: @unchecked Sendable {
    enum Phase: UInt8 {
        case copying = 1
        /// The rounds are done; the vCPU thread may `finish`.
        case ready = 2
        case failed = 3
    }

    /// What is left for the pause: at most this many pages (1 MiB) ends the rounds.
    static let pausePages = 256
    static let maxRounds = 30
    static let throttleStart: UInt8 = 30, throttleStep: UInt8 = 20, throttleMax: UInt8 = 90
    /// While throttling, the vCPU thread is asked for a step boundary this often (a guest with no exits of its own).
    static let throttleTickMs = 5

    let conn: Connection
    private let machine: Machine
    private let header: SeedHeader
    private let pageCount: Int
    private let words: Int
    /// Pages still to send (the seeding thread's until `ready`, then the vCPU thread's).
    private let pending: UnsafeMutablePointer<UInt64>
    private let taken: UnsafeMutablePointer<UInt64>
    private let numbers: UnsafeMutablePointer<UInt32>
    /// SHA-256 of every page (32 bytes each), as the secondary will have it.
    private let hashes: UnsafeMutableRawPointer
    /// SHA-256 of each chunk of page hashes, and which chunks have page hashes newer than their hash.
    private let chunkCount: Int
    private let chunkHashes: UnsafeMutableRawPointer
    private var staleChunks: [Bool]
    let phase = Atomic<UInt8>(Phase.copying.rawValue)
    private let failure = Mutex<String>("")
    /// When the seeding thread last sent something (a peer that stops reading stalls it).
    let progressNs = Atomic<UInt64>(lk_monotonic_ns())
    let startNs = lk_monotonic_ns()
    private(set) var rounds = 0
    private(set) var pagesSent = 0
    private(set) var pagesInPause = 0
    /// Delta seed: the non-zero pages the secondary held, how many of them were already right, what round 0
    /// sent, and what it would have sent to a new machine (the pages written since boot).
    private(set) var heldPages = 0
    private(set) var heldEqual = 0
    private(set) var firstRoundPages = 0
    private(set) var newMachinePages = 0
    /// Share of the guest's time the vCPU thread sleeps (percent, 0: not throttled); the highest it reached.
    let throttle = Atomic<UInt8>(0)
    private(set) var throttleReached: UInt8 = 0
    /// vCPU thread: when the guest last resumed from a throttle sleep.
    private var ranSince: UInt64 = 0
    /// Fault injection for the seed-check test (`LOCKSTEP_FAULT_SEED_PAGE`): the first page this process sends
    /// carries one wrong byte after it was hashed, as a copy gone wrong would.
    private static let corruptNextPage = Atomic<Bool>(ProcessInfo.processInfo.environment["LOCKSTEP_FAULT_SEED_PAGE"] != nil)
    private let done = DispatchSemaphore(value: 0)

    init(conn: Connection, machine: Machine, header: SeedHeader) {
        self.conn = conn; self.machine = machine; self.header = header
        pageCount = machine.memory.pageCount
        words = machine.dirtyBitmapWords
        pending = .allocate(capacity: words)
        pending.initialize(repeating: 0, count: words)
        taken = .allocate(capacity: words)
        taken.initialize(repeating: 0, count: words)
        numbers = .allocate(capacity: pageCount)
        hashes = .allocate(byteCount: pageCount * 32, alignment: 16)
        chunkCount = StateDigest.chunkCount(pages: pageCount)
        chunkHashes = .allocate(byteCount: chunkCount * 32, alignment: 16)
        staleChunks = [Bool](repeating: true, count: chunkCount)
    }

    deinit {
        pending.deallocate(); taken.deallocate(); numbers.deallocate(); hashes.deallocate(); chunkHashes.deallocate()
    }

    var state: Phase { Phase(rawValue: phase.load(ordering: .acquiring)) ?? .failed }
    var reason: String { failure.withLock { $0 } }

    /// Fault injection for the migration tests (`LOCKSTEP_FAULT_SEED_STALL_MS`): a seed whose rounds overlap the
    /// guest's run starts them this much later, as a slow link to a far target would make them last.
    private static let stallMs = ProcessInfo.processInfo.environment["LOCKSTEP_FAULT_SEED_STALL_MS"].flatMap { UInt32($0) } ?? 0

    /// Runs the rounds on a thread of their own (the guest keeps running).
    func start() {
        startThread("lockstep-seed") { [self] in
            if Self.stallMs > 0 { usleep(Self.stallMs * 1000) }
            copy()
            done.signal()
        }
    }

    /// Runs the rounds on the calling thread (before the guest first runs there is nothing to overlap).
    func copyHere() throws {
        copy()
        done.signal()
        if state == .failed { throw PairError.peerUnreachable(reason) }
    }

    /// Stops the rounds (the run ended, or the peer stopped reading) and waits for the thread.
    func cancel(_ why: String) {
        failure.withLock { if $0.isEmpty { $0 = why } }
        conn.close()
        done.wait()
        done.signal()
    }

    private func copy() {
        do {
            try conn.send(.bulk(SeedCodec.header(header)))
            progressNs.store(lk_monotonic_ns(), ordering: .releasing)
            // Round 0: every page that differs from the image, or (delta) from what the secondary holds; the
            // others are hashed where they are.
            try machine.takeDirtyPages(into: pending, sinceBoot: true)
            newMachinePages = lk_bitmap_count(pending, pageCount)
            let held = try hashWhileWaiting()
            if held.count > 0 { heldEqual = held.compare(hashes, pages: pageCount, differ: pending) }
            var n = try sendPending()
            firstRoundPages = n
            rehashStaleChunks()
            rounds = 1
            var ticker: Ticker?
            defer { ticker?.stop(); throttle.store(0, ordering: .releasing) }
            while true {
                try machine.takeDirtyPages(into: pending, sinceBoot: false)
                let left = lk_bitmap_count(pending, pageCount)
                if left <= Self.pausePages || rounds >= Self.maxRounds { break }
                if left >= n / 2 {
                    // Not converging: throttle harder, or stop where even the most throttle does not shrink it.
                    let t = throttle.load(ordering: .relaxed)
                    if t == Self.throttleMax { if left >= n { break } } else {
                        let next = t == 0 ? Self.throttleStart : min(t + Self.throttleStep, Self.throttleMax)
                        throttle.store(next, ordering: .releasing)
                        throttleReached = next
                        if ticker == nil {
                            let pacer = machine.pacer
                            ticker = Ticker(ms: Self.throttleTickMs, name: "lockstep-throttle") { pacer?.raise(.boundary) }
                        }
                    }
                }
                n = try sendPending()
                rehashStaleChunks()
                rounds += 1
            }
            phase.store(Phase.ready.rawValue, ordering: .releasing)
            // The pause comes at the vCPU thread's next step boundary: get one now, even from a halted guest.
            machine.pacer?.raise(.boundary)
        } catch {
            failure.withLock { if $0.isEmpty { $0 = error is SeedError ? "\(error)" : "cannot send the seed: \(error)" } }
            conn.close()
            phase.store(Phase.failed.rawValue, ordering: .releasing)
        }
    }

    /// vCPU thread, at a step boundary during the rounds: sleeps the throttle's share of the time the guest
    /// ran since the last sleep (at most 20 ms at a time, so a cancel or the end is not held up).
    func throttleGuest(now: UInt64) {
        let t = UInt64(throttle.load(ordering: .acquiring))
        guard t > 0 else { ranSince = 0; return }
        if ranSince == 0 { ranSince = now; return }
        let ran = now &- ranSince
        guard ran >= 1_000_000 else { return }  // sleep in slices of at least 1 ms of guest time
        let until = now + min(ran * t / (100 - t), 20_000_000)
        while lk_sleep_until(until) == -EINTR {}  // the pacer's kicks land here too
        ranSince = lk_monotonic_ns()
    }

    /// vCPU thread, guest paused between two exits, after `ready`: sends the pages written since the last
    /// round, the machine state and the seed digest. Returns the state (its exit is the seed's).
    func finish(protectionID: UInt64, firstSequence: UInt32, halted: Bool, lineHead: [UInt8]) throws -> Snapshot {
        done.wait()
        done.signal()
        let state = try machine.captureState(halted: halted)
        try machine.takeDirtyPages(into: taken, sinceBoot: false)
        for i in 0..<words { pending[i] |= taken[i] }
        pagesInPause = try sendPending()
        rehashStaleChunks()
        let digest = try machine.seedDigest(chunkHashes: UnsafeRawBufferPointer(start: chunkHashes, count: chunkCount * 32))
        try conn.send(.bulk(SeedCodec.end(SeedEnd(exit: state.exit, signature: state.signature, lastClock: state.lastClock,
                                                  firstSequence: firstSequence, totalPages: UInt32(pagesSent),
                                                  vcpuState: state.vcpuState, deviceState: state.deviceState,
                                                  seedDigest: digest, protectionID: protectionID,
                                                  runState: halted ? .halted : .running, lineHead: lineHead))))
        return state
    }

    private func rehashStaleChunks() {
        for c in 0..<chunkCount where staleChunks[c] {
            StateDigest.chunkHash(c, pageHashes: hashes, pages: pageCount, into: chunkHashes + c * 32)
            staleChunks[c] = false
        }
    }

    /// Round 0's hashes, while the secondary answers the header with the pages it holds (it may hash all its
    /// RAM first): this side hashes every page that may not be zero meanwhile, as a delta seed compares them
    /// all. A new machine answers at once with none; then the rest is hashed as for any full seed: the pages
    /// round 0 sends are hashed from their frames, the others where they are. The wait is the seed's own
    /// timeout; the guest runs meanwhile.
    private func hashWhileWaiting() throws -> HeldPages {
        try machine.loadedPages(into: taken)
        for i in 0..<words { taken[i] |= pending[i] }
        var held = HeldPages()
        var answered = false
        var next = 0  // pages 0..<next are hashed
        // Small steps: a page round 0 sends that was hashed here before a new machine's answer came is hashed
        // again from its frame; at most one step of them (2 MiB). A multiple of 64: a step starts at a bitmap word.
        let step = StateDigest.pagesPerChunk
        let base = machine.memory.base
        while next < pageCount, !(answered && held.count == 0) {
            let k = min(step, pageCount - next)
            // SAFETY: next + k <= pageCount; RAM, the bitmap and `hashes` cover pageCount pages.
            StateDigest.hashPages(base + next * 4096, count: k, read: taken + next / 64, into: hashes + next * 32)
            next += k
            if !answered { answered = try receiveHeld(into: &held, timeoutMs: 0) }
        }
        if !answered, !(try receiveHeld(into: &held, timeoutMs: Int(SecondaryLink.seedTimeoutNs / 1_000_000))) {
            throw SeedError(secondary: "no answer to the seed's header within \(SecondaryLink.seedTimeoutNs / 1_000_000_000) s")
        }
        heldPages = held.count
        if held.count == 0, next < pageCount {
            // SAFETY: as above, from page `next` on.
            StateDigest.hashPages(base + next * 4096, count: pageCount - next, read: taken + next / 64, skip: pending + next / 64,
                                  into: hashes + next * 32)
        }
        return held
    }

    /// Adds the secondary's `held` parts that arrive within `timeoutMs` to `held`; true once the last came.
    private func receiveHeld(into held: inout HeldPages, timeoutMs: Int) throws -> Bool {
        while true {
            let m: Message
            do { m = try conn.receiveMessage(timeoutMs: timeoutMs) } catch ChannelError.timeout { return false }
            if case .goodbye(let why) = m { throw SeedError(secondary: "it stopped: \(why)") }
            guard case .bulk(let b) = m else { throw SeedError(secondary: "expected the hashes of the pages it holds, got \(m)") }
            progressNs.store(lk_monotonic_ns(), ordering: .releasing)
            if try SeedCodec.decodeHeld(b, into: &held, pages: pageCount) { return true }
        }
    }

    /// Sends the pages in `pending` in chunks (copied out of RAM into the frame, hashed from the copy) and
    /// clears it. Returns how many.
    private func sendPending() throws -> Int {
        let n = lk_bitmap_pages(pending, pageCount, numbers, pageCount)
        pending.update(repeating: 0, count: words)
        let base = machine.memory.base.assumingMemoryBound(to: UInt8.self)
        var i = 0
        while i < n {
            let k = min(seedPagesPerFrame, n - i)
            // The layout of `SeedCodec.pages`, built in place: the pages are copied once, from RAM into the frame.
            let size = 5 + k * 4 + k * 4096
            let frame = [UInt8](unsafeUninitializedCapacity: size) { b, count in
                // SAFETY: b holds `size` bytes; page numbers come from a bitmap of this RAM (< pageCount); the
                // numbers are stored as they are in memory, little-endian on x86-64.
                let p = UnsafeMutableRawPointer(b.baseAddress!)
                p.storeBytes(of: SeedPart.pages.rawValue, as: UInt8.self)
                p.storeBytes(of: UInt32(k).littleEndian, toByteOffset: 1, as: UInt32.self)
                (p + 5).copyMemory(from: numbers + i, byteCount: k * 4)
                let dst = p + 5 + k * 4
                lk_gather_pages(base, numbers + i, k, dst.assumingMemoryBound(to: UInt8.self))
                for j in 0..<k {
                    let page = Int(numbers[i + j])
                    StateDigest.hashPage(dst + j * 4096, into: hashes + page * 32)
                    staleChunks[page / StateDigest.pagesPerChunk] = true
                }
                if Self.corruptNextPage.exchange(false, ordering: .relaxed) { dst.storeBytes(of: ~dst.load(as: UInt8.self), as: UInt8.self) }
                count = size
            }
            try conn.send(.bulk(frame))
            progressNs.store(lk_monotonic_ns(), ordering: .releasing)
            i += k
        }
        pagesSent += n
        return n
    }
}
