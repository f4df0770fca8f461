import CLockstep
import Channel
import Failover
import Foundation
import Glibc
import Machine
import Synchronization

/// Settings shared by both sides of a pair.
public struct PairOptions: Sendable {
    public var key: [UInt8]
    public var encryption: EncryptionMode
    /// Heartbeat interval when the link is otherwise idle (both directions).
    public var heartbeatMs: Int = 5
    /// Silence after which the peer is presumed failed.
    public var failureTimeoutMs: Int = 50
    /// `--fence DIR` or `--fence etcd://...`; nil runs without a fence (a partition can then give two live
    /// primaries: warned).
    public var fence: FenceLocation?
    /// How long a secondary keeps trying a held fence before deciding the primary is alive (kill -9 releases
    /// a local flock at once; NFS needs its lease time).
    public var fenceWaitMs: Int = 500
    /// A live side that cannot confirm it holds the fence for this long stops (exit 75): on NFS its lock ends with
    /// the server's lease, so this must be shorter than that lease (90 s by default). 0: no watch. See `FenceWatch`.
    public var fenceLeaseMs: Int = 30_000
    /// Flow control: the primary slows down when this many log bytes are not yet replayed by the secondary...
    public var maxLagBytes: UInt64 = 64 << 20
    /// ...or when the secondary's replay is this far behind in time.
    public var maxLagMs: UInt64 = 2000
    /// A secondary whose replay does not move for this long while the primary waits for it is dropped.
    public var replayStallMs: UInt64 = 5000
    /// How long the primary waits for its first secondary before failing.
    public var connectTimeoutMs: Int = 30_000
    /// A primary booting the guest again for a pair that lost it (`lockstep supervise`): it boots only if the pair
    /// record, read once it holds the fence, does not say the guest ended.
    public var coldRestart = false
    /// With no first secondary within `connectTimeoutMs`, run the guest unprotected and keep looking for one
    /// (as a primary that lost its secondary does) instead of failing.
    public var startUnprotected = false
    /// `--save-guest DIR` (secondary): every seed's guest image and machine size are saved there (`SavedGuest`).
    public var saveGuestDir: String?
    /// Status line on stderr and `--status-json` rewrite period (0: none).
    public var statusIntervalMs: Int = 1000
    public var statusJSON: String?
    /// Written once at the end: every figure and histogram the bench harness needs.
    public var statsJSON: String?
    /// `--link-cpu N`: the core the FT-link threads (the primary's link, the secondary's receiver) are pinned
    /// to; nil leaves them to the scheduler. Two processes of one host whose link threads share a core wake
    /// each other without an inter-processor interrupt (see Benchmarks/README.md).
    public var linkCPU: Int32?
    /// `--link-poll-us N` (secondary): once the replay has caught up, its receiver spins this long for the next
    /// log frame instead of sleeping (0: never). See `Connection.enablePolling`.
    public var linkPollNs: UInt64 = 0

    /// A fence object for `fence` (nil: none); nothing is taken yet.
    func openFence() -> (any Fencing)? { fence?.open(leaseMs: fenceLeaseMs) }

    public init(key: [UInt8], encryption: EncryptionMode = .opportunistic) {
        self.key = key
        self.encryption = encryption
    }

    /// Sets `linkCPU` (nil: unpinned) after checking this process may run there.
    public mutating func pinLinkThreads(to cpu: Int32?) throws(PairError) {
        if let cpu {
            guard Cores.allows(cpu) else {
                throw .config("--link-cpu \(cpu): this process may run on core\(Cores.count == 1 ? "" : "s") \(Cores.list) only")
            }
        }
        linkCPU = cpu
    }

    /// Splits `--OPTION HOST:PORT` (the port after the last colon); `anyPort` admits port 0 (a listener's).
    static func hostPort(_ value: String, option: String, anyPort: Bool = false) throws(PairError) -> (host: String, port: UInt16) {
        guard let colon = value.lastIndex(of: ":"), let port = UInt16(value[value.index(after: colon)...]), anyPort || port > 0 else {
            throw .config("\(option) \(value): expected HOST:PORT")
        }
        return (String(value[..<colon]), port)
    }

