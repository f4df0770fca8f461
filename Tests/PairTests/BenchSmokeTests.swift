import Foundation
import Machine
import Testing

/// `lockstep bench pair`, the harness users run, end to end at its smallest: every phase runs, the two sides'
/// digests agree, the failover trial is answered, two supervised sides come back after kill -9, and the JSON
/// holds each figure. With two cores it runs the
/// secondary on a core of its own, polling, so the pinned spawn and `--link-poll-us` are exercised too.
extension PairTests { @Suite struct BenchSmokeTests {
    @Test func benchPairRunsEveryPhase() throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let ws = try PairFixture.workspace()
        defer { try? FileManager.default.removeItem(atPath: ws.dir) }
        let json = ws.dir + "/pair.json"
        let split = Cores.count >= 2 ? ["--secondary-cpu", "\(Cores.housekeeping!)", "--link-cpu", "\(Cores.housekeeping!)", "--link-poll-us", "5000"] : []
        _ = try PairFixture.guest("echo")  // builds the guests
        let bench = try Child("bench", ["bench", "pair", "--guests", PairFixture.root.appendingPathComponent("Guests/build").path,
                                        "--json", json, "--trials", "1", "--reseeds", "0", "--restarts", "2", "--requests", "50", "--memory", "64"] + split,
                              captureStdout: true)
        let status = try bench.wait(seconds: 300)
        let report = try PairFixture.jsonObject(json)
        #expect(status == 0 && report?["ok"] as? Bool == true, "bench pair ended with \(status):\n\(bench.stderrText)")
        let figures = report?["figures"] as? [String: Any] ?? [:]
        for key in ["timer_compute_throughput_ratio", "timer_compute_replication_lag_p50_us", "exit_heavy_replication_lag_p50_us",
                    "echo_throughput_ratio", "echo_gate_latency_p50_us", "failover_kill_to_reply_p99_ms",
                    "restart_kill_to_protected_p50_ms"] {
            #expect(figures[key] != nil, "no \(key) in \(figures.keys.sorted())")
        }
        let placement = (report?["settings"] as? [String: Any])?["placement"] as? [String: Any]
        if !split.isEmpty { #expect(placement?["link_poll_us"] as? Int == 5000, "\(String(describing: placement))") }
    }

    /// Options it cannot use are usage errors (exit 64) naming the option, before anything starts.
    @Test(arguments: [(["--encrypt", "bogus"], "--encrypt bogus: use disabled, opportunistic or required"),
                      (["--secondary-cpu", "4096"], "--secondary-cpu 4096: none, or one of this process's cores"),
                      (["--link-poll-us", "2000000"], "--link-poll-us 2000000: at most 1000000")])
    func benchPairRefusesBadOptions(args: [String], message: String) throws {
        if let why = PairFixture.skipReason { print("skipped: \(why)"); return }
        let bench = try Child("bench", ["bench", "pair"] + args, captureStdout: true)
        #expect(try bench.wait(seconds: 30) == 64, "\(bench.stderrText)")
        #expect(bench.stderrText.contains(message), "\(bench.stderrText)")
    }
} }
