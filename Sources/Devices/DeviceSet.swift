// The standard PC device set on one port bus: PIC pair, PIT (IRQ0), RTC (IRQ8), COM1 (IRQ4), debug exit.

public final class DeviceSet {
    public static let stateVersion: UInt8 = 1

    public let bus: PortBus
    public let pic: PIC
    public let pit: PIT
    public let rtc: RTC
    public let uart: UART
    public let debugExit: DebugExit

    public init(inputs: DeviceInputs, serial: SerialSink, ramSize: UInt64,
                onUnknownPort: ((UInt16, Bool) -> Void)? = nil) {
        let pic = PIC()
        self.pic = pic
        pit = PIT(inputs: inputs, irq0: IRQLine(pic, 0))
        rtc = RTC(inputs: inputs, irq8: IRQLine(pic, 8), ramSize: ramSize)
        uart = UART(base: 0x3F8, irq: IRQLine(pic, 4), sink: serial)
        debugExit = DebugExit()
        bus = PortBus(onUnknownPort: onUnknownPort)
        do {
            try bus.map(0x20...0x21, to: pic)
            try bus.map(0xA0...0xA1, to: pic)
            try bus.map(0x4D0...0x4D1, to: pic)
            try bus.map(0x40...0x43, to: pit)
            try bus.map(0x61...0x61, to: pit)
            try bus.map(0x70...0x71, to: rtc)
            try bus.map(0x3F8...0x3FF, to: uart)
            try bus.map(0xF4...0xF4, to: debugExit)
        } catch {
            fatalError("standard PC port map overlaps: \(error)")  // a programming error, fixed ranges
        }
    }

    /// Brings the timed devices to `now` (ns).
    public func advance(to now: UInt64) {
        pit.advance(to: now)
        rtc.advance(to: now)
    }

    /// The earliest deadline of the timed devices.
    public func nextDeadline() -> UInt64? {
        switch (pit.nextDeadline(), rtc.nextDeadline()) {
        case let (a?, b?): return min(a, b)
        case let (a?, nil): return a
        case let (nil, b): return b
        }
    }

    /// Fixed order: version, PIC, PIT, RTC, UART, debug exit.
    public func saveState(into w: inout StateWriter) {
        w.u8(DeviceSet.stateVersion)
        pic.saveState(into: &w)
        pit.saveState(into: &w)
        rtc.saveState(into: &w)
        uart.saveState(into: &w)
        debugExit.saveState(into: &w)
    }

    /// Restores all devices from bytes produced by `saveState`; trailing bytes are an error.
    /// On any error the previous state is put back, so a bad snapshot never leaves a half-restored board.
    public func restoreState(_ bytes: [UInt8]) throws(StateError) {
        let backup = stateBytes()
        do {
            try restoreAll(bytes)
        } catch {
            try? restoreAll(backup)
            throw error
        }
    }

    func restoreAll(_ all: [UInt8]) throws(StateError) {
        var top = StateReader(all, device: "devices")
        try top.expectVersion(DeviceSet.stateVersion)
        var consumed = top.offset
        // Each device reads through a reader named after it, so errors say whose state is bad.
        func restore(_ d: StatefulDevice, _ name: String) throws(StateError) {
            var r = StateReader(Array(all[consumed...]), device: name)
            try d.restoreState(from: &r)
            consumed += r.offset
        }
        try restore(pic, "PIC")
        try restore(pit, "PIT")
        try restore(rtc, "RTC")
        try restore(uart, "UART")
        try restore(debugExit, "DebugExit")
        guard consumed == all.count else { throw .badValue(device: "devices", field: "length") }
    }

    /// The serialized state of all devices, for digests and snapshots.
    public func stateBytes() -> [UInt8] {
        var w = StateWriter()
        saveState(into: &w)
        return w.bytes
    }
}