    /// The longest a handover may take before whoever asked stops waiting (the fence wait, failure timeouts, ack).
    public var handoverBoundMs: Int { fenceWaitMs + 2 * failureTimeoutMs + 5_000 }

    var heartbeatNs: UInt64 { UInt64(heartbeatMs) * 1_000_000 }
    var failureNs: UInt64 { UInt64(failureTimeoutMs) * 1_000_000 }

    /// TCP's retransmission floor on the FT link: a fifth of the failure timeout, so a segment lost where fast
    /// retransmit cannot help (the last one before a pause) is sent again a few times before the peer is
    /// declared failed; the kernel takes 10 to 200 ms (its default floor is 200 ms, 4x the default timeout).
    var retransmitFloorMs: Int { min(200, max(10, failureTimeoutMs / 5)) }

    /// The FT link's channel settings for this side.
    func channel(role: PeerRole) -> ChannelConfig {
        var c = ChannelConfig(key: key, role: role, encryption: encryption, payload: [], handshakeTimeoutMs: 5000)
        c.retransmitFloorMs = retransmitFloorMs
        return c
    }

    /// After a handshake: a kernel that kept its own retransmission floor is said once per process, when the
    /// failure timeout is short enough for one retransmission to exceed it.
    func checkRetransmitFloor(_ conn: Connection) {
        guard case .refused(let why) = conn.retransmitFloor, failureTimeoutMs < 400,
              !retransmitFloorWarned.exchange(true, ordering: .relaxed) else { return }
        warn("the FT link keeps the kernel's TCP retransmission floor (200 ms unless its route sets rto_min; "
             + "TCP_RTO_MIN_US needs Linux 6.15: \(why)): one lost segment can silence the link longer than "
             + "--failure-timeout-ms \(failureTimeoutMs) and look like a failure; on a link that drops packets set "
             + "rto_min on its route (docs/lab.md)")
    }
}

private let retransmitFloorWarned = Atomic<Bool>(false)

/// Why a pair side stopped without a guest result.
public enum PairError: Error, CustomStringConvertible {
    /// No secondary answered (address, refused, timeout).
    case peerUnreachable(String)
    /// The peer failed the handshake: wrong key, version, encryption refused, garbage.
    case peerRejected(String)
    /// Another side holds the fence: this side must not run as a primary.
    case fenced(String)
    /// The primary stopped in an orderly way before the guest ended: nothing to take over.
    case primaryStopped(String)
    /// The seed or the log from the peer is unusable.
    case badPeerData(String)
    case config(String)
    /// A cold restart found the pair record saying the guest ended, with this status: nothing to boot again.
    case pairEnded(status: Int32, String)

    public var description: String {
        switch self {
        case .peerUnreachable(let s): return "secondary unreachable: \(s)"
        case .peerRejected(let s): return "peer rejected: \(s)"
        case .fenced(let s): return "fenced: \(s)"
        case .primaryStopped(let s): return s
        case .badPeerData(let s): return s
        case .config(let s): return s
        case .pairEnded(_, let s): return s
        }
    }

    /// Maps a channel failure at connect/handshake time.
    static func from(_ e: Error) -> PairError {
        guard let c = e as? ChannelError else { return .peerUnreachable("\(e)") }
        switch c {
        case .connectionRefused, .connectTimeout, .unreachable, .resolveFailed, .timeout, .peerClosed, .closed, .system:
            return .peerUnreachable(c.description)
        default:
            return .peerRejected(c.description)
        }
    }
}

func warn(_ s: String) { FileHandle.standardError.write(Data(("lockstep: " + s + "\n").utf8)) }

/// Watches a fence this side holds, when `--fence-lease-ms` asks for it (an etcd fence always: the watch renews
/// its lease).
func watchFence(_ fence: (any Fencing)?, _ options: PairOptions) -> FenceWatch? {
    guard let fence, fence.token != nil, options.fenceLeaseMs > 0 else { return nil }
    return FenceWatch(fence: fence, leaseMs: options.fenceLeaseMs)
}

