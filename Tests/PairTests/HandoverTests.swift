import Channel
import Synchronization
import Testing
@testable import Pair

/// A handover's outcome on the FT link and its waiters, without processes (`FailoverTests` runs handovers).
@Suite struct HandoverTests {
    @Test(arguments: [HandoverOutcome.handedOver("moved"), .refused("handover refused: not yet"), .failed("handover failed: fenced")])
    func anAnswerRoundTrips(_ outcome: HandoverOutcome) throws {
        guard case .status(let body) = try outcome.frame.decode() else { Issue.record("not a status frame"); return }
        #expect(body.first == PairMessage.handoverAnswer.rawValue)
        #expect(try HandoverOutcome(answer: body) == outcome)
    }

    @Test func anAnswerOfNoKnownKindIsNamed() throws {
        for kind: UInt8 in [0, 4] {
            do { _ = try HandoverOutcome(answer: [PairMessage.handoverAnswer.rawValue, kind] + Array("x".utf8)); Issue.record("kind \(kind) was accepted") } catch {
                #expect(error.description.contains("unknown kind \(kind)"), "\(error)")
            }
        }
        do { _ = try HandoverOutcome(answer: [PairMessage.handoverAnswer.rawValue]); Issue.record("an empty answer was accepted") } catch {
            #expect(error.description.contains("handover answer ends early"), "\(error)")
        }
    }

    /// Every waiter is answered once; after the stream or run ends, a new one is refused at once.
    @Test func repliesAreAnsweredOnceAndRefusedAfterTheEnd() {
        let replies = HandoverReplies()
        let got = Mutex<[HandoverOutcome]>([])
        let record: HandoverReplies.Reply = { o in got.withLock { $0.append(o) } }
        #expect(replies.add(record) && replies.add(record))
        replies.answer(.refused("a"), closing: false)
        replies.answer(.refused("b"), closing: false)  // nobody waits any more
        #expect(replies.add(record))
        replies.answer(.handedOver("c"), closing: true)
        #expect(!replies.add(record))
        replies.answer(.failed("d"), closing: true)
        #expect(got.withLock { $0 } == [.refused("a"), .refused("a"), .handedOver("c")])
    }
}
