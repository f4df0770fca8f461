import ArgumentParser
import CLockstep
import Failover
import Foundation
import Glibc
import Pair

/// HA restart: runs `lockstep primary|secondary ...` and, when it dies while its guest lives, starts this
/// host's side again as the live side's new secondary, which seeds it and is protected again. The decisions
/// are `Supervision`'s (pure, in Failover); this is the process plumbing.
struct SuperviseCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "supervise",
        abstract: "HA restart: run a primary or secondary and restart this side as the live side's secondary when it dies.",
        discussion: """
        lockstep supervise primary GUEST --peer B:PORT --listen A:PORT --fence ... [options]
        lockstep supervise secondary --listen B:PORT --peer A:PORT --fence ... [options]
        A side killed (kill -9, a crash) or stopped by its fence while the guest lives is started again as \
        `lockstep secondary --listen <its --listen> --peer <its --peer>` with the same pair options; the live side \
        (started with --peer) seeds it. A primary that dies before its guest ran protected starts again as the \
        primary. A restarted secondary that no live side seeds within --rejoin-timeout-ms makes the supervisor read \
        the pair record: if the guest ended, it stops with that status; if nobody runs the guest (both sides were \
        lost), a side that has the guest image boots it again as the primary (a cold restart, unprotected until a \
        secondary answers at its --peer; the fence refuses it while a live side holds it): supervise primary always, \
        supervise secondary when given --save-guest DIR and seeded once; otherwise it waits again. \
        Stops, with the pair's status, when the guest ends; with 0 when its side moved the guest to another host \
        (`lockstep control SOCKET migrate`); \
        on SIGTERM, SIGINT or SIGHUP (passed on to the process, which is not restarted; a process running the guest protected hands it over first, \
        and one running it unprotected stops it and records that it ended, so no supervisor boots it again; SIGINT and SIGHUP stay ignored when \
        the supervisor started with them ignored, as under nohup or a shell's &); after --max-quick-restarts quick runs in a row (under 10 s, never seeded \
        nor protected); and on a status no restart can cure (64 usage, 65 bad image, 69 no KVM, 71 guest crashed). \
        SIGUSR2 is passed on (a handover). The process dies with its supervisor (kill -9 of either loses this side). \
        An operator's `lockstep control SOCKET peer HOST:PORT` carries into later runs, and so does a migration's target for \
        the secondary it let go; with --state-file, into this supervisor's own restarts too (while the command line's --peer \
        is the one the move replaced). Needs --fence: a restart without one could make a second primary.
        """)
    @Option(name: .long, help: "Give up after this many quick runs in a row: ended within 10 s, never seeded nor protected (a side killed after it served the pair is always restarted at once).") var maxQuickRestarts: Int = 5
    @Option(name: .long, help: "How long a restarted secondary waits for a live side's seed before the pair record is read: the guest ended (stop with its status), or nobody runs it (both sides were lost: this side boots it again if it has the image, a cold restart) (ms; 0: wait forever, never a cold restart). A wait that could only end in waiting again (this side cannot boot the guest, or a live side holds the fence) doubles the next, up to 30 s.") var rejoinTimeoutMs: UInt64 = 5_000
    @Option(name: .long, help: "Keep the address the peer moved to here (an operator's `control … peer`, a migration's target), so that this supervisor, started again by its unit with the old --peer, takes the new one. Removed when the pair ends. A damaged file stops the supervisor with an error naming it.") var stateFile: String?
    @Argument(parsing: .allUnrecognized, help: "primary GUEST ... or secondary ...: the command to run.") var command: [String] = []

    func run() throws {
        var plan = try SupervisePlan(command)
        let peer = plan.peer
        if let path = stateFile {
            let saved: SupervisorState?
            do { saved = try SupervisorState.load(path) } catch { throw fail("supervise: \(error)", .usage) }
            switch SupervisorState.resolve(commandLine: peer, saved: saved) {
            case .commandLine: break
            case .moved(let moved):
                plan.movePeer(to: moved)
                say("the peer moved from \(peer) to \(moved) before this supervisor started (\(path)): this side's runs take --peer \(moved)")
            case .superseded(let old):
                say("\(path) kept a move of the peer from \(old.given) to \(old.peer), but --peer is now \(peer): taking --peer \(peer)")
                forget(path)
            }
        }
        guard maxQuickRestarts >= 0 else { throw fail("--max-quick-restarts \(maxQuickRestarts): at least 0", .usage) }
        var policy = Supervision(maxQuickRuns: maxQuickRestarts, rejoinMs: rejoinTimeoutMs)
        let signals = SupervisorSignals()
        var launch: SupervisedLaunch = plan.first == .primary ? .primary : .secondary
        // Resolved once: an upgrade that replaces the file restarts into the new binary, not a deleted inode.
        let exe = Spawn.selfExecutable
        while true {
            let args = plan.arguments(launch, rejoinMs: policy.rejoinWaitMs)
            let child: SupervisedChild
            do { child = try SupervisedChild(exe, args) } catch { throw fail("supervise: \(error)", .internalError) }
            say("started the \(launch.role.rawValue), pid \(child.pid): lockstep \(args.joined(separator: " "))")
            var end = child.waitForEnd(launch: launch, signals: signals) { policy.stopRequested() }
            if end.role == .primary, !end.wasProtected, end.ended == nil, case .says(let text) = plan.readPairRecord(), PairRecord.namesASecondary(text) {
                // Killed between naming its secondary in the record and telling this supervisor: that secondary
                // holds the guest and may take over, so this side must come back as a secondary, not boot it again.
                say("the primary ended before it reported its protection, but the pair record says '\(text)': its guest ran protected")
                end.wasProtected = true
            }
            if let moved = child.movedPeer {
                plan.movePeer(to: moved)
                say("the peer moved to \(moved): this side's next runs take --peer \(moved)")
                if let path = stateFile { keep(SupervisorState(given: plan.peer, peer: moved), in: path) }
            }
            var action = policy.childEnded(end)
            if case .readPairRecord = action { action = policy.pairRecordRead(plan.readPairRecord(), guest: plan.lookForGuest()) }
            switch action {
            case .stop(let status, let why):
                say("\(why); exiting with \(status)")
                throw ExitCode(status)
            case .pairOver(let status, let why):
                if let path = stateFile { forget(path) }
                say("\(why); exiting with \(status)")
                throw ExitCode(status)
            case .restart(let next, let delayMs, let why):
                say(why + (delayMs > 0 ? " in \(delayMs) ms" : ""))
                if signals.stopArrives(withinMs: delayMs) {
                    say("stopping as asked before the restart; exiting with \(end.status)")
                    throw ExitCode(end.status)
                }
                launch = next
            case .readPairRecord:
                throw fail("supervise: the pair record was asked for twice", .internalError)
            }
        }
    }

    private func say(_ s: String) { stderr("lockstep supervise: \(s)") }

    /// A state that cannot be written costs only this supervisor's own restart its knowledge of the move.
    private func keep(_ state: SupervisorState, in path: String) {
        do {
            if state.peer == state.given { try SupervisorState.remove(path) } else { try state.save(path) }
        } catch {
            say("\(error): if this supervisor is started again, its runs take --peer \(state.given), not \(state.peer)")
        }
    }

    private func forget(_ path: String) {
        do { try SupervisorState.remove(path) } catch { say("\(error)") }
    }
}

