import CLockstep
import Glibc

public enum MemoryError: Error, Equatable, CustomStringConvertible {
    case outOfRange(address: UInt64, length: Int, size: UInt64)
    case allocation(bytes: UInt64, errno: Int32)
    public var description: String {
        switch self {
        case .outOfRange(let a, let l, let s):
            return "guest physical range 0x\(String(a, radix: 16))+\(l) is outside RAM (\(s >> 20) MiB)"
        case .allocation(let b, let e):
            return "cannot allocate \(b >> 20) MiB of guest RAM: \(String(cString: strerror(e)))"
        }
    }
}

/// Guest RAM: one anonymous mapping at guest physical 0, registered as KVM slot 0.
public final class GuestMemory: @unchecked Sendable {
    public static let pageSize = 4096
    public let size: UInt64
    public let base: UnsafeMutableRawPointer

    public init(bytes: UInt64) throws(MemoryError) {
        guard let p = lk_mmap(nil, Int(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) else {
            throw .allocation(bytes: bytes, errno: lk_last_errno())
        }
        size = bytes
        base = p
    }

    deinit { munmap(base, Int(size)) }

    public var pageCount: Int { Int(size) / GuestMemory.pageSize }

    @inline(__always) func check(_ address: UInt64, _ length: Int) throws(MemoryError) {
        guard length >= 0, address <= size, UInt64(length) <= size - address else {
            throw .outOfRange(address: address, length: length, size: size)
        }
    }

    public func write(_ bytes: [UInt8], at address: UInt64) throws(MemoryError) {
        try check(address, bytes.count)
        // SAFETY: range checked above against the mapping size.
        bytes.withUnsafeBytes { (base + Int(address)).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at address: UInt64) throws(MemoryError) {
        try check(address, bytes.count)
        guard let src = bytes.baseAddress else { return }
        // SAFETY: range checked above against the mapping size.
        (base + Int(address)).copyMemory(from: src, byteCount: bytes.count)
    }

    public func read(_ address: UInt64, count: Int) throws(MemoryError) -> [UInt8] {
        try check(address, count)
        // SAFETY: range checked above against the mapping size.
        return Array(UnsafeRawBufferPointer(start: base + Int(address), count: count))
    }

    public func store<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws(MemoryError) {
        try check(address, MemoryLayout<T>.size)
        // SAFETY: range checked; storeBytes tolerates unaligned addresses.
        (base + Int(address)).storeBytes(of: value.littleEndian, as: T.self)
    }

    public func load<T: FixedWidthInteger>(_ address: UInt64, as: T.Type) throws(MemoryError) -> T {
        try check(address, MemoryLayout<T>.size)
        // SAFETY: range checked; loadUnaligned tolerates any alignment.
        return T(littleEndian: (base + Int(address)).loadUnaligned(as: T.self))
    }

    /// The whole of RAM, for digests and migration.
    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: Int(size)) }
}
