// 8259A master/slave pair (0x20/0x21, 0xA0/0xA1) with the ELCR (0x4D0/0x4D1), cascaded on IRQ2.
// The logic follows the datasheet as QEMU's i8259 models it, which is what Linux and SeaBIOS are tested on.

/// One 8259A chip. A value type so the pair lives inline in the PIC object (no allocation).
struct PICChip: Equatable {
    var irr: UInt8 = 0
    var isr: UInt8 = 0
    var imr: UInt8 = 0
    /// Line levels seen last, for rising-edge detection.
    var lastLevels: UInt8 = 0
    var elcr: UInt8 = 0
    /// The IRQ with the lowest priority is (priorityAdd - 1) & 7: rotation moves this base.
    var priorityAdd: UInt8 = 0
    var vectorBase: UInt8 = 0
    /// 0: operational; 1, 2, 3: waiting for ICW2, ICW3, ICW4.
    var initState: UInt8 = 0
    var needICW4 = false
    var singleMode = false
    var autoEOI = false
    var rotateOnAutoEOI = false
    var specialFullyNested = false
    var readISR = false
    var poll = false
    var specialMask = false
    /// The INT output of this chip.
    var output = false

    /// Priority index (0 highest) of the highest-priority set bit in `mask`, 8 if none.
    @inline(__always) func priority(_ mask: UInt8) -> Int {
        if mask == 0 { return 8 }
        // Rotate so that bit priorityAdd becomes bit 0; the lowest set bit is the winner.
        let s = Int(priorityAdd & 7)
        let rotated = (mask >> UInt8(s)) | (mask << UInt8((8 - s) & 7))
        return rotated.trailingZeroBitCount
    }

    /// The IRQ this chip would present now (its INT output), or -1.
    func pendingIRQ(isMaster: Bool) -> Int {
        let p = priority(irr & ~imr)
        if p == 8 { return -1 }
        var inService = isr
        if specialMask { inService &= ~imr }
        // Special fully nested: the slave may interrupt while one of its own IRQs is in service.
        if specialFullyNested && isMaster { inService &= ~0x04 }
        return p < priority(inService) ? (p + Int(priorityAdd)) & 7 : -1
    }

    mutating func setLine(_ irq: Int, _ level: Bool) {
        let mask = UInt8(1) << UInt8(irq)
        if elcr & mask != 0 {
            // Level triggered: IRR follows the line.
            if level { irr |= mask; lastLevels |= mask } else { irr &= ~mask; lastLevels &= ~mask }
        } else if level {
            if lastLevels & mask == 0 { irr |= mask }
            lastLevels |= mask
        } else {
            lastLevels &= ~mask
        }
    }

    mutating func intAck(_ irq: Int) {
        let mask = UInt8(1) << UInt8(irq)
        if autoEOI {
            if rotateOnAutoEOI { priorityAdd = UInt8((irq + 1) & 7) }
        } else {
            isr |= mask
        }
        // A level-triggered request stays in IRR while the line is high.
        if elcr & mask == 0 { irr &= ~mask }
    }

    /// ICW1 resets everything but the ELCR; a request on a level line stays.
    mutating func initReset() {
        let keepElcr = elcr
        self = PICChip()
        elcr = keepElcr
    }

    func save(into w: inout StateWriter) {
        w.u8(irr); w.u8(isr); w.u8(imr); w.u8(lastLevels); w.u8(elcr); w.u8(priorityAdd)
        w.u8(vectorBase); w.u8(initState)
        for b in [needICW4, singleMode, autoEOI, rotateOnAutoEOI, specialFullyNested, readISR, poll, specialMask, output] {
            w.bool(b)
        }
    }

    static func restore(from r: inout StateReader) throws(StateError) -> PICChip {
        var c = PICChip()
        c.irr = try r.u8(); c.isr = try r.u8(); c.imr = try r.u8(); c.lastLevels = try r.u8()
        c.elcr = try r.u8(); c.priorityAdd = try r.u8(max: 7, "priorityAdd")
        c.vectorBase = try r.u8(); c.initState = try r.u8(max: 3, "initState")
        c.needICW4 = try r.flag("needICW4"); c.singleMode = try r.flag("singleMode")
        c.autoEOI = try r.flag("autoEOI"); c.rotateOnAutoEOI = try r.flag("rotateOnAutoEOI")
        c.specialFullyNested = try r.flag("specialFullyNested"); c.readISR = try r.flag("readISR")
        c.poll = try r.flag("poll"); c.specialMask = try r.flag("specialMask"); c.output = try r.flag("output")
        return c
    }
}

public final class PIC: PortDevice, InterruptController, StatefulDevice {
    var master = PICChip()
    var slave = PICChip()
    /// The INTR line into the CPU, kept current so the board's per-exit check is a load.
    public private(set) var interruptPending = false

    static let masterELCRMask: UInt8 = 0xF8  // IRQ0-2 are never level (timer, keyboard, cascade)
    static let slaveELCRMask: UInt8 = 0xDE   // IRQ8 (RTC) and IRQ13 (FPU) are never level

    public init() {}

    // MARK: lines

    public func setIRQ(_ line: Int, level: Bool) {
        guard line >= 0 && line < 16 else { return }
        if line < 8 {
            master.setLine(line, level)
            updateMaster()
        } else {
            slave.setLine(line - 8, level)
            updateSlave()
        }
    }

    @inline(__always) func updateSlave() {
        slave.output = slave.pendingIRQ(isMaster: false) >= 0
        master.setLine(2, slave.output)
        updateMaster()
    }

