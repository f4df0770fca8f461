import CLockstep
import Foundation
import Machine
import Synchronization

/// What one thread waking another costs on this host: the FT link is such a chain per log batch (the
/// primary's vCPU thread wakes the secondary's receiver, whose ack wakes the primary's link thread), so its
/// replication lag cannot be smaller, and where the threads sit decides which figure applies.
///
/// Two threads bounce a token through two eventfds; each round trip is two wake-ups. On bare-metal VMX
/// hosts both figures are a few µs. In a VM whose idle cores halt (no guest halt-polling), waking a thread
/// on another core takes an IPI to a halted vCPU, tens of µs.
enum WakeProbe {
    struct Result { var sameCoreUs: Double; var crossCoreUs: Double; var cores: (Int32, Int32)? }

    /// Median round trip, µs, of `rounds` between a thread on `a` and one on `b` (nil: unpinned); nil if the
    /// other thread stopped answering (bounded: 1 s per round trip).
    static func roundTrip(_ a: Int32?, _ b: Int32?, rounds: Int = 2000) -> Double? {
        let ping = lk_eventfd(), pong = lk_eventfd()
        guard ping >= 0, pong >= 0 else { return nil }
        defer { close(ping); close(pong) }
        let done = DispatchSemaphore(value: 0)
        startThread("lockstep-probe") {
            Cores.pinCurrentThread(b)
            for _ in 0..<rounds {
                guard lk_eventfd_wait(ping, lk_monotonic_ns() + 1_000_000_000) == 1 else { break }
                lk_eventfd_signal(pong)
            }
            done.signal()
        }
        // The caller's thread stands in for the other side; its mask is restored afterwards.
        Cores.pinCurrentThread(a)
        defer { _ = lk_unpin_current_thread() }
        var us: [Double] = []
        us.reserveCapacity(rounds)
        for _ in 0..<rounds {
            let t = lk_monotonic_ns()
            lk_eventfd_signal(ping)
            guard lk_eventfd_wait(pong, lk_monotonic_ns() + 1_000_000_000) == 1 else { break }
            us.append(Double(lk_monotonic_ns() &- t) / 1000)
        }
        done.wait()
        return us.count == rounds ? percentile(us, 50) : nil
    }

    /// Same core (the vCPU's) and across cores (the vCPU's and the pacer's); nil with fewer than two cores.
    static func measure() -> Result? {
        guard let v = Cores.vcpu, let h = Cores.housekeeping,
              let same = roundTrip(v, v), let cross = roundTrip(v, h) else { return nil }
        return Result(sameCoreUs: same, crossCoreUs: cross, cores: (v, h))
    }

    /// How this host's idle cores wait (`cpuidle` driver, guest halt-polling), which sets the cross-core cost.
    static func idleInfo() -> [String: Any] {
        func read(_ p: String) -> String? {
            (try? String(contentsOfFile: p, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        var info: [String: Any] = [:]
        if let d = read("/sys/devices/system/cpu/cpuidle/current_driver") { info["cpuidle_driver"] = d }
        if let g = read("/sys/devices/system/cpu/cpuidle/current_governor") { info["cpuidle_governor"] = g }
        if let p = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") { info["guest_halt_poll_ns"] = Int(p) ?? p }
        return info
    }
}
