import CLockstep
import Dispatch
import Failover
import Glibc
import Machine
import Synchronization

/// Why a live side must stop: its fence is gone.
enum FenceLoss: Equatable, Sendable {
    /// The fence file carries another holder's generation.
    case taken(FenceHolder)
    /// The fence could not be confirmed for the lease bound; the message says since when and why.
    case expired(String)
}

/// Keeps a live side's claim to the fence current (and renews an etcd fence's lease: `EtcdFence.check`). The
/// flock fences only while the lock is really held: on NFS a holder cut off from the server loses it when the
/// server's lease runs out (`nfsv4leasetime`, 90 s by default) and another host may take it, while this
/// process, told nothing, runs on. So the holder reads the fence file every `intervalNs`: another generation there stops it at once, and a holder that has not seen its
/// own generation for `leaseNs` stops too, since it can no longer know that nobody else is live. A second thread
/// keeps that deadline: a read of an unreachable hard-mounted NFS file blocks rather than fails.
///
/// A handover gives the fence away on purpose: `suspend` first, `resume` once it is taken back.
final class FenceWatch: @unchecked Sendable {
    private struct State {
        /// What this side holds; nil while suspended.
        var token: FenceToken?
        var confirmedNs: UInt64
        /// Why the last read could not confirm (nil: it did).
        var problem: String?
    }

    let fence: any Fencing
    let leaseNs: UInt64
    let intervalNs: UInt64
    private let state: Mutex<State>
    private let onLoss: @Sendable (FenceLoss) -> Void
    private let readerWake = lk_eventfd()
    private let deadlineWake = lk_eventfd()
    private let stopped = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)

    /// Starts watching the fence `fence` holds now. `onLoss` is called at most once, on a watch thread; the
    /// default says why and exits 75 without releasing anything.
    init(fence: any Fencing, leaseMs: Int, onLoss: @escaping @Sendable (FenceLoss) -> Void = FenceWatch.stop) {
        self.fence = fence
        leaseNs = UInt64(leaseMs) * 1_000_000
        intervalNs = Self.interval(leaseNs: leaseNs)
        state = Mutex(State(token: fence.token, confirmedNs: lk_monotonic_ns()))
        self.onLoss = onLoss
        startThread("lockstep-fence") { [self] in
            while !stopped.load(ordering: .acquiring) {
                if let loss = check().loss { report(loss); break }
                _ = lk_eventfd_wait(readerWake, lk_monotonic_ns() + intervalNs)
            }
            done.signal()
        }
        startThread("lockstep-lease") { [self] in
            while !stopped.load(ordering: .acquiring) {
                let now = lk_monotonic_ns()
                let (deadline, expired) = state.withLock { s -> (UInt64, String?) in
                    guard s.token != nil else { return (now + leaseNs, nil) }
                    return (s.confirmedNs + leaseNs, Self.expiry(confirmedNs: s.confirmedNs, now: now, leaseNs: leaseNs,
                                                                 problem: s.problem, location: fence.location))
                }
                if let expired { report(.expired(expired)); break }
                _ = lk_eventfd_wait(deadlineWake, deadline)
            }
            done.signal()
        }
    }

    /// Four reads per lease, at most one a second, at least one per 10 ms.
    static func interval(leaseNs: UInt64) -> UInt64 { min(1_000_000_000, max(10_000_000, leaseNs / 4)) }

    /// Pure: nil while the fence was confirmed within the lease; otherwise why this side must stop.
    static func expiry(confirmedNs: UInt64, now: UInt64, leaseNs: UInt64, problem: String?, location: String) -> String? {
        guard now &- confirmedNs >= leaseNs, now >= confirmedNs else { return nil }
        return "the fence in \(location) was last confirmed \((now - confirmedNs) / 1_000_000) ms ago, not within --fence-lease-ms "
            + "\(leaseNs / 1_000_000)\(problem.map { " (\($0))" } ?? ""): its lock (an NFS or etcd lease) may have expired and another side "
            + "may be live; stopping at once, releasing no held output"
    }

    /// One read of the fence file (the watch thread's step). `loss` when this side must stop; a verdict that
    /// comes back after a `suspend` is dropped (it was about a fence this side gave up on purpose).
    @discardableResult
    func check() -> (verdict: FenceCheck?, loss: FenceLoss?) {
        guard let t = state.withLock({ $0.token }) else { return (nil, nil) }
        // A confirmation counts from when the read began: the lease it renewed (NFS, etcd) runs from no earlier.
        let now = lk_monotonic_ns()
        let verdict = fence.check(holding: t)
        let (loss, say) = state.withLock { s -> (FenceLoss?, String?) in
            guard s.token == t else { return (nil, nil) }
            switch verdict {
            case .confirmed:
                defer { s.confirmedNs = now; s.problem = nil }
                return (nil, s.problem.map { _ in "the fence is confirmed again after \((now &- s.confirmedNs) / 1_000_000) ms" })
            case .taken(let h):
                return (.taken(h), nil)
            case .lost(let why):
                return (.expired(PairRecord.lostFence(why)), nil)
            case .unreadable(let why):
                defer { s.problem = why }
                let left = s.confirmedNs &+ leaseNs > now ? (s.confirmedNs &+ leaseNs - now) / 1_000_000 : 0
                return (nil, s.problem == nil ? "cannot confirm the fence (\(why)); this side stops unless it can within \(left) ms "
                        + "(--fence-lease-ms \(leaseNs / 1_000_000))" : nil)
            }
        }
        if let say { warn(say) }
        return (verdict, loss)
    }

    /// How long ago the fence was last confirmed (ms), for the status.
    func confirmedAgoMs(now: UInt64 = lk_monotonic_ns()) -> Double {
        Double(now &- state.withLock { $0.confirmedNs }) / 1e6
    }

    /// The fence is about to be given up on purpose (a handover): nothing is watched until `resume`.
    func suspend() { state.withLock { $0.token = nil } }

    /// The fence is this side's again (`token`, a new generation): watching starts afresh.
    func resume(_ token: FenceToken) {
        state.withLock { $0 = State(token: token, confirmedNs: lk_monotonic_ns()) }
        lk_eventfd_signal(deadlineWake)
    }

    /// Ends both threads (they are gone on return).
    func stop() {
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        lk_eventfd_signal(readerWake)
        lk_eventfd_signal(deadlineWake)
        done.wait()
        done.wait()
        close(readerWake)
        close(deadlineWake)
    }

    /// One loss reaches `onLoss`, and only while watching.
    private let reported = Atomic<Bool>(false)
    private func report(_ loss: FenceLoss) {
        guard !stopped.load(ordering: .acquiring), !reported.exchange(true, ordering: .acquiringAndReleasing) else { return }
        onLoss(loss)
    }

    /// The production response: say why and stop the process, releasing nothing held.
    static let stop: @Sendable (FenceLoss) -> Void = { loss in
        switch loss {
        case .taken(let h): PairRecord.stopOnTakenFence(h)
        case .expired(let why): PairRecord.stopFenced(why)
        }
    }
}
