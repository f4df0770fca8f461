// The file header, the trailer and the records read back from a log.

public struct LogHeader: Equatable, Sendable {
    public static let currentVersion: UInt16 = 3
    public var formatVersion: UInt16
    public var memoryMiB: UInt32
    public var vcpus: UInt32
    public var interruptLatencyUs: UInt32
    /// RTC wall clock at machine creation.
    public var epochSeconds: UInt64
    /// 32 bytes, computed by the caller.
    public var imageSHA256: [UInt8]
    /// The guest ELF, embedded so a log replays alone.
    public var image: [UInt8]
    /// 32 bytes: digest of the pinned CPUID table.
    public var cpuidSHA256: [UInt8]
    /// Free text (kernel, KVM flavour).
    public var hostInfo: String

    public init(formatVersion: UInt16 = LogHeader.currentVersion, memoryMiB: UInt32, vcpus: UInt32 = 1,
                interruptLatencyUs: UInt32, epochSeconds: UInt64, imageSHA256: [UInt8], image: [UInt8],
                cpuidSHA256: [UInt8], hostInfo: String) {
        self.formatVersion = formatVersion; self.memoryMiB = memoryMiB; self.vcpus = vcpus
        self.interruptLatencyUs = interruptLatencyUs; self.epochSeconds = epochSeconds
        self.imageSHA256 = imageSHA256; self.image = image; self.cpuidSHA256 = cpuidSHA256; self.hostInfo = hostInfo
    }
}

/// Why the recorded run ended. 0 is invalid.
public enum EndReason: UInt8, Sendable, CaseIterable {
    case guestExit = 1
    /// Triple fault.
    case shutdown = 2
    /// Operator stop.
    case stopped = 3
    case error = 4
}

public struct LogTrailer: Equatable, Sendable {
    public var endReason: EndReason
    public var exitStatus: UInt32
    public var finalExit: UInt64
    public var eventCount: UInt64
    public var syncPointCount: UInt64
    /// 32 bytes.
    public var stateDigest: [UInt8]

    public init(endReason: EndReason, exitStatus: UInt32, finalExit: UInt64, eventCount: UInt64,
                syncPointCount: UInt64, stateDigest: [UInt8]) {
        self.endReason = endReason; self.exitStatus = exitStatus; self.finalExit = finalExit
        self.eventCount = eventCount; self.syncPointCount = syncPointCount; self.stateDigest = stateDigest
    }
}

/// A sync point as read back (allocation is fine here: sync points are rare compared with exits).
public struct SyncPoint: Equatable, Sendable {
    public var exit: UInt64
    public var signature: ExitSignature
    /// Opaque to the log.
    public var vcpuState: [UInt8]
    /// Guest page frame numbers (4 KiB pages), strictly ascending.
    public var pageNumbers: [UInt32]
    /// pageNumbers.count * 4096 bytes.
    public var pageData: [UInt8]

    public init(exit: UInt64, signature: ExitSignature, vcpuState: [UInt8], pageNumbers: [UInt32], pageData: [UInt8]) {
        self.exit = exit; self.signature = signature; self.vcpuState = vcpuState
        self.pageNumbers = pageNumbers; self.pageData = pageData
    }
}

public enum LogRecord: Equatable, Sendable {
    case event(Event)
    case syncPoint(SyncPoint)
}

/// A record with where it was found, for `lockstep log inspect`.
public struct LocatedRecord: Equatable, Sendable {
    /// Byte offset of the record's first byte in the file (or stream).
    public var offset: UInt64
    /// Sequence number of the frame that holds it.
    public var frame: UInt32
    /// Byte offset of that frame's header.
    public var frameOffset: UInt64
    public var record: LogRecord
    /// Bytes the record takes in the log (a sync point's payload: what the deltas saved shows here).
    public var length: Int = 0
    /// A sync point's items stored as deltas against the references (its vCPU state and pages); 0 for events.
    public var deltaItems: Int = 0
}

// MARK: - header fields

/// Numbered header fields. Flag bit 0 of a field marks it required: a reader that does not know a
/// required field refuses the log; it skips unknown optional fields.
enum HeaderField: UInt16, CaseIterable {
    case memoryMiB = 1
    case vcpus = 2
    case interruptLatencyUs = 3
    case epochSeconds = 4
    case imageSHA256 = 5
    case image = 6
    case cpuidSHA256 = 7
    case hostInfo = 8

    var required: Bool { self != .hostInfo }
    /// Exact length for fixed-size fields, nil for variable ones.
    var fixedLength: Int? {
        switch self {
        case .memoryMiB, .vcpus, .interruptLatencyUs: return 4
        case .epochSeconds: return 8
        case .imageSHA256, .cpuidSHA256: return 32
        case .image, .hostInfo: return nil
        }
    }
}