/// The commands a supervisor runs: the one it was given, this side's secondary derived from it, and (for a
/// cold restart) a primary of the guest image it was given or its secondary saved.
struct SupervisePlan {
    let first: SupervisedRole
    private var given: [String]
    private var secondary: [String]
    private let fence: FenceLocation
    private let fenceLeaseMs: Int
    /// supervise secondary: its `--save-guest`, and the primary's options its cold restart takes from it.
    private let saveGuest: String?
    private var coldCarried: [String]
    /// The command line's --peer (a primary's secondary; a secondary's, once live), before any move.
    let peer: String
    /// The saved guest `lookForGuest` found (supervise secondary).
    private var saved: SavedGuest?

    /// Options only a primary takes; the rest carry over to its secondary.
    static let primaryOnly: Set<String> = ["--memory", "--interrupt-latency-us", "--max-interrupt-latency-us", "--connect-timeout-ms", "--cold-restart", "--start-unprotected"]
    /// The options of `primary` that take no value.
    static let flags: Set<String> = ["--verbose", "--cold-restart", "--start-unprotected"]
    /// Options only a secondary takes (and its addresses, which a cold primary takes as --listen and --peer).
    static let secondaryOnly: Set<String> = ["--listen", "--peer", "--accept-timeout-ms", "--link-poll-us", "--save-guest"]

