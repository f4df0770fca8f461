import Testing
@testable import Devices

func makeRTC(ram: UInt64 = 256 << 20) -> (RTC, FakeInputs, RecordingController) {
    let inputs = FakeInputs(), ctl = RecordingController()
    return (RTC(inputs: inputs, irq8: IRQLine(ctl, 8), ramSize: ram), inputs, ctl)
}

func cmos(_ r: RTC, _ i: UInt8) -> UInt8 { r.out8(0x70, i); return r.in8(0x71) }
func setCMOS(_ r: RTC, _ i: UInt8, _ v: UInt8) { r.out8(0x70, i); r.out8(0x71, v) }

@Suite struct RTCTests {
    @Test func bcdTimeFromEpochAndClock() {
        let (r, t, _) = makeRTC()
        // 2024-03-15 13:45:30 UTC, a Friday.
        #expect(cmos(r, 0) == 0x30 && cmos(r, 2) == 0x45 && cmos(r, 4) == 0x13)
        #expect(cmos(r, 6) == 0x06 && cmos(r, 7) == 0x15 && cmos(r, 8) == 0x03)
        #expect(cmos(r, 9) == 0x24 && cmos(r, 0x32) == 0x20)
        t.time = 2_500_000_000
        #expect(cmos(r, 0) == 0x32)
        #expect(cmos(r, 0x0D) == 0x80)
    }

    @Test func binaryAnd12Hour() {
        let (r, _, _) = makeRTC()
        setCMOS(r, 0x0B, 0x06)  // binary, 24 h
        #expect(cmos(r, 0) == 30 && cmos(r, 2) == 45 && cmos(r, 4) == 13 && cmos(r, 9) == 24)
        setCMOS(r, 0x0B, 0x04)  // binary, 12 h
        #expect(cmos(r, 4) == 0x81)
        setCMOS(r, 0x0B, 0x00)  // BCD, 12 h
        #expect(cmos(r, 4) == 0x81)
        let (m, _, _) = makeRTC()
        setCMOS(m, 0x0B, 0x00)
        m.out8(0x70, 0x04)
        #expect(m.in8(0x71) == 0x81)
    }

    @Test func uipWindow() {
        let (r, t, _) = makeRTC()
        t.time = 500_000_000
        #expect(cmos(r, 0x0A) == 0x26)
        t.time = 1_000_000_000 - 244_000
        #expect(cmos(r, 0x0A) == 0xA6)
        t.time = 999_999_999
        #expect(cmos(r, 0x0A) & 0x80 != 0)
        t.time = 1_000_000_000
        #expect(cmos(r, 0x0A) & 0x80 == 0)
    }

    @Test func updateInterruptAndRegisterC() {
        let (r, t, ctl) = makeRTC()
        setCMOS(r, 0x0B, 0x12)  // UIE, 24 h, BCD
        #expect(r.nextDeadline() == 1_000_000_000)
        r.advance(to: 999_999_999)
        #expect(!ctl.levels[8])
        r.advance(to: 1_000_000_000)
        #expect(ctl.levels[8])
        t.time = 1_000_000_100
        #expect(cmos(r, 0x0C) == 0xD0)  // IRQF | UF, and PF: the 1024 Hz flag runs whatever PIE says
        #expect(!ctl.levels[8])
        #expect(cmos(r, 0x0C) == 0x00)  // cleared on read
        #expect(r.nextDeadline() == 2_000_000_000)
        // Flags are set even without the enable, but IRQF is not.
        setCMOS(r, 0x0B, 0x02)
        t.time = 3_000_000_000
        #expect(cmos(r, 0x0C) == 0x50)
        #expect(ctl.rises(8) == 1)
    }

