import CLockstep
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What a process run by `lockstep supervise` tells its supervisor that an exit status cannot: a guest's own
/// exit value overlaps the engine's statuses, and whether a primary's guest ever ran protected decides the
/// role it restarts in. One text line per event on the pipe the supervisor passed as `LOCKSTEP_SUPERVISOR_FD`
/// (a write under PIPE_BUF is atomic, so a kill -9 never leaves half a line):
///   `protected`        a secondary confirmed a seed: the guest runs, and output may leave
///   `seeded`           this secondary's seed matched its primary's digest: it protects the guest
///   `ended STATUS`     the pair ended (the guest exited, crashed, or an operator stopped it): no restart
///   `peer HOST:PORT`   the peer address moved (the operator's `lockstep control SOCKET peer`, or a migration
///                      that made the secondary at HOST:PORT this side's primary): restarts take it
///   `moved HOST:PORT`  this side moved the guest there (`lockstep control SOCKET migrate`) and left the pair
///
/// A supervised process dies with its supervisor (SIGKILL on the parent's death, `LOCKSTEP_SUPERVISOR_PID`):
/// a side is its supervisor and its process, and killing either loses that side, so the other side fails
/// over or restarts as it would after a kill -9 of the process. An orphan left running would meet its
/// supervisor's next start (or its init's clean-up SIGTERM, which would stop an unprotected guest for good).
public enum SupervisorReport {
    public static let environmentName = "LOCKSTEP_SUPERVISOR_FD"
    public static let parentEnvironmentName = "LOCKSTEP_SUPERVISOR_PID"
    /// The descriptor a supervisor gives its child for the pipe.
    public static let childDescriptor: Int32 = 3

    private static let fd: Int32? = {
        let parent = getenv(parentEnvironmentName).map { String(cString: $0) }.flatMap { Int32($0) }
        unsetenv(parentEnvironmentName)
        guard let v = getenv(environmentName).map({ String(cString: $0) }), let fd = Int32(v), fd > 2 else { return nil }
        // Neither the descriptor nor the variable reaches anything this process starts.
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        unsetenv(environmentName)
        if let parent {
            let r = lk_die_with_parent(parent)
            if r == -ESRCH {
                FileHandle.standardError.write(Data("lockstep: the supervisor that started this process (pid \(parent)) is gone; stopping\n".utf8))
                kill(getpid(), SIGKILL)
            }
            if r < 0 { FileHandle.standardError.write(Data("lockstep: cannot tie this process to its supervisor: \(String(cString: strerror(-r)))\n".utf8)) }
        }
        return fd
    }()

    /// Takes the supervisor's pipe, if any, before anything else runs (so no other process inherits it), and
    /// ties this process's life to the supervisor's.
    public static func adopt() { _ = fd }

    public static func protected() { send("protected") }
    public static func seeded() { send("seeded") }
    public static func ended(_ status: Int32) { send("ended \(status)") }
    public static func peer(_ address: String) { send("peer \(address)") }
    public static func moved(to address: String) { send("moved \(address)") }

    private static func send(_ line: String) {
        guard let fd else { return }
        let bytes = Array((line + "\n").utf8)
        // A supervisor that is gone (EPIPE, SIGPIPE ignored) or an fd that was never a pipe: nothing to tell.
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}