    init(_ command: [String]) throws {
        guard let verb = command.first, let role = SupervisedRole(rawValue: verb) else {
            throw fail("supervise: give the command to run: primary GUEST ... or secondary ... (got \(command.first.map { "'\($0)'" } ?? "nothing"))", .usage)
        }
        let args = Array(command.dropFirst())
        let pair: PairArguments
        let listen: String
        switch role {
        case .primary:
            let p = try Self.parse(PrimaryCommand.self, args)
            guard let l = p.listen else {
                throw fail("supervise primary needs --listen HOST:PORT: its restart is a secondary listening there, for the live side's --peer", .usage)
            }
            (pair, listen, self.peer) = (p.pair, l, p.peer)
            secondary = ["--listen", l] + Self.carriedOver(args, dropping: Self.primaryOnly.union(["--listen"]), flags: Self.flags)
            _ = try Self.parse(SecondaryCommand.self, secondary)
            (saveGuest, coldCarried) = (nil, [])
        case .secondary:
            let s = try Self.parse(SecondaryCommand.self, args)
            guard let peer = s.peer else {
                throw fail("supervise secondary needs --peer HOST:PORT: once live it seeds the other side's restart there", .usage)
            }
            (pair, listen, self.peer) = (s.pair, s.listen, peer)
            secondary = args
            saveGuest = s.saveGuest
            coldCarried = ["--peer", peer, "--listen", listen] + Self.carriedOver(args, dropping: Self.secondaryOnly, flags: ["--verbose"])
            _ = try Self.parse(PrimaryCommand.self, ["guest.elf"] + coldCarried)
        }
        guard !listen.hasSuffix(":0") else {
            throw fail("supervise: --listen \(listen): the other side's --peer cannot name port 0; give a port", .usage)
        }
        guard let f = pair.fence else {
            throw fail("supervise needs --fence: a restart without one could leave two live primaries", .usage)
        }
        do { fence = try FenceLocation(parsing: f) } catch { throw fail("\(error)", .usage) }
        fenceLeaseMs = pair.fenceLeaseMs
        first = role
        given = args
    }

    /// The command for `launch`: a rejoining secondary with the rejoin timeout as its accept timeout (replacing
    /// any given); a cold restart's primary (the given image, or the saved guest with the secondary's options)
    /// with `--cold-restart --start-unprotected --connect-timeout-ms 0`.
    func arguments(_ launch: SupervisedLaunch, rejoinMs: UInt64) -> [String] {
        switch launch {
        case .primary: return ["primary"] + given
        case .coldPrimary:
            // Booted for a pair that lost its guest: at once, unprotected, rather than down while no secondary
            // answers (the other host may be gone too); its connector seeds the other side when it listens.
            var boot = given
            if first == .secondary {
                guard let g = saved else { preconditionFailure("a cold restart of supervise secondary before lookForGuest found a guest") }
                boot = [g.imagePath, "--memory", "\(g.memoryMiB)", "--interrupt-latency-us", "\(g.interruptLatencyUs)",
                        "--max-interrupt-latency-us", "\(g.maxInterruptLatencyUs)"] + coldCarried
            }
            return ["primary"] + Self.without("--connect-timeout-ms", boot.filter { $0 != "--cold-restart" && $0 != "--start-unprotected" })
                + ["--connect-timeout-ms", "0", "--start-unprotected", "--cold-restart"]
        case .secondary: return ["secondary"] + (first == .secondary ? given : secondary)
        case .rejoin:
            return ["secondary"] + Self.without("--accept-timeout-ms", first == .secondary ? given : secondary)
                + ["--accept-timeout-ms", "\(rejoinMs)"]
        }
    }

