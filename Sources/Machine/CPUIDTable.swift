import CLockstep
import KVM

/// The CPUID table every Lockstep guest sees: the host's supported leaves clamped to a fixed baseline,
/// with every untrapped source of nondeterminism hidden (RDRAND, RDSEED, TSC-deadline, kvmclock leaves).
/// Both hosts of a pair compute it and compare digests; a mismatch refuses the pair/replay.
/// PVM ignores KVM_SET_CPUID2 (the guest sees raw host CPUID); real VMX/SVM hosts honour it.
public enum CPUIDTable {
    // Leaf 1 EDX: FPU VME DE PSE TSC MSR PAE MCE CX8 SEP MTRR PGE MCA CMOV PAT PSE36 CLFSH MMX FXSR SSE SSE2 (no APIC: there is no LAPIC).
    static let leaf1EDX: UInt32 = 0b0000_0111_1000_1011_1111_1101_1111_1111 & ~(1 << 9)
    // Leaf 1 ECX: SSE3 PCLMULQDQ SSSE3 CX16 SSE4.1 SSE4.2 POPCNT HYPERVISOR. Not RDRAND (30), TSC-deadline (24), x2APIC (21), XSAVE/AVX.
    static let leaf1ECX: UInt32 = (1 << 0) | (1 << 1) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 31)
    // 0x80000001 EDX: SYSCALL(11) NX(20) LM(29); ECX: LAHF(0).
    static let ext1EDX: UInt32 = (1 << 11) | (1 << 20) | (1 << 29)
    static let ext1ECX: UInt32 = 1 << 0

    public static func pinned(from host: [kvm_cpuid_entry2]) -> [kvm_cpuid_entry2] {
        var out: [kvm_cpuid_entry2] = []
        for var e in host {
            switch e.function {
            case 0x4000_0000...0x4FFF_FFFF: continue // KVM paravirt leaves: kvmclock must not be visible
            // Topology leaves carry the APIC ID of whichever host core answered (PVM passes them through):
            // not the same twice, let alone on two hosts. One vCPU needs no topology.
            case 0x4, 0xB, 0x1F, 0x8000_001E, 0x8000_0026: continue
            case 1:
                e.edx &= leaf1EDX; e.ecx &= leaf1ECX
                e.ebx &= 0x0000_FFFF // no initial APIC ID / logical count
            case 6: e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0 // no thermal/power features (APERF/MPERF)
            case 7: e.ebx = 0; e.ecx = 0; e.edx = 0          // no RDSEED, no extended features
            case 0xD: e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0 // no XSAVE components
            case 0x8000_0001: e.edx &= ext1EDX; e.ecx &= ext1ECX
            case 0x8000_0007: e.edx &= (1 << 8) // invariant TSC only
            default: break
            }
            out.append(e)
        }
        return out
    }

    /// SHA-256 of this host's pinned table: recorded in log headers and compared before replay.
    public static func hostDigest() throws(MachineError) -> [UInt8] {
        do {
            let host = try KVMHost()
            return StateDigest.sha256(canonicalBytes(pinned(from: try host.supportedCPUID())))
        } catch let e as KVMError { throw .kvm(e) } catch let e as SysError { throw .sys(e) } catch { throw .config("\(error)") }
    }

    /// Bytes fed to the table digest: (function, index, eax, ebx, ecx, edx) little-endian per entry.
    public static func canonicalBytes(_ table: [kvm_cpuid_entry2]) -> [UInt8] {
        var b: [UInt8] = []
        for e in table {
            for v in [e.function, e.index, e.eax, e.ebx, e.ecx, e.edx] { for i in 0..<4 { b.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
        }
        return b
    }
}
