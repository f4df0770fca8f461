import CLockstep
import Foundation
import Failover
import Glibc
import Pair
import Testing

/// `lockstep supervise` (HA restart) with real processes: a killed side comes back as the survivor's secondary.
extension PairTests { @Suite struct SuperviseTests {
    static let startedLine = "lockstep supervise: started the "

    /// The pid in a supervisor's `started the ROLE, pid N: ...` line.
    static func pid(in line: String) -> pid_t? {
        line.range(of: ", pid ").flatMap { pid_t(line[$0.upperBound...].prefix { $0.isNumber }) }
    }

    /// The pid of the `occurrence`th process a supervisor started.
    static func started(_ s: Child, _ occurrence: Int) throws -> pid_t {
        let l = try s.waitForLine(matching: { $0.hasPrefix(startedLine) }, describing: "started the", occurrence: occurrence)
        guard let p = pid(in: l) else { throw PairTestError("no pid in '\(l)'") }
        return p
    }

    /// Every process the supervisors started, killed (a failed test must not leave a guest running).
    static func killStarted(_ supervisors: [Child]) {
        for s in supervisors {
            for l in s.stderr where l.hasPrefix(startedLine) { if let p = pid(in: l) { kill(p, SIGKILL) } }
            s.kill9()
        }
    }

    /// A supervisor whose restarted secondary nobody seeded within 500 ms found `ended 0` in the pair record: it
    /// exits 0 and boots nothing.
    static func expectStoppedByTheRecord(_ s: Child, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(try s.wait(seconds: 30) == 0, "\(s.stderrText)", sourceLocation: sourceLocation)
        #expect(s.stderr.contains("lockstep supervise: no live side seeded the secondary within 500 ms, and the pair record says the guest ended (status 0): the pair ended; exiting with 0"),
                "\(s.stderrText)", sourceLocation: sourceLocation)
        #expect(!s.stderr.contains { $0.contains("--cold-restart") }, "\(s.stderrText)", sourceLocation: sourceLocation)
    }

    /// Two kill -9s, one per side, in one conversation: each time the survivor serves on, the supervisor of the
    /// killed side starts it again as a secondary, and the survivor seeds it and is protected again. The guest's
    /// end stops both supervisors with its status.
    /// Supervisor A runs the echo guest's primary (`supervise OPTIONS primary`), supervisor B its secondary; A is
    /// protected by B when this returns.
    struct Pair {
        let a, b: Child
        let udp, portA, portB: UInt16
        let ws: (dir: String, key: String, fence: String)

        /// B's secondary saves its seeds' guest here with `saveGuest`.
        var saved: String { ws.dir + "/saved" }

        /// A's processes answer `lockstep control` here with `controlA`.
        var control: String { ws.dir + "/a.sock" }

        /// A's supervisor's command line (to start it again).
        let argumentsA: [String]

        /// With `stateFiles`, each supervisor keeps its peer's moves in `state(side)` (`--state-file`).
        func state(_ side: String) -> String { ws.dir + "/\(side).state" }

        init(_ supervise: [String] = [], saveGuest: Bool = false, controlA: Bool = false, stateFiles: Bool = false,
             environmentA: [String: String] = [:]) throws {
            ws = try PairFixture.workspace()
            let secondary = saveGuest ? ["--save-guest", ws.dir + "/saved"] : []
            udp = try PairFixture.freeUDPPort()
            (portA, portB) = (try PairFixture.freeTCPPort(), try PairFixture.freeTCPPort())
            let common = PairFixture.common(ws) + ["--serial", "udp:127.0.0.1:\(udp)"]
            let (stateA, stateB) = stateFiles ? (["--state-file", ws.dir + "/A.state"], ["--state-file", ws.dir + "/B.state"]) : ([], [])
            b = try Child("supervisor-B", ["supervise"] + supervise + stateB + ["secondary", "--listen", "127.0.0.1:\(portB)",
                                           "--peer", "127.0.0.1:\(portA)"] + secondary + common)
            _ = try b.listeningPort()
            argumentsA = ["supervise"] + supervise + stateA + ["primary", try PairFixture.guest("echo"), "--peer",
                          "127.0.0.1:\(portB)", "--listen", "127.0.0.1:\(portA)", "--memory", "32"] + common
                          + (controlA ? ["--control", ws.dir + "/a.sock"] : [])
            a = try Child("supervisor-A", argumentsA, environment: environmentA)
            try a.waitForLine(containing: "protected: secondary")
        }
    }

