// The one shape of every command's `--json` output (Docs/json.md): the
// envelope (command, arguments, host, version, revision) around the results.
// Not a hot path: Foundation's JSONEncoder does the work.
import Foundation

/// What every command prints with `--json`: one JSON object (pretty-printed,
/// keys sorted) holding
///
/// - `command`: the subcommand's path, e.g. `"bench migrate"`;
/// - `arguments`: every option and flag the command ran with, defaults
///   included, under its Swift property name;
/// - `host`: `cores`, `memoryBytes`, `memoryAvailableBytes` (at start);
/// - `version`: the package version, and `revision`: the git revision of
///   the checkout the binary was built in, or null;
///
/// and, at the same level, the command's own result keys (the keys its
/// result type encodes on its own). No result key is one of the five above.
public struct JSONEnvelope<Results: Encodable>: Encodable {
    /// The subcommand's path ("bench migrate").
    public var command: String
    /// The arguments by property name.
    public var arguments: [String: ReportValue]
    /// The host the report was made on.
    public var host: ReportHost
    /// The package version.
    public var version: String
    /// The git revision, or nil.
    public var revision: String?
    /// The command's results, encoded beside the envelope's keys.
    public var results: Results

    /// An envelope around `results`.
    public init(command: String, arguments: [String: ReportValue], host: ReportHost, version: String,
                revision: String?, results: Results) {
        self.command = command
        self.arguments = arguments
        self.host = host
        self.version = version
        self.revision = revision
        self.results = results
    }

    /// The keys every report has, whatever the command.
    public static var envelopeKeys: [String] { CodingKeys.allCases.map(\.rawValue) }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case command, arguments, host, version, revision
    }

    /// The results' keys first, then the envelope's, in one keyed container
    /// (JSONEncoder merges keyed containers requested at the same level).
    public func encode(to encoder: any Encoder) throws {
        try results.encode(to: encoder)
        try encoder.encodeProperties(of: self, except: ["results"])
    }

    /// The report as text (``ReportJSON/encoder(pretty:)``, pretty-printed).
    public func text() throws -> String {
        String(decoding: try ReportJSON.encoder(pretty: true).encode(self), as: UTF8.self)
    }
}

/// The JSON conventions of every report: keys sorted, slashes unescaped,
/// non-finite numbers as the strings "inf", "-inf", "nan".
public enum ReportJSON {
    /// An encoder with the reports' conventions; `pretty`: indented, one key a line.
    public static func encoder(pretty: Bool) -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
                                          : [.sortedKeys, .withoutEscapingSlashes]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return encoder
    }

    /// A decoder that reads what ``encoder(pretty:)`` writes (the strings
    /// "inf", "-inf", "nan" as numbers).
    public static func decoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return decoder
    }
}

/// The host a report was made on.
public struct ReportHost: Encodable, Equatable, Sendable {
    /// Online cores.
    public var cores: Int
    /// MemTotal in bytes, or nil where the host cannot say.
    public var memoryBytes: Int?
    /// MemAvailable in bytes when the command started, or nil.
    public var memoryAvailableBytes: Int?

    /// A host with `cores` and the memory figures.
    public init(cores: Int, memoryBytes: Int?, memoryAvailableBytes: Int?) {
        self.cores = cores
        self.memoryBytes = memoryBytes
        self.memoryAvailableBytes = memoryAvailableBytes
    }

    /// Encodes nil memory figures as null (not left out).
    public func encode(to encoder: any Encoder) throws { try encoder.encodeProperties(of: self) }
}

/// One argument's value in a report: a string, integer, number, boolean or null.
public enum ReportValue: Encodable, Equatable, Sendable {
    /// Text (a size as given: "256M"; an enumeration's raw value).
    case string(String)
    /// A signed integer.
    case int(Int)
    /// An unsigned integer (a seed).
    case unsigned(UInt64)
    /// A floating-point number.
    case number(Double)
    /// A flag.
    case bool(Bool)
    /// An option not given and without a default.
    case null

    /// The value of a property: optionals unwrapped, enumerations by raw value.
    public init(_ value: Any) {
        let mirror = Mirror(reflecting: value)
        if mirror.displayStyle == .optional {
            self = mirror.children.first.map { ReportValue($0.value) } ?? .null
            return
        }
        switch value {
        case let v as Bool: self = .bool(v)
        case let v as Int: self = .int(v)
        case let v as UInt64: self = .unsigned(v)
        case let v as Double: self = .number(v)
        case let v as String: self = .string(v)
        case let v as any RawRepresentable: self = ReportValue(v.rawValue)
        default: self = .string(String(describing: value))
        }
    }

    /// Encodes the bare value.
    public func encode(to encoder: any Encoder) throws {
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

/// A key named at run time (``Swift/Encoder/encodeProperties(of:except:adding:)``).
struct PropertyKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

extension Encoder {
    /// Encodes each stored property of `value` under its own name, as the
    /// reports print them: an absent optional as `null` (synthesized
    /// `Encodable` leaves it out), the properties in `except` left out and
    /// the values of `extra` (derived figures) added. Not a hot path: the
    /// properties are found by reflection.
    public func encodeProperties(of value: Any, except: Set<String> = [], adding extra: KeyValuePairs<String, any Encodable> = [:]) throws {
        var c = container(keyedBy: PropertyKey.self)
        for child in Mirror(reflecting: value).children {
            guard let name = child.label, !except.contains(name), let v = child.value as? any Encodable else { continue }
            try c.encode(v, forKey: PropertyKey(stringValue: name))
        }
        for (name, v) in extra { try c.encode(v, forKey: PropertyKey(stringValue: name)) }
    }
}
