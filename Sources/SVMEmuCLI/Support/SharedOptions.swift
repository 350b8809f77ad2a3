// Option groups that several commands share: one declaration, one help text
// and one check each.
import ArgumentParser
import SVMStress

/// `--json`: one JSON object on standard output instead of the tables, in
/// the shape every command shares (`JSONReport`, Docs/json.md).
struct JSONOutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print one JSON object instead of the tables (arguments, host, version and the results; see Docs/json.md).")
    var json = false
}

/// `--rounds` of `bench memory` and `bench migrate`: timed rounds, the best
/// reported.
struct BenchRoundsOptions: ParsableArguments {
    @Option(name: .long, parsing: .unconditional, help: "Timed rounds of each measurement (the best is reported).")
    var rounds = 5

    func validate() throws {
        try checkRange(rounds, 1...100, flag: "--rounds")
    }
}

/// The defaults a command gives its `StormOptions`.
protocol StormOptionDefaults {
    static var pages: Int { get }
    static var stallSeconds: Double { get }
    static var lookupDelayUs: Int { get }
}

/// The shape of a fault storm that `livelock` and `demo` share, each with
/// its own defaults (`Defaults`); checked by `StormSettings.validate()` once
/// applied.
struct StormOptions<Defaults: StormOptionDefaults>: ParsableArguments {
    @Option(name: .long, parsing: .unconditional, help: "Threads that go at each page.")
    var threads = 8

    @Option(name: .long, parsing: .unconditional, help: "Pages, processed one after the other.")
    var pages = Defaults.pages

    @Option(name: .long, parsing: .unconditional, help: "Seconds without a page completing before the run is declared livelocked.")
    var stallSeconds = Defaults.stallSeconds

    @Option(name: .long, parsing: .unconditional, help: "Microseconds migrateToRAM works before migrate_vma_setup (range lookup, its own locks), holding its lock and the page reference.")
    var lookupDelayUs = Defaults.lookupDelayUs

    /// Sets the storm's threads, pages, stall window and lookup time.
    func apply(to s: inout StormSettings) {
        s.threads = threads
        s.pages = pages
        s.stallSeconds = stallSeconds
        s.migrateToRAMLookupMicros = lookupDelayUs
    }
}
