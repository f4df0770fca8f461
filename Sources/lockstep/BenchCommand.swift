import ArgumentParser
import EventLog
import Foundation
import Machine

/// `lockstep bench`: `record` (the default, so `lockstep bench --repeat 5` keeps working) and `pair`.
/// Why a parent with a default subcommand rather than `pair` under a command with its own options: a parent's
/// options are parsed from the whole command line, so its --json/--guests would swallow the subcommand's.
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure performance: record/replay (`bench record`, the default) or the live pair (`bench pair`).",
        subcommands: [BenchRecordCommand.self, BenchPairCommand.self],
        defaultSubcommand: BenchRecordCommand.self)
}

/// `lockstep bench [record]`: the performance figures of record/replay from one invocation.
///
/// Why a subcommand and not package-benchmark: it needs real guests on /dev/kvm, must run them one at a
/// time on a shared host, and must check correctness (replay digest == record digest) while it measures.
/// Every figure is printed in a table and written, with its target and pass/fail, as one JSON object.
struct BenchRecordCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "record",
        abstract: "Measure exit cost, record/run throughput, log bytes per event, replay speed and sync points.",
        discussion: """
        Runs the guests in --guests (timer-compute, exit-heavy, dirty, clock) one at a time. Logs go to a temporary \
        directory and are deleted. Exits 1 (and prints FAIL) if a replay digest differs from its recording; \
        a missed performance target is reported, not an error.
        """)

    @Option(name: .long, help: "Directory holding the guest ELF images.") var guests: String = "Guests/build"
    @Option(name: .long, help: "Also write every figure as one JSON object to this file.") var json: String?
    @Option(name: .long, help: "Run/record pairs per throughput guest (medians are reported).") var `repeat`: Int = 3
    @Option(name: .long, help: "Guest RAM in MiB.") var memory: UInt32 = 256

    func validate() throws {
        guard `repeat` >= 1 else { throw ValidationError("--repeat must be at least 1") }
    }

    func run() throws {
        var bench: Bench
        do { bench = try Bench(guestDir: guests, memoryMiB: memory) } catch { throw engineExit(error) }
        defer { bench.cleanUp() }
        let report: [String: Any]
        do { report = try bench.measure(repeats: `repeat`) } catch let e as MachineError {
            if case .divergence = e { print("FAIL: replay diverged from its recording") }
            throw engineExit(e)
        } catch let e as BenchFailure {
            print("FAIL: \(e.message)")
            if let json { try? Bench.writeJSON(["ok": false, "failure": e.message, "host": Bench.hostInfo()], to: json) }
            throw ExitCode(1)
        }
        if let json {
            do { try Bench.writeJSON(report, to: json) } catch {
                throw fail("cannot write \(json): \(error.localizedDescription)", .ioError)
            }
            print("JSON written to \(json)")
        }
    }
}

struct BenchFailure: Error { let message: String }

/// A fresh private directory under the system's temporary directory (nil when it cannot be made).
func makeTemporaryDirectory(_ prefix: String) -> String? {
    var template = Array((NSTemporaryDirectory() as NSString).appendingPathComponent("\(prefix)-XXXXXX").utf8CString)
    guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) != nil }) else { return nil }
    return String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// One measured figure with its (optional) target.
struct Figure {
    enum Goal { case atLeast(Double), atMost(Double), none }
    var key: String
    var label: String
    var value: Double
    var unit: String
    var goal: Goal = .none
    var pass: Bool? {
        switch goal {
        case .atLeast(let t): return value >= t
        case .atMost(let t): return value <= t
        case .none: return nil
        }
    }
    var targetText: String {
        switch goal {
        case .atLeast(let t): return "≥ \(Bench.fmt(t))"
        case .atMost(let t): return "≤ \(Bench.fmt(t))"
        case .none: return ""
        }
    }
    var json: [String: Any] {
        var o: [String: Any] = ["label": label, "value": value, "unit": unit]
        switch goal {
        case .atLeast(let t): o["target"] = t; o["target_op"] = ">="
        case .atMost(let t): o["target"] = t; o["target_op"] = "<="
        case .none: o["target"] = NSNull()
        }
        o["pass"] = pass.map { $0 as Any } ?? NSNull()
        return o
    }
}

