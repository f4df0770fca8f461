import Devices
import Foundation
import Synchronization

/// Bytes from a serial backend waiting for the guest. Filled by backend threads, drained by the vCPU thread
/// through the recording hook (so every byte the guest sees is logged).
public final class SerialInputQueue: @unchecked Sendable {
    private let bytes = Mutex<[UInt8]>([])
    private let count = Atomic<Int>(0)
    weak var pacer: Pacer?

    public init() {}

    public func push(_ data: some Collection<UInt8>) {
        guard !data.isEmpty else { return }
        bytes.withLock { $0.append(contentsOf: data) }
        count.add(data.count, ordering: .releasing)
        pacer?.raise(.input)
    }

    /// Cheap check on the per-exit path.
    @inline(__always) public var hasData: Bool { count.load(ordering: .acquiring) > 0 }

    public func pop() -> UInt8? {
        guard hasData else { return nil }
        let b: UInt8? = bytes.withLock { q in q.isEmpty ? nil : q.removeFirst() }
        if b != nil { count.subtract(1, ordering: .releasing) }
        return b
    }

    /// Everything queued and not yet read, emptying the queue (a handover passes it to the survivor's guest).
    public func takeAll() -> [UInt8] {
        bytes.withLock { q in
            defer { q.removeAll() }
            count.subtract(q.count, ordering: .releasing)
            return q
        }
    }

    /// Puts taken bytes back in front, before anything queued since (a handover that did not happen).
    public func putBack(_ data: [UInt8]) {
        guard !data.isEmpty else { return }
        bytes.withLock { $0.insert(contentsOf: data, at: 0) }
        count.add(data.count, ordering: .releasing)
        pacer?.raise(.input)
    }
}

/// Where guest serial output leaves the machine: a backend directly, or through the output gate of a pair.
public protocol SerialOutput: AnyObject {
    /// `exit` is the exit index whose handling produced the byte (the output rule releases it by that index).
    func emit(_ byte: UInt8, exit: UInt64)
    /// Called when the machine stops or idles: push out anything buffered.
    func flush()
}

/// The UART's sink: tags each byte with the current exit index and hands it to the output.
final class UARTSink: SerialSink {
    unowned let hooks: InputHooks
    var output: SerialOutput?
    /// Everything the guest printed, for tests and the demo (bounded).
    var transcript: [UInt8] = []
    let keepTranscript: Bool
    init(hooks: InputHooks, output: SerialOutput?, keepTranscript: Bool) {
        self.hooks = hooks; self.output = output; self.keepTranscript = keepTranscript
    }
    func transmit(_ byte: UInt8) {
        if keepTranscript, transcript.count < 1 << 20 { transcript.append(byte) }
        output?.emit(byte, exit: hooks.exit)
    }
}
