#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

/// The fence and the pair record in etcd (`--fence etcd://HOST:PORT[,HOST:PORT...]/PREFIX`):
///
/// - `PREFIX/fence`: the holder's record (`host`, `pid`, `acquired_ns`), attached to the holder's lease. Its
///   `mod_revision` is the generation: etcd numbers every write, so the fencing token grows with each holder.
/// - `PREFIX/pair`: the pair record, with no lease (it outlives its writer).
/// - `PREFIX/id`: the store's ID (`storeID`), made once by the first side to ask.
///
/// Every step is one compare-and-swap transaction. A holder writes the pair record only while `PREFIX/fence` still
/// carries its generation, so "check, then write" cannot interleave with a takeover. And a secondary named by
/// the record takes the fence from a holder whose lease still runs (`claim`): the primary, to leave that
/// secondary behind, must first rewrite the record under the same compare, so exactly one of the two wins. A
/// named secondary therefore goes live after a lost primary host at once, not after the lease (unlike a lock on
/// NFS, held by the server until the lost client's lease runs out).
///
/// The lease (`ttlSeconds`) is renewed by each `check` (the fence watch calls it every `--fence-lease-ms` / 4, at
/// most once a second) and made twice the watch's bound, at least 5 s: a holder that cannot renew stops (its
/// watch) before etcd can drop its key and let another side take an unclaimed fence.
public final class EtcdFence: Fencing, @unchecked Sendable {
    public let location: String
    let client: EtcdClient
    let fenceKey: String
    let pairKey: String
    let idKey: String
    let ttlSeconds: Int

    private struct State {
        var token: FenceToken?
        var lease: Int64 = 0
        var holder: FenceHolder?
    }
    private let state = Mutex(State())

    public init(endpoints: [EtcdEndpoint], prefix: String, leaseMs: Int, access: EtcdAccess = EtcdAccess(), timeoutMs: Int = 2000) {
        location = FenceLocation.etcd(endpoints, prefix: prefix, access: access).description
        client = EtcdClient(endpoints: endpoints, access: access, location: location, timeoutMs: timeoutMs)
        fenceKey = prefix + "/fence"
        pairKey = prefix + "/pair"
        idKey = prefix + "/id"
        ttlSeconds = max(5, (2 * leaseMs + 999) / 1000)
    }

    public var writesAreConditional: Bool { true }
    public var token: FenceToken? { state.withLock { $0.token } }
    public var holder: FenceHolder? { state.withLock { $0.holder } }
    /// The lease this side holds the fence under (0: none).
    public var lease: Int64 { state.withLock { $0.lease } }

    public func tryAcquire(identity: FenceIdentity, claim: String?) throws -> FenceToken? {
        if let t = token { return t }
        // Look first: a held fence costs one request per try, not a lease grant.
        let seen = try txn(compare: [], success: [range(fenceKey), range(pairKey)], failure: [])
        let current = holder(in: seen)
        let pair = value(of: pairKey, in: seen)
        let compare: [String: Any]
        if current == nil {
            compare = ["key": EtcdJSON.b64(fenceKey), "target": "CREATE", "result": "EQUAL", "create_revision": "0"]
        } else if let claim, pair == claim {
            compare = ["key": EtcdJSON.b64(pairKey), "target": "VALUE", "result": "EQUAL", "value": EtcdJSON.b64(claim)]
        } else {
            state.withLock { $0.holder = current }
            return nil
        }
        let lease = try grant()
        do {
            let put = ["request_put": ["key": EtcdJSON.b64(fenceKey),
                                       "value": EtcdJSON.b64(FenceHolder.recordText(generation: nil, identity: identity)),
                                       "lease": String(lease)]]
            let reply = try txn(compare: [compare], success: [put], failure: [range(fenceKey)])
            guard reply["succeeded"] as? Bool == true else {
                revoke(lease)
                state.withLock { $0.holder = holder(in: reply) }
                return nil
            }
            let t = FenceToken(generation: EtcdJSON.revision(reply), identity: identity)
            state.withLock { $0 = State(token: t, lease: lease, holder: FenceHolder(generation: t.generation, identity: identity)) }
            return t
        } catch {
            revoke(lease)
            throw error
        }
    }

