import CLockstep
import EventLog
import Foundation
import Glibc
import Histogram
import Machine
import Synchronization

/// The pair's state as the operator sees it: one line on stderr per period, and the same as JSON.
public struct PairStatus: Codable, Sendable {
    public var role: String
    public var state: String
    public var connected: Bool
    public var protected: Bool
    public var exit: UInt64
    /// Primary: the secondary's held (acked) watermark. Secondary: the watermark received.
    public var heldExit: UInt64
    public var replayedExit: UInt64
    public var lagExits: UInt64
    public var lagMicroseconds: Double
    public var logBytes: UInt64
    public var logBytesPerSecond: Double
    public var heldOutputBytes: Int
    public var throttledMs: Double
    public var secondariesSeeded: Int
    /// Primary: a new secondary's pre-copy rounds are running (still unprotected).
    public var seeding: Bool = false
    /// The FT link's last measured round trip (an idle heartbeat and its echo), µs; 0 before the first.
    public var linkRoundTripMicroseconds: Double = 0
    /// TCP segments sent again on this side's current FT link (losses on the link; 0 on a clean one).
    public var linkRetransmits: UInt64 = 0
    /// A live side with a fence watch: how long ago it last read its own generation in the fence file (ms).
    public var fenceConfirmedMsAgo: Double?

    var line: String {
        "status: \(role) \(state) \(protected ? "protected" : seeding ? "UNPROTECTED (seeding a secondary)" : "UNPROTECTED") exit=\(exit) held=\(heldExit) replayed=\(replayedExit) "
            + "lag=\(lagExits) exits/\(String(format: "%.0f", lagMicroseconds)) µs log=\(String(format: "%.1f", logBytesPerSecond / 1024)) KiB/s "
            + "gated=\(heldOutputBytes) B" + (linkRoundTripMicroseconds > 0 ? String(format: " rtt=%.0f µs", linkRoundTripMicroseconds) : "")
            + (linkRetransmits > 0 ? " retrans=\(linkRetransmits)" : "")
    }
}

/// Figures the bench harness reads at the end of a primary's run (`--stats-json`).
public struct PairStats: Codable, Sendable {
    public struct Percentiles: Codable, Sendable {
        public var count: UInt64
        public var p50: Double
        public var p99: Double
        public var p999: Double
        public var max: Double
        init(_ h: Histogram<UInt64>, scale: Double = 1000) {
            count = h.totalCount
            p50 = Double(h.valueAtPercentile(50)) / scale
            p99 = Double(h.valueAtPercentile(99)) / scale
            p999 = Double(h.valueAtPercentile(99.9)) / scale
            max = Double(h.totalCount == 0 ? 0 : h.max) / scale
        }
    }
    /// Batch sent → secondary's ack that it holds it, µs.
    public var replicationLagUs: Percentiles
    /// Primary position → secondary's replayed position, µs (sampled per ack).
    public var replayLagUs: Percentiles
    /// Gated output byte: emitted by the guest → released, µs.
    public var gateLatencyUs: Percentiles
    /// The FT link's round trip, µs: a heartbeat the primary sent when idle → the secondary's echo of it.
    public var linkRoundTripUs: Percentiles
    /// The same in exits: primary's newest watermark → secondary's replayed exit (sampled per ack).
    public var replayLagExits: Percentiles
    public var replayLagExitsMax: UInt64
    public var logBytes: UInt64
    public var events: UInt64
    public var batches: UInt64
    public var syncPoints: UInt64
    public var exits: UInt64
    public var elapsedSeconds: Double
    public var throttledMs: Double
    /// TCP segments the primary sent again over all its FT links (losses on the link).
    public var linkRetransmits: UInt64
    /// Per seed: how long the guest paused, and the whole seed from connection to the pause's end.
    public var seedPauseMs: [Double]
    public var seedTotalMs: [Double]
    /// Per seed: the highest auto-converge throttle the rounds reached (percent of the guest's time asleep).
    public var seedThrottlePercent: [Int]
    /// (seconds since start, replication lag µs) samples for the lag-over-time plot.
    public var lagSeries: [[Double]]
    /// Replication lag histogram buckets: (upper bound µs, count), for the histogram plot.
    public var lagHistogram: [[Double]]
    /// The guest's first instruction here ran with a secondary that had confirmed its seed (a boot seed waits
    /// for that). False for a survivor's guest, and for one that started unprotected.
    public var startedProtected: Bool
    /// The longest the sync points' cost stretched the interrupt latency bound to, µs (0: never beyond its
    /// floor, `--interrupt-latency-us`).
    public var peakLatencyBoundUs: UInt64
}

