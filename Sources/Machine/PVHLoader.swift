import CLockstep
import KVM

/// Why a guest image cannot be booted. Each case names the problem.
public enum ImageError: Error, Equatable, CustomStringConvertible {
    case unreadable(path: String, detail: String)
    case notELF
    case notELF64x86
    case notExecutable(type: UInt16)
    case malformed(String)
    case noPVHNote
    case doesNotFit(segmentEnd: UInt64, memory: UInt64)
    case entryOutside(UInt64)

    public var description: String {
        switch self {
        case .unreadable(let p, let d): return "cannot read guest image \(p): \(d)"
        case .notELF: return "guest image is not an ELF file (bad magic)"
        case .notELF64x86: return "guest image is not a 64-bit little-endian x86-64 ELF"
        case .notExecutable(let t): return "guest image is an ELF of type \(t), not an executable (ET_EXEC)"
        case .malformed(let d): return "guest image is malformed: \(d)"
        case .noPVHNote: return "guest image has no PVH entry note (Xen ELF note type 18, XEN_ELFNOTE_PHYS32_ENTRY); Lockstep boots PVH guests only"
        case .doesNotFit(let end, let mem):
            return "guest image needs memory up to 0x\(String(end, radix: 16)) but the machine has \(mem >> 20) MiB; raise --memory"
        case .entryOutside(let e): return "PVH entry 0x\(String(e, radix: 16)) is not inside a loaded segment"
        }
    }
}

/// An ELF64 image parsed for PVH direct boot.
public struct PVHImage: Sendable {
    public struct Segment: Sendable { public let fileOffset: Int; public let fileSize: Int; public let paddr: UInt64; public let memSize: UInt64 }
    public let bytes: [UInt8]
    public let segments: [Segment]
    public let entry32: UInt32

    public init(bytes: [UInt8]) throws(ImageError) {
        self.bytes = bytes
        guard bytes.count >= 64, bytes[0] == 0x7F, bytes[1] == 0x45, bytes[2] == 0x4C, bytes[3] == 0x46 else { throw .notELF }
        guard bytes[4] == 2, bytes[5] == 1, PVHImage.u16(bytes, 18) == 62 else { throw .notELF64x86 }
        let type = PVHImage.u16(bytes, 16)
        guard type == 2 else { throw .notExecutable(type: type) }
        let phoff = Int(truncatingIfNeeded: PVHImage.u64(bytes, 32))
        let phentsize = Int(PVHImage.u16(bytes, 54)), phnum = Int(PVHImage.u16(bytes, 56))
        guard phentsize >= 56, phnum > 0, phnum < 4096, phoff > 0,
              phoff <= bytes.count, phnum * phentsize <= bytes.count - phoff else {
            throw .malformed("program header table out of bounds")
        }
        var segs: [Segment] = []
        var entry: UInt32?
        for i in 0..<phnum {
            let h = phoff + i * phentsize
            let ptype = PVHImage.u32(bytes, h)
            let off = PVHImage.u64(bytes, h + 8), paddr = PVHImage.u64(bytes, h + 24)
            let filesz = PVHImage.u64(bytes, h + 32), memsz = PVHImage.u64(bytes, h + 40)
            guard off <= UInt64(bytes.count), filesz <= UInt64(bytes.count) - off else {
                throw .malformed("segment \(i) lies outside the file")
            }
            if ptype == 1 { // PT_LOAD
                guard memsz >= filesz, paddr <= UInt64.max - memsz else { throw .malformed("segment \(i) has invalid sizes") }
                segs.append(Segment(fileOffset: Int(off), fileSize: Int(filesz), paddr: paddr, memSize: memsz))
            } else if ptype == 4 { // PT_NOTE
                if let e = try PVHImage.findPVHNote(bytes, start: Int(off), size: Int(filesz)) { entry = e }
            }
        }
        guard !segs.isEmpty else { throw .malformed("no loadable segment") }
        guard let e = entry else { throw .noPVHNote }
        guard segs.contains(where: { UInt64(e) >= $0.paddr && UInt64(e) < $0.paddr + $0.memSize }) else { throw .entryOutside(UInt64(e)) }
        segments = segs
        entry32 = e
    }

    static func findPVHNote(_ b: [UInt8], start: Int, size: Int) throws(ImageError) -> UInt32? {
        var p = start
        let end = start + size
        while end - p >= 12 {
            let namesz = Int(u32(b, p)), descsz = Int(u32(b, p + 4)), type = u32(b, p + 8)
            let nameOff = p + 12, descOff = nameOff + ((namesz + 3) & ~3)
            guard namesz < 256, descsz < 65536, descOff + ((descsz + 3) & ~3) <= end else { throw .malformed("ELF note at offset \(p) overruns its segment") }
            if type == 18, namesz >= 3, b[nameOff] == 0x58, b[nameOff + 1] == 0x65, b[nameOff + 2] == 0x6E { // "Xen"
                guard descsz >= 4 else { throw .malformed("PVH note is shorter than 4 bytes") }
                return u32(b, descOff)
            }
            p = descOff + ((descsz + 3) & ~3)
        }
        return nil
    }

