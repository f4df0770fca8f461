import CLockstep
import Glibc
import Testing
@testable import KVM

// These tests simulate the kernel through `Sys.handler` and need no /dev/kvm. The handler is per thread and
// every test installs it with `Sys.withHandler` from a synchronous body (one thread throughout), so they run
// in parallel with each other and with MachineTests' real KVM sessions in the same process.

@Suite struct HostOpenTests {
    @Test func missingDeviceIsUnavailableWithAHint() throws {
        // Real: no handler, a path that does not exist.
        let e = try #require(throws: KVMError.self) { _ = try KVMHost(path: "/nonexistent/kvm") }
        #expect(e == .unavailable(path: "/nonexistent/kvm", errno: ENOENT))
        #expect(e.description == "cannot open /nonexistent/kvm: No such file or directory (KVM is not enabled on this host)")
    }

    @Test func permissionDeniedIsUnavailableWithAHint() throws {
        let fake = FakeKVM()
        fake.openErrno = EACCES
        let e = try #require(throws: KVMError.self) { try Sys.withHandler(fake) { _ = try KVMHost() } }
        #expect(e == .unavailable(path: "/dev/kvm", errno: EACCES))
        #expect(e.description == "cannot open /dev/kvm: Permission denied (KVM needs root or membership of the kvm group)")
        #expect(fake.calls.isEmpty)
    }

    @Test func wrongAPIVersionIsRefusedAndTheFdClosed() throws {
        let fake = FakeKVM()
        fake.apiVersion = 11
        let e = try #require(throws: KVMError.self) { try Sys.withHandler(fake) { _ = try KVMHost() } }
        #expect(e == .apiVersion(found: 11))
        #expect(e.description == "KVM API version 11 is not the supported version 12")
        #expect(fake.calls == ["KVM_GET_API_VERSION"])
        #expect(fake.closed == fake.opened && fake.opened.count == 1)
    }

    @Test func notAKVMDeviceFailsTheVersionCallWithENOTTY() throws {
        // Real: /dev/null opens, and the kernel answers KVM_GET_API_VERSION on it with ENOTTY.
        let e = try #require(throws: KVMError.self) { _ = try KVMHost(path: "/dev/null") }
        #expect(e == .sys(SysError("KVM_GET_API_VERSION", errno: ENOTTY)))
        #expect(e.description.hasPrefix("KVM_GET_API_VERSION failed: "))
        #expect(e.description.hasSuffix("(errno \(ENOTTY))"))
    }

    @Test func failingVersionCallIsTypedAndTheFdClosed() throws {
        let fake = FakeKVM()
        fake.fail(LK_KVM_GET_API_VERSION, EIO)
        let e = try #require(throws: KVMError.self) { try Sys.withHandler(fake) { _ = try KVMHost() } }
        #expect(e == .sys(SysError("KVM_GET_API_VERSION", errno: EIO)))
        #expect(e.description == "KVM_GET_API_VERSION failed: Input/output error (errno 5)")
        #expect(fake.closed == fake.opened && fake.opened.count == 1)
    }

