// MC146818 RTC/CMOS at 0x70 (index, bit 7 = NMI disable) / 0x71 (data), IRQ 8.
// The time is never ticked: it is epochSeconds + now() plus an offset that guest time writes move.
// Event flags (PF/UF/AF) are brought up to date lazily, at advance(to:) and at register C reads.

public final class RTC: PortDevice, TimedDevice, StatefulDevice {
    public static let regA = 0x0A, regB = 0x0B, regC = 0x0C, regD = 0x0D, centuryReg = 0x32

    static let bSET: UInt8 = 0x80, bPIE: UInt8 = 0x40, bAIE: UInt8 = 0x20, bUIE: UInt8 = 0x10
    static let bBinary: UInt8 = 0x04, b24h: UInt8 = 0x02
    static let cIRQF: UInt8 = 0x80, cPF: UInt8 = 0x40, cAF: UInt8 = 0x20, cUF: UInt8 = 0x10
    static let second: UInt64 = 1_000_000_000
    /// UIP is set this long before each update.
    static let uipWindow: UInt64 = 244_000

    /// 128 bytes of CMOS, allocated once and mutated in place.
    var cmos = [UInt8](repeating: 0, count: 128)
    var index: UInt8 = 0
    var nmiDisabled = false
    /// Guest time minus host-derived time, ns (signed, stored as a bit pattern).
    var offset: Int64 = 0
    /// RTC-time (ns since the epoch, offset applied) up to which events have been evaluated.
    var lastEval: UInt64 = 0
    var irqLevel = false

    let inputs: DeviceInputs
    let irq: IRQLine
    let epochNs: UInt64

    public init(inputs: DeviceInputs, irq8: IRQLine, ramSize: UInt64 = 0, lowMemoryLimit: UInt64 = 0xE000_0000) {
        self.inputs = inputs
        self.irq = irq8
        self.epochNs = inputs.epochSeconds &* RTC.second
        cmos[RTC.regA] = 0x26  // 32.768 kHz divider, 1024 Hz periodic rate
        cmos[RTC.regB] = RTC.b24h
        cmos[RTC.regD] = 0x80  // VRT: the battery is fine
        lastEval = epochNs
        setMemorySize(ramSize, lowMemoryLimit: lowMemoryLimit)
    }

    /// The CMOS memory-size bytes as QEMU writes them and SeaBIOS reads them.
    public func setMemorySize(_ ram: UInt64, lowMemoryLimit: UInt64 = 0xE000_0000) {
        let kib: UInt64 = 1024, mib = kib * kib
        let base = min(ram / kib, 640)
        cmos[0x15] = UInt8(truncatingIfNeeded: base); cmos[0x16] = UInt8(truncatingIfNeeded: base >> 8)
        let ext = min(ram > mib ? (ram - mib) / kib : 0, 65535)
        cmos[0x17] = UInt8(truncatingIfNeeded: ext); cmos[0x18] = UInt8(truncatingIfNeeded: ext >> 8)
        cmos[0x30] = cmos[0x17]; cmos[0x31] = cmos[0x18]
        let below4G = min(ram, lowMemoryLimit)
        let mid = min(below4G > 16 * mib ? (below4G - 16 * mib) / (64 * kib) : 0, 65535)
        cmos[0x34] = UInt8(truncatingIfNeeded: mid); cmos[0x35] = UInt8(truncatingIfNeeded: mid >> 8)
        let high = (ram - below4G) / (64 * kib)
        cmos[0x5B] = UInt8(truncatingIfNeeded: high); cmos[0x5C] = UInt8(truncatingIfNeeded: high >> 8)
        cmos[0x5D] = UInt8(truncatingIfNeeded: high >> 16)
        cmos[0x5F] = 0  // CPU count - 1 (SeaBIOS)
    }

    // MARK: time

    @inline(__always) func rtcNs(_ mono: UInt64) -> UInt64 { epochNs &+ mono &+ UInt64(bitPattern: offset) }
    @inline(__always) func monoNs(_ rtc: UInt64) -> UInt64 { rtc &- epochNs &- UInt64(bitPattern: offset) }

