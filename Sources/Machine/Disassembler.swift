import CLockstep
import CCapstone
import KVM

/// Reads guest code at the vCPU's RIP (walking the guest's page tables) and disassembles it with capstone,
/// for divergence reports and `lockstep log inspect`.
public enum Disassembler {
    /// Guest virtual → physical through the 4-level tables at CR3 (identity when paging is off).
    public static func translate(_ va: UInt64, sregs: kvm_sregs, memory: GuestMemory) -> UInt64? {
        guard sregs.cr0 & (1 << 31) != 0 else { return va & 0xFFFF_FFFF }
        guard sregs.efer & (1 << 10) != 0 else { return nil } // legacy paging: not used by PVH guests
        var table = sregs.cr3 & 0x000F_FFFF_FFFF_F000
        for level in stride(from: 3, through: 0, by: -1) {
            let index = (va >> (12 + 9 * UInt64(level))) & 0x1FF
            guard let entry = try? memory.load(table + index * 8, as: UInt64.self), entry & 1 != 0 else { return nil }
            let frame = entry & 0x000F_FFFF_FFFF_F000
            if level == 0 { return frame | (va & 0xFFF) }
            if entry & 0x80 != 0, level <= 2 { // 1 GiB or 2 MiB page
                let span: UInt64 = 1 << (12 + 9 * UInt64(level))
                return (frame & ~(span - 1)) | (va & (span - 1))
            }
            table = frame
        }
        return nil
    }

    /// Up to `count` instructions starting at the vCPU's RIP, one "0xADDR: mnemonic operands" line each.
    public static func around(vcpu: VCPU, memory: GuestMemory, count: Int = 4) -> [String] {
        guard let regs = try? vcpu.regs(), let sregs = try? vcpu.sregs() else { return ["(vCPU state unavailable)"] }
        return disassemble(at: regs.rip, sregs: sregs, memory: memory, count: count)
    }

    public static func disassemble(at rip: UInt64, sregs: kvm_sregs, memory: GuestMemory, count: Int) -> [String] {
        guard let pa = translate(rip, sregs: sregs, memory: memory) else { return ["0x\(String(rip, radix: 16)): (not mapped)"] }
        let n = Int(min(64, memory.size - min(pa, memory.size)))
        guard n > 0, let code = try? memory.read(pa, count: n) else { return ["0x\(String(rip, radix: 16)): (outside RAM)"] }
        let long = sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0
        var handle: csh = 0
        guard cs_open(CS_ARCH_X86, long ? CS_MODE_64 : CS_MODE_32, &handle) == CS_ERR_OK else { return ["(capstone unavailable)"] }
        defer { cs_close(&handle) }
        var insn: UnsafeMutablePointer<cs_insn>?
        let got = code.withUnsafeBufferPointer { cs_disasm(handle, $0.baseAddress, $0.count, rip, count, &insn) }
        guard got > 0, let insn else { return ["0x\(String(rip, radix: 16)): (undecodable bytes \(code.prefix(8).map { String($0, radix: 16) }.joined(separator: " ")))"] }
        defer { cs_free(insn, got) }
        return (0..<got).map { i in
            // SAFETY: capstone returned `got` initialised instructions at insn.
            var ins = insn[i]
            let mnemonic = withUnsafeBytes(of: &ins.mnemonic) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            let ops = withUnsafeBytes(of: &ins.op_str) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            return "0x\(String(ins.address, radix: 16)): \(mnemonic) \(ops)".trimmingSuffixSpaces()
        }
    }
}

extension String {
    func trimmingSuffixSpaces() -> String {
        var s = self
        while s.last == " " { s.removeLast() }
        return s
    }
}