/// Sizes of one finished log, by frame kind (from the frame headers; see docs/log-format.md).
struct LogSizes {
    var fileBytes: UInt64 = 0
    var headerBytes: UInt64 = 0
    var imageBytes: UInt64 = 0
    var eventFrameBytes: UInt64 = 0
    var eventFrames: UInt64 = 0
    var syncFrameBytes: UInt64 = 0
    var syncFrames: UInt64 = 0
    var trailerAndFooterBytes: UInt64 = 0
    var events: UInt64 = 0

    init(path: String) throws {
        let reader: LogFileReader
        do { reader = try LogFileReader(path: path) } catch { throw MachineError.log(error) }
        fileBytes = reader.size
        headerBytes = reader.firstFrameOffset
        imageBytes = UInt64(reader.header.image.count)
        trailerAndFooterBytes = reader.size - reader.trailerOffset
        events = reader.trailer.eventCount
        // Walk the frame headers: kind at byte 0, payload length (u32 LE) at byte 8.
        let data = try Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped)
        var off = Int(reader.firstFrameOffset)
        let end = Int(reader.trailerOffset)
        while off < end {
            guard off + 16 <= end else { throw BenchFailure(message: "\(path): frame header past the trailer at \(off)") }
            let kind = data[data.startIndex + off]
            var p: UInt32 = 0
            for i in 0..<4 { p |= UInt32(data[data.startIndex + off + 8 + i]) << (8 * i) }
            let len = UInt64(16) + UInt64(p)
            switch kind {
            case 1: eventFrameBytes += len; eventFrames += 1
            case 2: syncFrameBytes += len; syncFrames += 1
            default: throw BenchFailure(message: "\(path): unexpected frame kind \(kind) at \(off)")
            }
            off += Int(len)
        }
    }

    /// Everything after the header (event frames, sync point frames, trailer, footer) per event.
    var totalPerEvent: Double { events == 0 ? 0 : Double(fileBytes - headerBytes) / Double(events) }
    /// Event frames only (their 16-byte frame headers included) per event.
    var eventsOnlyPerEvent: Double { events == 0 ? 0 : Double(eventFrameBytes) / Double(events) }

    var json: [String: Any] {
        ["file_bytes": fileBytes, "header_bytes": headerBytes, "image_bytes": imageBytes,
         "event_frame_bytes": eventFrameBytes, "event_frames": eventFrames,
         "sync_point_frame_bytes": syncFrameBytes, "sync_point_frames": syncFrames,
         "trailer_and_footer_bytes": trailerAndFooterBytes, "events": events,
         "total_bytes_per_event": totalPerEvent, "bytes_per_event_excluding_header_and_sync_points": eventsOnlyPerEvent]
    }
}

struct Bench {
    let guestDir: String
    let memoryMiB: UInt32
    let tempDir: String
    var logCounter = 0

    init(guestDir: String, memoryMiB: UInt32) throws(MachineError) {
        self.guestDir = guestDir
        self.memoryMiB = memoryMiB
        guard let dir = makeTemporaryDirectory("lockstep-bench") else { throw .config("cannot create a temporary directory in \(NSTemporaryDirectory())") }
        tempDir = dir
    }

    func cleanUp() { try? FileManager.default.removeItem(atPath: tempDir) }

    func image(_ name: String) throws(MachineError) -> PVHImage {
        try loadImage((guestDir as NSString).appendingPathComponent("\(name).elf"))
    }

    var config: MachineConfig { MachineConfig(memoryMiB: memoryMiB, interruptLatencyUs: 1000) }

    static func requireExit(_ r: SessionResult, _ what: String) throws {
        guard case .guestExit(let s) = r.ending, s == 0 else {
            throw BenchFailure(message: "\(what) did not end with guest exit status 0 (\(r.ending))")
        }
    }

    func runOnce(_ img: PVHImage, _ name: String) throws -> SessionResult {
        let r = try RunSession(image: img, config: config, output: nil).run()
        try Self.requireExit(r, "run of \(name)")
        return r
    }

    struct Recording { var result: SessionResult; var path: String }

    mutating func recordOnce(_ img: PVHImage, _ name: String) throws -> Recording {
        logCounter += 1
        let path = (tempDir as NSString).appendingPathComponent("\(name)-\(logCounter).log")
        let r = try RecordSession(image: img, config: config, logPath: path, output: nil).run()
        try Self.requireExit(r, "recording of \(name)")
        return Recording(result: r, path: path)
    }

