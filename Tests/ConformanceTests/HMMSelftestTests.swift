import Foundation
import Testing
import HMMSelftests

/// One case on one fixture variant, named as the kernel's harness names it.
struct HMMCaseVariant: Sendable, CustomTestStringConvertible {
    let test: HMMSelftest
    let variant: HMMVariant
    var testDescription: String { test.fullName(variant) }

    /// Every ported case on both variants (device-private and device-coherent).
    static let all = HMMSelftest.all.flatMap { t in HMMVariant.allCases.map { HMMCaseVariant(test: t, variant: $0) } }
}

/// The ported hmm-tests (Sources/HMMSelftests): every case on both memory
/// types, each failed expectation an issue here. `svmemu hmm-tests` runs the
/// same cases. The time limit only catches a hang: 76 cases at once under
/// ThreadSanitizer on a 2-core host loaded by two other builds queued past
/// a 3-minute limit, so it is 10.
@Suite("hmm-tests", .timeLimit(.minutes(10)))
struct HMMSelftestTests {
    @Test(arguments: HMMCaseVariant.all) func hmm_tests_case(_ c: HMMCaseVariant) {
        let record = c.test.run(c.variant)
        for f in record.failures {
            Issue.record(Comment(rawValue: "\(c.test.fullName(c.variant)): \(f.file):\(f.line): \(f.message)"))
        }
    }
}

/// `svmemu hmm-tests` against a real kernel's log: Linux 6.12.117's
/// hmm-tests under QEMU TCG (the kernel rig, /work/shared/kernel-rig/logs,
/// the TAP lines of the run where every case passed; the printk lines and
/// hmm_open()'s standard-error lines taken out).
@Suite("hmm-tests TAP against the kernel's log", .timeLimit(.minutes(10)))
struct HMMSelftestTAPTests {
    static let kernelLog: [String] = {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("Fixtures/hmm-tests-linux-6.12.117-tcg.tap")
        return ((try? String(contentsOf: url, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }()

    /// The names of `ok N name` / `not ok N name` lines, in order.
    static func names(_ lines: [String]) -> [String] {
        lines.compactMap { line in
            guard line.hasPrefix("ok ") || line.hasPrefix("not ok ") else { return nil }
            let fields = line.split(separator: " ")
            let name = fields[line.hasPrefix("ok ") ? 2 : 3]
            return String(name)
        }
    }

    @Test func the_test_names_and_their_order_are_the_kernels() {
        let kernel = Self.names(Self.kernelLog)
        #expect(kernel.count == 58)
        let plan = HMMSelftestRunner.plan(HMMSelftestOptions()).map { $0.test.fullName($0.variant) }
        #expect(plan == kernel)
    }

    /// Without a coherent device (the rig's test_hmm), every line is the kernel's.
    @Test func without_a_coherent_device_the_output_is_the_kernel_log_line_for_line() {
        var options = HMMSelftestOptions()
        options.coherentDevice = false
        var diagnostics: [String] = []
        let report = HMMSelftestRunner.run(options, diagnostic: { diagnostics.append($0) })
        let ours = report.tap.split(separator: "\n").map(String.init)
        #expect(ours.count == Self.kernelLog.count)
        for (i, (a, b)) in zip(ours, Self.kernelLog).enumerated() where a != b {
            Issue.record("line \(i + 1): emulator '\(a)', kernel '\(b)'")
        }
        #expect(report.pass == 29 && report.skip == 29 && report.fail == 0)
        #expect(diagnostics == Array(repeating: HMMSelftestRunner.coherentOpenFailure, count: 29))
    }

    /// With the emulator's coherent device the coherent variants run: their
    /// lines differ from the rig's (ok, no SKIP), and only theirs.
    @Test func with_the_coherent_device_only_the_coherent_lines_differ() {
        let kernel = Self.kernelLog.filter { !$0.contains("SKIP") }
        let report = HMMSelftestRunner.run(HMMSelftestOptions())
        let ours = report.tap.split(separator: "\n").map(String.init)
        #expect(report.fail == 0)
        #expect(report.pass == 58)
        // Every line of the kernel's that is not about a skip is ours too, in order.
        var rest = ours[...]
        for line in kernel where !line.hasPrefix("# PASSED") && !line.hasPrefix("# Totals") {
            guard let at = rest.firstIndex(of: line) else { Issue.record("missing: \(line)"); break }
            rest = rest[(at + 1)...]
        }
        #expect(ours.last == "# Totals: pass:58 fail:0 xfail:0 xpass:0 skip:0 error:0")
    }
}
