import Channel
import Foundation
import Machine
import Synchronization

/// What a handover request came to.
public enum HandoverOutcome: Sendable, Equatable {
    /// The secondary took the fence and runs the guest on; this side's run ends.
    case handedOver(String)
    /// Nothing changed: this side is not a protected primary, its link is down, or the log was not acknowledged.
    case refused(String)
    /// The secondary did not take over in time: this side took the fence back and serves on, unprotected.
    case failed(String)

    public var message: String {
        switch self { case .handedOver(let m), .refused(let m), .failed(let m): return m }
    }

    /// The control socket's reply line: the outcome's name, a colon, what happened.
    var line: String {
        switch self {
        case .handedOver(let m): return "handed-over: " + m
        case .refused(let m): return "refused: " + m
        case .failed(let m): return "failed: " + m
        }
    }

    /// On the FT link (`PairMessage.handoverAnswer`, primary → a secondary that asked): kind, then UTF-8 text.
    enum Kind: UInt8 { case handedOver = 1, refused = 2, failed = 3 }

    var frame: Frame {
        var w = Wire(tag: PairMessage.handoverAnswer.rawValue)
        switch self {
        case .handedOver: w.u8(Kind.handedOver.rawValue)
        case .refused: w.u8(Kind.refused.rawValue)
        case .failed: w.u8(Kind.failed.rawValue)
        }
        w.raw(message.utf8.prefix(60_000))
        return .status(w.out)
    }

    init(answer body: [UInt8]) throws(SeedError) {
        var r = WireReader(body, what: "handover answer")
        let raw = try r.u8()
        let text = String(decoding: body.dropFirst(2), as: UTF8.self)
        switch Kind(rawValue: raw) {
        case .handedOver?: self = .handedOver(text)
        case .refused?: self = .refused(text)
        case .failed?: self = .failed(text)
        case nil: throw SeedError("handover answer: unknown kind \(raw)")
        }
    }
}

/// Whoever waits for a handover's outcome, each answered once. After an answer with `closing` (the run or the
/// stream ended) a new waiter is refused at once.
final class HandoverReplies: Sendable {
    typealias Reply = @Sendable (HandoverOutcome) -> Void
    private let state = Mutex<(waiting: [Reply], closed: Bool)>(([], false))

    /// False, and nothing kept, once closed.
    func add(_ reply: Reply?) -> Bool {
        state.withLock { s in
            if !s.closed, let reply { s.waiting.append(reply) }
            return !s.closed
        }
    }

    /// Answers everyone waiting; `closing` also refuses those who come later (with `add`).
    func answer(_ outcome: HandoverOutcome, closing: Bool) {
        let waiting = state.withLock { s in
            defer { s.waiting = []; if closing { s.closed = true } }
            return s.waiting
        }
        for reply in waiting { reply(outcome) }
    }
}

extension HandoverOutcome {
    /// Asks for a handover through `ask` and waits for its outcome: nil when none came within `ms`.
    static func awaited(withinMs ms: Int, _ ask: (@escaping @Sendable (HandoverOutcome) -> Void) -> Void) -> HandoverOutcome? {
        let answer = Mutex<HandoverOutcome?>(nil)
        let answered = DispatchSemaphore(value: 0)
        ask { outcome in
            answer.withLock { $0 = outcome }
            answered.signal()
        }
        return answered.wait(timeout: .now() + .milliseconds(ms)) == .success ? answer.withLock { $0 } : nil
    }
}