    /// Replays a recording, checks its digest against the recording's, deletes the log.
    func replayAndDelete(_ rec: Recording, _ name: String) throws -> SessionResult {
        defer { try? FileManager.default.removeItem(atPath: rec.path) }
        let r = try ReplaySession(logPath: rec.path, image: nil, output: nil).run()
        guard r.digest == rec.result.digest else {
            throw BenchFailure(message: "replay of \(name): digest \(r.digestHex) != recorded \(rec.result.digestHex)")
        }
        return r
    }

    static func median(_ xs: [UInt64]) -> Double {
        let s = xs.sorted()
        let n = s.count
        return n % 2 == 1 ? Double(s[n / 2]) : (Double(s[n / 2 - 1]) + Double(s[n / 2])) / 2
    }

    static func fmt(_ v: Double) -> String {
        if v == 0 { return "0" }
        if abs(v) >= 1000 { return String(format: "%.0f", v) }
        if abs(v) >= 100 { return String(format: "%.1f", v) }
        if abs(v) >= 10 { return String(format: "%.2f", v) }
        return String(format: "%.3f", v)
    }

    struct Throughput {
        var runs: [SessionResult] = []
        var records: [SessionResult] = []
        var replays: [SessionResult] = []
        var ratio: Double { Bench.median(runs.map(\.elapsedNs)) / Bench.median(records.map(\.elapsedNs)) }
        /// Spread of the pairwise ratios (run i / record i): how much the host's noise moves the figure.
        var pairRatios: [Double] { zip(runs, records).map { Double($0.elapsedNs) / Double($1.elapsedNs) } }
        var replayRatio: Double { Bench.median(records.map(\.elapsedNs)) / Bench.median(replays.map(\.elapsedNs)) }
        var json: [String: Any] {
            ["run_record_pair_ratios": pairRatios, "run_elapsed_ns": runs.map(\.elapsedNs), "record_elapsed_ns": records.map(\.elapsedNs),
             "replay_elapsed_ns": replays.map(\.elapsedNs), "exits": records.first?.exits ?? 0,
             "events": records.first?.events ?? 0, "sync_points": records.map(\.syncPoints),
             "sync_point_pages": records.map(\.syncPointPages), "kicks": records.map(\.kicks),
             "log_bytes": records.map(\.logBytes), "peak_latency_bound_us": records.map(\.peakLatencyBoundUs),
             "record_digests": records.map(\.digestHex)]
        }
    }

    /// Alternates unprotected and recorded runs; replays each recording (digest checked), keeps the
    /// last recording's log if `keepLast` (for the bytes-per-event figures).
    mutating func throughput(_ name: String, repeats: Int, keepLast: Bool) throws -> (Throughput, LogSizes?) {
        let img = try image(name)
        var t = Throughput()
        var sizes: LogSizes?
        for i in 0..<repeats {
            // Alternate which goes first, so warm caches or a neighbour's load burst do not favour one mode.
            if i % 2 == 0 {
                progress("\(name): run \(i + 1)/\(repeats)")
                t.runs.append(try runOnce(img, name))
            }
            progress("\(name): record \(i + 1)/\(repeats)")
            let rec = try recordOnce(img, name)
            t.records.append(rec.result)
            if i % 2 == 1 {
                progress("\(name): run \(i + 1)/\(repeats)")
                t.runs.append(try runOnce(img, name))
            }
            if keepLast && i == repeats - 1 { sizes = try LogSizes(path: rec.path) }
            progress("\(name): replay \(i + 1)/\(repeats)")
            t.replays.append(try replayAndDelete(rec, name))
        }
        return (t, sizes)
    }

    func progress(_ s: String) { FileHandle.standardError.write(Data("bench: \(s)\n".utf8)) }

