import ArgumentParser
import Foundation
import Machine
import Pair
import Synchronization

@main
struct Lockstep: ParsableCommand {
    static func main() {
        // A serial client or peer that hangs up must be an error on that socket, never the death of the VM.
        signal(SIGPIPE, SIG_IGN)
        SupervisorReport.adopt()
        main(nil)
    }

    static let configuration = CommandConfiguration(
        commandName: "lockstep",
        abstract: "Fault-tolerant KVM virtual machines: record, replay, and a live lockstep pair.",
        discussion: ExitStatus.documentation,
        subcommands: [RunCommand.self, RecordCommand.self, ReplayCommand.self, PrimaryCommand.self, SecondaryCommand.self,
                      SuperviseCommand.self, ControlCommand.self, LogCommand.self, BenchCommand.self])
}

/// Exit statuses. A guest that ends through isa-debug-exit passes its own value through (0-255);
/// engine failures use these, in the sysexits range.
enum ExitStatus: Int32 {
    case usage = 64          // bad command line
    case badInput = 65       // bad guest image, corrupt/truncated/wrong-version log, image/log mismatch
    case kvmUnavailable = 69 // /dev/kvm missing or not permitted
    case internalError = 70  // an unexpected KVM failure
    case guestCrashed = 71   // triple fault, cli;hlt, KVM emulation failure (Ending.crashedStatus, as the pair record says it)
    case divergence = 72     // replay does not match its log
    case peerUnreachable = 68 // pair: no secondary answered at --peer; control: no answer on the socket
    case ioError = 74        // disk full, unwritable log (a serial backend that cannot bind is a usage error, 64)
    case fenced = 75         // pair: another side holds the fence (this side must not be live)
    case peerRejected = 76   // pair: wrong key, protocol version, encryption refused, garbage, bad seed

    static let documentation = """
    Exit status: the guest's own value when it writes to port 0xF4; otherwise 64 usage, 65 bad input \
    (image or log), 68 peer (or control socket) unreachable, 69 KVM unavailable, 70 internal error, 71 guest crashed, 72 replay divergence, \
    74 I/O error, 75 fenced (another side is live), 76 peer rejected (key, version, encryption, bad data).
    """
}

func fail(_ message: String, _ status: ExitStatus) -> ExitCode {
    FileHandle.standardError.write(Data("lockstep: error: \(message)\n".utf8))
    return ExitCode(status.rawValue)
}

/// Maps an engine error to its message and exit status.
func engineExit(_ error: MachineError) -> ExitCode {
    switch error {
    case .kvm(let k):
        if case .unavailable = k { return fail(k.description, .kvmUnavailable) }
        return fail(k.description, .internalError)
    case .image(let e): return fail(e.description, .badInput)
    case .log(let e):
        if case .io = e { return fail(e.description, .ioError) }
        return fail(e.description, .badInput)
    case .divergence(let d): return fail(d.description, .divergence)
    case .guestFault(let s): return fail(s, .guestCrashed)
    case .sys(let e): return fail("KVM call failed: \(e)", .internalError)
    case .config(let s): return fail(s, .usage)
    }
}

func stderr(_ s: String) { FileHandle.standardError.write(Data((s + "\n").utf8)) }

/// Reports how a run ended and returns the process exit code.
/// `pairEnded`: tell a supervisor the pair ended with this status (not after handing the guest over to leave).
func finish(_ r: SessionResult, verbose: Bool, pairEnded: Bool = true) -> ExitCode {
    if verbose {
        let ms = Double(r.elapsedNs) / 1e6
        stderr("lockstep: \(r.exits) exits, \(r.events) events, \(r.syncPoints) sync points (\(r.syncPointPages) pages\(r.hotSyncPointPages > 0 ? ", \(r.hotSyncPointPages) of them hot" : "")\(r.syncPoints > 1 ? ", at most \(r.largestSyncPointPages) in one" : "")), \(r.kicks) kicks in \(String(format: "%.1f", ms)) ms" + (r.logBytes > 0 ? ", log \(r.logBytes) bytes" : "")
               + (r.peakLatencyBoundUs > 0 ? "; sync points stretched the interrupt latency bound to \(r.peakLatencyBoundUs) µs" : ""))
    }
    switch r.ending {
    case .guestExit: break
    case .shutdown(let why): stderr("lockstep: guest stopped: \(why)")
    case .haltedForever: stderr("lockstep: guest halted with interrupts disabled (cli; hlt): it can never wake")
    case .stopped: stderr("lockstep: stopped")
    }
    let status = r.ending.processStatus
    stderr("state-digest: \(r.digestHex)")
    if pairEnded { SupervisorReport.ended(status) }
    return ExitCode(status)
}

func loadImage(_ path: String) throws(MachineError) -> PVHImage {
    let bytes: [UInt8]
    do { bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path))) } catch {
        throw .image(.unreadable(path: path, detail: (error as NSError).localizedDescription))
    }
    do { return try PVHImage(bytes: bytes) } catch { throw .image(error) }
}

struct MachineOptions: ParsableArguments {
    @Option(name: .long, help: "Guest RAM in MiB.") var memory: UInt32 = 256
    @Option(name: .long, help: "Serial backend: stdio, file:PATH, tcp:HOST:PORT, udp:HOST:PORT, none.") var serial: String = "stdio"
    @Flag(name: .long, help: "Print run statistics.") var verbose = false
}