    var setMode: Bool { cmos[RTC.regB] & RTC.bSET != 0 }
    var binary: Bool { cmos[RTC.regB] & RTC.bBinary != 0 }
    var hour24: Bool { cmos[RTC.regB] & RTC.b24h != 0 }

    /// Periodic interrupt period in 32.768 kHz cycles, 0 when disabled (rates 1, 2 alias 8, 9).
    var periodicCycles: UInt64 {
        var rate = UInt64(cmos[RTC.regA] & 0x0F)
        if rate == 0 { return 0 }
        if rate <= 2 { rate += 7 }
        return 1 << (rate - 1)
    }

    @inline(__always) func cycles32k(_ ns: UInt64) -> UInt64 {
        UInt64(1_000_000_000).dividingFullWidth(ns.multipliedFullWidth(by: 32_768)).quotient
    }

    @inline(__always) func nsOfCycles(_ c: UInt64) -> UInt64 {
        let (q, r) = UInt64(32_768).dividingFullWidth(c.multipliedFullWidth(by: 1_000_000_000))
        return r == 0 ? q : q + 1
    }

    // Register encoding in the guest's chosen format.
    @inline(__always) func enc(_ v: Int) -> UInt8 {
        binary ? UInt8(truncatingIfNeeded: v) : UInt8(truncatingIfNeeded: (v / 10 % 10) << 4 | v % 10)
    }
    @inline(__always) func dec(_ b: UInt8) -> Int { binary ? Int(b) : Int(b >> 4) * 10 + Int(b & 0x0F) }

    func encHour(_ h: Int) -> UInt8 {
        if hour24 { return enc(h) }
        let h12 = h % 12 == 0 ? 12 : h % 12
        return enc(h12) | (h >= 12 ? 0x80 : 0)
    }

    func decHour(_ b: UInt8) -> Int {
        if hour24 { return dec(b) }
        let h = dec(b & 0x7F) % 12
        return b & 0x80 != 0 ? h + 12 : h
    }

    /// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Hinnant's algorithm).
    static func civil(_ days: Int64) -> (Int, Int, Int) {
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (Int(yoe + era * 400 + (m <= 2 ? 1 : 0)), Int(m), Int(d))
    }

