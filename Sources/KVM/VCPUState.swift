import CLockstep
import Glibc

/// Everything KVM holds for one vCPU, as one versioned byte blob (sync points, snapshots, migration).
///
/// Layout (little-endian, x86-64 KVM struct layouts pinned by _Static_assert in the C shim):
///   u8 version (1) | u8 flags (bit0 ready_for_interrupt_injection, bit1 if_flag)
///   kvm_regs (144) | kvm_sregs (312) | kvm_xsave (4096) | kvm_xcrs (392) | kvm_vcpu_events (64) | kvm_debugregs (128)
///   u16 msrCount | msrCount * (u32 index, u64 value)
public struct VCPUState: Sendable {
    public static let version: UInt8 = 1
    /// MSRs a long-mode guest uses beyond those in sregs (EFER, FS/GS base). The TSC is deliberately absent.
    public static let msrIndices: [UInt32] = [
        0x174, 0x175, 0x176,        // SYSENTER_CS/ESP/EIP
        0x277,                      // PAT
        0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, // STAR LSTAR CSTAR SFMASK
        0xC000_0102,                // KERNEL_GS_BASE
    ]
    static let fixedSize = 2 + 144 + 312 + 4096 + 392 + 64 + 128

    public var bytes: [UInt8]

    public init(bytes: [UInt8]) { self.bytes = bytes }

    public enum DecodeError: Error, CustomStringConvertible {
        case badVersion(UInt8), truncated(Int)
        public var description: String {
            switch self {
            case .badVersion(let v): return "vCPU state has unknown version \(v)"
            case .truncated(let n): return "vCPU state is truncated (\(n) bytes)"
            }
        }
    }
}

extension VCPU {
    /// Captures the full state. `msrs` is the list that this KVM could read (probe once with `readableMSRs`).
    /// `fromRun`: take regs, sregs and events from kvm_run's sync area (valid right after a KVM_RUN return,
    /// which is when sync points and snapshots are taken) instead of three ioctls.
    public func captureState(msrs: [UInt32], fromRun: Bool = false) throws(SysError) -> VCPUState {
        let capture = StateCapture(msrs: msrs)
        return VCPUState(bytes: Array(try capture.capture(self, fromRun: fromRun)))
    }

    /// Restores a captured state. Returns the (readyForInjection, ifFlag) recorded with it.
    @discardableResult
    public func restoreState(_ state: VCPUState) throws -> (ready: Bool, ifFlag: Bool) {
        let b = state.bytes
        guard b.count >= VCPUState.fixedSize + 2 else { throw VCPUState.DecodeError.truncated(b.count) }
        guard b[0] == VCPUState.version else { throw VCPUState.DecodeError.badVersion(b[0]) }
        var off = 2
        func take<T>(_ t: T.Type, _ size: Int) -> T {
            // SAFETY: bounds checked by the fixed-size guard above; loadUnaligned handles any alignment.
            defer { off += size }
            return b.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: off, as: T.self) }
        }
        let r = take(kvm_regs.self, 144)
        let s = take(kvm_sregs.self, 312)
        let xs = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 64)
        defer { xs.deallocate() }
        b.withUnsafeBytes { xs.copyMemory(from: $0.baseAddress! + off, byteCount: 4096) }
        off += 4096
        let x = take(kvm_xcrs.self, 392)
        let e = take(kvm_vcpu_events.self, 64)
        let d = take(kvm_debugregs.self, 128)
        let n = Int(b[off]) | Int(b[off + 1]) << 8
        off += 2
        guard b.count >= off + n * 12 else { throw VCPUState.DecodeError.truncated(b.count) }
        var msrs: [(UInt32, UInt64)] = []
        for _ in 0..<n {
            let i = UInt32(littleEndian: take(UInt32.self, 4)), v = UInt64(littleEndian: take(UInt64.self, 8))
            msrs.append((i, v))
        }
        // Order matters: sregs (mode) before regs and xsave; events last so a queued injection is overwritten.
        try setSregs(s)
        try setRegs(r)
        try setXsave(from: xs)
        try? setXCRs(x)
        if !msrs.isEmpty { try setMSRs(msrs) }
        try setDebugRegs(d)
        var ev = e
        ev.flags = UInt32(KVM_VCPUEVENT_VALID_SHADOW) // NMI pending and SIPI vector are not ours to set
        try setEvents(ev)
        return (b[1] & 1 != 0, b[1] & 2 != 0)
    }

    /// The subset of `VCPUState.msrIndices` this KVM can read.
    public func readableMSRs() -> [UInt32] {
        VCPUState.msrIndices.filter { (try? msrs([$0]).count) == 1 }
    }
}

