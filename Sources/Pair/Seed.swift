import CLockstep
import Glibc
import Machine

/// The seed: what a primary sends a new secondary right after the handshake, in `bulk` frames, so both start
/// from the same state. Layout (little-endian), each part one bulk frame whose first byte is its `SeedPart`:
///
///     header: u16 seed version | u32 memory MiB | u32 interrupt latency µs | u64 epoch seconds |
///             32 image SHA-256 | 32 CPUID table SHA-256 | u32 image length | image bytes |
///             u32 length + fence store ID (32 hex digits, `Fencing.storeID`; none without a fence) |
///             u32 length + the primary's --fence (for messages: a directory's path may differ between hosts)
///     held:   (secondary → primary, answers the header; one or more) u8 flags (bit 0: the last part) |
///             u32 count | count x u32 page number (ascending across parts) | count x 32 page SHA-256
///     pages:  u32 count | count x u32 page number | count x 4096 page bytes      (zero or more; built
///             in place by `Precopy.sendPending`)
///     end:    u64 exit | u32 signature | u64 last guest clock ns | u32 first log frame sequence |
///             u32 total pages | u32 length + vCPU state | u32 length + device state | 32 seed digest |
///             u64 protection id (names this secondary in the fence directory's pair record) |
///             u8 run state (`SeedRunState`: halted when the primary's guest waited in HLT at the seed) |
///             u32 length + line head (serial output the primary's backend holds unsent: the start of the
///             line the guest is writing, at most 64 KiB; the secondary holds it, so a survivor sends the line whole)
///
/// The secondary loads the image itself, or keeps the RAM of its last machine of this guest (`RetainedRAM`:
/// it diverged, or handed the guest over); `held` names its non-zero pages by hash (none: a new machine).
/// The pages are those that differ from what it holds: the guest's pages written since boot for a new
/// machine, for a kept one the pages whose hash differs (a delta seed); then a page again each time
/// pre-copy found it written since it was sent (the last copy wins; `total pages` counts every copy).
/// After loading, its `StateDigest.seed` must equal the one in `end`, or the pair does not start.
/// Version 7: the line head. Version 6: the fence store ID (a secondary refuses a seed from a primary fenced elsewhere). Version 5: `held`. Version 4: the run state (a seed may be taken while the guest halts). Version 3: pre-copy (pages repeat)
/// and the two-level seed digest (pages, chunks of 512 pages); version 2 hashed the page hashes as one list,
/// version 1 sent each page once with a digest over RAM as one stream.
enum SeedPart: UInt8 {
    case header = 1
    case pages = 2
    case end = 3
    /// Secondary → primary: the hashes of the pages its RAM holds.
    case held = 4
}

/// Where the primary's vCPU was at the seed's exit.
enum SeedRunState: UInt8 {
    /// Between two exits: the secondary enters the guest next.
    case running = 1
    /// In HLT, waiting for an interrupt (the seed's exit is the HLT's): the secondary waits too.
    case halted = 2
}

struct SeedHeader: Equatable {
    static let version: UInt16 = 8
    var config: MachineConfig
    var imageSHA256: [UInt8]
    var cpuidSHA256: [UInt8]
    var image: [UInt8]
    var fenceID: String
    var fenceLocation: String
}

struct SeedEnd: Equatable {
    /// The most of a line's start a seed carries.
    static let maxLineHead = 1 << 16
    var exit: UInt64
    var signature: UInt32
    var lastClock: UInt64
    var firstSequence: UInt32
    var totalPages: UInt32
    var vcpuState: [UInt8]
    var deviceState: [UInt8]
    var seedDigest: [UInt8]
    var protectionID: UInt64
    var runState: SeedRunState
    var lineHead: [UInt8] = []
}

struct SeedError: Error, CustomStringConvertible {
    let detail: String
    /// A bad `held` part: the secondary's, not the primary's.
    var fromSecondary = false
    init(_ s: String) { detail = s }
    init(secondary s: String) { detail = s; fromSecondary = true }
    var description: String { (fromSecondary ? "bad answer to the seed from the secondary: " : "bad seed from the primary: ") + detail }
}

/// Largest page chunk per bulk frame (frames carry at most 64 MiB).
let seedPagesPerFrame = 4096
/// Largest `held` part: 9 MiB.
let heldPagesPerFrame = 262_144