    @Test(arguments: [(LK_KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"), (LK_KVM_CAP_VCPU_EVENTS, "KVM_CAP_VCPU_EVENTS")])
    func missingCapabilityIsNamedAndTheFdClosed(cap: Int32, name: String) throws {
        let fake = FakeKVM()
        fake.capabilities.remove(cap)
        let e = try #require(throws: KVMError.self) { try Sys.withHandler(fake) { _ = try KVMHost() } }
        #expect(e == .missingCapability(name))
        #expect(e.description == "KVM lacks the capability \(name)")
        #expect(fake.closed == fake.opened && fake.opened.count == 1)
    }

    @Test func hostComesUpOnTheFake() throws {
        let fake = FakeKVM()
        fake.vcpuMmapSize = 12288
        let host = try Sys.withHandler(fake) { try KVMHost() }
        #expect(host.vcpuMmapSize == 12288)
        #expect(fake.calls == ["KVM_GET_API_VERSION", "KVM_CHECK_EXTENSION", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE"])
    }

    @Test func createVMFailureIsTyped() throws {
        let fake = FakeKVM()
        fake.fail(LK_KVM_CREATE_VM, EMFILE)
        let e = try #require(throws: KVMError.self) { try Sys.withHandler(fake) { _ = try KVMHost().createVM() } }
        #expect(e == .sys(SysError("KVM_CREATE_VM", errno: EMFILE)))
    }

    @Test func createVCPUFailureIsTyped() throws {
        let fake = FakeKVM()
        fake.fail(LK_KVM_CREATE_VCPU, EEXIST)
        let e = try #require(throws: KVMError.self) { try Sys.withHandler(fake) { _ = try makeVCPU(fake) } }
        #expect(e == .sys(SysError("KVM_CREATE_VCPU", errno: EEXIST)))
    }

    @Test func unmappableRunPageIsTypedAndTheVCPUFdClosed() throws {
        let fake = FakeKVM()
        // A vCPU fd that cannot be mapped: /dev/null refuses mmap with ENODEV.
        fake.answers[LK_KVM_CREATE_VCPU] = { [unowned fake] _ in Int(fake.realOpen("/dev/null")) }
        let e = try #require(throws: KVMError.self) { try Sys.withHandler(fake) { _ = try makeVCPU(fake) } }
        #expect(e == .sys(SysError("mmap kvm_run", errno: ENODEV)))
        #expect(fake.closed.contains(fake.opened.last!))
    }
}

@Suite struct RunTests {
    @Test(arguments: [EINTR, EAGAIN])
    func kickedRunIsInterruptedAndClearsImmediateExit(errno e: Int32) throws {
        let fake = FakeKVM()
        try Sys.withHandler(fake) {
            let (_, _, vcpu) = try makeVCPU(fake)
            lk_run_set_immediate_exit(vcpu.run, 1) // as the kick's signal handler leaves it
            fake.fail(LK_KVM_RUN, e)
            #expect(try vcpu.enter() == .interrupted)
            #expect(lk_run_immediate_exit(vcpu.run) == 0)
        }
    }

    @Test func faultingRunIsATypedError() throws {
        let fake = FakeKVM()
        try Sys.withHandler(fake) {
            let (_, _, vcpu) = try makeVCPU(fake)
            fake.fail(LK_KVM_RUN, EFAULT)
            let e = try #require(throws: SysError.self) { _ = try vcpu.enter() }
            #expect(e == SysError("KVM_RUN", errno: EFAULT))
            #expect(e.description == "KVM_RUN failed: Bad address (errno 14)")
        }
    }

    @Test func exitReasonComesFromTheRunPage() throws {
        let fake = FakeKVM()
        try Sys.withHandler(fake) {
            let (_, _, vcpu) = try makeVCPU(fake)
            let run = vcpu.run
            fake.answers[LK_KVM_RUN] = { _ in run.pointee.exit_reason = UInt32(LK_EXIT_HLT); return 0 }
            #expect(try vcpu.enter() == .exit(UInt32(LK_EXIT_HLT)))
        }
    }
}

@Suite struct CPUIDTests {
    static func entry(_ function: UInt32, eax: UInt32) -> kvm_cpuid_entry2 {
        var e = kvm_cpuid_entry2()
        e.function = function; e.eax = eax
        return e
    }

    /// A GET_SUPPORTED_CPUID answer that reports `nent` and writes `entries` (at most what fits).
    static func answer(nent: UInt32, entries: [kvm_cpuid_entry2], asked: @escaping (UInt32) -> Void) -> (UnsafeMutableRawPointer?) -> Int {
        { arg in
            let header = arg!.assumingMemoryBound(to: kvm_cpuid2.self)
            asked(header.pointee.nent)
            let dst = (arg! + 8).assumingMemoryBound(to: kvm_cpuid_entry2.self)
            for (i, e) in entries.enumerated() { dst[i] = e }
            header.pointee.nent = nent
            return 0
        }
    }

    @Test func supportedCPUIDReturnsWhatKVMWrote() throws {
        let fake = FakeKVM()
        var asked: UInt32 = 0
        let leaves = [Self.entry(0, eax: 0xD), Self.entry(1, eax: 0x806F0), Self.entry(7, eax: 0)]
        fake.answers[LK_KVM_GET_SUPPORTED_CPUID] = Self.answer(nent: 3, entries: leaves) { asked = $0 }
        let got = try Sys.withHandler(fake) { try KVMHost().supportedCPUID() }
        #expect(asked == 256)
        #expect(got.map(\.function) == [0, 1, 7])
        #expect(got.map(\.eax) == [0xD, 0x806F0, 0])
    }

    @Test func bogusCountIsClampedToTheBuffer() throws {
        let fake = FakeKVM()
        fake.answers[LK_KVM_GET_SUPPORTED_CPUID] = Self.answer(nent: 100_000, entries: []) { _ in }
        let got = try Sys.withHandler(fake) { try KVMHost().supportedCPUID() }
        #expect(got.count == 256)
    }

    /// KVMHost asks once with KVM's own maximum (KVM_MAX_CPUID_ENTRIES, 256) and does not retry on E2BIG:
    /// a bigger buffer could not help, since KVM clamps nent to 256 before it fills it. The error is typed.
    @Test func tooManyLeavesIsE2BIGWithoutRetry() throws {
        let fake = FakeKVM()
        fake.fail(LK_KVM_GET_SUPPORTED_CPUID, E2BIG)
        let e = try #require(throws: SysError.self) { try Sys.withHandler(fake) { _ = try KVMHost().supportedCPUID() } }
        #expect(e == SysError("KVM_GET_SUPPORTED_CPUID", errno: E2BIG))
        #expect(fake.calls.filter { $0 == "KVM_GET_SUPPORTED_CPUID" }.count == 1)
    }

    @Test func setCPUIDHandsKVMTheTable() throws {
        let fake = FakeKVM()
        var seen: [kvm_cpuid_entry2] = []
        fake.answers[LK_KVM_SET_CPUID2] = { arg in
            let n = Int(arg!.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent)
            seen = Array(UnsafeBufferPointer(start: (arg! + 8).assumingMemoryBound(to: kvm_cpuid_entry2.self), count: n))
            return 0
        }
        try Sys.withHandler(fake) {
            let (_, _, vcpu) = try makeVCPU(fake)
            try vcpu.setCPUID([Self.entry(0, eax: 1), Self.entry(0x8000_0000, eax: 2)])
            fake.fail(LK_KVM_SET_CPUID2, EINVAL)
            let e = try #require(throws: SysError.self) { try vcpu.setCPUID([Self.entry(0, eax: 1)]) }
            #expect(e == SysError("KVM_SET_CPUID2", errno: EINVAL))
        }
        #expect(seen.map(\.function) == [0, 0x8000_0000])
        #expect(seen.map(\.eax) == [1, 2])
    }
}

@Suite struct MSRTests {
    static let all: Set<UInt32> = [0x174, 0x175, 0x176, 0x277, 0xC000_0081]

    @Test func readsEveryMSRAsked() throws {
        let fake = FakeKVM()
        var asked = 0
        fake.answers[LK_KVM_GET_MSRS] = msrAnswer(readable: Self.all, seen: { asked = $0 })
        let got = try Sys.withHandler(fake) { try makeVCPU(fake).2.msrs([0x174, 0x277, 0xC000_0081]) }
        #expect(asked == 3)
        #expect(got.map(\.0) == [0x174, 0x277, 0xC000_0081])
        let expected: [UInt64] = [0x174 * 3, 0x277 * 3, 0xC000_0081 * 3]
        #expect(got.map(\.1) == expected)
    }

    /// KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it did. `msrs` is documented
    /// to return "the ones KVM could read": a short count is a shorter answer, not an error (readableMSRs
    /// relies on that to probe).
    @Test func shortReadReturnsThePrefixKVMRead() throws {
        let fake = FakeKVM()
        fake.answers[LK_KVM_GET_MSRS] = msrAnswer(readable: [0x174, 0x175])
        let got = try Sys.withHandler(fake) { try makeVCPU(fake).2.msrs([0x174, 0x175, 0x999, 0x176]) }
        #expect(got.map(\.0) == [0x174, 0x175])
    }

    @Test func readableMSRsKeepsOnlyWhatKVMCanRead() throws {
        let fake = FakeKVM()
        fake.answers[LK_KVM_GET_MSRS] = msrAnswer(readable: [0x174, 0x277, 0xC000_0102])
        let got = try Sys.withHandler(fake) { try makeVCPU(fake).2.readableMSRs() }
        #expect(got == [0x174, 0x277, 0xC000_0102])
    }

    @Test func failingReadIsTyped() throws {
        let fake = FakeKVM()
        fake.fail(LK_KVM_GET_MSRS, E2BIG)
        let e = try #require(throws: SysError.self) { try Sys.withHandler(fake) { _ = try makeVCPU(fake).2.msrs([0x174]) } }
        #expect(e == SysError("KVM_GET_MSRS", errno: E2BIG))
    }

    @Test func shortWriteIsAnError() throws {
        let fake = FakeKVM()
        var written: [(UInt32, UInt64)] = []
        fake.answers[LK_KVM_SET_MSRS] = { arg in
            let n = Int(arg!.assumingMemoryBound(to: kvm_msrs.self).pointee.nmsrs)
            let entries = UnsafeBufferPointer(start: (arg! + 8).assumingMemoryBound(to: kvm_msr_entry.self), count: n)
            written = entries.map { ($0.index, $0.data) }
            return msrAnswer(readable: [0x174], fill: false)(arg)
        }
        let e = try #require(throws: SysError.self) {
            try Sys.withHandler(fake) { try makeVCPU(fake).2.setMSRs([(0x174, 1), (0x999, 2), (0x176, 3)]) }
        }
        #expect(e == SysError("KVM_SET_MSRS (set 1 of 3)", errno: EINVAL))
        #expect(e.description.hasPrefix("KVM_SET_MSRS (set 1 of 3) failed: "))
        #expect(written.map(\.0) == [0x174, 0x999, 0x176])
        #expect(written.map(\.1) == [1, 2, 3])
    }

    @Test func fullWriteSucceeds() throws {
        let fake = FakeKVM()
        fake.answers[LK_KVM_SET_MSRS] = msrAnswer(readable: Self.all, fill: false)
        try Sys.withHandler(fake) { try makeVCPU(fake).2.setMSRs([(0x174, 1), (0x175, 2)]) }
        #expect(fake.calls.last == "KVM_SET_MSRS")
    }

    @Test func moreEntriesThanAnyKVMTakesIsE2BIGWithoutACall() throws {
        let fake = FakeKVM()
        let many = Array(repeating: (UInt32(0x174), UInt64(0)), count: IoctlArray<kvm_msrs, kvm_msr_entry>.maxEntries + 1)
        let e = try #require(throws: SysError.self) { try Sys.withHandler(fake) { try makeVCPU(fake).2.setMSRs(many) } }
        #expect(e == SysError("KVM_SET_MSRS", errno: E2BIG))
        #expect(!fake.calls.contains("KVM_SET_MSRS"))
    }
}

@Suite struct HandlerTests {
    final class Answers: SyscallHandler {
        let value: Int
        init(_ v: Int) { value = v }
        func ioctl(fd: Int32, request: UInt, arg: UnsafeMutableRawPointer?, name: String) -> Int { value }
    }

    @Test func handlerIsPerThread() throws {
        let fd = Glibc.open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { _ = Glibc.close(fd) }
        let other = try Sys.withHandler(Answers(7)) { () throws -> Result<Int, SysError> in
            #expect(try Sys.ioctl(fd, LK_KVM_GET_API_VERSION, value: 0, "KVM_GET_API_VERSION") == 7)
            // Another thread, while the handler is installed here, goes to the kernel.
            nonisolated(unsafe) var seen: Result<Int, SysError>!
            var t = pthread_t()
            let box = Unmanaged.passRetained(ThreadBody {
                seen = Result { () throws(SysError) in try Sys.ioctl(fd, LK_KVM_GET_API_VERSION, value: 0, "KVM_GET_API_VERSION") }
            })
            #expect(pthread_create(&t, nil, { p in
                let body = Unmanaged<ThreadBody>.fromOpaque(p!).takeRetainedValue()
                body.run()
                return nil
            }, box.toOpaque()) == 0)
            pthread_join(t, nil)
            return seen
        }
        #expect(other == .failure(SysError("KVM_GET_API_VERSION", errno: ENOTTY)))
    }

    @Test func withHandlerRestoresThePreviousOneEvenOnThrow() throws {
        #expect(Sys.handler == nil)
        let outer = Answers(1), inner = Answers(2)
        Sys.withHandler(outer) {
            #expect(Sys.handler === outer)
            #expect(throws: SysError.self) {
                try Sys.withHandler(inner) { () throws(SysError) in
                    #expect(Sys.handler === inner)
                    throw SysError("test", errno: EIO)
                }
            }
            #expect(Sys.handler === outer)
        }
        #expect(Sys.handler == nil)
    }
}

