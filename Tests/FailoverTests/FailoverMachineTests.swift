import Testing
@testable import Failover

typealias S = FailoverState

/// Index of each representative event (FailoverEvent.representatives order).
let E = FailoverEvent.representatives
let evConnected = 0, evHandshake = 1, evSeed = 2, evHeartbeat = 3, evLog = 4, evGoodbye = 5,
    evShortSilence = 6, evSilence = 7, evChannelError = 8, evFenceOK = 9, evFenceDenied = 10,
    evGuestExited = 11, evOperatorStop = 12, evHandoverRequested = 13, evPeerTookOver = 14, evPeerHandover = 15,
    evFenceHeld = 16, evMigrationSwitch = 17, evMigrationAbandoned = 18

/// The expected next state for every (state, event) pair; pairs not listed keep the state.
let expectedNext: [S: [Int: S]] = [
    .primaryUnprotected: [evHandshake: .primarySyncing, evGuestExited: .stopped, evOperatorStop: .stopped],
    .primarySyncing: [evSeed: .primaryProtected, evGoodbye: .primaryUnprotected, evSilence: .primaryUnprotected,
                      evChannelError: .primaryUnprotected, evGuestExited: .stopped, evOperatorStop: .stopped],
    .primaryProtected: [evGoodbye: .primaryUnprotected, evSilence: .primaryUnprotected,
                        evChannelError: .primaryUnprotected, evGuestExited: .stopped, evOperatorStop: .stopped,
                        evHandoverRequested: .primaryHandingOver, evMigrationSwitch: .primaryMigrating],
    .primaryHandingOver: [evPeerTookOver: .stopped, evFenceOK: .primaryUnprotected, evGuestExited: .stopped, evOperatorStop: .stopped],
    // Losing a link changes nothing here: the primary settles which one it was when the switch ends.
    .primaryMigrating: [evSeed: .primaryProtected, evMigrationAbandoned: .primaryProtected, evGuestExited: .stopped, evOperatorStop: .stopped],
    .secondaryConnecting: [evHandshake: .secondarySeeding, evGuestExited: .stopped, evOperatorStop: .stopped],
    .secondarySeeding: [evSeed: .secondaryReplaying, evGoodbye: .stopped, evSilence: .stopped, evChannelError: .stopped,
                        evGuestExited: .stopped, evOperatorStop: .stopped],
    .secondaryReplaying: [evGoodbye: .stopped, evSilence: .secondaryFencing, evChannelError: .secondaryFencing,
                          evGuestExited: .stopped, evOperatorStop: .stopped, evPeerHandover: .secondaryFencing],
    .secondaryFencing: [evFenceOK: .live, evFenceDenied: .fenced, evGuestExited: .stopped, evOperatorStop: .stopped],
    .live: [evHandshake: .primarySyncing, evGuestExited: .stopped, evOperatorStop: .stopped],
    .fenced: [:],
    .stopped: [:],
]

func warning(_ a: FailoverAction) -> String { if case .logWarning(let w) = a { w } else { "" } }
func hasStop(_ a: [FailoverAction]) -> Bool { a.contains { if case .stop = $0 { true } else { false } } }

@Suite struct FailoverMachineTests {
    @Test func rawValuesAreExplicitAndNonZero() {
        #expect(FailoverState(rawValue: 0) == nil)
        #expect(S.allCases.map(\.rawValue) == Array(1...12))
    }