enum SeedCodec {
    static func header(_ h: SeedHeader) -> [UInt8] {
        var w = Wire(SeedPart.header)
        w.u16(SeedHeader.version); w.u32(h.config.memoryMiB); w.u32(h.config.interruptLatencyUs); w.u32(h.config.maxInterruptLatencyUs)
        w.u64(h.config.epochSeconds)
        w.raw(h.imageSHA256); w.raw(h.cpuidSHA256); w.blob(h.image); w.blob(Array(h.fenceID.utf8)); w.blob(Array(h.fenceLocation.utf8))
        return w.out
    }

    static func end(_ e: SeedEnd) -> [UInt8] {
        var w = Wire(SeedPart.end)
        w.u64(e.exit); w.u32(e.signature); w.u64(e.lastClock); w.u32(e.firstSequence); w.u32(e.totalPages)
        w.blob(e.vcpuState); w.blob(e.deviceState); w.raw(e.seedDigest); w.u64(e.protectionID); w.u8(e.runState.rawValue)
        w.blob(e.lineHead)
        return w.out
    }

    /// The `held` parts of `h` (at least one).
    static func held(_ h: HeldPages) -> [[UInt8]] {
        var parts: [[UInt8]] = []
        var i = 0
        repeat {
            let k = min(heldPagesPerFrame, h.count - i)
            var w = Wire(SeedPart.held)
            w.u8(i + k == h.count ? 1 : 0); w.u32(UInt32(k))
            for n in h.numbers[i..<i + k] { w.u32(n) }
            w.raw(h.hashes[i * 32..<(i + k) * 32])
            parts.append(w.out)
            i += k
        } while i < h.count
        return parts
    }

    /// Adds a `held` part to `h`, checking its numbers against RAM (`pages`) and the parts before. True: the last part.
    static func decodeHeld(_ body: [UInt8], into h: inout HeldPages, pages: Int) throws(SeedError) -> Bool {
        guard body.first == SeedPart.held.rawValue else {
            throw SeedError(secondary: "expected the hashes of the pages it holds, got part \(body.first.map(String.init) ?? "(empty)")")
        }
        do throws(SeedError) {
            var r = WireReader(body, what: "held pages")
            let flags = try r.u8()
            guard flags & ~1 == 0 else { throw SeedError("unknown held flags 0x\(String(flags, radix: 16))") }
            let n = Int(try r.u32())
            guard n <= heldPagesPerFrame else { throw SeedError("a held part of \(n) pages (at most \(heldPagesPerFrame))") }
            var last = h.numbers.last.map(Int.init) ?? -1
            for _ in 0..<n {
                let p = Int(try r.u32())
                guard p > last else { throw SeedError("held page \(p) after page \(last) (numbers must ascend)") }
                guard p < pages else { throw SeedError("held page \(p) is beyond RAM (\(pages) pages)") }
                h.numbers.append(UInt32(p))
                last = p
            }
            h.hashes += try r.raw(n * 32)
            try r.done()
            return flags & 1 != 0
        } catch { throw SeedError(secondary: error.detail) }  // the reader's errors name the primary
    }

    static func part(_ body: [UInt8]) throws(SeedError) -> SeedPart {
        guard let b = body.first, let p = SeedPart(rawValue: b) else { throw SeedError("unknown seed part \(body.first.map(String.init) ?? "(empty)")") }
        return p
    }

    static func decodeHeader(_ body: [UInt8]) throws(SeedError) -> SeedHeader {
        var r = WireReader(body, what: "seed header")
        let v = try r.u16()
        guard v == SeedHeader.version else { throw SeedError("seed version \(v); this side speaks \(SeedHeader.version)") }
        let config = MachineConfig(memoryMiB: try r.u32(), interruptLatencyUs: try r.u32(), maxInterruptLatencyUs: try r.u32(), epochSeconds: try r.u64())
        let h = SeedHeader(config: config, imageSHA256: try r.raw(32), cpuidSHA256: try r.raw(32), image: try r.blob(limit: 64 << 20),
                           fenceID: String(decoding: try r.blob(limit: 64), as: UTF8.self),
                           fenceLocation: String(decoding: try r.blob(limit: 4096), as: UTF8.self))
        try r.done()
        return h
    }

