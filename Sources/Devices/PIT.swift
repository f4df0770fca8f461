// 8254 PIT at 0x40-0x43 plus the port 0x61 bits it owns (channel 2 gate, speaker enable, OUT2, refresh).
// Counters are not ticked: each count and output is computed from now() against the time it was loaded.
// The one-clock load delay of the real part is ignored (as QEMU does).

public final class PIT: PortDevice, TimedDevice, StatefulDevice {
    public static let frequency: UInt64 = 1_193_182

    struct Channel: Equatable {
        var mode: UInt8 = 0          // 0-5
        var access: UInt8 = 3        // 1 lobyte, 2 hibyte, 3 lo/hi
        var bcd = false
        var reload: UInt16 = 0       // as written (BCD digits when bcd); 0 means the maximum
        var countLoaded = false      // a full count has been written since the control word
        var nullCount = true
        var running = false
        var gate = true
        var loadTime: UInt64 = 0     // ns at which counting started from startCount
        var startCount: UInt32 = 0   // binary, 1...65536 (or frozen value when resumed)
        var frozenCount: UInt32 = 0  // what reads see while not running
        var frozenOut = false
        var terminalDone = false     // mode 0: output already went high before a gate pause
        var writeHighNext = false
        var writeLow: UInt8 = 0
        var readHighNext = false
        var countLatched = false
        var latchHighNext = false
        var latched: UInt16 = 0
        var statusLatched = false
        var status: UInt8 = 0

        var modulus: UInt32 { bcd ? 10_000 : 65_536 }
        /// The programmed count in binary, with 0 meaning the maximum.
        var n: UInt32 {
            let v = bcd ? PIT.fromBCD(reload) : UInt32(reload)
            return v == 0 ? modulus : v
        }
    }

    var channels = (Channel(), Channel(), Channel())
    var speakerEnable = false
    var port61Low: UInt8 = 0     // bits 2-3 (NMI enables), kept for read-back
    /// The next rising edge of OUT0 not yet delivered to IRQ0 (ns), nil when none is scheduled.
    var pendingEdge: UInt64?

    let inputs: DeviceInputs
    let irq0: IRQLine

    public init(inputs: DeviceInputs, irq0: IRQLine) {
        self.inputs = inputs
        self.irq0 = irq0
    }

    // MARK: time arithmetic

    @inline(__always) static func ticks(_ ns: UInt64) -> UInt64 {
        let p = ns.multipliedFullWidth(by: frequency)
        return UInt64(1_000_000_000).dividingFullWidth(p).quotient
    }

    /// The first ns at which `ticks` input clocks have elapsed.
    @inline(__always) static func nanos(_ ticks: UInt64) -> UInt64 {
        let p = ticks.multipliedFullWidth(by: 1_000_000_000)
        let (q, r) = frequency.dividingFullWidth(p)
        return r == 0 ? q : q &+ 1
    }

    static func fromBCD(_ v: UInt16) -> UInt32 {
        var r: UInt32 = 0
        for shift in stride(from: 12, through: 0, by: -4) { r = r * 10 + min(UInt32((v >> UInt16(shift)) & 0xF), 9) }
        return r
    }

    static func toBCD(_ v: UInt32) -> UInt16 {
        var r: UInt16 = 0, x = v % 10_000
        for shift in stride(from: 0, through: 12, by: 4) { r |= UInt16(x % 10) << UInt16(shift); x /= 10 }
        return r
    }

    // MARK: counter model

    func elapsed(_ c: Channel, _ t: UInt64) -> UInt64 { t >= c.loadTime ? PIT.ticks(t - c.loadTime) : 0 }

    /// The counting element in binary (0...modulus-1) at time t.
    func count(_ c: Channel, at t: UInt64) -> UInt32 {
        guard c.running else { return c.frozenCount % c.modulus }
        let d = elapsed(c, t), n = UInt64(c.startCount), m = UInt64(c.modulus)
        var v: UInt64
        switch c.mode {
        case 2: v = n - d % n
        case 3:
            let phase = d % n, half = (n + 1) / 2
            let p = phase < half ? phase : phase - half
            v = (n & ~1) &- 2 * p
        default: v = (n + m - d % m) % m  // modes 0, 1, 4, 5 wrap through the modulus
        }
        return UInt32(v % m)
    }

    func out(_ c: Channel, at t: UInt64) -> Bool {
        guard c.running else { return c.frozenOut }
        let d = elapsed(c, t), n = UInt64(c.startCount)
        switch c.mode {
        case 0: return c.terminalDone || d >= n
        case 1: return d >= n
        case 2: return d % n != n - 1
        case 3: return d % n < (n + 1) / 2
        default: return d != n  // 4, 5: low for one clock at terminal count
        }
    }

    /// The first rising edge of OUT strictly after elapsed tick count `d`, in ns; nil if none.
    func nextRise(_ c: Channel, after d: UInt64) -> UInt64? {
        guard c.running else { return nil }
        let n = UInt64(c.startCount)
        let edge: UInt64
        switch c.mode {
        case 0: if c.terminalDone || d >= n { return nil }; edge = n
        case 1: return nil  // OUT1-style one-shot: rises at terminal only once, never used for IRQ0
        case 2, 3: edge = (d / n + 1) * n
        default: if d >= n + 1 { return nil }; edge = n + 1
        }
        return c.loadTime &+ PIT.nanos(edge)
    }

