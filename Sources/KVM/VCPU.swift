import CLockstep
import Glibc

/// How a KVM_RUN call ended.
public enum RunOutcome: Equatable {
    /// The guest exited with this kvm_run exit reason.
    case exit(UInt32)
    /// KVM_RUN returned EINTR: the vCPU was kicked (or immediate_exit was already set).
    case interrupted
}

/// One virtual CPU: its fd and its shared kvm_run page. Used by a single thread (the vCPU thread).
public final class VCPU: @unchecked Sendable {
    public let fd: Int32
    /// SAFETY: mapped for the VCPU's lifetime; only the vCPU thread and the kick signal handler touch it.
    public let run: UnsafeMutablePointer<kvm_run>
    let mmapSize: Int

    init(fd: Int32, run: UnsafeMutablePointer<kvm_run>, mmapSize: Int) {
        self.fd = fd; self.run = run; self.mmapSize = mmapSize
    }

    deinit {
        munmap(UnsafeMutableRawPointer(run), mmapSize)
        Sys.close(fd)
    }

    /// Enters the guest. The hot path: no allocation.
    @inline(__always)
    public func enter() throws(SysError) -> RunOutcome {
        do {
            _ = try Sys.ioctl(fd, LK_KVM_RUN, value: 0, "KVM_RUN")
            return .exit(lk_run_exit_reason(run))
        } catch {
            if error.errno == EINTR || error.errno == EAGAIN {
                lk_run_set_immediate_exit(run, 0)
                return .interrupted
            }
            throw error
        }
    }

    public var readyForInjection: Bool { lk_run_ready_for_injection(run) != 0 }
    public var interruptFlag: Bool { lk_run_if_flag(run) != 0 }
    public func requestInterruptWindow(_ on: Bool) { lk_run_set_request_window(run, on ? 1 : 0) }

    public func inject(vector: UInt8) throws(SysError) {
        var irq = kvm_interrupt(irq: UInt32(vector))
        _ = try Sys.ioctl(fd, LK_KVM_INTERRUPT, &irq, "KVM_INTERRUPT")
    }

    public func regs() throws(SysError) -> kvm_regs { var r = kvm_regs(); _ = try Sys.ioctl(fd, LK_KVM_GET_REGS, &r, "KVM_GET_REGS"); return r }
    public func setRegs(_ r: kvm_regs) throws(SysError) { var r = r; _ = try Sys.ioctl(fd, LK_KVM_SET_REGS, &r, "KVM_SET_REGS") }
    public func sregs() throws(SysError) -> kvm_sregs { var r = kvm_sregs(); _ = try Sys.ioctl(fd, LK_KVM_GET_SREGS, &r, "KVM_GET_SREGS"); return r }
    public func setSregs(_ r: kvm_sregs) throws(SysError) { var r = r; _ = try Sys.ioctl(fd, LK_KVM_SET_SREGS, &r, "KVM_SET_SREGS") }
    public func fpu() throws(SysError) -> kvm_fpu { var r = kvm_fpu(); _ = try Sys.ioctl(fd, LK_KVM_GET_FPU, &r, "KVM_GET_FPU"); return r }
    public func setFPU(_ r: kvm_fpu) throws(SysError) { var r = r; _ = try Sys.ioctl(fd, LK_KVM_SET_FPU, &r, "KVM_SET_FPU") }
    public func events() throws(SysError) -> kvm_vcpu_events { var r = kvm_vcpu_events(); _ = try Sys.ioctl(fd, LK_KVM_GET_VCPU_EVENTS, &r, "KVM_GET_VCPU_EVENTS"); return r }
    public func setEvents(_ r: kvm_vcpu_events) throws(SysError) { var r = r; _ = try Sys.ioctl(fd, LK_KVM_SET_VCPU_EVENTS, &r, "KVM_SET_VCPU_EVENTS") }
    public func debugRegs() throws(SysError) -> kvm_debugregs { var r = kvm_debugregs(); _ = try Sys.ioctl(fd, LK_KVM_GET_DEBUGREGS, &r, "KVM_GET_DEBUGREGS"); return r }
    public func setDebugRegs(_ r: kvm_debugregs) throws(SysError) { var r = r; _ = try Sys.ioctl(fd, LK_KVM_SET_DEBUGREGS, &r, "KVM_SET_DEBUGREGS") }
    public func xcrs() throws(SysError) -> kvm_xcrs { var r = kvm_xcrs(); _ = try Sys.ioctl(fd, LK_KVM_GET_XCRS, &r, "KVM_GET_XCRS"); return r }
    public func setXCRs(_ r: kvm_xcrs) throws(SysError) { var r = r; _ = try Sys.ioctl(fd, LK_KVM_SET_XCRS, &r, "KVM_SET_XCRS") }

