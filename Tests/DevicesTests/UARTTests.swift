import Testing
@testable import Devices

func makeUART() -> (UART, FakeSink, RecordingController) {
    let sink = FakeSink(), ctl = RecordingController()
    return (UART(base: 0x3F8, irq: IRQLine(ctl, 4), sink: sink), sink, ctl)
}

@Suite struct UARTTests {
    @Test func linux8250Probe() {
        let (u, _, _) = makeUART()
        // IER test.
        let saved = u.in8(0x3F9)
        u.out8(0x3F9, 0); #expect(u.in8(0x3F9) & 0x0F == 0)
        u.out8(0x3F9, 0x0F); #expect(u.in8(0x3F9) & 0x0F == 0x0F)
        u.out8(0x3F9, saved)
        // Loopback test: RTS|OUT2 looped to CTS|DCD.
        let mcr = u.in8(0x3FC)
        u.out8(0x3FC, 0x10 | 0x0A)
        #expect(u.in8(0x3FE) & 0xF0 == 0x90)
        u.out8(0x3FC, mcr)
        // FIFO detection.
        u.out8(0x3FB, 0xBF); u.out8(0x3FA, 0); u.out8(0x3FB, 0)
        u.out8(0x3FA, 0x01)
        #expect(u.in8(0x3FA) >> 6 == 3)
        // No EFR (16650) and no 64-byte FIFO (16750).
        u.out8(0x3FB, 0xBF); #expect(u.in8(0x3FA) != 0)
        u.out8(0x3FB, 0x80); u.out8(0x3FA, 0x21); #expect(u.in8(0x3FA) & 0x20 == 0)
        u.out8(0x3FB, 0x00)
        // Scratch register.
        u.out8(0x3FF, 0xA5); #expect(u.in8(0x3FF) == 0xA5)
        u.out8(0x3FF, 0x5A); #expect(u.in8(0x3FF) == 0x5A)
        // IER keeps only its four bits (not an XScale UART).
        u.out8(0x3F9, 0x40); #expect(u.in8(0x3F9) == 0)
    }

    @Test func divisorLatch() {
        let (u, sink, _) = makeUART()
        u.out8(0x3FB, 0x83)
        u.out8(0x3F8, 0x01); u.out8(0x3F9, 0x00)
        #expect(u.in8(0x3F8) == 0x01 && u.in8(0x3F9) == 0x00)
        u.out8(0x3FB, 0x03)
        #expect(u.in8(0x3FB) == 0x03)
        #expect(sink.bytes.isEmpty)  // divisor writes are not data
        u.out8(0x3F8, 0x41)
        #expect(sink.bytes == [0x41])
        #expect(u.in8(0x3FD) & 0x60 == 0x60)  // THRE and TEMT stay set
    }

    @Test func threInterruptRules() {
        let (u, sink, ctl) = makeUART()
        u.out8(0x3FC, 0x0B)  // DTR, RTS, OUT2
        #expect(u.in8(0x3FA) == 0x01)
        u.out8(0x3F9, 0x02)  // THRI 0->1 with THR empty
        #expect(ctl.levels[4])
        #expect(u.in8(0x3FA) == 0x02)  // reading IIR acknowledges THRE
        #expect(!ctl.levels[4])
        #expect(u.in8(0x3FA) == 0x01)
        u.out8(0x3F8, 0x68)
        #expect(sink.bytes == [0x68])
        #expect(ctl.levels[4])  // the write completed: THR empty again
        u.out8(0x3F8, 0x69)  // a write also clears it before re-raising
        #expect(u.in8(0x3FA) == 0x02)
        // Linux's THRE-reassert test: IER 0 then THRI again raises it again.
        u.out8(0x3F9, 0x00); u.out8(0x3F9, 0x02)
        #expect(u.in8(0x3FA) == 0x02)
        u.out8(0x3F9, 0x00)
        #expect(!ctl.levels[4])
    }

