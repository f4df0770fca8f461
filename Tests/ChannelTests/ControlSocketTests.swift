import Foundation
import Testing
@testable import Channel

/// The `--control` socket: one line each way, owner-only, and a clear error for a path it cannot use.
@Suite struct ControlSocketTests {
    func path(_ name: String) -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lockstep-control-\(getpid())")
        try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir.appendingPathComponent(name).path
    }

    @Test func aRequestAndItsAnswerAreOneLineEach() throws {
        let p = path("a.sock")
        let l = try ControlListener(path: p)
        var st = stat()
        #expect(lstat(p, &st) == 0 && st.st_mode & 0o777 == 0o600, "the socket must be owner-only")
        let server = Pending { () throws -> String? in
            guard let c = try l.accept(timeoutMs: 5000) else { return nil }
            let line = try c.readLine(timeoutMs: 5000)
            try c.writeLine("answer to \(line ?? "-")")
            return line
        }
        let c = try ControlConnection(path: p)
        try c.writeLine("status")
        #expect(try c.readLine(timeoutMs: 5000) == "answer to status")
        #expect(try server.wait().get() == "status")
        l.close()
        #expect(!FileManager.default.fileExists(atPath: p), "close removes the socket file")
        #expect(try l.accept(timeoutMs: 1000) == nil)
    }

    /// A server that answers and closes before the request is written (a busy refusal): the write fails with
    /// EPIPE, and `ask` still returns what the server said; with nothing said, the write's error.
    @Test func anAnswerBeforeTheRequestIsStillRead() throws {
        let p = path("r.sock")
        let l = try ControlListener(path: p)
        defer { l.close() }
        for answer in ["refused: busy", nil] as [String?] {
            let server = Pending { () throws -> Bool in
                guard let c = try l.accept(timeoutMs: 5000) else { return false }
                if let answer { try c.writeLine(answer) }
                return true  // c is closed as it goes out of scope, unread
            }
            let c = try ControlConnection(path: p)
            #expect(try server.wait().get())
            if let answer {
                #expect(try c.ask("status", timeoutMs: 5000) == answer)
            } else {
                #expect(throws: ChannelError.self) { try c.ask("status", timeoutMs: 5000) }
            }
        }
    }

    @Test func aSilentPeerTimesOut() throws {
        let p = path("b.sock")
        let l = try ControlListener(path: p)
        defer { l.close() }
        let c = try ControlConnection(path: p)
        let s = try #require(try l.accept(timeoutMs: 5000))
        #expect(throws: ChannelError.timeout(ms: 50)) { try s.readLine(timeoutMs: 50) }
        _ = c
    }

    @Test func aPathItCannotUseIsNamed() throws {
        let file = path("not-a-socket")
        #expect(FileManager.default.createFile(atPath: file, contents: Data("keep me".utf8)))
        do { _ = try ControlListener(path: file); Issue.record("a regular file was replaced") } catch {
            #expect("\(error)".contains("exists and is not a socket"), "\(error)")
        }
        #expect(FileManager.default.contents(atPath: file) == Data("keep me".utf8), "the file must be left alone")
        let long = "/tmp/" + String(repeating: "x", count: 200)
        do { _ = try ControlListener(path: long); Issue.record("a 205-byte path was accepted") } catch {
            #expect("\(error)".contains("a socket path has 1 to 107 bytes"), "\(error)")
        }
        do { _ = try ControlConnection(path: path("nobody.sock")); Issue.record("connected to nothing") } catch {
            #expect("\(error)".contains("connect"), "\(error)")
        }
        // A socket a dead process left behind is replaced.
        let stale = path("stale.sock")
        let first = try ControlListener(path: stale)
        _ = first  // not closed: its file stays, as after kill -9
        let second = try ControlListener(path: stale)
        second.close()
    }
}
