import ArgumentParser
import Channel
import Failover
import Foundation
import Machine
import Pair

struct PairArguments: ParsableArguments {
    @Option(name: .long, help: "Pre-shared key file (at least 16 bytes), the same on both hosts.") var keyFile: String
    @Option(name: .long, help: "Channel encryption: disabled, opportunistic or required (AES-256-GCM).") var encrypt: String = "opportunistic"
    @Option(name: .long, help: "Where the fence lives: a directory both hosts reach (lockstep.fence, lockstep.pair, lockstep.id), or etcd://HOST:PORT[,HOST:PORT...]/PREFIX (keys PREFIX/fence, PREFIX/pair, PREFIX/id), etcds:// over TLS, with ?cacert=FILE&cert=FILE&key=FILE&user=NAME&password-file=FILE as needed; both sides must reach the same one.") var fence: String?
    @Option(name: .long, help: "Heartbeat interval when the link is idle (ms).") var heartbeatMs: Int = 5
    @Option(name: .long, help: "Silence after which the peer is presumed failed (ms).") var failureTimeoutMs: Int = 50
    @Option(name: .long, help: "How long a secondary retries a held fence before asking the pair record: still named by it, it waits for the lock; otherwise the primary is alive (ms).") var fenceWaitMs: Int = 500
    @Option(name: .long, help: "A live side that cannot confirm it holds the fence for this long stops with 75; keep it below the NFS server's lease time (ms, 0 = never check).") var fenceLeaseMs: Int = 30_000
    @Option(name: .long, help: "Status line period on stderr (ms, 0 = none).") var statusIntervalMs: Int = 1000
    @Option(name: .long, help: "Rewrite this JSON file with the pair's status every period.") var statusJson: String?
    @Option(name: .long, help: "Write figures as JSON here at the end (primary: lag histograms, bandwidth; secondary: bytes received, whether it went live, and as a survivor its figures as a primary).") var statsJson: String?
    @Option(name: .long, help: "Flow control: slow the primary when the secondary's replay is this far behind (ms).") var maxLagMs: UInt64 = 2000
    @Option(name: .long, help: "Flow control: slow the primary when this much log is not yet replayed (MiB).") var maxLagMib: UInt64 = 64
    @Option(name: .long, help: "Drop (and re-seed) a secondary whose replay has not moved for this long while the primary waits (ms).") var replayStallMs: UInt64 = 5000
    @Option(name: .long, help: "Answer `lockstep control PATH status|handover|peer|migrate` on this Unix socket (created 0600, removed at the end).") var control: String?
    @Option(name: .long, help: "Pin the FT-link threads to this core (default: the scheduler's choice). On one host, give both processes the primary's vCPU core (1).") var linkCpu: Int32?

    /// SIGUSR2 (a handover), the stop signals (an orderly stop: a handover, then the end) and, when asked
    /// for, the control socket, all reaching whatever role `role` holds.
    func operatorAccess(_ o: PairOptions, _ role: CurrentRole) throws -> ControlServer? {
        onSignal(SIGUSR2) { role.requestHandover() }
        for signo in stopSignals() { onSignal(signo) { role.terminate(boundMs: o.handoverBoundMs, signal: signo) } }
        return try control.map { try ControlServer(path: $0, options: o, role: role) }
    }

