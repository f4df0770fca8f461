import CLockstep
import Glibc

public enum KVMError: Error, Equatable, CustomStringConvertible {
    case unavailable(path: String, errno: Int32)
    case apiVersion(found: Int)
    case missingCapability(String)
    case sys(SysError)
    case memory(MemoryError)

    public var description: String {
        switch self {
        case .unavailable(let p, let e):
            let hint = e == EACCES ? " (KVM needs root or membership of the kvm group)" : e == ENOENT ? " (KVM is not enabled on this host)" : ""
            return "cannot open \(p): \(String(cString: strerror(e)))\(hint)"
        case .apiVersion(let v): return "KVM API version \(v) is not the supported version 12"
        case .missingCapability(let c): return "KVM lacks the capability \(c)"
        case .sys(let e): return e.description
        case .memory(let e): return e.description
        }
    }
}

/// /dev/kvm: capability checks and VM creation.
public final class KVMHost: @unchecked Sendable {
    public let fd: Int32
    public let vcpuMmapSize: Int

    public static func isAvailable(path: String = "/dev/kvm") -> Bool { access(path, R_OK | W_OK) == 0 }

    public init(path: String = "/dev/kvm") throws(KVMError) {
        let r: Int32
        do { r = try Sys.open(path, O_RDWR) } catch { throw .unavailable(path: path, errno: error.errno) }
        fd = r
        do {
            let v = try Sys.ioctl(fd, LK_KVM_GET_API_VERSION, value: 0, "KVM_GET_API_VERSION")
            guard v == 12 else { throw KVMError.apiVersion(found: v) }
            for (cap, name) in [(LK_KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"), (LK_KVM_CAP_VCPU_EVENTS, "KVM_CAP_VCPU_EVENTS")] {
                guard try Sys.ioctl(fd, LK_KVM_CHECK_EXTENSION, value: UInt(cap), "KVM_CHECK_EXTENSION") > 0 else {
                    throw KVMError.missingCapability(name)
                }
            }
            vcpuMmapSize = try Sys.ioctl(fd, LK_KVM_GET_VCPU_MMAP_SIZE, value: 0, "KVM_GET_VCPU_MMAP_SIZE")
        } catch let e as KVMError {
            Sys.close(r); throw e
        } catch let e as SysError {
            Sys.close(r); throw .sys(e)
        } catch { fatalError("unreachable") }
    }

    deinit { Sys.close(fd) }

    public func hasCapability(_ cap: Int32) -> Bool {
        ((try? Sys.ioctl(fd, LK_KVM_CHECK_EXTENSION, value: UInt(cap), "KVM_CHECK_EXTENSION")) ?? 0) > 0
    }

    public func createVM() throws(KVMError) -> VirtualMachine {
        do {
            let vmfd = try Sys.ioctl(fd, LK_KVM_CREATE_VM, value: 0, "KVM_CREATE_VM")
            return VirtualMachine(host: self, fd: Int32(vmfd))
        } catch { throw .sys(error) }
    }

    /// The host's supported CPUID leaves, the base of the pinned guest table.
    public func supportedCPUID() throws(SysError) -> [kvm_cpuid_entry2] {
        try withIoctlArray(kvm_cpuid2.self, kvm_cpuid_entry2.self, count: \.nent, capacity: 256,
                           name: "KVM_GET_SUPPORTED_CPUID") { (a) throws(SysError) -> [kvm_cpuid_entry2] in
            _ = try Sys.ioctl(fd, LK_KVM_GET_SUPPORTED_CPUID, a.raw, "KVM_GET_SUPPORTED_CPUID")
            // SAFETY: `filled` is the entries KVM reported, clamped to the 256 the buffer holds.
            return Array(a.filled)
        }
    }
}

/// A KVM virtual machine: memory slots and vCPUs.
public final class VirtualMachine: @unchecked Sendable {
    public let host: KVMHost
    public let fd: Int32
    public private(set) var memory: GuestMemory?
    private var dirtyTracking = false

    init(host: KVMHost, fd: Int32) { self.host = host; self.fd = fd }
    deinit { Sys.close(fd) }

    /// Registers RAM as slot 0 at guest physical 0, with dirty logging when asked (record, migration).
    public func setMemory(_ mem: GuestMemory, trackDirty: Bool) throws(SysError) {
        // Manual protection first (before the slot logs): a fetch then leaves the pages it reports writable
        // until `clearDirtyLog`, so pages the guest rewrites all the time need not fault after every fetch.
        if trackDirty && host.hasCapability(LK_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) {
            var cap = kvm_enable_cap()
            cap.cap = UInt32(LK_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            cap.args.0 = LK_KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            manualDirtyProtect = (try? Sys.ioctl(fd, LK_KVM_ENABLE_CAP, &cap, "KVM_ENABLE_CAP")) != nil
        }
        var region = kvm_userspace_memory_region(slot: 0, flags: trackDirty ? LK_KVM_MEM_LOG_DIRTY_PAGES : 0,
                                                 guest_phys_addr: 0, memory_size: mem.size,
                                                 userspace_addr: UInt64(UInt(bitPattern: mem.base)))
        _ = try Sys.ioctl(fd, LK_KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION")
        // Real VMX needs a TSS area for real-mode emulation; harmless elsewhere. Placed above 4 GiB - 12 KiB.
        _ = try? Sys.ioctl(fd, LK_KVM_SET_TSS_ADDR, value: 0xFFFB_D000, "KVM_SET_TSS_ADDR")
        memory = mem
        dirtyTracking = trackDirty
    }

    /// Fetches the dirty bitmap of slot 0 (one bit per page) into `bitmap`. Without `manualDirtyProtect` KVM
    /// clears it and write-protects every page it reports; with it, nothing is cleared until `clearDirtyLog`.
    public func fetchDirtyLog(into bitmap: UnsafeMutablePointer<UInt64>) throws(SysError) {
        var log = kvm_dirty_log()
        log.slot = 0
        log.dirty_bitmap = UnsafeMutableRawPointer(bitmap)
        _ = try Sys.ioctl(fd, LK_KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG")
    }

    /// Clears the pages set in `bitmap` (slot 0, `pageCount` bits) from the dirty log and write-protects them,
    /// so their next write is logged. Only with `manualDirtyProtect`.
    public func clearDirtyLog(_ bitmap: UnsafeMutablePointer<UInt64>, pageCount: Int) throws(SysError) {
        var log = kvm_clear_dirty_log()
        log.slot = 0
        log.first_page = 0
        log.num_pages = UInt32(pageCount)
        log.dirty_bitmap = UnsafeMutableRawPointer(bitmap)
        _ = try Sys.ioctl(fd, LK_KVM_CLEAR_DIRTY_LOG, &log, "KVM_CLEAR_DIRTY_LOG")
    }

    /// Whether KVM leaves clearing the dirty log to `clearDirtyLog` (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
    public private(set) var manualDirtyProtect = false

    public var isTrackingDirty: Bool { dirtyTracking }

    public func createVCPU(id: Int) throws(KVMError) -> VCPU {
        do {
            let vfd = Int32(try Sys.ioctl(fd, LK_KVM_CREATE_VCPU, value: UInt(id), "KVM_CREATE_VCPU"))
            guard let run = lk_mmap(nil, host.vcpuMmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, vfd, 0) else {
                Sys.close(vfd)
                throw SysError("mmap kvm_run", errno: lk_last_errno())
            }
            return VCPU(fd: vfd, run: run.assumingMemoryBound(to: kvm_run.self), mmapSize: host.vcpuMmapSize)
        } catch let e as SysError { throw .sys(e) } catch { fatalError("unreachable") }
    }
}