/// A secondary's figures at the end of its run (`secondary --stats-json`).
public struct SecondaryStats: Codable, Sendable {
    /// "secondary" (replayed to the primary's end) or "survivor" (went live).
    public var role: String
    public var wentLive: Bool
    /// Log bytes received from the (last) primary.
    public var logBytesReceived: UInt64
    /// Log batches received from the (last) primary, and receives a `--link-poll-us` spin took (no wake-up).
    public var logBatchesReceived: UInt64
    public var spinReceives: UInt64
    /// Where the replay stood when the run ended (the guest's final exit when it ran to the end).
    public var exits: UInt64
    public var secondariesSeeded: Int
    public var elapsedSeconds: Double
    /// A survivor that protected itself (`--peer`): its own figures as a primary.
    public var asPrimary: PairStats?
}

/// Measurements the link thread and the vCPU thread both feed (under one lock; never on the per-exit path).
final class PairMetrics: @unchecked Sendable {
    private let lock = NSLock()
    private var replication = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
    private var replay = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
    private var replayExits = Histogram<UInt64>(highestTrackableValue: 1 << 50, numberOfSignificantValueDigits: .three)
    private var roundTrips = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
    /// The last round trip measured (ns; 0: none yet).
    private var lastRoundTripNs: UInt64 = 0
    /// Lag over time: (seconds since start, µs) pairs, flat, room for all made at once: the link thread adds to
    /// it on an ack, a path that does not allocate.
    private var series: [Double] = { var s: [Double] = []; s.reserveCapacity(2 * PairMetrics.maxSeries); return s }()
    static let maxSeries = 20_000
    private var lastSeriesNs: UInt64 = 0
    let startNs = lk_monotonic_ns()
    var replayLagExitsMax: UInt64 = 0
    private var lastReplayLagNs: UInt64 = 0
    var throttledNs: UInt64 = 0
    var seedPausesMs: [Double] = []
    var seedTotalsMs: [Double] = []
    var seedThrottles: [Int] = []

    func replicated(lagNs: UInt64, at now: UInt64) {
        lock.lock(); defer { lock.unlock() }
        _ = replication.record(lagNs)
        if now &- lastSeriesNs >= 1_000_000 && series.count < 2 * Self.maxSeries {
            lastSeriesNs = now
            series.append(Double(now &- startNs) / 1e9)
            series.append(Double(lagNs) / 1000)
        }
    }

    /// The guest ended: the replay lag is no longer sampled. The last batch's watermark (one past the final exit)
    /// is never replayed, and while the primary hashes its state for the trailer (~0.2 s for 256 MiB) its age
    /// would fill the tail of the histogram.
    func guestEnded() { lock.lock(); guestRunning = false; lock.unlock() }
    private var guestRunning = true

    func replayed(lagNs: UInt64, lagExits: UInt64) {
        lock.lock(); defer { lock.unlock() }
        guard guestRunning else { return }
        _ = replay.record(lagNs)
        _ = replayExits.record(min(lagExits, 1 << 50))
        lastReplayLagNs = lagNs
        replayLagExitsMax = max(replayLagExitsMax, lagExits)
    }

    /// The newest replay lag and link round trip (ns), for the status thread.
    var latest: (replayLagNs: UInt64, roundTripNs: UInt64) {
        lock.lock(); defer { lock.unlock() }
        return (lastReplayLagNs, lastRoundTripNs)
    }

    func roundTrip(_ ns: UInt64) {
        lock.lock(); defer { lock.unlock() }
        _ = roundTrips.record(ns)
        lastRoundTripNs = ns
    }

    func throttled(_ ns: UInt64) { lock.lock(); throttledNs &+= ns; lock.unlock() }
    func seeded(pauseNs: UInt64, totalNs: UInt64, throttlePercent: UInt8) {
        lock.lock(); defer { lock.unlock() }
        seedThrottles.append(Int(throttlePercent))
        seedPausesMs.append(Double(pauseNs) / 1e6)
        seedTotalsMs.append(Double(totalNs) / 1e6)
    }

    func stats(gate: Histogram<UInt64>, logBytes: UInt64, events: UInt64, batches: UInt64, syncPoints: UInt64, exits: UInt64,
               linkRetransmits: UInt64, startedProtected: Bool, peakLatencyBoundUs: UInt64) -> PairStats {
        lock.lock(); defer { lock.unlock() }
        var buckets: [[Double]] = []
        for b in replication.recordedValues() where b.count > 0 {
            buckets.append([Double(b.value) / 1000, Double(b.count)])
        }
        return PairStats(replicationLagUs: .init(replication), replayLagUs: .init(replay), gateLatencyUs: .init(gate),
                         linkRoundTripUs: .init(roundTrips),
                         replayLagExits: .init(replayExits, scale: 1), replayLagExitsMax: replayLagExitsMax, logBytes: logBytes, events: events, batches: batches,
                         syncPoints: syncPoints, exits: exits, elapsedSeconds: Double(lk_monotonic_ns() &- startNs) / 1e9,
                         throttledMs: Double(throttledNs) / 1e6, linkRetransmits: linkRetransmits, seedPauseMs: seedPausesMs, seedTotalMs: seedTotalsMs,
                         seedThrottlePercent: seedThrottles, lagSeries: stride(from: 0, to: series.count, by: 2).map { [series[$0], series[$0 + 1]] }, lagHistogram: buckets,
                         startedProtected: startedProtected, peakLatencyBoundUs: peakLatencyBoundUs)
    }
}

