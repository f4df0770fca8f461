// Port I/O dispatch: a 64 Ki table of device indices, so a lookup is one load and one array index.

public final class PortBus {
    /// Device index + 1 per port; 0 means nothing decodes the port.
    var table = [UInt8](repeating: 0, count: 65_536)
    var devices: [PortDevice] = []
    /// One bit per port: unknown ports already reported.
    var seenUnknown = [UInt64](repeating: 0, count: 65_536 / 64)

    /// Called the first time each unknown port is accessed (port, isWrite).
    public var onUnknownPort: ((UInt16, Bool) -> Void)?

    public init(onUnknownPort: ((UInt16, Bool) -> Void)? = nil) {
        self.onUnknownPort = onUnknownPort
    }

    public enum MapError: Error, Equatable {
        case overlap(port: UInt16)
        case tooManyDevices
    }

    /// Maps `ports` to `device`. A device mapped at several ranges is stored once.
    public func map(_ ports: ClosedRange<UInt16>, to device: PortDevice) throws(MapError) {
        for p in ports where table[Int(p)] != 0 { throw .overlap(port: p) }
        var idx = devices.firstIndex { $0 === device } ?? -1
        if idx < 0 {
            guard devices.count < 255 else { throw .tooManyDevices }
            devices.append(device)
            idx = devices.count - 1
        }
        for p in ports { table[Int(p)] = UInt8(idx + 1) }
    }

    /// The device decoding `port`, if any.
    public func device(at port: UInt16) -> PortDevice? {
        let i = Int(table[Int(port)])
        return i == 0 ? nil : devices[i - 1]
    }

    @inline(__always) public func read(port: UInt16, size: Int) -> UInt32 {
        let i = Int(table[Int(port)])
        if i == 0 {
            noteUnknown(port, isWrite: false)
            return floatingBus(size)
        }
        return devices[i - 1].read(port: port, size: size)
    }

    @inline(__always) public func write(port: UInt16, size: Int, value: UInt32) {
        let i = Int(table[Int(port)])
        if i == 0 {
            noteUnknown(port, isWrite: true)
            return
        }
        devices[i - 1].write(port: port, size: size, value: value)
    }

    func noteUnknown(_ port: UInt16, isWrite: Bool) {
        let word = Int(port >> 6), bit = UInt64(1) << UInt64(port & 63)
        guard seenUnknown[word] & bit == 0 else { return }
        seenUnknown[word] |= bit
        onUnknownPort?(port, isWrite)
    }
}
