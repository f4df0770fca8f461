import COpenSSL
import Foundation
import Machine
import Testing

/// The seed digest's chunk hashes: the shortcuts for unwritten and all-zero chunks give exactly the tree's
/// definition (SHA-256 of each chunk's page SHA-256s), which both sides of a pair must agree on.
@Suite struct ChunkHashTests {
    static func sha(_ p: UnsafeRawPointer, _ n: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        _ = SHA256(p.assumingMemoryBound(to: UInt8.self), n, &out)
        return out
    }

    @Test func shortcutsAgreeWithTheDefinition() {
        let per = StateDigest.pagesPerChunk
        let pages = 3 * per + 100  // three whole chunks and a short one
        let ram = UnsafeMutableRawPointer.allocate(byteCount: pages * 4096, alignment: 4096)
        defer { ram.deallocate() }
        ram.initializeMemory(as: UInt8.self, repeating: 0, count: pages * 4096)
        let words = (pages + 63) / 64
        let written = UnsafeMutablePointer<UInt64>.allocate(capacity: words)
        defer { written.deallocate() }
        written.initialize(repeating: 0, count: words)
        func write(_ page: Int, _ byte: UInt8?) {
            if let byte { (ram + page * 4096 + 17).storeBytes(of: byte, as: UInt8.self) }
            written[page / 64] |= 1 << UInt64(page % 64)
        }
        // Chunk 0 unwritten; chunk 1 written with data; chunk 2 written with zeros only; the short chunk written.
        write(per + 3, 0xAA); write(2 * per - 1, 0x55)
        write(2 * per + 7, nil)
        write(3 * per + 99, 0x01)

        let chunks = StateDigest.chunkCount(pages: pages)
        var fast = [UInt8](repeating: 0, count: chunks * 32)
        fast.withUnsafeMutableBytes { StateDigest.chunkHashes(ram, pages: pages, written: written, into: $0.baseAddress!) }

        // The definition: every page hashed as it is, then each chunk's page hashes.
        var pageHashes = [UInt8]()
        for p in 0..<pages { pageHashes += Self.sha(ram + p * 4096, 4096) }
        var kept = [UInt8](repeating: 0, count: chunks * 32)
        for c in 0..<chunks {
            let n = min(per, pages - c * per)
            let want = pageHashes.withUnsafeBytes { Self.sha($0.baseAddress! + c * per * 32, n * 32) }
            #expect(Array(fast[c * 32..<(c + 1) * 32]) == want, "chunk \(c)")
            // The primary's path (kept page hashes, `chunkHash`) agrees too.
            pageHashes.withUnsafeBytes { h in kept.withUnsafeMutableBytes {
                StateDigest.chunkHash(c, pageHashes: h.baseAddress!, pages: pages, into: $0.baseAddress! + c * 32)
            } }
        }
        #expect(kept == fast)
    }
}