    @Test func periodic1024Hz() {
        let (r, t, ctl) = makeRTC()
        #expect(r.nextDeadline() == nil)
        setCMOS(r, 0x0B, 0x42)  // PIE
        #expect(r.nextDeadline() == 976_563)  // 1/1024 s, rounded up
        r.advance(to: 976_563)
        #expect(ctl.levels[8])
        t.time = 976_563
        #expect(cmos(r, 0x0C) == 0xC0)
        #expect(r.nextDeadline() == 1_953_125)
        // Rate 15 (2 Hz), and rates 1, 2 alias 8, 9 (256 Hz, 128 Hz).
        setCMOS(r, 0x0A, 0x2F)
        #expect(r.nextDeadline() == 500_000_000)
        setCMOS(r, 0x0A, 0x21)
        #expect(r.nextDeadline() == 3_906_250)
        setCMOS(r, 0x0A, 0x20)
        #expect(r.nextDeadline() == nil)
    }

    @Test func alarm() {
        let (r, t, ctl) = makeRTC()
        setCMOS(r, 0x01, 0x35); setCMOS(r, 0x03, 0x45); setCMOS(r, 0x05, 0xC0)  // hh:45:35, any hour
        setCMOS(r, 0x0B, 0x22)
        #expect(r.nextDeadline() == 5_000_000_000)
        r.advance(to: 5_000_000_000)
        #expect(ctl.levels[8])
        t.time = 5_000_000_000
        #expect(cmos(r, 0x0C) == 0xF0)  // IRQF | PF | AF | UF
        #expect(r.nextDeadline() == 3_605_000_000_000)
    }

    @Test func guestSetTimePersistsAndSETFreezes() {
        let (r, t, _) = makeRTC()
        setCMOS(r, 0x0B, 0x82)  // SET
        setCMOS(r, 0x04, 0x05); setCMOS(r, 0x02, 0x06); setCMOS(r, 0x00, 0x07)
        setCMOS(r, 0x09, 0x99); setCMOS(r, 0x32, 0x19)
        t.time = 5_000_000_000
        #expect(cmos(r, 0) == 0x07)  // frozen while SET
        #expect(cmos(r, 0x0A) & 0x80 == 0)
        t.time = 10_000_000_000
        setCMOS(r, 0x0B, 0x02)
        t.time = 12_500_000_000
        #expect(cmos(r, 0) == 0x09 && cmos(r, 2) == 0x06 && cmos(r, 4) == 0x05)
        #expect(cmos(r, 9) == 0x99 && cmos(r, 0x32) == 0x19 && cmos(r, 8) == 0x03)
        // The new time survives save/restore.
        let (q, qt, _) = makeRTC()
        let (a, b) = try! roundTrip(r, q, name: "RTC")
        #expect(a == b)
        qt.time = 13_000_000_000
        #expect(cmos(q, 0) == 0x10)
    }

    @Test func memorySizeAndNMIBit() {
        let (r, _, _) = makeRTC(ram: 256 << 20)
        #expect(cmos(r, 0x34) == 0x00 && cmos(r, 0x35) == 0x0F)  // (256-16) MiB / 64 KiB = 0x0F00
        #expect(cmos(r, 0x15) == 0x80 && cmos(r, 0x16) == 0x02)  // 640 KiB
        let (big, _, _) = makeRTC(ram: 6 << 30)
        #expect(cmos(big, 0x5B) == 0x00 && cmos(big, 0x5C) == 0xA0 && cmos(big, 0x5D) == 0x00)
        r.out8(0x70, 0x8F)
        #expect(r.nmiMasked)
        r.out8(0x71, 0x42)
        #expect(cmos(r, 0x0F) == 0x42)
        #expect(r.in8(0x70) == 0xFF)
    }

    @Test func garbageGuestTimeDoesNotTrap() {
        let (r, t, _) = makeRTC()
        setCMOS(r, 0x0B, 0x82)
        setCMOS(r, 0x32, 0x19); setCMOS(r, 0x09, 0x69); setCMOS(r, 0x08, 0xFF); setCMOS(r, 0x04, 0xFF)
        setCMOS(r, 0x0B, 0x02)
        t.time = 1_000_000_000
        #expect(cmos(r, 0x32) == 0x19 && cmos(r, 0x09) == 0x70)  // clamped to 1970
        setCMOS(r, 0x0B, 0x06)
        #expect(cmos(r, 0x32) == 19)
    }

    @Test func stateErrors() {
        let (r, _, _) = makeRTC()
        #expect(truncatedFails(r, makeRTC().0, name: "RTC"))
    }
}
