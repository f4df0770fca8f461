import CLockstep
import Glibc
import KVM

/// A simulated /dev/kvm behind `Sys.handler`: answers the chokepoint from a script and records what it was
/// asked. It hands out real fds (/dev/null for the host and VM, /dev/zero for a vCPU, whose MAP_SHARED mmap
/// is a zeroed kvm_run page), so whoever owns them can close them for real, with or without the fake.
/// Used from one thread, inside `Sys.withHandler`.
final class FakeKVM: SyscallHandler {
    var apiVersion = 12
    var capabilities: Set<Int32> = [LK_KVM_CAP_IMMEDIATE_EXIT, LK_KVM_CAP_VCPU_EVENTS]
    /// When set, opening /dev/kvm fails with it.
    var openErrno: Int32?
    var vcpuMmapSize = (MemoryLayout<kvm_run>.size + 4095) / 4096 * 4096
    /// Answers by request, given the argument; they win over the defaults.
    var answers: [UInt: (UnsafeMutableRawPointer?) -> Int] = [:]
    /// The state ioctls captureState/restoreState make: they succeed and leave their buffers as they are.
    static let stateCalls: Set<UInt> = [
        LK_KVM_GET_REGS, LK_KVM_SET_REGS, LK_KVM_GET_SREGS, LK_KVM_SET_SREGS, LK_KVM_GET_XSAVE, LK_KVM_SET_XSAVE,
        LK_KVM_GET_XCRS, LK_KVM_SET_XCRS, LK_KVM_GET_VCPU_EVENTS, LK_KVM_SET_VCPU_EVENTS,
        LK_KVM_GET_DEBUGREGS, LK_KVM_SET_DEBUGREGS,
    ]

    private(set) var calls: [String] = []
    private(set) var opened: [Int32] = []
    private(set) var closed: [Int32] = []

    func ioctl(fd: Int32, request: UInt, arg: UnsafeMutableRawPointer?, name: String) -> Int {
        calls.append(name)
        if let answer = answers[request] { return answer(arg) }
        switch request {
        case LK_KVM_GET_API_VERSION: return apiVersion
        case LK_KVM_CHECK_EXTENSION: return capabilities.contains(Int32(Int(bitPattern: arg))) ? 1 : 0
        case LK_KVM_GET_VCPU_MMAP_SIZE: return vcpuMmapSize
        case LK_KVM_CREATE_VM: return Int(realOpen("/dev/null"))
        case LK_KVM_CREATE_VCPU: return Int(realOpen("/dev/zero"))
        case _ where Self.stateCalls.contains(request): return 0
        default: return -Int(ENOTTY) // an ioctl this fake was not told about: what a wrong fd would say
        }
    }

    func open(path: String, flags: Int32) -> Int32 {
        if let e = openErrno { return -e }
        return realOpen("/dev/null")
    }

    func close(fd: Int32) {
        closed.append(fd)
        _ = Glibc.close(fd)
    }

    /// A real fd the code under test owns from here on.
    func realOpen(_ path: String) -> Int32 {
        let fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
        precondition(fd >= 0, "cannot open \(path): errno \(errno)")
        opened.append(fd)
        return fd
    }

    /// Answers `request` with the error `e`, as the kernel's -errno.
    func fail(_ request: UInt, _ e: Int32) { answers[request] = { _ in -Int(e) } }
}

/// A host, VM and vCPU made through `fake`; call inside `Sys.withHandler(fake)`.
func makeVCPU(_ fake: FakeKVM) throws -> (KVMHost, VirtualMachine, VCPU) {
    let host = try KVMHost()
    let vm = try host.createVM()
    return (host, vm, try vm.createVCPU(id: 0))
}

/// A GET/SET_MSRS answer from a fake that knows `readable` MSRs: like KVM, it stops at the first index it
/// cannot read and returns how many entries it processed, filling data with `value(index)` on a get.
func msrAnswer(readable: Set<UInt32>, value: @escaping (UInt32) -> UInt64 = { UInt64($0) &* 3 }, fill: Bool = true,
               seen: ((Int) -> Void)? = nil) -> (UnsafeMutableRawPointer?) -> Int {
    { arg in
        let header = arg!.assumingMemoryBound(to: kvm_msrs.self)
        let n = Int(header.pointee.nmsrs)
        seen?(n)
        let entries = (arg! + 8).assumingMemoryBound(to: kvm_msr_entry.self)
        var done = 0
        while done < n, readable.contains(entries[done].index) {
            if fill { entries[done].data = value(entries[done].index) }
            done += 1
        }
        return done
    }
}