    func options() throws -> PairOptions {
        guard let mode = ["disabled": EncryptionMode.disabled, "opportunistic": .opportunistic, "required": .required][encrypt] else {
            throw fail("--encrypt \(encrypt): use disabled, opportunistic or required", .usage)
        }
        guard heartbeatMs > 0, failureTimeoutMs > heartbeatMs else {
            throw fail("--failure-timeout-ms (\(failureTimeoutMs)) must exceed --heartbeat-ms (\(heartbeatMs)) > 0", .usage)
        }
        guard fenceLeaseMs == 0 || fenceLeaseMs >= 100 else {
            throw fail("--fence-lease-ms \(fenceLeaseMs): use 0 (no check) or at least 100", .usage)
        }
        let key: [UInt8]
        do { key = try ChannelConfig.loadKey(path: keyFile) } catch { throw fail("--key-file: \(error)", .usage) }
        do {
            try JSONReports.check(statusJson, option: "--status-json")
            try JSONReports.check(statsJson, option: "--stats-json")
        } catch { throw fail("\(error)", .usage) }
        var o = PairOptions(key: key, encryption: mode)
        if let fence {
            do { o.fence = try FenceLocation(parsing: fence) } catch { throw fail("\(error)", .usage) }
            if case .etcd? = o.fence, fenceLeaseMs == 0 {
                throw fail("--fence-lease-ms 0 with an etcd fence: the watch renews the etcd lease, so give it a bound (at least 100)", .usage)
            }
        }
        o.heartbeatMs = heartbeatMs; o.failureTimeoutMs = failureTimeoutMs; o.fenceWaitMs = fenceWaitMs
        o.fenceLeaseMs = fenceLeaseMs
        o.statusIntervalMs = statusIntervalMs; o.statusJSON = statusJson; o.statsJSON = statsJson
        o.maxLagMs = maxLagMs; o.maxLagBytes = maxLagMib << 20; o.replayStallMs = replayStallMs
        do { try o.pinLinkThreads(to: linkCpu) } catch { throw fail("\(error)", .usage) }
        return o
    }
}

/// Maps a pair failure to its message and exit status.
func pairExit(_ e: Error) -> ExitCode {
    if let e = e as? ExitCode { return e }
    if let m = e as? MachineError { return engineExit(m) }
    guard let p = e as? PairError else { return fail("\(e)", .internalError) }
    switch p {
    case .peerUnreachable: return fail(p.description, .peerUnreachable)
    case .peerRejected, .badPeerData: return fail(p.description, .peerRejected)
    case .fenced: return fail(p.description, .fenced)
    case .config: return fail(p.description, .usage)
    case .primaryStopped(let why):
        stderr("lockstep: \(why); not going live")
        SupervisorReport.ended(0)
        return ExitCode.success
    case .pairEnded(let status, let why):
        stderr("lockstep: \(why)")
        SupervisorReport.ended(status)
        return ExitCode(status)
    }
}

