import Machine
import Testing
@testable import Pair

/// The seed's wire parts, without processes (`MachineTests` writes a seed's pages into a machine's RAM).
@Suite struct SeedTests {
    /// A pages part as `Precopy.sendPending` builds it.
    func pagesPart(_ numbers: [UInt32], fill: (UInt32) -> UInt8) -> [UInt8] {
        var w = Wire(SeedPart.pages)
        w.u32(UInt32(numbers.count))
        for n in numbers { w.u32(n) }
        for n in numbers { w.raw(repeatElement(fill(n), count: 4096)) }
        return w.out
    }

    @Test func aPagesPartNamesItsPagesAndWhereTheirBytesLie() throws {
        let part = pagesPart([7, 3], fill: { UInt8($0) })
        let (n, range) = try SeedCodec.decodePages(part)
        #expect(n == [7, 3])
        #expect(range == (1 + 4 + 8)..<part.count)
        #expect(part[range].prefix(4096).allSatisfy { $0 == 7 } && part[range].suffix(4096).allSatisfy { $0 == 3 })
        let empty = try SeedCodec.decodePages(pagesPart([], fill: { _ in 0 }))
        #expect(empty.numbers.isEmpty && empty.data.isEmpty)
        var w = Wire(SeedPart.pages)
        w.u32(UInt32(seedPagesPerFrame + 1))
        do { _ = try SeedCodec.decodePages(w.out); Issue.record("an oversized chunk was accepted") } catch {
            #expect(error.description.contains("a page chunk of \(seedPagesPerFrame + 1) pages"), "\(error)")
        }
    }

    @Test func damagedPartsAreNamed() throws {
        let part = pagesPart([1, 2], fill: { _ in 9 })
        do { _ = try SeedCodec.decodePages(Array(part.dropLast())); Issue.record("a truncated part was accepted") } catch {
            #expect(error.description.contains("seed pages ends early"), "\(error)")
        }
        do { _ = try SeedCodec.decodePages(part + [0]); Issue.record("trailing bytes were accepted") } catch {
            #expect(error.description.contains("1 unexpected trailing bytes"), "\(error)")
        }
        var w = Wire(SeedPart.header)
        w.u16(SeedHeader.version - 1)
        do { _ = try SeedCodec.decodeHeader(w.out); Issue.record("an old seed version was accepted") } catch {
            #expect(error.description.contains("seed version \(SeedHeader.version - 1); this side speaks \(SeedHeader.version)"), "\(error)")
        }
    }

    /// The machine's shape crosses in the header, the bound's ceiling too: a survivor paces its sync points
    /// as its primary did.
    @Test func theHeaderRoundTripsTheMachinesShape() throws {
        let h = SeedHeader(config: MachineConfig(memoryMiB: 96, interruptLatencyUs: 700, maxInterruptLatencyUs: 25_000, epochSeconds: 1_700_000_000),
                           imageSHA256: [UInt8](repeating: 1, count: 32), cpuidSHA256: [UInt8](repeating: 2, count: 32),
                           image: [9, 9, 9], fenceID: "abc", fenceLocation: "/srv/fence")
        let body = SeedCodec.header(h)
        #expect(try SeedCodec.decodeHeader(body) == h)
    }

    @Test func theEndRoundTripsItsRunStateAndRefusesAnUnknownOne() throws {
        let end = SeedEnd(exit: 250, signature: 7, lastClock: 1_000, firstSequence: 3, totalPages: 9, vcpuState: [1, 2],
                          deviceState: [3], seedDigest: [UInt8](repeating: 5, count: 32), protectionID: 42, runState: .halted,
                          lineHead: Array("REP 7 ha".utf8))
        var bytes = SeedCodec.end(end)
        #expect(try SeedCodec.decodeEnd(bytes) == end)
        bytes[bytes.count - 13] = 0  // 0 is never a run state (the line head's length and 8 bytes follow it)
        do { _ = try SeedCodec.decodeEnd(bytes); Issue.record("run state 0 was accepted") } catch {
            #expect(error.description.contains("unknown run state 0"), "\(error)")
        }
    }

