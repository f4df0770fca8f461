import Foundation
import Glibc
import Testing

extension PairTests {

/// `scripts/lab-netns.sh`, the two-host lab on one machine, run as a user would: the primary and the
/// secondary in network namespaces of their own, the FT link between them delayed, jittery and lossy, a kill -9 of
/// the primary mid-conversation. Where the kernel has no netem (this project's sandbox and CI), the link
/// goes through `scripts/link-impair.py`, so that is tested too.
@Suite struct LabTests {
    static var skipReason: String? {
        if let why = PairFixture.skipReason { return why }
        if getuid() != 0 { return "the namespace lab needs root (network namespaces, TAP devices)" }
        if !FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") { return "no /usr/bin/python3: apt-get install python3" }
        if !["/usr/sbin/ip", "/usr/bin/ip", "/sbin/ip", "/bin/ip"].contains(where: FileManager.default.isExecutableFile(atPath:)) {
            return "no ip(8): apt-get install iproute2"
        }
        if access("/dev/net/tun", R_OK | W_OK) != 0 { return "/dev/net/tun is missing: the kernel has no TUN/TAP" }
        return nil
    }

    /// Jitter reorders frames (as netem's does): the impairer counts them, and the pair fails over all the same.
    @Test func thePairFailsOverAcrossADelayedJitteryLossyLink() throws {
        if let why = Self.skipReason { print("skipped: \(why)"); return }
        let script = PairFixture.root.appendingPathComponent("scripts/lab-netns.sh").path
        let guests = URL(fileURLWithPath: try PairFixture.guest("echo")).deletingLastPathComponent().path
        let lab = try Child("lab-netns", ["--delay-ms", "1", "--jitter-ms", "0.5", "--loss-pct", "1", "--impair", "tap", "--requests", "100",
                                          "--guests", guests],
                            captureStdout: true, launcher: ["/bin/bash", script, "--lockstep"])
        // Bounded: the client gives the survivor 10 s, the script gives it 120 s to end.
        let status = try lab.wait(seconds: 180)
        #expect(status == 0, "\(lab.stderrText)")
        #expect(lab.stderr.contains { $0.contains("through link-impair.py (TAP devices): delay 1 ms ± 0.5 ms, loss 1 % each way") }, "\(lab.stderrText)")
        #expect(lab.stderr.contains { $0.contains("100 requests through the primary") }, "\(lab.stderrText)")
        #expect(lab.stderr.contains { $0.contains("first survivor reply") && $0.contains("(n=101, expected 101)") }, "\(lab.stderrText)")
        // "a->b N frames, D dropped, R reordered, ...; b->a ...": both directions reordered some.
        let frames = lab.stderr.first { $0.hasPrefix("lab-netns: FT link frames: a->b ") } ?? ""
        let words = frames.split(separator: " ")
        let reordered = words.indices.dropFirst().filter { words[$0].hasPrefix("reordered") }.compactMap { Int(words[$0 - 1]) }
        #expect(reordered.count == 2 && reordered.allSatisfy { $0 > 0 }, "\(lab.stderrText)")
        #expect(lab.stderr.contains { $0.contains("OK: the survivor took over and ran the guest to its end") }, "\(lab.stderrText)")
    }

    /// The impairer refuses what it cannot do, naming it: a malformed end, a delay out of range, a namespace
    /// that does not exist (its TAP device is not left behind).
    @Test func theImpairerRefusesBadInputClearly() throws {
        if let why = Self.skipReason { print("skipped: \(why)"); return }
        let script = PairFixture.root.appendingPathComponent("scripts/link-impair.py").path
        let cases: [([String], Int32, String)] = [
            (["--a", "lkA", "--b", "lkB:x"], 2, "argument --a: 'lkA': want NAMESPACE:INTERFACE"),
            (["--a", "A:x", "--b", "B:y", "--delay-ms", "-1"], 1, "--delay-ms -1.0: want 0 to 10000"),
            (["--a", "A:x", "--b", "B:y", "--jitter-ms", "20000"], 1, "--jitter-ms 20000.0: want 0 to 10000"),
            (["--a", "lockstep-no-such-ns:lkimpx", "--b", "B:y"], 1, "cannot move lkimpx into namespace lockstep-no-such-ns"),
        ]
        for (args, status, text) in cases {
            // Child passes the lockstep binary before the arguments: sh takes it as $0 and drops it.
            let p = try Child("link-impair", args, launcher: ["/bin/sh", "-c", "exec /usr/bin/python3 \(script) \"$@\""])
            #expect(try p.wait(seconds: 30) == status, "\(args): \(p.stderrText)")
            #expect(p.stderrText.contains(text), "\(args): \(p.stderrText)")
        }
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/lkimpx"))
    }

    /// The guest run to its end over a link that drops 5 % of its frames: the pair stays in lockstep (same
    /// state digest), and the primary's figures count the TCP segments the losses made it send again.
    @Test func aLossyLinkShowsInTheFiguresNotInTheGuest() throws {
        if let why = Self.skipReason { print("skipped: \(why)"); return }
        let script = PairFixture.root.appendingPathComponent("scripts/lab-netns.sh").path
        let guests = URL(fileURLWithPath: try PairFixture.guest("echo")).deletingLastPathComponent().path
        let lab = try Child("lab-netns", ["--delay-ms", "1", "--loss-pct", "5", "--impair", "tap", "--requests", "300",
                                          "--no-kill", "--guests", guests],
                            captureStdout: true, launcher: ["/bin/bash", script, "--lockstep"])
        #expect(try lab.wait(seconds: 180) == 0, "\(lab.stderrText)")
        #expect(lab.stderr.contains { $0.hasPrefix("lab-netns: replication lag (append -> ack) p50 ") }, "\(lab.stderrText)")
        let resent = lab.stderr.compactMap { line -> Int? in
            guard let r = line.range(of: " TCP segments sent again by the primary") else { return nil }
            return Int(line[..<r.lowerBound].split(separator: " ").last ?? "")
        }.first
        #expect((resent ?? 0) > 0, "\(lab.stderrText)")
        // In lockstep to the end, or (a false alarm, rare with the retransmission floor) re-seeded or ended with the guest.
        #expect(lab.stderr.contains { $0.hasPrefix("lab-netns: OK: ") }, "\(lab.stderrText)")
    }
}

}
