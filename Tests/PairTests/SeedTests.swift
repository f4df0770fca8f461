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

    @Test func theEndRoundTripsItsRunStateAndRefusesAnUnknownOne() throws {
        let end = SeedEnd(exit: 250, signature: 7, lastClock: 1_000, firstSequence: 3, totalPages: 9, vcpuState: [1, 2],
                          deviceState: [3], seedDigest: [UInt8](repeating: 5, count: 32), protectionID: 42, runState: .halted)
        var bytes = SeedCodec.end(end)
        #expect(try SeedCodec.decodeEnd(bytes) == end)
        bytes[bytes.count - 1] = 0  // 0 is never a run state
        do { _ = try SeedCodec.decodeEnd(bytes); Issue.record("run state 0 was accepted") } catch {
            #expect(error.description.contains("unknown run state 0"), "\(error)")
        }
    }
}