    @inline(__always) func updateMaster() {
        master.output = master.pendingIRQ(isMaster: true) >= 0
        interruptPending = master.output
    }

    /// The INTA cycle: the vector the CPU takes, with ISR/IRR updated (spurious 7/15 when the request vanished).
    public func acknowledge() -> UInt8 {
        let irq = master.pendingIRQ(isMaster: true)
        var vector: UInt8
        if irq >= 0 {
            if irq == 2 {
                var irq2 = slave.pendingIRQ(isMaster: false)
                if irq2 >= 0 { slave.intAck(irq2) } else { irq2 = 7 }  // spurious IRQ15
                vector = slave.vectorBase &+ UInt8(irq2)
            } else {
                vector = master.vectorBase &+ UInt8(irq)
            }
            master.intAck(irq)
        } else {
            vector = master.vectorBase &+ 7  // spurious IRQ7
        }
        updateSlave()
        return vector
    }

    // MARK: ports

    public func read(port: UInt16, size: Int) -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<min(size, 4) { v |= UInt32(readByte(port &+ UInt16(i))) << UInt32(8 * i) }
        return v
    }

    public func write(port: UInt16, size: Int, value: UInt32) {
        for i in 0..<min(size, 4) { writeByte(port &+ UInt16(i), UInt8(truncatingIfNeeded: value >> UInt32(8 * i))) }
    }

    func readByte(_ port: UInt16) -> UInt8 {
        switch port {
        case 0x20, 0x21: return chipRead(isMaster: true, a0: port & 1 == 1)
        case 0xA0, 0xA1: return chipRead(isMaster: false, a0: port & 1 == 1)
        case 0x4D0: return master.elcr
        case 0x4D1: return slave.elcr
        default: return 0xFF
        }
    }

    func writeByte(_ port: UInt16, _ v: UInt8) {
        switch port {
        case 0x20, 0x21: chipWrite(isMaster: true, a0: port & 1 == 1, v)
        case 0xA0, 0xA1: chipWrite(isMaster: false, a0: port & 1 == 1, v)
        case 0x4D0: master.elcr = v & PIC.masterELCRMask; updateMaster()
        case 0x4D1: slave.elcr = v & PIC.slaveELCRMask; updateSlave()
        default: break
        }
    }

    func chipRead(isMaster: Bool, a0: Bool) -> UInt8 {
        var c = isMaster ? master : slave
        let result: UInt8
        if c.poll {
            // Poll command: the read acts as an INTA and returns 0x80|irq, or 0 if nothing is pending.
            c.poll = false
            let irq = c.pendingIRQ(isMaster: isMaster)
            if irq >= 0 { c.intAck(irq); result = 0x80 | UInt8(irq) } else { result = 0 }
        } else if !a0 {
            result = c.readISR ? c.isr : c.irr
        } else {
            result = c.imr
        }
        store(c, isMaster)
        return result
    }

    func chipWrite(isMaster: Bool, a0: Bool, _ v: UInt8) {
        var c = isMaster ? master : slave
        if !a0 {
            if v & 0x10 != 0 {
                // ICW1
                c.initReset()
                c.initState = 1
                c.needICW4 = v & 0x01 != 0
                c.singleMode = v & 0x02 != 0
            } else if v & 0x08 != 0 {
                // OCW3
                if v & 0x04 != 0 { c.poll = true }
                if v & 0x02 != 0 { c.readISR = v & 0x01 != 0 }
                if v & 0x40 != 0 { c.specialMask = v & 0x20 != 0 }
            } else {
                // OCW2
                switch v >> 5 {
                case 0, 4:  // clear / set rotate in AEOI mode
                    c.rotateOnAutoEOI = v >> 7 != 0
                case 1, 5:  // non-specific EOI (5: and rotate)
                    let p = c.priority(c.isr)
                    if p != 8 {
                        let irq = (p + Int(c.priorityAdd)) & 7
                        c.isr &= ~(UInt8(1) << UInt8(irq))
                        if v >> 5 == 5 { c.priorityAdd = UInt8((irq + 1) & 7) }
                    }
                case 3:  // specific EOI
                    c.isr &= ~(UInt8(1) << (v & 7))
                case 6:  // set priority: v&7 becomes the lowest
                    c.priorityAdd = (v &+ 1) & 7
                case 7:  // rotate on specific EOI
                    c.isr &= ~(UInt8(1) << (v & 7))
                    c.priorityAdd = (v &+ 1) & 7
                default:  // 2: no operation
                    break
                }
            }
        } else {
            switch c.initState {
            case 0: c.imr = v  // OCW1
            case 1:
                c.vectorBase = v & 0xF8
                c.initState = c.singleMode ? (c.needICW4 ? 3 : 0) : 2
            case 2: c.initState = c.needICW4 ? 3 : 0  // ICW3: the cascade wiring is fixed on a PC
            default:
                c.specialFullyNested = v & 0x10 != 0
                c.autoEOI = v & 0x02 != 0
                c.initState = 0
            }
        }
        store(c, isMaster)
    }

    @inline(__always) func store(_ c: PICChip, _ isMaster: Bool) {
        if isMaster { master = c; updateMaster() } else { slave = c; updateSlave() }
    }

    // MARK: state

    public func saveState(into writer: inout StateWriter) {
        writer.u8(1)
        master.save(into: &writer)
        slave.save(into: &writer)
    }

    public func restoreState(from reader: inout StateReader) throws(StateError) {
        try reader.expectVersion(1)
        let m = try PICChip.restore(from: &reader)
        let s = try PICChip.restore(from: &reader)
        master = m
        slave = s
        interruptPending = master.output
    }
}
