/// States of one side of the pair (raw values are stable; 0 is invalid).
public enum FailoverState: UInt8, Sendable, Equatable, CaseIterable {
    /// Primary running without a secondary (holds the fence). Outputs are not gated.
    case primaryUnprotected = 1
    /// Primary seeding a new secondary (outputs gated from here on).
    case primarySyncing = 2
    /// Primary in lockstep with a secondary.
    case primaryProtected = 3
    /// Secondary waiting for / handshaking with a primary.
    case secondaryConnecting = 4
    /// Secondary receiving the seed; it has no complete state yet and can never go live from here.
    case secondarySeeding = 5
    /// Secondary replaying the primary's log.
    case secondaryReplaying = 6
    /// Secondary lost the primary and is trying to take the fence.
    case secondaryFencing = 7
    /// Was a secondary, won the fence, and now runs as an (unprotected) primary.
    case live = 8
    /// Lost the fence: must never go live. Terminal.
    case fenced = 9
    /// Stopped (guest exited, operator, or nothing to go live with). Terminal.
    case stopped = 10
    /// Primary that stopped its guest where the secondary holds the whole log, gave up the fence and told
    /// the secondary to take over (a planned switchover); it waits to see the fence taken.
    case primaryHandingOver = 11
    /// Primary migrating the guest: it stopped the guest where its secondary holds the whole log, and the
    /// migration's target gets its final seed. Either could take the guest over; the guest stays stopped
    /// until the target holds its state (then it protects the guest) or fails (then the secondary goes on).
    case primaryMigrating = 12

    public var isPrimarySide: Bool { [.primaryUnprotected, .primarySyncing, .primaryProtected, .primaryHandingOver, .primaryMigrating, .live].contains(self) }
    public var isSecondarySide: Bool { [.secondaryConnecting, .secondarySeeding, .secondaryReplaying, .secondaryFencing].contains(self) }
    public var isTerminal: Bool { self == .fenced || self == .stopped }
    /// Whether a secondary is attached whose acks gate outputs.
    public var gatesOutput: Bool { [.primarySyncing, .primaryProtected, .primaryHandingOver, .primaryMigrating].contains(self) }
}

public enum FailoverEvent: Sendable, Equatable {
    /// TCP link up (handshake pending).
    case connected
    /// Handshake succeeded (authenticated, versions agree).
    case handshakeOK
    /// Seeding finished: primary side — the secondary holds the migrated state; secondary side — it has it.
    case seedComplete
    case heartbeatReceived
    case logReceived
    /// The peer said goodbye (orderly stop: the guest exited or the operator stopped it).
    case peerGoodbye
    /// No traffic from the peer for `ms`.
    case peerSilent(ms: UInt64)
    case channelError(String)
    case fenceAcquired(generation: UInt64)
    case fenceDenied(holder: String)
    /// The fence is still held after the fence wait, but the primary's pair record still names this secondary:
    /// the holder has not gone on without it (it could not have released output this side lacks), so its lock
    /// is a dead holder's that has not been released yet (an NFS lease running out after a host loss).
    case fenceHeld(holder: String)
    case guestExited
    case operatorStop
    /// The operator asks the primary to hand the guest over to its secondary (the secondary holds the log
    /// through the primary's stopped exit).
    case handoverRequested
    /// Primary handing over: the secondary took the fence.
    case peerTookOver
    /// Secondary: the primary handed over (it stopped, sent all its log, and gave up the fence).
    case peerHandover
    /// Primary: a migration's target, seeded by pre-copy while the secondary protected the guest, is ready for
    /// its final seed, and the secondary holds the log through the exit where the guest stopped.
    case migrationSwitch
    /// Primary migrating: the target did not confirm its final seed (lost, refused it, or out of time).
    case migrationAbandoned(String)

    /// One representative of every case (for exhaustive tests).
    public static let representatives: [FailoverEvent] = [
        .connected, .handshakeOK, .seedComplete, .heartbeatReceived, .logReceived, .peerGoodbye,
        .peerSilent(ms: 10), .peerSilent(ms: 1000), .channelError("reset"), .fenceAcquired(generation: 7),
        .fenceDenied(holder: "hostA pid 1"), .guestExited, .operatorStop, .handoverRequested, .peerTookOver, .peerHandover,
        .fenceHeld(holder: "hostA pid 1"), .migrationSwitch, .migrationAbandoned("the target refused its seed"),
    ]
}

