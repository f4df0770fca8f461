import Foundation
@testable import EventLog

/// Deterministic PRNG (SplitMix64) so every failure reproduces.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A plausible recording: exits advance by small steps, a handful of exit sites repeat (polling loops),
/// timer/clock values advance by microseconds to milliseconds, some events share an exit.
func sampleEvents(count: Int, seed: UInt64, distinctSignatures: Bool = false) -> [Event] {
    var rng = SplitMix(seed: seed)
    let sites: [ExitSignature] = (0..<8).map { i in
        ExitSignature(kind: 2, portLow: UInt8(0x40 + i), size: 1, ripLow: UInt16(0x100 + 37 * i))
    }
    var exit: UInt64 = 0
    var clock: UInt64 = 1_000_000_000
    var out: [Event] = []
    out.reserveCapacity(count)
    while out.count < count {
        if rng.next() % 4 != 0 { exit += UInt64.random(in: 1...300, using: &rng) }
        let sig = distinctSignatures ? ExitSignature(raw: UInt32(truncatingIfNeeded: rng.next()))
                                     : sites[Int(rng.next() % UInt64(sites.count))]
        let kind = EventKind.allCases.filter { $0 != .syncPoint }.randomElement(using: &rng)!
        var value: UInt64 = 0
        switch kind {
        case .timer, .clockRead:
            clock += UInt64.random(in: 1_000...2_000_000, using: &rng)
            value = clock
        case .serialInput: value = UInt64(rng.next() & 0xFF)
        case .inject: value = UInt64(32 + rng.next() % 16)
        case .window: value = 0
        case .digest: value = rng.next()
        case .syncPoint: continue
        }
        out.append(Event(kind: kind, exit: exit, signature: sig, value: value))
    }
    return out
}

func sampleSyncPoint(exit: UInt64, pages: [UInt32], seed: UInt64) -> SyncPoint {
    var rng = SplitMix(seed: seed)
    let state = (0..<200).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    let data = (0..<(pages.count * 4096)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    return SyncPoint(exit: exit, signature: ExitSignature(kind: 9, portLow: 0, size: 0, ripLow: 0x123),
                     vcpuState: state, pageNumbers: pages, pageData: data)
}

func sampleHeader() -> LogHeader {
    LogHeader(memoryMiB: 64, vcpus: 1, interruptLatencyUs: 1000, epochSeconds: 1_790_000_000,
              imageSHA256: Array(repeating: 0xAB, count: 32), image: Array("\u{7F}ELF-guest-image".utf8),
              cpuidSHA256: Array(repeating: 0xCD, count: 32), hostInfo: "Linux 6.x kvm_pvm")
}

func sampleTrailer(events: UInt64, syncs: UInt64, finalExit: UInt64) -> LogTrailer {
    LogTrailer(endReason: .guestExit, exitStatus: 3, finalExit: finalExit, eventCount: events,
               syncPointCount: syncs, stateDigest: Array(repeating: 0x5A, count: 32))
}

extension LogEncoder {
    func append(_ sp: SyncPoint) {
        sp.vcpuState.withUnsafeBytes { state in
            sp.pageNumbers.withUnsafeBufferPointer { pages in
                sp.pageData.withUnsafeBytes { data in
                    appendSyncPoint(exit: sp.exit, signature: sp.signature, vcpuState: state, pageNumbers: pages, pageData: data)
                }
            }
        }
    }
    func append(_ r: LogRecord) {
        switch r {
        case .event(let e): append(e)
        case .syncPoint(let s): append(s)
        }
    }
    /// All frames sealed so far, each as its own byte array.
    func sealedFrames() -> [[UInt8]] {
        var frames: [[UInt8]] = []
        sealFrame { frames.append(Array($0)) }
        return frames
    }
}

/// Records: events, a sync point with pages, more events, an empty sync point, more events.
func sampleRecords(seed: UInt64 = 1, events: Int = 60) -> [LogRecord] {
    let ev = sampleEvents(count: events, seed: seed)
    let third = events / 3
    var out: [LogRecord] = ev[..<third].map { .event($0) }
    out.append(.syncPoint(sampleSyncPoint(exit: ev[third - 1].exit, pages: [3, 4, 700, 70_000], seed: seed)))
    out += ev[third..<(2 * third)].map { .event($0) }
    out.append(.syncPoint(sampleSyncPoint(exit: ev[2 * third - 1].exit, pages: [], seed: seed + 1)))
    out += ev[(2 * third)...].map { .event($0) }
    return out
}

func tempDir() -> String {
    let dir = NSTemporaryDirectory() + "eventlog-tests-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// Writes records to a finished log file and returns its bytes.
@discardableResult
func writeLog(_ records: [LogRecord], to path: String, frameTarget: Int = 64 * 1024) throws -> [UInt8] {
    let w = try LogFileWriter(path: path, temporaryPath: path + ".partial", header: sampleHeader(), frameTarget: frameTarget)
    var finalExit: UInt64 = 0
    for r in records {
        w.encoder.append(r)
        try w.flushIfNeeded()
        if case .event(let e) = r { finalExit = e.exit }
    }
    let events = UInt64(records.filter { if case .event = $0 { true } else { false } }.count)
    try w.finish(trailer: sampleTrailer(events: events, syncs: UInt64(records.count) - events, finalExit: finalExit))
    return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
}

/// Reads everything from an in-memory log.
func readAllFromMemory(_ bytes: [UInt8]) throws(LogError) -> (LogHeader, LogTrailer, [LogRecord]) {
    let r = try LogFileReader(bytes: bytes, name: "mem.log")
    return (r.header, r.trailer, try r.readAll())
}

func expectLogError(_ body: () throws -> Void) -> LogError? {
    do {
        try body()
        return nil
    } catch let e as LogError {
        return e
    } catch {
        fatalError("non-LogError thrown: \(error)")
    }
}
