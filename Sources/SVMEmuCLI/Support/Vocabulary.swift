// One vocabulary on the command line (Docs/cli.md): the old spellings that
// still work for one release, enum values in any case, `--output FILE` and
// `--quiet` of every report, and `--deterministic` where a run always is.
import ArgumentParser
import MirrorDriver
import SVMStress
#if canImport(Glibc)
import Glibc
#endif

/// A group of old option spellings that still parse for one release. Each
/// is declared `help: .private` (no help, no completion) and merged into its
/// new option by the command's `validate()` with `adopt(_:into:...)`, which
/// prints a warning naming the new spelling. `--json`'s `arguments` leaves
/// the group out (`ReportValue.arguments`): it records the new names.
protocol DeprecatedSpellings: ParsableArguments {}

/// The old spellings of renamed options (Docs/cli.md lists them).
enum Deprecation {
    /// The warning for `old`, on standard error.
    static func message(old: String, new: String) -> String {
        "svmemu: warning: \(old) is deprecated and will be removed in the next release; use \(new)"
    }

    /// Writes the warning for `old` to standard error.
    static func warn(old: String, new: String) {
        let bytes = Array((message(old: old, new: new) + "\n").utf8)
        bytes.withUnsafeBytes { b in _ = write(STDERR_FILENO, b.baseAddress!, b.count) }
    }

    /// Takes the value given under an old spelling (`old`, nil when not
    /// given) into the new option `new` (whose default is `defaultValue`),
    /// with the warning. Refuses both spellings with different values.
    ///
    /// - Throws: `ValidationError` naming both flags.
    static func adopt<T: Equatable>(_ old: T?, into new: inout T, defaultValue: T,
                                    oldFlag: String, newFlag: String) throws(ValidationError) {
        guard let old else { return }
        warn(old: oldFlag, new: newFlag)
        if new != defaultValue && new != old {
            throw ValidationError("\(oldFlag) is the old spelling of \(newFlag): give \(newFlag) only")
        }
        new = old
    }

    /// `adopt` for a number, refused outside `range` under its old flag first.
    static func adopt(_ old: Int?, into new: inout Int, defaultValue: Int, range: ClosedRange<Int>,
                      oldFlag: String, newFlag: String) throws(ValidationError) {
        if let old { try checkRange(old, range, flag: oldFlag) }
        try adopt(old, into: &new, defaultValue: defaultValue, oldFlag: oldFlag, newFlag: newFlag)
    }
}

/// An enumeration option whose values are accepted in any case
/// (`--granularity 2M`, `--variants ALL`): every enum value of `svmemu` is
/// matched case-insensitively, whether declared `ExpressibleByArgument` or
/// parsed from a string (`LivelockCommand.parse` lowercases).
protocol CaseInsensitiveArgument: ExpressibleByArgument, RawRepresentable, CaseIterable where RawValue == String {}

extension CaseInsensitiveArgument {
    /// The case whose raw value is `argument` in any case.
    init?(caseInsensitive argument: String) {
        let wanted = argument.lowercased()
        guard let match = Self.allCases.first(where: { $0.rawValue.lowercased() == wanted }) else { return nil }
        self = match
    }

    init?(argument: String) { self.init(caseInsensitive: argument) }
}

// Public types need a public witness.
extension MigrationGranularity: CaseInsensitiveArgument {
    public init?(argument: String) { self.init(caseInsensitive: argument) }
}
extension OverheadDirection: CaseInsensitiveArgument {
    public init?(argument: String) { self.init(caseInsensitive: argument) }
}

/// `--output FILE` and `--quiet` of a command that prints a report.
///
/// The report (the tables, or the JSON with `--json`) still goes to standard
/// output; `--output FILE` also writes it to FILE, once the run ends with
/// its report (`SVMEmuCommand.runAndExit` copies standard output: no
/// command does anything itself). The path is checked before the run. `--quiet` turns
/// the progress line on standard error off (`ProgressLine`).
struct ReportFileOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Also write the report (the tables, or the JSON with --json) to this file; checked before the run.",
                                            valueName: "file"),
            completion: .file())
    var output: String?

    @Flag(name: .long, help: "No progress line on standard error.")
    var quiet = false

    func validate() throws {
        if let output { try OutputFile(output).checkWritable() }
    }
}

/// `--deterministic` of a command whose run is always deterministic
/// (`explore`, `replay`, `soak`, `fidelity`): accepted, so that a script can
/// pass it to every deterministic command, and changes nothing.
struct AlwaysDeterministicFlag: ParsableArguments {
    @Flag(name: .long, help: "Accepted and ignored: this command always runs under the deterministic scheduler.")
    var deterministic = false
}