struct PrimaryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "primary",
        abstract: "Run a guest protected by a secondary: stream its log, gate its output, survive the secondary's loss.")
    @Argument(help: "PVH ELF guest image.") var guest: String
    @Option(name: .long, help: "The secondary's FT-link address (HOST:PORT).") var peer: String
    @OptionGroup var options: MachineOptions
    @OptionGroup var pair: PairArguments
    @OptionGroup var latency: LatencyOptions
    @Option(name: .long, help: "How long to wait for the first secondary (ms; 0 with --start-unprotected: boot at once).") var connectTimeoutMs: Int = 30_000
    @Option(name: .long, help: "After handing the guest over, stay as the new primary's secondary, listening here (HOST:PORT; start the other side with --peer to it).") var listen: String?
    @Flag(name: .long, help: "When no secondary answers within --connect-timeout-ms, run the guest unprotected and keep looking for one at --peer (default: exit 68).") var startUnprotected = false
    @Flag(name: .long, help: "Boot the guest again for a pair that lost it (lockstep supervise does this): once this side holds the fence, a pair record saying the guest ended stops it with that status instead.") var coldRestart = false

    func run() throws {
        var o = try pair.options()
        o.connectTimeoutMs = connectTimeoutMs
        guard connectTimeoutMs > 0 || (connectTimeoutMs == 0 && startUnprotected) else {
            throw fail("--connect-timeout-ms \(connectTimeoutMs): give at least 1 (0 only with --start-unprotected: boot at once)", .usage)
        }
        guard !coldRestart || o.fence != nil else { throw fail("--cold-restart needs --fence: the pair record there says whether the guest ended", .usage) }
        o.coldRestart = coldRestart
        o.startUnprotected = startUnprotected
        do {
            let spec = try SerialSpec.parse(options.serial)
            let role = CurrentRole()
            // Bound now: a busy address is a usage error before the guest starts, not after a handover.
            let after = try listen.map { try SecondaryRunner(listen: $0, serial: spec, options: o, reprotectPeer: peer) }
            let control = try pair.operatorAccess(o, role)
            defer { control?.stop() }
            let (r, handedOver, ram, moved) = try runPrimary(spec, o, role, keepRAM: after != nil)
            // After a SIGTERM's handover the guest runs on elsewhere: nothing is reported as the pair's end.
            guard handedOver, let s = after, !role.terminating else { throw finish(r, verbose: options.verbose, pairEnded: !handedOver) }
            if let ram { s.keep(ram) }
            // The operator's `peer` outlives the role: once live again, this side seeks its secondary there.
            if moved != peer { _ = s.changePeer(moved) }
            role.set(s)
            FileHandle.standardError.write(Data("lockstep: now the secondary of the new primary, listening on \(listen!)\n".utf8))
            throw finish(try s.run(), verbose: options.verbose)
        } catch { throw pairExit(error) }
    }

    /// The run as primary (its machine is freed on return, before a secondary run builds another). After a
    /// handover its RAM is kept when asked (`keepRAM`): the new primary's seed of this side sends what differs.
    private func runPrimary(_ spec: SerialSpec, _ o: PairOptions, _ role: CurrentRole, keepRAM: Bool) throws -> (SessionResult, handedOver: Bool, RetainedRAM?, peer: String) {
        let image = try loadImage(guest)
        let backend = try SerialBackend(spec)
        let p = try PrimaryRunner(image: image, config: latency.config(memoryMiB: options.memory),
                                  backend: backend, peer: peer, options: o)
        role.set(p)
        backend.startInput(into: p.machine.input)
        let r = try p.run()
        backend.close()
        return (r, p.handedOver, keepRAM && p.handedOver ? try? p.machine.retainRAM() : nil, p.peer)
    }
}

struct SecondaryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "secondary",
        abstract: "Replay a primary's guest in lockstep and go live when it fails.")
    @Option(name: .long, help: "FT-link address to listen on (HOST:PORT).") var listen: String
    @Option(name: .long, help: "Serial backend used after going live (the primary's service address).") var serial: String = "stdio"
    @OptionGroup var pair: PairArguments
    @Option(name: .long, help: "Give up when no primary connects within this many ms (default: wait forever).") var acceptTimeoutMs: Int = -1
    @Option(name: .long, help: "Once the replay has caught up, spin up to this many µs for the primary's next log frame instead of sleeping (busy polling: saves a wake-up per frame, keeps a core busy while the guest is; 0 = off). The receiver then runs at normal priority.") var linkPollUs: UInt64 = 0
    @Option(name: .long, help: "Once live, seed and protect itself with a new secondary listening here (HOST:PORT).") var peer: String?
    @Option(name: .long, help: "Save each seed's guest image and machine size in this directory (guest.elf, guest.conf), so that `lockstep supervise secondary` can boot the guest again on this host when both sides are lost.") var saveGuest: String?
    @Flag(name: .long, help: "Print run statistics.") var verbose = false

    func run() throws {
        var o = try pair.options()
        if let saveGuest {
            do { try SavedGuest.prepare(saveGuest) } catch { throw fail("--save-guest \(error)", .usage) }
            o.saveGuestDir = saveGuest
        }
        guard linkPollUs <= 1_000_000 else { throw fail("--link-poll-us \(linkPollUs): at most 1000000 (1 s)", .usage) }
        o.linkPollNs = linkPollUs * 1000
        do {
            let spec = try SerialSpec.parse(serial)
            let s = try SecondaryRunner(listen: listen, serial: spec, options: o, reprotectPeer: peer)
            let role = CurrentRole()
            role.set(s)
            let control = try pair.operatorAccess(o, role)
            defer { control?.stop() }
            FileHandle.standardError.write(Data("lockstep: secondary listening on \(listen.split(separator: ":").dropLast().joined(separator: ":")):\(s.port)\n".utf8))
            let r = try s.run(acceptTimeoutMs: acceptTimeoutMs)
            throw finish(r, verbose: verbose, pairEnded: !s.handedOverToLeave)
        } catch { throw pairExit(error) }
    }
}