    /// Highest guest physical address the image occupies.
    public var end: UInt64 { segments.map { $0.paddr + $0.memSize }.max() ?? 0 }

    static func u16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
    static func u32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * UInt32($1)) } }
    static func u64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * UInt64($1)) } }
}

/// Places a PVH image in guest RAM and prepares the boot state (flat 32-bit protected mode, EBX -> hvm_start_info).
public enum PVHLoader {
    /// Where the loader puts its boot structures (below the 1 MiB image base, above the real-mode IVT/BDA area).
    static let startInfoAddress: UInt64 = 0x6000
    static let memmapAddress: UInt64 = 0x6100
    static let startInfoMagic: UInt32 = 0x336E_C578
    /// The legacy hole (VGA/BIOS) reported as reserved, as on a PC.
    static let holeStart: UInt64 = 0xA0000, holeEnd: UInt64 = 0x100000

    public static func load(_ image: PVHImage, into mem: GuestMemory) throws(ImageError) {
        guard image.end <= mem.size else { throw .doesNotFit(segmentEnd: image.end, memory: mem.size) }
        for s in image.segments {
            guard s.paddr >= holeEnd || s.paddr + s.memSize <= holeStart, s.paddr >= 0x8000 || s.paddr + s.memSize <= startInfoAddress else {
                throw .malformed("segment at 0x\(String(s.paddr, radix: 16)) overlaps the boot area or the legacy hole")
            }
            let ok = image.bytes.withUnsafeBytes { raw in
                (try? mem.write(UnsafeRawBufferPointer(rebasing: raw[s.fileOffset..<s.fileOffset + s.fileSize]), at: s.paddr)) != nil
            }
            guard ok else { throw .doesNotFit(segmentEnd: s.paddr + s.memSize, memory: mem.size) }
            // RAM starts zeroed (anonymous mapping), so the BSS needs no clearing.
        }
        // E820 map: low RAM, legacy hole, RAM above 1 MiB.
        let map: [(UInt64, UInt64, UInt32)] = [(0, holeStart, 1), (holeStart, holeEnd - holeStart, 2), (holeEnd, mem.size - holeEnd, 1)]
        do {
            for (i, e) in map.enumerated() {
                let a = memmapAddress + UInt64(i * 24)
                try mem.store(e.0, at: a); try mem.store(e.1, at: a + 8); try mem.store(e.2, at: a + 16); try mem.store(UInt32(0), at: a + 20)
            }
            // struct hvm_start_info (version 1).
            let s = startInfoAddress
            try mem.store(startInfoMagic, at: s)
            try mem.store(UInt32(1), at: s + 4)      // version
            try mem.store(UInt32(0), at: s + 8)      // flags
            try mem.store(UInt32(0), at: s + 12)     // nr_modules
            try mem.store(UInt64(0), at: s + 16)     // modlist_paddr
            try mem.store(UInt64(0), at: s + 24)     // cmdline_paddr
            try mem.store(UInt64(0), at: s + 32)     // rsdp_paddr
            try mem.store(memmapAddress, at: s + 40) // memmap_paddr
            try mem.store(UInt32(map.count), at: s + 48)
            try mem.store(UInt32(0), at: s + 52)
        } catch { throw .doesNotFit(segmentEnd: memmapAddress + 72, memory: mem.size) }
    }

    /// The pages `load` writes (segment file bytes, boot structures). Every other page of a freshly loaded
    /// machine is zero: RAM is an anonymous mapping.
    static func writtenPages(_ image: PVHImage) -> [Int] {
        var pages: [Int] = []
        func span(_ start: UInt64, _ length: UInt64) {
            guard length > 0 else { return }
            pages += Int(start / 4096)...Int((start + length - 1) / 4096)
        }
        for s in image.segments { span(s.paddr, UInt64(s.fileSize)) }
        span(startInfoAddress, memmapAddress + 72 - startInfoAddress)
        return pages
    }

    /// The PVH boot vCPU state: flat 32-bit protected mode, paging off, interrupts off.
    public static func bootState(vcpu: VCPU, entry: UInt32) throws(SysError) {
        var sregs = try vcpu.sregs()
        func flat(_ sel: UInt16, code: Bool) -> kvm_segment {
            kvm_segment(base: 0, limit: 0xFFFF_FFFF, selector: sel, type: code ? 0xB : 0x3, present: 1, dpl: 0,
                        db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0, padding: 0)
        }
        sregs.cs = flat(0x08, code: true)
        sregs.ds = flat(0x10, code: false); sregs.es = sregs.ds; sregs.ss = sregs.ds; sregs.fs = sregs.ds; sregs.gs = sregs.ds
        sregs.tr = kvm_segment(base: 0, limit: 0x67, selector: 0x18, type: 0xB, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0, padding: 0)
        sregs.cr0 = 0x11 // PE | ET
        sregs.cr4 = 0
        sregs.efer = 0
        try vcpu.setSregs(sregs)
        var regs = kvm_regs()
        regs.rip = UInt64(entry)
        regs.rbx = startInfoAddress
        regs.rflags = 0x2
        try vcpu.setRegs(regs)
    }
}
