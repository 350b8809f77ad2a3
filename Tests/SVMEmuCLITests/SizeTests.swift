import ArgumentParser
import SVMEmu
import Testing
@testable import SVMEmuCLI

/// The message and exit status ArgumentParser gives for `arguments`, or nil if they parse.
func refusal(_ arguments: [String]) -> (message: String, status: Int32)? {
    do {
        _ = try SVMEmuCommand.parseAsRoot(arguments)
        return nil
    } catch {
        return (SVMEmuCommand.message(for: error), SVMEmuCommand.exitCode(for: error).rawValue)
    }
}

@Suite("svmemu sizes and memory")
struct SizeTests {
    @Test("one size reader: binary suffixes with optional iB/B, any case, signs kept for the range check")
    func parse() throws {
        #expect(ByteSize.parse("256M") == 256 << 20)
        #expect(ByteSize.parse("2MiB") == 2 << 20)
        #expect(ByteSize.parse("4kb") == 4096)
        #expect(ByteSize.parse(" 1G ") == 1 << 30)
        #expect(ByteSize.parse("65536") == 65536)
        #expect(ByteSize.parse("-3M") == -(3 << 20))
        #expect(ByteSize.parse("0") == 0)
        for bad in ["", "abc", "M", "1.5G", "12X", "99999999999999G"] { #expect(ByteSize.parse(bad) == nil, "\(bad)") }
        #expect(ByteSize.format(2 << 20) == "2M" && ByteSize.format(512 << 10) == "512K" && ByteSize.format(4097) == "4097")
        #expect(ByteSize.describe(35 << 30) == "35.0 GiB")
    }

    @Test("--size 0, 100G and 3M are refused with the allowed range (exit status 64)")
    func rangeInMessages() throws {
        for (given, shown) in [("0", "0"), ("100G", "100G"), ("3M", "3M")] {
            let r = try #require(refusal(["overhead", "--size", given]), "--size \(given) was accepted")
            #expect(r.message.contains("--size must be 2M to 64G, a multiple of 2M (got \(shown))"), "\(r.message)")
            #expect(r.status == ExitStatus.usage.rawValue)
        }
        let unreadable = try #require(refusal(["overhead", "--size", "lots"]))
        #expect(unreadable.message.contains("'lots' is not a size") && unreadable.message.contains("2M to 64G"))
        let bench = try #require(refusal(["bench", "migrate", "--size", "0"]))
        #expect(bench.message.contains("--size must be 4K to 64G, a multiple of 4K (got 0)"))
        let thp = try #require(refusal(["bench", "thp", "--max-size", "1K"]))
        #expect(thp.message.contains("--max-size must be 512K to 64G (got 1K)"))
    }

    @Test("a size the host cannot hold is refused before the run, with what it needs and what is available")
    func memoryCheck() throws {
        let overhead = try #require(try SVMEmuCommand.parseAsRoot(["overhead", "--size", "16G"]) as? OverheadCommand)
        let fourGiB = 4 << 30
        do {
            try overhead.preflight(available: fourGiB)
            Issue.record("16G was accepted with 4 GiB available")
        } catch {
            // 16 GiB * 2.2 + 640 MiB.
            #expect(error.description == "svmemu overhead --size 16G needs about 35.8 GiB of memory; "
                    + "4.0 GiB is available (MemAvailable). Ask for a smaller size.")
            #expect(SVMEmuCommand.exitCode(for: error) == ExitStatus.failure)
        }
        try overhead.preflight(available: 64 << 30)
        try overhead.preflight(available: nil)  // unknown: no check

        let migrate = try #require(try SVMEmuCommand.parseAsRoot(["bench", "migrate", "--size", "2G"]) as? BenchMigrateCommand)
        #expect(throws: CLIError.self) { try migrate.preflight(available: fourGiB) }
        try migrate.preflight(available: 16 << 30)

        let storm = try #require(try SVMEmuCommand.parseAsRoot(["livelock", "--page-size", "2m", "--pages", "2048"]) as? LivelockCommand)
        #expect(throws: CLIError.self) { try storm.preflight(try storm.settings(), available: fourGiB) }
        try storm.preflight(try storm.settings(), available: 16 << 30)
    }

    @Test("MemAvailable and MemTotal are read from /proc/meminfo's kB lines")
    func meminfo() throws {
        let text = "MemTotal:       24558412 kB\nMemFree:        22000000 kB\nMemAvailable:   23100000 kB\n"
        #expect(HostResources.meminfoField("MemAvailable", in: text) == 23_100_000)
        #expect(HostResources.meminfoField("MemTotal", in: text) == 24_558_412)
        #expect(HostResources.meminfoField("SwapTotal", in: text) == nil)
        #expect((HostResources.availableBytes() ?? 0) > 0 && (HostResources.totalBytes() ?? 0) > 0)
        #expect(HostResources.cores >= 1)
    }
}