/// A vCPU's state captured in the `VCPUState` layout into buffers made once. Sync points take one at every
/// interrupt that replay cannot find by counting exits, on the vCPU thread's per-exit path, which does not
/// allocate; the XSAVE area and the MSRs go straight from their ioctls into place.
public final class StateCapture {
    /// The MSRs captured (probed readable with `readableMSRs`).
    public let msrs: [UInt32]
    /// The state's size in bytes.
    public let count: Int
    private let bytes: UnsafeMutableRawPointer
    private let msrArgument: UnsafeMutableRawPointer
    private typealias MSRArray = IoctlArray<kvm_msrs, kvm_msr_entry>
    private static let xsaveOffset = 2 + 144 + 312

    public init(msrs: [UInt32]) {
        self.msrs = msrs
        count = VCPUState.fixedSize + 2 + msrs.count * 12
        bytes = .allocate(byteCount: count, alignment: 16)
        bytes.initializeMemory(as: UInt8.self, repeating: 0, count: count)
        let argumentSize = MSRArray.entriesOffset + max(msrs.count, 1) * MemoryLayout<kvm_msr_entry>.stride
        msrArgument = .allocate(byteCount: argumentSize, alignment: 16)
        msrArgument.initializeMemory(as: UInt8.self, repeating: 0, count: argumentSize)
    }

    deinit { bytes.deallocate(); msrArgument.deallocate() }

    /// Captures `vcpu`'s state (see `VCPU.captureState`). The bytes stay valid until the next capture.
    public func capture(_ vcpu: VCPU, fromRun: Bool) throws(SysError) -> UnsafeRawBufferPointer {
        var off = 0
        func put<T>(_ v: T) {
            // SAFETY: the offsets follow the layout whose total is `count`; copyMemory needs no alignment.
            withUnsafeBytes(of: v) { (bytes + off).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            off += MemoryLayout<T>.size
        }
        put(VCPUState.version)
        put(UInt8((vcpu.readyForInjection ? 1 : 0) | (vcpu.interruptFlag ? 2 : 0)))
        // SAFETY: the sync area lives in the kvm_run page, mapped for the vCPU's lifetime.
        put(fromRun ? lk_run_regs(vcpu.run)!.pointee : try vcpu.regs())
        put(fromRun ? lk_run_sregs(vcpu.run)!.pointee : try vcpu.sregs())
        assert(off == Self.xsaveOffset)
        // SAFETY: KVM_GET_XSAVE writes 4096 bytes, the room the layout gives it at this offset.
        try vcpu.xsave(into: bytes + off)
        off += 4096
        put(try vcpu.xcrs())
        put(fromRun ? lk_run_events(vcpu.run)!.pointee : try vcpu.events())
        put(try vcpu.debugRegs())
        put(UInt16(msrs.count).littleEndian)
        if !msrs.isEmpty {
            // SAFETY: msrArgument holds a kvm_msrs header and msrs.count entries (init), both trivial C structs.
            let header = msrArgument.assumingMemoryBound(to: kvm_msrs.self)
            let entries = (msrArgument + MSRArray.entriesOffset).assumingMemoryBound(to: kvm_msr_entry.self)
            header.pointee.nmsrs = UInt32(msrs.count)
            for (k, index) in msrs.enumerated() { entries[k] = kvm_msr_entry(index: index, reserved: 0, data: 0) }
            let got = try Sys.ioctl(vcpu.fd, LK_KVM_GET_MSRS, msrArgument, "KVM_GET_MSRS")
            // The list was probed readable: a short read here would leave MSRs out of the state, and whoever
            // restores it would keep its own values for them and diverge without a word. Fail as setMSRs does.
            if got != msrs.count { throw SysError("KVM_GET_MSRS (read \(got) of \(msrs.count))", errno: EINVAL) }
            for k in 0..<msrs.count {
                put(entries[k].index.littleEndian)
                put(entries[k].data.littleEndian)
            }
        }
        assert(off == count)
        return UnsafeRawBufferPointer(start: bytes, count: count)
    }
}
