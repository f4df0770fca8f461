import CLockstep
import Glibc

/// A failed system call: which call, and the errno it returned.
public struct SysError: Error, Equatable, CustomStringConvertible {
    public let call: String
    public let errno: Int32
    public init(_ call: String, errno: Int32) { self.call = call; self.errno = errno }
    public var description: String { "\(call) failed: \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// The seam tests replace to make KVM calls fail on purpose.
public protocol SyscallHandler: AnyObject {
    func ioctl(fd: Int32, request: UInt, arg: UnsafeMutableRawPointer?, name: String) -> Int
}

/// The one chokepoint for KVM system calls: every ioctl goes through here and failures become `SysError`.
public enum Sys {
    /// Installed by tests only; nil in production (the branch is predictable and free).
    nonisolated(unsafe) public static var handler: SyscallHandler?

    @inline(__always)
    public static func ioctl(_ fd: Int32, _ request: UInt, _ arg: UnsafeMutableRawPointer?, _ name: String) throws(SysError) -> Int {
        let r: Int
        if let h = handler { r = h.ioctl(fd: fd, request: request, arg: arg, name: name) } else { r = lk_ioctl(fd, request, arg) }
        if r < 0 { throw SysError(name, errno: Int32(-r)) }
        return r
    }

    @inline(__always)
    public static func ioctl(_ fd: Int32, _ request: UInt, value: UInt, _ name: String) throws(SysError) -> Int {
        let r: Int
        if let h = handler { r = h.ioctl(fd: fd, request: request, arg: UnsafeMutableRawPointer(bitPattern: value), name: name) } else { r = lk_ioctl_int(fd, request, value) }
        if r < 0 { throw SysError(name, errno: Int32(-r)) }
        return r
    }

    /// ioctl with a typed argument struct.
    @inline(__always)
    public static func ioctl<T>(_ fd: Int32, _ request: UInt, _ value: inout T, _ name: String) throws(SysError) -> Int {
        // SAFETY: the pointer is only used for the duration of the ioctl, which reads or fills exactly one T.
        let r = withUnsafeMutablePointer(to: &value) { p -> Int in
            if let h = handler { return h.ioctl(fd: fd, request: request, arg: UnsafeMutableRawPointer(p), name: name) }
            return lk_ioctl(fd, request, UnsafeMutableRawPointer(p))
        }
        if r < 0 { throw SysError(name, errno: Int32(-r)) }
        return r
    }

    public static func open(_ path: String, _ flags: Int32) throws(SysError) -> Int32 {
        let r = lk_open(path, flags, 0)
        if r < 0 { throw SysError("open \(path)", errno: -r) }
        return r
    }

    public static func close(_ fd: Int32) { _ = Glibc.close(fd) }
}