/// Writes `value` as JSON to `path` atomically (`PATH.tmp`, then rename). A failure names the file and the
/// reason (ENOSPC: disk full); the temporary file is removed. `temporaryPath`: tests point it at /dev/full.
func writeJSON<T: Encodable>(_ value: T, to path: String, temporaryPath: String? = nil) throws(LogError) {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    let data: Data
    do { data = try enc.encode(value) } catch { throw .io(path: path, errno: EINVAL, detail: "cannot encode: \(error)") }
    try replaceFile(path, with: [UInt8](data), temporary: temporaryPath ?? path + ".tmp", sync: false, removeTemporary: temporaryPath == nil)
}

/// The JSON files a pair rewrites as it runs (`--status-json`, `--stats-json`): a file that cannot be written
/// (disk full, directory gone) is reported once per reason, and the run goes on.
public final class JSONReports: @unchecked Sendable {
    private let said = Mutex<Set<String>>([])

    func write<T: Encodable>(_ value: T, to path: String, option: String) {
        do { try writeJSON(value, to: path) } catch {
            let text = "cannot update \(option): \(error); the run goes on"
            if said.withLock({ $0.insert(text).inserted }) { warn(text) }
        }
    }

    /// Before the run: a file that cannot be created beside `path` is a usage error, named now rather than
    /// missed later. Leaves `path` itself alone.
    public static func check(_ path: String?, option: String) throws(PairError) {
        guard let path else { return }
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .config("\(option) \(path): \(LogError.io(path: tmp, errno: errno, detail: "cannot create"))") }
        close(fd)
        unlink(tmp)
    }
}

/// Calls `body` every `ms` on its own thread until stopped.
final class Ticker: @unchecked Sendable {
    private let wake = lk_eventfd()
    private let running = NSLock()
    private var stopped = false
    private let done = DispatchSemaphore(value: 0)

    init(ms: Int, name: String, priority: Int32 = 0, _ body: @escaping @Sendable () -> Void) {
        startThread(name) { [self] in
            if priority > 0 { _ = lk_set_realtime_priority(priority) }
            while true {
                _ = lk_eventfd_wait(wake, lk_monotonic_ns() + UInt64(ms) * 1_000_000)
                running.lock(); let s = stopped; running.unlock()
                if s { break }
                body()
            }
            done.signal()
        }
    }

    func stop() {
        running.lock(); stopped = true; running.unlock()
        lk_eventfd_signal(wake)
        done.wait()
        close(wake)
    }
}

/// Calls `body` on a thread of its own each time `signo` arrives (SIGUSR2: a planned switchover; the stop signals).
public func onSignal(_ signo: Int32, _ body: @escaping @Sendable () -> Void) {
    let fd = lk_signal_eventfd(signo)
    guard fd >= 0 else { warn("cannot catch \(signalName(signo)) (errno \(-fd)); it keeps its default action"); return }
    startThread("lockstep-signal") {
        while true { if lk_eventfd_wait(fd, .max) == 1 { body() } }
    }
}

/// The signals an operator stops a process with: SIGTERM, and SIGINT (Ctrl-C) and SIGHUP (a closed terminal)
/// unless the process started with them ignored, as a shell's `&` job and `nohup` start theirs: a shell's
/// own programs keep such a signal ignored, and so does this one. Call it before catching any of them.
public func stopSignals() -> [Int32] { [SIGTERM] + [SIGINT, SIGHUP].filter { lk_signal_ignored($0) == 0 } }

public func signalName(_ signo: Int32) -> String {
    switch signo {
    case SIGTERM: return "SIGTERM"
    case SIGINT: return "SIGINT"
    case SIGHUP: return "SIGHUP"
    case SIGUSR2: return "SIGUSR2"
    default: return "signal \(signo)"
    }
}

/// Ends the process as `signo`'s default action would (its parent sees it killed by the signal).
public func dieOf(_ signo: Int32) -> Never {
    signal(signo, SIG_DFL)
    raise(signo)
    _exit(128 + signo)
}