    mutating func measure(repeats: Int) throws -> [String: Any] {
        let loadStart = Self.hostInfo()["loadavg"] ?? ""
        // 1. Exit round trip: exit-heavy unprotected (median over the repeats).
        let heavyImg = try image("exit-heavy")
        var heavyRuns: [SessionResult] = []
        for i in 0..<repeats {
            progress("exit-heavy: exit cost \(i + 1)/\(repeats)")
            heavyRuns.append(try runOnce(heavyImg, "exit-heavy"))
        }
        let heavyExits = heavyRuns[0].exits
        let usPerExit = Self.median(heavyRuns.map(\.elapsedNs)) / 1000 / Double(max(heavyExits, 1))

        // 2 + 4 + 5. Throughput, replay speed, sync points.
        let (compute, _) = try throughput("timer-compute", repeats: repeats, keepLast: false)
        let (heavy, heavyLog) = try throughput("exit-heavy", repeats: repeats, keepLast: true)
        // A guest that writes memory fast: its sync points stretch the interrupt latency bound (`LatencyBound`).
        let (dirty, _) = try throughput("dirty", repeats: repeats, keepLast: false)

        // 3. Bytes per event: clock (timer and clock-read events).
        let clockImg = try image("clock")
        progress("clock: record")
        let clockRec = try recordOnce(clockImg, "clock")
        let clockLog = try LogSizes(path: clockRec.path)
        progress("clock: replay")
        let clockReplay = try replayAndDelete(clockRec, "clock")

        let computeRecordSec = Self.median(compute.records.map(\.elapsedNs)) / 1e9
        let computeSync = Self.median(compute.records.map(\.syncPoints))
        let computePages = Double(compute.records.map(\.syncPointPages).reduce(0, +))
        let computeSyncTotal = Double(compute.records.map(\.syncPoints).reduce(0, +))

        var figures: [Figure] = [
            Figure(key: "exit_round_trip_us", label: "exit round trip (exit-heavy, run)", value: usPerExit, unit: "µs/exit"),
            Figure(key: "record_run_ratio_compute", label: "run/record throughput, timer-compute", value: compute.ratio, unit: "×", goal: .atLeast(0.97)),
            Figure(key: "record_run_ratio_exit_heavy", label: "run/record throughput, exit-heavy", value: heavy.ratio, unit: "×", goal: .atLeast(0.90)),
            Figure(key: "record_run_ratio_dirty", label: "run/record throughput, dirty (writes 32 MiB)", value: dirty.ratio, unit: "×"),
            Figure(key: "latency_bound_dirty_us", label: "interrupt latency bound reached, dirty", value: Self.median(dirty.records.map(\.peakLatencyBoundUs)), unit: "µs"),
            Figure(key: "log_mib_dirty", label: "log size, dirty", value: Self.median(dirty.records.map(\.logBytes)) / 1_048_576, unit: "MiB"),
        ]
        for (key, name, s) in [("exit_heavy", "exit-heavy", heavyLog!), ("clock", "clock", clockLog)] {
            figures.append(Figure(key: "log_total_bytes_per_event_\(key)", label: "log bytes/event, \(name), total after header", value: s.totalPerEvent, unit: "B/event"))
            figures.append(Figure(key: "log_event_bytes_per_event_\(key)", label: "log bytes/event, \(name), excl. header + sync points", value: s.eventsOnlyPerEvent, unit: "B/event", goal: .atMost(8)))
        }
        figures += [
            Figure(key: "replay_vs_record_compute", label: "record/replay time, timer-compute", value: compute.replayRatio, unit: "×", goal: .atLeast(1)),
            Figure(key: "replay_vs_record_exit_heavy", label: "record/replay time, exit-heavy", value: heavy.replayRatio, unit: "×", goal: .atLeast(1)),
            Figure(key: "replay_vs_record_clock", label: "record/replay time, clock", value: Double(clockRec.result.elapsedNs) / Double(clockReplay.elapsedNs), unit: "×", goal: .atLeast(1)),
            Figure(key: "sync_points_per_second_compute", label: "sync points/s, timer-compute (record)", value: computeSync / computeRecordSec, unit: "/s"),
            Figure(key: "pages_per_sync_point_compute", label: "pages per sync point, timer-compute", value: computeSyncTotal == 0 ? 0 : computePages / computeSyncTotal, unit: "pages"),
        ]
        printTable(figures)
        if let s = heavyLog, s.events < 100 {
            print("note: the exit-heavy log holds only \(s.events) events (its port I/O is deterministic); its bytes/event is frame overhead, not a per-event cost")
        }
        var host = Self.hostInfo()
        host["loadavg_start"] = loadStart
        host["loadavg_end"] = host["loadavg"]
        print("load average: \(loadStart) at start, \(host["loadavg"] ?? "") at end")

        var figuresJSON: [String: Any] = [:]
        for f in figures { figuresJSON[f.key] = f.json }
        let targets = figures.compactMap(\.pass)
        return [
            "ok": true,
            "digests_match": true,
            "repeat": repeats,
            "memory_mib": memoryMiB,
            "host": host,
            "figures": figuresJSON,
            "targets_met": targets.filter { $0 }.count,
            "targets_total": targets.count,
            "all_targets_pass": targets.allSatisfy { $0 },
            "notes": [
                "exit_round_trip_us": "elapsed / exits of exit-heavy run unprotected; includes the guest's ring-0 loop, which is emulated on a PVM host",
                "record_run_ratio": "median(run elapsed) / median(record elapsed); >= 1 means recording is as fast as running",
                "log_total_bytes_per_event": "(file size - header incl. embedded image) / events; includes sync point frames, trailer and footer",
                "log_event_bytes_per_event": "bytes of event frames (16-byte frame headers included) / events",
                "replay_vs_record": "median(record elapsed) / median(replay elapsed)",
                "latency_bound_dirty_us": "the longest the dirty guest's sync points stretched the interrupt latency bound (median of its recordings); the floor is 1000 µs, the ceiling 50000",
                "elapsed": "from the first vCPU entry to the guest's exit; machine setup excluded",
                "exit_heavy_events": "exit-heavy's port I/O is to a deterministic register, so its log holds only a handful of events; its bytes/event is dominated by the one 16-byte frame header and the digest events, clock is the representative figure",
                "noise": "the host is shared; host.loadavg_start/loadavg_end and details.*.run_record_pair_ratios show how much the neighbours moved the timings",
            ],
            "details": [
                "exit_heavy_run_elapsed_ns": heavyRuns.map(\.elapsedNs), "exit_heavy_exits": heavyExits,
                "timer_compute": compute.json, "exit_heavy": heavy.json, "dirty": dirty.json,
                "clock": ["record_elapsed_ns": clockRec.result.elapsedNs, "replay_elapsed_ns": clockReplay.elapsedNs,
                          "events": clockRec.result.events, "sync_points": clockRec.result.syncPoints,
                          "record_digest": clockRec.result.digestHex],
                "log_exit_heavy": heavyLog!.json, "log_clock": clockLog.json,
            ] as [String: Any],
        ]
    }

