@testable import Machine
import Testing

/// The interrupt latency bound's rule, without KVM: what sync points' cost does to it.
struct LatencyBoundTests {
    let ms: UInt64 = 1_000_000
    let us: UInt64 = 1_000

    @Test func cheapSyncPointsLeaveTheBoundAtItsFloor() {
        var b = LatencyBound(floorNs: 1 * ms, ceilingNs: 100 * ms)
        // timer-compute's sync points cost ~30-80 µs here: a quarter of 1 ms is 250 µs.
        for _ in 0..<1000 { b.syncPointTook(80 * us) }
        #expect(b.ns == 1 * ms)
        // One slow sync point (a preempted thread) stretches the next bound a little, not for a phase.
        b.syncPointTook(2 * ms)
        #expect(b.ns > 1 * ms && b.ns <= 5 * ms, "\(b.ns)")
        b.syncPointTook(80 * us); b.syncPointTook(80 * us); b.syncPointTook(80 * us)
        #expect(b.ns < 2 * ms, "\(b.ns)")
    }

    @Test func expensiveSyncPointsStretchItToFourTimesTheirCostThenToTheCeiling() {
        var b = LatencyBound(floorNs: 1 * ms, ceilingNs: 100 * ms)
        for _ in 0..<40 { b.syncPointTook(5 * ms) }
        #expect(b.ns >= 19 * ms && b.ns <= 20 * ms, "\(b.ns)")  // converges on 4 × 5 ms
        for _ in 0..<40 { b.syncPointTook(60 * ms) }
        #expect(b.ns == 100 * ms)
        // Any cost, however absurd, stays at the ceiling (no overflow).
        b.syncPointTook(.max)
        #expect(b.ns == 100 * ms)
    }

    @Test func itShrinksBackToTheFloorWithinAFewCheapSyncPoints() {
        var b = LatencyBound(floorNs: 1 * ms, ceilingNs: 100 * ms)
        for _ in 0..<20 { b.syncPointTook(50 * ms) }
        #expect(b.ns == 100 * ms)
        var steps = 0
        while b.ns > 1 * ms && steps < 100 { b.syncPointTook(30 * us); steps += 1 }
        // Halving each time: from 50 ms of average cost to under 250 µs takes 8 cheap sync points.
        #expect(b.ns == 1 * ms && steps <= 9, "\(steps) steps, bound \(b.ns)")
    }

    @Test func aCeilingAtTheFloorNeverStretches() {
        var b = LatencyBound(floorNs: 2 * ms, ceilingNs: 2 * ms)
        for _ in 0..<10 { b.syncPointTook(500 * ms) }
        #expect(b.ns == 2 * ms)
        // A ceiling below the floor is the floor.
        #expect(LatencyBound(floorNs: 5 * ms, ceilingNs: 1 * ms).ceilingNs == 5 * ms)
    }

    /// The pacer arms a due interrupt's kick at the stretched bound, but the runner's own requests (a
    /// seed to finish, a stop) at the floor, even when an interrupt has already armed a later kick.
    @Test func theRunnersRequestsWaitOnlyTheFloor() {
        let p = Pacer(latencyMicroseconds: 1000, maxLatencyMicroseconds: 100_000)
        for _ in 0..<20 { p.syncPointTook(50 * ms) }
        #expect(p.peakStretchUs == 100_000)
        p.raise(.timer, now: 0)
        #expect(p.kickAt.load(ordering: .acquiring) == 100 * ms)
        p.raise(.boundary, now: 10 * ms)
        #expect(p.kickAt.load(ordering: .acquiring) == 11 * ms)
        // A later interrupt does not push it back.
        p.raise(.input, now: 10 * ms)
        #expect(p.kickAt.load(ordering: .acquiring) == 11 * ms)
        _ = p.takeDue()
        p.raise(.stop, now: 20 * ms)
        #expect(p.kickAt.load(ordering: .acquiring) == 21 * ms)
    }
}
