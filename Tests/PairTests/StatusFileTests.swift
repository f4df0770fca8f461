import Foundation
import Testing
@testable import Pair

/// The JSON files a pair writes as it runs: a full disk or a missing directory is named, and nothing is left half-written.
@Suite struct StatusFileTests {
    @Test func aFullDiskIsNamedAndTheFileIsNotReplaced() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("lockstep-status-\(getpid()).json").path
        defer { unlink(path) }
        try writeJSON(["state": "first"], to: path)
        // /dev/full fails every write with ENOSPC: the earlier file must stay whole.
        do { try writeJSON(["state": "second"], to: path, temporaryPath: "/dev/full"); Issue.record("a write to a full disk succeeded") } catch {
            #expect(error.description.contains("/dev/full: cannot write: disk full (ENOSPC)"), "\(error)")
        }
        #expect(String(decoding: FileManager.default.contents(atPath: path) ?? Data(), as: UTF8.self).contains("first"))
        #expect(FileManager.default.fileExists(atPath: "/dev/full"), "the injected temporary path must not be removed")
    }

    @Test func aMissingDirectoryIsNamedBeforeTheRun() {
        do { try JSONReports.check("/nonexistent-lockstep-dir/s.json", option: "--stats-json"); Issue.record("a missing directory passed") } catch {
            #expect(error.description.contains("--stats-json /nonexistent-lockstep-dir/s.json"), "\(error)")
            #expect(error.description.contains("No such file or directory"), "\(error)")
        }
        // Reported, not thrown, while the run goes on (and only once per reason).
        let reports = JSONReports()
        reports.write(["a": 1], to: "/nonexistent-lockstep-dir/s.json", option: "--status-json")
        reports.write(["a": 2], to: "/nonexistent-lockstep-dir/s.json", option: "--status-json")
    }
}
