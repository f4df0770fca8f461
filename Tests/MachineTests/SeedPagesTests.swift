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
}