/// What the operator reaches in a running pair process (SIGUSR2, the control socket).
public protocol PairRole: AnyObject, Sendable {
    func status() -> PairStatus
    func requestHandover(reply: (@Sendable (HandoverOutcome) -> Void)?)
    /// A stop signal: a side running the guest hands it to its secondary and then ends (not staying on as the new
    /// primary's secondary); any other side is refused at once.
    func handOverToLeave(reply: @escaping @Sendable (HandoverOutcome) -> Void)
    /// The control socket's `peer HOST:PORT`: where new secondaries are sought from now on; the reply line
    /// (`ok: …` or `refused: …`).
    func changePeer(_ address: String) -> String
    /// A stop signal with nobody to take the guest: a side running it stops it at its next exit, the run ends as a
    /// guest's exit does, and the pair record says it ended, so no supervisor boots it again. False when this
    /// side does not run the guest (a secondary replaying).
    func stopGuest() -> Bool
    /// The control socket's `migrate HOST:PORT`: a side running the guest protected or looking for a secondary
    /// moves it to the secondary listening there and ends; any other side is refused at once.
    func migrate(to address: String, withinMs: Int, reply: @escaping @Sendable (HandoverOutcome) -> Void)
}

/// The role a pair process has now: a primary that handed its guest over may go on as the new primary's
/// secondary, and the signal and the control socket must reach whichever runs.
public final class CurrentRole: Sendable {
    private let role = Mutex<(any PairRole)?>(nil)
    public init() {}
    public func set(_ r: any PairRole) { role.withLock { $0 = r } }

    var status: PairStatus? { role.withLock { $0 }?.status() }

    /// The operator's `peer`; a supervisor is told too, so that its restarts of this side take the address.
    func changePeer(_ address: String) -> String {
        let answer = role.withLock { $0 }?.changePeer(address) ?? "refused: nothing runs yet"
        if answer.hasPrefix("ok:") { SupervisorReport.peer(address) }
        return answer
    }

    public func requestHandover(reply: (@Sendable (HandoverOutcome) -> Void)? = nil) {
        if let r = role.withLock({ $0 }) { r.requestHandover(reply: reply) } else { reply?(.refused("handover refused: nothing runs yet")) }
    }

    /// The operator's `migrate`: once the guest moved, this process ends (as after a stop signal's handover).
    func migrate(to address: String, withinMs: Int, reply: @escaping @Sendable (HandoverOutcome) -> Void) {
        guard let r = role.withLock({ $0 }) else { return reply(.refused("migration refused: nothing runs yet")) }
        r.migrate(to: address, withinMs: withinMs) { [self] outcome in
            if case .handedOver = outcome {
                stopping.store(true, ordering: .releasing)
                SupervisorReport.moved(to: address)
            }
            reply(outcome)
        }
    }

    /// A stop signal arrived: this process is ending (a primary that hands over does not stay as a secondary).
    public var terminating: Bool { stopping.load(ordering: .acquiring) }
    private let stopping = Atomic<Bool>(false)

    /// A stop signal (SIGTERM, SIGINT, SIGHUP; its signal thread): an orderly stop. A side running the guest
    /// protected hands it to its secondary, which goes on as the primary (nothing lost or repeated, as with
    /// SIGUSR2), and this process then ends by itself. A side running it with nobody to take it (unprotected,
    /// or its handover refused or failed) stops the guest: the operator ended it, so the pair record says so
    /// and no supervisor boots it again. Anything else (a secondary replaying, a handover not done in time)
    /// dies of the signal, as a process without this handler would; a secondary's primary then runs on.
    /// A stop signal while one is handled changes nothing: a supervised process gets two from one
    /// `systemctl stop` (systemd's own to every process of the unit, and the supervisor's) and two from one
    /// Ctrl-C (the terminal's to the foreground group, and the supervisor's); dying of the second would cut
    /// the first's handover or stop short.
    public func terminate(boundMs: Int, signal signo: Int32) {
        let name = signalName(signo)
        guard let r = role.withLock({ $0 }) else { dieOf(signo) }
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else {
            warn("\(name): this side is stopping already (kill -9 stops it at once)")
            return
        }
        guard let outcome = HandoverOutcome.awaited(withinMs: boundMs, { r.handOverToLeave(reply: $0) }) else {
            warn("\(name): no handover within \(boundMs) ms; stopping without one")
            dieOf(signo)
        }
        guard case .handedOver = outcome else {
            if r.stopGuest() {
                warn("\(name): \(outcome.message); stopping the guest here (the pair record will say it ended)")
                return
            }
            warn("\(name): \(outcome.message); stopping without a handover")
            dieOf(signo)
        }
        warn("\(name): the secondary runs the guest now; this side ends")
    }
}

