/// The interrupt latency bound, adapted to what sync points cost. A due interrupt waits at most the bound for
/// a natural exit before the pacer kicks the guest, and a kick in a recording costs a sync point: the vCPU
/// state and every page dirtied since the last one. For most guests that is tens of µs and the bound stays
/// at its floor (`--interrupt-latency-us`). A guest that writes memory fast in ring 3 makes each sync point
/// carry hundreds or thousands of pages, and at a 1 ms bound it would spend most of its time in them (the
/// `dirty` guest ran ~120× slower). So the bound stretches until a sync point costs at most 1/`share` of it:
/// fewer sync points, each carrying a page once however often it was rewritten meanwhile, up to `ceiling`
/// (`--max-interrupt-latency-us`; equal to the floor: no stretching). It shrinks as soon as sync points are
/// cheap again.
///
/// A pure value: the pacer feeds it each sync point's cost (the vCPU's time stopped for its capture and
/// send) and reads the bound back (`LatencyBoundTests`).
struct LatencyBound: Sendable, Equatable {
    let floorNs: UInt64
    let ceilingNs: UInt64
    /// A sync point may cost 1/share of the bound before the bound stretches (the guest then runs at least
    /// four fifths of the time).
    static let share: UInt64 = 4
    /// Smoothed cost (ns): half the last sync point's, half the history's. One slow sync point (a preempted
    /// thread) stretches a bound or two; a cheap one between dear ones costs one halving, won back by the next.
    /// (Rising by a quarter and falling by half damped such blips, but the `dirty` guest's recordings then
    /// took 1.4-2.3 s instead of 0.75-1.1 s: its cheap sync points pulled the bound down for longer.)
    private(set) var averageCostNs: UInt64 = 0
    /// The bound now (ns).
    private(set) var ns: UInt64

    init(floorNs: UInt64, ceilingNs: UInt64) {
        self.floorNs = floorNs
        self.ceilingNs = max(floorNs, ceilingNs)
        ns = floorNs
    }

    /// A sync point took `costNs` of the vCPU's time; returns the new bound.
    @discardableResult
    mutating func syncPointTook(_ costNs: UInt64) -> UInt64 {
        averageCostNs = averageCostNs / 2 + costNs / 2
        ns = averageCostNs >= ceilingNs / Self.share ? ceilingNs : max(floorNs, averageCostNs * Self.share)
        return ns
    }
}
