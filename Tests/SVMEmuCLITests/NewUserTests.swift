import ArgumentParser
import Foundation
import Glibc
import MirrorDriver
import SVMEmu
@testable import SVMStress
import Testing
@testable import SVMEmuCLI

/// What `svmemu` (the executable built next to the test bundle) did: its
/// exit status (128 + signal for a signal) and what it wrote.
struct ProcessOutcome {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// The `svmemu` executable of this build (`swift build --build-tests`
/// builds it beside the test bundle).
func svmemuExecutable() throws -> String {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    try #require(n > 0)
    let me = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    var dir = me
    while let slash = dir.lastIndex(of: "/"), !FileManager.default.isExecutableFile(atPath: String(dir[..<slash]) + "/svmemu") {
        dir = String(dir[..<slash])
        try #require(!dir.isEmpty, "no svmemu executable above \(me)")
    }
    let slash = try #require(dir.lastIndex(of: "/"))
    return String(dir[..<slash]) + "/svmemu"
}

/// Runs `script` with `sh -c` (the executable's path in `$SVMEMU`), its
/// output in files; `interruptAfter`: seconds after which SIGINT is sent to
/// it. Bounded: killed after `timeout` seconds.
func runShell(_ script: String, interruptAfter: Double? = nil, timeout: Double = 60) throws -> ProcessOutcome {
    try withScratchDirectory { dir in
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", script]
        var env = ProcessInfo.processInfo.environment
        env["SVMEMU"] = try svmemuExecutable()
        process.environment = env
        _ = FileManager.default.createFile(atPath: dir + "/out", contents: nil)
        _ = FileManager.default.createFile(atPath: dir + "/err", contents: nil)
        process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/out"))
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/err"))
        try process.run()
        let start = Date()
        var interrupted = false
        while process.isRunning {
            let elapsed = Date().timeIntervalSince(start)
            if let after = interruptAfter, !interrupted, elapsed >= after {
                kill(process.processIdentifier, SIGINT)
                interrupted = true
            }
            if elapsed > timeout {
                kill(process.processIdentifier, SIGKILL)
                Issue.record("`\(script)` ran more than \(timeout) s")
                break
            }
            usleep(20_000)
        }
        process.waitUntilExit()
        let status = process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
        return ProcessOutcome(status: status,
                              stdout: (try? String(contentsOfFile: dir + "/out", encoding: .utf8)) ?? "",
                              stderr: (try? String(contentsOfFile: dir + "/err", encoding: .utf8)) ?? "")
    }
}

/// The message and exit status a command line is refused with, or nil.
private func refusalOf(_ arguments: [String]) -> (message: String, status: Int32)? {
    do {
        var command = try SVMEmuCommand.parseAsRoot(arguments)
        try command.validate()
        return nil
    } catch {
        return (SVMEmuCommand.message(for: error), SVMEmuCommand.exitCode(for: error).rawValue)
    }
}

@Suite("svmemu, tried as a new user would")
struct NewUserTests {
    @Test("a host that refuses memory (ulimit -v): exit 1 and a message naming how much, for what; no crash",
          .disabled(if: HostMemory.underThreadSanitizer, "ThreadSanitizer's shadow memory does not fit under ulimit -v"))
    func hostRefusesMemory() throws {
        for (command, figure) in [("overhead --size 2M --rounds 1", "8.0 GiB of address space for page metadata"),
                                  ("soak --operations 10", "8.0 GiB of address space for page metadata"),
                                  ("numa --size 1G --no-sweep", "2.0 GiB of address space for RAM node")] {
            let r = try runShell("ulimit -v 4000000 && exec \"$SVMEMU\" \(command)")
            #expect(r.status == 1, "\(command): \(r.status) \(r.stderr)")
            #expect(r.stderr.contains("the host refused " + figure), "\(command): \(r.stderr)")
            #expect(r.stderr.contains("ulimit -v"), "\(command): \(r.stderr)")
            #expect(!r.stderr.contains("Fatal error") && !r.stderr.contains("Backtrac"), "\(command): \(r.stderr)")
        }
    }

    @Test("the refusal names the figure and the purpose")
    func refusalText() throws {
        let r = HostMemoryRefusal(bytes: 8 << 30, purpose: "page metadata", errno: .noMemory)
        #expect(r.description.hasPrefix("the host refused 8.0 GiB of address space for page metadata (ENOMEM"))
    }

