// Options every command shares.
import ArgumentParser

/// `--json`: one JSON object on standard output instead of the tables, in
/// the shape every command shares (`JSONReport`, Docs/json.md).
struct JSONOutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print one JSON object instead of the tables (arguments, host, version and the results; see Docs/json.md).")
    var json = false
}
