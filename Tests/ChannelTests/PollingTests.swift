import CLockstep
import Foundation
import Glibc
import Testing
@testable import Channel

/// Busy polling on the receive side (`--link-poll-us`): a receiver asked to spin takes frames without sleeping,
/// stops after its window, wakes when asked while asleep, and ends when the connection does.
@Suite struct PollingTests {
    @Test func anArmedReceiverTakesFramesBySpinning() throws {
        let (client, server) = try established()
        try server.enablePolling(windowNs: 10_000_000_000)
        let started = DispatchSemaphore(value: 0)
        server.testHookSpinStarted = { started.signal() }
        for i in 1...20 as ClosedRange<UInt64> {
            server.armPolling()
            let got = Pending { try server.receiveMessage(timeoutMs: 5000) }
            #expect(started.wait(timeout: .now() + 5) == .success, "no spin began for frame \(i)")
            try client.sendLog(LogBatch(exitIndex: i, bytes: [UInt8(i)]))
            #expect(try got.wait().get() == .log(LogBatch(exitIndex: i, bytes: [UInt8(i)])))
            server.disarmPolling()
        }
        #expect(server.spinReads >= 20, "frames taken by spinning: \(server.spinReads)")
    }

    /// Arming wakes a receiver asleep in poll(2); the frame that follows is taken by the spin.
    @Test func armingWakesASleepingReceiver() throws {
        let (client, server) = try established()
        try server.enablePolling(windowNs: 10_000_000_000)
        let started = DispatchSemaphore(value: 0)
        server.testHookSpinStarted = { started.signal() }
        let got = Pending { try server.receiveMessage(timeoutMs: 10_000) }
        #expect(started.wait(timeout: .now() + 0.2) == .timedOut, "spun before anyone asked")
        server.armPolling()
        #expect(started.wait(timeout: .now() + 5) == .success)
        try client.sendHeartbeat(Heartbeat(sentNs: 1, echoNs: 2))
        #expect(try got.wait().get() == .heartbeat(Heartbeat(sentNs: 1, echoNs: 2)))
        #expect(server.spinReads >= 1)
        #expect(server.pollingArmed, "a frame other than the awaited one leaves the spin armed")
    }

    /// A spin that finds nothing gives up after its window and the receiver sleeps; frames still arrive.
    @Test func aSpinEndsWithItsWindow() throws {
        let (client, server) = try established()
        try server.enablePolling(windowNs: 20_000_000)
        server.armPolling()
        #expect(channelError(Result { try server.receiveMessage(timeoutMs: 300) }) == .timeout(ms: 300))
        #expect(!server.pollingArmed)
        try client.sendLog(LogBatch(exitIndex: 7, bytes: [7]))
        #expect(try server.receiveMessage(timeoutMs: 5000) == .log(LogBatch(exitIndex: 7, bytes: [7])))
        #expect(server.spinReads == 0)
    }

    /// A spin whose window ran out before the receiver looked is replaced by the next request, not kept: the
    /// receiver spins for that one (the window is time, so this test waits for it to pass).
    @Test func aRequestAfterAnExpiredSpinStartsANewOne() throws {
        let (client, server) = try established()
        try server.enablePolling(windowNs: 30_000_000)
        server.armPolling()
        let armedAt = lk_monotonic_ns()
        while lk_monotonic_ns() &- armedAt < 40_000_000 { usleep(2000) }
        #expect(!server.pollingArmed)
        server.armPolling()
        #expect(server.pollingArmed, "the stale spin was kept")
        let started = DispatchSemaphore(value: 0)
        server.testHookSpinStarted = { started.signal() }
        let got = Pending { try server.receiveMessage(timeoutMs: 5000) }
        #expect(started.wait(timeout: .now() + 5) == .success)
        try client.sendHeartbeat(Heartbeat(sentNs: 3, echoNs: 4))
        #expect(try got.wait().get() == .heartbeat(Heartbeat(sentNs: 3, echoNs: 4)))
        #expect(server.spinReads >= 1, "the stale spin was kept and the receiver slept")
    }

    /// Closing the connection (go-live, shutdown) ends a spin at once; so does the peer's death.
    @Test(arguments: [true, false]) func aSpinEndsWhenTheConnectionDoes(localClose: Bool) throws {
        let (client, server) = try established()
        try server.enablePolling(windowNs: 60_000_000_000)
        let started = DispatchSemaphore(value: 0)
        server.testHookSpinStarted = { started.signal() }
        server.armPolling()
        let got = Pending { try server.receiveMessage(timeoutMs: -1) }
        #expect(started.wait(timeout: .now() + 5) == .success)
        if localClose { server.close() } else { client.close() }
        let e = channelError(got.wait())
        #expect(localClose ? e == .closed : e == .peerClosed(midFrame: false), "\(String(describing: e))")
    }

    @Test func withoutPollingArmingDoesNothing() throws {
        let (_, server) = try established()
        try server.enablePolling(windowNs: 0)
        server.armPolling()
        #expect(!server.pollingArmed)
    }
}
