// 16550A UART (COM1 at 0x3F8, IRQ 4). Transmission is instantaneous; the interrupt rules follow the
// 16550 as Linux's 8250 driver probes and drives it (and as QEMU's serial.c models it).

public final class UART: PortDevice, StatefulDevice {
    public static let fifoSize = 16

    // Register bits.
    static let ierRDI: UInt8 = 0x01, ierTHRI: UInt8 = 0x02, ierRLSI: UInt8 = 0x04, ierMSI: UInt8 = 0x08
    static let lsrDR: UInt8 = 0x01, lsrOE: UInt8 = 0x02, lsrBI: UInt8 = 0x10, lsrTHRE: UInt8 = 0x20
    static let lsrTEMT: UInt8 = 0x40, lsrErrors: UInt8 = 0x1E
    static let mcrLoop: UInt8 = 0x10, mcrOUT2: UInt8 = 0x08
    static let fcrEnable: UInt8 = 0x01, fcrRxReset: UInt8 = 0x02, fcrTxReset: UInt8 = 0x04

    public let base: UInt16
    let irq: IRQLine
    let sink: SerialSink

    /// Receive FIFO ring, allocated once.
    var rx = [UInt8](repeating: 0, count: UART.fifoSize)
    var rxHead = 0
    var rxCount = 0
    var ier: UInt8 = 0
    var fcr: UInt8 = 0
    var lcr: UInt8 = 0
    var mcr: UInt8 = 0
    var lsr: UInt8 = UART.lsrTHRE | UART.lsrTEMT
    var msr: UInt8 = 0xB0  // CTS, DSR, DCD asserted by the (virtual) other end
    var scr: UInt8 = 0
    var dll: UInt8 = 0x0C  // 9600 baud
    var dlm: UInt8 = 0
    var thrPending = false
    var irqLevel = false

    public init(base: UInt16 = 0x3F8, irq: IRQLine, sink: SerialSink) {
        self.base = base
        self.irq = irq
        self.sink = sink
    }

    var fifoEnabled: Bool { fcr & UART.fcrEnable != 0 }
    var capacity: Int { fifoEnabled ? UART.fifoSize : 1 }
    var triggerLevel: Int {
        switch fcr >> 6 { case 0: return 1; case 1: return 4; case 2: return 8; default: return 14 }
    }

    /// Bytes the machine may feed now without overrunning.
    public var rxSpace: Int { (mcr & UART.mcrLoop != 0) ? 0 : capacity - rxCount }

    /// A byte from the outside world (ignored in loopback, where the line is disconnected).
    public func receive(_ byte: UInt8) {
        guard mcr & UART.mcrLoop == 0 else { return }
        push(byte)
    }

    func push(_ byte: UInt8) {
        if rxCount < capacity {
            rx[(rxHead + rxCount) % UART.fifoSize] = byte
            rxCount += 1
        } else if fifoEnabled {
            lsr |= UART.lsrOE  // the FIFO keeps its contents; the new byte is lost
        } else {
            lsr |= UART.lsrOE  // 16450 behaviour: the holding register is overwritten
            rx[rxHead] = byte
        }
        lsr |= UART.lsrDR
        updateIRQ()
    }

    /// The interrupt identification, 0x01 when nothing is pending (without the FIFO bits).
    var interruptID: UInt8 {
        if ier & UART.ierRLSI != 0 && lsr & UART.lsrErrors != 0 { return 0x06 }
        if ier & UART.ierRDI != 0 && rxCount > 0 {
            // Data below the trigger level: reported as a character timeout, deterministically.
            if fifoEnabled && rxCount < triggerLevel { return 0x0C }
            return 0x04
        }
        if ier & UART.ierTHRI != 0 && thrPending { return 0x02 }
        if ier & UART.ierMSI != 0 && msr & 0x0F != 0 { return 0x00 }
        return 0x01
    }

    func updateIRQ() {
        // On PCs OUT2 gates the UART's interrupt output onto the ISA line.
        let level = interruptID != 0x01 && mcr & UART.mcrOUT2 != 0
        if level != irqLevel {
            irqLevel = level
            irq.set(level)
        }
    }

    // MARK: ports

    public func read(port: UInt16, size: Int) -> UInt32 {
        let b = readByte(Int(port &- base))
        return size > 1 ? UInt32(b) | (floatingBus(size) & ~0xFF) : UInt32(b)
    }

    public func write(port: UInt16, size: Int, value: UInt32) {
        writeByte(Int(port &- base), UInt8(truncatingIfNeeded: value))
    }

    func readByte(_ offset: Int) -> UInt8 {
        switch offset {
        case 0:
            if lcr & 0x80 != 0 { return dll }
            guard rxCount > 0 else { return 0 }
            let b = rx[rxHead]
            rxHead = (rxHead + 1) % UART.fifoSize
            rxCount -= 1
            if rxCount == 0 { lsr &= ~UART.lsrDR }
            updateIRQ()
            return b
        case 1:
            return lcr & 0x80 != 0 ? dlm : ier
        case 2:
            let id = interruptID
            // Reading IIR while it reports THRE acknowledges that interrupt.
            if id == 0x02 { thrPending = false; updateIRQ() }
            return id | (fifoEnabled ? 0xC0 : 0)
        case 3: return lcr
        case 4: return mcr
        case 5:
            let v = lsr
            if lsr & UART.lsrErrors != 0 { lsr &= ~UART.lsrErrors; updateIRQ() }
            return v
        case 6:
            let v = msr
            if msr & 0x0F != 0 { msr &= 0xF0; updateIRQ() }
            return v
        case 7: return scr
        default: return 0xFF
        }
    }

