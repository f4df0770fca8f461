import CLockstep

/// What both ends of a log hold to delta-encode sync points (docs/log-format.md, "References").
///
/// A guest interrupted by a timer dirties the same few pages between two sync points (its stack, the tick
/// counter) and changes a few bytes of each, and a few registers of its vCPU state. The encoder and every
/// decoder of one stream keep the same references, updated in the same order from the same bytes: the
/// previous sync point's vCPU state, and a direct-mapped cache of pages (slot = page number mod `slots`) from
/// the sync points of at most `maxPages` pages. A delta names no slot: the page number chooses it, and the
/// decoder checks the slot holds that page. Large sync points neither use nor fill the cache (a guest that
/// streams through memory would only evict and copy).
final class References {
    static let slots = 4096
    static let maxPages = 1024
    /// Slot contents, `slots` × 4096 bytes; allocated on first use, and only the slots used become resident.
    private var pages: UnsafeMutableRawPointer?
    /// Page number + 1 per slot (64-bit, so page 2^32−1 does not wrap to "empty"); 0 = empty.
    private let tags: UnsafeMutablePointer<UInt64>
    /// The previous sync point's vCPU state (the decoder updates it in place).
    var state: [UInt8] = []

    init() {
        tags = .allocate(capacity: Self.slots)
        tags.initialize(repeating: 0, count: Self.slots)
    }

    deinit {
        tags.deallocate()
        pages?.deallocate()
    }

    func reset() {
        tags.update(repeating: 0, count: Self.slots)
        state = []
    }

    /// The reference of `page`, or nil when its slot holds another page (or none).
    func page(_ page: UInt32) -> UnsafeMutableRawPointer? {
        let slot = Int(page) % Self.slots
        guard tags[slot] == UInt64(page) + 1, let base = pages else { return nil }
        return base + slot * LogFormat.pageSize
    }

    /// Stores `bytes` (4096) as the reference of `page`.
    func store(_ page: UInt32, _ bytes: UnsafeRawPointer) {
        let base = pages ?? {
            let p = UnsafeMutableRawPointer.allocate(byteCount: Self.slots * LogFormat.pageSize, alignment: 4096)
            pages = p
            return p
        }()
        let slot = Int(page) % Self.slots
        (base + slot * LogFormat.pageSize).copyMemory(from: bytes, byteCount: LogFormat.pageSize)
        tags[slot] = UInt64(page) + 1
    }

    func storeState(_ bytes: UnsafeRawBufferPointer) {
        state.removeAll(keepingCapacity: true)
        state.append(contentsOf: bytes)
    }
}

/// How one item (the vCPU state, a page) of a sync point is stored. 0 is invalid.
enum ItemEncoding: UInt8 {
    /// The bytes themselves.
    case raw = 1
    /// A delta stream against the item's reference.
    case delta = 2
}

/// Flags byte of a sync point (format version 2). Bits 1–7 are reserved (0).
enum SyncPointFlags {
    /// The writer dropped its references before this sync point (a new reader starts here): so does the reader.
    static let resetReferences: UInt8 = 0x01
    static let reserved: UInt8 = 0xFE
}