/// A closure handed to a raw pthread.
final class ThreadBody {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}

@Suite struct IoctlArrayTests {
    @Test func layoutMatchesTheKernelStructs() throws {
        // kvm_cpuid2 and kvm_msrs: u32 count, u32 pad, entries at offset 8.
        #expect(IoctlArray<kvm_cpuid2, kvm_cpuid_entry2>.entriesOffset == 8)
        #expect(IoctlArray<kvm_msrs, kvm_msr_entry>.entriesOffset == 8)
        #expect(MemoryLayout<kvm_cpuid_entry2>.stride == 40)
        #expect(MemoryLayout<kvm_msr_entry>.stride == 16)
        try withIoctlArray(kvm_cpuid2.self, kvm_cpuid_entry2.self, count: \.nent, capacity: 3, name: "t") { (a) throws(SysError) in
            #expect(a.header.pointee.nent == 3)
            #expect(UnsafeMutableRawPointer(a.header) == a.raw)
            #expect(UnsafeMutableRawPointer(a.entries.baseAddress!) == a.raw + 8)
            #expect(a.entries.count == 3)
            #expect(a.entries.allSatisfy { $0.function == 0 && $0.eax == 0 && $0.flags == 0 })
            a.header.pointee.nent = 2
            #expect(a.count == 2 && a.filled.count == 2)
            a.header.pointee.nent = 9
            #expect(a.count == 3)
        }
    }