    @Test("numa checks the host's memory before it runs, with both figures")
    func numaMemory() throws {
        let numa = try #require(try SVMEmuCommand.parseAsRoot(["numa", "--size", "16G"]) as? NumaCommand)
        #expect(throws: CLIError.notEnoughMemory(
            "svmemu numa --size 16G needs about 64.6 GiB of memory; 8.0 GiB is available (MemAvailable). Ask for a smaller size.")) {
            try numa.preflight(available: 8 << 30)
        }
        let storm = try #require(try SVMEmuCommand.parseAsRoot(["numa", "--storm"]) as? NumaCommand)
        try storm.preflight(available: 8 << 30)
    }

    @Test("one path for two output options is refused before running (64), naming the path, however it is spelled")
    func onePathTwice() throws {
        try withScratchDirectory { dir in
            for command in ["overhead", "numa"] {
                let r = try #require(refusalOf([command, "--svg", dir + "/x", "--trace", dir + "/x"]), "\(command) accepted it")
                #expect(r.status == ExitStatus.usage.rawValue)
                #expect(r.message.contains("--svg and --trace name the same file (\(dir)/x)"), "\(r.message)")
                #expect(refusalOf([command, "--svg", dir + "/x", "--trace", dir + "/./x"]) != nil, "\(command): two spellings")
                #expect(refusalOf([command, "--svg", dir + "/x.svg", "--trace", dir + "/x.json"]) == nil)
            }
        }
    }

    @Test("sizes that hold no whole 2 MiB folio are refused with the rule")
    func wholeFolios() throws {
        for (arguments, expected) in [(["numa", "--size", "3M"], "--size must be 2M to 16G, a multiple of 2M (got 3M)"),
                                      (["bench", "migrate", "--granularity", "2m", "--size", "4K"],
                                       "--size with --granularity 2m must be 2M to 64G, a multiple of 2M (got 4K)"),
                                      (["bench", "migrate", "--granularity", "2m", "--size", "3M"], "a multiple of 2M (got 3M)")] {
            let r = refusalOf(arguments)
            #expect(r?.status == ExitStatus.usage.rawValue, "\(arguments)")
            #expect(r?.message.contains(expected) == true, "\(arguments): \(r?.message ?? "accepted")")
        }
        #expect(refusalOf(["bench", "migrate", "--size", "4K"]) == nil, "4 KiB granularity takes 4K")
    }

    @Test("soak --pages takes its whole documented range: a buffer larger than the old 64 MiB nodes runs")
    func soakPages() throws {
        var s = SoakSettings()
        // 65 MiB: more than the 64 MiB nodes the soak had (ENOMEM then).
        s.pages = 16640
        s.operations = 20
        s.auditEvery = 20
        s.mix = try #require(SoakMix(names: "migrate,move-pages"))
        let r = try Soak.run(s)
        #expect(r.clean, "\(r.findings) \(r.warnings)")
        #expect(Soak.nodeBytes(65536 * 4096 + 16 * (2 << 20)) >= 2 * (65536 * 4096 + 16 * (2 << 20)))
        #expect(Soak.nodeBytes(64 * 4096 + 2 * (2 << 20)) == 64 << 20, "the default soak keeps its machine")
    }

    @Test("standard output that cannot be written, or is closed, ends with status 1 and a message")
    func standardOutput() throws {
        let full = try #require(fopen("/dev/full", "w"))
        defer { fclose(full) }
        fputs("results\n", full)
        #expect(throws: CLIError.outputPath(path: "standard output", reason: "No space left on device")) {
            try StandardOutput.finish(full)
        }
        let toFull = try runShell("exec \"$SVMEMU\" devices > /dev/full")
        #expect(toFull.status == 1 && toFull.stderr.contains("cannot write standard output: No space left on device"), "\(toFull)")
        let closed = try runShell("exec \"$SVMEMU\" devices >&-")
        #expect(closed.status == 1 && closed.stderr.contains("cannot write standard output: Bad file descriptor"), "\(closed)")
        let fine = try runShell("exec \"$SVMEMU\" devices > /dev/null")
        #expect(fine.status == 0, "\(fine)")
    }

    @Test("merge with no files on a terminal says what to give (64) instead of waiting for typed lines")
    func mergeOnATerminal() throws {
        // script(1) runs the command on a pseudo-terminal (its standard input a tty).
        let r = try runShell("exec script -qec '\"$SVMEMU\" merge' /dev/null < /dev/null", timeout: 30)
        #expect(r.status == 64 && r.stdout.contains("standard input is a terminal"), "\(r)")
        let piped = try runShell("exec \"$SVMEMU\" merge < /dev/null")
        #expect(piped.status == 1 && piped.stdout.contains("no lines to merge"), "\(piped)")
    }

    @Test("SIGINT: status 130, one line that says what was interrupted, no file under the name asked for")
    func interrupt() throws {
        try withScratchDirectory { dir in
            // A soak of a billion operations: it runs until interrupted.
            let r = try runShell("exec \"$SVMEMU\" soak --operations 1000000000", interruptAfter: 1.0, timeout: 30)
            #expect(r.status == 130, "\(r)")
            #expect(r.stderr.contains("svmemu soak: interrupted (SIGINT) before the run finished; the run did not finish and no output file was written"),
                    "\(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "one line: \(r.stderr)")
            // Output files go to a temporary name first, renamed when complete.
            let file = OutputFile(dir + "/chart.svg")
            #expect(OutputFile.temporaryPath(for: file.path).hasPrefix(dir + "/.chart.svg.svmemu-"))
            try file.write("<svg/>")
            let names = try FileManager.default.contentsOfDirectory(atPath: dir)
            #expect(names == ["chart.svg"], "\(names)")
        }
    }

    @Test("numa --storm: pages migrated, not migrated and already on the target add up to pages x rounds")
    func stormCounts() throws {
        var s = NUMAStormSettings()
        s.pages = 64
        s.rounds = 4
        s.holders = 2
        s.schedule.deterministic = true
        s.schedule.cpus = 3
        var failures = 0
        for seed in UInt64(1)...3 {
            s.schedule.seed = seed
            for algorithm in [MigrationAlgorithm.neverBlock, .batched] {
                let r = try NUMABench.storm(algorithm, settings: s)
                #expect(r.pagesMigrated + r.pagesNotMigrated + r.pagesAlreadyOnTarget == s.pages * s.rounds,
                        "seed \(seed) \(algorithm): \(r.pagesMigrated) + \(r.pagesNotMigrated) + \(r.pagesAlreadyOnTarget)")
                failures += r.pagesNotMigrated
            }
        }
        #expect(failures > 0, "the storm left some pages behind, so the counts were tested where they can differ")
    }

    @Test("the watchdog never declares a page that moved (real threads, a 10 ms window)")
    func watchdogBlamesAStalledPage() throws {
        for _ in 0..<5 {
            var s = StormSettings(faultPolicy: .trylock, driverLock: .exclusive, migrateToRAMWorkMicros: 50,
                                  threads: 8, pages: 32, stallSeconds: 0.01)
            s.joinTimeoutSeconds = 10
            let r = try StormHarness.run(s)
            #expect(r.error == nil && r.teardownClean && r.dataIntact)
            if let page = r.stalledPage {
                #expect(page == r.pagesMigrated, "declared page \(page) while \(r.pagesMigrated) pages completed")
                #expect(!r.perPage.contains { $0.page == page })
            } else {
                #expect(r.pagesMigrated == 32)
            }
        }
    }

    @Test("a deterministic livelock ends in virtual tenths of a second with its verdict, showing progress")
    func deterministicLivelockBounded() throws {
        let command = try #require(try SVMEmuCommand.parseAsRoot(
            ["livelock", "--deterministic", "--threads", "4", "--cpus", "4", "--pages", "2", "--fault-delay-us", "200"]) as? LivelockCommand)
        let s = try command.settings()
        #expect(s.stallSeconds == 0.1, "the deterministic default window")
        let terminal = try PseudoTerminal()
        let r = try LivelockCommand.runStorm(s, label: "storm", progress: ProgressLine(label: "", fd: terminal.secondary))
        #expect(r.livelocked && r.stalledPage == r.pagesMigrated)
        #expect((r.virtualSeconds ?? 1) < 0.2)
        let shown = terminal.drain()
        #expect(shown.contains("storm: page \(r.pagesMigrated)/2"), "\(shown.debugDescription)")
        let real = try #require(try SVMEmuCommand.parseAsRoot(["livelock"]) as? LivelockCommand)
        #expect(try real.settings().stallSeconds == 2)
    }
}
