import Testing
@testable import Failover

/// `Supervision`, the HA-restart policy, over every kind of end without processes.
@Suite struct SupervisionTests {
    static let exits: [ChildEnd.Exit] = [.status(0), .status(1), .status(68), .status(70), .status(72), .status(74),
                                         .status(75), .status(76), .status(143), .signal(9), .signal(15), .signal(11)]
    static let long: UInt64 = 60_000
    /// The launches of a supervisor without a rejoin timeout.
    static let plain: [SupervisedLaunch] = [.primary, .secondary]

    @Test func aReportedEndStopsWithItsStatusWhateverTheExit() {
        for role in Self.plain {
            for exit in Self.exits + [.status(64), .status(71)] {
                for protected in [false, true] {
                    var s = Supervision()
                    let a = s.childEnded(ChildEnd(launch: role, exit: exit, ended: 3, wasProtected: protected, ranMs: 5))
                    #expect(a == .pairOver(status: 3, why: "the pair ended (status 3)"), "\(role) \(exit)")
                }
            }
        }
    }

    /// A side that moved its guest to another host (`control … migrate`) left the pair on purpose: restarted, it
    /// would wait for a seed nobody sends (the guest's new pair is the target and the other side).
    @Test func aSideThatMovedItsGuestAwayStops() {
        for launch in SupervisedLaunch.allCases {
            var s = Supervision(rejoinMs: 500)
            let a = s.childEnded(ChildEnd(launch: launch, exit: .status(0), movedTo: "10.0.0.3:7400", wasProtected: true, ranMs: Self.long))
            #expect(a == .pairOver(status: 0, why: "the \(launch.role.rawValue) moved the guest to 10.0.0.3:7400 (a migration): this side's part in the pair ended"),
                    "\(launch)")
        }
    }

    @Test func theRestartedRoleIsTheSecondaryUnlessAPrimaryNeverRanProtected() {
        for role in Self.plain {
            for exit in Self.exits {
                for protected in [false, true] {
                    var s = Supervision()
                    guard case .restart(let next, let delay, let why) = s.childEnded(ChildEnd(launch: role, exit: exit, wasProtected: protected, ranMs: Self.long)) else {
                        Issue.record("\(role) \(exit) protected=\(protected) was not restarted"); continue
                    }
                    let again = role == .primary && !protected && exit != .status(75)
                    #expect(next == (again ? .primary : .secondary), "\(role) \(exit) protected=\(protected)")
                    #expect(delay == 0)
                    #expect(why.hasPrefix("the \(role.role.rawValue) "), "\(why)")
                }
            }
        }
    }

    @Test func statusesNoRestartCuresStop() {
        for role in Self.plain {
            for s in Supervision.hopeless.sorted() {
                var p = Supervision()
                guard case .stop(let status, let why) = p.childEnded(ChildEnd(launch: role, exit: .status(s), ranMs: Self.long)) else {
                    Issue.record("\(role) exit \(s) was restarted"); continue
                }
                #expect(status == s && why.contains("a restart cannot help"), "\(why)")
            }
        }
        // A signal's number is not a status: death by signal 64 (SIGRTMAX) is not exit status 64 (usage).
        for signo: Int32 in [1, 9, 64] {
            var p = Supervision()
            guard case .restart(.secondary, _, _) = p.childEnded(ChildEnd(launch: .secondary, exit: .signal(signo), ranMs: Self.long)) else {
                Issue.record("signal \(signo) was not restarted"); continue
            }
        }
    }

    @Test func aStopRequestIsNeverFollowedByARestart() {
        for role in Self.plain {
            for exit in Self.exits {
                var s = Supervision()
                s.stopRequested()
                let a = s.childEnded(ChildEnd(launch: role, exit: exit, wasProtected: true, ranMs: Self.long))
                guard case .stop(let status, let why) = a else { Issue.record("\(role) \(exit): \(a)"); continue }
                #expect(status == ChildEnd(launch: role, exit: exit, ranMs: 0).status && why.hasSuffix("stopping as asked"))
            }
        }
    }

    @Test func quickRunsBackOffThenGiveUpAndALongRunForgetsThem() {
        var s = Supervision(quickRunMs: 10_000, maxQuickRuns: 5)
        let quick = ChildEnd(launch: .secondary, exit: .signal(9), ranMs: 9_999)
        var delays: [UInt64] = []
        for _ in 0..<5 {
            guard case .restart(.secondary, let d, _) = s.childEnded(quick) else { Issue.record("stopped early"); return }
            delays.append(d)
        }
        #expect(delays == [0, 200, 400, 800, 1600])
        guard case .stop(137, let why) = s.childEnded(quick) else { Issue.record("did not give up"); return }
        #expect(why.contains("giving up: 6 runs in a row ended within 10 s without serving the pair"), "\(why)")

        var t = Supervision(quickRunMs: 10_000, maxQuickRuns: 5)
        for _ in 0..<4 { _ = t.childEnded(quick) }
        #expect(t.childEnded(ChildEnd(launch: .secondary, exit: .signal(9), ranMs: 10_000)) == .restart(.secondary, delayMs: 0,
                why: "the secondary was killed by signal 9: restarting as the live side's secondary"))
        #expect(t.quickRuns == 0)
        #expect(Supervision.delayMs(quickRuns: 40) == 5_000)
    }

    /// A side killed right after it was seeded or protected is no crash loop: restarted at once, every time.
    @Test func aSideThatServedThePairIsAlwaysRestartedAtOnce() {
        var s = Supervision(quickRunMs: 10_000, maxQuickRuns: 2)
        for i in 0..<50 {
            let primary = i % 2 == 0
            let e = ChildEnd(launch: primary ? .primary : .secondary, exit: .signal(9), wasProtected: primary, wasSeeded: !primary, ranMs: 50)
            #expect(s.childEnded(e) == .restart(.secondary, delayMs: 0, why: "the \(e.role.rawValue) was killed by signal 9: restarting as the live side's secondary"))
        }
        // Then a quick run that never served: the count starts from there.
        #expect(s.childEnded(ChildEnd(launch: .secondary, exit: .status(76), ranMs: 50))
                == .restart(.secondary, delayMs: 0, why: "the secondary exited with 76: restarting as the live side's secondary"))
        guard case .restart(_, 200, _) = s.childEnded(ChildEnd(launch: .secondary, exit: .status(76), ranMs: 50)) else { Issue.record("no back-off"); return }
        guard case .stop = s.childEnded(ChildEnd(launch: .secondary, exit: .status(76), ranMs: 50)) else { Issue.record("did not give up"); return }
    }

    @Test func zeroQuickRestartsGivesUpOnTheFirstQuickEnd() {
        var s = Supervision(maxQuickRuns: 0)
        #expect(s.childEnded(ChildEnd(launch: .primary, exit: .status(70), wasProtected: true, ranMs: Self.long))
                == .restart(.secondary, delayMs: 0, why: "the primary exited with 70: restarting as the live side's secondary"))
        guard case .stop(70, _) = s.childEnded(ChildEnd(launch: .secondary, exit: .status(70), ranMs: 1)) else { Issue.record("restarted"); return }
    }

    /// With a rejoin timeout, a secondary restarted after the pair ran (or while a live side holds the fence)
    /// rejoins it; before that, it waits as long as it takes (the pair record may be an old pair's `ended`).
    @Test func restartsAfterThePairRanRejoinIt() {
        var s = Supervision(rejoinMs: 5_000)
        #expect(s.childEnded(ChildEnd(launch: .secondary, exit: .signal(9), ranMs: Self.long))
                == .restart(.secondary, delayMs: 0, why: "the secondary was killed by signal 9: restarting as the live side's secondary"))
        #expect(!s.pairRan)
        #expect(s.childEnded(ChildEnd(launch: .primary, exit: .status(75), ranMs: 1)) == .restart(.rejoin, delayMs: 0,
                why: "the primary exited with 75: restarting as the live side's secondary"))
        for launch in SupervisedLaunch.allCases {
            for exit in Self.exits where exit != .status(68) || launch != .rejoin {
                var t = Supervision(rejoinMs: 5_000)
                _ = t.childEnded(ChildEnd(launch: .secondary, exit: .signal(9), wasSeeded: true, ranMs: Self.long))
                #expect(t.pairRan)
                let a = t.childEnded(ChildEnd(launch: launch, exit: exit, wasProtected: true, ranMs: Self.long))
                #expect(a == .restart(.rejoin, delayMs: 0, why: "the \(launch.role.rawValue) \(ChildEnd(launch: launch, exit: exit, ranMs: 0).exitText): restarting as the live side's secondary"), "\(launch) \(exit)")
            }
        }
        var never = Supervision(rejoinMs: 0)
        _ = never.childEnded(ChildEnd(launch: .secondary, exit: .signal(9), wasSeeded: true, ranMs: Self.long))
        guard case .restart(.secondary, _, _) = never.childEnded(ChildEnd(launch: .primary, exit: .status(75), ranMs: 1)) else {
            Issue.record("no rejoin timeout still rejoined"); return
        }
    }

    /// A rejoining secondary nobody seeded in time makes the supervisor read the pair record: ended stops with the
    /// guest's status; anything else boots the guest again where the image is (else waits again, saying why).
    @Test func aRejoinThatTimesOutReadsThePairRecord() {
        for guest in [GuestAtHand.no("nothing saved"), .yes] {
            var s = Supervision(maxQuickRuns: 1, rejoinMs: 5_000)
            _ = s.childEnded(ChildEnd(launch: .primary, exit: .status(1), ranMs: 1))  // one quick run
            #expect(s.quickRuns == 1)
            #expect(s.childEnded(ChildEnd(launch: .rejoin, exit: .status(68), ranMs: 5_001)) == .readPairRecord)
            #expect(s.quickRuns == 0)
            let waited = "no live side seeded the secondary within 5000 ms, and the pair record"
            #expect(s.pairRecordRead(.ended(3), guest: guest) == .pairOver(status: 3, why: "\(waited) says the guest ended (status 3): the pair ended"))
            #expect(s.pairRecordRead(.unreadable("EIO"), guest: guest) == .restart(.rejoin, delayMs: 0, why: "\(waited) cannot be read (EIO): waiting again"))
            #expect(s.rejoinWaitMs == 5_000)
            let says = s.pairRecordRead(.says("protected 1f"), guest: guest)
            if guest == .yes {
                #expect(says == .restart(.coldPrimary, delayMs: 0, why: "\(waited) says 'protected 1f': nobody may run the guest; booting it again as the primary (a cold restart: the fence refuses it if a live side holds it)"))
                #expect(s.rejoinWaitMs == 5_000)
            } else {
                #expect(says == .restart(.rejoin, delayMs: 0, why: "\(waited) says 'protected 1f': waiting again, up to 10000 ms (this side cannot boot the guest: nothing saved)"))
                #expect(s.rejoinWaitMs == 10_000)
            }
            // A 68 from any other launch is a failure like any other.
            guard case .restart(let next, _, _) = s.childEnded(ChildEnd(launch: .secondary, exit: .status(68), ranMs: 1)), next != .coldPrimary else {
                Issue.record("a plain secondary's 68 was taken as a rejoin timeout"); continue
            }
        }
    }

    /// A cold primary that never ran protected starts again as a cold primary (the record is read again, under the
    /// fence); one refused by a held fence rejoins the live side.
    @Test func aColdPrimaryStaysColdUntilItRanProtected() {
        var s = Supervision(rejoinMs: 5_000)
        #expect(s.childEnded(ChildEnd(launch: .coldPrimary, exit: .status(68), ranMs: Self.long)) == .restart(.coldPrimary, delayMs: 0,
                why: "the primary exited with 68 before its guest ran protected: starting it again as the primary"))
        #expect(s.childEnded(ChildEnd(launch: .coldPrimary, exit: .status(75), ranMs: 1)).isRestart(.rejoin))
        #expect(s.childEnded(ChildEnd(launch: .coldPrimary, exit: .signal(9), wasProtected: true, ranMs: 1)).isRestart(.rejoin))
    }

    /// A live side that cannot reach this one (a cut FT link) makes it wait, try a cold restart the fence refuses,
    /// and wait again, for as long as that lasts: never giving up, each wait twice as long as the last (the held
    /// fence shows a live side, which seeds this one at once when it can), up to 30 s. A side that served the pair
    /// again starts over from the rejoin timeout.
    @Test func waitingForAnUnreachableLiveSideNeverGivesUp() {
        var s = Supervision(maxQuickRuns: 2, rejoinMs: 5_000)
        _ = s.childEnded(ChildEnd(launch: .primary, exit: .signal(9), wasProtected: true, ranMs: Self.long))
        var waits: [UInt64] = []
        for _ in 0..<100 {
            waits.append(s.rejoinWaitMs)
            guard case .readPairRecord = s.childEnded(ChildEnd(launch: .rejoin, exit: .status(68), ranMs: 5_000)) else { Issue.record("no record read"); return }
            #expect(s.pairRecordRead(.says("unprotected"), guest: .yes).isRestart(.coldPrimary))
            guard case .restart(.rejoin, 0, _) = s.childEnded(ChildEnd(launch: .coldPrimary, exit: .status(75), ranMs: 30)) else {
                Issue.record("the fenced cold primary did not rejoin at once"); return
            }
        }
        #expect(Array(waits.prefix(5)) == [5_000, 10_000, 20_000, 30_000, 30_000] && Set(waits.dropFirst(3)) == [30_000])
        _ = s.childEnded(ChildEnd(launch: .rejoin, exit: .signal(9), wasSeeded: true, ranMs: Self.long))
        #expect(s.rejoinWaitMs == 5_000)
        // A side that can never boot the guest backs off the same way; a rejoin timeout over the cap stays as given.
        var t = Supervision(rejoinMs: 5_000)
        for _ in 0..<3 { _ = t.pairRecordRead(.says("protected 1f"), guest: .no("nothing saved")) }
        #expect(t.rejoinWaitMs == 30_000)
        var u = Supervision(rejoinMs: 60_000)
        _ = u.pairRecordRead(.says("protected 1f"), guest: .no("nothing saved"))
        #expect(u.rejoinWaitMs == 60_000)
    }
}

extension SupervisorAction {
    func isRestart(_ launch: SupervisedLaunch) -> Bool {
        if case .restart(launch, _, _) = self { return true }
        return false
    }
}
