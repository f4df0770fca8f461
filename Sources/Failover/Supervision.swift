/// HA restart (`lockstep supervise`): what to do when the `lockstep primary|secondary` process a supervisor
/// runs has ended. Pure: the supervisor feeds each end in and carries the decision out, so every case is
/// tested without processes.
///
/// The rule: a side that died while its guest lived is restarted as a **secondary**. The other side (its
/// secondary, now live; or the live primary it protected) seeds it and is protected again, as VMware FT's HA
/// starts a new secondary. Only a primary whose guest never ran protected (killed or failed before its first
/// secondary confirmed a seed: no output can have left) starts again as the primary. A restarted secondary
/// that no live side seeds within the rejoin timeout makes the supervisor read the pair record: the guest
/// ended (stop with its status), or nobody runs it (both sides were lost): a side holding the guest image (the
/// one it was given, or the copy `--save-guest` kept of its seed) boots it again as the primary, a cold
/// restart, and the fence refuses that if a live side exists after all.
public enum SupervisedRole: String, Sendable, Equatable, CaseIterable {
    case primary, secondary
}

/// What a supervisor starts.
public enum SupervisedLaunch: Sendable, Equatable, CaseIterable {
    /// The primary command it was given.
    case primary
    /// That command with `--cold-restart`: it boots the guest of a pair that lost it, unless the pair record
    /// (read once it holds the fence) says the guest ended.
    case coldPrimary
    /// The secondary (given, or derived from the primary's command), waiting for a primary as long as it takes.
    case secondary
    /// The secondary rejoining a pair that ran: it waits the rejoin timeout for a live side's seed, then ends
    /// (68), and the supervisor reads the pair record.
    case rejoin

    public var role: SupervisedRole { self == .primary || self == .coldPrimary ? .primary : .secondary }
}

/// How a supervised process ended.
public struct ChildEnd: Sendable, Equatable {
    public enum Exit: Sendable, Equatable {
        case status(Int32)
        case signal(Int32)
    }
    public var launch: SupervisedLaunch
    public var exit: Exit
    /// The status the process reported as its pair's end (the guest ended, or it was stopped on purpose).
    public var ended: Int32?
    /// Where the process moved the guest (`control … migrate`): its side left the pair on purpose.
    public var movedTo: String?
    /// A primary's guest ran protected (a secondary confirmed its seed), so output may have left.
    public var wasProtected: Bool
    /// As a secondary, it was seeded (its state matched the primary's).
    public var wasSeeded: Bool
    public var ranMs: UInt64

    public init(launch: SupervisedLaunch, exit: Exit, ended: Int32? = nil, movedTo: String? = nil, wasProtected: Bool = false,
                wasSeeded: Bool = false, ranMs: UInt64) {
        self.launch = launch; self.exit = exit; self.ended = ended; self.movedTo = movedTo; self.wasProtected = wasProtected
        self.wasSeeded = wasSeeded; self.ranMs = ranMs
    }

    public var role: SupervisedRole { launch.role }

    /// It took its place in a protected pair (either side of one) before it ended: not a crash loop.
    var servedThePair: Bool { wasProtected || wasSeeded }

    /// The shell's convention: a status, or 128 + the signal.
    public var status: Int32 {
        switch exit {
        case .status(let s): return s
        case .signal(let s): return 128 + s
        }
    }

    var exitText: String {
        switch exit {
        case .status(let s): return "exited with \(s)"
        case .signal(let s): return "was killed by signal \(s)"
        }
    }
}

public enum SupervisorAction: Sendable, Equatable {
    case restart(SupervisedLaunch, delayMs: UInt64, why: String)
    /// Stop; the pair goes on without this side (or may: a hopeless status, an operator's stop, giving up).
    case stop(status: Int32, why: String)
    /// Stop: the pair is over for this side (its guest ended, or this side moved it to another host), and
    /// what the supervisor kept for its later runs (`SupervisorState`) no longer applies.
    case pairOver(status: Int32, why: String)
    /// A rejoin timed out: read the pair record and give it to `pairRecordRead`, which says why.
    case readPairRecord
}