    public func release() throws {
        let (t, lease) = state.withLock { s in defer { s.token = nil; s.lease = 0 }; return (s.token, s.lease) }
        guard let t else { throw FenceError.notHeld }
        defer { revoke(lease) }
        _ = try txn(compare: [ours(t)], success: [["request_delete_range": ["key": EtcdJSON.b64(fenceKey)]]], failure: [])
    }

    public func readHolder() -> FenceHolder? {
        (try? txn(compare: [], success: [range(fenceKey)], failure: [])).flatMap { holder(in: $0) }
    }

    /// Renews the lease, then reads the fence key: still this generation, another holder's, or gone.
    public func check(holding t: FenceToken) -> FenceCheck {
        do {
            let lease = state.withLock { $0.lease }
            if lease != 0 {  // 0: released since; only the read says anything
                let renewed = try client.call("/v3/lease/keepalive", ["ID": String(lease)])
                if EtcdJSON.int((renewed["result"] as? [String: Any])?["TTL"]) <= 0 {
                    return .lost("this side's etcd lease \(lease) at \(location) expired")
                }
            }
            let reply = try txn(compare: [], success: [range(fenceKey)], failure: [])
            guard let h = holder(in: reply) else { return .lost("the fence key \(fenceKey) at \(location) is gone") }
            return h.generation == t.generation ? .confirmed : .taken(h)
        } catch {
            return .unreadable("\(error)")
        }
    }

    public func readPairRecord() throws -> String? {
        value(of: pairKey, in: try txn(compare: [], success: [range(pairKey)], failure: []))
    }

    /// Written only while the fence key still carries this side's generation.
    public func writePairRecord(_ text: String) throws {
        guard let t = token else { throw FenceError.notHeld }
        let put = ["request_put": ["key": EtcdJSON.b64(pairKey), "value": EtcdJSON.b64(text)]]
        let reply = try txn(compare: [ours(t)], success: [put], failure: [range(fenceKey)])
        guard reply["succeeded"] as? Bool == true else { throw FenceError.notHolder(holder(in: reply)) }
    }

    // MARK: etcd requests

    private func txn(compare: [[String: Any]], success: [[String: Any]], failure: [[String: Any]]) throws -> [String: Any] {
        try client.call("/v3/kv/txn", ["compare": compare, "success": success, "failure": failure])
    }

    /// `PREFIX/id`, created if absent in one transaction, so of two sides asking at once both read the winner's.
    public func storeID() throws -> String {
        let key = EtcdJSON.b64(idKey)
        let absent: [String: Any] = ["key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"]
        let mine = newStoreID()
        let reply = try txn(compare: [absent], success: [["request_put": ["key": key, "value": EtcdJSON.b64(mine)]]], failure: [range(idKey)])
        let id = reply["succeeded"] as? Bool == true ? mine : value(of: idKey, in: reply) ?? ""
        guard isStoreID(id) else { throw FenceError.damagedID("\(location) key \(idKey)") }
        return id
    }

    private func range(_ key: String) -> [String: Any] { ["request_range": ["key": EtcdJSON.b64(key)]] }

    private func ours(_ t: FenceToken) -> [String: Any] {
        ["key": EtcdJSON.b64(fenceKey), "target": "MOD", "result": "EQUAL", "mod_revision": String(t.generation)]
    }

    private func grant() throws -> Int64 {
        let reply = try client.call("/v3/lease/grant", ["TTL": String(ttlSeconds)])
        let id = EtcdJSON.int(reply["ID"])
        guard id != 0 else { throw FenceError.etcd("etcd at \(location) granted no lease (\(reply["error"] ?? "no ID"))") }
        return id
    }

    /// Best effort: a lease nobody renews ends by itself.
    private func revoke(_ lease: Int64) {
        guard lease != 0 else { return }
        _ = try? client.call("/v3/lease/revoke", ["ID": String(lease)])
    }

