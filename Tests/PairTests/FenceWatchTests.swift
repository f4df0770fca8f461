import Failover
import Foundation
import Synchronization
import Testing
@testable import Pair

/// The fence watch without processes: a live side that finds another generation in its fence file, or cannot
/// read it for its lease, is told to stop; a handover's suspension is not a loss.
@Suite struct FenceWatchTests {
    static func heldFence() throws -> (Fence, FenceToken) {
        let dir = NSTemporaryDirectory() + "lk-watch-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let f = Fence(directory: dir)
        return (f, try #require(try f.tryAcquire(identity: FenceIdentity(host: "hostA", pid: 1))))
    }

    /// Collects the losses a watch reports (the production handler would exit).
    final class Losses: @unchecked Sendable {
        let list = Mutex<[FenceLoss]>([])
        let reported = DispatchSemaphore(value: 0)
        func add(_ l: FenceLoss) { list.withLock { $0.append(l) }; reported.signal() }
        /// Bounded: the first loss, or nil when none came within `seconds`.
        func first(within seconds: Double) -> FenceLoss? {
            reported.wait(timeout: .now() + seconds) == .success ? list.withLock { $0.first } : nil
        }
    }

    static let otherHolder = "generation=999\nhost=hostB\npid=2\n"

    @Test func theLeaseBoundIsKeptToTheNanosecond() {
        let lease: UInt64 = 1_000_000_000
        #expect(FenceWatch.expiry(confirmedNs: 5, now: 5 + lease - 1, leaseNs: lease, problem: nil, location: "/f") == nil)
        // A confirmation stored after the deadline thread read the clock is newer than its `now`: not expired.
        #expect(FenceWatch.expiry(confirmedNs: 10, now: 5, leaseNs: lease, problem: nil, location: "/f") == nil)
        let why = FenceWatch.expiry(confirmedNs: 5, now: 5 + lease, leaseNs: lease, problem: "open failed", location: "/f")
        #expect(why == "the fence in /f was last confirmed 1000 ms ago, not within --fence-lease-ms 1000 (open failed): its lock (an NFS or etcd "
                + "lease) may have expired and another side may be live; stopping at once, releasing no held output")
        #expect(FenceWatch.interval(leaseNs: 30 * lease) == lease)
        #expect(FenceWatch.interval(leaseNs: lease) == lease / 4)
        #expect(FenceWatch.interval(leaseNs: 20_000_000) == 10_000_000)
    }

    @Test func anotherGenerationIsALossAndASuspendedWatchIgnoresIt() throws {
        let (fence, token) = try Self.heldFence()
        defer { try? FileManager.default.removeItem(atPath: fence.directory) }
        let losses = Losses()
        let watch = FenceWatch(fence: fence, leaseMs: 60_000) { losses.add($0) }
        defer { watch.stop() }
        #expect(watch.check().verdict == .confirmed)
        // A handover gives the fence away: the new holder's generation is no loss while suspended...
        watch.suspend()
        try fence.release()
        try Self.otherHolder.write(toFile: fence.path, atomically: false, encoding: .utf8)
        #expect(watch.check().verdict == nil)
        // ...and taken back, the watch follows the new generation (1000 after 999).
        let back = try #require(try fence.tryAcquire(identity: token.identity))
        watch.resume(back)
        #expect(back.generation == 1000)
        #expect(watch.check().verdict == .confirmed)
        try Self.otherHolder.write(toFile: fence.path, atomically: false, encoding: .utf8)
        let taken = FenceLoss.taken(FenceHolder(generation: 999, identity: FenceIdentity(host: "hostB", pid: 2)))
        #expect(watch.check().loss == taken)
        // The watch's own thread finds it too (it reads every 1 s at this lease), and reports it once.
        #expect(losses.first(within: 20) == taken)
        #expect(losses.list.withLock { $0.count } == 1)
    }

    @Test func aFenceUnreadableForTheLeaseIsALoss() throws {
        let (fence, _) = try Self.heldFence()
        let losses = Losses()
        let watch = FenceWatch(fence: fence, leaseMs: 300) { losses.add($0) }
        defer { watch.stop() }
        #expect(watch.check().verdict == .confirmed)
        #expect(watch.confirmedAgoMs() < 300)
        try FileManager.default.removeItem(atPath: fence.directory)
        guard case .expired(let why)? = losses.first(within: 20) else { Issue.record("no expiry reported"); return }
        #expect(why.contains("the fence in \(fence.directory) was last confirmed"), "\(why)")
        #expect(why.contains("No such file or directory"), "\(why)")
        #expect(losses.list.withLock { $0.count } == 1)
    }
}