    /// The pair record, read without the fence (only a holder writes it; `ended` stays until a new primary starts).
    func readPairRecord() -> PairRecordReading {
        do {
            let text = try fence.open(leaseMs: fenceLeaseMs).readPairRecord() ?? "(none)"
            return PairRecord.endedStatus(text).map { .ended($0) } ?? .says(text)
        } catch { return .unreadable("\(error)") }
    }

    /// The operator moved the other side (`lockstep control SOCKET peer`): every later run names the new one.
    mutating func movePeer(to address: String) {
        func moved(_ args: [String]) -> [String] {
            args.contains { $0 == "--peer" || $0.hasPrefix("--peer=") } ? Self.without("--peer", args) + ["--peer", address] : args
        }
        given = moved(given)
        secondary = moved(secondary)
        coldCarried = moved(coldCarried)
    }

    /// Whether this side could boot the guest now: supervise primary has its image; supervise secondary has the
    /// copy its secondaries saved (`--save-guest`), checked here and kept for `arguments(.coldPrimary, ...)`.
    mutating func lookForGuest() -> GuestAtHand {
        guard first == .secondary else { return .yes }
        guard let dir = saveGuest else { return .no("supervise secondary keeps a copy of the guest only with --save-guest DIR") }
        do { saved = try SavedGuest.load(dir) } catch {
            saved = nil
            return .no("\(error)")
        }
        return .yes
    }

    /// `args` without the option `name` (and its value).
    static func without(_ name: String, _ args: [String]) -> [String] {
        var out: [String] = []
        var i = 0
        while i < args.count {
            if args[i] == name { i += 2; continue }
            if !args[i].hasPrefix(name + "=") { out.append(args[i]) }
            i += 1
        }
        return out
    }

    private static func parse<C: ParsableCommand>(_ type: C.Type, _ args: [String]) throws -> C {
        do { return try C.parse(args) } catch {
            throw fail("supervise \(C.configuration.commandName ?? ""): \(C.fullMessage(for: error))", .usage)
        }
    }

    /// One side's arguments without its positional arguments (a primary's guest image) and the options in
    /// `dropping`. Every option takes a value except `flags`; the derived command is parsed before use.
    static func carriedOver(_ args: [String], dropping: Set<String>, flags: Set<String>) -> [String] {
        var out: [String] = []
        var i = 0
        while i < args.count {
            let a = args[i]
            i += 1
            guard a.hasPrefix("--") else { continue }  // the guest image, the only positional argument
            let name = String(a.split(separator: "=", maxSplits: 1)[0])
            let inline = a.contains("=")
            let value = inline || flags.contains(name) || i >= args.count ? nil : args[i]
            if value != nil { i += 1 }
            if dropping.contains(name) { continue }
            out.append(a)
            if let value { out.append(value) }
        }
        return out
    }
}

/// The stop signals (SIGTERM, and SIGINT and SIGHUP unless ignored) and SIGUSR2 (a handover), each routed to an eventfd to poll.
final class SupervisorSignals {
    let stop: [Int32: Int32]
    let handover: Int32

    init() {
        var s: [Int32: Int32] = [:]
        for signo in stopSignals() { s[signo] = lk_signal_eventfd(signo) }
        stop = s
        handover = lk_signal_eventfd(SIGUSR2)
    }

    /// Polls the stop signals for up to `ms`; true when one arrived.
    func stopArrives(withinMs ms: UInt64) -> Bool {
        guard ms > 0 else { return false }
        var fds = stop.values.filter { $0 >= 0 }.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        return poll(&fds, nfds_t(fds.count), Int32(ms)) > 0
    }
}

/// One supervised process and the pipe on which it reports (`SupervisorReport`).
final class SupervisedChild {
    let pid: pid_t
    private let pidfd: Int32
    private let reports: Int32
    private let startNs = lk_monotonic_ns()
    private var partial: [UInt8] = []
    private var wasProtected = false
    private var wasSeeded = false
    private var ended: Int32?
    private var movedTo: String?
    /// The last address the peer moved to while this process ran (the operator's `peer`, or a migration).
    private(set) var movedPeer: String?

