// QEMU's isa-debug-exit at 0xF4: a write ends the run with a status the guest chooses.

public final class DebugExit: PortDevice, StatefulDevice {
    public let port: UInt16
    public private(set) var exitRequested = false
    public private(set) var exitStatus: UInt8 = 0

    public init(port: UInt16 = 0xF4) { self.port = port }

    public func read(port: UInt16, size: Int) -> UInt32 { floatingBus(size) }

    public func write(port: UInt16, size: Int, value: UInt32) {
        exitStatus = UInt8(truncatingIfNeeded: value)
        exitRequested = true
    }

    /// QEMU's process exit code for the recorded status, (v << 1) | 1.
    public var qemuExitCode: Int32 { Int32(exitStatus) << 1 | 1 }

    public func saveState(into w: inout StateWriter) {
        w.u8(1); w.bool(exitRequested); w.u8(exitStatus)
    }

    public func restoreState(from r: inout StateReader) throws(StateError) {
        try r.expectVersion(1)
        let req = try r.flag("exitRequested")
        let status = try r.u8()
        exitRequested = req; exitStatus = status
    }
}
