import Foundation
import CLockstep
import Glibc

// Child processes and the UDP client of `lockstep bench pair`. Every wait here has a deadline: the harness
// must end even when a child hangs, and it kills what it started before it reports a failure.

func monotonicNs() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Pids of the children still running, so a SIGINT/SIGTERM of the harness can kill them (they would
/// otherwise outlive it: an echo primary waits for input forever).
enum LiveChildren {
    nonisolated(unsafe) private static var pids: Set<pid_t> = []
    private static let lock = NSLock()
    nonisolated(unsafe) private static var sources: [DispatchSourceSignal] = []

    static func add(_ p: pid_t) { lock.lock(); pids.insert(p); lock.unlock() }
    static func remove(_ p: pid_t) { lock.lock(); pids.remove(p); lock.unlock() }

    /// On SIGINT or SIGTERM: SIGKILL every live child, then exit 130.
    static func killOnInterrupt() {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler {
                lock.lock(); let all = pids; lock.unlock()
                for p in all { kill(p, SIGKILL) }
                FileHandle.standardError.write(Data("bench pair: interrupted; killed \(all.count) children\n".utf8))
                exit(130)
            }
            s.resume()
            sources.append(s)
        }
    }
}

/// One spawned `lockstep` process; stdout and stderr go to files.
final class Child {
    let name: String
    let pid: pid_t
    let errPath: String
    let outPath: String
    let startNs = monotonicNs()
    private(set) var endNs: UInt64 = 0
    /// Exit code, or nil when it was ended by `signal`.
    private(set) var code: Int32?
    private(set) var signal: Int32 = 0
    private(set) var ended = false
    /// Peak resident set (KiB) once it ended: guest RAM it touched, buffers, the process itself.
    private(set) var maxRSSKiB = 0
    /// Readable once the child ended (-errno without pidfd_open): waits sleep on it instead of polling, so the
    /// harness does not wake a core every millisecond while the child it measures runs.
    private let pidfd: Int32

    /// `cpu`: the only core the child may use (it inherits the spawning thread's mask, set for the call).
    /// `environment`: added to this process's (fault injection for one child).
    init(name: String, exe: String, args: [String], outPath: String, errPath: String, cpu: Int32? = nil, environment: [String: String] = [:]) throws {
        self.name = name
        self.errPath = errPath
        self.outPath = outPath
        let files: [Spawn.FileAction] = [.open(0, "/dev/null", O_RDONLY), .open(1, outPath, O_WRONLY | O_CREAT | O_TRUNC),
                                         .open(2, errPath, O_WRONLY | O_CREAT | O_TRUNC)]
        let p: pid_t
        do { p = try Spawn.start(exe, args, files: files, environment: environment, cpu: cpu) } catch {
            throw BenchFailure(message: "\(name): \(error)")
        }
        pid = p
        pidfd = lk_pidfd_open(p)
        LiveChildren.add(p)
    }

    deinit { if pidfd >= 0 { close(pidfd) } }

    /// Reaps without blocking; true once the child has ended.
    @discardableResult func reap() -> Bool {
        if ended { return true }
        var st: Int32 = 0
        var usage = rusage()
        let r = wait4(pid, &st, WNOHANG, &usage)
        guard r == pid else { return false }
        endNs = monotonicNs()
        ended = true
        maxRSSKiB = usage.ru_maxrss
        (code, signal) = Spawn.decode(st)
        LiveChildren.remove(pid)
        return true
    }

    func kill9() { if !reap() { kill(pid, SIGKILL) } }

    /// Waits until the child ends or `deadline` passes; true if it ended.
    func wait(until deadline: UInt64) -> Bool {
        while !reap() {
            let now = monotonicNs()
            if now >= deadline { return false }
            if pidfd >= 0 {
                var p = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
                _ = poll(&p, 1, Int32(min((deadline - now) / 1_000_000 + 1, 1000)))
            } else {
                usleep(1000)  // waitpid has no timeout
            }
        }
        return true
    }

    var maxRSSMiB: Double { Double(maxRSSKiB) / 1024 }
    var wallMs: Double { Double((ended ? endNs : monotonicNs()) &- startNs) / 1e6 }
    var endText: String { !ended ? "still running" : code.map { "exit status \($0)" } ?? "killed by signal \(signal)" }
    var stderrText: String { (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "" }
    var stdoutText: String { (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "" }

    /// The last lines of its stderr, for failure reports.
    func tail(_ n: Int = 12) -> String {
        let lines = stderrText.split(separator: "\n", omittingEmptySubsequences: false)
        let t = lines.suffix(n + 1).joined(separator: "\n    ")
        return "  \(name) (pid \(pid), \(endText)), stderr \(errPath):\n    \(t)"
    }

    /// `state-digest: <hex>` (the last such line of its stderr).
    var digest: String? {
        stderrText.split(separator: "\n").last { $0.hasPrefix("state-digest: ") }.map { String($0.dropFirst(14)) }
    }

    /// The guest's run time from `--verbose` ("… in 2243.1 ms"): first vCPU entry to the guest's exit.
    var guestElapsedMs: Double? {
        guard let line = stderrText.split(separator: "\n").last(where: { $0.contains(" kicks in ") }),
              let r = line.range(of: " kicks in ") else { return nil }
        return Double(line[r.upperBound...].split(separator: " ").first ?? "")
    }
}

/// A reply of the echo guest: `REP <seq> <n> <hash16>`.
struct EchoReply {
    var seq: UInt64
    var n: UInt64
    init?(_ line: String) {
        let f = line.split(separator: " ")
        guard f.count == 4, f[0] == "REP", let s = UInt64(f[1]), let n = UInt64(f[2]) else { return nil }
        seq = s; self.n = n
    }
}

/// Nearest-rank percentile of `xs` (nil when empty).
func percentile(_ xs: [Double], _ p: Double) -> Double? {
    guard !xs.isEmpty else { return nil }
    let s = xs.sorted()
    let rank = Int((p / 100 * Double(s.count)).rounded(.up))
    return s[min(max(rank, 1), s.count) - 1]
}
