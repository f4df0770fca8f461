import CLockstep
import Foundation
import Glibc

/// Starts `lockstep` children (the bench harness's pairs, a supervisor's primary or secondary) as a shell
/// would: no blocked signals, and the signals this process catches or ignores back at their defaults.
enum Spawn {
    enum FileAction {
        /// Open `path` as descriptor `fd`.
        case open(Int32, String, Int32)
        /// Give the child `from` as descriptor `to` (inherited across exec).
        case dup(Int32, to: Int32)
    }

    struct Failure: Error, CustomStringConvertible { let description: String }

    /// This executable, to start again with other arguments.
    static var selfExecutable: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// `environment` is added to this process's. `cpu`: the only core the child may use (it inherits the
    /// spawning thread's mask, set for the call).
    static func start(_ exe: String, _ args: [String], files: [FileAction], environment: [String: String] = [:],
                      cpu: Int32? = nil) throws(Failure) -> pid_t {
        var fa = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fa)
        defer { posix_spawn_file_actions_destroy(&fa) }
        for f in files {
            switch f {
            case .open(let fd, let path, let flags): posix_spawn_file_actions_addopen(&fa, fd, path, flags, 0o644)
            case .dup(let from, let to): posix_spawn_file_actions_adddup2(&fa, from, to)
            }
        }
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var none = sigset_t(), dfl = sigset_t()
        sigemptyset(&none); sigemptyset(&dfl)
        // SIGINT and SIGHUP keep this process's disposition: ignored stays ignored (nohup, a shell's `&`), a
        // handler becomes the default at exec anyway.
        for s in [SIGPIPE, SIGTERM, SIGUSR2] { sigaddset(&dfl, s) }
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setsigdefault(&attr, &dfl)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv: [UnsafeMutablePointer<CChar>?] = ([exe] + args).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        let env = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let envp: [UnsafeMutablePointer<CChar>?] = env.map { strdup("\($0)=\($1)") } + [nil]
        defer { for e in envp { free(e) } }
        var p: pid_t = 0
        if let cpu, lk_pin_current_thread(cpu) != 0 { throw Failure(description: "cannot run \(exe) on core \(cpu)") }
        let rc = posix_spawn(&p, exe, &fa, &attr, argv, envp)
        if cpu != nil { _ = lk_unpin_current_thread() }
        guard rc == 0 else { throw Failure(description: "cannot start \(exe): \(String(cString: strerror(rc)))") }
        return p
    }

    /// A wait status as the shell tells it: the exit code, or nil and the signal.
    static func decode(_ st: Int32) -> (code: Int32?, signal: Int32) {
        st & 0x7f == 0 ? ((st >> 8) & 0xff, 0) : (nil, st & 0x7f)
    }
}