    @Test func emptyBufferIsJustTheHeader() throws {
        try withIoctlArray(kvm_msrs.self, kvm_msr_entry.self, count: \.nmsrs, capacity: 0, name: "t") { (a) throws(SysError) in
            #expect(a.header.pointee.nmsrs == 0)
            #expect(a.entries.isEmpty && a.filled.isEmpty)
        }
    }
}

@Suite struct StateTests {
    @Test func stateCarriesItsMSRsThroughARestore() throws {
        let fake = FakeKVM()
        fake.answers[LK_KVM_GET_MSRS] = msrAnswer(readable: [0x174, 0x277], value: { UInt64($0) + 0x1000 })
        var restored: [(UInt32, UInt64)] = []
        fake.answers[LK_KVM_SET_MSRS] = { arg in
            let n = Int(arg!.assumingMemoryBound(to: kvm_msrs.self).pointee.nmsrs)
            restored = UnsafeBufferPointer(start: (arg! + 8).assumingMemoryBound(to: kvm_msr_entry.self), count: n)
                .map { ($0.index, $0.data) }
            return n
        }
        try Sys.withHandler(fake) {
            let vcpu = try makeVCPU(fake).2
            let state = try vcpu.captureState(msrs: [0x174, 0x277])
            #expect(state.bytes.count == VCPUState.fixedSize + 2 + 2 * 12)
            try vcpu.restoreState(state)
        }
        #expect(restored.map(\.0) == [0x174, 0x277])
        #expect(restored.map(\.1) == [0x1174, 0x1277])
    }

    /// captureState is given MSRs probed readable; if KVM then reads fewer, the state would silently lack
    /// them (and a restore would keep the restorer's own values), so it is an error, like a short SET.
    @Test func shortMSRReadFailsTheCapture() throws {
        let fake = FakeKVM()
        fake.answers[LK_KVM_GET_MSRS] = msrAnswer(readable: [0x174])
        let e = try #require(throws: SysError.self) {
            try Sys.withHandler(fake) { _ = try makeVCPU(fake).2.captureState(msrs: [0x174, 0x175, 0x176]) }
        }
        #expect(e == SysError("KVM_GET_MSRS (read 1 of 3)", errno: EINVAL))
    }
}