    @Test(arguments: S.allCases)
    func everyStateEventPairMatchesTheTable(state: S) {
        for (i, event) in E.enumerated() {
            let (next, actions) = FailoverMachine.transition(state, event)
            let want = expectedNext[state]?[i] ?? state
            #expect(next == want, "\(state) + \(event)")
            // A handover asked of a primary no secondary protects is refused with a warning.
            let refusedHandover = i == evHandoverRequested && [.primaryUnprotected, .primarySyncing, .primaryMigrating, .live].contains(state)
            let abandoned = state == .primaryMigrating && i == evMigrationAbandoned
            let awaits = state == .secondaryFencing && i == evFenceHeld
            if next == state && !awaits && !(state == .secondaryConnecting && (i == evSilence || i == evChannelError))
                && !(state.gatesOutput && state != .primaryHandingOver && i == evLog) && !refusedHandover && !abandoned {
                #expect(actions.isEmpty, "\(state) + \(event) -> \(actions)")
            }
            // Invariants, pair by pair.
            if next == .live && state != .live { #expect(state == .secondaryFencing && i == evFenceOK) }
            if state.isTerminal { #expect(next == state && actions.isEmpty) }
            if state.isPrimarySide { #expect(!actions.contains { $0.isSecondaryAction }, "\(state) + \(event)") }
            if state.gatesOutput && !next.gatesOutput {
                #expect(actions.first == .releaseGatedOutput, "output must be released: \(state) + \(event)")
            }
            if state.gatesOutput && next == .primaryUnprotected {
                #expect(actions.contains(.dropProtection) && actions.contains(.acceptNewSecondary) && !hasStop(actions))
            }
            if next == .stopped || next == .fenced, state != next { #expect(hasStop(actions)) }
            if actions.contains(.drainLogAndGoLive) { #expect(next == .live && actions.contains(.bindServiceAddress)) }
            if actions.contains(.acquireFence) { #expect(next == .secondaryFencing) }
            // Only a fencing secondary the record still names waits on a held fence, and it stays fencing.
            if actions.contains(.awaitFence) { #expect(awaits && next == .secondaryFencing && actions.last == .awaitFence) }
            if refusedHandover { #expect(actions.count == 1 && !actions.contains(.handOver), "\(state) + \(event) -> \(actions)") }
            // Only a protected primary hands over, and a handover ends only on the fence's say.
            if actions.contains(.handOver) { #expect(state == .primaryProtected && next == .primaryHandingOver) }
            if state == .primaryHandingOver && next != state { #expect([evPeerTookOver, evFenceOK, evGuestExited, evOperatorStop].contains(i)) }
            // A migration's switch starts only from a protected primary and never drops protection on its own.
            if next == .primaryMigrating && state != next { #expect(state == .primaryProtected && i == evMigrationSwitch && actions.isEmpty) }
            if state == .primaryMigrating { #expect(next.gatesOutput || next == .stopped, "\(state) + \(event)") }
        }
    }

    @Test func plannedHandover() {
        var p = FailoverMachine(state: .primaryProtected)
        #expect(p.handle(.handoverRequested) == [.handOver])
        // The secondary closes the link as it takes over: no loss of protection is declared.
        #expect(p.handle(.channelError("peer closed")) == [] && p.state == .primaryHandingOver)
        #expect(p.handle(.peerTookOver) == [.releaseGatedOutput, .stop(reason: "handed over to the secondary")])
        var s = FailoverMachine(state: .secondaryReplaying)
        #expect(s.handle(.peerHandover).last == .acquireFence)
        #expect(s.handle(.fenceAcquired(generation: 2)).first == .drainLogAndGoLive && s.state == .live)
        // A secondary that never takes the fence: the primary takes it back and goes on unprotected.
        var q = FailoverMachine(state: .primaryHandingOver)
        let a = q.handle(.fenceAcquired(generation: 3))
        #expect(q.state == .primaryUnprotected && a.first == .releaseGatedOutput && a.contains(.acceptNewSecondary))
    }

    @Test func goLiveOrder() {
        var m = FailoverMachine.secondary()
        #expect(m.handle(.connected) == [])
        #expect(m.handle(.handshakeOK) == [])
        #expect(m.handle(.seedComplete) == [])
        #expect(m.handle(.logReceived) == [])
        #expect(m.handle(.peerSilent(ms: 10)) == [])   // below the threshold
        let a = m.handle(.peerSilent(ms: 60))
        #expect(m.state == .secondaryFencing && a.last == .acquireFence)
        #expect(m.handle(.peerSilent(ms: 120)) == [])  // no second fence attempt
        let live = m.handle(.fenceAcquired(generation: 3))
        #expect(m.state == .live)
        #expect(live.first == .drainLogAndGoLive && live[1] == .bindServiceAddress && live.last == .acceptNewSecondary)
        #expect(m.handle(.handshakeOK) == [.startProtection])   // re-protection
        #expect(m.state == .primarySyncing)
    }

    @Test func partitionedSecondaryIsFenced() {
        var m = FailoverMachine(state: .secondaryReplaying)
        m.handle(.channelError("reset"))
        let a = m.handle(.fenceDenied(holder: "hostA pid 10"))
        #expect(m.state == .fenced)
        guard case .stop(let r) = a.first else { Issue.record("no stop"); return }
        #expect(r.contains("hostA pid 10"))
        #expect(m.handle(.fenceAcquired(generation: 9)) == [] && m.state == .fenced)
    }

    /// A lock still held after the fence wait while the record names this side: wait on, then go live or stop.
    @Test func aHeldFenceTheRecordAllowsIsAwaited() {
        var m = FailoverMachine(state: .secondaryReplaying)
        m.handle(.peerSilent(ms: 60))
        let a = m.handle(.fenceHeld(holder: "hostA pid 10"))
        #expect(m.state == .secondaryFencing && a.last == .awaitFence)
        guard case .logWarning(let w) = a.first else { Issue.record("no warning"); return }
        #expect(w.contains("hostA pid 10"))
        var late = m
        #expect(late.handle(.fenceAcquired(generation: 4)).first == .drainLogAndGoLive && late.state == .live)
        #expect(hasStop(m.handle(.fenceDenied(holder: "hostA pid 10"))) && m.state == .fenced)
    }

    /// A migration keeps the guest protected throughout: the secondary protects it while the target is seeded
    /// and while the stopped guest's final seed reaches the target; then the target protects it and gets it.
    @Test func aMigrationProtectsTheGuestUntilTheTargetHasIt() {
        var m = FailoverMachine(state: .primaryProtected)
        #expect(m.handle(.migrationSwitch) == [] && m.state == .primaryMigrating && m.state.gatesOutput)
        // The target's attach and the loss of either link wait for the primary to settle the switch.
        #expect(m.handle(.handshakeOK) == [] && m.handle(.channelError("reset")) == [] && m.state == .primaryMigrating)
        #expect(m.handle(.handoverRequested).first.map(warning)?.hasPrefix("handover refused: a migration") == true && m.state == .primaryMigrating)
        var done = m
        #expect(done.handle(.seedComplete) == [] && done.state == .primaryProtected)
        #expect(done.handle(.handoverRequested) == [.handOver])
        var abandoned = m
        let a = abandoned.handle(.migrationAbandoned("the target refused its seed"))
        #expect(abandoned.state == .primaryProtected && a.first.map(warning)?.contains("the target refused its seed") == true)
        // Outside a switch the migration's events change nothing.
        var u = FailoverMachine.primary()
        #expect(u.handle(.migrationSwitch) == [] && u.handle(.migrationAbandoned("late")) == [] && u.state == .primaryUnprotected)
    }

    @Test func primaryLosingItsSecondaryReleasesOutputAndContinues() {
        var m = FailoverMachine(state: .primaryProtected)
        let a = m.handle(.peerSilent(ms: 51))
        #expect(m.state == .primaryUnprotected)
        #expect(a.first == .releaseGatedOutput && a.contains(.dropProtection))
    }

    /// Random event sequences from both starting roles, checking the invariants along the way.
    @Test func randomSequencesKeepTheInvariants() {
        var rng = SplitMix(seed: 0x10C5_7E9)
        for run in 0..<20_000 {
            var m = run % 2 == 0 ? FailoverMachine.primary() : FailoverMachine.secondary()
            let startedSecondary = m.state.isSecondarySide
            var wasDenied = false, wentLive = false
            var history: [FailoverEvent] = []
            for _ in 0..<40 {
                let e = E[Int(rng.next() % UInt64(E.count))]
                history.append(e)
                let before = m.state
                let liveBefore = wentLive
                let actions = m.handle(e)
                if m.state == .live && before != .live {
                    #expect(before == .secondaryFencing && e == .fenceAcquired(generation: 7), "\(history)")
                    #expect(startedSecondary)
                    wentLive = true
                }
                if case .fenceDenied = e, before == .secondaryFencing { wasDenied = true }
                if wasDenied { #expect(m.state == .fenced && actions.allSatisfy { if case .stop = $0 { true } else { false } }) }
                if liveBefore || before.isPrimarySide { #expect(!actions.contains { $0.isSecondaryAction }, "\(history)") }
                if before.gatesOutput && !m.state.gatesOutput { #expect(actions.contains(.releaseGatedOutput)) }
                if !startedSecondary { #expect(m.state.isPrimarySide || m.state == .stopped) }
            }
        }
    }
}

struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct HeartbeatMonitorTests {
    @Test func heartbeatsWhenIdleAndFailureAfterSilence() {
        let ms: UInt64 = 1_000_000
        var h = HeartbeatMonitor(now: 1000 * ms)
        #expect(!h.shouldSendHeartbeat(now: 1004 * ms))
        #expect(h.shouldSendHeartbeat(now: 1005 * ms))
        h.didSend(now: 1005 * ms)
        #expect(!h.shouldSendHeartbeat(now: 1009 * ms))
        #expect(h.nextDeadline() == 1010 * ms)
        #expect(!h.peerPresumedFailed(now: 1049 * ms))
        #expect(h.peerPresumedFailed(now: 1050 * ms))
        h.didReceive(now: 1040 * ms)
        #expect(!h.peerPresumedFailed(now: 1089 * ms))
        #expect(h.silenceNs(now: 1089 * ms) == 49 * ms)
        #expect(h.peerPresumedFailed(now: 1090 * ms))
        h.didReceive(now: 1030 * ms)   // out-of-order timestamps never move time back
        #expect(h.lastReceivedNs == 1040 * ms)
        #expect(h.silenceNs(now: 1000 * ms) == 0)
    }

    @Test func customThresholds() {
        let h = HeartbeatMonitor(now: 0, intervalNs: 100, failureNs: 1000)
        #expect(h.shouldSendHeartbeat(now: 100) && !h.peerPresumedFailed(now: 999) && h.peerPresumedFailed(now: 1000))
    }
}
