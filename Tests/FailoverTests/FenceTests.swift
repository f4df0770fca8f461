import Testing
import Foundation
import Synchronization
@testable import Failover

func tempDir() -> String {
    let d = NSTemporaryDirectory() + "lk-fence-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    try! FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
    return d
}

@Suite struct FenceTests {
    let me = FenceIdentity(host: "hostA", pid: 111)
    let other = FenceIdentity(host: "hostB", pid: 222)

    /// The store ID: made once, the same for every side of one directory (eight threads racing to make it agree),
    /// another for another directory; a damaged one is named, not replaced.
    @Test func theStoreIDIsOnePerDirectory() throws {
        let d = tempDir(), e = tempDir()
        let ids = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            if let id = try? Fence(directory: d).storeID() { ids.withLock { $0.append(id) } }
        }
        let all = ids.withLock { $0 }
        #expect(all.count == 8 && Set(all).count == 1, "\(all)")
        #expect(isStoreID(all[0]))
        #expect(try Fence(directory: d).storeID() == all[0])
        #expect(try Fence(directory: e).storeID() != all[0])
        #expect(try FileManager.default.contentsOfDirectory(atPath: d).filter { $0.contains(".tmp") }.isEmpty)
        try "not an id\n".write(toFile: e + "/" + Fence.idFileName, atomically: true, encoding: .utf8)
        #expect(throws: FenceError.damagedID(e + "/" + Fence.idFileName)) { try Fence(directory: e).storeID() }
        #expect(throws: (any Error).self) { try Fence(directory: d + "/missing").storeID() }
    }

    @Test func secondFenceInTheSameProcessIsDenied() throws {
        let dir = tempDir()
        let a = Fence(directory: dir), b = Fence(directory: dir)
        let t = try #require(try a.tryAcquire(identity: me))
        #expect(t.generation == 1)
        #expect(try b.tryAcquire(identity: other) == nil)
        #expect(b.holder == FenceHolder(generation: 1, identity: me))
        #expect(try a.tryAcquire(identity: me) == t)   // idempotent for the holder
        try a.release()
        let t2 = try #require(try b.tryAcquire(identity: other))
        #expect(t2.generation == 2)
        #expect(try a.tryAcquire(identity: me) == nil)
        #expect(a.holder?.identity == other)
        try b.release()
        #expect(try a.tryAcquire(identity: me)?.generation == 3)
        #expect(Fence(directory: dir).readHolder() == FenceHolder(generation: 3, identity: me))
        try a.release()
        #expect(throws: FenceError.notHeld) { try a.release() }
    }

    @Test func droppingTheFenceObjectReleasesTheLock() throws {
        let dir = tempDir()
        do { let a = Fence(directory: dir); _ = try a.tryAcquire(identity: me) }
        #expect(try Fence(directory: dir).tryAcquire(identity: other)?.generation == 2)
    }

    /// A child forked by another thread shares the fence's open file description until its exec
    /// closes it; dropping the Fence must release the lock anyway. A dup stands in for that child.
    @Test func droppingTheFenceReleasesTheLockWhileAForkedCopyIsOpen() throws {
        let dir = tempDir()
        var copy: Int32 = -1
        do {
            let a = Fence(directory: dir)
            _ = try #require(try a.tryAcquire(identity: me))
            let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")
            let held = fds.compactMap(Int32.init).first { fd in
                (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) == a.path
            }
            copy = dup(try #require(held))
        }
        defer { close(copy) }
        #expect(copy >= 0)
        #expect(try Fence(directory: dir).tryAcquire(identity: other)?.generation == 2)
    }

    @Test func errorsNameTheDirectory() throws {
        let missing = "/nonexistent-lockstep-dir/x"
        #expect(throws: FenceError.directoryMissing(missing)) { try Fence(directory: missing).tryAcquire(identity: me) }
        #expect(FenceError.directoryMissing(missing).description.contains(missing))
        let dir = tempDir()
        let file = dir + "/plain"
        _ = FileManager.default.createFile(atPath: file, contents: Data())
        #expect(throws: FenceError.notADirectory(file)) { try Fence(directory: file).tryAcquire(identity: me) }
    }

    @Test func permissionDeniedNamesTheDirectory() throws {
        guard getuid() != 0 else { return }   // root bypasses permissions
        let dir = tempDir()
        chmod(dir, 0o500)
        defer { chmod(dir, 0o700) }
        #expect(throws: FenceError.permissionDenied(dir)) { try Fence(directory: dir).tryAcquire(identity: me) }
    }

    /// A separate process holds the lock; SIGKILL makes the kernel drop it.
    @Test func killedHolderReleasesTheFence() throws {
        let dir = tempDir()
        let fence = Fence(directory: dir)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        // The shell opens the file on fd 9, takes the lock with flock(1), reports, then becomes sleep
        // (exec keeps fd 9 and its lock in the same process, so killing that pid releases it).
        p.arguments = ["-c", "exec 9>>\"$1\"; flock -x 9 || exit 1; echo locked; exec sleep 60", "sh", fence.path]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        // Wait for the helper's report (EOF if it failed), bounded by the helper's own exit.
        let line = String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
        try #require(line.contains("locked"))
        #expect(try fence.tryAcquire(identity: me) == nil)
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        #expect(p.terminationReason == .uncaughtSignal)
        #expect(try fence.tryAcquire(identity: me) != nil)
        try fence.release()
    }

    /// What a holder learns from one read of the fence file: its own generation, another's, or nothing.
    @Test func aHolderChecksItsGenerationInTheFile() throws {
        let dir = tempDir()
        let a = Fence(directory: dir)
        let t = try #require(try a.tryAcquire(identity: me))
        #expect(a.check(holding: t) == .confirmed)
        // flock is advisory: another host's holder writes the file after the lock moved to it.
        try "generation=7\nhost=hostB\npid=222\n".write(toFile: a.path, atomically: false, encoding: .utf8)
        #expect(a.check(holding: t) == .taken(FenceHolder(generation: 7, identity: other)))
        try "garbage\n".write(toFile: a.path, atomically: false, encoding: .utf8)
        #expect(a.check(holding: t) == .unreadable("the fence file \(a.path) holds no generation"))
        try FileManager.default.removeItem(atPath: dir)
        guard case .unreadable(let why) = a.check(holding: t) else { Issue.record("a missing file confirmed the fence"); return }
        #expect(why.contains("open on \(a.path) failed"), "\(why)")
        #expect(FenceCheck(record: FenceHolder(generation: t.generation, identity: nil), holding: t, path: "p") == .confirmed)
    }
}
