import ArgumentParser
import Testing
@testable import SVMEmuCLI

@Suite("svmemu argument parsing")
struct ParsingTests {
    @Test("every subcommand parses with its defaults")
    func defaultsParse() throws {
        for args in [["demo"], ["livelock"], ["overhead"], ["bench", "memory"], ["bench", "migrate"], ["bench", "thp"], ["devices"]] {
            _ = try SVMEmuCommand.parseAsRoot(args)
        }
    }

    @Test("out-of-range numbers (negative ones too) reach validation and are refused with the flag and the range, not 'Missing value'")
    func negativeNumbers() throws {
        let cases: [([String], String)] = [
            (["livelock", "--pages", "-3"], "--pages must be 1...65536 (got -3)"),
            (["livelock", "--threads", "-1"], "--threads must be 1...256 (got -1)"),
            (["livelock", "--fault-delay-us", "-5"], "--fault-delay-us must be 0...1000000 µs (got -5)"),
            (["livelock", "--stall-seconds", "-1"], "--stall-seconds must be > 0 and at most 3600 s (got -1.0)"),
            (["demo", "--pages", "-3"], "--pages must be 1...65536 (got -3)"),
            (["demo", "--lookup-delay-us", "-1"], "--lookup-delay-us must be 0...1000000 µs (got -1)"),
            (["overhead", "--rounds", "-1"], "--rounds must be 1...20 (got -1)"),
            (["overhead", "--copy-threads", "-4"], "--copy-threads must be 1...64 (got -4)"),
            (["overhead", "--busy-cpus", "17"], "--busy-cpus must be 0...16 (got 17)"),
            (["overhead", "--size", "-2M"], "--size must be 2M to 64G, a multiple of 2M (got -2M)"),
            (["bench", "memory", "--size", "-5M"], "--size must be 1M to 1G, a multiple of 1M (got -5M)"),
            (["bench", "migrate", "--rounds", "-2"], "--rounds must be 1...100 (got -2)"),
            (["bench", "thp", "--rounds", "-1"], "--rounds must be 1...100 (got -1)"),
            (["numa", "--size", "1M"], "--size must be 2M to 16G, a multiple of 2M (got 1M)"),
            (["numa", "--pages", "1"], "--pages must be 2...65536 (got 1)"),
            (["numa", "--rounds", "0"], "--rounds must be 1...100 (got 0)"),
            (["bench", "memory", "--size", "2G"], "--size must be 1M to 1G, a multiple of 1M (got 2G)"),
            (["bench", "memory", "--fault-mib", "2000"], "--fault-mib must be 1...1024 (got 2000)"),
            (["bench", "thp", "--rounds", "101"], "--rounds must be 1...100 (got 101)"),
            (["bench", "goals", "--rounds", "21"], "--rounds must be 1...20 (got 21)"),
            (["soak", "--operations", "0"], "--operations must be 1...1000000000 (got 0)"),
            (["fidelity", "--cpus", "65"], "--cpus must be 1...64 (got 65)"),
            (["explore", "--schedules", "0"], "--schedules must be 1...1000000 (got 0)"),
            (["replay", "--steps", "-1"], "--steps must be 0...1000000 (got -1)"),
        ]
        for (arguments, expected) in cases {
            let r = try #require(refusal(arguments), "\(arguments) was accepted")
            #expect(r.message.contains(expected), "\(arguments): \(r.message)")
            #expect(!r.message.contains("Missing value"))
            #expect(r.status == ExitStatus.usage.rawValue)
        }
        // An unsigned seed cannot be negative: ArgumentParser's own message, not "Missing value".
        let seed = try #require(refusal(["livelock", "--seed", "-1"]))
        #expect(seed.message.contains("The value '-1' is invalid for '--seed"))
    }

    @Test("an empty --copy-model is refused with the valid models; an unknown one too")
    func copyModel() throws {
        for given in ["", ",", " , "] {
            let r = try #require(refusal(["overhead", "--copy-model", given]), "'\(given)' was accepted")
            #expect(r.message.contains("--copy-model: no model given; valid models: memcpy, pcie4, pcie5, nvlink-c2c, all"))
            #expect(r.status == ExitStatus.usage.rawValue)
        }
        let unknown = try #require(refusal(["overhead", "--copy-model", "memcpy,pcie9"]))
        #expect(unknown.message.contains("unknown model 'pcie9'; valid models: memcpy, pcie4, pcie5, nvlink-c2c, all"))
        let two = try #require(try SVMEmuCommand.parseAsRoot(["overhead", "--copy-model", "memcpy, pcie4"]) as? OverheadCommand)
        #expect(try two.copyModels() == [.memcpy, .pcie4])
    }

    @Test("--per-page without --json is refused; with --json it parses")
    func perPage() throws {
        let r = try #require(refusal(["livelock", "--per-page"]))
        #expect(r.message.contains("--per-page needs --json"))
        _ = try SVMEmuCommand.parseAsRoot(["livelock", "--per-page", "--json"])
    }
}