    private func kv(_ key: String, in reply: [String: Any]) -> [String: Any]? {
        EtcdJSON.kvs(reply).first { EtcdJSON.text($0["key"]) == key }
    }

    private func value(of key: String, in reply: [String: Any]) -> String? {
        kv(key, in: reply).map { EtcdJSON.text($0["value"]) ?? "" }
    }

    /// The fence key's holder in a reply: its record, numbered by the key's `mod_revision`.
    private func holder(in reply: [String: Any]) -> FenceHolder? {
        guard let kv = kv(fenceKey, in: reply) else { return nil }
        return FenceHolder(record: EtcdJSON.text(kv["value"]) ?? "", generation: UInt64(max(0, EtcdJSON.int(kv["mod_revision"]))))
    }
}

/// Where `--fence` points: a directory both hosts reach, or an etcd cluster and a key prefix (over TLS when
/// `access.tls` is set) with the options in `access`.
public enum FenceLocation: Sendable, Equatable, CustomStringConvertible {
    case directory(String)
    case etcd([EtcdEndpoint], prefix: String, access: EtcdAccess)

    /// `DIR`, or `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` (the prefix names this pair's keys), `etcds://` for
    /// TLS, either with an optional `?cacert=FILE&cert=FILE&key=FILE&user=NAME&password-file=FILE`.
    public init(parsing s: String) throws(FenceError) {
        let secure = s.hasPrefix("etcds://")
        guard secure || s.hasPrefix("etcd://") else { self = .directory(s); return }
        var rest = s.dropFirst(secure ? "etcds://".count : "etcd://".count)
        var access = EtcdAccess(tls: secure ? EtcdTLS() : nil)
        if let q = rest.firstIndex(of: "?") {
            access = try EtcdAccess(query: rest[rest.index(after: q)...], secure: secure, in: s)
            rest = rest[..<q]
        }
        let scheme = secure ? "etcds" : "etcd"
        guard let slash = rest.firstIndex(of: "/"), rest[slash...].count > 1 else {
            throw .etcd("--fence \(s): give a key prefix after the members, as \(scheme)://HOST:PORT/lockstep/NAME")
        }
        var members: [EtcdEndpoint] = []
        for m in rest[..<slash].split(separator: ",") {
            var host = Substring(m), port: UInt16? = 2379
            if host.hasPrefix("["), let close = host.firstIndex(of: "]") {  // [IPv6]:PORT
                let after = host[host.index(after: close)...]
                port = after.isEmpty ? 2379 : after.hasPrefix(":") ? UInt16(after.dropFirst()) : nil
                host = host[host.index(after: host.startIndex)..<close]
            } else if let colon = host.lastIndex(of: ":") {
                port = UInt16(host[host.index(after: colon)...])
                host = host[..<colon]
            }
            guard let port, port > 0, !host.isEmpty else { throw .etcd("--fence \(s): '\(m)' is not HOST:PORT") }
            members.append(EtcdEndpoint(host: String(host), port: port))
        }
        guard !members.isEmpty else { throw .etcd("--fence \(s): name at least one etcd member, as \(scheme)://HOST:PORT/PREFIX") }
        var prefix = String(rest[slash...])
        while prefix.count > 1 && prefix.hasSuffix("/") { prefix.removeLast() }
        self = .etcd(members, prefix: prefix, access: access)
    }

    /// The fence object for this location (nothing is contacted yet).
    public func open(leaseMs: Int) -> any Fencing {
        switch self {
        case .directory(let d): return Fence(directory: d)
        case .etcd(let m, let p, let access): return EtcdFence(endpoints: m, prefix: p, leaseMs: leaseMs, access: access)
        }
    }

    public var description: String {
        switch self {
        case .directory(let d): return d
        case .etcd(let m, let p, let access):
            return (access.tls == nil ? "etcd://" : "etcds://") + m.map(\.description).joined(separator: ",") + p + access.query
        }
    }
}