struct ControlCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "control",
        abstract: "Ask a running primary or secondary (its --control socket) for its status, for a planned switchover, to seek new secondaries at another address, or to move the guest to another host.",
        discussion: """
        handover: exit 0 once the secondary took the guest over; 1 when refused (nothing changed) or failed (the primary serves on, unprotected). \
        peer HOST:PORT: exit 0 when taken (a secondary protecting the guest now stays until it is lost), 1 when refused. \
        migrate HOST:PORT (asked of the side running the guest): exit 0 once the guest runs on the secondary listening there (started beforehand, \
        e.g. `lockstep secondary --listen HOST:PORT --peer <this pair's secondary> ...` on the new host); it is seeded while the guest runs, \
        the secondary protecting the guest now protecting it meanwhile; the guest then stops (milliseconds) until the new side holds its state, the \
        old secondary is let go (it waits, never live, for a new seed: the new side re-protects itself there given --peer), and the guest is handed \
        over; this side then ends. 1 when refused or failed: no answer, or no completed seed, within --within-ms changes nothing (the old \
        secondary still protects the guest); without a secondary to begin with, a seed not done in time leaves the guest running here, unprotected, \
        looking for a secondary at HOST:PORT.
        """)
    @Argument(help: "The --control socket of the running process.") var socket: String
    @Argument(help: "status (one line of JSON), handover (waits for the outcome), peer (where new secondaries are sought from now on) or migrate (move the guest there).") var request: String
    @Argument(help: "peer, migrate: the secondary's FT-link address, HOST:PORT.") var address: String?
    @Option(name: .long, help: "migrate: give up when the guest is not protected by the new host's secondary within this many ms.") var withinMs: Int = 60_000
    @Option(name: .long, help: "Give up waiting for the answer after this many ms (default 30000; migrate: --within-ms + 30000).") var timeoutMs: Int?

    func run() throws {
        guard ["status", "handover", "peer", "migrate"].contains(request) else { throw fail("unknown request \(request): use status, handover, peer HOST:PORT or migrate HOST:PORT", .usage) }
        let needsAddress = request == "peer" || request == "migrate"
        guard needsAddress == (address != nil) else {
            throw fail(needsAddress ? "\(request): give the new address, HOST:PORT" : "\(request) takes no address", .usage)
        }
        guard withinMs > 0 else { throw fail("--within-ms \(withinMs): give at least 1", .usage) }
        let line = request + (address.map { " " + $0 } ?? "") + (request == "migrate" ? " \(withinMs)" : "")
        let answer: String?
        do {
            let c = try ControlConnection(path: socket)
            answer = try c.ask(line, timeoutMs: timeoutMs ?? (request == "migrate" ? withinMs + 30_000 : 30_000))
        } catch { throw fail("control \(socket): \(error)", .peerUnreachable) }
        guard let answer else { throw fail("control \(socket): closed without an answer", .peerUnreachable) }
        print(answer)
        if request == "handover", !answer.hasPrefix("handed-over:") { throw ExitCode.failure }
        if request == "migrate", !answer.hasPrefix("migrated:") { throw ExitCode.failure }
        if request == "peer", !answer.hasPrefix("ok:") { throw ExitCode.failure }
    }
}
