import ArgumentParser

/// The root command: `svmemu <subcommand>`. The executable's `main.swift`
/// calls `SVMEmuCommand.main()`; the tests parse with `parseAsRoot`.
public struct SVMEmuCommand: ParsableCommand {
    public init() {}

    public static let configuration = CommandConfiguration(
        commandName: "svmemu",
        abstract: "A user-space emulator of Linux's device-memory migration (HMM / migrate_vma).",
        discussion: """
        Prototype driver migration logic against an API that behaves like the kernel's,
        reproduce the device-private fault livelock and its trylock fix, and measure
        where a fault's time goes.

        Exit status (every command): 0 the command ran and printed its results; 1 it could \
        not run or its run failed (an output path or standard output that cannot be written, \
        too little memory or address space, a failed check); 2 only from `svmemu livelock \
        --fail-on-livelock`, a livelock was detected; 3 only from `svmemu explore`, a schedule \
        found a problem, and `svmemu merge`, a shard's seed failed; 64 an invalid argument; 130 interrupted (SIGINT).

        One vocabulary (Docs/cli.md): a size is --size, repetitions --rounds, an operation count \
        --operations, --cpus emulated CPUs; every report takes --json, --output FILE and --quiet; \
        enum values in any case. Shell completions: svmemu --generate-completion-script bash|zsh|fish.
        """,
        version: SVMEmuVersion.description,
        subcommands: [DemoCommand.self, LivelockCommand.self, OverheadCommand.self, CalibrateCommand.self, HMMTestsCommand.self,
                      FidelityCommand.self,
                      BenchCommand.self, DevicesCommand.self, NumaCommand.self,
                      ExploreCommand.self, ReplayCommand.self, SoakCommand.self, MergeCommand.self])
}

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmarks (build with -c release); figures as ratios to memcpy of the same bytes.",
        subcommands: [BenchMemoryCommand.self, BenchMigrateCommand.self, BenchTHPCommand.self, BenchGoalsCommand.self])
}

extension SVMEmuCommand {
    /// Refuses `svmemu help NAME ...` when NAME is not a command (ArgumentParser
    /// would print the nearest command's help and exit 0): the message names
    /// it and lists the commands there; exit status 64 (EX_USAGE).
    ///
    /// - Throws: `ValidationError`.
    static func checkHelpTopic(_ arguments: [String]) throws(ValidationError) {
        guard arguments.first == "help" else { return }
        var node: any ParsableCommand.Type = SVMEmuCommand.self
        var path = ["svmemu"]
        for name in arguments.dropFirst() where !name.hasPrefix("-") {
            let children = node.configuration.subcommands
            if let next = children.first(where: { ($0.configuration.commandName ?? "") == name }) {
                node = next
                path.append(name)
                continue
            }
            if name == "help" && path.count == 1 { return }
            let names = children.compactMap { $0.configuration.commandName }
            throw ValidationError(names.isEmpty
                ? "svmemu help: \(path.joined(separator: " ")) has no subcommand '\(name)'"
                : "svmemu help: no command '\(name)' in \(path.joined(separator: " ")); its commands: \(names.joined(separator: ", "))")
        }
    }
}
