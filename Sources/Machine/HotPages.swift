/// Pages the guest rewrites between every two dirty-log fetches: a stack, a tick counter. Each fetch that
/// clears a page write-protects it, and the guest's next write to it faults (about 6.6 µs under PVM; with
/// timer-compute, four pages at every sync point). With manual protection these pages are left out of the
/// clear: they stay writable, and every fetch reports them, so each sync point carries them whether or not
/// they were written since the last. That is a superset of the written pages, which replay tolerates (it
/// rewrites a page with the bytes it already has).
///
/// A page becomes hot when two fetches in a row report it. Every `reprobeEvery` fetches all hot pages are
/// cleared again, so a page that cooled costs at most that many needless copies; at most `limit` pages are
/// hot at once. Pure bookkeeping over bitmaps, tested without KVM.
final class HotPages {
    let words: Int
    let limit: Int
    let reprobeEvery: Int
    /// Pages hot now.
    private(set) var count = 0
    /// Of the last fetch's pages, those that were hot before it: left writable since the fetch before.
    private(set) var reportedHot = 0
    private var fetches = 0
    /// One bit per hot page.
    let hot: UnsafeMutablePointer<UInt64>
    /// The previous fetch's pages.
    private let previous: UnsafeMutablePointer<UInt64>
    /// The pages `plan` decided to clear: fetched and not hot.
    let clear: UnsafeMutablePointer<UInt64>

    init(words: Int, limit: Int = 64, reprobeEvery: Int = 32) {
        precondition(limit >= 0 && reprobeEvery > 0, "hot pages: limit \(limit), reprobe every \(reprobeEvery)")
        self.words = words; self.limit = limit; self.reprobeEvery = reprobeEvery
        func bitmap() -> UnsafeMutablePointer<UInt64> {
            let b = UnsafeMutablePointer<UInt64>.allocate(capacity: max(words, 1))
            b.initialize(repeating: 0, count: max(words, 1))
            return b
        }
        hot = bitmap(); previous = bitmap(); clear = bitmap()
    }

    deinit { hot.deallocate(); previous.deallocate(); clear.deallocate() }

    /// Takes one fetch (`words` words) and fills `clear`. Returns whether any page is to be cleared.
    func plan(fetched: UnsafePointer<UInt64>) -> Bool {
        fetches += 1
        let reprobe = fetches % reprobeEvery == 0
        if reprobe { count = 0 }
        var any = false
        reportedHot = 0
        for i in 0..<words {
            let w = fetched[i]
            reportedHot += (w & hot[i]).nonzeroBitCount
            if reprobe {
                hot[i] = 0
            } else {
                let rising = w & previous[i] & ~hot[i]
                if rising != 0 && count + rising.nonzeroBitCount <= limit {
                    hot[i] |= rising
                    count += rising.nonzeroBitCount
                }
            }
            let c = w & ~hot[i]
            clear[i] = c
            if c != 0 { any = true }
            previous[i] = w
        }
        return any
    }

    func isHot(_ page: Int) -> Bool { hot[page >> 6] & (1 << UInt64(page & 63)) != 0 }
}
