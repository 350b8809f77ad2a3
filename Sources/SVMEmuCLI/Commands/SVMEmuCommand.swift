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
