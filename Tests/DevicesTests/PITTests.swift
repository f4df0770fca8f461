import Testing
@testable import Devices

func makePIT() -> (PIT, FakeInputs, RecordingController) {
    let inputs = FakeInputs(), ctl = RecordingController()
    return (PIT(inputs: inputs, irq0: IRQLine(ctl, 0)), inputs, ctl)
}

/// The time at which `ticks` input clocks have elapsed.
func at(_ ticks: UInt64) -> UInt64 { PIT.nanos(ticks) }

func latchRead(_ p: PIT, _ ch: UInt16) -> UInt16 {
    p.out8(0x43, UInt8(ch) << 6)
    let lo = UInt16(p.in8(0x40 + ch)), hi = UInt16(p.in8(0x40 + ch))
    return hi << 8 | lo
}

func status(_ p: PIT, _ ch: UInt8) -> UInt8 {
    p.out8(0x43, 0xE0 | 2 << ch)  // read-back, status only
    return p.in8(0x40 + UInt16(ch))
}

@Suite struct PITTests {
    @Test func mode2CountsAndIRQ0() {
        let (p, t, ctl) = makePIT()
        p.out8(0x43, 0x34)  // ch0, lohi, mode 2
        #expect(t.nowCalls == 0)  // a control word needs no time
        p.out8(0x40, 0xE8); p.out8(0x40, 0x03)  // 1000
        #expect(p.nextDeadline() == at(1000))
        t.time = at(300)
        #expect(latchRead(p, 0) == 700)
        t.time = at(1000)
        #expect(latchRead(p, 0) == 1000)  // reloaded
        t.time = at(1999)
        #expect(latchRead(p, 0) == 1)
        // OUT low only while the count is 1.
        #expect(status(p, 0) & 0x80 == 0)
        t.time = at(2000)
        #expect(status(p, 0) & 0x80 != 0)
        // Several periods crossed: a single edge, then the next boundary.
        p.advance(to: at(3500))
        #expect(ctl.rises(0) == 1)
        #expect(p.nextDeadline() == at(4000))
        p.advance(to: at(3999))
        #expect(ctl.rises(0) == 1)
        p.advance(to: at(4000))
        #expect(ctl.rises(0) == 2)
        #expect(ctl.levels[0] == false)  // pulses leave the line low
    }

    @Test func mode0OneShot() {
        let (p, t, ctl) = makePIT()
        p.out8(0x43, 0x30)  // ch0, lohi, mode 0
        #expect(status(p, 0) == 0x70)  // OUT low, null count, lohi, mode 0
        p.out8(0x40, 100); p.out8(0x40, 0)
        t.time = at(40)
        #expect(latchRead(p, 0) == 60)
        #expect(status(p, 0) & 0x80 == 0)
        #expect(p.nextDeadline() == at(100))
        t.time = at(100)
        #expect(status(p, 0) & 0x80 != 0)
        p.advance(to: at(100))
        #expect(ctl.rises(0) == 1)
        #expect(p.nextDeadline() == nil)
        t.time = at(101)
        #expect(latchRead(p, 0) == 0xFFFF)  // keeps counting down through the wrap
        p.advance(to: at(100_000))
        #expect(ctl.rises(0) == 1)
    }

    @Test func mode3SquareWaveOnChannel2() {
        let (p, t, _) = makePIT()
        p.out8(0x61, 0x01)  // gate 2 on, speaker off
        p.out8(0x43, 0xB6)  // ch2, lohi, mode 3
        p.out8(0x42, 10); p.out8(0x42, 0)
        #expect(p.in8(0x61) & 0x20 != 0)  // OUT2 high in the first half
        t.time = at(1)
        #expect(latchRead(p, 2) == 8)
        t.time = at(5)
        #expect(p.in8(0x61) & 0x20 == 0)
        #expect(latchRead(p, 2) == 10)
        t.time = at(10)
        #expect(p.in8(0x61) & 0x23 == 0x21)
        // Gate low forces OUT high and stops the count.
        t.time = at(16)
        p.out8(0x61, 0x00)
        t.time = at(100)
        #expect(p.in8(0x61) & 0x21 == 0x20)
        #expect(status(p, 2) == 0x80 | 0x30 | 0x06)
    }

