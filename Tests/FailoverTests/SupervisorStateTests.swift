import Foundation
import Testing
@testable import Failover

/// `SupervisorState`: the peer a supervisor keeps across its own restarts (`--state-file`).
@Suite struct SupervisorStateTests {
    let state = SupervisorState(given: "10.0.0.2:7400", peer: "10.0.0.3:7400")

    func scratch() throws -> String {
        let dir = NSTemporaryDirectory() + "lockstep-state-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    @Test func aSavedStateLoadsAsItWasAndIsRemovedWhole() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/state"
        #expect(try SupervisorState.load(path) == nil)
        try state.save(path)
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "lockstep-supervise-state 1\ngiven 10.0.0.2:7400\npeer 10.0.0.3:7400\n")
        #expect(try SupervisorState.load(path) == state)
        #expect(!FileManager.default.fileExists(atPath: path + ".tmp"))
        try SupervisorState.remove(path)
        try SupervisorState.remove(path)  // none there is fine
        #expect(try SupervisorState.load(path) == nil)
    }

    /// Each damage is refused with the file, the line and what is wrong; the file stays for the operator.
    @Test(arguments: [
        ("", 1, "empty"),
        ("lockstep-supervise-state 1\ngiven 10.0.0.2:7400\npeer 10.0", 3, "it ends inside a line (truncated)"),
        ("GET / HTTP/1.1\n", 1, "not a supervisor's state file (it starts 'GET / HTTP/1.1')"),
        ("lockstep-supervise-state 1\ngiven 10.0.0.2:7400\n", 3, "3 lines expected, 2 found"),
        ("lockstep-supervise-state 1\npeer 10.0.0.2:7400\ngiven 10.0.0.3:7400\n", 2, "'given HOST:PORT' expected, found 'peer 10.0.0.2:7400'"),
        ("lockstep-supervise-state 1\ngiven 10.0.0.2:7400\npeer 10.0.0.3\n", 3, "'10.0.0.3' is not HOST:PORT"),
        ("lockstep-supervise-state 1\ngiven 10.0.0.2:0\npeer 10.0.0.3:7400\n", 2, "'10.0.0.2:0' is not HOST:PORT"),
        ("lockstep-supervise-state 1\ngiven 10.0.0.2:7400\npeer 10.0.0.3:7400\nmore\n", 4, "3 lines expected, 4 found"),
        (String(repeating: "x", count: 5000), 1, "over 4096 bytes"),
    ])
    func aDamagedStateIsRefusedByLine(text: String, line: Int, reason: String) throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/state"
        try text.write(toFile: path, atomically: false, encoding: .utf8)
        #expect(throws: SupervisorStateError.malformed(path: path, line: line, reason: reason)) { try SupervisorState.load(path) }
        #expect(FileManager.default.fileExists(atPath: path))
        let message = SupervisorStateError.malformed(path: path, line: line, reason: reason).description
        #expect(message.hasPrefix("--state-file \(path): line \(line): ") && message.hasSuffix("remove the file to start from the command line's --peer"))
    }

    @Test func anotherVersionIsNamed() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/state"
        try "lockstep-supervise-state 2\ngiven a:1\npeer b:2\n".write(toFile: path, atomically: false, encoding: .utf8)
        #expect(throws: SupervisorStateError.wrongVersion(path: path, found: "2")) { try SupervisorState.load(path) }
        #expect(SupervisorStateError.wrongVersion(path: path, found: "2").description.contains("version 2, this lockstep reads version 1"))
    }

    @Test func aStateThatCannotBeReadOrWrittenSaysWhere() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(throws: SupervisorStateError.unreadable(path: dir, errno: EISDIR)) { try SupervisorState.load(dir) }
        let missing = dir + "/no-such-dir/state"
        #expect { try state.save(missing) } throws: { e in
            guard case SupervisorStateError.unwritable(let p, let why) = e else { return false }
            return p == missing && why.contains("no-such-dir/state.tmp") && why.contains("No such file or directory")
        }
    }

    /// A kept move applies while the command line still names the peer it replaced; an edited --peer wins.
    @Test func theMoveAppliesOnlyToTheCommandLineItReplaced() {
        #expect(SupervisorState.resolve(commandLine: "10.0.0.2:7400", saved: nil) == .commandLine)
        #expect(SupervisorState.resolve(commandLine: "10.0.0.2:7400", saved: state) == .moved("10.0.0.3:7400"))
        #expect(SupervisorState.resolve(commandLine: "10.0.0.9:7400", saved: state) == .superseded(state))
    }

    @Test func addresses() {
        for good in ["a:1", "10.0.0.2:65535", "[::1]:7400", "host.lab:7400"] { #expect(SupervisorState.isAddress(good), "\(good)") }
        for bad in ["", ":7400", "a", "a:", "a:0", "a:65536", "a b:1", "a:x"] { #expect(!SupervisorState.isAddress(bad), "\(bad)") }
    }
}