    func rescheduleIRQ0(at t: UInt64) {
        pendingEdge = nextRise(channels.0, after: elapsed(channels.0, t))
    }

    @inline(__always) func withChannel<R>(_ i: Int, _ body: (inout Channel) -> R) -> R {
        switch i {
        case 0: return body(&channels.0)
        case 1: return body(&channels.1)
        default: return body(&channels.2)
        }
    }

    // MARK: TimedDevice

    public func advance(to now: UInt64) {
        guard let e = pendingEdge, now >= e else { return }
        // Several boundaries crossed still make one edge: the PIC latches one request.
        irq0.pulse()
        rescheduleIRQ0(at: now)
    }

    public func nextDeadline() -> UInt64? { pendingEdge }

    // MARK: ports

    public func read(port: UInt16, size: Int) -> UInt32 {
        let b: UInt8
        switch port {
        case 0x40, 0x41, 0x42: b = readCounter(Int(port - 0x40))
        case 0x61: b = readPort61()
        default: b = 0xFF  // 0x43 is write-only
        }
        return size > 1 ? UInt32(b) | (floatingBus(size) & ~0xFF) : UInt32(b)
    }

    public func write(port: UInt16, size: Int, value: UInt32) {
        let v = UInt8(truncatingIfNeeded: value)
        switch port {
        case 0x40, 0x41, 0x42: writeCounter(Int(port - 0x40), v)
        case 0x43: writeControl(v)
        case 0x61: writePort61(v)
        default: break
        }
    }

    func readCounter(_ i: Int) -> UInt8 {
        // Latched status and count need no time; only a live read samples the clock.
        let needsTime = withChannel(i) { !$0.statusLatched && !$0.countLatched }
        let t = needsTime ? inputs.now() : 0
        return withChannel(i) { c in
            if c.statusLatched {
                c.statusLatched = false
                return c.status
            }
            let value: UInt16
            var high: Bool
            if c.countLatched {
                value = c.latched
                if c.access == 3 {
                    high = c.latchHighNext
                    c.latchHighNext.toggle()
                    if high { c.countLatched = false }
                } else {
                    high = c.access == 2
                    c.countLatched = false
                }
            } else {
                let raw = count(c, at: t)
                value = c.bcd ? PIT.toBCD(raw) : UInt16(truncatingIfNeeded: raw)
                if c.access == 3 { high = c.readHighNext; c.readHighNext.toggle() } else { high = c.access == 2 }
            }
            return UInt8(truncatingIfNeeded: high ? value >> 8 : value)
        }
    }

    func writeCounter(_ i: Int, _ v: UInt8) {
        let complete: Bool = withChannel(i) { c in
            switch c.access {
            case 1: c.reload = UInt16(v); return true
            case 2: c.reload = UInt16(v) << 8; return true
            default:
                if !c.writeHighNext { c.writeLow = v; c.writeHighNext = true; c.nullCount = true; return false }
                c.writeHighNext = false
                c.reload = UInt16(c.writeLow) | UInt16(v) << 8
                return true
            }
        }
        guard complete else { return }
        let t = inputs.now()
        withChannel(i) { c in
            c.countLoaded = true
            c.nullCount = false
            switch c.mode {
            case 1, 5: break  // wait for a gate trigger
            default:
                c.startCount = c.n
                c.loadTime = t
                c.terminalDone = false
                c.running = c.gate
                c.frozenCount = c.startCount
                c.frozenOut = c.mode != 0
            }
        }
        if i == 0 { rescheduleIRQ0(at: t) }
    }

    func writeControl(_ v: UInt8) {
        let sel = Int(v >> 6)
        if sel == 3 {
            // Read-back: bit 5 low latches counts, bit 4 low latches status, bits 1-3 select channels.
            let needCount = v & 0x20 == 0
            let t = needCount || v & 0x10 == 0 ? inputs.now() : 0
            for i in 0..<3 where v & (2 << UInt8(i)) != 0 {
                withChannel(i) { c in
                    if needCount { latchCount(&c, t) }
                    if v & 0x10 == 0 && !c.statusLatched {
                        c.statusLatched = true
                        c.status = (out(c, at: t) ? 0x80 : 0) | (c.nullCount ? 0x40 : 0)
                            | c.access << 4 | c.mode << 1 | (c.bcd ? 1 : 0)
                    }
                }
            }
            return
        }
        let rw = (v >> 4) & 3
        if rw == 0 {
            // Counter latch command; a second latch before the read is ignored.
            let already = withChannel(sel) { $0.countLatched }
            if !already {
                let t = inputs.now()
                withChannel(sel) { latchCount(&$0, t) }
            }
            return
        }
        withChannel(sel) { c in
            var mode = (v >> 1) & 7
            if mode > 5 { mode -= 4 }  // 6, 7 alias 2, 3
            let gate = c.gate
            c = Channel()
            c.gate = gate
            c.mode = mode
            c.access = rw
            c.bcd = v & 1 != 0
            c.frozenOut = mode != 0  // mode 0 drives OUT low on the control word, the others high
        }
        if sel == 0 { pendingEdge = nil }
    }

