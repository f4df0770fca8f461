import CLockstep
import Glibc

/// A failed system call: which call, and the errno it returned.
public struct SysError: Error, Equatable, CustomStringConvertible {
    public let call: String
    public let errno: Int32
    public init(_ call: String, errno: Int32) { self.call = call; self.errno = errno }
    public var description: String { "\(call) failed: \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// The seam tests replace to simulate the kernel: make KVM calls fail, or answer them, on purpose.
public protocol SyscallHandler: AnyObject {
    /// The ioctl's result, or -errno.
    func ioctl(fd: Int32, request: UInt, arg: UnsafeMutableRawPointer?, name: String) -> Int
    /// A new fd, or -errno. The default opens for real. A simulated open should still return a real fd
    /// (of /dev/null, say): whoever owns it closes it for real once the handler is gone.
    func open(path: String, flags: Int32) -> Int32
    /// Called for every fd the chokepoint closes; the default closes it.
    func close(fd: Int32)
}

extension SyscallHandler {
    public func open(path: String, flags: Int32) -> Int32 { lk_open(path, flags, 0) }
    public func close(fd: Int32) { _ = Glibc.close(fd) }
}

/// Holds a handler in the C thread-local slot (one retain, released when replaced).
private final class HandlerBox {
    let handler: SyscallHandler
    init(_ h: SyscallHandler) { handler = h }
}

/// The one chokepoint for KVM system calls: every ioctl, and the open and close of KVM fds, goes through
/// here, and failures become `SysError`.
public enum Sys {
    /// The calling thread's handler. Installed by tests only; nil in production (one thread-local load and a
    /// predictable branch). Per thread, so tests running in parallel in one process (and their vCPU threads)
    /// never see each other's mocks. Prefer `withHandler`, which restores the previous one.
    public static var handler: SyscallHandler? {
        get { current }
        set {
            let old = lk_sys_handler()
            lk_set_sys_handler(newValue.map { Unmanaged.passRetained(HandlerBox($0)).toOpaque() })
            if let old { Unmanaged<HandlerBox>.fromOpaque(old).release() }
        }
    }

    /// Runs `body` with `h` installed on this thread, then puts back what was there. `body` must not hop
    /// threads (no `await`): the handler only answers calls made on this one.
    public static func withHandler<R, E: Error>(_ h: SyscallHandler, _ body: () throws(E) -> R) throws(E) -> R {
        let saved = handler
        handler = h
        defer { handler = saved }
        return try body()
    }

    @inline(__always)
    static var current: SyscallHandler? {
        guard let p = lk_sys_handler() else { return nil }
        // SAFETY: the slot only ever holds a HandlerBox retained by the setter above, released only on replace.
        return Unmanaged<HandlerBox>.fromOpaque(p).takeUnretainedValue().handler
    }

    @inline(__always)
    public static func ioctl(_ fd: Int32, _ request: UInt, _ arg: UnsafeMutableRawPointer?, _ name: String) throws(SysError) -> Int {
        let r: Int
        if let h = current { r = h.ioctl(fd: fd, request: request, arg: arg, name: name) } else { r = lk_ioctl(fd, request, arg) }
        if r < 0 { throw SysError(name, errno: Int32(-r)) }
        return r
    }

    @inline(__always)
    public static func ioctl(_ fd: Int32, _ request: UInt, value: UInt, _ name: String) throws(SysError) -> Int {
        let r: Int
        if let h = current { r = h.ioctl(fd: fd, request: request, arg: UnsafeMutableRawPointer(bitPattern: value), name: name) } else { r = lk_ioctl_int(fd, request, value) }
        if r < 0 { throw SysError(name, errno: Int32(-r)) }
        return r
    }

    /// ioctl with a typed argument struct.
    @inline(__always)
    public static func ioctl<T>(_ fd: Int32, _ request: UInt, _ value: inout T, _ name: String) throws(SysError) -> Int {
        // SAFETY: the pointer is only used for the duration of the ioctl, which reads or fills exactly one T.
        let r = withUnsafeMutablePointer(to: &value) { p -> Int in
            if let h = current { return h.ioctl(fd: fd, request: request, arg: UnsafeMutableRawPointer(p), name: name) }
            return lk_ioctl(fd, request, UnsafeMutableRawPointer(p))
        }
        if r < 0 { throw SysError(name, errno: Int32(-r)) }
        return r
    }

    public static func open(_ path: String, _ flags: Int32) throws(SysError) -> Int32 {
        let r = current?.open(path: path, flags: flags) ?? lk_open(path, flags, 0)
        if r < 0 { throw SysError("open \(path)", errno: -r) }
        return r
    }

    public static func close(_ fd: Int32) {
        if let h = current { h.close(fd: fd) } else { _ = Glibc.close(fd) }
    }
}
