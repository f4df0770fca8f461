// Small helpers shared by the devices' save/restore code.

extension StateReader {
    /// A strict boolean: anything but 0/1 is garbage, not "true".
    public mutating func flag(_ field: String) throws(StateError) -> Bool {
        let v = try u8()
        guard v <= 1 else { throw .badValue(device: device, field: field) }
        return v == 1
    }

    /// Reads the version byte and rejects anything but `expected`.
    public mutating func expectVersion(_ expected: UInt8) throws(StateError) {
        let v = try u8()
        guard v == expected else { throw .badVersion(device: device, found: v) }
    }

    /// A byte that must be at most `max`.
    public mutating func u8(max: UInt8, _ field: String) throws(StateError) -> UInt8 {
        let v = try u8()
        guard v <= max else { throw .badValue(device: device, field: field) }
        return v
    }
}

/// All-ones of an access size, what a floating ISA bus returns.
@inline(__always) func floatingBus(_ size: Int) -> UInt32 {
    size >= 4 ? 0xFFFF_FFFF : (size == 2 ? 0xFFFF : 0xFF)
}
