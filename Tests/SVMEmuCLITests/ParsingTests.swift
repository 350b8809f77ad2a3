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
}