    @Test func rxFIFOTriggerAndTimeout() {
        let (u, _, ctl) = makeUART()
        u.out8(0x3FC, 0x08)
        u.out8(0x3FA, 0xC7)  // FIFO on, reset both, trigger 14
        u.out8(0x3F9, 0x01)  // RDI
        #expect(u.rxSpace == 16)
        for b in 0..<3 { u.receive(UInt8(b)) }
        #expect(u.in8(0x3FA) == 0xCC)  // below trigger: character timeout
        #expect(ctl.levels[4])
        for b in 3..<14 { u.receive(UInt8(b)) }
        #expect(u.in8(0x3FA) == 0xC4)
        #expect(u.rxSpace == 2)
        for b in 0..<14 { #expect(u.in8(0x3F8) == UInt8(b)) }
        #expect(u.in8(0x3FD) & 0x01 == 0)
        #expect(u.in8(0x3FA) == 0xC1)
        #expect(!ctl.levels[4])
        // Trigger level 4.
        u.out8(0x3FA, 0x41)
        for b in 0..<4 { u.receive(UInt8(b)) }
        #expect(u.in8(0x3FA) == 0xC4)
        // FIFO off: one byte is a "full" receiver.
        u.out8(0x3FA, 0x00)
        #expect(u.rxSpace == 1)
        u.receive(7)
        #expect(u.in8(0x3FA) == 0x04)
    }

    @Test func overrun() {
        let (u, _, ctl) = makeUART()
        u.out8(0x3FC, 0x08); u.out8(0x3FA, 0x01); u.out8(0x3F9, 0x04)  // RLSI only
        for b in 0..<17 { u.receive(UInt8(b)) }
        #expect(ctl.levels[4])
        #expect(u.in8(0x3FA) == 0xC6)
        #expect(u.in8(0x3FD) & 0x03 == 0x03)  // OE | DR
        #expect(u.in8(0x3FD) & 0x02 == 0)     // OE clears on read
        #expect(!ctl.levels[4])
        for b in 0..<16 { #expect(u.in8(0x3F8) == UInt8(b)) }  // the 17th byte was dropped
    }

    @Test func loopbackAndOut2Gating() {
        let (u, sink, ctl) = makeUART()
        u.out8(0x3F9, 0x01)
        u.receive(0x33)
        #expect(!ctl.levels[4])      // pending, but OUT2 is off
        #expect(u.in8(0x3FA) == 0x04)
        u.out8(0x3FC, 0x08)
        #expect(ctl.levels[4])
        _ = u.in8(0x3F8)
        #expect(!ctl.levels[4])
        u.out8(0x3FC, 0x18)          // loopback + OUT2
        #expect(u.rxSpace == 0)
        u.out8(0x3F8, 0x55)
        #expect(sink.bytes.isEmpty)
        #expect(u.in8(0x3F8) == 0x55)
        // MSR follows the looped outputs with delta bits.
        _ = u.in8(0x3FE)
        u.out8(0x3FC, 0x1F)
        #expect(u.in8(0x3FE) == 0xF3)  // CTS DSR RI DCD, DCTS DDSR
        u.out8(0x3FC, 0x1B)            // RI falls
        #expect(u.in8(0x3FE) == 0xB4)  // TERI
        #expect(u.in8(0x3FE) == 0xB0)
    }

    @Test func saveRestore() throws {
        let (u, _, _) = makeUART()
        u.out8(0x3FA, 0x81); u.out8(0x3FC, 0x0B); u.out8(0x3F9, 0x03); u.out8(0x3FF, 0x12)
        for b in 0..<5 { u.receive(UInt8(b)) }
        _ = u.in8(0x3F8)
        let (q, _, _) = makeUART()
        let (a, b) = try roundTrip(u, q, name: "UART")
        #expect(a == b)
        #expect(q.in8(0x3F8) == 1)
        #expect(truncatedFails(u, makeUART().0, name: "UART"))
    }
}

@Suite struct BusAndSetTests {
    @Test func unknownPortsReportedOnce() {
        var seen: [(UInt16, Bool)] = []
        let bus = PortBus { seen.append(($0, $1)) }
        let d = DebugExit()
        try! bus.map(0xF4...0xF4, to: d)
        #expect(bus.read(port: 0x80, size: 1) == 0xFF)
        #expect(bus.read(port: 0x80, size: 2) == 0xFFFF)
        bus.write(port: 0x80, size: 1, value: 0)
        #expect(bus.read(port: 0x81, size: 4) == 0xFFFF_FFFF)
        #expect(seen.map(\.0) == [0x80, 0x81] && seen.map(\.1) == [false, false])
        bus.write(port: 0xF4, size: 4, value: 0x1234_5603)
        #expect(d.exitRequested && d.exitStatus == 0x03 && d.qemuExitCode == 7)
        #expect(bus.read(port: 0xF4, size: 1) == 0xFF)
        #expect(throws: PortBus.MapError.overlap(port: 0xF4)) { try bus.map(0xF0...0xF7, to: DebugExit()) }
    }

    @Test func deviceSetWiringAndState() throws {
        let inputs = FakeInputs(), sink = FakeSink()
        let set = DeviceSet(inputs: inputs, serial: sink, ramSize: 128 << 20)
        let bus = set.bus
        for (p, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0xA0, 0x11), (0xA1, 0x28),
                       (0xA1, 0x02), (0xA1, 0x01), (0x21, 0x00), (0xA1, 0x00)] as [(UInt16, UInt32)] {
            bus.write(port: p, size: 1, value: v)
        }
        bus.write(port: 0x43, size: 1, value: 0x34)
        bus.write(port: 0x40, size: 1, value: 0xA9); bus.write(port: 0x40, size: 1, value: 0x04)  // 1193: ~1 ms
        #expect(set.nextDeadline() == PIT.nanos(1193))
        set.advance(to: PIT.nanos(1193))
        #expect(set.pic.interruptPending)
        #expect(set.pic.acknowledge() == 0x20)
        bus.write(port: 0x20, size: 1, value: 0x20)  // EOI
        bus.write(port: 0x3F8, size: 1, value: 0x4F)
        #expect(sink.bytes == [0x4F])
        // RTC through the bus, on IRQ 8 via the slave.
        bus.write(port: 0x70, size: 1, value: 0x0B); bus.write(port: 0x71, size: 1, value: 0x42)
        set.advance(to: 976_563)
        #expect(set.pic.acknowledge() == 0x28)

        let bytes = set.stateBytes()
        let other = DeviceSet(inputs: FakeInputs(), serial: FakeSink(), ramSize: 128 << 20)
        try other.restoreState(bytes)
        #expect(other.stateBytes() == bytes)
        #expect(other.nextDeadline() == set.nextDeadline())

        let before = other.stateBytes()
        #expect(throws: StateError.self) { try other.restoreState(Array(bytes.dropLast())) }
        #expect(throws: StateError.badVersion(device: "devices", found: 2)) { try other.restoreState([2] + bytes.dropFirst()) }
        #expect(throws: StateError.badValue(device: "devices", field: "length")) { try other.restoreState(bytes + [0]) }
        #expect(other.stateBytes() == before)  // failed restores leave the state alone
    }
}