/// Takes the fence for this process, or says who holds it.
func takeFence(_ options: PairOptions) throws(PairError) -> (any Fencing)? {
    guard let f = options.openFence() else { return nil }
    do {
        if try f.tryAcquire(identity: .current()) != nil { return f }
    } catch { throw .config("--fence \(f.location): \(error)") }
    throw .fenced("the fence in \(f.location) is held by \(f.holder?.description ?? "another process"): another primary is live")
}

/// The pair record: beside the fence (`DIR/lockstep.pair`, or the `PREFIX/pair` key in etcd), in which the live
/// primary says which secondary, if any, may take over from it. Only the fence holder writes it. A secondary
/// that wins the fence goes live only if the record names it: a primary that dropped it and went on unprotected,
/// or whose guest ended, has made its state stale, and going live would contradict what the world saw.
public enum PairRecord {
    static func protected(_ id: UInt64) -> String { "protected \(String(id, radix: 16))" }
    static let unprotected = "unprotected"
    /// The guest ended with this process status: nobody may take over, and a side waiting to rejoin stops with it.
    static func ended(_ status: Int32) -> String { "ended \(status)" }

    /// The record names a secondary that may take over (`protected ID`): the primary's guest ran protected.
    public static func namesASecondary(_ text: String) -> Bool { text.hasPrefix("protected ") }

    /// The status an `ended STATUS` record carries (a bare `ended`, written before records carried it: 0); nil
    /// for any other record.
    public static func endedStatus(_ text: String) -> Int32? {
        let f = text.split(separator: " ")
        guard f.first == "ended", f.count <= 2 else { return nil }
        return f.count == 1 ? 0 : Int32(f[1])
    }

    /// Replaces the record (atomically). Returns false on failure.
    @discardableResult
    static func write(_ fence: (any Fencing)?, _ text: String) -> Bool {
        guard let e = tryWrite(fence, text) else { return true }
        warn("cannot write the pair record: \(e)")
        return false
    }

    /// `write` without the warning: why it failed, or nil once written (or no fence). A failure leaves the old
    /// record whole. A store that makes the write conditional (etcd) and finds the fence taken stops the process.
    static func tryWrite(_ fence: (any Fencing)?, _ text: String) -> String? {
        guard let fence else { return nil }
        do { try fence.writePairRecord(text) } catch FenceError.notHolder(let h) {
            if let h { stopOnTakenFence(h) }
            stopFenced(lostFence("the fence in \(fence.location) is no longer held by anyone (this side's lease ran out)"))
        } catch {
            return "\(error)"
        }
        return nil
    }

    /// After writing a record that lets output leave, this process must still hold the fence: on NFS a holder
    /// cut off from the server loses its lock when its lease runs out, and a secondary may have taken it and read
    /// the record before this write. nil: held (or no fence, or a store whose writes are conditional: the write
    /// itself was the check). The fence naming another holder (or nobody, its lease gone) stops the process at
    /// once; a fence that cannot be read returns why.
    static func confirmFence(_ fence: (any Fencing)?) -> String? {
        guard let f = fence, let t = f.token, !f.writesAreConditional else { return nil }
        switch f.check(holding: t) {
        case .confirmed: return nil
        case .taken(let h): stopOnTakenFence(h)
        case .lost(let why): stopFenced(lostFence(why))
        case .unreadable(let why): return "cannot read the fence: \(why)"
        }
    }

    /// Another holder's generation in the fence: stop at once, releasing nothing (what this side holds
    /// back may contradict what the new holder runs).
    static func stopOnTakenFence(_ h: FenceHolder) -> Never {
        stopFenced(lostFence("the fence is now held by \(h), not by this process"))
    }

    /// Why a side that no longer holds its fence stops.
    static func lostFence(_ why: String) -> String {
        "\(why): another side may be live; stopping at once, releasing no held output"
    }

    /// Says why and ends the process with 75 (fenced) at once: nothing held is released, no record written.
    static func stopFenced(_ why: String) -> Never {
        warn(why)
        _exit(75)
    }

    /// The record's text; "(none)" when there is none or it cannot be read (it then names no secondary and
    /// says no guest ended).
    static func read(_ fence: any Fencing) -> String { ((try? fence.readPairRecord()) ?? nil) ?? "(none)" }
}
