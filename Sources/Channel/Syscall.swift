#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: the call's name and the errno it left. Every syscall in Channel goes
/// through `sys(_:_:)`, so every OS failure surfaces as exactly this value.
public struct SystemCallError: Error, Equatable, Sendable, CustomStringConvertible {
    public let call: String
    public let errno: Int32
    public init(call: String, errno: Int32) { self.call = call; self.errno = errno }
    public var description: String { "\(call): \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// The syscall chokepoint: runs `body`, retries on EINTR, and throws `SystemCallError` for a
/// negative result, wrapped as `ChannelError.system`. Returns the (non-negative) result.
@inline(__always) @discardableResult
func sys<T: BinaryInteger>(_ call: StaticString, _ body: () -> T) throws -> T {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = Glibc.errno
        if e == EINTR { continue }
        throw ChannelError.system(SystemCallError(call: "\(call)", errno: e))
    }
}
