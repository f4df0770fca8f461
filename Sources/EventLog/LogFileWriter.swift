#if canImport(Glibc)
import Glibc
#endif

/// Writes a log file under a temporary name ("<path>.partial"), renamed to path only by finish().
///
/// Write errors (ENOSPC: "disk full") are thrown as `LogError.io`. Frames already written stay in the
/// .partial file; frames that failed stay in the encoder and are written again by the next flush,
/// over any torn bytes the failed write left.
public final class LogFileWriter {
    public let path: String
    public let temporaryPath: String
    public let encoder: LogEncoder
    private var fd: Int32 = -1
    /// Bytes of whole structures (header, frames) written to the file.
    public private(set) var bytesWritten: UInt64 = 0
    /// A write failed part way: the file may hold torn bytes after `bytesWritten`.
    private var torn = false

    public convenience init(path: String, header: LogHeader) throws(LogError) {
        try self.init(path: path, temporaryPath: path + ".partial", header: header)
    }

    /// `temporaryPath` is where frames go until `finish` renames it to `path` (tests point it at /dev/full).
    public init(path: String, temporaryPath: String, header: LogHeader, frameTarget: Int = 64 * 1024) throws(LogError) {
        self.path = path
        self.temporaryPath = temporaryPath
        self.encoder = LogEncoder(frameTarget: frameTarget)
        let f = open(temporaryPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard f >= 0 else { throw .io(path: temporaryPath, errno: errno, detail: "cannot create the log file") }
        fd = f
        let bytes = header.encoded()
        do {
            try bytes.withBytes { (b) throws(LogError) in try write(b, what: "writing the log header") }
        } catch {
            close(fd)
            fd = -1
            throw error
        }
    }

    deinit {
        if fd >= 0 { close(fd) }
    }

    private func write(_ bytes: UnsafeRawBufferPointer, what: String) throws(LogError) {
        guard fd >= 0 else { throw .io(path: temporaryPath, errno: EBADF, detail: "\(what): the log is already closed") }
        if torn {
            // Drop the torn tail of a failed write so the retry lands where the last whole frame ended.
            guard lseek(fd, off_t(bytesWritten), SEEK_SET) >= 0 else {
                throw .io(path: temporaryPath, errno: errno, detail: "\(what): seeking back after a failed write")
            }
            _ = ftruncate(fd, off_t(bytesWritten))
            torn = false
        }
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                torn = done > 0
                throw .io(path: temporaryPath, errno: e, detail: "\(what) (\(bytes.count) bytes at byte \(bytesWritten))")
            }
            if n == 0 {
                torn = done > 0
                throw .io(path: temporaryPath, errno: EIO, detail: "\(what): write made no progress")
            }
            done += n
            torn = true
        }
        torn = false
        bytesWritten += UInt64(bytes.count)
    }

    /// Writes the buffered frames when the encoder has reached its frame target.
    public func flushIfNeeded() throws(LogError) {
        if encoder.shouldFlush { try flush() }
    }

    /// Seals and writes everything buffered (no fsync).
    public func flush() throws(LogError) {
        try encoder.sealFrame { (frame) throws(LogError) in try write(frame, what: "writing a frame") }
    }

    /// Seals, writes the trailer frame and the footer, fsyncs, renames to `path` and fsyncs the directory.
    /// The trailer's event and sync point counts are taken from the encoder.
    public func finish(trailer: LogTrailer) throws(LogError) {
        var t = trailer
        t.eventCount = encoder.eventCount
        t.syncPointCount = encoder.syncPointCount
        var trailerOffset: UInt64 = 0
        try encoder.sealTrailer(t) { (frame) throws(LogError) in
            let offset = bytesWritten
            try write(frame, what: frame[0] == FrameKind.trailer.rawValue ? "writing the trailer" : "writing a frame")
            trailerOffset = offset
        }
        var footer = [UInt8](repeating: 0, count: LogFormat.footerSize)
        footer.withUnsafeMutableBytes { f in
            storeLE64(trailerOffset, f.baseAddress!, 0)
            storeLE32(UInt32(LogFormat.frameHeaderSize + LogFormat.trailerPayloadSize), f.baseAddress!, 8)
            storeLE32(crc32c(UnsafeRawBufferPointer(rebasing: f[0..<12])), f.baseAddress!, 12)
            for (i, b) in LogFormat.footerMagic.enumerated() { f[16 + i] = b }
        }
        try footer.withBytes { (b) throws(LogError) in try write(b, what: "writing the footer") }
        guard fsync(fd) == 0 else { throw .io(path: temporaryPath, errno: errno, detail: "fsync of the log") }
        let closed = close(fd)
        fd = -1
        guard closed == 0 else { throw .io(path: temporaryPath, errno: errno, detail: "closing the log") }
        guard rename(temporaryPath, path) == 0 else {
            throw .io(path: path, errno: errno, detail: "renaming \(temporaryPath) to the final name")
        }
        let dir = Self.directory(of: path)
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dfd >= 0 else { throw .io(path: dir, errno: errno, detail: "opening the log's directory to fsync it") }
        defer { close(dfd) }
        guard fsync(dfd) == 0 else { throw .io(path: dir, errno: errno, detail: "fsync of the log's directory") }
    }

    /// Closes the file and leaves the .partial file for inspection.
    public func abandon() {
        if fd >= 0 { close(fd) }
        fd = -1
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let d = String(path[..<slash])
        return d.isEmpty ? "/" : d
    }
}
