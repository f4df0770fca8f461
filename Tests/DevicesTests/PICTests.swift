import Testing
@testable import Devices

/// The Linux/SeaBIOS init: vectors 0x20/0x28, cascade on IRQ2, 8086 mode, all unmasked.
func initializedPIC(autoEOI: Bool = false) -> PIC {
    let p = PIC()
    let icw4: UInt8 = autoEOI ? 0x03 : 0x01
    p.out8(0x20, 0x11); p.out8(0x21, 0x20); p.out8(0x21, 0x04); p.out8(0x21, icw4)
    p.out8(0xA0, 0x11); p.out8(0xA1, 0x28); p.out8(0xA1, 0x02); p.out8(0xA1, icw4)
    p.out8(0x21, 0x00); p.out8(0xA1, 0x00)
    return p
}

func edge(_ p: PIC, _ irq: Int) { p.setIRQ(irq, level: true); p.setIRQ(irq, level: false) }
func isr(_ p: PIC, master: Bool = true) -> UInt8 {
    let base: UInt16 = master ? 0x20 : 0xA0
    p.out8(base, 0x0B); defer { p.out8(base, 0x0A) }
    return p.in8(base)
}

@Suite struct PICTests {
    @Test func initRemapAndAck() {
        let p = initializedPIC()
        #expect(!p.interruptPending)
        edge(p, 1)
        #expect(p.interruptPending)
        #expect(p.in8(0x20) == 0x02)  // IRR
        #expect(p.acknowledge() == 0x21)
        #expect(!p.interruptPending)
        #expect(isr(p) == 0x02)
        p.out8(0x20, 0x20)  // non-specific EOI
        #expect(isr(p) == 0)
        #expect(p.in8(0x21) == 0)  // IMR
    }

    @Test func priorityAndNesting() {
        let p = initializedPIC()
        edge(p, 3); edge(p, 1)
        #expect(p.acknowledge() == 0x21)
        #expect(!p.interruptPending)  // IRQ3 waits: lower priority than IRQ1 in service
        edge(p, 0)
        #expect(p.interruptPending)   // IRQ0 nests above IRQ1
        #expect(p.acknowledge() == 0x20)
        p.out8(0x20, 0x20)            // EOI clears IRQ0 (highest in service)
        #expect(isr(p) == 0x02)
        p.out8(0x20, 0x20)
        #expect(p.acknowledge() == 0x23)
    }

    @Test func masking() {
        let p = initializedPIC()
        p.out8(0x21, 0x02)
        edge(p, 1)
        #expect(!p.interruptPending)
        p.out8(0x21, 0x00)
        #expect(p.interruptPending)
        #expect(p.acknowledge() == 0x21)
    }

    @Test func specificEOIAndRotation() {
        let p = initializedPIC()
        edge(p, 0); #expect(p.acknowledge() == 0x20)
        p.out8(0x20, 0x60)  // specific EOI IRQ0
        #expect(isr(p) == 0)
        // Rotate on non-specific EOI: IRQ0 becomes lowest priority.
        edge(p, 0); #expect(p.acknowledge() == 0x20)
        p.out8(0x20, 0xA0)
        edge(p, 0); edge(p, 1)
        #expect(p.acknowledge() == 0x21)
        p.out8(0x20, 0x20)
        #expect(p.acknowledge() == 0x20)
        p.out8(0x20, 0x20)
        // Set priority: IRQ4 lowest, so IRQ5 beats IRQ3.
        p.out8(0x20, 0xC4)
        edge(p, 3); edge(p, 5)
        #expect(p.acknowledge() == 0x25)
        // Rotate on specific EOI of 5: 5 lowest, 6 highest.
        p.out8(0x20, 0xE5)
        edge(p, 6)
        #expect(p.acknowledge() == 0x26)
    }

    @Test func cascadeThroughSlave() {
        let p = initializedPIC()
        edge(p, 12)
        #expect(p.interruptPending)
        #expect(p.acknowledge() == 0x2C)
        #expect(isr(p) == 0x04)
        #expect(isr(p, master: false) == 0x10)
        p.out8(0xA0, 0x20); p.out8(0x20, 0x20)
        #expect(isr(p) == 0 && isr(p, master: false) == 0)
        // A second slave request after EOI is delivered again.
        edge(p, 8)
        #expect(p.acknowledge() == 0x28)
    }

    @Test func spuriousIRQ7And15() {
        let p = initializedPIC()
        edge(p, 1)
        p.out8(0x21, 0x02)  // the request vanishes (masked) before INTA
        #expect(p.acknowledge() == 0x27)
        #expect(isr(p) == 0)
        // Slave request latched on the master, then masked on the slave: spurious IRQ15.
        let q = initializedPIC()
        edge(q, 12)
        q.out8(0xA1, 0x10)
        #expect(q.acknowledge() == 0x2F)
        #expect(isr(q, master: false) == 0)
    }

    @Test func pollMode() {
        let p = initializedPIC()
        p.out8(0x20, 0x0C)
        #expect(p.in8(0x20) == 0)  // nothing pending
        edge(p, 5)
        p.out8(0x20, 0x0C)
        #expect(p.in8(0x20) == 0x85)
        #expect(isr(p) == 0x20)
        #expect(!p.interruptPending)
    }

    @Test func autoEOI() {
        let p = initializedPIC(autoEOI: true)
        edge(p, 4)
        #expect(p.acknowledge() == 0x24)
        #expect(isr(p) == 0)
        edge(p, 4)
        #expect(p.interruptPending)
    }

    @Test func elcrLevelMode() {
        let p = initializedPIC()
        p.out8(0x4D0, 0x27)  // low bits are reserved (IRQ0-2 never level)
        #expect(p.in8(0x4D0) == 0x20)
        p.setIRQ(5, level: true)
        #expect(p.acknowledge() == 0x25)
        p.out8(0x20, 0x20)
        #expect(p.interruptPending)  // line still high: requested again
        p.setIRQ(5, level: false)
        #expect(!p.interruptPending)
        // An edge line held high is not requested again after EOI.
        p.setIRQ(3, level: true)
        #expect(p.acknowledge() == 0x23)
        p.out8(0x20, 0x20)
        #expect(!p.interruptPending)
    }

    @Test func unknownPortFloats() {
        #expect(PIC().read(port: 0x22, size: 1) == 0xFF)
    }

    @Test func saveRestore() throws {
        let p = initializedPIC()
        edge(p, 3); edge(p, 12); _ = p.acknowledge(); p.out8(0x4D1, 0x02)
        let fresh = PIC()
        let (a, b) = try roundTrip(p, fresh, name: "PIC")
        #expect(a == b)
        #expect(fresh.interruptPending == p.interruptPending)
        #expect(fresh.acknowledge() == p.acknowledge())
        #expect(truncatedFails(p, PIC(), name: "PIC"))
        var bad = a; bad[0] = 9
        var r = StateReader(bad, device: "PIC")
        #expect(throws: StateError.badVersion(device: "PIC", found: 9)) { try PIC().restoreState(from: &r) }
        var garbage = a; garbage[a.count - 1] = 7  // a flag byte that is neither 0 nor 1
        var g = StateReader(garbage, device: "PIC")
        #expect(throws: StateError.self) { try PIC().restoreState(from: &g) }
    }
}