public enum FailoverAction: Sendable, Equatable {
    /// Release every output held for acks (the secondary is gone or no longer needed).
    case releaseGatedOutput
    /// Start seeding the new secondary and gate outputs on its acks.
    case startProtection
    /// Continue without a secondary (warns).
    case dropProtection
    /// Try the fence (test-and-set), retried for the fence wait.
    case acquireFence
    /// Keep trying the fence, with no deadline, for as long as the pair record names this secondary.
    case awaitFence
    /// Replay every received entry, then switch devices from replay to live.
    case drainLogAndGoLive
    /// Take over the service address.
    case bindServiceAddress
    case stop(reason: String)
    /// Listen for a new secondary (re-protection).
    case acceptNewSecondary
    case logWarning(String)
    /// Planned switchover: with the guest stopped and the log held by the secondary, give up the fence and
    /// tell the secondary to take over.
    case handOver

    /// Actions only a secondary may perform.
    public var isSecondaryAction: Bool {
        switch self { case .acquireFence, .awaitFence, .drainLogAndGoLive: true; default: false }
    }
}

/// The failover logic as a pure state machine: `state + event -> (state, [action])`. No I/O.
///
/// Preconditions (held by the caller): a primary starts in `primaryUnprotected` only after it
/// took the fence, and holds it for its lifetime; a secondary starts in `secondaryConnecting`.
public struct FailoverMachine: Sendable, Equatable {
    public private(set) var state: FailoverState
    /// Silence shorter than this is not a failure (the heartbeat monitor normally decides).
    public let silenceThresholdMs: UInt64

    public init(state: FailoverState, silenceThresholdMs: UInt64 = 50) {
        self.state = state
        self.silenceThresholdMs = silenceThresholdMs
    }

    public static func primary() -> FailoverMachine { FailoverMachine(state: .primaryUnprotected) }
    public static func secondary() -> FailoverMachine { FailoverMachine(state: .secondaryConnecting) }

    @discardableResult
    public mutating func handle(_ event: FailoverEvent) -> [FailoverAction] {
        let (s, a) = FailoverMachine.transition(state, event, silenceThresholdMs: silenceThresholdMs)
        state = s
        return a
    }

