// `svmemu hmm-tests`: the kernel's hmm-tests, ported, as kselftest TAP.
import ArgumentParser
import Foundation
import HMMSelftests

/// Runs the ported hmm-tests on the emulator and prints them as the kernel's
/// kselftest harness does, test names included, so that the output compares
/// line by line with a real kernel's `hmm-tests` log.
struct HMMTestsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hmm-tests",
        abstract: "Run the kernel's hmm-tests (ported) and print kselftest TAP with the kernel's test names.",
        discussion: """
            Runs Linux 6.12's tools/testing/selftests/mm/hmm-tests.c, case by case as ported to the \
            emulator (the same return codes, cpages, faults, bytes and permissions), in the kernel \
            harness's order: FIXTURE(hmm) with its hmm_device_private then hmm_device_coherent \
            variant, then FIXTURE(hmm2) the same way, and prints what the harness prints: \
            TAP version 13, 1..N, "# Starting N tests from M test cases.", "#  RUN ...", \
            "#            OK  ..." or the failed expectations and "#          FAIL  ...", \
            "ok N name" or "not ok N name", and the totals. `svmemu hmm-tests > emu.tap` then \
            diffs against a kernel log's TAP lines (Docs/conformance.md).

            The emulator models device-coherent memory, so the hmm_device_coherent variants run; \
            the kernel rig loads test_hmm without a coherent device, and there they SKIP. \
            --device-coherent skip does what that kernel does (the SKIP lines, and hmm_open()'s \
            "could not open hmm dmirror driver (/dev/hmm_dmirror2)" on standard error), so the \
            output is the rig log's line for line. --newer-kernel-cases adds the cases later \
            kernels have (the device-THP ones), --emulator-cases the emulator's own.

            With --json prints one object (Docs/json.md) whose results are tests (number, name, \
            result pass/fail/skip, skipReason, failures with file, line and message, terminated, \
            seconds), pass, fail, skip and coherentDevice.

            Exit status: 0 every case passed or was skipped; 1 a case failed; 64 an invalid \
            argument; 130 interrupted (SIGINT).
            """)

    @Option(name: .long, help: "The hmm_device_coherent variants: run (on the emulator's coherent device memory) or skip (as a kernel whose test_hmm has no coherent device).", completion: .list(["run", "skip"]))
    var deviceCoherent = "run"

    @Flag(name: .long, help: "Add the cases of kernels after 6.12 (device THP migration).")
    var newerKernelCases = false

    @Flag(name: .long, help: "Add the emulator's own cases in the hmm-tests shape.")
    var emulatorCases = false

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    func options() throws -> HMMSelftestOptions {
        var o = HMMSelftestOptions()
        switch deviceCoherent.lowercased() {
        case "run": o.coherentDevice = true
        case "skip": o.coherentDevice = false
        default: throw ValidationError("invalid --device-coherent '\(deviceCoherent)'; valid values: run, skip")
        }
        o.newerKernelCases = newerKernelCases
        o.emulatorCases = emulatorCases
        return o
    }

    func validate() throws { _ = try options() }

    func run() throws {
        let json = output.json
        let report = HMMSelftestRunner.run(try options(), line: { line in
            guard !json else { return }
            print(line)
            fflush(nil)   // each line as its case ends, as the kernel's harness
        }, diagnostic: { text in
            guard !json else { return }
            FileHandle.standardError.write(Data((text + "\n").utf8))
        })
        if json { print(try JSONReport.render(for: self, results: report)) }
        if report.fail > 0 { throw ExitStatus.failure }
    }
}
