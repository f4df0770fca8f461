import CLockstep
import Devices
import EventLog
import Foundation
import KVM

/// The machine's shape. Identical on both sides of a pair and in a log's header.
public struct MachineConfig: Sendable, Equatable {
    public var memoryMiB: UInt32
    /// The interrupt latency bound's floor (µs): how long a due interrupt waits for a natural exit before a kick.
    public var interruptLatencyUs: UInt32
    /// How far expensive sync points may stretch that bound (µs; `LatencyBound`). Not part of the log: a
    /// replay loads sync points where they were written, whatever the bound was.
    public var maxInterruptLatencyUs: UInt32
    /// Wall-clock seconds the RTC starts from: sampled once by the recorder, then fixed (it is in the log).
    public var epochSeconds: UInt64
    public init(memoryMiB: UInt32 = 256, interruptLatencyUs: UInt32 = 1000, maxInterruptLatencyUs: UInt32 = MachineConfig.defaultMaxInterruptLatencyUs,
                epochSeconds: UInt64 = UInt64(lk_realtime_ns() / 1_000_000_000)) {
        self.memoryMiB = memoryMiB; self.interruptLatencyUs = interruptLatencyUs; self.epochSeconds = epochSeconds
        self.maxInterruptLatencyUs = max(interruptLatencyUs, maxInterruptLatencyUs)
    }

    /// `--max-interrupt-latency-us`'s default.
    public static let defaultMaxInterruptLatencyUs: UInt32 = 50_000
}

/// A minimal PC on KVM: RAM, one vCPU (PVH boot), the standard devices, and the recording hooks between them.
public final class Machine {
    public let config: MachineConfig
    public let image: PVHImage
    public let kvm: KVMHost
    public let vm: VirtualMachine
    public let vcpu: VCPU
    public let memory: GuestMemory
    public let hooks: InputHooks
    public let devices: DeviceSet
    public let pacer: Pacer?
    let syncPoints: SyncPointStore?
    public let input = SerialInputQueue()
    public var output: SerialOutput? { didSet { sink.output = output } }
    /// Called on the vCPU thread before it sleeps in HLT (a primary pushes its log out here).
    public var onIdle: (() -> Void)?
    /// Called on the vCPU thread just before each guest entry of a live run, once this entry's interrupt is
    /// injected: every record up to here is in the encoder (a pair sends them before the guest runs on).
    public var beforeEntry: (() -> Void)?
    let sink: UARTSink
    public let cpuidDigest: [UInt8]
    /// Warnings for the operator (unknown ports, ...), each said once.
    public var warn: (String) -> Void = { FileHandle.standardError.write(Data(("lockstep: " + $0 + "\n").utf8)) }
    private var unknownMMIO = Set<UInt64>()

    /// `adopting`: RAM another machine of this image and size left behind (`RetainedRAM`); the loader does not
    /// write it again, and its written pages count as written since boot here.
    public init(image: PVHImage, config: MachineConfig, mode: InputHooks.Mode, encoder: LogEncoder? = nil,
                source: RecordSource? = nil, output: SerialOutput?, keepTranscript: Bool = false,
                adopting retained: RetainedRAM? = nil) throws(MachineError) {
        self.config = config
        self.image = image
        guard config.memoryMiB >= 2, config.memoryMiB <= 65536 else { throw .config("--memory \(config.memoryMiB) MiB is outside 2...65536") }
        if let retained, !retained.fits(image: image, config: config) {
            throw .config("retained RAM of \(retained.memory.size >> 20) MiB cannot serve a \(config.memoryMiB) MiB machine of another image")
        }
        do {
            kvm = try KVMHost()
            vm = try kvm.createVM()
            memory = try retained?.memory ?? GuestMemory(bytes: UInt64(config.memoryMiB) << 20)
        } catch let e as KVMError { throw .kvm(e) } catch let e as MemoryError { throw .kvm(.memory(e)) } catch { throw .config("\(error)") }
        if retained == nil {
            do {
                try PVHLoader.load(image, into: memory)
            } catch { throw .image(error) }
        }
        do {
            // Dirty tracking feeds sync points (record) and later re-protection/migration (replay, live).
            try vm.setMemory(memory, trackDirty: mode != .run)
            vcpu = try vm.createVCPU(id: 0)
            let table = CPUIDTable.pinned(from: try kvm.supportedCPUID())
            try vcpu.setCPUID(table)
            cpuidDigest = StateDigest.sha256(CPUIDTable.canonicalBytes(table))
            try PVHLoader.bootState(vcpu: vcpu, entry: image.entry32)
        } catch let e as SysError { throw .sys(e) } catch let e as KVMError { throw .kvm(e) } catch { throw .config("\(error)") }
        lk_run_enable_sync_regs(vcpu.run)
        hooks = InputHooks(mode: mode, epochSeconds: config.epochSeconds, encoder: encoder, source: source)
        sink = UARTSink(hooks: hooks, output: output, keepTranscript: keepTranscript)
        devices = DeviceSet(inputs: hooks, serial: sink, ramSize: memory.size)
        // A replayer's pacer is not started (no real time) unless it goes live (a pair's secondary); it is
        // still the way to kick the replaying vCPU out of the guest (watchdog, abandoned stream).
        pacer = Pacer(latencyMicroseconds: config.interruptLatencyUs, maxLatencyMicroseconds: config.maxInterruptLatencyUs)
        syncPoints = mode == .run ? nil : SyncPointStore(vm: vm, memory: memory, encoder: encoder, msrs: vcpu.readableMSRs(),
                                                         loaded: PVHLoader.writtenPages(image), written: retained?.written)
        self.output = output
        input.pacer = pacer
        devices.bus.onUnknownPort = { [unowned self] port, isWrite in
            warn("guest \(isWrite ? "wrote" : "read") unknown port 0x\(String(port, radix: 16)) (reads return 0xFF; reported once)")
        }
    }