    @Test func eachKilledSideComesBackAsTheSurvivorsSecondary() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair()
        let (a, b, portA, portB) = (pair.a, pair.b, pair.portA, pair.portB)
        defer { Self.killStarted([a, b]) }
        let talk = Conversation(port: pair.udp)
        talk.exchange(1...3, "a")

        kill(try Self.started(a, 1), SIGKILL)
        talk.exchange(4...4, "b", "\(b.stderrText)")
        try a.waitForLine(containing: "the primary was killed by signal 9: restarting as the live side's secondary")
        let restartA = try a.waitForLine(containing: "started the secondary", occurrence: 1)
        #expect(restartA.contains("lockstep secondary --listen 127.0.0.1:\(portA) --peer 127.0.0.1:\(portB)"), "\(restartA)")
        #expect(!restartA.contains("echo.elf") && !restartA.contains("--memory"), "\(restartA)")
        let seededA = try b.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portA)", seconds: 30)
        #expect(!seededA.contains("at exit 0:"), "\(seededA)")
        talk.exchange(5...6, "c")

        kill(try Self.started(b, 1), SIGKILL)
        talk.exchange(7...7, "d", "\(a.stderrText)")
        try b.waitForLine(containing: "the secondary was killed by signal 9: restarting as the live side's secondary")
        // The first such line was A's primary's, protected by B's first secondary.
        try a.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portB)", occurrence: 2, seconds: 30)
        talk.exchange(8...9, "e")

        talk.quit()
        #expect(try a.wait(seconds: 30) == 0, "\(a.stderrText)")
        #expect(try b.wait(seconds: 30) == 0, "\(b.stderrText)")
        for s in [a, b] {
            #expect(s.stderr.contains("lockstep supervise: the pair ended (status 0); exiting with 0"), "\(s.stderrText)")
            #expect(s.stderr.filter { $0.hasPrefix(Self.startedLine) }.count == 2, "\(s.stderrText)")
        }
        talk.expectConsistent()
    }

    /// A supervisor killed with kill -9 takes its process with it (a side is both): A's primary dies with A's
    /// supervisor, and B fails over as after a kill -9 of the primary itself. No orphan is left serving beside
    /// the pair, or waiting for its init's clean-up.
    @Test func aKilledSupervisorTakesItsProcessWithIt() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair()
        let (a, b) = (pair.a, pair.b)
        defer { Self.killStarted([a, b]) }
        let talk = Conversation(port: pair.udp)
        talk.exchange(1...2, "a")
        let primary = try Self.started(a, 1)
        let ended = lk_pidfd_open(primary)  // opened while it runs: the pid cannot be another process's yet
        #expect(ended >= 0, "pidfd_open(\(primary)): \(ended)")
        defer { if ended >= 0 { close(ended) } }
        a.kill9()
        var fds = [pollfd(fd: ended, events: Int16(POLLIN), revents: 0)]
        #expect(ended < 0 || poll(&fds, 1, 10_000) == 1, "A's primary (pid \(primary)) outlived its supervisor")
        try b.waitForLine(containing: "live: ")
        talk.exchange(3...4, "b", "\(b.stderrText)")
        talk.expectConsistent()
    }

    /// A process whose supervisor died between starting it and its first instructions (its parent is not the pid
    /// the supervisor named) says so and kills itself at once, before it could serve unsupervised.
    @Test func aProcessWhoseSupervisorIsGoneAtStartStops() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let gone: pid_t = 1  // this test's process is the parent, so pid 1 is not: as after a reparenting
        let pri = try Child("primary", ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:1"] + PairFixture.common(ws),
                            environment: [SupervisorReport.environmentName: "\(SupervisorReport.childDescriptor)",
                                          SupervisorReport.parentEnvironmentName: "\(gone)"])
        #expect(try pri.wait(seconds: 30) == SIGKILL, "\(pri.stderrText)")
        #expect(pri.stderr.contains("lockstep: the supervisor that started this process (pid \(gone)) is gone; stopping"), "\(pri.stderrText)")
        #expect(!FileManager.default.fileExists(atPath: ws.fence + "/lockstep.pair"), "it must stop before it touches the pair")
    }

    /// A primary killed after the pair record named its secondary but before it told its supervisor (fault
    /// injection puts the kill there): the supervisor reads the record, sees the guest ran protected, and
    /// restarts A as a secondary; B takes over and seeds it. Booting the guest again as a primary would race B
    /// for the fence and, winning, reboot a guest B holds.
    @Test func aPrimaryKilledBeforeItsReportRejoinsWhenTheRecordNamesItsSecondary() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair(environmentA: ["LOCKSTEP_FAULT_DIE_BEFORE_REPORT": "1"])
        let (a, b) = (pair.a, pair.b)
        defer { Self.killStarted([a, b]) }
        let said = try a.waitForLine(containing: "before it reported its protection")
        #expect(said.contains("the pair record says 'protected "), "\(said)")
        try a.waitForLine(containing: "the primary was killed by signal 9: restarting as the live side's secondary")
        try b.waitForLine(containing: "live: ")
        try b.waitForLine(containing: "protected: secondary at 127.0.0.1:\(pair.portA)", seconds: 30)
        let talk = Conversation(port: pair.udp)
        talk.exchange(1...2, "b", "\(b.stderrText)")
        #expect(!a.stderr.contains { $0.contains("starting it again as the primary") }, "\(a.stderrText)")
        talk.expectConsistent()
    }

    /// Both sides killed at once: each supervisor restarts its side as a secondary, nobody seeds either, and
    /// after the rejoin timeout A's supervisor (it has the image) boots the guest again as the primary, which
    /// B's restarted secondary protects. The guest's clients see it restart. When B has a saved copy too
    /// (`bothHaveIt`), both try: the first to take the fence boots the guest, the other becomes its secondary.
    @Test(arguments: [false, true]) func whenBothSidesAreKilledTheGuestBootsAgainProtected(bothHaveIt: Bool) throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair(["--rejoin-timeout-ms", "1000"], saveGuest: bothHaveIt)
        let (a, b) = (pair.a, pair.b)
        defer { Self.killStarted([a, b]); try? FileManager.default.removeItem(atPath: pair.ws.dir) }
        let talk = Conversation(port: pair.udp)
        talk.exchange(1...3, "a")
        let (pa, pb) = (try Self.started(a, 1), try Self.started(b, 1))
        kill(pa, SIGKILL)
        kill(pb, SIGKILL)
        try a.waitForLine(containing: "the primary was killed by signal 9: restarting as the live side's secondary")
        try b.waitForLine(containing: "the secondary was killed by signal 9: restarting as the live side's secondary")
        // Whoever boots the guest again says so once it holds the fence.
        let booted = "lockstep: cold restart: this side took the fence"
        let winner = try Child.first(of: [a, b], containing: booted)
        let (loser, loserPort) = winner === a ? (b, pair.portB) : (a, pair.portA)
        if !bothHaveIt { #expect(winner === a) }
        let cold = try winner.waitForLine(containing: "booting it again as the primary (a cold restart")
        // 'protected ID' (A's last record), or 'unprotected' if B saw A's socket close and went live before its kill.
        #expect(cold.contains("no live side seeded the secondary within 1000 ms, and the pair record says '"), "\(cold)")
        let started = try winner.waitForLine(containing: "started the primary", occurrence: winner === a ? 2 : 1)
        #expect(started.hasSuffix("--cold-restart"), "\(started)")
        try winner.waitForLine(containing: "protected: secondary at 127.0.0.1:\(loserPort)", occurrence: winner === a ? 2 : 1)
        // A new incarnation: its service counts requests from 1 again.
        let again = Conversation(port: pair.udp)
        again.exchange(1...2, "b")
        #expect(again.history.replies[1]?.hasPrefix("REP 1 1 ") == true, "\(again.history.replies)")
        again.quit()
        #expect(try a.wait(seconds: 30) == 0, "\(a.stderrText)")
        #expect(try b.wait(seconds: 30) == 0, "\(b.stderrText)")
        #expect(!loser.stderr.contains { $0.hasPrefix(booted) }, "\(loser.stderrText)")
        if !bothHaveIt {
            #expect(!b.stderr.contains { $0.contains("--cold-restart") }, "\(b.stderrText)")
            #expect(b.stderr.contains { $0.contains("this side cannot boot the guest: supervise secondary keeps a copy of the guest only with --save-guest DIR") }
                    || !b.stderr.contains { $0.contains("no live side seeded") }, "\(b.stderrText)")
        }
        talk.expectConsistent()
        again.expectConsistent()
    }

    /// Host A lost (its supervisor and primary killed), then B's process: B's supervisor restarts it, nobody seeds
    /// it, and it boots the guest again from the copy its secondary saved (`--save-guest`): unprotected at first
    /// (A's host is gone), protected once a secondary listens at A's address again.
    @Test func theSecondarysHostBootsTheGuestAgainFromItsSavedCopy() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair(["--rejoin-timeout-ms", "500"], saveGuest: true)
        let (a, b) = (pair.a, pair.b)
        defer { Self.killStarted([a, b]); try? FileManager.default.removeItem(atPath: pair.ws.dir) }
        let talk = Conversation(port: pair.udp)
        talk.exchange(1...2, "a")
        a.kill9()
        kill(try Self.started(a, 1), SIGKILL)
        try b.waitForLine(containing: "live: ")
        talk.exchange(3...3, "b", "\(b.stderrText)")
        kill(try Self.started(b, 1), SIGKILL)
        let cold = try b.waitForLine(containing: "booting it again as the primary (a cold restart")
        #expect(cold.contains("no live side seeded the secondary within 500 ms, and the pair record says 'unprotected'"), "\(cold)")
        let started = try b.waitForLine(containing: "started the primary")
        #expect(started.contains("lockstep primary \(pair.saved)/guest.elf --memory 32 --interrupt-latency-us 1000 --max-interrupt-latency-us 50000 --peer 127.0.0.1:\(pair.portA) --listen 127.0.0.1:\(pair.portB) "), "\(started)")
        #expect(started.hasSuffix("--connect-timeout-ms 0 --start-unprotected --cold-restart"), "\(started)")
        // It boots at once: host A is gone, and waiting for its secondary would only keep the guest down longer.
        try b.waitForLine(containing: "running the guest unprotected from its start; looking for a secondary at 127.0.0.1:\(pair.portA)")
        // A new incarnation: its service counts requests from 1 again.
        let again = Conversation(port: pair.udp)
        again.exchange(1...1, "c")
        #expect(again.history.replies[1]?.hasPrefix("REP 1 1 ") == true, "\(again.history.replies)")
        let newA = try Child("secondary-A", ["secondary", "--listen", "127.0.0.1:\(pair.portA)", "--serial", "udp:127.0.0.1:\(pair.udp)"]
                             + PairFixture.common(pair.ws))
        defer { newA.kill9() }
        try b.waitForLine(containing: "protected: secondary at 127.0.0.1:\(pair.portA)", seconds: 30)
        again.exchange(2...3, "d")
        again.quit()
        #expect(try b.wait(seconds: 30) == 0, "\(b.stderrText)")
        #expect(try newA.wait(seconds: 30) == 0, "\(newA.stderrText)")
        talk.expectConsistent()
        again.expectConsistent()
    }

    /// A stop signal to a supervisor whose primary runs protected (systemctl stop on host A: SIGTERM; Ctrl-C in its
    /// terminal: SIGINT): the primary hands the guest to B (nothing lost or repeated) and ends with 0, and nothing is
    /// restarted. The same to B's supervisor then, with nobody to hand the guest to, stops the guest: the pair
    /// record says it ended, so nothing boots it again.
    @Test(arguments: [SIGTERM, SIGINT]) func aStopSignalHandsAProtectedGuestOverBeforeTheSideStops(signo: Int32) throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair()
        let (a, b) = (pair.a, pair.b)
        defer { Self.killStarted([a, b]); try? FileManager.default.removeItem(atPath: pair.ws.dir) }
        let name = signo == SIGINT ? "SIGINT" : "SIGTERM"
        let talk = Conversation(port: pair.udp)
        talk.exchange(1...3, "a")
        // To every process, as systemd's stop with its default kill mode and a terminal's Ctrl-C do: A's primary
        // gets its own and the one its supervisor passes on. The second must not cut the handover short.
        a.signal(signo)
        kill(try Self.started(a, 1), signo)
        #expect(try a.wait(seconds: 30) == 0, "\(a.stderrText)")
        #expect(a.stderr.contains("lockstep: \(name): the secondary runs the guest now; this side ends"), "\(a.stderrText)")
        #expect(a.stderr.contains("lockstep supervise: the primary exited with 0; stopping as asked; exiting with 0"), "\(a.stderrText)")
        #expect(a.stderr.filter { $0.hasPrefix(Self.startedLine) }.count == 1, "\(a.stderrText)")
        talk.exchange(4...5, "b", "\(b.stderrText)")
        #expect(b.stderr.contains { $0.hasPrefix("live: the primary handed the guest over at exit ") }, "\(b.stderrText)")
        #expect(b.stderr.contains { $0.contains("(0 output bytes the primary may not have released are sent again)") }, "\(b.stderrText)")
        b.signal(signo)
        kill(try Self.started(b, 1), signo)
        #expect(try b.wait(seconds: 30) == 0, "\(b.stderrText)")
        #expect(b.stderr.contains("lockstep: \(name): handover refused: no secondary holds this guest's state yet; stopping the guest here (the pair record will say it ended)"), "\(b.stderrText)")
        #expect(b.stderr.contains("lockstep supervise: the pair ended (status 0); exiting with 0"), "\(b.stderrText)")
        #expect(try Fence(directory: pair.ws.fence).readPairRecord() == "ended 0")
        talk.expectConsistent()
    }

    /// The last side running the guest stopped by its operator (SIGTERM while its secondary's host is down) is not
    /// undone when that host returns: the secondary's supervisor, which could boot its saved copy, reads `ended`
    /// and stops instead. (Before, the record still named a running pair and the guest was booted again.)
    @Test func anOperatorsStopOfTheLastSideIsNotUndoneByAColdRestart() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair(["--rejoin-timeout-ms", "500"], saveGuest: true)
        let (a, b) = (pair.a, pair.b)
        defer { Self.killStarted([a, b]); b.signal(SIGCONT) }
        let talk = Conversation(port: pair.udp)
        talk.exchange(1...2, "a")
        // Host B down: its supervisor frozen, its secondary killed. A's primary runs on unprotected.
        b.signal(SIGSTOP)
        kill(try Self.started(b, 1), SIGKILL)
        try a.waitForLine(containing: "continuing unprotected", seconds: 10)
        talk.exchange(3...3, "b")
        a.signal(SIGTERM)
        #expect(try a.wait(seconds: 30) == 0, "\(a.stderrText)")
        #expect(a.stderr.contains { $0.hasPrefix("lockstep: SIGTERM: handover refused: ") && $0.hasSuffix("; stopping the guest here (the pair record will say it ended)") },
                "\(a.stderrText)")
        #expect(try Fence(directory: pair.ws.fence).readPairRecord() == "ended 0")
        // Host B back: nobody seeds its secondary, and the record says the guest ended.
        b.signal(SIGCONT)
        try Self.expectStoppedByTheRecord(b)
        talk.expectConsistent()
    }

    /// Host B lost for good: the operator starts a secondary on host C and moves A's peer there (`control peer`).
    /// When A's primary is then killed, C serves, and A's supervisor restarts A as C's secondary with `--peer C`
    /// (not the command line's B): once live again, A seeks its secondary on C.
    @Test func theOperatorsPeerOutlivesTheSidesRestart() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair(controlA: true, stateFiles: true)
        let (a, b, portA, portB, udp, control) = (pair.a, pair.b, pair.portA, pair.portB, pair.udp, pair.control)
        defer { Self.killStarted([a, b]); try? FileManager.default.removeItem(atPath: pair.ws.dir) }
        let common = PairFixture.common(pair.ws) + ["--serial", "udp:127.0.0.1:\(udp)"]
        let talk = Conversation(port: udp)
        talk.exchange(1...2, "a")
        // Host B gone: its supervisor and secondary killed.
        b.kill9()
        kill(try Self.started(b, 1), SIGKILL)
        let c = try Child("secondary-C", ["secondary", "--listen", "127.0.0.1:0", "--peer", "127.0.0.1:\(portA)"] + common)
        defer { c.kill9() }
        let portC = try c.listeningPort()
        let move = try Child("peer", ["control", control, "peer", "127.0.0.1:\(portC)"], captureStdout: true)
        #expect(try move.wait(seconds: 10) == 0, "\(move.stderrText)")
        try a.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portC)", seconds: 30)
        talk.exchange(3...4, "b")
        kill(try Self.started(a, 1), SIGKILL)
        talk.exchange(5...5, "c", "\(c.stderrText)")
        let said = try a.waitForLine(containing: "the peer moved to")
        #expect(said.hasSuffix("the peer moved to 127.0.0.1:\(portC): this side's next runs take --peer 127.0.0.1:\(portC)"), "\(said)")
        let restart = try a.waitForLine(containing: "started the secondary")
        #expect(restart.contains("--peer 127.0.0.1:\(portC)") && !restart.contains("--peer 127.0.0.1:\(portB)"), "\(restart)")
        try c.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portA)", seconds: 30)
        talk.exchange(6...7, "d")
        #expect(try SupervisorState.load(pair.state("A")) == SupervisorState(given: "127.0.0.1:\(portB)", peer: "127.0.0.1:\(portC)"))
        // Host A's supervisor itself killed and started again by its unit, with the command line naming B:
        // its state file names C. (Its first run, the primary, finds the fence held by C and rejoins.)
        kill(try Self.started(a, 2), SIGKILL)
        a.kill9()
        let a2 = try Child("supervisor-A2", pair.argumentsA)
        defer { Self.killStarted([a2]) }
        let kept = try a2.waitForLine(containing: "before this supervisor started")
        #expect(kept.hasSuffix("the peer moved from 127.0.0.1:\(portB) to 127.0.0.1:\(portC) before this supervisor started (\(pair.state("A"))): this side's runs take --peer 127.0.0.1:\(portC)"), "\(kept)")
        try c.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portA)", occurrence: 2, seconds: 30)
        talk.exchange(8...9, "e")
        // C lost in turn: A's restarted secondary goes live and looks for its own secondary on C, not on B.
        c.kill9()
        talk.exchange(10...10, "f", "\(a2.stderrText)")
        try a2.waitForLine(containing: "looking for a new secondary at 127.0.0.1:\(portC)")
        talk.expectConsistent()
    }

    /// A supervised pair after a migration: host A moves the guest to host C (supervised, `--peer B`). A's
    /// supervisor stops (the guest left its host on purpose); B, let go, takes C as its peer and tells its
    /// supervisor; C, live, re-protects itself on B. A kill -9 of C's process then fails over to B, which
    /// finds its new secondary on C (the restart of C's supervisor), not on A: the pair B + C is protected again.
    @Test func aSupervisedPairStaysProtectedAcrossAMigration() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair(controlA: true)
        let (a, b, portB, udp) = (pair.a, pair.b, pair.portB, pair.udp)
        let portC = try PairFixture.freeTCPPort()
        let c = try Child("supervisor-C", ["supervise", "secondary", "--listen", "127.0.0.1:\(portC)", "--peer", "127.0.0.1:\(portB)"]
                          + PairFixture.common(pair.ws) + ["--serial", "udp:127.0.0.1:\(udp)"])
        defer { Self.killStarted([a, b, c]); try? FileManager.default.removeItem(atPath: pair.ws.dir) }
        _ = try c.listeningPort()
        let talk = Conversation(port: udp)
        talk.exchange(1...2, "a")
        let move = try PairTests.MigrateTests.migrate(pair.control, to: portC)
        #expect(try move.wait(seconds: 60) == 0, "\(move.stderrText)\nA:\n\(a.stderrText)")
        #expect(try a.wait(seconds: 30) == 0, "\(a.stderrText)")
        #expect(a.stderr.contains("lockstep supervise: the primary moved the guest to 127.0.0.1:\(portC) (a migration): this side's part in the pair ended; exiting with 0"),
                "\(a.stderrText)")
        try b.waitForLine(containing: "let this side go; waiting for a primary to seed it again; once live, this side looks for its secondary at 127.0.0.1:\(portC)")
        try c.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portB)", seconds: 30)
        talk.exchange(3...4, "b")

        kill(try Self.started(c, 1), SIGKILL)
        talk.exchange(5...5, "c", "\(b.stderrText)")
        try c.waitForLine(containing: "the secondary was killed by signal 9: restarting as the live side's secondary")
        try b.waitForLine(containing: "protected: secondary at 127.0.0.1:\(portC)", seconds: 30)
        talk.exchange(6...7, "d")
        talk.quit()
        for s in [b, c] {
            #expect(try s.wait(seconds: 30) == 0, "\(s.stderrText)")
            #expect(s.stderr.contains("lockstep supervise: the pair ended (status 0); exiting with 0"), "\(s.stderrText)")
        }
        // B's process told its supervisor of the new peer when the migration let it go (said at the process's end).
        #expect(b.stderr.contains("lockstep supervise: the peer moved to 127.0.0.1:\(portC): this side's next runs take --peer 127.0.0.1:\(portC)"),
                "\(b.stderrText)")
        talk.expectConsistent()
    }

    /// A side restarted after the survivor's guest ended (its supervisor was stopped meanwhile) finds nobody to
    /// seed it; the pair record says the guest ended, so its supervisor stops with that status, booting nothing.
    @Test func aSideRejoiningAPairWhoseGuestEndedStops() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let pair = try Pair(["--rejoin-timeout-ms", "500"])
        let (a, b) = (pair.a, pair.b)
        defer { Self.killStarted([a, b]); a.signal(SIGCONT) }
        let talk = Conversation(port: pair.udp)
        talk.exchange(1...2, "a")
        a.signal(SIGSTOP)
        kill(try Self.started(a, 1), SIGKILL)
        talk.exchange(3...3, "b", "\(b.stderrText)")
        talk.quit()
        #expect(try b.wait(seconds: 30) == 0, "\(b.stderrText)")
        a.signal(SIGCONT)
        try Self.expectStoppedByTheRecord(a)
        talk.expectConsistent()
    }

    /// `primary --cold-restart` boots nothing when the pair record says the guest ended: it exits with that status
    /// (reported as the pair's end), freeing the fence; without a fence to read the record from it is a usage error.
    @Test func aColdRestartOfAGuestThatEndedBootsNothing() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        try "ended 3\n".write(toFile: ws.fence + "/lockstep.pair", atomically: true, encoding: .utf8)
        let args = ["primary", try PairFixture.guest("echo"), "--peer", "127.0.0.1:\(try PairFixture.freeTCPPort())", "--cold-restart"]
        let ended = try Child("cold-primary", args + PairFixture.common(ws))
        #expect(try ended.wait(seconds: 10) == 3, "\(ended.stderrText)")
        #expect(ended.stderr.contains("lockstep: cold restart: the pair record in \(ws.fence) says 'ended 3': the guest ended with 3; not booting it again"),
                "\(ended.stderrText)")
        #expect(try Fence(directory: ws.fence).readPairRecord() == "ended 3")
        let free = Fence(directory: ws.fence)
        #expect(try free.tryAcquire(identity: .current()) != nil, "the fence was left held")

        let unfenced = try Child("cold-primary-unfenced", args + ["--key-file", ws.key])
        #expect(try unfenced.wait(seconds: 10) == 64, "\(unfenced.stderrText)")
        #expect(unfenced.stderrText.contains("--cold-restart needs --fence"), "\(unfenced.stderrText)")
    }

    /// A primary that ends before its guest ran protected (here: no secondary within its connect timeout) starts
    /// again as the primary, backing off; once a secondary listens, the restarted primary is protected by it.
    @Test func aPrimaryThatNeverRanProtectedStartsAgainAsThePrimary() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let udp = try PairFixture.freeUDPPort()
        let (portA, portB) = (try PairFixture.freeTCPPort(), try PairFixture.freeTCPPort())
        let common = PairFixture.common(ws)
        // Many quick restarts allowed: a loaded host may start the secondary late.
        let a = try Child("supervisor-A", ["supervise", "--max-quick-restarts", "50", "primary", try PairFixture.guest("echo"),
                                           "--peer", "127.0.0.1:\(portB)", "--listen", "127.0.0.1:\(portA)", "--memory", "32",
                                           "--serial", "udp:127.0.0.1:\(udp)", "--connect-timeout-ms", "200"] + common)
        defer { Self.killStarted([a]) }
        try a.waitForLine(containing: "the primary exited with 68 before its guest ran protected: starting it again as the primary")
        _ = try Self.started(a, 2)
        let b = try Child("secondary", ["secondary", "--listen", "127.0.0.1:\(portB)", "--serial", "udp:127.0.0.1:\(udp)"] + common)
        defer { b.kill9() }
        try a.waitForLine(containing: "protected: secondary", seconds: 30)
        let talk = Conversation(port: udp)
        talk.exchange(1...2, "a")
        try talk.quitInLockstep(a, b)
        #expect(!a.stderr.contains { $0.contains("started the secondary") }, "\(a.stderrText)")
    }

    /// SIGTERM stops the supervised process and the supervisor, with no restart; a status no restart cures
    /// (a usage error of the process) stops it at once; the supervisor's own usage errors start nothing.
    @Test func stopsAndUsageErrorsAreNotRestarted() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        let common = PairFixture.common(ws)
        let peer = ["--peer", "127.0.0.1:\(try PairFixture.freeTCPPort())"]
        let listen = ["--listen", "127.0.0.1:\(try PairFixture.freeTCPPort())"]
        let s = try Child("supervisor", ["supervise", "secondary"] + listen + peer + common)
        defer { Self.killStarted([s]) }
        _ = try s.listeningPort()
        s.signal(SIGTERM)
        #expect(try s.wait(seconds: 10) == 143, "\(s.stderrText)")
        #expect(s.stderr.contains("lockstep supervise: the secondary was killed by signal 15; stopping as asked; exiting with 143"), "\(s.stderrText)")

        let bad = try Child("supervisor-bad", ["supervise", "secondary", "--encrypt", "sometimes"] + listen + peer + common)
        #expect(try bad.wait(seconds: 10) == 64, "\(bad.stderrText)")
        #expect(bad.stderr.contains("lockstep supervise: the secondary exited with 64: a restart cannot help (usage); exiting with 64"), "\(bad.stderrText)")

        let damaged = ws.dir + "/damaged.state"
        try "lockstep-supervise-state 1\ngiven 10.0.0.2:7400\npeer 10.0.0.3\n".write(toFile: damaged, atomically: false, encoding: .utf8)
        let cases: [([String], String)] = [
            (["supervise"], "give the command to run: primary GUEST ... or secondary ... (got nothing)"),
            (["supervise", "run", "x.elf"], "(got 'run')"),
            (["supervise", "secondary", "--key-file", ws.key] + listen + peer, "supervise needs --fence"),
            (["supervise", "secondary"] + listen + common, "supervise secondary needs --peer"),
            (["supervise", "secondary", "--listen", "127.0.0.1:0"] + peer + common, "the other side's --peer cannot name port 0"),
            (["supervise", "primary", "x.elf"] + peer + common, "supervise primary needs --listen"),
            (["supervise", "primary"] + listen + peer + common, "Missing expected argument '<guest>'"),
            (["supervise", "--state-file", damaged, "secondary"] + listen + peer + common,
             "--state-file \(damaged): line 3: '10.0.0.3' is not HOST:PORT; remove the file to start from the command line's --peer"),
        ]
        for (args, text) in cases {
            let c = try Child("supervise-usage", args)
            #expect(try c.wait(seconds: 10) == 64, "\(args): \(c.stderrText)")
            #expect(c.stderrText.contains(text), "\(args): \(c.stderrText)")
            #expect(!c.stderrText.contains("started the"), "\(args): \(c.stderrText)")
        }
        #expect(FileManager.default.fileExists(atPath: damaged), "a damaged state file stays for the operator")
    }
} }
