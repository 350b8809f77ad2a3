// Every command's `--json` output (Docs/json.md): the parsed command read
// back into SVMStress's `JSONEnvelope`.
import ArgumentParser
import SVMStress

/// The CLI side of `JSONEnvelope`: the command's path and its parsed
/// arguments (read back from its property wrappers), this host, this build.
enum JSONReport<Results: Encodable> {
    /// The keys every report has, whatever the command.
    static var envelopeKeys: [String] { JSONEnvelope<Results>.envelopeKeys }

    /// The report of `command` (a parsed command: its arguments are read back)
    /// with `results`, as text.
    static func render<C: ParsableCommand>(for command: C, results: Results) throws -> String {
        try JSONEnvelope(command: commandPath(C.self), arguments: ReportValue.arguments(of: command),
                         host: ReportHost.current, version: SVMEmuVersion.package,
                         revision: SVMEmuVersion.revision, results: results).text()
    }

    /// "bench migrate" for `BenchMigrateCommand`: the subcommand names from
    /// the root down, without "svmemu".
    static func commandPath(_ type: any ParsableCommand.Type) -> String {
        func path(_ node: any ParsableCommand.Type) -> [String]? {
            let name = node.configuration.commandName ?? ""
            if node == type { return [name] }
            for child in node.configuration.subcommands {
                if let rest = path(child) { return [name] + rest }
            }
            return nil
        }
        return (path(SVMEmuCommand.self) ?? ["", type.configuration.commandName ?? "?"]).dropFirst().joined(separator: " ")
    }
}

extension ReportHost {
    /// This host now.
    static var current: ReportHost {
        ReportHost(cores: HostResources.cores, memoryBytes: HostResources.totalBytes(),
                   memoryAvailableBytes: HostResources.availableBytes())
    }
}

extension ReportValue {
    /// Every `@Option` and `@Flag` of `command`, and of its `@OptionGroup`s,
    /// by property name; an argument the command's `unusedArguments` names
    /// (replaced by another one) as null, as an option that was not given.
    static func arguments(of command: Any) -> [String: ReportValue] {
        var out = reflected(command)
        for name in (command as? any UnusedArguments)?.unusedArguments ?? [] where out[name] != nil { out[name] = .null }
        return out
    }

    private static func reflected(_ command: Any) -> [String: ReportValue] {
        var out: [String: ReportValue] = [:]
        for child in Mirror(reflecting: command).children {
            guard var name = child.label else { continue }
            if name.hasPrefix("_") { name.removeFirst() }
            if let group = child.value as? any ReflectedArgumentGroup {
                if group.reflectedGroup is any DeprecatedSpellings { continue }  // old spellings: merged into the new
                out.merge(reflected(group.reflectedGroup)) { first, _ in first }
            } else if let argument = child.value as? any ReflectedArgument {
                out[name] = ReportValue(argument.reflectedValue)
            }
        }
        return out
    }
}

/// A command whose parsed arguments include some that its run does not use
/// (a shared option another one replaces): the report records them as null.
protocol UnusedArguments {
    /// The property names of the arguments the run does not use.
    var unusedArguments: [String] { get }
}

/// A property wrapper holding one parsed argument.
protocol ReflectedArgument { var reflectedValue: Any { get } }
/// A property wrapper holding a group of parsed arguments.
protocol ReflectedArgumentGroup { var reflectedGroup: Any { get } }

extension Option: ReflectedArgument { var reflectedValue: Any { wrappedValue } }
extension Flag: ReflectedArgument { var reflectedValue: Any { wrappedValue } }
extension OptionGroup: ReflectedArgumentGroup { var reflectedGroup: Any { wrappedValue } }

extension ParsableCommand {
    /// Prints the report on standard output: `results` as the JSON object
    /// (`JSONReport`) with `json`, else `text` as it is (its own final newline).
    func printReport<Results: Encodable>(_ results: Results, json: Bool, text: @autoclosure () throws -> String) throws {
        if json { print(try JSONReport.render(for: self, results: results)) } else { print(try text(), terminator: "") }
    }
}
