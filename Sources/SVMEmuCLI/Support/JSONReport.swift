// The one shape of every command's `--json` output (Docs/json.md).
import ArgumentParser
import Foundation

/// What every command prints with `--json`: one JSON object (pretty-printed,
/// keys sorted) holding
///
/// - `command`: the subcommand's path, e.g. `"bench migrate"`;
/// - `arguments`: every option and flag the command ran with, defaults
///   included, under its Swift property name (the long flag in camelCase:
///   `--fault-delay-us` is `faultDelayUs`);
/// - `host`: `cores`, `memoryBytes`, `memoryAvailableBytes` (at start);
/// - `version`: the package version (`SVMEmuVersion.package`), and
///   `revision`: the git revision of the checkout the binary was built in,
///   or null (`SVMEmuVersion.revision`);
///
/// and, at the same level, the command's own result keys (the same keys its
/// result type encodes on its own: `StormResult`'s for livelock, `runs` for
/// overhead, ...). No result key is one of the six above.
///
/// Not a hot path: Foundation's JSONEncoder does the work.
struct JSONReport<Results: Encodable>: Encodable {
    var command: String
    var arguments: [String: ArgumentValue]
    var host: HostInfo
    var version: String
    var revision: String?
    var results: Results

    /// The keys every report has, whatever the command.
    static var envelopeKeys: [String] { CodingKeys.allCases.map(\.rawValue) }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case command, arguments, host, version, revision
    }

    /// The results' keys first, then the envelope's, in one keyed container
    /// (JSONEncoder merges keyed containers requested at the same level).
    func encode(to encoder: any Encoder) throws {
        try results.encode(to: encoder)
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(command, forKey: .command)
        try c.encode(arguments, forKey: .arguments)
        try c.encode(host, forKey: .host)
        try c.encode(version, forKey: .version)
        try c.encode(revision, forKey: .revision)
    }

    /// The report of `command` (a parsed command: its arguments are read back)
    /// with `results`, as text.
    static func render<C: ParsableCommand>(for command: C, results: Results) throws -> String {
        let report = JSONReport(command: commandPath(C.self), arguments: ArgumentValue.arguments(of: command),
                                host: HostInfo.current, version: SVMEmuVersion.package,
                                revision: SVMEmuVersion.revision, results: results)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return String(decoding: try encoder.encode(report), as: UTF8.self)
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

/// The host a report was made on.
struct HostInfo: Encodable, Equatable {
    var cores: Int
    var memoryBytes: Int?
    var memoryAvailableBytes: Int?

    static var current: HostInfo {
        HostInfo(cores: HostResources.cores, memoryBytes: HostResources.totalBytes(),
                 memoryAvailableBytes: HostResources.availableBytes())
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(cores, forKey: .cores)
        try c.encode(memoryBytes, forKey: .memoryBytes)
        try c.encode(memoryAvailableBytes, forKey: .memoryAvailableBytes)
    }
    enum CodingKeys: String, CodingKey { case cores, memoryBytes, memoryAvailableBytes }
}

/// One argument's value in a report: a string, integer, number, boolean or null.
enum ArgumentValue: Encodable, Equatable {
    case string(String)
    case int(Int)
    case unsigned(UInt64)
    case number(Double)
    case bool(Bool)
    case null

    /// The value of a property of a parsed command: optionals unwrapped,
    /// enumerations by raw value.
    init(_ value: Any) {
        let mirror = Mirror(reflecting: value)
        if mirror.displayStyle == .optional {
            self = mirror.children.first.map { ArgumentValue($0.value) } ?? .null
            return
        }
        switch value {
        case let v as Bool: self = .bool(v)
        case let v as Int: self = .int(v)
        case let v as UInt64: self = .unsigned(v)
        case let v as Double: self = .number(v)
        case let v as String: self = .string(v)
        case let v as any RawRepresentable: self = ArgumentValue(v.rawValue)
        default: self = .string(String(describing: value))
        }
    }

    /// Every `@Option` and `@Flag` of `command`, and of its `@OptionGroup`s,
    /// by property name.
    static func arguments(of command: Any) -> [String: ArgumentValue] {
        var out: [String: ArgumentValue] = [:]
        for child in Mirror(reflecting: command).children {
            guard var name = child.label else { continue }
            if name.hasPrefix("_") { name.removeFirst() }
            if let group = child.value as? any ReflectedArgumentGroup {
                if group.reflectedGroup is any DeprecatedSpellings { continue }  // old spellings: merged into the new
                out.merge(arguments(of: group.reflectedGroup)) { first, _ in first }
            } else if let argument = child.value as? any ReflectedArgument {
                out[name] = ArgumentValue(argument.reflectedValue)
            }
        }
        return out
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .string(let v): try c.encode(v)
        case .int(let v): try c.encode(v)
        case .unsigned(let v): try c.encode(v)
        case .number(let v): try c.encode(v)
        case .bool(let v): try c.encode(v)
        case .null: try c.encodeNil()
        }
    }
}

/// A property wrapper holding one parsed argument.
protocol ReflectedArgument { var reflectedValue: Any { get } }
/// A property wrapper holding a group of parsed arguments.
protocol ReflectedArgumentGroup { var reflectedGroup: Any { get } }

extension Option: ReflectedArgument { var reflectedValue: Any { wrappedValue } }
extension Flag: ReflectedArgument { var reflectedValue: Any { wrappedValue } }
extension OptionGroup: ReflectedArgumentGroup { var reflectedGroup: Any { wrappedValue } }