/// The pair record as a supervisor read it.
public enum PairRecordReading: Sendable, Equatable {
    /// `ended STATUS`: the guest ended.
    case ended(Int32)
    /// Any other record (`protected ID`, `unprotected`), or none ("(none)").
    case says(String)
    /// The fence's store could not be read; why.
    case unreadable(String)
}

/// Whether a supervisor could boot the guest itself (a cold restart).
public enum GuestAtHand: Sendable, Equatable {
    /// The image it was given, or a checked copy its secondary saved (`--save-guest`).
    case yes
    /// Why not (no `--save-guest`, nothing saved yet, a damaged copy).
    case no(String)
}

public struct Supervision: Sendable {
    /// Exit statuses no restart can cure: 64 usage, 65 bad guest image, 69 no KVM, 71 the guest crashed (its
    /// replay would crash the same way).
    public static let hopeless: Set<Int32> = [64, 65, 69, 71]
    static let meaning: [Int32: String] = [64: "usage", 65: "bad guest image", 69: "KVM unavailable", 71: "the guest crashed"]
    /// 75: another side holds the fence, so it is live and this side can only be its secondary.
    public static let fenced: Int32 = 75
    /// 68: a rejoining secondary's accept timeout ran out (no live side seeded it).
    public static let unreached: Int32 = 68

    /// A run shorter than this that never served the pair (never seeded, never protected) is quick: a crash
    /// loop, or a peer that keeps refusing it. Quick runs back off and count toward giving up; a side killed
    /// after it served the pair is restarted at once, however often that happens.
    public let quickRunMs: UInt64
    /// Give up after this many quick runs in a row.
    public let maxQuickRuns: Int
    /// How long a restarted secondary waits for a live side's seed before the pair record is read (0: forever,
    /// and nothing is read).
    public let rejoinMs: UInt64
    /// How long the next rejoining secondary waits: `rejoinMs`, doubled (up to `maxRejoinWaitMs`) after each wait
    /// that showed this side can do nothing but wait (it cannot boot the guest, or a cold restart found the
    /// fence held by a live side). Such a wait ends only when a live side seeds it, at once whatever the bound,
    /// so a long outage need not start a process and log its lines every few seconds.
    public private(set) var rejoinWaitMs: UInt64
    public static let maxRejoinWaitMs: UInt64 = 30_000
    public private(set) var quickRuns = 0
    public private(set) var stopping = false
    /// A process of this supervisor served a protected pair: its later secondaries rejoin that pair.
    public private(set) var pairRan = false

    public init(quickRunMs: UInt64 = 10_000, maxQuickRuns: Int = 5, rejoinMs: UInt64 = 0) {
        self.quickRunMs = quickRunMs
        self.maxQuickRuns = maxQuickRuns
        self.rejoinMs = rejoinMs
        rejoinWaitMs = rejoinMs
    }

    /// The next wait after one that could only end in waiting.
    private var longerWaitMs: UInt64 { min(max(rejoinMs, Self.maxRejoinWaitMs), rejoinWaitMs * 2) }

    /// The operator stopped the supervisor (SIGTERM, SIGINT, SIGHUP): the process it runs was told to stop too,
    /// and is not restarted.
    public mutating func stopRequested() { stopping = true }

    /// The first restart after a run that was not quick is at once (the live side is unprotected until it is
    /// back), and so is the first after one quick run; then `Backoff`.
    static func delayMs(quickRuns: Int) -> UInt64 { Backoff.ms(after: quickRuns - 1) }

