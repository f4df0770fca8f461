import ArgumentParser
import EventLog
import Foundation
import Machine

struct LogCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "log", abstract: "Examine event logs.", subcommands: [InspectCommand.self])
}

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "inspect",
        abstract: "One line per event: exit index, kind, value, guest RIP and the instruction there (replays the log to find them).")
    @Argument(help: "The event log.") var log: String
    @Flag(name: .long, help: "One JSON object per line.") var json = false
    @Flag(name: .long, help: "List records without replaying (no RIP or disassembly).") var noReplay = false

    func run() throws {
        do {
            let inspector = try LogInspector(path: log, replay: !noReplay)
            try inspector.run { line in
                print(json ? line.json : line.text)
            }
        } catch { throw engineExit(error) }
    }
}
