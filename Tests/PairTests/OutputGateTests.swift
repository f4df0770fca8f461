import Foundation
import Machine
import Testing
@testable import Pair

/// The output rule without processes: which bytes the gate lets out for which ack, and what the secondary
/// re-emits on go-live.
@Suite struct OutputGateTests {
    final class Sink: SerialOutput {
        var bytes: [UInt8] = []
        var flushes = 0
        func emit(_ byte: UInt8, exit: UInt64) { bytes.append(byte) }
        func flush() { flushes += 1 }
        var text: String { String(decoding: bytes, as: UTF8.self) }
    }

    func emit(_ s: String, _ out: SerialOutput, from exit: UInt64) {
        for (i, b) in s.utf8.enumerated() { out.emit(b, exit: exit + UInt64(i)) }
    }

    @Test func aByteLeavesOnceTheSecondaryHoldsTheRecordsBeforeItsExit() {
        let sink = Sink(), gate = OutputGate(backend: sink)
        gate.startGating(from: 10)
        emit("ab\n", gate, from: 10)  // exits 10, 11, 12
        gate.secondaryHolds(below: 9)
        #expect(sink.text == "")
        gate.secondaryHolds(below: 10)  // the OUT at exit 10 needs only records of exits < 10
        #expect(sink.text == "a")
        gate.secondaryHolds(below: 12)
        #expect(sink.text == "ab\n")
        #expect(gate.heldBytes == 0)
    }

    @Test func onlyAWholeLineAsksForTheWatermark() {
        let sink = Sink(), gate = OutputGate(backend: sink)
        gate.startGating(from: 0)
        emit("partial", gate, from: 1)
        #expect(!gate.lineWaits)
        emit("\n", gate, from: 8)
        #expect(gate.lineWaits)
        gate.secondaryHolds(below: 8)
        #expect(!gate.lineWaits && sink.text == "partial\n")
    }

    @Test func anIdleFlushWaitsUntilTheHeldBytesBeforeItLeft() {
        let sink = Sink(), gate = OutputGate(backend: sink)
        gate.startGating(from: 0)
        emit("ok", gate, from: 1)
        gate.flush()
        #expect(sink.flushes == 0)  // flushing now would send the line in two datagrams
        gate.secondaryHolds(below: 2)
        #expect(sink.flushes == 1 && sink.text == "ok")
    }

    /// The flush leaves where it was asked for: a later line released in the same drain is not cut in two.
    @Test func aDeferredFlushDoesNotSplitTheNextLine() {
        final class Lines: SerialOutput {
            var pending: [UInt8] = [], datagrams: [String] = []
            func emit(_ byte: UInt8, exit: UInt64) { pending.append(byte); if byte == 0x0A { flush() } }
            func flush() { if !pending.isEmpty { datagrams.append(String(decoding: pending, as: UTF8.self)); pending = [] } }
        }
        let sink = Lines(), gate = OutputGate(backend: sink)
        gate.startGating(from: 0)
        emit("> ", gate, from: 1)  // a prompt, then the guest idles
        gate.flush()
        emit("REP 1 abc", gate, from: 3)  // half of the next line is released in the same drain
        gate.secondaryHolds(below: 10)
        #expect(sink.datagrams == ["> "])
        emit("def\n", gate, from: 12)
        gate.secondaryHolds(below: 20)
        #expect(sink.datagrams == ["> ", "REP 1 abcdef\n"])
    }

    @Test func losingTheSecondaryReleasesEverythingAndStopsGating() {
        let sink = Sink(), gate = OutputGate(backend: sink)
        gate.startGating(from: 0)
        emit("x\n", gate, from: 5)
        gate.stopGating()
        #expect(sink.text == "x\n")
        emit("y", gate, from: 100)
        #expect(sink.text == "x\ny")
    }

    @Test func theSecondaryReEmitsFromTheLastReleasedLineOnGoLive() {
        let out = SuppressedOutput(), sink = Sink()
        emit("one\ntw", out, from: 1)  // exits 1...6
        out.primaryReleased(below: 6)  // "one\nt" left the primary; its backend may still hold "t"
        #expect(out.goLive(to: sink) == 2)
        #expect(sink.text == "tw")  // the partial line again, whole: a duplicate at worst, never a gap
        emit("!", out, from: 7)
        #expect(sink.text == "tw!")
    }

    @Test func aLineTheReplayFinishesAfterItWasReportedReleasedIsNotSentAgain() {
        let out = SuppressedOutput(), sink = Sink()
        out.primaryReleased(below: 10)  // the report can overtake a lagging replay
        emit("ok\nnext", out, from: 5)  // exits 5...11: "ok\n" below 10, "next" from exit 8 (its end is not)
        #expect(out.goLive(to: sink) == 4)
        #expect(sink.text == "next")
    }

    /// A secondary seeded while the primary's guest was mid-line gets the line's start with the seed (the
    /// primary's backend held it unsent): on go-live it sends the line whole, not its end alone.
    @Test func aSecondarySeededMidLineSendsTheLineWhole() throws {
        let path = "/tmp/lockstep-gate-head-\(getpid()).serial"
        defer { unlink(path) }
        let primary = try SerialBackend(.file(path))
        emit("REP 1 one\nREP 2 t", primary, from: 10)  // exits 10...25: "REP 2 t" waits for its newline
        let head = primary.unsentLine(limit: SeedEnd.maxLineHead)
        #expect(String(decoding: head, as: UTF8.self) == "REP 2 t")
        let out = SuppressedOutput(), sink = Sink()
        out.startLine(head, seedExit: 26)
        emit("wo", out, from: 26)
        out.primaryReleased(below: 28)  // the primary released it all; its backend still holds the line
        primary.close(sendingPartialLine: false)  // handed over
        #expect(out.goLive(to: sink) == 9)
        emit("\n", out, from: 28)
        #expect(sink.text == "REP 2 two\n")
        #expect(String(decoding: FileManager.default.contents(atPath: path) ?? Data(), as: UTF8.self) == "REP 1 one\n")
        // A released line the replay finishes drops its head too.
        let done = SuppressedOutput()
        done.startLine(Array("REP 3 th".utf8), seedExit: 40)
        done.primaryReleased(below: 50)
        emit("ree\n", done, from: 40)
        #expect(done.goLive(to: Sink()) == 0)
    }

    /// A primary that hands its guest over mid-line closes its backend without the line's start: the survivor
    /// re-emits that line whole, and a client reading lines must not get its start twice.
    @Test func aHandedOverPrimarySendsNoHalfLine() throws {
        let path = "/tmp/lockstep-gate-\(getpid()).serial"
        defer { unlink(path) }
        let b = try SerialBackend(.file(path))
        emit("REP 1 one\nREP 2 t", b, from: 10)
        b.close(sendingPartialLine: false)
        #expect(String(decoding: FileManager.default.contents(atPath: path) ?? Data(), as: UTF8.self) == "REP 1 one\n")
        let c = try SerialBackend(.file(path))
        emit("REP 3 th", c, from: 30)
        c.close()  // any other end (the guest's, a failure's report): what the guest wrote goes out
        #expect(String(decoding: FileManager.default.contents(atPath: path) ?? Data(), as: UTF8.self) == "REP 3 th")
    }
}