    /// A pages part: its page numbers, and where their bytes lie in `body` (not copied: they go straight to RAM).
    static func decodePages(_ body: [UInt8]) throws(SeedError) -> (numbers: [UInt32], data: Range<Int>) {
        var r = WireReader(body, what: "seed pages")
        let n = Int(try r.u32())
        guard n <= seedPagesPerFrame else { throw SeedError("a page chunk of \(n) pages (at most \(seedPagesPerFrame))") }
        let table = try r.raw(n * 4)
        let numbers = n == 0 ? [] : [UInt32](unsafeUninitializedCapacity: n) { b, count in
            // SAFETY: table holds n little-endian u32s; b holds n (x86-64 is little-endian).
            table.withUnsafeBytes { UnsafeMutableRawPointer(b.baseAddress!).copyMemory(from: $0.baseAddress!, byteCount: n * 4) }
            count = n
        }
        let data = try r.skip(n * 4096)
        try r.done()
        return (numbers, data)
    }

    private static func runState(_ b: UInt8) throws(SeedError) -> SeedRunState {
        guard let s = SeedRunState(rawValue: b) else { throw SeedError("unknown run state \(b) in the seed end") }
        return s
    }

    static func decodeEnd(_ body: [UInt8]) throws(SeedError) -> SeedEnd {
        var r = WireReader(body, what: "seed end")
        let e = SeedEnd(exit: try r.u64(), signature: try r.u32(), lastClock: try r.u64(), firstSequence: try r.u32(),
                        totalPages: try r.u32(), vcpuState: try r.blob(limit: 1 << 20), deviceState: try r.blob(limit: 1 << 20),
                        seedDigest: try r.raw(32), protectionID: try r.u64(), runState: try runState(r.u8()),
                        lineHead: try r.blob(limit: SeedEnd.maxLineHead))
        try r.done()
        return e
    }
}

/// Little-endian writer for pair messages.
struct Wire {
    var out: [UInt8] = []
    init(_ part: SeedPart) { out.append(part.rawValue) }
    /// A status message: most are a tag and a u64 (`released`, acks' reports), made in one allocation.
    init(tag: UInt8) { out.reserveCapacity(16); out.append(tag) }
    mutating func u8(_ v: UInt8) { out.append(v) }
    mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
    mutating func raw<C: Collection>(_ b: C) where C.Element == UInt8 { out.append(contentsOf: b) }
    mutating func blob(_ b: [UInt8]) { u32(UInt32(b.count)); out.append(contentsOf: b) }
}

/// Bounds-checked reader: every short or oversized field is a `SeedError` naming it.
struct WireReader {
    let data: [UInt8]
    let what: String
    var pos = 1  // after the part/tag byte
    init(_ data: [UInt8], what: String) { self.data = data; self.what = what }

    mutating func raw(_ n: Int) throws(SeedError) -> [UInt8] { Array(data[try skip(n)]) }
    /// The next `n` bytes' place in `data`, passed over.
    mutating func skip(_ n: Int) throws(SeedError) -> Range<Int> {
        guard n >= 0, data.count - pos >= n else { throw SeedError("\(what) ends early at byte \(pos) (needs \(n) more)") }
        defer { pos += n }
        return pos..<pos + n
    }
    mutating func int<T: FixedWidthInteger>(_: T.Type) throws(SeedError) -> T {
        let b = try raw(MemoryLayout<T>.size)
        var v: T = 0
        for (i, x) in b.enumerated() { v |= T(x) << (8 * i) }
        return v
    }
    mutating func u8() throws(SeedError) -> UInt8 { try int(UInt8.self) }
    mutating func u16() throws(SeedError) -> UInt16 { try int(UInt16.self) }
    mutating func u32() throws(SeedError) -> UInt32 { try int(UInt32.self) }
    mutating func u64() throws(SeedError) -> UInt64 { try int(UInt64.self) }
    mutating func blob(limit: Int) throws(SeedError) -> [UInt8] {
        let n = Int(try u32())
        guard n <= limit else { throw SeedError("\(what): a field of \(n) bytes (at most \(limit))") }
        return try raw(n)
    }
    func done() throws(SeedError) {
        guard pos == data.count else { throw SeedError("\(what) has \(data.count - pos) unexpected trailing bytes") }
    }
}
