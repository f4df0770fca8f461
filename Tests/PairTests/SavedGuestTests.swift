import Foundation
import Machine
@testable import Pair
import Testing

/// `SavedGuest`: the copy of a seed's guest a secondary keeps for a cold restart. Saved whole or refused by name.
@Suite struct SavedGuestTests {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lockstep-saved-\(UInt32.random(in: 0...UInt32.max))").path
    let image: [UInt8] = Array("not really an ELF, but any bytes serve".utf8)
    let config = MachineConfig(memoryMiB: 48, interruptLatencyUs: 700, maxInterruptLatencyUs: 30_000)

    func write(_ text: String, _ name: String = "guest.conf") throws {
        try text.write(toFile: dir + "/" + name, atomically: true, encoding: .utf8)
    }

    func refusal(_ expected: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(throws: SavedGuest.Failure.self, sourceLocation: sourceLocation) { try SavedGuest.load(dir) }
        do { _ = try SavedGuest.load(dir) } catch {
            #expect(error.description.contains(expected), "\(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func aSavedGuestLoadsAsSavedAndIsNotWrittenTwice() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let saved = try SavedGuest.save(dir, image: image, config: config)
        #expect(try SavedGuest.load(dir) == saved)
        #expect(saved.memoryMiB == 48 && saved.interruptLatencyUs == 700 && saved.maxInterruptLatencyUs == 30_000)
        #expect(FileManager.default.contents(atPath: saved.imagePath) == Data(image))
        let before = try FileManager.default.attributesOfItem(atPath: saved.imagePath)[.systemFileNumber] as? Int
        try SavedGuest.save(dir, image: image, config: config)
        #expect(try FileManager.default.attributesOfItem(atPath: saved.imagePath)[.systemFileNumber] as? Int == before,
                "the same guest was written again")
        // Another guest (a new image, another size) replaces it.
        let other = try SavedGuest.save(dir, image: image + [1], config: MachineConfig(memoryMiB: 64))
        #expect(try SavedGuest.load(dir) == other && other.memoryMiB == 64)
        #expect(!FileManager.default.fileExists(atPath: dir + "/guest.elf.tmp"))
    }

    @Test func aDamagedCopyIsRefusedByName() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        refusal("\(dir)/guest.conf: missing: no guest was saved there")
        let saved = try SavedGuest.save(dir, image: image, config: config)
        let sha = saved.imageSHA256
        try write("#!/bin/sh\n")
        refusal("not a saved guest (no 'lockstep-saved-guest' line first)")
        try write("lockstep-saved-guest 2\nmemory-mib 48\n")
        refusal("saved guest version 2; this build reads version 1")
        try write("lockstep-saved-guest 1\ninterrupt-latency-us 700\nimage-sha256 \(sha)\n")
        refusal("'memory-mib' is missing: expected a positive number")
        try write("lockstep-saved-guest 1\nmemory-mib 0\ninterrupt-latency-us 700\nimage-sha256 \(sha)\n")
        refusal("'memory-mib' is '0': expected a positive number")
        try write("lockstep-saved-guest 1\nmemory-mib 48\ninterrupt-latency-us 700\nimage-sha256 \(sha.prefix(40))\n")
        refusal("'image-sha256' is '\(sha.prefix(40))': expected 64 hex digits")
        try write("lockstep-saved-guest 1\nmemory-mib 48\ninterrupt-latency-us 700\nmax-interrupt-latency-us -5\nimage-sha256 \(sha)\n")
        refusal("'max-interrupt-latency-us' is '-5': expected a positive number")
        // A copy saved before the bound could stretch has no such line: the default.
        try write("lockstep-saved-guest 1\nmemory-mib 48\ninterrupt-latency-us 700\nimage-sha256 \(sha)\n")
        #expect(try SavedGuest.load(dir).maxInterruptLatencyUs == MachineConfig.defaultMaxInterruptLatencyUs)
        // A save cut short between the image and the conf: the conf names the other image.
        try write(saved.conf)
        try write("a different image", "guest.elf")
        refusal("\(dir)/guest.elf: its SHA-256 is ")
        refusal("names \(sha.prefix(16))… (a save cut short?)")
        try FileManager.default.removeItem(atPath: saved.imagePath)
        refusal("\(dir)/guest.elf: missing, though \(dir)/guest.conf names it")
        // The next seed mends it.
        #expect(try SavedGuest.save(dir, image: image, config: config) == saved)
        #expect(try SavedGuest.load(dir) == saved)
    }

    @Test func aPlaceThatCannotHoldTheCopyIsNamed() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "a file".write(toFile: dir, atomically: true, encoding: .utf8)
        #expect(throws: SavedGuest.Failure("\(dir): not a directory")) { try SavedGuest.prepare(dir) }
        #expect(throws: SavedGuest.Failure("\(dir)/x: cannot create (Not a directory)")) { try SavedGuest.prepare(dir + "/x") }
        #expect(throws: SavedGuest.Failure("\(dir): not a directory")) { try SavedGuest.save(dir, image: image, config: config) }
        // A write that fails (here: the temporary name is taken by a directory) names the file and leaves no copy.
        try FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir + "/guest.elf.tmp", withIntermediateDirectories: true)
        do { try SavedGuest.save(dir, image: image, config: config); Issue.record("saved over a directory") } catch {
            #expect(error.description.contains("\(dir)/guest.elf.tmp"), "\(error)")
        }
        #expect(throws: SavedGuest.Failure.self) { try SavedGuest.load(dir) }
    }
}
