import Testing
@testable import Pair

/// The seed's wire parts and the secondary's staging of pre-copied pages, without processes.
@Suite struct SeedTests {
    /// A pages part as `Precopy.sendPending` builds it.
    func pagesPart(_ numbers: [UInt32], fill: (UInt32) -> UInt8) -> [UInt8] {
        var w = Wire(SeedPart.pages)
        w.u32(UInt32(numbers.count))
        for n in numbers { w.u32(n) }
        for n in numbers { w.raw(repeatElement(fill(n), count: 4096)) }
        return w.out
    }

    @Test func theLastCopyOfAPageWinsAndEveryCopyIsCounted() throws {
        let pages = try SeedPages(memoryMiB: 2)
        var (n, d) = try SeedCodec.decodePages(pagesPart([7, 3], fill: { UInt8($0) }))
        try pages.add(numbers: n, data: d)
        (n, d) = try SeedCodec.decodePages(pagesPart([7], fill: { _ in 0xAB }))   // written again after it was sent
        try pages.add(numbers: n, data: d)
        (n, d) = try SeedCodec.decodePages(pagesPart([], fill: { _ in 0 }))
        try pages.add(numbers: n, data: d)
        #expect(pages.received == 3)
        let (numbers, data) = pages.collect()
        #expect(numbers == [3, 7])
        #expect(data.count == 2 * 4096)
        #expect(data[0..<4096].allSatisfy { $0 == 3 })
        #expect(data[4096...].allSatisfy { $0 == 0xAB })
    }

    @Test func aPageBeyondRAMIsNamed() throws {
        let pages = try SeedPages(memoryMiB: 2)   // 512 pages
        let (n, d) = try SeedCodec.decodePages(pagesPart([1, 512], fill: { _ in 1 }))
        #expect(throws: SeedError.self) { try pages.add(numbers: n, data: d) }
        do { try pages.add(numbers: n, data: d) } catch { #expect(error.description.contains("page 512 is beyond RAM (512 pages)")) }
        #expect(pages.received == 0)
        do { try pages.add(numbers: [1], data: [0]); Issue.record("a chunk short of its pages was accepted") } catch {
            #expect(error.description.contains("1 bytes for 1 pages"), "\(error)")
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
        #expect(throws: SeedError.self) { try SeedPages(memoryMiB: 1) }
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
