import CLockstep
import Foundation

/// Where Lockstep's threads run, on a host where the process may use two or more cores: a live vCPU thread
/// on the second of them, the pacer on the first, the FT link threads where `--link-cpu` says, everything
/// else (a standby's replay included) on any. With one core nothing is pinned.
///
/// A thread starts with its creator's CPU mask, and the vCPU thread, once pinned, starts threads of its
/// own (a seed's rounds, a link to a new secondary, the connector): each would silently share the guest's
/// core. So every thread is started by `startThread`, which puts it back on the cores the process began with
/// unless told otherwise.
public enum Cores {
    /// Cores this process may use, as it started (taskset or cgroup limits included).
    public static var count: Int { Int(lk_cpu_count()) }
    /// The live vCPU thread's core.
    public static var vcpu: Int32? { count >= 2 ? lk_allowed_cpu(1) : nil }
    /// The pacer's core.
    public static var housekeeping: Int32? { count >= 2 ? lk_allowed_cpu(0) : nil }
    /// Those cores' numbers, for messages ("0, 1").
    public static var list: String { all.map(String.init).joined(separator: ", ") }
    /// Those cores' numbers.
    public static var all: [Int32] { (0..<Int32(count)).map { lk_allowed_cpu($0) } }
    /// Whether `cpu` is one this process may use.
    public static func allows(_ cpu: Int32) -> Bool { all.contains(cpu) }
    /// Pins the calling thread to `cpu` (nil: leaves it); false when the kernel refuses.
    @discardableResult
    public static func pinCurrentThread(_ cpu: Int32?) -> Bool { cpu.map { lk_pin_current_thread($0) == 0 } ?? true }
}

/// Starts a thread on any of the process's cores (see `Cores`). `name` ("lockstep-pacer") is also the
/// kernel's name, shortened to fit its 15 bytes ("lk-pacer"), for `top -H` and `/proc/PID/task/*/comm`.
public func startThread(_ name: String, stackSize: Int = 0, _ body: @escaping @Sendable () -> Void) {
    let kernelName = String(decoding: ("lk-" + (name.hasPrefix("lockstep-") ? name.dropFirst(9) : Substring(name))).utf8.prefix(15), as: UTF8.self)
    let t = Thread {
        _ = lk_unpin_current_thread()
        lk_set_thread_name(kernelName)
        body()
    }
    t.name = name
    if stackSize > 0 { t.stackSize = stackSize }
    t.start()
}
