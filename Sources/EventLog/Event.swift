// The events of a Lockstep log. Every value here is written to disk and to the wire:
// raw values are explicit and 0 is reserved as invalid.

/// What happened at an exit. Payload-free cases keep the per-exit path allocation-free.
public enum EventKind: UInt8, Sendable, CaseIterable {
    // 0 is invalid.
    /// The timer thread flagged a due deadline and the loop sampled the clock at this exit. Payload: ns.
    case timer = 1
    /// A device read the clock (PIT latch, RTC, PIT/RTC programming). Payload: ns.
    case clockRead = 2
    /// One byte of serial input handed to the UART. Payload: the byte.
    case serialInput = 3
    /// An interrupt was injected with KVM_INTERRUPT before the next entry. Payload: the vector.
    case inject = 4
    /// An interrupt window was requested (its exit is not a deterministic point on every KVM; a sync point follows it).
    case window = 5
    /// vCPU state plus the pages dirtied since the previous sync point (see `SyncPoint`).
    case syncPoint = 6
    /// A periodic state digest at this exit: the vCPU registers and one window of RAM (docs/log-format.md).
    /// Payload: 64-bit digest.
    case digest = 7
}

/// A cheap fingerprint of the exit an event is attached to, checked by the replayer:
/// exit kind, the low byte of the port (or MMIO address), access size, and the low 12 bits of RIP.
public struct ExitSignature: Equatable, Sendable, CustomStringConvertible {
    public var raw: UInt32
    public init(raw: UInt32) { self.raw = raw }
    public init(kind: UInt8, portLow: UInt8, size: UInt8, ripLow: UInt16) {
        raw = UInt32(kind) << 24 | UInt32(portLow) << 16 | UInt32(size & 0xF) << 12 | UInt32(ripLow & 0xFFF)
    }
    public var kind: UInt8 { UInt8(raw >> 24) }
    public var portLow: UInt8 { UInt8(truncatingIfNeeded: raw >> 16) }
    public var size: UInt8 { UInt8((raw >> 12) & 0xF) }
    public var ripLow: UInt16 { UInt16(raw & 0xFFF) }
    public var description: String {
        "exit kind \(kind) port/addr low 0x\(String(portLow, radix: 16)) size \(size) rip low 0x\(String(ripLow, radix: 16))"
    }
}

/// One event that is not a sync point.
public struct Event: Equatable, Sendable {
    public var kind: EventKind
    /// The exit index: number of natural exits before this event.
    public var exit: UInt64
    public var signature: ExitSignature
    /// ns for timer/clockRead, byte for serialInput, vector for inject, digest for digest, 0 for window.
    public var value: UInt64
    public init(kind: EventKind, exit: UInt64, signature: ExitSignature, value: UInt64 = 0) {
        self.kind = kind; self.exit = exit; self.signature = signature; self.value = value
    }
}