/// The interrupt latency bound of a run that writes sync points (`record`, `primary`).
struct LatencyOptions: ParsableArguments {
    @Option(name: .long, help: "Kick a running guest and write a sync point when an interrupt has waited this long (µs): the bound's floor.") var interruptLatencyUs: UInt32 = 1000
    @Option(name: .long, help: "How far expensive sync points may stretch that bound (µs): while one costs the guest more than a quarter of the bound, interrupts wait longer and sync points come less often. Equal to --interrupt-latency-us: never stretched.")
    var maxInterruptLatencyUs: UInt32 = MachineConfig.defaultMaxInterruptLatencyUs

    func validate() throws {
        guard maxInterruptLatencyUs >= interruptLatencyUs else {
            throw ValidationError("--max-interrupt-latency-us \(maxInterruptLatencyUs): below --interrupt-latency-us \(interruptLatencyUs) (equal to it: never stretched)")
        }
    }

    func config(memoryMiB: UInt32) -> MachineConfig {
        MachineConfig(memoryMiB: memoryMiB, interruptLatencyUs: interruptLatencyUs, maxInterruptLatencyUs: maxInterruptLatencyUs)
    }
}

/// Shared by `run` and `record`: open the serial backend, build the session, feed it input, report the end.
/// `finishing`: what a stop signal lets the run do before it ends (said when one arrives).
func runLive(guest: String, options: MachineOptions, config: MachineConfig, finishing: String,
             _ make: (PVHImage, MachineConfig, SerialBackend) throws -> (Machine, () throws -> SessionResult)) throws {
    do {
        let image = try loadImage(guest)
        let backend = try SerialBackend(try SerialSpec.parse(options.serial))
        let (machine, run) = try make(image, config, backend)
        stopOnSignals(machine, what: finishing)
        backend.startInput(into: machine.input)
        let r = try run()
        backend.close()
        throw finish(r, verbose: options.verbose)
    } catch let e as MachineError { throw engineExit(e) }
}

/// The stop signals end a live run as the guest's exit would: at its next exit, with its state digest (and
/// `record`'s log finished and renamed, replayable to that exit). A second one kills at once.
private func stopOnSignals(_ machine: Machine, what finishing: String) {
    final class Signalled: Sendable { let once = Atomic<Bool>(false) }
    let signalled = Signalled(), pacer = machine.pacer
    for signo in stopSignals() {
        onSignal(signo) {
            if signalled.once.exchange(true, ordering: .acquiringAndReleasing) { dieOf(signo) }
            stderr("lockstep: \(signalName(signo)): stopping the guest at its next exit\(finishing) (another signal kills at once)")
            pacer?.requestStop()
        }
    }
}

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Run a guest unprotected.")
    @Argument(help: "PVH ELF guest image.") var guest: String
    @OptionGroup var options: MachineOptions
    @Option(name: .long, help: "Kick a running guest when an interrupt has waited this long (µs).") var interruptLatencyUs: UInt32 = 1000

    func run() throws {
        let config = MachineConfig(memoryMiB: options.memory, interruptLatencyUs: interruptLatencyUs)
        try runLive(guest: guest, options: options, config: config, finishing: "") { image, config, backend in
            let s = try RunSession(image: image, config: config, output: backend)
            return (s.machine, { try s.run() })
        }
    }
}

struct RecordCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "record", abstract: "Run a guest and write its event log.")
    @Argument(help: "PVH ELF guest image.") var guest: String
    @Option(name: .long, help: "Where to write the log (written as LOG.partial, renamed when complete).") var log: String
    @OptionGroup var options: MachineOptions
    @OptionGroup var latency: LatencyOptions

    func run() throws {
        try runLive(guest: guest, options: options, config: latency.config(memoryMiB: options.memory), finishing: " and finishing the log") { image, config, backend in
            let s = try RecordSession(image: image, config: config, logPath: log, output: backend)
            return (s.machine, { try s.run() })
        }
    }
}

struct ReplayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "replay", abstract: "Re-execute a guest from its log, with no real clock and no real input.")
    @Argument(help: "The event log.") var log: String
    @Argument(help: "The guest image (optional: the log embeds it; if given it must match).") var guest: String?
    @Option(name: .long, help: "Serial backend for the reproduced output.") var serial: String = "stdio"
    @Option(name: .long, help: "Fail (as a divergence) when the replay makes no progress for this long (s; 0 = never).") var stallTimeoutS: UInt64 = 60
    @Flag(name: .long, help: "Print run statistics.") var verbose = false

    func run() throws {
        do {
            var override: [UInt8]?
            if let g = guest { override = try loadImage(g).bytes }
            let backend = try SerialBackend(try SerialSpec.parse(serial))
            let s = try ReplaySession(logPath: log, image: override, output: backend)
            s.stallSeconds = stallTimeoutS
            let r = try s.run()
            backend.close()
            throw finish(r, verbose: verbose)
        } catch let e as MachineError {
            if case .divergence = e { stderr("lockstep: replay diverged from the log") }
            throw engineExit(e)
        }
    }
}
