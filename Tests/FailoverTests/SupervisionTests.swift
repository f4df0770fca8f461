import Testing
@testable import Failover

/// `Supervision`, the HA-restart policy, over every kind of end without processes.
@Suite struct SupervisionTests {
    static let exits: [ChildEnd.Exit] = [.status(0), .status(1), .status(68), .status(70), .status(72), .status(74),
                                         .status(75), .status(76), .status(143), .signal(9), .signal(15), .signal(11)]
    static let long: UInt64 = 60_000

    @Test func aReportedEndStopsWithItsStatusWhateverTheExit() {
        for role in SupervisedRole.allCases {
            for exit in Self.exits + [.status(64), .status(71)] {
                for protected in [false, true] {
                    var s = Supervision()
                    let a = s.childEnded(ChildEnd(role: role, exit: exit, ended: 3, wasProtected: protected, ranMs: 5))
                    #expect(a == .stop(status: 3, why: "the pair ended (status 3)"), "\(role) \(exit)")
                }
            }
        }
    }

    @Test func theRestartedRoleIsTheSecondaryUnlessAPrimaryNeverRanProtected() {
        for role in SupervisedRole.allCases {
            for exit in Self.exits {
                for protected in [false, true] {
                    var s = Supervision()
                    guard case .restart(let next, let delay, let why) = s.childEnded(ChildEnd(role: role, exit: exit, wasProtected: protected, ranMs: Self.long)) else {
                        Issue.record("\(role) \(exit) protected=\(protected) was not restarted"); continue
                    }
                    let again = role == .primary && !protected && exit != .status(75)
                    #expect(next == (again ? .primary : .secondary), "\(role) \(exit) protected=\(protected)")
                    #expect(delay == 0)
                    #expect(why.hasPrefix("the \(role.rawValue) "), "\(why)")
                }
            }
        }
    }

    @Test func statusesNoRestartCuresStop() {
        for role in SupervisedRole.allCases {
            for s in Supervision.hopeless.sorted() {
                var p = Supervision()
                guard case .stop(let status, let why) = p.childEnded(ChildEnd(role: role, exit: .status(s), ranMs: Self.long)) else {
                    Issue.record("\(role) exit \(s) was restarted"); continue
                }
                #expect(status == s && why.contains("a restart cannot help"), "\(why)")
            }
        }
        // A signal's number is not a status: death by signal 64 (SIGRTMAX) is not exit status 64 (usage).
        for signo: Int32 in [1, 9, 64] {
            var p = Supervision()
            guard case .restart(.secondary, _, _) = p.childEnded(ChildEnd(role: .secondary, exit: .signal(signo), ranMs: Self.long)) else {
                Issue.record("signal \(signo) was not restarted"); continue
            }
        }
    }

    @Test func aStopRequestIsNeverFollowedByARestart() {
        for role in SupervisedRole.allCases {
            for exit in Self.exits {
                var s = Supervision()
                s.stopRequested()
                let a = s.childEnded(ChildEnd(role: role, exit: exit, wasProtected: true, ranMs: Self.long))
                guard case .stop(let status, let why) = a else { Issue.record("\(role) \(exit): \(a)"); continue }
                #expect(status == ChildEnd(role: role, exit: exit, ranMs: 0).status && why.hasSuffix("stopping as asked"))
            }
        }
    }

    @Test func quickRunsBackOffThenGiveUpAndALongRunForgetsThem() {
        var s = Supervision(quickRunMs: 10_000, maxQuickRuns: 5)
        let quick = ChildEnd(role: .secondary, exit: .signal(9), ranMs: 9_999)
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
        #expect(t.childEnded(ChildEnd(role: .secondary, exit: .signal(9), ranMs: 10_000)) == .restart(.secondary, delayMs: 0,
                why: "the secondary was killed by signal 9: restarting as the live side's secondary"))
        #expect(t.quickRuns == 0)
        #expect(Supervision.delayMs(quickRuns: 40) == 5_000)
    }

    /// A side killed right after it was seeded or protected is no crash loop: restarted at once, every time.
    @Test func aSideThatServedThePairIsAlwaysRestartedAtOnce() {
        var s = Supervision(quickRunMs: 10_000, maxQuickRuns: 2)
        for i in 0..<50 {
            let primary = i % 2 == 0
            let e = ChildEnd(role: primary ? .primary : .secondary, exit: .signal(9), wasProtected: primary, wasSeeded: !primary, ranMs: 50)
            #expect(s.childEnded(e) == .restart(.secondary, delayMs: 0, why: "the \(e.role.rawValue) was killed by signal 9: restarting as the live side's secondary"))
        }
        // Then a quick run that never served: the count starts from there.
        #expect(s.childEnded(ChildEnd(role: .secondary, exit: .status(76), ranMs: 50))
                == .restart(.secondary, delayMs: 0, why: "the secondary exited with 76: restarting as the live side's secondary"))
        guard case .restart(_, 200, _) = s.childEnded(ChildEnd(role: .secondary, exit: .status(76), ranMs: 50)) else { Issue.record("no back-off"); return }
        guard case .stop = s.childEnded(ChildEnd(role: .secondary, exit: .status(76), ranMs: 50)) else { Issue.record("did not give up"); return }
    }

    @Test func zeroQuickRestartsGivesUpOnTheFirstQuickEnd() {
        var s = Supervision(maxQuickRuns: 0)
        #expect(s.childEnded(ChildEnd(role: .primary, exit: .status(70), wasProtected: true, ranMs: Self.long))
                == .restart(.secondary, delayMs: 0, why: "the primary exited with 70: restarting as the live side's secondary"))
        guard case .stop(70, _) = s.childEnded(ChildEnd(role: .secondary, exit: .status(70), ranMs: 1)) else { Issue.record("restarted"); return }
    }
}
