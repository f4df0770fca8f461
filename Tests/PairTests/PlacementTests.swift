import Foundation
import Machine
import Testing

/// Where a running pair's threads may run (`Cores`): the vCPU thread pins itself before it starts the pacer and
/// the link, and those once inherited its core (the pacer then competed with the guest it paces).
extension PairTests { @Suite struct PlacementTests {
    /// Allowed cores and kernel name of each thread of `pid`, from /proc.
    static func threads(_ pid: Int32) -> [(tid: Int32, name: String, cores: Set<Int32>)] {
        let dir = "/proc/\(pid)/task"
        let tids = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).compactMap { Int32($0) }
        return tids.compactMap { tid in
            guard let name = try? String(contentsOfFile: "\(dir)/\(tid)/comm", encoding: .utf8),
                  let status = try? String(contentsOfFile: "\(dir)/\(tid)/status", encoding: .utf8),
                  let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed_list:") }) else { return nil }
            return (tid, name.trimmingCharacters(in: .whitespacesAndNewlines), cores(String(line.dropFirst(18))))
        }
    }

    /// "0-2,4" → {0, 1, 2, 4}
    static func cores(_ list: String) -> Set<Int32> {
        var out = Set<Int32>()
        for part in list.trimmingCharacters(in: .whitespaces).split(separator: ",") {
            let ends = part.split(separator: "-").compactMap { Int32($0) }
            if let a = ends.first, let b = ends.last, a <= b { out.formUnion(a...b) }
        }
        return out
    }

    /// Also after a re-protect, whose link thread the (pinned) vCPU thread starts.
    @Test func theVCPUThePacerAndTheLinkRunWhereTheySay() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        guard let vcpu = Cores.vcpu, let pacer = Cores.housekeeping else {
            print("skipped: this process may use one core (\(Cores.list)); nothing is pinned"); return
        }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let udp = try PairFixture.freeUDPPort()
        // No --link-cpu: the primary's link thread, started by the pinned vCPU thread, may use every core.
        let (pri, sec, port) = try FailoverTests.startPair(ws, udp: udp)
        let all = Set(Cores.all)
        let pid = pri.process.processIdentifier
        func check(_ when: String) {
            // A thread names and places itself once it runs: the pacer may start just after the line that said
            // the pair is protected. So the threads are read again (every 10 ms, for at most 10 s) until all are there.
            let deadline = Date().addingTimeInterval(10)
            var t = Self.threads(pid)
            func placed() -> (vcpu: Bool, pacer: Bool, link: Bool) {
                (t.first { $0.tid == pid }?.cores == [vcpu], t.first { $0.name == "lk-pacer" }?.cores == [pacer],
                 t.contains { $0.name == "lk-link" } && t.allSatisfy { $0.name != "lk-link" || $0.cores == all })
            }
            while placed() != (true, true, true), Date() < deadline {
                usleep(10_000)  // re-read /proc: a thread's start leaves no other trace to wait on
                t = Self.threads(pid)
            }
            let p = placed()
            #expect(p.vcpu, "\(when): vCPU thread: \(t)")
            #expect(p.pacer, "\(when): pacer: \(t)")
            #expect(p.link, "\(when): link thread: \(t)")
        }
        check("first secondary")
        sec.kill9()
        try pri.waitForLine(containing: "continuing unprotected", seconds: 10)
        let sec2 = try Child("secondary-2", ["secondary", "--listen", "127.0.0.1:\(port)", "--serial", "udp:127.0.0.1:\(udp)"] + PairFixture.common(ws))
        try pri.waitForLine(containing: "protected: secondary", occurrence: 2, seconds: 20)
        check("second secondary")
        let client = EchoClient(port: udp)
        _ = client.request("QUIT", expect: "RESULT echo")
        #expect(try pri.wait(seconds: 30) == 0, "\(pri.stderrText)")
        #expect(try sec2.wait(seconds: 30) == 0, "\(sec2.stderrText)")
    }
} }