    public mutating func childEnded(_ e: ChildEnd) -> SupervisorAction {
        let who = "the \(e.role.rawValue) \(e.exitText)"
        if e.servedThePair { pairRan = true }
        if let s = e.ended { return .pairOver(status: s, why: "the pair ended (status \(s))") }
        if let to = e.movedTo {
            // The operator moved the guest off this host: a restart here would only wait for a seed nobody sends.
            return .pairOver(status: e.status, why: "the \(e.role.rawValue) moved the guest to \(to) (a migration): this side's part in the pair ended")
        }
        if stopping { return .stop(status: e.status, why: "\(who); stopping as asked") }
        if case .status(let s) = e.exit, Self.hopeless.contains(s) {
            return .stop(status: s, why: "\(who): a restart cannot help (\(Self.meaning[s] ?? "status \(s)"))")
        }
        if e.launch == .rejoin, e.exit == .status(Self.unreached) {
            // Waiting for a live side is not a failure: it neither backs off nor counts toward giving up.
            quickRuns = 0
            return .readPairRecord
        }
        rejoinWaitMs = e.launch == .coldPrimary && e.exit == .status(Self.fenced) ? longerWaitMs : rejoinMs
        quickRuns = e.ranMs < quickRunMs && !e.servedThePair ? quickRuns + 1 : 0
        if quickRuns > maxQuickRuns {
            return .stop(status: e.status, why: "\(who); giving up: \(quickRuns) runs in a row ended within \(quickRunMs / 1000) s without serving the pair")
        }
        let delay = Self.delayMs(quickRuns: quickRuns)
        if e.role == .primary && !e.wasProtected && e.exit != .status(Self.fenced) {
            return .restart(e.launch, delayMs: delay, why: "\(who) before its guest ran protected: starting it again as the primary")
        }
        // After the pair ran, or with the fence held by a live side, a secondary rejoins that pair.
        let next: SupervisedLaunch = rejoinMs > 0 && (pairRan || e.exit == .status(Self.fenced)) ? .rejoin : .secondary
        return .restart(next, delayMs: delay, why: "\(who): restarting as the live side's secondary")
    }

    /// After `.readPairRecord`: a guest that ended stops the supervisor with its status; one that nobody runs is
    /// booted again here if this side has its image (a cold restart: the fence refuses it while a live side
    /// holds it; when both sides can, the first to take the fence boots and the other becomes its secondary);
    /// otherwise the secondary waits again.
    public mutating func pairRecordRead(_ r: PairRecordReading, guest: GuestAtHand) -> SupervisorAction {
        let waited = "no live side seeded the secondary within \(rejoinWaitMs) ms"
        switch r {
        case .ended(let s):
            return .pairOver(status: s, why: "\(waited), and the pair record says the guest ended (status \(s)): the pair ended")
        case .says(let text):
            guard case .no(let why) = guest else {
                return .restart(.coldPrimary, delayMs: 0, why: "\(waited), and the pair record says '\(text)': nobody may run the guest; booting it again as the primary (a cold restart: the fence refuses it if a live side holds it)")
            }
            rejoinWaitMs = longerWaitMs
            return .restart(.rejoin, delayMs: 0, why: "\(waited), and the pair record says '\(text)': waiting again, up to \(rejoinWaitMs) ms (this side cannot boot the guest: \(why))")
        case .unreadable(let why):
            // The store may be back at any moment, and with it a cold restart that is due: look again soon.
            rejoinWaitMs = rejoinMs
            return .restart(.rejoin, delayMs: 0, why: "\(waited), and the pair record cannot be read (\(why)): waiting again")
        }
    }
}

/// The wait before trying again after `failures` failures in a row: none after none, then 0.2, 0.4, 0.8 ... up
/// to 5 s. A supervisor's restarts and a primary's search for a new secondary both back off by it.
public enum Backoff {
    public static func ms(after failures: Int) -> UInt64 {
        failures <= 0 ? 0 : min(5_000, 200 << UInt64(min(failures - 1, 5)))
    }
}
