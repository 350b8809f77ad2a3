import ArgumentParser
import Foundation
import MirrorDriver
import SVMStress
import Testing
@testable import SVMEmuCLI

@Suite("svmemu exit statuses")
struct ExitStatusTests {
    @Test("a livelock exits 0 by default and 2 with --fail-on-livelock; a failed check exits 1 and wins")
    func livelockStatus() throws {
        let livelock = try stormResult(livelocked: true)
        let clean = try stormResult(livelocked: false)
        #expect(LivelockCommand.exitStatus(for: livelock, failOnLivelock: false) == ExitStatus.success)
        #expect(LivelockCommand.exitStatus(for: livelock, failOnLivelock: true) == ExitStatus.livelockDetected)
        #expect(ExitStatus.livelockDetected.rawValue == 2)
        #expect(LivelockCommand.exitStatus(for: clean, failOnLivelock: true) == ExitStatus.success)
        for failed in [try stormResult(livelocked: true, teardownClean: false), try stormResult(livelocked: false, dataIntact: false),
                       try stormResult(livelocked: true, error: "SIGBUS")] {
            #expect(LivelockCommand.exitStatus(for: failed, failOnLivelock: true) == ExitStatus.failure)
            #expect(LivelockCommand.exitStatus(for: failed, failOnLivelock: false) == ExitStatus.failure)
        }
        let command = try #require(try SVMEmuCommand.parseAsRoot(["livelock", "--fail-on-livelock"]) as? LivelockCommand)
        #expect(command.failOnLivelock)
    }

    @Test("the statuses are 0, 1, 2 and 64, and the help says so")
    func documented() throws {
        #expect(ExitStatus.success.rawValue == 0 && ExitStatus.failure.rawValue == 1 && ExitStatus.usage.rawValue == 64)
        #expect(LivelockCommand.helpMessage().contains("--fail-on-livelock"))
        #expect(LivelockCommand.helpMessage().contains("Exit status"))
        #expect(SVMEmuCommand.helpMessage().contains("Exit status"))
        #expect(OverheadCommand.helpMessage().contains("Exit status"))
    }
}
