import EventLog
import Foundation
import KVM

/// One line of `lockstep log inspect`.
public struct InspectLine: Sendable {
    public var index: UInt64
    public var exit: UInt64
    public var kind: String
    public var value: String
    public var signature: String
    public var rip: UInt64?
    public var instruction: String?

    public var text: String {
        var s = "#\(index) exit \(exit) \(kind) \(value) [\(signature)]"
        if let rip { s += " rip=0x\(String(rip, radix: 16))" }
        if let instruction { s += " \(instruction)" }
        return s
    }

    public var json: String {
        func q(_ s: String) -> String { "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\"" }
        var f = ["\"index\":\(index)", "\"exit\":\(exit)", "\"kind\":\(q(kind))", "\"value\":\(q(value))", "\"signature\":\(q(signature))"]
        if let rip { f.append("\"rip\":\"0x\(String(rip, radix: 16))\"") }
        if let instruction { f.append("\"instruction\":\(q(instruction))") }
        return "{" + f.joined(separator: ",") + "}"
    }
}

/// Lists a log's records. With replay, each line also has the guest RIP at that event and the instruction there.
public final class LogInspector {
    let path: String
    let replay: Bool

    public init(path: String, replay: Bool) throws(MachineError) {
        self.path = path
        self.replay = replay
        do { _ = try LogFileReader(path: path) } catch { throw .log(error) }
    }

    /// `located`: where the record came from, when read from a file (a sync point then shows its size in the log).
    static func describe(_ r: LogRecord, located: LocatedRecord? = nil) -> (UInt64, String, String, String) {
        switch r {
        case .event(let e):
            let v: String
            switch e.kind {
            case .timer, .clockRead: v = "\(e.value)ns"
            case .serialInput: v = "0x" + String(e.value, radix: 16)
            case .inject: v = "vector 0x" + String(e.value, radix: 16)
            case .digest: v = "0x" + String(e.value, radix: 16)
            case .window: v = "-"
            case .syncPoint: v = "-"
            }
            return (e.exit, "\(e.kind)", v, e.signature.description)
        case .syncPoint(let s):
            var v = "\(s.pageNumbers.count) pages, \(s.vcpuState.count) bytes vCPU state"
            if let located {
                v += "; \(located.length) bytes in the log, \(located.deltaItems) of \(s.pageNumbers.count + 1) items as deltas"
            }
            return (s.exit, "syncPoint", v, s.signature.description)
        }
    }

    public func run(_ emit: @escaping (InspectLine) -> Void) throws(MachineError) {
        var index: UInt64 = 0
        if !replay {
            let reader: LogFileReader
            do { reader = try LogFileReader(path: path) } catch { throw .log(error) }
            do {
                while let r = try reader.nextLocated() {
                    let (exit, kind, value, sig) = LogInspector.describe(r.record, located: r)
                    emit(InspectLine(index: index, exit: exit, kind: kind, value: value, signature: sig))
                    index += 1
                }
            } catch { throw .log(error) }
            return
        }
        let session = try ReplaySession(logPath: path, output: nil)
        let machine = session.machine
        machine.hooks.observer = { [unowned session] r in
            // The replay's own reader says where the record lies (a sync point's size in the log).
            let (exit, kind, value, sig) = LogInspector.describe(r, located: session.lastLocated)
            var line = InspectLine(index: index, exit: exit, kind: kind, value: value, signature: sig)
            if let regs = try? machine.vcpu.regs(), let sregs = try? machine.vcpu.sregs() {
                line.rip = regs.rip
                line.instruction = Disassembler.disassemble(at: regs.rip, sregs: sregs, memory: machine.memory, count: 1).first
                    .map { String($0.drop(while: { $0 != ":" }).dropFirst(2)) }
            }
            emit(line)
            index += 1
        }
        _ = try session.run()
    }
}
