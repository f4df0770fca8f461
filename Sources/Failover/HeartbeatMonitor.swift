/// Pure heartbeat / failure-detection logic (no clock of its own: every call gets `now`, in ns).
///
/// Any frame counts as traffic: send a heartbeat only when nothing was sent for `intervalNs`;
/// presume the peer failed after `failureNs` without receiving anything.
public struct HeartbeatMonitor: Sendable, Equatable {
    public static let defaultIntervalNs: UInt64 = 5_000_000     // 5 ms
    public static let defaultFailureNs: UInt64 = 50_000_000     // 50 ms

    public let intervalNs: UInt64
    public let failureNs: UInt64
    public private(set) var lastSentNs: UInt64
    public private(set) var lastReceivedNs: UInt64

    /// `now` = when the link came up (counts as both sent and received).
    public init(now: UInt64, intervalNs: UInt64 = defaultIntervalNs, failureNs: UInt64 = defaultFailureNs) {
        precondition(intervalNs > 0 && failureNs > intervalNs, "failure threshold must exceed the heartbeat interval")
        self.intervalNs = intervalNs; self.failureNs = failureNs
        lastSentNs = now; lastReceivedNs = now
    }

    /// Record that any frame was sent at `now`.
    public mutating func didSend(now: UInt64) { lastSentNs = max(lastSentNs, now) }
    /// Record that any frame was received at `now`.
    public mutating func didReceive(now: UInt64) { lastReceivedNs = max(lastReceivedNs, now) }

    /// True when the link has been idle (nothing sent) for at least the interval.
    public func shouldSendHeartbeat(now: UInt64) -> Bool { now &- lastSentNs >= intervalNs && now >= lastSentNs }
    /// How long the peer has been silent.
    public func silenceNs(now: UInt64) -> UInt64 { now > lastReceivedNs ? now - lastReceivedNs : 0 }
    /// True when the peer has been silent for at least the failure threshold.
    public func peerPresumedFailed(now: UInt64) -> Bool { silenceNs(now: now) >= failureNs }
    /// The next instant something must happen (heartbeat due or failure declared): a poll deadline.
    public func nextDeadline() -> UInt64 { min(lastSentNs + intervalNs, lastReceivedNs + failureNs) }
}
