#if canImport(Glibc)
import Glibc
#endif

/// Reads a complete log. Refuses a log without a valid trailer (truncated / never finished) with a clear error.
///
/// `init` validates the header, then the footer and the trailer frame at the end of the file, before any record
/// is read. `next()` then reads frames sequentially; every length is checked against the bytes that remain
/// before the trailer before anything is allocated.
public final class LogFileReader {
    private enum Source {
        case file(Int32)
        case memory([UInt8])
    }

    public let path: String
    public let header: LogHeader
    public let trailer: LogTrailer
    /// File size.
    public let size: UInt64
    /// Offset of the first frame (the byte after the header's CRC).
    public let firstFrameOffset: UInt64
    /// Offset of the trailer frame.
    public let trailerOffset: UInt64
    /// Number of records returned so far.
    public private(set) var recordIndex: UInt64 = 0

    private let source: Source
    private let trailerSequence: UInt32
    private var position: UInt64
    private var decoder = FrameDecoder()
    private var pending: [LocatedRecord] = []
    private var pendingIndex = 0
    private var frameBuffer: [UInt8] = []
    private var eventsSeen: UInt64 = 0
    private var syncPointsSeen: UInt64 = 0
    private var failure: LogError?
    private var done = false

    /// Opens and validates a log file: header, footer and trailer.
    public convenience init(path: String) throws(LogError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(path: path, errno: errno, detail: "cannot open the log") }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw .io(path: path, errno: e, detail: "cannot stat the log")
        }
        do {
            try self.init(path: path, source: .file(fd), size: UInt64(st.st_size))
        } catch {
            close(fd)
            throw error
        }
    }

    /// Reads a log held in memory (`name` is used in messages).
    public convenience init(bytes: [UInt8], name: String = "<memory>") throws(LogError) {
        try self.init(path: name, source: .memory(bytes), size: UInt64(bytes.count))
    }

    private init(path: String, source: Source, size: UInt64) throws(LogError) {
        self.path = path
        self.source = source
        self.size = size
        let magic = LogFormat.magic
        // Magic and version first: they decide whether this is a log we can read at all.
        let prefixCount = Int(min(size, UInt64(LogFormat.fileHeaderPrefixSize)))
        let prefix = try Self.read(source, path: path, at: 0, count: prefixCount)
        let magicCount = min(prefix.count, magic.count)
        guard Array(prefix[0..<magicCount]) == Array(magic[0..<magicCount]) else { throw .notALog(path: path) }
        guard prefix.count == LogFormat.fileHeaderPrefixSize else {
            throw .truncated(path: path, offset: size, detail: "the file ends inside the \(LogFormat.fileHeaderPrefixSize)-byte header prefix")
        }
        let version = prefix.withUnsafeBytes { loadLE16($0, 8) }
        guard version == LogHeader.currentVersion else {
            throw .unsupportedVersion(found: version, supported: LogHeader.currentVersion)
        }
        let fieldsLength = Int(prefix.withUnsafeBytes { loadLE32($0, 12) })
        guard fieldsLength <= LogFormat.maxHeaderFieldsLength else {
            throw .corrupt(offset: 12, detail: "header fields length \(fieldsLength) exceeds the bound \(LogFormat.maxHeaderFieldsLength)")
        }
        let headerSize = LogFormat.fileHeaderPrefixSize + fieldsLength + 4
        guard UInt64(headerSize) <= size else {
            throw .truncated(path: path, offset: size, detail: "the header announces \(headerSize) bytes, the file has \(size)")
        }
        let headerBytes = try Self.read(source, path: path, at: 0, count: headerSize)
        header = try headerBytes.withBytes { (h) throws(LogError) -> LogHeader in
            let stored = loadLE32(h, headerSize - 4)
            let computed = crc32c(UnsafeRawBufferPointer(rebasing: h[0..<(headerSize - 4)]))
            guard stored == computed else {
                throw .corrupt(offset: UInt64(headerSize - 4), detail: "header CRC32C mismatch (stored 0x\(String(stored, radix: 16)), "
                               + "computed 0x\(String(computed, radix: 16)))")
            }
            guard loadLE16(h, 10) == 0 else { throw .corrupt(offset: 10, detail: "header flags are not zero") }
            return try LogHeader.parseFields(h, fieldsLength: fieldsLength)
        }
        firstFrameOffset = UInt64(headerSize)

        // The footer, then the trailer it points to. Without them the log was never finished.
        let trailerFrameSize = LogFormat.frameHeaderSize + LogFormat.trailerPayloadSize
        guard size >= firstFrameOffset + UInt64(trailerFrameSize + LogFormat.footerSize) else { throw .incomplete(path: path) }
        let footerOffset = size - UInt64(LogFormat.footerSize)
        let footer = try Self.read(source, path: path, at: footerOffset, count: LogFormat.footerSize)
        guard Array(footer[16..<24]) == LogFormat.footerMagic else { throw .incomplete(path: path) }
        let (tOffset, tLength, fCRC, fComputed) = footer.withUnsafeBytes { f in
            (loadLE64(f, 0), loadLE32(f, 8), loadLE32(f, 12), crc32c(UnsafeRawBufferPointer(rebasing: f[0..<12])))
        }
        guard fCRC == fComputed else {
            throw .corrupt(offset: footerOffset + 12, detail: "footer CRC32C mismatch")
        }
        guard Int(tLength) == trailerFrameSize, tOffset >= firstFrameOffset,
              tOffset == footerOffset - UInt64(trailerFrameSize) else {
            throw .corrupt(offset: footerOffset, detail: "footer points to a trailer of \(tLength) bytes at byte \(tOffset); "
                           + "expected \(trailerFrameSize) bytes at byte \(footerOffset - UInt64(trailerFrameSize))")
        }
        trailerOffset = tOffset
        let trailerFrame = try Self.read(source, path: path, at: tOffset, count: trailerFrameSize)
        let (t, seq) = try trailerFrame.withBytes { (f) throws(LogError) -> (LogTrailer, UInt32) in
            let h = try FrameHeader.parse(f, at: tOffset)
            // The trailer's sequence number is checked when the reader reaches it.
            var d = FrameDecoder(firstSequence: h.sequence)
            return (try d.decodeTrailer(frame: f, at: tOffset), h.sequence)
        }
        trailer = t
        trailerSequence = seq
        position = firstFrameOffset
    }

    deinit {
        if case .file(let fd) = source { close(fd) }
    }

    private static func read(_ source: Source, path: String, at offset: UInt64, count: Int) throws(LogError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withMutableBytes { (o) throws(LogError) in try read(source, path: path, at: offset, into: o) }
        return out
    }

    /// Fills `out` with the bytes at `offset`; a short file is `truncated`.
    private static func read(_ source: Source, path: String, at offset: UInt64,
                             into out: UnsafeMutableRawBufferPointer) throws(LogError) {
        let count = out.count
        switch source {
        case .memory(let bytes):
            guard offset <= UInt64(bytes.count), UInt64(count) <= UInt64(bytes.count) - offset else {
                throw .truncated(path: path, offset: UInt64(bytes.count), detail: "needed \(count) bytes at byte \(offset)")
            }
            let start = Int(offset)
            bytes.withUnsafeBytes { b in out.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[start..<start + count])) }
        case .file(let fd):
            var done = 0
            while done < count {
                let n = pread(fd, out.baseAddress! + done, count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw .io(path: path, errno: errno, detail: "reading \(count) bytes at byte \(offset)")
                }
                if n == 0 {
                    throw .truncated(path: path, offset: offset + UInt64(done),
                                     detail: "the file ended while reading \(count) bytes at byte \(offset) (did it shrink?)")
                }
                done += n
            }
        }
    }

    /// The next record, or nil at the trailer.
    public func next() throws(LogError) -> LogRecord? {
        try nextLocated()?.record
    }

    /// The next record with its byte offset and frame (for `lockstep log inspect`), or nil at the trailer.
    public func nextLocated() throws(LogError) -> LocatedRecord? {
        if let failure { throw failure }
        do {
            while pendingIndex >= pending.count {
                if done { return nil }
                try readFrame()
            }
        } catch {
            failure = error
            throw error
        }
        let r = pending[pendingIndex]
        pendingIndex += 1
        recordIndex += 1
        return r
    }

    /// Every remaining record.
    public func readAll() throws(LogError) -> [LogRecord] {
        var out: [LogRecord] = []
        while let r = try next() { out.append(r) }
        return out
    }

    private func readFrame() throws(LogError) {
        pending.removeAll(keepingCapacity: true)
        pendingIndex = 0
        if position == trailerOffset {
            guard trailerSequence == decoder.nextSequence else {
                throw .outOfSequence(offset: trailerOffset + 4, expected: decoder.nextSequence, found: trailerSequence)
            }
            guard eventsSeen == trailer.eventCount, syncPointsSeen == trailer.syncPointCount else {
                throw .corrupt(offset: trailerOffset, detail: "the trailer counts \(trailer.eventCount) events and "
                               + "\(trailer.syncPointCount) sync points, the log holds \(eventsSeen) and \(syncPointsSeen)")
            }
            done = true
            return
        }
        let room = trailerOffset - position
        guard room >= UInt64(LogFormat.frameHeaderSize) else {
            throw .corrupt(offset: position, detail: "\(room) stray bytes before the trailer")
        }
        let head = try Self.read(source, path: path, at: position, count: LogFormat.frameHeaderSize)
        let h = try head.withBytes { (b) throws(LogError) in try FrameHeader.parse(b, at: position) }
        guard h.kind != .trailer else {
            throw .corrupt(offset: position, detail: "frame \(h.sequence): a trailer frame before the end of the log")
        }
        guard UInt64(h.frameLength) <= room else {
            throw .corrupt(offset: position + 8, detail: "frame \(h.sequence): \(h.frameLength) bytes would run past the trailer at byte \(trailerOffset)")
        }
        if frameBuffer.count < h.frameLength || frameBuffer.count > 4 * LogFormat.maxEventsPayload {
            // Sized from a length already checked against the bytes left in the file.
            frameBuffer = [UInt8](repeating: 0, count: max(h.frameLength, 64 * 1024))
        }
        let at = position
        let n = h.frameLength
        let source = self.source, path = self.path
        pending = try frameBuffer.withMutableBytes { (b) throws(LogError) in
            let f = UnsafeMutableRawBufferPointer(rebasing: b[0..<n])
            try Self.read(source, path: path, at: at, into: f)
            return try decoder.decodeLocated(frame: UnsafeRawBufferPointer(f), at: at)
        }
        for r in pending {
            if case .event = r.record { eventsSeen += 1 } else { syncPointsSeen += 1 }
        }
        position += UInt64(h.frameLength)
    }
}
