import CLockstep
import Glibc

/// The argument of the KVM ioctls that take a fixed header holding an entry count followed by that many
/// fixed-size entries: kvm_cpuid2 + kvm_cpuid_entry2[] (KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2) and
/// kvm_msrs + kvm_msr_entry[] (KVM_GET_MSRS, KVM_SET_MSRS). A view of the buffer `withIoctlArray` owns;
/// valid only inside its closure.
struct IoctlArray<Header, Entry> {
    /// Most entries one buffer may hold: far above KVM's own limits (256 CPUID entries, 255 MSRs a call), so
    /// only a corrupt count gets here, and it then fails as KVM itself would fail it, with E2BIG.
    static var maxEntries: Int { 4096 }

    /// Where the entries start: the header's size rounded up to the entries' alignment, as C's offsetof.
    static var entriesOffset: Int {
        let a = MemoryLayout<Entry>.alignment
        return (MemoryLayout<Header>.size + a - 1) / a * a
    }

    /// The whole buffer, as the ioctl takes it.
    let raw: UnsafeMutableRawPointer
    let header: UnsafeMutablePointer<Header>
    /// Room for as many entries as the buffer was made for.
    let entries: UnsafeMutableBufferPointer<Entry>
    let countField: WritableKeyPath<Header, UInt32>

    /// The header's entry count as the kernel left it, clamped to the room there is.
    var count: Int { min(Int(header.pointee[keyPath: countField]), entries.count) }

    /// The first `count` entries.
    var filled: UnsafeMutableBufferPointer<Entry> { UnsafeMutableBufferPointer(rebasing: entries[..<count]) }
}

/// Runs `body` on a zeroed buffer holding one `Header` and room for `capacity` `Entry`s, the header's count
/// field set to `capacity`. One allocation of exactly that size, freed on return. A capacity over
/// `IoctlArray.maxEntries` throws E2BIG under `name` (the ioctl's) without allocating.
func withIoctlArray<Header, Entry, R>(
    _: Header.Type, _: Entry.Type, count field: WritableKeyPath<Header, UInt32>, capacity: Int, name: String,
    _ body: (IoctlArray<Header, Entry>) throws(SysError) -> R
) throws(SysError) -> R {
    typealias A = IoctlArray<Header, Entry>
    guard capacity >= 0, capacity <= A.maxEntries else { throw SysError(name, errno: E2BIG) }
    let bytes = A.entriesOffset + capacity * MemoryLayout<Entry>.stride
    let raw = UnsafeMutableRawPointer.allocate(
        byteCount: bytes, alignment: max(MemoryLayout<Header>.alignment, MemoryLayout<Entry>.alignment))
    defer { raw.deallocate() }
    raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
    // SAFETY: raw is `bytes` zeroed bytes: one Header at 0, then `capacity` Entries at entriesOffset, which is
    // past the header and aligned for Entry; both are trivial C structs, so zero bytes are valid values of them.
    let header = raw.bindMemory(to: Header.self, capacity: 1)
    let entries = (raw + A.entriesOffset).bindMemory(to: Entry.self, capacity: capacity)
    header.pointee[keyPath: field] = UInt32(capacity)
    return try body(A(raw: raw, header: header, entries: UnsafeMutableBufferPointer(start: entries, count: capacity),
                      countField: field))
}