    /// A page hash whose bytes are all `v`.
    func hash(_ v: UInt8) -> [UInt8] { [UInt8](repeating: v, count: 32) }

    @Test func heldPagesTravelInPartsAndComeBackWhole() throws {
        let many = HeldPages(numbers: (0..<UInt32(heldPagesPerFrame + 3)).map { $0 * 2 },
                             hashes: (0..<heldPagesPerFrame + 3).flatMap { hash(UInt8(truncatingIfNeeded: $0)) })
        for held in [HeldPages(), HeldPages(numbers: [4, 9], hashes: hash(1) + hash(2)), many] {
            let parts = SeedCodec.held(held)
            #expect(parts.count == max(1, (held.count + heldPagesPerFrame - 1) / heldPagesPerFrame))
            var back = HeldPages()
            for (i, p) in parts.enumerated() {
                #expect(try SeedCodec.decodeHeld(p, into: &back, pages: 1 << 20) == (i == parts.count - 1))
            }
            #expect(back == held)
        }
    }

    @Test func aBadHeldPartIsNamedAsTheSecondarys() throws {
        func refused(_ part: [UInt8], pages: Int = 100, after: HeldPages = HeldPages(), _ words: String) {
            var h = after
            do { _ = try SeedCodec.decodeHeld(part, into: &h, pages: pages); Issue.record("accepted: \(words)") } catch {
                #expect(error.description.hasPrefix("bad answer to the seed from the secondary: ") && error.description.contains(words), "\(error)")
            }
        }
        refused(SeedCodec.held(HeldPages(numbers: [5, 100], hashes: hash(1) + hash(2)))[0], "held page 100 is beyond RAM (100 pages)")
        refused(SeedCodec.held(HeldPages(numbers: [7, 7], hashes: hash(1) + hash(2)))[0], "held page 7 after page 7")
        refused(SeedCodec.held(HeldPages(numbers: [3], hashes: hash(1)))[0], after: HeldPages(numbers: [8], hashes: hash(0)), "held page 3 after page 8")
        refused(Array(SeedCodec.held(HeldPages(numbers: [3], hashes: hash(1)))[0].dropLast()), "held pages ends early")
        var flags = SeedCodec.held(HeldPages())[0]
        flags[1] = 0x81
        refused(flags, "unknown held flags 0x81")
        refused(SeedCodec.end(SeedEnd(exit: 1, signature: 1, lastClock: 1, firstSequence: 0, totalPages: 0, vcpuState: [], deviceState: [],
                                      seedDigest: hash(0), protectionID: 1, runState: .running)), "expected the hashes of the pages it holds, got part 3")
    }

    /// The primary sends a page when its hash is not the held one, and a page the secondary does not hold is zero there.
    @Test func comparingWithHeldPagesFindsEveryDifferenceAndOnlyThose() throws {
        let zero = StateDigest.sha256([UInt8](repeating: 0, count: 4096))
        // This side: pages 0 and 2 written, 1 and 3 zero, 70 written.
        let pages = 130
        var mine = [UInt8]()
        for p in 0..<pages { mine += [0, 2, 70].contains(p) ? hash(UInt8(p)) : zero }
        // The secondary: page 0 the same, page 1 non-zero (this side's is zero), page 2 different, 70 not held (zero there).
        let held = HeldPages(numbers: [0, 1, 2], hashes: hash(0) + hash(9) + hash(99))
        var differ = [UInt64](repeating: ~0, count: 3)
        let equal = mine.withUnsafeBytes { m in differ.withUnsafeMutableBufferPointer { held.compare(m.baseAddress!, pages: pages, differ: $0.baseAddress!) } }
        #expect(equal == 1)
        #expect(differ == [1 << 1 | 1 << 2, 1 << (70 - 64), 0])
    }
}