    func printTable(_ figures: [Figure]) {
        print("Lockstep bench (\(Self.hostInfo()["kernel"] ?? ""))")
        Self.printRows(figures, passWord: "pass")
        print("replay digests: all equal to their recordings")
    }

    /// The figure table (shared with `bench pair`): label, value, unit, target, pass/MISS.
    static func printRows(_ figures: [Figure], passWord: String) {
        let w = figures.map(\.label.count).max() ?? 0
        print("\("figure".padding(toLength: w, withPad: " ", startingAt: 0))  \("value".leftPad(12))  \("unit".padding(toLength: 8, withPad: " ", startingAt: 0))  target    result")
        for f in figures {
            let result = f.pass.map { $0 ? passWord : "MISS" } ?? ""
            print("\(f.label.padding(toLength: w, withPad: " ", startingAt: 0))  \(fmt(f.value).leftPad(12))  \(f.unit.padding(toLength: 8, withPad: " ", startingAt: 0))  \(f.targetText.padding(toLength: 8, withPad: " ", startingAt: 0))  \(result)")
        }
    }

    static func hostInfo() -> [String: Any] {
        var u = utsname()
        uname(&u)
        func str<T>(_ t: inout T) -> String {
            withUnsafeBytes(of: &t) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        }
        let cpu = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?
            .split(separator: "\n").first { $0.hasPrefix("model name") }
            .map { $0.split(separator: ":", maxSplits: 1).last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "" } ?? ""
        let pvm = FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm")
        let load = (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?
            .split(separator: " ").prefix(3).joined(separator: " ") ?? ""
        return ["kernel": str(&u.release), "machine": str(&u.machine), "kvm_pvm": pvm,
                "kvm_module": pvm ? "kvm_pvm" : (FileManager.default.fileExists(atPath: "/sys/module/kvm_intel") ? "kvm_intel" :
                    FileManager.default.fileExists(atPath: "/sys/module/kvm_amd") ? "kvm_amd" : "unknown"),
                "cpu": cpu, "loadavg": load, "cpus_online": ProcessInfo.processInfo.activeProcessorCount]
            .merging(WakeProbe.idleInfo()) { a, _ in a }
    }

    static func writeJSON(_ object: [String: Any], to path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
        try (data + Data("\n".utf8)).write(to: URL(fileURLWithPath: path))
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: " ", count: n - count) + self }
}