    /// Ports whose writes can move a device deadline (PIT, port 0x61, RTC).
    @inline(__always) static func timedPorts(_ port: UInt16) -> Bool {
        (port >= 0x40 && port <= 0x43) || port == 0x61 || port == 0x70 || port == 0x71
    }

    func noteUnknownMMIO(_ addr: UInt64, write: Bool) {
        if unknownMMIO.insert(addr).inserted {
            warn("guest \(write ? "wrote" : "read") unmapped MMIO address 0x\(String(addr, radix: 16)) (reads return 0xFF; reported once)")
        }
    }

    /// Everything the guest printed (when kept).
    public var transcript: [UInt8] { sink.transcript }

    public func stateDigest() throws(MachineError) -> [UInt8] {
        do { return try StateDigest.compute(memory: memory, vcpu: vcpu, deviceState: devices.stateBytes()) } catch { throw .sys(error) }
    }

    /// `StateDigest.seed` of this machine, from the chunk hashes a pre-copy kept (32 bytes per chunk), or from
    /// every page hashed now when nil (the secondary's check of a loaded seed).
    /// Pages nobody wrote (not loaded, not in the dirty log, not written from user space) are zero and are not
    /// read: reading untouched RAM costs a page fault per page.
    public func seedDigest(chunkHashes kept: UnsafeRawBufferPointer? = nil) throws(MachineError) -> [UInt8] {
        guard let store = syncPoints else { throw .config("the seed digest needs dirty tracking (record or replay mode)") }
        do {
            if let kept { return try StateDigest.seed(chunkHashes: kept, vcpu: vcpu, deviceState: devices.stateBytes()) }
            let n = memory.pageCount
            let written = UnsafeMutablePointer<UInt64>.allocate(capacity: dirtyBitmapWords)
            defer { written.deallocate() }
            try store.writtenSinceBoot(into: written)
            let chunks = StateDigest.chunkCount(pages: n)
            let chunkHashes = UnsafeMutableRawBufferPointer.allocate(byteCount: chunks * 32, alignment: 16)
            defer { chunkHashes.deallocate() }
            // SAFETY: RAM holds n pages, `written` covers them, chunkHashes holds chunks * 32 bytes.
            StateDigest.chunkHashes(memory.base, pages: n, written: written, into: chunkHashes.baseAddress!)
            return try StateDigest.seed(chunkHashes: UnsafeRawBufferPointer(chunkHashes), vcpu: vcpu, deviceState: devices.stateBytes())
        } catch { throw .sys(error) }
    }

    public var syncPointCount: UInt64 { syncPoints?.captured ?? 0 }
    public var syncPointPages: UInt64 { syncPoints?.pagesCaptured ?? 0 }
    public var largestSyncPointPages: UInt64 { syncPoints?.largestPages ?? 0 }
    public var hotSyncPointPages: UInt64 { syncPoints?.hotPagesCaptured ?? 0 }
}
