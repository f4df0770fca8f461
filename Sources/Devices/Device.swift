// The interfaces between the board and its devices.
//
// Devices are deterministic state machines: their state changes only through guest port accesses,
// `advance(to:)` calls from the board and bytes fed through `DeviceInputs`. Every nondeterministic
// value (the time, serial input) reaches a device through `DeviceInputs`, which the machine implements
// as a recording hook (record: read the host and log; replay: read the log). Devices never read a
// host clock themselves.

/// The recording interface: the only source of nondeterminism a device may use.
public protocol DeviceInputs: AnyObject {
    /// Guest-visible monotonic time in nanoseconds since the machine was created. Logged.
    func now() -> UInt64
    /// Wall-clock time at machine creation, seconds since the Unix epoch (fixed per run, in the log header).
    var epochSeconds: UInt64 { get }
}

/// A port-mapped device. Sizes are 1, 2 or 4 bytes. Reads return the value in the low bytes.
public protocol PortDevice: AnyObject {
    func read(port: UInt16, size: Int) -> UInt32
    func write(port: UInt16, size: Int, value: UInt32)
}

/// A device whose state evolves with time (PIT, RTC): the board calls `advance(to:)` at exits where the
/// clock was sampled, and asks for the next instant at which something would happen.
public protocol TimedDevice: AnyObject {
    /// Brings the device to time `now` (ns), raising interrupts that became due.
    func advance(to now: UInt64)
    /// The earliest time (ns) at which the device will raise an interrupt, or nil if none is scheduled.
    func nextDeadline() -> UInt64?
}

/// Device state that is digested and saved in snapshots. Encoding is little-endian and versioned per device.
public protocol StatefulDevice: AnyObject {
    func saveState(into writer: inout StateWriter)
    func restoreState(from reader: inout StateReader) throws(StateError)
}

/// An interrupt request line into the PIC pair (0-15). ISA lines are edge triggered unless ELCR says level.
public protocol InterruptController: AnyObject {
    func setIRQ(_ line: Int, level: Bool)
}

public struct IRQLine {
    public let controller: InterruptController
    public let line: Int
    public init(_ controller: InterruptController, _ line: Int) { self.controller = controller; self.line = line }
    @inline(__always) public func set(_ level: Bool) { controller.setIRQ(line, level: level) }
    @inline(__always) public func pulse() { controller.setIRQ(line, level: true); controller.setIRQ(line, level: false) }
}

/// Where guest serial output goes (the output gate, a backend, or nowhere while replaying).
public protocol SerialSink: AnyObject {
    func transmit(_ byte: UInt8)
}

public enum StateError: Error, Equatable, CustomStringConvertible {
    case truncated(device: String)
    case badVersion(device: String, found: UInt8)
    case badValue(device: String, field: String)

    public var description: String {
        switch self {
        case .truncated(let d): return "\(d) state is truncated"
        case .badVersion(let d, let v): return "\(d) state has unknown version \(v)"
        case .badValue(let d, let f): return "\(d) state has an invalid \(f)"
        }
    }
}

/// Little-endian writer for device state.
public struct StateWriter {
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    public mutating func u16(_ v: UInt16) { for i in 0..<2 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    public mutating func u32(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    public mutating func u64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    public mutating func raw(_ v: [UInt8]) { u32(UInt32(v.count)); bytes.append(contentsOf: v) }
}

/// Reader matching `StateWriter`; every read names the device in its error.
public struct StateReader {
    let bytes: [UInt8]
    public private(set) var offset = 0
    public let device: String
    public init(_ bytes: [UInt8], device: String) { self.bytes = bytes; self.device = device }
    public var atEnd: Bool { offset == bytes.count }
    mutating func take(_ n: Int) throws(StateError) -> ArraySlice<UInt8> {
        guard bytes.count - offset >= n else { throw .truncated(device: device) }
        defer { offset += n }
        return bytes[offset..<offset + n]
    }
    public mutating func u8() throws(StateError) -> UInt8 { try take(1).first! }
    public mutating func bool() throws(StateError) -> Bool { try u8() != 0 }
    public mutating func u16() throws(StateError) -> UInt16 { UInt16(try uint(2)) }
    public mutating func u32() throws(StateError) -> UInt32 { UInt32(try uint(4)) }
    public mutating func u64() throws(StateError) -> UInt64 { try uint(8) }
    public mutating func raw(max: Int) throws(StateError) -> [UInt8] {
        let n = Int(try u32())
        guard n <= max else { throw .badValue(device: device, field: "length") }
        return Array(try take(n))
    }
    mutating func uint(_ n: Int) throws(StateError) -> UInt64 {
        var v: UInt64 = 0
        for (i, b) in try take(n).enumerated() { v |= UInt64(b) << (8 * UInt64(i)) }
        return v
    }
}
