import CLockstep
import Glibc
import KVM

/// A machine's RAM, kept after the machine is gone: a secondary that diverged, or that handed its guest
/// over, keeps it for the next seed, which then carries only the pages that differ from it (a delta seed,
/// see `HeldPages`). Any content will do (a diverged replay's, a corrupted page's): the primary compares
/// page hashes and sends every page whose hash is not its own. What it relies on is `written`: every page
/// that may not be zero (loaded, or written since boot by the guest, seen by KVM's dirty log, or from user
/// space, marked by `SyncPointStore.writePages`).
public final class RetainedRAM: @unchecked Sendable {
    let memory: GuestMemory
    /// One bit per page, `(pageCount + 63) / 64` words.
    let written: [UInt64]
    public let imageSHA256: [UInt8]
    public var memoryMiB: UInt32 { UInt32(memory.size >> 20) }

    init(memory: GuestMemory, written: [UInt64], imageSHA256: [UInt8]) {
        self.memory = memory; self.written = written; self.imageSHA256 = imageSHA256
    }

    /// A machine of this image and config may adopt it: same size, and the same loaded pages (the pages
    /// outside `written` are zero only as long as the loader's pages are the same ones).
    public func fits(image: PVHImage, config: MachineConfig) -> Bool {
        memory.size == UInt64(config.memoryMiB) << 20 && StateDigest.sha256(image.bytes) == imageSHA256
    }

    /// The SHA-256 of every page that is not zero, by ascending page number: what this side holds, for the
    /// primary to compare its RAM with. Pages outside `written` are not read (zero, and reading would fault them in).
    public func heldPages() -> HeldPages {
        var held = HeldPages()
        let hash = UnsafeMutableRawPointer.allocate(byteCount: 32, alignment: 16)
        defer { hash.deallocate() }
        for p in 0..<memory.pageCount where written[p >> 6] & (1 << UInt64(p & 63)) != 0 {
            // SAFETY: p < pageCount, so the page lies inside the mapping.
            let page = memory.base + p * 4096
            if lk_page_is_zero(page) != 0 { continue }
            StateDigest.hashPage(page, into: hash)
            held.numbers.append(UInt32(p))
            held.hashes.append(contentsOf: UnsafeRawBufferPointer(start: hash, count: 32))
        }
        return held
    }
}

extension Machine {
    /// Keeps this machine's RAM for a machine built later (`Machine(adopting:)`); this machine must not run again.
    public func retainRAM() throws(MachineError) -> RetainedRAM {
        guard let store = syncPoints else { throw .config("retaining RAM needs dirty tracking (record or replay mode)") }
        var written = [UInt64](repeating: 0, count: dirtyBitmapWords)
        do { try written.withUnsafeMutableBufferPointer { b throws(SysError) in try store.writtenSinceBoot(into: b.baseAddress!) } } catch {
            throw .sys(error)
        }
        return RetainedRAM(memory: memory, written: written, imageSHA256: StateDigest.sha256(image.bytes))
    }
}

/// What a secondary's RAM holds, as page hashes: the SHA-256 of each non-zero page, by ascending page number;
/// every other page is zero. A primary seeding it sends only the pages whose hash differs from its own.
public struct HeldPages: Equatable, Sendable {
    public var numbers: [UInt32] = []
    /// 32 bytes per number, in the same order.
    public var hashes: [UInt8] = []

    public init() {}
    public init(numbers: [UInt32], hashes: [UInt8]) { self.numbers = numbers; self.hashes = hashes }

    public var count: Int { numbers.count }

    /// Sets in `differ` (one bit per page, cleared first) every page of `pages` whose hash in `mine` (32 bytes
    /// a page, this side's RAM) is not the held one (a page not held is zero). Returns how many held pages
    /// were equal. The numbers must be ascending and below `pages` (`SeedCodec` checks what arrives).
    public func compare(_ mine: UnsafeRawPointer, pages: Int, differ: UnsafeMutablePointer<UInt64>) -> Int {
        differ.update(repeating: 0, count: (pages + 63) / 64)
        var equal = 0
        var next = 0
        hashes.withUnsafeBytes { held in
            StateDigest.zeroPageHash.withUnsafeBytes { zero in
                for p in 0..<pages {
                    let isHeld = next < numbers.count && numbers[next] == UInt32(p)
                    let theirs = isHeld ? held.baseAddress! + next * 32 : zero.baseAddress!
                    if isHeld { next += 1 }
                    // SAFETY: `mine` holds `pages` hashes; `held` one per number.
                    if memcmp(mine + p * 32, theirs, 32) != 0 {
                        differ[p >> 6] |= 1 << UInt64(p & 63)
                    } else if isHeld {
                        equal += 1
                    }
                }
            }
        }
        return equal
    }
}

/// The page hashes of a machine being seeded, kept as the seed arrives, as the primary keeps its own: the
/// seed digest check at the end hashes chunks of page hashes, not RAM, so a secondary confirms a seed (and
/// the primary releases output on its acks) a few ms after the pause, not after a pass over all its RAM.
/// A page's hash is taken from the bytes written into RAM, the last copy winning; a page the seed did not
/// send keeps the hash it had: the held one of a kept RAM, a loaded page's read from RAM, zero otherwise.
public final class SeedHashes {
    private let pages: Int
    private let hashes: UnsafeMutableRawPointer

    /// `held`: what a kept RAM holds (as sent to the primary); nil for a new machine.
    public init(machine: Machine, held: HeldPages?) throws(MachineError) {
        pages = machine.memory.pageCount
        hashes = .allocate(byteCount: pages * 32, alignment: 16)
        if let held {
            for p in 0..<pages { StateDigest.copyZeroPageHash(into: hashes + p * 32) }
            held.hashes.withUnsafeBytes { h in
                for (i, n) in held.numbers.enumerated() where Int(n) < pages {
                    (hashes + Int(n) * 32).copyMemory(from: h.baseAddress! + i * 32, byteCount: 32)
                }
            }
        } else {
            let loaded = UnsafeMutablePointer<UInt64>.allocate(capacity: machine.dirtyBitmapWords)
            defer { loaded.deallocate() }
            try machine.loadedPages(into: loaded)
            // SAFETY: RAM holds `pages` pages, `loaded` covers them, `hashes` holds pages * 32 bytes.
            StateDigest.hashPages(machine.memory.base, count: pages, read: loaded, into: hashes)
        }
    }

    deinit { hashes.deallocate() }

    /// Pages the seed wrote (`Machine.writeSeedPages` checked the numbers and the length).
    public func wrote(_ numbers: [UInt32], data: UnsafeRawBufferPointer) {
        for (i, n) in numbers.enumerated() where Int(n) < pages {
            // SAFETY: data holds numbers.count pages; n < pages.
            StateDigest.hashPage(data.baseAddress! + i * 4096, into: hashes + Int(n) * 32)
        }
    }

    /// `StateDigest.seed` of `machine`, from these page hashes.
    public func digest(_ machine: Machine) throws(MachineError) -> [UInt8] {
        let chunks = StateDigest.chunkCount(pages: pages)
        let chunkHashes = UnsafeMutableRawBufferPointer.allocate(byteCount: chunks * 32, alignment: 16)
        defer { chunkHashes.deallocate() }
        for c in 0..<chunks { StateDigest.chunkHash(c, pageHashes: hashes, pages: pages, into: chunkHashes.baseAddress! + c * 32) }
        return try machine.seedDigest(chunkHashes: UnsafeRawBufferPointer(chunkHashes))
    }
}