    /// XSAVE area (4 KiB) into `buffer`.
    public func xsave(into buffer: UnsafeMutableRawPointer) throws(SysError) {
        _ = try Sys.ioctl(fd, LK_KVM_GET_XSAVE, buffer, "KVM_GET_XSAVE")
    }
    public func setXsave(from buffer: UnsafeMutableRawPointer) throws(SysError) {
        _ = try Sys.ioctl(fd, LK_KVM_SET_XSAVE, buffer, "KVM_SET_XSAVE")
    }

    /// Reads the given MSRs; returns the ones KVM could read, in order.
    public func msrs(_ indices: [UInt32]) throws(SysError) -> [(UInt32, UInt64)] {
        try withMSRBuffer(indices.map { ($0, 0) }, "KVM_GET_MSRS") { (a) throws(SysError) -> [(UInt32, UInt64)] in
            let got = try Sys.ioctl(fd, LK_KVM_GET_MSRS, a.raw, "KVM_GET_MSRS")
            // SAFETY: KVM filled the first `got` entries; reads stay within the buffer's own entries.
            return a.entries.prefix(min(got, a.entries.count)).map { ($0.index, $0.data) }
        }
    }

    public func setMSRs(_ values: [(UInt32, UInt64)]) throws(SysError) {
        try withMSRBuffer(values, "KVM_SET_MSRS") { (a) throws(SysError) in
            let n = a.entries.count
            let set = try Sys.ioctl(fd, LK_KVM_SET_MSRS, a.raw, "KVM_SET_MSRS")
            if set != n { throw SysError("KVM_SET_MSRS (set \(set) of \(n))", errno: EINVAL) }
        }
    }

    /// A kvm_msrs buffer holding `values` as (index, data) entries.
    private func withMSRBuffer<R>(_ values: [(UInt32, UInt64)], _ name: String,
                                  _ body: (IoctlArray<kvm_msrs, kvm_msr_entry>) throws(SysError) -> R) throws(SysError) -> R {
        try withIoctlArray(kvm_msrs.self, kvm_msr_entry.self, count: \.nmsrs, capacity: values.count, name: name) {
            (a) throws(SysError) -> R in
            // SAFETY: the buffer has room for exactly values.count entries.
            for (i, v) in values.enumerated() { a.entries[i].index = v.0; a.entries[i].data = v.1 }
            return try body(a)
        }
    }

    public func setCPUID(_ entries: [kvm_cpuid_entry2]) throws(SysError) {
        try withIoctlArray(kvm_cpuid2.self, kvm_cpuid_entry2.self, count: \.nent, capacity: entries.count,
                           name: "KVM_SET_CPUID2") { (a) throws(SysError) in
            // SAFETY: the buffer has room for exactly entries.count entries.
            for (i, e) in entries.enumerated() { a.entries[i] = e }
            _ = try Sys.ioctl(fd, LK_KVM_SET_CPUID2, a.raw, "KVM_SET_CPUID2")
        }
    }
}