/// `--control PATH` of `primary` and `secondary`: answers `status` (the status JSON on one line),
/// `handover` (waits for the outcome, then one line: `handed-over: …`, `refused: …` or `failed: …`),
/// `peer HOST:PORT` (`ok: …` or `refused: …`) and `migrate HOST:PORT MS` (`migrated: …`, `refused: …`, `failed: …`).
/// One request per connection, each answered on a thread of its own, so `status` is answered while a
/// handover or a migration waits for its outcome; at most `maxRequests` at once (the rest are refused).
public final class ControlServer: @unchecked Sendable {
    static let maxRequests = 8
    private let requests = Atomic<Int>(0)
    private let listener: ControlListener
    private let role: CurrentRole
    /// The longest a handover may take before the request is answered anyway (the fence wait, failure timeout, ack).
    private let handoverBoundMs: Int
    private let stopped = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)

    public init(path: String, options: PairOptions, role: CurrentRole) throws(PairError) {
        do { listener = try ControlListener(path: path) } catch { throw .config("--control \(path): \(error)") }
        self.role = role
        handoverBoundMs = options.handoverBoundMs
        startThread("lockstep-control") { [self] in
            while !stopped.load(ordering: .acquiring) {
                do {
                    guard let c = try listener.accept(timeoutMs: 1_000) else { continue }
                    guard requests.wrappingAdd(1, ordering: .acquiringAndReleasing).newValue <= Self.maxRequests else {
                        requests.wrappingSubtract(1, ordering: .acquiringAndReleasing)
                        try? c.writeLine("refused: busy: \(Self.maxRequests) requests are being answered")
                        continue
                    }
                    startThread("lockstep-control-request") { [self] in
                        serve(c)
                        requests.wrappingSubtract(1, ordering: .acquiringAndReleasing)
                    }
                } catch {
                    if !stopped.load(ordering: .acquiring) { warn("control socket \(listener.path): \(error); it answers no more") }
                    break
                }
            }
            done.signal()
        }
    }

    /// Stops answering and removes the socket file.
    public func stop() {
        stopped.store(true, ordering: .releasing)
        listener.close()
        done.wait()
    }

    private func serve(_ c: ControlConnection) {
        guard let request = try? c.readLine(timeoutMs: 2_000) else { return }
        switch request.trimmingCharacters(in: .whitespaces) {
        case "status":
            let json = role.status.flatMap { try? JSONEncoder().encode($0) }.map { String(decoding: $0, as: UTF8.self) } ?? "{}"
            try? c.writeLine(json)
        case "handover":
            let outcome = HandoverOutcome.awaited(withinMs: handoverBoundMs) { role.requestHandover(reply: $0) }
            try? c.writeLine(outcome?.line ?? "failed: no outcome within \(handoverBoundMs) ms")
        case let r where r.hasPrefix("peer "):
            try? c.writeLine(role.changePeer(String(r.dropFirst(5)).trimmingCharacters(in: .whitespaces)))
        case let r where r.hasPrefix("migrate "):
            let words = r.split(separator: " ")
            guard words.count == 3, let ms = Int(words[2]), ms > 0 else {
                try? c.writeLine("refused: migrate takes HOST:PORT and a bound in ms"); return
            }
            let bound = ms + handoverBoundMs
            let outcome = HandoverOutcome.awaited(withinMs: bound) { role.migrate(to: String(words[1]), withinMs: ms, reply: $0) }
            try? c.writeLine(outcome.map { o in if case .handedOver(let m) = o { "migrated: " + m } else { o.line } } ?? "failed: no outcome within \(bound) ms")
        default:
            try? c.writeLine("refused: unknown request \"\(request.prefix(80))\" (status, handover, peer HOST:PORT, migrate HOST:PORT MS)")
        }
    }
}
