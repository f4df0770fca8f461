import Testing
@testable import Devices

/// A clock the test sets; counts now() calls to check devices only sample time when needed.
final class FakeInputs: DeviceInputs {
    var time: UInt64 = 0
    var nowCalls = 0
    let epochSeconds: UInt64
    init(epochSeconds: UInt64 = 1_710_510_330) { self.epochSeconds = epochSeconds }  // 2024-03-15 13:45:30 UTC
    func now() -> UInt64 { nowCalls += 1; return time }
}

final class FakeSink: SerialSink {
    var bytes: [UInt8] = []
    func transmit(_ byte: UInt8) { bytes.append(byte) }
}

/// Records every line change, and the current levels.
final class RecordingController: InterruptController {
    var events: [(Int, Bool)] = []
    var levels = [Bool](repeating: false, count: 16)
    func setIRQ(_ line: Int, level: Bool) { events.append((line, level)); levels[line] = level }
    func rises(_ line: Int) -> Int { events.filter { $0.0 == line && $0.1 }.count }
}

extension PortDevice {
    func out8(_ port: UInt16, _ v: UInt8) { write(port: port, size: 1, value: UInt32(v)) }
    func in8(_ port: UInt16) -> UInt8 { UInt8(truncatingIfNeeded: read(port: port, size: 1)) }
}

func roundTrip<D: StatefulDevice>(_ d: D, _ fresh: D, name: String) throws -> ([UInt8], [UInt8]) {
    var w = StateWriter()
    d.saveState(into: &w)
    var r = StateReader(w.bytes, device: name)
    try fresh.restoreState(from: &r)
    #expect(r.atEnd)
    var w2 = StateWriter()
    fresh.saveState(into: &w2)
    return (w.bytes, w2.bytes)
}

func truncatedFails<D: StatefulDevice>(_ d: D, _ fresh: D, name: String) -> Bool {
    var w = StateWriter()
    d.saveState(into: &w)
    for cut in [0, 1, w.bytes.count / 2, w.bytes.count - 1] {
        var r = StateReader(Array(w.bytes.prefix(cut)), device: name)
        do { try fresh.restoreState(from: &r); return false } catch { if error != .truncated(device: name) { return false } }
    }
    return true
}