extension LogHeader {
    /// The whole file header: prefix, numbered fields, CRC32C.
    func encoded() -> [UInt8] {
        precondition(imageSHA256.count == 32 && cpuidSHA256.count == 32, "LogHeader digests must be 32 bytes")
        var fields: [UInt8] = []
        func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        func put(_ f: HeaderField, _ bytes: [UInt8]) {
            fields += le(f.rawValue)
            fields += le(UInt16(f.required ? 1 : 0))
            fields += le(UInt32(bytes.count))
            fields += bytes
        }
        put(.memoryMiB, le(memoryMiB))
        put(.vcpus, le(vcpus))
        put(.interruptLatencyUs, le(interruptLatencyUs))
        put(.epochSeconds, le(epochSeconds))
        put(.imageSHA256, imageSHA256)
        put(.image, image)
        put(.cpuidSHA256, cpuidSHA256)
        put(.hostInfo, Array(hostInfo.utf8))
        precondition(fields.count <= LogFormat.maxHeaderFieldsLength, "header (embedded image) exceeds the format bound")
        var out = LogFormat.magic
        out += le(LogHeader.currentVersion)
        out += le(UInt16(0))
        out += le(UInt32(fields.count))
        out += fields
        let crc = out.withUnsafeBytes { crc32c($0) }
        out += le(crc)
        return out
    }

    /// Parses the numbered fields of a header whose prefix and CRC were already checked.
    /// `bytes` is the whole header (prefix + fields + crc), which starts at file offset 0.
    static func parseFields(_ bytes: UnsafeRawBufferPointer, fieldsLength: Int) throws(LogError) -> LogHeader {
        var c = ByteCursor(bytes, from: LogFormat.fileHeaderPrefixSize, to: LogFormat.fileHeaderPrefixSize + fieldsLength,
                           baseOffset: 0, context: .named("header"))
        var h = LogHeader(memoryMiB: 0, interruptLatencyUs: 0, epochSeconds: 0, imageSHA256: [], image: [],
                          cpuidSHA256: [], hostInfo: "")
        var seen = Set<UInt16>()
        while !c.atEnd {
            let fieldStart = c.pos
            let id = try c.u16("field id")
            let flags = try c.u16("field flags")
            let length = Int(try c.u32("field length"))
            try c.need(length, "field \(id)")
            guard flags & ~1 == 0 else { throw c.fail("field \(id) has unknown flags 0x\(String(flags, radix: 16))", at: fieldStart + 2) }
            guard seen.insert(id).inserted else { throw c.fail("field \(id) appears twice", at: fieldStart) }
            guard let field = HeaderField(rawValue: id) else {
                if flags & 1 != 0 { throw LogError.unsupportedField(id: id, offset: UInt64(fieldStart)) }
                c.pos += length   // unknown optional field: skipped
                continue
            }
            if let fixed = field.fixedLength, fixed != length {
                throw c.fail("field \(id) (\(field)) has length \(length), expected \(fixed)", at: fieldStart + 4)
            }
            switch field {
            case .memoryMiB: h.memoryMiB = try c.u32("memoryMiB")
            case .vcpus: h.vcpus = try c.u32("vcpus")
            case .interruptLatencyUs: h.interruptLatencyUs = try c.u32("interruptLatencyUs")
            case .epochSeconds: h.epochSeconds = try c.u64("epochSeconds")
            case .imageSHA256: h.imageSHA256 = try c.bytes(32, "imageSHA256")
            case .image: h.image = try c.bytes(length, "image")
            case .cpuidSHA256: h.cpuidSHA256 = try c.bytes(32, "cpuidSHA256")
            case .hostInfo: h.hostInfo = String(decoding: try c.bytes(length, "hostInfo"), as: UTF8.self)
            }
        }
        for f in HeaderField.allCases where f.required && !seen.contains(f.rawValue) {
            throw LogError.corrupt(offset: UInt64(c.pos), detail: "header: required field \(f.rawValue) (\(f)) is missing")
        }
        return h
    }
}

// MARK: - trailer payload

extension LogTrailer {
    func store(into p: UnsafeMutableRawPointer) {
        precondition(stateDigest.count == 32, "LogTrailer.stateDigest must be 32 bytes")
        p.storeBytes(of: endReason.rawValue, toByteOffset: 0, as: UInt8.self)
        storeLE32(exitStatus, p, 1)
        storeLE64(finalExit, p, 5)
        storeLE64(eventCount, p, 13)
        storeLE64(syncPointCount, p, 21)
        stateDigest.withUnsafeBytes { (p + 29).copyMemory(from: $0.baseAddress!, byteCount: 32) }
    }

    static func parse(_ c: inout ByteCursor) throws(LogError) -> LogTrailer {
        let rawReason = try c.u8("end reason")
        guard let reason = EndReason(rawValue: rawReason) else {
            throw c.fail("unknown end reason \(rawReason)", at: c.pos - 1)
        }
        let status = try c.u32("exit status")
        let finalExit = try c.u64("final exit")
        let events = try c.u64("event count")
        let syncs = try c.u64("sync point count")
        let digest = try c.bytes(32, "state digest")
        guard c.atEnd else { throw c.fail("\(c.remaining) extra bytes after the trailer") }
        return LogTrailer(endReason: reason, exitStatus: status, finalExit: finalExit, eventCount: events,
                          syncPointCount: syncs, stateDigest: digest)
    }
}