    static func days(_ y: Int, _ m: Int, _ d: Int) -> Int64 {
        let y = Int64(m <= 2 ? y - 1 : y), m = Int64(m), d = Int64(d)
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    /// Writes the time registers (0, 2, 4, 6-9 and the century) for RTC time `rtc`.
    func materialize(_ rtc: UInt64) {
        let secs = Int64(rtc / RTC.second)
        let days = secs / 86_400, tod = Int(secs % 86_400)
        let (y, mo, d) = RTC.civil(days)
        cmos[0] = enc(tod % 60)
        cmos[2] = enc(tod / 60 % 60)
        cmos[4] = encHour(tod / 3600)
        cmos[6] = enc(Int((days + 4) % 7) + 1)  // 1970-01-01 was a Thursday; Sunday = 1
        cmos[7] = enc(d)
        cmos[8] = enc(mo)
        cmos[9] = enc(y % 100)
        cmos[RTC.centuryReg] = enc(y / 100)
    }

    /// The guest's time registers as seconds since the epoch.
    func registersToSeconds() -> Int64 {
        let y = dec(cmos[RTC.centuryReg]) * 100 + dec(cmos[9])
        let mo = min(max(dec(cmos[8]), 1), 12), d = min(max(dec(cmos[7]), 1), 31)
        let tod = Int64(decHour(cmos[4])) * 3600 + Int64(dec(cmos[2])) * 60 + Int64(dec(cmos[0]))
        return RTC.days(y, mo, d) * 86_400 + tod
    }

    /// Re-bases the clock so the time in the registers starts at monotonic time `t`.
    func adoptRegisters(at t: UInt64) {
        // The model counts from 1970; earlier guest dates are clamped rather than wrapped.
        let wanted = max(registersToSeconds(), 0) &* Int64(RTC.second)
        offset = wanted &- Int64(bitPattern: epochNs &+ t)
        lastEval = rtcNs(t)
    }

    // MARK: events

    /// The next alarm second strictly after `sec` (seconds since the epoch), nil if the alarm can never match.
    func nextAlarm(after sec: UInt64) -> UInt64? {
        func field(_ b: UInt8, _ limit: Int, hour: Bool = false) -> Int? {
            if b & 0xC0 == 0xC0 { return nil }  // don't care
            return hour ? decHour(b) : dec(b)
        }
        let aS = field(cmos[1], 60), aM = field(cmos[3], 60), aH = field(cmos[5], 24, hour: true)
        if let s = aS, s >= 60 { return nil }
        if let m = aM, m >= 60 { return nil }
        if let h = aH, h >= 24 { return nil }
        let day = sec / 86_400, tod = Int(sec % 86_400)
        // Search today after tod, then tomorrow from midnight: at most 24*60 steps.
        for dayAdd in 0..<2 {
            let start = dayAdd == 0 ? tod + 1 : 0
            for h in (start / 3600)..<24 where aH == nil || aH == h {
                let m0 = h == start / 3600 ? start / 60 % 60 : 0
                for m in m0..<60 where aM == nil || aM == m {
                    let s0 = h == start / 3600 && m == start / 60 % 60 ? start % 60 : 0
                    let s: Int
                    if let want = aS { if want < s0 { continue }; s = want } else { s = s0 }
                    return (day + UInt64(dayAdd)) * 86_400 + UInt64(h * 3600 + m * 60 + s)
                }
            }
        }
        return nil
    }

    /// Sets PF/UF/AF for events in (lastEval, rtc] and raises IRQ 8 if IRQF becomes set.
    func evaluate(_ rtc: UInt64, raise: Bool = true) {
        guard rtc > lastEval else { return }
        var flags: UInt8 = 0
        let p = periodicCycles
        if p != 0 && cycles32k(rtc) / p != cycles32k(lastEval) / p { flags |= RTC.cPF }
        if !setMode {
            let s0 = lastEval / RTC.second, s1 = rtc / RTC.second
            if s1 != s0 {
                flags |= RTC.cUF
                if let a = nextAlarm(after: s0), a <= s1 { flags |= RTC.cAF }
            }
        }
        lastEval = rtc
        cmos[RTC.regC] |= flags
        if raise { updateIRQ() }
    }

    func updateIRQ() {
        let c = cmos[RTC.regC], b = cmos[RTC.regB]
        if c & b & (RTC.cPF | RTC.cAF | RTC.cUF) != 0 { cmos[RTC.regC] |= RTC.cIRQF }
        let level = cmos[RTC.regC] & RTC.cIRQF != 0
        if level != irqLevel {
            irqLevel = level
            irq.set(level)
        }
    }

    public func advance(to now: UInt64) { evaluate(rtcNs(now)) }

    public func nextDeadline() -> UInt64? {
        let b = cmos[RTC.regB]
        var best: UInt64?
        func consider(_ rtc: UInt64) { let m = monoNs(rtc); best = min(best ?? m, m) }
        let p = periodicCycles
        if b & RTC.bPIE != 0 && p != 0 { consider(nsOfCycles((cycles32k(lastEval) / p + 1) * p)) }
        if !setMode {
            let s = lastEval / RTC.second
            if b & RTC.bUIE != 0 { consider((s + 1) * RTC.second) }
            if b & RTC.bAIE != 0, let a = nextAlarm(after: s) { consider(a * RTC.second) }
        }
        return best
    }

    // MARK: ports

    public func read(port: UInt16, size: Int) -> UInt32 {
        let b: UInt8
        switch port {
        case 0x70: b = 0xFF  // the index register is write-only
        case 0x71: b = readData()
        default: b = 0xFF
        }
        return size > 1 ? UInt32(b) | (floatingBus(size) & ~0xFF) : UInt32(b)
    }

    public func write(port: UInt16, size: Int, value: UInt32) {
        let v = UInt8(truncatingIfNeeded: value)
        switch port {
        case 0x70:
            index = v & 0x7F
            nmiDisabled = v & 0x80 != 0
        case 0x71: writeData(v)
        default: break
        }
    }

    func isTimeRegister(_ i: Int) -> Bool { i == 0 || i == 2 || i == 4 || (i >= 6 && i <= 9) || i == RTC.centuryReg }

    func readData() -> UInt8 {
        let i = Int(index)
        switch i {
        case _ where isTimeRegister(i):
            if !setMode { materialize(rtcNs(inputs.now())) }
            return cmos[i]
        case RTC.regA:
            if setMode { return cmos[i] & 0x7F }
            let rtc = rtcNs(inputs.now())
            let uip = rtc % RTC.second >= RTC.second - RTC.uipWindow
            return (cmos[i] & 0x7F) | (uip ? 0x80 : 0)
        case RTC.regC:
            // Flags that became due are returned but never pulse IRQ 8: the read clears them at once.
            evaluate(rtcNs(inputs.now()), raise: false)
            var v = cmos[i]
            if v & cmos[RTC.regB] & (RTC.cPF | RTC.cAF | RTC.cUF) != 0 { v |= RTC.cIRQF }
            cmos[i] = 0
            updateIRQ()
            return v
        case RTC.regD:
            return 0x80
        default:
            return cmos[i]
        }
    }

    func writeData(_ v: UInt8) {
        let i = Int(index)
        switch i {
        case _ where isTimeRegister(i):
            if setMode {
                cmos[i] = v
            } else {
                // A running write: take the current time, change one field, continue from there.
                let t = inputs.now()
                evaluate(rtcNs(t))
                materialize(rtcNs(t))
                cmos[i] = v
                adoptRegisters(at: t)
            }
        case RTC.regA:
            cmos[i] = v & 0x7F  // UIP is read-only
        case RTC.regB:
            let old = cmos[i]
            if old & RTC.bSET == 0 && v & RTC.bSET != 0 {
                // Entering SET: freeze the registers at the current time.
                let t = inputs.now()
                evaluate(rtcNs(t))
                materialize(rtcNs(t))
                cmos[i] = v & ~RTC.bUIE  // SET clears UIE (datasheet)
            } else if old & RTC.bSET != 0 && v & RTC.bSET == 0 {
                cmos[i] = v
                adoptRegisters(at: inputs.now())
            } else {
                cmos[i] = setMode ? v & ~RTC.bUIE : v
            }
            updateIRQ()
        case RTC.regC, RTC.regD:
            break  // read-only
        default:
            cmos[i] = v
        }
    }

    // MARK: state

    public func saveState(into w: inout StateWriter) {
        w.u8(1)
        for b in cmos { w.u8(b) }
        w.u8(index); w.bool(nmiDisabled); w.u64(UInt64(bitPattern: offset)); w.u64(lastEval); w.bool(irqLevel)
    }

    public func restoreState(from r: inout StateReader) throws(StateError) {
        try r.expectVersion(1)
        var bytes = [UInt8](repeating: 0, count: 128)
        for i in 0..<128 { bytes[i] = try r.u8() }
        let idx = try r.u8(max: 0x7F, "index")
        let nmi = try r.flag("nmiDisabled")
        let off = Int64(bitPattern: try r.u64())
        let last = try r.u64()
        let level = try r.flag("irqLevel")
        guard bytes[RTC.regA] & 0x80 == 0 else { throw .badValue(device: r.device, field: "register A") }
        for i in 0..<128 { cmos[i] = bytes[i] }
        index = idx; nmiDisabled = nmi; offset = off; lastEval = last; irqLevel = level
    }

    /// NMI-disable bit from the last index write, for the board.
    public var nmiMasked: Bool { nmiDisabled }
}
