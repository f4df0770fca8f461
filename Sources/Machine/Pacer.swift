import CLockstep
import Foundation
import Synchronization

/// The pacer thread: turns device deadlines and serial input into "something is due" flags for the vCPU
/// thread, wakes it from HLT, and kicks it out of the guest when a due interrupt has waited longer than the
/// latency bound without a natural exit. It never touches device state: only the vCPU thread does.
public final class Pacer: @unchecked Sendable {
    public struct Due: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let timer = Due(rawValue: 1)
        public static let input = Due(rawValue: 2)
        public static let stop = Due(rawValue: 4)
        /// The runner needs the vCPU thread between two steps (a secondary to attach, a seed to finish):
        /// nothing for the devices, it only ends a halt's wait or (after the latency bound) a long guest run.
        public static let boundary = Due(rawValue: 8)
    }

    let due = Atomic<UInt32>(0)
    /// Next device deadline, host CLOCK_MONOTONIC ns (UInt64.max: none). Written by the vCPU thread.
    let deadline = Atomic<UInt64>(.max)
    /// When to kick if something is still due (UInt64.max: no kick armed).
    let kickAt = Atomic<UInt64>(.max)
    let running = Atomic<Bool>(true)
    let vcpuThread = Atomic<UInt>(0)
    public let kicks = Atomic<UInt64>(0)
    /// How long a due interrupt may wait for a natural exit (ns): `bound.ns`, published for `raise`.
    let latencyNs: Atomic<UInt64>
    /// The vCPU thread's: stretched while sync points are expensive (`LatencyBound`).
    private var bound: LatencyBound
    /// `bound.floorNs`, for any thread.
    let floorNs: UInt64
    private let peakNs: Atomic<UInt64>
    let kickSignal: Int32 = SIGUSR1
    let vcpuWake: Int32
    let pacerWake: Int32
    private var started = false
    /// The pacer thread's pthread id (0 until it runs): a raise from it needs no wake of itself.
    private let pacerThread = Atomic<UInt>(0)
    private let done = DispatchSemaphore(value: 0)

    /// `latencyMicroseconds`: the bound's floor; `maxLatencyMicroseconds`: how far sync points' cost may stretch it.
    public init(latencyMicroseconds: UInt32, maxLatencyMicroseconds: UInt32) {
        bound = LatencyBound(floorNs: UInt64(latencyMicroseconds) * 1000, ceilingNs: UInt64(maxLatencyMicroseconds) * 1000)
        latencyNs = Atomic(bound.ns)
        floorNs = bound.floorNs
        peakNs = Atomic(bound.ns)
        vcpuWake = lk_eventfd()
        pacerWake = lk_eventfd()
        _ = lk_kick_install(kickSignal)
    }

    deinit { close(vcpuWake); close(pacerWake) }

    /// Called on the vCPU thread before the first entry. `core`: where it runs (live runs: `Cores.vcpu`, off
    /// the pacer's; nil: left where it is).
    public func bindVCPUThread(run: UnsafeMutablePointer<kvm_run>, core: Int32?) {
        lk_kick_bind(run, kickSignal)
        vcpuThread.store(lk_thread_self(), ordering: .releasing)
        Cores.pinCurrentThread(core)
    }

    /// Kicks the vCPU out of the guest now (from any thread), whatever is due.
    public func kickNow() {
        let t = vcpuThread.load(ordering: .acquiring)
        if t != 0 { _ = lk_kick(t, kickSignal) }
    }

    public func start() {
        started = true
        startThread("lockstep-pacer", stackSize: 1 << 20) { [self] in
            pacerThread.store(lk_thread_self(), ordering: .releasing)
            Cores.pinCurrentThread(Cores.housekeeping)
            _ = lk_set_timer_slack_ns(1)
            loop()
            done.signal()
        }
    }

    public func stop() {
        guard started, running.exchange(false, ordering: .acquiringAndReleasing) else { return }
        lk_eventfd_signal(pacerWake)
        done.wait()
    }

    private func loop() {
        while running.load(ordering: .acquiring) {
            let d = deadline.load(ordering: .acquiring), k = kickAt.load(ordering: .acquiring)
            _ = lk_eventfd_wait(pacerWake, min(d, k))
            let now = lk_monotonic_ns()
            let d2 = deadline.load(ordering: .acquiring)
            if d2 != .max, now >= d2 {
                _ = deadline.compareExchange(expected: d2, desired: .max, ordering: .acquiringAndReleasing)
                raise(.timer, now: now)
            }
            let k2 = kickAt.load(ordering: .acquiring)
            if k2 != .max, now >= k2 {
                kickAt.store(.max, ordering: .releasing)
                if due.load(ordering: .acquiring) != 0, case let t = vcpuThread.load(ordering: .acquiring), t != 0 {
                    kicks.add(1, ordering: .relaxed)
                    _ = lk_kick(t, kickSignal)
                }
            }
        }
    }

    /// Marks something due, wakes a halted vCPU, and arms the kick for a running one. An interrupt waits the
    /// bound; the runner's requests (`boundary`, `stop`) wait only its floor, however far sync points stretched it.
    public func raise(_ what: Due, now: UInt64 = lk_monotonic_ns()) {
        let before = due.bitwiseOr(what.rawValue, ordering: .acquiringAndReleasing).oldValue
        lk_eventfd_signal(vcpuWake)
        let urgent = what.isDisjoint(with: [.timer, .input])
        let at = now &+ (urgent ? floorNs : latencyNs.load(ordering: .relaxed))
        // The kick clock starts when something becomes due; if it was already due, the earlier arming stands,
        // unless a runner's request must come sooner.
        if before == 0 {
            kickAt.store(at, ordering: .releasing)
        } else {
            guard urgent else { return }
            var armed = kickAt.load(ordering: .acquiring)
            while at < armed {
                let (lowered, found) = kickAt.compareExchange(expected: armed, desired: at, ordering: .acquiringAndReleasing)
                if lowered { break }
                armed = found
            }
            guard at < armed else { return }
        }
        if lk_thread_self() != pacerThread.load(ordering: .acquiring) { lk_eventfd_signal(pacerWake) }
    }

    /// vCPU thread: a sync point kept the vCPU out of the guest for `costNs`; the next interrupt's bound follows.
    public func syncPointTook(_ costNs: UInt64) {
        let ns = bound.syncPointTook(costNs)
        latencyNs.store(ns, ordering: .relaxed)
        if ns > peakNs.load(ordering: .relaxed) { peakNs.store(ns, ordering: .relaxed) }
    }

    /// The longest sync points stretched the bound to (µs; 0: never beyond its floor). Any thread.
    public var peakStretchUs: UInt64 {
        let p = peakNs.load(ordering: .relaxed)
        return p > floorNs ? p / 1000 : 0
    }

    // ---- vCPU thread side ----

    /// Takes (and clears) what is due. One atomic exchange: cheap enough for every exit.
    @inline(__always) public func takeDue() -> Due { Due(rawValue: due.exchange(0, ordering: .acquiringAndReleasing)) }

    @inline(__always) public var anythingDue: Bool { due.load(ordering: .relaxed) != 0 }

    /// Publishes the next device deadline (host ns); wakes the pacer only when it moves earlier.
    public func publishDeadline(_ hostNs: UInt64) {
        let old = deadline.exchange(hostNs, ordering: .acquiringAndReleasing)
        if hostNs < old { lk_eventfd_signal(pacerWake) }
    }

    /// Blocks the vCPU thread (guest in HLT) until something is due.
    public func waitUntilDue() {
        while due.load(ordering: .acquiring) == 0 { _ = lk_eventfd_wait(vcpuWake, .max) }
    }

    /// Asks the vCPU loop to stop at its next exit (operator stop, failover of the peer).
    public func requestStop() { raise(.stop) }
}