    init(_ exe: String, _ args: [String]) throws {
        var fds: [Int32] = [-1, -1]
        // pipe2 is not visible from Swift; this process has no other thread that could spawn meanwhile.
        guard pipe(&fds) == 0 else { throw Spawn.Failure(description: "pipe: \(String(cString: strerror(errno)))") }
        for f in fds { _ = fcntl(f, F_SETFD, FD_CLOEXEC) }
        _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
        let fd = SupervisorReport.childDescriptor
        // dup2 onto itself would keep O_CLOEXEC: move the write end out of the way first.
        if fds[1] == fd { let w = fcntl(fd, F_DUPFD_CLOEXEC, fd + 1); close(fd); fds[1] = w }
        defer { close(fds[1]) }
        do {
            pid = try Spawn.start(exe, args, files: [.dup(fds[1], to: fd)], environment: [SupervisorReport.environmentName: "\(fd)",
                                                                                   SupervisorReport.parentEnvironmentName: "\(getpid())"])
        } catch {
            close(fds[0])
            throw error
        }
        reports = fds[0]
        pidfd = lk_pidfd_open(pid)
    }

    deinit {
        close(reports)
        if pidfd >= 0 { close(pidfd) }
    }

    /// Waits for the process to end, passing the supervisor's signals on (`stopped` runs for a stop signal).
    func waitForEnd(launch: SupervisedLaunch, signals: SupervisorSignals, stopped: () -> Void) -> ChildEnd {
        var fds = [pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0), pollfd(fd: reports, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: signals.handover, events: Int16(POLLIN), revents: 0)]
        let stops = Array(signals.stop)
        fds += stops.map { pollfd(fd: $0.value, events: Int16(POLLIN), revents: 0) }
        while true {
            var st: Int32 = 0
            let r = waitpid(pid, &st, WNOHANG)
            let lost = r < 0 && errno != EINTR
            if lost {
                // Not this process's child any more (only if SIGCHLD were ignored): its status is unknowable.
                stderr("lockstep supervise: waitpid(\(pid)): \(String(cString: strerror(errno))); taking it as killed")
                st = SIGKILL
            }
            if r == pid || lost {
                readReports()
                let (code, signal) = Spawn.decode(st)
                return ChildEnd(launch: launch, exit: code.map { .status($0) } ?? .signal(signal), ended: ended, movedTo: movedTo,
                                wasProtected: wasProtected, wasSeeded: wasSeeded, ranMs: (lk_monotonic_ns() &- startNs) / 1_000_000)
            }
            // Without pidfd_open (Linux < 5.3) the child's end is looked for every 50 ms.
            for i in fds.indices { fds[i].revents = 0 }
            guard poll(&fds, nfds_t(fds.count), pidfd >= 0 ? -1 : 50) > 0 else { continue }
            if fds[1].revents != 0 { readReports() }
            if fds[2].revents != 0 { drain(signals.handover); kill(pid, SIGUSR2) }
            for (i, s) in stops.enumerated() where fds[3 + i].revents != 0 {
                drain(s.value)
                stopped()
                kill(pid, s.key)
            }
        }
    }

    private func drain(_ fd: Int32) {
        var v: UInt64 = 0
        _ = read(fd, &v, 8)
    }

    private func readReports() {
        var buf = [UInt8](repeating: 0, count: 512)
        while true {
            let n = buf.withUnsafeMutableBytes { read(reports, $0.baseAddress, $0.count) }
            guard n > 0 else { break }
            partial += buf[0..<n]
        }
        while let nl = partial.firstIndex(of: 0x0A) {
            let line = String(decoding: partial[..<nl], as: UTF8.self)
            partial.removeSubrange(...nl)
            if line == "protected" { wasProtected = true }
            if line == "seeded" { wasSeeded = true }
            if line.hasPrefix("ended "), let s = Int32(line.dropFirst(6)) { ended = s }
            if line.hasPrefix("peer "), line.count > 5 { movedPeer = String(line.dropFirst(5)) }
            if line.hasPrefix("moved "), line.count > 6 { movedTo = String(line.dropFirst(6)) }
        }
    }
}
