#if canImport(Glibc)
import Glibc
#endif

/// Replaces `path` with `bytes` atomically: written to `temporary` (and fsynced when `sync`), then renamed over
/// it, so a reader sees the old content or the new, whole. A failure names the file and the reason (ENOSPC:
/// disk full) and removes `temporary` (unless `removeTemporary` is false: a test's /dev/full).
public func replaceFile(_ path: String, with bytes: [UInt8], temporary tmp: String, sync: Bool, removeTemporary: Bool = true) throws(LogError) {
    let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw .io(path: tmp, errno: errno, detail: "cannot create") }
    var failure: LogError?
    var off = 0
    while off < bytes.count {
        let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + off, $0.count - off) }
        if n < 0, errno == EINTR { continue }
        guard n > 0 else { failure = .io(path: tmp, errno: n < 0 ? errno : ENOSPC, detail: "cannot write"); break }
        off += n
    }
    if failure == nil, sync, fsync(fd) != 0 { failure = .io(path: tmp, errno: errno, detail: "cannot fsync") }
    close(fd)
    if failure == nil, rename(tmp, path) != 0 { failure = .io(path: path, errno: errno, detail: "cannot rename \(tmp) to it") }
    if let failure {
        if removeTemporary { unlink(tmp) }
        throw failure
    }
}