    func latchCount(_ c: inout Channel, _ t: UInt64) {
        guard !c.countLatched else { return }
        let raw = count(c, at: t)
        c.latched = c.bcd ? PIT.toBCD(raw) : UInt16(truncatingIfNeeded: raw)
        c.countLatched = true
        c.latchHighNext = false
    }

    func readPort61() -> UInt8 {
        let t = inputs.now()
        // DRAM refresh request toggles every 15.085 us on PCs; BIOS delay loops count its edges.
        let refresh: UInt8 = (t / 15_085) & 1 == 1 ? 0x10 : 0
        let out2: UInt8 = out(channels.2, at: t) ? 0x20 : 0
        return (channels.2.gate ? 1 : 0) | (speakerEnable ? 2 : 0) | (port61Low & 0x0C) | refresh | out2
    }

    func writePort61(_ v: UInt8) {
        speakerEnable = v & 2 != 0
        port61Low = v & 0x0C
        let gate = v & 1 != 0
        guard gate != channels.2.gate else { return }
        let c = channels.2
        guard c.countLoaded else { channels.2.gate = gate; return }
        let t = inputs.now()
        var n = c
        n.gate = gate
        if gate {
            switch c.mode {
            case 0, 4:  // resume counting from the held value
                n.startCount = c.frozenCount == 0 && !c.terminalDone ? c.modulus : c.frozenCount
                n.loadTime = t
                n.running = true
            default:  // 1, 5 trigger; 2, 3 reload
                n.startCount = c.n
                n.loadTime = t
                n.terminalDone = false
                n.running = true
            }
        } else if c.running {
            switch c.mode {
            case 0, 4:
                n.frozenCount = count(c, at: t)
                n.frozenOut = out(c, at: t)
                n.terminalDone = c.mode == 0 && n.frozenOut
                n.running = false
            case 2, 3:
                n.frozenCount = count(c, at: t)
                n.frozenOut = true  // gate low forces OUT high
                n.running = false
            default: break  // 1, 5: gate low does not stop a triggered count
            }
        }
        channels.2 = n
    }

    // MARK: state

    public func saveState(into w: inout StateWriter) {
        w.u8(1)
        for i in 0..<3 {
            let c = withChannel(i) { $0 }
            w.u8(c.mode); w.u8(c.access); w.bool(c.bcd); w.u16(c.reload); w.bool(c.countLoaded)
            w.bool(c.nullCount); w.bool(c.running); w.bool(c.gate); w.u64(c.loadTime); w.u32(c.startCount)
            w.u32(c.frozenCount); w.bool(c.frozenOut); w.bool(c.terminalDone); w.bool(c.writeHighNext)
            w.u8(c.writeLow); w.bool(c.readHighNext); w.bool(c.countLatched); w.bool(c.latchHighNext)
            w.u16(c.latched); w.bool(c.statusLatched); w.u8(c.status)
        }
        w.bool(speakerEnable); w.u8(port61Low)
        w.bool(pendingEdge != nil); w.u64(pendingEdge ?? 0)
    }

    public func restoreState(from r: inout StateReader) throws(StateError) {
        try r.expectVersion(1)
        var cs = (Channel(), Channel(), Channel())
        for i in 0..<3 {
            var c = Channel()
            c.mode = try r.u8(max: 5, "mode")
            c.access = try r.u8(max: 3, "access")
            guard c.access != 0 else { throw .badValue(device: r.device, field: "access") }
            c.bcd = try r.flag("bcd"); c.reload = try r.u16(); c.countLoaded = try r.flag("countLoaded")
            c.nullCount = try r.flag("nullCount"); c.running = try r.flag("running"); c.gate = try r.flag("gate")
            c.loadTime = try r.u64(); c.startCount = try r.u32()
            guard c.startCount <= 65_536, !(c.running && c.startCount == 0 && (c.mode == 2 || c.mode == 3)) else {
                throw .badValue(device: r.device, field: "startCount")
            }
            c.frozenCount = try r.u32(); c.frozenOut = try r.flag("frozenOut")
            c.terminalDone = try r.flag("terminalDone"); c.writeHighNext = try r.flag("writeHighNext")
            c.writeLow = try r.u8(); c.readHighNext = try r.flag("readHighNext")
            c.countLatched = try r.flag("countLatched"); c.latchHighNext = try r.flag("latchHighNext")
            c.latched = try r.u16(); c.statusLatched = try r.flag("statusLatched"); c.status = try r.u8()
            switch i { case 0: cs.0 = c; case 1: cs.1 = c; default: cs.2 = c }
        }
        let speaker = try r.flag("speakerEnable")
        let low = try r.u8()
        let hasEdge = try r.flag("pendingEdge")
        let edge = try r.u64()
        channels = cs
        speakerEnable = speaker
        port61Low = low
        pendingEdge = hasEdge ? edge : nil
    }
}
