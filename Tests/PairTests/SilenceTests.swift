import Testing
@testable import Pair

/// The failure-detection rule of both link threads, without processes: what counts as the peer's silence.
@Suite struct SilenceTests {
    static let ms: UInt64 = 1_000_000
    static let failure = 50 * ms, timeout = 5 * ms

    /// Receives that wait their 5 ms and get nothing: the failure is declared once 50 ms have passed.
    @Test func waitingReceivesDeclareAtTheTimeout() {
        var s = Silence(now: 0)
        var t: UInt64 = 0
        var declared: UInt64?
        while declared == nil, t < 200 * Self.ms {
            let began = t
            t += Self.timeout
            declared = s.reached(Self.failure, lastReceiveNs: 0, receiveBegan: began, timeoutNs: Self.timeout, now: t)
        }
        #expect(t == Self.failure && declared == 50)
    }

    /// Bytes of a frame still arriving, and whole messages, are life.
    @Test func bytesAndMessagesAreLife() {
        var s = Silence(now: 0)
        #expect(s.reached(Self.failure, lastReceiveNs: 40 * Self.ms, receiveBegan: 84 * Self.ms, timeoutNs: Self.timeout, now: 89 * Self.ms) == nil)
        #expect(s.reached(Self.failure, lastReceiveNs: 40 * Self.ms, receiveBegan: 89 * Self.ms, timeoutNs: Self.timeout, now: 90 * Self.ms) == 50)
        s.heard(now: 100 * Self.ms)
        #expect(s.reached(Self.failure, lastReceiveNs: 0, receiveBegan: 145 * Self.ms, timeoutNs: Self.timeout, now: 149 * Self.ms) == nil)
        #expect(s.reached(Self.failure, lastReceiveNs: 0, receiveBegan: 149 * Self.ms, timeoutNs: Self.timeout, now: 150 * Self.ms) == 50)
    }

    /// A receive that overran its timeout by more than as much again was busy, not listening (gathering a
    /// 96 MiB batch's parts took ~90 ms): its silence is not judged, the next receive's is. Only once in a
    /// row: a thread late every time still declares, one receive later.
    @Test func aBusyReceiveDefersTheVerdictOnce() {
        var s = Silence(now: 0)
        // Busy from 0 to 91 ms: no verdict, although nothing arrived for 91 ms.
        #expect(s.reached(Self.failure, lastReceiveNs: 0, receiveBegan: 0, timeoutNs: Self.timeout, now: 91 * Self.ms) == nil)
        // The next receive overran too (an overloaded host): now it counts.
        #expect(s.reached(Self.failure, lastReceiveNs: 0, receiveBegan: 91 * Self.ms, timeoutNs: Self.timeout, now: 120 * Self.ms) == 120)
        // A receive just over its timeout (scheduling) is a wait: judged at once.
        var w = Silence(now: 0)
        #expect(w.reached(Self.failure, lastReceiveNs: 0, receiveBegan: 45 * Self.ms, timeoutNs: Self.timeout, now: 54 * Self.ms) == 54)
    }

    /// After a deferral, hearing the peer (the unstarved primary's part or heartbeat) ends it, and a later
    /// busy receive may be deferred again.
    @Test func hearingThePeerEndsTheDeferral() {
        var s = Silence(now: 0)
        #expect(s.reached(Self.failure, lastReceiveNs: 0, receiveBegan: 0, timeoutNs: Self.timeout, now: 91 * Self.ms) == nil)
        #expect(s.reached(Self.failure, lastReceiveNs: 92 * Self.ms, receiveBegan: 91 * Self.ms, timeoutNs: Self.timeout, now: 93 * Self.ms) == nil)
        #expect(s.reached(Self.failure, lastReceiveNs: 92 * Self.ms, receiveBegan: 93 * Self.ms, timeoutNs: Self.timeout, now: 200 * Self.ms) == nil)
        #expect(s.reached(Self.failure, lastReceiveNs: 92 * Self.ms, receiveBegan: 200 * Self.ms, timeoutNs: Self.timeout, now: 205 * Self.ms) == 113)
    }
}
