import Foundation
import Machine
import Testing

/// A secondary writes a seed's pages straight into a standby machine's RAM as they arrive.
@Suite(.serialized, .enabled(if: Fixture.kvmSkipReason == nil, "\(Fixture.kvmSkipReason ?? "")"))
struct SeedPagesTests {
    init() { if let why = Fixture.kvmSkipReason { print("MachineTests: \(why)") } }

    /// One RTC epoch for every machine here: the default (now, in seconds) is in the device state the seed
    /// digest covers, and two machines created across a second boundary would differ by it.
    func standby() throws -> StandbySession {
        try StandbySession(image: try Fixture.guest("hello"), config: MachineConfig(memoryMiB: 2, epochSeconds: 1_700_000_000), output: nil)
    }

    func pages(_ fills: [UInt8]) -> [UInt8] { fills.flatMap { repeatElement($0, count: 4096) } }

    func page(_ m: Machine, _ n: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: m.memory.base + n * 4096, count: 4096))
    }

    /// Pre-copy sends a page again when the guest wrote it after it was sent: the last copy is the one in RAM,
    /// and the seed digest reads it (a page written from user space is not in KVM's dirty log).
    @Test func theLastCopyOfAPageWinsAndTheSeedDigestSeesIt() throws {
        let s = try standby(), fresh = try standby()
        let before = try fresh.machine.seedDigest()
        try pages([0x11, 0x22]).withUnsafeBytes { try s.machine.writeSeedPages([300, 301], data: $0) }
        try pages([0xAB]).withUnsafeBytes { try s.machine.writeSeedPages([300], data: $0) }
        try [UInt8]().withUnsafeBytes { try s.machine.writeSeedPages([], data: $0) }
        #expect(page(s.machine, 300).allSatisfy { $0 == 0xAB })
        #expect(page(s.machine, 301).allSatisfy { $0 == 0x22 })
        let after = try s.machine.seedDigest()
        #expect(after != before, "the seed digest did not read the pages written from user space")
        try pages([0xAB, 0x22]).withUnsafeBytes { try fresh.machine.writeSeedPages([300, 301], data: $0) }
        #expect(try fresh.machine.seedDigest() == after, "the same pages in another order gave another digest")
    }

    @Test func aPageBeyondRAMOrAShortChunkIsNamedAndNothingIsWritten() throws {
        let s = try standby()
        let before = try s.machine.seedDigest()
        do { try pages([1, 1]).withUnsafeBytes { try s.machine.writeSeedPages([1, 512], data: $0) }; Issue.record("page 512 of 512 was accepted") } catch {
            #expect("\(error)".contains("page 512 is beyond RAM (512 pages)"), "\(error)")
        }
        do { try [UInt8](repeating: 1, count: 100).withUnsafeBytes { try s.machine.writeSeedPages([1], data: $0) }; Issue.record("a short chunk was accepted") } catch {
            #expect("\(error)".contains("100 bytes for 1 pages"), "\(error)")
        }
        #expect(page(s.machine, 1).allSatisfy { $0 == 0 })
        #expect(try s.machine.seedDigest() == before)
    }

    /// A diverged secondary's RAM serves its next machine: the same bytes, counted as written (the seed digest
    /// reads them), and the held pages name each non-zero page by hash.
    @Test func aNewMachineAdoptsRetainedRAMWithItsWrittenPages() throws {
        let old = try standby()
        try pages([0x11, 0, 0x33]).withUnsafeBytes { try old.machine.writeSeedPages([300, 301, 302], data: $0) }
        let digest = try old.machine.seedDigest()
        let ram = try old.machine.retainRAM()
        let held = ram.heldPages()
        #expect(held.numbers.contains(300) && held.numbers.contains(302) && !held.numbers.contains(301), "a zero page is not held: \(held.numbers)")
        #expect(Array(held.hashes[held.numbers.firstIndex(of: 300)! * 32..<held.numbers.firstIndex(of: 300)! * 32 + 32]) == StateDigest.sha256(pages([0x11])))
        let fresh = try standby()
        #expect(ram.fits(image: fresh.machine.image, config: fresh.machine.config))
        #expect(!ram.fits(image: fresh.machine.image, config: MachineConfig(memoryMiB: 4)))
        #expect(!ram.fits(image: try Fixture.guest("echo"), config: fresh.machine.config))
        let adopted = try StandbySession(image: fresh.machine.image, config: fresh.machine.config, output: nil, adopting: ram)
        #expect(page(adopted.machine, 300).allSatisfy { $0 == 0x11 } && page(adopted.machine, 302).allSatisfy { $0 == 0x33 })
        #expect(try adopted.machine.seedDigest() == digest)
        #expect(try fresh.machine.seedDigest() != digest)
        do { _ = try StandbySession(image: try Fixture.guest("echo"), config: fresh.machine.config, output: nil, adopting: ram); Issue.record("RAM of another image was adopted") } catch {
            #expect("\(error)".contains("cannot serve"), "\(error)")
        }
    }

    /// The hashes a secondary keeps as the seed arrives give the digest a pass over its RAM gives, for a new
    /// machine and for one that adopted kept RAM (its held hashes standing for the pages the seed did not send).
    @Test func seedHashesKeptOnArrivalGiveTheDigestOfRAM() throws {
        let fresh = try standby()
        let hashes = try SeedHashes(machine: fresh.machine, held: nil)
        for (numbers, fills) in [([UInt32(300), 301], [UInt8(0x11), 0x22]), ([300], [0]), ([7], [0x77])] {
            try pages(fills).withUnsafeBytes {
                try fresh.machine.writeSeedPages(numbers, data: $0)
                hashes.wrote(numbers, data: $0)
            }
        }
        #expect(try hashes.digest(fresh.machine) == fresh.machine.seedDigest())
        let ram = try fresh.machine.retainRAM()
        let held = ram.heldPages()
        let adopted = try StandbySession(image: fresh.machine.image, config: fresh.machine.config, output: nil, adopting: ram)
        let kept = try SeedHashes(machine: adopted.machine, held: held)
        #expect(try kept.digest(adopted.machine) == adopted.machine.seedDigest())
        try pages([0x55]).withUnsafeBytes {
            try adopted.machine.writeSeedPages([301], data: $0)
            kept.wrote([301], data: $0)
        }
        #expect(try kept.digest(adopted.machine) == adopted.machine.seedDigest())
    }
}