    func writeByte(_ offset: Int, _ v: UInt8) {
        switch offset {
        case 0:
            if lcr & 0x80 != 0 { dll = v; return }
            // The write clears THRE's interrupt; the byte leaves at once, so THR is empty again.
            if mcr & UART.mcrLoop != 0 { push(v) } else { sink.transmit(v) }
            lsr |= UART.lsrTHRE | UART.lsrTEMT
            thrPending = true
            updateIRQ()
        case 1:
            if lcr & 0x80 != 0 { dlm = v; return }
            let old = ier
            ier = v & 0x0F
            if ier & UART.ierTHRI != 0 && old & UART.ierTHRI == 0 {
                // Enabling THRI with the holding register empty raises THRE (Linux's THRE test relies on it).
                thrPending = lsr & UART.lsrTHRE != 0
            } else if ier & UART.ierTHRI == 0 {
                thrPending = false
            }
            updateIRQ()
        case 2:
            var val = v
            if val == fcr { return }
            // Toggling the enable flushes both FIFOs.
            if (val ^ fcr) & UART.fcrEnable != 0 { val |= UART.fcrRxReset | UART.fcrTxReset }
            if val & UART.fcrRxReset != 0 {
                rxHead = 0; rxCount = 0
                lsr &= ~(UART.lsrDR | UART.lsrBI)
            }
            if val & UART.fcrTxReset != 0 {
                lsr |= UART.lsrTHRE | UART.lsrTEMT
                thrPending = true
            }
            fcr = val & 0xC9  // reset bits self-clear; DMA mode and trigger level stay
            if !fifoEnabled && rxCount > 1 { rxCount = 1 }
            updateIRQ()
        case 3: lcr = v
        case 4:
            let old = mcr
            mcr = v & 0x1F
            updateModemInputs(oldMCR: old)
            updateIRQ()
        case 5, 6: break  // LSR/MSR writes are ignored (factory test only)
        case 7: scr = v
        default: break
        }
    }

    /// MSR inputs: the modem outputs looped back in loopback mode, CTS/DSR/DCD asserted otherwise.
    func updateModemInputs(oldMCR: UInt8) {
        let oldIn = msr & 0xF0
        let newIn: UInt8
        if mcr & UART.mcrLoop != 0 {
            let m = mcr
            newIn = (m & 0x02 != 0 ? 0x10 : 0) | (m & 0x01 != 0 ? 0x20 : 0)
                | (m & 0x04 != 0 ? 0x40 : 0) | (m & 0x08 != 0 ? 0x80 : 0)
        } else {
            newIn = 0xB0
        }
        var delta = msr & 0x0F
        let changed = oldIn ^ newIn
        if changed & 0x10 != 0 { delta |= 0x01 }                      // DCTS
        if changed & 0x20 != 0 { delta |= 0x02 }                      // DDSR
        if oldIn & 0x40 != 0 && newIn & 0x40 == 0 { delta |= 0x04 }  // TERI: trailing edge of RI
        if changed & 0x80 != 0 { delta |= 0x08 }                      // DDCD
        msr = newIn | delta
    }

    // MARK: state

    public func saveState(into w: inout StateWriter) {
        w.u8(1)
        w.u8(UInt8(rxCount))
        for i in 0..<rxCount { w.u8(rx[(rxHead + i) % UART.fifoSize]) }
        for b in [ier, fcr, lcr, mcr, lsr, msr, scr, dll, dlm] { w.u8(b) }
        w.bool(thrPending); w.bool(irqLevel)
    }

    public func restoreState(from r: inout StateReader) throws(StateError) {
        try r.expectVersion(1)
        let n = Int(try r.u8(max: UInt8(UART.fifoSize), "rx count"))
        var data = [UInt8](repeating: 0, count: UART.fifoSize)
        for i in 0..<n { data[i] = try r.u8() }
        let regs = (try r.u8(max: 0x0F, "ier"), try r.u8(), try r.u8(), try r.u8(max: 0x1F, "mcr"),
                    try r.u8(), try r.u8(), try r.u8(), try r.u8(), try r.u8())
        let thr = try r.flag("thrPending"), level = try r.flag("irqLevel")
        guard regs.1 & ~0xC9 == 0, n <= (regs.1 & 1 != 0 ? UART.fifoSize : 1) else {
            throw .badValue(device: r.device, field: "fcr")
        }
        for i in 0..<UART.fifoSize { rx[i] = data[i] }
        rxHead = 0; rxCount = n
        (ier, fcr, lcr, mcr, lsr, msr, scr, dll, dlm) = regs
        thrPending = thr; irqLevel = level
    }
}
