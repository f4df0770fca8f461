import CLockstep
import COpenSSL
import Glibc
import KVM

/// SHA-256 (OpenSSL) over all guest RAM, the vCPU state and the device state: the `state-digest:` line.
/// Record and replay of one run must print the same value.
public enum StateDigest {
    public static func compute(memory: GuestMemory, vcpu: VCPU, deviceState: [UInt8]) throws(SysError) -> [UInt8] {
        try digest(UnsafeRawBufferPointer(start: memory.base, count: Int(memory.size)), vcpu: vcpu, deviceState: deviceState)
    }

    /// The seed's digest, a two-level tree: SHA-256 over the chunk hashes (`chunkHashes`, 32 bytes per chunk
    /// of `pagesPerChunk` pages, in order), then the vCPU and device state. A chunk hash is the SHA-256 of
    /// its pages' SHA-256s (`chunkHash`). A primary seeding by pre-copy keeps both as it sends the pages, so
    /// its pause rehashes only the pages written since and their chunks; the secondary keeps its own as the pages
    /// arrive (`SeedHashes`).
    public static func seed(chunkHashes: UnsafeRawBufferPointer, vcpu: VCPU, deviceState: [UInt8]) throws(SysError) -> [UInt8] {
        try digest(chunkHashes, vcpu: vcpu, deviceState: deviceState)
    }

    /// 512 pages (2 MiB of RAM, 16 KiB of page hashes) per chunk: at 16 GiB the root hashes 256 KiB.
    public static let pagesPerChunk = 512

    public static func chunkCount(pages: Int) -> Int { (pages + pagesPerChunk - 1) / pagesPerChunk }

    /// The hash of chunk `chunk` from the page hashes of all `pages` pages (the last chunk may be short).
    /// A whole chunk of zero-page hashes takes the constant (comparing is ~10x cheaper than hashing).
    public static func chunkHash(_ chunk: Int, pageHashes: UnsafeRawPointer, pages: Int, into out: UnsafeMutableRawPointer) {
        let first = chunk * pagesPerChunk, n = min(pagesPerChunk, pages - first)
        let hashes = pageHashes + first * 32
        let allZero = n == pagesPerChunk && zeroPageHash.withUnsafeBytes { z in
            (0..<n).allSatisfy { memcmp(hashes + $0 * 32, z.baseAddress!, 32) == 0 }
        }
        if allZero {
            zeroChunkHash.withUnsafeBytes { out.copyMemory(from: $0.baseAddress!, byteCount: 32) }
        } else {
            _ = SHA256(hashes.assumingMemoryBound(to: UInt8.self), n * 32, out.assumingMemoryBound(to: UInt8.self))
        }
    }

    /// SHA-256 over `memory` (RAM or its page hashes), the registers, special registers, FPU and devices.
    private static func digest(_ memory: UnsafeRawBufferPointer, vcpu: VCPU, deviceState: [UInt8]) throws(SysError) -> [UInt8] {
        let ctx = EVP_MD_CTX_new()
        defer { EVP_MD_CTX_free(ctx) }
        EVP_DigestInit_ex(ctx, EVP_sha256(), nil)
        EVP_DigestUpdate(ctx, memory.baseAddress, memory.count)
        var regs = try vcpu.regs()
        withUnsafeBytes(of: &regs) { _ = EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) }
        var sregs = try vcpu.sregs()
        withUnsafeBytes(of: &sregs) { _ = EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) }
        var fpu = try vcpu.fpu()
        withUnsafeBytes(of: &fpu) { _ = EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) }
        deviceState.withUnsafeBytes { _ = EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) }
        var out = [UInt8](repeating: 0, count: 32)
        var len: UInt32 = 32
        EVP_DigestFinal_ex(ctx, &out, &len)
        return out
    }

    /// SHA-256 of one 4096-byte page into `out` (32 bytes). A zero page (checked ~10x faster than hashed) copies
    /// the hash of zeros.
    @inline(__always) public static func hashPage(_ page: UnsafeRawPointer, into out: UnsafeMutableRawPointer) {
        if lk_page_is_zero(page) != 0 {
            copyZeroPageHash(into: out)
        } else {
            _ = SHA256(page.assumingMemoryBound(to: UInt8.self), 4096, out.assumingMemoryBound(to: UInt8.self))
        }
    }
    /// Hashes pages 0..<`count` at `base` into `hashes` (32 bytes each), leaving those set in `skip` as they
    /// are: a page set in `read` is read and hashed; any other was never written and is zero, and reading it
    /// would only cost a page fault.
    public static func hashPages(_ base: UnsafeRawPointer, count: Int, read: UnsafePointer<UInt64>, skip: UnsafePointer<UInt64>? = nil,
                                 into hashes: UnsafeMutableRawPointer) {
        for p in 0..<count {
            let word = p >> 6, bit: UInt64 = 1 << UInt64(p & 63)
            if let skip, skip[word] & bit != 0 { continue }
            // SAFETY: the caller's mapping holds `count` pages and `hashes` count * 32 bytes; p < count.
            if read[word] & bit != 0 { hashPage(base + p * 4096, into: hashes + p * 32) } else { copyZeroPageHash(into: hashes + p * 32) }
        }
    }

    /// Every chunk hash of RAM (`pages` pages at `base`) into `out` (32 bytes a chunk). A chunk with no page
    /// in `written` is zero throughout and takes a constant, so a mostly unwritten guest costs little. For
    /// `Machine.seedDigest()` of a machine from scratch (tests compare `SeedHashes` with it).
    public static func chunkHashes(_ base: UnsafeRawPointer, pages: Int, written: UnsafePointer<UInt64>,
                                   into out: UnsafeMutableRawPointer) {
        let pageHashes = UnsafeMutableRawPointer.allocate(byteCount: pagesPerChunk * 32, alignment: 16)
        defer { pageHashes.deallocate() }
        for c in 0..<chunkCount(pages: pages) {
            let first = c * pagesPerChunk, n = min(pagesPerChunk, pages - first)
            // pagesPerChunk is a multiple of 64: the chunk starts at a bitmap word.
            let words = UnsafePointer(written + first / 64)
            if n == pagesPerChunk, !(0..<pagesPerChunk / 64).contains(where: { words[$0] != 0 }) {
                zeroChunkHash.withUnsafeBytes { (out + c * 32).copyMemory(from: $0.baseAddress!, byteCount: 32) }
                continue
            }
            hashPages(base + first * 4096, count: n, read: words, into: pageHashes)
            chunkHash(0, pageHashes: pageHashes, pages: n, into: out + c * 32)
        }
    }

    static let zeroPageHash = sha256([UInt8](repeating: 0, count: 4096))
    /// The hash of a whole chunk of zero pages.
    static let zeroChunkHash = sha256(Array(repeating: zeroPageHash, count: pagesPerChunk).flatMap { $0 })
    @inline(__always) public static func copyZeroPageHash(into out: UnsafeMutableRawPointer) {
        zeroPageHash.withUnsafeBytes { out.copyMemory(from: $0.baseAddress!, byteCount: 32) }
    }

    public static func sha256(_ bytes: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        bytes.withUnsafeBytes { _ = SHA256($0.baseAddress?.assumingMemoryBound(to: UInt8.self), $0.count, &out) }
        return out
    }

    public static func hex(_ b: [UInt8]) -> String { b.map { String(format2($0)) }.joined() }
    static func format2(_ v: UInt8) -> String { let s = String(v, radix: 16); return s.count == 1 ? "0" + s : s }
}
