// `svmemu soak`: the randomized soak under the deterministic scheduler.
import ArgumentParser
import Foundation
import MirrorDriver
import SVMEmu
import SVMStress

/// Runs a randomized soak and prints what it found.
struct SoakCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "soak",
        abstract: "Randomized soak under the deterministic scheduler: reads, writes, migrations both ways, eviction.",
        discussion: """
            --cpus CPU threads read and write random words of a --pages buffer while a GPU thread \
            migrates random pages to device memory and back and now and then evicts everything, \
            all under the deterministic scheduler seeded by --seed (the same seed, the same soak). \
            Every read is checked against a shadow copy, and after the run every byte, every \
            folio's lock and references, and the kernel's warnings. `make soak` runs a short one.

            With --json prints one object whose results are the settings, operations, reads, \
            writes, migrationsToDevice, migrationsToSystem, evictions, bytesCorrupted, \
            leakedReferences, locksHeld, warnings, deadlock, scheduleSteps, virtualSeconds and \
            seconds.

            Exit status: 0 the soak was clean; 1 it found corruption, a leak, a held lock, a \
            warning or a deadlock (or could not run); 64 an invalid argument.
            """)

    @Option(name: .long, parsing: .unconditional, help: "Operations in total (1-1000000000).")
    var operations = 100_000

    @Option(name: .long, parsing: .unconditional, help: "CPU threads, one emulated CPU each (1-63); one GPU thread besides.")
    var cpus = 4

    @Option(name: .long, parsing: .unconditional, help: "Pages of 4 KiB in the buffer (1-65536).")
    var pages = 64

    @Option(name: .long, parsing: .unconditional, help: "Seed of the schedule and of every thread's choices (0 to 2^64-1).")
    var seed: UInt64 = 1

    @OptionGroup var output: JSONOutputOptions

    func settings() throws -> SoakSettings {
        var s = SoakSettings()
        s.operations = operations
        s.cpus = cpus
        s.pages = pages
        s.seed = seed
        do { try s.validate() } catch {
            throw ValidationError(error.description.replacingOccurrences(of: "operations must", with: "--operations must")
                .replacingOccurrences(of: "cpus must", with: "--cpus must")
                .replacingOccurrences(of: "pages must", with: "--pages must"))
        }
        return s
    }

    func validate() throws { _ = try settings() }

    func run() throws {
        let r: SoakResult
        do { r = try Soak.run(try settings()) } catch let e as StormError {
            throw CLIError.runFailed("svmemu: the soak could not run: \(e.description)")
        }
        if output.json {
            print(try JSONReport.render(for: self, results: r))
        } else {
            print("""
                soak: \(r.operations) operations (\(r.reads) reads, \(r.writes) writes, \
                \(r.migrationsToDevice) pages to device, \(r.migrationsToSystem) to system, \(r.evictions) evicted), \
                seed \(r.settings.seed)
                  bytes corrupted \(r.bytesCorrupted), leaked references \(r.leakedReferences), \
                locks held \(r.locksHeld), warnings \(r.warnings.count)\(r.deadlock.map { ", " + $0 } ?? "")
                  \(r.scheduleSteps) scheduling steps, \(String(format: "%.3f", r.virtualSeconds)) s virtual, \
                \(String(format: "%.2f", r.seconds)) s on the host
                """)
        }
        if !r.clean { throw ExitStatus.failure }
    }
}
