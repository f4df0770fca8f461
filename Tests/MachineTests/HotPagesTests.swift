@testable import Machine
import Testing

/// The hot-page rule, without KVM: which reported pages a fetch clears (write-protects) and which it leaves writable.
struct HotPagesTests {
    /// One fetch of the pages `set` (two words: pages 0-127); returns the pages to clear.
    func fetch(_ h: HotPages, _ set: [Int]) -> Set<Int> {
        var words = [UInt64](repeating: 0, count: h.words)
        for p in set { words[p >> 6] |= 1 << UInt64(p & 63) }
        let any = words.withUnsafeBufferPointer { h.plan(fetched: $0.baseAddress!) }
        var cleared = Set<Int>()
        for p in 0..<(h.words * 64) where h.clear[p >> 6] & (1 << UInt64(p & 63)) != 0 { cleared.insert(p) }
        #expect(any == !cleared.isEmpty)
        return cleared
    }

    @Test func aPageReportedTwiceInARowStaysWritableAndOnceIsCleared() {
        let h = HotPages(words: 2, limit: 8, reprobeEvery: 100)
        #expect(fetch(h, [3, 70]) == [3, 70])
        #expect(fetch(h, [3, 71]) == [71])       // 3 again: hot, left writable; 71 is new
        #expect(h.isHot(3) && !h.isHot(70) && !h.isHot(71))
        #expect(fetch(h, [3]) == [])             // KVM keeps reporting an uncleared page: nothing to clear
        #expect(h.reportedHot == 1)              // 3 came writable, not through a fault
        #expect(fetch(h, [3, 70]) == [70])       // 70 was not reported the fetch before: cleared again
        #expect(h.count == 1)
    }

    @Test func everyPageIsClearedAtTheReprobeAndOnlyARewrittenOneTurnsHotAgain() {
        let h = HotPages(words: 2, limit: 8, reprobeEvery: 4)
        _ = fetch(h, [5, 6])
        #expect(fetch(h, [5, 6]) == [])          // fetch 2: both hot
        #expect(fetch(h, [5, 6]) == [])          // fetch 3
        #expect(fetch(h, [5, 6]) == [5, 6])      // fetch 4: the reprobe clears them
        #expect(h.count == 0 && h.reportedHot == 2)
        #expect(fetch(h, [5]) == [])             // 5 rewritten since: hot again; 6 cooled and stays clear
        #expect(h.isHot(5) && !h.isHot(6) && h.count == 1)
    }

    @Test func atMostTheLimitIsHot() {
        let h = HotPages(words: 2, limit: 3, reprobeEvery: 100)
        let pages = [1, 2, 64, 65, 66]
        _ = fetch(h, pages)
        let cleared = fetch(h, pages)
        #expect(h.count <= 3)
        #expect(cleared.count == pages.count - h.count)
        // A word's new pages join whole or not at all: here the first word's two fit and the second's three do not.
        #expect(cleared == [64, 65, 66])
    }

    @Test func aLimitOfZeroClearsEverythingAsAPlainFetchWould() {
        let h = HotPages(words: 2, limit: 0, reprobeEvery: 100)
        for _ in 0..<3 { #expect(fetch(h, [9, 100]) == [9, 100]) }
    }
}