    /// The whole transition table. Pairs not listed leave the state unchanged with no actions.
    public static func transition(_ state: FailoverState, _ event: FailoverEvent, silenceThresholdMs: UInt64 = 50)
        -> (FailoverState, [FailoverAction])
    {
        let lostPeer: Bool
        switch event {
        case .peerSilent(let ms): lostPeer = ms >= silenceThresholdMs
        case .channelError: lostPeer = true
        default: lostPeer = false
        }
        let reason: String
        switch event {
        case .peerSilent(let ms): reason = "peer silent for \(ms) ms"
        case .channelError(let e): reason = "channel error: \(e)"
        default: reason = "\(event)"
        }

        switch (state, event) {
        // Terminal states absorb everything.
        case (.fenced, _), (.stopped, _):
            return (state, [])

        // Stopping is always possible and always releases held output first on a primary.
        case (_, .operatorStop):
            return (.stopped, state.gatesOutput ? [.releaseGatedOutput, .stop(reason: "operator stop")] : [.stop(reason: "operator stop")])
        case (_, .guestExited) where state.isPrimarySide:
            return (.stopped, state.gatesOutput ? [.releaseGatedOutput, .stop(reason: "guest exited")] : [.stop(reason: "guest exited")])
        case (_, .guestExited):
            return (.stopped, [.stop(reason: "replayed guest exited")])

        // Primary side (including a secondary that went live).
        case (.primaryUnprotected, .handshakeOK), (.live, .handshakeOK):
            return (.primarySyncing, [.startProtection])
        case (.primarySyncing, .seedComplete):
            return (.primaryProtected, [])
        case (.primaryProtected, .handoverRequested):
            return (.primaryHandingOver, [.handOver])
        case (.primaryUnprotected, .handoverRequested), (.primarySyncing, .handoverRequested), (.live, .handoverRequested):
            return (state, [.logWarning("handover refused: no secondary holds this guest's state yet")])
        case (.primaryHandingOver, .peerTookOver):
            return (.stopped, [.releaseGatedOutput, .stop(reason: "handed over to the secondary")])
        case (.primaryHandingOver, .fenceAcquired):
            // The secondary did not take the fence in time, and this side took it back: it never went live.
            return (.primaryUnprotected, [.releaseGatedOutput, .dropProtection,
                                          .logWarning("handover failed: the secondary did not take the fence in time; continuing unprotected"),
                                          .acceptNewSecondary])
        case (.primaryHandingOver, _):
            // The secondary closing the link is part of the handover; the fence decides the outcome.
            return (state, [])
        case (.primaryProtected, .migrationSwitch):
            return (.primaryMigrating, [])
        case (.primaryMigrating, .seedComplete):
            // The target holds the guest's state: it protects the guest now, and the secondary is let go.
            return (.primaryProtected, [])
        case (.primaryMigrating, .migrationAbandoned(let why)):
            return (.primaryProtected, [.logWarning("migration abandoned (\(why)); the secondary that protected the guest protects it on")])
        case (.primaryMigrating, .handoverRequested):
            return (state, [.logWarning("handover refused: a migration is moving the guest's protection")])
        case (.primaryMigrating, .logReceived):
            return (state, [.logWarning("log frame received by a primary; ignored")])
        case (.primaryMigrating, _):
            // Two links are up and the guest is stopped with nothing held: the loss of either is settled by the
            // primary when the switch ends (the target's seed confirmed, or the migration abandoned).
            return (state, [])
        case (.primarySyncing, _), (.primaryProtected, _):
            if lostPeer || event == .peerGoodbye {
                return (.primaryUnprotected, [.releaseGatedOutput, .dropProtection,
                                              .logWarning("secondary lost (\(reason)); continuing unprotected"), .acceptNewSecondary])
            }
            if event == .logReceived {
                return (state, [.logWarning("log frame received by a primary; ignored")])
            }
            return (state, [])

        // Secondary side.
        case (.secondaryConnecting, .handshakeOK):
            return (.secondarySeeding, [])
        case (.secondaryConnecting, _) where lostPeer:
            return (.secondaryConnecting, [.logWarning("no primary yet (\(reason)); retrying")])
        case (.secondarySeeding, .seedComplete):
            return (.secondaryReplaying, [])
        case (.secondarySeeding, _) where lostPeer || event == .peerGoodbye:
            // Without a complete seed there is nothing to go live with.
            return (.stopped, [.stop(reason: "primary lost during seeding (\(reason)); nothing to go live with")])
        case (.secondaryReplaying, .peerGoodbye):
            return (.stopped, [.stop(reason: "primary stopped in an orderly way")])
        case (.secondaryReplaying, .peerHandover):
            return (.secondaryFencing, [.logWarning("the primary hands the guest over; taking the fence"), .acquireFence])
        case (.secondaryReplaying, _) where lostPeer:
            return (.secondaryFencing, [.logWarning("primary presumed failed (\(reason)); taking the fence"), .acquireFence])
        case (.secondaryFencing, .fenceAcquired(let g)):
            return (.live, [.drainLogAndGoLive, .bindServiceAddress,
                            .logWarning("went live with fence generation \(g); unprotected"), .acceptNewSecondary])
        case (.secondaryFencing, .fenceHeld(let holder)):
            return (.secondaryFencing, [.logWarning("the fence is held by \(holder), but the pair record still names this secondary: "
                                                    + "waiting for the lock to be released (a lost host's lease to run out), then going live"),
                                        .awaitFence])
        case (.secondaryFencing, .fenceDenied(let holder)):
            return (.fenced, [.stop(reason: "fence held by \(holder); not going live")])

        // Spurious fence results outside fencing never change anything.
        default:
            return (state, [])
        }
    }
}