    @Test func mode0GatedByPort61() {
        let (p, t, _) = makePIT()
        p.out8(0x61, 0x00)
        p.out8(0x43, 0xB0)  // ch2, lohi, mode 0 (Linux TSC calibration)
        p.out8(0x42, 0x00); p.out8(0x42, 0x01)  // 256
        t.time = at(50)
        #expect(latchRead(p, 2) == 256)  // gate low: not counting
        p.out8(0x61, 0x01)
        t.time = at(150)
        #expect(latchRead(p, 2) == 156)
        #expect(p.in8(0x61) & 0x20 == 0)
        t.time = at(306)
        #expect(p.in8(0x61) & 0x20 != 0)  // OUT2 went high at terminal count
    }

    @Test func latchHeldWhileCounterMoves() {
        let (p, t, _) = makePIT()
        p.out8(0x43, 0x34); p.out8(0x40, 0xE8); p.out8(0x40, 0x03)
        t.time = at(100)
        p.out8(0x43, 0x00)  // latch ch0
        let calls = t.nowCalls
        t.time = at(400)
        p.out8(0x43, 0x00)  // a second latch before reading is ignored
        let lo = p.in8(0x40)
        t.time = at(600)
        let hi = p.in8(0x40)
        #expect(UInt16(hi) << 8 | UInt16(lo) == 900)
        #expect(t.nowCalls == calls)  // latched reads do not sample the clock
        // Unlatched reads see the live counter.
        let lo2 = UInt16(p.in8(0x40)), hi2 = UInt16(p.in8(0x40))
        #expect(hi2 << 8 | lo2 == 400)
    }

    @Test func accessModesAndBCD() {
        let (p, t, _) = makePIT()
        p.out8(0x43, 0x14)  // ch0, lobyte only, mode 2
        p.out8(0x40, 200)
        t.time = at(50)
        p.out8(0x43, 0x00)
        #expect(p.in8(0x40) == 150)
        p.out8(0x43, 0x24)  // hibyte only
        p.out8(0x40, 0x02)  // 512
        t.time = at(50 + 256)
        #expect(p.in8(0x40) == 0x01)
        p.out8(0x43, 0x35)  // lohi, mode 2, BCD
        p.out8(0x40, 0x00); p.out8(0x40, 0x10)  // 1000 decimal
        t.time += at(1) + 1
        #expect(latchRead(p, 0) == 0x0999)
        #expect(status(p, 0) & 0x01 == 1)
    }

    @Test func readBackCountAndStatus() {
        let (p, t, _) = makePIT()
        p.out8(0x43, 0x74)  // ch1, lohi, mode 2
        p.out8(0x41, 0x10); p.out8(0x41, 0x00)
        t.time = at(3)
        p.out8(0x43, 0xC4)  // read-back ch1, count and status
        #expect(p.in8(0x41) == 0x80 | 0x30 | 0x04)  // status first
        #expect(p.in8(0x41) == 13)
        #expect(p.in8(0x41) == 0)
    }

    @Test func port61RefreshToggle() {
        let (p, t, _) = makePIT()
        t.time = 0
        let a = p.in8(0x61) & 0x10
        t.time = 15_085
        let b = p.in8(0x61) & 0x10
        #expect(a != b)
        #expect(p.in8(0x43) == 0xFF)
    }

    @Test func saveRestore() throws {
        let (p, t, _) = makePIT()
        p.out8(0x43, 0x34); p.out8(0x40, 0xA9); p.out8(0x40, 0x04)
        p.out8(0x61, 0x03); p.out8(0x43, 0xB6); p.out8(0x42, 0x33)
        t.time = at(77)
        p.out8(0x43, 0x00)
        _ = p.in8(0x40)
        let (q, _, _) = makePIT()
        let (a, b) = try roundTrip(p, q, name: "PIT")
        #expect(a == b)
        #expect(q.nextDeadline() == p.nextDeadline())
        #expect(q.in8(0x40) == p.in8(0x40))
        #expect(truncatedFails(p, makePIT().0, name: "PIT"))
    }
}
