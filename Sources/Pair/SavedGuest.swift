import EventLog
import Foundation
import Glibc
import Machine

/// A secondary's copy of the guest its primary seeded (`lockstep secondary --save-guest DIR`), so that the
/// secondary's host can boot the guest again when both sides are lost and the primary's host is gone too
/// (`lockstep supervise secondary` does that: a cold restart).
///
/// Layout, in DIR:
/// - `guest.elf`: the image, byte for byte as the primary sent it.
/// - `guest.conf`: text lines, written after the image, each replaced whole (temporary name, fsync, rename):
///   ```
///   lockstep-saved-guest 1
///   memory-mib 64
///   interrupt-latency-us 1000
///   max-interrupt-latency-us 50000      (absent in older copies: the default)
///   image-sha256 <64 hex digits of guest.elf's SHA-256>
///   ```
/// A save cut short leaves a `guest.conf` that names another image's digest: `load` refuses it by name.
public struct SavedGuest: Sendable, Equatable {
    public static let version = 1
    public let directory: String
    public let memoryMiB: UInt32
    public let interruptLatencyUs: UInt32
    public let maxInterruptLatencyUs: UInt32
    public let imageSHA256: String

    public var imagePath: String { directory + "/guest.elf" }
    var confPath: String { directory + "/guest.conf" }

    public struct Failure: Error, CustomStringConvertible, Equatable {
        public let description: String
        init(_ d: String) { description = d }
    }

    /// Checks `dir` can hold a saved guest (created if missing): the secondary says so at start, not after a seed.
    public static func prepare(_ dir: String) throws(Failure) {
        if mkdir(dir, 0o755) != 0, errno != EEXIST { throw Failure("\(dir): cannot create (\(String(cString: strerror(errno))))") }
        var st = stat()
        guard stat(dir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else { throw Failure("\(dir): not a directory") }
        guard access(dir, W_OK) == 0 else { throw Failure("\(dir): not writable (\(String(cString: strerror(errno))))") }
    }

    /// Saves `image` and the machine size in `dir` unless the same guest is there already.
    @discardableResult
    public static func save(_ dir: String, image: [UInt8], config: MachineConfig) throws(Failure) -> SavedGuest {
        try prepare(dir)
        let guest = SavedGuest(directory: dir, memoryMiB: config.memoryMiB, interruptLatencyUs: config.interruptLatencyUs,
                               maxInterruptLatencyUs: config.maxInterruptLatencyUs, imageSHA256: StateDigest.hex(StateDigest.sha256(image)))
        if (try? load(dir)) == guest { return guest }
        do {
            try replaceFile(guest.imagePath, with: image, temporary: guest.imagePath + ".tmp", sync: true)
            try replaceFile(guest.confPath, with: Array(guest.conf.utf8), temporary: guest.confPath + ".tmp", sync: true)
        } catch { throw Failure("\(error)") }
        return guest
    }

    /// The saved guest in `dir`, its image checked against the digest `guest.conf` names.
    public static func load(_ dir: String) throws(Failure) -> SavedGuest {
        let confPath = dir + "/guest.conf"
        guard let data = FileManager.default.contents(atPath: confPath) else {
            throw Failure("\(confPath): \(missingOrUnreadable(confPath)): no guest was saved there")
        }
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n").map { $0.split(separator: " ", maxSplits: 1) }
        guard let first = lines.first, first.count == 2, first[0] == "lockstep-saved-guest" else {
            throw Failure("\(confPath): not a saved guest (no 'lockstep-saved-guest' line first)")
        }
        guard Int(first[1]) == version else {
            throw Failure("\(confPath): saved guest version \(first[1]); this build reads version \(version)")
        }
        var fields: [String: String] = [:]
        for l in lines.dropFirst() where l.count == 2 { fields[String(l[0])] = String(l[1]) }
        func number(_ name: String) throws(Failure) -> UInt32 {
            guard let v = fields[name].flatMap({ UInt32($0) }), v > 0 else {
                throw Failure("\(confPath): '\(name)' is \(fields[name].map { "'\($0)'" } ?? "missing"): expected a positive number")
            }
            return v
        }
        let memory = try number("memory-mib"), latency = try number("interrupt-latency-us")
        let maxLatency = fields["max-interrupt-latency-us"] == nil ? MachineConfig.defaultMaxInterruptLatencyUs : try number("max-interrupt-latency-us")
        guard let sha = fields["image-sha256"], sha.count == 64, sha.allSatisfy(\.isHexDigit) else {
            throw Failure("\(confPath): 'image-sha256' is \(fields["image-sha256"].map { "'\($0)'" } ?? "missing"): expected 64 hex digits")
        }
        let guest = SavedGuest(directory: dir, memoryMiB: memory, interruptLatencyUs: latency, maxInterruptLatencyUs: maxLatency, imageSHA256: sha)
        guard let image = FileManager.default.contents(atPath: guest.imagePath) else {
            throw Failure("\(guest.imagePath): \(missingOrUnreadable(guest.imagePath)), though \(confPath) names it")
        }
        let found = StateDigest.hex(StateDigest.sha256([UInt8](image)))
        guard found == sha else {
            throw Failure("\(guest.imagePath): its SHA-256 is \(found.prefix(16))…, \(confPath) names \(sha.prefix(16))… (a save cut short?)")
        }
        return guest
    }

    private static func missingOrUnreadable(_ path: String) -> String { access(path, F_OK) == 0 ? "unreadable" : "missing" }

    var conf: String {
        "lockstep-saved-guest \(Self.version)\nmemory-mib \(memoryMiB)\ninterrupt-latency-us \(interruptLatencyUs)\n"
            + "max-interrupt-latency-us \(maxInterruptLatencyUs)\nimage-sha256 \(imageSHA256)\n"
    }
}
